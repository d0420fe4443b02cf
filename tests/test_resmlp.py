"""ResMLP (`--model resmlp`): the module, the engine against the plain oracle, the ablations,
the research knobs, checkpoints, and the flags and design field that select it."""

from __future__ import annotations

import json
import sqlite3

import pytest
import torch
from safetensors.torch import load_file

from psa.core.ablation import choose_neuron
from psa.core.arch import parse_arch
from psa.core.device import Execution
from psa.core.mlp.engine import Engine
from psa.core.errors import ConfigError
from psa.core.hparams import HParams
from psa.core.mlp.memory import stack_fits_kernel
from psa.core.model import ResMLP, check_model_name, layer_table, linear_keys, linear_shapes, param_count
from psa.core.member import MODES
from psa.core.mlp.population import Population
from psa.study.design import StudyDesign, preset

from . import oracle
from .conftest import ENGINE_HP as CFG
from .conftest import one_line_error, run_main, subset
from .tolerance import assert_apart, assert_close, epoch_steps, net_widths, pass_bound, training_bound

HOMOGENEOUS = parse_arch("[3*12]")
HETEROGENEOUS = parse_arch("[2*12, 1*8]")  # a transition Linear 12 -> 8 between the stacks


def res_population(arch, ds, specs, hp=CFG):
    members = [hp.member(mode, seed) for mode, seed in specs]
    return Population.create(arch, members, "cpu", n_val=ds.val_y.numel(), model="resmlp")


def run_loops(pop, ds, loops, hp=CFG):
    eng = Engine(pop, ds, hp)
    return eng, [eng.meta_loop() for _ in range(loops)]


def max_diff(a, b):
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def trained(arch, ds, loops: int, hp=CFG):
    return training_bound(loops * epoch_steps(ds.train_x.shape[0], hp.batch_size), net_widths(arch, "resmlp"), hp.batch_size)


def check_against_oracle(pop, ds, results, arch, hp=CFG):
    tol = trained(arch, ds, len(results), hp)
    for j, mem in enumerate(pop.members):
        ref = oracle.run(arch, ds, mem.seed, mem.mode, len(results), hp, model_name="resmlp")
        assert_close(f"{mem.mode} {mem.seed} LKG", pop.member_state_dict(j), ref.lkg, tol)
        assert [r.promoted[j] for r in results] == ref.promoted, mem
        ours = [round(r.candidate_acc[j] * ds.val_y.numel() / 100) for r in results]
        assert all(abs(a - b) <= 1 for a, b in zip(ours, ref.accs)), (mem, ours, ref.accs)


# ------------------------------------------------------------------------------------------
# the module


def test_parameter_counts_of_the_issue():
    assert param_count(parse_arch("1*2048"), "resmlp") == 10_020_874
    assert param_count(parse_arch("18*18"), "resmlp") == 26_632
    for a in ("1*2048", "18*18", "[2*12, 1*8]", "[1*784]", "[]"):
        arch = parse_arch(a)
        with torch.device("meta"):
            n = sum(p.numel() for p in ResMLP(arch).parameters())
        assert n == param_count(arch, "resmlp") == sum(r[3] for r in layer_table(arch, "resmlp"))


def test_structure_matches_the_harness():
    # input projection, D blocks of two Linears, a transition where the width changes, the head
    assert linear_shapes(HETEROGENEOUS, "resmlp") == [(12, 784), (12, 12), (12, 12), (12, 12), (12, 12),
                                                      (8, 12), (8, 8), (8, 8), (10, 8)]
    # consecutive blocks of one width are one stack: no transition between them
    assert linear_shapes(parse_arch("[1*12, 2*12]"), "resmlp") == linear_shapes(HOMOGENEOUS, "resmlp")
    # a first stack as wide as the input needs no projection (the harness adds none)
    assert linear_shapes(parse_arch("[1*784]"), "resmlp") == [(784, 784), (784, 784), (10, 784)]
    # the ReLU comes after the sum: a block whose branch is zero is ReLU(x)
    net = ResMLP(parse_arch("[1*4]"))
    block = net.net[3]
    with torch.no_grad():
        block.fc2.weight.zero_()
        block.fc2.bias.zero_()
    x = torch.randn(5, 4)
    assert torch.equal(block(x), torch.relu(x))


def test_model_name_is_checked_in_one_place():
    assert check_model_name("resmlp") == "resmlp"
    with pytest.raises(ConfigError, match="unknown model 'mlp'"):
        check_model_name("mlp")


def test_init_is_pytorch_default_of_the_module(small):
    pop = res_population(HETEROGENEOUS, small, [("none", 4), ("hidden", 5)])
    for j, seed in ((0, 4), (1, 5)):
        torch.manual_seed(seed)
        ref = ResMLP(HETEROGENEOUS).state_dict()
        got = pop.member_state_dict(j)
        assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)


# ------------------------------------------------------------------------------------------
# the engine against the oracle


@pytest.mark.numeric
def test_one_step_gradients_are_autograds(small):
    """The hand-written backward of one step, every mode, dropout in the blocks of every member
    (block dropout `always`) and in the projections of the dropout member: autograd's
    gradients of the plain module with the same masks, to float32 rounding."""
    import torch.nn.functional as F

    hp = HParams(lr=1e-4, dropout=0.3, batch_size=32, block_dropout="always")
    pop = res_population(HETEROGENEOUS, small, [(m, 5) for m in MODES], hp)
    eng = Engine(pop, small, hp)
    ch = eng._chunk(0, pop.size)
    ch.begin(eng.population, 2, [], eng.step, eng.use_graphs)
    g, k = ch.groups
    idx = ch.order[:, :32]
    x = small.train_x[idx]
    y = small.train_y[idx].repeat_interleave(k, dim=0)
    loss = eng.step.forward_backward(ch, x, y)
    for j, mem in enumerate(pop.members):
        net = oracle.PlainResMLP(HETEROGENEOUS)
        net.load_state_dict(pop.member_state_dict(j))
        noise = oracle.dropout_mask(mem.seed, 2, 0, 32, net.units, mem.dropout) if mem.dropout else None
        block = oracle.dropout_mask(mem.seed, 2, 0, 32, net.units, hp.block_dropout_rate(mem))
        ref = F.cross_entropy(net(x[j // k], noise, block), y[j])
        ref.backward()
        tol = pass_bound(net_widths(HETEROGENEOUS, "resmlp"), 32)
        assert_close(f"{mem.mode} loss", loss[j], ref.detach(), tol)
        for i, (lin, (gw, gb)) in enumerate(zip(net.linears(), ch.grad_views)):
            assert_close(f"{mem.mode} Linear {i}", {"weight": gw[j], "bias": gb[j]},
                         {"weight": lin.weight.grad, "bias": lin.bias.grad}, tol)


@pytest.fixture(scope="module")
def res_paired_run(small):
    """All six modes x two seeds (a grouped first layer), 2 meta-loops (the second ablates) on
    1,024 images."""
    data = subset(small, 1024, n_val=1000)
    pop = res_population(HOMOGENEOUS, data, [(m, s) for s in (11, 12) for m in MODES])
    eng, results = run_loops(pop, data, 2)
    return pop, eng, results, data


def test_every_mode_reproduces_the_oracle(res_paired_run):
    pop, eng, results, data = res_paired_run
    assert eng.groups == (2, 6) and not eng.paths.triton_stack
    check_against_oracle(pop, data, results, HOMOGENEOUS)


def test_heterogeneous_resmlp_with_a_last_partial_batch_reproduces_the_oracle(small):
    data = subset(small, 520, n_val=1000)  # 16 batches of 32 and a last one of 8
    assert data.train_x.shape[0] % CFG.batch_size == 8
    pop = res_population(HETEROGENEOUS, data, [(m, s) for s in (21, 22) for m in MODES])
    _, results = run_loops(pop, data, 2)
    check_against_oracle(pop, data, results, HETEROGENEOUS)


def test_a_first_block_as_wide_as_the_input_reproduces_the_oracle(small):
    arch = parse_arch("[1*784]")
    data = subset(small, 256, n_val=500)
    pop = res_population(arch, data, [("hidden", 3), ("dropout", 3)])
    eng, results = run_loops(pop, data, 2)
    assert eng.groups == (2, 1)  # the skip of the first block is the gathered input itself
    check_against_oracle(pop, data, results, arch)


def test_research_knobs_reproduce_the_oracle(small):
    """--block-dropout always and --base-weight-decay 0.01: the authors' first ResMLP runs."""
    hp = HParams(lr=1e-4, weight_decay=0.05, dropout=0.3, batch_size=32, block_dropout="always",
                 base_weight_decay=0.01)
    data = subset(small, 520, n_val=1000)
    pop = res_population(HETEROGENEOUS, data, [(m, 31) for m in ("none", "decay", "dropout", "hidden")], hp)
    assert [m.weight_decay for m in pop.members] == [0.01, 0.05, 0.01, 0.01]
    _, results = run_loops(pop, data, 2, hp)
    check_against_oracle(pop, data, results, HETEROGENEOUS, hp)
    # and the knobs change the result: the same members without them train otherwise
    plain = res_population(HETEROGENEOUS, data, [(m, 31) for m in ("none", "decay", "dropout", "hidden")])
    run_loops(plain, data, 2)
    assert_apart("without the knobs", plain.member_state_dict(0), pop.member_state_dict(0),
                 trained(HETEROGENEOUS, data, 2, hp))


def test_block_dropout_always_drops_in_the_blocks_only(small):
    hp = HParams(dropout=0.3, batch_size=32, block_dropout="always")
    pop = res_population(HETEROGENEOUS, small, [("none", 1), ("dropout", 1)], hp)
    eng = Engine(pop, small, hp)
    ch = eng._chunk(0, pop.size)
    assert ch.dropout and ch.block_noise and ch.drop_rows.tolist() == [0, 1]
    from psa.core import rng

    ch.drop_keys.copy_(torch.tensor([rng.loop_keys(m.seed, "dropout", 2) for m in pop.members]))
    keys = rng.step_keys(ch.drop_keys, torch.tensor(0))
    proj, block = eng.step.noise(ch, keys, 32), eng.step.noise(ch, keys, 32, block=True)
    none = 0 if pop.members[0].mode == "none" else 1
    assert torch.equal(proj[none], torch.ones_like(proj[none]))  # no projection dropout outside dropout mode
    assert abs((block[none] > 0).float().mean().item() - 0.7) < 0.03  # the blocks drop in every mode
    assert torch.equal(proj[1 - none], block[1 - none])  # dropout mode: one rate, one mask


def test_resmlp_never_takes_the_triton_stack_kernel():
    ex = Execution(torch.device("cpu"), triton=True, stack_max_width=64)
    assert stack_fits_kernel(HOMOGENEOUS, ex)
    assert not stack_fits_kernel(HOMOGENEOUS, ex, "resmlp")


def test_evaluation_is_the_plain_module_in_eval_mode(res_paired_run, small):
    pop, eng, _, _ = res_paired_run
    correct = eng.count_correct(pop.lkg, small.val_x, small.val_y).tolist()
    for j in range(pop.size):
        net = ResMLP(HOMOGENEOUS, dropout=0.3)
        net.load_state_dict(pop.member_state_dict(j))
        net.eval()
        with torch.no_grad():
            assert int((net(small.val_x).argmax(1) == small.val_y).sum()) == correct[j]


# ------------------------------------------------------------------------------------------
# ablations


def test_ablation_choices_follow_compute_order():
    shapes = linear_shapes(HETEROGENEOUS, "resmlp")
    n = len(shapes)
    seen = {"full": set(), "hidden": set(), "output": set()}
    for loop in range(2, 400):
        for mode in seen:
            layer, neuron = choose_neuron(HETEROGENEOUS, mode, 9, loop, "resmlp")
            assert 0 <= neuron < shapes[layer][0]
            seen[mode].add(layer)
    assert seen["full"] == set(range(n))  # input projection, both Linears of each block, transition, head
    assert seen["hidden"] == set(range(1, n - 1))  # all but the input projection and the head
    assert seen["output"] == {n - 1}
    assert choose_neuron(HETEROGENEOUS, "hidden", 9, 1, "resmlp") is None


def test_hidden_ablation_of_a_block_output_keeps_the_skip(small):
    """Ablating neuron c of a block's second Linear zeroes its row, its bias and column c of the
    next Linear; the channel still flows through the skip to the block after."""
    from psa.core.mlp.population import ablate

    pop = res_population(HOMOGENEOUS, small, [("hidden", 1)])
    flat = pop.lkg.clone()
    ablate(flat, pop.layout, [(0, "hidden", 2, 5)])  # block 1's fc2, channel 5
    views = pop.layout.views(flat)
    assert torch.all(views[2][0][0, 5] == 0) and views[2][1][0, 5] == 0
    assert torch.all(views[3][0][0, :, 5] == 0)  # block 2's fc1 no longer reads it
    assert torch.count_nonzero(views[4][0][0]) == 12 * 12  # block 2's fc2 untouched


# ------------------------------------------------------------------------------------------
# checkpoints, designs, flags


def test_member_state_dict_uses_the_modules_keys(res_paired_run):
    pop, _, _, _ = res_paired_run
    sd = pop.member_state_dict(3)
    assert list(sd) == [k for pair in linear_keys(HOMOGENEOUS, "resmlp") for k in pair]
    ResMLP(HOMOGENEOUS).load_state_dict(sd)  # strict: every key, every shape
    other = Population.create(HOMOGENEOUS, [CFG.member("none", 99)], "cpu", n_val=pop.n_val, model="resmlp")
    other.load_member_state_dict(0, sd)
    assert max_diff(other.member_state_dict(0), sd) == 0.0
    simple = Population.create(HOMOGENEOUS, [CFG.member("none", 1)], "cpu", n_val=1)
    with pytest.raises(ConfigError, match="do not match"):
        simple.load_member_state_dict(0, sd)


def test_design_default_model_keeps_digests():
    d = StudyDesign(nets=("1*8",))
    assert "model" not in d.to_dict() and "block_dropout" not in d.to_dict()
    r = StudyDesign(nets=("1*8",), model="resmlp")
    assert r.to_dict()["model"] == "resmlp" and r.digest() != d.digest()
    assert preset("resmlp").model == "resmlp"
    assert preset("resmlp").nets == preset("paper").nets
    with pytest.raises(ConfigError, match="unknown model"):
        StudyDesign(nets=("1*8",), model="mlp")
    with pytest.raises(ConfigError, match="resmlp only"):
        StudyDesign.from_fields(architectures=("1*8",), block_dropout="always")


def test_arch_command_prints_resmlp_counts():
    rc, out, _ = run_main(["arch", "--model", "resmlp", "1*2048", "--json"])
    assert rc == 0
    info = json.loads(out)
    assert info["model"] == "resmlp" and info["params"] == 10_020_874
    assert [x["name"] for x in info["layers"]] == ["input", "block 1 fc1", "block 1 fc2", "output"]
    rc, out, _ = run_main(["arch", "--model", "resmlp", "18*18"])
    assert rc == 0 and "26,632" in out
    rc, _, err = run_main(["arch", "--model", "mlp", "1*8"])
    assert rc == 2 and "unknown model" in err


def test_train_resmlp_checkpoint_loads_into_the_module(tmp_path, mnist):
    out = tmp_path / "r"
    rc, text, err = run_main(["train", "--arch", "[1*12, 1*8]", "--model", "resmlp", "--mode", "hidden",
                              "--meta-loops", "2", "--batch-size", "1024", "--out", str(out), "--json"])
    assert rc == 0, err
    s = json.loads(text)
    assert s["model"] == "resmlp" and s["params"] == param_count(parse_arch("[1*12, 1*8]"), "resmlp")
    net = ResMLP(parse_arch("[1*12, 1*8]"))
    net.load_state_dict(load_file(str(out / "lkg.safetensors")))
    net.eval()
    with torch.no_grad():
        acc = 100.0 * int((net(mnist.test_x).argmax(1) == mnist.test_y).sum()) / mnist.test_y.numel()
    assert acc == pytest.approx(s["test_acc"], abs=1e-9)
    rc, _, err = run_main(["train", "--resume", str(out), "--model", "simplemlp", "--meta-loops", "1"])
    assert rc != 0 and "is a resmlp" in err
    rc, text, err = run_main(["train", "--resume", str(out), "--meta-loops", "1", "--batch-size", "1024", "--json"])
    assert rc == 0, err
    assert json.loads(text)["loop"] == 3


def test_block_dropout_needs_resmlp(tmp_path):
    rc, _, err = run_main(["train", "--arch", "1*8", "--block-dropout", "always", "--out", str(tmp_path / "x")])
    assert rc == 2 and "resmlp only" in err


def test_study_records_the_model(tmp_path):
    db = tmp_path / "s.sqlite"
    rc, _, err = run_main(["study", "--arch", "2*6", "--model", "resmlp", "--modes", "none,output", "--trials", "1",
                           "--meta-loops", "2", "--train-subset", "512", "--db", str(db), "--quiet"])
    assert rc == 0, err
    con = sqlite3.connect(db)
    assert con.execute("SELECT DISTINCT model FROM trials").fetchall() == [("resmlp",)]
    design = json.loads(con.execute("SELECT design FROM studies").fetchone()[0])
    assert design["model"] == "resmlp"
    # the published trials are SimpleMLPs of the same names: psa compare refuses, psa report runs
    for ref in ("published", "seed"):
        rc, _, err = run_main(["compare", "--db", str(db), "--reference", ref, "--out", str(tmp_path / ref)])
        assert rc == 2 and "only simplemlp studies can be compared" in one_line_error(err), err
        assert not (tmp_path / ref).exists()


def test_a_database_from_before_the_model_column_is_migrated(tmp_path):
    from psa.study import store

    db = tmp_path / "old.sqlite"
    con = sqlite3.connect(db)
    con.executescript(store.SCHEMA.replace("    model TEXT NOT NULL DEFAULT 'simplemlp',\n", ""))
    con.execute("INSERT INTO studies (name, design, design_hash) VALUES ('s', '{}', 'x')")
    con.execute("INSERT INTO trials (study_id, arch, mode, trial, seed, meta_loops, lr, batch_size, weight_decay, "
                "dropout, dataset, status) VALUES (1, '1*8', 'none', 1, 0, 1, 1e-4, 256, 0, 0, 'mnist', 'pending')")
    con.commit()
    con.close()
    assert not store.has_model_column(store.connect(db, readonly=True))
    con = store.connect(db)
    assert [tuple(r) for r in con.execute("SELECT model FROM trials")] == [("simplemlp",)]


def test_engine_variants_are_refused_for_resmlp_in_one_line(tmp_path) -> None:
    """The variants' ablation draws count a SimpleMLP's layers: a ResMLP run or study asking for
    one is refused before anything is written, not trained with the wrong draws."""
    from psa.core.variant import Variant
    from psa.study.design import DesignError, StudyDesign

    from .conftest import one_line_error, run_main

    with pytest.raises(DesignError, match="engine variants are not available for model resmlp"):
        StudyDesign(nets=("2*8",), modes=("hidden",), model="resmlp",
                    variants=(("patience2", Variant(patience=2)),))
    code, _, err = run_main(["train", "--arch", "2*8", "--model", "resmlp", "--mode", "hidden", "--patience", "2",
                             "--out", "r"], cwd=tmp_path)
    assert code == 2 and "engine variants are not available for --model resmlp" in one_line_error(err)
    assert list(tmp_path.iterdir()) == []
