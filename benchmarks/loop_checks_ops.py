"""Count the aten calls that ZeroGradCheck, StaleParams and NonFinite add to one training step.

Wall-clock overhead on a shared CPU is noisier than these hooks' cost, so this counts the operator
calls the profiler records on one step, with and without each hook, on a sampled and on a plain step.
The numbers are recorded in docs/hooks/zero_grad.md, stale_params.md and nonfinite.md.

    python benchmarks/loop_checks_ops.py
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

import stallguard as sg


def model() -> nn.Module:
    """Nine 256-wide linear layers (18 tensors)."""
    layers: list[nn.Module] = []
    for _ in range(8):
        layers += [nn.Linear(256, 256), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(256, 1))


def count(hooks: list[sg.Hook], step_no: int) -> int:
    """aten calls on training step ``step_no`` (1-based) of a Guard running ``hooks``."""
    torch.manual_seed(0)
    net = model()
    opt = torch.optim.SGD(net.parameters(), lr=1e-3)
    x, y = torch.randn(128, 256), torch.randn(128, 1)
    guard = sg.Guard(net, opt, hooks=hooks, sinks=[], check_every=10_000)

    def step() -> None:
        opt.zero_grad()
        loss = nn.functional.mse_loss(net(x), y)
        loss.backward()
        guard.observe(loss, inputs=x)
        opt.step()

    for _ in range(step_no - 1):
        step()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step()
    guard.close()
    return sum(1 for e in prof.events() if e.name.startswith("aten::"))


def main() -> None:
    torch.set_num_threads(1)
    variants: list[tuple[str, Callable[[], list[sg.Hook]]]] = [
        ("ZeroGradCheck()", lambda: [sg.ZeroGradCheck()]),
        ("StaleParams()", lambda: [sg.StaleParams()]),
        ("NonFinite()", lambda: [sg.NonFinite()]),
        ("NonFinite(grad_every=1, param_every=1)", lambda: [sg.NonFinite(grad_every=1, param_every=1)]),
        ("GradNormMonitor()", lambda: [sg.GradNormMonitor()]),
        ("GradNormMonitor() + NonFinite()", lambda: [sg.GradNormMonitor(), sg.NonFinite()]),
    ]
    plain5, plain10 = count([], 5), count([], 10)
    print(f"plain step (empty Guard): {plain5} aten calls")
    print("hook                                    step 5 (not sampled)  step 10 (sampled)")
    for name, make in variants:
        print(f"{name:40s}{count(make(), 5) - plain5:>20d}{count(make(), 10) - plain10:>19d}")


if __name__ == "__main__":
    main()
