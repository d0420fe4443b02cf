"""PSA on any nn.Module (psa.core.module, psa.fit): the same records as psa's engine for an MLP,
a CNN and a BatchNorm MLP against a one-at-a-time reference loop, unit and consumer discovery,
the vmap fallback, checkpoints and bad input."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

import psa
from psa.core.ablation import choose_neurons
from psa.core.arch import parse_arch
from psa.core.data import Dataset
from psa.core.mlp.engine import Engine
from psa.core.errors import ConfigError
from psa.core.module.units import Consumer, inspect_model
from psa.core.module.engine import ModuleEngine
from psa.core.module.population import ModulePopulation
from psa.core.module.factory import build, resolve_factory
from psa.core.hparams import HParams
from psa.core.member import MODES
from psa.core.mlp.population import Population
from psa.core.variant import Variant

from . import module_oracle
from .conftest import ENGINE_HP, SRC, one_line_error, run_main, subset
from .module_oracle import Units
from .tolerance import ONE_PASS, Bound, assert_apart, assert_close, compare, epoch_steps, training_bound


def plain_mlp() -> nn.Module:
    """The SimpleMLP of [2*24, 1*16] written as a user would: a plain nn.Sequential."""
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 24), nn.ReLU(), nn.Dropout(0.5), nn.Linear(24, 24), nn.ReLU(),
                         nn.Dropout(), nn.Linear(24, 16), nn.ReLU(), nn.Dropout(), nn.Linear(16, 10))


def small_cnn() -> nn.Module:
    """Two conv layers and one Linear head (a Dropout before it, for dropout mode)."""
    return nn.Sequential(nn.Conv2d(1, 4, 5, stride=2), nn.ReLU(), nn.Conv2d(4, 6, 5, stride=2), nn.ReLU(),
                         nn.Flatten(), nn.Dropout(), nn.Linear(6 * 4 * 4, 10))


def frozen_cnn() -> nn.Module:
    """small_cnn with its first convolution frozen (requires_grad=False), as for a pretrained stem."""
    m = small_cnn()
    m[0].requires_grad_(False)
    return m


CNN_UNITS = Units((("0", 4), ("2", 6), ("6", 10)), consumers={"0": ("2", 1), "2": ("6", 16)})
CNN_WIDTHS = (1 * 5 * 5, 4 * 5 * 5, 6 * 4 * 4, 10)  # its dot products: in_channels x kernel area, then the head


def bn_mlp() -> nn.Module:
    """An MLP with BatchNorm. Its Linear layers have no bias: BatchNorm cancels a bias, whose
    gradient is then rounding noise that AdamW blows up to lr-sized steps (no two correct
    implementations would agree on it)."""
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 20, bias=False), nn.BatchNorm1d(20), nn.ReLU(), nn.Dropout(),
                         nn.Linear(20, 12, bias=False), nn.BatchNorm1d(12), nn.ReLU(), nn.Linear(12, 10))


BN_UNITS = Units((("1", 20), ("5", 12), ("8", 10)), consumers={"1": ("5", 1), "5": ("8", 1)},
                 norms={"1": "2", "5": "6"})
BN_WIDTHS = (784, 20, 12, 10)


def bn_ops(batch: int) -> int:
    """Batch normalization's reductions over the batch: mean and variance forward, two sums
    backward, in each of bn_mlp's two BatchNorms."""
    return 2 * 4 * batch

HP = HParams(lr=1e-3, weight_decay=0.05, dropout=0.3, batch_size=32)


def image_subset(ds: Dataset, n_train: int, n_val: int = 500, noise: float = 0.0) -> Dataset:
    """The first images of each split as (N, 1, 28, 28), with Gaussian `noise` added if given."""
    s = subset(ds, n_train, n_val, 200)
    g = torch.Generator().manual_seed(0)

    def img(x: torch.Tensor) -> torch.Tensor:
        x = x.view(-1, 1, 28, 28)
        return x + noise * torch.randn(x.shape, generator=g) if noise else x

    return Dataset(s.name, img(s.train_x), s.train_y, img(s.val_x), s.val_y, img(s.test_x), s.test_y, s.source)


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


MLP_WIDTHS = (784, 24, 24, 16, 10)  # plain_mlp and the SimpleMLP [2*24, 1*16]


def run(make, ds, hp, loops, members, **kw):
    pop = ModulePopulation.create(make, members, ds)
    eng = ModuleEngine(pop, ds, hp, **kw)
    return pop, eng, [eng.meta_loop() for _ in range(loops)]


# ------------------------------------------------------------------------------------------
# the engine's records for an MLP


EQ_LOOPS = 5  # x 64 steps (63 of 32 images and a last partial batch of 24): 320 steps


@pytest.fixture(scope="module")
def mlp_runs(mnist):
    """All six modes x two seeds, 5 loops x 64 steps (the last batch partial), through psa's
    engine and the module engine (psa.core.module) side by side; every member's LKG after every loop."""
    ds = subset(mnist, 2040, 1000)
    assert ds.train_x.shape[0] % ENGINE_HP.batch_size == 24
    members = [ENGINE_HP.member(m, s) for s in (11, 12) for m in MODES]
    pop = Population.create(parse_arch("[2*24, 1*16]"), members, "cpu", n_val=ds.val_y.numel())
    eng = Engine(pop, ds, ENGINE_HP)
    gpop = ModulePopulation.create(plain_mlp, members, ds)
    geng = ModuleEngine(gpop, ds, ENGINE_HP)
    ref, got, diffs = [], [], []
    for loop in range(1, EQ_LOOPS + 1):
        ref.append(eng.meta_loop())
        got.append(geng.meta_loop())
        tol = training_bound(loop * epoch_steps(2040, 32), MLP_WIDTHS, 32)
        row = []
        for j in range(len(members)):
            ours = pop.member_state_dict(j)
            theirs = dict(zip(ours, gpop.member_state_dict(j).values()))  # the same layers, in order
            row.append(compare(f"loop {loop} member {j}", theirs, ours, tol))
        diffs.append(row)
    return pop, ref, gpop, got, diffs


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_plain_mlp_gives_the_engines_records(mlp_runs, mode):
    """The module engine computes a plain MLP with the engine's own operations (baddbmm, its
    gradients, its cross-entropy gradient, the same fused AdamW): over 320 steps every record is
    the engine's, the losses within a pass's rounding and the weights within a training run's
    (tests/tolerance.py; where vmap batches as the engine does, they are bit for bit equal)."""
    pop, ref, gpop, got, diffs = mlp_runs
    assert gpop.spec.hidden == (24, 24, 16) and gpop.spec.dropout_units == 64
    rows = [j for j, m in enumerate(pop.members) if m.mode == mode]
    assert [gpop.members[j] for j in rows] == [pop.members[j] for j in rows]
    for r, g, d in zip(ref, got, diffs):
        loss_bound = training_bound(r.loop * epoch_steps(2040, 32), MLP_WIDTHS, 32, c=ONE_PASS)
        assert_close(f"loop {r.loop} train loss", torch.tensor([g.train_loss[j] for j in rows]),
                     torch.tensor([r.train_loss[j] for j in rows]), loss_bound)
        for j in rows:
            assert g.candidate_acc[j] == r.candidate_acc[j]
            assert g.promoted[j] == r.promoted[j]
            assert g.ablated[j] == r.ablated[j]
            assert d[j].ratio <= 1, d[j].message
    assert len(pop.member_state_dict(rows[0])) == len(gpop.member_state_dict(rows[0])) == 8
    if mode in ("full", "hidden", "output"):
        assert all(got[k].ablated[j] is not None for k in range(1, EQ_LOOPS) for j in rows)
    # the records are not trivially equal: candidates differ between loops and some are discarded
    assert len({g.candidate_acc[rows[0]] for g in got}) > 1


# ------------------------------------------------------------------------------------------
# a CNN and a BatchNorm MLP against the one-at-a-time reference


REFERENCE_LOOPS = 3  # x 10 steps of 300 images


def reference_bound(make) -> Bound:
    """The rounding a member of `make` may carry after REFERENCE_LOOPS loops of 300 images."""
    steps = REFERENCE_LOOPS * epoch_steps(300, HP.batch_size)
    if make is bn_mlp:
        return training_bound(steps, BN_WIDTHS, HP.batch_size, bn_ops(HP.batch_size))
    return training_bound(steps, CNN_WIDTHS, HP.batch_size)


@pytest.mark.parametrize("batched", [True, False])
@pytest.mark.parametrize("make,units", [(small_cnn, CNN_UNITS), (frozen_cnn, CNN_UNITS),
                                        pytest.param(bn_mlp, BN_UNITS, marks=pytest.mark.numeric)],
                         ids=["cnn", "frozen_cnn", "bn_mlp"])  # numeric: the largest rounding of the module tests
def test_model_matches_the_reference_loop_every_mode(mnist, make, units, batched):
    # noise: no input is constant. A constant pixel's weights in front of a BatchNorm get a
    # gradient that is exactly 0 in theory, rounding noise in practice, which AdamW turns into
    # lr-sized steps that no two correct implementations share
    ds = image_subset(mnist, 300, noise=0.1 if make is bn_mlp else 0.0)
    members = [HP.member(m, 5) for m in MODES]
    pop, _, results = run(make, ds, HP, REFERENCE_LOOPS, members, batched=batched)
    assert [(layer.name, layer.units) for layer in pop.spec.layers] == list(units.layers)
    tol = reference_bound(make)
    for j, mem in enumerate(pop.members):
        ref = module_oracle.run(make, units, ds, mem.seed, mem.mode, REFERENCE_LOOPS, HP)
        assert [round(r.candidate_acc[j] * ds.val_y.numel() / 100) for r in results] == ref.accs, mem.mode
        assert [r.promoted[j] for r in results] == ref.promoted
        assert_close(f"{mem.mode} LKG", pop.member_state_dict(j), ref.lkg, tol)
    if make is bn_mlp:  # running statistics trained and promoted with the weights
        promotions = sum(r.promoted[0] for r in results)
        assert int(pop.buffers["2.num_batches_tracked"][0]) == 10 * promotions  # 10 steps per loop
    # the candidates of one seed really differ by mode, by more than rounding
    states = [pop.member_state_dict(j) for j in range(len(members))]
    for mem, s in zip(pop.members[1:], states[1:]):
        assert_apart(f"{mem.mode} against {pop.members[0].mode}", s, states[0], tol)


# ------------------------------------------------------------------------------------------
# engine variants (psa.core.variant) on a module

VLOOPS = 8
VHP = dataclasses.replace(ENGINE_HP, meta_loops=VLOOPS)
# (mode, variant) of each member; every seed runs all of them in one population
GREEDY_VARIANTS = [
    ("hidden", Variant()),
    ("hidden", Variant(patience=1, patience_growth=3)),
    ("full", Variant(ablate=3, ablate_layers=("0", "output"))),
    ("hidden", Variant(ablate_percent=25.0, ablate_schedule="linear")),
    ("output", Variant(ablate=2, fixed=True)),
    ("hidden", Variant(ablate_layers=("output",), fixed=True)),
    ("dropout", Variant(schedule=(("dropout", 3), ("hidden", 3), ("decay", 2)))),
]
PERSIST_VARIANTS = [  # a member persists its AdamW state: the chunk trains with the per-member AdamW
    ("none", Variant()),
    ("hidden", Variant(optimizer_state="persist")),
    ("decay", Variant(optimizer_state="persist")),
    ("hidden", Variant(optimizer_state="persist", patience=2)),
    ("output", Variant(optimizer_state="persist", ablate_layers=("output",), fixed=True)),
    ("dropout", Variant(optimizer_state="persist", schedule=(("dropout", 4), ("hidden", 4)))),
]


@pytest.mark.slow
@pytest.mark.parametrize("specs,batched", [(GREEDY_VARIANTS, True), (PERSIST_VARIANTS, True),
                                           (PERSIST_VARIANTS, False)],
                         ids=["fused-adamw", "member-adamw", "member-adamw-one-at-a-time"])
def test_variants_on_a_cnn_match_the_reference_loop(mnist, specs, batched):
    """Every variant on the small CNN against tests/module_oracle.run_variant (the module itself,
    autograd, torch AdamW and its state_dict): 8 loops x 9 steps, the last batch partial."""
    ds = image_subset(mnist, 272, 300)
    assert ds.train_x.shape[0] % VHP.batch_size == 16
    members = [VHP.member(mode, 21, v) for mode, v in specs]
    pop, eng, results = run(small_cnn, ds, VHP, VLOOPS, members, batched=batched)
    forced_total = 0
    tol = training_bound(VLOOPS * epoch_steps(272, VHP.batch_size), CNN_WIDTHS, VHP.batch_size)
    for j, mem in enumerate(pop.members):
        start = mem.variant.start_mode(mem.mode)
        ref = module_oracle.run_variant(small_cnn, CNN_UNITS, ds, mem.seed, start, VLOOPS, VHP, mem.variant)
        what = f"{start} {mem.variant.to_json()} seed {mem.seed}"
        assert [r.promoted[j] for r in results] == ref.promoted, what
        assert [round(r.candidate_acc[j] * ds.val_y.numel() / 100) for r in results] == ref.accs, what
        assert_close(f"{what} LKG", pop.member_state_dict(j), ref.lkg, tol)
        assert_close(f"{what} bounty", pop.member_state_dict(j, bounty=True), ref.bounty, tol)
        assert pop.bounty_score()[j] == pytest.approx(100.0 * ref.bounty_correct / ds.val_y.numel())
        assert [m for m, _ in pop.mode_history[j]] == list(dict.fromkeys(ref.modes)), what
        assert [len(r.ablations[j]) for r in results] == [
            len(choose_neurons(pop.spec.arch, m, mem.seed, t, mem.variant, VLOOPS)) for t, m in
            enumerate(ref.modes, 1)]
        if mem.variant.patience:
            assert [r.forced[j] for r in results] == ref.forced, what
            forced_total += sum(ref.forced)
        else:
            assert all(r.forced[j] is None for r in results)
    assert forced_total > 0, "patience never forced a candidate in: the test would not check it"
    # the test accuracy is the bounty model's
    test = eng.test_accuracy()
    model = small_cnn()
    for j in range(pop.size):
        model.load_state_dict(pop.member_state_dict(j, bounty=True))
        model.eval()
        with torch.no_grad():
            acc = 100.0 * float((model(ds.test_x).argmax(1) == ds.test_y).sum()) / ds.test_y.numel()
        assert test[j] == pytest.approx(acc)


@pytest.mark.slow
@pytest.mark.parametrize("specs", [GREEDY_VARIANTS, PERSIST_VARIANTS], ids=["fused-adamw", "member-adamw"])
def test_variants_on_a_plain_mlp_give_the_engines_records(mnist, specs):
    """A plain nn.Sequential MLP with every variant through the module engine and its SimpleMLP
    through psa's engine: the same units ablated, the same (forced) promotions and candidate
    accuracies, losses, weights and bounty models within rounding (tests/tolerance.py), over 10
    loops x 32 steps of 1,000 images (the last batch of 8)."""
    ds = subset(mnist, 1000, 1000, 500)
    loops = 10
    hp = dataclasses.replace(ENGINE_HP, meta_loops=loops)
    fit_loops = {"dropout": (("dropout", 4), ("hidden", 4), ("decay", 2))}
    specs = [(m, dataclasses.replace(v, schedule=fit_loops[m] if v.schedule and len(v.schedule) == 3 else
                                     (("dropout", 5), ("hidden", 5)) if v.schedule else ())) for m, v in specs]
    members = [hp.member(mode, 31, v) for mode, v in specs]
    pop = Population.create(parse_arch("[2*24, 1*16]"), members, "cpu", n_val=ds.val_y.numel())
    eng = Engine(pop, ds, hp)
    gpop = ModulePopulation.create(plain_mlp, members, ds)
    geng = ModuleEngine(gpop, ds, hp)
    steps = epoch_steps(1000, hp.batch_size)
    for loop in range(1, loops + 1):
        r, g = eng.meta_loop(), geng.meta_loop()
        assert g.ablations == r.ablations and g.ablated == r.ablated
        assert g.promoted == r.promoted and g.forced == r.forced
        assert g.candidate_acc == r.candidate_acc
        assert_close(f"loop {loop} train loss", torch.tensor(g.train_loss), torch.tensor(r.train_loss),
                     training_bound(loop * steps, MLP_WIDTHS, hp.batch_size, c=ONE_PASS))
    tol = training_bound(loops * steps, MLP_WIDTHS, hp.batch_size)
    for j in range(pop.size):
        for bounty in (False, True):
            theirs = pop.member_state_dict(j, pop.bounty_model() if bounty else None)
            ours = dict(zip(theirs, gpop.member_state_dict(j, bounty=bounty).values()))  # the same layers, in order
            assert_close(f"member {j} {'bounty' if bounty else 'LKG'}", ours, theirs, tol)
    assert gpop.bounty_score() == pop.bounty_score() and gpop.mode_history == pop.mode_history
    assert gpop.bounty_loop == pop.bounty_loop
    assert geng.test_accuracy() == eng.test_accuracy()
    if gpop.persistent:
        assert pop.opt_step is not None and gpop.opt_step is not None
        assert torch.equal(gpop.opt_step, pop.opt_step)


def test_hidden_mode_zeroes_the_consumers_columns(mnist):
    """Conv channel u feeds columns [16u, 16u + 16) of the Linear head after the Flatten."""
    ds = image_subset(mnist, 64)
    pop = ModulePopulation.create(small_cnn, [HP.member("hidden", 3)], ds)
    eng = ModuleEngine(pop, ds, HP)
    params = {k: v.clone() for k, v in pop.params.items()}
    eng._ablate(params, 0, (((1, 2),),))
    assert params["2.weight"][0, 2].abs().sum() == 0 and params["2.bias"][0, 2] == 0
    head = params["6.weight"][0]
    assert head[:, 32:48].abs().sum() == 0
    assert torch.equal(head[:, :32], pop.params["6.weight"][0, :, :32])
    assert torch.equal(head[:, 48:], pop.params["6.weight"][0, :, 48:])


# ------------------------------------------------------------------------------------------
# discovery, notes, the vmap fallback


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.head = nn.Linear(12, 12), nn.Linear(12, 12), nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.a(x))
        return self.head(h + torch.relu(self.b(h)))


class DataDependent(nn.Module):
    """Python control flow on the data: fx cannot trace it, vmap cannot batch it (.item())."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.head = nn.Linear(12, 8), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.a(x))
        if h.sum().item() > -1.0:
            h = h * 1.0
        return self.head(h)


def toy(n: int = 96, d: int = 12, seed: int = 0) -> Dataset:
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, d, generator=g), torch.randint(0, 3, (n,), generator=g)
    return Dataset("toy", x[:64], y[:64], x[64:80], y[64:80], x[80:], y[80:], "toy")


def test_discovery_of_units_consumers_and_norms(mnist):
    spec = inspect_model(small_cnn(), image_subset(mnist, 4).train_x[:2], 10)
    assert spec.hidden == (4, 6) and spec.n_out == 10
    assert [layer.consumer for layer in spec.layers] == [Consumer("2", 1), Consumer("6", 16), None]
    assert spec.dropouts == (("5", 96),)
    spec = inspect_model(bn_mlp(), mnist.train_x[:2], 10)
    assert [layer.norm for layer in spec.layers] == ["2", "6", None]
    assert [layer.has_bias for layer in spec.layers] == [False, False, True]
    spec = inspect_model(Residual(), torch.randn(2, 12), 3)
    assert [layer.consumer for layer in spec.layers] == [None, None, None]
    assert len(spec.notes) == 2 and "a" in spec.notes[0] and "used 2 times" in spec.notes[0]


def test_ambiguous_consumer_is_said_once_and_zeroes_the_incoming_side():
    ds = toy()
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        pop = ModulePopulation.create(Residual, [HP.member("hidden", s) for s in (1, 2)], ds)
    notes = [str(x.message) for x in w if "consumer" in str(x.message)]
    assert len(notes) == 2 and all(n.startswith("psa: ") for n in notes)
    eng = ModuleEngine(pop, ds, HP)
    params = {k: v.clone() for k, v in pop.params.items()}
    eng._ablate(params, 0, (((0, 3),), ()))
    assert params["a.weight"][0, 3].abs().sum() == 0
    assert torch.equal(params["b.weight"], pop.params["b.weight"])  # no outgoing side
    assert torch.equal(params["a.weight"][1], pop.params["a.weight"][1])


def frozen_first() -> nn.Module:
    m = nn.Sequential(nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 3))
    m[0].requires_grad_(False)
    return m


@pytest.mark.parametrize("batched", [True, False])
def test_frozen_parameters_stay_as_built_and_a_note_says_so(batched):
    """A layer built with requires_grad=False is not trained, as torch's optimizers leave it (no
    step, no weight decay); an ablation's zeros in it stay."""
    ds = toy()
    members = [HP.member(m, s) for s in (1, 2) for m in ("none", "decay", "hidden")]
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        pop, _, results = run(frozen_first, ds, HP, 3, members, batched=batched)
    notes = [str(x.message) for x in w if "requires_grad=False" in str(x.message)]
    assert notes == ["psa: tests.test_module:frozen_first: 0.weight, 0.bias (requires_grad=False) are not trained: "
                     "what an ablation zeroes there stays 0, whatever the persistence verdict of its layer"]
    assert any(r.promoted[j] for r in results for j in range(len(members)))
    for j, mem in enumerate(pop.members):
        built = build(frozen_first, mem.seed)[0]
        got_w, got_b = pop.params["0.weight"][j], pop.params["0.bias"][j]
        dead = {a[1] for r in results if r.promoted[j] for a in r.ablations[j] if a[0] == 0}
        keep = [u for u in range(8) if u not in dead]
        assert torch.equal(got_w[keep], built.weight[keep]) and torch.equal(got_b[keep], built.bias[keep]), mem.mode
        assert not got_w[sorted(dead)].any() and not got_b[sorted(dead)].any()
        # the rest trains: the head is no longer what the factory built, where a candidate was kept
        if any(r.promoted[j] for r in results):
            assert not torch.equal(pop.params["2.weight"][j], build(frozen_first, mem.seed)[2].weight)


def test_a_module_vmap_cannot_batch_falls_back_once_with_a_reason():
    ds = toy()
    members = [HP.member(m, s) for s in (1, 2) for m in ("none", "full", "hidden")]
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        pop, eng, res = run(DataDependent, ds, HP, 3, members)
    msgs = [str(x.message) for x in w]
    assert sum("cannot trace" in m for m in msgs) == 1
    fallback = [m for m in msgs if "vmap cannot batch" in m]
    assert len(fallback) == 1 and "one at a time" in fallback[0]
    assert not eng.batched
    ref_pop, _, ref = run(DataDependent, ds, HP, 3, members, batched=False)
    assert [r.candidate_acc for r in res] == [r.candidate_acc for r in ref]
    assert max_diff(pop.params, ref_pop.params) == 0


def test_batched_members_do_not_depend_on_chunking(mnist):
    ds = image_subset(mnist, 96)
    members = [HP.member(m, s) for s in (1, 2) for m in ("none", "dropout", "hidden")]
    a, _, ra = run(small_cnn, ds, HP, 2, members, batched=True)  # (auto would train a CNN on a CPU one at a time)
    b, _, rb = run(small_cnn, ds, HP, 2, members, batched=True, max_members=2)
    assert [r.candidate_acc for r in ra] == [r.candidate_acc for r in rb]
    # vmap over 2 members or 6 may pick other kernels: rounding, by the policy
    assert_close("chunks of 2", b.params, a.params, training_bound(2 * epoch_steps(96, HP.batch_size), CNN_WIDTHS,
                                                                    HP.batch_size))


# ------------------------------------------------------------------------------------------
# psa.fit


def test_psa_fit_table_and_checkpoints_load_into_the_factory(mnist, tmp_path):
    ds = image_subset(mnist, 128, 200)
    r = psa.fit(small_cnn, (ds.train_x, ds.train_y), (ds.val_x, ds.val_y), (ds.test_x, ds.test_y),
                modes=["output", "none", "hidden"], trials=3, meta_loops=2, batch_size=32, lr=1e-3)
    assert r.modes == ("none", "hidden", "output")
    assert len(r.records) == 2 * 3 * 3
    rows = {row["mode"]: row for row in r.summary()}
    assert set(rows) == {"none", "hidden", "output"} and "diff" not in rows["none"]
    for mode in ("hidden", "output"):
        peaks = [r.bounty[(mode, k)] - r.bounty[("none", k)] for k in (1, 2, 3)]
        assert rows[mode]["diff"] == pytest.approx(sum(peaks) / 3)
        assert rows[mode]["verdict"] == "cannot decide"  # 3 pairs can never reach 0.05
    printed = str(r.table())
    assert "hidden" in printed and "±" in printed
    paths = r.save(tmp_path)
    assert len(paths) == 9
    state = load_file(str(tmp_path / "hidden-trial2.safetensors"))
    model = small_cnn()
    model.load_state_dict(state)
    model.eval()
    with torch.no_grad():
        acc = 100.0 * float((model(ds.val_x).argmax(1) == ds.val_y).sum()) / ds.val_y.numel()
    assert acc == pytest.approx(r.bounty[("hidden", 2)])
    assert max_diff(state, r.state_dict("hidden", 2)) == 0


def test_psa_fit_runs_named_variants_beside_the_modes(mnist, tmp_path):
    """variants= as a study design's [variants]: each named variant in the modes it applies to,
    condition "mode+name", paired seeds, tested against its own mode; the records carry every
    ablated unit and patience's forced acceptances; saved models are the bounty models."""
    ds = image_subset(mnist, 96, 100)
    variants = {"patience1": {"patience": 1}, "two": Variant(ablate=2),
                "dh": {"schedule": "dropout:1,hidden:2"}}
    r = psa.fit(small_cnn, (ds.train_x, ds.train_y), (ds.val_x, ds.val_y), (ds.test_x, ds.test_y),
                modes=["none", "hidden"], trials=2, meta_loops=3, batch_size=32, lr=1e-3, variants=variants)
    assert r.conditions == ("none", "hidden", "none+patience1", "hidden+patience1", "hidden+two", "dropout+dh")
    assert len(r.records) == 3 * 2 * len(r.conditions)
    two = [x for x in r.records if x.mode == "hidden+two" and x.loop > 1]
    assert two and all(len(x.ablations) == 2 and x.ablated == x.ablations[0] for x in two)
    assert all(x.forced is not None for x in r.records if x.mode.endswith("+patience1"))
    assert all(x.forced is None for x in r.records if not x.mode.endswith("+patience1"))
    dh = [x for x in r.records if x.mode == "dropout+dh"]
    assert [x.ablated is None for x in dh if x.trial == 1] == [True, False, False]  # dropout, then hidden
    rows = {row["mode"]: row for row in r.summary()}
    assert rows["hidden"]["vs"] == "none" and rows["hidden+two"]["vs"] == "hidden"
    assert rows["none+patience1"]["vs"] == "none" and rows["dropout+dh"]["vs"] == "hidden"  # where it ends
    diff = sum(r.bounty[("hidden+two", k)] - r.bounty[("hidden", k)] for k in (1, 2)) / 2
    assert rows["hidden+two"]["diff"] == pytest.approx(diff)
    paths = r.save(tmp_path)
    assert len(paths) == 2 * len(r.conditions)
    model = small_cnn()
    model.load_state_dict(load_file(str(tmp_path / "hidden+patience1-trial2.safetensors")))
    model.eval()
    with torch.no_grad():
        acc = 100.0 * float((model(ds.val_x).argmax(1) == ds.val_y).sum()) / ds.val_y.numel()
    assert acc == pytest.approx(r.bounty[("hidden+patience1", 2)])


@pytest.mark.parametrize("variants,message", [
    ({"bad name!": {"patience": 1}}, "bad variant name"),
    ({"p": {}}, "is the paper's engine"),
    ({"a": {"patience": 2}, "b": Variant(patience=2)}, "have the same settings"),
    ({"s": {"schedule": "dropout:1,hidden:1"}}, "covers 2 meta-loops, the run has 3"),
    ({"f": {"fixed": True}}, "applies to none of the modes"),
    ({"l": {"ablate_layers": ["7"]}}, "has unit layers (in call order) 0..2"),
    ({"z": {"ablate": 0}}, "ablate must be at least 1"),
    ({"x": {"colour": "red"}}, "unknown variant setting 'colour'"),
    (["patience"], "must be a dict of named variants"),
])
def test_bad_variants_are_one_clear_line(mnist, variants, message):
    ds = image_subset(mnist, 64, 64)
    modes = ["none"] if "f" in variants else ["none", "hidden"]
    with pytest.raises(ConfigError) as e:
        psa.fit(small_cnn, (ds.train_x, ds.train_y), (ds.val_x, ds.val_y), modes=modes, trials=1, meta_loops=3,
                variants=variants)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_import_psa_stays_light():
    code = ("import sys, psa; assert 'torch' not in sys.modules; f = psa.fit; assert 'torch' in sys.modules; "
            "print(f.__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={"PYTHONPATH": SRC})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "fit"


# ------------------------------------------------------------------------------------------
# bad input: one clear line


def no_module():
    return "not a module"


def no_units():
    return nn.Sequential(nn.Flatten(), nn.ReLU())


def wrong_classes():
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 7))


def no_dropout():
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 10))


def raises_two_lines():
    raise ValueError("bad width\nsee the docs")


class TwoOutputs(nn.Module):
    """Logits and features: psa does not guess which of a tuple are the logits."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(784, 10)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.fc(x)
        return z, x


class AuxWhileTraining(nn.Module):
    """Inception's habit: an auxiliary head's logits beside the main ones, in training mode only."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.head, self.aux = nn.Linear(784, 16), nn.Linear(16, 10), nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        h = F.relu(self.a(x))
        return (self.head(h), self.aux(h)) if self.training else self.head(h)


def lazy() -> nn.Module:
    return nn.Sequential(nn.LazyLinear(16), nn.ReLU(), nn.LazyLinear(10))


def weight_normed() -> nn.Module:
    return nn.Sequential(nn.utils.parametrizations.weight_norm(nn.Linear(784, 16)), nn.ReLU(), nn.Linear(16, 10))


def spectral_normed_head() -> nn.Module:
    return nn.Sequential(nn.Linear(784, 16), nn.ReLU(), nn.utils.parametrizations.spectral_norm(nn.Linear(16, 10)))


def old_weight_norm() -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.nn.utils.weight_norm is deprecated, but still found in models
        return nn.Sequential(nn.utils.weight_norm(nn.Linear(784, 16)), nn.ReLU(), nn.Linear(16, 10))


class BilinearHead(nn.Module):
    """Logits from a layer that is no unit layer: its one Linear is hidden, not the output layer."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.head = nn.Linear(784, 16), nn.Bilinear(16, 16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.a(x))
        return self.head(h, h)


class MatmulHead(nn.Module):
    """Logits as h @ W on a bare (16, 10) parameter, which psa does not read as a layer."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.w = nn.Linear(784, 16), nn.Parameter(torch.randn(16, 10) / 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.a(x)) @ self.w


def double() -> nn.Module:
    return nn.Sequential(nn.Linear(784, 16), nn.ReLU(), nn.Linear(16, 10)).double()


_SHARED = nn.Sequential(nn.Linear(784, 16), nn.ReLU(), nn.Linear(16, 10))


def same_instance() -> nn.Module:
    return _SHARED


@pytest.mark.parametrize("factory,mode,message", [
    (lazy, "none", "returned a module with uninitialised (lazy) parameters (0.weight, 0.bias, 2.weight ...)"),
    (weight_normed, "none", "0.weight is computed from other parameters (weight_norm, spectral_norm"),
    (spectral_normed_head, "output", "2.weight is computed from other parameters"),
    (old_weight_norm, "hidden", "0.weight is computed from other parameters"),
    (BilinearHead, "output", "the logits (10 wide) come from no nn.Linear, nn.Conv or F.linear layer of that width "
                             "(the last unit layer, a, has 16 units)"),
    (MatmulHead, "none", "the last unit layer, a, has 16 units"),
    (double, "none", "its parameters are float64: build it in float32"),
    (same_instance, "none", "same_instance returned the same module object for two seeds"),
    (no_module, "none", "returned str, not a torch.nn.Module"),
    (no_units, "none", "has no nn.Linear or nn.Conv layer"),
    (wrong_classes, "none", "train labels must be in [0, 7) (the model gives 7 logits): label 9 at index 2"),
    (no_dropout, "dropout", "sets the rate of every dropout of the model"),
    (no_dropout, "hidden", "mode 'hidden' needs a hidden unit layer"),
    (raises_two_lines, "none", "raises_two_lines failed: ValueError: bad width"),
    (TwoOutputs, "none", "TwoOutputs maps a batch of 2 to a tuple; it must return one tensor of (2, classes) logits"),
    (AuxWhileTraining, "hidden", "AuxWhileTraining maps a batch of 2 to a tuple in training mode but to (2, 10) logits "
                                 "in eval mode; it must return the same one tensor of logits in both"),
])
def test_bad_models_are_one_clear_line(mnist, factory, mode, message):
    ds = subset(mnist, 64, 64, 64)
    with pytest.raises(ConfigError) as e, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        psa.fit(factory, (ds.train_x, ds.train_y), (ds.val_x, ds.val_y), modes=[mode], trials=2, meta_loops=1)
    assert message in str(e.value) and "\n" not in str(e.value)
    # the model's own fault is said first, not blamed on vmap on the way
    assert not [w for w in caught if "vmap" in str(w.message)]


@pytest.mark.parametrize("kwargs,message", [
    ({"modes": "hidden"}, "modes must be a list of mode names, got the string 'hidden' (write ['hidden'])"),
    ({"max_members": 0}, "max_members must be a positive integer or None (all at once), got 0"),
    ({"max_members": -1}, "max_members must be a positive integer or None"),
    ({"max_members": 1.5}, "max_members must be a positive integer or None"),
    ({"seed": 2**63 - 2}, "seed + trials - 1 must be at most 9,223,372,036,854,775,807 (2^63 - 1)"),
    ({"seed": -1}, "seed must be an integer >= 0"),
])
def test_bad_arguments_are_one_clear_line(mnist, kwargs, message):
    ds = subset(mnist, 64, 64, 64)
    args = {"modes": ["none"], "trials": 3, "meta_loops": 1, **kwargs}
    with pytest.raises(ConfigError) as e:
        psa.fit(no_dropout, (ds.train_x, ds.train_y), (ds.val_x, ds.val_y), **args)
    assert message in str(e.value) and "\n" not in str(e.value)


def random_width() -> nn.Module:
    w = int(torch.randint(4, 12, ()))  # drawn from the seed: another model per trial
    return nn.Sequential(nn.Linear(12, w), nn.ReLU(), nn.Linear(w, 3))


def test_a_factory_building_other_models_per_seed_is_one_line():
    """The members are stacked: a factory whose architecture depends on the seed is refused in
    one line (it was torch.stack's error)."""
    ds = toy()
    with pytest.raises(ConfigError) as e:
        psa.fit(random_width, (ds.train_x, ds.train_y), (ds.val_x, ds.val_y), modes=["none"], trials=3,
                meta_loops=1)
    assert "random_width builds another model for seed 1 than for seed 0 (0.weight: (" in str(e.value)
    assert "the factory must build the same architecture every call" in str(e.value) and "\n" not in str(e.value)


def test_a_study_of_a_factory_building_other_models_per_seed_writes_nothing(tmp_path):
    rc, _, err = run_main(["study", "--model", "tests.test_module:random_width", "--modes", "none", "--trials", "2",
                           "--meta-loops", "1", "--train-subset", "256", "--quiet", "--db", "x.sqlite"], tmp_path)
    assert rc == 2 and "random_width builds another model for seed 1 than for seed 0" in one_line_error(err)
    assert list(tmp_path.iterdir()) == []


class Dropouts(nn.Module):
    """Two dropout places of different widths: `self.drop` at both (a common idiom; "reused"),
    the same module under a second name ("aliased"), or two modules ("two")."""

    def __init__(self, kind: str = "two") -> None:
        super().__init__()
        self.a, self.b, self.head = nn.Linear(12, 8), nn.Linear(8, 6), nn.Linear(6, 3)
        self.drop = nn.Dropout()
        if kind != "reused":
            self.drop2 = self.drop if kind == "aliased" else nn.Dropout()
        self.kind = kind

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        second = self.drop if self.kind == "reused" else self.drop2
        return self.head(second(F.relu(self.b(self.drop(F.relu(self.a(x)))))))


def reused_dropout() -> nn.Module:
    return Dropouts("reused")


def aliased_dropout() -> nn.Module:
    return Dropouts("aliased")


@pytest.mark.parametrize("batched", [True, False])
@pytest.mark.parametrize("make", [reused_dropout, aliased_dropout])
def test_a_dropout_module_called_twice_is_two_sites(make, batched):
    """Each call of a reused nn.Dropout draws its own slice of the step's noise, under any of
    its names: the same records and models as two modules (reused, it failed: the second call
    reshaped the first call's slice; aliased, its second name dropped with other masks)."""
    ds = toy()
    kw = dict(modes=["none", "dropout"], trials=2, meta_loops=2, batched=batched, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        once = psa.fit(make, (ds.train_x, ds.train_y), (ds.val_x, ds.val_y), **kw)
        twice = psa.fit(Dropouts, (ds.train_x, ds.train_y), (ds.val_x, ds.val_y), **kw)
    strip = [{k: v for k, v in r.items() if k != "model"} for r in once.to_records()]
    assert strip == [{k: v for k, v in r.items() if k != "model"} for r in twice.to_records()]
    for k in (1, 2):
        assert all(torch.equal(v, twice.state_dict("dropout", k)[n]) for n, v in once.state_dict("dropout", k).items())


def bn_small() -> nn.Module:
    return nn.Sequential(nn.Linear(12, 8, bias=False), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


@pytest.mark.parametrize("batched", [True, False])
def test_a_model_failing_in_training_is_one_line_not_a_vmap_fallback(batched):
    """A BatchNorm on a last partial batch of 1 fails in training: one line that says where, on
    either path; not first a warning that vmap cannot batch the model (it can), then torch's
    traceback."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(81, 12, generator=g), torch.randint(0, 3, (81,), generator=g)
    with warnings.catch_warnings(record=True) as w, pytest.raises(ConfigError) as e:
        warnings.simplefilter("always")
        psa.fit(bn_small, (x[:65], y[:65]), (x[65:], y[65:]), modes=["none"], trials=1, meta_loops=1,
                batch_size=32, batched=batched, progress=False)
    assert str(e.value).startswith("tests.test_module:bn_small fails in training on a batch of 1 example (step 3 of "
                                   "loop 1): ValueError: Expected more than 1 value per channel when training")
    assert "\n" not in str(e.value) and not any("vmap cannot batch" in str(m.message) for m in w)


@pytest.mark.parametrize("spec,message", [
    ("nomodule_xyz:make", "cannot import nomodule_xyz (ModuleNotFoundError"),
    ("os.path", "give the factory as module:function"),
    ("os:no_such_function", "module os has no no_such_function"),
    ("os:sep", "sep is not callable"),
])
def test_factory_names_that_do_not_resolve(spec, message):
    with pytest.raises(ConfigError) as e:
        resolve_factory(spec)
    assert message in str(e.value)


def test_factory_is_imported_from_the_current_directory(tmp_path, monkeypatch):
    (tmp_path / "my_models_generic.py").write_text(
        "from torch import nn\ndef make():\n    return nn.Linear(3, 2)\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    f = resolve_factory("my_models_generic:make")
    assert isinstance(f(), nn.Linear)


def test_module_engine_computes_in_fp32_and_restores_the_flags():
    """cuDNN's TF32 (on by default in torch) and a user's cuBLAS TF32 are off while the module
    engine computes, its algorithms deterministic; the user's settings come back after."""
    from psa.core.module.functional import fp32_arithmetic

    cublas, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    saved = (cublas.allow_tf32, cudnn.allow_tf32, cudnn.deterministic)
    try:
        cublas.allow_tf32, cudnn.allow_tf32, cudnn.deterministic = True, True, False
        with fp32_arithmetic():
            inside = (cublas.allow_tf32, cudnn.allow_tf32, cudnn.deterministic)
        assert inside == (False, False, True)
        assert (cublas.allow_tf32, cudnn.allow_tf32, cudnn.deterministic) == (True, True, False)
        with pytest.raises(RuntimeError, match="inside"):
            with fp32_arithmetic():
                raise RuntimeError("inside")
        assert (cublas.allow_tf32, cudnn.allow_tf32, cudnn.deterministic) == (True, True, False)
    finally:
        cublas.allow_tf32, cudnn.allow_tf32, cudnn.deterministic = saved
