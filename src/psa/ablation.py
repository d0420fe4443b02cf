"""Persistent stochastic ablation: which neuron each ablative mode kills, and how.

- full:   one Linear layer uniformly among all (hidden and output), then one of its neurons;
          zero its incoming weight row and its bias ("partial ablation").
- hidden: one neuron uniformly among all hidden neurons pooled across layers; zero its incoming
          row, its bias and its outgoing column in the next layer ("full ablation").
- output: one of the output neurons uniformly; zero its incoming row and its bias.

The draw for (seed, loop) comes from a hash, so it does not depend on the rest of the
population, on the device, or on library versions.
"""

from __future__ import annotations

import torch

from .arch import Arch
from .population import ABLATIVE_MODES, derive_seed


def choose_neuron(arch: Arch, mode: str, seed: int, loop: int) -> tuple[int, int] | None:
    """(Linear layer index, neuron index) that `mode` ablates at `loop`, or None for no ablation.

    Layer indices count Linear layers from 0; index `arch.depth` is the output layer. Loop 1
    trains the fresh model and never ablates.
    """
    if mode not in ABLATIVE_MODES or loop <= 1:
        return None
    widths = arch.hidden + (arch.n_out,)
    if mode == "full":
        layer = derive_seed(seed, "ablate-layer", loop) % len(widths)
        return layer, derive_seed(seed, "ablate-neuron", loop) % widths[layer]
    if mode == "output":
        return arch.depth, derive_seed(seed, "ablate-neuron", loop) % arch.n_out
    pooled = derive_seed(seed, "ablate-neuron", loop) % sum(arch.hidden)
    for layer, w in enumerate(arch.hidden):
        if pooled < w:
            return layer, pooled
        pooled -= w
    raise AssertionError("unreachable: pooled index beyond the hidden neurons")


@torch.no_grad()
def ablate(
    views: list[tuple[torch.Tensor, torch.Tensor]], member: int, mode: str, layer: int, neuron: int
) -> None:
    """Zero `neuron` of Linear `layer` for population row `member` (in place), as `mode` does."""
    w, b = views[layer]
    w[member, neuron, :] = 0.0
    b[member, neuron] = 0.0
    if mode == "hidden":
        views[layer + 1][0][member, :, neuron] = 0.0
