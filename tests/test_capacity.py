"""CapacityCheck: structural limits are named once, and the diagnosis names them only with a stall."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F
from tiny_runs import kinds, mlp, small_cnn, train, xor
from torch import nn

import stallguard as sg


def reasons(model: nn.Module, x: torch.Tensor, **kwargs: float) -> list[tuple[str, tuple[str, ...]]]:
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    guard = sg.Guard(model, opt, hooks=[sg.CapacityCheck(**kwargs)], sinks=[])
    model(x).sum().backward()
    opt.step()
    found = [(e.data["reason"], e.data["layers"]) for e in kinds(guard, "capacity_limited")]
    guard.close()
    return found


def test_linear_model_on_xor_is_insufficient_capacity_first() -> None:
    model = nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    guard, loss = train(model, opt, 300, xor(), loss_fn=F.binary_cross_entropy_with_logits, batch=None)
    assert abs(loss - 0.693) < 0.01  # stuck at chance
    events = kinds(guard, "capacity_limited")
    assert [e.data["reason"] for e in events] == ["linear_model", "few_parameters"]
    assert events[0].severity == sg.Severity.INFO
    assert events[0].causes == ("insufficient_capacity",)
    assert events[0].data["layers"] == ("(model)",)
    assert guard.diagnose()[0].cause == "insufficient_capacity"


def test_the_same_xor_with_a_hidden_layer_learns_and_is_quiet() -> None:
    model = nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    guard, loss = train(model, opt, 300, xor(), loss_fn=F.binary_cross_entropy_with_logits, batch=None)
    assert loss < 0.1
    assert kinds(guard, "capacity_limited") == []
    assert guard.diagnose() == []


def test_stacked_linear_layers_without_activation() -> None:
    x = torch.randn(4, 16)
    model = nn.Sequential(nn.Linear(16, 32), nn.Dropout(0.1), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
    assert reasons(model, x) == [("stacked_linear", ("0", "2"))]
    assert reasons(nn.Sequential(nn.Linear(16, 32), nn.Linear(32, 4)), x)[0] == ("linear_model", ("0", "1"))


def test_two_unit_bottleneck_on_ten_classes() -> None:
    x = torch.randn(4, 20)
    model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 2), nn.ReLU(), nn.Linear(2, 10))
    found = reasons(model, x)
    assert found == [("bottleneck", ("2",))]


def test_bottleneck_is_named_only_once_the_loss_stalls() -> None:
    # Ten independent outputs through two units: at best 2 of 10 directions are reconstructed.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 10, generator=g)
    model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 2), nn.ReLU(), nn.Linear(2, 10))
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    guard, loss = train(model, opt, 200, (x, x), batch=None, loss_fn=F.mse_loss)
    assert loss > 0.7
    events = kinds(guard, "capacity_limited")
    assert [(e.data["reason"], e.data["layers"], e.data["outputs"]) for e in events] == [("bottleneck", ("2",), 10)]
    # Still creeping down: no stall yet, so no diagnosis; a plateau makes it the answer.
    assert "insufficient_capacity" not in [d.cause for d in guard.diagnose()]
    plateau = sg.Event(kind="plateau", severity="warning", message="flat", step=300, causes=())
    assert sg.diagnose([*guard.events, plateau])[0].cause == "insufficient_capacity"


@pytest.mark.parametrize(
    "model",
    [
        lambda: mlp(),
        lambda: small_cnn(),
        lambda: nn.Sequential(nn.Linear(16, 32), nn.LayerNorm(32), nn.GELU(), nn.Linear(32, 4)),
    ],
)
def test_usual_models_are_quiet(model) -> None:
    assert reasons(model(), torch.randn(4, 16)) == []


def test_custom_forward_only_checks_the_parameter_count() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(16, 2)
            self.b = nn.Linear(2, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(F.relu(self.a(x)))  # a functional activation: invisible to module hooks

    assert reasons(Net(), torch.randn(4, 16)) == []
    assert reasons(Net(), torch.randn(4, 16), min_params_per_output=100) == [("few_parameters", ())]


def test_reported_once_and_round_trip() -> None:
    model = nn.Sequential(nn.Linear(2, 8), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    hook = sg.CapacityCheck()
    guard, _ = train(model, opt, 5, xor(), hooks=[hook], loss_fn=F.binary_cross_entropy_with_logits)
    assert len(kinds(guard, "capacity_limited")) == 1
    buf = io.BytesIO()
    torch.save(hook.state_dict(), buf)
    buf.seek(0)
    fresh = sg.CapacityCheck()
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    assert fresh.checked and fresh.outputs == 1 and fresh.reasons == ["linear_model"]
    guard, _ = train(model, opt, 5, xor(), hooks=[fresh], loss_fn=F.binary_cross_entropy_with_logits)
    assert kinds(guard, "capacity_limited") == []  # a resumed run does not report again


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"min_params_per_output": -1}, ValueError, "CapacityCheck: min_params_per_output must be >= 0.0, got -1"),
        ({"min_params_per_output": "x"}, TypeError, "CapacityCheck: min_params_per_output must be a number"),
    ],
)
def test_bad_arguments(kwargs, error, match) -> None:
    with pytest.raises(error, match=match):
        sg.CapacityCheck(**kwargs)


def test_registered_as_a_default_monitor() -> None:
    assert "CapacityCheck" in [type(h).__name__ for h in sg.default_hooks()]
    assert isinstance(sg.create("capacity"), sg.CapacityCheck)
