"""End to end: every demo fault, a small real training loop, is diagnosed with its own cause first.

The demos (``python -m stallguard demo --fault NAME``) run under the full default Guard; here each runs
for its ``quick_steps`` (a few hundred optimizer steps at most, on one CPU thread).
"""

from __future__ import annotations

import pytest

import stallguard as sg
from stallguard.demo import DEMOS, run_demo
from tests.grad_models import train_outlier_regression, train_rnn_classifier

FAULTS = [name for name, demo in DEMOS.items() if demo.cause is not None]


def run(name: str) -> sg.Guard:
    demo = DEMOS[name]
    return run_demo(name, steps=demo.quick_steps, sinks=[], out=lambda line: None, report=False)


def test_there_is_a_demo_for_every_cause() -> None:
    assert sorted(DEMOS[name].cause for name in FAULTS) == sorted(sg.CAUSES)


@pytest.mark.parametrize("name", FAULTS)
def test_demo_fault_is_diagnosed_first(name: str) -> None:
    guard = run(name)
    found = guard.diagnose()
    assert found, f"{name}: no diagnosis; events: {[e.kind for e in guard.events]}"
    ranked = [(d.cause, d.confidence) for d in found]
    assert found[0].cause == DEMOS[name].cause, f"{name}: {ranked}"
    # The evidence cites real events of this run, and the report names the cause first.
    assert found[0].events and all(e in guard.events for e in found[0].events)
    assert f"1  {found[0].cause}" in guard.report()


def test_healthy_demo_stays_quiet() -> None:
    guard = run("healthy")
    assert guard.diagnose() == []
    assert not [e for e in guard.events if e.severity >= sg.Severity.WARNING]
    loss = guard.series("loss").values
    assert loss[-1] < 0.1 * loss[0]  # it really trains


# ------------------------------------------------------------- exploding gradients under the default set
# The default set reads the gradient norm on one step in ten; these runs blow up between its samples or
# are spiky from the first step, and the loss (observed on every step) carries the evidence.
def test_rnn_that_blows_up_between_samples_is_named_exploding_gradients() -> None:
    guard, _ = train_rnn_classifier(None)
    found = guard.diagnose()
    ranked = [(d.cause, d.confidence) for d in found]
    assert found and found[0].cause == "exploding_gradients", ranked
    assert any(e.kind == "exploding_gradients" for e in found[0].events)
    guard.close()


def test_same_rnn_with_clipped_gradients_gets_no_diagnosis() -> None:
    guard, _ = train_rnn_classifier(None, clip=1.0)
    assert guard.diagnose() == [], guard.report()
    guard.close()


def test_regression_with_outlier_targets_is_named_exploding_gradients() -> None:
    guard = train_outlier_regression(None, corrupt=8)
    found = guard.diagnose()
    assert found and found[0].cause == "exploding_gradients", [(d.cause, d.confidence) for d in found]
    guard.close()


def test_same_regression_with_clean_targets_gets_no_diagnosis() -> None:
    guard = train_outlier_regression(None, corrupt=0)
    assert guard.diagnose() == [], guard.report()
    guard.close()
