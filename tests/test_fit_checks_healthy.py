"""Healthy runs with typical weight decay and an improving validation loss: Regularization and Overfit stay quiet."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import stallguard as sg
from tests.helpers import regression_data

FIT_KINDS = ("over_regularization", "overfitting")


def classification_data(n: int = 512, d: int = 16, k: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    return x, (x @ torch.randn(d, k, generator=g)).argmax(1)


def run(task: str, make_opt, steps: int = 400, val_every: int = 20) -> sg.Guard:
    """A healthy run with the default hooks, a held-out validation set observed every ``val_every`` steps."""
    if task == "regression":
        x, y = regression_data(n=768)
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 1))
        loss_fn = nn.functional.mse_loss
    else:
        x, y = classification_data(n=1536)
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))
        loss_fn = nn.functional.cross_entropy
    x_train, y_train, x_val, y_val = x[:-256], y[:-256], x[-256:], y[-256:]
    opt = make_opt(model.parameters())
    guard = sg.Guard(model, opt, sinks=[], check_every=50, strict=True)
    g = torch.Generator().manual_seed(1)
    for step in range(1, steps + 1):
        idx = torch.randint(0, len(x_train), (64,), generator=g)
        loss = loss_fn(model(x_train[idx]), y_train[idx])
        opt.zero_grad()
        loss.backward()
        guard.observe(loss)
        opt.step()
        if step % val_every == 0:
            with torch.no_grad():
                guard.observe(val_loss=loss_fn(model(x_val), y_val))
    guard.close()
    return guard


HEALTHY = {
    "sgd_5e-4": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=5e-4),
    "adamw_0.01": lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.01),
}


@pytest.mark.parametrize("task", ["regression", "classification"])
@pytest.mark.parametrize("opt", sorted(HEALTHY))
def test_typical_weight_decay_with_improving_validation_is_quiet(task: str, opt: str) -> None:
    guard = run(task, HEALTHY[opt])
    val = guard.series("val_loss").values
    assert val[-1] < 0.5 * val[0]  # the run really learns, on held-out data too
    assert not [e for e in guard.events if e.kind in FIT_KINDS], [(e.kind, e.message) for e in guard.events]
    assert not {d.cause for d in guard.diagnose()} & {"over_regularization", "overfitting"}
