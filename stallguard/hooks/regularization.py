"""Regularization: weight decay or an L2 penalty that outweighs the loss and holds the weights near zero."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .._validate import check_float
from ..hook import Hook
from ..registry import register
from ..stats import CheckContext, StepContext, sample_view, tensor_norms

__all__ = ["Regularization"]

# How many layer names an event lists at most (the counts cover all of them).
_MAX_NAMED = 10


@dataclass(frozen=True)
class _Layout:
    """Where this step's kernels are: their positions among the step's gradients, and their slots."""

    positions: Tensor  # indices into ctx.grads / grad_norms / param_norms
    slots: Tensor  # slot of each selected kernel
    params: list[Tensor]  # the selected parameters, in the same order
    names: list[str]


@register("regularization", default="monitor")
class Regularization(Hook):
    """Report weight decay or an L2 penalty that dominates the gradient and shrinks the weights.

    A decay term pulls every weight towards zero in proportion to its size: its gradient is
    ``wd * w``. When it outweighs the loss gradient, the weights shrink until the loss gradient can
    just hold them, the model stays close to zero, and the loss stalls high. On sampled steps (one
    in ``every``), for every *layer* (a parameter with two or more dimensions) the hook measures, on
    the device:

    * the **cosine** between the gradient and the weights, ``cos(g, w)``. A penalty written into the
      loss by hand (``loss + lam * sum(w ** 2)``) is part of ``p.grad``; when it dominates, the
      gradient is nearly parallel to the weights (cosine near 1). Coupled weight decay (SGD, Adam,
      RMSprop ``weight_decay``, which the optimizer adds to the gradient inside ``step()``) is added
      in: the cosine is that of ``g + wd * w``. The cosine of ``g`` and ``w`` is measured on each
      layer's fixed sample of at most 4096 elements (see :func:`~stallguard.stats.sample_view`).
    * the **decay share** of the step, in [0, 1]. For coupled decay, ``wd|w| / (wd|w| + |g|)`` in
      gradient space; for decoupled decay (AdamW, or ``decoupled_weight_decay=True``), which never
      shows in the gradient, ``lr*wd*|w| / (lr*wd*|w| + |Δw|)`` on the update the optimizer applied
      (from ``StepContext.update_norms``, a fixed sample of each tensor). About 0.5 means the decay
      is as large as everything else in the step; typical settings (AdamW 0.01, SGD 5e-4) give
      less than 0.05 while the loss is being learned.

    At each check point, with the means over the interval's sampled steps, it emits
    ``over_regularization`` when at least ``layer_fraction`` of the layers have a cosine of at least
    ``cos_threshold`` or a decay share of at least ``share_threshold``, *and* the weights have shrunk:
    their total norm is at most ``shrink_ratio`` times what it was at the time the Guard attached. (A run
    that learns grows its weights from the initialization; a run that has fitted its data can let the
    decay take over the step without harm, but its weights grew first.) The event is reported once
    per episode: again only after the condition cleared at a check point. A model with one weight layer
    and no configured weight decay is judged by the decay share only: a data loss whose optimum is at
    zero weights (a linear model on XOR) points its gradient along the weights as well.

    Args:
        cos_threshold: Mean cosine of a layer's (effective) gradient with its weights at or above
            which the decay dominates its gradient.
        share_threshold: Mean decay share of a layer's step at or above which the decay dominates.
        layer_fraction: Share of the layers that must show it.
        shrink_ratio: The total layer weight norm must be at most this multiple of its value at the
            time the Guard attached.
        every: Sample one optimizer step in this many (the cost is one extra pass over the layer
            gradients and weights on sampled steps only).
        **kwargs: ``start_step``, ``name`` (see :class:`~stallguard.Hook`).

    Example:
        An L2 penalty of 1.0 written into the loss: the weights collapse towards zero.

        >>> import torch, stallguard as sg
        >>> _ = torch.manual_seed(0)
        >>> nn = torch.nn
        >>> model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 1))
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.05)
        >>> x = torch.randn(128, 8); y = x.sum(1, keepdim=True)
        >>> guard = sg.Guard(model, opt, hooks=[sg.Regularization(every=2)], sinks=[], check_every=20)
        >>> for _ in range(40):
        ...     loss = torch.nn.functional.mse_loss(model(x), y)
        ...     loss = loss + 1.0 * sum((p ** 2).sum() for p in model.parameters())
        ...     opt.zero_grad(); loss.backward(); guard.observe(loss); opt.step()
        >>> [e.kind for e in guard.events]
        ['over_regularization']
        >>> guard.close()
    """

    def __init__(
        self,
        cos_threshold: float = 0.9,
        share_threshold: float = 0.25,
        layer_fraction: float = 0.5,
        shrink_ratio: float = 0.9,
        *,
        every: int = 50,
        **kwargs: Any,
    ) -> None:
        super().__init__(every=every, **kwargs)
        owner = type(self).__name__
        self.cos_threshold = check_float(owner, "cos_threshold", cos_threshold, min=-1.0, max=1.0)
        self.share_threshold = check_float(owner, "share_threshold", share_threshold, min=0.0, max=1.0, min_open=True)
        self.layer_fraction = check_float(owner, "layer_fraction", layer_fraction, min=0.0, max=1.0, min_open=True)
        self.shrink_ratio = check_float(owner, "shrink_ratio", shrink_ratio, min=0.0, min_open=True)
        # Host state.
        self.add_state("active", False)  # reported, and not cleared since
        self.add_state("reports", 0)
        self._pending_state: dict[str, Any] | None = None
        self._slot_names: list[str] = []
        self._slot_of: dict[str, int] = {}
        self._layouts: dict[tuple[int, tuple[str, ...]], _Layout] = {}
        self._decay_seen: dict[str, Any] = {}
        self._pending: tuple[Any, ...] | None = None
        self._indices: dict[tuple[tuple[int, ...], torch.device], Tensor] = {}

    # ----------------------------------------------------------------- attach: slots and states
    def on_attach(self, guard: Any) -> None:
        kernels: dict[str, Tensor] = {}
        others: dict[str, Tensor] = {}
        named: list[tuple[str, Tensor]] = []
        for i in range(len(guard.optimizers)):
            params, pnames = guard.optimizer_parameters(i)
            named += list(zip(pnames, params))
        if not guard.optimizers and guard.module is not None:  # manual before_step/after_step
            named = list(guard.module.named_parameters())
        for n, p in named:
            (kernels if p.dim() >= 2 else others).setdefault(n, p)
        # A model without matrices (a bias-only or 1-D model) is judged on all its parameters.
        self._kernels_only = bool(kernels)
        chosen = kernels or others
        self._slot_names = list(chosen)
        self._slot_of = {n: j for j, n in enumerate(self._slot_names)}
        n = max(len(self._slot_names), 1)
        # Gradients and weights are the same on every rank under data parallelism; "mean" keeps any
        # difference honest.
        self.add_state("cos_sum", torch.zeros(n), reduce="mean", reset=True)
        self.add_state("share_sum", torch.zeros(n), reduce="mean", reset=True)
        self.add_state("count", torch.zeros(n), reduce="mean", reset=True)
        self.add_state("weight_now", torch.full((n,), -1.0), reduce="mean")  # -1: never sampled (frozen)
        # The weights as the Guard found them: the reference for "the weights shrank" (device only).
        self.add_state("weight_start", torch.full((n,), -1.0), reduce="mean")  # -1: not seen yet
        if chosen:
            start = tensor_norms([p.detach() for p in chosen.values()])[0]
            self.weight_start.copy_(start.to(self.weight_start.device))
        if self._pending_state is not None:
            state, self._pending_state = self._pending_state, None
            super().load_state_dict(state)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # Per-layer states exist only once attached (their size is the model's); keep them until then.
        if self.guard is None and "cos_sum" not in self._states:
            self._pending_state = dict(state)
            for key in ("active", "reports"):
                if key in state:
                    setattr(self, key, state[key])
            return
        super().load_state_dict(state)

    def _layout(self, ctx: StepContext) -> _Layout | None:
        names = ctx.grad_names
        key = (ctx.optimizer_index, tuple(names))
        layout = self._layouts.get(key)
        if layout is None:
            pos = [i for i, (p, n) in enumerate(zip(ctx.grad_params, names)) if n in self._slot_of]
            pos = [i for i in pos if ctx.grad_params[i].dim() >= 2 or not self._kernels_only]
            device = self._require_guard("_layout").device
            layout = _Layout(
                positions=torch.tensor(pos, dtype=torch.long, device=device),
                slots=torch.tensor([self._slot_of[names[i]] for i in pos], dtype=torch.long, device=device),
                params=[ctx.grad_params[i] for i in pos],
                names=[names[i] for i in pos],
            )
            self._layouts[key] = layout
        return layout if layout.params else None

    def _decay(self, ctx: StepContext, layout: _Layout) -> tuple[list[float], list[Any], list[bool]]:
        """Per selected layer: weight decay, learning rate, and whether the decay is decoupled."""
        opt = ctx.optimizer
        wds: list[float] = []
        lrs: list[Any] = []
        decoupled: list[bool] = []
        if opt is None:
            return [0.0] * len(layout.params), [0.0] * len(layout.params), [False] * len(layout.params)
        group_of: dict[int, dict[str, Any]] = {}
        for g in opt.param_groups:
            for p in g["params"]:
                group_of[id(p)] = g
        is_adamw = isinstance(opt, torch.optim.AdamW)
        for p in layout.params:
            g = group_of.get(id(p), {})
            wd = g.get("weight_decay", 0.0)
            wds.append(float(wd) if not isinstance(wd, Tensor) else wd)
            lrs.append(g.get("lr", 0.0))
            decoupled.append(bool(g.get("decoupled_weight_decay", False)) or is_adamw)
        return wds, lrs, decoupled

    # ----------------------------------------------------------------- per sampled step (device only)
    def on_before_step(self, ctx: StepContext) -> None:
        self._pending = None
        layout = self._layout(ctx)
        norms = ctx.grad_norms() if layout is not None else None
        if layout is None or norms is None:
            return
        wds, lrs, decoupled = self._decay(ctx, layout)
        self._decay_seen = {"weight_decay": sorted({_num(w) for w in wds}), "decoupled": any(decoupled)}
        gn = norms.per_tensor.index_select(0, layout.positions)
        wn = ctx.param_norms().index_select(0, layout.positions)
        tiny = torch.finfo(torch.float32).tiny
        # cos(g, w) of each layer on its fixed sample (at most 4096 elements), times the exact
        # norms: the dot products cost a few foreach ops whatever the size, not a read of every weight.
        dot = _sample_cos(self._grads(ctx, layout), layout.params) * gn * wn
        coupled = [0.0 if d else w for w, d in zip(wds, decoupled)]
        if any(isinstance(w, Tensor) or w != 0.0 for w in coupled):
            # The optimizer adds wd * w to the gradient inside step(): judge the gradient it follows.
            c = _coef(coupled, gn)
            eff_norm = (gn * gn + 2 * c * dot + (c * wn) ** 2).clamp_min(0).sqrt()
            cos = (dot + c * wn * wn) / (eff_norm * wn).clamp_min(tiny)
            share = c * wn / (c * wn + gn).clamp_min(tiny)
        else:
            cos = dot / (gn * wn).clamp_min(tiny)
            share = torch.zeros_like(cos)
        dec = [(i, _lr_wd(lr, w)) for i, (w, lr, d) in enumerate(zip(wds, lrs, decoupled)) if d]
        dec = [(i, c) for i, c in dec if isinstance(c, Tensor) or c != 0.0]
        if not dec:
            self._accumulate(layout, cos, share, wn)
            return
        # Decoupled decay never shows in the gradient: compare it with the update actually applied.
        ctx.request_update()
        self._pending = (ctx, layout, cos, share, wn, dec)

    @staticmethod
    def _grads(ctx: StepContext, layout: _Layout) -> list[Tensor]:
        by_id = {id(p): g for p, g in zip(ctx.grad_params, ctx.grads)}
        return [by_id[id(p)] for p in layout.params]

    def on_after_step(self, ctx: StepContext) -> None:
        pending, self._pending = self._pending, None
        if pending is None or pending[0] is not ctx:
            return
        _, layout, cos, share, wn, dec = pending
        update = ctx.update_norms()
        if update is not None:
            positions = layout.positions.to(update.delta.device)
            delta = update.delta.index_select(0, positions).float()
            weight = update.weight.index_select(0, positions).float()
            idx = [i for i, _ in dec]
            if len(idx) < len(layout.params):
                sel = self._index(idx, delta.device)
                delta, weight = delta.index_select(0, sel), weight.index_select(0, sel)
            decay = _coef([c for _, c in dec], delta) * weight
            dec_share = decay / (decay + delta).clamp_min(torch.finfo(torch.float32).tiny)
            if len(idx) < len(layout.params):
                share = share.index_copy(0, sel, dec_share.to(share.dtype))
            else:
                share = dec_share
        self._accumulate(layout, cos, share, wn)

    def _index(self, idx: list[int], device: torch.device) -> Tensor:
        # Cached: building an index tensor on an accelerator is a blocking host-to-device copy.
        key = (tuple(idx), device)
        t = self._indices.get(key)
        if t is None:
            t = self._indices[key] = torch.tensor(idx, dtype=torch.long, device=device)
        return t

    def _accumulate(self, layout: _Layout, cos: Tensor, share: Tensor, wn: Tensor) -> None:
        slots = layout.slots
        self.cos_sum.index_add_(0, slots, cos.to(self.cos_sum.dtype))
        self.share_sum.index_add_(0, slots, share.to(self.share_sum.dtype))
        self.count.index_add_(0, slots, torch.ones_like(cos, dtype=self.count.dtype))
        wn = wn.to(self.weight_now.dtype)
        self.weight_now.index_copy_(0, slots, wn)
        start = self.weight_start.index_select(0, slots)
        self.weight_start.index_copy_(0, slots, torch.where(start < 0, wn, start))

    # ----------------------------------------------------------------- check points (host)
    def on_check(self, check: CheckContext) -> None:
        v = check.values
        count = np.asarray(v.get("count", []), dtype=np.float64).reshape(-1)
        if count.size == 0 or not (count > 0).any():
            return
        seen = count > 0
        cos = np.asarray(v["cos_sum"], dtype=np.float64).reshape(-1)[seen] / count[seen]
        share = np.asarray(v["share_sum"], dtype=np.float64).reshape(-1)[seen] / count[seen]
        names = [n for n, s in zip(self._slot_names, seen) if s]
        start = np.asarray(v["weight_start"], dtype=np.float64).reshape(-1)
        now = np.asarray(v["weight_now"], dtype=np.float64).reshape(-1)
        known = (start >= 0) & (now >= 0)  # layers never sampled (no gradient) say nothing about shrinking
        start_norm = float(np.sqrt(np.sum(start[known] ** 2)))
        now_norm = float(np.sqrt(np.sum(now[known] ** 2)))
        ratio = now_norm / start_norm if start_norm > 0 else math.nan
        parallel = cos >= self.cos_threshold
        decay_set = any(w > 0 for w in self._decay_seen.get("weight_decay", ()))
        if len(names) < 2 and not decay_set:
            # One layer and no configured decay: a data loss whose optimum is w = 0 (a linear model on XOR)
            # pulls the weights straight to zero too, so the direction alone proves no L2 term.
            parallel[:] = False
        heavy = share >= self.share_threshold
        flagged = parallel | heavy
        fraction = float(flagged.mean())
        found = fraction >= self.layer_fraction and math.isfinite(ratio) and ratio <= self.shrink_ratio
        if not found:
            self.active = False
            return
        if self.active:
            return
        self.active = True
        self.reports += 1
        flagged_names = [n for n, f in zip(names, flagged) if f]
        # Which test carried the decision: the gradient's direction (an L2 term in the loss, coupled decay)
        # or the decay's share of the step (decoupled decay, or coupled decay in balance with the loss).
        by = "gradient" if parallel.mean() >= heavy.mean() else "decay_share"
        decay = dict(self._decay_seen) if self._decay_seen else {"weight_decay": [], "decoupled": False}
        data: dict[str, Any] = {
            "cosine": float(np.median(cos)),
            "share": float(np.median(share)),
            "layer_fraction": fraction,
            "layers": flagged_names[:_MAX_NAMED],
            "layers_flagged": len(flagged_names),
            "layers_seen": len(names),
            "weight_norm_start": start_norm,
            "weight_norm_now": now_norm,
            "weight_norm_ratio": ratio,
            "weight_decay": decay["weight_decay"],
            "decoupled": decay["decoupled"],
            "by": by,
            "samples": int(count[seen].max()),
        }
        data.update(self._loss_trend(check))
        what = (
            f"the gradient is nearly parallel to the weights (median cosine {data['cosine']:.2f})"
            if by == "gradient"
            else f"the decay is {data['share']:.0%} of the step (median over layers)"
        )
        message = (
            f"weight decay / L2 dominates in {len(flagged_names)} of {len(names)} layers: {what}, and the weights "
            f"shrank to {ratio:.2f}x their norm at the start"
        )
        confidence = round(min(0.95, 0.6 + 0.3 * fraction), 3)
        self.emit(
            "over_regularization", "warning", message, causes=("over_regularization",), confidence=confidence, **data
        )

    @staticmethod
    def _loss_trend(check: CheckContext) -> dict[str, Any]:
        guard = check.guard
        if not guard.has_series("loss"):
            return {}
        vals = guard.series("loss").values
        vals = vals[np.isfinite(vals)]
        if len(vals) < 4:
            return {}
        half = len(vals) // 2
        first, last = float(np.median(vals[:half])), float(np.median(vals[half:]))
        return {"loss_start": first, "loss_now": last, "loss_change": (last - first) / abs(first) if first else 0.0}


def _sample_cos(grads: list[Tensor], params: list[Tensor]) -> Tensor:
    """Per-tensor ``cos(g, w)`` on each tensor's fixed sample, in a fixed number of foreach ops.

    The cosine of unit vectors by polarization, ``(|a + b|^2 - |a - b|^2) / 4``: exact to float32
    rounding (about 1e-7) because both are normalized first. A zero tensor gives a cosine of 0.
    """
    a = [_f32(sample_view(g)) for g in grads]
    b = [_f32(sample_view(p.detach())) for p in params]
    tiny = torch.finfo(torch.float32).tiny
    a = torch._foreach_div(a, torch._foreach_clamp_min(torch._foreach_norm(a), tiny))
    b = torch._foreach_div(b, torch._foreach_clamp_min(torch._foreach_norm(b), tiny))
    plus = torch.stack(torch._foreach_norm(torch._foreach_add(a, b)))
    minus = torch.stack(torch._foreach_norm(torch._foreach_sub(a, b)))
    return ((plus * plus - minus * minus) / 4).clamp(-1.0, 1.0)


def _f32(t: Tensor) -> Tensor:
    return t if t.dtype == torch.float32 else t.float()


def _num(x: Any) -> float:
    return float(x) if not isinstance(x, Tensor) else math.nan


def _lr_wd(lr: Any, wd: Any) -> Any:
    if isinstance(lr, Tensor) or isinstance(wd, Tensor):
        return torch.as_tensor(lr, dtype=torch.float32) * torch.as_tensor(wd, dtype=torch.float32)
    return float(lr) * float(wd)


def _coef(values: list[Any], like: Tensor) -> Tensor:
    """Per-layer coefficients as a float32 vector on ``like``'s device.

    Python floats go in through a foreach multiply of ones, with no host-to-device copy (which would
    block on an accelerator); tensor values (a tensor learning rate) are stacked.
    """
    if any(isinstance(v, Tensor) for v in values):
        return torch.stack([torch.as_tensor(v, dtype=torch.float32).to(like.device) for v in values])
    ones = list(torch.ones(len(values), device=like.device, dtype=torch.float32).unbind())
    return torch.stack(torch._foreach_mul(ones, [float(v) for v in values]))
