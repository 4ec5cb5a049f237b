"""torch.distributed support: global gradient norms, agreed step skipping, packed check-point reductions.

Under DDP every rank holds the same averaged gradients after backward, so a local norm is already
the global norm. Under FSDP (1 and 2) each rank holds a shard, so per-tensor norms are combined
across ranks (the p-th powers summed, or the max for the inf-norm). Hook states are combined at
check points: all states that reduce with max, min, any or all travel in one packed ``all_reduce``
(MAX, with min and all sent negated), all that reduce with sum or mean in one packed ``all_reduce``
(SUM), so a check point costs at most two collectives of data plus one of two numbers that checks
that every rank packed the same layout; ``reduce="gather"`` states, if any, add one ``all_gather``.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from .stats import tensor_norms

__all__ = [
    "DistributedContext",
    "LayoutMismatchError",
    "SyncTimeoutError",
    "fingerprint",
    "pack_value",
    "reduce_rows",
    "unpack_value",
]

# Reductions sent in the MAX collective (min and all are sent negated) and in the SUM collective.
_MAX_OPS = ("max", "min", "any", "all")
_SUM_OPS = ("sum", "mean")


class LayoutMismatchError(RuntimeError):
    """The ranks packed different states at a check point (different hooks, states, shapes or steps).

    Raised on every rank at once, naming what differs, instead of a hang or silently mixed numbers.
    """


class SyncTimeoutError(RuntimeError):
    """Not every rank joined a check point within the allowed time, or one had left (only where a timeout is set)."""


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


def fingerprint(description: Any) -> float:
    """A 48-bit hash of ``repr(description)`` as a float64 (exact), to compare layouts across ranks.

    Example:
        >>> fingerprint({"step": 3}) == fingerprint({"step": 3}), fingerprint({"step": 3}) == fingerprint({"step": 4})
        (True, False)
    """
    digest = hashlib.blake2b(repr(description).encode(), digest_size=6).digest()
    return float(int.from_bytes(digest, "big"))


class DistributedContext:
    """What the Guard knows about the process group, and the collectives it uses.

    Args:
        model: The (wrapped) model, to tell DDP from FSDP from a local run.
        emit_rank: The rank whose sinks write events; None or ``"all"`` makes every rank write.
        group: The process group; the default group when None.

    Example:
        Without an initialized process group everything is local and no collective runs.

        >>> import torch
        >>> ctx = DistributedContext(torch.nn.Linear(2, 1), emit_rank="all")
        >>> ctx.rank, ctx.world_size, ctx.multi, ctx.kind, ctx.should_emit()
        (0, 1, False, 'local', True)
    """

    def __init__(self, model: torch.nn.Module | None, emit_rank: int | str | None = 0, group: Any = None) -> None:
        self.group = group
        self.active = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank(group) if self.active else 0
        self.world_size = dist.get_world_size(group) if self.active else 1
        self.kind = _model_kind(model)
        if emit_rank == "all":
            emit_rank = None
        if emit_rank is not None and not 0 <= emit_rank < self.world_size:
            raise ValueError(
                f"Guard: emit_rank must lie in [0, {self.world_size - 1}] or be None, got {emit_rank} "
                "('all', like None, makes every rank write)"
            )
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

    # ----------------------------------------------------------------- per step
    def grad_norms(
        self, grads: Sequence[Tensor], norm_type: float, present: Sequence[bool] | None = None
    ) -> tuple[Tensor, Tensor]:
        """Per-tensor and total gradient norms over the whole job, without a host sync.

        Args:
            grads: The gradients this rank holds.
            norm_type: The p of the p-norm.
            present: Under FSDP1 with ``use_orig_params=True`` a rank holds no gradient for a
                parameter none of whose elements lie in its shard, so ranks hold different lists.
                ``present`` marks, for every parameter of the optimizer (the same list on every
                rank), whether ``grads`` holds its gradient; the collective then runs over that
                common list and the result is cut back to ``grads``.
        """
        if not any(_is_dtensor(g) for g in grads) and not self.sharded:
            return tensor_norms(grads, norm_type)
        local = [g.to_local() if _is_dtensor(g) else g for g in grads]
        per_local, _ = tensor_norms(local, norm_type) if local else (torch.zeros(0), None)
        index: Tensor | None = None
        if present is not None and self.multi and not all(present):
            # Scatter into the common list (zeros where this rank holds nothing), reduce, cut back.
            where = [i for i, p in enumerate(present) if p]
            index = torch.tensor(where, dtype=torch.long, device=per_local.device)
            full = torch.zeros(len(present), dtype=per_local.dtype, device=per_local.device)
            per_local = full.index_copy(0, index, per_local)
        if math.isinf(norm_type):
            per = per_local
            if self.multi:
                per = self._all_reduce(per.clone(), dist.ReduceOp.MAX)
            total = per.max()
        else:
            powered = per_local.double().pow(norm_type)
            if self.multi:
                powered = self._all_reduce(powered, dist.ReduceOp.SUM)
            per = powered.pow(1.0 / norm_type).float()
            total = powered.sum().pow(1.0 / norm_type).float()
        if index is not None:
            per = per.index_select(0, index)
        return per, total

    def any_across_ranks(self, flag: Tensor) -> Tensor:
        """A device bool that is True on every rank if it is True on any (one small collective)."""
        if not self.multi:
            return flag
        t = self._all_reduce(flag.to(torch.float32).reshape(1), dist.ReduceOp.MAX)
        return (t > 0).reshape(flag.shape).to(flag.device)

    def rank_flags(self, flags: Tensor) -> Tensor:
        """Every rank's row of flags: ``flags`` (shape (k,)) lands in column ``rank`` of a (k, world) table.

        One small ``all_reduce`` (MAX) per call; every rank gets the same table, on the device.
        """
        table = torch.zeros(flags.numel(), self.world_size, dtype=torch.float32, device=flags.device)
        table[:, self.rank] = flags.reshape(-1).to(torch.float32)
        if self.multi:
            table = self._all_reduce(table, dist.ReduceOp.MAX)
        return table

    def _all_reduce(self, t: Tensor, op: Any) -> Tensor:
        if self.backend == "gloo" and t.device.type != "cpu":
            out = t.cpu()
            dist.all_reduce(out, op=op, group=self.group)
            return out.to(t.device)
        dist.all_reduce(t, op=op, group=self.group)
        return t

    # ----------------------------------------------------------------- check points
    def _wait(self, work: Any, timeout: float | None, what: str) -> None:
        if timeout is None:
            work.wait()
            return
        deadline = time.monotonic() + timeout
        while not work.is_completed():
            if time.monotonic() > deadline:
                raise SyncTimeoutError(
                    f"stallguard: rank {self.rank} waited {timeout:g} s at {what} and not every rank joined"
                )
            time.sleep(0.005)
        work.wait()

    def check_layout(self, description: Any, *, timeout: float | None = None) -> None:
        """Check that every rank is about to pack the same layout (one ``all_reduce`` of two numbers).

        Raises:
            LayoutMismatchError: on every rank, naming the differences, when the layouts differ.
            SyncTimeoutError: when ``timeout`` is set and not every rank joined in time.
        """
        if not self.multi:
            return
        fp = fingerprint(description)
        # NCCL reduces device tensors only; gloo reduces CPU tensors.
        on = torch.device("cuda", torch.cuda.current_device()) if "nccl" in str(self.backend) else None
        header = torch.tensor([fp, -fp], dtype=torch.float64, device=on)
        try:
            work = dist.all_reduce(header, op=dist.ReduceOp.MAX, group=self.group, async_op=True)
            self._wait(work, timeout, "a check point")
        except RuntimeError as exc:
            if timeout is None or isinstance(exc, SyncTimeoutError):
                raise
            # A rank that already left (its connection closed) is one that will never join.
            raise SyncTimeoutError(
                f"stallguard: rank {self.rank} could not reach every rank at a check point: {exc}"
            ) from exc
        top, neg_bottom = header.tolist()
        if top == -neg_bottom:
            return
        # Every rank saw the same disagreement: swap descriptions to say what differs, then raise.
        found: list[Any] = [None] * self.world_size
        dist.all_gather_object(found, description, group=self.group)
        raise LayoutMismatchError(_describe_mismatch(found))

    def reduce_packed(self, max_flat: Tensor, sum_flat: Tensor) -> tuple[Tensor, Tensor]:
        """Reduce the packed MAX and SUM vectors across ranks: one ``all_reduce`` each (none if empty)."""
        if self.multi:
            if max_flat.numel():
                max_flat = self._all_reduce(max_flat, dist.ReduceOp.MAX)
            if sum_flat.numel():
                sum_flat = self._all_reduce(sum_flat, dist.ReduceOp.SUM)
        return max_flat, sum_flat

    def gather(self, flat: Tensor) -> np.ndarray:
        """All ranks' packed vectors as a host array of shape (world_size, n): one collective, one read."""
        if not self.multi:
            return flat.detach().cpu().numpy()[None, :]
        if self.backend == "gloo" and flat.device.type != "cpu":
            flat = flat.cpu()
        rows = [torch.empty_like(flat) for _ in range(self.world_size)]
        dist.all_gather(rows, flat.contiguous(), group=self.group)
        return torch.stack(rows).cpu().numpy()


def _describe_mismatch(found: list[Any]) -> str:
    ref = found[0]
    lines = ["stallguard: the ranks packed different states at a check point, so they cannot be reduced together."]
    for r, desc in enumerate(found[1:], start=1):
        if desc == ref:
            continue
        if isinstance(ref, dict) and isinstance(desc, dict):
            for key in sorted(set(ref) | set(desc)):
                if ref.get(key) != desc.get(key):
                    lines.append(f"  {key}: rank 0 has {ref.get(key)!r}, rank {r} has {desc.get(key)!r}")
        else:
            lines.append(f"  rank 0 has {ref!r}, rank {r} has {desc!r}")
    lines.append(
        "Build the Guard with the same hooks on every rank, step every rank alike, and call observe() the "
        "same number of times per step with the same metric names on every rank."
    )
    return "\n".join(lines)


def pack_value(t: Tensor, how: str) -> Tensor:
    """A state as the float64 vector it travels in (min and all negated, so that MAX reduces them).

    Example:
        >>> import torch
        >>> pack_value(torch.tensor([1.0, 3.0]), "min").tolist()
        [-1.0, -3.0]
        >>> unpack_value(pack_value(torch.tensor([1.0, 3.0]), "min").numpy(), "min", 1).tolist()
        [1.0, 3.0]
    """
    # Each op skipped where it would be a no-op: a check point packs dozens of small states.
    flat = t if t.dim() == 1 else t.reshape(-1)
    if flat.requires_grad:
        flat = flat.detach()
    if how in ("any", "all"):
        flat = flat != 0
    if flat.dtype != torch.float64:
        flat = flat.to(torch.float64)
    return -flat if how in ("min", "all") else flat


def unpack_value(flat: np.ndarray, how: str, world_size: int) -> np.ndarray:
    """The reduced value from its travelled form (see :func:`pack_value`); ``mean`` divides the sum by ``world_size``.

    Example:
        >>> import numpy as np
        >>> unpack_value(np.array([6.0, 2.0]), "mean", 2).tolist()
        [3.0, 1.0]
    """
    if how == "min":
        return -flat
    if how == "all":
        return -flat > 0
    if how == "any":
        return flat > 0
    if how == "mean":
        return flat / world_size
    return flat


def reduce_rows(rows: np.ndarray, how: str) -> np.ndarray:
    """Combine per-rank rows (shape (world, ...)) with one of ``stallguard.hook.REDUCTIONS``.

    Example:
        >>> import numpy as np
        >>> reduce_rows(np.array([[1.0, 0.0], [3.0, 0.0]]), "max").tolist()
        [3.0, 0.0]
    """
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
