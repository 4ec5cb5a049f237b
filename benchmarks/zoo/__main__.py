"""``python -m benchmarks.zoo``: run the stall zoo and print (and optionally save) the tables."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import torch

from .report import machine, markdown, repair_rows, scenario_rows, summary_rows, text_table, write_section
from .runner import Detector, detector_names, run_scenario, select, summarize


def _clean(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def _unclean(x: Any) -> Any:
    """Undo :func:`_clean`: 'nan', 'inf' and '-inf' strings back to floats."""
    if x in ("nan", "inf", "-inf"):
        return float(x)
    if isinstance(x, dict):
        return {k: _unclean(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_unclean(v) for v in x]
    return x


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.zoo", description=__doc__)
    p.add_argument("--quick", action="store_true", help="one fast scenario per cause and three healthy ones")
    p.add_argument("--only", nargs="+", metavar="NAME", help="run only these scenarios")
    p.add_argument("--json", metavar="PATH", help="write every result as JSON")
    p.add_argument("--no-baselines", action="store_true", help="skip smdebug/DeepDiagnosis/AutoTrainer/RLROP")
    p.add_argument("--no-repair", action="store_true", help="skip the repair=True runs")
    p.add_argument("--results", metavar="PATH", help="write the '## Stall zoo' section of this markdown file")
    p.add_argument("--notes", metavar="PATH", help="markdown appended to the '## Stall zoo' section")
    p.add_argument(
        "--reuse",
        metavar="PATH",
        help="take the baselines' verdicts and the repair runs from an earlier --json file of the same seed "
        "(neither depends on stallguard's ranking rules); stallguard itself is rerun",
    )
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.set_num_threads(1)

    scenarios = select(args.only, args.quick)
    reused: dict[str, Any] = {}
    if args.reuse:
        reused = {r["name"]: _unclean(r) for r in json.loads(Path(args.reuse).read_text())["results"]}
    baselines = not args.no_baselines
    detectors = detector_names(baselines)
    results = []
    for s in scenarios:
        old = reused.get(s.name)
        r = run_scenario(
            s, seed=args.seed, baselines=baselines and old is None, repair=not args.no_repair and old is None
        )
        if old is not None:
            for name, d in old["detectors"].items():
                if name != "stallguard" and baselines:
                    r.detectors[name] = Detector(**d)
            if not args.no_repair:
                r.repair = old["repair"]
        d = r.detectors["stallguard"]
        print(
            f"{s.name:32} {s.cause:22} valid={'yes' if r.valid else 'NO ':3} sg={d.ranked[:3]} "
            f"rank={d.rank} warn={d.first_warning} onset={r.onset} events={r.events}",
            flush=True,
        )
        results.append(r)
    summary = summarize(results, detectors)
    print()
    print(text_table(*scenario_rows(results, detectors)))
    print()
    print(text_table(*summary_rows(summary)))
    rep = repair_rows(results)
    if rep[1]:
        print()
        print(text_table(*rep))
    meta = machine()
    flags = list(argv if argv is not None else sys.argv[1:])
    meta["args"] = (" " + " ".join(flags)) if flags else ""
    if args.json:
        payload = {"meta": meta, "summary": summary, "results": [r.to_dict() for r in results]}
        Path(args.json).write_text(json.dumps(_clean(payload), indent=1))
    if args.results:
        notes = Path(args.notes).read_text() if args.notes else ""
        write_section(Path(args.results), markdown(results, summary, detectors, meta, notes))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
