"""LRAutoReducer: ReduceLROnPlateau on any observed metric, or on other hooks' events."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import torch

from .._validate import check_choice, check_float, check_int
from ..events import Event
from ..hook import Hook
from ..registry import register
from ..stats import CheckContext

if TYPE_CHECKING:
    from ..guard import Guard

__all__ = ["LRAutoReducer"]

# A group's LR counts as overwritten when it is above what the reducer set by more than float noise.
_OVERRIDE_TOLERANCE = 1e-9


@register("lr_reducer", default="repair", on=("plateau", "divergence", "update_ratio_high"))
class LRAutoReducer(Hook):
    """Multiply the learning rate by ``factor`` when a metric stops improving, or when told to by events.

    **Metric-driven** (``on=None``): each new observation of ``monitor`` is exactly one
    ``torch.optim.lr_scheduler.ReduceLROnPlateau.step(metric)``: same improvement test, same ``best``
    (starting at +inf for ``"min"``, -inf for ``"max"``; NaN never improves), a reduction when the
    count of bad observations exceeds ``patience`` (strictly), ``cooldown`` observations during which
    bad ones are ignored, and per group ``new = max(old * factor, min_lr[i])`` applied only when
    ``old - new > eps``. Values are read at check points, so reductions happen there too.

    **Event-driven** (``on=("plateau", "divergence", "update_ratio_high")``, the default instance of
    ``Guard(repair=True)``): each event of a listed kind from another hook reduces the LR once, with
    the same ``min_lr``/``eps`` rules. At most one reduction per optimizer step (a check point that
    emits both a plateau and a divergence cuts once), and after a reduction the next ``cooldown``
    such events are ignored. Two kinds of event are not taken as a reason to cut:

    * evidence gathered before the last cut: an event whose ``steps`` data (``[first, last]``, as
      ``update_ratio_high`` gives) begins at or before the step of the last reduction measured the
      old LR;
    * a ``divergence`` whose reason is ``"non_finite"`` when fewer than ``nonfinite_fraction`` of
      the interval's steps were non-finite: NaN/Inf losses between finite ones come from a bad
      batch (a NaN record, a division by zero on one sample), which skipping the step repairs
      (:class:`~stallguard.GradientClipper`); a lower LR would only slow the rest of the run. A
      run that the LR drove to NaN stays there, so most of its steps are non-finite.

    In both modes every param group of every optimizer of the Guard is multiplied by the same factor,
    so the ratios between groups are kept (until a group reaches its ``min_lr``). LRs held as tensors
    (fused or capturable optimizers) are updated in place. Each reduction emits ``lr_reduced`` with
    the old and new LR of every group. When something raises an LR above what the reducer set (an LR
    scheduler that computes the LR from scratch each step, such as ``OneCycleLR`` or ``LambdaLR``),
    it emits ``lr_overridden`` once and stops reducing: it never fights the scheduler.

    Args:
        monitor: The observed stream driving metric mode: ``"loss"`` or a metric name such as
            ``"val_loss"``. Every observation is one ReduceLROnPlateau step, so the noisy per-step
            training loss with ``patience=10`` reduces often; prefer a validation metric, or ``on``.
        mode: ``"min"`` or ``"max"``, as ReduceLROnPlateau.
        factor: Multiplier of the LR at each reduction, in (0, 1).
        patience: Bad observations tolerated; the LR is reduced on the next one.
        threshold: Minimum change that counts as improvement.
        threshold_mode: ``"rel"`` or ``"abs"``, as ReduceLROnPlateau.
        cooldown: Metric mode: observations after a reduction whose bad ones are ignored. Event
            mode: subscribed events ignored after a reduction.
        min_lr: Lower bound of the LR, one number for every group or a list with one per param group
            (the groups of all the Guard's optimizers, in order).
        eps: Reductions smaller than this are skipped.
        on: Event kinds that trigger a reduction (event mode); None for metric mode.
        nonfinite_fraction: Event mode: the share of an interval's steps that must be non-finite for
            a ``divergence`` with reason ``"non_finite"`` to cut the LR, in [0, 1]; 0 cuts on any.
        **kwargs: ``every``, ``start_step``, ``name`` (see :class:`~stallguard.Hook`).

    Example:
        Metric-driven, on a validation loss that stops improving:

        >>> import torch, stallguard as sg
        >>> model = torch.nn.Linear(2, 1)
        >>> opt = torch.optim.SGD(model.parameters(), lr=1.0)
        >>> red = sg.LRAutoReducer(monitor="val_loss", factor=0.5, patience=1)
        >>> guard = sg.Guard(model, opt, hooks=[red], sinks=[], check_every=1, attach_optimizer=False)
        >>> for val_loss in [1.0, 0.9, 0.9, 0.9, 0.9, 0.9]:
        ...     guard.observe(val_loss=val_loss)
        ...     guard.before_step(); opt.step(); guard.after_step()
        >>> opt.param_groups[0]["lr"]
        0.25
        >>> [e.kind for e in guard.events]
        ['lr_reduced', 'lr_reduced']
        >>> guard.close()

        Event-driven, as ``Guard(model, opt, repair=True)`` sets it up:

        >>> red = sg.LRAutoReducer(on=("plateau", "divergence", "update_ratio_high"))
        >>> red.subscribes
        ('plateau', 'divergence', 'update_ratio_high')
    """

    modifies_training = True

    def __init__(
        self,
        monitor: str = "loss",
        mode: str = "min",
        factor: float = 0.1,
        patience: int = 10,
        threshold: float = 1e-4,
        threshold_mode: str = "rel",
        cooldown: int = 0,
        min_lr: float | Sequence[float] = 0,
        eps: float = 1e-8,
        on: str | Iterable[str] | None = None,
        nonfinite_fraction: float = 0.5,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        owner = type(self).__name__
        if not isinstance(monitor, str) or not monitor:
            raise ValueError(f"{owner}: monitor must be a non-empty str (a stream name), got {monitor!r}")
        self.monitor = monitor
        self.mode = check_choice(owner, "mode", mode, ("min", "max"))
        self.factor = check_float(owner, "factor", factor, min=0.0, max=1.0, min_open=True, max_open=True)
        self.patience = check_int(owner, "patience", patience, min=0)
        self.threshold = check_float(owner, "threshold", threshold, min=0.0)
        self.threshold_mode = check_choice(owner, "threshold_mode", threshold_mode, ("rel", "abs"))
        self.cooldown = check_int(owner, "cooldown", cooldown, min=0)
        self.eps = check_float(owner, "eps", eps, min=0.0)
        self.min_lr = self._check_min_lr(min_lr)
        self.on = self._check_on(on)
        self.nonfinite_fraction = check_float(owner, "nonfinite_fraction", nonfinite_fraction, min=0.0, max=1.0)
        # Instance attribute: the Guard routes these kinds to on_event.
        self.subscribes = self.on or ()  # type: ignore[misc]
        self._min_lrs: list[float] = []

        self.add_state("consumed", 0)  # values of the monitored series already read (Series.total)
        self.add_state("best", math.inf if self.mode == "min" else -math.inf)
        self.add_state("num_bad_epochs", 0)
        self.add_state("cooldown_counter", 0)
        self.add_state("last_epoch", 0)  # metric observations stepped, as ReduceLROnPlateau counts them
        self.add_state("reductions", 0)
        self.add_state("last_reduction_step", None)
        self.add_state("expected_lrs", None)  # per group, the LR this hook last set (or saw lower)
        self.add_state("overridden", False)
        # The steps of the last two check points, to tell how many steps a check point's events cover.
        self.add_state("check_steps", [0, 0])

    @staticmethod
    def _check_min_lr(min_lr: Any) -> float | list[float]:
        owner = "LRAutoReducer"
        if isinstance(min_lr, (list, tuple)):
            if not min_lr:
                raise ValueError(f"{owner}: min_lr must be a number or a non-empty list of numbers, got {min_lr!r}")
            return [check_float(owner, f"min_lr[{i}]", v, min=0.0) for i, v in enumerate(min_lr)]
        return check_float(owner, "min_lr", min_lr, min=0.0)

    @staticmethod
    def _check_on(on: Any) -> tuple[str, ...] | None:
        if on is None:
            return None
        kinds = (on,) if isinstance(on, str) else on
        try:
            kinds = tuple(kinds)
        except TypeError:
            raise TypeError(
                f"LRAutoReducer: on must be None, an event kind or a list of kinds, got {type(on).__name__} {on!r}"
            ) from None
        if not kinds or not all(isinstance(k, str) and k for k in kinds):
            raise ValueError(f"LRAutoReducer: on must list non-empty event kinds, got {on!r}")
        return kinds

    # ----------------------------------------------------------------- lifecycle
    def on_attach(self, guard: Guard) -> None:
        if not guard.optimizers:
            raise ValueError("LRAutoReducer needs a Guard with an optimizer: Guard(model, optimizer, ...)")
        self._min_lrs = self._resolve_min_lrs(guard)

    def on_check(self, check: CheckContext) -> None:
        if check.step != self.check_steps[1]:
            self.check_steps = [self.check_steps[1], check.step]
        self._check_override()
        if self.on is not None:
            return
        steps, values, self.consumed = check.unread(self.monitor, self.consumed)
        first_old: list[float] | None = None
        count, last_step = 0, None
        for value, step in zip(values.tolist(), steps.tolist()):
            old = self.step(value)
            if old is not None:
                first_old = first_old if first_old is not None else old
                count += 1
                last_step = step
        if first_old is not None:
            self._report(first_old, count, trigger="metric", metric_step=last_step, best=self.best)

    def on_event(self, event: Event) -> None:
        if self.on is None or event.kind not in self.on:
            return
        guard = self._require_guard("on_event")
        self._check_override()
        if self.overridden or self.last_reduction_step == guard.step:
            return  # the scheduler is in charge, or this step was already cut once
        if not self._is_reason(event):
            return
        if self.cooldown_counter > 0:
            self.cooldown_counter -= 1
            return
        old = self._reduce()
        self.cooldown_counter = self.cooldown
        if old is not None:
            self._report(old, 1, trigger=event.kind, trigger_source=event.source, trigger_step=event.step)

    def _is_reason(self, event: Event) -> bool:
        """Whether ``event`` is evidence against the current LR (see the class docstring)."""
        data = event.data
        span = data.get("steps")
        if (
            self.last_reduction_step is not None
            and isinstance(span, (list, tuple))
            and len(span) == 2
            and isinstance(span[0], (int, float))
            and span[0] <= self.last_reduction_step
        ):
            return False  # measured, at least in part, at the LR before the last cut
        if event.kind == "divergence" and data.get("reason") == "non_finite":
            bad = data.get("nonfinite")
            # This check point's events come before or after this hook's own on_check, by hook order.
            start = self.check_steps[0] if self.check_steps[1] == event.step else self.check_steps[1]
            steps = event.step - start
            if isinstance(bad, (int, float)) and steps > 0 and bad < self.nonfinite_fraction * steps:
                return False  # a few bad batches between finite ones: the data, not the LR
        return True

    # ----------------------------------------------------------------- ReduceLROnPlateau, step by step
    def step(self, metric: float) -> list[float] | None:
        """One ``ReduceLROnPlateau.step(metric)`` on the Guard's optimizers.

        ``on_check`` calls it for each new observation of ``monitor``; call it yourself to drive the
        reducer from a value the Guard does not observe.

        Returns:
            The LRs before a reduction when this step reduced them, else None.
        """
        current = float(metric)
        self.last_epoch += 1
        if self._is_better(current, self.best):
            self.best = current
            self.num_bad_epochs = 0
        else:
            self.num_bad_epochs += 1
        if self.cooldown_counter > 0:
            self.cooldown_counter -= 1
            self.num_bad_epochs = 0  # bad observations during cooldown are ignored
        old = None
        if self.num_bad_epochs > self.patience:
            if not self.overridden:
                old = self._reduce()
            self.cooldown_counter = self.cooldown
            self.num_bad_epochs = 0
        return old

    def _is_better(self, a: float, best: float) -> bool:
        if self.mode == "min" and self.threshold_mode == "rel":
            return a < best * (1.0 - self.threshold)
        if self.mode == "min":
            return a < best - self.threshold
        if self.threshold_mode == "rel":
            return a > best * (self.threshold + 1.0)
        return a > best + self.threshold

    # ----------------------------------------------------------------- the LRs themselves
    def _groups(self) -> list[dict[str, Any]]:
        guard = self._require_guard("reduce")
        return [g for opt in guard.optimizers for g in opt.param_groups]

    def _resolve_min_lrs(self, guard: Guard) -> list[float]:
        n = sum(len(opt.param_groups) for opt in guard.optimizers)
        if isinstance(self.min_lr, list):
            if len(self.min_lr) != n:
                raise ValueError(
                    f"LRAutoReducer: min_lr has {len(self.min_lr)} values but the Guard's optimizers have {n} "
                    "param groups in all; give one value per group (in optimizer, then group order) or one number"
                )
            return list(self.min_lr)
        return [self.min_lr] * n

    def current_lrs(self) -> list[float]:
        """The LR of every param group of every optimizer of the Guard, in order (host floats)."""
        return [float(g["lr"]) for g in self._groups()]

    def _reduce(self) -> list[float] | None:
        groups = self._groups()
        if len(groups) != len(self._min_lrs):
            # A param group was added after attach: a list no longer fits, a number still does.
            self._min_lrs = self._resolve_min_lrs(self._require_guard("reduce"))
        old_lrs = [float(g["lr"]) for g in groups]
        changed = False
        for i, (group, old_lr) in enumerate(zip(groups, old_lrs)):
            new_lr = max(old_lr * self.factor, self._min_lrs[i])
            if old_lr - new_lr > self.eps:
                lr = group["lr"]
                if isinstance(lr, torch.Tensor):
                    lr.fill_(new_lr)  # fused/capturable optimizers read the tensor in place
                else:
                    group["lr"] = new_lr
                changed = True
        self.expected_lrs = [float(g["lr"]) for g in groups]
        if not changed:
            return None
        self.reductions += 1
        self.last_reduction_step = self._require_guard("reduce").step
        return old_lrs

    def _check_override(self) -> None:
        if self.expected_lrs is None or self.overridden:
            return
        current = self.current_lrs()
        if len(current) != len(self.expected_lrs):
            self.expected_lrs = current
            return
        raised = [i for i, (c, e) in enumerate(zip(current, self.expected_lrs)) if c > e * (1.0 + _OVERRIDE_TOLERANCE)]
        if not raised:
            # Lower is fine (a scheduler decaying further); remember it so a later rise is caught.
            self.expected_lrs = current
            return
        self.overridden = True
        self.emit(
            "lr_overridden",
            "warning",
            f"an LR scheduler (or the training loop) raised the LR of {len(raised)} param group(s) above what "
            f"{self.name} set, so it stops reducing and leaves the LR to the scheduler; lower the scheduler's "
            "LR instead",
            set_lr=list(self.expected_lrs),
            current_lr=current,
            groups=self._group_names(),
            raised_groups=raised,
        )

    def _group_names(self) -> list[str]:
        guard = self._require_guard("reduce")
        return [
            f"optimizer[{i}].group[{j}]" for i, opt in enumerate(guard.optimizers) for j in range(len(opt.param_groups))
        ]

    def _report(self, old: list[float], count: int, **trigger: Any) -> None:
        new = self.current_lrs()
        pairs = ", ".join(f"{o:.3g} -> {n:.3g}" for o, n in zip(old, new))
        self.emit(
            "lr_reduced",
            "warning",
            f"learning rate reduced ({pairs}) after {trigger['trigger']}",
            old_lr=old,
            new_lr=new,
            groups=self._group_names(),
            factor=self.factor,
            count=count,
            reductions=self.reductions,
            **trigger,
        )
