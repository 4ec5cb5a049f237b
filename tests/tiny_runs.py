"""Small real training runs for the model checks' tests (a second or two each on a CPU)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

import stallguard as sg

Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def classification(n: int = 512, d: int = 16, classes: int = 4, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian inputs; the class is the largest of the first ``classes`` features (learnable, non-linear)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    return x, x[:, :classes].argmax(1)


def xor(n: int = 64, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Noisy XOR: no linear model does better than chance (loss ln 2)."""
    g = torch.Generator().manual_seed(seed)
    bits = torch.tensor([[0.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 1.0]]).repeat(n // 4, 1)  # balanced
    return bits + 0.05 * torch.randn(n, 2, generator=g), (bits[:, 0] != bits[:, 1]).float()[:, None]


def mlp(d_in: int = 16, hidden: int = 32, d_out: int = 4) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, d_out)
    )


class LSTMClassifier(nn.Module):
    """An LSTM over the 16 classification features read as 4 steps of 4, with a linear head."""

    def __init__(self, d_in: int = 4, hidden: int = 32, classes: int = 4) -> None:
        super().__init__()
        self.lstm = nn.LSTM(d_in, hidden, batch_first=True)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(x.reshape(x.shape[0], 4, 4))
        return self.head(out[:, -1])


class TinyTransformer(nn.Module):
    """One pre-norm encoder layer over 4 tokens of 4 features each, mean-pooled, with a linear head."""

    def __init__(self, d_model: int = 32, classes: int = 4) -> None:
        super().__init__()
        self.embed = nn.Linear(4, d_model)
        self.pos = nn.Parameter(torch.zeros(1, 4, d_model))
        self.encoder = nn.TransformerEncoderLayer(d_model, 4, 64, dropout=0.0, batch_first=True, norm_first=True)
        self.head = nn.Linear(d_model, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x.reshape(x.shape[0], 4, 4)) + self.pos
        return self.head(self.encoder(h).mean(1))


def small_cnn(classes: int = 4) -> nn.Sequential:
    """A two-conv network over the 16 features seen as a 1 x 4 x 4 image."""
    return nn.Sequential(
        nn.Unflatten(1, (1, 4, 4)),
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(256, classes),
    )


def train(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    steps: int,
    data: tuple[torch.Tensor, torch.Tensor],
    *,
    hooks: list[sg.Hook] | None = None,
    loss_fn: Loss = F.cross_entropy,
    batch: int | None = 64,
    check_every: int = 50,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
) -> tuple[sg.Guard, float]:
    """Train with a Guard (the default hooks unless ``hooks``), observing the loss; return it and the last loss."""
    guard = sg.Guard(model, opt, hooks=hooks, sinks=[], check_every=check_every)
    x, y = data
    g = torch.Generator().manual_seed(2)
    loss = torch.zeros(())
    for _ in range(steps):
        idx = torch.randint(0, x.shape[0], (batch,), generator=g) if batch else slice(None)
        loss = loss_fn(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        guard.observe(loss)
        opt.step()
        if scheduler is not None:
            scheduler.step()
    guard.close()
    return guard, float(loss.detach())


def kinds(guard: sg.Guard, kind: str) -> list[sg.Event]:
    return [e for e in guard.events if e.kind == kind]


def warnings(guard: sg.Guard, source: str) -> list[sg.Event]:
    """Events of at least info severity from the hook named ``source``."""
    return [e for e in guard.events if e.source == source and e.severity >= sg.Severity.INFO]
