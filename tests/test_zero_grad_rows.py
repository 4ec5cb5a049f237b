"""ZeroGradCheck's per-interval buffer of sampled steps: longer intervals than it has rows, resumes, op counts."""

from __future__ import annotations

import io
from collections import Counter
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import stallguard as sg
from stallguard.hooks import zero_grad
from tests.helpers import mlp, regression_data


def train(
    steps: int, keep_grads_after: set[int], check_every: int, every: int = 1, guard: sg.Guard | None = None, **kw: Any
) -> sg.Guard:
    """SGD on a small MLP; ``zero_grad()`` after every step except the steps in ``keep_grads_after``."""
    x, y = regression_data()
    if guard is None:
        torch.manual_seed(0)
        model = mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        hooks = [sg.ZeroGradCheck(every=every, **kw)]
        guard = sg.Guard(model, opt, hooks=hooks, sinks=[], check_every=check_every, strict=True)
    model, opt = guard.model, guard.optimizers[0]
    while guard.step < steps:
        i = guard.step % 8
        nn.functional.mse_loss(model(x[i * 32 : (i + 1) * 32]), y[i * 32 : (i + 1) * 32]).backward()
        opt.step()
        if guard.step not in keep_grads_after:
            opt.zero_grad()
    return guard


def reports(guard: sg.Guard) -> list[tuple[int, str, int, int, int | None]]:
    return [
        (e.step, str(e.severity), e.data["steps"], e.data["checked_steps"], e.data["first_step"])
        for e in guard.events
        if e.kind == "grads_not_cleared"
    ]


@pytest.mark.parametrize(
    ("kept", "first"),
    [
        ({3, 4}, 4),  # the first flagged step is in the first rows, folded on the device
        ({13, 14, 15}, 14),  # in the second fold
        ({18}, 19),  # in the rows still in the buffer at the check point
        ({2, 18}, 3),  # folded, and more in the buffer
    ],
)
def test_more_sampled_steps_than_rows_are_all_counted(kept: set[int], first: int) -> None:
    assert zero_grad._ROWS < 20  # the interval below overflows the buffer twice
    guard = train(20, kept, check_every=20)
    guard.close()
    # A step is flagged when the previous step left its gradients in place.
    assert reports(guard) == [(20, "warning", len(kept), 20, first)]


def test_every_sampled_step_flagged_over_a_long_interval_is_an_error() -> None:
    guard = train(60, set(range(1, 61)), check_every=30)
    guard.close()
    # Step 1 has nothing before it; every later step holds the leftovers of all the earlier ones.
    assert reports(guard) == [(30, "warning", 29, 30, 2), (60, "error", 30, 30, 31)]
    assert min(e.data["ratio"] for e in guard.events) > 0.1


def test_manual_check_points_and_a_changed_interval() -> None:
    guard = train(5, {4}, check_every=1000)
    guard.check()  # by hand, mid-interval
    guard.check_every = 12
    train(24, {9, 20}, check_every=0, guard=guard)
    guard.close()
    assert reports(guard) == [(5, "warning", 1, 5, 5), (12, "warning", 1, 7, 10), (24, "warning", 1, 12, 21)]


def test_resume_mid_interval_gives_the_events_of_an_uninterrupted_run() -> None:
    kept = {3, 11, 17}
    whole = train(20, kept, check_every=20)
    whole.close()
    part = train(13, kept, check_every=20)  # 13 rows: one fold, five rows in the buffer
    buf = io.BytesIO()
    torch.save(part.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    part.close()
    resumed = sg.Guard(
        part.model, torch.optim.SGD(part.model.parameters(), lr=0.01), hooks=[sg.ZeroGradCheck(every=1)], sinks=[]
    )
    resumed.check_every = 20
    resumed.load_state_dict(state)
    train(20, kept, check_every=0, guard=resumed)
    resumed.close()
    assert reports(whole) == [(20, "warning", 3, 20, 4)]
    assert reports(resumed) == reports(whole)


def test_state_dict_from_the_earlier_layout_is_refused_clearly() -> None:
    guard = train(3, set(), check_every=10)
    state = guard.hook(sg.ZeroGradCheck).state_dict()
    guard.close()
    old = {k: v for k, v in state.items() if k not in ("grams", "steps", "first_row")}
    old["first_flagged"] = torch.tensor(float("inf"))
    with pytest.raises(KeyError, match=r"ZeroGradCheck\.load_state_dict: missing state 'grams'"):
        sg.ZeroGradCheck().load_state_dict(old)


def test_a_parameter_whose_grad_is_set_by_hand_is_left_out() -> None:
    # The smallest parameter is not used in the forward pass and gets its .grad assigned by hand, so no
    # backward adds to its sum: it is left out of the comparison (and not swapped, it has a gradient),
    # and the other watched parameters still show whether zero_grad is missing.
    x, y = regression_data()
    for clear in (False, True):
        torch.manual_seed(0)
        model = mlp()
        model.extra = nn.Parameter(torch.ones(4))
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        guard = sg.Guard(model, opt, hooks=[sg.ZeroGradCheck(every=1, max_params=3)], sinks=[], check_every=5)
        for _ in range(10):
            nn.functional.mse_loss(model(x), y).backward()
            model.extra.grad = torch.full_like(model.extra, 0.5)
            opt.step()
            if clear:
                opt.zero_grad()
        guard.close()
        assert next(n for n, _ in guard.hook(sg.ZeroGradCheck)._watched) == "extra"
        assert bool(reports(guard)) is not clear, reports(guard)


class _Count(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.ops[str(func.overloadpacket.__name__)] += 1
        return func(*args, **(kwargs or {}))


def _ops_at_the_step(max_params: int) -> int:
    x, y = regression_data()
    model = nn.Sequential(*[nn.Linear(8, 8) for _ in range(6)])
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    checker = sg.ZeroGradCheck(every=1, max_params=max_params)
    guard = sg.Guard(model, opt, hooks=[checker], sinks=[], check_every=100)
    counted = _Count()
    inner = checker.on_before_step

    def on_before_step(ctx: Any) -> None:
        with counted:
            inner(ctx)

    checker.on_before_step = on_before_step  # type: ignore[method-assign]
    for _ in range(3):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y.expand(-1, 8)).backward()
        opt.step()
    guard.close()
    assert len(checker._watched) == max_params
    return counted.ops.total() // 3


def test_ops_at_the_step_do_not_grow_with_the_watched_parameters() -> None:
    few, many = _ops_at_the_step(2), _ops_at_the_step(10)
    assert few == many <= 12
