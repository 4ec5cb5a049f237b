"""Small models and seeded data generators shared by the zoo's scenarios."""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = [
    "CNN",
    "RNNClassifier",
    "Scale",
    "TinyTransformer",
    "blobs",
    "images",
    "mlp",
    "regression",
    "sequences",
    "tokens",
]


# ----------------------------------------------------------------------------------------------- data
def blobs(g: torch.Generator, n: int = 1024, d: int = 16, classes: int = 4, sep: float = 1.5) -> tuple[Tensor, Tensor]:
    """Gaussian clusters: a separable but not trivial classification task."""
    centers = torch.randn(classes, d, generator=g) * sep
    y = torch.randint(0, classes, (n,), generator=g)
    return centers[y] + torch.randn(n, d, generator=g), y


def images(
    g: torch.Generator, n: int = 768, classes: int = 4, size: int = 8, sep: float = 1.0
) -> tuple[Tensor, Tensor]:
    """1x8x8 images: a class template plus pixel noise, standardized."""
    templates = torch.randn(classes, 1, size, size, generator=g) * sep
    y = torch.randint(0, classes, (n,), generator=g)
    return templates[y] + torch.randn(n, 1, size, size, generator=g), y


def sequences(
    g: torch.Generator, n: int = 512, steps: int = 12, d: int = 4, classes: int = 3, sep: float = 0.6
) -> tuple[Tensor, Tensor]:
    """Sequence classification: each class has a template trajectory, observed in noise."""
    templates = torch.randn(classes, steps, d, generator=g) * sep
    y = torch.randint(0, classes, (n,), generator=g)
    return templates[y] + torch.randn(n, steps, d, generator=g), y


def tokens(
    g: torch.Generator, n: int = 512, length: int = 10, vocab: int = 16, classes: int = 4
) -> tuple[Tensor, Tensor]:
    """Token sequences whose class sets which tokens are frequent (a bag-of-tokens task)."""
    logits = torch.randn(classes, vocab, generator=g) * 1.5
    y = torch.randint(0, classes, (n,), generator=g)
    probs = torch.softmax(logits[y], dim=-1)
    x = torch.multinomial(probs, length, replacement=True, generator=g)
    return x, y


def regression(g: torch.Generator, n: int = 1024, d: int = 8) -> tuple[Tensor, Tensor]:
    """A smooth non-linear regression target with a little noise."""
    x = torch.randn(n, d, generator=g)
    w1 = torch.randn(d, 16, generator=g) / d**0.5
    w2 = torch.randn(16, 1, generator=g) / 4
    y = torch.tanh(x @ w1) @ w2 * 3 + 0.05 * torch.randn(n, 1, generator=g)
    return x, y


# --------------------------------------------------------------------------------------------- models
class Scale(nn.Module):
    """Multiply by a constant and add one (a gain or an offset inside a model)."""

    def __init__(self, k: float, shift: float = 0.0) -> None:
        super().__init__()
        self.k = k
        self.shift = shift

    def forward(self, x: Tensor) -> Tensor:
        return x * self.k + self.shift


def mlp(
    d_in: int,
    d_out: int,
    hidden: int = 64,
    depth: int = 2,
    act: type[nn.Module] = nn.ReLU,
    gain: float = 1.0,
    shift: float = 0.0,
) -> nn.Sequential:
    """Linear layers with an activation module after each hidden layer (optionally a gain before it)."""
    layers: list[nn.Module] = []
    width = d_in
    for _ in range(depth):
        layers.append(nn.Linear(width, hidden))
        if gain != 1.0 or shift != 0.0:
            layers.append(Scale(gain, shift))
        layers.append(act())
        width = hidden
    layers.append(nn.Linear(width, d_out))
    return nn.Sequential(*layers)


class CNN(nn.Module):
    """Two or more 3x3 conv blocks on 1x8x8 images, then a linear head."""

    def __init__(
        self, classes: int = 4, ch: int = 8, act: type[nn.Module] = nn.ReLU, depth: int = 2, gain: float = 1.0
    ) -> None:
        super().__init__()
        blocks: list[nn.Module] = []
        c_in = 1
        for i in range(depth):
            blocks.append(nn.Conv2d(c_in, ch, 3, padding=1))
            if gain != 1.0:
                blocks.append(Scale(gain))
            blocks.append(act())
            if i == 0:
                blocks.append(nn.MaxPool2d(2))
            c_in = ch
        self.features = nn.Sequential(*blocks)
        self.head = nn.Linear(ch * 16, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x).flatten(1))


class RNNClassifier(nn.Module):
    """A GRU, LSTM or vanilla RNN over the sequence; the last hidden state feeds a linear head."""

    def __init__(self, kind: str, d_in: int, hidden: int, classes: int, nonlinearity: str = "tanh") -> None:
        super().__init__()
        if kind == "GRU":
            self.rnn: nn.Module = nn.GRU(d_in, hidden, batch_first=True)
        elif kind == "LSTM":
            self.rnn = nn.LSTM(d_in, hidden, batch_first=True)
        else:
            self.rnn = nn.RNN(d_in, hidden, batch_first=True, nonlinearity=nonlinearity)
        self.head = nn.Linear(hidden, classes)
        self.detach_features = False

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.rnn(x)
        h = out[:, -1]
        if self.detach_features:
            h = h.detach()
        return self.head(h)


class TinyTransformer(nn.Module):
    """Token embedding + learned positions, one or two encoder layers, mean pooling, linear head."""

    def __init__(self, vocab: int = 16, classes: int = 4, d_model: int = 32, layers: int = 1, length: int = 10) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        self.pos = nn.Parameter(torch.randn(length, d_model) * 0.02)
        layer = nn.TransformerEncoderLayer(d_model, 2, dim_feedforward=64, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, classes)

    def forward(self, x: Tensor) -> Tensor:
        h = self.encoder(self.embed(x) + self.pos[: x.shape[1]])
        return self.head(h.mean(1))
