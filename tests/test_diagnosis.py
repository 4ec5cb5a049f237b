"""The diagnosis engine on synthetic event histories: which cause ranks first, and why.

Each history is what the hooks emit on a real run of that kind (kinds, steps and data keys as the hooks
write them); the end-to-end tests in test_diagnosis_e2e.py run the real loops.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch

import stallguard as sg
from stallguard.demo import DEMOS

DOCS = Path(__file__).resolve().parents[1] / "docs" / "diagnosis.md"


def ev(
    kind: str, step: int, severity: str = "warning", *, source: str = "Test", conf: float | None = None, **data: Any
):
    return sg.Event(
        kind=kind, severity=severity, message=f"{kind} seen", step=step, source=source, confidence=conf, data=data
    )


def causes(events: list[sg.Event]) -> list[str]:
    return [d.cause for d in sg.diagnose(events)]


PLATEAU = ev("plateau", 150, source="PlateauDetector", level=1.39, best=1.38)


# ------------------------------------------------------------------------------------------- healthy
def test_no_events_means_no_diagnosis() -> None:
    assert sg.diagnose([]) == []


def test_info_and_debug_events_of_a_healthy_run_give_no_diagnosis() -> None:
    events = [
        ev("dead_fraction", 50, "debug", max_fraction=0.2),
        ev("converged", 300, "info", level=0.01),
        ev("recovered", 120, "info"),
        ev("lr_reduced", 200, "info"),
    ]
    assert sg.diagnose(events) == []


@pytest.mark.parametrize(
    "kind",
    ["dead_units", "saturated_activations", "vanishing_gradients", "exploding_gradients", "weights_frozen"],
)
def test_symptoms_that_healthy_runs_show_need_a_stall(kind: str) -> None:
    symptom = ev(kind, 100, layers=["1"], max_fraction=0.8)
    assert sg.diagnose([symptom]) == []
    assert sg.diagnose([symptom, PLATEAU])  # the same symptom counts once the loss stalls


def test_imbalanced_labels_that_are_learned_fine_are_not_a_failure() -> None:
    assert sg.diagnose([ev("class_imbalance", 50, ratio=19.0)]) == []
    found = causes([ev("class_imbalance", 50, ratio=19.0), ev("predictions_collapsed", 100, majority=0)])
    assert found == ["class_imbalance"]


# ---------------------------------------------------------------------------------- root-cause order
def test_dead_units_after_an_early_spike_with_high_update_ratios_is_lr_too_high_first() -> None:
    events = [
        ev("update_ratio_high", 25, source="UpdateRatio", conf=0.8, median_ratio=0.6, steps=[1, 11]),
        ev("divergence", 25, "error", source="PlateauDetector", reason="explosion", ratio=157.0),
        ev("dead_units", 50, source="DeadReLUCounter", layers=["3"], max_fraction=0.9, steps=[10, 50]),
        ev("dead_units", 100, source="DeadReLUCounter", layers=["3", "5"], max_fraction=1.0, steps=[60, 100]),
        PLATEAU,
    ]
    found = sg.diagnose(events)
    assert [d.cause for d in found][:2] == ["lr_too_high", "dying_relu"]
    dead = found[1]
    assert dead.confidence < found[0].confidence
    assert any("ranked lower" in line and "too large before the units died" in line for line in dead.evidence)


def test_dead_units_with_a_stall_and_no_sign_of_big_updates_is_dying_relu() -> None:
    events = [ev("dead_units", 25, layers=["1"], max_fraction=1.0), PLATEAU]
    assert causes(events) == ["dying_relu"]


def test_nan_after_divergence_ranks_lr_too_high_above_non_finite() -> None:
    events = [
        ev("update_ratio_high", 25, source="UpdateRatio", conf=0.7, median_ratio=0.5, steps=[1, 11]),
        ev("nonfinite", 50, "error", source="NonFinite", where="loss", first_step=43),
        ev("nonfinite_gradients", 50, "error", source="GradNormMonitor", first_step=43),
        ev("divergence", 50, "error", source="PlateauDetector", reason="non_finite", first_step=43),
    ]
    found = causes(events)
    assert found.index("lr_too_high") < found.index("non_finite")


def test_nan_from_the_start_without_blowup_is_non_finite_first() -> None:
    events = [
        ev("nonfinite", 25, "error", source="NonFinite", where="loss", first_step=3),
        ev("divergence", 25, "error", source="PlateauDetector", reason="non_finite", first_step=3),
    ]
    found = sg.diagnose(events)
    assert found[0].cause == "non_finite"
    assert "log_softmax" in found[0].advice


def test_nan_in_the_inputs_is_non_finite_whatever_the_update_ratios_say() -> None:
    # Updates measured on weights that are already NaN have an infinite ratio: that is no LR evidence.
    events = [
        ev("nonfinite_inputs", 25, "error", source="InputStats", where="inputs", count=3),
        ev("nonfinite", 25, "error", source="NonFinite", where="inputs", first_step=2),
        ev("update_ratio_high", 25, source="UpdateRatio", median_ratio=float("inf"), steps=[1, 11]),
        ev("divergence", 25, "error", source="PlateauDetector", reason="non_finite", first_step=2),
    ]
    found = sg.diagnose(events)
    assert found[0].cause == "non_finite" and "lr_too_high" not in [d.cause for d in found]
    assert "inputs" in found[0].advice


def test_exploding_gradients_before_the_nan_rank_above_it() -> None:
    events = [
        ev("exploding_gradients", 100, source="GradNormMonitor", conf=0.9, growth=500.0),
        ev("divergence", 100, "error", source="PlateauDetector", reason="explosion", ratio=1e4),
        ev("nonfinite_gradients", 125, "error", source="GradNormMonitor", first_step=117),
    ]
    found = causes(events)
    assert found[0] == "exploding_gradients"
    assert found.index("non_finite") > found.index("exploding_gradients")


def test_gradients_that_explode_after_a_calm_stretch_outrank_an_early_high_update_ratio() -> None:
    # The loss fell for 80 steps, then the gradient norm jumped 10^4x: the explosion, not the LR.
    events = [
        ev("update_ratio_high", 25, source="UpdateRatio", conf=0.8, median_ratio=0.23, steps=[1, 11]),
        ev("exploding_gradients", 100, source="GradNormMonitor", conf=1.0, rules=["growth"], growth=3.4e4),
        ev("divergence", 100, "error", source="PlateauDetector", reason="explosion", ratio=7e8),
        ev("oscillation", 125, source="PlateauDetector"),
    ]
    found = causes(events)
    assert found[0] == "exploding_gradients"
    assert found.index("lr_too_high") > 0


def test_a_loss_that_diverged_before_the_gradients_grew_keeps_lr_too_high_first() -> None:
    events = [
        ev("update_ratio_high", 25, source="UpdateRatio", conf=0.8, median_ratio=1.2, steps=[1, 11]),
        ev("divergence", 25, "error", source="PlateauDetector", reason="explosion", ratio=2.5e20),
        ev("exploding_gradients", 50, source="GradNormMonitor", conf=1.0, rules=["growth"], growth=3e10),
        ev("nonfinite", 50, "error", source="NonFinite", where="loss", first_step=39),
    ]
    found = causes(events)
    assert found[0] == "lr_too_high"
    assert found.index("non_finite") > found.index("exploding_gradients")


def test_loss_spikes_that_the_gradients_spike_with_are_exploding_gradients() -> None:
    # Outlier targets: the loss spikes from the first check on (PlateauDetector's explosion), and once the
    # monitor has calm batches to compare with, the sampled spikes carry gradients 9x those of the others.
    events = [
        ev("divergence", 50, "error", source="PlateauDetector", reason="explosion", ratio=108.0, level=3.0, best=3.0),
        ev("plateau", 100, source="PlateauDetector", level=13.1, best=3.0),
        ev("divergence", 100, "error", source="PlateauDetector", reason="explosion", ratio=157.0, level=13.1),
        ev("exploding_gradients", 150, source="GradNormMonitor", conf=1.0, rules=["spikes"], spike_norm_ratio=8.6),
    ]
    found = causes(events)
    assert found[0] == "exploding_gradients"
    assert "lr_too_high" not in found  # the loss went wrong with the gradients, not through large updates


def test_a_surge_with_large_updates_in_the_same_interval_keeps_lr_too_high_first() -> None:
    events = [
        ev("update_ratio_high", 50, source="UpdateRatio", conf=0.8, median_ratio=0.9, steps=[1, 11]),
        ev("exploding_gradients", 50, source="GradNormMonitor", conf=1.0, rules=["surge"], growth=8.0),
        ev("divergence", 50, "error", source="PlateauDetector", reason="rise", ratio=6.0),
    ]
    found = causes(events)
    assert found[0] == "lr_too_high"
    assert "exploding_gradients" in found


def test_dead_units_explain_vanishing_gradients_and_tiny_updates() -> None:
    events = [
        ev("dead_units", 25, source="DeadReLUCounter", layers=["1", "3"], max_fraction=1.0),
        ev("vanishing_gradients", 50, source="GradNormMonitor", conf=1.0, ratio=0.0),
        ev("update_ratio_low", 50, source="UpdateRatio", conf=0.8, median_ratio=1e-8),
        PLATEAU,
    ]
    found = sg.diagnose(events)
    assert found[0].cause == "dying_relu"
    assert {"vanishing_gradients", "lr_too_low"} <= {d.cause for d in found[1:]}


def test_frozen_weights_from_vanished_gradients_are_the_vanishing_gradients() -> None:
    events = [
        ev("vanishing_gradients", 25, conf=1.0, ratio=1e-7),
        ev("weights_frozen", 50, source="StaleParams", conf=0.9, parameters=["0.weight"]),
        PLATEAU,
    ]
    assert causes(events)[:2] == ["vanishing_gradients", "params_not_updated"]
    # A construction bug is not explained away by vanishing gradients.
    events.append(ev("grads_missing", 1, "error", source="StaleParams", conf=0.95))
    assert causes(events)[0] == "params_not_updated"


def test_a_loss_at_chance_put_down_to_imbalanced_labels_is_class_imbalance() -> None:
    events = [
        ev("class_imbalance", 50, source="TargetStats", conf=0.9),
        sg.Event(kind="loss_at_chance", severity="warning", message="at chance", step=250, causes=("class_imbalance",)),
    ]
    assert causes(events) == ["class_imbalance"]


def test_plateau_with_tiny_updates_is_lr_too_low() -> None:
    events = [
        ev("update_ratio_low", 100, source="UpdateRatio", conf=0.8, median_ratio=2e-7, steps=[60, 90]),
        ev("loss_at_chance", 150, source="TargetStats", causes=None, loss=1.386, chance=1.386),
        PLATEAU,
    ]
    found = sg.diagnose(events)
    assert [d.cause for d in found][:2] == ["lr_too_low", "no_signal"]
    assert "2e-07" in found[0].advice


def test_tiny_updates_without_a_stall_are_weaker_evidence() -> None:
    alone = sg.diagnose([ev("update_ratio_low", 100, conf=0.8, median_ratio=2e-7)])
    stalled = sg.diagnose([ev("update_ratio_low", 100, conf=0.8, median_ratio=2e-7), PLATEAU])
    assert alone[0].cause == stalled[0].cause == "lr_too_low"
    assert alone[0].confidence < stalled[0].confidence


def test_missing_zero_grad_ranks_above_the_divergence_it_causes() -> None:
    events = [
        ev("grads_not_cleared", 25, "error", source="ZeroGradCheck", conf=0.95),
        ev("divergence", 50, "error", source="PlateauDetector", reason="rise"),
        ev("oscillation", 100, source="PlateauDetector"),
        PLATEAU,
    ]
    assert causes(events)[:2] == ["missing_zero_grad", "lr_too_high"]


def test_saturation_explains_the_vanishing_gradients_it_causes() -> None:
    events = [
        ev("vanishing_gradients", 25, source="GradNormMonitor", conf=1.0, ratio=1e-5),
        ev("saturated_activations", 25, source="SaturationCheck", conf=0.9, layers=["1"]),
        PLATEAU,
    ]
    assert causes(events)[:2] == ["saturated_activations", "vanishing_gradients"]


def test_unnormalized_inputs_rank_above_their_knock_on_symptoms() -> None:
    events = [
        ev("inputs_unnormalized", 25, source="InputStats", min=0.0, max=255.0, mean=120.0, std=40.0),
        ev("dead_units", 50, layers=["1"], max_fraction=0.9),
        ev("vanishing_gradients", 50, conf=1.0, ratio=1e-5),
        PLATEAU,
    ]
    found = sg.diagnose(events)
    assert found[0].cause == "unnormalized_inputs"
    assert "255" in found[0].advice


def test_weight_decay_explains_the_small_first_layer_gradients() -> None:
    events = [
        ev("over_regularization", 50, source="Regularization", conf=0.8),
        ev("vanishing_gradients", 25, conf=1.0, ratio=1e-5),
        ev("loss_at_chance", 150, loss=1.386, chance=1.386),
        PLATEAU,
    ]
    assert causes(events)[0] == "over_regularization"


def test_loss_at_chance_next_to_a_cause_that_stops_learning_is_not_no_signal() -> None:
    chance = ev("loss_at_chance", 150, conf=0.7, loss=1.386, chance=1.386)
    assert causes([chance, PLATEAU]) == ["no_signal"]
    found = causes([chance, PLATEAU, ev("dead_units", 50, layers=["1"], max_fraction=1.0)])
    assert found[0] == "dying_relu"


def test_frozen_weights_count_only_while_the_loss_stalls() -> None:
    frozen = ev("weights_frozen", 200, source="StaleParams", reason="not_updated", parameters=["0.weight"])
    assert sg.diagnose([frozen, ev("converged", 200, "info")]) == []
    assert causes([frozen, PLATEAU]) == ["params_not_updated"]


def test_a_param_group_with_lr_zero_is_named_without_a_stall() -> None:
    frozen = ev("weights_frozen", 20, source="StaleParams", conf=0.9, reason="lr_zero", params=["l1.weight"])
    assert causes([frozen]) == ["params_not_updated"]


def test_weights_frozen_by_low_precision_underflow_are_lr_too_low() -> None:
    frozen = sg.Event(
        kind="weights_frozen",
        severity="warning",
        message="updates round away in bf16",
        step=10,
        causes=("lr_too_low",),
        confidence=0.7,
        data={"reason": "update_underflow", "params": ["weight"]},
    )
    assert causes([frozen, PLATEAU]) == ["lr_too_low"]


def test_a_model_that_cannot_fit_is_not_over_regularized() -> None:
    # A linear model on XOR settles at zero weights, where the loss gradient points along the weights.
    events = [
        ev("capacity_limited", 0, "info", source="CapacityCheck", reason="linear_model"),
        ev("over_regularization", 50, source="Regularization", conf=0.8),
        PLATEAU,
    ]
    assert causes(events)[:2] == ["insufficient_capacity", "over_regularization"]


def test_a_stall_the_loss_recovered_from_no_longer_gates_symptoms() -> None:
    dead = ev("dead_units", 50, source="DeadReLUCounter", layers=["1"], max_fraction=0.8)
    recovered = ev("recovered", 250, "info", source="PlateauDetector", after="plateau")
    assert causes([dead, PLATEAU]) == ["dying_relu"]
    assert sg.diagnose([dead, PLATEAU, recovered]) == []
    stalled_again = ev("plateau", 400, source="PlateauDetector")
    assert causes([dead, PLATEAU, recovered, stalled_again]) == ["dying_relu"]


def test_a_loss_at_chance_the_run_has_left_behind_is_not_evidence() -> None:
    # A slow starter: at chance for 200 steps, then it learns. With the Guard at hand, the recent
    # losses show it.
    guard = _guard_with([], [3.9] * 200 + [2.0] * 60)
    chance = ev("loss_at_chance", 200, source="TargetStats", conf=0.7, loss=3.82, chance=3.9, margin=0.05)
    guard.publish(chance)
    assert guard.diagnose() == []
    assert causes([chance]) == ["no_signal"]  # from the events alone, it still reads as a stall
    guard.close()
    stuck = _guard_with([], [3.9] * 260)
    stuck.publish(chance)
    assert [d.cause for d in stuck.diagnose()] == ["no_signal"]
    stuck.close()
    # Memorization: the loss leaves chance too, but a few percent of chance per 100 steps, never steeply.
    creeping = _guard_with([], [3.9] * 200 + [3.9 - 0.002 * i for i in range(300)])
    creeping.publish(chance)
    assert creeping.series("loss").last(50).max() < 0.9 * 3.9  # clearly below chance by now
    assert [d.cause for d in creeping.diagnose()] == ["no_signal"]
    creeping.close()


def test_construction_bugs_are_named_whatever_the_loss_does() -> None:
    wrong_model = ev("optimizer_params_not_in_model", 1, "error", source="StaleParams", conf=0.95)
    found = sg.diagnose([wrong_model])
    assert found[0].cause == "params_not_updated"
    assert "model.parameters()" in found[0].advice
    assert sg.diagnose([ev("optimizer_params_not_in_model", 1, "info")]) == []  # info is not evidence


# ------------------------------------------------------------------------- every cause is reachable
MINIMAL: dict[str, list[sg.Event]] = {
    "lr_too_high": [ev("update_ratio_high", 25, median_ratio=0.5), ev("divergence", 50, "error", reason="explosion")],
    "lr_too_low": [ev("update_ratio_low", 100, median_ratio=1e-7), PLATEAU],
    "bad_init": [ev("bad_init", 0, problems=["constant"]), PLATEAU],
    "over_regularization": [ev("over_regularization", 50), PLATEAU],
    "unnormalized_inputs": [ev("inputs_unnormalized", 25, min=0.0, max=255.0, mean=120.0, std=40.0)],
    "dying_relu": [ev("dead_units", 50, layers=["1"], max_fraction=1.0), PLATEAU],
    "saturated_activations": [ev("saturated_activations", 50, layers=["1"]), PLATEAU],
    "vanishing_gradients": [ev("vanishing_gradients", 50, ratio=1e-5), PLATEAU],
    "exploding_gradients": [ev("exploding_gradients", 50, growth=300.0), PLATEAU],
    "class_imbalance": [ev("class_imbalance", 25), ev("predictions_collapsed", 100)],
    "missing_zero_grad": [ev("grads_not_cleared", 25, "error")],
    "params_not_updated": [ev("grads_missing", 1, "error", parameters=["encoder.weight"])],
    "no_signal": [ev("loss_at_chance", 150, loss=1.386, chance=1.386), PLATEAU],
    "insufficient_capacity": [ev("capacity_limited", 0), PLATEAU],
    "overfitting": [ev("overfitting", 300, best_step=120)],
    "non_finite": [ev("nonfinite", 25, "error", where="loss", first_step=7)],
}


def test_causes_are_complete_and_described() -> None:
    assert len(sg.CAUSES) == 16
    assert set(MINIMAL) == set(sg.CAUSES)
    for cause, description in sg.CAUSES.items():
        assert re.fullmatch(r"[a-z_]+", cause)
        assert description.endswith(".") and len(description) > 30, cause


@pytest.mark.parametrize("cause", list(MINIMAL))
def test_each_cause_ranks_first_on_its_own_evidence(cause: str) -> None:
    found = sg.diagnose(MINIMAL[cause])
    assert found[0].cause == cause
    d = found[0]
    assert 0 < d.confidence <= 1 and d.advice and d.evidence
    assert d.description == sg.CAUSES[cause]
    assert json.loads(json.dumps(d.to_dict()))["cause"] == cause


def test_every_cause_has_a_demo_and_a_docs_section() -> None:
    shown = {d.cause for d in DEMOS.values() if d.cause}
    assert shown == set(sg.CAUSES)
    text = DOCS.read_text()
    for cause in sg.CAUSES:
        assert f"### `{cause}`" in text, cause


def test_ranking_survives_a_jsonl_round_trip(tmp_path: Path) -> None:
    events = MINIMAL["lr_too_high"] + [ev("dead_units", 50, layers=["1"], max_fraction=1.0)]
    path = tmp_path / "events.jsonl"
    sink = sg.JSONLSink(path)
    for e in events:
        sink.write(e)
    sink.close()
    assert causes(sg.read_jsonl(path)) == causes(events)


def test_diagnosis_validates_its_fields() -> None:
    with pytest.raises(ValueError, match="unknown cause 'slow'"):
        sg.Diagnosis("slow", 0.5, (), "")
    with pytest.raises(ValueError, match=r"confidence must lie in \[0, 1\]"):
        sg.Diagnosis("lr_too_low", 1.5, (), "")


# -------------------------------------------------------------------------------------------- report
def _guard_with(events: list[sg.Event], losses: list[float] = ()) -> sg.Guard:
    guard = sg.Guard(None, None, hooks=[], sinks=[], check_every=10)
    for v in losses:
        guard.observe(v)
        guard.after_step()
    for e in events:
        guard.publish(e)
    return guard


def test_report_of_a_healthy_run() -> None:
    guard = _guard_with([], [1.0, 0.8, 0.5, 0.3, 0.2, 0.1, 0.1, 0.1, 0.1, 0.1])
    text = guard.report()
    assert "10 optimizer steps" in text
    assert "loss: first 1, last 0.1, best 0.1" in text
    assert "timeline: no warnings." in text
    assert "no cause found" in text
    guard.close()


def test_report_folds_repeats_and_tabulates_the_diagnosis() -> None:
    events = [
        ev("divergence", 25, "error", source="PlateauDetector", reason="explosion"),
        ev("dead_units", 50, source="DeadReLUCounter", layers=["3"], max_fraction=0.9),
        *[ev("plateau", s, source="PlateauDetector") for s in (150, 175, 200, 225)],
    ]
    guard = _guard_with(events)
    text = guard.report()
    # Four plateau events in a row from one hook are one line.
    assert re.search(r"step +150 +warning +plateau .*\(x4, until step 225\)", text)
    assert len(re.findall(r"^ +step +\d+ +warning +plateau ", text, re.M)) == 1
    header = re.search(r"^#\s+cause\s+conf\s+what it means$", text, re.M)
    assert header, text
    assert re.search(r"^1\s+lr_too_high\s+0\.\d\d\s+The learning rate is too high", text, re.M)
    assert re.search(r"^2\s+dying_relu\s+", text, re.M)
    assert "1. lr_too_high: Lower the learning rate" in text
    assert "ranked lower: the updates were too large before the units died" in text
    guard.close()


def test_report_timeline_keeps_the_latest_entries() -> None:
    events = [ev(f"kind_{i}", i, source="Test") for i in range(40)]
    guard = _guard_with(events)
    text = sg.diagnosis.format_report(guard, max_timeline=5)
    assert "35 earlier entries not shown" in text
    assert "kind_39" in text and "kind_34" not in text
    guard.close()


def test_advice_quotes_the_current_learning_rate() -> None:
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.3)
    guard = sg.Guard(model, opt, hooks=[], sinks=[])
    for e in MINIMAL["lr_too_high"]:
        guard.publish(e)
    assert "(now 0.3)" in guard.diagnose()[0].advice
    guard.close()


# ------------------------------------------------------------------------------------------- targets and fit
def test_targets_that_cannot_match_the_outputs_are_no_signal() -> None:
    mismatch = ev("shape_mismatch", 10, "error", source="TargetStats", conf=0.95, outputs=[64, 1], targets=[64])
    assert causes([mismatch]) == ["no_signal"]
    (d,) = sg.diagnose([mismatch])
    assert d.confidence >= 0.9 and "shape_mismatch" in d.evidence[0]


def test_overfitting_advice_follows_the_direction_of_the_metric() -> None:
    worse_acc = ev("overfitting", 300, source="Overfit", monitor="val_acc", mode="max", best_step=120)
    (d,) = sg.diagnose([worse_acc])
    assert d.advice.startswith("val_acc falls while the training loss falls: stop early at step 120")
    (d,) = sg.diagnose([ev("overfitting", 300, source="Overfit", monitor="val_loss", mode="min")])
    assert d.advice.startswith("val_loss rises")


def test_tiny_updates_after_the_loss_converged_are_healthy() -> None:
    converged = ev("converged", 300, "info", source="PlateauDetector", level=0.004)
    late_low = ev("update_ratio_low", 400, conf=0.8, median_ratio=3e-6)
    assert sg.diagnose([converged, late_low]) == []
    assert causes([converged, late_low, ev("plateau", 450, source="PlateauDetector")])[0] == "lr_too_low"


def test_constant_inputs_rank_above_the_vanishing_gradients_they_cause() -> None:
    constant = sg.Event(
        kind="constant_features", severity="warning", message="every feature constant", step=50, source="InputStats",
        causes=("no_signal",), confidence=0.9,
    )  # fmt: skip
    events = [
        constant,
        ev("vanishing_gradients", 50, source="GradNormMonitor", conf=0.95, ratio=1e-9),
        ev("plateau", 100, source="PlateauDetector"),
    ]
    assert causes(events)[:2] == ["no_signal", "vanishing_gradients"]
