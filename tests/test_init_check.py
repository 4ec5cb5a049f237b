"""InitCheck on small real models: bad starts are named, healthy inits stay quiet."""

from __future__ import annotations

import pytest
import torch
from tiny_runs import classification, kinds, mlp, train
from torch import nn

import stallguard as sg


def check(model: nn.Module, **kwargs: float) -> tuple[sg.Guard, list[sg.Event]]:
    guard = sg.Guard(model, None, hooks=[sg.InitCheck(**kwargs)], sinks=[])
    return guard, kinds(guard, "bad_init")


def test_zero_init_is_all_zero_and_ranked_first_after_a_stall() -> None:
    model = mlp()
    for p in model.parameters():
        nn.init.zeros_(p)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    guard, _ = train(model, opt, 200, classification())
    events = kinds(guard, "bad_init")
    assert len(events) == 1
    assert events[0].data["problems"] == ("all_zero",)
    assert events[0].data["layers"] == ("0.weight", "2.weight", "4.weight")
    assert events[0].data["stage"] == "attach"
    assert events[0].causes == ("bad_init",)
    assert kinds(guard, "plateau")  # the run stalled
    assert guard.diagnose()[0].cause == "bad_init"


def test_constant_init_is_constant_and_symmetric() -> None:
    model = mlp()
    for p in model.parameters():
        nn.init.constant_(p, 0.1)
    _, events = check(model)
    assert events[0].data["problems"] == ("constant", "symmetric")


def test_identical_rows_are_symmetric() -> None:
    model = mlp()
    with torch.no_grad():
        model[2].weight.copy_(model[2].weight[0].expand_as(model[2].weight))
    _, events = check(model)
    assert events[0].data["problems"] == ("symmetric",)
    assert events[0].data["layers"] == ("2.weight",)


def test_identical_conv_filters_are_symmetric() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.Flatten(), nn.LazyLinear(2))
    with torch.no_grad():
        model[0].weight.copy_(model[0].weight[:1].expand_as(model[0].weight))
    _, events = check(model)
    assert events[0].data["layers"] == ("0.weight",)
    assert "symmetric" in events[0].data["problems"]


def test_weights_scaled_100x_are_scale_large() -> None:
    model = mlp()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(100.0)
    _, events = check(model)
    assert events[0].data["problems"] == ("scale_large",)
    assert len(events[0].data["layers"]) == 3
    assert events[0].data["details"]["0.weight"]["scale"] > 10


def test_tiny_hidden_weights_are_scale_small() -> None:
    model = mlp()
    with torch.no_grad():
        model[0].weight.mul_(1e-3)
    _, events = check(model)
    assert events[0].data["problems"] == ("scale_small",)
    assert events[0].data["layers"] == ("0.weight",)


@pytest.mark.parametrize(
    "init",
    [
        lambda w: None,  # torch's default
        nn.init.kaiming_normal_,
        nn.init.kaiming_uniform_,
        nn.init.xavier_uniform_,
        nn.init.xavier_normal_,
        nn.init.orthogonal_,
        lambda w: nn.init.normal_(w, std=0.02),
        lambda w: nn.init.trunc_normal_(w, std=0.02),
    ],
)
def test_usual_inits_are_quiet(init) -> None:
    model = nn.Sequential(nn.Linear(16, 256), nn.Tanh(), nn.Linear(256, 64), nn.ReLU(), nn.Linear(64, 4))
    for m in model:
        if isinstance(m, nn.Linear):
            init(m.weight)
            nn.init.zeros_(m.bias)
    assert check(model)[1] == []


def test_zero_output_layer_over_random_hidden_layers_is_quiet() -> None:
    model = mlp()
    nn.init.zeros_(model[4].weight)
    nn.init.zeros_(model[4].bias)
    assert check(model)[1] == []


def test_embeddings_norms_and_biases_are_left_out() -> None:
    model = nn.Sequential(nn.Embedding(50, 16), nn.LayerNorm(16), nn.Linear(16, 8))
    nn.init.zeros_(model[2].bias)
    nn.init.constant_(model[1].weight, 1.0)
    assert check(model)[1] == []


def test_lazy_module_is_checked_at_the_first_step() -> None:
    model = nn.Sequential(nn.LazyLinear(8), nn.ReLU(), nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = sg.Guard(model, opt, hooks=[sg.InitCheck()], sinks=[])
    assert kinds(guard, "bad_init") == []
    out = model(torch.randn(4, 3))
    nn.init.zeros_(model[0].weight)
    out = model(torch.randn(4, 3))
    out.sum().backward()
    opt.step()
    assert kinds(guard, "bad_init") == []  # measured on the device at the step, read at the check point
    guard.check()
    events = kinds(guard, "bad_init")
    assert [(e.data["stage"], e.data["layers"], e.data["problems"]) for e in events] == [
        ("training", ("0.weight",), ("all_zero",))
    ]
    # Reported once: later steps measure nothing.
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    guard.check()
    assert len(kinds(guard, "bad_init")) == 1
    guard.close()


def test_state_dict_round_trip_keeps_what_was_reported() -> None:
    model = mlp()
    nn.init.zeros_(model[0].weight)
    hook = sg.InitCheck()
    guard = sg.Guard(model, None, hooks=[hook], sinks=[])
    state = torch.load(_save(hook.state_dict()), weights_only=True)
    guard.close()
    fresh = sg.InitCheck()
    fresh.load_state_dict(state)
    assert fresh.reported == [["0.weight", "all_zero"]]
    guard = sg.Guard(mlp(), None, hooks=[fresh], sinks=[])
    assert fresh.state_dict()["reported"] == [["0.weight", "all_zero"]]
    guard.close()


def _save(state: dict) -> object:
    import io

    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return buf


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"scale_high": 1.0}, ValueError, "InitCheck: scale_high must be > 1.0, got 1.0"),
        ({"scale_high": "big"}, TypeError, "InitCheck: scale_high must be a number"),
        ({"scale_low": 0.0}, ValueError, "InitCheck: scale_low must be > 0.0"),
        ({"scale_low": 1.0}, ValueError, "InitCheck: scale_low must be < 1.0"),
    ],
)
def test_bad_arguments(kwargs, error, match) -> None:
    with pytest.raises(error, match=match):
        sg.InitCheck(**kwargs)


def test_registered_as_a_default_monitor() -> None:
    assert "InitCheck" in [type(h).__name__ for h in sg.default_hooks()]
    assert isinstance(sg.create("init_check"), sg.InitCheck)


@pytest.mark.parametrize(
    "make",
    [
        lambda: nn.Transformer(
            d_model=32, nhead=4, num_encoder_layers=1, num_decoder_layers=1, dim_feedforward=64, batch_first=True
        ),
        lambda: nn.Sequential(nn.ConvTranspose2d(8, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3, groups=4)),
        lambda: nn.GRU(1, 256),
        lambda: nn.LSTM(300, 16, num_layers=2),
        lambda: nn.Bilinear(8, 8, 4),
        lambda: nn.Conv1d(3, 64, 7),
    ],
    ids=["transformer", "conv_transpose_depthwise", "gru_one_input", "lstm_wide_input", "bilinear", "conv1d"],
)
def test_torch_default_inits_of_usual_layers_are_quiet(make) -> None:
    assert check(make())[1] == []
