"""Healthy MLP, CNN, LSTM and transformer runs, with SGD and Adam (and an LR warm-up): the model checks stay quiet."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from tiny_runs import LSTMClassifier, TinyTransformer, classification, mlp, small_cnn, train
from torch import nn

import stallguard as sg

MODEL_CHECKS = ("InitCheck", "UpdateRatio", "SaturationCheck", "CapacityCheck")

MODELS: dict[str, Callable[[], nn.Module]] = {
    "mlp": mlp,
    "tanh_mlp": lambda: nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 4)),
    "cnn": small_cnn,
    "lstm": LSTMClassifier,
    "transformer": TinyTransformer,
}


def sgd(params) -> tuple[torch.optim.Optimizer, None]:
    return torch.optim.SGD(params, lr=0.05, momentum=0.9), None


def adam(params) -> tuple[torch.optim.Optimizer, None]:
    return torch.optim.Adam(params, lr=1e-3), None


def adam_warmup(params) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    opt = torch.optim.AdamW(params, lr=3e-3, weight_decay=0.01)
    return opt, torch.optim.lr_scheduler.LinearLR(opt, start_factor=1e-3, total_iters=150)


@pytest.mark.parametrize("optimizer", [sgd, adam, adam_warmup], ids=["sgd", "adam", "adamw_warmup"])
@pytest.mark.parametrize("name", list(MODELS))
def test_healthy_run_is_quiet(name: str, optimizer) -> None:
    model = MODELS[name]()
    opt, sched = optimizer(model.parameters())
    guard, loss = train(model, opt, 200, classification(), scheduler=sched)
    assert loss < 1.3  # it learns (chance is ln 4 = 1.39)
    assert {type(h).__name__ for h in guard.hooks} >= set(MODEL_CHECKS)
    loud = [e for e in guard.events if e.source in MODEL_CHECKS and e.severity >= sg.Severity.INFO]
    assert loud == []
    # The update ratio was measured, and sits in the healthy band.
    ratios = [e.data["median_ratio"] for e in guard.events if e.kind == "update_ratio"]
    assert ratios and all(1e-5 < r < 1e-1 for r in ratios)


def test_config_round_trip_keeps_the_model_checks_arguments() -> None:
    hooks = [
        sg.InitCheck(scale_high=20.0),
        sg.UpdateRatio(low=1e-6, every=5, warmup=0),
        sg.SaturationCheck(threshold=0.6, every=3),
        sg.CapacityCheck(min_params_per_output=0),
    ]
    guard = sg.Guard(mlp(), None, hooks=hooks, sinks=[])
    config = guard.to_config()
    guard.close()
    rebuilt = sg.Guard.from_config(mlp(), None, config)
    assert [h.get_config() for h in rebuilt.hooks] == [h.get_config() for h in hooks]
    assert rebuilt.hooks[1].every == 5 and rebuilt.hooks[1].low == 1e-6 and rebuilt.hooks[2].threshold == 0.6
    rebuilt.close()
