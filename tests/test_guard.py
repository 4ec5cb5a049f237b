"""The Guard on real training loops: step counting, lifecycle order, check points, detach, resume."""

from __future__ import annotations

import io
import logging

import pytest
import torch
import torch.nn.functional as F
from helpers import mlp, regression_data
from torch import nn

import stallguard as sg


class Recorder(sg.Hook):
    """A custom hook that records every lifecycle call and keeps a device-side loss sum."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.calls: list[tuple[str, int]] = []
        self.add_state("loss_sum", torch.zeros((), dtype=torch.float64), reduce="sum", reset=True)
        self.add_state("checks", 0)

    def on_attach(self, guard):
        self.calls.append(("attach", guard.step))

    def on_step_begin(self, step):
        self.calls.append(("begin", step))

    def on_before_step(self, ctx):
        assert all(g is not None for g in ctx.grads)
        self.calls.append(("before", ctx.step))

    def on_after_step(self, ctx):
        self.calls.append(("after", ctx.step))

    def on_observe(self, obs):
        if obs.loss is not None:
            self.loss_sum += torch.as_tensor(obs.loss, dtype=torch.float64)
        self.calls.append(("observe", obs.step))

    def on_check(self, check):
        self.checks += 1
        self.calls.append(("check", check.step))
        self.emit("loss_sum", "info", "sum of observed losses", value=check.values["loss_sum"])

    def on_close(self):
        self.calls.append(("close", -1))

    def count(self, kind: str) -> int:
        return sum(1 for k, _ in self.calls if k == kind)


def train(model, opt, guard, steps, x, y, micro=1, autocast=False):
    for _ in range(steps):
        for _ in range(micro):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                out = model(x)
                loss = F.mse_loss(out.float(), y)
            (loss / micro).backward()
            guard.observe(loss, inputs=x, outputs=out, targets=y)
        opt.step()
        opt.zero_grad()


def test_plain_loop_counts_steps_and_runs_lifecycle_in_order():
    x, y = regression_data()
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    rec = Recorder()
    guard = sg.Guard(model, opt, hooks=[rec], sinks=[], check_every=10, strict=True)
    train(model, opt, guard, 30, x, y)
    guard.close()
    assert guard.step == 30
    assert guard.optimizer_steps == [30]
    assert rec.count("before") == rec.count("after") == rec.count("observe") == 30
    assert rec.count("check") == 3  # steps 10, 20, 30; close() adds none when nothing is new
    assert rec.calls[:2] == [("attach", 0), ("begin", 1)]
    # Within one step: observe (step 0 completed), before (step 1), after (step 1), then step 2 begins.
    assert rec.calls[2:6] == [("observe", 0), ("before", 1), ("after", 1), ("begin", 2)]
    assert rec.calls[-1] == ("close", -1)
    # The device-side sum read at each check equals the host series of the same losses.
    sums = [e.data["value"] for e in guard.events if e.kind == "loss_sum"]
    losses = guard.series("loss").values
    assert sums == pytest.approx([losses[0:10].sum(), losses[10:20].sum(), losses[20:30].sum()], rel=1e-9)
    assert len(losses) == 30 and losses[-1] < losses[0]


def test_autocast_bf16_loop():
    x, y = regression_data()
    model = mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    rec = Recorder()
    guard = sg.Guard(model, opt, hooks=[rec], sinks=[], check_every=5, strict=True)
    train(model, opt, guard, 12, x, y, autocast=True)
    guard.close()
    assert guard.step == 12 and rec.count("before") == 12
    assert rec.count("check") == 3  # steps 5 and 10, then the final check at close for steps 11-12
    assert guard.series("loss").values[-1] < guard.series("loss").values[0]


def test_gradient_accumulation_counts_optimizer_steps_not_backward_calls():
    x, y = regression_data()
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    rec = Recorder()
    guard = sg.Guard(model, opt, hooks=[rec], sinks=[], check_every=5, strict=True)
    train(model, opt, guard, 10, x, y, micro=4)
    guard.close()
    assert guard.step == 10
    assert rec.count("before") == 10 and rec.count("observe") == 40
    # Four micro-batch losses per step are averaged into one value per optimizer step.
    assert len(guard.series("loss")) == 10


def test_two_optimizers_step_independently_and_the_first_is_the_clock():
    x, y = regression_data()
    enc, head = nn.Sequential(nn.Linear(8, 16), nn.Tanh()), nn.Linear(16, 1)
    model = nn.Sequential(enc, head)
    opt_a = torch.optim.SGD(enc.parameters(), lr=0.05)
    opt_b = torch.optim.Adam(head.parameters(), lr=1e-2)
    rec = Recorder()
    seen: list[tuple[int, int, list[str]]] = []

    class PerOptimizer(sg.Hook):
        def on_before_step(self, ctx):
            seen.append((ctx.optimizer_index, ctx.step, ctx.grad_names))

    guard = sg.Guard(model, [opt_a, opt_b], hooks=[rec, PerOptimizer()], sinks=[], check_every=4, strict=True)
    for _ in range(8):
        loss = F.mse_loss(model(x), y)
        loss.backward()
        guard.observe(loss)
        opt_a.step()
        opt_b.step()
        opt_a.zero_grad()
        opt_b.zero_grad()
    guard.close()
    assert guard.step == 8
    assert guard.optimizer_steps == [8, 8]
    assert rec.count("before") == 16
    assert seen[0] == (0, 1, ["0.0.weight", "0.0.bias"])
    assert seen[1] == (1, 2, ["1.weight", "1.bias"])  # the clock advanced after the first optimizer
    assert rec.count("check") == 2


def test_manual_mode_without_optimizer_hooks():
    x, y = regression_data()
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    rec = Recorder()
    guard = sg.Guard(model, opt, hooks=[rec], sinks=[], attach_optimizer=False, strict=True)
    assert not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks
    for _ in range(3):
        F.mse_loss(model(x), y).backward()
        guard.before_step()
        opt.step()
        guard.after_step()
        opt.zero_grad()
    opt.step()  # a step the Guard is not told about is not counted
    assert guard.step == 3 and rec.count("before") == 3
    guard.close()


def test_manual_calls_are_refused_when_the_optimizer_is_hooked():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    guard = sg.Guard(model, opt, hooks=[], sinks=[])
    with pytest.raises(RuntimeError, match="attach_optimizer=False"):
        guard.before_step()
    guard.close()


def test_close_removes_every_hook_and_leaves_training_identical():
    x, y = regression_data()

    class ForwardHooks(sg.Hook):
        def on_attach(self, guard):
            for m in guard.module.modules():
                if isinstance(m, nn.ReLU):
                    self.register_handle(m.register_forward_hook(lambda *a: None))

    torch.manual_seed(1)
    model = mlp()
    ref = mlp()
    ref.load_state_dict(model.state_dict())
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9)
    guard = sg.Guard(model, opt, hooks=[Recorder(), ForwardHooks()], sinks=[], strict=True)
    assert opt._optimizer_step_pre_hooks and model[1]._forward_hooks
    train(model, opt, guard, 5, x, y)
    train(ref, opt_ref, sg.Guard(None, None, hooks=[], sinks=[]), 5, x, y)
    guard.close()
    assert not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    # A watched run and an unwatched one give bit-identical weights: the monitors changed nothing.
    for p, q in zip(model.parameters(), ref.parameters()):
        assert torch.equal(p, q)
    guard.close()  # twice is fine


def test_two_guards_on_one_optimizer_fail_clearly_until_the_first_closes():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    first = sg.Guard(model, opt, hooks=[], sinks=[])
    with pytest.raises(RuntimeError, match="already watched by another Guard"):
        sg.Guard(model, opt, hooks=[], sinks=[])
    first.close()
    second = sg.Guard(model, opt, hooks=[], sinks=[])
    second.close()


def test_context_manager_closes():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with sg.Guard(model, opt, hooks=[], sinks=[]) as guard:
        assert opt._optimizer_step_pre_hooks
    assert guard.closed and not opt._optimizer_step_pre_hooks


def test_a_failing_hook_is_reported_once_disabled_and_training_goes_on(caplog):
    x, y = regression_data()
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)

    class Broken(sg.Hook):
        def on_attach(self, guard):
            self.register_handle(guard.module[0].register_forward_hook(lambda *a: None))

        def on_before_step(self, ctx):
            raise ZeroDivisionError("bad arithmetic")

    rec = Recorder()
    with caplog.at_level(logging.WARNING, logger="stallguard"):
        guard = sg.Guard(model, opt, hooks=[Broken(), rec], sinks=[])
        train(model, opt, guard, 5, x, y)
    errors = [e for e in guard.events if e.kind == "hook_error"]
    assert len(errors) == 1 and errors[0].data["hook"] == "Broken"
    assert "ZeroDivisionError" in errors[0].message
    assert guard.step == 5 and rec.count("before") == 5
    assert not model[0]._forward_hooks  # the broken hook's module hooks are gone at once
    assert sum("raised in on_before_step" in r.message for r in caplog.records) == 1
    guard.close()


def test_strict_reraises_hook_errors():
    x, y = regression_data()
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)

    class Broken(sg.Hook):
        def on_after_step(self, ctx):
            raise ValueError("strict please")

    guard = sg.Guard(model, opt, hooks=[Broken()], sinks=[], strict=True)
    with pytest.raises(ValueError, match="strict please"):
        train(model, opt, guard, 1, x, y)
    guard.close()


def test_events_reach_subscribers_but_not_their_source():
    got: list[str] = []

    class Talker(sg.Hook):
        subscribes = ("ping",)

        def on_check(self, check):
            self.emit("ping", "info", "ping")

        def on_event(self, event):
            got.append(f"{self.name} heard {event.source}")

    guard = sg.Guard(None, None, hooks=[Talker(name="a"), Talker(name="b")], sinks=[], check_every=1, strict=True)
    guard.after_step()
    assert got == ["b heard a", "a heard b"]
    guard.close()


def test_resumed_guard_emits_the_same_later_events():
    x, y = regression_data()

    def run(steps_before_save, total):
        torch.manual_seed(3)
        model = mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        guard = sg.Guard(model, opt, hooks=[Recorder()], sinks=[], check_every=7, strict=True)
        train(model, opt, guard, steps_before_save, x, y)
        if steps_before_save == total:
            guard.close()
            return guard.events
        state = guard.state_dict()
        buffer = io.BytesIO()
        torch.save({"guard": state, "model": model.state_dict(), "opt": opt.state_dict()}, buffer)
        guard.close()
        buffer.seek(0)
        ckpt = torch.load(buffer, weights_only=True)
        model2 = mlp()
        model2.load_state_dict(ckpt["model"])
        opt2 = torch.optim.SGD(model2.parameters(), lr=0.05)
        opt2.load_state_dict(ckpt["opt"])
        guard2 = sg.Guard(model2, opt2, hooks=[Recorder()], sinks=[], check_every=7, strict=True)
        guard2.load_state_dict(ckpt["guard"])
        train(model2, opt2, guard2, total - steps_before_save, x, y)
        guard2.close()
        return guard2.events

    def comparable(events):
        return [(e.kind, e.step, dict(e.data)) for e in events if e.step > 10]

    straight = run(30, 30)
    resumed = run(10, 30)
    assert comparable(resumed) == comparable(straight) and len(comparable(straight)) >= 3


def test_load_state_dict_with_different_hooks_names_them():
    model = mlp()
    guard = sg.Guard(model, None, hooks=[Recorder()], sinks=[])
    state = guard.state_dict()
    guard.close()
    other = sg.Guard(model, None, hooks=[Recorder(name="other")], sinks=[])
    with pytest.raises(KeyError, match="missing here: \\['Recorder'\\]"):
        other.load_state_dict(state)
    other.load_state_dict(state, strict=False)
    other.close()


def test_gradscaler_skips_are_reported_as_skipped_steps_not_as_gradient_trouble():
    x, y = regression_data()
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    rec = Recorder()
    guard = sg.Guard(model, opt, hooks=[rec], scaler=scaler, sinks=[], check_every=10, strict=True)
    for i in range(20):
        loss = F.mse_loss(model(x), y)
        if i in (4, 5, 12):
            loss = loss * float("inf")  # an overflow: the scaler finds inf grads and skips the step
        scaler.scale(loss).backward()
        guard.observe(loss)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
    guard.close()
    assert guard.step == 17 and rec.count("before") == 17
    skipped = [e for e in guard.events if e.kind == "steps_skipped"]
    assert sum(e.data["skipped"] for e in skipped) == 3
    assert skipped[-1].data["total_skipped"] == 3


class TestBadArguments:
    def setup_method(self):
        self.model = mlp()
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.1)

    @pytest.mark.parametrize(
        ("kwargs", "error", "match"),
        [
            ({"check_every": 0}, ValueError, "check_every must be an int >= 1, got 0"),
            ({"check_every": 2.5}, TypeError, "check_every must be an int, got float 2.5"),
            ({"early_check": 50}, ValueError, "early_check must be an int <= 49, got 50"),
            ({"early_check": -1}, ValueError, "early_check must be an int >= 0, got -1"),
            ({"hooks": [object()]}, TypeError, r"hooks\[0\] must be a stallguard.Hook, got object"),
            ({"hooks": sg.MemorySink()}, TypeError, "hooks must be a list"),
            ({"sinks": sg.MemorySink()}, TypeError, "sinks must be a list"),
            ({"sinks": ["carrier_pigeon"]}, ValueError, "unknown sink 'carrier_pigeon'; known sinks: jsonl, logging"),
            ({"max_events": 0}, ValueError, "max_events must be an int >= 1, got 0"),
            ({"repair": "yes"}, TypeError, "repair must be a bool, got str 'yes'"),
            ({"scaler": 3}, TypeError, "scaler must be a torch.amp.GradScaler or None, got int"),
            ({"emit_rank": 2}, ValueError, r"emit_rank must lie in \[0, 0\] or be None, got 2"),
        ],
    )
    def test_guard_arguments(self, kwargs, error, match):
        with pytest.raises(error, match=match):
            sg.Guard(self.model, self.opt, **kwargs)

    def test_model_and_optimizer_types(self):
        with pytest.raises(TypeError, match=r"model must be a torch\.nn\.Module or None, got str"):
            sg.Guard("model", self.opt)
        with pytest.raises(TypeError, match=r"optimizer\[1\] must be a torch.optim.Optimizer, got str"):
            sg.Guard(self.model, [self.opt, "adam"])
        with pytest.raises(ValueError, match="the same optimizer appears twice"):
            sg.Guard(self.model, [self.opt, self.opt])

    def test_hook_arguments(self):
        with pytest.raises(ValueError, match="Recorder: every must be an int >= 1, got 0"):
            Recorder(every=0)
        with pytest.raises(ValueError, match="start_step must be an int >= 0, got -1"):
            Recorder(start_step=-1)
        with pytest.raises(ValueError, match="reduce must be one of 'sum', 'mean'"):
            sg.Hook().add_state("x", torch.zeros(()), reduce="median")
        with pytest.raises(ValueError, match="reduce applies to tensor states only"):
            sg.Hook().add_state("x", 0, reduce="sum")

    def test_hook_in_two_guards(self):
        hook = Recorder()
        g = sg.Guard(self.model, None, hooks=[hook], sinks=[])
        with pytest.raises(ValueError, match=r"hooks\[0\] \(Recorder\) is already attached"):
            sg.Guard(mlp(), None, hooks=[hook], sinks=[])
        g.close()

    @pytest.mark.parametrize(
        ("args", "kwargs", "error", "match"),
        [
            ((torch.ones(3),), {}, ValueError, r"loss must be a scalar \(one element\), got a tensor of shape \(3,\)"),
            (("0.5",), {}, TypeError, "loss must be a scalar tensor or a number, got str"),
            ((), {"val_acc": [0.9]}, TypeError, "val_acc must be a scalar tensor or a number, got list"),
            ((), {"val_acc": None}, TypeError, "metric val_acc=None"),
            ((), {"inputs": [1, 2]}, TypeError, "inputs must be a tensor"),
            ((), {"targets": torch.tensor(1)}, ValueError, "targets must have a batch dimension"),
            (
                (),
                {"inputs": torch.ones(4, 2), "outputs": torch.ones(4, 1), "targets": torch.ones(5)},
                ValueError,
                "same number of samples: inputs has 4, outputs has 4, targets has 5",
            ),
            ((torch.tensor(1 + 1j),), {}, TypeError, "loss must be a real number"),
            ((), {"epoch": -1}, ValueError, "epoch must be an int >= 0, got -1"),
        ],
    )
    def test_observe_arguments(self, args, kwargs, error, match):
        guard = sg.Guard(self.model, self.opt, hooks=[], sinks=[])
        with pytest.raises(error, match=match):
            guard.observe(*args, **kwargs)
        guard.close()

    def test_observe_after_close(self):
        guard = sg.Guard(self.model, self.opt, hooks=[], sinks=[])
        guard.close()
        with pytest.raises(RuntimeError, match="after close"):
            guard.observe(1.0)


def test_non_finite_loss_is_data_not_a_crash():
    guard = sg.Guard(None, None, hooks=[], sinks=[], check_every=2)
    for v in (1.0, float("nan"), torch.tensor(float("inf"))):
        guard.observe(v)
        guard.after_step()
    guard.close()
    values = guard.series("loss").values
    assert values[0] == 1.0 and torch.isnan(torch.tensor(values[1])) and values[2] == float("inf")


def test_series_names_known_streams_when_missing():
    guard = sg.Guard(None, None, hooks=[], sinks=[], check_every=1)
    guard.observe(val_loss=0.5)
    guard.after_step()
    assert guard.series("val_loss").values.tolist() == [0.5]
    with pytest.raises(KeyError, match="known streams: val_loss"):
        guard.series("loss")
    guard.close()


def test_compiled_and_wrapped_models_are_unwrapped_for_names():
    model = mlp()
    compiled = torch.compile(model, backend="eager")
    guard = sg.Guard(compiled, torch.optim.SGD(model.parameters(), lr=0.1), hooks=[], sinks=[])
    assert guard.module is model
    assert guard.parameter_name(model[0].weight) == "0.weight"
    guard.close()


def test_a_guard_that_fails_to_attach_leaves_the_optimizer_untouched():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)

    class FailsAtAttach(sg.Hook):
        def on_attach(self, guard):
            self.register_handle(guard.module[0].register_forward_hook(lambda *a: None))
            raise RuntimeError("cannot attach")

    with pytest.raises(RuntimeError, match="cannot attach"):
        sg.Guard(model, opt, hooks=[FailsAtAttach()], sinks=[], strict=True)
    assert not opt._optimizer_step_pre_hooks and not model[0]._forward_hooks
    sg.Guard(model, opt, hooks=[], sinks=[]).close()  # the optimizer is free again


@pytest.mark.parametrize(
    ("kwargs", "early", "checks"),
    [
        ({}, None, [10, 20]),
        ({"repair": True}, 1, [1, 10, 20]),
        ({"repair": True, "early_check": 0}, None, [10, 20]),
        ({"early_check": 3}, 3, [3, 10, 20]),
    ],
)
def test_early_check_point(kwargs, early, checks):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    seen = []

    class Probe(sg.Hook):
        def on_check(self, check):
            seen.append(check.step)

    guard = sg.Guard(model, opt, hooks=[Probe()], sinks=[], check_every=10, **kwargs)
    assert guard.early_check == early
    x, y = torch.randn(16, 8), torch.randn(16, 1)
    for _ in range(20):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    assert seen == checks
    config = guard.to_config()
    assert sg.Guard.from_config(model, None, {**config, "sinks": []}).early_check == early
    guard.close()
