"""DeadReLUCounter on small real training runs: dying layers are found, healthy ones stay quiet."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import stallguard as sg
from stallguard.hooks.dead_relu import can_die


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(1)


def mlp(d_in: int = 8, hidden: int = 32) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 1))


def regression(n: int = 64, d: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(n, d)
    return x, x.sum(1, keepdim=True) + 0.1 * torch.randn(n, 1)


def train(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    steps: int,
    data: Callable[[], tuple[torch.Tensor, torch.Tensor]] = regression,
    *,
    accumulate: int = 1,
    before_forward: Callable[[int], None] | None = None,
) -> None:
    for step in range(1, steps + 1):
        opt.zero_grad()
        for _ in range(accumulate):
            if before_forward is not None:
                before_forward(step)
            x, y = data()
            F.mse_loss(model(x), y).backward()
        opt.step()


def kinds(guard: sg.Guard, kind: str) -> list[sg.Event]:
    return [e for e in guard.events if e.kind == kind]


def split_units() -> nn.Sequential:
    """Linear(1, 2) + ReLU: unit 0 fires for x > 0 only, unit 1 for x < 0 only."""
    model = nn.Sequential(nn.Linear(1, 2), nn.ReLU(), nn.Linear(2, 1))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0], [-1.0]]))
        model[0].bias.zero_()
    return model


def positive(n: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.rand(n, 1) + 0.1, torch.zeros(n, 1)


def negative(n: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    return -torch.rand(n, 1) - 0.1, torch.zeros(n, 1)


# --------------------------------------------------------------------------- detection


def test_layer_with_very_negative_biases_is_all_dead_with_default_settings() -> None:
    model = mlp()
    with torch.no_grad():
        model[2].bias.fill_(-100.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    counter = sg.DeadReLUCounter()
    guard = sg.Guard(model, opt, hooks=[counter], sinks=[], strict=True)  # check_every=50: one window
    train(model, opt, 50)
    assert counter.dead_fractions["3"] > 0.95
    assert counter.dead_fractions["1"] < 0.05
    [event] = kinds(guard, "dead_units")
    assert event.severity == sg.Severity.WARNING
    assert event.causes == ("dying_relu",)
    assert event.step == 50
    assert list(event.data["layers"]) == ["3"]
    assert event.data["fractions"]["3"] == counter.dead_fractions["3"]
    assert event.data["units"]["3"] == 32 and event.data["dead"]["3"] > 30
    assert event.data["samples"]["3"] == 5 * 64  # 5 sampled batches of 64 samples
    assert list(event.data["steps"]) == [10, 50]
    assert "3 100%" in event.message or "3 9" in event.message
    guard.close()


def test_healthy_mlp_is_quiet() -> None:
    model = mlp(hidden=64)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    counter = sg.DeadReLUCounter()
    guard = sg.Guard(model, opt, hooks=[counter], sinks=[], strict=True)
    train(model, opt, 200)
    guard.close()
    reports = kinds(guard, "dead_fraction")
    assert len(reports) == 4  # one window per 50 steps
    assert all(f < 0.05 for e in reports for f in e.data["fractions"].values())
    assert set(counter.dead_fractions) == {"1", "3"}
    assert not kinds(guard, "dead_units")


def test_healthy_cnn_is_quiet_and_counts_channels() -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 8 * 8, 1),
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    counter = sg.DeadReLUCounter(every=2, window=3)
    guard = sg.Guard(model, opt, hooks=[counter], sinks=[], check_every=6, strict=True)
    train(model, opt, 12, lambda: (torch.randn(8, 3, 8, 8), torch.randn(8, 1)))
    guard.close()
    assert counter.dead_fractions == {"1": 0.0, "3": 0.0}
    [first, _] = kinds(guard, "dead_fraction")
    assert first.data["units"] == {"1": 8, "3": 8}  # channels, not channel x position
    assert first.data["samples"]["1"] == 3 * 8 * 8 * 8  # 3 batches x 8 images x 8x8 positions
    assert not kinds(guard, "dead_units")


def test_dead_channel_counts_as_one_unit() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(1))
    model(torch.randn(1, 3, 6, 6))
    with torch.no_grad():
        model[0].bias[2] = -100.0
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    counter = sg.DeadReLUCounter(every=1, window=2)
    sg.Guard(model, opt, hooks=[counter], sinks=[], check_every=2, strict=True)
    train(model, opt, 2, lambda: (torch.randn(4, 3, 6, 6), torch.randn(4, 1)))
    assert counter.dead_fractions == {"1": 1 / 8}


@pytest.mark.parametrize(("unit_dim", "expected"), [(None, 1 / 6), (-1, 1 / 6), (1, 0.0)])
def test_units_of_sequence_outputs_are_the_last_dim(unit_dim: int | None, expected: float) -> None:
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 1))
    with torch.no_grad():
        model[0].bias[5] = -100.0
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    counter = sg.DeadReLUCounter(every=1, window=2, unit_dim=unit_dim)
    sg.Guard(model, opt, hooks=[counter], sinks=[], check_every=2, strict=True)
    train(model, opt, 2, lambda: (torch.randn(3, 5, 4), torch.randn(3, 5, 1)))  # (N, L, D)
    assert counter.dead_fractions == {"1": pytest.approx(expected)}


def test_conv1d_needs_unit_dim_one() -> None:
    model = nn.Sequential(nn.Conv1d(2, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6, 1))
    with torch.no_grad():
        model[0].bias[0] = -100.0
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    counter = sg.DeadReLUCounter(every=1, window=1, unit_dim=1)
    sg.Guard(model, opt, hooks=[counter], sinks=[], check_every=1, strict=True)
    train(model, opt, 1, lambda: (torch.randn(5, 2, 8), torch.randn(5, 1)))
    assert counter.dead_fractions == {"1": 0.25}


def test_too_high_learning_rate_kills_units_and_is_reported() -> None:
    model = mlp(hidden=64)
    opt = torch.optim.SGD(model.parameters(), lr=1.0, momentum=0.9)
    counter = sg.DeadReLUCounter()
    guard = sg.Guard(model, opt, hooks=[counter], sinks=[], strict=True)
    train(model, opt, 100)
    guard.close()
    [event] = kinds(guard, "dead_units")
    assert event.data["max_fraction"] > 0.9


def test_warning_is_emitted_when_a_layer_newly_crosses_the_threshold() -> None:
    model = mlp()
    with torch.no_grad():
        model[2].bias.fill_(-100.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    counter = sg.DeadReLUCounter(every=1, window=2)
    guard = sg.Guard(model, opt, hooks=[counter], sinks=[], check_every=2, strict=True)
    train(model, opt, 6)
    assert len(kinds(guard, "dead_fraction")) == 3
    assert len(kinds(guard, "dead_units")) == 1  # the same layer stays dead: no repeat
    with torch.no_grad():
        model[0].bias.fill_(-100.0)  # now the first layer dies too
    train(model, opt, 2)
    second = kinds(guard, "dead_units")[-1]
    assert list(second.data["new_layers"]) == ["1"]
    assert sorted(second.data["layers"]) == ["1", "3"]
    guard.close()


# --------------------------------------------------------------------------- when and what is counted


def test_hooks_exist_only_on_sampled_steps_of_an_open_window() -> None:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    counter = sg.DeadReLUCounter(every=2, window=2)
    guard = sg.Guard(model, opt, hooks=[counter], sinks=[], check_every=8, strict=True)
    hooked: list[int] = []

    def look(step: int) -> None:
        n = len(model[1]._forward_hooks)
        assert n == len(model[3]._forward_hooks) == len(model._forward_hooks)
        if n:
            hooked.append(step)

    train(model, opt, 16, before_forward=look)
    # Sampled steps are 2, 4, 6, ...; the window is full after 2 and 4 and stays closed until the
    # check at step 8 reads it.
    assert hooked == [2, 4, 10, 12]
    assert all(not m._forward_hooks for m in model.modules())  # between steps: nothing hooked
    guard.close()


def test_no_handles_are_left_after_close() -> None:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    guard = sg.Guard(model, opt, hooks=[sg.DeadReLUCounter(every=1)], sinks=[], strict=True)
    assert len(model[1]._forward_hooks) == 1  # step 1 is sampled: registered at attach
    guard.close()
    assert all(not m._forward_hooks for m in model.modules())
    persistent = sg.DeadReLUCounter(persistent=True)
    guard = sg.Guard(model, opt, hooks=[persistent], sinks=[], strict=True)
    assert persistent.is_persistent and len(model[3]._forward_hooks) == 1
    train(model, opt, 3)
    guard.close()
    assert all(not m._forward_hooks for m in model.modules())


def test_eval_forwards_are_not_counted() -> None:
    model = split_units()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    counter = sg.DeadReLUCounter(every=1, window=2)
    sg.Guard(model, opt, hooks=[counter], sinks=[], check_every=2, strict=True)
    for _ in range(2):
        model.eval()
        model(negative()[0])  # would make unit 1 fire
        model.train()
        x, y = positive()
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        opt.step()
    assert counter.dead_fractions == {"1": 0.5}


@pytest.mark.parametrize("through_root", [True, False])
def test_gradient_accumulation_counts_every_micro_batch(through_root: bool) -> None:
    model = split_units()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    counter = sg.DeadReLUCounter(every=1, window=2)
    sg.Guard(model, opt, hooks=[counter], sinks=[], check_every=2, strict=True)
    for _ in range(2):
        opt.zero_grad()
        for x, y in (positive(), negative()):  # unit 0 fires only in the first, unit 1 only in the second
            out = model(x) if through_root else model[2](model[1](model[0](x)))
            F.mse_loss(out, y).backward()
        opt.step()
    assert counter.dead_fractions == {"1": 0.0}
    assert counter.sites == [["1", 0, 2]]


def test_reused_activation_module_is_watched_per_call_place() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.fc2, self.out = nn.Linear(4, 8), nn.Linear(8, 6), nn.Linear(6, 1)
            self.relu = nn.ReLU()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.out(self.relu(self.fc2(self.relu(self.fc1(x)))))

    model = Net()
    with torch.no_grad():
        model.fc1.bias.fill_(-100.0)  # the first call place dies
        model.fc2.bias.fill_(1.0)  # the second sees only zeros, and its positive biases keep it alive
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    counter = sg.DeadReLUCounter(every=1, window=2)
    sg.Guard(model, opt, hooks=[counter], sinks=[], check_every=2, strict=True)
    train(model, opt, 2, lambda: regression(16, 4), accumulate=2)
    assert counter.layers == ["relu"]
    assert counter.dead_fractions == {"relu": 1.0, "relu#2": 0.0}
    assert [s[:2] for s in counter.sites] == [["relu", 0], ["relu", 1]]


def test_functional_relu_is_invisible_and_activation_probe_exposes_it() -> None:
    class Net(nn.Module):
        def __init__(self, probe: bool) -> None:
            super().__init__()
            self.fc, self.out = nn.Linear(4, 8), nn.Linear(8, 1)
            self.act = sg.ActivationProbe() if probe else nn.Identity()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.out(self.act(F.relu(self.fc(x))))

    blind = Net(probe=False)
    counter = sg.DeadReLUCounter(every=1, window=1)
    opt = torch.optim.SGD(blind.parameters(), lr=0.0)
    guard = sg.Guard(blind, opt, hooks=[counter], sinks=[], check_every=1, strict=True)
    [event] = kinds(guard, "activations_unseen")
    assert event.data["reason"] == "no_modules" and "ActivationProbe" in event.message
    guard.close()

    model = Net(probe=True)
    with torch.no_grad():
        model.fc.bias[:4] = -100.0
    counter = sg.DeadReLUCounter(every=1, window=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    guard = sg.Guard(model, opt, hooks=[counter], sinks=[], check_every=1, strict=True)
    train(model, opt, 1, lambda: regression(16, 4))
    assert counter.dead_fractions == {"act": 0.5}
    assert not kinds(guard, "activations_unseen")


def test_activation_types() -> None:
    dying = (nn.ReLU(), nn.ReLU6(), nn.Hardswish(), nn.Threshold(0.0, 0.0), sg.ActivationProbe())
    assert all(can_die(m) for m in dying)
    assert can_die(nn.Hardtanh(0.0, 1.0)) and not can_die(nn.Hardtanh())
    assert not can_die(nn.Threshold(-1.0, 0.0))
    never = (nn.LeakyReLU(), nn.PReLU(), nn.RReLU(), nn.ELU(), nn.SELU(), nn.GELU(), nn.SiLU(), nn.Softplus())
    assert not any(can_die(m) for m in never)
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU6(), nn.LeakyReLU(), nn.Hardswish(), nn.GELU())
    guard = sg.Guard(model, None, hooks=[counter := sg.DeadReLUCounter()], sinks=[])
    assert counter.layers == ["1", "3"]
    guard.close()


def test_modules_by_object_and_name() -> None:
    model = mlp()
    counter = sg.DeadReLUCounter(modules=["module.3", model[3], model[1]])  # DDP-style prefix is stripped
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    guard = sg.Guard(model, opt, hooks=[counter], sinks=[], strict=True)
    assert counter.layers == ["3", "1"]
    config = guard.to_config()
    [entry] = [h for h in config["hooks"] if h["hook"] == "dead_relu"]
    assert entry["modules"] == ["module.3", "3", "1"]
    guard.close()
    rebuilt = sg.Guard.from_config(model, opt, {**config, "sinks": []})
    assert rebuilt.hooks[0].layers == ["3", "1"]
    rebuilt.close()


def test_wrong_unit_dim_is_reported_not_raised() -> None:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    counter = sg.DeadReLUCounter(modules=[model[1]], every=1, window=1, unit_dim=3)
    guard = sg.Guard(model, opt, hooks=[counter], sinks=[], check_every=1, strict=True)
    train(model, opt, 1)
    [event] = kinds(guard, "activations_unseen")
    assert event.data["reason"] == "no_outputs"
    assert counter.dead_fractions == {}
    guard.close()


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("kwargs", "error", "text"),
    [
        ({"threshold": 1.0}, ValueError, "threshold"),
        ({"threshold": -0.1}, ValueError, "threshold"),
        ({"threshold": "high"}, TypeError, "threshold"),
        ({"window": 0}, ValueError, "window"),
        ({"window": 2.5}, TypeError, "window"),
        ({"every": 0}, ValueError, "every"),
        ({"unit_dim": "last"}, TypeError, "unit_dim"),
        ({"persistent": "yes"}, TypeError, "persistent"),
        ({"modules": nn.ReLU()}, TypeError, "wrap a single one in a list"),
        ({"modules": "1"}, TypeError, "wrap a single one in a list"),
        ({"modules": []}, ValueError, "must not be empty"),
        ({"modules": [3]}, TypeError, "modules[0]"),
        ({"modules": 3}, TypeError, "iterable"),
        ({"modules": [nn.LeakyReLU()]}, ValueError, "cannot die"),
    ],
)
def test_invalid_parameters_are_refused_clearly(kwargs: dict, error: type, text: str) -> None:
    with pytest.raises(error, match=__import__("re").escape(text)):
        sg.DeadReLUCounter(**kwargs)


def test_modules_must_belong_to_the_model() -> None:
    model = mlp()
    model.add_module("leaky", nn.LeakyReLU())
    cases = [
        (["fc9"], "'fc9', which is not a submodule"),
        ([nn.ReLU()], "not a submodule"),
        (["leaky"], "'leaky' (LeakyReLU), whose gradient is never exactly zero"),
    ]
    for modules, text in cases:
        with pytest.raises(ValueError, match=__import__("re").escape(text)):
            sg.Guard(model, None, hooks=[sg.DeadReLUCounter(modules=modules)], sinks=[], strict=True)
    guard = sg.Guard(None, None, hooks=[sg.DeadReLUCounter(modules=["1"])], sinks=[])  # not strict: disabled
    assert "needs a Guard with a model" in kinds(guard, "hook_error")[0].message


# --------------------------------------------------------------------------- robustness and cost


def test_a_failing_forward_hook_never_breaks_training() -> None:
    class Broken(sg.DeadReLUCounter):
        def _record(self, module_name: str, output: object) -> None:
            raise RuntimeError("boom")

    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    guard = sg.Guard(model, opt, hooks=[Broken(every=1)], sinks=[])
    train(model, opt, 3)  # the forward pass itself is unaffected
    [event] = kinds(guard, "hook_error")
    assert "boom" in event.message and not guard.hooks[0].enabled
    assert all(not m._forward_hooks for m in model.modules())
    guard.close()
    strict = sg.Guard(model, opt, hooks=[Broken(every=1)], sinks=[], strict=True)
    with pytest.raises(RuntimeError, match="boom"):
        train(model, opt, 1)
    strict.close()


def test_no_host_sync_on_steps_without_a_check() -> None:
    from torch.profiler import ProfilerActivity, profile

    def syncs(prof: profile) -> int:
        return sum(e.count for e in prof.key_averages() if e.key in ("aten::item", "aten::_local_scalar_dense"))

    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    counter = sg.DeadReLUCounter(every=2, window=1000)
    guard = sg.Guard(model, opt, hooks=[counter], sinks=[], check_every=1000, strict=True)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        train(model, opt, 10, accumulate=2)  # 5 sampled steps, none a check point
    assert counter.window_batches == 5 and counter.sites  # the counting did run
    assert syncs(prof) == 0
    with profile(activities=[ProfilerActivity.CPU]) as control:
        model(torch.randn(2, 8)).sum().item()
    assert syncs(control) > 0  # the audit can see a sync when there is one
    guard.close()


def test_masks_are_declared_for_a_cross_rank_or() -> None:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    counter = sg.DeadReLUCounter(every=1)
    guard = sg.Guard(model, opt, hooks=[counter], sinks=[], strict=True)
    train(model, opt, 1)
    synced = dict(counter._synced_states())
    assert synced == {"alive_0": "any", "samples_0": "sum", "alive_1": "any", "samples_1": "sum"}
    assert counter.alive_0.dtype == torch.bool and counter.alive_0.shape == (32,)
    assert not list(model.buffers())  # nothing lives in module buffers (DDP would overwrite them)
    guard.close()


def test_default_monitor_and_registry() -> None:
    assert type(sg.create("dead_relu", threshold=0.7)) is sg.DeadReLUCounter
    assert any(isinstance(h, sg.DeadReLUCounter) for h in sg.default_hooks())
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    guard = sg.Guard(model, opt, sinks=[])
    counter = guard.hook("dead_relu")
    assert isinstance(counter, sg.DeadReLUCounter) and counter.layers == ["1", "3"]
    guard.close()


# --------------------------------------------------------------------------- state


def test_state_dict_round_trip_resumes_mid_window(tmp_path) -> None:
    def build() -> tuple[nn.Module, torch.optim.Optimizer, sg.DeadReLUCounter, sg.Guard]:
        torch.manual_seed(1)
        model = split_units()
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        counter = sg.DeadReLUCounter(every=1, window=4)
        guard = sg.Guard(model, opt, hooks=[counter], sinks=[], check_every=4, strict=True)
        return model, opt, counter, guard

    model, opt, counter, guard = build()
    train(model, opt, 2, positive)  # unit 0 fired, unit 1 not yet
    path = tmp_path / "guard.pt"
    torch.save(guard.state_dict(), path)
    state = torch.load(path, weights_only=True)
    assert state["hooks"]["DeadReLUCounter"]["window_batches"] == 2
    assert state["hooks"]["DeadReLUCounter"]["alive_0"].tolist() == [True, False]

    model2, opt2, counter2, guard2 = build()
    guard2.load_state_dict(state)
    assert counter2.sites == counter.sites and counter2.window_batches == 2
    assert torch.equal(counter2.alive_0, counter.alive_0)
    for m, o in ((model, opt), (model2, opt2)):
        train(m, o, 2, positive)  # the window ends at step 4 in both runs
    assert counter.dead_fractions == counter2.dead_fractions == {"1": 0.5}
    assert counter2.state_dict().keys() == counter.state_dict().keys()

    fresh = sg.DeadReLUCounter(every=1, window=4)  # not attached yet: the masks are declared on load
    fresh.load_state_dict(state["hooks"]["DeadReLUCounter"])
    assert fresh.sites == [["1", 0, 2]] and fresh.alive_0.tolist() == [True, False]
    other = sg.DeadReLUCounter()
    other.load_state_dict({**counter.state_dict(), "sites": [["fc", 0, 7]]})
    with pytest.raises(ValueError, match="do not match"):
        other.load_state_dict(counter.state_dict())
    guard.close()
    guard2.close()


# --------------------------------------------------------------------------- torch.compile


def _graph_breaks() -> int:
    from torch._dynamo.utils import counters

    return sum(counters["graph_break"].values())


def _dead_net() -> nn.Sequential:
    model = mlp()
    with torch.no_grad():
        model[2].bias.fill_(-100.0)
    return model


@pytest.mark.slow
def test_compiled_model_reports_dead_units_without_graph_breaks() -> None:
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    plain = torch.compile(_dead_net(), backend="aot_eager")
    opt = torch.optim.SGD(plain.parameters(), lr=0.01)
    train(plain, opt, 4)
    breaks_without = _graph_breaks()

    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(_dead_net(), backend="aot_eager")
    opt = torch.optim.SGD(compiled.parameters(), lr=0.01)
    counter = sg.DeadReLUCounter(every=2, window=2)
    guard = sg.Guard(compiled, opt, hooks=[counter], sinks=[], check_every=4, strict=True)
    assert counter.is_persistent
    train(compiled, opt, 8, accumulate=2)
    assert _graph_breaks() == breaks_without
    assert counters["stats"]["unique_graphs"] <= 2  # counting on and off
    assert counter.dead_fractions["3"] > 0.95 and counter.dead_fractions["1"] < 0.05
    assert kinds(guard, "dead_units")
    guard.close()
    assert all(not m._forward_hooks for m in compiled.modules())
    torch._dynamo.reset()


@pytest.mark.slow
def test_compiling_after_attach_without_persistent_is_reported() -> None:
    import torch._dynamo

    torch._dynamo.reset()
    model = _dead_net()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    counter = sg.DeadReLUCounter(every=2, window=2)
    guard = sg.Guard(model, opt, hooks=[counter], sinks=[], check_every=4, strict=True)
    compiled = torch.compile(model, backend="aot_eager")  # first compiled call at step 1, before any hook
    train(compiled, opt, 4)
    [event] = kinds(guard, "activations_unseen")
    assert event.data["reason"] == "no_outputs" and "persistent=True" in event.message
    guard.close()

    torch._dynamo.reset()
    model = _dead_net()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    counter = sg.DeadReLUCounter(every=2, window=2, persistent=True)
    guard = sg.Guard(model, opt, hooks=[counter], sinks=[], check_every=4, strict=True)
    compiled = torch.compile(model, backend="aot_eager")
    train(compiled, opt, 4)
    assert counter.dead_fractions["3"] > 0.95
    guard.close()
    torch._dynamo.reset()
