"""ZeroGradCheck, StaleParams and NonFinite on small real training runs that show each loop bug."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from torch import nn

import stallguard as sg
from tests.helpers import mlp, regression_data


def kinds(guard: sg.Guard) -> list[str]:
    return [e.kind for e in guard.events]


def of_kind(guard: sg.Guard, kind: str) -> list[sg.Event]:
    return [e for e in guard.events if e.kind == kind]


# ----------------------------------------------------------------------------- ZeroGradCheck
def run_zero_grad(
    mode: str, steps: int = 40, accumulate: int = 1, hooks: list[sg.Hook] | None = None, **guard_kw
) -> sg.Guard:
    """``mode``: "none" (no zero_grad), "none_ok" (set_to_none=True), "zeros" (set_to_none=False)."""
    x, y = regression_data()
    torch.manual_seed(0)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    guard = sg.Guard(
        model, opt, hooks=hooks if hooks is not None else None, sinks=[], check_every=10, strict=True, **guard_kw
    )
    manual = not guard.attach_optimizer
    for s in range(steps):
        for k in range(accumulate):
            i = (s * accumulate + k) % 8
            xb, yb = x[i * 32 : (i + 1) * 32], y[i * 32 : (i + 1) * 32]
            loss = nn.functional.mse_loss(model(xb), yb) / accumulate
            loss.backward()
            guard.observe(loss)
        if manual:
            guard.before_step()
        opt.step()
        if manual:
            guard.after_step()
        if mode == "none_ok":
            opt.zero_grad()
        elif mode == "zeros":
            opt.zero_grad(set_to_none=False)
    guard.close()
    return guard


def test_missing_zero_grad_is_reported_and_diagnosed_first() -> None:
    guard = run_zero_grad("none")
    events = of_kind(guard, "grads_not_cleared")
    assert events, kinds(guard)
    first = events[0]
    assert first.severity == sg.Severity.ERROR and first.causes == ("missing_zero_grad",)
    assert first.data["steps"] == first.data["checked_steps"] == 1 and first.data["first_step"] == 10
    assert first.data["ratio"] > 0.1
    assert guard.diagnose()[0].cause == "missing_zero_grad"


@pytest.mark.parametrize("mode", ["none_ok", "zeros"])
@pytest.mark.parametrize("accumulate", [1, 4])
def test_cleared_gradients_and_accumulation_are_quiet(mode: str, accumulate: int) -> None:
    guard = run_zero_grad(mode, accumulate=accumulate, hooks=[sg.ZeroGradCheck(every=2)])
    checker = guard.hook(sg.ZeroGradCheck)
    assert kinds(guard) == []
    assert checker.total_flagged == 0


def test_accumulation_without_zero_grad_is_still_caught() -> None:
    guard = run_zero_grad("none", accumulate=4, hooks=[sg.ZeroGradCheck(every=3)])
    assert of_kind(guard, "grads_not_cleared")


def test_works_without_optimizer_hooks() -> None:
    bad = run_zero_grad("none", hooks=[sg.ZeroGradCheck(every=5)], attach_optimizer=False)
    good = run_zero_grad("none_ok", hooks=[sg.ZeroGradCheck(every=5)], attach_optimizer=False)
    assert of_kind(bad, "grads_not_cleared") and kinds(good) == []


def test_norm_clipping_is_not_mistaken_for_leftovers() -> None:
    x, y = regression_data()
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    guard = sg.Guard(model, opt, hooks=[sg.ZeroGradCheck(every=1)], sinks=[], check_every=5, strict=True)
    for _ in range(10):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.01)  # scales every gradient by one factor
        opt.step()
    guard.close()
    assert kinds(guard) == []


def test_autograd_grad_calls_do_not_count() -> None:
    x, y = regression_data()
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    guard = sg.Guard(model, opt, hooks=[sg.ZeroGradCheck(every=1)], sinks=[], check_every=5, strict=True)
    for _ in range(6):
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        torch.autograd.grad(loss, list(model.parameters()), retain_graph=True)  # does not touch .grad
        loss.backward()
        opt.step()
    guard.close()
    assert kinds(guard) == []


# ----------------------------------------------------------------------------- StaleParams
class TwoLayer(nn.Module):
    def __init__(self, detach: bool = False, unused: bool = False) -> None:
        super().__init__()
        self.l1 = nn.Linear(8, 32)
        self.l2 = nn.Linear(32, 1)
        self.detach = detach
        if unused:
            self.spare = nn.Linear(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.l1(x))
        if self.detach:
            h = h.detach()
        return self.l2(h)


def train(model: nn.Module, opt: torch.optim.Optimizer, hooks: list[sg.Hook], steps: int = 20, **kw) -> sg.Guard:
    x, y = regression_data()
    guard = sg.Guard(model, opt, hooks=hooks, sinks=[], check_every=kw.pop("check_every", 10), strict=True, **kw)
    for _ in range(steps):
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        guard.observe(loss)
        opt.step()
    guard.close()
    return guard


def test_optimizer_over_a_deepcopy() -> None:
    model = TwoLayer()
    opt = torch.optim.Adam(copy.deepcopy(model).parameters(), lr=1e-2)
    guard = train(model, opt, [sg.StaleParams()], steps=10, repair=False)
    ev = of_kind(guard, "optimizer_params_not_in_model")
    assert len(ev) == 1 and ev[0].severity == sg.Severity.ERROR and ev[0].data["count"] == 4
    assert ev[0].causes == ("params_not_updated",)
    assert guard.diagnose()[0].cause == "params_not_updated"


def test_optimizer_over_a_deepcopy_with_default_hooks() -> None:
    model = TwoLayer()
    opt = torch.optim.SGD(copy.deepcopy(model).parameters(), lr=1e-2)
    guard = train(model, opt, None, steps=30)
    assert "optimizer_params_not_in_model" in kinds(guard)
    assert guard.diagnose()[0].cause == "params_not_updated"


def test_a_param_group_left_out() -> None:
    model = TwoLayer()
    opt = torch.optim.SGD(model.l2.parameters(), lr=1e-2)
    guard = train(model, opt, [sg.StaleParams()], steps=5)
    (ev,) = of_kind(guard, "params_not_in_optimizer")
    assert list(ev.data["params"]) == ["l1.weight", "l1.bias"] and ev.severity >= sg.Severity.WARNING
    assert "optimizer_params_not_in_model" not in kinds(guard)
    assert guard.diagnose()[0].cause == "params_not_updated"


def test_frozen_by_design_is_never_reported() -> None:
    model = TwoLayer()
    for p in model.l1.parameters():
        p.requires_grad_(False)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    guard = train(model, opt, [sg.StaleParams(update_every=2)], steps=20)
    assert kinds(guard) == []


def test_extra_learnable_tensor_beside_the_model_is_info() -> None:
    model = TwoLayer()
    temperature = nn.Parameter(torch.ones(32))  # shaped like l1.bias, yet the model is fully covered
    opt = torch.optim.SGD([*model.parameters(), temperature], lr=1e-2)
    guard = train(model, opt, [sg.StaleParams()], steps=5)
    (ev,) = of_kind(guard, "optimizer_params_not_in_model")
    assert ev.severity == sg.Severity.INFO
    assert guard.diagnose() == []


def test_detached_forward_gives_grads_missing() -> None:
    model = TwoLayer(detach=True)
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    guard = train(model, opt, [sg.StaleParams()], steps=10, check_every=5)
    (ev,) = of_kind(guard, "grads_missing")
    assert ev.severity == sg.Severity.WARNING and ev.data["reason"] == "detached"
    assert list(ev.data["params"]) == ["l1.weight", "l1.bias"] and ev.data["steps"] == 5
    assert guard.diagnose()[0].cause == "params_not_updated"


def test_an_unused_module_is_only_info() -> None:
    model = TwoLayer(unused=True)
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    guard = train(model, opt, [sg.StaleParams()], steps=10, check_every=5)
    (ev,) = of_kind(guard, "grads_missing")
    assert ev.severity == sg.Severity.INFO and ev.data["reason"] == "unused"
    assert list(ev.data["params"]) == ["spare.weight", "spare.bias"]
    assert guard.diagnose() == []


def test_embedding_rows_unused_on_some_steps_are_fine() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(100, 8), nn.Flatten(), nn.Linear(8 * 4, 1))
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    guard = sg.Guard(model, opt, hooks=[sg.StaleParams(update_every=2)], sinks=[], check_every=5, strict=True)
    for _ in range(20):
        idx = torch.randint(0, 10, (16, 4))  # rows 10..99 never used
        opt.zero_grad()
        loss = model(idx).pow(2).mean()
        loss.backward()
        opt.step()
    guard.close()
    assert kinds(guard) == []


def test_lr_zero_group_is_weights_frozen() -> None:
    model = TwoLayer()
    opt = torch.optim.SGD([{"params": model.l1.parameters(), "lr": 0.0}, {"params": model.l2.parameters()}], lr=1e-2)
    guard = train(model, opt, [sg.StaleParams(update_every=2)], steps=20)
    (ev,) = of_kind(guard, "weights_frozen")
    assert ev.data["reason"] == "lr_zero" and list(ev.data["params"]) == ["l1.weight", "l1.bias"]
    assert ev.causes == ("params_not_updated",) and ev.severity == sg.Severity.WARNING
    assert guard.diagnose()[0].cause == "params_not_updated"


def test_bf16_weights_with_tiny_updates_underflow() -> None:
    torch.manual_seed(0)
    model = nn.Linear(8, 1).to(torch.bfloat16)
    with torch.no_grad():
        model.weight.fill_(64.0)  # bf16 spacing at 64 is 0.5: an update of 1e-4 rounds away
    opt = torch.optim.SGD(model.parameters(), lr=1e-6)
    x, y = regression_data()
    guard = sg.Guard(model, opt, hooks=[sg.StaleParams(update_every=2)], sinks=[], check_every=10, strict=True)
    for _ in range(10):
        opt.zero_grad()
        nn.functional.mse_loss(model(x.bfloat16()).float(), y).backward()
        opt.step()
    guard.close()
    ev = [e for e in of_kind(guard, "weights_frozen") if e.data["reason"] == "update_underflow"]
    assert ev and "weight" in list(ev[0].data["params"]) and ev[0].causes == ("lr_too_low",)


@pytest.mark.parametrize("observe", [False, True])
def test_model_weights_untouched_without_optimizer_hooks(observe: bool) -> None:
    # attach_optimizer=False and no optimizer: the Guard watches the model's own parameters.
    x, y = regression_data()
    model = TwoLayer()
    shadow = copy.deepcopy(model)
    opt = torch.optim.SGD(shadow.parameters(), lr=1e-2)  # steps the wrong copy
    guard = sg.Guard(model, None, hooks=[sg.StaleParams(update_every=1)], sinks=[], check_every=5, strict=True)
    for _ in range(10):
        opt.zero_grad()
        model.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        if observe:  # the loss stays where it started: not converged, so still reported
            guard.observe(loss)
        guard.before_step()
        opt.step()
        guard.after_step()
    guard.close()
    ev = of_kind(guard, "weights_frozen")
    assert ev and ev[0].data["reason"] == "not_updated"


def converged_run(hook: sg.StaleParams) -> tuple[sg.Guard, float]:
    """Adam on four well-separated classes: the float32 loss is exactly 0 on most batches by step 100."""
    g = torch.Generator().manual_seed(4)
    centers = 4.0 * torch.randn(4, 16, generator=g)
    y = torch.randint(0, 4, (512,), generator=g)
    x = centers[y] + torch.randn(512, 16, generator=g)
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    guard = sg.Guard(model, opt, hooks=[hook], sinks=[], check_every=50, strict=True)
    batches = torch.Generator().manual_seed(2)
    losses = []
    for _ in range(300):
        idx = torch.randint(0, 512, (64,), generator=batches)
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        guard.observe(loss)
        opt.step()
        losses.append(loss.detach())
    guard.close()
    return guard, float(torch.stack(losses[-100:]).max())


def test_weights_at_rest_after_the_loss_converged_are_not_frozen() -> None:
    guard, late = converged_run(sg.StaleParams())
    assert late < 1e-6
    assert of_kind(guard, "weights_frozen") == []
    # The same run with the convergence test off: the gradients of a zero loss are too small for Adam's
    # updates to show in float32, which reads as weights the optimizer step does not touch.
    guard, _ = converged_run(sg.StaleParams(converged_fraction=0.0))
    assert {e.data["reason"] for e in of_kind(guard, "weights_frozen")} == {"not_updated"}


# ----------------------------------------------------------------------------- NonFinite
def test_log_zero_in_the_loss() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(64, 8), torch.randint(0, 3, (64,))
    guard = sg.Guard(model, opt, sinks=[], check_every=10, strict=True)
    for s in range(20):
        probs = model(x).softmax(-1)
        if s == 6:
            probs = probs * 0  # a probability of exactly 0: log(0) = -inf
        loss = -torch.log(probs.gather(1, y[:, None])).mean()
        opt.zero_grad()
        loss.backward()
        guard.observe(loss)
        opt.step()
    guard.close()
    (ev,) = of_kind(guard, "nonfinite")
    assert ev.data["where"] == "loss" and ev.data["first_step"] == 7 and ev.severity == sg.Severity.ERROR
    assert ev.causes == ("non_finite",)
    assert guard.diagnose()[0].cause == "non_finite"


def nan_weight_run(hook: sg.NonFinite, steps: int) -> sg.Event:
    """Train; before the 5th step one weight becomes NaN. Returns the one ``nonfinite`` event."""
    x, y = regression_data()
    model = TwoLayer()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    guard = sg.Guard(model, opt, hooks=[hook], sinks=[], check_every=10, strict=True)
    for s in range(steps):
        if s == 4:
            with torch.no_grad():
                model.l2.weight[0, 3] = math.nan
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        guard.observe(loss)
        opt.step()
    guard.close()
    (ev,) = of_kind(guard, "nonfinite")
    return ev


def test_nan_in_a_weight() -> None:
    ev = nan_weight_run(sg.NonFinite(grad_every=1, param_every=1), 12)  # every step: the exact origin
    assert ev.data["where"] == "parameters" and ev.data["first_step"] == 5 and ev.data["layer"] == "l2.weight"
    assert ev.data["sources"]["loss"] == 5


def test_nan_in_a_weight_is_found_by_the_sampled_default_too() -> None:
    ev = nan_weight_run(sg.NonFinite(), 52)
    # Gradients are tested on every 10th step, weights on every 50th; every loss is looked at.
    assert ev.data["where"] == "loss" and ev.data["first_step"] == 5
    assert ev.data["sources"]["gradients"] == 10


def test_nan_in_inputs_and_first_gradient_layer() -> None:
    x, y = regression_data()
    model = TwoLayer()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    hooks = [sg.NonFinite(grad_every=1)]  # inputs are tested with the gradients: every step here
    guard = sg.Guard(model, opt, hooks=hooks, sinks=[], check_every=5, strict=True)
    for s in range(5):
        xb = x.clone()
        if s == 2:
            xb[0, 0] = math.nan
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(xb), y)
        loss.backward()
        guard.observe(loss, inputs=xb)
        opt.step()
    guard.close()
    (ev,) = of_kind(guard, "nonfinite")
    assert ev.data["where"] == "inputs" and ev.data["first_step"] == 3


def test_gradient_only_nonfinite_names_the_first_layer_in_model_order() -> None:
    x, y = regression_data()
    model = TwoLayer()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    guard = sg.Guard(model, opt, hooks=[sg.NonFinite(grad_every=1)], sinks=[], check_every=5, strict=True)
    for s in range(5):
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        if s == 1:
            model.l2.bias.grad.fill_(math.inf)
            model.l1.bias.grad.fill_(math.nan)
        guard.observe(loss)
        opt.step()
        if s == 1:
            break
    guard.close()
    (ev,) = of_kind(guard, "nonfinite")
    assert ev.data["where"] == "gradients" and ev.data["first_step"] == 2 and ev.data["layer"] == "l1.bias"


def test_repair_mode_skips_once_and_reports_each_role_once() -> None:
    x, y = regression_data()
    model = TwoLayer()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    guard = sg.Guard(model, opt, sinks=[], check_every=5, strict=True, repair=True)
    for s in range(12):
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        if s == 9:  # optimizer step 10: one the sampled monitors look at (every 10th)
            loss = loss * math.inf
        loss.backward()
        guard.observe(loss)
        opt.step()
    guard.close()
    assert all(torch.isfinite(p).all() for p in model.parameters())  # the clipper skipped the step
    k = kinds(guard)
    assert k.count("nonfinite") == 1 and k.count("nonfinite_skipped") == 1 and k.count("nonfinite_gradients") == 1
    assert of_kind(guard, "nonfinite")[0].data["where"] == "loss"
    assert of_kind(guard, "nonfinite_skipped")[0].data["steps"] == 1
    assert guard.diagnose()[0].cause == "non_finite"


# ----------------------------------------------------------------------------- state, args, cost
@pytest.mark.parametrize(
    ("cls", "bad"),
    [
        (sg.ZeroGradCheck, {"tol": 0.0}),
        (sg.ZeroGradCheck, {"tol": 1.5}),
        (sg.ZeroGradCheck, {"max_params": 0}),
        (sg.StaleParams, {"warmup": 0}),
        (sg.StaleParams, {"min_fraction": 2.0}),
        (sg.StaleParams, {"update_every": -1}),
        (sg.StaleParams, {"min_samples": 0}),
        (sg.StaleParams, {"converged_fraction": 1.5}),
        (sg.NonFinite, {"param_every": -1}),
        (sg.NonFinite, {"check_inputs": "yes"}),
    ],
)
def test_bad_arguments_name_the_hook_and_parameter(cls: type, bad: dict) -> None:
    name = next(iter(bad))
    with pytest.raises((ValueError, TypeError)) as info:
        cls(**bad)
    assert cls.__name__ in str(info.value) and name in str(info.value)


@pytest.mark.parametrize("name", ["zero_grad", "stale_params", "nonfinite"])
def test_registered_in_the_default_set(name: str) -> None:
    assert name in [type(h).registry_name for h in sg.default_hooks()]


def test_state_dict_round_trip() -> None:
    x, y = regression_data()
    model = TwoLayer(detach=True)
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    hooks = [sg.ZeroGradCheck(every=2), sg.StaleParams(), sg.NonFinite()]
    guard = sg.Guard(model, opt, hooks=hooks, sinks=[], check_every=5, strict=True)
    for _ in range(7):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    state = guard.state_dict()
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    guard.close()
    fresh_hooks = [sg.ZeroGradCheck(every=2), sg.StaleParams(), sg.NonFinite()]
    for h in fresh_hooks:
        h.load_state_dict(loaded["hooks"][h.name])  # before attach
    opt2 = torch.optim.SGD(model.parameters(), lr=1e-2)
    guard2 = sg.Guard(model, opt2, hooks=fresh_hooks, sinks=[], check_every=5, strict=True)
    for h, saved in zip(guard2.hooks, loaded["hooks"].values()):
        again = h.state_dict()
        assert again.keys() == saved.keys()
        for k in saved:
            if isinstance(saved[k], torch.Tensor):
                assert torch.equal(again[k], saved[k]), (h.name, k)
            else:
                assert again[k] == saved[k], (h.name, k)
    stale = guard2.hook(sg.StaleParams)
    assert stale.grads_decided and stale._forward_handles == []  # no forward hooks after the warm-up
    guard2.close()
    # The Guard-level path: load after attach.
    guard3 = sg.Guard(
        model, opt2, hooks=[sg.ZeroGradCheck(every=2), sg.StaleParams(), sg.NonFinite()], sinks=[], check_every=5
    )
    assert guard3.hook(sg.StaleParams)._forward_handles
    guard3.load_state_dict(loaded)
    assert guard3.hook(sg.StaleParams)._forward_handles == []
    assert guard3.hook(sg.ZeroGradCheck).interval_start == 5 and guard3.step == 7
    guard3.close()


def test_no_host_sync_on_a_step_that_is_not_a_check_point() -> None:
    x, y = regression_data()
    model = TwoLayer()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    hooks = [sg.ZeroGradCheck(every=1), sg.StaleParams(update_every=1), sg.NonFinite()]
    guard = sg.Guard(model, opt, hooks=hooks, sinks=[], check_every=1000, strict=True)

    def step() -> None:
        opt.zero_grad(set_to_none=False)
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        guard.observe(loss, inputs=x)
        opt.step()

    for _ in range(3):
        step()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step()  # step 4: every per-step path of the three hooks runs (sampled paths included)
    names = [e.name for e in prof.events()]
    assert "aten::mse_loss" in names  # the profiler saw the step
    assert names.count("aten::item") == 0 and names.count("aten::_local_scalar_dense") == 0
    guard.close()


def test_gradscaler_overflow_steps_are_not_reported() -> None:
    # A fused optimizer under a GradScaler sees the overflow steps (skipped in-kernel): not a NaN bug,
    # and the scaled gradients are no leftover either.
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
    scaler = torch.amp.GradScaler("cpu", growth_interval=1000)
    x, y = torch.randn(32, 8), torch.randn(32, 1)
    hooks = [sg.NonFinite(), sg.ZeroGradCheck(every=1)]
    guard = sg.Guard(model, opt, hooks=hooks, sinks=[], check_every=20, scaler=scaler, strict=True)
    for step in range(1, 21):
        loss = nn.functional.mse_loss(model(x), y)
        if step in (5, 9):  # scaled gradients overflow float32
            loss = loss * 1e36
        opt.zero_grad()
        scaler.scale(loss).backward()
        guard.observe(loss.detach().clamp_max(1e30))
        scaler.step(opt)
        scaler.update()
    guard.close()
    assert [e.data["skipped"] for e in guard.events if e.kind == "steps_skipped"] == [2]
    assert [e.kind for e in guard.events if e.source in ("NonFinite", "ZeroGradCheck")] == []
    assert guard.hook(sg.ZeroGradCheck).total_flagged == 0


def test_two_optimizers_over_parts_of_the_model_are_quiet() -> None:
    x, y = regression_data()
    model = TwoLayer()
    opts = [torch.optim.SGD(model.l1.parameters(), lr=1e-2), torch.optim.Adam(model.l2.parameters(), lr=1e-3)]
    hooks = [sg.StaleParams(update_every=2), sg.ZeroGradCheck(every=2), sg.NonFinite()]
    guard = sg.Guard(model, opts, hooks=hooks, sinks=[], check_every=5, strict=True)
    for _ in range(12):
        for o in opts:
            o.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        for o in opts:
            o.step()
    guard.close()
    assert kinds(guard) == []
    assert guard.hook(sg.StaleParams).grads_decided


@pytest.mark.parametrize("set_to_none", [True, False])
def test_zero_grad_before_every_micro_batch_is_not_called_missing(set_to_none: bool) -> None:
    # That loop loses gradients rather than piling them up: not a missing zero_grad.
    x, y = regression_data()
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    guard = sg.Guard(model, opt, hooks=[sg.ZeroGradCheck(every=1)], sinks=[], check_every=5, strict=True)
    for s in range(10):
        for k in range(3):
            opt.zero_grad(set_to_none=set_to_none)
            i = (3 * s + k) % 8
            nn.functional.mse_loss(model(x[i * 32 : (i + 1) * 32]), y[i * 32 : (i + 1) * 32]).backward()
        opt.step()
    guard.close()
    assert kinds(guard) == []
    assert guard.hook(sg.ZeroGradCheck).total_flagged == 0


def test_config_round_trip() -> None:
    model = TwoLayer()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    hooks = [sg.ZeroGradCheck(every=3, tol=0.02), sg.StaleParams(warmup=7), sg.NonFinite(param_every=5)]
    guard = sg.Guard(model, opt, hooks=hooks, sinks=[])
    config = guard.to_config()
    guard.close()
    again = sg.Guard.from_config(model, opt, {**config, "sinks": []})
    assert again.to_config() == config
    assert again.hook(sg.StaleParams).warmup == 7 and again.hook(sg.ZeroGradCheck).every == 3
    again.close()


def test_value_clipping_is_not_mistaken_for_leftovers() -> None:
    x, y = regression_data()
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    guard = sg.Guard(model, opt, hooks=[sg.ZeroGradCheck(every=1)], sinks=[], check_every=5, strict=True)
    clamped = 0
    for _ in range(10):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        bias = model[0].bias.grad
        clamped += int((bias.abs() > 0.05).sum())
        torch.nn.utils.clip_grad_value_(model.parameters(), 0.05)
        opt.step()
    guard.close()
    assert clamped > 0  # the clamp did change watched gradients
    assert kinds(guard) == []


def test_a_watched_parameter_without_gradients_is_replaced() -> None:
    x, y = regression_data()
    model = TwoLayer(unused=True)  # spare.weight (4 elements) is the smallest parameter and never used
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    checker = sg.ZeroGradCheck(every=2, max_params=1)
    guard = sg.Guard(model, opt, hooks=[checker], sinks=[], check_every=10, strict=True)
    assert [n for n, _ in checker._watched] == ["spare.weight"]
    for _ in range(10):
        nn.functional.mse_loss(model(x), y).backward()  # and no zero_grad
        opt.step()
    guard.close()
    assert [n for n, _ in checker._watched] != ["spare.weight"]
    assert "grads_not_cleared" in kinds(guard)
