"""Run the zoo: validity (unguarded vs fixed twin), stallguard's diagnosis, the baselines, and repair."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

import stallguard as sg

from .baselines import BASELINES, Tracer, run_baselines
from .scenarios import SCENARIOS, Outcome, Scenario

__all__ = ["Result", "check_validity", "run_once", "run_scenario", "summarize"]


def _float(v: Any) -> float:
    return float(v.detach().float()) if isinstance(v, torch.Tensor) else float(v)


def run_once(
    scenario: Scenario,
    *,
    seed: int = 0,
    fixed: bool = False,
    guard: str | None = None,
    tracer: bool = False,
) -> tuple[Outcome, Any]:
    """One run of a scenario.

    Args:
        scenario: What to run.
        seed: Seed of data, model and batches.
        fixed: Run the fixed twin.
        guard: None (unguarded), "monitor" (``sg.Guard(model, opt)``) or "repair" (``repair=True``).
        tracer: Record per-step numbers for the baselines.

    Returns:
        The outcome, and the closed Guard or the Tracer (or None).
    """
    run = scenario.build(seed, fixed)
    initial = run.evaluate()
    losses: list[float] = []
    val: list[tuple[int, float]] = []
    pending: list[float] = []
    g = None
    tr = None
    if guard is not None:
        g = sg.Guard(run.model, run.optimizer, sinks=[], repair=guard == "repair")
    if tracer:
        tr = Tracer(run.model, run.optimizer, run.task)
        tr.meta["epoch_steps"] = run.epoch_steps
    step_no = [0]

    def observe(loss: Any = None, *, inputs: Any = None, outputs: Any = None, targets: Any = None, **metrics: Any):
        if g is not None:
            g.observe(loss, inputs=inputs, outputs=outputs, targets=targets, **metrics)
        if loss is not None:
            pending.append(_float(loss))
        if "val_loss" in metrics:
            val.append((step_no[0], _float(metrics["val_loss"])))
        if tr is not None:
            tr.observe(loss, inputs=inputs, outputs=outputs, targets=targets, **metrics)

    start = time.perf_counter()
    for i in range(run.steps):
        step_no[0] = i
        run.step(i, observe)
        losses.append(sum(pending) / len(pending) if pending else math.nan)
        pending.clear()
        if tr is not None:
            tr.after_step(i)
    if g is not None:
        g.close()
    seconds = time.perf_counter() - start
    if tr is not None:
        tr.close()
    final = run.evaluate()
    return Outcome(losses, initial, final, seconds, val), (g if g is not None else tr)


@dataclass
class Validity:
    valid: bool
    reason: str
    onset: int
    plain: Outcome
    twin: Outcome | None


def check_validity(scenario: Scenario, seed: int = 0) -> Validity:
    """Run the scenario unguarded (and its fixed twin) and say whether the fault truly shows."""
    plain, _ = run_once(scenario, seed=seed)
    twin = run_once(scenario, seed=seed, fixed=True)[0] if scenario.needs_twin else None
    ok, why = scenario.fault(plain, twin)
    return Validity(ok, why, scenario.onset(plain), plain, twin)


@dataclass
class Detector:
    """One detector's verdict on one scenario: ranked causes, the first alarm, and latency."""

    ranked: list[str]
    first_warning: int | None
    rank: int | None  # 1-based rank of the true cause, None when absent
    latency: int | None  # first warning step minus onset
    cause_latency: int | None = None  # first warning that names the true cause, minus onset


@dataclass
class Result:
    name: str
    cause: str
    arch: str
    valid: bool
    validity: str
    onset: int
    seconds_plain: float
    seconds_guarded: float
    final_plain: float
    final_twin: float | None
    detectors: dict[str, Detector] = field(default_factory=dict)
    events: list[str] = field(default_factory=list)
    repair: dict[str, float] | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return d


def _detector(ranked: list[str], first: int | None, cause: str, onset: int) -> Detector:
    rank = ranked.index(cause) + 1 if cause in ranked else None
    latency = None if first is None or cause == "healthy" else first - onset
    return Detector(ranked, first, rank, latency)


def run_scenario(
    scenario: Scenario,
    *,
    seed: int = 0,
    baselines: bool = True,
    repair: bool = True,
) -> Result:
    """Validity, the guarded run, the baselines on a traced unguarded run, and the repaired run."""
    v = check_validity(scenario, seed)
    out, guard = run_once(scenario, seed=seed, guard="monitor")
    diag = guard.diagnose()
    warnings = [e for e in guard.events if e.severity >= sg.Severity.WARNING]
    first = min((e.step for e in warnings), default=None)
    res = Result(
        scenario.name,
        scenario.cause,
        scenario.arch,
        v.valid,
        v.reason,
        v.onset,
        v.plain.seconds,
        out.seconds,
        v.plain.final_loss,
        v.twin.final_loss if v.twin is not None else None,
    )
    res.detectors["stallguard"] = _detector([d.cause for d in diag], first, scenario.cause, v.onset)
    # The first warning whose own causes include the true one (a plateau names no cause; update_ratio_low does).
    named = [e.step for e in warnings if scenario.cause in (e.causes or ())]
    if named and scenario.cause != "healthy":
        res.detectors["stallguard"].cause_latency = min(named) - v.onset
    res.events = _event_summary(guard.events, sg.Severity.INFO)
    if baselines:
        _, tracer = run_once(scenario, seed=seed, tracer=True)
        for name, (ranked, first_alarm) in run_baselines(tracer.records, tracer.meta).items():
            res.detectors[name] = _detector(ranked, first_alarm, scenario.cause, v.onset)
    if repair and scenario.repairable:
        rep, rguard = run_once(scenario, seed=seed, guard="repair")
        # Times on a shared machine are noisy: the faster of two identical runs of each.
        again, _ = run_once(scenario, seed=seed, guard="repair")
        plain_again, _ = run_once(scenario, seed=seed)
        res.repair = {
            "initial": v.plain.initial["loss"],
            "final_plain": v.plain.final_loss,
            "final_repaired": rep.final_loss,
            "seconds_plain": min(v.plain.seconds, plain_again.seconds),
            "seconds_repaired": min(rep.seconds, again.seconds),
            "actions": len([e for e in rguard.events if e.source in _repair_sources(rguard)]),
            "repair_events": _event_summary(
                (e for e in rguard.events if e.source in _repair_sources(rguard)), sg.Severity.DEBUG
            ),
        }
    return res


def _repair_sources(guard: Any) -> set[str]:
    return {h.name for h in guard.hooks if h.modifies_training}


def _event_summary(events: Iterable[Any], min_severity: Any = None) -> list[str]:
    """Event kinds at warning or worse (or ``min_severity``), folded: 'kind@first_step(xN)'."""
    floor = sg.Severity.WARNING if min_severity is None else min_severity
    seen: dict[str, list[int]] = {}
    for e in events:
        if e.severity >= floor:
            seen.setdefault(e.kind, []).append(e.step)
    return [
        f"{k}@{v[0]}" + (f"(x{len(v)})" if len(v) > 1 else "") for k, v in sorted(seen.items(), key=lambda kv: kv[1][0])
    ]


def summarize(results: list[Result], detectors: Iterable[str]) -> dict[str, dict[str, Any]]:
    """Per detector: top-1 accuracy, top-3 recall, false positives on healthy runs, median latency."""
    out: dict[str, dict[str, Any]] = {}
    valid = [r for r in results if r.valid]
    faulty = [r for r in valid if r.cause != "healthy"]
    healthy = [r for r in valid if r.cause == "healthy"]
    for name in detectors:
        ds = [(r, r.detectors[name]) for r in faulty if name in r.detectors]
        hs = [r.detectors[name] for r in healthy if name in r.detectors]
        top1 = sum(1 for _, d in ds if d.rank == 1)
        top3 = sum(1 for _, d in ds if d.rank is not None and d.rank <= 3)
        # A false positive is a healthy run given a cause; a warning event alone (e.g. "labels are
        # imbalanced" on a run that learns them) is counted apart.
        fp = sum(1 for d in hs if d.ranked)
        warned = sum(1 for d in hs if d.first_warning is not None)
        lats = [d.latency for _, d in ds if d.latency is not None]
        cause_lats = [d.cause_latency for _, d in ds if d.cause_latency is not None]
        out[name] = {
            "faulty": len(ds),
            "top1": top1,
            "top3": top3,
            "top1_acc": top1 / len(ds) if ds else math.nan,
            "top3_recall": top3 / len(ds) if ds else math.nan,
            "healthy": len(hs),
            "false_positives": fp,
            "healthy_warned": warned,
            "detected": len(lats),
            "median_latency": statistics.median(lats) if lats else None,
            "median_cause_latency": statistics.median(cause_lats) if cause_lats else None,
            "cause_named_by_event": len(cause_lats),
        }
    return out


def detector_names(baselines: bool) -> list[str]:
    return ["stallguard", *(BASELINES if baselines else [])]


def select(only: list[str] | None, quick: bool) -> list[Scenario]:
    from .quick import QUICK, QUICK_HEALTHY

    names = list(SCENARIOS)
    if quick:
        chosen = set(QUICK.values()) | set(QUICK_HEALTHY)
        names = [n for n in names if n in chosen]
    if only:
        missing = [n for n in only if n not in SCENARIOS]
        if missing:
            raise SystemExit(f"unknown scenario(s) {missing}; known: {', '.join(SCENARIOS)}")
        names = [n for n in names if n in only]
    return [SCENARIOS[n] for n in names]
