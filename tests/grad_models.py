"""Tiny real models and data for the gradient hooks' tests (seconds on a CPU)."""

from __future__ import annotations

import torch
from torch import nn


def sigmoid_mlp(depth: int = 20, width: int = 32) -> nn.Sequential:
    """A deep sigmoid MLP (16 inputs, 4 classes): its first layers get almost no gradient."""
    layers: list[nn.Module] = [nn.Linear(16, width), nn.Sigmoid()]
    for _ in range(depth - 2):
        layers += [nn.Linear(width, width), nn.Sigmoid()]
    return nn.Sequential(*layers, nn.Linear(width, 4))


class RNNRegressor(nn.Module):
    """A tanh RNN with a linear head; scaling its recurrent weights up makes its gradients explode."""

    def __init__(self, recurrent_scale: float = 1.0, hidden: int = 32) -> None:
        super().__init__()
        self.rnn = nn.RNN(4, hidden, batch_first=True)
        self.head = nn.Linear(hidden, 1)
        with torch.no_grad():
            self.rnn.weight_hh_l0.mul_(recurrent_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


def rnn_data() -> tuple[torch.Tensor, torch.Tensor]:
    """64 sequences of 30 steps; the target is a scaled sum of the first input channel."""
    torch.manual_seed(0)
    x = torch.randn(64, 30, 4)
    return x, x[:, :, 0].sum(1, keepdim=True) * 0.1


def small_cnn() -> nn.Sequential:
    """Two conv layers and a linear head for 1-channel images, 4 classes."""
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 4),
    )


def quadrant_images(n: int, g: torch.Generator, size: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise images whose class is the brighter quadrant: learnable by ``small_cnn``."""
    x = torch.randn(n, 1, size, size, generator=g)
    y = torch.randint(0, 4, (n,), generator=g)
    half = size // 2
    for c in range(4):
        r, col = divmod(c, 2)
        x[y == c, :, r * half : (r + 1) * half, col * half : (col + 1) * half] += 1.0
    return x, y
