"""UpdateRatio: the size of each update next to the weights, |Δw|/|w|, per layer on sampled steps."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from .._modules import weight_names
from .._validate import check_float, check_int
from ..hook import Hook
from ..registry import register
from ..stats import CheckContext, StepContext

if TYPE_CHECKING:
    from ..guard import Guard

__all__ = ["UpdateRatio"]

# The LR counts as rising (a warm-up in progress) when it grew by more than this factor over the window.
_LR_RISE = 1.05
# Sampled steps enough to report large updates (tiny ones need a full window).
_MIN_HIGH = 3
# During warm-up, only updates this many times ``high`` are reported.
_EXTREME = 2.0


@register("update_ratio", default="monitor")
class UpdateRatio(Hook):
    """Measure ``|Δw| / |w|`` per weight from the updates the optimizer really applies.

    On each sampled step (step 1, then every ``every``-th optimizer step: 10, 20, ...) the hook asks
    the step's shared statistics for the update (:meth:`StepContext.request_update` before the step,
    :meth:`StepContext.update_norms` after it: a fixed sample of at most 4096 elements per tensor)
    and writes the ratio of every dim >= 2 weight of Linear, Conv, RNN and attention layers into a
    device buffer of the last ``window`` sampled steps. Biases, embeddings and norm layers are left
    out (biases often start at zero, where the ratio means nothing; a few rows of an embedding move
    per step). A weight that is exactly zero gives no ratio, nor does one whose gradient is exactly
    zero (dead units or a cut graph: no learning rate would move it, so it says nothing about the
    learning rate), nor does a non-finite update or weight.

    At each check point, once ``window`` samples are in, the host reads the buffer and takes the
    median over layers and steps:

    * ``update_ratio_low`` when the median is below ``low``: the updates are too small next to the
      weights to move them (the learning rate is too low). Not reported while the learning rate is
      still rising (an LR warm-up).
    * ``update_ratio_high`` when the median is above ``high``: each step changes the weights by a
      large part of their size (the learning rate is too high).

    Each is emitted when the run enters that state, and again only after it has left it. The
    ``update_ratio`` debug event carries the numbers at each decision.

    Healthy SGD and Adam runs sit around 1e-4 to 1e-2 (the rule of thumb is ~1e-3); the defaults,
    1e-5 and 1e-1, are the band DeepDiagnosis uses for its learning-rate check, 100x either side of
    1e-3. Adam's first steps move each weight by about ``lr`` whatever the gradient, so ratios are
    largest then (Adam's first step is exactly ``lr`` per element, ``lr / rms(w)`` as a ratio;
    later ones are 1-10x smaller), and an LR warm-up makes them smallest then. So samples of the
    first ``warmup`` steps never count towards ``update_ratio_low``, and towards
    ``update_ratio_high`` only when one sampled step's median is above ``2 * high``: an LR of 10
    moves a small MLP's weights by 30-50% of their size in its first steps and kills every ReLU
    within 10 steps;
    reporting those first steps names the learning rate before the run falls apart into dead
    units, NaN and, later, updates that are zero.

    Args:
        low: Report ``update_ratio_low`` when the median ratio is below this; > 0.
        high: Report ``update_ratio_high`` when the median ratio is above this; > ``low``.
        window: Sampled steps the median is taken over.
        warmup: Optimizer steps at the start whose samples count only for extreme updates.
        every: Sample one optimizer step in this many.
        name: Name used as the event source.

    Example:
        A learning rate of 1e-7 barely moves the weights:

        >>> import torch, stallguard as sg
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
        >>> opt = torch.optim.SGD(model.parameters(), lr=1e-7)
        >>> hook = sg.UpdateRatio(every=1, window=5, warmup=0)
        >>> guard = sg.Guard(model, opt, hooks=[hook], sinks=[], check_every=5)
        >>> for _ in range(5):
        ...     loss = model(torch.randn(16, 8)).pow(2).mean()
        ...     opt.zero_grad(); loss.backward(); opt.step()
        >>> [e.kind for e in guard.events if e.severity >= sg.Severity.WARNING]
        ['update_ratio_low']
        >>> guard.close()
    """

    def __init__(
        self,
        *,
        low: float = 1e-5,
        high: float = 1e-1,
        window: int = 10,
        warmup: int = 20,
        every: int = 10,
        name: str | None = None,
    ) -> None:
        owner = type(self).__name__
        warmup = check_int(owner, "warmup", warmup, min=0)
        super().__init__(every=every, name=name)
        self.low = check_float(owner, "low", low, min=0.0, min_open=True)
        self.high = check_float(owner, "high", high, min=0.0, min_open=True)
        if self.high <= self.low:
            raise ValueError(f"{owner}: high must be > low, got high={high!r}, low={low!r}")
        self.window = check_int(owner, "window", window, min=1)
        self.warmup = warmup
        # Host state: samples taken, their steps and learning rates, the current state, the layers.
        self.add_state("samples", 0)
        self.add_state("slot_steps", [0] * self.window)  # the step each row of the buffer holds
        self.add_state("sample_lrs", [])
        self.add_state("status", "ok")
        self.add_state("layers", [])
        self.add_state("last_median", None)
        self._column: dict[str, int] = {}
        self._select: dict[tuple[int, tuple[str, ...]], tuple[Tensor, Tensor, bool] | None] = {}
        self._slot = -1
        # The sampled row is still to be written (or cleared) by the clock optimizer's update.
        self._pending = False
        self._rows: list[Tensor] = []
        self._rows_of: Tensor | None = None

    # ----------------------------------------------------------------- lifecycle
    def is_due(self, step: int) -> bool:
        # Step 1 (the first update is the one a far too high LR makes largest), then the steps the other
        # sampled hooks take (10, 20, ...), so that the gradient norms and the update are measured once.
        return step == 1 or self.falls_on(step, self.every)

    def next_due(self, step: int) -> int | None:
        return step if step <= 1 else self.next_on(step, self.every)

    def on_attach(self, guard: Guard) -> None:
        if not self.layers:
            self.layers = weight_names(guard.module)
        self._column = {n: i for i, n in enumerate(self.layers)}
        # One row per sampled step, one column per weight; NaN where a weight gave no ratio.
        self.add_state("ratios", torch.full((self.window, len(self.layers)), math.nan), reduce="mean")

    def on_before_step(self, ctx: StepContext) -> None:
        if not self.layers:
            return
        ctx.request_update()
        ctx.grad_norms()  # shared with the gradient monitors; read before the step changes anything
        if ctx.is_clock:
            if self._pending:
                self._row(self._slot).fill_(math.nan)  # the last sample's update never came
            self._slot = self.samples % self.window
            self.samples += 1
            self.slot_steps[self._slot] = ctx.step
            self.sample_lrs = [*self.sample_lrs[-(self.window - 1) :], _max_lr(ctx.optimizer)][-self.window :]
            # The row is cleared with the update's write, and only where that write leaves columns out.
            self._pending = True

    def on_after_step(self, ctx: StepContext) -> None:
        if self._slot < 0:
            return
        row = self._row(self._slot)
        update = ctx.update_norms()
        select = None if update is None else self._selection(ctx.optimizer_index, update.names, update.delta.device)
        if self._pending and ctx.is_clock:
            self._pending = False
            if select is None or not select[2]:
                row.fill_(math.nan)
        if update is None or select is None:
            return
        rows, cols, _ = select
        weight = update.weight
        grads = ctx.grad_norms()
        if grads is not None and grads.names == update.names:
            # A weight whose gradient is exactly zero (dead units, a cut graph) says nothing about the
            # learning rate: no learning rate moves it. Dividing by a zero weight leaves it no ratio.
            weight = weight * (grads.per_tensor != 0)
        ratio = update.delta / weight
        # Zero weights give no ratio, nor do non-finite updates or weights: a NaN says where the arithmetic
        # broke (the nonfinite check's business), not how large the steps were. x * 0 + x is x when x is
        # finite and NaN otherwise (x / 0 is inf or NaN): two ops where isfinite and where take six.
        ratio = ratio.mul(0).add_(ratio).index_select(0, rows)
        row.index_copy_(0, cols, ratio.to(row.device, row.dtype, non_blocking=True))

    def on_check(self, check: CheckContext) -> None:
        filled = min(self.samples, self.window)
        if filled == 0 or "ratios" not in check.values:
            return
        table = np.asarray(check.values["ratios"], dtype=np.float64).reshape(self.window, -1)
        if self._pending:
            table = table.copy()
            table[self._slot] = math.nan  # sampled, but its update never came
        table = table[:filled]
        steps_of = np.asarray(self.slot_steps[:filled])
        late = steps_of > self.warmup
        status, rows, median = "ok", late, math.nan
        if late.sum() >= min(self.window, _MIN_HIGH):
            median = _median(table[late])
            if median > self.high:
                status = "high"
            elif median < self.low and late.sum() >= self.window and not self._warming_up():
                status = "low"
        if status != "high" and (~late).any():
            # Warm-up samples count for extreme updates only: one sampled step whose typical weight moved
            # by 2 * high is one too many (a high LR can kill a net within its first ten steps, after
            # which its updates are zero and dilute a median over the warm-up).
            per_step = [_median(row) for row in table[~late]]
            early = max((m for m in per_step if not math.isnan(m)), default=math.nan)
            if early > _EXTREME * self.high:
                status, rows, median = "high", ~late, early
        if not late.any() and status != "high":
            return
        if math.isnan(median):
            return
        per_layer: dict[str, float] = {}
        for j, name in enumerate(self.layers):
            col = table[rows, j]
            col = col[~np.isnan(col)]
            if col.size:
                per_layer[name] = float(np.median(col))
        self.last_median = median
        used = steps_of[rows]
        steps = [int(used.min()), int(used.max())]
        lrs = [lr for lr in self.sample_lrs if lr is not None]
        common: dict[str, Any] = {
            "median_ratio": median,
            "window": int(rows.sum()),
            "steps": steps,
            "layer_ratios": per_layer,
        }
        self.emit("update_ratio", "debug", f"median |dw|/|w| {median:.3g} over steps {steps[0]}-{steps[1]}", **common)
        previous, self.status = self.status, status
        if status == previous or status == "ok":
            return
        if status == "low":
            layers = [n for n, r in per_layer.items() if r < self.low]
            self.emit(
                "update_ratio_low",
                "warning",
                f"updates are tiny next to the weights: median |dw|/|w| {median:.2g} over {common['window']} sampled "
                f"steps (below {self.low:g}; ~1e-3 is typical)",
                causes=("lr_too_low",),
                layers=layers,
                low=self.low,
                lr=lrs[-1] if lrs else None,
                **common,
            )
        else:
            layers = [n for n, r in per_layer.items() if r > self.high]
            self.emit(
                "update_ratio_high",
                "warning",
                f"updates are large next to the weights: median |dw|/|w| {median:.2g} over {common['window']} sampled "
                f"steps (above {self.high:g}; ~1e-3 is typical)",
                causes=("lr_too_high",),
                max_ratio=max(per_layer.values()),
                layers=layers,
                high=self.high,
                lr=lrs[-1] if lrs else None,
                **common,
            )

    # ----------------------------------------------------------------- state
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (the same weights must be watched)."""
        owner = type(self).__name__
        if "layers" in state and self._column and list(state["layers"]) != self.layers:
            raise ValueError(f"{owner}.load_state_dict: the saved weights {state['layers']} differ from {self.layers}")
        super().load_state_dict(state)

    # ----------------------------------------------------------------- config
    def get_config(self) -> dict[str, Any]:
        # Only this hook's own arguments: start_step is not one (samples are step 1 and every multiple of every).
        config = super().get_config()
        return {k: v for k, v in config.items() if k != "start_step"}

    # ----------------------------------------------------------------- internals
    def _warming_up(self) -> bool:
        # The learning rate still rising over the window is a warm-up schedule at work.
        lrs = [lr for lr in self.sample_lrs if lr is not None]
        return len(lrs) >= 2 and lrs[-1] > _LR_RISE * lrs[0]

    def _row(self, slot: int) -> Tensor:
        # Views made once: indexing the buffer on every sampled step would be an op each time.
        if self._rows_of is not self.ratios:
            self._rows = list(self.ratios.unbind(0))
            self._rows_of = self.ratios
        return self._rows[slot]

    def _selection(
        self, optimizer_index: int, names: list[str], device: torch.device
    ) -> tuple[Tensor, Tensor, bool] | None:
        """Entries of ``names`` that are watched, their columns, and whether they fill every column."""
        key = (optimizer_index, tuple(names))
        if key not in self._select:
            rows = [i for i, n in enumerate(names) if n in self._column]
            if not rows:
                self._select[key] = None
            else:
                cols = [self._column[names[i]] for i in rows]
                # Built once per optimizer and parameter list: a host-to-device copy each.
                self._select[key] = (
                    torch.tensor(rows, device=device),
                    torch.tensor(cols, device=self.ratios.device),
                    len(set(cols)) == len(self.layers),
                )
        return self._select[key]


def _median(values: np.ndarray) -> float:
    seen = values[~np.isnan(values)]
    return float(np.median(seen)) if seen.size else math.nan


def _max_lr(optimizer: torch.optim.Optimizer | None) -> float | None:
    """The largest learning rate of the optimizer's param groups, if it is a host number."""
    if optimizer is None:
        return None
    found: list[float] = []
    for group in optimizer.param_groups:
        lr = group.get("lr")
        if isinstance(lr, (int, float)):
            found.append(float(lr))
        elif isinstance(lr, Tensor) and lr.device.type == "cpu" and lr.numel() == 1:
            found.append(float(lr))  # a CPU tensor: reading it does not wait for an accelerator
    return max(found) if found else None
