"""Persistent stochastic ablation: which neuron each ablative mode kills, and how.

- full:   one Linear layer uniformly among all (hidden and output), then one of its neurons;
          zero its incoming weight row and its bias ("partial ablation").
- hidden: one neuron uniformly among all hidden neurons pooled across layers; zero its incoming
          row, its bias and its outgoing column in the next layer ("full ablation").
- output: one of the output neurons uniformly; zero its incoming row and its bias.

A ResMLP (psa.core.model) counts its Linear layers in compute order: `full` picks any of them
(input projection, either Linear of a block, transitions, head), `hidden` pools the neurons of
all but the first and the last, and "the next layer" is the next Linear in compute order (for
a block's second Linear this removes the branch's contribution only: the skip still carries
the channel), as the authors' ResMLP harness does.

The draw for (seed, loop) comes from a hash, so it does not depend on the rest of the
population, on the device, or on library versions.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from psa.core.arch import Arch
from psa.core.model import DEFAULT_MODEL, linear_shapes
from psa.core.device import to_device
from psa.core.population import ABLATIVE_MODES, Layout, derive_seed


def choose_neuron(arch: Arch, mode: str, seed: int, loop: int, model: str = DEFAULT_MODEL) -> tuple[int, int] | None:
    """(Linear layer index, neuron index) that `mode` ablates at `loop`, or None for no ablation.

    Layer indices count Linear layers from 0 in compute order; the last is the output layer
    (`arch.depth` for a SimpleMLP). Loop 1 trains the fresh model and never ablates.
    """
    if model != DEFAULT_MODEL:
        if mode not in ABLATIVE_MODES or loop <= 1:
            return None
        return _choose_in(tuple(o for o, _ in linear_shapes(arch, model)), mode, seed, loop)
    return choose_unit(arch.hidden, arch.n_out, mode, seed, loop)


def choose_unit(hidden: Sequence[int], n_out: int, mode: str, seed: int, loop: int) -> tuple[int, int] | None:
    """(layer index, unit index) that `mode` ablates at `loop` in a net whose hidden layers have
    `hidden` units each and whose output layer has `n_out`; None for no ablation.

    The draw of choose_neuron for any layered model (psa.core.generic's Linear and Conv
    layers): an MLP given as a plain nn.Module gets exactly the neurons its SimpleMLP gets.
    """
    if mode not in ABLATIVE_MODES or loop <= 1:
        return None
    hidden = tuple(hidden)
    widths = hidden + (n_out,)
    if mode == "full":
        layer = derive_seed(seed, "ablate-layer", loop) % len(widths)
        return layer, derive_seed(seed, "ablate-neuron", loop) % widths[layer]
    if mode == "output":
        return len(hidden), derive_seed(seed, "ablate-neuron", loop) % n_out
    pooled = derive_seed(seed, "ablate-neuron", loop) % sum(hidden)
    for layer, w in enumerate(hidden):
        if pooled < w:
            return layer, pooled
        pooled -= w
    raise AssertionError("unreachable: pooled index beyond the hidden neurons")


def _choose_in(outs: tuple[int, ...], mode: str, seed: int, loop: int) -> tuple[int, int]:
    """choose_neuron over Linear layers of `outs` neurons in compute order: `hidden` pools every
    layer but the first and the last (a ResMLP's input projection and head)."""
    if mode == "full":
        layer = derive_seed(seed, "ablate-layer", loop) % len(outs)
        return layer, derive_seed(seed, "ablate-neuron", loop) % outs[layer]
    if mode == "output":
        return len(outs) - 1, derive_seed(seed, "ablate-neuron", loop) % outs[-1]
    pooled = derive_seed(seed, "ablate-neuron", loop) % sum(outs[1:-1])
    for layer in range(1, len(outs) - 1):
        if pooled < outs[layer]:
            return layer, pooled
        pooled -= outs[layer]
    raise AssertionError("unreachable: pooled index beyond the hidden neurons")


def ablation_indices(layout: Layout, member: int, mode: str, layer: int, neuron: int) -> np.ndarray:
    """Offsets in the flat buffer of every parameter that `mode` zeroes when it ablates `neuron`
    of Linear `layer` in population row `member`: its incoming row and bias, and in `hidden`
    mode its outgoing column in the next layer."""
    m = member
    w0, b0, o, i = layout.blocks[layer]
    parts = [w0 + (m * o + neuron) * i + np.arange(i), np.array([b0 + m * o + neuron])]
    if mode == "hidden":
        nw0, _, no, ni = layout.blocks[layer + 1]
        parts.append(nw0 + m * no * ni + np.arange(no) * ni + neuron)
    return np.concatenate(parts)


@torch.no_grad()
def ablate(flat: torch.Tensor, layout: Layout, ablations: list[tuple[int, str, int, int]]) -> None:
    """Zero, in place and in one kernel, what each (member, mode, layer, neuron) ablation names."""
    if not ablations:
        return
    idx = np.concatenate([ablation_indices(layout, *a) for a in ablations]).astype(np.int64)
    flat.index_fill_(0, to_device(torch.from_numpy(idx), flat.device), 0.0)
