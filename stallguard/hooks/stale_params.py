"""StaleParams: parameters that training never changes (outside the optimizer, detached, frozen by lr=0)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .._modules import Slots
from .._validate import check_float, check_int
from ..hook import Hook
from ..registry import register
from ..stats import CheckContext, StepContext

__all__ = ["StaleParams"]

_LOW_PRECISION = (torch.float16, torch.bfloat16)
_MAX_NAMED = 20  # names listed in an event
_COUNTS = ("sampled", "moved", "graded")  # the rows of the ``counts`` state


def _short(names: list[str]) -> str:
    return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")


@register("stale_params", default="monitor")
class StaleParams(Hook):
    """Find parameters that training does not change, and say why.

    A parameter with ``requires_grad=False`` is frozen by design and never reported. The others are
    checked three ways:

    * At attach (host, once): parameters of the model that sit in no optimizer param group
      (``params_not_in_optimizer``), and optimizer parameters that are not in the model
      (``optimizer_params_not_in_model``: an optimizer built over another instance, e.g. before a
      ``deepcopy`` or before the model was re-created). A few extra optimizer tensors beside a fully
      covered model (a learnable loss temperature) are reported as ``info`` only.
    * Over the first ``warmup`` steps (host flags, no device read): optimizer parameters whose ``.grad``
      is still None at every step (``grads_missing``). Forward hooks of those steps tell a detached
      graph (the module ran, but no gradient came back: warning when they hold at least
      ``min_fraction`` of the trainable elements) from a module that never ran (info).
    * On sampled steps (every ``update_every`` steps), the size of the update the optimizer applied, from the
      Guard's shared update sample. A parameter with a non-zero gradient that never moved over a whole
      check interval (at least ``min_samples`` sampled steps) is reported as ``weights_frozen`` with
      ``reason``: ``"lr_zero"`` (its param group's learning rate was 0 on every sampled step),
      ``"update_underflow"`` (a float16/bfloat16 weight: the update rounds away; cause
      ``lr_too_low``) or ``"not_updated"`` (anything else: the step does not touch it). The last
      two are not reported while the loss has converged (the check interval's median observed loss
      at most ``converged_fraction`` of the first losses): gradients of a loss at its floor are too
      small for any update to show, which is a finished run, not a stuck one.

    Args:
        warmup: Steps over which a missing ``.grad`` counts as a bug.
        min_fraction: Share of the trainable elements that missing gradients must reach for a warning.
        update_every: Measure the applied update every this many steps (0: never, no ``weights_frozen``).
        min_samples: Sampled steps in a check interval needed to call a weight frozen.
        converged_fraction: A loss level (median over the check interval) at most this fraction of
            the first observed losses counts as converged, as in PlateauDetector; in [0, 1] (0: off).
        **kwargs: ``every``, ``start_step``, ``name`` (see :class:`~stallguard.Hook`).

    Example:
        >>> import copy, torch, stallguard as sg
        >>> model = torch.nn.Linear(4, 1)
        >>> opt = torch.optim.SGD(copy.deepcopy(model).parameters(), lr=0.1)  # the wrong instance
        >>> guard = sg.Guard(model, opt, hooks=[sg.StaleParams()], sinks=[])
        >>> [e.kind for e in guard.events]
        ['params_not_in_optimizer', 'optimizer_params_not_in_model']
        >>> guard.diagnose()[0].cause
        'params_not_updated'
        >>> guard.close()
    """

    def __init__(
        self,
        warmup: int = 5,
        min_fraction: float = 0.01,
        update_every: int = 10,
        min_samples: int = 2,
        converged_fraction: float = 0.01,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        owner = type(self).__name__
        self.update_every = check_int(owner, "update_every", update_every, min=0)
        self.warmup = check_int(owner, "warmup", warmup, min=1)
        self.min_fraction = check_float(owner, "min_fraction", min_fraction, min=0.0, max=1.0)
        self.min_samples = check_int(owner, "min_samples", min_samples, min=1)
        self.converged_fraction = check_float(owner, "converged_fraction", converged_fraction, min=0.0, max=1.0)
        self.add_state("warmup_steps", 0)
        self.add_state("grads_decided", False)
        self.add_state("missing", {})  # name -> [steps seen, steps without .grad] during the warm-up
        self.add_state("reported_frozen", [])
        self.add_state("loss_seen", 0)  # loss observations read so far
        self.add_state("loss_start", None)  # the median of the first observed losses
        self._pending_state: dict[str, Any] | None = None
        self._slots = Slots()
        self._params: dict[str, Tensor] = {}
        self._lr_zero: dict[str, bool] = {}  # name -> lr was 0 on every sampled step of the interval
        self._module_of: dict[str, nn.Module] = {}
        self._calls: dict[int, int] = {}
        self._forward_handles: list[Any] = []
        self._groups: dict[int, tuple[list[Tensor], tuple[int, ...], list[list[str]]]] = {}
        self._rows_cache: _Rows | None = None

    # ----------------------------------------------------------------- attach: host checks, once
    def on_attach(self, guard: Any) -> None:
        model = guard.module
        opt_named: list[tuple[str, Tensor]] = []
        for i in range(len(guard.optimizers)):
            params, names = guard.optimizer_parameters(i)
            opt_named += [(n, p) for n, p in zip(names, params) if p.requires_grad]
        if guard.optimizers:
            names_in_order = [n for n, _ in opt_named]
            self._params = dict(opt_named)
        else:
            named = list(model.named_parameters()) if model is not None else []
            names_in_order = [n for n, p in named if p.requires_grad]
            self._params = {n: p for n, p in named if p.requires_grad}
        self._slots = Slots(names_in_order)
        n_slots = len(self._slots)
        # Per slot, over the interval's sampled steps: how many (row 0), how many moved the weight (row 1),
        # how many had a non-zero gradient (row 2). One state, so that a step adds to it with one op.
        self.add_state("counts", torch.zeros(len(_COUNTS), n_slots), reduce="max", reset=True)
        if self._pending_state is not None:
            state, self._pending_state = self._pending_state, None
            super().load_state_dict(state)
        if model is None or guard.step > 0:
            return  # attach-time checks need the model, and belong to the start of a run
        if guard.optimizers:
            self._check_membership(guard, model, opt_named)
        for mod in model.modules():
            for p in mod.parameters(recurse=False):
                name = guard.parameter_name(p)
                if name is not None and p.requires_grad:
                    self._module_of.setdefault(name, mod)
        if not self.grads_decided:
            for mod in {id(m): m for m in self._module_of.values()}.values():
                self._forward_handles.append(self.register_handle(mod.register_forward_hook(self._count_call)))

    def _count_call(self, module: nn.Module, args: Any, output: Any) -> None:
        self._calls[id(module)] = self._calls.get(id(module), 0) + 1

    def _check_membership(self, guard: Any, model: nn.Module, opt_named: list[tuple[str, Tensor]]) -> None:
        in_opt = {id(p) for _, p in opt_named}
        for i in range(len(guard.optimizers)):
            in_opt |= {id(p) for p in guard.optimizer_parameters(i)[0]}
        model_named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        in_model = {id(p) for _, p in model.named_parameters()}
        outside = [(n, p) for n, p in model_named if id(p) not in in_opt]
        foreign = [(n, p) for n, p in opt_named if id(p) not in in_model]
        total = sum(p.numel() for _, p in model_named) or 1
        if outside:
            numel = sum(p.numel() for _, p in outside)
            names = [n for n, _ in outside]
            self.emit(
                "params_not_in_optimizer",
                "error" if numel == total else "warning",
                f"{len(outside)} trainable parameter(s) of the model ({numel / total:.0%} of the elements) are in no "
                f"optimizer param group, so they never change: {_short(names)}",
                causes=("params_not_updated",),
                confidence=0.9,
                params=names[:_MAX_NAMED],
                count=len(outside),
                numel=numel,
                fraction=numel / total,
            )
        if foreign:
            shapes = {tuple(p.shape) for _, p in model_named}
            twins = sum(tuple(p.shape) in shapes for _, p in foreign)
            # Another instance: the model's own parameters are missing and look-alikes stand in for them.
            # Beside a model that the optimizer fully covers, extra tensors are a design choice.
            bug = bool(outside) and twins > 0
            names = [n for n, _ in foreign]
            self.emit(
                "optimizer_params_not_in_model",
                "error" if bug else "info",
                f"the optimizer holds {len(foreign)} parameter(s) that are not in the model"
                + (
                    f" ({twins} shaped like model parameters: it was built over another instance of the model)"
                    if bug
                    else " (extra learnable tensors beside the model)"
                ),
                causes=("params_not_updated",),
                confidence=0.95 if bug else 0.2,
                params=names[:_MAX_NAMED],
                count=len(foreign),
                same_shape=twins,
            )

    # ----------------------------------------------------------------- per step
    @torch.no_grad()
    def is_due(self, step: int) -> bool:
        # The first steps (for grads_missing), then only the steps that sample the update.
        return self.falls_on(step, self.update_every) or not self.grads_decided

    def next_due(self, step: int) -> int | None:
        return step if not self.grads_decided else self.next_on(step, self.update_every)

    def on_before_step(self, ctx: StepContext) -> None:
        self._watch_grads(ctx)
        if self.falls_on(ctx.step, self.update_every):
            ctx.request_update()
            self._sample_lr(ctx)

    def _watch_grads(self, ctx: StepContext) -> None:
        if self.grads_decided:
            return
        # .grad being None is a host fact: no device read. Per name: [steps seen, steps without .grad].
        for n, p in zip(ctx.names, ctx.params):
            if p.requires_grad:
                seen = self.missing.setdefault(n, [0, 0])
                seen[0] += 1
                seen[1] += p.grad is None
        if ctx.is_clock:
            self.warmup_steps += 1

    def _sample_lr(self, ctx: StepContext) -> None:
        opt = ctx.optimizer
        if opt is None:
            return
        for group, names in zip(opt.param_groups, self._group_names(ctx, opt)):
            lr = group.get("lr")
            if isinstance(lr, (int, float)) and lr == 0:
                for n in names:
                    self._lr_zero.setdefault(n, True)  # stays False where an earlier sampled step had lr > 0
            else:
                self._lr_zero.update(dict.fromkeys(names, False))

    def _group_names(self, ctx: StepContext, opt: torch.optim.Optimizer) -> list[list[str]]:
        """The step's parameter names per param group, worked out once per parameter list."""
        sizes = tuple(len(g["params"]) for g in opt.param_groups)
        cached = self._groups.get(ctx.optimizer_index)
        if cached is not None and cached[0] is ctx.params and cached[1] == sizes:
            return cached[2]
        ids = {id(p): n for n, p in zip(ctx.names, ctx.params)}
        groups = [[ids[id(p)] for p in g["params"] if id(p) in ids] for g in opt.param_groups]
        self._groups[ctx.optimizer_index] = (ctx.params, sizes, groups)
        return groups

    def on_after_step(self, ctx: StepContext) -> None:
        # Only the steps where every per-step method ran (the update was requested before the step).
        upd = ctx.update_norms()
        if upd is None:
            return
        norms = ctx.grad_norms()
        # One (3, parameters) buffer whose first row stays at one; the comparisons write the other two in
        # place, and one add counts all three: three ops for the step.
        rows = self._rows(upd.names, upd.delta)
        torch.gt(upd.delta, 0, out=rows.moved)
        if norms is not None and norms.names == upd.names:
            torch.gt(norms.per_tensor, 0, out=rows.graded)
        else:
            rows.graded.fill_(1.0)
        if rows.target is not None:
            rows.target.add_(rows.buf)  # every slot in order: a plain add, several times cheaper than index_add_
        else:
            self.counts.index_add_(1, rows.idx, rows.buf)

    def _rows(self, names: list[str], like: Tensor) -> _Rows:
        key = (tuple(names), like.device)
        rows = self._rows_cache
        if rows is None or rows.key != key or rows.counts is not self.counts:
            rows = self._rows_cache = _Rows(key, self.counts, self._slots, names, like.device)
        return rows

    # ----------------------------------------------------------------- check point
    def on_check(self, check: CheckContext) -> None:
        if not self.grads_decided and (self.warmup_steps >= self.warmup or (check.final and self.warmup_steps >= 2)):
            self._decide_grads()
        self._decide_frozen(check.values, converged=self._loss_converged(check))
        self._lr_zero = {}

    def _loss_converged(self, check: CheckContext) -> bool:
        """Whether the loss observed since the last check point sits at its floor (host numbers only)."""
        _, values, self.loss_seen = check.unread("loss", self.loss_seen)
        finite = values[np.isfinite(values)]
        if self.loss_start is None and finite.size:
            self.loss_start = float(np.median(finite[:10]))
        if values.size == 0 or finite.size < values.size:
            return False  # nothing observed, or NaN/Inf in the interval: not a converged loss
        level = float(np.median(values))
        start = self.loss_start
        return self.converged_fraction > 0 and start > 0 and 0 <= level <= self.converged_fraction * start

    def _remove_forward_hooks(self) -> None:
        for h in self._forward_handles:
            h.remove()
            if h in self._handles:
                self._handles.remove(h)
        self._forward_handles = []

    def _decide_grads(self) -> None:
        self.grads_decided = True
        self._remove_forward_hooks()
        steps = self.warmup_steps
        never = [n for n, (seen, none) in self.missing.items() if seen > 0 and none >= seen and n in self._params]
        if not never:
            return
        total = sum(p.numel() for p in self._params.values()) or 1
        if self._module_of:
            ran = [n for n in never if self._calls.get(id(self._module_of.get(n)), 0) > 0]
            groups = ((ran, "detached"), ([n for n in never if n not in ran], "unused"))
        else:  # no model to watch: the forward pass cannot be told apart
            groups = ((never, "no_gradient"),)
        for names, reason in groups:
            if not names:
                continue
            numel = sum(self._params[n].numel() for n in names)
            fraction = numel / total
            significant = reason != "unused" and fraction >= self.min_fraction
            what = {
                "detached": "their modules ran in the forward pass, so the graph is cut "
                "(detach, no_grad, a tensor rebuilt from data)",
                "unused": "their modules never ran in the forward pass",
                "no_gradient": "the loss does not reach them",
            }[reason]
            self.emit(
                "grads_missing",
                "warning" if significant else "info",
                f"{len(names)} optimizer parameter(s) ({fraction:.1%} of the trainable elements) got no gradient "
                f"in any of the first {steps} steps; {what}: {_short(names)}",
                causes=("params_not_updated",),
                confidence=0.85 if significant else 0.2,
                params=names[:_MAX_NAMED],
                count=len(names),
                numel=numel,
                fraction=fraction,
                steps=steps,
                reason=reason,
            )

    def _decide_frozen(self, v: dict[str, Any], converged: bool = False) -> None:
        sampled, moved, graded = np.asarray(v["counts"], dtype=np.float64).reshape(len(_COUNTS), -1)
        by_reason: dict[str, list[str]] = {}
        for j, n in enumerate(self._slots.names):
            if sampled[j] < self.min_samples or moved[j] > 0 or n in self.reported_frozen:
                continue
            p = self._params.get(n)
            if p is None or not p.requires_grad:
                continue
            if self._lr_zero.get(n, False):
                reason = "lr_zero"
            elif graded[j] < sampled[j]:
                continue  # no gradient on some sampled step: nothing asked it to move
            elif converged:
                continue  # a loss at its floor has gradients too small to move anything: done, not stuck
            elif p.dtype in _LOW_PRECISION:
                reason = "update_underflow"
            else:
                reason = "not_updated"
            by_reason.setdefault(reason, []).append(n)
        for reason, names in by_reason.items():
            self.reported_frozen += names
            numel = sum(self._params[n].numel() for n in names)
            texts = {
                "lr_zero": "their param group's learning rate is 0",
                "update_underflow": "the updates are below the float resolution of the low-precision weights",
                "not_updated": "they have gradients, yet the optimizer step leaves them unchanged",
            }
            self.emit(
                "weights_frozen",
                "warning",
                f"{len(names)} parameter(s) did not change over {int(sampled.max())} sampled steps; "
                f"{texts[reason]}: {_short(names)}",
                causes=("lr_too_low",) if reason == "update_underflow" else ("params_not_updated",),
                confidence=0.9 if reason == "lr_zero" else 0.7,
                params=names[:_MAX_NAMED],
                count=len(names),
                numel=numel,
                reason=reason,
                sampled_steps=int(sampled.max()),
            )

    # ----------------------------------------------------------------- state
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (before or after the Guard attaches)."""
        if self.guard is None:
            # Per-parameter states take their shapes from the model at attach.
            self._pending_state = dict(state)
            return
        super().load_state_dict(state)
        if self.grads_decided:
            self._remove_forward_hooks()  # the warm-up is over in the restored run


class _Rows:
    """What :meth:`StaleParams.on_after_step` writes a step's counts with, made once per list of names.

    ``buf`` is (3, parameters): row 0 stays at one (sampled), rows 1 and 2 (``moved``, ``graded``) are
    written in place each step. ``target`` is the matching slice of the counts when the names are all
    the slots in slot order (the usual case), else None and ``idx`` maps them to their slots.
    """

    __slots__ = ("buf", "counts", "graded", "idx", "key", "moved", "target")

    def __init__(
        self, key: tuple[Any, ...], counts: Tensor, slots: Slots, names: list[str], device: torch.device
    ) -> None:
        self.key = key
        self.counts = counts
        self.buf = torch.ones(len(_COUNTS), len(names), dtype=counts.dtype, device=device)
        self.moved, self.graded = self.buf[1], self.buf[2]
        self.idx = slots.index(names, device)
        in_order = list(names) == slots.names and counts.device == device
        self.target = counts[:, : len(names)] if in_order else None
