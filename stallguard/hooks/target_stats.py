"""TargetStats: the labels, the predictions and the loss level, checked against each other.

Label bugs stall a run without any error: labels shifted out of the model's range, a class that
dominates so much that predicting it alone looks good, targets of shape ``(N,)`` against outputs of
shape ``(N, 1)`` that an MSE loss silently broadcasts to ``(N, N)``, or labels that carry no relation
to the inputs, so the loss stays at the entropy of the label distribution. The hook counts labels and
predicted classes on the device and reads the counts at check points.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .._validate import check_float, check_int
from ..hook import Hook
from ..registry import register
from ..stats import CheckContext, Observation

__all__ = ["TargetStats"]

_LIST = 20
# Predictions a minority class would get at its label share, below which one interval cannot tell a miss.
_MIN_EXPECTED = 8.0


def _entropy(counts: np.ndarray) -> float:
    total = counts.sum()
    p = counts[counts > 0] / total
    return float(-(p * np.log(p)).sum())


@register("target_stats", default="monitor")
class TargetStats(Hook):
    """Check labels, predictions and the loss level of a classification run; check shapes of any run.

    The hook reads ``guard.observe(loss, outputs=..., targets=...)`` and recognizes the task from the
    dtypes and shapes alone (no value is read on the host per step):

    * **multi-class**: integer targets ``(N,)`` with outputs ``(N, C)`` (also ``(N, C, d...)`` with
      targets ``(N, d...)``, and ``(N, L, C)`` with ``(N, L)``): ``C`` classes, predictions are the argmax;
    * **binary**: one output per sample, ``(N,)`` or ``(N, 1)``, with integer targets or float targets
      that are all 0 or 1; predictions are ``output > 0`` (logits), or ``> 0.5`` when the batch's
      outputs all lie in [0, 1] (probabilities);
    * **regression**: any other float targets; only the shape check applies.

    On sampled observations (every ``every`` optimizer steps) it adds the labels and the predicted
    classes into per-class device counters (``index_add_`` into fixed-size states: unlike
    ``torch.bincount`` it needs no host read of the largest label), and counts labels outside
    ``[0, C)`` (``ignore_index`` excepted). The shape check runs on the host on every sampled call.
    Outputs with more than ``max_logits`` elements (a language model's ``(N, L, C)``) are counted on a
    strided subset of their rows of at most that size, starting at a different row each call: on a
    CPU, the argmax over every token of a large vocabulary would cost more than the rest of the Guard.
    At check points:

    * ``shape_mismatch`` (error, once per pair of shapes): float outputs and targets whose shapes
      broadcast to a third shape (``(N, 1)`` against ``(N,)`` gives ``(N, N)`` in ``mse_loss``), or
      integer targets whose shape fits no class layout of the outputs;
    * ``labels_out_of_range`` (error): labels below 0 or at or above the number of outputs;
    * ``class_imbalance`` (warning, once): after ``min_samples`` labels, the largest class holds at
      least ``imbalance_ratio`` times the smallest class seen (at most ``max_classes`` classes);
    * ``predictions_collapsed`` (warning, once per episode): in every check interval of the last
      ``collapse_patience`` steps or more, at least ``collapse_fraction`` of the predictions fall on
      one class and the other classes get less than a tenth of the predictions their label share would
      give them (a fresh model often predicts one class for a few dozen steps before it learns);
    * ``minority_underpredicted`` (warning, once per episode): on imbalanced labels, in every check
      interval of the last ``collapse_patience`` steps or more, a minority class (one with less than
      its even share ``1/C`` of the labels) gets less than ``underpredict_fraction`` of the
      predictions its label share would give it, while the majority takes them. Unlike
      ``predictions_collapsed`` it does not ask the loss to stay at chance: a model that ignores a
      rare class still lowers the mean loss by fitting the common one, so the loss falls while the
      rare class is missed. A model that learns the imbalanced labels predicts each class near its
      label share within a few intervals, and stays quiet.
    * ``loss_at_chance`` (warning): the mean training loss of each of five consecutive blocks of the
      last ``patience`` observed losses lies near the chance level, the entropy of the label
      distribution in nats: the loss of a model that predicts the label frequencies whatever the
      input. The first block lies within ``margin`` (relative) of it, no block lies more than
      ``margin`` above it or more than ``fall`` below it. A loss that stays flat at chance passes; so
      does one that leaves chance only slowly, which is what a model does when it memorizes labels
      that carry no information about the inputs (the data key ``fall`` says how far the last block
      lies below the first). A model that learns falls far below chance within such a window. It
      assumes a mean cross-entropy (or binary cross-entropy) loss passed to ``observe``.

    * ``val_loss_at_chance`` (warning, once): the loop observes a validation loss
      (``guard.observe(val_loss=...)``, the stream named by ``val_monitor``); after
      ``min_validations`` of them, none has come clearly below the chance level (``margin``) while the
      median of the last 50 training losses has: the model fits its training labels, and nothing of it
      carries over to held-out data. That is what labels without a learnable relation to the inputs
      give (the model memorizes them); an overfitting model first gets below chance on held-out data
      too, then rises. It assumes the held-out labels follow the training label distribution.

    ``predictions_collapsed``, ``loss_at_chance`` and ``val_loss_at_chance`` name ``class_imbalance`` as
    their cause when the labels are imbalanced (ratio at least ``imbalance_ratio``), ``no_signal`` otherwise;
    ``minority_underpredicted`` always names ``class_imbalance``.

    Args:
        every: Count the observations of every this many optimizer steps.
        imbalance_ratio: Majority/minority ratio from which the labels are imbalanced.
        min_samples: Labels counted before the imbalance is judged.
        max_classes: Above this many classes (token vocabularies, which are skewed by nature) the
            imbalance is not judged.
        collapse_fraction: Share of predictions on one class that counts as collapsed.
        collapse_patience: Optimizer steps the collapse (or the under-prediction of a minority class)
            must last, over whole check intervals.
        underpredict_fraction: A minority class that gets less than this fraction of the predictions its
            label share would give it is under-predicted.
        margin: Relative distance from the chance level that counts as "at chance".
        fall: Largest fall below the chance level (relative) that a loss starting at chance may show over
            ``patience`` steps and still count as at chance (memorization); at least ``margin``. None:
            twice ``margin``.
        patience: Observed losses (steps) the loss must stay at chance.
        val_monitor: The validation-loss stream compared with the chance level.
        min_validations: Validations observed before the validation loss is judged.
        ignore_index: A label value that marks positions to ignore (as in ``cross_entropy``).
        max_logits: Output elements counted per call at most (whole rows of classes, see above):
            65 rows of a 1000-token vocabulary, every row of a 64-sample, 10-class batch.
        start_step: Count no step before this one.
        name: Name used as the event source.

    Example:
        Labels 1..4 (one-based) for a model with four outputs:

        >>> import torch, stallguard as sg
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Linear(8, 4)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> guard = sg.Guard(model, opt, hooks=[sg.TargetStats(every=1)], sinks=[], check_every=5)
        >>> for _ in range(5):
        ...     x, y = torch.randn(32, 8), torch.randint(1, 5, (32,))
        ...     out = model(x)
        ...     loss = torch.nn.functional.cross_entropy(out, y.clamp(max=3))
        ...     opt.zero_grad(); loss.backward(); guard.observe(loss, outputs=out, targets=y); opt.step()
        >>> e = next(e for e in guard.events if e.kind == "labels_out_of_range")
        >>> e.data["max"], e.data["num_classes"]
        (4, 4)
        >>> guard.close()
    """

    def __init__(
        self,
        *,
        every: int = 5,
        imbalance_ratio: float = 10.0,
        min_samples: int = 500,
        max_classes: int = 100,
        collapse_fraction: float = 0.95,
        collapse_patience: int = 100,
        underpredict_fraction: float = 0.25,
        margin: float = 0.05,
        fall: float | None = None,
        patience: int = 200,
        val_monitor: str = "val_loss",
        min_validations: int = 3,
        ignore_index: int = -100,
        max_logits: int = 65536,
        start_step: int = 0,
        name: str | None = None,
    ) -> None:
        super().__init__(every=every, start_step=start_step, name=name)
        owner = type(self).__name__
        self.imbalance_ratio = check_float(owner, "imbalance_ratio", imbalance_ratio, min=1.0, min_open=True)
        self.min_samples = check_int(owner, "min_samples", min_samples, min=1)
        self.max_classes = check_int(owner, "max_classes", max_classes, min=2)
        self.collapse_fraction = check_float(
            owner, "collapse_fraction", collapse_fraction, min=0.5, max=1.0, min_open=True
        )
        self.collapse_patience = check_int(owner, "collapse_patience", collapse_patience, min=1)
        self.underpredict_fraction = check_float(
            owner, "underpredict_fraction", underpredict_fraction, min=0.0, max=1.0, min_open=True, max_open=True
        )
        self.margin = check_float(owner, "margin", margin, min=0.0, max=1.0, min_open=True, max_open=True)
        # Twice the margin by default: a loss memorizing random labels falls a few percent of chance per
        # hundred steps (the zoo's MLP and CNN: 5-8% over 200 steps); a learning model falls far more.
        self.fall = 2.0 * self.margin if fall is None else check_float(owner, "fall", fall, max=1.0, max_open=True)
        if self.fall < self.margin:
            raise ValueError(f"{owner}: fall must be at least margin ({self.margin!r}), got {fall!r}")
        self.patience = check_int(owner, "patience", patience, min=5)
        if not isinstance(val_monitor, str) or not val_monitor:
            raise ValueError(f"{owner}: val_monitor must be a non-empty str (a stream name), got {val_monitor!r}")
        self.val_monitor = val_monitor
        self.min_validations = check_int(owner, "min_validations", min_validations, min=1)
        self.ignore_index = check_int(owner, "ignore_index", ignore_index)
        self.max_logits = check_int(owner, "max_logits", max_logits, min=1)
        self._calls = 0  # rotates the first counted row when outputs are subsampled
        # Host state: the task seen, what was reported, the episodes in progress.
        self.add_state("task", None)
        self.add_state("n_classes", None)
        self.add_state("reported", [])
        self.add_state("out_of_range_seen", 0.0)
        self.add_state("collapse_start", None)
        self.add_state("last_check", 0)
        self.add_state("collapse_reported", False)
        self.add_state("under_start", None)
        self.add_state("under_reported", False)
        self.add_state("chance_reported", False)
        self.add_state("imbalance", None)
        self.add_state("val_consumed", 0)  # validation values already read (Series.total)
        self.add_state("val_count", 0)
        self.add_state("val_best", None)
        self.add_state("val_reported", False)
        self._skipped: str | None = None

    # ----------------------------------------------------------------- per step (host decisions on shapes only)
    def on_observe(self, obs: Observation) -> None:
        out, tgt = obs.outputs, obs.targets
        if not isinstance(tgt, Tensor) or not isinstance(out, Tensor):
            return
        found = self._layout(out, tgt)
        if found is None:
            return
        task, n_classes, class_dim = found
        if self.task == "regression":
            return
        if task == "regression":
            self.task = "regression"
            return
        if self.task is None:
            self._declare(task, n_classes)
        elif (self.task, self.n_classes) != (task, n_classes):
            self._skipped = f"{task} with {n_classes} classes after {self.task} with {self.n_classes}"
            return
        self._count(out.detach() if out.requires_grad else out, tgt, task, class_dim)

    def _layout(self, out: Tensor, tgt: Tensor) -> tuple[str, int, int] | None:
        """(task, classes, class dim) from dtypes and shapes, or None after reporting a mismatch."""
        o, t = tuple(out.shape), tuple(tgt.shape)
        n = o[0]
        if not tgt.is_floating_point() and not tgt.is_complex():
            if len(o) >= 2 and o[1] >= 2 and t == o[:1] + o[2:]:
                return "multiclass", o[1], 1
            if len(o) >= 3 and o[-1] >= 2 and t == o[:-1]:
                return "multiclass", o[-1], len(o) - 1
            if out.numel() == n and tgt.numel() == n:  # (N,) or (N, 1) outputs and labels
                return "binary", 2, -1
            self._mismatch(o, t, "integer targets fit no class layout of the outputs")
            return None
        if o != t:
            try:
                b = tuple(torch.broadcast_shapes(o, t))
            except RuntimeError:
                b = None
            if b is not None and b != o:
                self._mismatch(o, t, f"they broadcast to {b} in an elementwise loss")
                return None
            if b is None:
                self._mismatch(o, t, "they do not broadcast")
                return None
        if out.numel() == n and tgt.numel() == n:
            return "binary?", 2, -1
        return "regression", 0, -1

    def _mismatch(self, o: tuple[int, ...], t: tuple[int, ...], why: str) -> None:
        key = f"shape:{o[1:]}:{t[1:]}"
        if key in self.reported:
            return
        self.reported = [*self.reported, key]
        self.emit(
            "shape_mismatch",
            "error",
            f"outputs of shape {o} and targets of shape {t}: {why}; reshape one to match the other "
            "(e.g. outputs.squeeze(-1) or targets.unsqueeze(-1))",
            causes=("no_signal",),
            confidence=0.9,
            outputs_shape=list(o),
            targets_shape=list(t),
            reason=why,
        )

    def _declare(self, task: str, n_classes: int) -> None:
        if self.n_classes is not None:
            return
        self.task = task
        self.n_classes = n_classes
        f64 = torch.float64
        self.add_state("labels", torch.zeros(n_classes, dtype=f64), reduce="sum")
        self.add_state("window_labels", torch.zeros(n_classes, dtype=f64), reduce="sum", reset=True)
        self.add_state("window_preds", torch.zeros(n_classes, dtype=f64), reduce="sum", reset=True)
        self.add_state("label_min", torch.full((), math.inf, dtype=f64), reduce="min")
        self.add_state("label_max", torch.full((), -math.inf, dtype=f64), reduce="max")
        self.add_state("nonbinary", torch.zeros((), dtype=f64), reduce="sum")

    def _count(self, out: Tensor, tgt: Tensor, task: str, class_dim: int) -> None:
        c = self.n_classes
        assert c is not None
        if task == "multiclass":
            labels = tgt.reshape(-1)
            if class_dim == out.dim() - 1 and out.numel() > self.max_logits:
                rows = out.reshape(-1, c)
                stride = -(-rows.shape[0] // max(self.max_logits // c, 1))
                first = self._calls % stride
                self._calls += 1
                rows, labels = rows[first::stride], labels[first::stride]
                preds = rows.argmax(1)
            else:
                preds = out.argmax(class_dim).reshape(-1)
        else:
            o = out.reshape(-1).float()
            is_prob = (o.amin() >= 0) & (o.amax() <= 1)
            preds = torch.where(is_prob, o > 0.5, o > 0).long()
            labels = tgt.reshape(-1)
            if tgt.is_floating_point():
                binary = (labels == 0) | (labels == 1)
                self.nonbinary.add_((~binary).sum())
                labels = torch.where(binary, labels, -1.0).long()  # non-binary values count as out of range
        valid = labels != self.ignore_index
        # Clamping puts every label in a class slot; the ones it moved are out of range (weight 0).
        idx = labels.clamp(0, c - 1).long()
        inside = valid & (idx == labels)
        w = inside.to(torch.float64)
        self.labels.index_add_(0, idx, w)
        self.window_labels.index_add_(0, idx, w)
        vw = valid.to(torch.float64)
        self.window_preds.index_add_(0, preds, vw)
        if not tgt.is_floating_point():
            # Ignored positions take an in-range value, which moves neither end past an out-of-range label.
            lo, hi = torch.aminmax(torch.where(valid, labels, idx))
            torch.minimum(self.label_min, lo, out=self.label_min)
            torch.maximum(self.label_max, hi, out=self.label_max)

    # ----------------------------------------------------------------- check points
    def on_check(self, check: CheckContext) -> None:
        v = check.values
        start, self.last_check = self.last_check, check.step
        if self.n_classes is None or "labels" not in v or self.task == "regression":
            return
        if self.task == "binary?" and float(v["nonbinary"]) > 0:
            self.task = "regression"  # float targets other than 0/1: not a binary classification
            return
        # Labels out of range: the valid ones (each adds a prediction) that no class slot counted.
        new = float(np.sum(v["window_preds"]) - np.sum(v["window_labels"]))
        if new > 0:
            self._report_out_of_range(v, new)
            self.out_of_range_seen += new
        counts = np.asarray(v["labels"], dtype=np.float64).reshape(-1)
        if counts.sum() <= 0:
            return
        imbalanced = self._check_imbalance(counts)
        chance = _entropy(counts)
        loss = math.nan
        if check.guard.has_series("loss"):
            steps, values = check.guard.series("loss").steps, check.guard.series("loss").values
            recent = values[steps >= start]
            # The mean, not the median: per-batch losses of a stuck model are skewed (batches with few
            # minority samples score low), and their mean is what equals the chance level.
            loss = float(np.mean(recent)) if len(recent) else math.nan
        self._check_collapse(v, imbalanced, start, check.step, loss, chance)
        self._check_underpredicted(v, imbalanced, start, check.step)
        self._check_chance(check, counts, imbalanced)
        self._check_val_chance(check, chance, imbalanced)

    def _report_out_of_range(self, v: dict[str, Any], new: float) -> None:
        total = self.out_of_range_seen + new
        lo, hi = float(v["label_min"]), float(v["label_max"])
        self.emit(
            "labels_out_of_range",
            "error",
            f"{int(new)} label(s) outside [0, {self.n_classes}) since the last check (labels span [{lo:.0f}, "
            f"{hi:.0f}], the model has {self.n_classes} outputs): one-based labels, or too few outputs?",
            confidence=0.95,
            count=int(new),
            total=int(total),
            min=int(lo),
            max=int(hi),
            num_classes=int(self.n_classes or 0),
            ignore_index=self.ignore_index,
        )

    def _check_imbalance(self, counts: np.ndarray) -> bool:
        seen = counts[counts > 0]
        if len(counts) > self.max_classes or len(seen) < 2 or counts.sum() < self.min_samples:
            return bool(self.imbalance is not None and self.imbalance >= self.imbalance_ratio)
        ratio = float(seen.max() / seen.min())
        self.imbalance = ratio
        if ratio < self.imbalance_ratio:
            return False
        if "class_imbalance" not in self.reported:
            self.reported = [*self.reported, "class_imbalance"]
            major, minor = int(np.argmax(counts)), int(np.flatnonzero(counts == seen.min())[0])
            total = counts.sum()
            self.emit(
                "class_imbalance",
                "warning",
                f"labels are imbalanced: class {major} has {ratio:.3g}x the samples of class {minor} "
                f"({counts[major] / total:.1%} vs {counts[minor] / total:.2%} of {int(total)} labels)",
                causes=("class_imbalance",),
                confidence=min(0.5 + 0.1 * math.log10(ratio), 0.9),
                ratio=ratio,
                counts=[int(x) for x in counts],
                fractions=[float(x / total) for x in counts],
                majority=major,
                minority=minor,
                unseen=np.flatnonzero(counts == 0)[:_LIST].tolist(),
                samples=int(total),
                threshold=self.imbalance_ratio,
            )
        return True

    def _check_collapse(
        self, v: dict[str, Any], imbalanced: bool, start: int, step: int, loss: float, chance: float
    ) -> None:
        preds = np.asarray(v["window_preds"], dtype=np.float64).reshape(-1)
        labels = np.asarray(v["window_labels"], dtype=np.float64).reshape(-1)
        n = preds.sum()
        if n <= 0 or labels.sum() <= 0:
            return
        top = int(np.argmax(preds))
        share = float(preds[top] / n)
        label_share = float(labels[top] / labels.sum())
        others = 1.0 - label_share
        collapsed = (
            share >= self.collapse_fraction
            and (1.0 - share) < 0.1 * others
            and others * labels.sum() >= 10  # enough samples of the other classes to tell
            # A loss clearly below chance means the probabilities already tell the classes apart: a
            # model learning a rare class predicts the majority for a while and is not stuck.
            and not loss < (1.0 - self.margin) * chance
        )
        if not collapsed:
            self.collapse_start = None
            self.collapse_reported = False
            return
        if self.collapse_start is None:
            self.collapse_start = start  # the interval that just ended began there
        lasted = step - self.collapse_start
        if lasted < self.collapse_patience or self.collapse_reported:
            return
        self.collapse_reported = True
        cause = "class_imbalance" if imbalanced else "no_signal"
        self.emit(
            "predictions_collapsed",
            "warning",
            f"{share:.1%} of the predictions of the last check interval are class {top} (collapsed for "
            f"{lasted} steps); it holds {label_share:.1%} of the labels",
            causes=(cause,),
            confidence=0.8,
            predicted_class=top,
            fraction=share,
            label_fraction=label_share,
            samples=int(n),
            pred_counts=[int(x) for x in preds[: self.max_classes]],
            label_counts=[int(x) for x in labels[: self.max_classes]],
            since_step=self.collapse_start,
            steps=lasted,
            imbalanced=imbalanced,
            loss=loss,
            chance=chance,
        )

    def _check_underpredicted(self, v: dict[str, Any], imbalanced: bool, start: int, step: int) -> None:
        if not imbalanced:
            self.under_start, self.under_reported = None, False
            return
        preds = np.asarray(v["window_preds"], dtype=np.float64).reshape(-1)
        labels = np.asarray(v["window_labels"], dtype=np.float64).reshape(-1)
        n, m = preds.sum(), labels.sum()
        if n <= 0 or m <= 0:
            return
        label_share = labels / m
        expected = label_share * n  # predictions a class would get at its label share
        # Minority classes with enough expected predictions in this interval to tell a miss from chance;
        # an interval that cannot tell neither starts nor ends an episode.
        told = (labels > 0) & (label_share < 1.0 / len(labels)) & (expected >= _MIN_EXPECTED)
        if not told.any():
            return
        under = told & (preds < self.underpredict_fraction * expected)
        if not under.any():
            self.under_start, self.under_reported = None, False
            return
        if self.under_start is None:
            self.under_start = start
        lasted = step - self.under_start
        # A collapse onto one class already says it (and more): one report, not two.
        if lasted < self.collapse_patience or self.under_reported or self.collapse_reported:
            return
        self.under_reported = True
        classes = np.flatnonzero(under)[:_LIST]
        worst = int(classes[np.argmin(preds[classes] / expected[classes])])
        pred_share = preds / n
        self.emit(
            "minority_underpredicted",
            "warning",
            f"class {worst} holds {label_share[worst]:.1%} of the labels but gets {pred_share[worst]:.1%} of the "
            f"predictions (for {lasted} steps, {len(classes)} minority class(es) below "
            f"{self.underpredict_fraction:.0%} of their share): the model fits the common classes and misses "
            "the rare ones",
            causes=("class_imbalance",),
            confidence=0.7,
            classes=[int(c) for c in classes],
            pred_fractions=[float(x) for x in pred_share[: self.max_classes]],
            label_fractions=[float(x) for x in label_share[: self.max_classes]],
            samples=int(n),
            since_step=self.under_start,
            steps=lasted,
            threshold=self.underpredict_fraction,
        )

    def _check_val_chance(self, check: CheckContext, chance: float, imbalanced: bool) -> None:
        _, values, self.val_consumed = check.unread(self.val_monitor, self.val_consumed)
        finite = values[np.isfinite(values)]
        if len(finite):
            self.val_count += len(finite)
            low = float(finite.min())
            self.val_best = low if self.val_best is None else min(self.val_best, low)
        if self.val_reported or self.val_best is None or self.val_count < self.min_validations or chance <= 0:
            return
        bar = (1.0 - self.margin) * chance
        if self.val_best < bar:
            return  # held-out data beat chance once: the labels carry signal (a later rise is Overfit's)
        train = check.guard.series("loss").last(50) if check.guard.has_series("loss") else np.zeros(0)
        train = train[np.isfinite(train)]
        # A training loss at chance too is loss_at_chance's finding; this one is for a model that fits.
        if not len(train) or not float(np.median(train)) < bar:
            return
        self.val_reported = True
        now = float(np.median(train))
        self.emit(
            "val_loss_at_chance",
            "warning",
            f"{self.val_monitor} has never come below chance level ({self.val_best:.4g} at best vs {chance:.4g}, the "
            f"entropy of the label distribution, over {self.val_count} validations) while the training loss fell to "
            f"{now:.4g}: the model memorizes its training labels and learns nothing that carries over",
            causes=("class_imbalance" if imbalanced else "no_signal",),
            confidence=0.75,
            monitor=self.val_monitor,
            val_best=self.val_best,
            validations=self.val_count,
            train_loss=now,
            chance=chance,
            margin=self.margin,
            imbalanced=imbalanced,
        )

    def _check_chance(self, check: CheckContext, counts: np.ndarray, imbalanced: bool) -> None:
        guard = check.guard
        if not guard.has_series("loss"):
            return
        losses = guard.series("loss").last(self.patience)
        if len(losses) < self.patience:
            return
        chance = _entropy(counts)
        if chance <= 0:
            return
        # Block means, not medians: per-batch losses are skewed when the labels are imbalanced (batches
        # with few minority samples score low), and it is their mean that equals the chance level.
        blocks = np.array_split(losses, 5)
        means = [float(np.mean(b)) for b in blocks]
        # Starts at chance, never clearly above it, and falls at most `fall` below it: flat at chance, or
        # the slow fall of a model memorizing labels it cannot predict (a learning model drops far lower).
        lo, hi = (1.0 - self.fall) * chance, (1.0 + self.margin) * chance
        at = all(math.isfinite(m) and lo <= m <= hi for m in means) and abs(means[0] - chance) <= self.margin * chance
        if not at:
            self.chance_reported = False
            return
        if self.chance_reported:
            return
        self.chance_reported = True
        level = float(np.mean(losses))
        fall = max(0.0, (means[0] - means[-1]) / chance)
        cause = "class_imbalance" if imbalanced else "no_signal"
        how = (
            f"stayed at chance level for {self.patience} steps"
            if means[-1] >= (1.0 - self.margin) * chance
            else f"left chance level only slowly over {self.patience} steps ({means[0]:.4g} -> {means[-1]:.4g}, "
            "as when a model memorizes labels it cannot predict)"
        )
        self.emit(
            "loss_at_chance",
            "warning",
            f"the training loss has {how}: {level:.4g} vs {chance:.4g}, the entropy of the label distribution "
            "(what predicting the label frequencies scores)",
            causes=(cause,),
            confidence=0.7,
            loss=level,
            chance=chance,
            margin=self.margin,
            fall=fall,
            max_fall=self.fall,
            block_means=means,
            steps=self.patience,
            num_classes=int(self.n_classes or 0),
            imbalanced=imbalanced,
        )

    # ----------------------------------------------------------------- state
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (the per-class states are declared first if needed)."""
        n, task = state.get("n_classes"), state.get("task")
        if n is not None and self.n_classes is None:
            self._declare(str(task), int(n))
        super().load_state_dict(state)
