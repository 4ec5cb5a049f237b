"""torch.distributed support: global gradient norms, one packed collective per check point.

Under DDP every rank holds the same averaged gradients after backward, so a local norm is already
the global norm. Under FSDP (1 and 2) each rank holds a shard, so per-tensor norms are combined
across ranks. Hook states are combined at check points: every rank contributes its packed vector of
all hooks' states to a single ``all_gather``, and each rank applies the declared reductions to the
gathered rows itself, so one collective serves every reduction kind and every rank decides the same.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from .stats import tensor_norms

__all__ = ["DistributedContext", "reduce_rows"]


def _is_dtensor(t: Tensor) -> bool:
    return hasattr(t, "to_local") and hasattr(t, "device_mesh")


def _model_kind(model: torch.nn.Module | None) -> str:
    if model is None:
        return "local"
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return "ddp"
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        if isinstance(model, FSDP) or any(isinstance(m, FSDP) for m in model.modules()):
            return "fsdp"
    except ImportError:  # pragma: no cover - torch built without distributed
        pass
    if any(_is_dtensor(p) for p in model.parameters()):
        return "fsdp2"
    return "local"


class DistributedContext:
    """What the Guard knows about the process group, and the collectives it uses.

    Args:
        model: The (wrapped) model, to tell DDP from FSDP from a local run.
        emit_rank: The rank whose sinks write events; None makes every rank write.
        group: The process group; the default group when None.
    """

    def __init__(self, model: torch.nn.Module | None, emit_rank: int | None = 0, group: Any = None) -> None:
        self.group = group
        self.active = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank(group) if self.active else 0
        self.world_size = dist.get_world_size(group) if self.active else 1
        self.kind = _model_kind(model)
        if emit_rank is not None and not 0 <= emit_rank < self.world_size:
            raise ValueError(f"Guard: emit_rank must lie in [0, {self.world_size - 1}] or be None, got {emit_rank}")
        self.emit_rank = emit_rank
        self.backend = dist.get_backend(group) if self.active else None

    @property
    def multi(self) -> bool:
        """True when more than one process takes part."""
        return self.active and self.world_size > 1

    @property
    def sharded(self) -> bool:
        """True when each rank holds only a shard of the gradients (FSDP)."""
        return self.multi and self.kind in ("fsdp", "fsdp2")

    def should_emit(self) -> bool:
        """Whether this rank's sinks write events."""
        return self.emit_rank is None or self.rank == self.emit_rank

    def grad_norms(self, grads: Sequence[Tensor], norm_type: float) -> tuple[Tensor, Tensor]:
        """Per-tensor and total gradient norms over the whole job, without a host sync."""
        if not any(_is_dtensor(g) for g in grads) and not self.sharded:
            return tensor_norms(grads, norm_type)
        local = [g.to_local() if _is_dtensor(g) else g for g in grads]
        per_local, _ = tensor_norms(local, norm_type)
        if math.isinf(norm_type):
            if self.multi:
                dist.all_reduce(per_local, op=dist.ReduceOp.MAX, group=self.group)
            per = per_local
            return per, per.max()
        powered = per_local.double().pow(norm_type)
        if self.multi:
            dist.all_reduce(powered, op=dist.ReduceOp.SUM, group=self.group)
        per = powered.pow(1.0 / norm_type).float()
        total = powered.sum().pow(1.0 / norm_type).float()
        return per, total

    def any_across_ranks(self, flag: Tensor) -> Tensor:
        """A device bool that is True on every rank if it is True on any (one small collective)."""
        if not self.multi:
            return flag
        t = flag.to(torch.float32)
        if self.backend == "gloo" and t.device.type != "cpu":
            t = t.cpu()
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return t.to(flag.device) > 0

    def gather(self, flat: Tensor) -> np.ndarray:
        """All ranks' packed state vectors as a host array of shape (world_size, n): one collective, one read."""
        if not self.multi:
            return flat.detach().cpu().numpy()[None, :]
        if self.backend == "gloo" and flat.device.type != "cpu":
            flat = flat.cpu()
        rows = [torch.empty_like(flat) for _ in range(self.world_size)]
        dist.all_gather(rows, flat.contiguous(), group=self.group)
        return torch.stack(rows).cpu().numpy()


def reduce_rows(rows: np.ndarray, how: str) -> np.ndarray:
    """Combine per-rank rows (shape (world, ...)) with one of ``stallguard.hook.REDUCTIONS``."""
    if how == "sum":
        return rows.sum(axis=0)
    if how == "mean":
        return rows.mean(axis=0)
    if how == "max":
        return rows.max(axis=0)
    if how == "min":
        return rows.min(axis=0)
    if how == "any":
        return (rows != 0).any(axis=0)
    if how == "all":
        return (rows != 0).all(axis=0)
    if how == "gather":
        return rows
    raise ValueError(f"unknown reduction {how!r}")
