"""InputStats on small real training runs: raw pixels, constant and non-finite inputs, token ids."""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn

import stallguard as sg
from stallguard.hooks.input_stats import first_float_tensor
from tests.data_models import TokenLSTM, images, kinds, linear_labels, mlp, small_cnn, tokens, train


def events_of(guard: sg.Guard, kind: str) -> list[sg.Event]:
    return [e for e in guard.events if e.kind == kind]


# ----------------------------------------------------------------------------- the faults
def test_raw_pixels_into_a_cnn_are_unnormalized() -> None:
    guard = train(small_cnn(), images("raw"), hooks=[sg.InputStats()], steps=20, lr=0.01)
    (e,) = events_of(guard, "inputs_unnormalized")
    assert e.step == 10  # the first check point after the five warm-up batches
    assert e.severity == sg.Severity.WARNING and e.causes == ("unnormalized_inputs",)
    assert e.data["min"] == 0.0 and 200 < e.data["max"] <= 255
    assert 80 < e.data["mean"] < 120 and 20 < e.data["std"] < 60
    assert e.data["looks_like_pixels"] and "range" in e.data["reasons"] and "mean" in e.data["reasons"]
    assert e.data["n_features"] == 1 and e.data["features"] == (0,)  # one channel
    assert "0-255" in e.message


def test_the_same_images_standardized_are_quiet() -> None:
    guard = train(small_cnn(), images(), hooks=[sg.InputStats()], steps=30, lr=0.01)
    assert kinds(guard) == []


def test_one_raw_feature_among_standardized_ones_is_named() -> None:
    base = linear_labels()

    def batch(g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = base(g)
        x[:, 5] = x[:, 5] * 1000 + 50_000  # an income in dollars next to z-scores
        return x, y

    guard = train(mlp(), batch, hooks=[sg.InputStats()], steps=10, lr=1e-6)
    (e,) = events_of(guard, "inputs_unnormalized")
    assert e.data["features"] == (5,) and e.data["n_features"] == 16
    worst = e.data["worst"]["5"]
    # Combined from per-batch centred sums: the std of a feature with a huge mean is still exact.
    assert worst["mean"] == pytest.approx(50_000, rel=0.01) and worst["std"] == pytest.approx(1000, rel=0.1)
    assert not e.data["looks_like_pixels"]


def test_features_scaled_far_too_small_are_flagged() -> None:
    base = linear_labels()

    def batch(g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = base(g)
        return x * 1e-5, y

    guard = train(mlp(), batch, hooks=[sg.InputStats()], steps=10)
    (e,) = events_of(guard, "inputs_unnormalized")
    assert e.data["reasons"] == ("tiny_std",) and e.data["n_flagged"] == 16


def test_constant_inputs_carry_no_signal() -> None:
    base = linear_labels()

    def batch(g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = base(g)
        return torch.full_like(x, 0.5), y  # the wrong tensor fed in: a constant

    guard = train(mlp(), batch, hooks=[sg.InputStats()], steps=10)
    (e,) = events_of(guard, "constant_features")
    assert e.severity == sg.Severity.WARNING and e.causes == ("no_signal",)
    assert e.data["n_constant"] == 16 and e.data["fraction"] == 1.0
    assert "inputs_unnormalized" not in kinds(guard)  # 0.5 everywhere is on a fine scale
    assert [d.cause for d in guard.diagnose()] == ["no_signal"]


def test_a_few_constant_border_pixels_are_only_info() -> None:
    def batch(g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = images()(g)
        x = x.flatten(1)
        x[:, :12] = -0.4  # the top row of every image is background
        return x, y

    guard = train(mlp(144, 4), batch, hooks=[sg.InputStats()], steps=10)
    (e,) = events_of(guard, "constant_features")
    assert e.severity == sg.Severity.INFO and e.causes == ()
    assert e.data["features"] == tuple(range(12)) and e.data["fraction"] == pytest.approx(12 / 144)
    assert [k for k in kinds(guard) if k != "constant_features"] == []


def test_nan_in_inputs_is_an_error_naming_the_inputs() -> None:
    base = linear_labels()
    calls = {"n": 0}

    def batch(g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = base(g)
        calls["n"] += 1
        if calls["n"] == 3:
            x[0, 2] = math.nan
            x[1, 2] = math.inf
        return x, y

    guard = train(mlp(), batch, hooks=[sg.InputStats()], steps=20)
    (e,) = events_of(guard, "nonfinite_inputs")
    assert e.step == 10 and e.severity == sg.Severity.ERROR and e.causes == ("non_finite",)
    assert e.data["where"] == "inputs" and e.data["count"] == 2 and e.data["nan"] == 1 and e.data["inf"] == 1
    assert e.data["features"] == (2,)
    # NaN does not spoil the statistics of the finite values.
    assert "inputs_unnormalized" not in kinds(guard)
    diag = guard.diagnose()
    assert diag[0].cause == "non_finite" and "inputs" in diag[0].advice


def test_nan_after_the_warm_up_is_found_by_sampling() -> None:
    base = linear_labels()
    calls = {"n": 0}

    def batch(g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = base(g)
        calls["n"] += 1
        if calls["n"] > 30:
            x[:, 0] = math.nan  # the data pipeline breaks later in the run
        return x, y

    guard = train(mlp(), batch, hooks=[sg.InputStats()], steps=60, lr=0.0)
    steps = [e.step for e in events_of(guard, "nonfinite_inputs")]
    # After the warm-up one step in 50 is sampled: of the broken batches (steps 31-60) only step 50's.
    assert steps == [60] and events_of(guard, "nonfinite_inputs")[0].data["count"] == 64  # at the final check


def test_token_ids_are_not_features() -> None:
    hook = sg.InputStats()
    seen = []
    original = hook.on_observe
    hook.on_observe = lambda obs: (seen.append(obs.step), original(obs))  # type: ignore[method-assign]
    guard = train(TokenLSTM(), tokens(), hooks=[hook], steps=60)
    assert kinds(guard) == [] and hook.n_features is None and hook.ignored is not None
    # No warm-up on inputs without features: after the first look, only the cadence's steps.
    assert seen == [0, 50]


def test_a_loop_that_passes_no_inputs_is_looked_at_on_the_cadence_only() -> None:
    hook = sg.InputStats()
    seen = []
    original = hook.on_observe
    hook.on_observe = lambda obs: (seen.append(obs.step), original(obs))  # type: ignore[method-assign]
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    guard = sg.Guard(model, opt, hooks=[hook], sinks=[])
    x, y = torch.randn(16, 16), torch.randint(0, 4, (16,))
    for _ in range(60):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        guard.observe(loss)
        opt.step()
    guard.close()
    assert seen == [0, 50] and hook.ignored == "no inputs passed to observe"


# ----------------------------------------------------------------------------- layouts
def test_first_float_tensor_searches_structures_in_order() -> None:
    ids, a, b = torch.tensor([[1, 2]]), torch.zeros(1, 3), torch.ones(1, 4)
    assert first_float_tensor((ids, [a, b])) is a
    assert first_float_tensor({"mask": ids.bool(), "x": b}) is b
    assert first_float_tensor([ids]) is None and first_float_tensor(None) is None


def test_reads_the_first_float_tensor_of_a_structure() -> None:
    hook = sg.InputStats(warmup=1)
    model = nn.Linear(3, 1)
    guard = sg.Guard(model, torch.optim.SGD(model.parameters(), lr=0.1), hooks=[hook], sinks=[], check_every=1)
    raw = torch.rand(8, 3) * 255
    hook.on_observe(sg.Observation(step=0, inputs={"ids": torch.zeros(8, 2, dtype=torch.long), "x": raw}))
    guard.check()
    (e,) = events_of(guard, "inputs_unnormalized")
    assert e.data["n_features"] == 3 and e.data["max"] == pytest.approx(float(raw.max()))
    guard.close()


def test_feature_dim_for_sequences_of_vectors() -> None:
    hook = sg.InputStats(warmup=1, feature_dim=-1)
    model = nn.Linear(6, 1)
    guard = sg.Guard(model, torch.optim.SGD(model.parameters(), lr=0.1), hooks=[hook], sinks=[], check_every=1)
    x = torch.randn(4, 10, 6)
    x[..., 3] = 7.0  # one constant feature in every time step
    loss = model(x).mean()
    loss.backward()
    guard.observe(loss, inputs=x)
    guard.check()
    assert hook.n_features == 6
    (e,) = events_of(guard, "constant_features")
    assert e.data["features"] == (3,)
    assert events_of(guard, "inputs_unnormalized")[0].data["features"] == (3,)  # mean 7 > 3
    guard.close()


# ----------------------------------------------------------------------------- cadence, state, arguments
def test_samples_the_warm_up_then_every_nth_step() -> None:
    hook = sg.InputStats(warmup=3, every=10)
    train(mlp(), linear_labels(), hooks=[hook], steps=35)
    # steps 0, 1, 2 (warm-up), then 10, 20, 30
    assert hook.sampled == 6


def test_state_dict_round_trip_through_torch_save() -> None:
    hook = sg.InputStats()
    guard = train(small_cnn(), images("raw"), hooks=[hook], steps=12, lr=0.0)
    buf = io.BytesIO()
    torch.save(guard.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    fresh = sg.InputStats()
    fresh.load_state_dict(state["hooks"]["InputStats"])  # before attach: per-channel states declared here
    assert fresh.n_features == 1 and fresh.sampled == hook.sampled and fresh.reported == ["inputs_unnormalized"]
    assert torch.equal(fresh.s1, hook.s1) and torch.equal(fresh.hi, hook.hi)
    model = small_cnn()
    g2 = sg.Guard(model, torch.optim.SGD(model.parameters(), lr=0.0), hooks=[fresh], sinks=[])
    g2.load_state_dict(state)
    g2.check()
    assert events_of(g2, "inputs_unnormalized") == events_of(guard, "inputs_unnormalized")  # not re-reported
    g2.close()


def _masked_reference(batches: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """The per-channel statistics written plainly with isfinite masks, as the hook defines them."""
    f64 = torch.float64
    ref: dict[str, torch.Tensor] = {}
    for x in batches:
        dims = (0, 2, 3)
        finite = torch.isfinite(x)
        n = finite.sum(dims, dtype=f64)
        mean = torch.where(finite, x, 0.0).sum(dims, dtype=f64) / n.clamp_min(1.0)
        centred = torch.where(finite, x - mean.to(x.dtype).reshape(1, -1, 1, 1), 0.0)
        part = {
            "count": n,
            "s1": mean * n,
            "s2": centred.square().sum(dims, dtype=f64) + n * mean.square(),
            "lo": torch.where(finite, x, math.inf).amin(dims).to(f64),
            "hi": torch.where(finite, x, -math.inf).amax(dims).to(f64),
            "nan": torch.isnan(x).sum(dtype=f64),
        }
        for k, v in part.items():
            if k not in ref:
                ref[k] = v
            elif k == "lo":
                ref[k] = torch.minimum(ref[k], v)
            elif k == "hi":
                ref[k] = torch.maximum(ref[k], v)
            else:
                ref[k] = ref[k] + v
    return ref


def test_statistics_match_isfinite_masks_bit_for_bit() -> None:
    # The hook avoids bool masks (slow on the CPU); its float-only passes must give exactly what
    # isfinite masks give, with NaN, both infinities, a channel with no finite value and a large mean.
    g = torch.Generator().manual_seed(0)
    batches = []
    for i in range(4):
        x = torch.randn(6, 4, 5, 5, generator=g) * 3 + torch.tensor([0.0, 1e4, -2.0, 0.5]).reshape(1, 4, 1, 1)
        if i >= 1:
            bad = torch.rand(x.shape, generator=g) < 0.1
            fill = torch.tensor([math.nan, math.inf, -math.inf])[torch.randint(0, 3, x.shape, generator=g)]
            x = torch.where(bad, fill, x)
        if i == 2:
            x[:, 3] = math.nan
        batches.append(x)
    hook = sg.InputStats(warmup=4)
    guard = sg.Guard(None, None, hooks=[hook], sinks=[], check_every=100)
    for x in batches:
        guard.observe(torch.tensor(1.0), inputs=x)
        guard.after_step()
    ref = _masked_reference(batches)
    for name, want in ref.items():
        assert torch.equal(getattr(hook, name), want), name
    nonfinite = sum(int((~torch.isfinite(x)).sum()) for x in batches)
    assert nonfinite > 50 and float(hook.elements) * 4 - float(hook.count.sum()) == nonfinite
    assert float(hook.nan) == sum(int(torch.isnan(x).sum()) for x in batches) > 0
    guard.close()
    (e,) = events_of(guard, "nonfinite_inputs")
    assert e.data["total"] == nonfinite and e.data["nan"] == float(ref["nan"]) and 3 in e.data["features"]


@pytest.mark.parametrize(
    ("kwargs", "error", "text"),
    [
        ({"warmup": 0}, ValueError, "warmup must be an int >= 1"),
        ({"every": 0}, ValueError, "every must be an int >= 1"),
        ({"mean_threshold": -1.0}, ValueError, "mean_threshold must be > 0"),
        ({"std_threshold": "big"}, TypeError, "std_threshold must be a number"),
        ({"max_abs": math.inf}, ValueError, "max_abs must be a finite number"),
        ({"min_std": 20.0}, ValueError, "min_std must be < std_threshold"),
        ({"constant_fraction": 1.5}, ValueError, "constant_fraction must be <= 1.0"),
        ({"feature_dim": 1.0}, TypeError, "feature_dim must be an int"),
    ],
)
def test_bad_arguments_name_the_hook_and_the_parameter(kwargs: dict, error: type, text: str) -> None:
    with pytest.raises(error, match=f"InputStats: {text}"):
        sg.InputStats(**kwargs)


def test_a_feature_dim_outside_the_input_is_reported() -> None:
    hook = sg.InputStats(feature_dim=3)
    model = nn.Linear(4, 1)
    guard = sg.Guard(model, torch.optim.SGD(model.parameters(), lr=0.1), hooks=[hook], sinks=[], strict=True)
    with pytest.raises(ValueError, match="InputStats: feature_dim=3 does not name a non-batch dim"):
        guard.observe(inputs=torch.randn(8, 4))
    guard.close()


def test_registered_as_a_default_monitor() -> None:
    assert type(sg.create("input_stats")) is sg.InputStats
    assert any(type(h) is sg.InputStats for h in sg.default_hooks())
