"""Overfit: the training loss keeps falling while the validation loss rises."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .._validate import check_choice, check_float, check_int, check_type
from ..hook import Hook
from ..registry import register
from ..stats import CheckContext

__all__ = ["Overfit"]


@register("overfit", default="monitor")
class Overfit(Hook):
    """Report overfitting: the validation metric gets worse while the training loss keeps falling.

    The validation metric is a sparse stream the loop reports with ``guard.observe(val_loss=...)``
    (any name, given as ``monitor``). Each new validation is compared with the best so far the way
    Keras and Lightning ``EarlyStopping`` compare it: it improves when it is better than the best by
    more than ``min_delta`` (``value < best - min_delta`` for ``mode="min"``); otherwise it counts one
    validation without improvement. After ``patience`` validations without improvement
    (``wait >= patience``, as every early stopper counts), the validation has *risen* when the median
    of those last ``patience`` validations is worse by more than ``min_delta`` than the level at the
    best, the median of the ``patience`` validations centred on the best (the best single value of a
    noisy curve is a lucky low that later values miss), and by more than ``noise_z`` standard
    deviations of the validation noise (a flat but noisy curve does not rise; a steady rise does,
    however small its steps). Overfitting also needs the training
    loss to fall over the same stretch: the median of the training losses observed during the
    ``patience`` validation intervals before the best validation, against the median of those
    during the last ``patience`` intervals (the medians smooth the noisy per-batch loss over the
    same number of intervals). When both hold, it emits ``overfitting`` once, and again only after a
    new best validation.

    Everything runs on the host at check points, from the Guard's copies of the observed streams;
    there is no per-step work. With ``stop=True`` it also asks the loop to stop
    (``guard.request_stop``; the loop reads ``guard.should_stop``), as ``EarlyStopping`` would.

    Args:
        monitor: The validation stream (``guard.observe(val_loss=...)``).
        mode: ``"min"`` if lower is better (a loss), ``"max"`` if higher is better (an accuracy).
        patience: Validations without improvement before the rise is judged (Lightning's default, 3).
        min_delta: Minimum absolute change that counts as an improvement, and by which the recent
            validations must be worse than the best.
        train_monitor: The training-loss stream (lower is better).
        train_min_delta: Relative fall of the smoothed training loss required (0: any fall).
        warmup: Validations at the start that never count (Keras ``start_from_epoch``).
        noise_z: The rise must also exceed this many standard deviations of the validation noise,
            estimated from the scatter of successive validations around their trend since shortly
            before the best; 0 turns this test off (then ``min_delta`` alone decides).
        stop: Ask the training loop to stop when overfitting is found.
        **kwargs: ``every``, ``start_step``, ``name`` (see :class:`~stallguard.Hook`).

    Example:
        Synthetic streams through a model-less Guard: the training loss falls all along, the
        validation loss turns up after step 40.

        >>> import stallguard as sg
        >>> guard = sg.Guard(None, None, hooks=[sg.Overfit(patience=3)], sinks=[], check_every=10)
        >>> for step in range(1, 101):
        ...     guard.observe(1.0 / step)
        ...     if step % 10 == 0:
        ...         guard.observe(val_loss=abs(step - 40) / 100 + 0.5)
        ...     guard.after_step()
        >>> e = guard.events[0]
        >>> e.kind, e.data["best_step"], e.data["best_val"]
        ('overfitting', 39, 0.5)
        >>> guard.close()
    """

    def __init__(
        self,
        monitor: str = "val_loss",
        mode: str = "min",
        patience: int = 3,
        min_delta: float = 0.0,
        *,
        train_monitor: str = "loss",
        train_min_delta: float = 0.0,
        warmup: int = 0,
        noise_z: float = 3.0,
        stop: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        owner = type(self).__name__
        for pname, value in (("monitor", monitor), ("train_monitor", train_monitor)):
            if not isinstance(value, str) or not value:
                raise ValueError(f"{owner}: {pname} must be a non-empty str (a stream name), got {value!r}")
        if monitor == train_monitor:
            raise ValueError(f"{owner}: monitor and train_monitor must differ, both are {monitor!r}")
        self.monitor = monitor
        self.train_monitor = train_monitor
        self.mode = check_choice(owner, "mode", mode, ("min", "max"))
        self.patience = check_int(owner, "patience", patience, min=1)
        self.min_delta = check_float(owner, "min_delta", min_delta, min=0.0)
        self.train_min_delta = check_float(owner, "train_min_delta", train_min_delta, min=0.0, max=1.0, max_open=True)
        self.warmup = check_int(owner, "warmup", warmup, min=0)
        self.noise_z = check_float(owner, "noise_z", noise_z, min=0.0)
        self.stop = check_type(owner, "stop", stop, bool, "a bool")
        # Host state only.
        self.add_state("consumed", 0)  # values of the monitored series already read (Series.total)
        self.add_state("validations", 0)
        self.add_state("val_steps", [])  # step of every validation counted, for the train-loss windows
        self.add_state("val_values", [])  # and its value
        self.add_state("recent", [])  # the last patience validations since the best, oldest first
        self.add_state("best", None)
        self.add_state("best_step", None)
        self.add_state("best_index", None)  # position of the best in val_steps
        self.add_state("wait", 0)
        self.add_state("reported", False)  # reported since the last best
        self.add_state("reports", 0)

    # ----------------------------------------------------------------- the Guard's side
    def on_check(self, check: CheckContext) -> None:
        guard = check.guard
        if not guard.has_series(self.monitor):
            return
        series = guard.series(self.monitor)
        steps, values = series.since(self.consumed)
        self.consumed = series.total
        for s, v in zip(steps.tolist(), values.tolist()):
            found = self._update(int(s), float(v), check)
            if found is not None:
                self._report(found)

    def _better(self, value: float, best: float) -> bool:
        # Keras/Lightning: monitor_op(current - signed_min_delta, best), strictly better by more than min_delta.
        if self.mode == "min":
            return value < best - self.min_delta
        return value > best + self.min_delta

    def _update(self, step: int, value: float, check: CheckContext) -> dict[str, Any] | None:
        self.validations += 1
        if self.validations <= self.warmup:
            return None
        self.val_steps.append(step)
        self.val_values.append(value)
        if not math.isfinite(value):
            return None  # NaN is the divergence detectors' finding; it is neither best nor a rise
        if self.best is None or self._better(value, self.best):
            self.best, self.best_step, self.best_index = value, step, len(self.val_steps) - 1
            self.wait = 0
            self.recent = []
            self.reported = False
            return None
        self.wait += 1
        self.recent = [*self.recent[-(self.patience - 1) :], value] if self.patience > 1 else [value]
        if self.wait < self.patience or self.reported:
            return None
        # The recent level against the level at the best (the median of the patience validations
        # centred on it), not against the best single value: on a noisy curve the best is a lucky low
        # that most later values miss, which is no rise.
        last = float(np.median(self.recent[-self.patience :]))
        lo = max(0, self.best_index - (self.patience - 1) // 2)
        around = np.asarray(self.val_values[lo : lo + self.patience])
        level = float(np.median(around[np.isfinite(around)]))
        noise = self._noise()
        margin = max(self.min_delta, self.noise_z * noise)
        rose = last > level + margin if self.mode == "min" else last < level - margin
        if not rose:
            return None
        trend = self._train_trend(check)
        if trend is None or not trend["train_now"] < trend["train_at_best"] * (1.0 - self.train_min_delta):
            return None
        self.reported = True
        return {
            "monitor": self.monitor,
            "mode": self.mode,
            "best_step": self.best_step,
            "best_val": self.best,
            "val_now": value,
            "val_recent": last,
            "best_level": level,
            "noise": noise,
            "val_step": step,
            "validations_since_best": self.wait,
            "patience": self.patience,
            "min_delta": self.min_delta,
            **trend,
        }

    def _noise(self) -> float:
        """The scatter of single validations around their trend, from the stretch around the best.

        Successive differences remove the level; their median absolute deviation removes a steady
        trend (a steady rise has near-constant differences) and ignores a few outliers. For
        independent noise of standard deviation s the differences have s * sqrt(2).
        """
        lo = max(0, (self.best_index or 0) - self.patience)
        vals = np.asarray(self.val_values[lo:], dtype=np.float64)
        vals = vals[np.isfinite(vals)]
        if len(vals) < 3:
            return 0.0
        d = np.diff(vals)
        return float(1.4826 * np.median(np.abs(d - np.median(d))) / math.sqrt(2.0))

    def _train_trend(self, check: CheckContext) -> dict[str, Any] | None:
        """Smoothed training loss over the ``patience`` validation intervals up to the best, and the last ones."""
        guard = check.guard
        if not guard.has_series(self.train_monitor) or self.best_index is None:
            return None
        series = guard.series(self.train_monitor)
        steps, values = series.steps, series.values
        vs = self.val_steps
        before_lo = vs[self.best_index - self.patience] if self.best_index >= self.patience else -1
        before = values[(steps > before_lo) & (steps <= vs[self.best_index])]
        after = values[(steps > vs[-1 - self.patience]) & (steps <= vs[-1])]
        before, after = before[np.isfinite(before)], after[np.isfinite(after)]
        if len(before) == 0 or len(after) == 0:
            return None
        at_best, now = float(np.median(before)), float(np.median(after))
        return {
            "train_at_best": at_best,
            "train_now": now,
            "train_change": (now - at_best) / abs(at_best) if at_best else 0.0,
            "train_samples": [len(before), len(after)],
        }

    def _report(self, d: dict[str, Any]) -> None:
        self.reports += 1
        m = self.monitor
        message = (
            f"{m} has not improved for {d['validations_since_best']} validations and rose to {d['val_recent']:.4g} "
            f"(best {d['best_val']:.4g} at step {d['best_step']}) while the training loss fell "
            f"{-d['train_change']:.0%} ({d['train_at_best']:.4g} -> {d['train_now']:.4g})"
        )
        # Surer the larger the rise next to the best, and the larger the training loss's fall.
        rise = abs(d["val_recent"] - d["best_val"]) / max(abs(d["best_val"]), 1e-12)
        confidence = round(min(0.95, 0.6 + 0.5 * min(rise, 0.3) + 0.2 * min(-d["train_change"], 0.5)), 3)
        self.emit("overfitting", "warning", message, causes=("overfitting",), confidence=confidence, **d)
        if self.stop:
            self._require_guard("request_stop").request_stop(
                f"{type(self).__name__}: {m} rose for {d['validations_since_best']} validations since its best "
                f"at step {d['best_step']} while the training loss fell"
            )
