"""Small real training runs for the data checks (InputStats, TargetStats): a second or two each on a CPU."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

import stallguard as sg
from tests.grad_models import quadrant_images, small_cnn

Batch = Callable[[torch.Generator], tuple[torch.Tensor, torch.Tensor]]


def mlp(d_in: int = 16, classes: int = 4, hidden: int = 32) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, classes))


def linear_labels(random: bool = False, d: int = 16, classes: int = 4, n: int = 64) -> Batch:
    """Gaussian features; labels are the argmax of a fixed linear map (learnable) or random."""
    w = torch.randn(d, classes, generator=torch.Generator().manual_seed(1))

    def batch(g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(n, d, generator=g)
        y = torch.randint(0, classes, (n,), generator=g) if random else (x @ w).argmax(1)
        return x, y

    return batch


def images(scale: str = "normalized", n: int = 32) -> Batch:
    """Quadrant images (learnable by ``small_cnn``), standardized or as raw 0-255 pixels."""

    def batch(g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = quadrant_images(n, g)
        if scale == "raw":
            x = (x * 40 + 100).clamp(0, 255).round()
        return x, y

    return batch


def train(
    model: nn.Module,
    batch: Batch,
    *,
    hooks: list[sg.Hook] | None,
    steps: int,
    lr: float = 0.05,
    check_every: int = 10,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = nn.functional.cross_entropy,
    observe_outputs: bool = True,
) -> sg.Guard:
    """Train with SGD (momentum 0.9) on fresh batches; observe loss, inputs, outputs and targets."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    guard = sg.Guard(model, opt, hooks=hooks, sinks=[], check_every=check_every, strict=True)
    for _ in range(steps):
        x, y = batch(g)
        out = model(x)
        loss = loss_fn(out, y)
        opt.zero_grad()
        loss.backward()
        if observe_outputs:
            guard.observe(loss, inputs=x, outputs=out, targets=y)
        else:
            guard.observe(loss, inputs=x)
        opt.step()
    guard.close()
    return guard


class TokenLSTM(nn.Module):
    """Embedding + LSTM classifier over integer token ids."""

    def __init__(self, vocab: int = 50, classes: int = 3, embed: int = 16, hidden: int = 32) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, embed)
        self.lstm = nn.LSTM(embed, hidden, batch_first=True)
        self.head = nn.Linear(hidden, classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(self.emb(ids))
        return self.head(out[:, -1])


def tokens(n: int = 32, length: int = 12, vocab: int = 50) -> Batch:
    """Token sequences whose class is the bucket of their last token (learnable)."""

    def batch(g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.randint(0, vocab, (n, length), generator=g)
        return ids, (ids[:, -1] * 3 // vocab)

    return batch


def kinds(guard: sg.Guard, source: str | None = None) -> list[str]:
    return [e.kind for e in guard.events if source is None or e.source == source]


def warnings(guard: sg.Guard, *sources: str) -> list[str]:
    return [e.kind for e in guard.events if e.severity >= sg.Severity.WARNING and (not sources or e.source in sources)]


__all__ = ["TokenLSTM", "images", "kinds", "linear_labels", "mlp", "small_cnn", "tokens", "train", "warnings"]
