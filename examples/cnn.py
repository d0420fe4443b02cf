"""A small CNN for `psa study --model examples.cnn:small_cnn` (run from the repository root):
docs/module.md, "Studies". The CNN of bench/generic_cnn.py with an nn.Dropout before its head,
which psa drives in `dropout` mode only (an identity in every other mode)."""

from __future__ import annotations

from torch import nn


def small_cnn() -> nn.Module:
    """Conv 1->8 5x5/2, ReLU, Conv 8->16 5x5/2, ReLU, Flatten, Dropout, Linear 256->10, for
    (N, 1, 28, 28) images."""
    return nn.Sequential(
        nn.Conv2d(1, 8, 5, stride=2), nn.ReLU(),
        nn.Conv2d(8, 16, 5, stride=2), nn.ReLU(),
        nn.Flatten(), nn.Dropout(), nn.Linear(16 * 4 * 4, 10),
    )
