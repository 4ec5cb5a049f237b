"""NonFinite: where and when the first NaN/Inf of a run appeared (inputs, parameters, loss or gradients)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .._modules import Slots
from .._validate import check_int, check_type
from ..hook import Hook
from ..registry import register
from ..stats import CheckContext, Observation, StepContext, is_nonfinite

__all__ = ["NonFinite"]

#: Sources in causal order within one step: what feeds the forward pass comes first.
WHERE = ("inputs", "parameters", "loss", "gradients")
_INPUTS, _PARAMS, _LOSS, _GRADS = range(len(WHERE))


@register("nonfinite", default="monitor")
class NonFinite(Hook):
    """Find the first NaN/Inf of the run: in the inputs, the parameters, the loss or the gradients.

    Nothing runs on most steps. The loss costs nothing: the Guard keeps every observed loss, and at
    the check point this hook looks for the first non-finite one, so a NaN loss is named with its
    exact step. Every ``grad_every`` steps it tests the gradients, through the step's shared
    per-parameter norms (a non-finite gradient has a non-finite norm, so no second pass over the
    gradients), and the floating-point ``inputs`` given to ``guard.observe`` (``isfinite``); every
    ``param_every`` steps the parameters, through the shared weight norms. The gradients default to
    every 10th step, the cadence of :class:`~stallguard.GradNormMonitor`, so that they share one norm
    pass; the weights to every 50th, with :class:`~stallguard.Regularization` (a NaN weight makes the
    loss NaN at once, which is seen anyway). Each tested source keeps, on the device,
    the first step it went bad (``torch.where`` on the step number), and the gradients and
    parameters also keep which tensor. At a check point the host reads those few numbers and, the
    first time anything is non-finite, emits one ``nonfinite`` event naming the origin: the
    earliest step, and within a step the earliest source in causal order (inputs, parameters, loss,
    gradients), with the first layer in model order.

    Division of work with the other hooks: this hook reports the origin, once per run, and never
    changes training. :class:`~stallguard.GradNormMonitor` reports, per check interval, how many steps
    had non-finite gradients (``nonfinite_gradients``). :class:`~stallguard.GradientClipper` (with
    ``repair=True``) skips or zeroes such steps and reports that (``nonfinite_skipped``). All three
    read the same shared gradient norms of the step.

    Args:
        grad_every: Test the gradients and the inputs every this many steps (0: never). A NaN gradient between two
            tested steps is reported at the next tested step (the NaN loss or weights it causes are
            usually seen first); 1 names the exact step and layer at the cost of a norm pass per step.
        param_every: Test the parameters every this many steps (0: never). A NaN written into a weight
            between two tested steps is reported at the next tested step; the loss it causes is seen
            at once.
        check_inputs: Test floating-point ``inputs`` given to ``observe`` (one pass over the batch).
        **kwargs: ``every``, ``start_step``, ``name`` (see :class:`~stallguard.Hook`).

    Example:
        >>> import torch, stallguard as sg
        >>> model = torch.nn.Linear(3, 1)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> guard = sg.Guard(model, opt, hooks=[sg.NonFinite()], sinks=[], check_every=4)
        >>> for step in range(4):
        ...     x = torch.rand(8, 3) * (step < 2)  # all-zero inputs from the third step: log(0)
        ...     loss = -torch.log(model(x).sigmoid().mean() * x.mean())
        ...     opt.zero_grad(); loss.backward(); guard.observe(loss); opt.step()
        >>> e = guard.events[0]
        >>> e.kind, e.data["where"], e.data["first_step"]
        ('nonfinite', 'loss', 3)
        >>> guard.close()
    """

    def __init__(self, grad_every: int = 10, param_every: int = 50, check_inputs: bool = True, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        owner = type(self).__name__
        self.grad_every = check_int(owner, "grad_every", grad_every, min=0)
        self.param_every = check_int(owner, "param_every", param_every, min=0)
        self.check_inputs = check_type(owner, "check_inputs", check_inputs, bool, "a bool")
        self.add_state("reported", False)
        self.add_state("interval_start", 0)
        self.add_state("losses_seen", 0)  # observed losses already looked at
        self._slots = Slots()
        self._pending_state: dict[str, Any] | None = None
        self._pending: list[Tensor | None] = [None] * len(WHERE)  # this step's observed flags
        self._pending_step: int | None = None
        self._false: Tensor | None = None

    def on_attach(self, guard: Any) -> None:
        names: list[str] = []
        if guard.module is not None:
            names = [n for n, _ in guard.module.named_parameters()]
        for i in range(len(guard.optimizers)):
            names += [n for n in guard.optimizer_parameters(i)[1] if n not in names]
        self._slots = Slots(names)
        n_slots = len(self._slots)  # the last slot: parameters that joined after attach
        # Steps since the interval began (exact in float32); inf = never.
        self.add_state("first", torch.full((len(WHERE),), math.inf), reduce="min", reset=True)
        # Row 0: gradients, row 1: parameters; one column per parameter, in model order.
        self.add_state("layer_first", torch.full((2, n_slots), math.inf), reduce="min", reset=True)
        if self._pending_state is not None:
            state, self._pending_state = self._pending_state, None
            super().load_state_dict(state)
        else:
            self.interval_start = guard.step

    # ----------------------------------------------------------------- per step: device ops only
    def _offset(self, step: int) -> float:
        return float(step - self.interval_start)

    def _flush(self, step: int, row: list[Tensor | None]) -> None:
        """Fold one step's four flags into ``first`` with one stack, one where and one minimum."""
        false = self._false
        if false is None or false.device != self.first.device:
            false = self._false = torch.zeros((), dtype=torch.bool, device=self.first.device)
        bad = torch.stack([false if f is None else f for f in row])
        torch.minimum(self.first, torch.where(bad, self._offset(step), math.inf), out=self.first)

    @torch.no_grad()
    def on_observe(self, obs: Observation) -> None:
        if self.reported:
            return
        step = obs.step + 1  # the batch of the step under way
        x = obs.inputs
        # The loss needs nothing here: the Guard keeps every observed loss, read at the check point.
        if not (self.check_inputs and isinstance(x, Tensor) and (x.is_floating_point() or x.is_complex())):
            return
        if not self.falls_on(step, self.grad_every):
            return
        if self._pending_step is not None and self._pending_step != step:
            self._flush(self._pending_step, self._pending)
            self._pending = [None] * len(WHERE)
        self._pending_step = step
        self._add(_INPUTS, _any_nonfinite(x).to(self.first.device))

    def is_due(self, step: int) -> bool:
        # Only the tested steps call in: observe() sees the step before the one under way, hence step + 1.
        return any(self.falls_on(s, e) for s in (step, step + 1) for e in (self.grad_every, self.param_every))

    def next_due(self, step: int) -> int | None:
        firsts = [
            s - lag
            for e in (self.grad_every, self.param_every)
            for lag in (0, 1)
            if (s := self.next_on(step + lag, e)) is not None
        ]
        return min(firsts, default=None)

    def _add(self, where: int, bad: Tensor) -> None:
        prev = self._pending[where]
        self._pending[where] = bad if prev is None else prev | bad  # several observe calls (accumulation)

    @torch.no_grad()
    def on_before_step(self, ctx: StepContext) -> None:
        if self.reported:
            return
        step = ctx.step
        row = self._pending if self._pending_step == step else [None] * len(WHERE)
        if self._pending_step is not None and self._pending_step != step:
            self._flush(self._pending_step, self._pending)
        self._pending, self._pending_step = [None] * len(WHERE), None
        test_grads = self.falls_on(step, self.grad_every)
        test_params = self.falls_on(step, self.param_every)
        norms = ctx.grad_norms() if test_grads else None
        if norms is not None or test_params:
            # Row 0: gradients, row 1: parameters, one column per tensor of the step (aligned names).
            names = norms.names if norms is not None else ctx.grad_names
            pbad = is_nonfinite(ctx.param_norms()) if test_params else None
            if norms is not None:
                gbad = is_nonfinite(norms.per_tensor)
                row[_GRADS] = ~norms.finite
                found = getattr(ctx.optimizer, "found_inf", None)
                if isinstance(found, Tensor):
                    # A GradScaler overflow with a fused optimizer: the step is skipped on purpose, not a NaN bug.
                    ok = found.detach().to(gbad.device).reshape(()) <= 0
                    gbad, row[_GRADS] = gbad & ok, row[_GRADS] & ok
            else:
                gbad = torch.zeros_like(pbad)
            if pbad is not None:
                row[_PARAMS] = pbad.any()
            else:
                pbad = torch.zeros_like(gbad)
            if len(names):
                idx = self._slots.index(names, gbad.device)
                when = torch.where(torch.stack([gbad, pbad]), self._offset(step), math.inf)
                self.layer_first.scatter_reduce_(1, idx.expand(2, -1), when, "amin")
        if any(f is not None for f in row):
            self._flush(step, row)

    # ----------------------------------------------------------------- check point
    def on_check(self, check: CheckContext) -> None:
        v = check.values
        start, self.interval_start = self.interval_start, check.step
        if self.reported:
            return
        first = np.array(v["first"], dtype=np.float64).reshape(-1)
        loss_step = self._first_bad_loss(check)
        if loss_step is not None:
            first[_LOSS] = min(first[_LOSS], loss_step - start)
        if not np.isfinite(first).any():
            return
        earliest = float(first.min())
        origin = int(np.flatnonzero(first == earliest)[0])  # causal order breaks ties
        layer = None
        if origin in (_GRADS, _PARAMS):
            rows = np.asarray(v["layer_first"], dtype=np.float64).reshape(2, -1)
            per = rows[0 if origin == _GRADS else 1]
            names = self._slots.labels
            hits = np.flatnonzero(per == earliest)  # none when only the total norm overflowed
            layer = names[int(hits[0])] if len(hits) else None  # slots are in model order
        first_step = int(start + earliest)
        seen = {WHERE[k]: int(start + first[k]) for k in range(len(WHERE)) if math.isfinite(first[k])}
        self.reported = True
        where = WHERE[origin]
        self.emit(
            "nonfinite",
            "error",
            f"first NaN/Inf of the run: {where} at step {first_step}"
            + (f", in {layer}" if layer else "")
            + (
                f" (also: {', '.join(f'{k} at step {s}' for k, s in seen.items() if k != where)})"
                if len(seen) > 1
                else ""
            ),
            causes=("non_finite",),
            confidence=0.95,
            where=where,
            first_step=first_step,
            layer=layer,
            sources=seen,
        )

    def _first_bad_loss(self, check: CheckContext) -> int | None:
        """The step of the first non-finite loss observed since the last check point, from the Guard's series."""
        steps, values, self.losses_seen = check.unread("loss", self.losses_seen)
        bad = np.flatnonzero(~np.isfinite(values))
        return int(steps[bad[0]]) + 1 if len(bad) else None  # the loss of the step under way

    # ----------------------------------------------------------------- state
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (before or after the Guard attaches)."""
        if self.guard is None:
            # Per-layer states take their shapes from the model at attach.
            self._pending_state = dict(state)
            return
        super().load_state_dict(state)


def _any_nonfinite(x: Tensor) -> Tensor:
    """Whether ``x`` holds a NaN or an infinity: a 0-d bool tensor, in three ops whatever the size.

    A NaN or infinity anywhere makes the float64 sum non-finite, and ``sum * 0`` is then NaN, not 0;
    float32 or half values cannot overflow a float64 sum. ``isfinite(x).all()`` costs seven ops.
    """
    if x.is_complex() or x.dtype == torch.float64:
        return ~torch.isfinite(x).all()  # exact where a float64 sum could overflow
    return x.sum(dtype=torch.float64).mul(0).ne(0)
