"""GradientClipper: clip gradients by norm, by value or adaptively, and handle NaN/Inf steps, on the device."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils._foreach_utils import _group_tensors_by_device_and_dtype, _has_foreach_support

from .._validate import check_choice, check_float, check_int, check_norm_type, check_type
from ..hook import Hook, TrainingInterrupted
from ..registry import register
from ..stats import CheckContext, GradNorms, StepContext

__all__ = ["GradientClipper", "NonFiniteGradientError"]

MODES = ("norm", "value", "adaptive")
NONFINITE = ("skip", "raise", "zero", "ignore")

# torch.nn.utils.clip_grads_with_norm_ adds this to the norm before dividing; so do we, to match it.
_EPS = 1e-6

# Adaptive mode: norms below this fraction of the largest in the history stay out of it.
_NEGLIGIBLE = 1e-6

# Columns of the per-optimizer counter row, updated with one add per step.
_COUNTERS = ("steps", "clipped", "pre_sum", "post_sum", "nonfinite_steps")
_STEPS, _CLIPPED, _PRE_SUM, _POST_SUM, _NONFINITE = range(len(_COUNTERS))


class NonFiniteGradientError(TrainingInterrupted, RuntimeError):
    """Raised by ``GradientClipper(nonfinite="raise")`` when a step's gradients hold NaN or Inf."""


@register("clipper", default="repair", mode="adaptive", nonfinite="skip")
class GradientClipper(Hook):
    """Clip gradients before every optimizer step, and keep NaN/Inf gradients out of the weights.

    Runs in the optimizer's step pre-hook, after every observing hook has seen the unclipped
    gradients, and works entirely on the device: no host read per step (except where a policy
    below says so).

    Modes:

    * ``"norm"``: scale all gradients of the optimizer by ``min(1, max_norm / (norm + 1e-6))``,
      exactly as ``torch.nn.utils.clip_grad_norm_`` does (the same grouping and foreach kernels,
      so the gradients are bit-identical). The norm is the step's shared one (no second pass).
    * ``"value"``: clamp every gradient element to ``[-clip_value, clip_value]``, as
      ``torch.nn.utils.clip_grad_value_``. Whether a step was clipped is read from the step's max
      norm (one extra read of the gradients, on top of the clamp's two passes).
    * ``"adaptive"`` (AutoClip, Seetharaman et al. 2020): norm clipping at the ``percentile``-th
      percentile of the last ``history`` finite gradient norms, the current one included (norms of
      zero, or below a millionth of the largest in the history, are left out: they would freeze the
      run once a model fits most batches exactly). The
      percentile is computed on the device every step. Until ``warmup`` norms have been seen, no
      step is clipped; the default, 1, clips from the second step on, as the paper does.

    Non-finite gradients (``nonfinite``):

    * ``"skip"``: the step changes nothing. With a fused optimizer (``fused=True`` Adam, AdamW,
      SGD, Adagrad) this is exact and costs nothing: the clipper sets the optimizer's ``found_inf``
      flag on the device, as GradScaler does, and the fused kernel skips the update. With other
      optimizers the gradients are set to zero on the device (one extra pass over the gradients
      per step): parameters of plain SGD do not move, but momentum, weight decay and Adam's moment
      decay still act for that step. ``sync=True`` makes the skip exact for any optimizer by
      reading one flag to the host per step and setting the gradients to None.
    * ``"raise"``: raise :class:`NonFiniteGradientError` naming the parameters, like
      ``error_if_nonfinite=True``; costs one host read per step. It reaches the training loop
      even when the Guard is not strict.
    * ``"zero"``: set the non-finite entries to zero and go on; costs one extra pass to fix the
      entries and one to recompute the norm, every step.
    * ``"ignore"``: torch's behaviour (norm clipping with a NaN norm turns every gradient into NaN).

    Steps that a GradScaler skips are left alone and not counted. At each check point the clipper
    emits ``grad_clipped`` (how often it clipped, the norms before and after) and
    ``nonfinite_skipped`` / ``nonfinite_zeroed`` (how many steps it handled).

    Args:
        mode: ``"norm"``, ``"value"`` or ``"adaptive"``.
        max_norm: The norm to clip to (``mode="norm"`` only).
        norm_type: The p of the p-norm for ``"norm"`` and ``"adaptive"``; ``math.inf`` for the max norm.
        clip_value: The largest absolute gradient value (``mode="value"`` only).
        percentile: Percentile of the norm history to clip at (``mode="adaptive"``), in (0, 100].
        history: How many recent finite norms the percentile is taken over (``mode="adaptive"``).
        warmup: Finite norms needed before adaptive clipping starts (``mode="adaptive"``).
        nonfinite: ``"skip"``, ``"raise"``, ``"zero"`` or ``"ignore"``.
        sync: With ``nonfinite="skip"`` and a non-fused optimizer, skip exactly at the cost of one
            host read per step.
        **kwargs: ``every``, ``start_step``, ``name`` (see :class:`~stallguard.Hook`).

    Example:
        >>> import torch, stallguard as sg
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Linear(4, 1)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> clipper = sg.GradientClipper(mode="norm", max_norm=0.5)
        >>> guard = sg.Guard(model, opt, hooks=[clipper], sinks=[], check_every=5)
        >>> for _ in range(5):
        ...     loss = (model(torch.randn(8, 4)) - 10).pow(2).mean()
        ...     opt.zero_grad(); loss.backward(); opt.step()
        >>> event = guard.events[-1]
        >>> event.kind, event.data["clipped"], event.data["post_norm_mean"] <= 0.5
        ('grad_clipped', 5, True)
        >>> guard.close()
    """

    modifies_training = True

    def __init__(
        self,
        mode: str = "adaptive",
        max_norm: float | None = None,
        norm_type: float = 2.0,
        clip_value: float | None = None,
        percentile: float = 10.0,
        history: int = 1000,
        warmup: int = 1,
        nonfinite: str = "skip",
        sync: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        owner = type(self).__name__
        self.mode = check_choice(owner, "mode", mode, MODES)
        self.nonfinite = check_choice(owner, "nonfinite", nonfinite, NONFINITE)
        self.norm_type = check_norm_type(owner, "norm_type", norm_type)
        self.sync = check_type(owner, "sync", sync, bool, "a bool")
        if self.sync and self.nonfinite != "skip":
            raise ValueError(f"{owner}: sync=True applies to nonfinite='skip' only, got nonfinite={nonfinite!r}")
        if mode == "norm":
            if max_norm is None:
                raise ValueError(f"{owner}: mode='norm' needs max_norm > 0 (or use mode='adaptive'), got None")
            self.max_norm: float | None = check_float(owner, "max_norm", max_norm, min=0.0, min_open=True)
        elif max_norm is not None:
            raise ValueError(f"{owner}: max_norm applies to mode='norm' only, got max_norm={max_norm!r} with {mode=}")
        else:
            self.max_norm = None
        if mode == "value":
            if clip_value is None:
                raise ValueError(f"{owner}: mode='value' needs clip_value > 0, got None")
            self.clip_value: float | None = check_float(owner, "clip_value", clip_value, min=0.0, min_open=True)
        elif clip_value is not None:
            raise ValueError(
                f"{owner}: clip_value applies to mode='value' only, got clip_value={clip_value!r} with {mode=}"
            )
        else:
            self.clip_value = None
        self.percentile = check_float(owner, "percentile", percentile, min=0.0, max=100.0, min_open=True)
        self.history = check_int(owner, "history", history, min=1)
        self.warmup = check_int(owner, "warmup", warmup, min=1, max=self.history)
        self.add_state("hist_pos", [])
        self.add_state("interval_start", 0)
        self.add_state("total_clipped", [])
        self.add_state("total_nonfinite", [])
        self._pending_state: dict[str, Any] | None = None
        # Per optimizer index: (optimizer, the found_inf we set, whether one was there, what it was).
        self._restore: dict[int, tuple[Any, Tensor, bool, Any]] = {}

    def on_attach(self, guard: Any) -> None:
        n_opt = max(len(guard.optimizers), 1)
        # Every rank sees the same global norms, so "max" is the identity across ranks.
        self.add_state("counters", torch.zeros(n_opt, len(_COUNTERS)), reduce="max", reset=True)
        self.add_state("pre_max", torch.zeros(n_opt), reduce="max", reset=True)
        # Steps since the interval began (exact in float32); inf = none.
        self.add_state("first_nonfinite", torch.full((n_opt,), math.inf), reduce="min", reset=True)
        fixed = {"norm": self.max_norm, "value": self.clip_value}.get(self.mode)
        self.add_state("threshold", torch.full((n_opt,), math.inf if fixed is None else fixed), reduce="max")
        if self.mode == "adaptive":
            # Past finite pre-clip norms; NaN marks an empty slot. Local (never synced): every rank
            # sees the same global norms, so every rank holds the same history.
            self.add_state("norm_history", torch.full((n_opt, self.history), math.nan))
        if not self.hist_pos:
            self.hist_pos = [0] * n_opt
            self.total_clipped = [0] * n_opt
            self.total_nonfinite = [0] * n_opt
            self.interval_start = guard.step
        if self._pending_state is not None:
            state, self._pending_state = self._pending_state, None
            super().load_state_dict(state)

    # ----------------------------------------------------------------- per step
    @torch.no_grad()
    def on_before_step(self, ctx: StepContext) -> None:
        i = ctx.optimizer_index
        opt = ctx.optimizer
        self._restore_found_inf(i)  # a step that raised never ran our post-hook
        norm_type = math.inf if self.mode == "value" else self.norm_type
        norms = ctx.grad_norms(norm_type)
        if norms is None:
            return
        grads = ctx.grads
        device = norms.total.device
        prev = getattr(opt, "found_inf", None)
        scaler_skip = prev.detach().to(device).reshape(()) > 0 if isinstance(prev, Tensor) else None
        finite = norms.finite
        if self.nonfinite in ("skip", "raise"):
            # Under torch.distributed every rank skips (or raises) alike: one tiny all_reduce per step.
            finite = ~self.guard.agree_nonfinite(~finite)  # type: ignore[union-attr]
        bad = ~finite if scaler_skip is None else ~finite & ~scaler_skip
        fused = bool(getattr(opt, "_step_supports_amp_scaling", False))
        zero_bad = False

        if self.nonfinite == "raise" or (self.nonfinite == "skip" and self.sync and not fused):
            if bool(bad):  # the one host read per step these policies pay for
                if self.nonfinite == "raise":
                    raise NonFiniteGradientError(_nonfinite_message(ctx.optimizer_step, norms))
                for p in ctx.grad_params:
                    p.grad = None
                self._record(i, ctx.optimizer_step, bad)
                return
        elif self.nonfinite == "skip":
            if fused:
                flag = bad.to(torch.float32)
                if isinstance(prev, Tensor):
                    flag = torch.maximum(prev.detach().to(device, torch.float32).reshape(()), flag)
                    flag = flag.to(prev.device, prev.dtype).reshape(prev.shape)
                opt.found_inf = flag  # type: ignore[union-attr]
                self._restore[i] = (opt, flag, isinstance(prev, Tensor), prev)
            else:
                zero_bad = True  # zeroed below, folded into the clip multiply
        elif self.nonfinite == "zero":
            for g in grads:
                g.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
            ctx.refresh_grad_norms()
            norms = ctx.grad_norms(norm_type) or norms
            finite = norms.finite

        total = norms.total
        ok = finite if scaler_skip is None else finite & ~scaler_skip
        if self.mode == "value":
            if zero_bad:
                _mul_grouped(grads, torch.where(bad, 0.0, 1.0))
                _clear_nonfinite(grads)
            post, clipped = self._clip_value(grads, opt, total)
        else:
            coef, threshold = self._coefficient(i, total, ok)
            if self.nonfinite == "skip":
                # Leave a skipped step's gradients as they are (skipped in-kernel), or zero them: a
                # factor 0 zeroes the finite entries in the clip multiply itself, and one nan_to_num_
                # pass clears the rest (masked_fill_ with a 0-d mask is ~6x slower on CPU).
                coef = torch.where(finite, coef, 1.0)
                if zero_bad:
                    coef = torch.where(bad, 0.0, coef)
            _mul_grouped(grads, coef)
            if zero_bad:
                _clear_nonfinite(grads)
            post, clipped = total * coef, total > threshold
        self._record(i, ctx.optimizer_step, bad, ok, total, post, clipped)

    def _record(
        self,
        i: int,
        step: int,
        bad: Tensor,
        ok: Tensor | None = None,
        total: Tensor | None = None,
        post: Tensor | None = None,
        clipped: Tensor | None = None,
    ) -> None:
        """Count this step on the device: one stacked add, plus the running max and first bad step."""
        if ok is None or total is None or post is None or clipped is None:
            zero = torch.zeros((), device=bad.device)
            row = [zero, zero, zero, zero, bad]
        else:
            kept = torch.where(ok, total, 0.0)
            row = [ok, ok & clipped, kept, torch.where(ok, post, 0.0), bad]
            top = self.pre_max[i]
            torch.maximum(top, kept.to(top.dtype), out=top)
        self.counters[i].add_(torch.stack(row))
        first = self.first_nonfinite[i]
        torch.minimum(first, torch.where(bad, float(step - self.interval_start), math.inf), out=first)

    def _coefficient(self, i: int, total: Tensor, ok: Tensor) -> tuple[Tensor, Tensor | float]:
        """The clip coefficient and the threshold it clips to."""
        if self.mode == "norm":
            # The very expression torch.nn.utils.clip_grads_with_norm_ uses, for bit-equal results.
            return torch.clamp(self.max_norm / (total + _EPS), max=1.0), self.max_norm  # type: ignore[operator,return-value]
        history = self.norm_history[i]
        pos = self.hist_pos[i] % self.history
        self.hist_pos[i] += 1
        # A norm that is zero, or rounding noise next to the largest in the history (a batch the model
        # already fits exactly), says nothing about the scale of the gradients; kept, enough of them
        # would put the percentile near 0 and scale every later step to nothing.
        top = history.nan_to_num(nan=0.0).max()
        keep = ok & (total > _NEGLIGIBLE * top) & (total > 0)
        history[pos] = torch.where(keep, total.to(history.dtype), history[pos])
        threshold = _nan_quantile(history, self.percentile / 100.0, self.warmup)
        self.threshold[i] = threshold
        return torch.clamp(threshold / (total + _EPS), max=1.0), threshold

    def _clip_value(self, grads: list[Tensor], opt: Any, total: Tensor) -> tuple[Tensor, Tensor]:
        c = float(self.clip_value)  # type: ignore[arg-type]
        scale = getattr(opt, "grad_scale", None)
        if isinstance(scale, Tensor):
            # Fused optimizer under GradScaler: the gradients are still scaled, so is the bound.
            for g in grads:
                bound = scale.detach().to(g.device, g.dtype) * c
                g.clamp_(min=-bound, max=bound)
        else:
            grouped = _group_tensors_by_device_and_dtype([grads])  # type: ignore[list-item]
            for (device, _), ([group], _) in grouped.items():
                if _has_foreach_support(group, device):
                    torch._foreach_clamp_min_(group, -c)
                    torch._foreach_clamp_max_(group, c)
                else:
                    for g in group:
                        g.clamp_(min=-c, max=c)
        return torch.clamp(total, max=c), total > c

    def on_after_step(self, ctx: StepContext) -> None:
        self._restore_found_inf(ctx.optimizer_index)

    def _restore_found_inf(self, i: int) -> None:
        entry = self._restore.pop(i, None)
        if entry is None:
            return
        opt, ours, had, prev = entry
        if getattr(opt, "found_inf", None) is ours:
            if had:
                opt.found_inf = prev
            else:
                del opt.found_inf

    def on_close(self) -> None:
        for i in list(self._restore):
            self._restore_found_inf(i)

    # ----------------------------------------------------------------- check point
    def on_check(self, check: CheckContext) -> None:
        v = check.values
        n_opt = len(self.hist_pos)
        counters = np.asarray(v["counters"], dtype=np.float64).reshape(n_opt, len(_COUNTERS))
        for i in range(n_opt):
            clipped, bad = int(counters[i, _CLIPPED]), int(counters[i, _NONFINITE])
            self.total_clipped[i] += clipped
            self.total_nonfinite[i] += bad
            if clipped > 0:
                self._emit_clipped(i, v, counters[i])
            if bad > 0 and self.nonfinite in ("skip", "zero"):
                first = _at(v["first_nonfinite"], i)
                first_step = int(self.interval_start + first) if math.isfinite(first) else None
                self._emit_nonfinite(i, bad, first_step)
        self.interval_start = check.step

    def _emit_clipped(self, i: int, v: dict[str, Any], counters: np.ndarray) -> None:
        steps, clipped = int(counters[_STEPS]), int(counters[_CLIPPED])
        threshold = float(_at(v["threshold"], i))
        pre_mean = float(counters[_PRE_SUM]) / max(steps, 1)
        post_mean = float(counters[_POST_SUM]) / max(steps, 1)
        what = "max |grad|" if self.mode == "value" else "gradient norm"
        self.emit(
            "grad_clipped",
            "info",
            f"{self.mode} clipping changed {clipped} of {steps} steps ({clipped / max(steps, 1):.0%}); "
            f"{what} {pre_mean:.3g} -> {post_mean:.3g} on average, threshold {threshold:.3g}",
            optimizer=i,
            mode=self.mode,
            norm_type=math.inf if self.mode == "value" else self.norm_type,
            steps=steps,
            clipped=clipped,
            fraction=clipped / max(steps, 1),
            pre_norm_mean=pre_mean,
            pre_norm_max=float(_at(v["pre_max"], i)),
            post_norm_mean=post_mean,
            threshold=threshold,
            total_clipped=self.total_clipped[i],
        )

    def _emit_nonfinite(self, i: int, bad: int, first_step: int | None) -> None:
        opt = self.guard.optimizers[i] if self.guard is not None and self.guard.optimizers else None
        if self.nonfinite == "zero":
            kind, method, exact = "nonfinite_zeroed", "zeroed_entries", False
            message = f"set the NaN/Inf gradient entries of {bad} step(s) to zero"
        else:
            kind = "nonfinite_skipped"
            if getattr(opt, "_step_supports_amp_scaling", False):
                method, exact = "found_inf", True
            elif self.sync:
                method, exact = "grad_none", True
            else:
                method, exact = "zeroed_grads", False
            message = f"skipped {bad} optimizer step(s) with NaN/Inf gradients" + (
                "" if exact else " (gradients zeroed: momentum and weight decay still acted)"
            )
        self.emit(
            kind,
            "warning",
            message + (f"; first at step {first_step}" if first_step is not None else ""),
            causes=("non_finite",),
            optimizer=i,
            steps=bad,
            total_steps=self.total_nonfinite[i],
            first_step=first_step,
            method=method,
            exact=exact,
        )

    # ----------------------------------------------------------------- state
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (before or after the Guard attaches)."""
        if self.guard is None:
            # Per-optimizer states take their shapes from the Guard at attach.
            self._pending_state = dict(state)
            return
        super().load_state_dict(state)


def _at(value: Any, i: int) -> float:
    return float(value[i]) if hasattr(value, "__getitem__") else float(value)


def _mul_grouped(grads: list[Tensor], coef: Tensor) -> None:
    """Multiply every gradient by ``coef`` as ``clip_grads_with_norm_`` does (foreach per device and dtype)."""
    grouped = _group_tensors_by_device_and_dtype([grads])  # type: ignore[list-item]
    for (device, _), ([group], _) in grouped.items():
        if _has_foreach_support(group, device):
            torch._foreach_mul_(group, coef.to(device))
        else:
            scaled = coef.to(device)
            for g in group:
                g.mul_(scaled)


def _clear_nonfinite(grads: list[Tensor]) -> None:
    """Set NaN and Inf entries to zero; on a step whose gradients were multiplied by 0, that zeroes them all."""
    for g in grads:  # no foreach op clears NaN: one pass per tensor
        g.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)


def _nan_quantile(values: Tensor, q: float, min_count: int) -> Tensor:
    """The ``q`` quantile of the non-NaN entries (numpy's linear interpolation); inf with fewer than ``min_count``.

    Written with sort and gather because ``torch.nanquantile`` validates its input with ops that can
    wait for the device.
    """
    count = (~torch.isnan(values)).sum()
    ordered = torch.sort(values).values  # NaN sorts last
    pos = (count - 1).clamp_min(0).to(values.dtype) * q
    low = pos.floor()
    a = ordered.gather(0, low.long().reshape(1))
    b = ordered.gather(0, pos.ceil().long().reshape(1))
    value = (a + (b - a) * (pos - low)).reshape(())
    return torch.where(count >= min_count, value, math.inf)


def _nonfinite_message(step: int, norms: GradNorms) -> str:
    finite = torch.isfinite(norms.per_tensor).tolist()  # on the way to an exception: the read is fine
    names = [n for n, ok in zip(norms.names, finite) if not ok]
    shown = ", ".join(names[:10]) + (f" and {len(names) - 10} more" if len(names) > 10 else "")
    where = f" in {shown}" if names else " (the norm overflowed)"
    return f"optimizer step {step}: the gradients hold NaN or Inf{where}"
