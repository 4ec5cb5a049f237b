"""The demo command: ``python -m stallguard demo`` and its options."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

import stallguard as sg
from stallguard.cli import main
from stallguard.demo import DEMOS, live_printer, run_demo


def test_list_names_every_fault_with_its_cause_and_description(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--list"]) == 0
    out = capsys.readouterr().out
    for name, demo in DEMOS.items():
        line = next(line for line in out.splitlines() if line.startswith(name + " "))
        assert demo.summary in line
        if demo.cause:
            assert f"shows {demo.cause}" in line
            assert sg.CAUSES[demo.cause] in out
    assert len(DEMOS) == len(sg.CAUSES) + 1  # one per cause and a healthy run


def test_default_demo_prints_events_live_then_the_report_with_its_cause_first(
    capsys: pytest.CaptureFixture[str],
) -> None:
    threads = torch.get_num_threads()
    assert main(["demo"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("demo lr_too_high (shows lr_too_high)")
    live = out.index("divergence")  # the loss spike, printed when it happens
    report = out.index("stallguard report:")
    assert live < out.index("done in") < report
    assert re.search(r"^1\s+lr_too_high\s", out[report:], re.M), out[report:]
    assert torch.get_num_threads() == threads  # the demo's one thread is given back


def test_json_prints_only_the_diagnosis(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--fault", "non_finite", "--steps", "30", "--seed", "1", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["demo"] == "non_finite" and result["expected_cause"] == "non_finite"
    assert result["steps"] == 30 and result["seed"] == 1
    assert result["diagnosis"][0]["cause"] == "non_finite"
    assert set(result["diagnosis"][0]) == {"cause", "confidence", "evidence", "advice"}


def test_jsonl_file_feeds_the_report_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "events.jsonl"
    assert main(["demo", "--fault", "non_finite", "--steps", "30", "--quiet", "--jsonl", str(path)]) == 0
    out = capsys.readouterr().out
    assert "step " not in out.split("stallguard report:")[0]  # --quiet: no live events
    assert main(["report", str(path)]) == 0
    assert "1. non_finite (confidence" in capsys.readouterr().out


def test_bad_arguments_are_refused_clearly(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--fault", "slow_loss"]) == 2
    assert "unknown fault 'slow_loss'; choose one of: lr_too_high" in capsys.readouterr().err
    for bad in (["--steps", "0"], ["--seed", "-1"]):
        with pytest.raises(SystemExit) as exc:
            main(["demo", *bad])
        assert exc.value.code == 2
    with pytest.raises(ValueError, match="unknown demo 'nope'"):
        run_demo("nope")
    with pytest.raises(ValueError, match="steps must be a positive int"):
        run_demo("healthy", steps=0)


def test_seed_makes_a_demo_repeatable() -> None:
    def losses(seed: int) -> list[float]:
        guard = run_demo("lr_too_low", steps=30, seed=seed, sinks=[], out=lambda line: None, report=False)
        return list(guard.series("loss").values)

    assert losses(3) == losses(3)
    assert losses(3) != losses(4)


def test_live_printer_folds_repeats() -> None:
    lines: list[str] = []
    show = live_printer(lines.append)
    for step in range(1, 9):
        show(sg.Event(kind="plateau", severity="warning", message="flat", step=step, source="PlateauDetector"))
    show(sg.Event(kind="divergence", severity="error", message="up", step=9, source="PlateauDetector"))
    assert len(lines) == 5  # 1st, 2nd, 4th, 8th plateau, then the new kind
    assert lines[-2].endswith("flat (x8)") and "divergence" in lines[-1]
