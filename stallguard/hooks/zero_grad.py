"""ZeroGradCheck: gradients that are never cleared between optimizer steps (a missing ``zero_grad()``)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .._validate import check_float, check_int
from ..hook import Hook
from ..registry import register
from ..stats import UPDATE_SAMPLE, CheckContext, StepContext, sample_view

__all__ = ["ZeroGradCheck"]

# Rows of the per-interval buffer of Gram matrices: the default Guard samples 5 steps per check interval.
_ROWS = 8

# Watched parameters need a few elements: the comparison is about direction, and the elements at the
# largest |grad| are left out (see on_before_step).
_MIN_NUMEL = 4


@register("zero_grad", default="monitor")
class ZeroGradCheck(Hook):
    """Detect gradients that pile up across optimizer steps because ``optimizer.zero_grad()`` is missing.

    On sampled steps (every ``every`` optimizer steps) the check watches a few small parameters
    (``max_params``, the smallest ones with at least four elements; one that gets no gradient is
    swapped for the next), each on its fixed sample of at most 4096 elements. Hooks on those
    parameters add up the
    fresh gradient of every backward that lands in ``.grad`` since the last optimizer step; a backward
    that finds ``.grad`` cleared (``None``, or all zero after ``zero_grad(set_to_none=False)``) starts
    the sum again. Right before the step, ``.grad`` must then equal that sum. If it holds more,
    gradients of earlier steps were never cleared.

    The comparison is made up to a common factor, so clipping by norm and an AMP ``GradScaler``'s
    unscaling (which multiply ``.grad`` by one number) are not mistaken for leftovers: the part of
    ``.grad`` orthogonal to the sum must stay below ``tol`` of ``|grad|``, and the factor must not
    exceed ``1 + tol``. Gradient accumulation (k backward passes, one step, one ``zero_grad``) and
    ``zero_grad(set_to_none=False)`` are therefore quiet. A sampled step costs a fixed handful of device
    ops (three dot products in one matrix product, no host read); the host works out the decision from
    them at check points.

    Emits ``grads_not_cleared`` (error when every sampled step of the interval showed leftovers,
    warning otherwise; cause ``missing_zero_grad``) at a check point.

    Not run under DistributedDataParallel, which replaces ``.grad`` with the mean over ranks after
    accumulation, so the local sum and ``.grad`` differ by design.

    Args:
        tol: Relative size of the leftover (orthogonal part of ``.grad``, or excess factor) that counts,
            in (0, 1). float32 round-off of the comparison is about 1e-3.
        max_params: How many small parameters to watch.
        **kwargs: ``every`` (sampling interval, default 10), ``start_step``, ``name``
            (see :class:`~stallguard.Hook`).

    Example:
        >>> import torch, stallguard as sg
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.01)
        >>> guard = sg.Guard(model, opt, hooks=[sg.ZeroGradCheck(every=2)], sinks=[], check_every=4)
        >>> for _ in range(4):  # no opt.zero_grad(): the gradients pile up
        ...     model(torch.randn(8, 4)).pow(2).mean().backward()
        ...     opt.step()
        >>> [e.kind for e in guard.events]
        ['grads_not_cleared']
        >>> guard.diagnose()[0].cause
        'missing_zero_grad'
        >>> guard.close()
    """

    def __init__(self, tol: float = 0.01, max_params: int = 4, *, every: int = 10, **kwargs: Any) -> None:
        super().__init__(every=every, **kwargs)
        owner = type(self).__name__
        self.tol = check_float(owner, "tol", tol, min=0.0, max=1.0, min_open=True, max_open=True)
        self.max_params = check_int(owner, "max_params", max_params, min=1)
        # Per sampled step, the Gram matrix [[<g, g>, <g, s>], [<s, g>, <s, s>]] of .grad (g) and the sum of the
        # fresh gradients (s): one op on the step; the ratio and factor are worked out on the host at the
        # check point. A step that finds every row taken first folds the rows into the totals below, on
        # the device (more sampled steps in an interval than rows: a long check interval, a small every).
        self.add_state("grams", torch.zeros(_ROWS, 2, 2, dtype=torch.float64), reduce="sum", reset=True)
        self.add_state("checked", torch.zeros(()), reduce="sum", reset=True)
        self.add_state("flagged", torch.zeros(()), reduce="sum", reset=True)
        self.add_state("ratio_max", torch.zeros(()), reduce="max", reset=True)
        self.add_state("factor_max", torch.zeros(()), reduce="max", reset=True)
        # Position in ``steps`` of the first flagged step that was folded (exact in float32); inf = none.
        self.add_state("first_row", torch.full((), math.inf), reduce="min", reset=True)
        self.add_state("steps", [])  # the sampled steps of the interval, in order (row i holds steps[i])
        self.add_state("interval_start", 0)
        self.add_state("total_flagged", 0)
        self._watched: list[tuple[str, nn.Parameter]] = []
        self._spare: list[tuple[str, nn.Parameter]] = []
        self._layout: _Layout | None = None
        self._summed: set[int] = set()
        self._incoming: dict[int, Tensor] = {}
        self._armed_step: int | None = None
        self._step_handles: list[Any] = []
        self._per_step = False
        self._restored = False

    # ----------------------------------------------------------------- attach
    def on_attach(self, guard: Any) -> None:
        # Under torch.distributed every rank judges its own steps on the device, as the totals reduce
        # (counts summed, maxima, first step); the rows of the Gram buffer would add up across ranks.
        self._per_step = guard.world_size > 1
        if isinstance(guard.model, nn.parallel.DistributedDataParallel):
            return
        if guard.optimizers:
            candidates = []
            for i in range(len(guard.optimizers)):
                params, names = guard.optimizer_parameters(i)
                candidates += list(zip(names, params))
        elif guard.module is not None:
            candidates = list(guard.module.named_parameters())
        else:
            candidates = []
        seen: set[int] = set()
        usable = []
        for n, p in candidates:
            if id(p) in seen or not p.requires_grad or not p.is_leaf or p.numel() < _MIN_NUMEL:
                continue
            seen.add(id(p))
            usable.append((n, p))
        usable.sort(key=lambda np_: np_[1].numel())
        self._watched = usable[: self.max_params]
        self._spare = usable[self.max_params :]
        self._layout = None
        if not self._restored:
            self.interval_start = guard.step

    def on_step_begin(self, step: int) -> None:
        self._disarm()
        if not self._watched or not self.is_due(step):
            return
        params = [p for _, p in self._watched]
        if self._layout is None or not self._layout.fits(params):
            self._layout = _Layout(params)
        self._armed_step = step
        for k, p in enumerate(params):
            self._step_handles.append(self.register_handle(p.register_hook(self._make_pre(k, p))))
            self._step_handles.append(self.register_handle(p.register_post_accumulate_grad_hook(self._make_post(k))))

    def _make_pre(self, k: int, p: nn.Parameter) -> Any:
        def pre(grad: Tensor) -> None:
            # The gradient about to be added to p.grad; kept only if it really lands there
            # (torch.autograd.grad also calls this hook, but not the post-accumulate one).
            layout = self._layout
            g = grad.detach()
            old = p.grad
            if layout is None or g.layout != torch.strided or (old is not None and old.layout != torch.strided):
                self._incoming.pop(k, None)  # sparse gradients: not compared
                return
            whole = layout.whole[k]
            total = layout.sums[k]
            if old is None:
                self._summed.discard(k)  # cleared with set_to_none=True: a fresh sum
            elif k in self._summed:
                # Cleared with set_to_none=False: .grad is zero (on the sample); decided on the device.
                cleared = ((old if whole else sample_view(old)) == 0).all()
                total.masked_fill_(cleared if cleared.device == total.device else cleared.to(total.device), 0.0)
            # Only the tensor's fixed sample is summed and compared: .grad equals the sum of the fresh
            # gradients element by element, so a sample shows leftovers as well as the whole tensor.
            g = g if whole else sample_view(g)
            if g.shape != total.shape:
                self._incoming.pop(k, None)
                return
            self._incoming[k] = g

        return pre

    def _make_post(self, k: int) -> Any:
        def post(p: Tensor) -> None:
            g = self._incoming.pop(k, None)
            layout = self._layout
            if g is None or layout is None:
                return
            total = layout.sums[k]
            if g.device != total.device:
                g = g.to(total.device)
            if k in self._summed:
                total.add_(g)  # in float32, as .grad of a float32 parameter accumulates
            else:
                total.copy_(g)
                self._summed.add(k)

        return post

    def _disarm(self) -> None:
        for h in self._step_handles:
            h.remove()
            if h in self._handles:
                self._handles.remove(h)
        self._step_handles = []
        self._summed = set()
        self._incoming = {}
        self._armed_step = None

    # ----------------------------------------------------------------- per step
    @torch.no_grad()
    def on_before_step(self, ctx: StepContext) -> None:
        if self._armed_step != ctx.step or self._layout is None:
            return
        layout, summed = self._layout, self._summed
        self._disarm()
        dst, src, unused, idle = [], [], [], []
        for k, (_, p) in enumerate(self._watched):
            grad = p.grad
            if grad is None:
                idle.append(k)
            elif k in summed and grad.layout == torch.strided:
                g = grad if layout.whole[k] else sample_view(grad)
                if g.shape == layout.grads[k].shape:
                    dst.append(layout.grads[k])
                    src.append(g)
                    continue
            unused.append(k)
        for k in idle:
            # A parameter that got no gradient (an unused module) tells nothing: watch another one.
            if self._spare:
                self._watched[k] = self._spare.pop(0)
                self._layout = None
        # Row of this step; the same on every rank, whatever each rank's gradients hold.
        row = len(self.steps)
        self.steps.append(ctx.step)
        slot = row % _ROWS
        if not self._per_step and slot == 0 and row > 0:
            self._fold(self.grams, row - _ROWS)
            self.grams.zero_()
        if not src:
            return  # nothing to compare: the row stays zero, which counts as no check
        for k in unused:
            layout.buffer[:, k].zero_()  # a parameter left out adds nothing to the products
        torch._foreach_copy_(dst, src)
        # float64: the squares of gradients near 1e-20 underflow in float32 and would read as "unexplained".
        # Leave out each tensor's elements at its largest |grad|: clip_grad_value_ puts every clamped element
        # there, and the others still equal the sum exactly. The padding is zero in both rows.
        size = layout.grad_rows.abs()
        keep = size < size.amax(dim=1, keepdim=True)
        both = (layout.buffer * keep).double().view(2, -1)
        if self._per_step:
            self._fold(torch.mm(both, both.t()).to(self.checked.device).unsqueeze(0), row)
        elif both.device == self.grams.device:
            torch.mm(both, both.t(), out=self.grams[slot])
        else:
            self.grams[slot].copy_(torch.mm(both, both.t()))

    def _judge(self, grams: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Ratio, factor, valid and flagged per row of Gram matrices (on any device; the host's are the same)."""
        gg, gs, ss = grams[:, 0, 0], grams[:, 0, 1], grams[:, 1, 1]
        tiny = torch.finfo(torch.float64).tiny
        factor = gs / ss.clamp_min(tiny)
        # |g - factor * s|^2 = |g|^2 - <g, s>^2 / |s|^2: the part of .grad that the fresh gradients do not explain.
        perp = (gg - gs * factor).clamp_min(0.0)
        ratio = torch.sqrt(perp / gg.clamp_min(tiny))
        valid = (gg > 0) & torch.isfinite(ratio) & torch.isfinite(factor)
        bad = valid & ((ratio > self.tol) | (factor > 1.0 + self.tol))
        return ratio, factor, valid, bad

    def _fold(self, grams: Tensor, first: int) -> None:
        """Add rows ``first, first + 1, ...`` of the interval to the device totals (no host read)."""
        ratio, factor, valid, bad = self._judge(grams)
        self.checked += valid.sum()
        self.flagged += bad.sum()
        self.ratio_max.copy_(torch.maximum(self.ratio_max, torch.where(valid, ratio, 0.0).amax()))
        self.factor_max.copy_(torch.maximum(self.factor_max, torch.where(valid, factor, 0.0).amax()))
        rows = torch.arange(first, first + grams.shape[0], dtype=torch.float64, device=grams.device)
        self.first_row.copy_(torch.minimum(self.first_row, torch.where(bad, rows, math.inf).amin()))

    # ----------------------------------------------------------------- check point
    def on_check(self, check: CheckContext) -> None:
        v = check.values
        steps, self.steps = self.steps, []
        self.interval_start = check.step
        # The rows still in the buffer (the ones before them were folded into the device totals).
        base = (len(steps) - 1) // _ROWS * _ROWS if steps else 0
        grams = torch.from_numpy(np.asarray(v["grams"], dtype=np.float64).reshape(_ROWS, 2, 2))
        ratio, factor, valid, bad = (t.numpy() for t in self._judge(grams))
        checked = int(v["checked"]) + int(valid.sum())
        flagged = int(v["flagged"]) + int(bad.sum())
        if flagged <= 0:
            return
        # The device maxima are float32; so are these, as if they had been folded.
        ratio_max = max(float(v["ratio_max"]), float(np.float32(ratio[valid].max(initial=0.0))))
        factor_max = max(float(v["factor_max"]), float(np.float32(factor[valid].max(initial=0.0))))
        first = float(v["first_row"])
        if bad.any():
            first = min(first, base + float(np.flatnonzero(bad)[0]))
        first_step = steps[int(first)] if math.isfinite(first) and int(first) < len(steps) else None
        self.total_flagged += flagged
        every = flagged >= checked
        self.emit(
            "grads_not_cleared",
            "error" if every else "warning",
            f".grad held gradients from earlier steps on {flagged} of {checked} checked steps "
            f"(leftover up to {ratio_max:.2g} of |grad|, factor {factor_max:.3g}): "
            "optimizer.zero_grad() is missing or in the wrong place",
            causes=("missing_zero_grad",),
            confidence=0.95 if every else 0.6,
            steps=flagged,
            checked_steps=checked,
            total_steps=self.total_flagged,
            first_step=first_step,
            ratio=ratio_max,
            factor=factor_max,
            tol=self.tol,
            params=[n for n, _ in self._watched],
        )

    def on_close(self) -> None:
        self._disarm()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (before or after the Guard attaches)."""
        super().load_state_dict(state)
        self._restored = True
        if self.guard is not None and self._watched:
            self.on_step_begin(self.guard.step + 1)  # the restored run's next step, not the one armed at attach


class _Layout:
    """One buffer for the watched parameters' samples: row 0 holds ``.grad``, row 1 the sum of the fresh gradients.

    Shape (2, parameters, longest sample), zero-padded, so that each parameter's largest ``|grad|`` is one
    ``amax`` over a row and the three products one matrix product, a fixed number of ops however many
    parameters are watched. A parameter sampled whole is viewed in its own shape, so ``.grad`` is copied
    in without a reshape (the elements land in the order of ``sample_view``).
    """

    __slots__ = ("buffer", "grad_rows", "grads", "key", "sums", "whole")

    def __init__(self, params: list[nn.Parameter]) -> None:
        self.key = self._key(params)
        shapes = [tuple(p.shape) if p.numel() <= UPDATE_SAMPLE else tuple(sample_view(p).shape) for p in params]
        sizes = [math.prod(s) for s in shapes]
        # float32 sums add up exactly as a float32 .grad does; a float64 parameter keeps its precision.
        dtype = torch.float64 if any(p.dtype == torch.float64 for p in params) else torch.float32
        self.buffer = torch.zeros(2, len(params), max(sizes), dtype=dtype, device=params[0].device)
        self.grad_rows = self.buffer[0]
        self.whole = [p.numel() <= UPDATE_SAMPLE for p in params]
        self.grads = [self.buffer[0, k, :n].view(s) for k, (n, s) in enumerate(zip(sizes, shapes))]
        self.sums = [self.buffer[1, k, :n].view(s) for k, (n, s) in enumerate(zip(sizes, shapes))]

    @staticmethod
    def _key(params: list[nn.Parameter]) -> tuple[Any, ...]:
        return tuple((id(p), p.shape, p.dtype, p.device) for p in params)

    def fits(self, params: list[nn.Parameter]) -> bool:
        return self._key(params) == self.key
