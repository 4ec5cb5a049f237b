"""Healthy training runs (MLP, CNN, LSTM) stay quiet under the loop-bug checks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import stallguard as sg
from tests.grad_models import quadrant_images, small_cnn
from tests.helpers import mlp, regression_data

SOURCES = ("ZeroGradCheck", "StaleParams", "NonFinite")


class LSTMRegressor(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(4, 16, batch_first=True)
        self.head = nn.Linear(16, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(x)
        return self.head(out[:, -1])


def data(kind: str) -> tuple[nn.Module, torch.Tensor, torch.Tensor, nn.Module]:
    g = torch.Generator().manual_seed(0)
    if kind == "mlp":
        x, y = regression_data()
        return mlp(), x, y, nn.MSELoss()
    if kind == "cnn":
        x, y = quadrant_images(128, g)
        return small_cnn(), x, y, nn.CrossEntropyLoss()
    x = torch.randn(64, 12, 4, generator=g)
    return LSTMRegressor(), x, x[:, :, 0].sum(1, keepdim=True) * 0.1, nn.MSELoss()


@pytest.mark.parametrize("kind", ["mlp", "cnn", "lstm"])
@pytest.mark.parametrize("accumulate", [1, 2])
def test_healthy_runs_are_quiet(kind: str, accumulate: int) -> None:
    model, x, y, loss_fn = data(kind)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    hooks = [sg.ZeroGradCheck(every=3), sg.StaleParams(update_every=2), sg.NonFinite()]
    guard = sg.Guard(model, opt, hooks=hooks, sinks=[], check_every=10, strict=True)
    losses = []
    n = x.shape[0] // 4
    for s in range(30):
        for k in range(accumulate):
            i = (s * accumulate + k) % 4
            loss = loss_fn(model(x[i * n : (i + 1) * n]), y[i * n : (i + 1) * n]) / accumulate
            loss.backward()
            guard.observe(loss, inputs=x[i * n : (i + 1) * n])
            losses.append(loss.item() * accumulate)
        opt.step()
        opt.zero_grad()
    guard.close()
    assert losses[-1] < losses[0]  # the run really learns
    assert [e.kind for e in guard.events] == []
    zero_grad = guard.hook(sg.ZeroGradCheck)
    assert zero_grad.total_flagged == 0 and zero_grad._watched  # it did watch parameters


def test_default_guard_on_a_healthy_run_has_nothing_from_the_loop_checks() -> None:
    model, x, y, loss_fn = data("mlp")
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    guard = sg.Guard(model, opt, sinks=[], check_every=10, strict=True)
    for _ in range(40):
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        guard.observe(loss, inputs=x)
        opt.step()
    guard.close()
    assert {type(h).__name__ for h in guard.hooks} >= set(SOURCES)
    assert [e.kind for e in guard.events if e.source in SOURCES] == []
