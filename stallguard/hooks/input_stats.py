"""InputStats: per-feature statistics of the batches the model is fed, and what is wrong with them.

Inputs on a raw scale (pixels 0-255, prices in dollars), features that never change, and NaN in the
data are among the first answers to "why is my loss not decreasing?". The hook folds sampled input
batches into per-feature counts, sums, minima and maxima on the device and reads them at check points.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .._validate import check_float, check_int
from ..hook import Hook
from ..registry import register
from ..stats import CheckContext, Observation

__all__ = ["InputStats", "first_float_tensor"]

# How many feature indices an event lists at most.
_LIST = 20


def first_float_tensor(value: Any) -> Tensor | None:
    """The first floating-point tensor in ``value`` (a tensor, or nested tuples, lists and dicts of them).

    Dicts are searched in insertion order, sequences in order, depth first. Integer, bool and complex
    tensors are skipped: token ids and masks are not features.

    Example:
        >>> import torch
        >>> batch = {"ids": torch.tensor([[1, 2]]), "pixels": torch.zeros(1, 3), "mask": torch.ones(1, 3)}
        >>> first_float_tensor(batch).shape
        torch.Size([1, 3])
        >>> first_float_tensor(torch.tensor([1, 2])) is None
        True
    """
    if isinstance(value, Tensor):
        return value if value.is_floating_point() else None
    if isinstance(value, Mapping):
        value = list(value.values())
    if isinstance(value, (tuple, list)):
        for item in value:
            found = first_float_tensor(item)
            if found is not None:
                return found
    return None


@register("input_stats", default="monitor")
class InputStats(Hook):
    """Check the scale, constancy and finiteness of the model's inputs, per feature or channel.

    The hook reads ``guard.observe(..., inputs=x)``. It reads the first floating-point tensor of
    ``inputs`` (see :func:`first_float_tensor`); integer and bool inputs (token ids fed to an
    embedding, masks) are not features and are ignored. A *feature* is one index of ``feature_dim``:
    the columns of a ``(N, F)`` batch, the channels of ``(N, C, H, W)`` images (statistics over the
    samples and all positions), the only feature of a ``(N,)`` batch.

    It samples the first ``warmup`` observations, then the observations of every ``every``-th optimizer
    step; after a call without float inputs (no ``inputs``, or token ids) the warm-up waits for that
    cadence too, so that a run without features costs nothing per step. A sampled batch costs about
    ten elementwise passes on the device (finite mask, masked sums, minimum and maximum per feature)
    folded into float64 per-feature states; nothing is read to the host until a check point. Means
    and variances are combined from per-batch centred sums, so a feature with mean 1e4 and std 1
    still gets its std right.

    At check points, once ``warmup`` observations were sampled (or at the final check):

    * ``inputs_unnormalized`` (warning, once) when some feature has ``|mean| > mean_threshold``,
      ``std > std_threshold``, ``max |x| > max_abs`` or a non-zero ``std < min_std``;
    * ``constant_features`` when features never changed over the batches sampled so far: a warning
      naming the ``no_signal`` cause when at least ``constant_fraction`` of the features are
      constant (the model sees nothing that varies), otherwise an info event (a few constant border
      pixels or rare one-hot columns are normal);
    * ``nonfinite_inputs`` (error) at every check whose interval brought new NaN/Inf values.

    Args:
        warmup: Observations sampled at the start, whatever ``every`` says.
        every: After the warm-up, sample the observations of every this many optimizer steps.
        feature_dim: The dim that indexes features; None means dim 1 (and one feature for 1-D
            inputs). Set ``-1`` for ``(N, L, D)`` sequences of feature vectors.
        mean_threshold: A feature whose mean is farther than this from 0 is not centred.
        std_threshold: A feature whose std is above this is not scaled.
        max_abs: A feature with a value beyond this magnitude is on a raw scale.
        min_std: A feature that varies, but with a std below this, is scaled far too small.
        constant_fraction: Share of constant features from which the input is said to carry no signal.
        start_step: Sample no step before this one.
        name: Name used as the event source.

    Example:
        Raw 0-255 pixels fed straight to a linear model:

        >>> import torch, stallguard as sg
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Linear(16, 4)
        >>> opt = torch.optim.SGD(model.parameters(), lr=1e-5)
        >>> guard = sg.Guard(model, opt, hooks=[sg.InputStats(warmup=2)], sinks=[], check_every=2)
        >>> for _ in range(2):
        ...     x, y = torch.randint(0, 256, (32, 16)).float(), torch.randint(0, 4, (32,))
        ...     loss = torch.nn.functional.cross_entropy(model(x), y)
        ...     opt.zero_grad(); loss.backward(); guard.observe(loss, inputs=x); opt.step()
        >>> e = next(e for e in guard.events if e.kind == "inputs_unnormalized")
        >>> e.data["min"], e.data["max"], e.causes
        (0.0, 255.0, ('unnormalized_inputs',))
        >>> guard.close()
    """

    def __init__(
        self,
        *,
        warmup: int = 5,
        every: int = 50,
        feature_dim: int | None = None,
        mean_threshold: float = 3.0,
        std_threshold: float = 10.0,
        max_abs: float = 20.0,
        min_std: float = 1e-3,
        constant_fraction: float = 0.99,
        start_step: int = 0,
        name: str | None = None,
    ) -> None:
        super().__init__(every=every, start_step=start_step, name=name)
        owner = type(self).__name__
        self.warmup = check_int(owner, "warmup", warmup, min=1)
        if feature_dim is not None:
            check_int(owner, "feature_dim", feature_dim)
        self.feature_dim = feature_dim
        self.mean_threshold = check_float(owner, "mean_threshold", mean_threshold, min=0.0, min_open=True)
        self.std_threshold = check_float(owner, "std_threshold", std_threshold, min=0.0, min_open=True)
        self.max_abs = check_float(owner, "max_abs", max_abs, min=0.0, min_open=True)
        self.min_std = check_float(owner, "min_std", min_std, min=0.0)
        if self.min_std >= self.std_threshold:
            raise ValueError(f"{owner}: min_std must be < std_threshold ({self.std_threshold}), got {min_std!r}")
        self.constant_fraction = check_float(
            owner, "constant_fraction", constant_fraction, min=0.0, max=1.0, min_open=True
        )
        # Host state: how many observations were sampled, the feature count, what was reported.
        self.add_state("sampled", 0)
        self.add_state("n_features", None)
        self.add_state("nonfinite_seen", 0.0)
        self.add_state("reported", [])
        self.add_state("ignored", None)
        self._layout_error: str | None = None

    # ----------------------------------------------------------------- cadence
    def is_due(self, step: int) -> bool:
        # The first `warmup` observations are always sampled, then one step in `every`; inputs without
        # features (token ids) are looked at again only on the cadence, not on every step of the warm-up.
        return step >= self.start_step and (self._warming_up() or super().is_due(step))

    def next_due(self, step: int) -> int | None:
        first = max(step, self.start_step)
        return first if self._warming_up() else self.next_on(first, self.every)

    def _warming_up(self) -> bool:
        return self.sampled < self.warmup and self.ignored is None

    # ----------------------------------------------------------------- lifecycle
    def on_observe(self, obs: Observation) -> None:
        # Why the last look found nothing to measure; while set, the warm-up waits for the cadence.
        if obs.inputs is None:
            self.ignored = "no inputs passed to observe"
            return
        x = first_float_tensor(obs.inputs)
        if x is None:
            self.ignored = "no floating-point tensor in inputs (token ids and masks are not features)"
            return
        self.ignored = None
        if x.dim() == 0 or x.numel() == 0:
            return
        if x.requires_grad:
            x = x.detach()
        if x.dtype not in (torch.float32, torch.float64):
            x = x.float()  # half precision sums overflow
        dim = self._feature_dim(x)
        n_features = 1 if dim is None else x.shape[dim]
        if self.n_features is None:
            self._declare(n_features)
        elif n_features != self.n_features:
            if self._layout_error is None:
                self._layout_error = f"inputs with {n_features} features after {self.n_features}; skipped"
            return
        self._fold(x, dim)
        self.sampled += 1

    def on_check(self, check: CheckContext) -> None:
        v = check.values
        if self.n_features is None or v.get("batches", 0.0) <= 0:
            return
        # Every value not counted as finite: the features times the values per feature, less the counts.
        nonfinite = float(np.asarray(v["elements"], dtype=np.float64)) * self.n_features - float(
            np.asarray(v["count"], dtype=np.float64).sum()
        )
        if nonfinite > self.nonfinite_seen:
            self._report_nonfinite(v, nonfinite - self.nonfinite_seen, nonfinite)
            self.nonfinite_seen = nonfinite
        if self.sampled < self.warmup and not check.final:
            return  # judge the scale on the warm-up batches together, not on the first one alone
        count = np.asarray(v["count"], dtype=np.float64).reshape(-1)
        seen = count > 0
        if not seen.any():
            return
        s1 = np.asarray(v["s1"], dtype=np.float64).reshape(-1)
        s2 = np.asarray(v["s2"], dtype=np.float64).reshape(-1)
        lo = np.asarray(v["lo"], dtype=np.float64).reshape(-1)
        hi = np.asarray(v["hi"], dtype=np.float64).reshape(-1)
        safe = np.where(seen, count, 1.0)
        mean = np.where(seen, s1 / safe, np.nan)
        std = np.sqrt(np.maximum(np.where(seen, s2 / safe, np.nan) - mean**2, 0.0))
        constant = seen & (lo == hi) & (count >= 2)
        if "inputs_unnormalized" not in self.reported:
            self._check_scale(count, s1, s2, mean, std, lo, hi, seen, constant)
        self._check_constant(constant, mean, count)

    # ----------------------------------------------------------------- decisions
    def _check_scale(
        self,
        count: np.ndarray,
        s1: np.ndarray,
        s2: np.ndarray,
        mean: np.ndarray,
        std: np.ndarray,
        lo: np.ndarray,
        hi: np.ndarray,
        seen: np.ndarray,
        constant: np.ndarray,
    ) -> None:
        with np.errstate(invalid="ignore"):
            absmax = np.where(seen, np.maximum(np.abs(lo), np.abs(hi)), 0.0)
            reasons = {
                "mean": seen & (np.abs(mean) > self.mean_threshold),
                "std": seen & (std > self.std_threshold),
                "range": seen & (absmax > self.max_abs),
                "tiny_std": seen & ~constant & (std < self.min_std),
            }
        flagged = np.zeros_like(seen)
        for mask in reasons.values():
            flagged |= mask
        if not flagged.any():
            return
        self.reported = [*self.reported, "inputs_unnormalized"]
        n = float(count[seen].sum())
        g_mean = float(s1[seen].sum() / n)
        g_std = math.sqrt(max(float(s2[seen].sum() / n) - g_mean**2, 0.0))
        g_lo, g_hi = float(lo[seen].min()), float(hi[seen].max())
        idx = np.flatnonzero(flagged)
        worst = idx[np.argsort(-absmax[idx], kind="stable")][:5]
        why = [k for k, m in reasons.items() if m.any()]
        pixels = g_lo >= 0 and 100 < g_hi <= 255
        shape = "raw 0-255 pixel values" if pixels else "a raw scale"
        message = (
            f"inputs look like {shape}: range [{g_lo:.4g}, {g_hi:.4g}], mean {g_mean:.4g}, std {g_std:.4g}; "
            f"{len(idx)} of {len(seen)} features are not normalized ({', '.join(why)})"
        )
        self.emit(
            "inputs_unnormalized",
            "warning",
            message,
            causes=("unnormalized_inputs",),
            confidence=0.9 if reasons["range"].any() or reasons["std"].any() else 0.7,
            min=g_lo,
            max=g_hi,
            mean=g_mean,
            std=g_std,
            reasons=why,
            features=idx[:_LIST].tolist(),
            n_flagged=len(idx),
            n_features=len(seen),
            fraction=len(idx) / len(seen),
            worst={
                str(int(i)): {"mean": float(mean[i]), "std": float(std[i]), "min": float(lo[i]), "max": float(hi[i])}
                for i in worst
            },
            looks_like_pixels=pixels,
            samples=int(count.max()),
            thresholds={
                "mean": self.mean_threshold,
                "std": self.std_threshold,
                "max_abs": self.max_abs,
                "min_std": self.min_std,
            },
        )

    def _check_constant(self, constant: np.ndarray, mean: np.ndarray, count: np.ndarray) -> None:
        n_const = int(constant.sum())
        if n_const == 0:
            return
        fraction = n_const / len(constant)
        no_signal = fraction >= self.constant_fraction
        key = "constant_features:all" if no_signal else "constant_features:some"
        if key in self.reported or (not no_signal and "constant_features:all" in self.reported):
            return
        self.reported = [*self.reported, key]
        idx = np.flatnonzero(constant)
        values = {str(int(i)): float(mean[i]) for i in idx[:_LIST]}
        if no_signal:
            message = (
                f"{n_const} of {len(constant)} input features never changed over {int(count.max())} samples: "
                "the model sees constant inputs"
            )
        else:
            message = f"{n_const} of {len(constant)} input features are constant so far (values {values})"
        self.emit(
            "constant_features",
            "warning" if no_signal else "info",
            message,
            causes=("no_signal",) if no_signal else (),
            confidence=0.8 if no_signal else None,
            features=idx[:_LIST].tolist(),
            n_constant=n_const,
            n_features=len(constant),
            fraction=fraction,
            values=values,
            samples=int(count.max()),
            threshold=self.constant_fraction,
        )

    def _report_nonfinite(self, v: dict[str, Any], new: float, total: float) -> None:
        per = np.asarray(v["elements"], dtype=np.float64) - np.asarray(v["count"], dtype=np.float64).reshape(-1)
        per = per.reshape(-1)
        features = np.flatnonzero(per > 0)
        nan, inf = float(v["nan"]), total - float(v["nan"])
        self.emit(
            "nonfinite_inputs",
            "error",
            f"{int(new)} NaN/Inf value(s) in the sampled inputs since the last check "
            f"({int(total)} in all, in {len(features)} of {len(per)} features)",
            causes=("non_finite",),
            confidence=0.95,
            where="inputs",
            count=int(new),
            total=int(total),
            nan=int(nan),
            inf=int(inf),
            features=features[:_LIST].tolist(),
            per_feature={str(int(i)): int(per[i]) for i in features[:_LIST]},
        )

    # ----------------------------------------------------------------- device side
    def _feature_dim(self, x: Tensor) -> int | None:
        if self.feature_dim is None:
            return 1 if x.dim() >= 2 else None
        if not -x.dim() <= self.feature_dim < x.dim() or self.feature_dim % x.dim() == 0:
            raise ValueError(
                f"{type(self).__name__}: feature_dim={self.feature_dim} does not name a non-batch dim of "
                f"inputs of shape {tuple(x.shape)}"
            )
        return self.feature_dim % x.dim()

    def _declare(self, n: int) -> None:
        self.n_features = n
        f64 = torch.float64
        # Cumulative over the run: a feature is constant only if it never changed.
        self.add_state("count", torch.zeros(n, dtype=f64), reduce="sum")
        self.add_state("elements", torch.zeros((), dtype=f64), reduce="sum")
        self.add_state("s1", torch.zeros(n, dtype=f64), reduce="sum")
        self.add_state("s2", torch.zeros(n, dtype=f64), reduce="sum")
        self.add_state("lo", torch.full((n,), math.inf, dtype=f64), reduce="min")
        self.add_state("hi", torch.full((n,), -math.inf, dtype=f64), reduce="max")
        self.add_state("nan", torch.zeros((), dtype=f64), reduce="sum")
        self.add_state("batches", torch.zeros((), dtype=f64), reduce="sum")

    def _fold(self, x: Tensor, dim: int | None) -> None:
        # Float ops only: on the CPU an op that makes or reads a bool mask (isfinite, where, isnan)
        # costs several times a float one, and the batch is read once per op. nan_to_num with a fill
        # is where(isfinite(x), x, fill) in one float op; the non-finite total is derived at check
        # points from the counts.
        if dim is None:
            x = x.reshape(-1, 1)
            dim = 1
        dims = tuple(d for d in range(x.dim()) if d != dim)
        shape = [1] * x.dim()
        shape[dim] = x.shape[dim]
        f64 = torch.float64
        per_feature = x.numel() // x.shape[dim]
        # Counts of 0/1 values are exact in the input's float type below 2**24 (float32's integers):
        # summed there, they skip a float64 copy of the batch.
        count_dtype = x.dtype if x.numel() < 2**24 else f64
        xf = x.nan_to_num(0.0, 0.0, 0.0)
        ones = x.mul(0).add_(1.0).nan_to_num_(0.0)  # 1 where finite, else 0 (x * 0 is NaN there)
        n = ones.sum(dims, dtype=count_dtype).to(f64)
        batch_mean = xf.sum(dims, dtype=f64) / n.clamp_min(1.0)
        # x - mean where finite, +0 elsewhere: the product is exact, so this rounds as the difference.
        centred = torch.addcmul(xf, batch_mean.to(x.dtype).reshape(shape), ones, value=-1.0)
        m2 = centred.mul_(centred).sum(dims, dtype=f64)
        # Sum of squares from the centred part, so large means do not cancel the variance away.
        self.s1.add_(batch_mean * n)
        self.s2.add_(m2 + n * batch_mean.square())
        self.count.add_(n)
        self.elements.add_(per_feature)
        torch.minimum(self.lo, x.nan_to_num(math.inf, math.inf, math.inf).amin(dims), out=self.lo)
        torch.maximum(self.hi, x.nan_to_num(-math.inf, -math.inf, -math.inf).amax(dims), out=self.hi)
        # 1 at NaN, 0 elsewhere (finite values cancel exactly, infinities become 0 in both).
        self.nan.add_(x.nan_to_num(1.0, 0.0, 0.0).sub_(xf).sum(dtype=count_dtype))
        self.batches.add_(1.0)

    # ----------------------------------------------------------------- state
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (the per-feature states are declared first if needed)."""
        n = state.get("n_features")
        if n is not None and self.n_features is None:
            self._declare(int(n))
        super().load_state_dict(state)
