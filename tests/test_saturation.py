"""SaturationCheck on small real runs: saturated hidden layers are named, a confident output sigmoid is not."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F
from grad_models import sigmoid_mlp
from tiny_runs import classification, kinds, train, xor

import stallguard as sg


def scaled_sigmoid_mlp(scale: float) -> torch.nn.Sequential:
    model = sigmoid_mlp(depth=6)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("weight"):
                p.mul_(scale)
    return model


def test_deep_sigmoid_mlp_with_large_init_is_saturated() -> None:
    model = scaled_sigmoid_mlp(32.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    hook = sg.SaturationCheck(every=5)
    guard, _ = train(model, opt, 100, classification(), hooks=[hook], batch=None)
    events = kinds(guard, "saturated_activations")
    assert len(events) == 1
    e = events[0]
    assert e.causes == ("saturated_activations",)
    assert e.data["layers"] == ("1", "3", "5", "7", "9")
    assert 0.5 < e.data["max_fraction"] <= 1.0
    assert e.data["max_fraction"] == max(e.data["fractions"].values())


def test_default_init_sigmoid_mlp_is_quiet() -> None:
    model = scaled_sigmoid_mlp(1.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    hook = sg.SaturationCheck(every=5)
    guard, _ = train(model, opt, 100, classification(), hooks=[hook], batch=None)
    assert kinds(guard, "saturated_activations") == []
    assert set(hook.fractions) == {"1", "3", "5", "7", "9"}
    assert max(hook.fractions.values()) < 0.05


def test_tanh_threshold_is_lower_than_the_sigmoid_one() -> None:
    # Pre-activations around |x| ~ 3.5: saturated for tanh (2.5), not for sigmoid (5).
    def model(act: torch.nn.Module) -> torch.nn.Sequential:
        torch.manual_seed(0)
        m = torch.nn.Sequential(torch.nn.Linear(16, 32), act, torch.nn.Linear(32, 4))
        with torch.no_grad():
            m[0].weight.mul_(12.0)
        return m

    found = {}
    for act in (torch.nn.Tanh(), torch.nn.Sigmoid()):
        m = model(act)
        hook = sg.SaturationCheck(every=1)
        train(m, torch.optim.SGD(m.parameters(), lr=1e-3), 10, classification(), hooks=[hook], check_every=10)
        found[type(act).__name__] = hook.fractions["1"]
    assert found["Tanh"] > 0.5 > found["Sigmoid"]


def test_confident_output_sigmoid_is_not_a_fault() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1), torch.nn.Sigmoid())
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    hook = sg.SaturationCheck(every=5)
    guard, loss = train(model, opt, 600, xor(), hooks=[hook], loss_fn=F.binary_cross_entropy, batch=None)
    assert loss < 0.05  # the output sigmoid is confidently right, so its inputs are large
    assert hook.outputs == ["3"]
    assert "3" not in hook.fractions
    assert kinds(guard, "saturated_activations") == []


def test_only_sampled_steps_pay_and_eval_passes_are_not_counted() -> None:
    model = scaled_sigmoid_mlp(32.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    hook = sg.SaturationCheck(every=4)
    guard = sg.Guard(model, opt, hooks=[hook], sinks=[], check_every=100)
    x, y = classification()
    for step in range(1, 9):
        assert bool(hook._handles) == (step % 4 == 0)  # hooks on sampled steps only
        F.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    assert hook.counted.sum().item() == 2 * 512 * 32 * 5
    model.eval()
    with torch.no_grad():
        for _ in range(4):
            model(x)
    assert hook.counted.sum().item() == 2 * 512 * 32 * 5
    guard.close()


def test_state_dict_round_trip() -> None:
    model = scaled_sigmoid_mlp(32.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    hook = sg.SaturationCheck(every=1)
    train(model, opt, 4, classification(), hooks=[hook], check_every=4)
    buf = io.BytesIO()
    torch.save(hook.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    fresh = sg.SaturationCheck(every=1)
    fresh.load_state_dict(state)
    guard = sg.Guard(model, opt, hooks=[fresh], sinks=[])
    assert fresh.over == hook.over and fresh.layers == hook.layers and fresh.fractions == hook.fractions
    guard.close()
    other = sg.SaturationCheck()
    other.load_state_dict(state)
    with pytest.raises(ValueError, match="SaturationCheck: the restored layers"):
        sg.Guard(
            torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Tanh()), None, hooks=[other], sinks=[], strict=True
        )


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"threshold": 0.0}, ValueError, "SaturationCheck: threshold must be > 0.0, got 0.0"),
        ({"threshold": 1.0}, ValueError, "SaturationCheck: threshold must be < 1.0, got 1.0"),
        ({"sigmoid_limit": -1}, ValueError, "SaturationCheck: sigmoid_limit must be > 0.0"),
        ({"tanh_limit": "2"}, TypeError, "SaturationCheck: tanh_limit must be a number"),
        ({"every": 0}, ValueError, "SaturationCheck: every must be an int >= 1, got 0"),
    ],
)
def test_bad_arguments(kwargs, error, match) -> None:
    with pytest.raises(error, match=match):
        sg.SaturationCheck(**kwargs)


def test_registered_as_a_default_monitor() -> None:
    assert "SaturationCheck" in [type(h).__name__ for h in sg.default_hooks()]
    assert isinstance(sg.create("saturation", threshold=0.6), sg.SaturationCheck)
