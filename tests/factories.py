"""Small model factories for the tests of studies of your own model (`--model tests.factories:NAME`)."""

from __future__ import annotations

from torch import nn


def small_cnn() -> nn.Module:
    """Two conv layers and a Linear head, for (N, 1, 28, 28) images; a Dropout before the head."""
    return nn.Sequential(nn.Conv2d(1, 4, 5, stride=2), nn.ReLU(), nn.Conv2d(4, 6, 5, stride=2), nn.ReLU(),
                         nn.Flatten(), nn.Dropout(), nn.Linear(6 * 4 * 4, 10))


def small_mlp() -> nn.Module:
    """A two-layer MLP with a Dropout, flattening its images itself."""
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 12), nn.ReLU(), nn.Dropout(), nn.Linear(12, 10))


def wider_mlp() -> nn.Module:
    """small_mlp with another hidden width: the same name in a study, another model."""
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 16), nn.ReLU(), nn.Dropout(), nn.Linear(16, 10))


def not_a_module() -> str:
    """A factory that returns no nn.Module."""
    return "a string"


def no_units() -> nn.Module:
    """A model without a Linear or Conv layer."""
    return nn.Sequential(nn.Flatten(), nn.ReLU())


def five_classes() -> nn.Module:
    """A model with 5 outputs: does not match a 10-class data set."""
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 5))


def no_dropout() -> nn.Module:
    """An MLP without nn.Dropout: refused in dropout mode."""
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 8), nn.ReLU(), nn.Linear(8, 10))
