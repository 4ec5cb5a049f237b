"""Shared on-device statistics of one optimizer step, computed once and lazily.

Several hooks need the same numbers (per-tensor gradient norms, the global norm, a finite flag,
weight norms, update sizes). A :class:`StepContext` computes each of them the first time a hook asks
and hands the same tensors to every later hook, so the gradients are read once per step however many
hooks look at them. Nothing here reads a device value to the host.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

if TYPE_CHECKING:
    from .guard import Guard

__all__ = ["CheckContext", "GradNorms", "Observation", "StepContext", "UpdateNorms", "tensor_norms"]

# Tensors up to this many elements are sampled whole for update sizes; larger ones by this many
# elements in _SAMPLE_BLOCKS evenly spaced runs of contiguous elements (whole cache lines: a strided
# sample of the same size would touch one cache line per element), which keeps the extra memory and
# the bytes read proportional to the number of tensors.
UPDATE_SAMPLE = 4096
_SAMPLE_BLOCKS = 256

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _plain(t: Tensor) -> bool:
    return type(t) is torch.Tensor or type(t) is torch.nn.Parameter


def is_nonfinite(t: Tensor) -> Tensor:
    """``~torch.isfinite(t)`` for a floating-point tensor, in two ops instead of five or six.

    ``t * 0`` is 0 for every finite value and NaN for NaN and infinities, and NaN compares unequal to
    everything. On the small tensors of per-step statistics the cost is all in op dispatch.
    """
    return t.mul(0).ne(0)


def host_median(values: Sequence[float] | np.ndarray) -> float:
    """``float(np.median(values))`` of finite host numbers, bit for bit, without numpy's per-call cost.

    Check points take many medians of short lists, and ``np.median`` costs about 15 µs a call.

    Example:
        >>> host_median([3.0, 1.0, 2.0, 10.0])
        2.5
    """
    if isinstance(values, np.ndarray) and values.dtype != np.float64:
        return float(np.median(values))  # its mean of the middle two is in that dtype
    half = len(values) // 2
    if len(values) <= 32:
        ordered = sorted(values.tolist() if isinstance(values, np.ndarray) else values)
        return float(ordered[half]) if len(values) % 2 else (ordered[half - 1] + ordered[half]) / 2
    # np.median's own partition and mean of the middle two, without its wrapper's overhead.
    part = np.partition(np.asarray(values, dtype=np.float64), [half - 1, half])
    return float(part[half]) if len(values) % 2 else float((part[half - 1] + part[half]) / 2)


def tensor_norms(tensors: Sequence[Tensor], norm_type: float = 2.0) -> tuple[Tensor, Tensor]:
    """Per-tensor norms (float32, in input order) and the total norm, in one foreach pass.

    The total is computed exactly as ``torch.nn.utils.get_total_norm`` computes it (same grouping,
    same order), so for float32 and float64 inputs the two agree bit for bit. Half-precision inputs
    are reduced in float32.

    Args:
        tensors: Non-empty list of tensors, on any mix of devices and dtypes.
        norm_type: The p of the p-norm; ``math.inf`` for the max norm.

    Example:
        >>> import torch
        >>> per, total = tensor_norms([torch.ones(4), torch.ones(9)])
        >>> per.tolist(), round(total.item(), 4)
        ([2.0, 3.0], 3.6056)
    """
    if not tensors:
        raise ValueError("tensor_norms: tensors must be a non-empty list")
    first_device = tensors[0].device
    grouped = torch._C._group_tensors_by_device_and_dtype([list(tensors)], False)
    norms: list[Tensor] = []
    order: list[int] = []
    for (device, dtype), ([group], indices) in grouped.items():
        foreach = device.type in ("cpu", "cuda", "xpu") and all(_plain(t) for t in group)
        if foreach:
            if dtype in _LOW_PRECISION:
                found = torch._foreach_norm(group, norm_type, dtype=torch.float32)
            else:
                found = torch._foreach_norm(group, norm_type)
        else:
            found = [torch.linalg.vector_norm(t, norm_type, dtype=torch.float32) for t in group]
        # Only other devices' norms move: a .to() per tensor is a dispatch each, even when a no-op.
        norms.extend(found if device == first_device else [n.to(first_device) for n in found])
        order.extend(indices)
    stacked = torch.stack(norms)
    total = torch.linalg.vector_norm(stacked, norm_type)
    per = stacked.float()
    if order != sorted(order):
        per = per.index_select(0, _inverse_index(order, per.device))
    return per, total


_INVERSE_INDEX: dict[tuple[tuple[int, ...], torch.device], Tensor] = {}


def _inverse_index(order: list[int], device: torch.device) -> Tensor:
    # Cached, because building an index tensor on an accelerator is a blocking host-to-device copy.
    key = (tuple(order), device)
    idx = _INVERSE_INDEX.get(key)
    if idx is None:
        inverse = [0] * len(order)
        for pos, i in enumerate(order):
            inverse[i] = pos
        idx = _INVERSE_INDEX[key] = torch.tensor(inverse, device=device)
    return idx


@dataclass(frozen=True)
class GradNorms:
    """Gradient norms of one optimizer step (device tensors; read them at a check point).

    Attributes:
        names: Parameter names, aligned with ``per_tensor`` (only parameters that have a gradient).
        per_tensor: 1-D float32 tensor of per-parameter gradient norms.
        total: 0-d tensor, the norm of all gradients together (equals ``get_total_norm``).
        finite: 0-d bool tensor, False when any gradient holds NaN or Inf.
        norm_type: The p of the p-norm.
    """

    names: list[str]
    per_tensor: Tensor
    total: Tensor
    finite: Tensor
    norm_type: float


@dataclass(frozen=True)
class UpdateNorms:
    """Sizes of the update the optimizer just applied, per parameter (estimated on a fixed sample).

    Attributes:
        names: Parameter names, aligned with the tensors.
        delta: 1-D tensor, ``|w_after - w_before|`` on the sample.
        weight: 1-D tensor, ``|w_before|`` on the same sample.
    """

    names: list[str]
    delta: Tensor
    weight: Tensor

    @property
    def ratio(self) -> Tensor:
        """``|Δw| / |w|`` per parameter (0 where the weight is exactly zero and did not move)."""
        return self.delta / self.weight.clamp_min(torch.finfo(self.weight.dtype).tiny)


class StepContext:
    """What a hook sees at ``on_before_step`` and ``on_after_step``: one optimizer step.

    The statistics are computed the first time any hook asks for them during this step and shared
    with every other hook; they are device tensors, never read to the host here.

    Attributes:
        guard: The Guard running the hooks.
        step: Number of this optimizer step (1 for the first).
        optimizer: The optimizer that is stepping.
        optimizer_index: Its position in the Guard's optimizer list.
        params: The optimizer's parameters, in param-group order.
        names: Their names (from ``model.named_parameters()``; optimizer-only parameters get
            ``"optimizer[i].group[j].param[k]"``).
    """

    def __init__(
        self,
        guard: Guard,
        step: int,
        optimizer: torch.optim.Optimizer | None,
        optimizer_index: int,
        params: list[torch.nn.Parameter],
        names: list[str],
    ) -> None:
        self.guard = guard
        self.step = step
        self.optimizer = optimizer
        self.optimizer_index = optimizer_index
        self.params = params
        self.names = names
        self._grad_norms: dict[float, GradNorms] = {}
        self._with_grad: tuple[list[Tensor], list[Tensor], list[str]] | None = None
        self._param_norms: Tensor | None = None
        self._update_before: list[Tensor] | None = None
        self._update: UpdateNorms | None = None

    @property
    def optimizer_step(self) -> int:
        """This optimizer's own step number (1 for its first step).

        Equal to :attr:`step` for the first optimizer. Another optimizer stepping in the same
        iteration steps after the Guard's count moved on, so its :attr:`step` is one ahead.
        """
        if self.optimizer is None:
            return self.step
        return self.guard.optimizer_steps[self.optimizer_index] + 1

    @property
    def is_clock(self) -> bool:
        """Whether this optimizer's steps are the ones the Guard counts (the first optimizer)."""
        return self.optimizer_index == self.guard.clock

    def _grads(self) -> tuple[list[Tensor], list[Tensor], list[str]]:
        if self._with_grad is None:
            params, grads, names = [], [], []
            for p, n in zip(self.params, self.names):
                if p.grad is not None:
                    params.append(p)
                    grads.append(p.grad)
                    names.append(n)
            self._with_grad = (params, grads, names)
        return self._with_grad

    @property
    def grads(self) -> list[Tensor]:
        """The gradients that exist this step (parameters whose ``.grad`` is not None)."""
        return self._grads()[1]

    @property
    def grad_params(self) -> list[Tensor]:
        """The parameters that have a gradient this step, aligned with :attr:`grads`."""
        return self._grads()[0]

    @property
    def grad_names(self) -> list[str]:
        """Names of the parameters that have a gradient this step, aligned with :attr:`grads`."""
        return self._grads()[2]

    def grad_norms(self, norm_type: float = 2.0) -> GradNorms | None:
        """Per-parameter and total gradient norms, computed once per step and norm type.

        Returns None when no parameter of this optimizer has a gradient. Under a GradScaler with a
        fused optimizer (whose gradients are still scaled at this point) the norms are unscaled.
        """
        norm_type = float(norm_type)
        cached = self._grad_norms.get(norm_type)
        if cached is not None:
            return cached
        _, grads, names = self._grads()
        dctx = self.guard._distributed
        # FSDP1 with use_orig_params: a rank may hold no gradient for a parameter outside its shard,
        # so the collective runs over the optimizer's full parameter list, the same on every rank.
        present = self._present()
        if not grads and not (present and self.params):
            return None
        per, total = dctx.grad_norms(grads, norm_type, present)
        scale = getattr(self.optimizer, "grad_scale", None)
        if isinstance(scale, Tensor):
            per = per / scale.to(per.device)
            total = total / scale.to(total.device)
        finite = total.mul(0).eq(0)  # isfinite in two ops (see is_nonfinite())
        result = GradNorms(names=names, per_tensor=per, total=total, finite=finite, norm_type=norm_type)
        self._grad_norms[norm_type] = result
        return result

    def _present(self) -> list[bool] | None:
        dctx = self.guard._distributed
        if dctx.sharded and dctx.kind == "fsdp":
            return [p.grad is not None for p in self.params]
        return None

    def refresh_grad_norms(self) -> None:
        """Forget this step's gradient norms after a hook changed the gradients in place.

        The next :meth:`grad_norms` call reads the gradients again (a second pass): only for hooks
        whose change cannot be derived from the norms already computed.
        """
        self._grad_norms.clear()

    def param_norms(self) -> Tensor:
        """Per-parameter weight norms (L2, float32), aligned with :attr:`grad_names`."""
        if self._param_norms is None:
            params = self._grads()[0]
            # Sharded weights (FSDP) are reduced across ranks like the gradients. No autograd graph (and
            # no detach per tensor): the norms are statistics.
            dctx = self.guard._distributed
            present = self._present()
            with torch.no_grad():
                norms = dctx.grad_norms(params, 2.0, present)[0] if params or present else torch.zeros(0)
            self._param_norms = norms
        return self._param_norms

    def request_update(self) -> None:
        """Ask for :meth:`update_norms` after this step. Call it from ``on_before_step``.

        Takes a fixed sample of every parameter that has a gradient (at most ``UPDATE_SAMPLE``
        elements each), so the memory cost is proportional to the number of tensors.
        """
        if self._update_before is None:
            views = _SampleViews.of(self.guard, self.optimizer_index, self._grads()[0])
            self._update_before = views.copy()

    def update_norms(self) -> UpdateNorms | None:
        """The update just applied, per parameter; None unless :meth:`request_update` was called."""
        if self._update_before is None:
            return None
        if self._update is None:
            params, _, names = self._grads()
            if not params:
                return None
            views = _SampleViews.of(self.guard, self.optimizer_index, params)
            before = self._update_before
            delta = torch._foreach_sub(views.current(), before) if before else []
            # One norm pass over the deltas and the weights together.
            per = tensor_norms(delta + before)[0]
            self._update = UpdateNorms(names=names, delta=per[: len(before)], weight=per[len(before) :])
        return self._update


class _SampleViews:
    """Views of the sampled elements of each parameter, made once per parameter set.

    A parameter of at most ``UPDATE_SAMPLE`` elements is sampled whole; a larger one in 256 evenly
    spaced runs of 16 contiguous elements (64 bytes of float32: one cache line each). The views
    follow the optimizer's in-place updates, so taking the sample before and after a step is one
    foreach copy and one foreach subtraction, not a few dispatches per tensor.
    A parameter whose storage changed (``p.data = ...``) or that is not contiguous gets a fresh copy
    of its sample each time instead.
    """

    __slots__ = ("key", "params", "views")

    def __init__(self, params: list[Tensor]) -> None:
        self.params = params
        self.key = self._key(params)
        self.views: list[Tensor | None] = [_strided(p) for p in params]

    @staticmethod
    def _key(params: list[Tensor]) -> tuple[tuple[int, int], ...]:
        return tuple((id(p), p.data_ptr() if _plain(p) else 0) for p in params)

    @classmethod
    def of(cls, guard: Guard, index: int, params: list[Tensor]) -> _SampleViews:
        cache = guard._sample_views
        found = cache.get(index)
        if found is None or found.key != cls._key(params):
            found = cache[index] = cls(params)
        return found

    def current(self) -> list[Tensor]:
        return [v if v is not None else _sample(p) for v, p in zip(self.views, self.params)]

    def copy(self) -> list[Tensor]:
        if self.views and all(v is not None for v in self.views):
            return torch._foreach_mul(self.views, 1.0)  # type: ignore[arg-type]  # one dispatch for every copy
        return [t.clone() if v is not None else t for v, t in zip(self.views, self.current())]


def sample_view(t: Tensor) -> Tensor:
    """The fixed sample of ``t`` that update sizes are measured on (at most ``UPDATE_SAMPLE`` elements).

    A view where ``t`` is contiguous (no copy), a copy otherwise. The same elements every time for a
    tensor of the same shape, so statistics of different steps compare.
    """
    view = _strided(t)
    return view if view is not None else _sample(t)


def _blocks(n: int) -> tuple[int, int]:
    """(elements per run, distance between run starts) of the sample of an ``n``-element tensor."""
    size = UPDATE_SAMPLE // _SAMPLE_BLOCKS
    return size, n // _SAMPLE_BLOCKS  # n > UPDATE_SAMPLE, so the runs do not overlap


def _strided(p: Tensor) -> Tensor | None:
    """The sampled elements of ``p`` as a view (the same elements :func:`_sample` copies), or None."""
    if not _plain(p) or p.is_sparse or not p.is_contiguous():
        return None
    flat = p.detach().view(-1)
    n = flat.numel()
    if n <= UPDATE_SAMPLE:
        return flat
    size, step = _blocks(n)
    return flat.as_strided((_SAMPLE_BLOCKS, size), (step, 1), flat.storage_offset())


_SAMPLE_INDEX: dict[tuple[int, torch.device], Tensor] = {}


def _sample(p: Tensor) -> Tensor:
    flat = p.detach().reshape(-1)
    n = flat.numel()
    if n <= UPDATE_SAMPLE:
        return flat.clone()
    key = (n, flat.device)
    idx = _SAMPLE_INDEX.get(key)
    if idx is None:
        size, step = _blocks(n)
        starts = torch.arange(_SAMPLE_BLOCKS, device=flat.device) * step
        idx = _SAMPLE_INDEX[key] = (starts[:, None] + torch.arange(size, device=flat.device)).reshape(-1)
    return flat.index_select(0, idx).view(_SAMPLE_BLOCKS, -1)


@dataclass(frozen=True)
class Observation:
    """What a hook sees at ``on_observe``: one call of ``guard.observe``.

    Attributes:
        step: Optimizer steps completed when ``observe`` was called.
        loss: The loss as given (a scalar tensor or a float), or None.
        inputs: The batch inputs, or None.
        outputs: The model outputs, or None.
        targets: The targets, or None.
        metrics: Other named scalars (``val_loss=...``), as given.
        index: How many ``observe`` calls came before this one.
    """

    step: int
    loss: Tensor | float | None = None
    inputs: Any = None
    outputs: Any = None
    targets: Any = None
    metrics: dict[str, Tensor | float] | None = None
    index: int = 0


class CheckContext:
    """What a hook sees at ``on_check``: host numbers, read in the check point's one transfer.

    Attributes:
        guard: The Guard.
        step: Optimizer steps completed.
        values: This hook's declared tensor states after the cross-rank reduction, as Python floats
            (0-d states) or numpy arrays.
        final: True for the last check, run by ``Guard.close()``.
    """

    def __init__(self, guard: Guard, step: int, values: dict[str, Any], final: bool = False) -> None:
        self.guard = guard
        self.step = step
        self.values = values
        self.final = final

    def series(self, name: str = "loss") -> Any:
        """The host history of a scalar stream (``"loss"`` or a metric name); see ``Guard.series``."""
        return self.guard.series(name)

    def unread(self, name: str, seen: int) -> tuple[np.ndarray, np.ndarray, int]:
        """A stream's values after the first ``seen`` ever observed: ``(steps, values, total)``.

        A hook keeps ``total`` as its next ``seen`` (in a declared state, so that it survives a resume);
        a stream never observed gives empty arrays and ``seen`` back.
        """
        if not self.guard.has_series(name):
            return np.zeros(0, dtype=np.int64), np.zeros(0), seen
        series = self.guard.series(name)
        steps, values = series.since(seen)
        return steps, values, series.total
