"""CapacityCheck: structural limits are named once, and the diagnosis names them only with a stall."""

from __future__ import annotations

import io
import math

import pytest
import torch
import torch.nn.functional as F
from tiny_runs import classification, kinds, mlp, small_cnn, train, xor
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


class HeadNet(nn.Module):
    """A custom model: a ReLU body, then a Sequential head with a hidden layer of ``width`` units."""

    def __init__(self, width: int, d_in: int = 16, classes: int = 4) -> None:
        super().__init__()
        self.body = nn.Linear(d_in, 64)
        self.head = nn.Sequential(nn.Linear(64, width), nn.ReLU(), nn.Linear(width, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.body(x)))


def test_one_unit_head_inside_a_custom_model_is_named_while_the_loss_still_creeps_down() -> None:
    data = classification()
    torch.manual_seed(0)
    narrow = HeadNet(1)
    guard, loss = train(narrow, torch.optim.Adam(narrow.parameters(), lr=1e-2), 300, data)
    torch.manual_seed(0)
    wide = HeadNet(32)
    twin, twin_loss = train(wide, torch.optim.Adam(wide.parameters(), lr=1e-2), 300, data)
    assert loss > 3 * twin_loss  # the fault truly shows: the same model with 32 units fits far better
    events = kinds(guard, "capacity_limited")
    assert [(e.data["reason"], e.data["layers"], e.data["widths"], e.data["outputs"]) for e in events] == [
        ("bottleneck", ("head.0",), (1,), 4)
    ]
    assert events[0].severity == sg.Severity.WARNING  # one unit before 4 outputs: a defect on its own
    assert events[0].data["activations"] == ("head.1",)
    assert guard.diagnose()[0].cause == "insufficient_capacity"
    assert kinds(twin, "capacity_limited") == []
    assert twin.diagnose() == []


def test_a_dead_bottleneck_unit_is_put_down_to_the_bottleneck() -> None:
    torch.manual_seed(0)
    model = HeadNet(1)
    with torch.no_grad():
        model.head[0].bias.fill_(-20.0)  # the one unit never fires: nothing reaches the classifier
    guard, loss = train(model, torch.optim.Adam(model.parameters(), lr=1e-2), 400, classification())
    assert abs(loss - math.log(4)) < 0.1  # stuck at chance
    assert [e.data["layers"] for e in kinds(guard, "dead_units")] == [("head.1",)]
    ranked = guard.diagnose()
    causes = [d.cause for d in ranked]
    assert causes[0] == "insufficient_capacity"
    assert causes.index("dying_relu") > 0
    assert any("bottleneck" in line for line in ranked[causes.index("dying_relu")].evidence)


def test_dead_units_beyond_the_bottleneck_keep_their_own_rank() -> None:
    def ev(kind: str, step: int, **data: object) -> sg.Event:
        return sg.Event(kind=kind, severity="warning", message=kind, step=step, data=data)

    bottleneck = ev("capacity_limited", 0, reason="bottleneck", widths=(1,), outputs=10, activations=("head.1",))
    plateau = ev("plateau", 200)
    dead_in = ev("dead_units", 50, layers=("head.1",), max_fraction=1.0)
    dead_out = ev("dead_units", 50, layers=("body.1", "head.1"), max_fraction=1.0)
    inside = sg.diagnose([bottleneck, dead_in, plateau])
    assert [d.cause for d in inside][:2] == ["insufficient_capacity", "dying_relu"]
    elsewhere = sg.diagnose([bottleneck, dead_out, plateau])
    dying = next(d for d in elsewhere if d.cause == "dying_relu")
    assert not any("bottleneck" in line for line in dying.evidence)


class Regressor(nn.Module):
    """A custom model with a regression head ending in one unit, squeezed to a batch of scalars."""

    def __init__(self, squeeze: bool) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Linear(16, 64), nn.ReLU())
        self.head = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 1))
        self.squeeze = squeeze

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.head(self.features(x))
        return out.squeeze(-1) if self.squeeze else out


@pytest.mark.parametrize("squeeze", [True, False])
def test_healthy_custom_regressor_with_a_one_unit_output_is_quiet(squeeze: bool) -> None:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(512, 16, generator=g)
    y = torch.sin(x[:, 0]) + x[:, 1] * x[:, 2]
    y = y if squeeze else y[:, None]
    torch.manual_seed(0)
    model = Regressor(squeeze)
    guard, loss = train(model, torch.optim.Adam(model.parameters(), lr=3e-3), 300, (x, y), loss_fn=F.mse_loss)
    assert loss < 0.2 * float(y.var())
    hook = next(h for h in guard.hooks if isinstance(h, sg.CapacityCheck))
    assert hook._heads == ["head"] and hook.outputs == 1  # the head was found; a 1-D output is 1 wide
    assert kinds(guard, "capacity_limited") == []
    assert guard.diagnose() == []


def test_only_sequentials_that_feed_the_output_are_read() -> None:
    class Gated(nn.Module):
        """A squeeze-and-excitation style gate with one hidden unit: not on the path to the output's width."""

        def __init__(self) -> None:
            super().__init__()
            self.gate = nn.Sequential(nn.Linear(16, 1), nn.ReLU(), nn.Linear(1, 16), nn.Sigmoid())
            self.head = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(x * self.gate(x))

    class Reshaped(HeadNet):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x).view(-1, 4)  # a new tensor: found by its size

    class Stacked(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.head = nn.Sequential(nn.Linear(16, 32), nn.Dropout(0.1), nn.Linear(32, 4))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(F.relu(x))

    x = torch.randn(8, 16)
    assert reasons(Gated(), x) == []
    assert reasons(Reshaped(1), x) == [("bottleneck", ("head.0",))]
    assert reasons(Stacked(), x) == [("stacked_linear", ("head.0", "head.2"))]
    # Custom blocks inside a Sequential: the chain after the last of them is still known.
    tail = nn.Sequential(HeadNet(32), nn.ReLU(), nn.Linear(4, 1), nn.ReLU(), nn.Linear(1, 8))
    assert reasons(tail, x) == [("bottleneck", ("2",))]
