"""The Hook base class: lifecycle points, cadence, declared state, and emitting events.

A hook is a small object that the :class:`~stallguard.Guard` calls at fixed points of each optimizer
step. It keeps cheap per-step statistics on the device, reads them on the host only at check points
(every ``check_every`` steps, in one transfer for all hooks), and reports what it finds as events.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor

from ._validate import check_choice, check_int
from .events import Event, Severity

if TYPE_CHECKING:
    from .guard import Guard
    from .stats import CheckContext, Observation, StepContext

__all__ = ["REDUCTIONS", "Hook", "TrainingInterrupted"]

#: How a tensor state is combined across ranks at a check point.
#: ``"gather"`` keeps one row per rank (so a rank-local anomaly can be reported with its rank).
REDUCTIONS = ("sum", "mean", "max", "min", "any", "all", "gather")


class TrainingInterrupted(Exception):
    """Raised on purpose by a hook to stop the training loop (for example on NaN gradients).

    The Guard isolates every other exception a hook raises (it reports it and disables the hook);
    this one, and its subclasses, always reach the training loop, whatever ``strict`` says.
    """


@dataclass
class _State:
    default: Any
    reduce: str | None
    reset: bool
    is_tensor: bool


class Hook:
    """Base class of every stallguard hook, built in or your own.

    Override any of the lifecycle methods; the Guard calls only the ones a subclass overrides:

    * ``on_attach(guard)``: once, when the Guard attaches.
    * ``on_step_begin(step)``: when step ``step`` is about to start (after the previous optimizer
      step, and at attach for the first), before its forward passes.
    * ``on_before_step(ctx)``: gradients are final and unscaled and not yet clipped; the parameters
      are not yet updated. Hooks that change training (``modifies_training = True``) run after all
      others here, so observers always see the gradients as backward left them.
    * ``on_after_step(ctx)``: the parameters are updated.
    * ``on_observe(obs)``: the training loop called ``guard.observe(...)``.
    * ``on_check(check)``: a check point (every ``check_every`` steps and at close); the place for
      host-side decisions, with this hook's state already read and reduced across ranks.
    * ``on_event(event)``: an event of a kind listed in ``subscribes`` was emitted by another hook.
    * ``on_close()``: the Guard is closing.

    ``every`` and ``start_step`` set the cadence of the per-step methods (``on_before_step``,
    ``on_after_step``, ``on_observe``): they run on steps ``start_step, start_step + every, ...``.
    ``on_check`` and ``on_event`` always run.

    Args:
        every: Run the per-step methods every this many optimizer steps.
        start_step: Do nothing per step before this step.
        name: Name used as the event source and as the key in ``Guard.state_dict()``;
            the class name by default.

    Example:
        A custom check: warn when the loss is ever above a limit. The comparison stays on the
        device every step; the host reads one number per check interval.

        >>> import torch, stallguard as sg
        >>> class LossCeiling(sg.Hook):
        ...     def __init__(self, limit=10.0, **kwargs):
        ...         super().__init__(**kwargs)
        ...         self.limit = limit
        ...         self.add_state("over", torch.zeros(()), reduce="sum", reset=True)
        ...     def on_observe(self, obs):
        ...         if obs.loss is not None:
        ...             self.over += torch.as_tensor(obs.loss).detach() > self.limit
        ...     def on_check(self, check):
        ...         if check.values["over"] > 0:
        ...             self.emit("loss_ceiling", "warning", f"loss above {self.limit}", count=check.values["over"])
        >>> model = torch.nn.Linear(2, 1)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> guard = sg.Guard(model, opt, hooks=[LossCeiling(limit=0.5)], sinks=[], check_every=2)
        >>> for _ in range(2):
        ...     loss = model(torch.ones(4, 2)).pow(2).mean() + 1.0
        ...     loss.backward(); guard.observe(loss); opt.step(); opt.zero_grad()
        >>> [e.kind for e in guard.events]
        ['loss_ceiling']
        >>> guard.close()
    """

    #: Event kinds this hook receives through ``on_event``.
    subscribes: ClassVar[tuple[str, ...]] = ()
    #: True for hooks that change gradients, parameters or the optimizer (clipping, LR changes).
    modifies_training: ClassVar[bool] = False
    #: Registry name, set by ``@stallguard.register``.
    registry_name: ClassVar[str | None] = None

    def __init__(self, *, every: int = 1, start_step: int = 0, name: str | None = None) -> None:
        owner = type(self).__name__
        self.guard: Guard | None = None
        self.every = every
        self.start_step = start_step
        if name is not None and (not isinstance(name, str) or not name):
            raise ValueError(f"{owner}: name must be a non-empty str, got {name!r}")
        self.name: str = name or owner
        self._given_name = name
        self.enabled = True
        self._states: dict[str, _State] = {}
        self._handles: list[Any] = []

    # ----------------------------------------------------------------- lifecycle (override these)
    def on_attach(self, guard: Guard) -> None:
        """Called once when the Guard attaches; ``self.guard`` is set already."""

    def on_step_begin(self, step: int) -> None:
        """Called before the forward passes of optimizer step ``step``."""

    def on_before_step(self, ctx: StepContext) -> None:
        """Called with final, unscaled, unclipped gradients, before the parameters change."""

    def on_after_step(self, ctx: StepContext) -> None:
        """Called after the optimizer updated the parameters."""

    def on_observe(self, obs: Observation) -> None:
        """Called for each ``guard.observe(...)`` on a due step."""

    def on_check(self, check: CheckContext) -> None:
        """Called at each check point with this hook's states read and reduced."""

    def on_event(self, event: Event) -> None:
        """Called for each event whose kind is in ``subscribes``, emitted by another hook."""

    def on_close(self) -> None:
        """Called once when the Guard closes."""

    # ----------------------------------------------------------------- helpers for subclasses
    @property
    def every(self) -> int:
        """Run the per-step methods every this many optimizer steps (takes effect at once when set)."""
        return self._every

    @every.setter
    def every(self, value: int) -> None:
        self._every = check_int(type(self).__name__, "every", value, min=1)
        self._cadence_changed()

    @property
    def start_step(self) -> int:
        """Do nothing per step before this step (takes effect at once when set)."""
        return self._start_step

    @start_step.setter
    def start_step(self, value: int) -> None:
        self._start_step = check_int(type(self).__name__, "start_step", value, min=0)
        self._cadence_changed()

    def is_due(self, step: int) -> bool:
        """Whether the per-step methods run on optimizer step ``step``."""
        return step >= self._start_step and self.falls_on(step, self._every)

    def next_due(self, step: int) -> int | None:
        """The first step at or after ``step`` on which :meth:`is_due` can be True; None for never.

        The Guard skips a method's hooks without asking :meth:`is_due` on the steps before the earliest
        of their ``next_due``, so that steps where nothing is due cost almost nothing. It asks again
        after each check point, after ``load_state_dict`` and when ``every`` or ``start_step`` change.
        A subclass that overrides :meth:`is_due` overrides this too, with a step that is never later
        than the first due one; if it does not, the Guard asks :meth:`is_due` on every step.

        Example:
            >>> import stallguard as sg
            >>> sg.Hook(every=10, start_step=5).next_due(6)
            15
        """
        cls = type(self)
        if cls.is_due is not Hook.is_due or cls.falls_on is not Hook.falls_on:
            return step
        return self.next_on(max(step, self._start_step), self._every)

    def falls_on(self, step: int, every: int) -> bool:
        """Whether ``step`` is on a cadence of ``every`` steps counted from ``start_step`` (0: never).

        For hooks that sample different things at different cadences.
        """
        return bool(every) and (step - self._start_step) % every == 0

    def next_on(self, step: int, every: int) -> int | None:
        """The first step at or after ``step`` for which :meth:`falls_on` is True; None when ``every`` is 0.

        Example:
            >>> import stallguard as sg
            >>> sg.Hook(start_step=3).next_on(10, 4)
            11
        """
        if not every:
            return None
        r = (step - self._start_step) % every
        return step if r == 0 else step + every - r

    def _cadence_changed(self) -> None:
        # Tells the Guard that its skip-ahead schedule may be out of date (see next_due).
        guard = getattr(self, "guard", None)  # None also while a subclass sets every before Hook.__init__
        if guard is not None:
            guard._schedule_changed()

    def emit(
        self,
        kind: str,
        severity: Severity | str,
        message: str,
        *,
        causes: Iterable[str] = (),
        confidence: float | None = None,
        rank: int | None = None,
        **data: Any,
    ) -> Event:
        """Build an event from this hook and publish it through the Guard.

        Args:
            kind: Event kind (snake_case); document new kinds in ``docs/events.md``.
            severity: ``"debug"``, ``"info"``, ``"warning"``, ``"error"`` or ``"critical"``.
            message: One human sentence.
            causes: Ids from ``stallguard.CAUSES`` this event is evidence for.
            confidence: How sure, in [0, 1].
            rank: The rank this is about, when it is not the whole job.
            **data: JSON-safe evidence (numbers, strings, lists, dicts).

        Returns:
            The published event.
        """
        guard = self._require_guard("emit")
        event = Event(
            kind=kind,
            severity=severity,
            message=message,
            step=guard.step,
            source=self.name,
            data=data,
            causes=tuple(causes),
            confidence=confidence,
            epoch=guard.epoch,
            rank=rank,
            world_size=guard.world_size,
        )
        guard.publish(event)
        return event

    def add_state(self, name: str, default: Any, *, reduce: str | None = None, reset: bool = False) -> None:
        """Declare a piece of state that ``state_dict`` saves and, for tensors, the Guard syncs.

        A tensor state lives on the Guard's device as the attribute ``self.<name>``; update it in
        place (or by reassigning a tensor of the same shape) with device ops. If ``reduce`` is given,
        it is combined across ranks and read at every check point into ``check.values[name]``, all
        hooks' states in one packed transfer. Any other value (numbers, lists, dicts) is host state:
        saved and restored, never synced.

        Args:
            name: Attribute name.
            default: Initial value; a tensor for device state.
            reduce: For tensors: one of ``REDUCTIONS``, or None to keep it local and unread.
            reset: For tensors: put the default back after each check (per-interval counters).
        """
        owner = type(self).__name__
        if not isinstance(name, str) or not name.isidentifier() or name.startswith("_"):
            raise ValueError(f"{owner}.add_state: name must be a public identifier, got {name!r}")
        if name in self._states:
            raise ValueError(f"{owner}.add_state: state {name!r} is already declared")
        is_tensor = isinstance(default, Tensor)
        if reduce is not None:
            if not is_tensor:
                raise ValueError(f"{owner}.add_state({name!r}): reduce applies to tensor states only")
            check_choice(f"{owner}.add_state({name!r})", "reduce", reduce, REDUCTIONS)
        if reset and not is_tensor:
            raise ValueError(f"{owner}.add_state({name!r}): reset applies to tensor states only")
        saved = default.detach().clone() if is_tensor else copy.deepcopy(default)
        self._states[name] = _State(default=saved, reduce=reduce, reset=reset, is_tensor=is_tensor)
        device = self.guard.device if self.guard is not None else None
        value = saved.to(device).clone() if is_tensor else copy.deepcopy(default)
        setattr(self, name, value)

    def state_dict(self) -> dict[str, Any]:
        """Declared state as plain tensors (on the CPU) and Python values."""
        out: dict[str, Any] = {}
        for name, spec in self._states.items():
            value = getattr(self, name)
            out[name] = value.detach().cpu().clone() if spec.is_tensor else copy.deepcopy(value)
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned.

        Raises:
            KeyError: naming a declared state that ``state`` lacks.
            ValueError: when a saved tensor's shape differs from the declared one.
        """
        owner = type(self).__name__
        self._cadence_changed()  # restored counters (a warm-up, a one-time look) can make steps due again
        for name, spec in self._states.items():
            if name not in state:
                raise KeyError(f"{owner}.load_state_dict: missing state {name!r}")
            value = state[name]
            if spec.is_tensor:
                current: Tensor = getattr(self, name)
                value = torch.as_tensor(value)
                if value.shape != current.shape:
                    # Shapes that depend on the model (per-layer vectors) are set at attach; accept a
                    # saved shape before attach and check it afterwards.
                    if self.guard is not None:
                        raise ValueError(
                            f"{owner}.load_state_dict: state {name!r} has shape {tuple(value.shape)}, "
                            f"expected {tuple(current.shape)}"
                        )
                    setattr(self, name, value.to(current.dtype).clone())
                else:
                    current.copy_(value)
            else:
                setattr(self, name, copy.deepcopy(value))

    def get_config(self) -> dict[str, Any]:
        """Constructor arguments, read from attributes of the same names (for ``Guard.to_config``)."""
        config: dict[str, Any] = {}
        for cls in type(self).__mro__:
            if cls is object:
                continue
            for pname, param in inspect.signature(cls.__init__).parameters.items():
                if pname == "self" or param.kind in (param.VAR_KEYWORD, param.VAR_POSITIONAL):
                    continue
                if pname not in config and hasattr(self, pname):
                    config[pname] = getattr(self, pname)
        config["name"] = self._given_name  # the Guard may suffix duplicates; the config keeps what was asked
        if config["name"] is None:
            del config["name"]
        return config

    def register_handle(self, handle: Any) -> Any:
        """Track a removable handle (from a torch hook registration) so the Guard removes it on close.

        The Guard also removes a hook's handles at once if the hook fails and is disabled, so a broken
        hook never keeps running inside the model. Returns ``handle``.
        """
        if not callable(getattr(handle, "remove", None)):
            raise TypeError(f"{type(self).__name__}.register_handle: expected a handle with remove(), got {handle!r}")
        self._handles.append(handle)
        return handle

    def remove_handles(self) -> None:
        """Remove every handle registered with :meth:`register_handle`."""
        while self._handles:
            self._handles.pop().remove()

    # ----------------------------------------------------------------- used by the Guard
    def _bind(self, guard: Guard) -> None:
        self.guard = guard
        for name, spec in self._states.items():
            if spec.is_tensor:
                setattr(self, name, getattr(self, name).to(guard.device))

    def _synced_states(self) -> list[tuple[str, str]]:
        return [(n, s.reduce) for n, s in self._states.items() if s.is_tensor and s.reduce is not None]

    def _reset_pairs(self, targets: list[Tensor], defaults: list[Tensor]) -> None:
        """Add each per-interval state and its default (on the state's device) to the lists to copy."""
        for name, spec in self._states.items():
            if spec.reset:
                t: Tensor = getattr(self, name)
                if spec.default.device != t.device:
                    spec.default = spec.default.to(t.device)  # moved once, not at every check point
                targets.append(t)
                defaults.append(spec.default)

    def _require_guard(self, what: str) -> Guard:
        if self.guard is None:
            raise RuntimeError(f"{type(self).__name__}.{what}() needs the hook to be attached to a Guard")
        return self.guard

    @classmethod
    def _overrides(cls, method: str) -> bool:
        return getattr(cls, method) is not getattr(Hook, method)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"
