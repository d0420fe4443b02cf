"""The Frustration Engine's variants (psa.core.variant) against the plain one-model oracle, and
their draws, settings and bad input."""

from __future__ import annotations

import dataclasses

import pytest

from psa.core.ablation import choose_neuron, choose_neurons
from psa.core.arch import parse_arch
from psa.core.mlp.engine import Engine
from psa.core.errors import ConfigError
from psa.core.mlp.population import Population
from psa.core.variant import Variant, ablation_count, parse_ablate, parse_schedule

from . import oracle
from .conftest import ENGINE_HP, subset
from .tolerance import assert_close, epoch_steps, training_bound

ARCH = parse_arch("[2*8]")
LOOPS = 8  # 8 x 32 steps of 1,000 images in batches of 32: 31 full and a last batch of 8
HP = dataclasses.replace(ENGINE_HP, meta_loops=LOOPS)

# (mode, variant) of each member; every seed runs all of them in one population
GREEDY_CHUNK = [
    ("hidden", Variant()),
    ("hidden", Variant(patience=1, patience_growth=3)),
    ("full", Variant(ablate=3, ablate_layers=("0", "output"))),
    ("hidden", Variant(ablate_percent=25.0, ablate_schedule="linear")),
    ("output", Variant(ablate=2, fixed=True)),
    ("hidden", Variant(ablate_layers=("output",), fixed=True)),
    ("dropout", Variant(schedule=(("dropout", 3), ("hidden", 3), ("decay", 2)))),
]
PERSIST_CHUNK = [  # a member that persists its AdamW state: the chunk trains with MemberAdamW
    ("none", Variant()),
    ("hidden", Variant(optimizer_state="persist")),
    ("decay", Variant(optimizer_state="persist")),
    ("hidden", Variant(optimizer_state="persist", patience=2)),
    ("output", Variant(optimizer_state="persist", ablate_layers=("output",), fixed=True)),
    ("dropout", Variant(optimizer_state="persist", schedule=(("dropout", 4), ("hidden", 4)))),
]


def run_population(data, specs, seeds=(31, 32)):
    members = [HP.member(mode, s, v) for s in seeds for mode, v in specs]
    pop = Population.create(ARCH, members, "cpu", n_val=data.val_y.numel())
    eng = Engine(pop, data, HP)
    return pop, eng, [eng.meta_loop() for _ in range(LOOPS)]


@pytest.fixture(scope="module")
def data(small):
    d = subset(small, 1000, n_val=1000, n_test=500)
    assert d.train_x.shape[0] % HP.batch_size == 8
    return d


@pytest.mark.parametrize("specs", [GREEDY_CHUNK, PERSIST_CHUNK], ids=["fused-adamw", "member-adamw"])
def test_variants_reproduce_the_oracle(data, specs):
    pop, eng, results = run_population(data, specs)
    forced_total = 0
    tol = training_bound(LOOPS * epoch_steps(1000, HP.batch_size), ARCH.widths, HP.batch_size)
    for j, mem in enumerate(pop.members):
        start = mem.variant.start_mode(mem.mode)
        ref = oracle.run_variant(ARCH, data, mem.seed, start, LOOPS, HP, mem.variant)
        what = f"{start} {mem.variant.to_json()} seed {mem.seed}"
        assert [r.promoted[j] for r in results] == ref.promoted, what
        assert_close(f"{what} LKG", pop.member_state_dict(j), ref.lkg, tol)
        assert_close(f"{what} bounty", pop.member_state_dict(j, pop.bounty_model()), ref.bounty, tol)
        ours = [round(r.candidate_acc[j] * data.val_y.numel() / 100) for r in results]
        assert all(abs(a - b) <= 1 for a, b in zip(ours, ref.accs)), (what, ours, ref.accs)
        assert pop.bounty_score()[j] == pytest.approx(100.0 * ref.bounty_correct / data.val_y.numel())
        assert [m for m, _ in pop.mode_history[j]] == list(dict.fromkeys(ref.modes)), what
        if mem.variant.patience:
            assert [r.forced[j] for r in results] == ref.forced, what
            forced_total += sum(ref.forced)
        else:
            assert all(r.forced[j] is None for r in results) if pop.patient else True
    if any(v.patience for _, v in specs):
        assert forced_total > 0, "patience never forced a candidate in: the test would not check it"
    # the test accuracy is the bounty model's
    test = eng.test_accuracy()
    for j in range(pop.size):
        plain = dataclasses.replace(pop.members[j], variant=Variant())
        m = Population.create(ARCH, [plain], "cpu", n_val=data.val_y.numel())
        m.load_member_state_dict(0, pop.member_state_dict(j, pop.bounty_model()))
        assert test[j] == pytest.approx(Engine(m, data, HP).test_accuracy()[0])


def test_default_variant_draws_the_papers_neuron():
    arch = parse_arch("[3*8, 1*5]")
    for mode in ("full", "hidden", "output"):
        for loop in range(1, 40):
            a = choose_neuron(arch, mode, 7, loop)
            assert choose_neurons(arch, mode, 7, loop, Variant(), 100) == (() if a is None else (a,))


def test_several_neurons_are_distinct_and_from_the_eligible_layers():
    arch = parse_arch("[3*8]")
    v = Variant(ablate=6, ablate_layers=("last-hidden", "output"))
    for loop in range(2, 30):
        got = choose_neurons(arch, "full", 5, loop, v, 100)
        assert len(got) == 6 and len(set(got)) == 6
        assert {layer for layer, _ in got} <= {2, 3}
    pooled = choose_neurons(arch, "hidden", 5, 4, Variant(ablate=24), 100)
    assert sorted(pooled) == [(layer, n) for layer in range(3) for n in range(8)]  # capped at the pool


def test_counts_percentages_and_schedules():
    arch = parse_arch("[2*50]")
    assert ablation_count(Variant(ablate_percent=5.0), arch, "hidden", 2, 100) == 5
    assert ablation_count(Variant(ablate_percent=0.5), arch, "hidden", 2, 100) == 1  # at least one
    lin = Variant(ablate=4, ablate_schedule="linear")
    assert [ablation_count(lin, arch, "hidden", t, 10) for t in (2, 6, 10)] == [4, 2, 0]
    step = Variant(ablate=3, ablate_schedule="step:5")
    assert [ablation_count(step, arch, "hidden", t, 10) for t in (4, 5, 9)] == [3, 0, 0]
    fixed = Variant(ablate=2, fixed=True)
    first = choose_neurons(arch, "output", 9, 1, fixed, 10)
    assert len(first) == 2 and all(choose_neurons(arch, "output", 9, t, fixed, 10) == first for t in range(2, 10))


def test_settings_round_trip_and_defaults_are_empty():
    assert Variant().to_json() == "{}" and Variant().is_default
    v = Variant(patience=5, ablate_layers=("output",), schedule=parse_schedule("dropout:50,hidden:50"))
    assert Variant.from_json(v.to_json()) == v
    assert Variant.from_settings({"ablate": "5%"}) == Variant(ablate_percent=5.0)


@pytest.mark.parametrize("make", [
    lambda: Variant(patience=-1),
    lambda: parse_ablate("0"),
    lambda: parse_ablate("150%"),
    lambda: Variant(ablate_layers=("middle",)),
    lambda: Variant(optimizer_state="keep"),
    lambda: Variant(ablate_schedule="cosine"),
    lambda: Variant(schedule=(("dropout", 50), ("hidden", 40))).check(ARCH, "dropout", 100),
    lambda: Variant(ablate_layers=("7",)).check(ARCH, "hidden"),
    lambda: Variant(ablate=2).check(ARCH, "none"),
    lambda: Variant(fixed="no"),  # type: ignore[arg-type]
    lambda: Variant.from_settings({"fixed": "false"}),
    lambda: Variant.from_settings({"schedule": [1, 2]}),
    lambda: Variant.from_settings({"ablate_schedule": 3}),
])
def test_bad_settings_are_config_errors(make):
    with pytest.raises(ConfigError):
        make()


def test_a_design_files_one_and_zero_are_true_and_false():
    assert Variant.from_settings({"fixed": 1}) == Variant(fixed=True)
    assert Variant.from_settings({"fixed": 0}).is_default
    assert Variant.from_settings({"schedule": [["dropout", 2], ["hidden", 2]]}).schedule == (("dropout", 2),
                                                                                          ("hidden", 2))
