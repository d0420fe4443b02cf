"""Engine semantics against the plain one-model oracle, and population invariance."""

from __future__ import annotations

import math

import pytest
import torch

from psa.core.arch import parse_arch
from psa.core.device import Execution
from psa.core.mlp.engine import Engine
from psa.core.errors import ConfigError
from psa.core.hparams import HParams
from psa.core.model import SimpleMLP
from psa.core.member import MODES

from . import oracle
from .conftest import ENGINE_HP as CFG
from .conftest import population, subset
from .tolerance import Bound, assert_apart, assert_close, epoch_steps, training_bound

ARCH = parse_arch("[2*24, 1*16]")
LOOPS = 4  # 4 x 64 steps


def run_loops(pop, ds, loops, hp=CFG):
    eng = Engine(pop, ds, hp)
    return eng, [eng.meta_loop() for _ in range(loops)]


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def trained(loops: int, n: int, arch=ARCH, hp=CFG) -> Bound:
    """The rounding a member may carry after `loops` epochs of `n` images (tests/tolerance.py)."""
    return training_bound(loops * epoch_steps(n, hp.batch_size), arch.widths, hp.batch_size)


@pytest.fixture(scope="module")
def paired_run(small):
    """All six modes x two seeds as one population (grouped first layer), LOOPS meta-loops."""
    pop = population(ARCH, small, [(m, s) for s in (11, 12) for m in MODES])
    eng, results = run_loops(pop, small, LOOPS)
    return pop, eng, results


# numeric (CI's second run): two modes of 256 steps, an ablative one and one with dropout
@pytest.mark.parametrize("mode", [pytest.param(m, marks=pytest.mark.numeric) if m in ("dropout", "hidden") else m
                                  for m in MODES])
def test_member_reproduces_oracle(paired_run, small, mode):
    pop, _, results = paired_run
    assert pop.groups() == (2, 6)
    for seed in (11, 12):
        j = next(i for i, m in enumerate(pop.members) if m.mode == mode and m.seed == seed)
        ref = oracle.run(ARCH, small, seed, mode, LOOPS, CFG)
        assert_close(f"{mode} {seed} LKG", pop.member_state_dict(j), ref.lkg, trained(LOOPS, 2048))
        assert [r.promoted[j] for r in results] == ref.promoted
        ours = [round(r.candidate_acc[j] * small.val_y.numel() / 100) for r in results]
        assert all(abs(a - b) <= 1 for a, b in zip(ours, ref.accs)), (ours, ref.accs)


@pytest.mark.parametrize("mode", MODES)
def test_member_reproduces_oracle_with_a_last_partial_batch(small, mode):
    """2,000 images in batches of 32: 62 full batches and a last one of 16 (the paper's epoch
    ends on a batch of 80), every mode, against the oracle over 3 meta-loops."""
    data = subset(small, 2000)
    assert data.train_x.shape[0] % CFG.batch_size == 16
    pop = population(ARCH, data, [(mode, 21), (mode, 22)])
    _, results = run_loops(pop, data, 3)
    for j, mem in enumerate(pop.members):
        ref = oracle.run(ARCH, data, mem.seed, mem.mode, 3, CFG)
        assert_close(f"{mem.mode} {mem.seed} LKG", pop.member_state_dict(j), ref.lkg, trained(3, 2000))
        assert [r.promoted[j] for r in results] == ref.promoted


def test_wide_first_layer_gathers_per_member_and_still_matches(small):
    arch = parse_arch("[1*400]")  # 2 * 400 > 784: no shared first-layer matmul
    pop = population(arch, small, [(m, s) for s in (1, 2) for m in ("hidden", "dropout")])
    eng, _ = run_loops(pop, small, 2)
    assert pop.groups() == (2, 2) and eng.groups == (4, 1)
    for j, mem in enumerate(pop.members):
        ref = oracle.run(arch, small, mem.seed, mem.mode, 2, CFG)
        assert_close(f"{mem.mode} {mem.seed} LKG", pop.member_state_dict(j), ref.lkg, trained(2, 2048, arch))


def test_validation_blocks_do_not_change_counts(paired_run, small):
    pop, eng, _ = paired_run
    whole = eng.count_correct(pop.lkg, small.val_x, small.val_y)
    # a tiny budget forces one member at a time and a few hundred rows per GEMM
    tiny = Engine(pop, small, CFG, Execution(pop.device, eval_bytes=8 * 24 * 300))
    assert torch.equal(tiny.count_correct(pop.lkg, small.val_x, small.val_y), whole)


def test_no_ablation_in_loop_1_and_every_later_loop_ablates(paired_run):
    pop, _, results = paired_run
    assert all(a is None for a in results[0].ablated)
    for r in results[1:]:
        for mem, a in zip(pop.members, r.ablated):
            assert (a is not None) == mem.ablative


def test_first_loop_always_promoted_and_score_is_best(paired_run):
    pop, _, results = paired_run
    assert all(results[0].promoted)
    for j in range(pop.size):
        accs = [r.candidate_acc[j] for r in results]
        assert pop.lkg_score()[j] == pytest.approx(max(accs))
        last = max(i for i, r in enumerate(results) if r.promoted[j])
        assert pop.bounty_loop[j] == last + 1


def test_strict_promotion(small):
    specs = [("none", 3)]
    first = population(ARCH, small, specs)
    r = run_loops(first, small, 1)[1][0]
    correct = int(first.lkg_correct[0])
    assert r.promoted[0]
    for offset, expect in ((0, False), (-1, True), (1, False)):
        pop = population(ARCH, small, specs)
        pop.lkg_correct.fill_(correct + offset)
        r2 = run_loops(pop, small, 1)[1][0]
        assert round(r2.candidate_acc[0] * small.val_y.numel() / 100) == correct
        assert r2.promoted[0] is expect
        assert int(pop.lkg_correct[0]) == (correct if expect else correct + offset)


def test_optimizer_is_reset_every_loop(paired_run, small):
    pop, _, _ = paired_run
    j = next(i for i, m in enumerate(pop.members) if m.mode == "none" and m.seed == 11)
    reset = oracle.run(ARCH, small, 11, "none", LOOPS, CFG)
    kept = oracle.run(ARCH, small, 11, "none", LOOPS, CFG, persistent_optimizer=True)
    assert_close("LKG against a reset optimizer", pop.member_state_dict(j), reset.lkg, trained(LOOPS, 2048))
    assert_apart("LKG against a kept optimizer", pop.member_state_dict(j), kept.lkg, trained(LOOPS, 2048))


def test_weight_decay_exactly_zero_outside_decay(paired_run, small):
    for mode in MODES:
        m = HParams().member(mode, 0)
        assert m.weight_decay == (1e-4 if mode == "decay" else 0.0)
        assert m.dropout == (0.1 if mode == "dropout" else 0.0)
    pop, _, _ = paired_run
    j = next(i for i, m in enumerate(pop.members) if m.mode == "none" and m.seed == 12)
    # PyTorch's AdamW defaults to weight_decay=0.01: a harness that forgets to pass 0 differs
    default_wd = oracle.run(ARCH, small, 12, "none", LOOPS, CFG, adamw_weight_decay=0.01)
    assert_apart("none against AdamW's default decay", pop.member_state_dict(j), default_wd.lkg, trained(LOOPS, 2048))
    k = next(i for i, m in enumerate(pop.members) if m.mode == "decay" and m.seed == 12)
    assert_apart("none against decay", pop.member_state_dict(j), pop.member_state_dict(k), trained(LOOPS, 2048))


def test_paper_decay_rate_is_below_float32_resolution(small):
    """lr = wd = 1e-4: AdamW multiplies by 1 - 1e-8, which is 1.0 in float32. Same for us."""
    cfg = HParams(batch_size=32)
    pop = population(ARCH, small, [("none", 5), ("decay", 5)], cfg)
    eng, _ = run_loops(pop, small, 1, cfg)
    assert eng._chunk(0, pop.size).decay is None
    # no decay step at all, so the two members run the same arithmetic: only where their
    # elements fall in AdamW's vectorised loop differs (test_member_is_independent_of_its_population)
    tol = trained(1, 2048, hp=cfg)
    assert_close("decay against none", pop.member_state_dict(1), pop.member_state_dict(0), tol)
    ref = oracle.run(ARCH, small, 5, "decay", 1, cfg)
    assert_close("decay LKG", pop.member_state_dict(1), ref.lkg, tol)


def test_dropout_only_in_dropout_mode_and_only_while_training(paired_run, small):
    pop, eng, _ = paired_run
    drop = [m.mode == "dropout" for m in pop.members]
    assert [m.dropout > 0 for m in pop.members] == drop
    # evaluation applies no dropout: plain SimpleMLP in eval mode (Dropout(p) present) agrees
    correct = eng.count_correct(pop.lkg, small.val_x, small.val_y).tolist()
    for j, mem in enumerate(pop.members):
        model = SimpleMLP(ARCH, dropout=0.3)
        model.load_state_dict(pop.member_state_dict(j))
        model.eval()
        with torch.no_grad():
            assert int((model(small.val_x).argmax(1) == small.val_y).sum()) == correct[j]
    # training noise keeps about 1 - p of the units, scaled by 1 / (1 - p), for dropout members only
    from psa.core import rng

    ch = eng._chunk(0, pop.size)
    assert ch.dropout and ch.drop_rows.tolist() == [j for j, d in enumerate(drop) if d]
    ch.drop_keys.copy_(torch.tensor([rng.loop_keys(m.seed, "dropout", 7) for m in pop.members]))
    noise = eng.step.noise(ch, rng.step_keys(ch.drop_keys, torch.tensor(3)), 32)
    assert noise.shape == (sum(drop), 32, sum(ARCH.hidden))
    assert abs((noise > 0).float().mean().item() - 0.7) < 0.02
    values = noise.unique().tolist()
    assert len(values) == 2 and values[0] == 0.0 and values[1] == pytest.approx(1 / 0.7)
    # the two dropout members of different seeds draw different masks
    assert not torch.equal(noise[0], noise[1])


def test_member_is_independent_of_its_population(small):
    """A member's trajectory does not depend on who else trains beside it, to rounding.

    Not bitwise: the batched matmuls and reductions give every member identical bits (checked
    below), but AdamW runs elementwise over the one flat buffer, and where a member's elements
    fall relative to the vectorised body, the scalar tail and the thread chunks moves with
    the population size; the two paths round differently (fused multiply-add), by an ulp, and
    the training carries that ulp on (tests/tolerance.py's bound for a training run).
    """
    target = ("hidden", 21)
    alone = population(ARCH, small, [target])
    crowd = population(ARCH, small, [(m, s) for s in (20, 21, 22) for m in MODES])
    uneven = population(ARCH, small, [target, ("none", 21), ("output", 30)])
    run_loops(alone, small, LOOPS)
    run_loops(crowd, small, LOOPS)
    run_loops(uneven, small, LOOPS)
    assert crowd.groups() == (3, 6) and uneven.groups() == (3, 1)
    a = alone.member_state_dict(0)
    for pop in (crowd, uneven):
        j = next(i for i, m in enumerate(pop.members) if (m.mode, m.seed) == target)
        b = pop.member_state_dict(j)
        assert_close(f"beside {pop.size - 1} others", b, a, trained(LOOPS, 2048))
        assert int(pop.lkg_correct[j]) == int(alone.lkg_correct[0])


def test_batched_kernels_are_bitwise_per_member():
    """The population's matmuls and reductions give identical members identical bits."""
    torch.manual_seed(0)
    m, b, o, i = 12, 32, 16, 24
    x = torch.randn(1, b, i).expand(m, b, i).contiguous()
    w = torch.randn(1, o, i).expand(m, o, i).contiguous()
    dz = torch.randn(1, b, o).expand(m, b, o).contiguous()
    for out in (torch.baddbmm(torch.zeros(m, 1, o), x, w.transpose(1, 2)), torch.bmm(dz.transpose(1, 2), x),
                torch.bmm(dz, w), dz.sum(1), torch.logsumexp(dz, 2)):
        assert all(torch.equal(out[0], out[j]) for j in range(m))


def test_diverged_member_is_discarded_under_diverged_discard(small):
    """diverged="discard" (psa's rule before the harness's): never promoted, accuracy missing,
    and the other members untouched."""
    specs = [("none", 1), ("full", 1), ("dropout", 2)]
    hp = CFG.updated(diverged="discard")
    clean = population(ARCH, small, specs, hp)
    poisoned = population(ARCH, small, specs, hp)
    j = next(i for i, m in enumerate(poisoned.members) if m.mode == "full")
    with torch.no_grad():
        for w, b in poisoned.layout.views(poisoned.lkg):
            w[j] *= 1e30
    _, rc = run_loops(clean, small, 2, hp)
    _, rp = run_loops(poisoned, small, 2, hp)
    for r in rp:
        assert r.diverged[j] and not r.promoted[j] and math.isnan(r.candidate_acc[j])
    assert int(poisoned.lkg_correct[j]) == -1
    others = [i for i in range(len(specs)) if i != j]
    for i in others:
        assert not any(r.diverged[i] for r in rp)
        assert [r.candidate_acc[i] for r in rp] == [r.candidate_acc[i] for r in rc]
        assert max_diff(clean.member_state_dict(i), poisoned.member_state_dict(i)) == 0.0


# lr = 1e10 sends the loss to inf and the weights to NaN within the first epoch (lr = 1e6 does not)
DIVERGING = CFG.updated(lr=1e10)


@pytest.mark.parametrize("mode", ["none", "hidden"])
def test_diverged_candidate_is_scored_as_the_harness_scores_it(small, mode):
    """The default rule: a diverged candidate's NaN logits predict class 0 (argmax takes NaN as
    the largest value and returns the first), so it scores the share of zeros in the validation
    set, is promoted over the LKG's -1 in loop 1, and never again (its equal score is not
    strictly higher). The plain oracle, which has no notion of divergence, agrees loop by loop."""
    data = subset(small, 512)
    pop = population(ARCH, data, [(mode, 3)], DIVERGING)
    _, results = run_loops(pop, data, 3, DIVERGING)
    zeros = int((data.val_y == 0).sum())
    assert [r.diverged[0] for r in results] == [True] * 3
    assert [r.promoted[0] for r in results] == [True, False, False]
    assert [r.candidate_acc[0] for r in results] == [100.0 * zeros / data.val_y.numel()] * 3
    assert int(pop.lkg_correct[0]) == zeros
    ref = oracle.run(ARCH, data, 3, mode, 3, DIVERGING)
    assert ref.accs == [zeros] * 3 and ref.promoted == [r.promoted[0] for r in results]


def test_diverged_candidate_under_discard_leaves_the_trial_without_a_bounty(small):
    data = subset(small, 512)
    hp = DIVERGING.updated(diverged="discard")
    pop = population(ARCH, data, [("none", 3)], hp)
    _, results = run_loops(pop, data, 3, hp)
    assert all(r.diverged[0] and not r.promoted[0] and math.isnan(r.candidate_acc[0]) for r in results)
    assert pop.lkg_score() == [-1]


def test_diverged_setting_is_checked():
    with pytest.raises(ConfigError, match="diverged must be one of score, discard"):
        HParams(diverged="skip")


def test_same_population_twice_is_identical(small):
    specs = [(m, s) for s in (4, 5) for m in MODES]
    p1, p2 = population(ARCH, small, specs), population(ARCH, small, specs)
    _, r1 = run_loops(p1, small, 2)
    _, r2 = run_loops(p2, small, 2)
    strip = lambda rs: [(r.candidate_acc, r.promoted, r.ablated, r.lkg_score, r.train_loss) for r in rs]
    assert strip(r1) == strip(r2)
    assert torch.equal(p1.lkg, p2.lkg)


def test_hidden_mode_needs_a_hidden_layer(small):
    from psa.core.errors import ConfigError

    with pytest.raises(ConfigError, match="hidden"):
        population(parse_arch("[]"), small, [("hidden", 0)])
    pop = population(parse_arch("[]"), small, [("full", 0), ("output", 0), ("dropout", 0)])
    _, rs = run_loops(pop, small, 2)
    assert rs[1].ablated[0][0] == 0 and rs[1].ablated[1][0] == 0


def test_graph_segments_cut_an_epoch_into_runs_of_steps() -> None:
    from psa.core.mlp.chunk import graph_segments

    epoch = [256] * 195 + [80]  # the paper's 50,000 images
    assert graph_segments(epoch, 1) == [(b,) for b in epoch]
    assert graph_segments(epoch, 14) == [(256,) * 14] * 13 + [(256,) * 13 + (80,)]
    assert graph_segments(epoch, 500) == [tuple(epoch)]
    assert graph_segments(epoch, 0) == graph_segments(epoch, 1)
    for k in (1, 7, 14, 196):
        assert [b for seg in graph_segments(epoch, k) for b in seg] == epoch
    with pytest.raises(ConfigError, match="graph_steps"):
        Execution(torch.device("cpu"), graph_steps=0)


@pytest.mark.parametrize("k", [1, 3, 64])
def test_an_epoch_replayed_in_runs_of_steps_is_the_eager_epoch(small, k):
    """A chunk's epoch replayed from graphs of k consecutive steps (stand-ins here, which run the
    steps they were recorded with, as a CUDA graph replays its kernels) ends with the eager
    epoch's weights, losses and step counter bit for bit, and reports its steps as it goes."""
    from psa.core.mlp.chunk import graph_segments

    class Recorded:
        def __init__(self, ch, step, sizes):
            self.run = lambda: [step(ch, b) for b in sizes]

        def replay(self):
            self.run()

    hp = CFG
    specs = [(m, s) for s in (1, 2) for m in MODES]
    outcomes = []
    for replayed in (False, True):
        pop = population(parse_arch("[2*12]"), small, specs, hp)
        eng = Engine(pop, small, hp)
        ch = eng._chunk(0, pop.size)
        ch.begin(pop, 2, [(0, "full", 0, 3)], eng.step, 0)
        seen = []
        if replayed:
            ch.segments = graph_segments(ch.batch_sizes(), k)
            ch.graphs = {seg: Recorded(ch, eng.step, seg) for seg in ch.segments}
        ch.train_epoch(eng.step, lambda s, n: seen.append((s, n)))
        outcomes.append((ch.cand.clone(), ch.loss_sum.clone(), int(ch.step), seen))
    (w0, l0, s0, seen0), (w1, l1, s1, seen1) = outcomes
    n = len(ch.batch_sizes())
    assert torch.equal(w0, w1) and torch.equal(l0, l1) and s0 == s1 == n
    assert seen0 == [(s, n) for s in range(1, n + 1)]
    assert seen1 == [(min(s, n), n) for s in range(k, n + k, k)]
