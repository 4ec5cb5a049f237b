"""The Guard's skip-ahead schedule: steps where no hook is due cost no hook calls, and no due call is lost."""

from __future__ import annotations

import collections

import pytest
import torch
from helpers import mlp, regression_data

import stallguard as sg
from stallguard import registry
from stallguard.guard import Guard

PER_STEP = ("on_observe", "on_before_step", "on_after_step")


def _every_registered_hook() -> list[sg.Hook]:
    hooks = []
    for name in registry.available():
        try:
            hooks.append(registry.get(name)())
        except TypeError:  # needs arguments (a GradScaler)
            continue
    return hooks


def _naive_due(self: Guard, method: str, step: int) -> list[sg.Hook]:
    # The reference: every hook asked on every step.
    return [h for h in self._by_method[method] if h.enabled and h.is_due(step)]


def _record_calls(hooks: list[sg.Hook]) -> collections.Counter:
    calls: collections.Counter = collections.Counter()
    for h in hooks:
        for method in PER_STEP:
            if type(h)._overrides(method):
                original = getattr(h, method)

                def wrapped(arg, _h=h, _m=method, _f=original):
                    calls[(_h.name, _m, _h.guard.step)] += 1
                    return _f(arg)

                setattr(h, method, wrapped)
    return calls


def _run(naive: bool, monkeypatch: pytest.MonkeyPatch, accumulate: int = 1, steps: int = 70) -> collections.Counter:
    torch.manual_seed(0)
    x, y = regression_data(n=64)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    hooks = _every_registered_hook()
    with monkeypatch.context() as m:
        if naive:
            m.setattr(Guard, "_due", _naive_due)
        guard = sg.Guard(model, opt, hooks=hooks, sinks=[], check_every=20)
        calls = _record_calls(hooks)
        for i in range(steps):
            opt.zero_grad()
            for part in range(accumulate):  # micro-batches: several observe calls on one step
                lo = i % 4 * 16 + part * 16 // accumulate
                xb, yb = x[lo : lo + 16 // accumulate], y[lo : lo + 16 // accumulate]
                out = model(xb)
                loss = torch.nn.functional.mse_loss(out, yb)
                loss.backward()
                guard.observe(loss, inputs=xb, outputs=out.detach(), targets=yb)
            opt.step()
            if i == 33:
                guard.load_state_dict(guard.state_dict())  # a restore in the middle of an interval
        guard.close()
    return calls


@pytest.mark.parametrize("accumulate", [1, 2])
def test_skip_ahead_calls_every_hook_on_exactly_its_due_steps(monkeypatch, accumulate):
    fast = _run(naive=False, monkeypatch=monkeypatch, accumulate=accumulate)
    reference = _run(naive=True, monkeypatch=monkeypatch, accumulate=accumulate)
    assert fast == reference
    # The run exercised the per-step methods of several hooks, on some steps and not others.
    methods = {(name, m) for name, m, _ in reference}
    assert len(methods) >= 10
    assert len({s for *_, s in reference}) < 70 * 3


@pytest.mark.parametrize("hook", _every_registered_hook(), ids=lambda h: h.name)
def test_next_due_is_never_later_than_the_first_due_step(hook):
    # Each hook's own is_due is the truth; next_due may be early (a wasted look) but never late.
    def first_due(start: int) -> int | None:
        return next((s for s in range(start, 400) if hook.is_due(s)), None)

    for start in range(0, 150):
        nd = hook.next_due(start)
        fd = first_due(start)
        if fd is None:
            assert nd is None or nd >= start
        else:
            assert nd is not None and start <= nd <= fd, (start, nd, fd)


def test_a_cadence_change_takes_effect_on_the_next_step():
    seen = []

    class Probe(sg.Hook):
        def on_before_step(self, ctx):
            seen.append(ctx.step)

    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    probe = Probe(every=10)
    guard = sg.Guard(model, opt, hooks=[probe], sinks=[], check_every=100)
    x, y = regression_data(n=16)
    for step in range(1, 31):
        if step == 12:
            probe.every = 3  # counted from start_step 0: 12, 15, ...
        if step == 22:
            probe.enabled = False
        if step == 25:
            probe.enabled = True
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    guard.close()
    assert seen == [10, 12, 15, 18, 21, 27, 30]


def test_a_hook_that_only_overrides_is_due_is_asked_every_step():
    asked = []

    class Odd(sg.Hook):
        def is_due(self, step):
            asked.append(step)
            return step in (4, 9)

        def on_after_step(self, ctx):
            asked.append(("ran", ctx.step))

    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    guard = sg.Guard(model, opt, hooks=[Odd()], sinks=[], check_every=100)
    x, y = regression_data(n=16)
    for _ in range(10):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    guard.close()
    assert [a for a in asked if isinstance(a, tuple)] == [("ran", 4), ("ran", 9)]
    assert sorted({a for a in asked if isinstance(a, int)}) == list(range(1, 11))


def test_every_is_validated_when_set():
    hook = sg.GradNormMonitor()
    with pytest.raises(ValueError, match="every"):
        hook.every = 0
    with pytest.raises(ValueError, match="start_step"):
        hook.start_step = -1
