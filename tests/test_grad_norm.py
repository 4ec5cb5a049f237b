"""GradNormMonitor on small real training runs: vanishing, exploding, non-finite, and healthy runs."""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn

import stallguard as sg
from tests.grad_models import (
    RNNRegressor,
    quadrant_images,
    rnn_data,
    sigmoid_mlp,
    small_cnn,
    train_outlier_regression,
    train_rnn_classifier,
)

WARNINGS = ("vanishing_gradients", "exploding_gradients", "nonfinite_gradients")


def train_mlp(guard_hooks: list[sg.Hook], steps: int = 30, check_every: int = 10) -> sg.Guard:
    torch.manual_seed(0)
    model = sigmoid_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(256, 16), torch.randint(0, 4, (256,))
    guard = sg.Guard(model, opt, hooks=guard_hooks, sinks=[], check_every=check_every, strict=True)
    for _ in range(steps):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        guard.observe(loss)
        opt.step()
    return guard


def train_rnn(
    hooks: list[sg.Hook], scale: float, lr: float, steps: int, check_every: int = 10
) -> tuple[sg.Guard, list[float]]:
    x, y = rnn_data()
    torch.manual_seed(1)
    model = RNNRegressor(scale)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    guard = sg.Guard(model, opt, hooks=hooks, sinks=[], check_every=check_every, strict=True)
    losses = []
    for _ in range(steps):
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        guard.observe(loss)
        opt.step()
        losses.append(loss.item())
    return guard, losses


def kinds(guard: sg.Guard) -> list[str]:
    return [e.kind for e in guard.events]


# ----------------------------------------------------------------------------- detection on real runs
def test_flags_deep_sigmoid_mlp_as_vanishing_at_the_first_check() -> None:
    guard = train_mlp([sg.GradNormMonitor()], steps=10)
    events = [e for e in guard.events if e.kind == "vanishing_gradients"]
    assert len(events) == 1 and events[0].step == 10
    e = events[0]
    assert e.data["first_kernel"] == "0.weight" and e.data["last_kernel"] == "38.weight"
    assert e.data["ratio"] < 1e-3 and e.data["first_kernel_norm"] < 1e-4
    assert e.data["rules"] == ("ratio",) and e.data["ratio_steps_fraction"] == 1.0
    assert "vanishing_gradients" in e.causes
    # Per-layer numbers: the first layer's mean norm is far below the last layer's.
    layers = e.data["layers"]
    assert len(layers) == 40 and layers["0.weight"]["mean"] < 1e-3 * layers["38.weight"]["mean"]
    guard.close()


def test_absolute_floor_rule_is_off_by_default_and_fires_when_set() -> None:
    # A 3-layer sigmoid MLP is not vanishing by the ratio rule; a high floor makes it fire.
    torch.manual_seed(0)
    model = sigmoid_mlp(depth=3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(64, 16), torch.randint(0, 4, (64,))
    quiet, floored = sg.GradNormMonitor(name="quiet"), sg.GradNormMonitor(min_norm=10.0, name="floored")
    guard = sg.Guard(model, opt, hooks=[quiet, floored], sinks=[], check_every=10, strict=True)
    for _ in range(10):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert [(e.source, e.kind, e.data["rules"]) for e in guard.events] == [
        ("floored", "vanishing_gradients", ("floor",))
    ]
    guard.close()


def test_flags_rnn_with_scaled_recurrent_weights_as_exploding_before_it_turns_nan() -> None:
    guard, losses = train_rnn([sg.GradNormMonitor()], scale=3.0, lr=0.1, steps=100)
    first_nan = next(i + 1 for i, v in enumerate(losses) if not math.isfinite(v))
    exploding = [e for e in guard.events if e.kind == "exploding_gradients"]
    assert exploding, kinds(guard)
    first = exploding[0]
    assert first.step < first_nan  # warned while the run could still be saved
    # The norms grew against their own baseline; the loss, read on every step, rose with them.
    assert "growth" in first.data["rules"]
    # A sustained 100x jump of the median, or 100x spikes over a median already raised 10x.
    assert first.data["growth"] > 100 or (first.data["peak_growth"] > 100 and first.data["growth"] > 10)
    assert first.data["norm_max"] > 100 * first.data["baseline_median"]
    assert "exploding_gradients" in first.causes
    nonfinite = [e for e in guard.events if e.kind == "nonfinite_gradients"]
    assert nonfinite and nonfinite[0].step >= first_nan
    assert nonfinite[0].severity == sg.Severity.ERROR
    guard.close()


def test_same_rnn_unscaled_trains_quietly() -> None:
    guard, losses = train_rnn([sg.GradNormMonitor()], scale=1.0, lr=0.1, steps=100)
    assert losses[-1] < losses[0]
    assert not [k for k in kinds(guard) if k in WARNINGS]
    guard.close()


def test_sampled_monitor_sees_an_rnn_blow_up_between_its_samples_through_the_loss() -> None:
    # The default set's cadence: the norm is read on one step in ten.
    guard, losses = train_rnn_classifier([sg.GradNormMonitor(every=10)])
    calm = sorted(losses[:50])[25]
    blow_up = next(i + 1 for i, v in enumerate(losses) if v > 10 * calm)
    exploding = [e for e in guard.events if e.kind == "exploding_gradients"]
    assert exploding, kinds(guard)
    first = exploding[0]
    # Reported at the first check point after the blow-up, by the forms that read the loss: the
    # sampled norms alone never grew 100x.
    assert blow_up < first.step <= blow_up + 50
    assert all("growth" not in e.data["rules"] for e in exploding)
    assert set(first.data["rules"]) <= {"surge", "spikes"}
    assert first.data["loss_max"] > 10 * first.data["loss_baseline_median"]
    assert first.data["loss_max"] > first.data["loss_start"]
    if "spikes" in first.data["rules"]:
        assert first.data["spike_norm_median"] >= 3 * first.data["calm_norm_median"]
    surge = [e for e in exploding if "surge" in e.data["rules"]]
    assert surge and surge[0].data["growth"] >= 5 and surge[0].data["loss_growth"] >= 5
    guard.close()


def test_same_rnn_with_clipped_gradients_stays_quiet() -> None:
    guard, losses = train_rnn_classifier([sg.GradNormMonitor(every=10)], clip=1.0)
    assert sum(losses[-50:]) < sum(losses[:50])  # it trains
    assert not [k for k in kinds(guard) if k in WARNINGS]
    guard.close()


def test_outlier_targets_give_gradient_spikes_that_track_the_loss_spikes() -> None:
    guard = train_outlier_regression([sg.GradNormMonitor(every=10)], corrupt=8)
    exploding = [e for e in guard.events if e.kind == "exploding_gradients"]
    assert exploding, kinds(guard)
    e = exploding[0]
    assert e.data["rules"] == ("spikes",)
    assert e.data["loss_spikes"] >= 1 and e.data["sampled_spikes"] >= 1
    assert e.data["loss_max"] >= 10 * e.data["loss_baseline_median"]
    assert e.data["spike_norm_ratio"] >= 3 and e.data["spike_norm_median"] > e.data["calm_norm_median"]
    guard.close()


def test_outlier_targets_are_not_seen_without_the_loss_and_clean_targets_stay_quiet() -> None:
    # Without guard.observe(loss) only the sampled norms remain, and they are spiky from the first step.
    blind = train_outlier_regression([sg.GradNormMonitor(every=10)], corrupt=8, observe=False)
    assert not [k for k in kinds(blind) if k in WARNINGS]
    blind.close()
    clean = train_outlier_regression([sg.GradNormMonitor(every=10)], corrupt=0)
    assert not [k for k in kinds(clean) if k in WARNINGS]
    clean.close()


@pytest.mark.parametrize("optimizer", ["sgd_momentum", "adam"])
def test_quiet_on_a_healthy_cnn(optimizer: str) -> None:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    model = small_cnn()
    x, y = quadrant_images(2048, g)
    if optimizer == "adam":
        opt: torch.optim.Optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    guard = sg.Guard(model, opt, hooks=[sg.GradNormMonitor()], sinks=[], check_every=10, strict=True)
    losses = []
    for _ in range(250):
        idx = torch.randint(0, 2048, (32,), generator=g)
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    guard.close()
    assert sum(losses[-20:]) / 20 < 0.8 * sum(losses[:20]) / 20  # it learned
    assert guard.events == []


# ----------------------------------------------------------------------------- the numbers it reads
class RecordNorms(sg.Hook):
    """Test observer: the global norm as torch computes it (a host read; fine in a test)."""

    def __init__(self) -> None:
        super().__init__()
        self.norms: list[torch.Tensor] = []

    def on_before_step(self, ctx: sg.StepContext) -> None:
        self.norms.append(torch.nn.utils.get_total_norm(ctx.grads).clone())


class KeepRing(sg.GradNormMonitor):
    """The monitor, keeping what each check point read."""

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.read: list[float] = []

    def on_check(self, check: sg.CheckContext) -> None:
        # One row per sampled step; the global norm is the first column after the per-parameter ones.
        self.read += [float(v) for v in check.values["rows"][0][: self.ring_pos[0], -4]]
        super().on_check(check)


def test_global_norm_equals_get_total_norm_bit_for_bit_even_with_a_clipper() -> None:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    model = small_cnn()
    x, y = quadrant_images(256, g)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    record, monitor = RecordNorms(), KeepRing()
    clipper = sg.GradientClipper(mode="norm", max_norm=0.01)  # clips every step: runs after both observers
    guard = sg.Guard(model, opt, hooks=[clipper, monitor, record], sinks=[], check_every=7, strict=True)
    for _ in range(20):
        loss = nn.functional.cross_entropy(model(x[:32]), y[:32])
        opt.zero_grad()
        loss.backward()
        opt.step()
    guard.close()
    expected = [float(n) for n in record.norms]
    assert len(monitor.read) == 20 and monitor.read == expected
    assert min(expected) > 0.01  # so these are the pre-clip norms


def test_names_the_parameter_whose_gradient_turned_infinite() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(32, 8), torch.randn(32, 1)
    guard = sg.Guard(model, opt, hooks=[sg.GradNormMonitor()], sinks=[], check_every=10, strict=True)
    for step in range(1, 21):
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        if step in (14, 16):  # a corrupted gradient, as an overflow in a custom kernel would leave it
            model[2].weight.grad[3, 5] = math.inf
        opt.step()
        with torch.no_grad():  # keep the run going with finite weights
            for p in model.parameters():
                p.nan_to_num_(0.0)
    events = [e for e in guard.events if e.kind == "nonfinite_gradients"]
    assert len(events) == 1 and events[0].step == 20
    data = events[0].data
    assert data["parameters"] == ("2.weight",) and data["first_step"] == 14
    assert data["nonfinite_steps"] == 2 and data["counts"] == {"2.weight": 2}
    assert "non_finite" in events[0].causes
    guard.close()


def test_gradscaler_skipped_steps_in_a_fused_optimizer_are_not_counted() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
    scaler = torch.amp.GradScaler("cpu", growth_interval=1000)
    x, y = torch.randn(32, 8), torch.randn(32, 1)
    monitor = KeepRing()
    guard = sg.Guard(model, opt, hooks=[monitor], sinks=[], check_every=20, scaler=scaler, strict=True)
    for step in range(1, 21):
        loss = nn.functional.mse_loss(model(x), y)
        if step in (5, 9):  # a loss spike whose scaled gradients overflow float32
            loss = loss * 1e36
        opt.zero_grad()
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
    guard.close()
    skipped = [e for e in guard.events if e.kind == "steps_skipped"]
    assert len(skipped) == 1 and skipped[0].data["skipped"] == 2  # the scaler did skip both
    assert "nonfinite_gradients" not in kinds(guard)
    finite = [v for v in monitor.read if math.isfinite(v)]
    assert len(monitor.read) == 20 and len(finite) == 18  # the skipped steps left no norm behind


# ----------------------------------------------------------------------------- several optimizers
def test_keeps_rules_per_optimizer() -> None:
    torch.manual_seed(0)
    deep, shallow = sigmoid_mlp(), nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    model = nn.ModuleDict({"deep": deep, "shallow": shallow})
    opts = [torch.optim.SGD(deep.parameters(), lr=0.1), torch.optim.SGD(shallow.parameters(), lr=0.1)]
    x, y = torch.randn(64, 16), torch.randint(0, 4, (64,))
    guard = sg.Guard(model, opts, hooks=[sg.GradNormMonitor()], sinks=[], check_every=10, strict=True)
    for step in range(1, 11):
        loss = nn.functional.cross_entropy(deep(x), y) + nn.functional.cross_entropy(shallow(x), y)
        for opt in opts:
            opt.zero_grad()
        loss.backward()
        if step == 7:
            shallow[2].bias.grad[0] = math.nan
        for opt in opts:
            opt.step()
    events = [e for e in guard.events if e.kind == "vanishing_gradients"]
    assert [(e.data["optimizer"], e.data["first_kernel"]) for e in events] == [(0, "deep.0.weight")]
    assert all(name.startswith("deep.") for name in events[0].data["layers"])
    (nonfinite,) = [e for e in guard.events if e.kind == "nonfinite_gradients"]
    assert nonfinite.data["optimizer"] == 1 and nonfinite.data["parameters"] == ("shallow.2.bias",)
    assert nonfinite.data["first_step"] == 7
    guard.close()


# ----------------------------------------------------------------------------- defaults, options, state
def test_default_guard_runs_it() -> None:
    model = nn.Linear(2, 1)
    guard = sg.Guard(model, torch.optim.SGD(model.parameters(), lr=0.1), sinks=[])
    assert any(isinstance(h, sg.GradNormMonitor) for h in guard.hooks)
    assert sg.create("grad_norm").per_layer is True
    guard.close()


def test_per_layer_false_keeps_no_per_layer_numbers() -> None:
    guard = train_mlp([sg.GradNormMonitor(per_layer=False)], steps=10)
    (event,) = guard.events
    assert event.kind == "vanishing_gradients" and "layers" not in event.data
    assert "layer_sum" not in guard.hooks[0].state_dict()
    guard.close()


def test_state_dict_round_trip() -> None:
    guard = train_mlp([sg.GradNormMonitor()], steps=25)  # ends mid-interval
    state = guard.hooks[0].state_dict()
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    assert len(loaded["baseline"][0]) == 20 and loaded["ring_pos"] == [5]
    # The loss side: 20 observed losses, the start level they set, and this interval's sampled steps.
    assert len(loaded["loss_baseline"]) == 20 and loaded["loss_seen"] == 20 and loaded["loss_start"] > 0
    assert len(loaded["baseline_loss"][0]) == 20 and loaded["sampled_steps"] == [[20, 21, 22, 23, 24]]

    # Loaded into a hook before it is attached, and after.
    for before in (True, False):
        torch.manual_seed(0)
        model = sigmoid_mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        fresh = sg.GradNormMonitor()
        if before:
            fresh.load_state_dict(loaded)
        other = sg.Guard(model, opt, hooks=[fresh], sinks=[], check_every=10)
        if not before:
            fresh.load_state_dict(loaded)
        again = fresh.state_dict()
        assert again.keys() == state.keys()
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                torch.testing.assert_close(again[key], value, rtol=0, atol=0, equal_nan=True, msg=key)
            else:
                assert again[key] == value, key
        other.close()
    guard.close()


def test_guard_state_dict_round_trip_keeps_detecting() -> None:
    guard = train_mlp([sg.GradNormMonitor()], steps=5)
    state = guard.state_dict()
    guard.close()
    torch.manual_seed(0)
    model = sigmoid_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    resumed = sg.Guard(model, opt, hooks=[sg.GradNormMonitor()], sinks=[], check_every=10, strict=True)
    resumed.load_state_dict(state)
    x, y = torch.randn(256, 16), torch.randint(0, 4, (256,))
    for _ in range(5):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert [(e.step, e.kind, e.data["steps"]) for e in resumed.events] == [(10, "vanishing_gradients", 10)]
    resumed.close()


@pytest.mark.parametrize(
    ("kwargs", "error", "words"),
    [
        ({"norm_type": 0}, ValueError, "norm_type"),
        ({"norm_type": "two"}, TypeError, "norm_type"),
        ({"per_layer": 1}, TypeError, "per_layer"),
        ({"vanishing_ratio": 0.0}, ValueError, "vanishing_ratio"),
        ({"vanishing_norm": -1.0}, ValueError, "vanishing_norm"),
        ({"min_norm": 0.0}, ValueError, "min_norm"),
        ({"persistence": 1.5}, ValueError, "persistence"),
        ({"persistence": 0.0}, ValueError, "persistence"),
        ({"growth_factor": 1.0}, ValueError, "growth_factor"),
        ({"window": 0}, ValueError, "window"),
        ({"min_history": 600}, ValueError, "min_history"),
        ({"max_norm": math.nan}, ValueError, "max_norm"),
        ({"surge_factor": 1.0}, ValueError, "surge_factor"),
        ({"loss_spike": 0.5}, ValueError, "loss_spike"),
        ({"spike_ratio": math.inf}, ValueError, "spike_ratio"),
    ],
)
def test_parameter_validation_names_the_parameter(kwargs: dict, error: type, words: str) -> None:
    with pytest.raises(error, match=words):
        sg.GradNormMonitor(**kwargs)


def test_absolute_ceiling_fires_on_any_step_above_it() -> None:
    guard = train_mlp([sg.GradNormMonitor(max_norm=0.01)], steps=10)
    exploding = [e for e in guard.events if e.kind == "exploding_gradients"]
    assert len(exploding) == 1 and exploding[0].data["rules"] == ("max_norm",)
    assert exploding[0].data["steps_over_max_norm"] >= 1 and exploding[0].data["norm_max"] > 0.01
    guard.close()
