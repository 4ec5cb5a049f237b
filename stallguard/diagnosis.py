"""From events to causes: a ranked list of what is most likely wrong, with evidence and advice."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .causes import CAUSES, check_cause
from .events import Event, Severity

if TYPE_CHECKING:
    from .guard import Guard

__all__ = ["Diagnosis", "diagnose", "format_report"]


@dataclass(frozen=True)
class Diagnosis:
    """One likely cause of a stalled run.

    Attributes:
        cause: An id from ``stallguard.CAUSES``.
        confidence: How sure, in [0, 1].
        evidence: Sentences citing the events read (kinds, steps, numbers).
        advice: What to change, concretely.
        events: The events this diagnosis rests on.
    """

    cause: str
    confidence: float
    evidence: tuple[str, ...]
    advice: str
    events: tuple[Event, ...] = field(default=(), repr=False, compare=False)

    def __post_init__(self) -> None:
        check_cause(self.cause)
        if not 0.0 <= self.confidence <= 1.0:
            raise ValueError(f"Diagnosis.confidence must lie in [0, 1], got {self.confidence!r}")

    @property
    def description(self) -> str:
        """The cause's one-line description."""
        return CAUSES[self.cause]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict (without the events themselves)."""
        return {
            "cause": self.cause,
            "confidence": self.confidence,
            "evidence": list(self.evidence),
            "advice": self.advice,
        }


def diagnose(events: Sequence[Event], guard: Guard | None = None) -> list[Diagnosis]:
    """Rank the causes the events give evidence of, most likely first.

    Args:
        events: The run's events, oldest first.
        guard: The Guard, when available, for context such as the loss history.

    Returns:
        A list of :class:`Diagnosis`; empty for a healthy run.
    """
    return []


def _fmt_table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = "  ".join(h.ljust(w) for h, w in zip(header, widths))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join(out)


def format_report(guard: Guard, *, max_timeline: int = 30) -> str:
    """The text of ``Guard.report()``: run summary, timeline of key events, diagnosis table."""
    lines = [f"stallguard report: {guard.step} optimizer steps, {len(guard.hooks)} hooks"]
    if guard.has_series("loss"):
        loss = guard.series("loss")
        v = loss.values
        lines.append(f"loss: first {v[0]:.4g}, last {v[-1]:.4g}, best {min(v):.4g} ({len(v)} steps observed)")
    key = [e for e in guard.events if e.severity >= Severity.WARNING]
    lines.append("")
    if key:
        lines.append("timeline (warnings and worse):")
        shown = key[-max_timeline:]
        if len(key) > len(shown):
            lines.append(f"  ... {len(key) - len(shown)} earlier events not shown")
        lines += [f"  step {e.step:>7}  {e.severity!s:8}  {e.kind:24} {e.message}" for e in shown]
    else:
        lines.append("timeline: no warnings.")
    lines.append("")
    found = guard.diagnose()
    if not found:
        lines.append("diagnosis: no cause found; the run looks healthy so far.")
    else:
        lines.append("diagnosis (most likely first):")
        rows = [[str(i + 1), d.cause, f"{d.confidence:.2f}", d.advice] for i, d in enumerate(found)]
        lines.append(_fmt_table(rows, ["#", "cause", "conf", "advice"]))
        lines.append("")
        lines.append("evidence:")
        for d in found:
            lines.append(f"  {d.cause}:")
            lines += [f"    - {ev}" for ev in d.evidence]
    if any(guard.sink_failures.values()):
        lines.append("")
        lines.append(f"note: {sum(guard.sink_failures.values())} sink write(s) failed; every event is in guard.events")
    return "\n".join(lines)
