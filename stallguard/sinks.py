"""Where events go: standard logging, JSON Lines files, memory, any callable, TensorBoard.

A sink only writes; it never decides. The Guard isolates sinks from each other: a sink that raises
is reported once and the others keep working, and every event also stays in ``guard.events``.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import logging
import os
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ._validate import check_int, check_type
from .events import Event, Severity

__all__ = [
    "CallableSink",
    "JSONLSink",
    "LoggingSink",
    "MemorySink",
    "Sink",
    "TensorBoardSink",
    "create_sink",
    "read_jsonl",
]


class Sink:
    """Base class: receives every event at or above ``min_severity``.

    Subclasses implement :meth:`write`, and :meth:`flush`/:meth:`close` when they buffer or own a resource.

    Args:
        min_severity: The least severe event this sink writes.
    """

    def __init__(self, min_severity: Severity | str = Severity.DEBUG) -> None:
        self.min_severity = Severity.parse(min_severity)

    def accepts(self, event: Event) -> bool:
        """Whether ``event`` passes this sink's severity filter."""
        return event.severity >= self.min_severity

    def write(self, event: Event) -> None:
        """Write one event. May raise; the Guard reports the failure and carries on."""
        raise NotImplementedError

    def flush(self) -> None:
        """Push buffered events out. Called at every check point and on close."""

    def close(self) -> None:
        """Flush and release what the sink owns. Called once by ``Guard.close()``."""
        self.flush()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(min_severity={str(self.min_severity)!r})"


class LoggingSink(Sink):
    """Write events to a standard ``logging`` logger (``"stallguard"`` by default).

    Each event becomes one record at the level matching its severity, so the usual logging
    configuration (handlers, levels, formatters) applies.

    Args:
        logger: A logger name or a ``logging.Logger``.
        min_severity: The least severe event to log.

    Example:
        >>> import logging, stallguard as sg
        >>> sink = sg.LoggingSink("stallguard.example", min_severity="warning")
        >>> sink.write(sg.Event(kind="plateau", severity="warning", message="loss flat"))
    """

    def __init__(self, logger: str | logging.Logger = "stallguard", min_severity: Severity | str = "info") -> None:
        super().__init__(min_severity)
        if isinstance(logger, str):
            logger = logging.getLogger(logger)
        self.logger = check_type("LoggingSink", "logger", logger, logging.Logger, "a logger name or logging.Logger")

    def write(self, event: Event) -> None:
        self.logger.log(int(event.severity), "%s", event)


class MemorySink(Sink):
    """Keep the most recent ``maxlen`` events in memory.

    Args:
        maxlen: How many events to keep; older ones are dropped first.
        min_severity: The least severe event to keep.

    Example:
        >>> import stallguard as sg
        >>> sink = sg.MemorySink(maxlen=2)
        >>> for i in range(3):
        ...     sink.write(sg.Event(kind="tick", severity="info", message=str(i)))
        >>> [e.message for e in sink.events]
        ['1', '2']
    """

    def __init__(self, maxlen: int = 10_000, min_severity: Severity | str = Severity.DEBUG) -> None:
        super().__init__(min_severity)
        self.maxlen = check_int("MemorySink", "maxlen", maxlen, min=1)
        self._events: collections.deque[Event] = collections.deque(maxlen=maxlen)

    @property
    def events(self) -> list[Event]:
        """The kept events, oldest first."""
        return list(self._events)

    def write(self, event: Event) -> None:
        self._events.append(event)


class CallableSink(Sink):
    """Call ``fn(event)`` for every event: the adapter for any logger or alerting system.

    Args:
        fn: Any callable taking one :class:`Event`.
        min_severity: The least severe event to pass on.

    Example:
        >>> import stallguard as sg
        >>> got = []
        >>> sink = sg.CallableSink(got.append)
        >>> sink.write(sg.Event(kind="tick", severity="info", message="hi"))
        >>> got[0].kind
        'tick'
    """

    def __init__(self, fn: Callable[[Event], Any], min_severity: Severity | str = Severity.DEBUG) -> None:
        super().__init__(min_severity)
        if not callable(fn):
            raise TypeError(f"CallableSink: fn must be callable, got {type(fn).__name__} {fn!r}")
        self.fn = fn

    def write(self, event: Event) -> None:
        self.fn(event)


def _flush_at_exit(ref: weakref.ref[JSONLSink]) -> None:
    sink = ref()
    if sink is not None:
        # Nothing is left to report to at interpreter exit; unwritten lines stay unwritten, never partial.
        with contextlib.suppress(OSError):
            sink.flush()


class JSONLSink(Sink):
    """Append events to a JSON Lines file: one complete JSON object per line.

    Lines are buffered in memory and written in one ``write`` system call per flush, which happens at
    every check point, on close, at interpreter exit, and whenever ``buffer_lines`` lines are waiting.
    A process killed at any moment therefore leaves only complete lines; if a write comes back short
    (a full disk), the file is truncated back to its last complete line and the lines stay buffered
    for the next flush.

    Args:
        path: The file to write. Parent directories are created.
        append: Keep existing content (for a resumed run) instead of truncating the file.
        buffer_lines: Flush when this many lines are waiting, even between check points.
        min_severity: The least severe event to write.

    Example:
        >>> import os, tempfile, stallguard as sg
        >>> path = os.path.join(tempfile.mkdtemp(), "events.jsonl")
        >>> sink = sg.JSONLSink(path)
        >>> sink.write(sg.Event(kind="tick", severity="info", message="hi"))
        >>> sink.close()
        >>> [e.kind for e in sg.read_jsonl(path)]
        ['tick']
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        append: bool = False,
        buffer_lines: int = 256,
        min_severity: Severity | str = Severity.DEBUG,
    ) -> None:
        super().__init__(min_severity)
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"JSONLSink: path must be a str or os.PathLike, got {type(path).__name__} {path!r}")
        self.path = Path(path)
        self.buffer_lines = check_int("JSONLSink", "buffer_lines", buffer_lines, min=1)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | (0 if append else os.O_TRUNC)
        self._fd: int | None = os.open(self.path, flags, 0o644)
        self._pending: list[str] = []
        atexit.register(_flush_at_exit, weakref.ref(self))

    @property
    def pending(self) -> int:
        """Lines written to this sink but not yet to the file."""
        return len(self._pending)

    def write(self, event: Event) -> None:
        if self._fd is None:
            raise ValueError(f"JSONLSink({str(self.path)!r}) is closed")
        self._pending.append(event.to_json() + "\n")
        if len(self._pending) >= self.buffer_lines:
            self.flush()

    def flush(self) -> None:
        if self._fd is None or not self._pending:
            return
        data = "".join(self._pending).encode("utf-8")
        start = os.fstat(self._fd).st_size
        written = 0
        try:
            while written < len(data):
                n = os.write(self._fd, data[written:])
                if n <= 0:
                    raise OSError(f"short write to {self.path}")
                written += n
        except OSError:
            if written:
                # Never leave half a line behind: cut the file back to where this flush began.
                os.ftruncate(self._fd, start)
            raise
        self._pending.clear()

    def close(self) -> None:
        if self._fd is None:
            return
        try:
            self.flush()
        finally:
            os.close(self._fd)
            self._fd = None

    def __repr__(self) -> str:
        return f"JSONLSink({str(self.path)!r})"


def read_jsonl(path: str | os.PathLike[str]) -> list[Event]:
    """Read back every event a :class:`JSONLSink` wrote.

    Raises:
        ValueError: naming the line number of a line that is not a complete event record.
    """
    events = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            if not line.endswith("\n"):
                raise ValueError(f"{path}:{lineno}: incomplete last line")
            try:
                events.append(Event.from_json(line))
            except ValueError as exc:
                raise ValueError(f"{path}:{lineno}: not an event record ({exc})") from exc
    return events


class TensorBoardSink(Sink):
    """Write events to TensorBoard: each event as text, its top-level numbers as scalars.

    Scalars are tagged ``stallguard/<kind>/<key>``; the text goes under ``stallguard/<kind>``.
    TensorBoard (``pip install stallguard[tensorboard]``) is imported only when no writer is given.

    Args:
        writer: An object with ``add_text``/``add_scalar`` (``torch.utils.tensorboard.SummaryWriter``).
            It is flushed but not closed by this sink.
        log_dir: Where to create a ``SummaryWriter`` when ``writer`` is None; this sink then owns it.
        min_severity: The least severe event to write.

    Example:
        >>> import stallguard as sg
        >>> class Fake:
        ...     def __init__(self): self.tags = []
        ...     def add_text(self, tag, text, global_step=None): self.tags.append(tag)
        ...     def add_scalar(self, tag, value, global_step=None): self.tags.append(tag)
        >>> w = Fake()
        >>> sg.TensorBoardSink(w).write(sg.Event(kind="plateau", severity="warning", message="flat",
        ...                                     data={"level": 0.7}))
        >>> w.tags
        ['stallguard/plateau', 'stallguard/plateau/level']
    """

    def __init__(
        self, writer: Any = None, *, log_dir: str | None = None, min_severity: Severity | str = "info"
    ) -> None:
        super().__init__(min_severity)
        self._owns_writer = writer is None
        if writer is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as exc:  # pragma: no cover - depends on the environment
                raise ImportError(
                    "TensorBoardSink needs the tensorboard package: pip install 'stallguard[tensorboard]'"
                ) from exc
            writer = SummaryWriter(log_dir=log_dir)
        for method in ("add_text", "add_scalar"):
            if not callable(getattr(writer, method, None)):
                raise TypeError(f"TensorBoardSink: writer must have {method}(), got {type(writer).__name__}")
        self.writer = writer

    def write(self, event: Event) -> None:
        tag = f"stallguard/{event.kind}"
        self.writer.add_text(tag, f"[{event.severity}] {event.message}", global_step=event.step)
        for key, value in event.data.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(f"{tag}/{key}", value, global_step=event.step)

    def flush(self) -> None:
        flush = getattr(self.writer, "flush", None)
        if callable(flush):
            flush()

    def close(self) -> None:
        self.flush()
        if self._owns_writer:
            self.writer.close()


_SINKS: dict[str, type[Sink]] = {
    "logging": LoggingSink,
    "jsonl": JSONLSink,
    "memory": MemorySink,
    "tensorboard": TensorBoardSink,
}


def create_sink(spec: str | dict[str, Any] | Sink) -> Sink:
    """Build a sink from a config entry: ``"logging"``, or ``{"name": "jsonl", "path": "run.jsonl"}``.

    Raises:
        ValueError: for an unknown sink name, listing the known ones.
    """
    if isinstance(spec, Sink):
        return spec
    if isinstance(spec, str):
        name, params = spec, {}
    elif isinstance(spec, dict):
        params = dict(spec)
        name = params.pop("name", None)
    else:
        raise TypeError(f"sink config must be a name, a dict or a Sink, got {type(spec).__name__} {spec!r}")
    if name not in _SINKS:
        raise ValueError(f"unknown sink {name!r}; known sinks: {', '.join(sorted(_SINKS))}")
    return _SINKS[name](**params)
