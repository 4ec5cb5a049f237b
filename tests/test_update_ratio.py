"""UpdateRatio on small real runs: tiny and huge updates are named, healthy SGD/Adam runs stay quiet."""

from __future__ import annotations

import io
import math

import pytest
import torch
from tiny_runs import classification, kinds, mlp, train

import stallguard as sg


def test_lr_1e7_sgd_is_update_ratio_low_and_ranked_first() -> None:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=1e-7)
    guard, _ = train(model, opt, 200, classification())
    low = kinds(guard, "update_ratio_low")
    assert len(low) == 1
    assert low[0].causes == ("lr_too_low",)
    assert low[0].data["median_ratio"] < 1e-6
    assert set(low[0].data["layers"]) == {"0.weight", "2.weight", "4.weight"}
    assert kinds(guard, "update_ratio_high") == []
    assert guard.diagnose()[0].cause == "lr_too_low"


def test_lr_10_sgd_is_update_ratio_high() -> None:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=10.0)
    guard, _ = train(model, opt, 200, classification())
    high = kinds(guard, "update_ratio_high")
    assert len(high) >= 1
    assert high[0].causes == ("lr_too_high",)
    assert high[0].step == 50  # the first check point, from the first step's sample
    assert high[0].data["max_ratio"] >= high[0].data["median_ratio"] or high[0].data["max_ratio"] == "inf"
    assert guard.diagnose()[0].cause == "lr_too_high"
    # The explosion kills every ReLU; the zero updates that follow have zero gradients and are not
    # read as a learning rate too low.
    assert kinds(guard, "dead_units")
    assert kinds(guard, "update_ratio_low") == []
    assert "lr_too_low" not in [d.cause for d in guard.diagnose()]


def test_lr_1_sgd_on_a_regression_is_high_after_warmup() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
    x = torch.randn(256, 8)
    y = torch.sin(x.sum(1, keepdim=True))
    opt = torch.optim.SGD(model.parameters(), lr=3.0)
    hook = sg.UpdateRatio(every=2, window=5, warmup=10)
    guard, _ = train(model, opt, 40, (x, y), hooks=[hook], loss_fn=torch.nn.functional.mse_loss, check_every=20)
    high = kinds(guard, "update_ratio_high")
    assert high
    ratio = high[0].data["median_ratio"]
    assert ratio == "inf" or ratio > 0.1  # JSON-safe: an update that overflowed reads "inf"


def test_tiny_updates_during_an_lr_warmup_are_not_reported() -> None:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    # A slow exponential warm-up from 1e-6 x the LR: the updates are tiny throughout, but growing.
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1e-6 * 1.04**s)
    hook = sg.UpdateRatio(every=2, window=10)
    guard, _ = train(model, opt, 150, classification(), hooks=[hook], scheduler=sched)
    assert [e for e in kinds(guard, "update_ratio") if e.data["median_ratio"] < 1e-5]  # they are tiny
    assert kinds(guard, "update_ratio_low") == []


def test_the_same_tiny_updates_without_warmup_are_reported() -> None:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05 * 1e-6)
    hook = sg.UpdateRatio(every=2, window=10)
    guard, _ = train(model, opt, 150, classification(), hooks=[hook])
    assert len(kinds(guard, "update_ratio_low")) == 1


def test_zero_weights_and_zero_gradients_give_no_ratio() -> None:
    model = mlp()
    torch.nn.init.zeros_(model[2].weight)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    hook = sg.UpdateRatio(every=1, window=1, warmup=0)
    guard, _ = train(model, opt, 1, classification(), hooks=[hook], check_every=1)
    ratios = kinds(guard, "update_ratio")[0].data["layer_ratios"]
    # 2.weight was zero before the step; 0.weight got no gradient through it.
    assert set(ratios) == {"4.weight"}
    assert kinds(guard, "update_ratio_high") == []


def test_lazy_layers_are_measured_once_initialized() -> None:
    model = torch.nn.Sequential(torch.nn.LazyLinear(32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    hook = sg.UpdateRatio(every=1, window=3, warmup=0)
    guard = sg.Guard(model, opt, hooks=[hook], sinks=[], check_every=3)
    assert hook.layers == ["0.weight", "2.weight"]
    x, y = classification()
    for _ in range(3):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    ratios = kinds(guard, "update_ratio")[0].data["layer_ratios"]
    assert set(ratios) == {"0.weight", "2.weight"} and all(1e-5 < r < 0.1 for r in ratios.values())
    guard.close()


def test_samples_only_every_n_steps() -> None:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    hook = sg.UpdateRatio(every=10)
    train(model, opt, 35, classification(), hooks=[hook])
    assert hook.samples == 4  # step 1, then the steps the other sampled hooks take
    assert hook.slot_steps[:4] == [1, 10, 20, 30]


def test_state_dict_round_trip() -> None:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=1e-7)
    hook = sg.UpdateRatio(every=1, window=4, warmup=0)
    train(model, opt, 6, classification(), hooks=[hook], check_every=4)
    buf = io.BytesIO()
    torch.save(hook.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    fresh = sg.UpdateRatio(every=1, window=4, warmup=0)
    guard = sg.Guard(model, opt, hooks=[fresh], sinks=[])
    fresh.load_state_dict(state)
    assert fresh.samples == 6 and fresh.status == "low"
    assert torch.equal(fresh.ratios.isnan(), hook.ratios.isnan())
    assert torch.allclose(fresh.ratios.nan_to_num(), hook.ratios.nan_to_num())
    guard.close()
    other = sg.UpdateRatio(every=1, window=4, warmup=0)
    guard = sg.Guard(mlp(d_out=2), opt, hooks=[other], sinks=[])
    state["layers"] = ["a.weight"]
    with pytest.raises(ValueError, match=r"UpdateRatio\.load_state_dict: the saved weights"):
        other.load_state_dict(state)
    guard.close()


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"low": 0}, ValueError, "UpdateRatio: low must be > 0.0, got 0"),
        ({"high": -1.0}, ValueError, "UpdateRatio: high must be > 0.0"),
        ({"low": 0.1, "high": 0.01}, ValueError, "UpdateRatio: high must be > low, got high=0.01, low=0.1"),
        ({"window": 0}, ValueError, "UpdateRatio: window must be an int >= 1, got 0"),
        ({"warmup": -1}, ValueError, "UpdateRatio: warmup must be an int >= 0, got -1"),
        ({"every": 0}, ValueError, "UpdateRatio: every must be an int >= 1, got 0"),
        ({"window": 2.5}, TypeError, "UpdateRatio: window must be an int"),
    ],
)
def test_bad_arguments(kwargs, error, match) -> None:
    with pytest.raises(error, match=match):
        sg.UpdateRatio(**kwargs)


def test_registered_as_a_default_monitor() -> None:
    assert "UpdateRatio" in [type(h).__name__ for h in sg.default_hooks()]
    assert isinstance(sg.create("update_ratio", low=1e-6), sg.UpdateRatio)


@pytest.mark.parametrize("shape", [(5,), (4096,), (4097,), (64, 3, 7, 7), (1000, 128)])
def test_update_sample_view_and_copy_pick_the_same_elements(shape: tuple[int, ...]) -> None:
    from stallguard.stats import UPDATE_SAMPLE, _sample, sample_view

    p = torch.nn.Parameter(torch.randn(shape))
    view = sample_view(p)
    assert view.numel() == min(p.numel(), UPDATE_SAMPLE)
    assert torch.equal(view, _sample(p))  # the copy taken where a view is impossible
    assert view.data_ptr() >= p.data_ptr()  # a view: it follows in-place updates
    with torch.no_grad():
        p.add_(1.0)
    assert torch.equal(view, _sample(p))
    # A transposed (non-contiguous) weight is sampled by copy, from the same flat positions.
    t = torch.randn(shape[::-1]).permute(*reversed(range(len(shape))))
    assert torch.equal(sample_view(t), _sample(t.contiguous()))


def test_two_op_finiteness_test_matches_isfinite() -> None:
    from stallguard.stats import is_nonfinite

    x = torch.tensor([0.0, -0.0, 3e38, -1.0, math.inf, -math.inf, math.nan])
    for t in (x, x.half(), x.bfloat16(), x.double()):
        assert torch.equal(is_nonfinite(t), ~torch.isfinite(t))
