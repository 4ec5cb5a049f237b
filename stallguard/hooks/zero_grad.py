"""ZeroGradCheck: gradients that are never cleared between optimizer steps (a missing ``zero_grad()``)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from .._validate import check_float, check_int
from ..hook import Hook
from ..registry import register
from ..stats import CheckContext, StepContext, sample_view

__all__ = ["ZeroGradCheck"]

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
    ``zero_grad(set_to_none=False)`` are therefore quiet. Everything is computed on the device; the
    host reads the counts at check points.

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
        self.add_state("checked", torch.zeros(()), reduce="sum", reset=True)
        self.add_state("flagged", torch.zeros(()), reduce="sum", reset=True)
        self.add_state("ratio_max", torch.zeros(()), reduce="max", reset=True)
        self.add_state("factor_max", torch.zeros(()), reduce="max", reset=True)
        # Steps since the interval began (small numbers, exact in float32); inf = none.
        self.add_state("first_flagged", torch.full((), math.inf), reduce="min", reset=True)
        self.add_state("interval_start", 0)
        self.add_state("total_flagged", 0)
        self._watched: list[tuple[str, nn.Parameter]] = []
        self._spare: list[tuple[str, nn.Parameter]] = []
        self._sums: dict[int, Tensor] = {}
        self._incoming: dict[int, Tensor] = {}
        self._armed_step: int | None = None
        self._step_handles: list[Any] = []
        self._size_tensors: dict[tuple[tuple[int, ...], torch.device], Tensor] = {}
        self._restored = False

    # ----------------------------------------------------------------- attach
    def on_attach(self, guard: Any) -> None:
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
        if not self._restored:
            self.interval_start = guard.step

    def on_step_begin(self, step: int) -> None:
        self._disarm()
        if not self._watched or not self.is_due(step):
            return
        self._armed_step = step
        for k, (_, p) in enumerate(self._watched):
            self._step_handles.append(self.register_handle(p.register_hook(self._make_pre(k, p))))
            self._step_handles.append(self.register_handle(p.register_post_accumulate_grad_hook(self._make_post(k))))

    def _make_pre(self, k: int, p: nn.Parameter) -> Any:
        def pre(grad: Tensor) -> None:
            # The gradient about to be added to p.grad; kept only if it really lands there
            # (torch.autograd.grad also calls this hook, but not the post-accumulate one).
            g = grad.detach()
            old = p.grad
            if g.layout != torch.strided or (old is not None and old.layout != torch.strided):
                self._incoming.pop(k, None)  # sparse gradients: not compared
                return
            if old is None:
                self._sums.pop(k, None)  # cleared with set_to_none=True: a fresh sum
            elif k in self._sums:
                # Cleared with set_to_none=False: .grad is zero (on the sample); decided on the device.
                cleared = (sample_view(old) == 0).all()
                self._sums[k] = torch.where(cleared, torch.zeros_like(self._sums[k]), self._sums[k])
            # Only the tensor's fixed sample is summed and compared: .grad equals the sum of the fresh
            # gradients element by element, so a sample shows leftovers as well as the whole tensor.
            self._incoming[k] = sample_view(g)

        return pre

    def _make_post(self, k: int) -> Any:
        def post(p: Tensor) -> None:
            g = self._incoming.pop(k, None)
            if g is None:
                return
            total = self._sums.get(k)
            self._sums[k] = g.float().clone() if total is None else total + g.float()

        return post

    def _sizes(self, sizes: list[int], device: torch.device) -> Tensor:
        # Cached: building it on an accelerator is a host-to-device copy.
        key = (tuple(sizes), device)
        found = self._size_tensors.get(key)
        if found is None:
            found = self._size_tensors[key] = torch.tensor(sizes, device=device)
        return found

    def _disarm(self) -> None:
        for h in self._step_handles:
            h.remove()
            if h in self._handles:
                self._handles.remove(h)
        self._step_handles = []
        self._sums = {}
        self._incoming = {}
        self._armed_step = None

    # ----------------------------------------------------------------- per step
    @torch.no_grad()
    def on_before_step(self, ctx: StepContext) -> None:
        if self._armed_step != ctx.step:
            return
        grads, sums = [], []
        idle = []
        for k, (_, p) in enumerate(self._watched):
            s = self._sums.get(k)
            if s is None or p.grad is None:
                if p.grad is None:
                    idle.append(k)
                continue
            g = sample_view(p.grad)
            if g.shape == s.shape:
                grads.append(g)
                sums.append(s)
        self._disarm()
        for k in idle:
            # A parameter that got no gradient (an unused module) tells nothing: watch another one.
            if self._spare:
                self._watched[k] = self._spare.pop(0)
        if not grads:
            return
        # All watched tensors as one flat vector: a fixed number of ops, not a few per tensor.
        # float64: the squares of gradients near 1e-20 underflow in float32 and would read as "unexplained".
        dev = grads[0].device
        if any(t.device != dev for t in grads):  # a model split over devices: compare on the first one
            grads, sums = [t.to(dev) for t in grads], [t.to(dev) for t in sums]
        g = torch.cat([t.reshape(-1) for t in grads]).double()
        s = torch.cat([t.reshape(-1) for t in sums]).double()
        # Leave out each tensor's elements at its largest |grad|: clip_grad_value_ puts every clamped
        # element there, and the others still equal the sum exactly.
        peak = torch.stack(torch._foreach_norm(grads, math.inf)).double()
        keep = g.abs() < peak.repeat_interleave(self._sizes([t.numel() for t in grads], dev), output_size=g.numel())
        g, s = g * keep, s * keep
        gs_t, ss_t, gg_t = torch.dot(g, s), torch.dot(s, s), torch.dot(g, g)
        tiny = torch.finfo(torch.float64).tiny
        factor = gs_t / ss_t.clamp_min(tiny)
        # |g - factor * s|^2 = |g|^2 - <g, s>^2 / |s|^2: the part of .grad that the fresh gradients do not explain.
        perp = (gg_t - gs_t * factor).clamp_min(0.0)
        ratio = torch.sqrt(perp / gg_t.clamp_min(tiny))
        valid = (gg_t > 0) & torch.isfinite(ratio) & torch.isfinite(factor)
        bad = valid & ((ratio > self.tol) | (factor > 1.0 + self.tol))
        self.checked += valid
        self.flagged += bad
        self.ratio_max.copy_(torch.maximum(self.ratio_max, torch.where(valid, ratio, 0.0)))
        self.factor_max.copy_(torch.maximum(self.factor_max, torch.where(valid, factor, 0.0)))
        when = torch.where(bad, float(ctx.step - self.interval_start), math.inf)
        self.first_flagged.copy_(torch.minimum(self.first_flagged, when))

    # ----------------------------------------------------------------- check point
    def on_check(self, check: CheckContext) -> None:
        v = check.values
        checked, flagged = int(v["checked"]), int(v["flagged"])
        first = float(v["first_flagged"])
        start, self.interval_start = self.interval_start, check.step
        if flagged <= 0:
            return
        self.total_flagged += flagged
        first_step = int(start + first) if math.isfinite(first) else None
        every = flagged >= checked
        self.emit(
            "grads_not_cleared",
            "error" if every else "warning",
            f".grad held gradients from earlier steps on {flagged} of {checked} checked steps "
            f"(leftover up to {v['ratio_max']:.2g} of |grad|, factor {v['factor_max']:.3g}): "
            "optimizer.zero_grad() is missing or in the wrong place",
            causes=("missing_zero_grad",),
            confidence=0.95 if every else 0.6,
            steps=flagged,
            checked_steps=checked,
            total_steps=self.total_flagged,
            first_step=first_step,
            ratio=float(v["ratio_max"]),
            factor=float(v["factor_max"]),
            tol=self.tol,
            params=[n for n, _ in self._watched],
        )

    def on_close(self) -> None:
        self._disarm()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (before or after the Guard attaches)."""
        super().load_state_dict(state)
        self._restored = True
