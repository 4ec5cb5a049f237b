"""No host-device synchronization between check points.

Per-step hook work must stay on the device: the host reads numbers only at check points. On CPU the
audit counts, over training steps that are not check points, the aten ops that read a device value
on the host (``aten::item``, ``aten::_local_scalar_dense``, ``aten::is_nonzero``, ...) with
torch.profiler, and the Python-level reads (``tolist``, ``numpy``, ``cpu``, ``bool(t)``,
``float(t)``, ...) with a TorchFunctionMode, since on CPU those never reach an aten op. A Guarded
loop must count exactly what the same loop without a Guard counts (zero for this SGD loop). On CUDA
the same steps run under ``torch.cuda.set_sync_debug_mode("error")``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.profiler import ProfilerActivity, profile

import stallguard as sg
from stallguard import registry

CHECK_EVERY = 20

# aten ops whose result the host must wait for.
SYNC_OPS = {
    "aten::item",
    "aten::_local_scalar_dense",
    "aten::is_nonzero",
    "aten::equal",
    "aten::nonzero",
    "aten::masked_select",
    "aten::_unique",
    "aten::_unique2",
    "aten::unique_dim",
    "aten::unique_consecutive",
    "aten::bincount",
}
# Tensor methods that read values to the host (on CPU they dispatch no aten op).
SYNC_METHODS = {"item", "tolist", "numpy", "cpu", "__bool__", "__float__", "__int__", "__index__", "__complex__"}


class _HostReads(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.calls: Counter[str] = Counter()
        self.paused = False

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        name = getattr(func, "__name__", "")
        if name in SYNC_METHODS and not self.paused:
            self.calls[name] += 1
        return func(*args, **(kwargs or {}))


@contextmanager
def audit() -> Iterator[tuple[Counter[str], Callable[[], Any]]]:
    """Count host reads (aten ops and tensor methods) inside the block, except in ``excluded()`` ranges.

    Yields the counter (filled when the block ends) and ``excluded``, a context manager for the
    steps that are check points: one profiler session covers the whole run, which is much faster
    than one per interval.
    """
    found: Counter[str] = Counter()
    reads = _HostReads()
    ranges: list[Any] = []

    @contextmanager
    def excluded() -> Iterator[None]:
        reads.paused = True
        try:
            with torch.profiler.record_function("check point step"):
                yield
        finally:
            reads.paused = False

    with profile(activities=[ProfilerActivity.CPU]) as prof, reads:
        yield found, excluded
    events = prof.events()
    ranges = [e.time_range for e in events if e.name == "check point step"]
    for e in events:
        if e.name in SYNC_OPS and not any(r.start <= e.time_range.start <= r.end for r in ranges):
            found[e.name] += 1
    found.update(reads.calls)


def _model() -> nn.Module:
    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))


class _Loop:
    def __init__(self, device: str, make_hooks: Callable[[], list[sg.Hook] | None] | None, **guard_kwargs: Any):
        torch.manual_seed(0)
        self.model = _model().to(device)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.05, momentum=0.9)
        g = torch.Generator().manual_seed(0)
        self.data = [
            (torch.randn(32, 8, generator=g).to(device), torch.randint(0, 4, (32,), generator=g).to(device))
            for _ in range(4)
        ]
        self.guard = None
        if make_hooks is not None:
            self.guard = sg.Guard(
                self.model, self.opt, hooks=make_hooks(), sinks=[], check_every=CHECK_EVERY, strict=True, **guard_kwargs
            )
        self.n = 0

    def step(self) -> None:
        x, y = self.data[self.n % len(self.data)]
        self.n += 1
        self.opt.zero_grad(set_to_none=True)
        out = self.model(x)
        loss = nn.functional.cross_entropy(out, y)
        loss.backward()
        if self.guard is not None:
            self.guard.observe(loss, inputs=x, outputs=out.detach(), targets=y)
        self.opt.step()


def _audited_counts(make_hooks: Callable[[], list[sg.Hook] | None] | None, **kwargs: Any) -> Counter[str]:
    loop = _Loop("cpu", make_hooks, **kwargs)
    checks = set(range(CHECK_EVERY, 2 * CHECK_EVERY + 1, CHECK_EVERY))
    if loop.guard is not None and loop.guard.early_check:
        checks.add(loop.guard.early_check)  # Guard(repair=True) adds one after step 1
    with audit() as (total, excluded):
        for step in range(1, 2 * CHECK_EVERY + 1):
            if step in checks:
                with excluded():
                    loop.step()  # a check point
            else:
                loop.step()
    if loop.guard is not None:
        assert loop.guard.step == 2 * CHECK_EVERY
        loop.guard.close()
    return total


def registered(repair: bool | None) -> list[sg.Hook]:
    """Every registered hook that can be built without arguments (monitors, repairs, or both)."""
    hooks = []
    for name in registry.available():
        cls = registry.get(name)
        if repair is not None and cls.modifies_training != repair:
            continue
        try:
            hooks.append(cls())
        except (TypeError, ValueError):
            continue  # needs arguments (skipped_steps needs a GradScaler)
    return hooks


def _every_step(hooks: list[sg.Hook]) -> list[sg.Hook]:
    # Run every per-step method on every step, so that no sampled path escapes the audit.
    for h in hooks:
        h.every = 1
    return hooks


def test_the_audit_sees_a_host_read() -> None:
    class Leaky(sg.Hook):
        def on_before_step(self, ctx: sg.StepContext) -> None:
            norms = ctx.grad_norms()
            assert norms is not None
            self.last = norms.total.item()

    class Listy(sg.Hook):
        def on_observe(self, obs: sg.Observation) -> None:
            self.last = torch.as_tensor(obs.loss).tolist()

    assert _audited_counts(lambda: [Leaky()])["aten::item"] == 2 * (CHECK_EVERY - 1)
    assert _audited_counts(lambda: [Listy()])["tolist"] == 2 * (CHECK_EVERY - 1)
    # The early check point of the repair set is excluded, and only it.
    assert _audited_counts(lambda: [Leaky()], early_check=1)["aten::item"] == 2 * (CHECK_EVERY - 1) - 1


def test_plain_loop_reads_nothing() -> None:
    assert _audited_counts(None) == Counter()


@pytest.mark.parametrize(
    ("label", "make_hooks", "kwargs"),
    [
        ("default", lambda: None, {}),
        ("repair", lambda: None, {"repair": True}),
        ("default, every step", lambda: _every_step(sg.default_hooks(repair=True)), {}),
        ("every registered hook, every step", lambda: _every_step(registered(None)), {}),
    ],
)
def test_no_host_read_between_check_points(label: str, make_hooks: Any, kwargs: dict[str, Any]) -> None:
    assert _audited_counts(make_hooks, **kwargs) == Counter(), label


@pytest.mark.parametrize("name", [n for n in registry.available() if n != "skipped_steps"])
def test_each_registered_hook_reads_nothing_between_check_points(name: str) -> None:
    def make() -> list[sg.Hook]:
        try:
            hook = registry.get(name)()
        except (TypeError, ValueError) as exc:
            pytest.skip(f"{name} needs arguments: {exc}")
        return _every_step([hook])

    assert _audited_counts(make) == Counter()


def test_clipper_policies_without_a_host_read() -> None:
    for kwargs in (
        {"mode": "norm", "max_norm": 1.0},
        {"mode": "value", "clip_value": 0.1},
        {"mode": "adaptive", "nonfinite": "zero"},
        {"mode": "norm", "max_norm": 1.0, "nonfinite": "ignore"},
    ):
        assert _audited_counts(lambda kwargs=kwargs: [sg.GradientClipper(**kwargs)]) == Counter(), kwargs


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")
@pytest.mark.parametrize("repair", [False, True])
def test_cuda_steps_between_check_points_do_not_synchronize(repair: bool) -> None:
    loop = _Loop("cuda", lambda: _every_step(sg.default_hooks(repair=repair)))
    # The first interval builds index tensors and state lazily (host-to-device copies); audit the next ones.
    for _ in range(CHECK_EVERY):
        loop.step()
    for _ in range(2):
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(CHECK_EVERY - 1):
                loop.step()
        finally:
            torch.cuda.set_sync_debug_mode(0)
        loop.step()  # the check point reads the states: a synchronization by design
    assert loop.guard is not None
    loop.guard.close()
