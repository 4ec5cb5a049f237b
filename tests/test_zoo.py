"""The stall zoo's quick subset: each scenario's true cause must be ranked first, healthy runs stay quiet."""

from __future__ import annotations

import dataclasses
import math

import pytest

from benchmarks.zoo import baselines as bl
from benchmarks.zoo.quick import QUICK, QUICK_HEALTHY
from benchmarks.zoo.runner import check_validity, run_once, summarize
from benchmarks.zoo.scenarios import SCENARIOS, lr_low_mlp

pytestmark = pytest.mark.slow

#: Quick scenarios that stallguard does not yet diagnose correctly, with what it reports instead (see the
#: "Stall zoo" section of benchmarks/RESULTS.md). strict=True: a fix makes the test pass and fail as XPASS,
#: so the entry must then be removed.
KNOWN_MISSES: dict[str, str] = {}


def _cases(names: list[str]) -> list:
    return [
        pytest.param(n, marks=pytest.mark.xfail(strict=True, reason=KNOWN_MISSES[n])) if n in KNOWN_MISSES else n
        for n in names
    ]


def test_quick_subset_covers_every_cause() -> None:
    import stallguard as sg

    assert set(QUICK) == set(sg.CAUSES)
    for cause, name in QUICK.items():
        assert SCENARIOS[name].cause == cause
    assert all(SCENARIOS[n].cause == "healthy" for n in QUICK_HEALTHY)
    per_cause: dict[str, set[str]] = {}
    for s in SCENARIOS.values():
        per_cause.setdefault(s.cause, set()).add(s.arch)
    assert all(len(per_cause[c]) >= 2 for c in sg.CAUSES), "two architectures per cause"
    assert sum(1 for s in SCENARIOS.values() if s.cause == "healthy") >= 8


@pytest.mark.parametrize("name", _cases([QUICK[c] for c in sorted(QUICK)]))
def test_quick_scenario_diagnosis(name: str) -> None:
    scenario = SCENARIOS[name]
    cause = scenario.cause
    _, guard = run_once(scenario, guard="monitor")
    ranked = [d.cause for d in guard.diagnose()]
    assert ranked and ranked[0] == cause, f"{scenario.name}: diagnosed {ranked}, events {guard.report()}"


@pytest.mark.parametrize("name", _cases(QUICK_HEALTHY))
def test_quick_healthy_stays_quiet(name: str) -> None:
    _, guard = run_once(SCENARIOS[name], guard="monitor")
    assert guard.diagnose() == [], guard.report()


def test_validity_marks_a_non_failing_scenario_invalid() -> None:
    real = SCENARIOS["lr_low_mlp_sgd"]
    assert check_validity(real).valid
    # The same scenario built with its fixed learning rate: labelled lr_too_low, but nothing fails.
    fake = dataclasses.replace(real, name="lr_low_but_fine", build=lambda seed, fixed: lr_low_mlp(seed, True))
    v = check_validity(fake)
    assert not v.valid
    assert "twin" in v.reason


# --------------------------------------------------------------------------------------------- baselines
def _record(step: int, loss: float, **extra: object) -> dict:
    rec = {"step": step, "loss": loss, "lr": 0.1, "grads": {}, "weights": {}, "acts": {}}
    rec.update(extra)
    return rec


def test_reduce_lr_on_plateau_fires_after_patience() -> None:
    falling = [_record(i, 1.0 / (i + 1)) for i in range(50)]
    assert bl.reduce_lr_on_plateau(falling, {}) == ([], None)
    flat = [_record(i, 0.5) for i in range(50)]
    # torch's defaults: patience=10 and a reduction when more than 10 steps did not improve (step 0 improves).
    assert bl.reduce_lr_on_plateau(flat, {}) == (["lr_too_high"], 11)


def test_smdebug_loss_not_decreasing_and_exploding_tensor() -> None:
    falling = [_record(i, 2.0 * 0.95**i) for i in range(40)]
    ranked, first = bl.smdebug(falling, {})
    assert "lr_too_low" not in ranked
    flat = [_record(i, 0.7) for i in range(40)]
    ranked, first = bl.smdebug(flat, {})
    assert ranked[:1] == ["bad_init"] and first == 5  # PoorWeightInitialization: no progress within 5 steps
    assert "lr_too_low" in ranked  # LossNotDecreasing at step 10
    nan = [_record(i, 2.0 * 0.95**i if i < 20 else math.nan) for i in range(40)]
    ranked, first = bl.smdebug(nan, {})
    assert ranked == ["non_finite"] and first == 20


def test_deepdiagnosis_and_autotrainer_on_a_nan_series() -> None:
    records = [_record(i, 1.0 if i < 30 else math.nan, acc=min(0.95, 0.3 + 0.02 * i)) for i in range(60)]
    ranked, first = bl.deepdiagnosis(records, {"epoch_steps": 10})
    assert ranked == ["non_finite"] and first == 39  # the first epoch end whose mean loss is NaN
    ranked, first = bl.autotrainer(records, {"epoch_steps": 10})
    assert ranked[0] == "exploding_gradients" and first == 59  # checked every 3 epochs


def test_autotrainer_oscillation_count() -> None:
    assert bl._oscillations([0.5, 0.6, 0.5, 0.6, 0.5, 0.6], 0.03) == 3
    assert bl._oscillations([0.1, 0.2, 0.3, 0.4], 0.03) == 0


def test_summary_counts_false_positives() -> None:
    from benchmarks.zoo.runner import Detector, Result

    def result(cause: str, ranked: list[str], warn: int | None) -> Result:
        r = Result("x", cause, "MLP", True, "", 10, 0.1, 0.1, 0.0, None)
        rank = ranked.index(cause) + 1 if cause in ranked else None
        r.detectors["stallguard"] = Detector(ranked, warn, rank, None if warn is None else warn - 10)
        return r

    s = summarize(
        [
            result("lr_too_low", ["lr_too_low"], 50),
            result("bad_init", ["no_signal", "bad_init"], 100),
            result("healthy", [], None),
            result("healthy", [], 50),
        ],
        ["stallguard"],
    )["stallguard"]
    got = (s["top1"], s["top3"], s["faulty"], s["false_positives"], s["healthy_warned"], s["median_latency"])
    assert got == (1, 2, 2, 0, 1, 65)


def test_runner_writes_json_and_keeps_other_results_sections(tmp_path) -> None:
    import json

    from benchmarks.zoo.__main__ import main

    results = tmp_path / "RESULTS.md"
    results.write_text("# Benchmark results\n\n## Overhead\n\nkept as it is\n")
    out = tmp_path / "zoo.json"
    args = ["--only", "zero_init_mlp", "--no-baselines", "--no-repair", "--json", str(out), "--results", str(results)]
    assert main(args) == 0
    data = json.loads(out.read_text())
    assert [r["name"] for r in data["results"]] == ["zero_init_mlp"]
    assert data["summary"]["stallguard"]["faulty"] == 1
    text = results.read_text()
    assert "## Overhead\n\nkept as it is" in text and text.count("## Stall zoo") == 1
    assert main(args) == 0  # a second run replaces the section instead of adding one
    text = results.read_text()
    assert text.count("## Stall zoo") == 1 and "kept as it is" in text
