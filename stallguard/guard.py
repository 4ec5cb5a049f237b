"""The Guard: attaches hooks to a training loop, runs them, and routes their events.

The Guard is the one object a training script holds. It registers step pre/post hooks on the
optimizer(s) (it never replaces ``optimizer.step``), calls its hooks at each lifecycle point, shares
per-step statistics between them, runs a check point every ``check_every`` optimizer steps (one
packed read of every hook's state, one collective under torch.distributed), and hands the events to
the sinks and to the hooks that subscribed to them.
"""

from __future__ import annotations

import collections
import logging
import math
import traceback
import weakref
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ._validate import check_float, check_int, check_type
from .distributed import DistributedContext, SyncTimeoutError, pack_value, unpack_value
from .events import Event, Severity
from .hook import Hook, TrainingInterrupted
from .registry import create, default_hooks
from .sinks import LoggingSink, Sink, create_sink
from .stats import CheckContext, Observation, StepContext

__all__ = ["Guard", "Series"]

_log = logging.getLogger("stallguard")

# Optimizers watched by a live Guard: a second Guard on the same optimizer is refused clearly.
_WATCHED: weakref.WeakKeyDictionary[torch.optim.Optimizer, weakref.ref[Guard]] = weakref.WeakKeyDictionary()

_LIFECYCLE = (
    "on_attach",
    "on_step_begin",
    "on_before_step",
    "on_after_step",
    "on_observe",
    "on_check",
    "on_event",
    "on_close",
)

# The per-step methods, whose hooks run only on the steps where they are due.
_PER_STEP = ("on_observe", "on_before_step", "on_after_step")
_NONE_DUE: tuple[Hook, ...] = ()

# Which packed collective carries each reduction (see stallguard.distributed).
_BUCKET = {"max": "max", "min": "max", "any": "max", "all": "max", "sum": "sum", "mean": "sum", "gather": "gather"}

_CONFIG_KEYS = {
    "hooks",
    "sinks",
    "repair",
    "check_every",
    "early_check",
    "strict",
    "max_events",
    "emit_rank",
    "history",
    "close_timeout",
}


def _frozen(a: np.ndarray) -> np.ndarray:
    a.flags.writeable = False
    return a


class Series:
    """The host-side history of one scalar stream (the loss, or a metric such as ``val_loss``).

    Values arrive at check points (tensor values are read in the check point's one transfer).
    Several values observed within one optimizer step (gradient accumulation) are averaged; under
    torch.distributed each value is the mean over ranks.

    Attributes:
        name: The stream's name.
        total: How many values were ever appended, including those the bounded history dropped;
            a reader that remembers it can tell which values are new since its last look.
    """

    def __init__(self, name: str, maxlen: int) -> None:
        self.name = name
        self.total = 0
        self._maxlen = maxlen
        # Growing arrays that hold the live history in [start, end): reading is a view, not a copy,
        # and a check point appends its interval's values in one slice assignment.
        self._step_buf = np.zeros(0, dtype=np.int64)
        self._value_buf = np.zeros(0, dtype=np.float64)
        self._start = self._end = 0

    @property
    def steps(self) -> np.ndarray:
        """Optimizer steps completed when each value was observed (a read-only array)."""
        return _frozen(self._step_buf[self._start : self._end])

    @property
    def values(self) -> np.ndarray:
        """The values, oldest first, as float64 (a read-only array)."""
        return _frozen(self._value_buf[self._start : self._end])

    def last(self, n: int) -> np.ndarray:
        """The last ``n`` values (fewer if fewer were observed)."""
        v = self.values
        return v[-n:] if n > 0 else v[:0]

    def __len__(self) -> int:
        return self._end - self._start

    def _extend(self, steps: np.ndarray, values: np.ndarray) -> None:
        k = len(values)
        self.total += k
        if k > self._maxlen:
            steps, values, k = steps[-self._maxlen :], values[-self._maxlen :], self._maxlen
        if self._end + k > len(self._value_buf):
            # Move the part still kept to a new buffer of twice its size (at most 2 * maxlen): earlier
            # views stay valid, and the copying stays amortized O(1) per value.
            keep = min(self._end - self._start, self._maxlen - k)
            size = min(max(2 * (keep + k), 64), 2 * self._maxlen)
            step_buf, value_buf = np.empty(size, dtype=np.int64), np.empty(size, dtype=np.float64)
            step_buf[:keep] = self._step_buf[self._end - keep : self._end]
            value_buf[:keep] = self._value_buf[self._end - keep : self._end]
            self._step_buf, self._value_buf, self._start, self._end = step_buf, value_buf, 0, keep
        self._step_buf[self._end : self._end + k] = steps
        self._value_buf[self._end : self._end + k] = values
        self._end += k
        self._start = max(self._start, self._end - self._maxlen)

    def since(self, total: int) -> tuple[np.ndarray, np.ndarray]:
        """Steps and values appended after the first ``total`` (as far as the history still holds them)."""
        n = min(max(self.total - total, 0), len(self))
        return self.steps[len(self) - n :], self.values[len(self) - n :]

    def __repr__(self) -> str:
        return f"Series({self.name!r}, n={len(self)})"


class _Pending:
    """The values of one observed stream since the last check point, in a reused device buffer.

    Each value is copied into the next slot of a float64 tensor on the values' device (one small
    device op, no host read). Keeping the value tensors themselves would pin one small allocation per
    step between the step's large temporaries, which keeps the allocator from returning freed memory:
    measured +60 MiB peak RSS over a 50-step interval of a small transformer on CPU.
    """

    __slots__ = ("buf", "n", "slots", "steps")

    def __init__(self, device: torch.device, capacity: int) -> None:
        self.buf = torch.empty(max(capacity, 1), dtype=torch.float64, device=device)
        self.slots = self.buf.unbind(0)  # one view per slot, made once: indexing per add is a dispatch
        self.n = 0
        self.steps: list[int] = []

    def add(self, step: int, value: Tensor | float) -> None:
        """Copy ``value`` (a detached scalar tensor or a float) into the next slot."""
        if self.n == len(self.slots):  # more values than steps (accumulation): grow, rarely
            bigger = self.buf.new_empty(2 * self.n)
            bigger[: self.n].copy_(self.buf)
            self.buf = bigger
            self.slots = bigger.unbind(0)
        slot = self.slots[self.n]
        if isinstance(value, Tensor):
            slot.copy_(value, non_blocking=value.device == self.buf.device)
        else:
            slot.fill_(value)
        self.n += 1
        self.steps.append(step)

    def values(self) -> Tensor:
        return self.buf[: self.n]

    def take_steps(self) -> list[int]:
        steps, self.steps, self.n = self.steps, [], 0
        return steps


def _unwrap(model: nn.Module) -> nn.Module:
    """The module whose parameters and submodules the hooks should see."""
    m = model
    for _ in range(8):
        if isinstance(m, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            m = m.module
            continue
        orig = getattr(m, "_orig_mod", None)  # torch.compile's OptimizedModule
        if isinstance(orig, nn.Module):
            m = orig
            continue
        break
    return m


def _is_scalar_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


class Guard:
    """Watch a training run, say why its loss is not decreasing, and optionally repair it.

    Two lines attach it to a plain PyTorch loop: build it after the model and optimizer, and call
    :meth:`observe` once per batch. It hooks ``optimizer.step`` through the optimizer's step hooks, so
    every optimizer step runs the hooks with final gradients.

    Args:
        model: The model (plain, DDP-wrapped or ``torch.compile``d), or None when only the optimizer
            and observed scalars are to be watched.
        optimizer: One optimizer, a list of them, or None (then call :meth:`before_step` and
            :meth:`after_step` yourself).
        hooks: The hooks to run. None runs the default set (see :func:`stallguard.default_hooks`).
        sinks: Where events go. None logs them to the ``stallguard`` logger; ``[]`` keeps them only
            in :attr:`events`. Entries may be sink objects or config entries such as ``"jsonl"``.
        repair: Also run the hooks that change training: LR reduction on plateaus and divergence,
            adaptive gradient clipping, and skipping non-finite steps. With explicit ``hooks``, the
            repair hooks are added unless a hook of the same class is already there.
        check_every: Optimizer steps between check points, where hooks read their statistics
            (one batched device-to-host transfer) and decide.
        early_check: One more check point after this many optimizer steps (fewer than
            ``check_every``; 0 for none). By default 1 with ``repair=True``, none otherwise: an LR
            far too high can wreck a model in its first few steps (every ReLU dead), so the repair
            set judges the first update at once; only a cut right after it saves such a run.
        scaler: The ``torch.amp.GradScaler`` of a mixed-precision loop, so that steps it skips are
            reported as skipped steps.
        attach_optimizer: Register the optimizer step hooks. With False, call :meth:`before_step`
            and :meth:`after_step` around each optimizer step yourself.
        strict: Re-raise exceptions from hooks and sinks instead of reporting and disabling them.
        max_events: How many events :attr:`events` keeps.
        emit_rank: Under torch.distributed, the rank whose sinks write, so that each event reaches
            them once per job; ``"all"`` (or None) makes every rank write. See ``docs/distributed.md``.
        history: How many values each observed scalar stream keeps on the host.
        close_timeout: Under torch.distributed, how many seconds :meth:`close` waits for every rank to
            join its final check point before it skips it with a warning (None: wait as long as the
            process group allows).

    Example:
        >>> import torch, stallguard as sg
        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.05)
        >>> x, y = torch.randn(64, 8), torch.randn(64, 1)
        >>> with sg.Guard(model, opt, sinks=[]) as guard:
        ...     for _ in range(20):
        ...         loss = torch.nn.functional.mse_loss(model(x), y)
        ...         opt.zero_grad(); loss.backward()
        ...         guard.observe(loss, inputs=x, outputs=model(x), targets=y)
        ...         opt.step()
        >>> guard.step
        20
    """

    def __init__(
        self,
        model: nn.Module | None = None,
        optimizer: torch.optim.Optimizer | Sequence[torch.optim.Optimizer] | None = None,
        *,
        hooks: Iterable[Hook] | None = None,
        sinks: Iterable[Sink | str | dict[str, Any]] | None = None,
        repair: bool = False,
        check_every: int = 50,
        early_check: int | None = None,
        scaler: Any = None,
        attach_optimizer: bool = True,
        strict: bool = False,
        max_events: int = 10_000,
        emit_rank: int | str | None = 0,
        history: int = 100_000,
        close_timeout: float | None = 60.0,
    ) -> None:
        if model is not None and not isinstance(model, nn.Module):
            raise TypeError(f"Guard: model must be a torch.nn.Module or None, got {type(model).__name__}")
        self.model = model
        self.module: nn.Module | None = _unwrap(model) if model is not None else None
        self.optimizers: list[torch.optim.Optimizer] = self._check_optimizers(optimizer)
        self.check_every = check_int("Guard", "check_every", check_every, min=1)
        self.repair = check_type("Guard", "repair", repair, bool, "a bool")
        if early_check is None:
            early_check = 1 if repair and self.check_every > 1 else None
        else:
            early_check = check_int("Guard", "early_check", early_check, min=0, max=self.check_every - 1) or None
        self.early_check: int | None = early_check
        self.strict = check_type("Guard", "strict", strict, bool, "a bool")
        self.attach_optimizer = check_type("Guard", "attach_optimizer", attach_optimizer, bool, "a bool")
        self.max_events = check_int("Guard", "max_events", max_events, min=1)
        self.history = check_int("Guard", "history", history, min=1)
        if emit_rank is not None and emit_rank != "all":
            check_int("Guard", "emit_rank", emit_rank, min=0)
        if close_timeout is not None:
            close_timeout = check_float("Guard", "close_timeout", close_timeout, min=0.0, min_open=True)
        self.close_timeout = close_timeout
        if scaler is not None and not callable(getattr(scaler, "get_backoff_factor", None)):
            raise TypeError(f"Guard: scaler must be a torch.amp.GradScaler or None, got {type(scaler).__name__}")
        self.scaler = scaler
        self._distributed = DistributedContext(model, emit_rank=emit_rank)

        self.device = self._find_device()
        self.clock = 0
        self.step = 0
        self.optimizer_steps = [0] * len(self.optimizers)
        self._epoch: int | None = None
        self._events: collections.deque[Event] = collections.deque(maxlen=self.max_events)
        self._series: dict[str, Series] = {}
        self._pending: dict[str, _Pending] = {}
        self._sample_views: dict[int, Any] = {}  # per optimizer: views of the sampled update elements (stats.py)
        self._observe_count = 0
        self._last_check_step = 0
        self._stop_reasons: list[str] = []
        self._closed = False
        self._handles: list[Any] = []
        self._contexts: dict[int, StepContext] = {}
        # Per per-step method: no hook is due before this step (see Hook.next_due); 0 = ask every hook.
        self._quiet: dict[str, int | float] = dict.fromkeys(_PER_STEP, 0)
        self._due_seen: dict[str, tuple[int, list[Hook]]] = {m: (-1, []) for m in _PER_STEP}
        self._publish_depth = 0
        self.sink_failures: dict[int, int] = {}
        # Under torch.distributed: whether this rank's observed loss was non-finite since the last step
        # (device bool), and per rank, steps with non-finite gradients / losses and the first such step.
        self._loss_bad: Tensor | None = None
        self._rank_nonfinite: Tensor | None = None
        self._remote_failures: set[tuple[str, int]] = set()
        self._disabled_elsewhere: set[int] = set()

        self.sinks: list[Sink] = self._build_sinks(sinks)
        self.hooks: list[Hook] = self._build_hooks(hooks)
        self._param_names = self._name_parameters()
        self._opt_params: dict[int, tuple[tuple[int, ...], list[Any], list[str]]] = {}
        self._index_hooks()
        self._attach()

    # ----------------------------------------------------------------- construction helpers
    @staticmethod
    def _check_optimizers(optimizer: Any) -> list[torch.optim.Optimizer]:
        if optimizer is None:
            return []
        opts = [optimizer] if isinstance(optimizer, torch.optim.Optimizer) else optimizer
        if not isinstance(opts, Sequence) or isinstance(opts, (str, bytes)):
            raise TypeError(
                f"Guard: optimizer must be a torch.optim.Optimizer, a list of them, or None, "
                f"got {type(optimizer).__name__}"
            )
        opts = list(opts)
        for i, opt in enumerate(opts):
            if not isinstance(opt, torch.optim.Optimizer):
                raise TypeError(f"Guard: optimizer[{i}] must be a torch.optim.Optimizer, got {type(opt).__name__}")
        if len({id(o) for o in opts}) != len(opts):
            raise ValueError("Guard: the same optimizer appears twice in optimizer")
        return opts

    def _find_device(self) -> torch.device:
        tensors: Iterable[Tensor] = ()
        if self.module is not None:
            tensors = self.module.parameters()
        for p in tensors:
            return p.device
        for opt in self.optimizers:
            for group in opt.param_groups:
                for p in group["params"]:
                    return p.device
        return torch.device("cpu")

    def _build_sinks(self, sinks: Iterable[Any] | None) -> list[Sink]:
        if sinks is None:
            return [LoggingSink()]
        if isinstance(sinks, (Sink, str, dict)) or not isinstance(sinks, Iterable):
            raise TypeError(
                f"Guard: sinks must be a list of sinks (wrap a single sink in a list), got {type(sinks).__name__}"
            )
        entries = list(sinks)
        if not self._distributed.should_emit():
            # Config entries are built on the writing rank only, so the other ranks open no file.
            entries = [s for s in entries if isinstance(s, Sink)]
        return [create_sink(s) for s in entries]

    def _build_hooks(self, hooks: Iterable[Hook] | None) -> list[Hook]:
        if hooks is None:
            built = default_hooks(repair=self.repair)
        else:
            if isinstance(hooks, Hook) or not isinstance(hooks, Iterable):
                raise TypeError(
                    f"Guard: hooks must be a list of Hook objects (wrap a single hook in a list), "
                    f"got {type(hooks).__name__}"
                )
            built = list(hooks)
            for i, h in enumerate(built):
                if not isinstance(h, Hook):
                    raise TypeError(f"Guard: hooks[{i}] must be a stallguard.Hook, got {type(h).__name__} {h!r}")
                if h.guard is not None:
                    raise ValueError(f"Guard: hooks[{i}] ({h.name}) is already attached to another Guard")
            if len({id(h) for h in built}) != len(built):
                raise ValueError("Guard: the same hook object appears twice in hooks")
            if self.repair:
                present = {type(h) for h in built}
                built += [h for h in default_hooks(repair=True) if h.modifies_training and type(h) not in present]
        if self.scaler is not None:
            built.append(create("skipped_steps", scaler=self.scaler))
        seen: dict[str, int] = {}
        for h in built:
            if h.name in seen:
                seen[h.name] += 1
                h.name = f"{h.name}#{seen[h.name]}"
            else:
                seen[h.name] = 1
        return built

    def _name_parameters(self) -> dict[int, str]:
        names: dict[int, str] = {}
        if self.model is not None:
            for n, p in self.model.named_parameters():
                names.setdefault(id(p), n)
            if self.module is not self.model:
                # Names as the user wrote them (without "module." or "_orig_mod." prefixes) win.
                for n, p in self.module.named_parameters():  # type: ignore[union-attr]
                    names[id(p)] = n
        return names

    def _index_hooks(self) -> None:
        self._by_method: dict[str, list[Hook]] = {
            m: [h for h in self.hooks if type(h)._overrides(m)] for m in _LIFECYCLE
        }
        # Observers first: every hook sees the gradients before a repair hook clips or zeroes them.
        before = self._by_method["on_before_step"]
        self._by_method["on_before_step"] = [h for h in before if not h.modifies_training] + [
            h for h in before if h.modifies_training
        ]
        self._subscribers: dict[str, list[Hook]] = {}
        for h in self.hooks:
            for kind in h.subscribes:
                self._subscribers.setdefault(kind, []).append(h)

    def _attach(self) -> None:
        for opt in self.optimizers:
            other = _WATCHED.get(opt)
            live = other() if other is not None else None
            if live is not None and not live._closed:
                raise RuntimeError(
                    "Guard: this optimizer is already watched by another Guard; close() that Guard first "
                    "(one Guard can run any number of hooks)"
                )
        for opt in self.optimizers:
            _WATCHED[opt] = weakref.ref(self)
        try:
            if self.attach_optimizer:
                for i, opt in enumerate(self.optimizers):
                    self._handles.append(opt.register_step_pre_hook(self._make_pre_hook(i)))
                    self._handles.append(opt.register_step_post_hook(self._make_post_hook(i)))
            for h in self.hooks:
                h._bind(self)
            for h in self.hooks:
                self._call(h, "on_attach", self)
            self._step_begin(1)
        except BaseException:
            # A Guard that fails to build (strict mode) must leave the model and optimizer untouched.
            self._detach()
            raise

    def _make_pre_hook(self, index: int) -> Any:
        def pre_hook(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            self._before(index)

        return pre_hook

    def _make_post_hook(self, index: int) -> Any:
        def post_hook(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            self._after(index)

        return post_hook

    @classmethod
    def from_config(
        cls,
        model: nn.Module | None,
        optimizer: torch.optim.Optimizer | Sequence[torch.optim.Optimizer] | None,
        config: Mapping[str, Any],
        **overrides: Any,
    ) -> Guard:
        """Build a Guard from a JSON-compatible dict, so a run's hook set can live in a config file.

        ``config`` may hold ``hooks`` (a list of registry names or ``{"hook": name, **params}`` dicts,
        where ``params`` may include the instance ``name``; ``{"name": registry_name, ...}`` is accepted
        when ``"hook"`` is absent; null or absent for the defaults), ``sinks`` (names or dicts such as
        ``{"name": "jsonl", "path": ...}``) and the Guard's own keyword arguments (``repair``,
        ``check_every``, ``early_check``, ``strict``, ``max_events``, ``emit_rank``, ``history``). ``overrides`` pass
        objects a file cannot hold (``scaler=``).

        Raises:
            ValueError: for unknown keys or hook names, naming what is allowed.

        Example:
            >>> import torch, stallguard as sg
            >>> model = torch.nn.Linear(4, 2)
            >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
            >>> cfg = {"check_every": 10, "hooks": [{"hook": "plateau", "patience": 50}], "sinks": []}
            >>> guard = sg.Guard.from_config(model, opt, cfg)
            >>> [type(h).__name__ for h in guard.hooks], guard.check_every
            (['PlateauDetector'], 10)
            >>> guard.close()
        """
        if not isinstance(config, Mapping):
            raise TypeError(f"Guard.from_config: config must be a dict, got {type(config).__name__}")
        unknown = set(config) - _CONFIG_KEYS
        if unknown:
            raise ValueError(
                f"Guard.from_config: unknown key(s) {sorted(unknown)}; allowed: {', '.join(sorted(_CONFIG_KEYS))}"
            )
        kwargs: dict[str, Any] = {k: v for k, v in config.items() if k not in ("hooks", "sinks")}
        hooks_cfg = config.get("hooks")
        if hooks_cfg is not None:
            if not isinstance(hooks_cfg, list):
                raise TypeError(f"Guard.from_config: hooks must be a list, got {type(hooks_cfg).__name__}")
            hooks = []
            for i, entry in enumerate(hooks_cfg):
                if isinstance(entry, str):
                    hooks.append(create(entry))
                elif isinstance(entry, Mapping) and isinstance(entry.get("hook", entry.get("name")), str):
                    params = dict(entry)
                    registry_name = params.pop("hook") if "hook" in params else params.pop("name")
                    hooks.append(create(registry_name, **params))
                else:
                    raise ValueError(
                        f"Guard.from_config: hooks[{i}] must be a hook name or a dict with a 'hook' name, got {entry!r}"
                    )
            kwargs["hooks"] = hooks
        if "sinks" in config:
            kwargs["sinks"] = config["sinks"]
        kwargs.update(overrides)
        return cls(model, optimizer, **kwargs)

    def to_config(self) -> dict[str, Any]:
        """The JSON-compatible config that :meth:`from_config` turns back into this hook set.

        Hooks without a registry name (unregistered custom classes) are left out.
        """
        hooks = []
        for h in self.hooks:
            if h.registry_name is None or h.registry_name == "skipped_steps":
                continue
            hooks.append({"hook": h.registry_name, **h.get_config()})
        config: dict[str, Any] = {
            "check_every": self.check_every,
            "repair": self.repair,
            "strict": self.strict,
            "hooks": hooks,
        }
        if self.early_check != (1 if self.repair and self.check_every > 1 else None):
            config["early_check"] = self.early_check or 0
        return config

    # ----------------------------------------------------------------- public properties
    @property
    def events(self) -> list[Event]:
        """The events so far, oldest first (the last ``max_events``)."""
        return list(self._events)

    @property
    def should_stop(self) -> bool:
        """True once a hook has asked training to stop (the same on every rank)."""
        return bool(self._stop_reasons)

    @property
    def stop_reasons(self) -> list[str]:
        """Why hooks asked to stop, in order."""
        return list(self._stop_reasons)

    @property
    def epoch(self) -> int | None:
        """The epoch, as last told by the loop (``guard.epoch = e`` or ``observe(epoch=e)``)."""
        return self._epoch

    @epoch.setter
    def epoch(self, value: int | None) -> None:
        if value is not None:
            check_int("Guard", "epoch", value, min=0)
        self._epoch = value

    @property
    def rank(self) -> int:
        """This process's rank (0 without torch.distributed)."""
        return self._distributed.rank

    @property
    def world_size(self) -> int:
        """The number of processes in the job (1 without torch.distributed)."""
        return self._distributed.world_size

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` has run."""
        return self._closed

    def series(self, name: str = "loss") -> Series:
        """The host history of an observed scalar stream, as of the last check point.

        Raises:
            KeyError: naming the known streams, when ``name`` was never observed.
        """
        try:
            return self._series[name]
        except KeyError:
            known = ", ".join(sorted(self._series)) or "none yet"
            raise KeyError(f"no observed stream named {name!r}; known streams: {known}") from None

    def has_series(self, name: str) -> bool:
        """Whether a stream of this name has values (as of the last check point)."""
        return name in self._series and len(self._series[name]) > 0

    def hook(self, name_or_type: str | type[Hook]) -> Hook | None:
        """The first attached hook with this name, registry name, or class; None if there is none."""
        for h in self.hooks:
            if isinstance(name_or_type, str):
                if name_or_type in (h.name, h.registry_name, type(h).__name__):
                    return h
            elif isinstance(h, name_or_type):
                return h
        return None

    def parameter_name(self, p: Tensor) -> str | None:
        """The name of parameter ``p`` in the model, or None if the model does not hold it."""
        return self._param_names.get(id(p))

    def optimizer_parameters(self, index: int = 0) -> tuple[list[Any], list[str]]:
        """The parameters of optimizer ``index`` in param-group order, with their names."""
        opt = self.optimizers[index]
        signature = tuple(len(g["params"]) for g in opt.param_groups)
        cached = self._opt_params.get(index)
        if cached is None or cached[0] != signature:
            params, names = [], []
            for j, group in enumerate(opt.param_groups):
                for k, p in enumerate(group["params"]):
                    params.append(p)
                    names.append(self._param_names.get(id(p), f"optimizer[{index}].group[{j}].param[{k}]"))
            cached = self._opt_params[index] = (signature, params, names)
        return cached[1], cached[2]

    # ----------------------------------------------------------------- the training loop's calls
    def observe(
        self,
        loss: Tensor | float | None = None,
        *,
        inputs: Any = None,
        outputs: Any = None,
        targets: Any = None,
        epoch: int | None = None,
        **metrics: Tensor | float,
    ) -> None:
        """Report what the loop computed. Call it after ``loss.backward()``, before or after the step.

        Nothing here reads a device value: tensors are kept and read at the next check point.

        Args:
            loss: The training loss of this batch, a scalar tensor or a float.
            inputs: The batch inputs (a tensor), for input checks.
            outputs: The model outputs (a tensor), for output and label checks.
            targets: The targets (a tensor), for label checks.
            epoch: The current epoch, if the loop counts them.
            **metrics: Any named scalars, such as ``val_loss=0.41`` (floats or scalar tensors).

        Raises:
            TypeError: for a loss, metric or batch argument of the wrong type (batch arguments are
                checked on the first call and on the calls whose batch a hook reads).
            ValueError: for a non-scalar loss or metric, or batch tensors of different lengths.
        """
        if self._closed:
            raise RuntimeError("Guard.observe() called after close()")
        loss = self._check_scalar("loss", loss)
        for key in metrics:
            metrics[key] = self._check_scalar(key, metrics[key])
            if metrics[key] is None:
                raise TypeError(f"Guard.observe: metric {key}=None; pass a number or a scalar tensor")
        if epoch is not None:
            self.epoch = epoch
        step = self.step
        if loss is not None:
            self._stream("loss", loss).add(step, loss)
            if self._distributed.multi:
                # Kept on the device: it names the rank a NaN came from when the step's flags are agreed.
                bad = ~torch.isfinite(torch.as_tensor(loss, device=self.device))
                self._loss_bad = bad if self._loss_bad is None else self._loss_bad | bad
        for key, value in metrics.items():
            self._stream(key, value).add(step, value)
        index = self._observe_count
        self._observe_count += 1
        due = self._due("on_observe", step)
        if due or index == 0:
            # Only hooks read the batch, on their steps: checked there (and on the first call), not on every step.
            self._check_batch(inputs, outputs, targets)
        if not due:
            return
        obs = Observation(
            step=step,
            loss=loss,
            inputs=inputs,
            outputs=outputs,
            targets=targets,
            metrics=dict(metrics),
            index=index,
        )
        for h in due:
            self._call(h, "on_observe", obs)

    @staticmethod
    def _check_scalar(name: str, value: Any) -> Tensor | float | None:
        if value is None:
            return None
        if isinstance(value, Tensor):
            if value.dim() == 0 and value.is_floating_point():  # the common case, in few calls
                return value.detach() if value.requires_grad else value
            if value.numel() != 1:
                raise ValueError(
                    f"Guard.observe: {name} must be a scalar (one element), got a tensor of shape "
                    f"{tuple(value.shape)}; reduce it first, e.g. {name}.mean()"
                )
            if value.is_complex() or not (value.is_floating_point() or value.dtype in (torch.int32, torch.int64)):
                raise TypeError(f"Guard.observe: {name} must be a real number, got a {value.dtype} tensor")
            value = value.detach()
            return value if value.dim() == 0 else value.reshape(())
        if _is_scalar_number(value):
            return float(value)
        if type(value).__module__ == "numpy" and getattr(value, "size", 0) == 1:
            return float(value)
        raise TypeError(f"Guard.observe: {name} must be a scalar tensor or a number, got {type(value).__name__}")

    @staticmethod
    def _check_batch(inputs: Any, outputs: Any, targets: Any) -> None:
        # The common case first, without building anything (it runs every step): tensors of one batch length.
        n = -1
        for v in (inputs, outputs, targets):
            if v is None:
                continue
            if not isinstance(v, Tensor) or v.dim() == 0 or (n >= 0 and v.size(0) != n):
                break
            n = v.size(0)
        else:
            return
        batch = {"inputs": inputs, "outputs": outputs, "targets": targets}
        sizes = {}
        for key, value in batch.items():
            if value is None:
                continue
            if not isinstance(value, Tensor):
                raise TypeError(
                    f"Guard.observe: {key} must be a tensor (the batch, first dimension = samples), "
                    f"got {type(value).__name__}"
                )
            if value.dim() == 0:
                raise ValueError(f"Guard.observe: {key} must have a batch dimension, got a 0-d tensor")
            sizes[key] = value.shape[0]
        if len(set(sizes.values())) > 1:
            detail = ", ".join(f"{k} has {v}" for k, v in sizes.items())
            raise ValueError(
                f"Guard.observe: inputs, outputs and targets must hold the same number of samples: {detail}"
            )

    def before_step(self, optimizer_index: int = 0) -> None:
        """Run the pre-step hooks by hand (only with ``attach_optimizer=False``).

        Call it after backward (and after ``scaler.unscale_``), right before ``optimizer.step()``.
        """
        self._check_manual("before_step", optimizer_index)
        self._before(optimizer_index)

    def after_step(self, optimizer_index: int = 0) -> None:
        """Run the post-step hooks by hand (only with ``attach_optimizer=False``), right after the step."""
        self._check_manual("after_step", optimizer_index)
        self._after(optimizer_index)

    def _check_manual(self, what: str, index: int) -> None:
        if self.attach_optimizer and self.optimizers:
            raise RuntimeError(
                f"Guard.{what}() is for attach_optimizer=False; this Guard already runs on the optimizer's step hooks"
            )
        if self._closed:
            raise RuntimeError(f"Guard.{what}() called after close()")
        n = max(len(self.optimizers), 1)
        if not isinstance(index, int) or not 0 <= index < n:
            raise ValueError(f"Guard.{what}: optimizer_index must lie in [0, {n - 1}], got {index!r}")

    def _context(self, index: int) -> StepContext:
        if self.optimizers:
            params, names = self.optimizer_parameters(index)
            opt: torch.optim.Optimizer | None = self.optimizers[index]
        else:
            opt = None
            named = list(self.module.named_parameters()) if self.module is not None else []
            params, names = [p for _, p in named], [n for n, _ in named]
        return StepContext(self, self.step + 1, opt, index, params, names)

    def _before(self, index: int) -> None:
        if self._closed:
            return
        # The context (and its parameter lists) is built only on steps where some hook is due.
        due = self._due("on_before_step", self.step + 1)
        if not due:
            return
        ctx = self._contexts[index] = self._context(index)
        for h in due:
            self._call(h, "on_before_step", ctx)

    def _after(self, index: int) -> None:
        if self._closed:
            return
        ctx = self._contexts.pop(index, None)
        due = self._due("on_after_step", self.step + 1)
        if due:
            ctx = ctx or self._context(index)
            for h in due:
                self._call(h, "on_after_step", ctx)
        if self.optimizers:
            self.optimizer_steps[index] += 1
        if index == self.clock:
            self.step += 1
            if self.step % self.check_every == 0 or self.step == self.early_check:
                self.check()
            self._step_begin(self.step + 1)

    def _due(self, method: str, step: int) -> Sequence[Hook]:
        """The enabled hooks whose ``method`` runs on ``step``: none, without asking, before the next due step."""
        seen_step, seen = self._due_seen[method]
        if step == seen_step:
            # Called again on the same step (accumulation, several optimizers): ask only the hooks due
            # at the first call; the others stay quiet until their next_due, which lies after this step.
            return [h for h in seen if h.enabled and h.is_due(step)]
        if step < self._quiet[method]:
            return _NONE_DUE
        hooks = self._by_method[method]
        due = [h for h in hooks if h.enabled and h.is_due(step)]
        # Skip ahead to the first later step some hook (enabled or not: enabling takes effect at once) may be due.
        firsts = [s for h in hooks if (s := h.next_due(step + 1)) is not None]
        self._quiet[method] = min(firsts, default=math.inf)
        self._due_seen[method] = (step, due)
        return due

    def _schedule_changed(self) -> None:
        """Forget the skip-ahead steps (a cadence, a restored state or a check point may have moved them)."""
        for method in self._quiet:
            self._quiet[method] = 0
            self._due_seen[method] = (-1, [])

    def _step_begin(self, step: int) -> None:
        for h in self._by_method["on_step_begin"]:
            if h.enabled:
                self._call(h, "on_step_begin", step)

    # ----------------------------------------------------------------- check points
    def check(self, *, final: bool = False) -> None:
        """Run a check point now: read every hook's state in one transfer, then let hooks decide.

        The Guard runs one every ``check_every`` optimizer steps and one on :meth:`close`; call it
        yourself at the end of an epoch to get decisions there. Under torch.distributed every rank
        must call it at the same point: it runs one small collective that checks that every rank
        packed the same states, then one packed ``all_reduce`` for the max/min/any/all states and
        one for the sum/mean states and observed values (see ``docs/distributed.md``).

        Raises:
            LayoutMismatchError: under torch.distributed, on every rank, when the ranks packed
                different states (different hooks, state shapes, steps or observed streams).
        """
        if self._closed:
            raise RuntimeError("Guard.check() called after close()")
        self._check(final=final)

    def _check(self, *, final: bool = False, timeout: float | None = None) -> None:
        dctx = self._distributed
        # Every hook's states travel, enabled or not, so that a hook disabled on one rank only does not
        # change the layout; its flag below disables it on every rank.
        layout: list[tuple[str, Any, str, str, tuple[int, ...]]] = []
        parts: dict[str, list[Tensor]] = {"max": [], "sum": [], "gather": []}
        described: list[Any] = []
        # One process: every state travels as it is, in one vector (the cat converts the dtypes), and
        # nothing is negated or compared; the multi-rank layout packs each for its reduction instead.
        raw: list[Tensor] | None = None if dctx.multi else [torch.zeros(0, dtype=torch.float64, device=self.device)]
        for h in self.hooks:
            states = h._synced_states()
            if raw is None:
                described.append(
                    (h.name, type(h).__name__, [(n, how, tuple(getattr(h, n).shape)) for n, how in states])
                )
            for name, how in states:
                t: Tensor = getattr(h, name)
                layout.append(("hook", h, name, how, tuple(t.shape)))
                if t.device != self.device:
                    t = t.to(self.device)
                if raw is None:
                    parts[_BUCKET[how]].append(pack_value(t, how))
                else:
                    flat = t if t.dim() == 1 else t.reshape(-1)
                    raw.append(flat.detach() if flat.requires_grad else flat)
        pending: dict[str, list[int]] = {}
        for key in sorted(self._pending):  # sorted: the same layout on every rank
            stream = self._pending[key]
            if stream.n:
                layout.append(("series", key, "mean", "mean", (stream.n,)))
                values = stream.values()
                (parts["sum"] if raw is None else raw).append(values.to(self.device))
                pending[key] = stream.take_steps()  # the buffer is read by the cat below, before any new add
        if raw is not None:
            self._finish_check(layout, self._read_raw(raw, layout), pending, final)
            return
        # Which hooks failed on each rank (and were disabled there): one column per rank.
        failed = [0.0 if h.enabled or id(h) in self._disabled_elsewhere else 1.0 for h in self.hooks]
        disabled = torch.zeros(len(self.hooks), dctx.world_size, dtype=torch.float64)
        disabled[:, dctx.rank] = torch.tensor(failed, dtype=torch.float64)
        layout.append(("disabled", None, "disabled", "max", tuple(disabled.shape)))
        parts["max"].append(disabled.reshape(-1).to(self.device))
        # Whether any rank has anything new: the final check of close() runs on every rank, but
        # calls the hooks only when some rank stepped or observed since the last check point.
        news = float(self.step > self._last_check_step or bool(pending))
        layout.append(("news", None, "news", "max", (1,)))
        parts["max"].append(torch.tensor([news], dtype=torch.float64, device=self.device))
        if self._rank_nonfinite is not None:
            layout.append(("rank_nonfinite", None, "rank_nonfinite", "max", tuple(self._rank_nonfinite.shape)))
            parts["max"].append(pack_value(self._rank_nonfinite, "max"))
        dctx.check_layout(
            {
                "step": self.step,
                "hooks": described,
                "observed": [(k, len(pending[k])) for k in sorted(pending)],
                "skip_flags": self._rank_nonfinite is not None,
            },
            timeout=timeout,
        )
        empty = torch.zeros(0, dtype=torch.float64, device=self.device)
        max_flat = torch.cat(parts["max"]) if parts["max"] else empty
        sum_flat = torch.cat(parts["sum"]) if parts["sum"] else empty
        max_flat, sum_flat = dctx.reduce_packed(max_flat, sum_flat)
        gathered = dctx.gather(torch.cat(parts["gather"])) if parts["gather"] else None
        # The one device-to-host read of the check point.
        both = torch.cat([max_flat, sum_flat.to(max_flat.device)]).cpu().numpy()
        host = {"max": both[: max_flat.numel()], "sum": both[max_flat.numel() :]}
        offsets = {"max": 0, "sum": 0, "gather": 0}
        arrays: list[np.ndarray] = []
        for _, _, _, how, shape in layout:
            size = math.prod(shape)
            bucket = _BUCKET.get(how, "max")
            start = offsets[bucket]
            offsets[bucket] += size
            if bucket == "gather":
                arrays.append(np.asarray(gathered)[:, start : start + size].reshape(dctx.world_size, *shape))
            else:
                arr = np.asarray(unpack_value(host[bucket][start : start + size], how, dctx.world_size))
                arrays.append(arr.reshape(shape))
        self._finish_check(layout, arrays, pending, final)

    def _read_raw(
        self, raw: list[Tensor], layout: list[tuple[str, Any, str, str, tuple[int, ...]]]
    ) -> list[np.ndarray]:
        """One process: the states as host arrays, from one vector read in one transfer."""
        host = torch.cat(raw).cpu().numpy()  # the one device-to-host read of the check point
        arrays = []
        start = 0
        for _, _, _, how, shape in layout:
            size = math.prod(shape)
            arr = host[start : start + size]
            start += size
            if how in ("any", "all"):
                arr = arr != 0
            arrays.append(arr.reshape(1, *shape) if how == "gather" else arr.reshape(shape))
        return arrays

    def _finish_check(
        self,
        layout: list[tuple[str, Any, str, str, tuple[int, ...]]],
        arrays: list[np.ndarray],
        pending: dict[str, list[int]],
        final: bool,
    ) -> None:
        """Hand the read states to their owners, reset the per-interval states, and run the hooks' checks."""
        values_by_hook: dict[int, dict[str, Any]] = {id(h): {} for h in self.hooks}
        anything_new = True
        for (owner_kind, owner, name, _, shape), arr in zip(layout, arrays):
            if owner_kind == "hook":
                values_by_hook[id(owner)][name] = arr.item() if arr.ndim == 0 else arr
            elif owner_kind == "series":
                self._commit_series(owner, pending[owner], arr.astype(np.float64))
            elif owner_kind == "disabled":
                self._disable_where_disabled_elsewhere(arr.reshape(shape))
            elif owner_kind == "news":
                anything_new = bool(arr[0] > 0)
            else:
                self._report_rank_nonfinite(arr.reshape(shape))
        self._reset_states()
        self._last_check_step = self.step
        if final and not anything_new:
            self._flush_sinks()
            return
        for h in self._by_method["on_check"]:
            if h.enabled:
                self._call(h, "on_check", CheckContext(self, self.step, values_by_hook[id(h)], final=final))
        self._schedule_changed()  # a decision may change what a hook samples next
        self._flush_sinks()

    def _reset_states(self) -> None:
        """Put every hook's per-interval states back to their defaults, in one op."""
        targets: list[Tensor] = []
        defaults: list[Tensor] = []
        for h in self.hooks:
            h._reset_pairs(targets, defaults)
        if targets:
            torch._foreach_copy_(targets, defaults)

    def agree_nonfinite(self, bad: Tensor) -> Tensor:
        """Agree across ranks on whether this step's gradients are non-finite (device-side, no host read).

        Returns a device bool that is True on every rank when ``bad`` is True on any rank, so that a
        skipped step is skipped everywhere or nowhere. Under torch.distributed this is one
        ``all_reduce`` of ``2 * world_size`` numbers, on the step; it also records which ranks held
        non-finite gradients or observed a non-finite loss, reported as ``rank_nonfinite`` at the
        next check point. Without torch.distributed it returns ``bad`` unchanged.
        """
        dctx = self._distributed
        if not dctx.multi:
            return bad
        loss_bad = self._loss_bad if self._loss_bad is not None else torch.zeros((), dtype=torch.bool)
        self._loss_bad = None
        local = torch.stack([bad.reshape(()).to(self.device), loss_bad.reshape(()).to(self.device)])
        table = dctx.rank_flags(local)
        if self._rank_nonfinite is None:
            self._rank_nonfinite = torch.zeros(3, dctx.world_size, dtype=torch.float64, device=self.device)
            self._rank_nonfinite[2] = math.inf
        flagged = table.max(dim=0).values > 0
        self._rank_nonfinite[:2] += table.to(torch.float64)
        first = self._rank_nonfinite[2]
        torch.minimum(first, torch.where(flagged, float(self.step + 1), math.inf).to(first.dtype), out=first)
        return (table[0].max() > 0).reshape(bad.shape).to(bad.device)

    def _disable_where_disabled_elsewhere(self, disabled: np.ndarray) -> None:
        """Disable on this rank the hooks another rank disabled, and report each such failure once."""
        for h, row in zip(self.hooks, disabled):
            ranks = [r for r in range(len(row)) if row[r] > 0 and r != self.rank]
            if not ranks:
                continue
            if h.enabled:
                h.enabled = False
                self._disabled_elsewhere.add(id(h))
                h.remove_handles()
                _log.warning("stallguard: hook %s failed on rank(s) %s and is disabled on every rank", h.name, ranks)
            for r in ranks:
                if (h.name, r) in self._remote_failures:
                    continue
                self._remote_failures.add((h.name, r))
                # The failing rank's own hook_error reached only its guard.events and log; this one
                # reaches the sinks of the writing rank.
                self._publish_hook_error(
                    f"{h.name} failed on rank {r} (see that rank's log); it is disabled on every rank",
                    {"hook": h.name, "method": "unknown", "error": f"raised on rank {r}"},
                    rank=r,
                )

    def _report_rank_nonfinite(self, table: np.ndarray) -> None:
        """Name the ranks a non-finite step came from (identical numbers on every rank)."""
        assert self._rank_nonfinite is not None
        self._rank_nonfinite[:2] = 0.0
        self._rank_nonfinite[2] = math.inf
        grads, losses, first = table[0], table[1], table[2]
        origins = [r for r in range(len(losses)) if losses[r] > 0]
        if not origins:
            # Non-finite gradients on every rank are the job's, not one rank's (the clipper reports them).
            bad = [r for r in range(len(grads)) if grads[r] > 0]
            origins = bad if len(bad) < len(grads) else []
        for r in origins:
            what = "loss" if losses[r] > 0 else "gradients"
            n = int(max(losses[r], grads[r]))
            self.publish(
                Event(
                    kind="rank_nonfinite",
                    severity=Severity.WARNING,
                    message=(
                        f"rank {r} had a non-finite {what} in {n} step(s) from step {int(first[r])}; "
                        "every rank agreed on those steps"
                    ),
                    step=self.step,
                    data={
                        "rank": r,
                        "what": what,
                        "loss_steps": int(losses[r]),
                        "grad_steps": int(grads[r]),
                        "first_step": int(first[r]),
                        "ranks_with_nonfinite_grads": [i for i in range(len(grads)) if grads[i] > 0],
                    },
                    causes=("non_finite",),
                    epoch=self._epoch,
                    rank=r,
                    world_size=self.world_size,
                )
            )

    def _stream(self, key: str, first: Tensor | float) -> _Pending:
        stream = self._pending.get(key)
        if stream is None:
            device = first.device if isinstance(first, Tensor) else self.device
            # Sized for one interval, up to a bound (it doubles when an interval holds more).
            stream = self._pending[key] = _Pending(device, min(self.check_every, 4096))
        return stream

    def _commit_series(self, name: str, steps: list[int], values: np.ndarray) -> None:
        series = self._series.get(name)
        if series is None:
            series = self._series[name] = Series(name, self.history)
        at = np.asarray(steps, dtype=np.int64)
        if len(at) > 1 and bool((at[1:] == at[:-1]).any()):
            # Several values of one step (gradient accumulation): their mean.
            first = np.flatnonzero(np.concatenate(([True], at[1:] != at[:-1])))
            values = np.add.reduceat(values, first) / np.diff(np.append(first, len(at)))
            at = at[first]
        series._extend(at, values)

    # ----------------------------------------------------------------- events
    def publish(self, event: Event) -> None:
        """Record ``event``, write it to the sinks, and deliver it to subscribed hooks."""
        self._events.append(event)
        if self._distributed.should_emit():
            for sink in self.sinks:
                if sink.accepts(event):
                    self._write(sink, event)
        if self._publish_depth >= 8:
            return  # a chain of hooks reacting to each other's events stops here
        self._publish_depth += 1
        try:
            for h in self._subscribers.get(event.kind, []) + self._subscribers.get("*", []):
                if h.enabled and h.name != event.source:
                    self._call(h, "on_event", event)
        finally:
            self._publish_depth -= 1

    def request_stop(self, reason: str) -> None:
        """Ask the training loop to stop (sets :attr:`should_stop`). Hooks call this at check points."""
        self._stop_reasons.append(str(reason))

    def _write(self, sink: Sink, event: Event) -> None:
        try:
            sink.write(event)
        except Exception as exc:
            self._sink_failed(sink, exc, "write")

    def _flush_sinks(self) -> None:
        for sink in self.sinks:
            try:
                sink.flush()
            except Exception as exc:
                self._sink_failed(sink, exc, "flush")

    def _sink_failed(self, sink: Sink, exc: Exception, what: str) -> None:
        if self.strict:
            raise exc
        count = self.sink_failures.get(id(sink), 0)
        self.sink_failures[id(sink)] = count + 1
        if count:
            return
        _log.warning(
            "stallguard: sink %r failed to %s (%s: %s); the other sinks go on and every event stays in guard.events",
            sink,
            what,
            type(exc).__name__,
            exc,
        )
        event = Event(
            kind="sink_error",
            severity=Severity.ERROR,
            message=f"{sink!r} failed to {what}: {type(exc).__name__}: {exc}",
            step=self.step,
            data={"sink": repr(sink), "error": f"{type(exc).__name__}: {exc}"},
            epoch=self._epoch,
            world_size=self.world_size,
        )
        self._events.append(event)
        for other in self.sinks:
            if other is not sink and other.accepts(event) and self._distributed.should_emit():
                self._write(other, event)

    def _call(self, hook: Hook, method: str, *args: Any) -> None:
        try:
            getattr(hook, method)(*args)
        except Exception as exc:
            if self.strict or isinstance(exc, TrainingInterrupted):
                raise
            self._hook_failed(hook, method, exc)

    def _hook_failed(self, hook: Hook, method: str, exc: Exception) -> None:
        hook.enabled = False
        try:
            hook.remove_handles()
        except Exception:  # a handle that cannot be removed must not hide the original error
            _log.debug("stallguard: removing handles of %s failed", hook.name, exc_info=True)
        _log.warning(
            "stallguard: hook %s raised in %s and is disabled; training goes on.\n%s",
            hook.name,
            method,
            "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)),
        )
        self._publish_hook_error(
            f"{hook.name}.{method} raised {type(exc).__name__}: {exc}; the hook is disabled",
            {"hook": hook.name, "method": method, "error": f"{type(exc).__name__}: {exc}"},
            rank=self.rank if self._distributed.multi else None,
        )

    def _publish_hook_error(self, message: str, data: dict[str, Any], *, rank: int | None) -> None:
        self.publish(
            Event(
                kind="hook_error",
                severity=Severity.ERROR,
                message=message,
                step=self.step,
                data=data,
                epoch=self._epoch,
                rank=rank,
                world_size=self.world_size,
            )
        )

    # ----------------------------------------------------------------- diagnosis and report
    def diagnose(self) -> list[Any]:
        """The causes this run shows evidence of, most likely first ([] for a healthy run).

        Returns:
            A list of :class:`stallguard.Diagnosis` (cause, confidence, evidence, advice).
        """
        from .diagnosis import diagnose

        return diagnose(self.events, guard=self)

    def report(self) -> str:
        """A human-readable summary: the run, a timeline of key events, and the diagnosis."""
        from .diagnosis import format_report

        return format_report(self)

    # ----------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """The Guard's and every hook's state: plain tensors and Python values.

        Loadable with ``torch.load(..., weights_only=True)``. Values observed since the last check
        point are read to the host here.
        """
        pending = {
            key: [[s, v] for s, v in zip(stream.steps, stream.values().tolist())]
            for key, stream in self._pending.items()
            if stream.n
        }
        return {
            "version": 1,
            "step": self.step,
            "epoch": self._epoch,
            "optimizer_steps": list(self.optimizer_steps),
            "observe_count": self._observe_count,
            "last_check_step": self._last_check_step,
            "stop_reasons": list(self._stop_reasons),
            "series": {
                k: {"steps": s.steps.tolist(), "values": s.values.tolist(), "total": s.total}
                for k, s in self._series.items()
            },
            "pending": pending,
            "events": [e.to_dict() for e in self._events],
            "hooks": {h.name: h.state_dict() for h in self.hooks},
        }

    def load_state_dict(self, state: Mapping[str, Any], strict: bool = True) -> None:
        """Restore what :meth:`state_dict` returned, into a Guard with the same hooks.

        Args:
            state: A Guard state dict.
            strict: Raise if the hooks here and in ``state`` differ; otherwise skip the unmatched ones.

        Raises:
            KeyError: naming the hooks that do not match, when ``strict``.
        """
        if not isinstance(state, Mapping) or state.get("version") != 1:
            raise ValueError("Guard.load_state_dict: not a stallguard Guard state dict (version 1)")
        saved = state["hooks"]
        names = {h.name for h in self.hooks}
        if strict and set(saved) != names:
            raise KeyError(
                f"Guard.load_state_dict: hooks differ; missing here: {sorted(set(saved) - names)}, "
                f"missing in state: {sorted(names - set(saved))}"
            )
        self.step = int(state["step"])
        self._schedule_changed()
        self._epoch = state["epoch"]
        self.optimizer_steps = list(state["optimizer_steps"])
        self._observe_count = int(state["observe_count"])
        self._last_check_step = int(state["last_check_step"])
        self._stop_reasons = list(state["stop_reasons"])
        self._series = {}
        for key, s in state["series"].items():
            series = self._series[key] = Series(key, self.history)
            series._extend(np.asarray(s["steps"], dtype=np.int64), np.asarray(s["values"], dtype=np.float64))
            series.total = int(s.get("total", series.total))
        self._pending = {}
        for key, entries in state["pending"].items():
            for st, v in entries:
                self._stream(key, float(v)).add(int(st), float(v))
        self._events = collections.deque((Event.from_dict(e) for e in state["events"]), maxlen=self.max_events)
        for h in self.hooks:
            if h.name in saved:
                h.load_state_dict(saved[h.name])

    # ----------------------------------------------------------------- closing
    def close(self) -> None:
        """Run a final check, let hooks finish, and remove every hook the Guard added.

        Afterwards the model and optimizer behave exactly as before the Guard. Calling it twice is fine.
        """
        if self._closed:
            return
        try:
            if self._distributed.multi:
                # Every rank runs the final check, whatever it observed since the last one: a rank that
                # skipped it would leave the others waiting in its collectives.
                try:
                    self._check(final=True, timeout=self.close_timeout)
                except SyncTimeoutError as exc:
                    _log.warning("%s; the final check point is skipped on this rank", exc)
            elif self.step > self._last_check_step or any(stream.n for stream in self._pending.values()):
                self.check(final=True)
            for h in self._by_method["on_close"]:
                if h.enabled:
                    self._call(h, "on_close")
        finally:
            self._detach()
            for sink in self.sinks:
                try:
                    sink.close()
                except Exception as exc:
                    self._sink_failed(sink, exc, "close")

    def _detach(self) -> None:
        self._closed = True
        for h in self.hooks:
            h.remove_handles()
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for opt in self.optimizers:
            ref = _WATCHED.get(opt)
            if ref is not None and ref() is self:
                del _WATCHED[opt]

    def __enter__(self) -> Guard:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        hooks = ", ".join(h.name for h in self.hooks)
        return f"Guard(step={self.step}, check_every={self.check_every}, hooks=[{hooks}])"
