"""The stall zoo: small training runs, each labelled with the one cause that makes it fail (or "healthy").

Every scenario is a plain PyTorch loop on data generated in code from a seed. ``build(seed, fixed)``
returns a :class:`Run`; with ``fixed=True`` it returns the scenario's *fixed twin*, the same run with
the fault removed, which the runner uses to check that the fault truly shows. Each scenario also
names:

* ``fault``: a predicate on the unguarded outcome (and the twin's) that says whether the fault
  showed. A scenario whose fault does not show is reported *invalid* and left out of the scores.
* ``onset``: the step from which the fault counts as showing (0 for faults present from the first
  step; the first non-finite loss, the best validation step, ... for faults that appear later).
  Detection latency is measured from it.
* ``repairable``: whether an optimizer-level setting (LR, clipping, skipping) can fix it, so that
  ``Guard(repair=True)`` is measured on it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .models import CNN, RNNClassifier, TinyTransformer, blobs, images, mlp, regression, sequences, tokens

__all__ = ["SCENARIOS", "Observe", "Outcome", "Run", "Scenario"]


class Observe(Protocol):
    def __call__(
        self, loss: Any = None, *, inputs: Any = None, outputs: Any = None, targets: Any = None, **metrics: Any
    ) -> None: ...


@dataclass
class Run:
    """One built scenario: model, optimizer, one optimizer step, how many, and how to score the result.

    ``step(i, observe)`` runs optimizer step ``i``: zero_grad (unless the scenario forgets it), forward,
    backward, ``observe(loss, inputs=..., outputs=..., targets=...)`` after backward, ``optimizer.step()``.
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    step: Callable[[int, Observe], None]
    steps: int
    evaluate: Callable[[], dict[str, float]]
    epoch_steps: int
    task: str = "classification"


@dataclass
class Outcome:
    """What one run of a scenario produced."""

    losses: list[float]
    initial: dict[str, float]
    final: dict[str, float]
    seconds: float
    val: list[tuple[int, float]] = field(default_factory=list)

    @property
    def final_loss(self) -> float:
        return self.final["loss"]

    def first_nonfinite(self) -> int | None:
        for i, v in enumerate(self.losses):
            if not math.isfinite(v):
                return i
        return None


Predicate = Callable[[Outcome, "Outcome | None"], tuple[bool, str]]
Onset = Callable[[Outcome], int]


@dataclass(frozen=True)
class Scenario:
    """A named training run with its true cause, how to tell that the fault showed, and when it did."""

    name: str
    cause: str  # an id of stallguard.CAUSES, or "healthy"
    arch: str
    summary: str
    build: Callable[[int, bool], Run]
    fault: Predicate
    onset: Onset
    needs_twin: bool = True
    repairable: bool = False


# ----------------------------------------------------------------------------------------- predicates
def _finite(x: float) -> bool:
    return isinstance(x, float) and math.isfinite(x)


def worse_than_twin(ratio: float = 1.5, key: str = "loss") -> Predicate:
    """The fault shows when the final ``key`` is non-finite or ``ratio`` times the fixed twin's."""

    def check(out: Outcome, twin: Outcome | None) -> tuple[bool, str]:
        assert twin is not None
        a, b = out.final[key], twin.final[key]
        if not _finite(a):
            return True, f"final {key} {a} (twin {b:.4g})"
        if not _finite(b):
            return False, f"the fixed twin failed too (final {key} {b})"
        return a > ratio * b + 1e-3, f"final {key} {a:.4g} vs twin {b:.4g} (fault if > {ratio}x)"

    return check


def metric_below_twin(key: str, margin: float) -> Predicate:
    """The fault shows when the final ``key`` (higher is better) is ``margin`` below the fixed twin's."""

    def check(out: Outcome, twin: Outcome | None) -> tuple[bool, str]:
        assert twin is not None
        a, b = out.final[key], twin.final[key]
        return (not _finite(a)) or a < b - margin, f"final {key} {a:.3f} vs twin {b:.3f} (fault if < twin - {margin})"

    return check


def goes_nonfinite() -> Predicate:
    """The fault shows when the loss becomes NaN/Inf (and the fixed twin's stays finite)."""

    def check(out: Outcome, twin: Outcome | None) -> tuple[bool, str]:
        at = out.first_nonfinite()
        twin_ok = twin is None or (twin.first_nonfinite() is None and _finite(twin.final_loss))
        return at is not None and twin_ok, f"first non-finite loss at step {at}; twin finite: {twin_ok}"

    return check


def val_rises(frac: float = 0.15) -> Predicate:
    """The fault shows when the final validation loss is ``frac`` above its best while training falls."""

    def check(out: Outcome, twin: Outcome | None) -> tuple[bool, str]:
        vals = [v for _, v in out.val]
        if len(vals) < 3:
            return False, "no validation losses"
        best, last = min(vals), vals[-1]
        train_fell = out.final_loss < out.initial["loss"]
        return last > (1 + frac) * best and train_fell, f"val loss best {best:.4g}, last {last:.4g}"

    return check


def learns(frac: float = 0.6) -> Predicate:
    """For healthy runs: valid when the final loss is below ``frac`` of the initial loss."""

    def check(out: Outcome, twin: Outcome | None) -> tuple[bool, str]:
        a, b = out.final_loss, out.initial["loss"]
        return _finite(a) and a < frac * b, f"final loss {a:.4g} vs initial {b:.4g} (healthy if < {frac}x)"

    return check


def at_start(out: Outcome) -> int:
    return 0


def first_nonfinite(out: Outcome) -> int:
    at = out.first_nonfinite()
    return 0 if at is None else at


def best_val_step(out: Outcome) -> int:
    if not out.val:
        return 0
    return min(out.val, key=lambda sv: sv[1])[0]


def first_blowup(factor: float = 3.0) -> Onset:
    """The first step whose loss is non-finite, or above the first loss and ``factor`` times the best so far."""

    def onset(out: Outcome) -> int:
        best = math.inf
        for i, v in enumerate(out.losses):
            if not math.isfinite(v):
                return i
            if i >= 10 and v > factor * best and v > out.losses[0]:
                return i
            best = min(best, v)
        return 0

    return onset


# --------------------------------------------------------------------------------------- loop helpers
def _evaluator(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    task: str,
    val: tuple[Tensor, Tensor] | None = None,
    balanced: tuple[Tensor, Tensor] | None = None,
) -> Callable[[], dict[str, float]]:
    def evaluate() -> dict[str, float]:
        was = model.training
        model.eval()
        with torch.no_grad():
            out = model(x).float()
            res = {"loss": float(loss_fn(out, y))}
            if task == "classification":
                res["acc"] = float((out.argmax(1) == y).float().mean())
            if val is not None:
                vo = model(val[0]).float()
                res["val_loss"] = float(loss_fn(vo, val[1]))
            if balanced is not None:
                bo = model(balanced[0]).float().argmax(1)
                recalls = [float((bo[balanced[1] == c] == c).float().mean()) for c in balanced[1].unique()]
                res["balanced_acc"] = sum(recalls) / len(recalls)
        model.train(was)
        return res

    return evaluate


def _ce(out: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(out.float(), y)


def _mse(out: Tensor, y: Tensor) -> Tensor:
    return F.mse_loss(out.float(), y)


def supervised(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    x: Tensor,
    y: Tensor,
    g: torch.Generator,
    *,
    steps: int,
    batch: int = 64,
    loss_fn: Callable[[Tensor, Tensor], Tensor] = _ce,
    task: str = "classification",
    zero_grad: bool = True,
    scheduler: Any = None,
    accumulate: int = 1,
    autocast: bool = False,
    clip: float | None = None,
    penalty: Callable[[], Tensor] | None = None,
    val: tuple[Tensor, Tensor] | None = None,
    val_every: int = 10,
    balanced: tuple[Tensor, Tensor] | None = None,
    eval_loss: Callable[[Tensor, Tensor], Tensor] | None = None,
    batch_x: Callable[[Tensor], Tensor] | None = None,
    sample_weights: Tensor | None = None,
) -> Run:
    """The plain loop most scenarios share, with the knobs that the faults and healthy variants turn."""
    val_gen = val

    def step(i: int, observe: Observe) -> None:
        if zero_grad:
            opt.zero_grad()
        for _ in range(accumulate):
            if sample_weights is None:
                idx = torch.randint(0, x.shape[0], (batch,), generator=g)
            else:  # a WeightedRandomSampler's draw
                idx = torch.multinomial(sample_weights, batch, replacement=True, generator=g)
            xb, yb = x[idx], y[idx]
            if batch_x is not None:
                xb = batch_x(xb)
            if autocast:
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    out = model(xb)
                    loss = loss_fn(out, yb)
            else:
                out = model(xb)
                loss = loss_fn(out, yb)
            total = loss + penalty() if penalty is not None else loss
            (total / accumulate).backward()
            observe(total.detach(), inputs=xb, outputs=out.detach(), targets=yb)
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        if scheduler is not None:
            scheduler.step()
        if val_gen is not None and (i + 1) % val_every == 0:
            with torch.no_grad():
                was = model.training
                model.eval()
                v = loss_fn(model(val_gen[0]), val_gen[1])
                model.train(was)
            observe(val_loss=v)

    evaluate = _evaluator(model, x, y, eval_loss or loss_fn, task, val=val, balanced=balanced)
    return Run(model, opt, step, steps, evaluate, epoch_steps=max(1, x.shape[0] // (batch * accumulate)), task=task)


def _gen(seed: int) -> torch.Generator:
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


# ============================================================================================ faults
# ---------------------------------------------------------------------------------------- lr_too_high
def lr_high_mlp(seed: int, fixed: bool) -> Run:
    g = _gen(seed)
    x, y = blobs(g)
    model = mlp(16, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.05 if fixed else 3.0, momentum=0.9)
    return supervised(model, opt, x, y, g, steps=400)


def lr_high_cnn(seed: int, fixed: bool) -> Run:
    g = _gen(seed)
    x, y = images(g)
    model = CNN(4)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3 if fixed else 0.3)
    return supervised(model, opt, x, y, g, steps=400)


def lr_high_gru(seed: int, fixed: bool) -> Run:
    g = _gen(seed)
    x, y = sequences(g)
    model = RNNClassifier("GRU", 4, 32, 3)
    opt = torch.optim.RMSprop(model.parameters(), lr=1e-3 if fixed else 0.3)
    return supervised(model, opt, x, y, g, steps=400, batch=32)


def lr_plateau_regression(seed: int, fixed: bool) -> Run:
    g = _gen(seed)
    x, y = regression(g)
    model = mlp(8, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.01 if fixed else 0.05, momentum=0.9)
    return supervised(model, opt, x, y, g, steps=500, batch=16, loss_fn=_mse, task="regression")


def lr_plateau_lstm(seed: int, fixed: bool) -> Run:
    g = _gen(seed)
    x, y = sequences(g)
    model = RNNClassifier("LSTM", 4, 32, 3)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3 if fixed else 0.05)
    return supervised(model, opt, x, y, g, steps=400, batch=32)


# ----------------------------------------------------------------------------------------- lr_too_low
def lr_low_mlp(seed: int, fixed: bool) -> Run:
    g = _gen(seed)
    x, y = blobs(g)
    model = mlp(16, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.05 if fixed else 1e-5)
    return supervised(model, opt, x, y, g, steps=500)


def lr_low_transformer(seed: int, fixed: bool) -> Run:
    g = _gen(seed)
    x, y = tokens(g)
    model = TinyTransformer()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3 if fixed else 1e-7)
    return supervised(model, opt, x, y, g, steps=400, batch=32)


# ------------------------------------------------------------------------------------------- bad_init
def zero_init_mlp(seed: int, fixed: bool) -> Run:
    g = _gen(seed)
    x, y = blobs(g)
    model = mlp(16, 4)
    if not fixed:
        with torch.no_grad():
            for p in model.parameters():
                p.zero_()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    return supervised(model, opt, x, y, g, steps=400)


def constant_init_cnn(seed: int, fixed: bool) -> Run:
    g = _gen(seed)
    x, y = images(g)
    model = CNN(4)
    if not fixed:
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, (nn.Conv2d, nn.Linear)):
                    m.weight.fill_(0.05)
                    m.bias.fill_(0.0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    return supervised(model, opt, x, y, g, steps=400)


# -------------------------------------------------------------------------------- over_regularization
def weight_decay_mlp(seed: int, fixed: bool) -> Run:
    g = _gen(seed)
    x, y = blobs(g)
    model = mlp(16, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4 if fixed else 1.0)
    return supervised(model, opt, x, y, g, steps=400)


def l2_penalty_cnn(seed: int, fixed: bool) -> Run:
    g = _gen(seed)
    x, y = images(g)
    model = CNN(4)
    lam = 1e-5 if fixed else 0.5
    weights = [p for n, p in model.named_parameters() if n.endswith("weight")]

    def penalty() -> Tensor:
        return lam * sum((w * w).sum() for w in weights)

    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    return supervised(model, opt, x, y, g, steps=400, penalty=penalty)


def adamw_decay_gru(seed: int, fixed: bool) -> Run:
    g = _gen(seed)
    x, y = sequences(g)
    model = RNNClassifier("GRU", 4, 32, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01 if fixed else 30.0)
    return supervised(model, opt, x, y, g, steps=400, batch=32)


# -------------------------------------------------------------------------------- unnormalized_inputs
def raw_features_tanh_mlp(seed: int, fixed: bool) -> Run:
    g = _gen(seed)
    x, y = blobs(g)
    if not fixed:
        x = x * 40.0 + 300.0  # raw units: a mean in the hundreds, stds in the tens
    model = mlp(16, 4, act=nn.Tanh)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    return supervised(model, opt, x, y, g, steps=400)


def pixels_0_255_cnn(seed: int, fixed: bool) -> Run:
    g = _gen(seed)
    x, y = images(g)
    lo, hi = x.min(), x.max()
    x255 = ((x - lo) / (hi - lo) * 255.0).round()
    x = (x255 - x255.mean()) / x255.std() if fixed else x255
    model = CNN(4)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    return supervised(model, opt, x, y, g, steps=400)


# ----------------------------------------------------------------------------------------- dying_relu
def dead_bias_mlp(seed: int, fixed: bool) -> Run:
    g = _gen(seed)
    x, y = blobs(g)
    model = mlp(16, 4, depth=2)
    if not fixed:
        with torch.no_grad():
            model[0].bias.uniform_(-12.0, -10.0, generator=g)  # every first-layer unit starts below zero
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    return supervised(model, opt, x, y, g, steps=400)


def dead_bias_cnn(seed: int, fixed: bool) -> Run:
    g = _gen(seed)
    x, y = images(g)
    model = CNN(4)
    if not fixed:
        with torch.no_grad():
            model.features[0].bias.uniform_(-8.0, -6.0, generator=g)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    return supervised(model, opt, x, y, g, steps=400)


# ------------------------------------------------------------------------------ saturated_activations
def sigmoid_offset_mlp(seed: int, fixed: bool) -> Run:
    g = _gen(seed)
    x, y = blobs(g)
    model = mlp(16, 4, act=nn.Sigmoid, shift=0.0 if fixed else 10.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    return supervised(model, opt, x, y, g, steps=400)


def tanh_gain_cnn(seed: int, fixed: bool) -> Run:
    g = _gen(seed)
    x, y = images(g)
    model = CNN(4, act=nn.Tanh, gain=1.0 if fixed else 30.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    return supervised(model, opt, x, y, g, steps=400)


# -------------------------------------------------------------------------------- vanishing_gradients
def deep_sigmoid_mlp(seed: int, fixed: bool) -> Run:
    g = _gen(seed)
    x, y = blobs(g)
    model = mlp(16, 4, hidden=32, depth=2 if fixed else 10, act=nn.Sigmoid)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return supervised(model, opt, x, y, g, steps=400)


def deep_sigmoid_cnn(seed: int, fixed: bool) -> Run:
    g = _gen(seed)
    x, y = images(g)
    model = CNN(4, act=nn.Sigmoid, depth=2 if fixed else 7)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return supervised(model, opt, x, y, g, steps=400, batch=32)


# -------------------------------------------------------------------------------- exploding_gradients
def tanh_rnn_sgd(seed: int, fixed: bool) -> Run:
    g = _gen(seed)
    x, y = sequences(g, steps=30)
    model = RNNClassifier("RNN", 4, 128, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.3)
    return supervised(model, opt, x, y, g, steps=400, batch=32, clip=1.0 if fixed else None)


def longer_sequences_rnn(seed: int, fixed: bool) -> Run:
    g = _gen(seed)
    x, y = sequences(g, steps=60)
    model = RNNClassifier("RNN", 4, 128, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    calls = [0]

    def curriculum(xb: Tensor) -> Tensor:
        calls[0] += 1  # the first 150 batches hold the last 10 steps only; then the full 60 steps
        return xb[:, -10:] if calls[0] <= 150 else xb

    return supervised(model, opt, x, y, g, steps=400, batch=32, clip=1.0 if fixed else None, batch_x=curriculum)


def outlier_targets_mlp(seed: int, fixed: bool) -> Run:
    g = _gen(seed)
    x, y = regression(g)
    noisy = y.clone()
    rows = torch.randperm(y.shape[0], generator=g)[:8]
    noisy[rows] = 100.0 * torch.sign(torch.randn(8, 1, generator=g))  # a few corrupt records
    model = mlp(8, 1, hidden=64)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    run = supervised(model, opt, x, noisy, g, steps=400, loss_fn=_mse, task="regression", clip=1.0 if fixed else None)
    run.evaluate = _evaluator(model, x, y, _mse, "regression")  # scored on the clean targets
    return run


# ------------------------------------------------------------------------------------ class_imbalance
def _imbalanced(g: torch.Generator, x: Tensor, y: Tensor, keep: list[float]) -> tuple[Tensor, Tensor]:
    mask = torch.zeros_like(y, dtype=torch.bool)
    for c, frac in enumerate(keep):
        idx = (y == c).nonzero().flatten()
        mask[idx[: max(2, int(frac * len(idx)))]] = True
    return x[mask], y[mask]


def _balancing_weights(y: Tensor, classes: int) -> Tensor:
    counts = torch.bincount(y, minlength=classes).float()
    return (1.0 / counts)[y]


def imbalanced_gru(seed: int, fixed: bool) -> Run:
    g = _gen(seed)
    x, y = sequences(g, n=3000, classes=2, sep=0.3)
    xb, yb = x[2000:], y[2000:]  # a balanced held-out set
    xt, yt = _imbalanced(g, x[:2000], y[:2000], [1.0, 0.03])
    model = RNNClassifier("GRU", 4, 32, 2)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    weights = _balancing_weights(yt, 2) if fixed else None
    return supervised(model, opt, xt, yt, g, steps=400, batch=32, balanced=(xb, yb), sample_weights=weights)


def imbalanced_cnn(seed: int, fixed: bool) -> Run:
    g = _gen(seed)
    x, y = images(g, n=3000, classes=2, sep=0.25)
    xb, yb = x[2000:], y[2000:]
    xt, yt = _imbalanced(g, x[:2000], y[:2000], [1.0, 0.03])
    model = CNN(2)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    weights = _balancing_weights(yt, 2) if fixed else None
    return supervised(model, opt, xt, yt, g, steps=400, balanced=(xb, yb), sample_weights=weights)


# ---------------------------------------------------------------------------------- missing_zero_grad
def no_zero_grad_mlp(seed: int, fixed: bool) -> Run:
    g = _gen(seed)
    x, y = blobs(g)
    model = mlp(16, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    return supervised(model, opt, x, y, g, steps=400, zero_grad=fixed)


def no_zero_grad_transformer(seed: int, fixed: bool) -> Run:
    g = _gen(seed)
    x, y = tokens(g)
    model = TinyTransformer()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    return supervised(model, opt, x, y, g, steps=400, batch=32, zero_grad=fixed)


def no_zero_grad_cnn(seed: int, fixed: bool) -> Run:
    g = _gen(seed)
    x, y = images(g)
    model = CNN(4)
    opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    return supervised(model, opt, x, y, g, steps=400, zero_grad=fixed)


# --------------------------------------------------------------------------------- params_not_updated
def other_instance_mlp(seed: int, fixed: bool) -> Run:
    g = _gen(seed)
    x, y = blobs(g)
    model = mlp(16, 4)
    shadow = mlp(16, 4)  # e.g. the optimizer was built before the model was rebuilt
    opt = torch.optim.Adam((model if fixed else shadow).parameters(), lr=1e-3)
    return supervised(model, opt, x, y, g, steps=400)


def detached_gru(seed: int, fixed: bool) -> Run:
    g = _gen(seed)
    x, y = sequences(g, sep=0.4)
    model = RNNClassifier("GRU", 4, 32, 3)
    model.detach_features = not fixed  # the encoder never receives a gradient
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    return supervised(model, opt, x, y, g, steps=400, batch=32)


def zero_lr_group_transformer(seed: int, fixed: bool) -> Run:
    g = _gen(seed)
    x, y = tokens(g)
    model = TinyTransformer()
    body = [p for n, p in model.named_parameters() if not n.startswith("head")]
    opt = torch.optim.Adam(
        [{"params": body, "lr": 1e-3 if fixed else 0.0}, {"params": model.head.parameters(), "lr": 1e-3}]
    )
    return supervised(model, opt, x, y, g, steps=400, batch=32)


# ------------------------------------------------------------------------------------------ no_signal
def random_labels_mlp(seed: int, fixed: bool) -> Run:
    g = _gen(seed)
    x, y = blobs(g)
    if not fixed:
        y = torch.randint(0, 4, y.shape, generator=g)
    model = mlp(16, 4)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    return supervised(model, opt, x, y, g, steps=400)


def shuffled_labels_cnn(seed: int, fixed: bool) -> Run:
    g = _gen(seed)
    x, y = images(g)
    if not fixed:
        y = y[torch.randperm(y.shape[0], generator=g)]  # labels shuffled apart from their images
    model = CNN(4)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    return supervised(model, opt, x, y, g, steps=400)


def constant_inputs_gru(seed: int, fixed: bool) -> Run:
    g = _gen(seed)
    x, y = sequences(g)
    model = RNNClassifier("GRU", 4, 32, 3)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    wrong = None if fixed else (lambda xb: torch.zeros_like(xb))  # the wrong tensor reaches the model
    run = supervised(model, opt, x, y, g, steps=400, batch=32, batch_x=wrong)
    if not fixed:
        run.evaluate = _evaluator(model, torch.zeros_like(x), y, _ce, "classification")
    return run


# ----------------------------------------------------------------------------- insufficient_capacity
def _xor(g: torch.Generator, n: int = 1024) -> tuple[Tensor, Tensor]:
    x = torch.randn(n, 2, generator=g)
    y = ((x[:, 0] > 0) ^ (x[:, 1] > 0)).long()
    return x, y


def linear_stack_xor(seed: int, fixed: bool) -> Run:
    g = _gen(seed)
    x, y = _xor(g)
    act: list[nn.Module] = [nn.ReLU()] if fixed else []
    model = nn.Sequential(nn.Linear(2, 32), *act, nn.Linear(32, 32), *[nn.ReLU()] * len(act), nn.Linear(32, 2))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    return supervised(model, opt, x, y, g, steps=400)


def bottleneck_cnn(seed: int, fixed: bool) -> Run:
    g = _gen(seed)
    x, y = images(g, classes=10, sep=1.0)
    model = CNN(10)
    width = 64 if fixed else 1
    model.head = nn.Sequential(nn.Linear(8 * 16, width), nn.ReLU(), nn.Linear(width, 10))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    return supervised(model, opt, x, y, g, steps=400)


# ---------------------------------------------------------------------------------------- overfitting
def _flip(g: torch.Generator, y: Tensor, classes: int, frac: float) -> Tensor:
    y = y.clone()
    rows = torch.rand(y.shape, generator=g) < frac
    y[rows] = torch.randint(0, classes, (int(rows.sum()),), generator=g)
    return y


def small_data_mlp(seed: int, fixed: bool) -> Run:
    g = _gen(seed)
    x, y = blobs(g, n=1024, d=32, classes=4, sep=0.5)
    xt, yt = x[:96], _flip(g, y[:96], 4, 0.3)
    model = mlp(32, 4, hidden=256)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    return supervised(model, opt, xt, yt, g, steps=500, batch=32, val=(x[512:], y[512:]), val_every=10)


def small_data_transformer(seed: int, fixed: bool) -> Run:
    g = _gen(seed)
    x, y = tokens(g, n=1024)
    xt, yt = x[:64], _flip(g, y[:64], 4, 0.3)
    model = TinyTransformer(d_model=48, layers=2)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    return supervised(model, opt, xt, yt, g, steps=300, batch=32, val=(x[768:], y[768:]), val_every=10)


# ----------------------------------------------------------------------------------------- non_finite
def nan_rows_mlp(seed: int, fixed: bool) -> Run:
    g = _gen(seed)
    x, y = blobs(g)
    rows = torch.randperm(x.shape[0], generator=g)[:2]
    x[rows, 3] = 0.0 if fixed else float("nan")  # two records with a missing value
    model = mlp(16, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    run = supervised(model, opt, x, y, g, steps=400)
    clean = x.clone()
    clean[rows, 3] = 0.0
    run.evaluate = _evaluator(model, clean, y, _ce, "classification")
    return run


def naive_bce_cnn(seed: int, fixed: bool) -> Run:
    g = _gen(seed)
    x, y = images(g, sep=1.5)
    y = _flip(g, y, 4, 0.05)

    def naive_bce(out: Tensor, t: Tensor) -> Tensor:
        p = torch.sigmoid(out.float())
        oh = F.one_hot(t, 4).float()
        # log(1 - p) = log(0) = -inf once a mislabelled sample is predicted with p == 1.0 in float32
        return -(oh * torch.log(p) + (1 - oh) * torch.log(1 - p)).mean()

    def stable_bce(out: Tensor, t: Tensor) -> Tensor:
        return F.binary_cross_entropy_with_logits(out.float(), F.one_hot(t, 4).float())

    model = CNN(4)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    run = supervised(model, opt, x, y, g, steps=400, loss_fn=stable_bce if fixed else naive_bce)
    run.evaluate = _evaluator(model, x, y, stable_bce, "classification")
    return run


class _UnitNorm(nn.Module):
    """Scale each sequence to unit norm inside the model (0/0 = NaN for an all-zero sequence without eps)."""

    def __init__(self, inner: nn.Module, eps: float) -> None:
        super().__init__()
        self.inner = inner
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        return self.inner(x / (x.norm(dim=(1, 2), keepdim=True) + self.eps) * 4.0)


def zero_division_gru(seed: int, fixed: bool) -> Run:
    g = _gen(seed)
    x, y = sequences(g)
    x[torch.randperm(x.shape[0], generator=g)[:3]] = 0.0  # three empty (all-padding) sequences
    model = _UnitNorm(RNNClassifier("GRU", 4, 32, 3), eps=1e-6 if fixed else 0.0)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    run = supervised(model, opt, x, y, g, steps=400, batch=32)
    clean = _UnitNorm(model.inner, eps=1e-6)
    run.evaluate = _evaluator(clean, x, y, _ce, "classification")
    return run


# ============================================================================================ healthy
def healthy_small_batch_sgd(seed: int, fixed: bool) -> Run:
    g = _gen(seed)
    x, y = blobs(g)
    model = mlp(16, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.02)
    return supervised(model, opt, x, y, g, steps=600, batch=4)


def healthy_cosine_cnn(seed: int, fixed: bool) -> Run:
    g = _gen(seed)
    x, y = images(g)
    model = CNN(4)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=400)
    return supervised(model, opt, x, y, g, steps=400, scheduler=sched)


def healthy_onecycle_mlp(seed: int, fixed: bool) -> Run:
    g = _gen(seed)
    x, y = regression(g)
    model = mlp(8, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=500)
    return supervised(model, opt, x, y, g, steps=500, loss_fn=_mse, task="regression", scheduler=sched)


def healthy_warmup_transformer(seed: int, fixed: bool) -> Run:
    g = _gen(seed)
    x, y = tokens(g)
    model = TinyTransformer()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 100))
    return supervised(model, opt, x, y, g, steps=400, batch=32, scheduler=sched)


def healthy_converges_early(seed: int, fixed: bool) -> Run:
    g = _gen(seed)
    x, y = blobs(g, n=1280, sep=4.0)
    x = (x - x.mean(0)) / x.std(0)  # standardized features: the run tests convergence, not scaling
    model = mlp(16, 4)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    return supervised(model, opt, x[:1024], y[:1024], g, steps=500, val=(x[1024:], y[1024:]), val_every=25)


def healthy_autocast_bf16_cnn(seed: int, fixed: bool) -> Run:
    g = _gen(seed)
    x, y = images(g)
    model = CNN(4)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    return supervised(model, opt, x, y, g, steps=400, autocast=True)


def healthy_grad_accum_gru(seed: int, fixed: bool) -> Run:
    g = _gen(seed)
    x, y = sequences(g)
    model = RNNClassifier("GRU", 4, 32, 3)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    return supervised(model, opt, x, y, g, steps=250, batch=16, accumulate=4)


def healthy_lstm(seed: int, fixed: bool) -> Run:
    g = _gen(seed)
    x, y = sequences(g)
    model = RNNClassifier("LSTM", 4, 32, 3)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    return supervised(model, opt, x, y, g, steps=400, batch=32)


def healthy_regression_val(seed: int, fixed: bool) -> Run:
    g = _gen(seed)
    x, y = regression(g, n=1536)
    model = mlp(8, 1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    return supervised(
        model, opt, x[:1024], y[:1024], g, steps=500, loss_fn=_mse, task="regression", val=(x[1024:], y[1024:])
    )


def healthy_imbalanced_learned(seed: int, fixed: bool) -> Run:
    g = _gen(seed)
    x, y = blobs(g, n=3000, classes=3, sep=2.5)
    x = (x - x.mean(0)) / x.std(0)
    xt, yt = _imbalanced(g, x, y, [1.0, 0.08, 0.08])
    model = mlp(16, 3)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    return supervised(model, opt, xt, yt, g, steps=400)


# ============================================================================================ the list
def _s(
    name: str,
    cause: str,
    arch: str,
    summary: str,
    build: Callable[[int, bool], Run],
    fault: Predicate,
    onset: Onset = at_start,
    *,
    twin: bool = True,
    repairable: bool = False,
) -> Scenario:
    return Scenario(name, cause, arch, summary, build, fault, onset, needs_twin=twin, repairable=repairable)


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in [
        # lr_too_high
        _s(
            "lr_high_mlp_sgd",
            "lr_too_high",
            "MLP",
            "SGD lr=3, momentum 0.9 (twin lr=0.05)",
            lr_high_mlp,
            worse_than_twin(2.0),
            repairable=True,
        ),
        _s(
            "lr_high_cnn_adam",
            "lr_too_high",
            "CNN",
            "Adam lr=0.3 (twin 1e-3)",
            lr_high_cnn,
            worse_than_twin(2.0),
            repairable=True,
        ),
        _s(
            "lr_high_gru_rmsprop",
            "lr_too_high",
            "GRU",
            "RMSprop lr=0.3 (twin 1e-3)",
            lr_high_gru,
            worse_than_twin(2.0),
            repairable=True,
        ),
        _s(
            "lr_plateau_regression_sgd",
            "lr_too_high",
            "MLP",
            "regression, SGD lr=0.05 momentum 0.9, batch 16: a noisy plateau (twin lr=0.01)",
            lr_plateau_regression,
            worse_than_twin(2.0),
            repairable=True,
        ),
        _s(
            "lr_plateau_lstm_adam",
            "lr_too_high",
            "LSTM",
            "Adam lr=0.05: a noisy plateau (twin 3e-3)",
            lr_plateau_lstm,
            worse_than_twin(1.5),
            repairable=True,
        ),
        # lr_too_low
        _s("lr_low_mlp_sgd", "lr_too_low", "MLP", "SGD lr=1e-5 (twin 0.05)", lr_low_mlp, worse_than_twin(2.0)),
        _s(
            "lr_low_transformer_adam",
            "lr_too_low",
            "Transformer",
            "Adam lr=1e-7 (twin 1e-3)",
            lr_low_transformer,
            worse_than_twin(1.5),
        ),
        # bad_init
        _s("zero_init_mlp", "bad_init", "MLP", "every weight and bias zero", zero_init_mlp, worse_than_twin(2.0)),
        _s(
            "constant_init_cnn",
            "bad_init",
            "CNN",
            "every conv/linear weight 0.05, biases 0",
            constant_init_cnn,
            worse_than_twin(1.5),
        ),
        # over_regularization
        _s(
            "weight_decay_mlp_sgd",
            "over_regularization",
            "MLP",
            "SGD weight_decay=1.0 (twin 5e-4)",
            weight_decay_mlp,
            worse_than_twin(1.5),
        ),
        _s(
            "l2_penalty_cnn_adam",
            "over_regularization",
            "CNN",
            "explicit L2 penalty 0.5*sum(w^2) (twin 1e-5)",
            l2_penalty_cnn,
            worse_than_twin(1.5),
        ),
        _s(
            "adamw_decay_gru",
            "over_regularization",
            "GRU",
            "AdamW weight_decay=30 (twin 0.01)",
            adamw_decay_gru,
            worse_than_twin(1.5),
        ),
        # unnormalized_inputs
        _s(
            "raw_features_tanh_mlp",
            "unnormalized_inputs",
            "MLP",
            "features with mean ~300, std ~40; tanh",
            raw_features_tanh_mlp,
            worse_than_twin(1.5),
        ),
        _s(
            "pixels_0_255_cnn",
            "unnormalized_inputs",
            "CNN",
            "pixels on a 0-255 scale, SGD lr=0.01",
            pixels_0_255_cnn,
            worse_than_twin(1.5),
        ),
        # dying_relu
        _s(
            "dead_bias_mlp",
            "dying_relu",
            "MLP",
            "first-layer biases in [-12, -10]: every unit silent",
            dead_bias_mlp,
            worse_than_twin(1.5),
        ),
        _s(
            "dead_bias_cnn",
            "dying_relu",
            "CNN",
            "first-conv biases in [-8, -6]: every channel silent",
            dead_bias_cnn,
            worse_than_twin(1.5),
        ),
        # saturated_activations
        _s(
            "sigmoid_offset_mlp",
            "saturated_activations",
            "MLP",
            "sigmoid(z + 10): an offset pushes units flat",
            sigmoid_offset_mlp,
            worse_than_twin(1.5),
        ),
        _s(
            "tanh_gain_cnn",
            "saturated_activations",
            "CNN",
            "tanh(30*z) after each conv",
            tanh_gain_cnn,
            worse_than_twin(1.5),
        ),
        # vanishing_gradients
        _s(
            "deep_sigmoid_mlp",
            "vanishing_gradients",
            "MLP",
            "10 sigmoid layers, SGD (twin: 2 layers)",
            deep_sigmoid_mlp,
            worse_than_twin(1.5),
        ),
        _s(
            "deep_sigmoid_cnn",
            "vanishing_gradients",
            "CNN",
            "7 sigmoid conv layers, SGD (twin: 2)",
            deep_sigmoid_cnn,
            worse_than_twin(1.5),
        ),
        # exploding_gradients
        _s(
            "tanh_rnn_sgd",
            "exploding_gradients",
            "RNN",
            "tanh RNN over 30 steps, SGD lr=0.3 (twin: clip_grad_norm 1)",
            tanh_rnn_sgd,
            worse_than_twin(1.5),
            first_blowup(),
            repairable=True,
        ),
        _s(
            "longer_sequences_rnn",
            "exploding_gradients",
            "RNN",
            "tanh RNN, sequences grow from 10 to 60 steps at step 150 (twin: clip_grad_norm 1)",
            longer_sequences_rnn,
            worse_than_twin(1.5),
            first_blowup(),
            repairable=True,
        ),
        _s(
            "outlier_targets_mlp",
            "exploding_gradients",
            "MLP",
            "regression with 8 corrupt targets of +-100 (twin: clip_grad_norm 1)",
            outlier_targets_mlp,
            worse_than_twin(1.5),
            at_start,
            repairable=True,
        ),
        # class_imbalance
        _s(
            "imbalanced_gru",
            "class_imbalance",
            "GRU",
            "2 faint classes, 33:1 (twin: balanced sampling)",
            imbalanced_gru,
            metric_below_twin("balanced_acc", 0.1),
        ),
        _s(
            "imbalanced_cnn",
            "class_imbalance",
            "CNN",
            "2 faint classes, 33:1 (twin: balanced sampling)",
            imbalanced_cnn,
            metric_below_twin("balanced_acc", 0.1),
        ),
        # missing_zero_grad
        _s(
            "no_zero_grad_mlp_sgd",
            "missing_zero_grad",
            "MLP",
            "no optimizer.zero_grad(), SGD",
            no_zero_grad_mlp,
            worse_than_twin(1.5),
        ),
        _s(
            "no_zero_grad_transformer_adam",
            "missing_zero_grad",
            "Transformer",
            "no optimizer.zero_grad(), Adam",
            no_zero_grad_transformer,
            worse_than_twin(1.5),
        ),
        _s(
            "no_zero_grad_cnn_sgd",
            "missing_zero_grad",
            "CNN",
            "no optimizer.zero_grad(), SGD momentum",
            no_zero_grad_cnn,
            worse_than_twin(1.5),
        ),
        # params_not_updated
        _s(
            "other_instance_mlp",
            "params_not_updated",
            "MLP",
            "optimizer built over another model instance",
            other_instance_mlp,
            worse_than_twin(1.5),
        ),
        _s(
            "detached_gru",
            "params_not_updated",
            "GRU",
            "GRU features .detach()ed before the head",
            detached_gru,
            worse_than_twin(1.3),
        ),
        _s(
            "zero_lr_group_transformer",
            "params_not_updated",
            "Transformer",
            "encoder param group with lr=0",
            zero_lr_group_transformer,
            worse_than_twin(1.3),
        ),
        # no_signal
        _s("random_labels_mlp", "no_signal", "MLP", "labels drawn at random", random_labels_mlp, worse_than_twin(2.0)),
        _s(
            "shuffled_labels_cnn",
            "no_signal",
            "CNN",
            "labels shuffled apart from their images",
            shuffled_labels_cnn,
            worse_than_twin(2.0),
        ),
        _s(
            "constant_inputs_gru",
            "no_signal",
            "GRU",
            "a zero tensor reaches the model instead of the batch",
            constant_inputs_gru,
            worse_than_twin(2.0),
        ),
        # insufficient_capacity
        _s(
            "linear_stack_xor",
            "insufficient_capacity",
            "MLP",
            "three Linear layers, no activation, on XOR",
            linear_stack_xor,
            worse_than_twin(2.0),
        ),
        _s(
            "bottleneck_cnn",
            "insufficient_capacity",
            "CNN",
            "a 1-unit hidden layer before 10 classes",
            bottleneck_cnn,
            worse_than_twin(1.5),
        ),
        # overfitting
        _s(
            "small_data_mlp",
            "overfitting",
            "MLP",
            "96 noisy samples, 256-wide MLP, val every 10 steps",
            small_data_mlp,
            val_rises(),
            best_val_step,
            twin=False,
        ),
        _s(
            "small_data_transformer",
            "overfitting",
            "Transformer",
            "64 noisy sequences, 2 layers, val every 10",
            small_data_transformer,
            val_rises(),
            best_val_step,
            twin=False,
        ),
        # non_finite
        _s(
            "nan_rows_mlp",
            "non_finite",
            "MLP",
            "two records with a NaN feature",
            nan_rows_mlp,
            goes_nonfinite(),
            first_nonfinite,
            repairable=True,
        ),
        _s(
            "naive_bce_cnn",
            "non_finite",
            "CNN",
            "hand-written BCE log(1-sigmoid(z)), 5% wrong labels",
            naive_bce_cnn,
            goes_nonfinite(),
            first_nonfinite,
            repairable=True,
        ),
        _s(
            "zero_division_gru",
            "non_finite",
            "GRU",
            "x / x.norm() in the model meets an all-zero sequence",
            zero_division_gru,
            goes_nonfinite(),
            first_nonfinite,
            repairable=True,
        ),
        # healthy
        _s(
            "healthy_small_batch_sgd",
            "healthy",
            "MLP",
            "SGD lr=0.02, batch 4 (noisy)",
            healthy_small_batch_sgd,
            learns(),
            twin=False,
        ),
        _s(
            "healthy_cosine_cnn",
            "healthy",
            "CNN",
            "SGD momentum + CosineAnnealingLR",
            healthy_cosine_cnn,
            learns(),
            twin=False,
        ),
        _s(
            "healthy_onecycle_mlp",
            "healthy",
            "MLP",
            "regression, SGD + OneCycleLR",
            healthy_onecycle_mlp,
            learns(),
            twin=False,
        ),
        _s(
            "healthy_warmup_transformer",
            "healthy",
            "Transformer",
            "AdamW with 100-step linear warm-up",
            healthy_warmup_transformer,
            learns(),
            twin=False,
        ),
        _s(
            "healthy_converges_early",
            "healthy",
            "MLP",
            "easy task: converged by step ~50, flat for 450",
            healthy_converges_early,
            learns(0.2),
            twin=False,
        ),
        _s(
            "healthy_autocast_bf16_cnn",
            "healthy",
            "CNN",
            "CPU autocast bf16, Adam",
            healthy_autocast_bf16_cnn,
            learns(),
            twin=False,
        ),
        _s(
            "healthy_grad_accum_gru",
            "healthy",
            "GRU",
            "4 micro-batches per optimizer step",
            healthy_grad_accum_gru,
            learns(),
            twin=False,
        ),
        _s("healthy_lstm", "healthy", "LSTM", "LSTM sequence classifier, Adam", healthy_lstm, learns(), twin=False),
        _s(
            "healthy_regression_val",
            "healthy",
            "MLP",
            "regression with val_loss every 10 steps",
            healthy_regression_val,
            learns(),
            twin=False,
        ),
        _s(
            "healthy_imbalanced_learned",
            "healthy",
            "MLP",
            "12:1:1 classes that are easy to separate",
            healthy_imbalanced_learned,
            learns(),
            twin=False,
        ),
    ]
}
