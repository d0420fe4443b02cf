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
population, on the device, or on library versions. The zeroing itself is each kind's own: a
flat buffer's offsets (psa.core.mlp.population.ablate) or a module's tensors
(psa.core.module.engine).
"""

from __future__ import annotations

from collections.abc import Sequence

from psa.core.arch import Arch
from psa.core.errors import ConfigError
from psa.core.model import DEFAULT_MODEL, linear_shapes
from psa.core.member import ABLATIVE_MODES, derive_seed
from psa.core.variant import Variant, ablation_count, eligible_layers


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

    The draw of choose_neuron for any layered model (psa.core.module's Linear and Conv
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


def _draw(arch: Arch, mode: str, seed: int, key: object, n: int, layers: tuple[int, ...]) -> list[tuple[int, int]]:
    """`n` distinct neurons of `layers` as `mode` draws them, for draw key `key` (a loop, or
    "fixed"). Draw 0 uses the paper's tags, so one neuron from the mode's own layers is exactly
    choose_neuron's; draw i > 0 adds i to the tags; a neuron drawn twice is drawn again."""
    widths = arch.hidden + (arch.n_out,)
    pool = sum(widths[i] for i in layers)
    out: list[tuple[int, int]] = []
    i = 0
    while len(out) < min(n, pool):
        tags = (key,) if i == 0 else (key, i)
        i += 1
        if mode == "full":
            layer = layers[derive_seed(seed, "ablate-layer", *tags) % len(layers)]
            pick = (layer, derive_seed(seed, "ablate-neuron", *tags) % widths[layer])
        else:  # hidden and output: uniform over the neurons of the eligible layers, pooled
            pooled = derive_seed(seed, "ablate-neuron", *tags) % pool
            for layer in layers:
                if pooled < widths[layer]:
                    break
                pooled -= widths[layer]
            pick = (layer, pooled)
        if pick not in out:
            out.append(pick)
    return out


def choose_neurons(arch: Arch, mode: str, seed: int, loop: int, variant: Variant,
                   meta_loops: int, model: str = DEFAULT_MODEL) -> tuple[tuple[int, int], ...]:
    """Every (Linear layer, neuron) that a member of `mode` and `variant` ablates at `loop` of a
    run of `meta_loops`: the paper's one neuron (choose_neuron) for the default variant; several
    distinct ones, from restricted layers, on an ablation schedule or a fixed set otherwise."""
    if mode not in ABLATIVE_MODES:
        return ()
    if model != DEFAULT_MODEL:
        if not variant.is_default:  # the variants' draws count a SimpleMLP's layers
            raise ConfigError(f"engine variants are not available for model {model} yet")
        one = choose_neuron(arch, mode, seed, loop, model)
        return () if one is None else (one,)
    if variant.fixed:  # one set per seed, dead from loop 1
        layers = eligible_layers(arch, mode, variant.ablate_layers)
        return tuple(_draw(arch, mode, seed, "fixed", ablation_count(variant, arch, mode, 2, meta_loops), layers))
    if loop <= 1:
        return ()
    n = ablation_count(variant, arch, mode, loop, meta_loops)
    return tuple(_draw(arch, mode, seed, loop, n, eligible_layers(arch, mode, variant.ablate_layers)))
