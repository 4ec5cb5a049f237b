"""Time a training step with and without DeadReLUCounter (CPU, one thread).

Variants run round-robin in blocks, and the median step time per variant is compared to the plain
step. The numbers are recorded in docs/hooks/dead_relu.md.

    python benchmarks/dead_relu_overhead.py
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

import stallguard as sg


def mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(512, 1024),
        nn.ReLU(),
        nn.Linear(1024, 1024),
        nn.ReLU(),
        nn.Linear(1024, 1024),
        nn.ReLU(),
        nn.Linear(1024, 10),
    )


def cnn() -> nn.Module:
    def block(a: int, b: int) -> list[nn.Module]:
        return [nn.Conv2d(a, b, 3, padding=1), nn.BatchNorm2d(b), nn.ReLU()]

    return nn.Sequential(
        *block(3, 32),
        *block(32, 32),
        nn.MaxPool2d(2),
        *block(32, 64),
        *block(64, 64),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(64, 10),
    )


def bench(name: str, make, batch: tuple[torch.Tensor, torch.Tensor], rounds: int = 12, block: int = 10) -> None:
    variants = {"plain": None, "every=1": 1, "every=10 (default)": 10}
    setups = {}
    for label, every in variants.items():
        torch.manual_seed(0)
        model = make()
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        hooks = [] if every is None else [sg.DeadReLUCounter(every=every, window=10**9)]
        guard = sg.Guard(model, opt, hooks=hooks, sinks=[], check_every=10**9)
        setups[label] = (model, opt, guard)
    x, y = batch
    times: dict[str, list[float]] = {k: [] for k in variants}
    for r in range(rounds + 1):
        for label, (model, opt, _) in setups.items():
            t0 = time.process_time()
            for _ in range(block):
                opt.zero_grad(set_to_none=True)
                F.cross_entropy(model(x), y).backward()
                opt.step()
            if r:  # the first round warms up
                times[label].append((time.process_time() - t0) / block)
    base = statistics.median(times["plain"])
    print(f"{name}: plain step {base * 1e3:.1f} ms")
    for label in variants:
        med = statistics.median(times[label])
        print(f"  {label:20s} {med * 1e3:7.2f} ms  x{med / base:.3f}")
    for _, _, guard in setups.values():
        guard.close()


def main() -> None:
    torch.set_num_threads(1)
    bench("MLP 512-1024x3-10 (3.1 M params), batch 64", mlp, (torch.randn(64, 512), torch.randint(0, 10, (64,))))
    bench("CNN 4 conv+BN+ReLU, 3x32x32, batch 32", cnn, (torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,))))


if __name__ == "__main__":
    main()
