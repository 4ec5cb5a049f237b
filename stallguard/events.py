"""Structured events: what a hook saw, where, and what it may mean.

Every observation stallguard reports is an :class:`Event`: an immutable, versioned, JSON-safe record.
Events flow from hooks through the :class:`EventBus` to subscribed hooks and to sinks.
"""

from __future__ import annotations

import enum
import json
import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

__all__ = ["SCHEMA_VERSION", "Event", "EventBus", "Severity", "to_json_safe"]

#: Version of the event record layout. Bumped when a field changes meaning or is removed.
SCHEMA_VERSION = 1


class Severity(enum.IntEnum):
    """How much an event matters; the values match the standard ``logging`` levels."""

    DEBUG = 10
    INFO = 20
    WARNING = 30
    ERROR = 40
    CRITICAL = 50

    @classmethod
    def parse(cls, value: Severity | str | int) -> Severity:
        """Accept a Severity, its name in any case (``"warning"``) or its numeric level.

        Raises:
            ValueError: for anything else, naming the allowed values.
        """
        if isinstance(value, Severity):
            return value
        if isinstance(value, str):
            try:
                return cls[value.upper()]
            except KeyError:
                pass
        elif isinstance(value, int) and not isinstance(value, bool):
            try:
                return cls(value)
            except ValueError:
                pass
        allowed = ", ".join(repr(s.name.lower()) for s in cls)
        raise ValueError(f"severity must be one of {allowed} (or their logging levels), got {value!r}")

    def __str__(self) -> str:
        return self.name.lower()


def to_json_safe(value: Any, *, where: str = "data") -> Any:
    """Convert ``value`` into plain JSON types (dict, list, str, int, float, bool, None).

    Numpy scalars and arrays and CPU tensors become Python numbers and lists; tuples become lists.
    Non-finite floats become the strings ``"nan"``, ``"inf"`` and ``"-inf"``, so that every line is strict
    JSON and a record compares equal to itself after a round trip.

    Raises:
        TypeError: for values that have no faithful JSON form, naming where they were found.
    """
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        if math.isfinite(value):
            return float(value)
        # Strict JSON has no NaN/Infinity; strings keep the record readable by every parser.
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, enum.Enum):
        return to_json_safe(value.value, where=where)
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(f"{where}: keys must be str, got {type(k).__name__} {k!r}")
            out[k] = to_json_safe(v, where=f"{where}.{k}")
        return out
    if isinstance(value, (list, tuple)):
        return [to_json_safe(v, where=f"{where}[{i}]") for i, v in enumerate(value)]
    # numpy and torch values: imported lazily so this module stays light.
    tolist = getattr(value, "tolist", None)
    if callable(tolist) and type(value).__module__.split(".")[0] in ("numpy", "torch"):
        device = getattr(value, "device", None) if type(value).__module__.startswith("torch") else None
        if device is not None and device.type != "cpu":
            raise TypeError(f"{where}: device tensors must be read at a check point before they are emitted")
        return to_json_safe(tolist(), where=where)
    raise TypeError(f"{where}: {type(value).__name__} is not JSON-safe (use numbers, strings, lists or dicts)")


def _freeze(value: Any) -> Any:
    if isinstance(value, dict):
        return MappingProxyType({k: _freeze(v) for k, v in value.items()})
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    return value


def _thaw(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _thaw(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return [_thaw(v) for v in value]
    return value


@dataclass(frozen=True)
class Event:
    """One structured observation.

    Args:
        kind: What happened, a short snake_case id such as ``"plateau"`` (see ``docs/events.md``).
        severity: How much it matters.
        message: One human sentence.
        step: Optimizer steps completed when the event was emitted.
        source: Name of the hook (or ``"guard"``) that emitted it.
        data: JSON-safe numbers, strings and lists: the evidence.
        causes: Ids from ``stallguard.CAUSES`` that this event supports.
        confidence: How sure the emitter is, in [0, 1], when it can say.
        epoch: The epoch, when the training loop told the guard.
        time: Wall-clock time (seconds since the epoch) of emission.
        rank: Rank of the process the event is about, or None for the whole job.
        world_size: Number of processes in the job.
        schema: Version of this record layout.

    Example:
        >>> e = Event(kind="plateau", severity="warning", message="loss flat for 200 steps", step=1200,
        ...           source="PlateauDetector", data={"level": 0.69})
        >>> Event.from_dict(e.to_dict()) == e
        True
    """

    kind: str
    severity: Severity
    message: str
    step: int = 0
    source: str = "guard"
    data: Mapping[str, Any] = field(default_factory=dict)
    causes: tuple[str, ...] = ()
    confidence: float | None = None
    epoch: int | None = None
    time: float = field(default_factory=time.time)
    rank: int | None = None
    world_size: int = 1
    schema: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        if not isinstance(self.kind, str) or not self.kind:
            raise ValueError(f"Event.kind must be a non-empty str, got {self.kind!r}")
        object.__setattr__(self, "severity", Severity.parse(self.severity))
        if not isinstance(self.message, str):
            raise TypeError(f"Event.message must be a str, got {type(self.message).__name__}")
        if self.confidence is not None:
            c = float(self.confidence)
            if not 0.0 <= c <= 1.0 or math.isnan(c):
                raise ValueError(f"Event.confidence must lie in [0, 1], got {self.confidence!r}")
            object.__setattr__(self, "confidence", c)
        object.__setattr__(self, "causes", tuple(self.causes))
        object.__setattr__(self, "data", _freeze(to_json_safe(dict(self.data))))

    def to_dict(self) -> dict[str, Any]:
        """A plain, JSON-safe dict of every field; :meth:`from_dict` reverses it."""
        return {
            "schema": self.schema,
            "step": self.step,
            "epoch": self.epoch,
            "time": self.time,
            "kind": self.kind,
            "severity": str(self.severity),
            "source": self.source,
            "message": self.message,
            "data": _thaw(self.data),
            "causes": list(self.causes),
            "confidence": self.confidence,
            "rank": self.rank,
            "world_size": self.world_size,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Event:
        """Rebuild an event from :meth:`to_dict` output (or a parsed JSONL line).

        Raises:
            ValueError: when the record is from a newer schema or lacks a required field.
        """
        schema = int(d.get("schema", SCHEMA_VERSION))
        if schema > SCHEMA_VERSION:
            raise ValueError(f"event schema {schema} is newer than this stallguard understands ({SCHEMA_VERSION})")
        missing = [k for k in ("kind", "severity", "message") if k not in d]
        if missing:
            raise ValueError(f"event record lacks required field(s) {missing}: {dict(d)!r}")
        return cls(
            kind=d["kind"],
            severity=Severity.parse(d["severity"]),
            message=d["message"],
            step=int(d.get("step", 0)),
            source=d.get("source", "guard"),
            data=d.get("data") or {},
            causes=tuple(d.get("causes") or ()),
            confidence=d.get("confidence"),
            epoch=d.get("epoch"),
            time=float(d.get("time", 0.0)),
            rank=d.get("rank"),
            world_size=int(d.get("world_size", 1)),
            schema=schema,
        )

    def to_json(self) -> str:
        """One line of JSON, without a trailing newline."""
        return json.dumps(self.to_dict(), separators=(",", ":"), sort_keys=False)

    @classmethod
    def from_json(cls, line: str) -> Event:
        """Parse one line written by :meth:`to_json`."""
        return cls.from_dict(json.loads(line))

    def __str__(self) -> str:
        where = f"step {self.step}" + (f", rank {self.rank}" if self.rank is not None else "")
        return f"[{self.severity}] {self.kind} ({self.source}, {where}): {self.message}"


EventHandler = Callable[[Event], None]


class EventBus:
    """Publish/subscribe by event kind. ``"*"`` subscribes to every kind.

    The bus only routes; error isolation is the caller's job (the Guard wraps each handler).

    Example:
        >>> bus = EventBus()
        >>> seen = []
        >>> bus.subscribe("plateau", seen.append)
        >>> bus.publish(Event(kind="plateau", severity="warning", message="flat"))
        >>> len(seen)
        1
    """

    def __init__(self) -> None:
        self._handlers: dict[str, list[EventHandler]] = {}

    def subscribe(self, kinds: str | Iterable[str], handler: EventHandler) -> None:
        """Call ``handler(event)`` for every published event of the given kind(s)."""
        for kind in [kinds] if isinstance(kinds, str) else list(kinds):
            if not isinstance(kind, str) or not kind:
                raise ValueError(f"event kinds must be non-empty str, got {kind!r}")
            self._handlers.setdefault(kind, []).append(handler)

    def unsubscribe(self, handler: EventHandler) -> None:
        """Remove ``handler`` from every kind it was subscribed to."""
        for handlers in self._handlers.values():
            while handler in handlers:
                handlers.remove(handler)

    def handlers_for(self, kind: str) -> list[EventHandler]:
        """The handlers an event of ``kind`` reaches, in subscription order."""
        return [*self._handlers.get(kind, ()), *self._handlers.get("*", ())]

    def publish(self, event: Event) -> None:
        """Deliver ``event`` to its handlers."""
        for handler in self.handlers_for(event.kind):
            handler(event)
