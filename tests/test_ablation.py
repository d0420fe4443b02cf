"""Each ablative mode zeroes exactly what NOTES.md names, and nothing else."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from psa.core.mlp.population import ablate
from psa.core.ablation import choose_neuron
from psa.core.arch import parse_arch
from psa.core.mlp.engine import Engine
from psa.core.hparams import HParams
from psa.core.mlp.population import Population

ARCH = parse_arch("[2*5, 1*3]")  # Linear layers: 784->5, 5->5, 5->3, 3->10


def fresh(modes):
    pop = Population.create(ARCH, [HParams().member(m, 7) for m in modes], "cpu", n_val=100)
    with torch.no_grad():
        pop.lkg.uniform_(0.5, 1.5)  # no zeros anywhere before ablation
    return pop


def zeroed(pop):
    """{(layer, 'w'|'b', row, col)} of every zero entry of member 0."""
    out = set()
    for layer, (w, b) in enumerate(pop.layout.views(pop.lkg)):
        for r, c in (w[0] == 0).nonzero().tolist():
            out.add((layer, "w", r, c))
        for (r,) in (b[0] == 0).nonzero().tolist():
            out.add((layer, "b", r, None))
    return out


@pytest.mark.parametrize(
    "mode,layer,neuron,expected",
    [
        ("full", 1, 2, {(1, "w", 2, c) for c in range(5)} | {(1, "b", 2, None)}),
        ("full", 3, 7, {(3, "w", 7, c) for c in range(3)} | {(3, "b", 7, None)}),
        ("output", 3, 0, {(3, "w", 0, c) for c in range(3)} | {(3, "b", 0, None)}),
        ("hidden", 0, 4, {(0, "w", 4, c) for c in range(784)} | {(0, "b", 4, None)} | {(1, "w", r, 4) for r in range(5)}),
        ("hidden", 2, 1, {(2, "w", 1, c) for c in range(5)} | {(2, "b", 1, None)} | {(3, "w", r, 1) for r in range(10)}),
    ],
)
def test_exact_entries_zeroed(mode, layer, neuron, expected):
    pop = fresh([mode, mode])
    before = pop.lkg.clone()
    ablate(pop.lkg, pop.layout, [(0, mode, layer, neuron)])
    assert zeroed(pop) == expected
    # the other member is untouched, and every non-ablated entry kept its value
    m1 = [t[:, 1] for run in pop.layout.runs(pop.lkg) for t in run]
    b1 = [t[:, 1] for run in pop.layout.runs(before) for t in run]
    assert all(torch.equal(a, b) for a, b in zip(m1, b1))
    assert int((pop.lkg != before).sum()) == len(expected)


def test_choices_follow_each_modes_distribution():
    loops = range(2, 6002)
    full = Counter(choose_neuron(ARCH, "full", 3, t)[0] for t in loops)
    hidden = Counter(choose_neuron(ARCH, "hidden", 3, t)[0] for t in loops)
    output = [choose_neuron(ARCH, "output", 3, t) for t in loops]
    # full: each of the 4 Linear layers equally likely
    assert set(full) == {0, 1, 2, 3} and all(abs(full[l] / 6000 - 0.25) < 0.03 for l in full)
    # hidden: neurons pooled across hidden layers (5, 5, 3 of 13), never the output layer
    assert set(hidden) == {0, 1, 2}
    for layer, share in ((0, 5 / 13), (1, 5 / 13), (2, 3 / 13)):
        assert abs(hidden[layer] / 6000 - share) < 0.03
    assert {l for l, _ in output} == {3} and {n for _, n in output} == set(range(10))
    for t in loops:
        layer, n = choose_neuron(ARCH, "full", 3, t)
        assert 0 <= n < ARCH.widths[layer + 1]
    assert all(choose_neuron(ARCH, m, 3, 1) is None for m in ("full", "hidden", "output"))
    assert all(choose_neuron(ARCH, m, 3, 5) is None for m in ("none", "decay", "dropout"))


def test_ablated_hidden_neuron_stays_dead_through_training(small):
    pop = Population.create(parse_arch("[1*16]"), [HParams().member("hidden", 9)], "cpu", n_val=small.val_y.numel())
    eng = Engine(pop, small, HParams(batch_size=64, lr=1e-3))
    eng.meta_loop()
    r = eng.meta_loop()
    layer, neuron = r.ablated[0]
    assert layer == 0
    (w0, b0), (w1, _) = eng.population.layout.views(eng.cand)
    # the trained candidate (promoted or not) kept the neuron dead: ReLU's gradient at 0 is 0
    assert torch.count_nonzero(w0[0, neuron]) == 0 and b0[0, neuron] == 0
    assert torch.count_nonzero(w1[0, :, neuron]) == 0
