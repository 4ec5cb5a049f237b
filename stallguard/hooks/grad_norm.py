"""GradNormMonitor: global and per-layer gradient norms; vanishing, exploding and non-finite gradients."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .._modules import Slots
from .._validate import check_float, check_int, check_norm_type, check_type
from ..hook import Hook
from ..registry import register
from ..stats import CheckContext, StepContext, host_median, is_nonfinite

__all__ = ["GradNormMonitor"]

# How many parameter names an event lists at most (the counts cover all of them).
_MAX_NAMED = 10

# Sampled norms needed for a median that the loss-corroborated rules compare with (a median of three).
_MIN_SAMPLES = 3

# Columns of the per-optimizer counter row (rows folded on the device; the host adds the rest).
_COUNTERS = ("nonfinite_steps", "kernel_steps", "vanish_steps", "first_kernel_sum", "last_kernel_sum", "floor_steps")
_NONFINITE, _KERNEL, _VANISH, _FIRST, _LAST, _FLOOR = range(len(_COUNTERS))

# A per-slot column of a row that this step did not write (norms are >= 0, NaN or inf, never -1).
_ABSENT = -1.0
# The columns after the per-slot ones: the global norm, the GradScaler's found_inf, and two flags
# written only when the global norm is not float32 (NaN: derive them from the float32 total).
_EXTRA = ("total", "skip", "finite", "floor")


@dataclass(frozen=True)
class _Layout:
    """Where this step's per-tensor norms go: a column of the step's row per parameter."""

    index: Tensor  # slot (column) of each entry of GradNorms.per_tensor
    # Parameters that joined after attach share the last slot: one column cannot hold several, so
    # those entries (when there are two or more) are accumulated on the device instead.
    main_pos: Tensor | None = None  # entries with a column of their own, and their columns
    main_index: Tensor | None = None
    late_pos: Tensor | None = None  # entries sharing the late slot
    late_index: Tensor | None = None


@dataclass(frozen=True)
class _RowViews:
    """Views of one row of the per-interval buffer, made once so that a write is one op, not three."""

    per: Tensor  # the per-slot columns
    total: Tensor  # 0-d
    skip: Tensor  # shape (1,)
    finite: Tensor  # 0-d
    floor: Tensor  # 0-d


@register("grad_norm", default="monitor", every=10)
class GradNormMonitor(Hook):
    """Watch global and per-layer gradient norms for vanishing, exploding and non-finite gradients.

    Every optimizer step it reads the step's shared gradient norms (``ctx.grad_norms``, one foreach
    pass for all hooks; the global norm equals ``torch.nn.utils.get_total_norm``) and copies them
    into one row of a per-interval device buffer; nothing is read to the host until a check point,
    where the host reduces the rows. Steps that a GradScaler skips
    are never counted: without a fused optimizer they never reach the step hooks, and with one the
    scaler's ``found_inf`` marks them.

    At each check point, per optimizer:

    * ``vanishing_gradients``: on at least ``persistence`` of the interval's steps, the gradient norm
      of the first kernel (the first parameter with two or more dimensions, in ``named_parameters()``
      order) was below ``vanishing_ratio`` times that of the last kernel *and* below
      ``vanishing_norm`` (AutoTrainer's rule); or, with ``min_norm`` set, the global norm was below
      ``min_norm`` on that share of steps.
    * ``exploding_gradients``: the median global norm of the interval exceeds ``growth_factor`` times
      the median of the previous ``window`` steps (a sustained jump, not a single noisy batch), or its
      largest norm does while its median exceeds ``sqrt(growth_factor)`` times (spikes on a run
      whose gradients have risen as a whole); or, with ``max_norm`` set, some step's global norm
      exceeded it. Two more forms read the loss that ``guard.observe(loss)`` reports on every step
      (the Guard keeps it on the host, so they cost nothing per step) and so see what happens
      between sampled steps: ``surge``, the median norm *and* the median loss both rose
      ``surge_factor`` times over their recent medians, to a loss above the run's starting level;
      and ``spikes``, batches whose loss is ``loss_spike`` times the recent median loss (and above
      the starting level) got gradient norms ``spike_ratio`` times those of ordinary batches, read
      on the sampled steps that fell on such batches.
    * ``nonfinite_gradients``: some step had NaN or Inf gradients; names the parameters that were
      non-finite first.

    Args:
        norm_type: The p of the p-norm (``math.inf`` for the max norm).
        per_layer: Keep per-parameter mean and max norms and put them in the events' data. The
            vanishing rule and the naming of non-finite parameters work either way.
        vanishing_ratio: First-to-last kernel norm ratio below which a step counts as vanishing.
        vanishing_norm: First-kernel norm below which a step counts as vanishing (both must hold).
        min_norm: Optional absolute floor for the global norm; None turns this rule off.
        persistence: Share of an interval's steps on which a vanishing rule must hold.
        growth_factor: How many times the baseline median the interval's median must exceed.
        window: How many past steps form the baseline.
        min_history: Steps of baseline needed before the exploding rule can fire.
        max_norm: Optional absolute ceiling for the global norm; None turns this rule off.
        surge_factor: How many times their recent medians the interval's median norm and median
            loss must both reach for the ``surge`` form.
        loss_spike: How many times the recent median loss a batch's loss must reach (and exceed the
            run's starting level) to count as a loss spike.
        spike_ratio: How many times the median norm of ordinary batches (loss at or below the recent
            median) the median norm of sampled loss spikes must reach for the ``spikes`` form.
        **kwargs: ``every``, ``start_step``, ``name`` (see :class:`~stallguard.Hook`).

    Example:
        A 20-layer sigmoid network: the first layers get almost no gradient.

        >>> import torch, stallguard as sg
        >>> _ = torch.manual_seed(0)
        >>> layers = [torch.nn.Linear(16, 32), torch.nn.Sigmoid()]
        >>> for _ in range(18):
        ...     layers += [torch.nn.Linear(32, 32), torch.nn.Sigmoid()]
        >>> model = torch.nn.Sequential(*layers, torch.nn.Linear(32, 4))
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> x, y = torch.randn(64, 16), torch.randint(0, 4, (64,))
        >>> guard = sg.Guard(model, opt, hooks=[sg.GradNormMonitor()], sinks=[], check_every=10)
        >>> for _ in range(10):
        ...     loss = torch.nn.functional.cross_entropy(model(x), y)
        ...     opt.zero_grad(); loss.backward(); opt.step()
        >>> [e.kind for e in guard.events]
        ['vanishing_gradients']
        >>> guard.close()
    """

    def __init__(
        self,
        norm_type: float = 2.0,
        per_layer: bool = True,
        *,
        vanishing_ratio: float = 1e-3,
        vanishing_norm: float = 1e-4,
        min_norm: float | None = None,
        persistence: float = 0.5,
        growth_factor: float = 100.0,
        window: int = 500,
        min_history: int = 20,
        max_norm: float | None = None,
        surge_factor: float = 5.0,
        loss_spike: float = 10.0,
        spike_ratio: float = 3.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        owner = type(self).__name__
        self.norm_type = check_norm_type(owner, "norm_type", norm_type)
        self.per_layer = check_type(owner, "per_layer", per_layer, bool, "a bool")
        self.vanishing_ratio = check_float(owner, "vanishing_ratio", vanishing_ratio, min=0.0, min_open=True)
        self.vanishing_norm = check_float(owner, "vanishing_norm", vanishing_norm, min=0.0, min_open=True)
        self.min_norm = None if min_norm is None else check_float(owner, "min_norm", min_norm, min=0.0, min_open=True)
        self.persistence = check_float(owner, "persistence", persistence, min=0.0, max=1.0, min_open=True)
        self.growth_factor = check_float(owner, "growth_factor", growth_factor, min=1.0, min_open=True)
        self.window = check_int(owner, "window", window, min=1)
        self.min_history = check_int(owner, "min_history", min_history, min=1)
        if self.min_history > self.window:
            raise ValueError(f"{owner}: min_history must be <= window ({self.window}), got {min_history!r}")
        self.max_norm = None if max_norm is None else check_float(owner, "max_norm", max_norm, min=0.0, min_open=True)
        self.surge_factor = check_float(owner, "surge_factor", surge_factor, min=1.0, min_open=True)
        self.loss_spike = check_float(owner, "loss_spike", loss_spike, min=1.0, min_open=True)
        self.spike_ratio = check_float(owner, "spike_ratio", spike_ratio, min=1.0, min_open=True)
        # Host state: the baseline of recent finite global norms and where each ring write goes.
        self.add_state("baseline", [])
        self.add_state("ring_pos", [])
        # The loss observed before each sampled step (paired with the baseline norms), the steps sampled
        # in this interval, the recent losses, the run's starting loss level and how much of the loss
        # stream has been read.
        self.add_state("baseline_loss", [])
        self.add_state("sampled_steps", [])
        self.add_state("loss_baseline", [])
        self.add_state("loss_start", None)
        self.add_state("loss_seen", 0)
        self.add_state("interval_start", 0)
        self.add_state("total_nonfinite", [])
        # Per row of this interval: the optimizer step it was taken on (counted from interval_start)
        # and its place in the order of all optimizers' rows (per-slot sums add in that order).
        self.add_state("row_offsets", [])
        self.add_state("row_seq", [])
        # Whether this interval's device states hold anything, and whether rows carry flags or found_inf.
        self.add_state("folded", False)
        self.add_state("flagged", False)
        self.add_state("scaled", False)
        self._views: list[list[_RowViews]] = []
        self._views_of: Tensor | None = None
        self._default_row: Tensor | None = None
        self._pending_state: dict[str, Any] | None = None
        self._slots = Slots()
        self._kernels: list[tuple[str | None, str | None]] = []
        self._layouts: dict[tuple[int, tuple[str, ...]], _Layout] = {}

    # ----------------------------------------------------------------- attach: slots and states
    def on_attach(self, guard: Any) -> None:
        n_opt = max(len(guard.optimizers), 1)
        slots, dims, owners = self._parameters(guard)
        self._slots = Slots(slots)
        self._slot_owners = [owners[n] for n in slots]
        # Parameters that join an optimizer after attach share one extra slot.
        n_slots = len(self._slots)
        self._kernels = []
        for i in range(n_opt):
            kernels = [n for n in slots if dims[n] >= 2 and i in owners[n]]
            self._kernels.append((kernels[0], kernels[-1]) if len(kernels) >= 2 else (None, None))
        ring = max(guard.check_every, 1)
        # One row per sampled step: the per-slot norms, the global norm, found_inf and two flags. A step
        # costs one or two copies; the host reduces the rows at the check point. Every rank sees the
        # same norms (and writes the same columns), so "max" is the identity across ranks.
        default = torch.cat([torch.full((n_slots,), _ABSENT), torch.tensor([math.nan, 0.0, math.nan, math.nan])])
        self.add_state("rows", default.expand(n_opt, ring, -1).clone(), reduce="max", reset=True)
        self._default_row = default.to(self.rows.device)
        self._views_of = None
        # Rows overwritten within an interval (an optimizer stepping more than check_every times) and
        # entries sharing the late slot are accumulated here on the device, as the host would.
        self.add_state("counters", torch.zeros(n_opt, len(_COUNTERS)), reduce="max", reset=True)
        self.add_state("param_nonfinite", torch.zeros(n_slots), reduce="max", reset=True)
        # Steps since the interval began (small numbers stay exact in float32); inf = never.
        self.add_state("param_first_nonfinite", torch.full((n_slots,), math.inf), reduce="min", reset=True)
        if self.per_layer:
            self.add_state("layer_sum", torch.zeros(n_slots), reduce="max", reset=True)
            self.add_state("layer_max", torch.zeros(n_slots), reduce="max", reset=True)
            self.add_state("layer_count", torch.zeros(n_slots), reduce="max", reset=True)
        if not self.baseline:
            self.baseline = [[] for _ in range(n_opt)]
            self.baseline_loss = [[] for _ in range(n_opt)]
            self.sampled_steps = [[] for _ in range(n_opt)]
            self.row_offsets = [[] for _ in range(n_opt)]
            self.row_seq = [[] for _ in range(n_opt)]
            self.ring_pos = [0] * n_opt
            self.total_nonfinite = [0] * n_opt
            self.interval_start = guard.step
        if self._pending_state is not None:
            state, self._pending_state = self._pending_state, None
            super().load_state_dict(state)

    @staticmethod
    def _parameters(guard: Any) -> tuple[list[str], dict[str, int], dict[str, set[int]]]:
        """Parameter names in model order (then optimizer-only ones), their dims, and their optimizers."""
        names: list[str] = []
        dims: dict[str, int] = {}
        owners: dict[str, set[int]] = {}

        def add(name: str, p: Tensor, owner: int) -> None:
            if name not in dims:
                names.append(name)
                dims[name] = p.dim()
                owners[name] = set()
            owners[name].add(owner)

        if guard.optimizers:
            by_id: dict[int, tuple[str, Tensor, set[int]]] = {}
            for i in range(len(guard.optimizers)):
                params, pnames = guard.optimizer_parameters(i)
                for p, n in zip(params, pnames):
                    by_id.setdefault(id(p), (n, p, set()))[2].add(i)
            if guard.module is not None:
                for _, p in guard.module.named_parameters():
                    if id(p) in by_id:
                        n, q, opts = by_id.pop(id(p))
                        for i in opts:
                            add(n, q, i)
            for n, q, opts in by_id.values():
                for i in opts:
                    add(n, q, i)
        elif guard.module is not None:
            for n, p in guard.module.named_parameters():
                add(n, p, 0)
        return names, dims, owners

    def _layout(self, index: int, names: list[str], device: torch.device) -> _Layout:
        key = (index, tuple(names))
        layout = self._layouts.get(key)
        if layout is None:
            # Built once per parameter set: host-to-device copies, never on every step.
            slots = [self._slots.of(n) for n in names]
            late = len(self._slots) - 1
            if slots.count(late) < 2:
                layout = _Layout(torch.tensor(slots, dtype=torch.long, device=device))
            else:
                main = [k for k, j in enumerate(slots) if j != late]
                shared = [k for k, j in enumerate(slots) if j == late]

                def as_index(values: list[int]) -> Tensor:
                    return torch.tensor(values, dtype=torch.long, device=device)

                layout = _Layout(
                    as_index(slots),
                    main_pos=as_index(main),
                    main_index=as_index([slots[k] for k in main]),
                    late_pos=as_index(shared),
                    late_index=as_index([late] * len(shared)),
                )
            self._layouts[key] = layout
        return layout

    def _row(self, i: int, k: int) -> _RowViews:
        rows = self.rows
        if self._views_of is not rows:
            n = rows.shape[2] - len(_EXTRA)
            self._views = [
                [_RowViews(r[:n], r[n], r[n + 1 : n + 2], r[n + 2], r[n + 3]) for r in rows[j].unbind(0)]
                for j in range(rows.shape[0])
            ]
            self._views_of = rows
        return self._views[i][k]

    # ----------------------------------------------------------------- per step: device ops only
    @torch.no_grad()
    def on_before_step(self, ctx: StepContext) -> None:
        norms = ctx.grad_norms(self.norm_type)
        if norms is None:
            return
        i = ctx.optimizer_index
        per, total = norms.per_tensor, norms.total
        layout = self._layout(i, norms.names, per.device)
        ring = self.rows.shape[1]
        pos = self.ring_pos[i]
        row = self._row(i, pos % ring)
        if pos >= ring:
            # The row still holds a step of this interval: fold it into the device counters first.
            self._fold(i, pos % ring, self.row_offsets[i][-ring])
        self.ring_pos[i] = pos + 1
        # A host int: the loss observed before this step (the batch whose gradients these are, when the
        # loop calls observe() before step()) is kept under the steps completed then.
        self.sampled_steps[i].append(ctx.step - 1)
        offset = ctx.optimizer_step - self.interval_start
        self.row_offsets[i].append(offset)
        self.row_seq[i].append(sum(self.ring_pos))

        row.total.copy_(total)
        if total.dtype != torch.float32:
            self.flagged = True
            # The float32 copy of the total could round across a limit: keep the flags computed exactly.
            row.finite.copy_(norms.finite)
            if self.min_norm is not None:
                row.floor.copy_(total < self.min_norm)
        found = getattr(ctx.optimizer, "found_inf", None)
        if isinstance(found, Tensor):
            self.scaled = True
            row.skip.copy_(found.detach().reshape(-1)[:1])
        if layout.late_pos is None:
            row.per.index_copy_(0, layout.index, per)
            return
        assert layout.main_pos is not None and layout.main_index is not None and layout.late_index is not None
        row.per.index_copy_(0, layout.main_index, per.index_select(0, layout.main_pos))
        skipped = _scaler_skipped(ctx, per.device)
        valid = norms.finite if skipped is None else norms.finite & ~skipped
        self._accumulate(per.index_select(0, layout.late_pos), layout.late_index, valid, skipped, offset)

    def _accumulate(
        self,
        per: Tensor,
        index: Tensor,
        valid: Tensor,
        skipped: Tensor | None,
        offset: float,
        present: Tensor | None = None,
    ) -> None:
        """Add per-tensor norms into the per-slot device states (what the host does with a row's columns)."""
        self.folded = True
        bad_param = is_nonfinite(per)
        if skipped is not None:
            bad_param = bad_param & ~skipped
        if present is not None:
            bad_param = bad_param & present
            valid = valid & present
        self.param_nonfinite.index_add_(0, index, bad_param.float())
        when = torch.where(bad_param, float(offset), math.inf)
        self.param_first_nonfinite.scatter_reduce_(0, index, when, "amin")
        if self.per_layer:
            kept = torch.where(valid, per, 0.0)
            self.layer_sum.index_add_(0, index, kept)
            self.layer_max.scatter_reduce_(0, index, kept, "amax")
            self.layer_count.index_add_(0, index, valid.float().expand_as(per))

    def _fold(self, i: int, k: int, offset: float) -> None:
        """Fold row ``k`` of optimizer ``i`` into the device counters and clear it (device ops, no read)."""
        row = self.rows[i, k]
        n = row.shape[0] - len(_EXTRA)
        per, total, skip, finite_flag, floor_flag = row[:n], row[n], row[n + 1], row[n + 2], row[n + 3]
        skipped = skip > 0
        finite = torch.where(finite_flag.isnan(), total.mul(0).eq(0), finite_flag > 0)
        valid, bad = finite & ~skipped, ~finite & ~skipped
        zero = torch.zeros((), device=row.device)
        counts = [bad, zero, zero, zero, zero, zero]
        first_name, last_name = self._kernels[i] if i < len(self._kernels) else (None, None)
        if first_name is not None and last_name is not None:
            first, last = per[self._slots.of(first_name)], per[self._slots.of(last_name)]
            kernel = valid & (first != _ABSENT) & (last != _ABSENT)
            counts[_KERNEL] = kernel
            counts[_VANISH] = kernel & (first < self.vanishing_ratio * last) & (first < self.vanishing_norm)
            counts[_FIRST] = torch.where(kernel, first, 0.0)
            counts[_LAST] = torch.where(kernel, last, 0.0)
        if self.min_norm is not None:
            counts[_FLOOR] = valid & torch.where(floor_flag.isnan(), total < self.min_norm, floor_flag > 0)
        self.counters[i].add_(torch.stack(counts))
        index = torch.arange(n, device=row.device)
        self._accumulate(per, index, valid, skipped, offset, present=per != _ABSENT)
        row.copy_(self._default_row.to(row.device))

    # ----------------------------------------------------------------- check point: host decisions
    def on_check(self, check: CheckContext) -> None:
        v = check.values
        rows = np.asarray(v["rows"], dtype=np.float32)
        n_opt = rows.shape[0]
        counters, slots, series = self._reduce(v, rows)
        loss_steps, loss_values, self.loss_seen = check.unread("loss", self.loss_seen)
        finite = np.isfinite(loss_values)
        losses = loss_values[finite]
        loss_at = dict(zip(loss_steps[finite].tolist(), losses.tolist()))
        if self.loss_start is None:
            first = (self.loss_baseline + losses.tolist())[: self.min_history]
            if len(first) >= self.min_history:
                self.loss_start = host_median(first)
        for i in range(n_opt):
            steps = self.ring_pos[i]
            if steps == 0:
                continue
            norms, paired = self._in_order(i, *series[i], loss_at)
            # Built only for an event that carries it: a dict per parameter costs more than the rules.
            layers = functools.cache(functools.partial(self._layer_data, slots, i)) if self.per_layer else None
            self._check_nonfinite(i, slots, counters[i], steps)
            self._check_vanishing(i, counters[i], norms, steps, layers)
            self._check_exploding(i, norms, paired, losses, steps, layers)
            self.baseline[i] = (self.baseline[i] + norms.tolist())[-self.window :]
            self.baseline_loss[i] = (self.baseline_loss[i] + paired.tolist())[-self.window :]
        self.loss_baseline = (self.loss_baseline + losses.tolist())[-self.window :]
        self.ring_pos = [0] * n_opt
        self.sampled_steps = [[] for _ in range(n_opt)]
        self.row_offsets = [[] for _ in range(n_opt)]
        self.row_seq = [[] for _ in range(n_opt)]
        self.folded = self.flagged = self.scaled = False
        self.interval_start = check.step

    def _kept(self, i: int, ring: int) -> list[int]:
        """Buffer rows of optimizer ``i`` that hold this interval's steps, oldest first."""
        n = self.ring_pos[i]
        return [p % ring for p in range(max(0, n - ring), n)]

    def _reduce(
        self, v: dict[str, Any], rows: np.ndarray
    ) -> tuple[np.ndarray, dict[str, Any], list[tuple[np.ndarray, np.ndarray]]]:
        """Reduce the interval's rows (plus what the device folded) to what the rules read.

        Returns the counters per optimizer, the per-slot numbers, and per optimizer its rows' global
        norms and whether each counts (finite, not skipped by a GradScaler), oldest first. Sums are
        float32 in step order, as the device would have added them step by step, so the numbers are
        the same whether a row was folded on the device or reduced here.
        """
        n_opt, ring, width = rows.shape
        n = width - len(_EXTRA)
        f32 = np.float32
        folded = self.folded
        if folded:
            counters = np.asarray(v["counters"], dtype=np.float32).reshape(n_opt, len(_COUNTERS)).copy()
        else:
            counters = np.zeros((n_opt, len(_COUNTERS)), dtype=np.float32)
        kept = [self._kept(i, ring) for i in range(n_opt)]
        if n_opt == 1:
            table, opt = rows[0, kept[0]], None
            offset = np.asarray(_last(self.row_offsets[0], len(kept[0])), dtype=np.float32)
        else:
            # Rows of all optimizers in the order they were written: per-slot sums add in that order.
            seq = [q for i in range(n_opt) for q in _last(self.row_seq[i], len(kept[i]))]
            order = np.argsort(np.asarray(seq, dtype=np.int64), kind="stable")
            table = np.concatenate([rows[i, kept[i]] for i in range(n_opt)])[order]
            opt = np.asarray([i for i in range(n_opt) for _ in kept[i]], dtype=np.int64)[order]
            offsets = [o for i in range(n_opt) for o in _last(self.row_offsets[i], len(kept[i]))]
            offset = np.asarray(offsets, dtype=np.float32)[order]
        per, total = table[:, :n], table[:, n]
        finite = np.isfinite(total)
        if self.flagged:  # a total that is not float32 brought its own flags
            flag = table[:, n + 2]
            finite = np.where(np.isnan(flag), finite, flag > 0)
        if self.scaled:
            skipped = table[:, n + 1] > 0
            valid, bad = finite & ~skipped, ~finite & ~skipped
        else:
            skipped, valid, bad = None, finite, ~finite
        present = per != f32(_ABSENT)
        everywhere = bool(valid.all())  # the usual interval: every row counts
        slots: dict[str, Any] = {}
        # A parameter's norm is non-finite only on a step whose total is.
        if folded or (not everywhere and bad.any()):
            bad_param = present & ~np.isfinite(per)
            if skipped is not None:
                bad_param &= ~skipped[:, None]
            counts = bad_param.sum(0, dtype=np.float32)
            when = np.where(bad_param, offset[:, None], f32(math.inf)).min(0, initial=f32(math.inf))
            if folded:
                counts += np.asarray(v["param_nonfinite"], dtype=np.float32)
                when = np.minimum(when, np.asarray(v["param_first_nonfinite"], dtype=np.float32))
            slots["param_nonfinite"], slots["param_first_nonfinite"] = counts, when
        if self.per_layer:
            if everywhere:
                use, kept_norms = present, np.maximum(per, f32(0.0))  # absent (-1) adds 0
            else:
                use = present & valid[:, None]
                kept_norms = np.where(use, per, f32(0.0))
            slots["layer_max"] = kept_norms.max(0, initial=f32(0.0))
            slots["layer_count"] = use.sum(0)
            if folded:
                kept_norms = np.concatenate([np.asarray(v["layer_sum"], dtype=np.float32)[None], kept_norms])
            # add.accumulate is sequential: the same float32 sums as one add per step (0 + x is x).
            sums = np.add.accumulate(kept_norms, axis=0)
            slots["layer_sum"] = sums[-1] if len(sums) else np.zeros(n, dtype=np.float32)
            if folded:
                slots["layer_max"] = np.maximum(slots["layer_max"], np.asarray(v["layer_max"], dtype=np.float32))
                slots["layer_count"] = slots["layer_count"] + np.asarray(v["layer_count"], dtype=np.float32)
        series: list[tuple[np.ndarray, np.ndarray]] = []
        for i in range(n_opt):
            mine = slice(None) if opt is None else opt == i
            series.append((total[mine], valid[mine]))
            c = counters[i]
            if not everywhere:
                c[_NONFINITE] += np.count_nonzero(bad[mine])
            first_name, last_name = self._kernels[i] if i < len(self._kernels) else (None, None)
            if first_name is not None and last_name is not None:
                kf, kl = self._slots.of(first_name), self._slots.of(last_name)
                first, last = per[mine, kf], per[mine, kl]
                kernel = present[mine, kf] & present[mine, kl]
                if not everywhere:
                    kernel &= valid[mine]
                small = (first < f32(self.vanishing_ratio) * last) & (first < f32(self.vanishing_norm))
                c[_KERNEL] += np.count_nonzero(kernel)
                c[_VANISH] += np.count_nonzero(kernel & small)
                if not kernel.all():
                    first, last = np.where(kernel, first, f32(0.0)), np.where(kernel, last, f32(0.0))
                if len(first):
                    # Sequential float32 sums from the folded part (0 unless rows were folded).
                    c[_FIRST] = np.add.accumulate(np.concatenate([c[_FIRST : _FIRST + 1], first]))[-1]
                    c[_LAST] = np.add.accumulate(np.concatenate([c[_LAST : _LAST + 1], last]))[-1]
            if self.min_norm is not None:
                below = total[mine] < f32(self.min_norm)
                if self.flagged:
                    floor = table[mine, n + 3]
                    below = np.where(np.isnan(floor), below, floor > 0)
                c[_FLOOR] += np.count_nonzero(valid[mine] & below)
        return counters, slots, series

    def _in_order(
        self, i: int, total: np.ndarray, valid: np.ndarray, loss_at: dict[int, float]
    ) -> tuple[np.ndarray, np.ndarray]:
        """The interval's finite norms of optimizer ``i`` oldest first, and the loss observed before each."""
        steps = _last(self.sampled_steps[i], len(total)) if i < len(self.sampled_steps) else []
        steps = [None] * (len(total) - len(steps)) + list(steps)
        paired = np.array([loss_at.get(s, math.nan) if s is not None else math.nan for s in steps], dtype=np.float64)
        # A valid step whose float32 total overflowed counts in the counters but has no norm to compare.
        keep = valid & np.isfinite(total)
        return total[keep].astype(np.float64), paired[keep]

    def _layer_data(self, slots: dict[str, np.ndarray], i: int) -> dict[str, dict[str, float]]:
        """Mean and max norm per parameter of optimizer ``i`` over the interval."""
        count = slots["layer_count"].astype(np.float64)
        mean = (slots["layer_sum"].astype(np.float64) / np.maximum(count, 1)).tolist()
        top = slots["layer_max"].astype(np.float64).tolist()
        names = self._slots.labels
        owners = [*self._slot_owners, {i}]
        return {
            names[j]: {"mean": mean[j], "max": top[j]} for j in np.flatnonzero(count > 0).tolist() if i in owners[j]
        }

    def _check_nonfinite(self, i: int, slots: dict[str, np.ndarray], counters: np.ndarray, steps: int) -> None:
        n = int(counters[_NONFINITE])
        if n <= 0:
            return
        self.total_nonfinite[i] += n
        counts = slots["param_nonfinite"].astype(np.float64).tolist()
        first = slots["param_first_nonfinite"].astype(np.float64).tolist()
        names = self._slots.labels
        owners = [*self._slot_owners, {i}]
        mine = [j for j in range(len(names)) if counts[j] > 0 and i in owners[j]]
        earliest = min((first[j] for j in mine), default=math.inf)
        first_names = [names[j] for j in mine if first[j] == earliest]
        first_step = int(self.interval_start + earliest) if math.isfinite(earliest) else None
        where = ", ".join(first_names[:3]) + (" ..." if len(first_names) > 3 else "")
        self.emit(
            "nonfinite_gradients",
            "error",
            f"{n} of {steps} optimizer steps had NaN/Inf gradients"
            + (f", first at step {first_step} in {where}" if first_names else " (overflow in the norm)"),
            causes=("non_finite",),
            optimizer=i,
            steps=steps,
            nonfinite_steps=n,
            total_nonfinite_steps=self.total_nonfinite[i],
            first_step=first_step,
            parameters=first_names[:_MAX_NAMED],
            counts={names[j]: int(counts[j]) for j in mine[: 2 * _MAX_NAMED]},
        )

    def _check_vanishing(
        self,
        i: int,
        counters: np.ndarray,
        norms: np.ndarray,
        steps: int,
        layers: Callable[[], dict[str, Any]] | None,
    ) -> None:
        rules: list[str] = []
        data: dict[str, Any] = {"optimizer": i}
        kernel_steps = float(counters[_KERNEL])
        fraction = 0.0
        if kernel_steps > 0:
            first_name, last_name = self._kernels[i]
            first = float(counters[_FIRST]) / kernel_steps
            last = float(counters[_LAST]) / kernel_steps
            ratio_fraction = float(counters[_VANISH]) / kernel_steps
            data.update(
                first_kernel=first_name,
                last_kernel=last_name,
                first_kernel_norm=first,
                last_kernel_norm=last,
                ratio=first / last if last > 0 else None,
                ratio_steps_fraction=ratio_fraction,
                vanishing_ratio=self.vanishing_ratio,
                vanishing_norm=self.vanishing_norm,
            )
            if ratio_fraction >= self.persistence:
                rules.append("ratio")
                fraction = ratio_fraction
        if self.min_norm is not None and len(norms):
            # Over every finite step of the interval: an optimizer that stepped more than check_every
            # times has more of them than the norms kept.
            floor_fraction = float(counters[_FLOOR]) / max(len(norms), steps - float(counters[_NONFINITE]))
            data.update(min_norm=self.min_norm, floor_steps_fraction=floor_fraction)
            if floor_fraction >= self.persistence:
                rules.append("floor")
                fraction = max(fraction, floor_fraction)
        if not rules:
            return
        data.update(rules=rules, steps=len(norms), persistence=self.persistence)
        data.update(_global_stats(norms))
        if layers is not None:
            data["layers"] = layers()
        if "ratio" in rules:
            message = (
                f"vanishing gradients: the first layer's gradient norm ({data['first_kernel']}, "
                f"{data['first_kernel_norm']:.3g}) is {data['ratio']:.2g}x the last layer's "
                f"({data['last_kernel']}, {data['last_kernel_norm']:.3g}) on {fraction:.0%} of steps"
            )
        else:
            message = (
                f"vanishing gradients: the global gradient norm is below {self.min_norm:g} on {fraction:.0%} of steps"
            )
        self.emit(
            "vanishing_gradients", "warning", message, causes=("vanishing_gradients",), confidence=fraction, **data
        )

    def _check_exploding(
        self,
        i: int,
        norms: np.ndarray,
        paired: np.ndarray,
        losses: np.ndarray,
        steps: int,
        layers: Callable[[], dict[str, Any]] | None,
    ) -> None:
        rules: list[str] = []
        data: dict[str, Any] = {"optimizer": i, "steps": steps}
        if not len(norms):
            return
        data.update(_global_stats(norms))
        median = data["norm_median"]
        confidence = 0.0
        baseline = self.baseline[i]
        base = host_median(baseline) if len(baseline) >= min(_MIN_SAMPLES, self.min_history) else math.nan
        if not math.isnan(base):
            growth = median / base if base > 0 else math.inf
            data.update(baseline_median=base, baseline_steps=len(baseline), growth=growth)
        if len(baseline) >= self.min_history:
            above = float(np.mean(norms > self.growth_factor * base))
            data.update(growth_factor=self.growth_factor, above_fraction=above)
            peak = float(np.max(norms)) / base if base > 0 else math.inf
            data["peak_growth"] = peak
            if growth > self.growth_factor:
                rules.append("growth")
                confidence = above
            elif peak > self.growth_factor and growth > math.sqrt(self.growth_factor):
                # Spikes of growth_factor x over a median raised sqrt(growth_factor) x: an unstable run
                # whose gradients blow up batch after batch, not one noisy batch on a calm run.
                rules.append("growth")
                confidence = max(above, 0.5)
        if self.max_norm is not None:
            over = int(np.sum(norms > self.max_norm))
            data.update(max_norm=self.max_norm, steps_over_max_norm=over)
            if over > 0:
                rules.append("max_norm")
                confidence = max(confidence, over / len(norms))
        confidence = max(confidence, self._loss_rules(i, norms, paired, losses, base, rules, data))
        if not rules:
            return
        data["rules"] = rules
        if layers is not None:
            data["layers"] = layers()
        if "growth" in rules:
            message = (
                f"exploding gradients: median gradient norm {median:.3g} is {data['growth']:.3g}x "
                f"the recent baseline {data['baseline_median']:.3g} (max {data['norm_max']:.3g})"
            )
        elif "surge" in rules:
            message = (
                f"exploding gradients: median gradient norm {median:.3g} is {data['growth']:.3g}x "
                f"the recent baseline {data['baseline_median']:.3g} while the median loss rose "
                f"{data['loss_growth']:.3g}x to {data['loss_median']:.3g}"
            )
        elif "spikes" in rules:
            message = (
                f"exploding gradients: {data['loss_spikes']} step(s) with a loss spike (up to "
                f"{data['loss_max']:.3g}, {self.loss_spike:g}x the median loss {data['loss_baseline_median']:.3g} "
                f"or more); sampled ones had gradient norms {data['spike_norm_ratio']:.3g}x those of "
                f"ordinary batches ({data['spike_norm_median']:.3g} vs {data['calm_norm_median']:.3g})"
            )
        else:
            message = (
                f"exploding gradients: gradient norm above max_norm={self.max_norm:g} on "
                f"{data['steps_over_max_norm']} step(s) (max {data['norm_max']:.3g})"
            )
        self.emit(
            "exploding_gradients", "warning", message, causes=("exploding_gradients",), confidence=confidence, **data
        )

    def _loss_rules(
        self,
        i: int,
        norms: np.ndarray,
        paired: np.ndarray,
        losses: np.ndarray,
        base: float,
        rules: list[str],
        data: dict[str, Any],
    ) -> float:
        """The ``surge`` and ``spikes`` forms, which read the loss of every step; returns their confidence.

        The default set samples the norm on one step in ten, so a blow-up between samples leaves only
        its aftermath in the norms; the loss, observed on every step, shows where and how hard it hit.
        Both forms need ``min_history`` observed losses before the interval, and count a loss only
        above the run's starting level: a fitted model's hard batch, far below where the run started,
        is ordinary noise.
        """
        history = self.loss_baseline
        start = self.loss_start
        if start is None or len(history) < self.min_history or not len(losses):
            return 0.0
        ref = host_median(history)
        loss_median = host_median(losses)
        loss_growth = loss_median / ref if ref > 0 else math.inf
        data.update(
            loss_median=loss_median,
            loss_max=float(np.max(losses)),
            loss_baseline_median=ref,
            loss_start=start,
            loss_growth=loss_growth,
        )
        confidence = 0.0
        # surge: the gradients rose as a whole and the loss with them, past where the run started.
        growth = data.get("growth", math.nan)
        if not math.isnan(base) and growth >= self.surge_factor and loss_growth >= self.surge_factor:
            data["surge_factor"] = self.surge_factor
            if loss_median > start:
                rules.append("surge")
                confidence = max(float(np.mean(norms >= self.surge_factor * base)), 0.5)
        # spikes: single batches whose loss jumps far above the rest, and whose gradients jump with it.
        threshold = max(self.loss_spike * ref, start)
        spikes = int(np.sum((losses >= self.loss_spike * ref) & (losses > start)))
        if not spikes:
            return confidence
        data.update(loss_spikes=spikes, loss_spike=self.loss_spike)
        on_spike = norms[(paired >= self.loss_spike * ref) & (paired > start)]
        pool_norms = np.concatenate([np.asarray(self.baseline[i], dtype=np.float64), norms])
        pool_loss = np.concatenate([np.asarray(self.baseline_loss[i], dtype=np.float64), paired])
        calm = pool_norms[pool_loss <= ref]  # NaN (no loss seen) is neither
        if not len(on_spike) or len(calm) < _MIN_SAMPLES:
            return confidence
        calm_median = host_median(calm)
        spike_median = host_median(on_spike)
        ratio = spike_median / calm_median if calm_median > 0 else math.inf
        data.update(
            spike_threshold=threshold,
            sampled_spikes=len(on_spike),
            spike_norm_median=spike_median,
            calm_norm_median=calm_median,
            spike_norm_ratio=ratio,
            spike_ratio=self.spike_ratio,
        )
        if ratio >= self.spike_ratio:
            rules.append("spikes")
            confidence = max(confidence, float(np.mean(on_spike >= self.spike_ratio * calm_median)), 0.5)
        return confidence

    # ----------------------------------------------------------------- state
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (before or after the Guard attaches)."""
        if self.guard is None:
            # Per-optimizer and per-layer states take their shapes from the model at attach.
            self._pending_state = dict(state)
            return
        super().load_state_dict(state)


def _scaler_skipped(ctx: StepContext, device: torch.device) -> Tensor | None:
    """True on a step that a GradScaler will skip inside a fused optimizer (its ``found_inf`` is set)."""
    found = getattr(ctx.optimizer, "found_inf", None)
    if not isinstance(found, Tensor):
        return None
    return found.detach().to(device).reshape(()) > 0


def _last(values: list[Any], n: int) -> list[Any]:
    return values[len(values) - n :] if n > 0 else []


def _global_stats(norms: np.ndarray) -> dict[str, Any]:
    if not len(norms):
        return {"norm_mean": None, "norm_median": None, "norm_max": None}
    return {
        "norm_mean": float(norms.mean()),
        "norm_median": host_median(norms),
        "norm_max": float(norms.max()),
    }
