"""GradNormMonitor's per-interval rows: the host reduction, the device fold and the shared late slot."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

import stallguard as sg


class RecordPer(sg.Hook):
    """Test observer: each step's per-tensor gradient norms and global norm, per optimizer (host reads)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[int, list[str], np.ndarray, float]] = []

    def on_before_step(self, ctx: sg.StepContext) -> None:
        norms = ctx.grad_norms()
        assert norms is not None
        per = norms.per_tensor.detach().numpy().astype(np.float32).copy()
        self.seen.append((ctx.optimizer_index, list(norms.names), per, float(norms.total)))


def sequential_mean(values: list[float]) -> float:
    """The mean as the monitor keeps it: a float32 sum added one step at a time."""
    total = np.float32(0.0)
    for v in values:
        total = np.float32(total + np.float32(v))
    return float(total) / len(values)


def everything_vanishes(**kwargs: object) -> sg.GradNormMonitor:
    # Every step counts as vanishing, so every check point reports the layers' numbers.
    return sg.GradNormMonitor(every=1, vanishing_ratio=1e9, vanishing_norm=1e9, **kwargs)  # type: ignore[arg-type]


def test_an_optimizer_stepping_more_than_check_every_times_is_counted_on_every_step() -> None:
    # A critic stepped three times per step of the generator: 12 steps per interval of 4, so its rows
    # are overwritten within the interval and folded on the device. The numbers must still cover all 12.
    torch.manual_seed(0)
    gen = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 4))
    critic = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    model = nn.ModuleDict({"gen": gen, "critic": critic})
    g_opt = torch.optim.SGD(gen.parameters(), lr=0.01)
    c_opt = torch.optim.SGD(critic.parameters(), lr=0.01)
    monitor, record = everything_vanishes(), RecordPer()
    guard = sg.Guard(model, [g_opt, c_opt], hooks=[monitor, record], sinks=[], check_every=4, strict=True)
    bad_calls = {5, 9}  # critic steps (0-based, over the run) whose gradients are made non-finite
    calls = 0
    for _ in range(4):
        for _ in range(3):
            loss = critic(gen(torch.randn(16, 4)).detach()).pow(2).mean()
            c_opt.zero_grad()
            loss.backward()
            if calls in bad_calls:
                critic[2].weight.grad[0, 0] = math.inf
            calls += 1
            c_opt.step()
            with torch.no_grad():
                critic[2].weight.nan_to_num_(0.0, 0.0, 0.0)
        loss = critic(gen(torch.randn(16, 4))).mean()
        g_opt.zero_grad()
        loss.backward()
        g_opt.step()
    guard.close()

    nonfinite = [e for e in guard.events if e.kind == "nonfinite_gradients"]
    assert len(nonfinite) == 1 and nonfinite[0].data["optimizer"] == 1
    assert nonfinite[0].data["steps"] == 12 and nonfinite[0].data["nonfinite_steps"] == 2
    assert list(nonfinite[0].data["parameters"]) == ["critic.2.weight"]
    assert nonfinite[0].data["counts"] == {"critic.2.weight": 2}
    assert nonfinite[0].data["first_step"] == min(bad_calls) + 1  # the critic's own step number

    (vanishing,) = [e for e in guard.events if e.kind == "vanishing_gradients" and e.data["optimizer"] == 1]
    finite = [(names, per) for i, names, per, total in record.seen if i == 1 and math.isfinite(total)]
    assert len(finite) == 10
    assert vanishing.data["ratio_steps_fraction"] == 1.0  # 10 finite kernel steps of 10
    for name, numbers in vanishing.data["layers"].items():
        values = [float(per[names.index(name)]) for names, per in finite]
        assert numbers["mean"] == sequential_mean(values)
        assert numbers["max"] == max(values)
    first = [float(per[names.index("critic.0.weight")]) for names, per in finite]
    assert vanishing.data["first_kernel_norm"] == sequential_mean(first)
    # Only the finite ones of the last check_every norms are compared with the baseline.
    recent = [total for i, _, _, total in record.seen if i == 1][-4:]
    assert vanishing.data["steps"] == sum(math.isfinite(t) for t in recent)


def test_the_floor_fraction_counts_every_step_of_an_optimizer_that_steps_more_than_check_every() -> None:
    # The critic steps 12 times in an interval of 4 generator steps, every time under min_norm: the
    # fraction is 1 (it was 12 / 4, which no event can carry as a confidence).
    torch.manual_seed(0)
    gen = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 4))
    critic = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    g_opt = torch.optim.SGD(gen.parameters(), lr=0.01)
    c_opt = torch.optim.SGD(critic.parameters(), lr=0.01)
    monitor = sg.GradNormMonitor(every=1, min_norm=1e9)
    model = nn.ModuleDict({"gen": gen, "critic": critic})
    guard = sg.Guard(model, [g_opt, c_opt], hooks=[monitor], sinks=[], check_every=4, strict=True)
    for _ in range(4):
        for _ in range(3):
            c_opt.zero_grad()
            critic(gen(torch.randn(16, 4)).detach()).pow(2).mean().backward()
            c_opt.step()
        g_opt.zero_grad()
        critic(gen(torch.randn(16, 4))).mean().backward()
        g_opt.step()
    guard.close()
    (vanishing,) = [e for e in guard.events if e.kind == "vanishing_gradients" and e.data["optimizer"] == 1]
    assert vanishing.data["floor_steps_fraction"] == 1.0 and vanishing.confidence is not None


def test_parameters_added_after_attach_share_one_slot_and_are_all_counted() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2))
    params = list(model.parameters())
    opt = torch.optim.SGD(params[:4], lr=0.05)
    monitor, record = everything_vanishes(), RecordPer()
    guard = sg.Guard(model, opt, hooks=[monitor, record], sinks=[], check_every=5, strict=True)
    opt.add_param_group({"params": params[4:]})  # two tensors join after attach
    x, y = torch.randn(32, 6), torch.randint(0, 2, (32,))
    for _ in range(5):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    guard.close()
    (event,) = [e for e in guard.events if e.kind == "vanishing_gradients"]
    late = event.data["layers"]["(added after attach)"]
    # Both late tensors go into the one slot on every step: ten norms, summed in step and name order.
    values = [float(v) for _, names, per, _ in record.seen for v in per[len(names) - 2 :]]
    assert len(values) == 10
    assert late["mean"] == sequential_mean(values) and late["max"] == max(values)
    assert event.data["layers"]["0.weight"]["mean"] == sequential_mean([float(per[0]) for _, _, per, _ in record.seen])


def test_a_state_dict_saved_mid_interval_restores_the_rows() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = torch.randn(32, 6), torch.randint(0, 2, (32,))

    def train(guard: sg.Guard, steps: int) -> None:
        for _ in range(steps):
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()

    first = everything_vanishes()
    guard = sg.Guard(model, opt, hooks=[first], sinks=[], check_every=6)
    train(guard, 3)
    state = first.state_dict()
    guard.close()
    assert state["ring_pos"] == [3] and len(state["row_offsets"][0]) == 3

    resumed = everything_vanishes()
    resumed.load_state_dict(state)  # before attach: applied at attach
    guard = sg.Guard(model, opt, hooks=[resumed], sinks=[], check_every=6)
    assert torch.equal(resumed.rows.isnan(), state["rows"].isnan())
    assert torch.equal(resumed.rows.nan_to_num(), state["rows"].nan_to_num())
    train(guard, 6)
    guard.close()
    (event, *_) = [e for e in guard.events if e.kind == "vanishing_gradients"]
    assert event.data["steps"] == 6 and event.data["ratio_steps_fraction"] == 1.0
