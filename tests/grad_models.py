"""Tiny real models and data for the gradient hooks' tests (seconds on a CPU)."""

from __future__ import annotations

import torch
from torch import nn

import stallguard as sg


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


class RNNClassifier(nn.Module):
    """A vanilla tanh RNN whose last hidden state feeds a linear head (sequence classification)."""

    def __init__(self, hidden: int = 128, d_in: int = 4, classes: int = 3) -> None:
        super().__init__()
        self.rnn = nn.RNN(d_in, hidden, batch_first=True)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


def template_sequences(g: torch.Generator, n: int = 512, steps: int = 30) -> tuple[torch.Tensor, torch.Tensor]:
    """Three classes, each a template trajectory of 4 channels seen through unit noise."""
    templates = torch.randn(3, steps, 4, generator=g) * 0.6
    y = torch.randint(0, 3, (n,), generator=g)
    return templates[y] + torch.randn(n, steps, 4, generator=g), y


def smooth_regression(g: torch.Generator, n: int = 1024, corrupt: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A smooth 8-input regression target; ``corrupt`` records get a target of +-100 instead."""
    x = torch.randn(n, 8, generator=g)
    w1 = torch.randn(8, 16, generator=g) / 8**0.5
    w2 = torch.randn(16, 1, generator=g) / 4
    y = torch.tanh(x @ w1) @ w2 * 3 + 0.05 * torch.randn(n, 1, generator=g)
    if corrupt:
        rows = torch.randperm(n, generator=g)[:corrupt]
        y[rows] = 100.0 * torch.sign(torch.randn(corrupt, 1, generator=g))
    return x, y


def _guard(model: nn.Module, opt: torch.optim.Optimizer, hooks: list[sg.Hook] | None) -> sg.Guard:
    """The default Guard when ``hooks`` is None, else these hooks alone; checks every 50 steps either way."""
    if hooks is None:
        return sg.Guard(model, opt, sinks=[], strict=True)
    return sg.Guard(model, opt, hooks=hooks, sinks=[], check_every=50, strict=True)


def train_rnn_classifier(
    hooks: list[sg.Hook] | None, clip: float | None = None, steps: int = 150
) -> tuple[sg.Guard, list[float]]:
    """A tanh RNN over 30-step sequences with SGD at lr=0.3: calm for ~85 steps, then its gradients blow up."""
    g = torch.Generator().manual_seed(1)
    torch.manual_seed(1)
    x, y = template_sequences(g)
    model = RNNClassifier()
    opt = torch.optim.SGD(model.parameters(), lr=0.3)
    guard = _guard(model, opt, hooks)
    losses = []
    for _ in range(steps):
        idx = torch.randint(0, x.shape[0], (32,), generator=g)
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        guard.observe(loss)
        if clip is not None:
            nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        losses.append(loss.item())
    return guard, losses


def train_outlier_regression(hooks: list[sg.Hook] | None, corrupt: int, observe: bool = True) -> sg.Guard:
    """An MLP regressor whose data holds ``corrupt`` records with a target of +-100 (SGD with momentum)."""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    x, y = smooth_regression(g, corrupt=corrupt)
    model = nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    guard = _guard(model, opt, hooks)
    for _ in range(200):
        idx = torch.randint(0, x.shape[0], (64,), generator=g)
        loss = nn.functional.mse_loss(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        if observe:
            guard.observe(loss)
        opt.step()
    return guard
