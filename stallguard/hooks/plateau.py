"""PlateauDetector: tell a stalled loss from a noisy one, and notice divergence and oscillation."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

from .._validate import check_choice, check_float, check_int
from ..hook import Hook
from ..registry import register
from ..stats import CheckContext, host_median

__all__ = ["Finding", "PlateauDetector"]

# Defaults for a dense, noisy per-step stream (the training loss) and for a sparse, already averaged
# one (a validation metric). Measured and explained in docs/hooks/plateau.md.
_DENSE = {"window": 50, "patience": 50, "warmup": 0, "patience_growth": 6.0}
_SPARSE = {"window": 1, "patience": 5, "warmup": 0, "patience_growth": 0.0}

# Oscillation compares this many consecutive blocks of the stretch without progress.
_BLOCKS = 10


class Finding(NamedTuple):
    """One thing :meth:`PlateauDetector.update` found: an event kind, the step, and its evidence."""

    kind: str
    step: int
    data: dict[str, Any]


def _rank_z(current: Sequence[float] | np.ndarray, reference_sorted: np.ndarray) -> float:
    """How far ``current`` lies below ``reference``, as a Mann-Whitney z score (positive: lower).

    Rank based, so the size of the values does not matter, only their order: a series that keeps
    falling always tests lower, whatever its steps, and a flat noisy one rarely does.
    """
    n1, n2 = len(current), len(reference_sorted)
    below = int(reference_sorted.searchsorted(current, side="left").sum())  # reference values < current
    not_above = int(reference_sorted.searchsorted(current, side="right").sum())  # reference values <= current
    # Pairs where current is lower, ties counted half (summed over the current values).
    lower = n1 * n2 - not_above + 0.5 * (not_above - below)
    mean = n1 * n2 / 2.0
    sd = math.sqrt(n1 * n2 * (n1 + n2 + 1) / 12.0)
    return (lower - mean) / sd


def _max_rank_z(window: int) -> float:
    """The largest z :func:`_rank_z` can give for two windows of this size (all of one below the other)."""
    return (window * window / 2.0) / math.sqrt(window * window * (2 * window + 1) / 12.0)


def _kruskal_ratio(blocks: np.ndarray) -> float:
    """Kruskal-Wallis H of the rows of ``blocks`` divided by its degrees of freedom (about 1 for noise)."""
    k, b = blocks.shape
    n = k * b
    flat = blocks.reshape(-1)
    order = np.argsort(flat, kind="mergesort")
    ranks = np.empty(n, dtype=np.float64)
    ranks[order] = np.arange(1, n + 1, dtype=np.float64)
    # Average the ranks of tied values.
    sorted_vals = flat[order]
    _, start, counts = np.unique(sorted_vals, return_index=True, return_counts=True)
    for s, c in zip(start, counts):
        if c > 1:
            ranks[order[s : s + c]] = s + (c + 1) / 2.0
    mean_ranks = ranks.reshape(k, b).mean(axis=1)
    h = 12.0 / (n * (n + 1)) * b * float(np.sum((mean_ranks - (n + 1) / 2.0) ** 2))
    tie = 1.0 - float(np.sum(counts**3 - counts)) / (n**3 - n) if n > 1 else 1.0
    if tie <= 0:
        return 0.0  # every value equal: no swings at all
    return h / tie / (k - 1)


# Batches of at least this many observations go through the vectorised scan (_QuietScan); shorter
# ones are cheaper step by step.
_SCAN_MIN = 8


class _QuietScan:
    """Finds the *quiet* observations of one :meth:`PlateauDetector.update` call in vectorised numpy.

    A quiet observation is finite, completes a window, neither improves on the best window nor
    crosses the divergence bound, is no explosion, leaves ``converged`` as it is and does not bring
    the count of observations without improvement to the patience: all it changes is that count,
    the cooldown and the recent values. :meth:`skip` applies a run of them at once and returns the
    first observation the step-by-step logic must see. The window medians, the rank counts and the
    arithmetic are those of the step-by-step logic, term for term, so both take the same decisions.
    """

    def __init__(self, det: PlateauDetector, vals: np.ndarray) -> None:
        self.det = det
        self.vals = vals
        w = det.window
        finite = np.isfinite(vals)
        fidx = np.arange(len(vals)) if finite.all() else np.flatnonzero(finite)
        recent = det.recent
        prev = recent[max(len(recent) - (w - 1), 0) :] if w > 1 else []
        # The finite stream the windows slide over: the last window - 1 values already seen, then these.
        ext = np.concatenate([prev, vals[fidx]]) if prev else vals[fidx]
        self.ext = ext
        # The window ending at ext position p belongs to new finite value p - len(prev); whole windows
        # only: from the first position past the old values where window values were seen in all.
        self.first = first = max(w - 1, len(prev), w - 1 - det.finite + len(prev))
        self.where = where = fidx[first - len(prev) :]  # index into vals of each whole window's last value
        self.level = np.full(len(vals), np.nan)
        self.complete = np.zeros(len(vals), dtype=bool)
        if len(where):
            windows = np.sort(ext[np.arange(first - w + 1, len(ext) - w + 1)[:, None] + np.arange(w)], axis=1)
            mid = w // 2
            self.level[where] = windows[:, mid] if w % 2 else (windows[:, mid - 1] + windows[:, mid]) / 2.0
            self.complete[where] = True
        self._key: tuple[Any, ...] | None = None
        self._loud: np.ndarray | None = None
        self._patience: np.ndarray | None = None

    def _converged_mask(self) -> np.ndarray:
        det = self.det
        start = det._start()
        if det.mode != "min" or not start > 0:
            return np.zeros(len(self.level), dtype=bool)
        return (self.level >= 0) & (self.level <= det.converged_fraction * start)

    def _loud_mask(self) -> np.ndarray:
        # Observations that may change the state beyond the counters, for the current best window.
        det = self.det
        key = (det.best_window, det.best, det.start)
        if self._key is not None and self._key[0] is key[0] and self._key[1:] == key[1:]:
            assert self._loud is not None
            return self._loud
        best, level, vals = det.best, self.level, self.vals
        assert best is not None
        loud = ~self.complete
        if det.mode == "min":
            better = (
                level < best * (1.0 - det.threshold) if det.threshold_mode == "rel" else level < best - det.threshold
            )
        else:
            better = (
                level > best * (1.0 + det.threshold) if det.threshold_mode == "rel" else level > best + det.threshold
            )
        if det.window > 1 and det.noise_z > 0 and better.any():
            better &= self._rank_z() >= det.noise_z
        bound = det._divergence_bound(best)
        worse = level > bound if det.mode == "min" else level < bound
        loud = loud | better | worse
        if det.mode == "min":
            ref = max(det._start(), best)
            if ref > 0:
                loud |= vals > det.explosion_factor * ref
        self._key, self._loud = key, loud
        return loud

    def _rank_z(self) -> np.ndarray:
        # _rank_z for every whole window at once: the rank counts of each value, summed per window.
        det = self.det
        ref = det._sign_sorted()
        u = self.ext if det.mode == "min" else -self.ext
        w, n2 = det.window, len(ref)
        # Prefix sums of the counts; a window's count is the difference across it.
        below = np.concatenate(([0], np.cumsum(ref.searchsorted(u, side="left"))))
        not_above = np.concatenate(([0], np.cumsum(ref.searchsorted(u, side="right"))))
        f = self.first
        below = below[f + 1 :] - below[f + 1 - w : len(below) - w]
        not_above = not_above[f + 1 :] - not_above[f + 1 - w : len(not_above) - w]
        lower = (w * n2 - not_above) + 0.5 * (not_above - below)
        z = np.full(len(self.level), np.nan)
        z[self.where] = (lower - w * n2 / 2.0) / math.sqrt(w * n2 * (w + n2 + 1) / 12.0)
        return z

    def _patience_by_level(self) -> np.ndarray:
        # _patience for every level (the start level is fixed once a best exists).
        if self._patience is not None:
            return self._patience
        det = self.det
        if det.patience_growth == 0 or det.mode != "min":
            pat = np.full(len(self.level), float(det.patience))
        else:
            start = det._start()
            progress = np.minimum(np.maximum(1.0 - self.level / start, 0.0), 1.0) if start > 0 else 0.0
            pat = np.ceil(det.patience * (1.0 + det.patience_growth * progress))
            pat = np.where(self._converged_mask(), float(det.patience), pat)
        self._patience = pat
        return pat

    def skip(self, i: int) -> int:
        """Apply the quiet observations from index ``i`` on; return the index of the first loud one."""
        det = self.det
        if det.best is None:
            return i
        loud = self._loud_mask()[i:]
        if det.converged:
            loud = loud | ~self._converged_mask()[i:]
        hits = np.flatnonzero(loud)
        run = int(hits[0]) if len(hits) else len(loud)
        if run == 0:
            return i
        # The count without improvement, as _observe_window keeps it: +1 each, back to 0 in the
        # warm-up and while the cooldown runs.
        t = np.arange(run)
        if det.observations + 1 > det.warmup and det.cooldown_counter == 0:
            num_bad = det.num_bad + 1 + t
        else:
            zero = (det.observations + 1 + t <= det.warmup) | (t < det.cooldown_counter)
            last_zero = np.maximum.accumulate(np.where(zero, t, -1))
            num_bad = np.where(last_zero >= 0, t - last_zero, det.num_bad + 1 + t)
        due = np.flatnonzero(num_bad >= self._patience_by_level()[i : i + run])
        if len(due):
            run = int(due[0])  # that observation reports a plateau: step by step
            if run == 0:
                return i
        det.observations += run
        det.finite += run
        det.recent.extend(self.vals[i : i + run].tolist())
        if len(det.recent) > det._keep:
            del det.recent[: len(det.recent) - det._keep]
        det.num_bad = int(num_bad[run - 1])
        det.cooldown_counter = max(det.cooldown_counter - run, 0)
        det._worse = False
        return i + run


@register("plateau", default="monitor")
class PlateauDetector(Hook):
    """Report when a loss (or any observed metric) stops improving, diverges, or swings without progress.

    Per-step training losses are noisy, so single values are never compared. After each new
    observation the detector asks whether the last ``window`` observations are *better* than the best
    earlier window: their median passes ReduceLROnPlateau's improvement test (``threshold``,
    ``threshold_mode``) and their values rank below the best window's by at least ``noise_z``
    standard deviations (a Mann-Whitney test: mini-batch noise does not count as progress, while a
    series that keeps falling always does, whatever the size of its steps). Observations without such
    an improvement are counted (``warmup`` and ``cooldown`` hold the count at zero, as cooldown does
    in ReduceLROnPlateau); once the count reaches the patience, it emits ``plateau`` and counts again
    from zero, so a plateau that persists is reported again one patience later. The patience grows
    with the progress already made: ``patience * (1 + patience_growth * progress)``, where
    ``progress`` is the fraction of the start level (the first observed value) already lost, so a
    loss stuck where it started is reported soonest and a pause after much progress needs more
    evidence. It emits ``recovered`` when improvement resumes, and ``converged`` (info, once)
    instead of ``plateau`` when the level is below ``converged_fraction`` of the start.

    It emits ``divergence`` for non-finite values, for a window median ``divergence_factor`` times
    worse than the best window median, and for single values above ``explosion_factor`` times the
    start (or best) level; and, with a plateau, ``oscillation`` when the stretch without progress is
    made of swings of the level (a Kruskal-Wallis test over ten consecutive blocks) rather than
    flat noise.

    The detector reads the Guard's host copy of the stream at check points and does no work per
    step; a finding is reported at the next check point (``Guard(check_every=...)``), one event per
    kind and check point.

    Args:
        monitor: The observed stream: ``"loss"`` (``guard.observe(loss)``) or a metric name
            (``guard.observe(val_loss=...)``).
        mode: ``"min"`` if lower is better, ``"max"`` if higher is better. ``converged``, explosions
            and the growth of patience apply to ``"min"`` only.
        patience: Observations without improvement before ``plateau``, when no progress was made.
            Default: 50 for ``"loss"``, 5 for a metric (counted in observations of that metric).
        threshold: Minimum change of the window median that counts as improvement.
        threshold_mode: ``"rel"`` (relative to the best, as ReduceLROnPlateau) or ``"abs"``.
        cooldown: Observations after a ``plateau`` before counting starts again.
        warmup: Observations at the start that never count towards a plateau (the first window
            fills first in any case). Default: 0.
        window: Observations per window. Default: 50 for ``"loss"``; 1 for a metric (a validation
            metric is an average already; with 1 the noise test is off and the improvement test is
            exactly ReduceLROnPlateau's).
        min_delta: Alias for an absolute ``threshold`` (the Keras and Lightning name).
        noise_z: Standard deviations of the rank test an improvement needs; 0 turns the test off.
        converged_fraction: A flat level below this fraction of the start is ``converged``.
        divergence_factor: ``divergence`` when the window median exceeds the best window median by
            ``divergence_factor - 1`` times the best's size.
        explosion_factor: ``divergence`` when a single value exceeds this multiple of the start
            level (or of the best level, when higher).
        oscillation_ratio: Kruskal-Wallis H per degree of freedom over ten blocks of the recent
            values above which the level swings (about 1 for noise).
        oscillation_amplitude: Minimum range of the block medians, relative to the level.
        patience_growth: How much the patience grows with progress. Default: 6 for ``"loss"``, 0
            for a metric.
        **kwargs: ``every``, ``start_step``, ``name`` (see :class:`~stallguard.Hook`).

    Example:
        A synthetic stream through a model-less Guard: it falls, then stays flat.

        >>> import stallguard as sg
        >>> det = sg.PlateauDetector(patience=20, window=10, warmup=0)
        >>> guard = sg.Guard(None, None, hooks=[det], sinks=[], check_every=10)
        >>> for step in range(200):
        ...     guard.observe(max(1.0 - 0.01 * step, 0.5))
        ...     guard.after_step()
        >>> [e.kind for e in guard.events][:1]
        ['plateau']
        >>> guard.events[0].data["level"]
        0.5
        >>> guard.close()

        The same logic without a Guard, for quick experiments:

        >>> [f.kind for f in sg.PlateauDetector(patience=20, window=10).update([1.0] * 100)][:1]
        ['plateau']
    """

    def __init__(
        self,
        monitor: str = "loss",
        mode: str = "min",
        patience: int | None = None,
        threshold: float = 1e-4,
        threshold_mode: str = "rel",
        cooldown: int = 0,
        warmup: int | None = None,
        window: int | None = None,
        *,
        min_delta: float | None = None,
        noise_z: float = 2.0,
        converged_fraction: float = 0.01,
        divergence_factor: float = 2.0,
        explosion_factor: float = 100.0,
        oscillation_ratio: float = 3.5,
        oscillation_amplitude: float = 0.2,
        patience_growth: float | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        owner = type(self).__name__
        if not isinstance(monitor, str) or not monitor:
            raise ValueError(f"{owner}: monitor must be a non-empty str (a stream name), got {monitor!r}")
        self.monitor = monitor
        self.mode = check_choice(owner, "mode", mode, ("min", "max"))
        defaults = _DENSE if monitor == "loss" else _SPARSE
        self.patience = check_int(owner, "patience", defaults["patience"] if patience is None else patience, min=1)
        self.window = check_int(owner, "window", defaults["window"] if window is None else window, min=1)
        self.warmup = check_int(owner, "warmup", defaults["warmup"] if warmup is None else warmup, min=0)
        self.cooldown = check_int(owner, "cooldown", cooldown, min=0)
        threshold_mode = check_choice(owner, "threshold_mode", threshold_mode, ("rel", "abs"))
        threshold = check_float(owner, "threshold", threshold, min=0.0)
        if min_delta is not None:
            min_delta = check_float(owner, "min_delta", min_delta, min=0.0)
            if (threshold, threshold_mode) not in ((1e-4, "rel"), (min_delta, "abs")):
                raise ValueError(
                    f"{owner}: min_delta={min_delta!r} is an alias for threshold={min_delta!r} with "
                    f"threshold_mode='abs'; it conflicts with threshold={threshold!r}, "
                    f"threshold_mode={threshold_mode!r}. Give one or the other."
                )
            threshold, threshold_mode = min_delta, "abs"
        if threshold_mode == "rel" and threshold >= 1.0:
            raise ValueError(f"{owner}: threshold must be < 1 with threshold_mode='rel', got {threshold!r}")
        self.threshold = threshold
        self.threshold_mode = threshold_mode
        self.noise_z = check_float(owner, "noise_z", noise_z, min=0.0)
        if self.window > 1 and self.noise_z > 0 and _max_rank_z(self.window) <= self.noise_z:
            raise ValueError(
                f"{owner}: window={self.window} is too short for noise_z={self.noise_z}: two windows of "
                f"{self.window} can never differ by {self.noise_z} standard deviations. Use window=1 "
                "(no noise test), a window of at least 5, or noise_z=0."
            )
        self.converged_fraction = check_float(owner, "converged_fraction", converged_fraction, min=0.0, max=1.0)
        self.divergence_factor = check_float(
            owner, "divergence_factor", divergence_factor, min=1.0, min_open=True, allow_inf=True
        )
        self.explosion_factor = check_float(
            owner, "explosion_factor", explosion_factor, min=1.0, min_open=True, allow_inf=True
        )
        self.oscillation_ratio = check_float(owner, "oscillation_ratio", oscillation_ratio, min=0.0, allow_inf=True)
        self.oscillation_amplitude = check_float(
            owner, "oscillation_amplitude", oscillation_amplitude, min=0.0, allow_inf=True
        )
        if patience_growth is None:
            patience_growth = defaults["patience_growth"]
        self.patience_growth = check_float(owner, "patience_growth", patience_growth, min=0.0)
        self._keep = max(2 * self.window, self.patience)

        # Host state only: the detector reads the Guard's host copy of the stream at check points.
        self.add_state("consumed", 0)  # values of the Guard's series already read (Series.total)
        self.add_state("observations", 0)  # every value seen, finite or not
        self.add_state("finite", 0)  # finite values seen
        self.add_state("recent", [])  # the last max(2 * window, patience) finite values
        self.add_state("start", None)  # the first finite value: the level the run started from
        self.add_state("best", None)  # best window median so far
        self.add_state("best_window", [])  # that window's values, sorted
        self.add_state("best_step", 0)
        self.add_state("best_obs", 0)
        self.add_state("num_bad", 0)
        self.add_state("cooldown_counter", 0)
        self.add_state("plateau_since", None)  # step of the best before the current plateau, or None
        self.add_state("plateau_level", None)
        self.add_state("repeats", 0)  # plateau reports since the last improvement
        self.add_state("converged", False)
        self.add_state("diverging_since", None)  # step where the current divergence began, or None
        self.add_state("diverged_from", None)  # the level before the current divergence
        self.add_state("last_nonfinite_obs", None)
        self.add_state("divergence_reports", 0)
        self._rise: dict[str, Any] | None = None
        self._rise_began = False
        self._worse = False

    @property
    def min_delta(self) -> float | None:
        """The absolute threshold, when ``threshold_mode`` is ``"abs"`` (None otherwise)."""
        return self.threshold if self.threshold_mode == "abs" else None

    # ----------------------------------------------------------------- the Guard's side
    def on_check(self, check: CheckContext) -> None:
        steps, values, self.consumed = check.unread(self.monitor, self.consumed)
        if len(values) == 0:
            return
        findings = self.update(values, steps)
        self._emit_findings(findings)

    def _emit_findings(self, findings: list[Finding]) -> None:
        # One event per kind and check point: a kind found several times is summarised by its last
        # finding and a count.
        merged: dict[str, tuple[Finding, int]] = {}
        for f in findings:
            count = merged[f.kind][1] + 1 if f.kind in merged else 1
            merged[f.kind] = (f, count)
        for kind, (f, count) in merged.items():
            data = dict(f.data)
            data["count"] = count
            data["monitor"] = self.monitor
            severity, message, causes = self._describe(kind, data)
            self.emit(kind, severity, message, causes=causes, **data)

    def _describe(self, kind: str, d: dict[str, Any]) -> tuple[str, str, tuple[str, ...]]:
        m = self.monitor
        if kind == "plateau":
            return (
                "warning",
                f"{m} has not improved for {d['observations']} observations ({d['steps']} steps): "
                f"level {d['level']:.4g}, best {d['best']:.4g} at step {d['best_step']}",
                (),
            )
        if kind == "converged":
            return (
                "info",
                f"{m} has flattened at {d['level']:.4g}, {d['fraction']:.2%} of its start ({d['start']:.4g}): "
                "converged rather than stalled",
                (),
            )
        if kind == "divergence":
            if d["reason"] == "non_finite":
                text = f"{m} is not finite ({d['nonfinite']} non-finite values)"
                return "error", text, ("non_finite", "lr_too_high")
            if d["reason"] == "explosion":
                text = f"{m} exploded to {d['max_value']:.4g}, {d['ratio']:.3g}x its normal level {d['reference']:.4g}"
                return "error", text, ("lr_too_high",)
            text = f"{m} level {d['level']:.4g} is far worse than its best {d['best']:.4g} (bound {d['bound']:.4g})"
            return "error", text, ("lr_too_high",)
        if kind == "oscillation":
            return (
                "warning",
                f"{m} swings without progress: block medians range over {d['amplitude']:.0%} of the level "
                f"{d['level']:.4g} (swing ratio {d['ratio']:.3g})",
                ("lr_too_high",),
            )
        # recovered
        return (
            "info",
            f"{m} improves again after the {d['after']} (level {d['level']:.4g}, was {d['previous']:.4g})",
            (),
        )

    # ----------------------------------------------------------------- pure host logic
    def update(
        self, values: Sequence[float] | np.ndarray, steps: Sequence[int] | np.ndarray | None = None
    ) -> list[Finding]:
        """Feed new observations of the monitored stream; return what they revealed.

        This is the whole detection logic, on host numbers, without a Guard: ``on_check`` calls it
        with the values observed since the last check point. Useful for experiments and tests.

        Args:
            values: New observations, oldest first.
            steps: The optimizer step of each value; by default the running observation count.

        Returns:
            The findings, in order (kinds as the events: ``plateau``, ``converged``,
            ``divergence``, ``oscillation``, ``recovered``).
        """
        vals = np.asarray(values, dtype=np.float64).reshape(-1)
        if steps is None:
            stp = np.arange(self.observations + 1, self.observations + 1 + len(vals), dtype=np.int64)
        else:
            stp = np.asarray(steps, dtype=np.int64).reshape(-1)
            if len(stp) != len(vals):
                raise ValueError(f"update: got {len(vals)} values but {len(stp)} steps")
        out: list[Finding] = []
        self._rise = None
        self._rise_began = False
        self._worse = False
        # [non-finite count, first non-finite step, (largest explosive value, its step, reference)]
        acc: list[Any] = [0, None, None]
        values_list, steps_list = vals.tolist(), stp.tolist()
        n = len(values_list)
        # Most observations change nothing but counters; a vectorised pass finds and skips them in
        # bulk, and only the ones that may change the best, the counters' course or an event go
        # through the step-by-step logic below.
        quiet = _QuietScan(self, vals) if n >= _SCAN_MIN else None
        i = 0
        while i < n:
            if quiet is not None:
                i = quiet.skip(i)
                if i >= n:
                    break
            self._observe_one(values_list[i], steps_list[i], out, acc)
            i += 1
        nonfinite, first_bad_step, explosion = acc
        divergence: Finding | None = None
        if nonfinite:
            divergence = Finding(
                "divergence",
                int(stp[-1]),
                {
                    "reason": "non_finite",
                    "nonfinite": nonfinite,
                    "first_step": first_bad_step,
                    "level": self._level_or_none(),
                    "best": self.best,
                },
            )
        elif explosion is not None:
            divergence = Finding(
                "divergence",
                explosion[1],
                {
                    "reason": "explosion",
                    "max_value": explosion[0],
                    "reference": explosion[2],
                    "start": self._start(),
                    "ratio": explosion[0] / explosion[2],
                    "factor": self.explosion_factor,
                    "level": self._level_or_none(),
                    "best": self.best,
                },
            )
        elif self._rise is not None and (self._rise_began or self._worse):
            # A new rise, or one that still holds at the end of these observations.
            data = dict(self._rise)
            divergence = Finding("divergence", int(data.pop("step")), data)
        if divergence is not None:
            self.divergence_reports += 1
            divergence.data["repeat"] = self.divergence_reports
            out.append(divergence)
            out.sort(key=lambda f: f.step)  # stable: findings of one step keep their order
        return out

    def _observe_one(self, v: float, s: int, out: list[Finding], acc: list[Any]) -> None:
        # One observation, step by step; ``acc`` collects what update() reports after the loop.
        self.observations += 1
        if not math.isfinite(v):
            acc[0] += 1
            self.last_nonfinite_obs = self.observations
            if acc[1] is None:
                acc[1] = s
            self._begin_divergence(s)
            return
        self._push(v)
        if self.mode == "min":
            # Against the first value, or the best level when that is higher: a lucky first batch
            # must not make ordinary values look like an explosion.
            ref = max(self._start(), self.best) if self.best is not None else self._start()
            if ref > 0 and v > self.explosion_factor * ref:
                self._begin_divergence(s)
                if acc[2] is None or v > acc[2][0]:
                    acc[2] = (v, s, ref)
        if self.finite >= self.window:
            out.extend(self._observe_window(s))

    def _push(self, v: float) -> None:
        self.finite += 1
        self.recent.append(v)
        if len(self.recent) > self._keep:
            del self.recent[: len(self.recent) - self._keep]
        if self.start is None:
            self.start = v

    def _start(self) -> float:
        return self.start if self.start is not None else math.nan

    def _level_or_none(self) -> float | None:
        if len(self.recent) < self.window:
            return None
        return host_median(self.recent[-self.window :])

    def _better(self, a: float, best: float) -> bool:
        # ReduceLROnPlateau's improvement test, term for term.
        if self.mode == "min":
            return a < best * (1.0 - self.threshold) if self.threshold_mode == "rel" else a < best - self.threshold
        return a > best * (1.0 + self.threshold) if self.threshold_mode == "rel" else a > best + self.threshold

    def _divergence_bound(self, best: float) -> float:
        # "factor times worse" relative to the best's size; the start level keeps a best near zero
        # from making every wiggle a divergence.
        start = self._start()
        scale = max(abs(best), self.converged_fraction * abs(start))
        if self.mode == "min":
            return best + (self.divergence_factor - 1.0) * scale
        return best - (1.0 - 1.0 / self.divergence_factor) * scale

    def _begin_divergence(self, step: int) -> None:
        if self.diverging_since is None:
            self.diverging_since = step
            # Recovery means getting back below where the run was before it diverged.
            self.diverged_from = self.best if self.best is not None else self._start()

    def _observe_window(self, step: int) -> list[Finding]:
        out: list[Finding] = []
        win = self.recent[-self.window :]
        level = host_median(win)
        if self.converged and not self._is_converged(level):
            self.converged = False  # back above the floor: a later flat stretch is a plateau again
        if self.best is None:
            self._set_best(level, win, step)
            return out
        improved = self._better(level, self.best) and (
            self.window == 1
            or self.noise_z == 0
            or _rank_z(win if self.mode == "min" else [-v for v in win], self._sign_sorted()) >= self.noise_z
        )
        # Divergence: the level far worse than the best window (non-finite values are counted in update()).
        bound = self._divergence_bound(self.best)
        self._worse = level > bound if self.mode == "min" else level < bound
        if self._worse:
            if self.diverging_since is None:
                self._begin_divergence(step)
                self._rise_began = True
            self._rise = {
                "reason": "rise",
                "since_step": self.diverging_since,
                "level": level,
                "best": self.best,
                "best_step": self.best_step,
                "bound": bound,
                "ratio": level / self.best if self.best else math.inf,
                "factor": self.divergence_factor,
                "step": step,
            }

        if improved:
            recent_nonfinite = (
                self.last_nonfinite_obs is not None and self.observations - self.last_nonfinite_obs < self.window
            )
            if self.diverging_since is not None:
                if not recent_nonfinite and self._better(level, self.diverged_from):
                    out.append(self._recovered("divergence", level, self.diverged_from, self.diverging_since, step))
                    self.diverging_since = None
            elif self.plateau_since is not None and not self.converged:
                out.append(self._recovered("plateau", level, self.plateau_level, self.plateau_since, step))
            self._set_best(level, win, step)
            return out
        self.num_bad += 1
        if self.observations <= self.warmup:
            self.num_bad = 0
        if self.cooldown_counter > 0:
            self.cooldown_counter -= 1
            self.num_bad = 0
        patience = self._patience(level)
        if self.num_bad >= patience:
            out.extend(self._plateau(level, step, patience))
            self.num_bad = 0
            self.cooldown_counter = self.cooldown
        return out

    @staticmethod
    def _recovered(after: str, level: float, previous: float | None, since: int, step: int) -> Finding:
        data = {"after": after, "level": level, "previous": previous, "since_step": since, "steps": step - since}
        return Finding("recovered", step, data)

    def _sign_sorted(self) -> np.ndarray:
        # Cached until the best window changes: the rank test runs on most observations.
        cached = getattr(self, "_sorted_cache", None)
        if cached is not None and cached[0] is self.best_window:
            return cached[1]
        best = np.asarray(self.best_window, dtype=np.float64)  # kept sorted by _set_best
        ref = best if self.mode == "min" else -best[::-1]
        self._sorted_cache = (self.best_window, ref)
        return ref

    def _is_converged(self, level: float) -> bool:
        start = self._start()
        return self.mode == "min" and start > 0 and 0 <= level <= self.converged_fraction * start

    def _patience(self, level: float) -> int:
        # More patience the more of its start level the run has already lost: a pause after much
        # progress is often a healthy one. None at the floor: "converged" is no warning.
        if self.patience_growth == 0 or self.mode != "min" or self._is_converged(level):
            return self.patience
        start = self._start()
        progress = min(max(1.0 - level / start, 0.0), 1.0) if start > 0 else 0.0
        return math.ceil(self.patience * (1.0 + self.patience_growth * progress))

    def _set_best(self, level: float, win: list[float], step: int) -> None:
        self.best = level
        self.best_window = sorted(win)
        self.best_step = step
        self.best_obs = self.observations
        self.num_bad = 0
        self.plateau_since = None
        self.plateau_level = None
        self.repeats = 0

    def _plateau(self, level: float, step: int, patience: int) -> list[Finding]:
        start = self._start()
        if self.plateau_since is None:
            self.plateau_since = self.best_step
        self.plateau_level = level
        if self.converged or self._is_converged(level):
            if self.converged:
                return []  # reported once per converged stretch
            self.converged = True
            return [
                Finding(
                    "converged",
                    step,
                    {"level": level, "start": start, "fraction": level / start, "best": self.best},
                )
            ]
        self.repeats += 1
        best = self.best if self.best is not None else level
        data: dict[str, Any] = {
            "level": level,
            "best": best,
            "best_step": self.best_step,
            "steps": step - self.best_step,
            "observations": self.observations - self.best_obs,
            "change": (level - best) / abs(best) if best else 0.0,
            "start": start,
            "window": self.window,
            "patience": patience,
            "repeat": self.repeats,
        }
        out = [Finding("plateau", step, data)]
        osc = self._oscillation(level)
        if osc is not None:
            out.append(Finding("oscillation", step, osc))
        return out

    def _oscillation(self, level: float) -> dict[str, Any] | None:
        span = len(self.recent)
        size = span // _BLOCKS
        if size < 2 or level == 0:
            return None
        blocks = np.asarray(self.recent[len(self.recent) - size * _BLOCKS :]).reshape(_BLOCKS, size)
        medians = np.median(blocks, axis=1)
        amplitude = float(medians.max() - medians.min()) / abs(level)
        ratio = _kruskal_ratio(blocks)
        if ratio < self.oscillation_ratio or amplitude < self.oscillation_amplitude:
            return None
        return {
            "level": level,
            "amplitude": amplitude,
            "ratio": ratio,
            "block_size": size,
            "block_medians": [float(m) for m in medians],
            "threshold_ratio": self.oscillation_ratio,
            "threshold_amplitude": self.oscillation_amplitude,
        }
