"""Measure dead-ReLU fractions on healthy and dying runs, to choose DeadReLUCounter's defaults.

Runs small seeded CPU trainings with a DeadReLUCounter and prints, per run, the largest dead fraction
any layer showed in any window, and the fraction at the end. The numbers are recorded in
docs/hooks/dead_relu.md.

    python benchmarks/dead_relu_defaults.py            # all runs
    python benchmarks/dead_relu_defaults.py --quick    # fewer steps
"""

from __future__ import annotations

import argparse
import itertools
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

import stallguard as sg


def teacher_task(d_in: int, classes: int, seed: int) -> Callable[[int], tuple[torch.Tensor, torch.Tensor]]:
    """Labels from a fixed random teacher network: learnable, and never saturated."""
    g = torch.Generator().manual_seed(seed)
    w1, w2 = torch.randn(d_in, 64, generator=g), torch.randn(64, classes, generator=g)

    def batch(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(n, d_in)
        return x, (torch.tanh(x @ w1 / math.sqrt(d_in)) @ w2).argmax(1)

    return batch


def bar_images(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """16x16 images of a noisy bar; the class is its orientation (4 classes)."""
    y = torch.randint(0, 4, (n,))
    x = 0.3 * torch.randn(n, 1, 16, 16)
    idx = torch.arange(16)
    for i in range(n):
        k, off = int(y[i]), int(torch.randint(4, 12, ()))
        if k == 0:
            x[i, 0, off, :] += 1.0
        elif k == 1:
            x[i, 0, :, off] += 1.0
        elif k == 2:
            x[i, 0, idx, idx] += 1.0
        else:
            x[i, 0, idx, 15 - idx] += 1.0
    return x, y


def mlp(widths: list[int], classes: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for a, b in itertools.pairwise(widths):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(widths[-1], classes))


def cnn(bn: bool) -> nn.Sequential:
    def block(a: int, b: int) -> list[nn.Module]:
        return [nn.Conv2d(a, b, 3, padding=1), *([nn.BatchNorm2d(b)] if bn else []), nn.ReLU()]

    return nn.Sequential(
        *block(1, 16),
        *block(16, 32),
        nn.MaxPool2d(2),
        *block(32, 32),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 4),
    )


def run(
    name: str,
    make: Callable[[], nn.Module],
    opt_fn,
    data,
    steps: int,
    batch: int,
    *,
    every: int,
    window: int,
    setup: Callable[[nn.Module], None] | None = None,
    seed: int = 0,
) -> dict[str, float]:
    torch.manual_seed(seed)
    model = make()
    if setup is not None:
        setup(model)
    opt = opt_fn(model.parameters())
    counter = sg.DeadReLUCounter(every=every, window=window, threshold=0.999)
    guard = sg.Guard(model, opt, hooks=[counter], sinks=[], check_every=every * window, strict=True)
    worst, first_loss, last_loss = 0.0, None, 0.0
    worst_layer = ""
    for _ in range(steps):
        x, y = data(batch)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        first_loss = loss.item() if first_loss is None else first_loss
        last_loss = 0.9 * last_loss + 0.1 * loss.item() if last_loss else loss.item()
    for e in guard.events:
        if e.kind == "dead_fraction" and e.data["max_fraction"] > worst:
            worst = e.data["max_fraction"]
            worst_layer = max(e.data["fractions"], key=e.data["fractions"].get)
    final = counter.dead_fractions
    guard.close()
    print(
        f"{name:44s} loss {first_loss:6.3f} -> {last_loss:6.3f}  worst window {worst:6.1%} ({worst_layer})  "
        f"final max {max(final.values()):6.1%}  final {{{', '.join(f'{k}: {v:.0%}' for k, v in final.items())}}}"
    )
    return {"worst": worst, "final": max(final.values())}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="300 steps and one seed instead of 1000 and three")
    args = parser.parse_args()
    torch.set_num_threads(1)
    steps = 300 if args.quick else 1000
    seeds = (0,) if args.quick else (0, 1, 2)
    task = teacher_task(20, 10, seed=1)

    def adam(lr: float) -> Callable:
        return lambda p: torch.optim.Adam(p, lr=lr)

    def sgd(lr: float) -> Callable:
        return lambda p: torch.optim.SGD(p, lr=lr, momentum=0.9)

    def negative_bias(layer: int, value: float) -> Callable[[nn.Module], None]:
        def setup(m: nn.Module) -> None:
            with torch.no_grad():
                m[layer].bias.fill_(value)

        return setup

    wide, narrow, deep = [20, 256, 256, 256], [20, 16, 16, 16], [20] + [64] * 8
    healthy = [
        ("MLP 20-256x3-10, Adam 1e-3, batch 64", lambda: mlp(wide, 10), adam(1e-3), task, steps, 64),
        ("MLP 20-256x3-10, SGD 0.05 m0.9, batch 64", lambda: mlp(wide, 10), sgd(0.05), task, steps, 64),
        ("MLP 20-16x3-10, Adam 1e-3, batch 32", lambda: mlp(narrow, 10), adam(1e-3), task, steps, 32),
        ("MLP 20-64x8-10 no BN, Adam 1e-3, batch 32", lambda: mlp(deep, 10), adam(1e-3), task, steps, 32),
        ("MLP 20-64x8-10 no BN, SGD 0.05 m0.9, b 32", lambda: mlp(deep, 10), sgd(0.05), task, steps, 32),
        ("CNN 3 conv no BN, Adam 1e-3, batch 32", lambda: cnn(bn=False), adam(1e-3), bar_images, steps // 2, 32),
        ("CNN 3 conv + BN, SGD 0.05 m0.9, batch 32", lambda: cnn(bn=True), sgd(0.05), bar_images, steps // 2, 32),
    ]
    print("== healthy runs (every=10, window=5) ==")
    for name, make, opt, data, n, batch in healthy:
        for seed in seeds:
            run(f"{name} s{seed}", make, opt, data, n, batch, every=10, window=5, seed=seed)

    print("== window length on healthy runs, batch 8 (every=10) ==")
    for window in (1, 2, 5, 10):
        for seed in seeds:
            run(
                f"MLP 20-16x3-10, window={window} s{seed}",
                lambda: mlp(narrow, 10),
                adam(1e-3),
                task,
                steps,
                8,
                every=10,
                window=window,
                seed=seed,
            )
    for window in (1, 2, 5, 10):
        for seed in seeds:
            run(
                f"MLP 20-256x3-10, window={window} s{seed}",
                lambda: mlp(wide, 10),
                adam(1e-3),
                task,
                steps,
                8,
                every=10,
                window=window,
                seed=seed,
            )

    print("== dying runs (every=10, window=5) ==")
    dying = [
        ("MLP 256x3, layer-2 biases -10", lambda: mlp(wide, 10), adam(1e-3), task, 200, 64, negative_bias(2, -10.0)),
        ("MLP 256x3, layer-2 biases -1", lambda: mlp(wide, 10), adam(1e-3), task, 200, 64, negative_bias(2, -1.0)),
        ("MLP 256x3, Adam lr 0.1 (100x too high)", lambda: mlp(wide, 10), adam(0.1), task, steps, 64, None),
        ("MLP 256x3, SGD lr 1.0 m0.9 (20x too high)", lambda: mlp(wide, 10), sgd(1.0), task, steps, 64, None),
        ("CNN no BN, Adam lr 0.05 (50x too high)", lambda: cnn(bn=False), adam(0.05), bar_images, steps // 2, 32, None),
    ]
    for name, make, opt, data, n, batch, setup in dying:
        for seed in seeds:
            run(f"{name} s{seed}", make, opt, data, n, batch, every=10, window=5, setup=setup, seed=seed)


if __name__ == "__main__":
    main()
