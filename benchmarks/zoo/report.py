"""Tables for the terminal and for benchmarks/RESULTS.md."""

from __future__ import annotations

import datetime as _dt
import os
import platform
import re
from pathlib import Path
from typing import Any

import torch

from .baselines import MAPPING
from .runner import Result

__all__ = ["machine", "markdown", "text_table", "write_section"]

SECTION = "## Stall zoo"


def machine() -> dict[str, Any]:
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }


def _rank(r: Result, det: str) -> str:
    d = r.detectors.get(det)
    if d is None:
        return "-"
    if r.cause == "healthy":
        return "FP" if d.ranked else ("ok, warned" if d.first_warning is not None else "ok")
    return str(d.rank) if d.rank is not None else "miss"


def _top(r: Result, det: str) -> str:
    d = r.detectors.get(det)
    if d is None:
        return "-"
    return d.ranked[0] if d.ranked else "-"


def scenario_rows(results: list[Result], detectors: list[str]) -> tuple[list[str], list[list[str]]]:
    header = ["scenario", "arch", "true cause", "valid", "stallguard top", "rank", "1st warn", "onset", "guarded run s"]
    header += [f"{d} (top/rank)" for d in detectors if d != "stallguard"]
    rows = []
    for r in results:
        sg = r.detectors.get("stallguard")
        row = [
            r.name,
            r.arch,
            r.cause,
            "yes" if r.valid else "NO",
            _top(r, "stallguard"),
            _rank(r, "stallguard"),
            "-" if sg is None or sg.first_warning is None else str(sg.first_warning),
            str(r.onset),
            f"{r.seconds_guarded:.2f}",
        ]
        row += [f"{_top(r, d)} / {_rank(r, d)}" for d in detectors if d != "stallguard"]
        rows.append(row)
    return header, rows


def text_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)) for row in rows]
    return "\n".join(lines)


def md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def summary_rows(summary: dict[str, dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    header = [
        "detector",
        "top-1",
        "top-3",
        "FP on healthy",
        "healthy with a warning",
        "detected",
        "median latency (steps)",
    ]
    rows = []
    for name, s in summary.items():
        lat = s["median_latency"]
        rows.append(
            [
                name,
                f"{s['top1']}/{s['faulty']} ({100 * s['top1_acc']:.0f}%)" if s["faulty"] else "-",
                f"{s['top3']}/{s['faulty']} ({100 * s['top3_recall']:.0f}%)" if s["faulty"] else "-",
                f"{s['false_positives']}/{s['healthy']}",
                f"{s['healthy_warned']}/{s['healthy']}",
                f"{s['detected']}/{s['faulty']}",
                "-" if lat is None else f"{lat:g}",
            ]
        )
    return header, rows


def repair_rows(results: list[Result]) -> tuple[list[str], list[list[str]]]:
    header = [
        "scenario",
        "true cause",
        "final loss, unguarded",
        "final loss, repair=True",
        "fixed twin",
        "ratio",
        "target met",
        "time unguarded s",
        "time repaired s",
        "extra time",
        "repair events",
    ]
    rows = []
    for r in results:
        if r.repair is None:
            continue
        a, b = r.repair["final_plain"], r.repair["final_repaired"]
        finite = b == b and abs(b) != float("inf")
        if a == a and abs(a) != float("inf") and a > 0:
            ratio = f"{b / a:.3g}"
            met = finite and b <= 0.5 * a
        else:
            # Half of NaN is undefined: a repair must then end finite and at most half the initial loss.
            init = r.repair.get("initial", float("nan"))
            ratio = f"unguarded non-finite; {b / init:.3g} of the initial loss"
            met = finite and b <= 0.5 * init
        ta, tb = r.repair["seconds_plain"], r.repair["seconds_repaired"]
        rows.append(
            [
                r.name,
                r.cause,
                f"{a:.4g}",
                f"{b:.4g}",
                "-" if r.final_twin is None else f"{r.final_twin:.4g}",
                ratio,
                "yes" if met else "NO",
                f"{ta:.2f}",
                f"{tb:.2f}",
                f"{100 * (tb - ta) / ta:+.0f}%",
                ", ".join(r.repair.get("repair_events", [])) or "-",
            ]
        )
    return header, rows


def scenario_info_rows(results: list[Result]) -> tuple[list[str], list[list[str]]]:
    from .scenarios import SCENARIOS

    header = ["scenario", "true cause", "what it is", "fault check (unguarded run vs fixed twin)"]
    rows = []
    for r in results:
        s = SCENARIOS.get(r.name)
        rows.append([r.name, r.cause, s.summary if s is not None else "-", r.validity])
    return header, rows


def events_rows(results: list[Result]) -> tuple[list[str], list[list[str]]]:
    header = ["scenario", "true cause", "stallguard ranking", "events at info or worse (kind@first step, count)"]
    rows = []
    for r in results:
        d = r.detectors.get("stallguard")
        ranking = ", ".join(d.ranked) if d is not None and d.ranked else "[]"
        rows.append([r.name, r.cause, ranking, ", ".join(r.events) or "-"])
    return header, rows


def markdown(
    results: list[Result],
    summary: dict[str, dict[str, Any]],
    detectors: list[str],
    meta: dict[str, Any],
    notes: str = "",
) -> str:
    invalid = [r for r in results if not r.valid]
    parts = [
        SECTION,
        "",
        f"Measured {meta['date']} on {meta['machine']} ({meta['cpus']} CPUs, torch {meta['torch']}, "
        f"{meta['threads']} thread), `python -m benchmarks.zoo{meta.get('args', '')}`. "
        f"{len(results)} scenarios, {len(invalid)} invalid (fault did not show; left out of the scores).",
        "",
        "### Summary",
        "",
        md_table(*summary_rows(summary)),
        "",
        "Top-1: the true cause ranked first; top-3: ranked in the first three; FP: a healthy run given any "
        "cause (for the baselines: any alarm); healthy with a warning: stallguard emitted a warning-level "
        "event but named no cause; detected: faulty runs with a warning or alarm; latency: first warning "
        "(any kind) step minus the scenario's fault-onset step, median over detected faulty runs. "
        "stallguard runs with its defaults (`check_every=50`), so its warnings fall on multiples of 50.",
        "",
    ]
    sg_sum = summary.get("stallguard", {})
    if sg_sum.get("median_cause_latency") is not None:
        parts += [
            f"Latency to the first stallguard warning whose own event names the true cause: median "
            f"{sg_sum['median_cause_latency']:g} steps after onset, over the {sg_sum['cause_named_by_event']} "
            f"faulty runs that have one (plateau and divergence events name no cause).",
            "",
        ]
    parts += ["### Per scenario", "", md_table(*scenario_rows(results, detectors)), ""]
    rep = repair_rows(results)
    if rep[1]:
        parts += ["### Repair", "", md_table(*rep), ""]
    parts += ["### Events stallguard saw", "", md_table(*events_rows(results)), ""]
    parts += ["### Scenarios and their fault checks", "", md_table(*scenario_info_rows(results)), ""]
    parts += ["### Baseline mapping (alarm -> cause)", ""]
    for name, mapping in MAPPING.items():
        parts.append(f"- **{name}**: " + "; ".join(f"{k} -> `{v}`" for k, v in mapping.items()))
    parts.append("")
    if invalid:
        parts += ["### Invalid scenarios", ""]
        parts += [f"- `{r.name}`: {r.validity}" for r in invalid]
        parts.append("")
    if notes:
        parts += [notes.rstrip(), ""]
    return "\n".join(parts)


def write_section(path: Path, text: str) -> None:
    """Replace (or append) the '## Stall zoo' section of RESULTS.md, leaving other sections alone."""
    old = path.read_text() if path.exists() else "# Benchmark results\n"
    pattern = re.compile(r"^## Stall zoo\n.*?(?=^## (?!#)|\Z)", re.S | re.M)
    body = text.rstrip() + "\n\n"
    new = pattern.sub(lambda m: body, old, count=1) if pattern.search(old) else old.rstrip() + "\n\n" + body
    path.write_text(new.rstrip() + "\n")
