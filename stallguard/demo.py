"""Small, deliberately broken training runs that show stallguard at work (``python -m stallguard demo``).

Each demo is a plain PyTorch loop on data generated in code, small enough to run on a CPU in seconds, with
one real fault of the kind people ask about: a learning rate off by orders of magnitude, a missing
``zero_grad()``, an optimizer built over another model's parameters, labels without signal, and so on.
There is one demo per cause in :data:`stallguard.CAUSES`, plus a healthy run that must stay quiet.

Example:
    >>> from stallguard.demo import DEMOS, run_demo
    >>> DEMOS["lr_too_high"].cause
    'lr_too_high'
    >>> guard = run_demo("healthy", steps=60, out=lambda line: None)
    >>> guard.diagnose()
    []
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DEMOS", "Demo", "Run", "live_printer", "run_demo"]

Step = Callable[[Any], None]


@dataclass
class Run:
    """One demo's training setup: the model, its optimizer, and one training iteration.

    Attributes:
        model: The model the Guard watches.
        optimizer: Its optimizer.
        step: ``step(guard)`` runs one iteration of the loop (forward, backward, ``guard.observe``,
            ``optimizer.step()``).
        steps: Optimizer steps the demo runs by default.
        check_every: The Guard's check interval.
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    step: Step
    steps: int
    check_every: int = 25


@dataclass(frozen=True)
class Demo:
    """A named demo: which cause it shows, what it does, and how to build it.

    Attributes:
        name: The name ``--fault`` takes.
        cause: The id from ``stallguard.CAUSES`` the diagnosis should rank first (None: healthy).
        summary: One line: the model and the fault.
        build: ``build(seed)`` returns a fresh :class:`Run`.
        quick_steps: Enough steps for the diagnosis to find the cause (tests use it).
    """

    name: str
    cause: str | None
    summary: str
    build: Callable[[int], Run] = field(repr=False)
    quick_steps: int | None = None


# ----------------------------------------------------------------------------------------------- data
def _blobs(gen: torch.Generator, n: int = 2048, d: int = 20, classes: int = 4, spread: float = 2.0):
    """Gaussian clusters around random centers: standardized features, a learnable class structure."""
    centers = torch.randn(classes, d, generator=gen) * spread
    y = torch.randint(0, classes, (n,), generator=gen)
    x = centers[y] + torch.randn(n, d, generator=gen)
    x = (x - x.mean(0)) / x.std(0)
    return x, y


def _images(gen: torch.Generator, n: int = 1024, size: int = 12):
    """Noise images whose class (of 4) is the brighter quadrant, standardized."""
    x = torch.randn(n, 1, size, size, generator=gen)
    y = torch.randint(0, 4, (n,), generator=gen)
    half = size // 2
    for c in range(4):
        r, col = divmod(c, 2)
        x[y == c, :, r * half : (r + 1) * half, col * half : (col + 1) * half] += 1.0
    return (x - x.mean()) / x.std(), y


def _sequences(gen: torch.Generator, n: int = 1024, length: int = 12, d: int = 4):
    """Sequences whose class (of 3) is set by the sign pattern of the first channel's running sum."""
    x = torch.randn(n, length, d, generator=gen)
    s = x[:, :, 0].sum(1)
    y = (s > 1.0).long() + (s > -1.0).long()  # three roughly balanced classes
    return x, y


def _rings(gen: torch.Generator, n: int = 2048):
    """Two concentric rings in 2-D: a linear model cannot separate them."""
    radius = torch.where(torch.rand(n, generator=gen) < 0.5, 1.0, 2.5)
    angle = torch.rand(n, generator=gen) * 2 * math.pi
    x = torch.stack([radius * torch.cos(angle), radius * torch.sin(angle)], 1)
    x = x + 0.15 * torch.randn(n, 2, generator=gen)
    y = (radius > 1.5).long()
    return x / x.std(0), y


# --------------------------------------------------------------------------------------------- models
def _mlp(d: int, classes: int, hidden: int = 64, depth: int = 2, act: type[nn.Module] = nn.ReLU) -> nn.Sequential:
    layers: list[nn.Module] = []
    width = d
    for _ in range(depth):
        layers += [nn.Linear(width, hidden), act()]
        width = hidden
    layers.append(nn.Linear(width, classes))
    return nn.Sequential(*layers)


def _cnn(classes: int = 4) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, classes),
    )


class _RNNClassifier(nn.Module):
    """An RNN/LSTM/GRU over a sequence, classifying from the last hidden state."""

    def __init__(self, cell: type[nn.Module], d: int = 4, hidden: int = 32, classes: int = 3) -> None:
        super().__init__()
        self.rnn = cell(d, hidden, batch_first=True)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


class _RNNRegressor(nn.Module):
    """A tanh RNN with a linear head on the last hidden state; ``recurrent_scale`` scales its recurrent weights."""

    def __init__(self, recurrent_scale: float = 1.0, d: int = 4, hidden: int = 32) -> None:
        super().__init__()
        self.rnn = nn.RNN(d, hidden, batch_first=True)
        self.head = nn.Linear(hidden, 1)
        with torch.no_grad():
            self.rnn.weight_hh_l0.mul_(recurrent_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


class _TinyTransformer(nn.Module):
    """One pre-norm transformer encoder layer over a sequence, mean-pooled, with a linear head."""

    def __init__(self, d_in: int = 4, d_model: int = 32, classes: int = 3, length: int = 12) -> None:
        super().__init__()
        self.embed = nn.Linear(d_in, d_model)
        self.pos = nn.Parameter(0.02 * torch.randn(length, d_model))
        self.encoder = nn.TransformerEncoderLayer(
            d_model, nhead=4, dim_feedforward=64, dropout=0.0, batch_first=True, norm_first=True
        )
        self.head = nn.Linear(d_model, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.encoder(self.embed(x) + self.pos[: x.shape[1]])
        return self.head(h.mean(1))


# ----------------------------------------------------------------------------------------------- loops
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
    val: tuple[torch.Tensor, torch.Tensor] | None = None,
    val_every: int = 10,
) -> Step:
    """The usual loop body: a random batch, forward, loss, zero_grad, backward, observe, step."""
    count = [0]

    def step(guard: Any) -> None:
        idx = torch.randint(0, x.shape[0], (batch,), generator=gen)
        xb, yb = x[idx], y[idx]
        out = model(xb)
        loss = loss_fn(out, yb)
        if zero_grad:
            opt.zero_grad()
        loss.backward()
        metrics: dict[str, Any] = {}
        count[0] += 1
        if val is not None and count[0] % val_every == 0:
            with torch.no_grad():
                metrics["val_loss"] = loss_fn(model(val[0]), val[1])
        guard.observe(loss, inputs=xb, outputs=out.detach(), targets=yb, **metrics)
        opt.step()

    return step


# ---------------------------------------------------------------------------------------------- faults
def _lr_too_high(seed: int) -> Run:
    # Adam at lr=0.3, 300x its usual 1e-3: the first updates overshoot, the loss spikes a hundredfold,
    # most ReLUs die in the blow-up, and what is left of the network sits at a flat loss at chance.
    gen = torch.Generator().manual_seed(seed)
    x, y = _blobs(gen, spread=0.5)
    model = _mlp(x.shape[1], 4, hidden=64, depth=3)
    opt = torch.optim.Adam(model.parameters(), lr=0.3)
    return Run(model, opt, _supervised(model, opt, x, y, gen), steps=300)


def _lr_too_low(seed: int) -> Run:
    # A CNN with SGD at lr=1e-5: every update is a millionth of the weights, and the loss does not move.
    gen = torch.Generator().manual_seed(seed)
    x, y = _images(gen)
    model = _cnn()
    opt = torch.optim.SGD(model.parameters(), lr=1e-5, momentum=0.9)
    return Run(model, opt, _supervised(model, opt, x, y, gen, batch=32), steps=300)


def _bad_init(seed: int) -> Run:
    # Every weight set to the same constant: all hidden units compute the same thing and get the same
    # gradient, so the 64-unit layers act as one unit forever.
    gen = torch.Generator().manual_seed(seed)
    x, y = _blobs(gen)
    model = _mlp(x.shape[1], 4, hidden=64, depth=2)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear):
                m.weight.fill_(0.05)
                m.bias.zero_()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    return Run(model, opt, _supervised(model, opt, x, y, gen), steps=300)


def _over_regularization(seed: int) -> Run:
    # weight_decay=0.5 where 1e-4 is typical: the decay pulls every weight to zero harder than the loss
    # gradient pushes it out, so the model stays near its all-zero output.
    gen = torch.Generator().manual_seed(seed)
    x, y = _blobs(gen, spread=0.6)
    model = _mlp(x.shape[1], 4, hidden=64, depth=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=0.5)
    return Run(model, opt, _supervised(model, opt, x, y, gen), steps=300)


def _unnormalized_inputs(seed: int) -> Run:
    # Raw 0-255 pixels into a CNN: the first layer's outputs are in the hundreds, the loss jumps around
    # and the network learns far slower than on the same images scaled to mean 0, std 1.
    gen = torch.Generator().manual_seed(seed)
    x, y = _images(gen)
    raw = (x * 40.0 + 120.0).clamp(0.0, 255.0).round()
    model = _cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    return Run(model, opt, _supervised(model, opt, raw, y, gen, batch=32), steps=300)


def _dying_relu(seed: int) -> Run:
    # Biases started at -4: every pre-activation is negative, so the ReLUs output zero for every input,
    # pass no gradient back, and never come back to life.
    gen = torch.Generator().manual_seed(seed)
    x, y = _blobs(gen)
    model = _mlp(x.shape[1], 4, hidden=64, depth=3)
    with torch.no_grad():
        for m in list(model.modules())[:-1]:
            if isinstance(m, nn.Linear):
                m.bias.fill_(-4.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    return Run(model, opt, _supervised(model, opt, x, y, gen), steps=300)


def _saturated_activations(seed: int) -> Run:
    # A sigmoid MLP whose hidden biases start at +5 (a tip for ReLUs, misapplied): every unit outputs
    # ~0.99 whatever the input, where the sigmoid is flat, so the features carry nothing and almost no
    # gradient passes back; the loss stays where it started.
    gen = torch.Generator().manual_seed(seed)
    x, y = _blobs(gen)
    model = _mlp(x.shape[1], 4, hidden=64, depth=2, act=nn.Sigmoid)
    with torch.no_grad():
        for m in list(model.modules())[1:-1]:
            if isinstance(m, nn.Linear):
                m.bias.fill_(5.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    return Run(model, opt, _supervised(model, opt, x, y, gen), steps=300)


def _vanishing_gradients(seed: int) -> Run:
    # Twenty sigmoid layers: each multiplies the backward signal by at most 1/4, so the first layers
    # get gradients a million times smaller than the last and the loss stalls at chance.
    gen = torch.Generator().manual_seed(seed)
    x, y = _blobs(gen, d=16)
    model = _mlp(16, 4, hidden=32, depth=20, act=nn.Sigmoid)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return Run(model, opt, _supervised(model, opt, x, y, gen), steps=300)


def _exploding_gradients(seed: int) -> Run:
    # A vanilla RNN whose recurrent weights start 3x too large, trained on 30-step sequences with a
    # linear LR warm-up to 0.15 and no gradient clipping: calm for about 200 steps, then the backward
    # signal, multiplied at every time step, blows up by orders of magnitude and the loss with it.
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 30, 4, generator=gen)
    y = x[:, :, 0].sum(1, keepdim=True) * 0.1
    model = _RNNRegressor(recurrent_scale=3.0)
    peak, warmup = 0.15, 300
    opt = torch.optim.SGD(model.parameters(), lr=peak / warmup)
    inner = _supervised(model, opt, x, y, gen, batch=64, loss_fn=F.mse_loss)
    count = [0]

    def step(guard: Any) -> None:
        count[0] += 1
        for group in opt.param_groups:
            group["lr"] = peak * min(1.0, count[0] / warmup)
        inner(guard)

    return Run(model, opt, step, steps=400)


def _class_imbalance(seed: int) -> Run:
    # 95% of the labels are class 0 and the minority classes are only weakly separated: the model
    # predicts class 0 for everything, scores 95% accuracy, and never learns the other classes.
    gen = torch.Generator().manual_seed(seed)
    n, d = 4096, 20
    y = torch.where(torch.rand(n, generator=gen) < 0.95, 0, torch.randint(1, 4, (n,), generator=gen))
    centers = torch.randn(4, d, generator=gen) * 0.1
    x = centers[y] + torch.randn(n, d, generator=gen)
    model = _mlp(d, 4, hidden=32, depth=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    return Run(model, opt, _supervised(model, opt, x, y, gen, batch=256), steps=300)


def _missing_zero_grad(seed: int) -> Run:
    # A GRU classifier whose loop forgot optimizer.zero_grad(): every step adds its gradient to all
    # earlier ones, the updates grow step after step and the loss swings instead of falling.
    gen = torch.Generator().manual_seed(seed)
    x, y = _sequences(gen)
    model = _RNNClassifier(nn.GRU)
    opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    return Run(model, opt, _supervised(model, opt, x, y, gen, batch=32, zero_grad=False), steps=300)


def _params_not_updated(seed: int) -> Run:
    # The optimizer was built over a copy of the model (made before a re-initialisation), so
    # optimizer.step() updates weights nobody uses and the trained model never changes.
    gen = torch.Generator().manual_seed(seed)
    x, y = _sequences(gen)
    model = _TinyTransformer()
    stale = copy.deepcopy(model)
    opt = torch.optim.Adam(stale.parameters(), lr=1e-3)
    return Run(model, opt, _supervised(model, opt, x, y, gen, batch=32), steps=300)


def _no_signal(seed: int) -> Run:
    # The labels were shuffled separately from the inputs: there is nothing to learn, and the loss
    # sits at the entropy of the label distribution however long the model trains.
    gen = torch.Generator().manual_seed(seed)
    x, y = _blobs(gen)
    y = y[torch.randperm(len(y), generator=gen)]
    model = _mlp(x.shape[1], 4, hidden=64, depth=2)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    return Run(model, opt, _supervised(model, opt, x, y, gen), steps=300)


def _insufficient_capacity(seed: int) -> Run:
    # Two stacked Linear layers with no activation between them are one linear map: it cannot separate
    # two concentric rings, learns what a line can, and stalls near chance.
    gen = torch.Generator().manual_seed(seed)
    x, y = _rings(gen)
    model = nn.Sequential(nn.Linear(2, 32), nn.Linear(32, 2))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    return Run(model, opt, _supervised(model, opt, x, y, gen), steps=300)


def _overfitting(seed: int) -> Run:
    # 64 noisy training samples, a wide MLP, no regularization: the training loss falls towards zero
    # while the loss on held-out samples (observed as val_loss) climbs.
    gen = torch.Generator().manual_seed(seed)
    x, y = _blobs(gen, n=1088, spread=0.5)
    flip = torch.rand(len(y), generator=gen) < 0.3
    y = torch.where(flip, torch.randint(0, 4, (len(y),), generator=gen), y)
    train, val = (x[:64], y[:64]), (x[64:], y[64:])
    model = _mlp(x.shape[1], 4, hidden=256, depth=2)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    return Run(model, opt, _supervised(model, opt, *train, gen, batch=32, val=val), steps=400)


def _non_finite(seed: int) -> Run:
    # A tabular data set with a few missing values read as NaN: the first batch that holds one makes
    # the loss and every gradient NaN, and the weights are NaN from then on.
    gen = torch.Generator().manual_seed(seed)
    x, y = _blobs(gen)
    rows = torch.randint(0, x.shape[0], (8,), generator=gen)
    x[rows, 3] = float("nan")
    model = _mlp(x.shape[1], 4)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    return Run(model, opt, _supervised(model, opt, x, y, gen), steps=200)


def _healthy(seed: int) -> Run:
    gen = torch.Generator().manual_seed(seed)
    x, y = _blobs(gen)
    model = _mlp(x.shape[1], 4)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    return Run(model, opt, _supervised(model, opt, x, y, gen), steps=400)


#: Every demo, by name: one per cause in ``stallguard.CAUSES``, and a healthy run. The default
#: (``python -m stallguard demo``) is the first.
DEMOS: dict[str, Demo] = {
    d.name: d
    for d in [
        Demo("lr_too_high", "lr_too_high", "3-layer ReLU MLP trained with Adam at lr=0.3", _lr_too_high, 200),
        Demo("lr_too_low", "lr_too_low", "small CNN, SGD lr=1e-5", _lr_too_low, 200),
        Demo("bad_init", "bad_init", "ReLU MLP with every weight set to 0.05", _bad_init, 200),
        Demo("over_regularization", "over_regularization", "ReLU MLP, SGD weight_decay=0.5", _over_regularization, 200),
        Demo("unnormalized_inputs", "unnormalized_inputs", "small CNN fed raw 0-255 pixels", _unnormalized_inputs, 200),
        Demo("dying_relu", "dying_relu", "3-layer ReLU MLP with biases started at -4", _dying_relu, 200),
        Demo(
            "saturated_activations",
            "saturated_activations",
            "sigmoid MLP with hidden biases started at +5",
            _saturated_activations,
            200,
        ),
        Demo("vanishing_gradients", "vanishing_gradients", "20-layer sigmoid MLP", _vanishing_gradients, 200),
        Demo(
            "exploding_gradients",
            "exploding_gradients",
            "vanilla RNN with recurrent weights 3x too large, LR warm-up to 0.15, no clipping",
            _exploding_gradients,
            300,
        ),
        Demo("class_imbalance", "class_imbalance", "MLP on labels that are 95% class 0", _class_imbalance),
        Demo("missing_zero_grad", "missing_zero_grad", "GRU classifier, loop without zero_grad()", _missing_zero_grad),
        Demo(
            "params_not_updated",
            "params_not_updated",
            "tiny transformer whose optimizer holds a copy's parameters",
            _params_not_updated,
            150,
        ),
        Demo("no_signal", "no_signal", "MLP on labels shuffled apart from their inputs", _no_signal, 200),
        Demo(
            "insufficient_capacity",
            "insufficient_capacity",
            "two Linear layers without an activation on concentric rings",
            _insufficient_capacity,
            200,
        ),
        Demo("overfitting", "overfitting", "wide MLP on 64 noisy samples, val_loss observed", _overfitting, 300),
        Demo("non_finite", "non_finite", "MLP on tabular data with a few NaN values", _non_finite, 75),
        Demo("healthy", None, "ReLU MLP, Adam lr=1e-3: a run that should stay quiet", _healthy, 200),
    ]
}


# ------------------------------------------------------------------------------------------------- run
def live_printer(out: Callable[[str], None] = print) -> Callable[[Any], None]:
    """An event handler for a ``CallableSink`` that prints events as they happen, folding repeats.

    The first event of a kind from a hook is printed in full; repeats of it are printed only at the
    2nd, 4th, 8th, ... occurrence, with the count, so a fault reported at every check point does not
    flood the screen (the report at the end folds them the same way).

    Args:
        out: Where to print each line.

    Example:
        >>> import stallguard as sg
        >>> show = live_printer()
        >>> for step in (25, 50, 75):
        ...     show(sg.Event(kind="plateau", severity="warning", message="flat", step=step))
          step    25  warning  plateau                flat
          step    50  warning  plateau                flat (x2)
    """
    seen: dict[tuple[str, str], int] = {}

    def show(e: Any) -> None:
        key = (e.kind, e.source)
        n = seen[key] = seen.get(key, 0) + 1
        if n > 1 and n & (n - 1):
            return
        again = f" (x{n})" if n > 1 else ""
        out(f"  step {e.step:>5}  {e.severity!s:8} {e.kind:22} {e.message}{again}")

    return show


def run_demo(
    name: str,
    *,
    seed: int = 0,
    steps: int | None = None,
    repair: bool = False,
    sinks: list[Any] | None = None,
    out: Callable[[str], None] = print,
    report: bool = True,
) -> Any:
    """Run demo ``name`` under a default Guard and return the closed Guard.

    The run uses one CPU thread (these models are tiny; more threads mostly wait on each other) and
    restores the thread count afterwards.

    Args:
        name: A key of :data:`DEMOS`.
        seed: Seed of the data, the model and the batches.
        steps: Optimizer steps (the demo's own default when None).
        repair: Run ``Guard(..., repair=True)``.
        sinks: Sinks for the Guard (events are printed as they happen when None).
        out: Where to print.
        report: Print ``guard.report()`` at the end.

    Raises:
        ValueError: for an unknown demo name or a step count below 1.
    """
    from .guard import Guard
    from .sinks import CallableSink

    if name not in DEMOS:
        raise ValueError(f"unknown demo {name!r}; known demos: {', '.join(DEMOS)}")
    if steps is not None and (not isinstance(steps, int) or isinstance(steps, bool) or steps < 1):
        raise ValueError(f"run_demo: steps must be a positive int or None, got {steps!r}")
    demo = DEMOS[name]
    threads = torch.get_num_threads()
    # These models are tiny: one thread beats several, which mostly wait on each other.
    torch.set_num_threads(1)
    try:
        torch.manual_seed(seed)
        run = demo.build(seed)
        total = steps if steps is not None else run.steps
        if sinks is None:
            sinks = [CallableSink(live_printer(out), "info")]
        shows = f"shows {demo.cause}" if demo.cause else "a healthy run"
        out(f"demo {demo.name} ({shows}): {demo.summary}; {total} steps, repair={'on' if repair else 'off'}")
        start = time.perf_counter()
        guard = Guard(run.model, run.optimizer, sinks=sinks, repair=repair, check_every=run.check_every)
        with guard:
            for _ in range(total):
                run.step(guard)
                if guard.should_stop:
                    out(f"  stopping early: {'; '.join(guard.stop_reasons)}")
                    break
        elapsed = time.perf_counter() - start
    finally:
        torch.set_num_threads(threads)
    loss = guard.series("loss").values if guard.has_series("loss") else []
    last = float(loss[-1]) if len(loss) else math.nan
    out(f"done in {elapsed:.1f}s; final loss {last:.4g}\n")
    if report:
        out(guard.report())
    return guard
