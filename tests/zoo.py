"""A zoo of small models of the families a researcher brings to `psa.fit`, sized for tests on a
few hundred MNIST images.

Each factory takes no argument and returns a fresh nn.Module; the caller seeds it (psa calls a
factory under `torch.manual_seed(seed)`). Each docstring says what input the model takes. MNIST
arrives as psa loads it, flat normalised rows (N, 784), or as images (N, 1, 28, 28);
`ZooModel.inputs` turns those rows into what a model takes (rows, images or int64 tokens).

The families differ in how a unit's outgoing side is wired, which is what psa's consumer
tracing (psa.core.module.units) has to find: a plain chain (mlp, cnn), a per-unit norm
(bn_mlp), a norm mixing units (ln_mlp), a skip sum (residual_mlp), recurrent gates (gru, lstm),
attention (transformer, mha), an embedding table (embedding) and an embedding table reused as
the output layer (tied).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from psa.core.data import MEAN, STD

SIDE = 28  # MNIST images are SIDE x SIDE; the sequence models read a row per step
CLASSES = 10
TOKEN_LEVELS = 16  # grey levels of the embedding model's pixel tokens
TIED_LEVELS = CLASSES  # a tied output layer gives one logit per row of the table: 10 levels, 10 classes


def mnist_tokens(x: torch.Tensor, levels: int = TOKEN_LEVELS) -> torch.Tensor:
    """MNIST images normalised as psa normalises them ((N, 784) rows or (N, 1, 28, 28)) as
    int64 tokens (N, 784): each pixel's grey level quantised to `levels` bins, 0 = black."""
    if levels < 2:
        raise ValueError(f"levels must be at least 2, not {levels}")
    # undo psa's normalisation so that the bins are the same whatever the batch holds
    grey = (x.reshape(x.shape[0], -1).float() * STD + MEAN).clamp(0.0, 1.0)
    return (grey * levels).long().clamp(max=levels - 1)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """(N, 784) rows or (N, 1, 28, 28) images as a sequence of 28 rows: (N, 28, 28)."""
    return x.reshape(-1, SIDE, SIDE)


# ------------------------------------------------------------------ plain chains
def mlp() -> nn.Module:
    """784-32-16-10 MLP with ReLU and nn.Dropout, a plain nn.Sequential. Takes (N, 784) rows or
    (N, 1, 28, 28) images (it flattens them itself)."""
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 32), nn.ReLU(), nn.Dropout(),
                         nn.Linear(32, 16), nn.ReLU(), nn.Dropout(), nn.Linear(16, CLASSES))


def cnn() -> nn.Module:
    """Two 5x5 stride-2 convolutions (4 and 8 channels) and a Linear head on the flattened
    8 x 4 x 4 map. Takes (N, 1, 28, 28) images."""
    return nn.Sequential(nn.Conv2d(1, 4, 5, stride=2), nn.ReLU(), nn.Conv2d(4, 8, 5, stride=2), nn.ReLU(),
                         nn.Flatten(), nn.Linear(8 * 4 * 4, CLASSES))


# ------------------------------------------------------------------ norms
def bn_mlp() -> nn.Module:
    """784-32-10 MLP with BatchNorm1d after the hidden Linear (bias=False: BatchNorm cancels it).
    Takes (N, 784) rows or (N, 1, 28, 28) images."""
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 32, bias=False), nn.BatchNorm1d(32), nn.ReLU(),
                         nn.Linear(32, CLASSES))


def ln_mlp() -> nn.Module:
    """784-32-10 MLP with LayerNorm after the hidden Linear: the norm mixes the 32 units (their
    mean and variance), unlike BatchNorm. Takes (N, 784) rows or (N, 1, 28, 28) images."""
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 32), nn.LayerNorm(32), nn.ReLU(), nn.Linear(32, CLASSES))


# ------------------------------------------------------------------ skip sum
class ResidualMLP(nn.Module):
    """784 -> 32, one residual block h + fc2(relu(fc1(h))) of width 32, a Linear head."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.inp = nn.Linear(784, width)
        self.fc1 = nn.Linear(width, width)
        self.fc2 = nn.Linear(width, width)
        self.head = nn.Linear(width, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.inp(x.flatten(1)))
        # the skip sum: inp's units and fc2's units share one stream, so neither has a single reader
        h = h + self.fc2(torch.relu(self.fc1(h)))
        return self.head(torch.relu(h))


def residual_mlp() -> nn.Module:
    """An MLP with one residual block (a skip sum). Takes (N, 784) rows or (N, 1, 28, 28) images."""
    return ResidualMLP()


# ------------------------------------------------------------------ recurrent
class RowRNN(nn.Module):
    """A one-layer GRU or LSTM over the 28 rows of an image, a Linear head on the last step."""

    def __init__(self, cell: type[nn.GRU] | type[nn.LSTM], hidden: int = 32) -> None:
        super().__init__()
        self.rnn = cell(SIDE, hidden, batch_first=True)
        self.head = nn.Linear(hidden, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(_rows(x))
        return self.head(out[:, -1])


def gru() -> nn.Module:
    """A GRU (hidden 32) reading the image's 28 rows as a 28-step sequence, a Linear head on the
    last state. Takes (N, 784) rows or (N, 1, 28, 28) images."""
    return RowRNN(nn.GRU)


def lstm() -> nn.Module:
    """An LSTM (hidden 32) reading the image's 28 rows as a 28-step sequence, a Linear head on the
    last state. Takes (N, 784) rows or (N, 1, 28, 28) images."""
    return RowRNN(nn.LSTM)


# ------------------------------------------------------------------ attention
class RowTransformer(nn.Module):
    """Rows projected to d=16 tokens, one nn.TransformerEncoderLayer (2 heads, feed-forward 32,
    dropout 0.1), mean-pooled, a Linear head."""

    def __init__(self, d: int = 16, heads: int = 2) -> None:
        super().__init__()
        self.proj = nn.Linear(SIDE, d)
        self.encoder = nn.TransformerEncoderLayer(d, heads, dim_feedforward=2 * d, dropout=0.1, batch_first=True)
        self.head = nn.Linear(d, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.proj(_rows(x))).mean(1))


def transformer() -> nn.Module:
    """One TransformerEncoderLayer (d=16, 2 heads, dropout 0.1) over the image's 28 rows as tokens,
    mean-pooled, Linear head. Takes (N, 784) rows or (N, 1, 28, 28) images."""
    return RowTransformer()


class RowAttention(nn.Module):
    """Rows projected to d=16 tokens, self-attention with nn.MultiheadAttention called directly
    (no residual, no norm), mean-pooled, a Linear head."""

    def __init__(self, d: int = 16, heads: int = 2) -> None:
        super().__init__()
        self.proj = nn.Linear(SIDE, d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.head = nn.Linear(d, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.proj(_rows(x))
        a, _ = self.attn(t, t, t, need_weights=False)
        return self.head(a.mean(1))


def mha() -> nn.Module:
    """nn.MultiheadAttention (d=16, 2 heads) over the image's 28 rows as tokens, mean-pooled,
    Linear head. Takes (N, 784) rows or (N, 1, 28, 28) images."""
    return RowAttention()


# ------------------------------------------------------------------ embeddings
def _row_means(e: torch.Tensor) -> torch.Tensor:
    """Pixel-token embeddings (N, 784, d) averaged along each image row and flattened: (N, 28 * d),
    so that the head still knows which row a grey level was in."""
    return e.reshape(e.shape[0], SIDE, SIDE, e.shape[-1]).mean(2).flatten(1)


class PixelTokens(nn.Module):
    """nn.Embedding(16, 8) of pixel tokens, averaged per row, then 224-32-10 Linear layers."""

    def __init__(self, levels: int = TOKEN_LEVELS, d: int = 8, hidden: int = 32) -> None:
        super().__init__()
        self.embed = nn.Embedding(levels, d)
        self.fc = nn.Linear(SIDE * d, hidden)
        self.head = nn.Linear(hidden, CLASSES)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.fc(_row_means(self.embed(tokens)))))


def embedding() -> nn.Module:
    """Pixel tokens -> nn.Embedding(16, 8) -> per-row means -> Linear(224, 32) -> ReLU -> Linear(32, 10).
    Takes int64 tokens (N, 784) in [0, 16): `mnist_tokens(x)`."""
    return PixelTokens()


class TiedTokens(nn.Module):
    """nn.Embedding(10, 16) of pixel tokens, per-row means, Linear(448, 16) + ReLU, and an output
    layer that is the embedding table itself: logits = F.linear(h, embed.weight)."""

    def __init__(self, levels: int = TIED_LEVELS, d: int = 16) -> None:
        super().__init__()
        self.embed = nn.Embedding(levels, d)
        self.fc = nn.Linear(SIDE * d, d)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.fc(_row_means(self.embed(tokens))))
        # weight tying: the output layer is no module of its own, so no Linear hook sees it
        return F.linear(h, self.embed.weight)


def tied() -> nn.Module:
    """Weight tying: nn.Embedding(10, 16) of pixel tokens, per-row means, Linear(448, 16) + ReLU,
    then logits F.linear(h, embed.weight) (one per row of the table: 10 grey levels, 10 classes).
    Takes int64 tokens (N, 784) in [0, 10): `mnist_tokens(x, TIED_LEVELS)`."""
    return TiedTokens()


# ------------------------------------------------------------------ the registry
@dataclass(frozen=True)
class ZooModel:
    """A zoo factory and the input it takes: "rows" ((N, 784) or images), "images"
    ((N, 1, 28, 28) only) or "tokens" (int64 (N, 784) in [0, levels))."""

    name: str
    factory: Callable[[], nn.Module]
    takes: str
    levels: int | None = None

    def inputs(self, x: torch.Tensor) -> torch.Tensor:
        """MNIST as psa loads it ((N, 784) normalised rows, or images) as this model takes it."""
        if self.takes == "images":
            return x.reshape(-1, 1, SIDE, SIDE)
        if self.takes == "tokens":
            return mnist_tokens(x, self.levels or TOKEN_LEVELS)
        return x.reshape(x.shape[0], -1)

    def build(self, seed: int = 0) -> nn.Module:
        """The model as psa builds it for `seed`: the factory under torch.manual_seed, the global
        generator forked so that the caller's draws do not move."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.factory()


ZOO: tuple[ZooModel, ...] = (
    ZooModel("mlp", mlp, "rows"),
    ZooModel("cnn", cnn, "images"),
    ZooModel("bn_mlp", bn_mlp, "rows"),
    ZooModel("ln_mlp", ln_mlp, "rows"),
    ZooModel("residual_mlp", residual_mlp, "rows"),
    ZooModel("gru", gru, "rows"),
    ZooModel("lstm", lstm, "rows"),
    ZooModel("transformer", transformer, "rows"),
    ZooModel("embedding", embedding, "tokens", TOKEN_LEVELS),
    ZooModel("tied", tied, "tokens", TIED_LEVELS),
    ZooModel("mha", mha, "rows"),
)
BY_NAME: dict[str, ZooModel] = {z.name: z for z in ZOO}
