"""Command line: ``python -m stallguard demo | report | hooks``."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

__all__ = ["main"]


def _demo(args: argparse.Namespace) -> int:
    import json

    from .demo import DEMOS, live_printer, run_demo

    if args.list:
        width = max(len(n) for n in DEMOS)
        for name, demo in DEMOS.items():
            shows = f"shows {demo.cause}" if demo.cause else "a healthy run, nothing to find"
            print(f"{name.ljust(width)}  {demo.summary}; {shows}")
            if demo.cause:
                from .causes import CAUSES

                print(f"{''.ljust(width)}  ({CAUSES[demo.cause]})")
        return 0
    name = args.fault or next(iter(DEMOS))
    if name not in DEMOS:
        print(f"unknown fault {name!r}; choose one of: {', '.join(DEMOS)} (or --list)", file=sys.stderr)
        return 2
    quiet = args.json or args.quiet

    def out(line: str) -> None:
        if not quiet:
            print(line, flush=True)

    sinks: list = []
    if not quiet:
        from .sinks import CallableSink

        sinks.append(CallableSink(live_printer(out), "info"))
    if args.jsonl:
        from .sinks import JSONLSink

        sinks.append(JSONLSink(args.jsonl))
    guard = run_demo(name, seed=args.seed, steps=args.steps, repair=args.repair, sinks=sinks, out=out, report=False)
    if not args.json:
        print(guard.report())
    else:
        demo = DEMOS[name]
        loss = guard.series("loss").values if guard.has_series("loss") else []
        result = {
            "demo": name,
            "expected_cause": demo.cause,
            "steps": guard.step,
            "seed": args.seed,
            "final_loss": float(loss[-1]) if len(loss) else None,
            "diagnosis": [d.to_dict() for d in guard.diagnose()],
        }
        print(json.dumps(result, indent=2, default=str))
    return 0


def _report(args: argparse.Namespace) -> int:
    from .diagnosis import diagnose
    from .sinks import read_jsonl

    events = read_jsonl(args.path)
    found = diagnose(events)
    print(f"{len(events)} events read from {args.path}")
    if not found:
        print("diagnosis: no cause found.")
    for i, d in enumerate(found, 1):
        print(f"{i}. {d.cause} (confidence {d.confidence:.2f}): {d.advice}")
        for ev in d.evidence:
            print(f"     - {ev}")
    return 0


def _hooks(args: argparse.Namespace) -> int:
    from .registry import available, get

    for name in available():
        doc = (get(name).__doc__ or "").strip().splitlines()
        print(f"{name:16} {doc[0] if doc else ''}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m stallguard`` and the ``stallguard`` script."""
    parser = argparse.ArgumentParser(prog="stallguard", description="Why is my loss not decreasing?")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser(
        "demo",
        help="train a small, deliberately broken model and diagnose it live (CPU, seconds)",
        description="Train a small model with one real fault on data made in code, print stallguard's events as "
        "they happen, then its report with the diagnosis. One demo per cause; without --fault, a learning rate "
        "300x too high. Runs on one CPU thread.",
    )
    demo.add_argument("--fault", metavar="NAME", help="which fault to show (default: lr_too_high; see --list)")
    demo.add_argument("--list", action="store_true", help="list the faults, what each shows, and exit")
    demo.add_argument("--steps", type=int, help="optimizer steps (default: the demo's own, 150-400)")
    demo.add_argument("--seed", type=int, default=0, help="seed of the data, the model and the batches (default 0)")
    demo.add_argument("--repair", action="store_true", help="let stallguard repair what it can (repair=True)")
    demo.add_argument("--jsonl", metavar="PATH", help="also write the events to this JSON Lines file")
    demo.add_argument("--json", action="store_true", help="print only the diagnosis, as JSON (no live events)")
    demo.add_argument("--quiet", action="store_true", help="print no live events, only the report")
    demo.set_defaults(run=_demo)

    report = sub.add_parser("report", help="diagnose a run from the JSON Lines file its JSONLSink wrote")
    report.add_argument("path")
    report.set_defaults(run=_report)

    hooks = sub.add_parser("hooks", help="list the hooks available by name")
    hooks.set_defaults(run=_hooks)

    args = parser.parse_args(argv)
    if getattr(args, "steps", None) is not None and args.steps < 1:
        parser.error(f"--steps must be a positive int, got {args.steps}")
    if getattr(args, "seed", None) is not None and args.seed < 0:
        parser.error(f"--seed must be a non-negative int, got {args.seed}")
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    return int(args.run(args))
