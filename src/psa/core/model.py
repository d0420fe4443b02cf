"""SimpleMLP, the paper's testbed, as a plain nn.Module: [Linear -> ReLU -> Dropout] x L, Linear."""

from __future__ import annotations

import torch
from torch import nn

from psa.core.arch import Arch


class SimpleMLP(nn.Module):
    """Flatten, then per hidden layer Linear -> ReLU -> Dropout, then a Linear head to n_out logits.

    Dropout modules sit in every model so that all modes share one graph; they only act in
    `dropout` mode and only in training (paper, section II.B).
    """

    def __init__(self, arch: Arch, dropout: float = 0.0) -> None:
        super().__init__()
        self.arch = arch
        layers: list[nn.Module] = []
        widths = arch.widths
        for a, b in zip(widths[:-2], widths[1:-1]):
            layers += [nn.Linear(a, b), nn.ReLU(), nn.Dropout(dropout)]
        layers.append(nn.Linear(widths[-2], widths[-1]))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for a batch of images of any shape (N, ...)."""
        return self.net(x.flatten(1))

    def linears(self) -> list[nn.Linear]:
        """The Linear layers, input to output."""
        return [m for m in self.net if isinstance(m, nn.Linear)]


def linear_keys(arch: Arch) -> list[tuple[str, str]]:
    """State-dict keys (weight, bias) of each Linear layer of a SimpleMLP of `arch`."""
    keys = []
    for i in range(arch.n_linear):
        j = 3 * i  # Linear, ReLU, Dropout per hidden block
        keys.append((f"net.{j}.weight", f"net.{j}.bias"))
    return keys


def init_weights(arch: Arch, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """PyTorch's default Linear initialisation of a SimpleMLP, drawn from `seed` on the CPU.

    Building the real module (rather than re-deriving its init) keeps "PyTorch's default"
    exact across versions; the global RNG is forked so callers are not disturbed.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = SimpleMLP(arch)
    return [(lin.weight.detach(), lin.bias.detach()) for lin in model.linears()]
