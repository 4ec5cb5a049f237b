"""LRAutoReducer: ReduceLROnPlateau parity, event-driven repair, schedulers, resume."""

from __future__ import annotations

import io
import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import stallguard as sg
from stallguard.hooks.lr_reducer import LRAutoReducer
from stallguard.hooks.plateau import PlateauDetector


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny models run fastest on one thread, and the machine is shared.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _groups_optimizer(lrs: list[float], tensor_lr: bool = False) -> torch.optim.Optimizer:
    groups = [{"params": [nn.Parameter(torch.zeros(2))], "lr": lr} for lr in lrs]
    if tensor_lr:
        for g in groups:
            g["lr"] = torch.tensor(g["lr"])
        return torch.optim.Adam(groups, fused=True)
    return torch.optim.SGD(groups)


def _lrs(opt: torch.optim.Optimizer) -> list[float]:
    return [float(g["lr"]) for g in opt.param_groups]


def _drive(guard: sg.Guard, opt: torch.optim.Optimizer, **metrics: float) -> None:
    """One optimizer step of a loop that reports metrics, with the hooks run by hand."""
    guard.observe(**metrics)
    guard.before_step()
    opt.step()
    guard.after_step()


# ----------------------------------------------------------------------------- ReduceLROnPlateau parity
_VALUES = st.one_of(
    st.sampled_from([1.0, 0.5, 0.5, 0.25, 0.0, -1.0, math.nan, math.inf]),  # ties, NaN, inf
    st.floats(-10, 10, allow_nan=False),
)


@settings(max_examples=200, deadline=None)
@given(
    stream=st.lists(_VALUES, min_size=1, max_size=40),
    lrs=st.lists(st.floats(1e-4, 1.0), min_size=1, max_size=3),
    mode=st.sampled_from(["min", "max"]),
    threshold_mode=st.sampled_from(["rel", "abs"]),
    threshold=st.sampled_from([0.0, 1e-4, 0.05]),
    factor=st.floats(0.05, 0.95),
    patience=st.integers(0, 4),
    cooldown=st.integers(0, 3),
    min_lr=st.one_of(st.sampled_from([0.0, 1e-3, 0.05]), st.lists(st.floats(0, 0.1), min_size=3, max_size=3)),
    eps=st.sampled_from([0.0, 1e-8, 1e-3]),
    check_every=st.sampled_from([1, 3, 7]),
)
def test_lr_sequence_equals_reduce_lr_on_plateau(
    stream, lrs, mode, threshold_mode, threshold, factor, patience, cooldown, min_lr, eps, check_every
):
    if isinstance(min_lr, list):
        min_lr = min_lr[: len(lrs)]
    kwargs = dict(
        mode=mode,
        factor=factor,
        patience=patience,
        threshold=threshold,
        threshold_mode=threshold_mode,
        cooldown=cooldown,
        min_lr=min_lr,
        eps=eps,
    )
    ours = _groups_optimizer(lrs)
    twin = _groups_optimizer(lrs)
    torch_sched = torch.optim.lr_scheduler.ReduceLROnPlateau(twin, **kwargs)
    red = LRAutoReducer(monitor="val_loss", **kwargs)
    guard = sg.Guard(None, ours, hooks=[red], sinks=[], check_every=check_every, attach_optimizer=False, strict=True)
    stepped = 0
    for value in stream:
        _drive(guard, ours, val_loss=value)
        if guard.step % check_every == 0:  # the reducer has read every value up to here
            for v in stream[stepped : guard.step]:
                torch_sched.step(v)
            stepped = guard.step
            assert _lrs(ours) == _lrs(twin)
    guard.close()
    for v in stream[stepped:]:
        torch_sched.step(v)
    assert _lrs(ours) == _lrs(twin)
    assert red.best == torch_sched.best or (math.isnan(red.best) and math.isnan(torch_sched.best))
    assert (red.num_bad_epochs, red.cooldown_counter) == (torch_sched.num_bad_epochs, torch_sched.cooldown_counter)
    reductions = [e for e in guard.events if e.kind == "lr_reduced"]
    for e in reductions:
        assert all(n <= o for o, n in zip(e.data["old_lr"], e.data["new_lr"]))


def test_documented_patience_examples():
    # ReduceLROnPlateau's own examples (lr=1, factor=0.5, a constant metric).
    for patience, cooldown, expected in [
        (2, 0, [1, 1, 1, 0.5, 0.5, 0.5, 0.25, 0.25]),
        (2, 1, [1, 1, 1, 0.5, 0.5, 0.5, 0.5, 0.25]),
    ]:
        opt = _groups_optimizer([1.0])
        red = LRAutoReducer(monitor="val_loss", factor=0.5, patience=patience, cooldown=cooldown)
        guard = sg.Guard(None, opt, hooks=[red], sinks=[], check_every=1, attach_optimizer=False, strict=True)
        seen = []
        for _ in range(8):
            _drive(guard, opt, val_loss=1.0)
            seen.append(_lrs(opt)[0])
        guard.close()
        assert seen == expected


def test_tensor_lr_is_updated_in_place():
    opt = _groups_optimizer([0.1, 0.01], tensor_lr=True)
    lr_tensors = [g["lr"] for g in opt.param_groups]
    red = LRAutoReducer(monitor="val_loss", patience=0, factor=0.5)
    guard = sg.Guard(None, opt, hooks=[red], sinks=[], check_every=1, attach_optimizer=False, strict=True)
    for v in [1.0, 2.0]:
        for p in opt.param_groups:
            p["params"][0].grad = torch.zeros(2)
        _drive(guard, opt, val_loss=v)
    guard.close()
    assert [g["lr"] for g in opt.param_groups] == lr_tensors  # the same tensor objects
    assert [t.item() for t in lr_tensors] == pytest.approx([0.05, 0.005])


def test_min_lr_list_must_match_param_groups():
    opt = _groups_optimizer([0.1, 0.1])
    with pytest.raises(ValueError, match=r"min_lr has 1 values .* 2 param groups"):
        sg.Guard(None, opt, hooks=[LRAutoReducer(min_lr=[0.01])], sinks=[], attach_optimizer=False, strict=True)


def test_per_group_min_lr_and_ratio():
    opt = _groups_optimizer([0.1, 0.01])
    red = LRAutoReducer(monitor="val_loss", patience=0, factor=0.5, min_lr=[0.03, 0.0])
    guard = sg.Guard(None, opt, hooks=[red], sinks=[], check_every=1, attach_optimizer=False, strict=True)
    for v in [1.0, 1.0]:
        _drive(guard, opt, val_loss=v)
    assert _lrs(opt) == [0.05, 0.005]  # ratio kept
    _drive(guard, opt, val_loss=1.0)
    assert _lrs(opt) == [0.03, 0.0025]  # the first group stops at its floor
    e = guard.events[-1]
    assert (
        e.kind == "lr_reduced" and list(e.data["old_lr"]) == [0.05, 0.005] and list(e.data["new_lr"]) == [0.03, 0.0025]
    )
    assert list(e.data["groups"]) == ["optimizer[0].group[0]", "optimizer[0].group[1]"]
    guard.close()


# ----------------------------------------------------------------------------- event-driven repair on real runs
def _teacher(seed: int):
    g = torch.Generator().manual_seed(seed)
    w1 = torch.randn(16, 32, generator=g) / 4
    w2 = torch.randn(32, 4, generator=g) / math.sqrt(32)

    def batch(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(n, 16, generator=g)
        return x, (torch.relu(x @ w1) @ w2).argmax(1)

    return batch


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))


def _run(
    steps: int,
    optimizer_fn,
    *,
    stallguard: bool = True,
    repair: bool = True,
    hooks: list[sg.Hook] | None = None,
    scheduler_fn=None,
    seed: int = 0,
) -> tuple[sg.Guard | None, np.ndarray, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    batch = _teacher(seed + 100)
    model = _mlp()
    opt = optimizer_fn(model)
    sched = scheduler_fn(opt) if scheduler_fn else None
    guard = sg.Guard(model, opt, hooks=hooks, repair=repair, sinks=[], strict=True) if stallguard else None
    losses = []
    for _ in range(steps):
        x, y = batch(32)
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        if guard is not None:
            guard.observe(loss)
        opt.step()
        if sched is not None:
            sched.step()
        losses.append(loss.item())
    if guard is not None:
        guard.close()
    return guard, np.asarray(losses), opt


def test_repair_rescues_a_run_with_lr_100x_too_high():
    def adam_too_high(model):
        return torch.optim.Adam(model.parameters(), lr=0.1)  # 100x Adam's usual 1e-3

    guard, repaired, opt = _run(600, adam_too_high)
    _, plain, _ = _run(600, adam_too_high, stallguard=False)
    assert np.all(np.isfinite(repaired))
    assert np.median(repaired[-50:]) < 0.8 * np.median(plain[-50:])  # far below the unrepaired run
    assert np.median(plain[-50:]) > 0.9  # ... which stays stuck high
    assert guard is not None
    red = guard.hook(LRAutoReducer)
    assert red is not None and red.on == ("plateau", "divergence", "update_ratio_high")
    cuts = [e for e in guard.events if e.kind == "lr_reduced"]
    assert cuts and list(cuts[0].data["old_lr"]) == [0.1] and list(cuts[0].data["new_lr"]) == [pytest.approx(0.01)]
    assert cuts[0].data["trigger"] in ("plateau", "divergence", "update_ratio_high")
    assert opt.param_groups[0]["lr"] < 0.1


def _adam(lr: float):
    def make(model):
        return torch.optim.Adam(model.parameters(), lr=lr)

    return make


def test_updates_too_large_for_the_weights_cut_the_lr_at_the_first_check():
    # Adam at 100x its usual LR: UpdateRatio sees updates 40% of the weights on the first step, and the
    # repair set's early check point (after step 1) cuts the LR long before the loss plateaus.
    guard, repaired, opt = _run(300, _adam(0.1))
    _, plain, _ = _run(300, _adam(0.1), stallguard=False)
    assert guard.early_check == 1
    cuts = [e for e in guard.events if e.kind == "lr_reduced"]
    assert [(c.step, c.data["trigger"], c.data["trigger_source"]) for c in cuts] == [
        (1, "update_ratio_high", "UpdateRatio")
    ]
    assert _lrs(opt) == [pytest.approx(0.01)]
    assert np.median(plain[-50:]) > 0.9  # stuck without the cut
    assert np.median(repaired[-50:]) < 0.6 * np.median(plain[-50:])


def test_healthy_run_under_repair_is_not_cut_nor_slowed():
    guard, repaired, opt = _run(300, _adam(1e-3))
    _, plain, _ = _run(300, _adam(1e-3), stallguard=False)
    assert [e for e in guard.events if e.kind in ("lr_reduced", "update_ratio_high")] == []
    assert _lrs(opt) == [1e-3]
    assert np.median(repaired[-50:]) <= 1.05 * np.median(plain[-50:])


class _Say(sg.Hook):
    """Emits the events listed for each check point, one list per check point."""

    def __init__(self, script: list[list[tuple[str, dict]]]) -> None:
        super().__init__()
        self.script = script
        self.checks = 0

    def on_check(self, check):
        if self.checks < len(self.script):
            for kind, data in self.script[self.checks]:
                self.emit(kind, "warning", kind, **data)
        self.checks += 1


def _scripted(script: list[list[tuple[str, dict]]], steps: int, check_every: int = 10, **kwargs) -> list[float]:
    opt = _groups_optimizer([1.0])
    red = LRAutoReducer(on=("divergence", "update_ratio_high"), factor=0.5, **kwargs)
    guard = sg.Guard(
        None, opt, hooks=[_Say(script), red], sinks=[], check_every=check_every, attach_optimizer=False, strict=True
    )
    lrs = []
    for _ in range(steps):
        _drive(guard, opt, val_loss=1.0)
        lrs.append(_lrs(opt)[0])
    guard.close()
    return lrs[check_every - 1 :: check_every]


def test_evidence_measured_before_the_last_cut_is_ignored():
    high = "update_ratio_high"
    script = [
        [(high, {"steps": [1, 10]})],  # cuts at step 10
        [(high, {"steps": [5, 20]})],  # began before the cut: the old LR, ignored
        [(high, {"steps": [11, 30]})],  # all after the cut: cuts again
    ]
    assert _scripted(script, 30) == [0.5, 0.5, 0.25]


def test_sporadic_nonfinite_steps_do_not_cut_but_a_run_that_stays_nonfinite_does():
    def divergence(bad: int) -> tuple[str, dict]:
        return ("divergence", {"reason": "non_finite", "nonfinite": bad})

    # 10 steps per check point: 2 bad batches, then 4 (below half), then 9 (a run gone NaN).
    assert _scripted([[divergence(2)], [divergence(4)], [divergence(9)]], 30) == [1.0, 1.0, 0.5]
    assert _scripted([[divergence(2)]], 10, nonfinite_fraction=0.0) == [0.5]  # 0: any NaN cuts
    # A divergence for a rising loss is not about NaN: it always cuts.
    assert _scripted([[("divergence", {"reason": "rise"})]], 10) == [0.5]


def test_nan_records_are_skipped_without_slowing_the_run():
    # Two records of 512 hold a NaN feature: about one batch in eight is non-finite.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 16, generator=g)
    y = (x[:, :4].sum(1) > 0).long()
    x[[3, 100], 5] = math.nan

    def run(repair: bool, nonfinite_fraction: float = 0.5) -> tuple[sg.Guard, float]:
        torch.manual_seed(0)
        model = _mlp()
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        hooks = [
            *sg.default_hooks(repair=False),
            LRAutoReducer(on=("plateau", "divergence"), nonfinite_fraction=nonfinite_fraction),
            sg.GradientClipper(),
        ]
        guard = sg.Guard(model, opt, hooks=hooks, sinks=[], strict=True)
        order = torch.Generator().manual_seed(1)
        for _ in range(300):
            idx = torch.randint(0, 512, (32,), generator=order)
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            guard.observe(loss)
            opt.step()
        guard.close()
        with torch.no_grad():
            clean = ~torch.isnan(x).any(1)
            return guard, float(nn.functional.cross_entropy(model(x[clean]), y[clean]))

    guard, data_aware = run(True)
    kinds = [e.kind for e in guard.events]
    assert "nonfinite_skipped" in kinds and "divergence" in kinds
    assert "lr_reduced" not in kinds
    cut_guard, cut_on_any = run(True, nonfinite_fraction=0.0)
    assert [e.kind for e in cut_guard.events].count("lr_reduced") >= 2
    assert data_aware < 0.5 * cut_on_any


def test_repair_keeps_the_ratio_between_param_groups():
    def two_groups(model):
        return torch.optim.SGD(
            [{"params": model[0].parameters(), "lr": 1e-4}, {"params": model[2:].parameters(), "lr": 1e-5}]
        )

    guard, _, _ = _run(200, two_groups)
    cuts = [e for e in guard.events if e.kind == "lr_reduced"]
    assert cuts  # a run this slow plateaus
    for cut in cuts:
        old, new = cut.data["old_lr"], cut.data["new_lr"]
        assert new[0] / new[1] == pytest.approx(old[0] / old[1]) == pytest.approx(10.0)


def test_one_cut_per_step_and_cooldown_counted_in_events():
    class Shout(sg.Hook):
        """A hook that reports both a plateau and a divergence at every check point."""

        def on_check(self, check):
            self.emit("plateau", "warning", "flat")
            self.emit("divergence", "error", "up")

    opt = _groups_optimizer([1.0])
    red = LRAutoReducer(on=("plateau", "divergence"), factor=0.5, cooldown=1)
    guard = sg.Guard(None, opt, hooks=[Shout(), red], sinks=[], check_every=1, attach_optimizer=False, strict=True)
    seen = []
    for _ in range(4):
        _drive(guard, opt, val_loss=1.0)
        seen.append(_lrs(opt)[0])
    guard.close()
    # step 1: plateau cuts, divergence same step ignored; step 2: first event eaten by cooldown,
    # the second is in the same step as no cut yet -> cuts; and so on.
    assert seen == [0.5, 0.25, 0.125, 0.0625]
    red2 = LRAutoReducer(on="plateau", factor=0.5, cooldown=2)
    opt2 = _groups_optimizer([1.0])
    guard2 = sg.Guard(None, opt2, hooks=[Shout(), red2], sinks=[], check_every=1, attach_optimizer=False, strict=True)
    seen2 = []
    for _ in range(4):
        _drive(guard2, opt2, val_loss=1.0)
        seen2.append(_lrs(opt2)[0])
    guard2.close()
    assert seen2 == [0.5, 0.5, 0.5, 0.25]  # two plateau events ignored after each cut


def test_scheduler_that_overwrites_the_lr_is_reported_once_and_not_fought():
    def too_low(model):
        return torch.optim.SGD(model.parameters(), lr=1e-5)

    def constant_schedule(opt):
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0)  # recomputes lr every step

    guard, _, opt = _run(400, too_low, scheduler_fn=constant_schedule)
    ks = [e.kind for e in guard.events]
    assert ks.count("lr_reduced") == 1
    assert ks.count("lr_overridden") == 1
    assert ks.index("lr_overridden") > ks.index("lr_reduced")
    assert ks.count("plateau") >= 2  # later plateaus no longer cut
    o = next(e for e in guard.events if e.kind == "lr_overridden")
    assert list(o.data["current_lr"]) == [pytest.approx(1e-5)] and list(o.data["set_lr"]) == [pytest.approx(1e-6)]
    assert _lrs(opt) == [pytest.approx(1e-5)]  # the scheduler's value stands


def test_all_optimizers_of_the_guard_are_reduced():
    a, b = _groups_optimizer([0.2]), _groups_optimizer([0.4, 0.1])
    red = LRAutoReducer(monitor="val_loss", patience=0, factor=0.5, min_lr=[0.0, 0.0, 0.06])
    guard = sg.Guard(None, [a, b], hooks=[red], sinks=[], check_every=1, attach_optimizer=False, strict=True)
    for v in [1.0, 1.0]:
        guard.observe(val_loss=v)
        guard.after_step(0)
        guard.after_step(1)
    guard.close()
    assert _lrs(a) + _lrs(b) == [0.1, 0.2, 0.06]
    assert list(guard.events[0].data["groups"]) == [
        "optimizer[0].group[0]",
        "optimizer[1].group[0]",
        "optimizer[1].group[1]",
    ]


# ----------------------------------------------------------------------------- state and resume
def test_resumed_reducer_behaves_identically():
    rng = np.random.default_rng(0)
    stream = list(np.round(rng.normal(1.0, 0.1, 60).cumsum() / np.arange(1, 61), 2))

    def setup() -> tuple[sg.Guard, torch.optim.Optimizer]:
        opt = _groups_optimizer([0.1, 0.01])
        red = LRAutoReducer(monitor="val_loss", factor=0.5, patience=2, cooldown=1)
        return sg.Guard(None, opt, hooks=[red], sinks=[], check_every=4, attach_optimizer=False, strict=True), opt

    whole, opt_w = setup()
    lrs_whole = []
    for v in stream:
        _drive(whole, opt_w, val_loss=v)
        lrs_whole.append(_lrs(opt_w))
    whole.close()
    assert len([e for e in whole.events if e.kind == "lr_reduced"]) >= 2

    n = 23
    part, opt_p = setup()
    for v in stream[:n]:
        _drive(part, opt_p, val_loss=v)
    buf = io.BytesIO()
    torch.save({"guard": part.state_dict(), "opt": opt_p.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    resumed, opt_r = setup()
    opt_r.load_state_dict(saved["opt"])
    resumed.load_state_dict(saved["guard"])
    lrs_resumed = []
    for v in stream[n:]:
        _drive(resumed, opt_r, val_loss=v)
        lrs_resumed.append(_lrs(opt_r))
    resumed.close()
    assert lrs_resumed == lrs_whole[n:]

    def after(guard: sg.Guard) -> list[dict]:
        return [{k: v for k, v in e.to_dict().items() if k != "time"} for e in guard.events if e.step > n]

    assert after(resumed) == after(whole)


def test_state_dict_round_trip():
    opt = _groups_optimizer([0.1])
    red = LRAutoReducer(monitor="val_loss", patience=0)
    guard = sg.Guard(None, opt, hooks=[red], sinks=[], check_every=1, attach_optimizer=False, strict=True)
    for v in [1.0, 2.0, 0.5]:
        _drive(guard, opt, val_loss=v)
    state = red.state_dict()
    other = LRAutoReducer(monitor="val_loss", patience=0)
    other.load_state_dict(state)
    assert other.state_dict() == state
    assert state["best"] == 0.5 and state["reductions"] == 1
    guard.close()


# ----------------------------------------------------------------------------- API, defaults, validation
def test_repair_default_is_event_driven():
    model = nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = sg.Guard(model, opt, repair=True, sinks=[])
    red = guard.hook(LRAutoReducer)
    assert red is not None and red.subscribes == ("plateau", "divergence", "update_ratio_high")
    assert guard.hook(PlateauDetector) is not None
    guard.close()
    plain = sg.Guard(model, opt, sinks=[])
    assert plain.hook(LRAutoReducer) is None
    plain.close()
    assert LRAutoReducer.modifies_training
    cfg = LRAutoReducer(on=["plateau"]).get_config()
    assert LRAutoReducer(**cfg).on == ("plateau",)


def test_config_round_trip():
    model = nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    hooks = [PlateauDetector(min_delta=0.01, patience=30), LRAutoReducer(on=("plateau",), min_lr=[0.001])]
    guard = sg.Guard(model, opt, hooks=hooks, sinks=[])
    config = json.loads(json.dumps(guard.to_config()))  # a config file holds it
    guard.close()
    again = sg.Guard.from_config(model, opt, {**config, "sinks": []})
    det, red = again.hook(PlateauDetector), again.hook(LRAutoReducer)
    assert (det.threshold, det.threshold_mode, det.patience) == (0.01, "abs", 30)
    assert (red.on, red.min_lr, red.subscribes) == (("plateau",), [0.001], ("plateau",))
    again.close()


def test_needs_an_optimizer():
    with pytest.raises(ValueError, match="needs a Guard with an optimizer"):
        sg.Guard(None, None, hooks=[LRAutoReducer()], sinks=[], strict=True)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(factor=1.0), ValueError, "factor"),
        (dict(factor=0), ValueError, "factor"),
        (dict(factor="0.1"), TypeError, "factor"),
        (dict(patience=-1), ValueError, "patience"),
        (dict(cooldown=-1), ValueError, "cooldown"),
        (dict(threshold=-0.1), ValueError, "threshold"),
        (dict(threshold_mode="pct"), ValueError, "threshold_mode"),
        (dict(mode="up"), ValueError, "mode"),
        (dict(min_lr=-1), ValueError, "min_lr"),
        (dict(min_lr=[0.1, -1]), ValueError, r"min_lr\[1\]"),
        (dict(min_lr=[]), ValueError, "min_lr"),
        (dict(eps=-1), ValueError, "eps"),
        (dict(on=[]), ValueError, "on"),
        (dict(on=[""]), ValueError, "on"),
        (dict(on=3), TypeError, "on"),
        (dict(monitor=""), ValueError, "monitor"),
        (dict(nonfinite_fraction=1.5), ValueError, "nonfinite_fraction"),
    ],
)
def test_parameter_validation(kwargs, error, match):
    with pytest.raises(error, match=match):
        LRAutoReducer(**kwargs)
