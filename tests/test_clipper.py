"""GradientClipper on small real runs: equality with torch, non-finite policies, repair, no host syncs."""

from __future__ import annotations

import copy
import io
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import stallguard as sg
from stallguard.hooks.clipper import _nan_quantile
from tests.grad_models import RNNRegressor, rnn_data, small_cnn


def batches(steps: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 1, 8, 8, generator=g), torch.randint(0, 4, (16,), generator=g)) for _ in range(steps)]


def snapshot(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


# ----------------------------------------------------------------------------- equal to torch
@pytest.mark.parametrize(("max_norm", "norm_type"), [(0.05, 2.0), (100.0, 2.0), (0.05, 1.0), (0.01, math.inf)])
def test_norm_mode_gives_the_gradients_of_clip_grad_norm_bit_for_bit(max_norm: float, norm_type: float) -> None:
    torch.manual_seed(0)
    ours, theirs = small_cnn(), small_cnn()
    theirs.load_state_dict(ours.state_dict())
    opt_ours = torch.optim.SGD(ours.parameters(), lr=0.1)
    opt_theirs = torch.optim.SGD(theirs.parameters(), lr=0.1)
    clipper = sg.GradientClipper(mode="norm", max_norm=max_norm, norm_type=norm_type)
    guard = sg.Guard(ours, opt_ours, hooks=[clipper], sinks=[], check_every=5, strict=True)
    for x, y in batches(10):
        for model, opt in ((ours, opt_ours), (theirs, opt_theirs)):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
        torch.nn.utils.clip_grad_norm_(theirs.parameters(), max_norm, norm_type=norm_type)
        opt_ours.step()
        opt_theirs.step()
        for a, b in zip(ours.parameters(), theirs.parameters()):
            assert torch.equal(a.grad, b.grad)
            assert torch.equal(a, b)
    guard.close()
    clipped = sum(e.data["clipped"] for e in guard.events if e.kind == "grad_clipped")
    assert clipped == (0 if max_norm == 100.0 else 10)


@pytest.mark.parametrize("clip_value", [1e-3, 10.0])
def test_value_mode_gives_the_gradients_of_clip_grad_value_(clip_value: float) -> None:
    torch.manual_seed(0)
    ours, theirs = small_cnn(), small_cnn()
    theirs.load_state_dict(ours.state_dict())
    opt_ours = torch.optim.SGD(ours.parameters(), lr=0.1)
    opt_theirs = torch.optim.SGD(theirs.parameters(), lr=0.1)
    guard = sg.Guard(
        ours, opt_ours, hooks=[sg.GradientClipper(mode="value", clip_value=clip_value)], sinks=[], strict=True
    )
    for x, y in batches(6):
        for model, opt in ((ours, opt_ours), (theirs, opt_theirs)):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
        torch.nn.utils.clip_grad_value_(theirs.parameters(), clip_value)
        opt_ours.step()
        opt_theirs.step()
        for a, b in zip(ours.parameters(), theirs.parameters()):
            assert torch.equal(a.grad, b.grad)
    guard.close()
    (event,) = [e for e in guard.events if e.kind == "grad_clipped"] or [None]
    if clip_value == 10.0:
        assert event is None
    else:
        assert event is not None and event.data["clipped"] == 6
        assert event.data["post_norm_mean"] == pytest.approx(clip_value)
        assert event.data["pre_norm_max"] > clip_value and event.data["norm_type"] == "inf"  # JSON-safe


class PrePost(sg.Hook):
    """Test observer: the global norm before clipping and after the step (host reads; fine in a test)."""

    def __init__(self) -> None:
        super().__init__()
        self.pre: list[float] = []
        self.post: list[float] = []

    def on_before_step(self, ctx: sg.StepContext) -> None:
        self.pre.append(float(torch.nn.utils.get_total_norm(ctx.grads)))

    def on_after_step(self, ctx: sg.StepContext) -> None:
        self.post.append(float(torch.nn.utils.get_total_norm(ctx.grads)))


def test_adaptive_mode_clips_at_the_percentile_of_recent_norms() -> None:
    torch.manual_seed(0)
    model = small_cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    record = PrePost()
    clipper = sg.GradientClipper(mode="adaptive", percentile=25.0, history=8, warmup=3)
    guard = sg.Guard(model, opt, hooks=[clipper, record], sinks=[], check_every=10, strict=True)
    for x, y in batches(20):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    guard.close()
    pre, post = np.array(record.pre), np.array(record.post)
    for t in range(20):
        window = pre[max(0, t - 7) : t + 1]  # the current norm is part of the history (AutoClip)
        threshold = np.percentile(window, 25.0) if len(window) >= 3 else math.inf
        assert post[t] == pytest.approx(min(pre[t], threshold), rel=1e-5)
    events = [e for e in guard.events if e.kind == "grad_clipped"]
    assert sum(e.data["clipped"] for e in events) == int(np.sum(post < pre * (1 - 1e-5)))
    assert events[-1].data["threshold"] == pytest.approx(np.percentile(pre[-8:], 25.0), rel=1e-5)


def test_adaptive_mode_keeps_zero_norms_out_of_its_history() -> None:
    # A hinge loss on separable data is exactly 0 on most batches once fitted: those steps have zero
    # gradients. Counted in the history, they would put the 10th percentile at 0 and zero every
    # later gradient, so the few batches that still violate the margin would never be learned.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 8, generator=g)
    y = torch.sign(x[:, 0])
    x[:, 0] += 2 * y  # a wide margin: most batches are fitted exactly after a few steps
    y[:8] = -y[:8]  # ... but for a few mislabelled records
    torch.manual_seed(0)
    model = nn.Linear(8, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    record = PrePost()
    guard = sg.Guard(model, opt, hooks=[record, sg.GradientClipper()], sinks=[], check_every=50, strict=True)
    for _ in range(300):
        idx = torch.randint(0, 512, (16,), generator=g)
        loss = torch.relu(1 - y[idx] * model(x[idx]).squeeze(1)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    guard.close()
    pre, post = np.array(record.pre), np.array(record.post)
    assert np.mean(pre == 0) > 0.2  # the situation under test: many steps with zero gradients
    assert np.all(post[pre > 0] > 0)  # a step with a gradient is clipped, never zeroed
    thresholds = [e.data["threshold"] for e in guard.events if e.kind == "grad_clipped"]
    assert thresholds and min(thresholds) > 0


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.floats(0.0, 1e6, allow_nan=False, width=32), min_size=0, max_size=40),
    st.integers(0, 20),
    st.floats(0.01, 1.0),
)
def test_device_quantile_matches_numpy(values: list[float], empty: int, q: float) -> None:
    buffer = torch.tensor(values + [math.nan] * max(empty, not values), dtype=torch.float32)
    got = float(_nan_quantile(buffer, q, min_count=1))
    if not values:
        assert got == math.inf
    else:
        expected = np.quantile(np.array(values, dtype=np.float32).astype(np.float64), q)
        # Interpolated in float32: the error scales with the largest value, not with the result.
        assert got == pytest.approx(expected, rel=1e-5, abs=1e-6 * max(1.0, max(values)))


# ----------------------------------------------------------------------------- non-finite gradients
def one_bad_step(
    model: nn.Module, opt: torch.optim.Optimizer, clipper: sg.GradientClipper, bad_step: int = 3, steps: int = 5
) -> tuple[sg.Guard, list[bool]]:
    """Train; on ``bad_step`` one gradient entry is Inf. Returns which steps left the parameters unchanged."""
    guard = sg.Guard(model, opt, hooks=[clipper], sinks=[], check_every=steps, strict=True)
    unchanged = []
    for step, (x, y) in enumerate(batches(steps), start=1):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        if step == bad_step:
            next(model.parameters()).grad[0, 0, 1, 1] = math.inf
        before = snapshot(model)
        opt.step()
        unchanged.append(all(torch.equal(a, b) for a, b in zip(before, model.parameters())))
    guard.close()
    return guard, unchanged


@pytest.mark.parametrize("mode", ["norm", "adaptive", "value"])
def test_skip_leaves_plain_sgd_parameters_unchanged_on_an_inf_step(mode: str) -> None:
    torch.manual_seed(0)
    model = small_cnn()
    kwargs = {"norm": {"max_norm": 1.0}, "value": {"clip_value": 1.0}, "adaptive": {}}[mode]
    guard, unchanged = one_bad_step(
        model, torch.optim.SGD(model.parameters(), lr=0.1), sg.GradientClipper(mode=mode, **kwargs)
    )
    assert unchanged == [False, False, True, False, False]
    assert all(torch.isfinite(p).all() for p in model.parameters())
    (event,) = [e for e in guard.events if e.kind == "nonfinite_skipped"]
    assert event.data["steps"] == 1 and event.data["first_step"] == 3 and event.data["method"] == "zeroed_grads"
    assert "non_finite" in event.causes


def test_skip_is_exact_for_fused_adam_through_found_inf() -> None:
    torch.manual_seed(0)
    model = small_cnn()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, fused=True)
    seen_state: list[list[torch.Tensor]] = []

    class StateAfterStep(sg.Hook):
        def on_after_step(self, ctx: sg.StepContext) -> None:
            seen_state.append([s["exp_avg"].clone() for s in opt.state.values()] + [opt.state[ctx.params[0]]["step"]])

    guard = sg.Guard(model, opt, hooks=[sg.GradientClipper(), StateAfterStep()], sinks=[], check_every=5, strict=True)
    unchanged = []
    for step, (x, y) in enumerate(batches(5), start=1):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        if step == 3:
            next(model.parameters()).grad[0, 0, 1, 1] = math.nan
        before = snapshot(model)
        opt.step()
        unchanged.append(all(torch.equal(a, b) for a, b in zip(before, model.parameters())))
        assert not hasattr(opt, "found_inf")  # the flag lives only for the step
    guard.close()
    assert unchanged == [False, False, True, False, False]
    # Adam's moments and step count did not move either: an exact no-op.
    assert all(torch.equal(a, b) for a, b in zip(seen_state[1], seen_state[2]))
    assert float(seen_state[4][-1]) == 4.0
    (event,) = [e for e in guard.events if e.kind == "nonfinite_skipped"]
    assert event.data["method"] == "found_inf" and event.data["exact"] is True


def test_sync_skip_is_exact_for_sgd_with_momentum() -> None:
    torch.manual_seed(0)
    model = small_cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    guard, unchanged = one_bad_step(model, opt, sg.GradientClipper(sync=True))
    assert unchanged == [False, False, True, False, False]
    (event,) = [e for e in guard.events if e.kind == "nonfinite_skipped"]
    assert event.data["method"] == "grad_none" and event.data["exact"] is True


def test_skip_without_sync_keeps_momentum_sgd_finite_but_not_still() -> None:
    torch.manual_seed(0)
    model = small_cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    guard, unchanged = one_bad_step(model, opt, sg.GradientClipper())
    assert unchanged == [False] * 5  # momentum still moved the weights on the skipped step, as documented
    assert all(torch.isfinite(p).all() for p in model.parameters())
    (event,) = [e for e in guard.events if e.kind == "nonfinite_skipped"]
    assert event.data["exact"] is False


def test_raise_stops_the_loop_even_when_the_guard_is_not_strict() -> None:
    torch.manual_seed(0)
    model = small_cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = sg.Guard(model, opt, hooks=[sg.GradientClipper(mode="norm", max_norm=1.0, nonfinite="raise")], sinks=[])
    x, y = batches(1)[0]
    nn.functional.cross_entropy(model(x), y).backward()
    model[3].weight.grad[0, 0, 0, 0] = math.nan
    before = snapshot(model)
    with pytest.raises(sg.NonFiniteGradientError, match=r"3\.weight"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert guard.hooks[0].enabled  # a deliberate error, not a failing hook
    guard.close()


def test_zero_replaces_only_the_bad_entries_then_clips_like_torch() -> None:
    torch.manual_seed(0)
    ours, theirs = small_cnn(), small_cnn()
    theirs.load_state_dict(ours.state_dict())
    opt_ours = torch.optim.SGD(ours.parameters(), lr=0.1)
    opt_theirs = torch.optim.SGD(theirs.parameters(), lr=0.1)
    clipper = sg.GradientClipper(mode="norm", max_norm=0.05, nonfinite="zero")
    guard = sg.Guard(ours, opt_ours, hooks=[clipper], sinks=[], check_every=4, strict=True)
    for step, (x, y) in enumerate(batches(4), start=1):
        for model, opt in ((ours, opt_ours), (theirs, opt_theirs)):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            if step == 2:
                model[0].weight.grad[1, 0, 0, 0] = -math.inf
                model[7].bias.grad[2] = math.nan
        for p in theirs.parameters():
            p.grad.nan_to_num_(0.0, 0.0, 0.0)
        torch.nn.utils.clip_grad_norm_(theirs.parameters(), 0.05)
        opt_ours.step()
        opt_theirs.step()
        for a, b in zip(ours.parameters(), theirs.parameters()):
            assert torch.equal(a.grad, b.grad)
    guard.close()
    (event,) = [e for e in guard.events if e.kind == "nonfinite_zeroed"]
    assert event.data["steps"] == 1 and event.data["first_step"] == 2


def test_ignore_behaves_like_torch_and_spreads_nan() -> None:
    torch.manual_seed(0)
    ours, theirs = small_cnn(), small_cnn()
    theirs.load_state_dict(ours.state_dict())
    opt_ours = torch.optim.SGD(ours.parameters(), lr=0.1)
    guard = sg.Guard(
        ours,
        opt_ours,
        hooks=[sg.GradientClipper(mode="norm", max_norm=0.05, nonfinite="ignore")],
        sinks=[],
        strict=True,
    )
    x, y = batches(1)[0]
    for model in (ours, theirs):
        nn.functional.cross_entropy(model(x), y).backward()
        model[0].weight.grad[1, 0, 0, 0] = math.inf
    torch.nn.utils.clip_grad_norm_(theirs.parameters(), 0.05)
    opt_ours.step()
    for a, b in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0, equal_nan=True)
    assert torch.isnan(ours[0].weight.grad).any()
    guard.close()
    assert not [e for e in guard.events if e.kind.startswith("nonfinite")]


def test_gradscaler_with_fused_optimizer_keeps_its_own_skips() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
    scaler = torch.amp.GradScaler("cpu", growth_interval=1000)
    x, y = torch.randn(32, 8), torch.randn(32, 1)
    clipper = sg.GradientClipper(mode="norm", max_norm=1e-3)
    guard = sg.Guard(model, opt, hooks=[clipper], sinks=[], check_every=10, scaler=scaler, strict=True)
    for step in range(1, 11):
        loss = nn.functional.mse_loss(model(x), y)
        if step == 4:
            loss = loss * 1e36  # scaled gradients overflow: the scaler skips this step
        opt.zero_grad()
        scaler.scale(loss).backward()
        before = snapshot(model)
        scaler.step(opt)
        scaler.update()
        still = all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
        assert still == (step == 4)
        assert not hasattr(opt, "found_inf") and not hasattr(opt, "grad_scale")
    guard.close()
    assert sorted(e.kind for e in guard.events) == ["grad_clipped", "steps_skipped"]
    (clipped,) = [e for e in guard.events if e.kind == "grad_clipped"]
    assert clipped.data["steps"] == 9  # the scaler's step is not the clipper's to count


# ----------------------------------------------------------------------------- repair
def run_exploding_rnn(repair: bool, steps: int = 150) -> list[float]:
    x, y = rnn_data()
    torch.manual_seed(1)
    model = RNNRegressor(recurrent_scale=3.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = sg.Guard(model, opt, repair=True, sinks=[], check_every=10, strict=True) if repair else None
    losses = []
    for _ in range(steps):
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        if guard is not None:
            guard.observe(loss)
        opt.step()
        losses.append(loss.item())
    if guard is not None:
        assert any(isinstance(h, sg.GradientClipper) for h in guard.hooks)
        guard.close()
    return losses


def test_repair_saves_an_rnn_whose_gradients_explode_to_nan() -> None:
    plain = run_exploding_rnn(repair=False)
    assert not math.isfinite(plain[-1])  # without stallguard the run ends in NaN
    guarded = run_exploding_rnn(repair=True)
    assert all(math.isfinite(v) for v in guarded)
    assert guarded[-1] < 0.1 * guarded[0]
    assert guarded[-1] < 0.1 * min(v for v in plain if math.isfinite(v))


def test_repair_guard_adds_adaptive_skip_clipper() -> None:
    model = nn.Linear(2, 1)
    guard = sg.Guard(model, torch.optim.SGD(model.parameters(), lr=0.1), repair=True, sinks=[])
    (clipper,) = [h for h in guard.hooks if isinstance(h, sg.GradientClipper)]
    assert (clipper.mode, clipper.nonfinite, clipper.sync) == ("adaptive", "skip", False)
    guard.close()
    plain = sg.Guard(model, torch.optim.SGD(model.parameters(), lr=0.1), sinks=[])
    assert not any(isinstance(h, sg.GradientClipper) for h in plain.hooks)
    plain.close()


# ----------------------------------------------------------------------------- events
def test_grad_clipped_is_one_summary_per_interval() -> None:
    torch.manual_seed(0)
    model = small_cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = sg.Guard(
        model, opt, hooks=[sg.GradientClipper(mode="norm", max_norm=0.02)], sinks=[], check_every=4, strict=True
    )
    for x, y in batches(12):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    guard.close()
    events = guard.events
    assert [(e.kind, e.step, e.data["clipped"], e.data["steps"]) for e in events] == [
        ("grad_clipped", 4, 4, 4),
        ("grad_clipped", 8, 4, 4),
        ("grad_clipped", 12, 4, 4),
    ]
    for e in events:
        assert e.data["fraction"] == 1.0 and e.data["threshold"] == pytest.approx(0.02)
        assert e.data["post_norm_mean"] == pytest.approx(0.02, rel=1e-3)
        assert e.data["post_norm_mean"] < e.data["pre_norm_mean"]
        assert e.data["pre_norm_max"] >= e.data["pre_norm_mean"]
    assert events[-1].data["total_clipped"] == 12


# ----------------------------------------------------------------------------- no host syncs per step
def count_syncs(make_hooks: object, optimizer: str, inject_nan: bool = False) -> int:
    """Host reads of device values during 6 steps with no check point among them."""
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(0)
    model = small_cnn()
    if optimizer == "fused_adam":
        opt: torch.optim.Optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
    hooks = make_hooks()  # type: ignore[operator]
    guard = sg.Guard(model, opt, hooks=hooks, sinks=[], check_every=1000, strict=True) if hooks else None
    data = batches(9)

    def step(i: int) -> None:
        x, y = data[i]
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        if inject_nan and i == 5:
            model[0].weight.grad[0, 0, 0, 0] = math.nan
        if guard is not None:
            guard.observe(loss, inputs=x, targets=y)
        opt.step()

    for i in range(3):  # first steps build cached index tensors and optimizer state
        step(i)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for i in range(3, 9):
            step(i)
    if guard is not None:
        guard.close()
    return sum(e.name == "aten::_local_scalar_dense" and not _in_fused_kernel(e) for e in prof.events())


def _in_fused_kernel(event: object) -> bool:
    # torch's fused optimizers read found_inf on the host only on CPU; on an accelerator the kernel
    # reads it on the device, as it does for GradScaler.
    parent = getattr(event, "cpu_parent", None)
    while parent is not None:
        if parent.name.startswith("aten::_fused_"):
            return True
        parent = parent.cpu_parent
    return False


SYNC_FREE = {
    "monitor": lambda: [sg.GradNormMonitor()],
    "monitor+adaptive_skip": lambda: [sg.GradNormMonitor(), sg.GradientClipper()],
    "norm_skip": lambda: [sg.GradientClipper(mode="norm", max_norm=0.1)],
    "value_skip": lambda: [sg.GradientClipper(mode="value", clip_value=0.01)],
    "adaptive_zero": lambda: [sg.GradientClipper(nonfinite="zero")],
    "adaptive_ignore": lambda: [sg.GradientClipper(nonfinite="ignore")],
}


@pytest.mark.parametrize("optimizer", ["sgd", "fused_adam"])
@pytest.mark.parametrize("config", sorted(SYNC_FREE))
def test_no_host_sync_on_steps_between_check_points(config: str, optimizer: str) -> None:
    baseline = count_syncs(lambda: [], optimizer, inject_nan=True)
    assert count_syncs(SYNC_FREE[config], optimizer, inject_nan=True) == baseline


@pytest.mark.parametrize(
    "make",
    [lambda: [sg.GradientClipper(nonfinite="raise")], lambda: [sg.GradientClipper(sync=True)]],
    ids=["raise", "sync_skip"],
)
def test_the_audit_sees_the_documented_per_step_read(make: object) -> None:
    assert count_syncs(make, "sgd") == count_syncs(lambda: [], "sgd") + 6


# ----------------------------------------------------------------------------- state and validation
def test_state_dict_round_trip() -> None:
    torch.manual_seed(0)
    model = small_cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    clipper = sg.GradientClipper(history=16)
    guard = sg.Guard(model, opt, hooks=[clipper], sinks=[], check_every=4, strict=True)
    data = batches(14)
    for x, y in data[:10]:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    state = guard.state_dict()
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    assert loaded["hooks"]["GradientClipper"]["hist_pos"] == [10]

    twin_model = copy.deepcopy(model)
    twin_opt = torch.optim.SGD(twin_model.parameters(), lr=0.1)
    twin_opt.load_state_dict(opt.state_dict())
    twin = sg.GradientClipper(history=16)
    twin.load_state_dict(loaded["hooks"]["GradientClipper"])  # before attach
    twin_guard = sg.Guard(twin_model, twin_opt, hooks=[twin], sinks=[], check_every=4, strict=True)
    twin_guard.load_state_dict(loaded)
    for key, value in clipper.state_dict().items():
        if isinstance(value, torch.Tensor):
            torch.testing.assert_close(twin.state_dict()[key], value, rtol=0, atol=0, equal_nan=True, msg=key)
        else:
            assert twin.state_dict()[key] == value, key
    # Both go on identically: same thresholds, same gradients.
    for x, y in data[10:]:
        for m, o in ((model, opt), (twin_model, twin_opt)):
            o.zero_grad()
            nn.functional.cross_entropy(m(x), y).backward()
            o.step()
        for a, b in zip(model.parameters(), twin_model.parameters()):
            assert torch.equal(a.grad, b.grad)
    guard.close()
    twin_guard.close()
    assert [e.to_dict()["data"] for e in guard.events[-1:]] == [e.to_dict()["data"] for e in twin_guard.events[-1:]]


@pytest.mark.parametrize(
    ("kwargs", "error", "words"),
    [
        ({"mode": "clip"}, ValueError, "mode"),
        ({"mode": "norm"}, ValueError, "max_norm"),
        ({"mode": "norm", "max_norm": 0.0}, ValueError, "max_norm"),
        ({"mode": "norm", "max_norm": -1.0}, ValueError, "max_norm"),
        ({"mode": "value"}, ValueError, "clip_value"),
        ({"mode": "value", "clip_value": 0}, ValueError, "clip_value"),
        ({"mode": "adaptive", "max_norm": 1.0}, ValueError, "max_norm"),
        ({"mode": "norm", "max_norm": 1.0, "clip_value": 1.0}, ValueError, "clip_value"),
        ({"percentile": 0.0}, ValueError, "percentile"),
        ({"percentile": 101.0}, ValueError, "percentile"),
        ({"history": 0}, ValueError, "history"),
        ({"history": 5, "warmup": 6}, ValueError, "warmup"),
        ({"norm_type": -2.0}, ValueError, "norm_type"),
        ({"nonfinite": "drop"}, ValueError, "nonfinite"),
        ({"nonfinite": "zero", "sync": True}, ValueError, "sync"),
        ({"sync": "yes"}, TypeError, "sync"),
    ],
)
def test_parameter_validation_names_the_parameter(kwargs: dict, error: type, words: str) -> None:
    with pytest.raises(error, match=words):
        sg.GradientClipper(**kwargs)


def test_config_round_trip() -> None:
    model = nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = sg.Guard(model, opt, hooks=[sg.GradientClipper(mode="value", clip_value=0.5)], sinks=[])
    config = guard.to_config()
    guard.close()
    rebuilt = sg.Guard.from_config(model, opt, {**config, "sinks": []})
    (clipper,) = rebuilt.hooks
    assert isinstance(clipper, sg.GradientClipper) and (clipper.mode, clipper.clip_value) == ("value", 0.5)
    rebuilt.close()
