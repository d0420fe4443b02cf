"""The CPU hidden stack (psa.core.kernels.cpu_stack.cpp: one forward, stack_forward_saved, and one
backward, stack_backward_rows) through the two calls that run it, train_step and count_correct,
against the engine's plain torch path; and the library itself: where the engine takes it, its
build's cache key, the fallback when it cannot be built.

tests/test_cpu_step.py compares the step with the torch path on the study's shapes (batches of
32: one 64-row block; depths up to 7). Here the stack goes where that does not reach: every width
1-8 at depth 2 and 12 with units kept alive (middle layers near the identity, so that values and
gradients cross every layer), batches of 150 rows (two whole 64-row blocks and a partial one:
the dropout hash indexed by row across blocks) and a last partial batch, gradient and loss
buffers poisoned with NaN (every element must be written, none added to), NaN inside one
member's stack, the thread split, count_correct's member offsets and arguments.

Random weights come from fresh_seed() (printed in each assertion; PSA_TEST_SEED replays one).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import re
import warnings
from pathlib import Path

import pytest
import torch

from psa.core.kernels import cpu_stack
from psa.core.arch import parse_arch
from psa.core.device import Execution, resolve_execution
from psa.core.mlp.engine import Engine
from psa.core.member import MODES

from . import oracle
from .conftest import ENGINE_HP as HP
from .conftest import engine, fresh_seed, population
from .test_cpu_step import SPECS, assert_close_grads, assert_close_losses, one_step, pair
from .tolerance import assert_close, epoch_steps, training_bound

if not cpu_stack.load(warn=False):
    pytest.skip(f"the fused CPU stack cannot be built here ({cpu_stack.failure()})", allow_module_level=True)

NAN = float("nan")
# rows per block in cpu_stack.cpp is 64: 150 rows are two whole blocks and one of 22
WIDE = dataclasses.replace(HP, batch_size=150)


def live_stack(engines, seed: int) -> None:
    """The same random middle layers near the identity in every engine's LKG (W = I + noise,
    small non-negative biases): a deep narrow stack then passes most rows on instead of dying (a
    width-1 weight is 1 +- 0.2: below 0, which would turn the unit off, it is 5 sigma away). With
    biases of either sign a width-1 stack drifts down and dies: 12*1 went from 25% of the rows
    alive after its first layer to none by its tenth for one seed, and its lower layers then had
    no gradient to compare."""
    g = torch.Generator().manual_seed(seed)
    views = [e.population.layout.views(e.population.lkg) for e in engines]
    for layer in range(1, len(views[0]) - 1):
        w, b = views[0][layer]
        width = w.shape[-1]
        new_w = torch.eye(width).expand_as(w) + torch.randn(w.shape, generator=g) * (0.2 / width**0.5)
        new_b = torch.randn(b.shape, generator=g).abs() * 0.05
        for v in views:
            v[layer][0].copy_(new_w)
            v[layer][1].copy_(new_b)


def poisoned_step(eng, loop: int, step: int, b: int):
    """train_step of the whole population into gradient and loss buffers full of NaN."""
    ch = eng._chunk(0, eng.population.size)
    ablated = eng._ablations(loop)
    ch.begin(eng.population, loop, [(j, eng.population.members[j].mode, *a) for j in range(eng.population.size) for a in ablated[j]], eng.step, eng.use_graphs)
    ch.step.fill_(step)
    ch.grad.fill_(NAN)
    drop = (ch.drop_keys, ch.drop_thr, ch.drop_scale) if ch.dropout else None
    loss = cpu_stack.train_step(ch.layout, ch.cand, ch.grad, eng.data.train_x, eng.data.train_y, ch.order, ch.step,
                                eng.hp.batch_size, b, ch.groups[1], drop, torch.full((ch.size,), NAN), eng.step.cpu_codes)
    return ch.grad.clone(), loss.clone(), ch


def clear_labels(eng, flat: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(labels, correct per member): each row labelled with member 0's float64 argmax where every
    member's top two logits are clearly apart, -1 (never correct) elsewhere, and the number of
    rows each member then gets right in float64: a count that rounding cannot move."""
    views = eng.population.layout.views(flat.double())
    h = torch.einsum("bi,moi->mbo", x.double(), views[0][0]) + views[0][1].unsqueeze(1)
    for w, b in views[1:]:
        h = torch.einsum("mbi,moi->mbo", torch.relu(h), w) + b.unsqueeze(1)
    top2 = h.topk(2, dim=2).values
    rows = ((top2[..., 0] - top2[..., 1]) > 1e-3).all(dim=0)
    y = torch.where(rows, h[0].argmax(dim=1), torch.full((x.shape[0],), -1))
    return y, (h.argmax(dim=2) == y).sum(dim=1)


# ------------------------------------------------------------------------------------------
# the stack, through train_step and count_correct


@pytest.mark.numeric
@pytest.mark.parametrize("width", range(1, 9))
@pytest.mark.parametrize("depth", [2, 12])
def test_every_width_against_the_torch_path(small, width, depth):
    """Every mode (dropout members beside members without), loop 2's ablations, a batch of 150
    and the epoch's last batch of 98; every gradient and loss written; count_correct scores what
    float64 logits say."""
    seed = fresh_seed()
    fused, plain = pair(f"{depth}*{width}", small, hp=WIDE)
    live_stack((fused, plain), seed)
    last = small.train_x.shape[0] // WIDE.batch_size
    for step, b in ((2, 150), (last, small.train_x.shape[0] - last * WIDE.batch_size)):
        what = f"seed={seed} {depth}*{width} b={b}"
        got, loss, ch = poisoned_step(fused, 2, step, b)
        ref, ref_loss, ref_ch = one_step(plain, 2, step, b)
        assert torch.equal(ch.cand, ref_ch.cand) and ch.dropout, what
        assert_close_grads(fused, got, ref, what, b, ch=ch)  # finite: every element written
        assert torch.isfinite(loss).all(), what
        assert_close_losses(fused, loss, ref_loss, what, b)
        # the test has teeth: the lowest middle layer (the stack's last gradient) trains in
        # the members without dropout or ablation
        lowest = fused.population.layout.views(got)[1][0]
        assert all(lowest[j].abs().max().item() > 0 for j, m in enumerate(fused.population.members) if m.mode == "none"), what
    flat = fused.population.lkg
    y, want = clear_labels(fused, flat, small.val_x)
    got = fused.count_correct(flat, small.val_x, y)
    assert got.tolist() == want.tolist(), f"seed={seed} {depth}*{width}"
    assert (y >= 0).sum().item() > 100 and want.max().item() > 0, f"seed={seed} {depth}*{width}"


def test_nan_stays_in_its_member(small):
    """A NaN weight in the middle of one member's stack: that member's loss and gradients are NaN
    (detectable) and it predicts class 0 everywhere (every logit NaN: torch.argmax's first NaN),
    on both paths; the members beside it, which share its seed group's rows and buffers, train
    and score as on the torch path."""
    fused, plain = pair("6*3", small, hp=WIDE)
    live_stack((fused, plain), fresh_seed())
    j = 7
    for eng in (fused, plain):
        eng.population.layout.views(eng.population.lkg)[3][0][j, 0, 1] = NAN
    got, loss, _ = poisoned_step(fused, 1, 2, 150)
    ref, ref_loss, _ = one_step(plain, 1, 2, 150)
    others = [i for i in range(fused.population.size) if i != j]
    assert loss[j].isnan() and ref_loss[j].isnan()
    assert_close_losses(fused, loss[others], ref_loss[others], "the other members'", 150)
    for layer, (gw, gb) in enumerate(fused.population.layout.views(got)):
        assert gw[j].isnan().any() and gb[j].isnan().any(), layer
    assert_close_grads(fused, got, ref, "the other members'", 150, members=others)
    counts = fused.count_correct(fused.population.lkg, small.val_x, small.val_y)
    assert counts[j].item() == (small.val_y == 0).sum().item()
    assert counts[j].item() == plain.count_correct(plain.population.lkg, small.val_x, small.val_y)[j].item()


def test_same_bits_for_any_thread_count(small):
    """Threads split the seed groups (the step) and the members (the evaluation), unevenly here
    (5 groups, 30 members): each item is summed by one thread in one order, so the thread count
    changes no bit of a deep stack's gradients with dropout, nor any count."""
    specs = [(m, s) for s in range(1, 6) for m in MODES]
    fused, _ = pair("9*2", small, specs, WIDE)
    live_stack((fused,), fresh_seed())
    out = []
    for threads in (1, 2, 3, 4):
        torch.set_num_threads(threads)
        grad, loss, _ = poisoned_step(fused, 2, 3, 150)
        out.append((grad, loss, fused.count_correct(fused.population.lkg, small.val_x, small.val_y)))
    assert torch.isfinite(out[0][0]).all() and out[0][2].sum().item() > 0
    for other in out[1:]:
        assert all(torch.equal(a, b) for a, b in zip(out[0], other))


def test_count_correct_takes_any_block_of_members_and_strides(small):
    """The engine hands count_correct members m0.. of a block and z0 as a transposed view of one
    GEMM's (rows, members, W) output: any block and either layout gives the whole call's counts,
    and tiny evaluation blocks in the engine give the counts of one block."""
    seed = fresh_seed()
    fused, _ = pair("5*4", small)
    live_stack((fused,), seed)
    layout, flat = fused.population.layout, fused.population.lkg
    g = torch.Generator().manual_seed(seed)
    m, rows = fused.population.size, 300
    z = torch.randn(rows, m, 4, generator=g).transpose(0, 1)  # strides (4, 4 m, 1)
    y = torch.randint(0, 10, (rows,), generator=g)
    whole = cpu_stack.count_correct(z, flat, layout, 0, y)
    assert torch.equal(cpu_stack.count_correct(z.contiguous(), flat, layout, 0, y), whole)
    for m0, m1 in ((0, 5), (5, 6), (6, m)):
        assert torch.equal(cpu_stack.count_correct(z[m0:m1], flat, layout, m0, y), whole[m0:m1]), (seed, m0)
    assert whole.sum().item() > 0 and len(set(whole.tolist())) > 1, seed  # members differ: offsets matter
    tiny = Engine(fused.population, small, HP, dataclasses.replace(fused.ex, eval_bytes=8 * 4 * 300))
    assert tiny.paths.cpu_step
    assert torch.equal(tiny.count_correct(flat, small.val_x, small.val_y),
                       fused.count_correct(flat, small.val_x, small.val_y))


def test_count_correct_checks_its_arguments(small):
    fused, _ = pair("3*4", small)
    layout, flat = fused.population.layout, fused.population.lkg
    m = fused.population.size
    z, y = torch.zeros(m, 20, 4), torch.arange(20) % 10
    # the valid call: z0 = 0 gives every row of a member the same logits, so its count is the
    # number of labels equal to the class the torch layers pick
    h = torch.zeros(m, 1, 4)
    for w, b in layout.views(flat)[1:]:
        h = torch.baddbmm(b.unsqueeze(1), torch.relu(h), w.transpose(1, 2))
    want = [(y == c).sum().item() for c in h[:, 0].argmax(dim=1).tolist()]
    assert cpu_stack.count_correct(z, flat, layout, 0, y).tolist() == want
    wide = population(parse_arch("2*9"), small, [("none", 1)])
    mixed = population(parse_arch("[2*4, 1*2]"), small, [("none", 1)])
    flat_only = population(parse_arch("[]"), small, [("none", 1)])
    for args, match in [
        ((z, flat, wide.layout, 0, y), "one width up to 8"),
        ((z, flat, mixed.layout, 0, y), "one width up to 8"),
        ((z, flat, flat_only.layout, 0, y), "with hidden layers"),
        ((torch.zeros(m, 20, 3), flat, layout, 0, y), "z0 has width 3"),
        ((z.double(), flat, layout, 0, y), "z0 must be"),
        ((z, flat, layout, 1, y), "run past the layout"),
        ((z, flat[:-1], layout, 0, y), "flat must be"),
        ((z, flat.double(), layout, 0, y), "flat must be"),
        ((z, flat, layout, 0, y[:19]), "y must be"),
        ((z, flat, layout, 0, y.int()), "y must be"),
    ]:
        with pytest.raises(ValueError, match=match):
            cpu_stack.count_correct(*args)


def test_train_step_checks_its_buffers(small):
    """What tests/test_cpu_step.py's test_validation leaves: the layout, the buffers' layout, the
    dropout tensors and the codes."""
    fused, _ = pair("2*2", small)
    ch = fused._chunk(0, fused.population.size)
    ch.begin(fused.population, 1, [], fused.step, fused.use_graphs)
    m = ch.size
    drop = (ch.drop_keys, ch.drop_thr, ch.drop_scale)
    args = dict(layout=ch.layout, flat=ch.cand, grad=ch.grad, x=small.train_x, y=small.train_y, order=ch.order,
                step=ch.step, batch_size=32, b=32, k=6, drop=drop, loss=torch.empty(m), codes=fused.step.cpu_codes)
    cpu_stack.train_step(**args)
    wide = population(parse_arch("2*9"), small, [("none", 1)])
    codes = fused.step.cpu_codes
    assert codes is not None
    for change, match in [
        (dict(layout=wide.layout), "one width up to 8"),
        (dict(flat=ch.cand[:-1]), "flat must be"),
        (dict(grad=torch.empty(2 * ch.grad.numel())[::2]), "grad must be"),
        (dict(drop=(ch.drop_keys[:, :1].contiguous(), ch.drop_thr, ch.drop_scale)), "drop keys"),
        (dict(drop=(ch.drop_keys, ch.drop_thr.float(), ch.drop_scale)), "drop thr"),
        (dict(drop=(ch.drop_keys, ch.drop_thr, ch.drop_scale[:-1])), "drop sc"),
        (dict(codes=(codes[0][:-1], codes[1], codes[2])), "codes must be"),
        (dict(codes=(codes[0].float(), codes[1], codes[2])), "codes must be"),
    ]:
        with pytest.raises(ValueError, match=match):
            cpu_stack.train_step(**{**args, **change})


# ------------------------------------------------------------------------------------------
# where the engine uses it


def test_only_fp32_auto_on_a_cpu_takes_it(small):
    """`--kernels auto` in fp32 on a CPU, nothing else; and a training set that is not one
    contiguous block of rows (which the step reads by index) trains on the torch path, bit for
    bit the `--kernels torch` engine's."""
    cpu = torch.device("cpu")
    arch = parse_arch("3*4")
    assert resolve_execution(cpu, "auto", "auto").cpu_stack_max_width == cpu_stack.MAX_WIDTH
    for ex in (resolve_execution(cpu, "tf32", "auto"), resolve_execution(cpu, "bf16", "auto"),
               resolve_execution(cpu, "auto", "torch"), Execution(device=cpu)):
        assert ex.cpu_stack_max_width == 0 and not cpu_stack.step_fits_cpu(arch, ex), ex
    specs = [(m, 1) for m in MODES]
    data = dataclasses.replace(small, train_x=small.train_x[:330].t().contiguous().t(), train_y=small.train_y[:330])
    assert not data.train_x.is_contiguous()
    ref_pop = population(arch, data, specs)
    ref = engine(ref_pop, data, kernels="torch").meta_loop()
    pop = population(arch, data, specs)
    eng = engine(pop, data)
    assert not eng.paths.cpu_step and not eng.paths.triton_stack
    res = eng.meta_loop()
    assert torch.equal(pop.lkg, ref_pop.lkg)
    assert (res.candidate_acc, res.promoted, res.train_loss) == (ref.candidate_acc, ref.promoted, ref.train_loss)


@pytest.mark.numeric
def test_engine_matches_the_oracle(small):
    """Every mode (dropout, decay, ablations) trained by the fused step against the one-model
    oracle over meta-loops with a last partial batch, and the test accuracy (the fused
    evaluation on the whole test set in one block) against the torch path's."""
    arch = parse_arch("[3*4]")
    specs = [(m, s) for s in (1, 2) for m in MODES]
    data = dataclasses.replace(small, train_x=small.train_x[:330], train_y=small.train_y[:330])
    torch_eng = engine(population(arch, data, specs), data, kernels="torch")
    pop = population(arch, data, specs)
    eng = engine(pop, data)
    assert eng.paths.cpu_step and not torch_eng.paths.cpu_step
    res = [eng.meta_loop() for _ in range(3)]
    torch_res = [torch_eng.meta_loop() for _ in range(3)]
    for a, b in zip(res, torch_res):
        assert a.promoted == b.promoted and a.diverged == b.diverged and a.ablated == b.ablated
    tol = training_bound(3 * epoch_steps(330, HP.batch_size), arch.widths, HP.batch_size)
    for j, mem in enumerate(pop.members):
        ref = oracle.run(arch, data, mem.seed, mem.mode, 3, HP)
        assert_close(f"{mem.mode} {mem.seed} LKG", pop.member_state_dict(j), ref.lkg, tol)
        assert [r.promoted[j] for r in res] == ref.promoted, mem
    assert all(abs(x - y) < 0.11 for x, y in zip(eng.test_accuracy(), torch_eng.test_accuracy()))


def test_chunks_train_as_the_whole(small):
    """A population trained in chunks of seed groups (each chunk its own layout) follows the
    population trained whole, bit for bit: a member's step reads only its own group."""
    arch = parse_arch("[5*2]")
    data = dataclasses.replace(small, train_x=small.train_x[:512], train_y=small.train_y[:512])
    out = []
    for max_members in (None, 6):
        pop = population(arch, data, SPECS)
        eng = engine(pop, data, max_members=max_members)
        assert eng.paths.cpu_step and -(-eng.population.size // eng.members_at_once) == (1 if max_members is None else 2)
        out.append(([eng.meta_loop().promoted for _ in range(2)], pop.lkg))
    assert out[0][0] == out[1][0]
    assert torch.equal(out[0][1], out[1][1])


# ------------------------------------------------------------------------------------------
# the build


def test_the_cache_key_covers_every_file_compiled(monkeypatch, tmp_path):
    """Every file cpu_stack.cpp includes with quotes is hashed into the build's name, so editing
    any of them builds anew; and the package ships each of them."""
    src = cpu_stack.SOURCE.read_text()
    included = {cpu_stack.SOURCE.with_name(n) for n in re.findall(r'^#include "([^"]+)"', src, flags=re.M)}
    assert included and included == set(cpu_stack.HEADERS)
    copies = []
    for f in (cpu_stack.SOURCE, *cpu_stack.HEADERS):
        (tmp_path / f.name).write_bytes(f.read_bytes())
        copies.append(tmp_path / f.name)
    monkeypatch.setattr(cpu_stack, "SOURCE", copies[0])
    monkeypatch.setattr(cpu_stack, "HEADERS", tuple(copies[1:]))
    key = cpu_stack._cache_key(["-O3"], "g++ 12")
    assert cpu_stack._cache_key(["-O3"], "g++ 12") == key
    assert cpu_stack._cache_key(["-O2"], "g++ 12") != key and cpu_stack._cache_key(["-O3"], "g++ 13") != key
    for f in copies:
        text = f.read_bytes()
        f.write_bytes(text + b"// edited\n")
        assert cpu_stack._cache_key(["-O3"], "g++ 12") != key, f.name
        f.write_bytes(text)
    shipped = re.search(r"^psa = \[(.*)\]$", (Path(__file__).parents[1] / "pyproject.toml").read_text(), flags=re.M)
    assert shipped, "pyproject.toml's package-data for psa"
    globs = re.findall(r'"([^"]+)"', shipped.group(1))
    for f in copies:
        assert any(fnmatch.fnmatch(f"core/kernels/{f.name}", g) for g in globs), f"{f.name} is not shipped"


def test_a_failed_build_falls_back_with_one_warning(small, monkeypatch, tmp_path):
    """A compiler that fails (or none): one warning line, then the plain torch path, whose
    results are the `--kernels torch` ones bit for bit."""
    arch = parse_arch("[3*4]")
    specs = [(m, 1) for m in MODES]
    ref_pop = population(arch, small, specs)
    ref = [r.candidate_acc for r in (engine(ref_pop, small, kernels="torch").meta_loop(),)]
    bad = tmp_path / "broken.cpp"
    bad.write_text("this is not C++\n")
    monkeypatch.setattr(cpu_stack, "SOURCE", bad)
    monkeypatch.setattr(cpu_stack, "_LIB", None)
    monkeypatch.setattr(cpu_stack, "_FAILED", None)
    monkeypatch.setenv("PSA_CACHE_DIR", str(tmp_path / "cache"))
    pop = population(arch, small, specs)
    with pytest.warns(RuntimeWarning, match=r"fused CPU stack could not be built \(RuntimeError: .*failed"):
        eng = engine(pop, small)
    assert not eng.paths.cpu_step
    assert [eng.meta_loop().candidate_acc] == ref
    assert torch.equal(pop.lkg, ref_pop.lkg)
    # the failure is remembered: no second attempt, no second warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not engine(population(arch, small, specs), small).paths.cpu_step
    monkeypatch.setattr(cpu_stack, "_FAILED", None)
    monkeypatch.setattr(cpu_stack, "_compiler", lambda: None)
    with pytest.warns(RuntimeWarning, match="no C\\+\\+ compiler"):
        assert not cpu_stack.load()
