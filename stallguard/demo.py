"""Small, deliberately broken training runs that show stallguard at work (``python -m stallguard demo``).

Each demo is a plain PyTorch loop on data generated in code, small enough to run on a CPU in seconds.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DEMOS", "Demo", "Run", "run_demo"]


@dataclass
class Run:
    """One demo's training setup: the model, its optimizer(s), and one training iteration."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    step: Callable[[Any], None]  # step(guard): one iteration, calling guard.observe(...)
    steps: int
    check_every: int = 25


@dataclass(frozen=True)
class Demo:
    """A named demo: which cause it shows and how to build it."""

    name: str
    cause: str | None
    summary: str
    build: Callable[[int], Run]


def _classification_data(gen: torch.Generator, n: int = 2048, d: int = 20, classes: int = 4):
    centers = torch.randn(classes, d, generator=gen) * 2.0
    y = torch.randint(0, classes, (n,), generator=gen)
    x = centers[y] + torch.randn(n, d, generator=gen)
    return x, y


def _mlp(d: int, classes: int, hidden: int = 64, depth: int = 2, act: type[nn.Module] = nn.ReLU) -> nn.Sequential:
    layers: list[nn.Module] = []
    width = d
    for _ in range(depth):
        layers += [nn.Linear(width, hidden), act()]
        width = hidden
    layers.append(nn.Linear(width, classes))
    return nn.Sequential(*layers)


def _supervised(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    gen: torch.Generator,
    *,
    batch: int = 64,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
    zero_grad: bool = True,
) -> Callable[[Any], None]:
    def step(guard: Any) -> None:
        idx = torch.randint(0, x.shape[0], (batch,), generator=gen)
        xb, yb = x[idx], y[idx]
        out = model(xb)
        loss = loss_fn(out, yb)
        if zero_grad:
            opt.zero_grad()
        loss.backward()
        guard.observe(loss, inputs=xb, outputs=out, targets=yb)
        opt.step()

    return step


def _lr_too_high(seed: int) -> Run:
    gen = torch.Generator().manual_seed(seed)
    x, y = _classification_data(gen)
    model = _mlp(x.shape[1], 4)
    opt = torch.optim.SGD(model.parameters(), lr=3.0, momentum=0.9)
    return Run(model, opt, _supervised(model, opt, x, y, gen), steps=400)


def _lr_too_low(seed: int) -> Run:
    gen = torch.Generator().manual_seed(seed)
    x, y = _classification_data(gen)
    model = _mlp(x.shape[1], 4)
    opt = torch.optim.SGD(model.parameters(), lr=1e-5)
    return Run(model, opt, _supervised(model, opt, x, y, gen), steps=600)


def _healthy(seed: int) -> Run:
    gen = torch.Generator().manual_seed(seed)
    x, y = _classification_data(gen)
    model = _mlp(x.shape[1], 4)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    return Run(model, opt, _supervised(model, opt, x, y, gen), steps=600)


#: Every demo, by name. The default (``python -m stallguard demo``) is the first.
DEMOS: dict[str, Demo] = {
    d.name: d
    for d in [
        Demo("lr_too_high", "lr_too_high", "SGD with lr=3 and momentum on a 4-class MLP", _lr_too_high),
        Demo("lr_too_low", "lr_too_low", "SGD with lr=1e-5 on the same MLP", _lr_too_low),
        Demo("healthy", None, "Adam with lr=1e-3: a run that should stay quiet", _healthy),
    ]
}


def run_demo(
    name: str,
    *,
    seed: int = 0,
    steps: int | None = None,
    repair: bool = False,
    sinks: list[Any] | None = None,
    out: Callable[[str], None] = print,
) -> Any:
    """Run demo ``name`` under a default Guard and return the closed Guard.

    Args:
        name: A key of :data:`DEMOS`.
        seed: Seed of the data, the model and the batches.
        steps: Optimizer steps (the demo's own default when None).
        repair: Run ``Guard(..., repair=True)``.
        sinks: Sinks for the Guard (events are printed as they happen when None).
        out: Where to print.
    """
    from .guard import Guard
    from .sinks import CallableSink

    if name not in DEMOS:
        raise ValueError(f"unknown demo {name!r}; known demos: {', '.join(DEMOS)}")
    demo = DEMOS[name]
    torch.manual_seed(seed)
    run = demo.build(seed)
    total = steps if steps is not None else run.steps
    if sinks is None:
        sinks = [CallableSink(lambda e: out(f"  step {e.step:>5}  {e.severity!s:8} {e.kind:22} {e.message}"), "info")]
    out(f"demo {demo.name}: {demo.summary}; {total} steps, repair={'on' if repair else 'off'}")
    start = time.perf_counter()
    threads = torch.get_num_threads()
    # These models are tiny: one thread beats several, which mostly wait on each other.
    torch.set_num_threads(1)
    guard = Guard(run.model, run.optimizer, sinks=sinks, repair=repair, check_every=run.check_every)
    try:
        with guard:
            for _ in range(total):
                run.step(guard)
                if guard.should_stop:
                    out(f"  stopping early: {'; '.join(guard.stop_reasons)}")
                    break
    finally:
        torch.set_num_threads(threads)
    loss = guard.series("loss").values if guard.has_series("loss") else []
    last = float(loss[-1]) if len(loss) else math.nan
    out(f"done in {time.perf_counter() - start:.1f}s; final loss {last:.4g}\n")
    out(guard.report())
    return guard
