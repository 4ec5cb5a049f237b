"""Small real models and data shared by the tests."""

from __future__ import annotations

import torch
from torch import nn


def regression_data(n: int = 256, d: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A learnable regression task: y = x @ w + noise."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    w = torch.randn(d, 1, generator=g)
    return x, x @ w + 0.05 * torch.randn(n, 1, generator=g)


def mlp(d_in: int = 8, hidden: int = 16, d_out: int = 1) -> nn.Module:
    return nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, d_out))
