"""Command line: ``python -m stallguard demo | report | hooks``."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

__all__ = ["main"]


def _demo(args: argparse.Namespace) -> int:
    from .demo import DEMOS, run_demo

    if args.list:
        width = max(len(n) for n in DEMOS)
        for name, demo in DEMOS.items():
            shows = demo.cause or "nothing (healthy)"
            print(f"{name.ljust(width)}  shows {shows}: {demo.summary}")
        return 0
    name = args.fault or next(iter(DEMOS))
    if name not in DEMOS:
        print(f"unknown fault {name!r}; choose one of: {', '.join(DEMOS)} (or --list)", file=sys.stderr)
        return 2
    sinks = None
    if args.jsonl:
        from .sinks import CallableSink, JSONLSink

        def show(e):
            print(f"  step {e.step:>5}  {e.severity!s:8} {e.kind:22} {e.message}")

        sinks = [CallableSink(show, "info"), JSONLSink(args.jsonl)]
    run_demo(name, seed=args.seed, steps=args.steps, repair=args.repair, sinks=sinks)
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

    demo = sub.add_parser("demo", help="train a small, deliberately broken model and diagnose it live (CPU)")
    demo.add_argument("--fault", help="which fault to show (see --list)")
    demo.add_argument("--list", action="store_true", help="list the faults and exit")
    demo.add_argument("--steps", type=int, help="optimizer steps (the demo's default when absent)")
    demo.add_argument("--seed", type=int, default=0, help="seed of data, model and batches (default 0)")
    demo.add_argument("--repair", action="store_true", help="let stallguard repair what it can")
    demo.add_argument("--jsonl", help="also write the events to this JSON Lines file")
    demo.set_defaults(run=_demo)

    report = sub.add_parser("report", help="diagnose a run from the JSON Lines file its JSONLSink wrote")
    report.add_argument("path")
    report.set_defaults(run=_report)

    hooks = sub.add_parser("hooks", help="list the hooks available by name")
    hooks.set_defaults(run=_hooks)

    args = parser.parse_args(argv)
    if getattr(args, "steps", None) is not None and args.steps < 1:
        parser.error(f"--steps must be a positive int, got {args.steps}")
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    return int(args.run(args))
