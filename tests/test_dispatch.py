"""The Guard's per-step dispatch: only due hooks are called, and what they see is unchanged."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import stallguard as sg


class _Recorder(sg.Hook):
    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.observed: list[tuple[int, int]] = []
        self.updates: list[tuple[int, bool]] = []

    def on_observe(self, obs: sg.Observation) -> None:
        self.observed.append((obs.step, obs.index))

    def on_before_step(self, ctx: sg.StepContext) -> None:
        ctx.request_update()

    def on_after_step(self, ctx: sg.StepContext) -> None:
        update = ctx.update_norms()
        self.updates.append((ctx.step, update is not None and bool((update.delta > 0).all())))


def _train(guard: sg.Guard, model: nn.Module, opt: torch.optim.Optimizer, steps: int) -> None:
    x, y = torch.randn(16, 4), torch.randn(16, 1)
    for _ in range(steps):
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        guard.observe(loss)
        opt.step()


def test_sampled_hook_sees_its_steps_and_the_same_context_before_and_after() -> None:
    model = nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    hook = _Recorder(every=3)
    guard = sg.Guard(model, opt, hooks=[hook], sinks=[], check_every=5)
    _train(guard, model, opt, 9)
    guard.close()
    # observe() runs before the step: steps completed 0, 3, 6; the index counts every call.
    assert hook.observed == [(0, 0), (3, 3), (6, 6)]
    # The update requested before the step is there after it: one context per due step.
    assert hook.updates == [(3, True), (6, True), (9, True)]


def test_loss_values_of_mixed_types_reach_the_series_exactly() -> None:
    guard = sg.Guard(None, None, hooks=[], sinks=[], check_every=4)
    values = [1.5, torch.tensor(2.25), torch.tensor(3.0, dtype=torch.float64), torch.tensor(4, dtype=torch.int64)]
    for v in values:
        guard.observe(v)
        guard.after_step()
    assert guard.series("loss").values.tolist() == [1.5, 2.25, 3.0, 4.0]
    for v in (torch.tensor(5.0), torch.tensor(7.0)):  # two values of one step are averaged
        guard.observe(v)
    guard.after_step()
    guard.close()
    assert guard.series("loss").values.tolist()[-1] == 6.0


def test_non_finite_losses_stay_non_finite_in_the_series() -> None:
    guard = sg.Guard(None, None, hooks=[], sinks=[], check_every=3)
    for v in (torch.tensor(1.0), torch.tensor(math.nan), torch.tensor(math.inf)):
        guard.observe(v)
        guard.after_step()
    values = guard.series("loss").values
    guard.close()
    assert values[0] == 1.0 and math.isnan(values[1]) and values[2] == math.inf


def test_the_series_keeps_the_last_history_values_across_many_check_points() -> None:
    guard = sg.Guard(None, None, hooks=[], sinks=[], check_every=7, history=20)
    early = None
    for i in range(1, 101):
        guard.observe(float(i))
        if i % 3 == 0:
            guard.observe(float(i) + 1.0)  # a second value of the step: averaged with the first
        guard.after_step()
        if i == 14:
            early = guard.series("loss").values
    series = guard.series("loss")
    expected = [i + 0.5 if i % 3 == 0 else float(i) for i in range(1, 99)][-20:]  # 99 and 100 not yet read
    assert series.values.tolist() == expected and series.steps.tolist() == list(range(78, 98))
    assert series.total == 98 and len(series) == 20
    steps, values = series.since(95)
    assert steps.tolist() == [95, 96, 97] and values.tolist() == expected[-3:]
    # An array read earlier is a snapshot: later check points neither change nor free it.
    assert early is not None and early.tolist() == [i + 0.5 if i % 3 == 0 else float(i) for i in range(1, 15)]
    with pytest.raises(ValueError, match="read-only"):
        series.values[0] = 0.0
    guard.close()


def test_a_huge_check_every_allocates_for_what_is_observed() -> None:
    # The loss buffer starts small and doubles: check_every=10**9 must not reserve 8 GB up front.
    guard = sg.Guard(None, None, hooks=[], sinks=[], check_every=10**9)
    for i in range(5000):
        guard.observe(torch.tensor(float(i)))
        guard.after_step()
    assert guard._pending["loss"].buf.numel() <= 8192
    guard.check()
    assert guard.series("loss").values.tolist() == [float(i) for i in range(5000)]
    guard.close()
