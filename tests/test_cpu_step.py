"""psa.core.kernels.cpu_stack.train_step (the fused CPU training step) against the engine's torch path.

One step's gradients and losses are compared on the same candidate, chunk and batch: the torch
path (`--kernels torch`: gathered batch, torch matmuls, autograd-free backward) is the reference.
Tolerances are tests/tolerance.py's: gradients relative to the largest gradient of their layer
and losses to the largest loss, within one pass's rounding (fp32 sums over a batch and 784
inputs in another order: ~1e-5 of it; measured differences are ~5e-7, up to 5e-6 for width 1,
whose sums cancel more). Meta-loops (ablations, promotion, the last partial batch) then follow
the torch path's LKG within a training run's rounding; tests/test_cpu_stack.py takes the stack
itself through every width, deeper stacks, larger batches, NaN and the build.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from psa.core import rng
from psa.core.kernels import cpu_stack
from psa.core.arch import parse_arch
from psa.core.device import resolve_execution
from psa.core.member import MODES

from .conftest import ENGINE_HP as HP
from .conftest import engine, fresh_seed, layers, population
from .tolerance import ONE_PASS, assert_close, epoch_steps, pass_bound, training_bound

if not cpu_stack.load(warn=False):
    pytest.skip(f"the fused CPU stack cannot be built here ({cpu_stack.failure()})", allow_module_level=True)

SPECS = [(m, s) for s in (1, 2) for m in MODES]  # every mode: dropout, decay, ablations; two seed groups


def pair(arch_text: str, data, specs=SPECS, hp=HP):
    """(fused engine, torch engine) on two populations with the same initial weights."""
    arch = parse_arch(arch_text)
    fused = engine(population(arch, data, specs, hp), data, hp)
    plain = engine(population(arch, data, specs, hp), data, hp, kernels="torch")
    assert fused.paths.cpu_step and not plain.paths.cpu_step
    assert torch.equal(fused.population.lkg, plain.population.lkg)
    return fused, plain


def one_step(eng, loop: int, step: int, b: int, ablate: bool = True):
    """Gradients and losses of one training step of the whole population (no update)."""
    ch = eng._chunk(0, eng.population.size)
    ablations = []
    if ablate:
        ablated = eng._ablations(loop)
        ablations = [(j, eng.population.members[j].mode, *a) for j in range(eng.population.size) for a in ablated[j]]
    ch.begin(eng.population, loop, ablations, eng.step, eng.use_graphs)
    ch.step.fill_(step)
    g, k = ch.groups
    if eng.paths.cpu_step:
        drop = (ch.drop_keys, ch.drop_thr, ch.drop_scale) if ch.dropout else None
        loss = cpu_stack.train_step(ch.layout, ch.cand, ch.grad, eng.data.train_x, eng.data.train_y, ch.order,
                                    ch.step, eng.hp.batch_size, b, k, drop, torch.full((ch.size,), float("nan")))
    else:
        pos = ch.step * eng.hp.batch_size + torch.arange(b)
        idx = ch.order.index_select(1, pos).reshape(-1)
        x = eng.data.train_x.index_select(0, idx).view(g, b, -1)
        y = eng.data.train_y.index_select(0, idx).view(g, 1, b).expand(g, k, b).reshape(ch.size, b)
        loss = eng.step.forward_backward(ch, x, y)
    return ch.grad.clone(), loss.clone(), ch


def relu_ties(eng, ch, b: int) -> dict[int, int]:
    """{member: its highest layer with a near tie} for step ch.step's b rows: a live hidden unit
    whose pre-activation lies as close to 0 as float32 rounding reaches. There the fused step and
    the torch path may put the row on either side of the ReLU, and the gradients of that layer
    and below then differ by the row's whole contribution, not by rounding: a discontinuity, like
    a near tie between two logits that moves a count by one. Layers above it do not see it (the
    unit's output is ~0 either way). The forward (dropout included) runs in float64 and in
    float32 side by side; the rounding reached is, per member and layer, the largest difference
    of the two (the first layer's error carried up the stack included), and a tie is within
    ONE_PASS times that: the other path's float32 rounds as much again, in another order."""
    pop = eng.population
    k = ch.groups[1]
    pos = ch.step * eng.hp.batch_size + torch.arange(b)
    x = eng.data.train_x[ch.order.index_select(1, pos)].repeat_interleave(k, 0)  # (C, b, n_in)
    noise = eng.step.noise(ch, rng.step_keys(ch.drop_keys, ch.step), b) if ch.dropout else None
    ties: dict[int, int] = {}
    hs, off = {torch.float64: x.double(), torch.float32: x.float()}, 0
    for layer in range(len(pop.layout.views(ch.cand)) - 1):
        zs = {}
        for dtype, h in hs.items():
            w, bias = pop.layout.views(ch.cand.to(dtype))[layer]
            zs[dtype] = torch.einsum("mbi,moi->mbo", h, w) + bias.unsqueeze(1)
        z = zs[torch.float64]
        reach = (zs[torch.float32].double() - z).abs().flatten(1).amax(1).view(-1, 1, 1)
        near = (z != 0) & (z.abs() <= ONE_PASS * reach)
        for j in near.flatten(1).any(1).nonzero().flatten().tolist():
            ties[j] = layer
        for dtype, zd in zs.items():
            h = zd.relu()
            if noise is not None:
                sl = noise[:, :, off:off + h.shape[2]].to(dtype)
                if ch.drop_rows_all:
                    h = h * sl
                else:
                    h[ch.drop_rows] = h[ch.drop_rows] * sl
            hs[dtype] = h
        off += z.shape[2]
    return ties


def assert_close_grads(eng, got: torch.Tensor, ref: torch.Tensor, what: str, b: int = 32,
                       members: list[int] | None = None, ch=None) -> None:
    """One step's gradients of batch `b` (of `members` only, if given) against the torch path's,
    each layer's relative to its largest, within one pass's rounding; given the step's chunk
    `ch`, a member's layers at and below a ReLU near tie (relu_ties) are left out."""
    pop = eng.population
    ours, theirs = layers(pop, got), layers(pop, ref)
    chosen = list(range(pop.size)) if members is None else members
    for key, a in ours.items():
        assert torch.isfinite(a[chosen]).all(), f"{what}: {key} not finite"
    if ch is not None:
        ours, ties = {key: a.clone() for key, a in ours.items()}, relu_ties(eng, ch, b)
        if ties:
            what = f"{what} (ReLU ties left out, member: top layer {ties})"
        for j, top in ties.items():
            for layer in range(top + 1):
                for name in ("weight", "bias"):
                    ours[f"layer {layer} {name}"][j] = theirs[f"layer {layer} {name}"][j]
    if members is not None:
        ours, theirs = ({k: v[members] for k, v in d.items()} for d in (ours, theirs))
    assert_close(f"{what} gradient", ours, theirs, pass_bound(pop.arch.widths, b))


def assert_close_losses(eng, loss: torch.Tensor, ref: torch.Tensor, what: str, b: int = 32) -> None:
    assert_close(f"{what} loss", loss, ref, pass_bound(eng.population.arch.widths, b))


@pytest.mark.numeric
@pytest.mark.parametrize("arch", ["1*1", "1*2", "1*4", "1*8", "2*1", "2*2", "3*4", "2*8", "4*3", "5*5", "7*7"])
@pytest.mark.parametrize("b", [32, 11])  # a full batch, and a last partial one
def test_step_matches_the_torch_path(small, arch, b):
    """Every mode (members with and without dropout in one chunk, decay members), ablated units
    (loop 2 ablates in the ablative modes), depth 1 (no middle stack) and deeper, widths 1-8."""
    fused, plain = pair(arch, small)
    n_steps = small.train_x.shape[0] // HP.batch_size
    step = n_steps - 1 if b < HP.batch_size else 3
    got, loss, ch = one_step(fused, 2, step, b)
    ref, ref_loss, ref_ch = one_step(plain, 2, step, b)
    assert torch.equal(ch.cand, ref_ch.cand)  # the same ablated candidate
    assert ch.dropout and any(m.dropout == 0 for m in ch.members)
    what = f"{arch} b={b}"
    assert_close_grads(fused, got, ref, what, b, ch=ch)
    assert_close_losses(fused, loss, ref_loss, what, b)


def test_an_ablated_unit_stays_dead(small):
    """A zeroed hidden unit gets zero gradient into and out of it, as on the torch path."""
    fused, _ = pair("3*4", small, [("hidden", 1)])
    ch = fused._chunk(0, 1)
    ch.begin(fused.population, 2, [(0, "hidden", 1, 2)], fused.step, fused.use_graphs)  # Linear 1's unit 2: its row, bias and the next layer's column
    cpu_stack.train_step(ch.layout, ch.cand, ch.grad, small.train_x, small.train_y, ch.order, ch.step, 32, 32, 1,
                         None, torch.empty(1))
    views = ch.layout.views(ch.grad)
    assert torch.equal(views[1][0][0, 2], torch.zeros(4)) and views[1][1][0, 2].item() == 0.0
    assert torch.equal(views[2][0][0, :, 2], torch.zeros(4))
    assert views[0][0].abs().sum().item() > 0 and views[2][0].abs().sum().item() > 0  # the rest trains


@pytest.mark.numeric
def test_meta_loops_follow_the_torch_path(small):
    """Three meta-loops of every mode (ablation, promotion, a last partial batch of 10)."""
    data = dataclasses.replace(small, train_x=small.train_x[:330], train_y=small.train_y[:330])
    steps = epoch_steps(330, HP.batch_size)
    for arch in ("1*4", "2*2", "4*1"):
        fused, plain = pair(arch, data)
        res = [(fused.meta_loop(), plain.meta_loop()) for _ in range(3)]
        widths = fused.population.arch.widths
        assert_close(f"{arch} LKG", layers(fused.population), layers(plain.population),
                     training_bound(3 * steps, widths, HP.batch_size))
        for a, b in res:
            assert a.promoted == b.promoted and a.diverged == b.diverged and a.ablated == b.ablated, arch
            assert_close(f"{arch} loop {a.loop} train loss", torch.tensor(a.train_loss), torch.tensor(b.train_loss),
                         training_bound(a.loop * steps, widths, HP.batch_size, c=ONE_PASS))


def test_divergence_is_flagged_per_member(small):
    """Members with NaN weights (3) or an infinite logit (4) get a non-finite loss (diverged) on
    both paths; the other members' losses stay finite and equal to the torch path's."""
    fused, plain = pair("2*2", small)
    outs = []
    for eng in (fused, plain):
        views = eng.population.layout.views(eng.population.lkg)
        views[0][0][3, 1, 100] = float("nan")
        views[-1][1][4, 0] = float("inf")
        ch = eng._chunk(0, eng.population.size)
        ch.begin(eng.population, 1, [], eng.step, eng.use_graphs)
        eng.step(ch, 32)
        outs.append((ch.diverged.clone(), ch.loss_sum.clone()))
    (div, loss), (ref_div, ref_loss) = outs
    assert div.tolist() == ref_div.tolist() == [j in (3, 4) for j in range(len(SPECS))]
    keep = ~ref_div
    assert_close_losses(fused, loss[keep], ref_loss[keep], "finite members'")


def test_same_inputs_same_bits_for_any_thread_count(small):
    fused, _ = pair("3*4", small)
    out = []
    for threads in (1, 2, 3, 1):
        torch.set_num_threads(threads)
        grad, loss, _ = one_step(fused, 2, 5, 32)
        out.append((grad, loss))
    for grad, loss in out[1:]:
        assert torch.equal(grad, out[0][0]) and torch.equal(loss, out[0][1])


@pytest.mark.numeric
def test_random_inputs_against_the_torch_path(small):
    """Random weights (scaled so that units are on and off) on random widths and depths."""
    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    for _ in range(3):
        w = int(torch.randint(1, 9, (1,), generator=g))
        d = int(torch.randint(1, 5, (1,), generator=g))
        fused, plain = pair(f"{d}*{w}", small)
        noise = torch.randn(fused.population.lkg.shape, generator=g) * 0.5
        fused.population.lkg.add_(noise)
        plain.population.lkg.add_(noise)
        got, loss, ch = one_step(fused, 3, 2, 32)
        ref, ref_loss, _ = one_step(plain, 3, 2, 32)
        assert_close_grads(fused, got, ref, f"seed={seed} {d}*{w}", ch=ch)
        assert_close_losses(fused, loss, ref_loss, f"seed={seed} {d}*{w}")  # up to ~60 with these weights


def test_where_the_engine_uses_it():
    cpu = torch.device("cpu")
    auto = resolve_execution(cpu, "auto", "auto")
    for text, fits in [("1*1", True), ("1*8", True), ("4*2", True), ("64*1", True), ("8*8", True),
                       ("1*16", False), ("2*16", False), ("[2*4, 2*2]", False), ("[]", False)]:
        assert cpu_stack.step_fits_cpu(parse_arch(text), auto) is fits, text
    assert not cpu_stack.step_fits_cpu(parse_arch("4*2"), resolve_execution(cpu, "auto", "torch"))


def test_validation(small):
    fused, _ = pair("2*2", small)
    ch = fused._chunk(0, fused.population.size)
    ch.begin(fused.population, 1, [], fused.step, fused.use_graphs)
    args = dict(layout=ch.layout, flat=ch.cand, grad=ch.grad, x=small.train_x, y=small.train_y, order=ch.order,
                step=ch.step, batch_size=32, b=32, k=6, drop=None, loss=torch.empty(ch.size))
    cpu_stack.train_step(**args)
    for change, match in [(dict(k=5), "k must divide"), (dict(b=33), "past the end"),
                          (dict(x=small.train_x[:, :700]), "x must be"), (dict(loss=torch.empty(3)), "loss must"),
                          (dict(step=torch.tensor(64)), "past the end"), (dict(order=ch.order[:1]), "order must"),
                          (dict(y=torch.full_like(small.train_y, 10)), "a label outside 0..9"),
                          (dict(order=torch.full_like(ch.order, -1)), "index outside the training set")]:
        with pytest.raises(ValueError, match=match):
            cpu_stack.train_step(**{**args, **change})


def test_odd_input_and_class_counts_and_uneven_seeds():
    """37 inputs (vector tails), 3 classes, random data, and seed groups of unequal size (every
    member then gathers its own batch: k = 1)."""
    from psa.core.data import Dataset

    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(300, 37, generator=g), torch.randint(0, 3, (300,), generator=g)
    data = Dataset("random", x[:200], y[:200], x[200:], y[200:], x[200:], y[200:], "random", n_classes=3)
    specs = [("dropout", 1), ("none", 1), ("full", 2)]
    for text in ("1*5", "3*2"):
        arch = data.arch(f"[{text}]")
        fused = engine(population(arch, data, specs), data)
        plain = engine(population(arch, data, specs), data, kernels="torch")
        assert fused.paths.cpu_step and fused._chunk(0, 3).groups == (3, 1)
        got, loss, ch = one_step(fused, 2, 1, 32)
        ref, ref_loss, _ = one_step(plain, 2, 1, 32)
        assert_close_grads(fused, got, ref, f"seed={seed} {text}", ch=ch)
        assert_close_losses(fused, loss, ref_loss, f"seed={seed} {text}")


# ------------------------------------------------------------------------------------------
# 8-bit input codes (cpu_stack.input_codes) and the fused evaluation (cpu_stack.count_correct)


def test_mnist_is_found_as_8_bit_codes_and_other_data_is_not(small):
    codes = cpu_stack.input_codes(small.train_x)
    assert codes is not None
    c, alpha, beta = codes
    assert c.dtype == torch.uint8 and c.shape == small.train_x.shape
    assert int(c.min()) == 0 and int(c.max()) == 255
    err = (c.double() * alpha + beta - small.train_x.double()).abs().max().item()
    assert err <= 4 * torch.finfo(torch.float32).eps * small.train_x.abs().max().item()
    assert cpu_stack.input_codes(small.train_x) is codes  # kept per tensor
    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    assert cpu_stack.input_codes(torch.randn(50, 20, generator=g)) is None, seed
    # 256 evenly spaced values but one element off the grid by 1e-4: not codes
    x = small.train_x[:64].clone()
    assert cpu_stack.input_codes(x) is not None
    x[3, 5] += 1e-4
    assert cpu_stack.input_codes(x) is None  # changed in place: asked again
    nan = small.train_x[:64].clone()
    nan[0, 0] = float("nan")
    assert cpu_stack.input_codes(nan) is None
    assert cpu_stack.input_codes(small.train_x[:, :10].contiguous()[:, :0]) is None  # empty


@pytest.mark.numeric
@pytest.mark.parametrize("arch", ["1*1", "2*1", "3*4", "1*8", "5*5"])
def test_step_on_codes_matches_the_torch_path(small, arch):
    """The first layer reading 8-bit codes (alpha sum w c + beta sum w) gives the torch path's
    gradients and losses within the float path's tolerances, partial batch included."""
    codes = cpu_stack.input_codes(small.train_x)
    assert codes is not None
    for b, step in ((32, 3), (11, small.train_x.shape[0] // HP.batch_size - 1)):
        fused, plain = pair(arch, small)
        assert fused.step.cpu_codes is codes  # the engine reads codes
        ch = fused._chunk(0, fused.population.size)
        ch.begin(fused.population, 2, [(j, fused.population.members[j].mode, *a) for j in range(fused.population.size)
                            for a in fused._ablations(2)[j]], fused.step, fused.use_graphs)
        ch.step.fill_(step)
        drop = (ch.drop_keys, ch.drop_thr, ch.drop_scale) if ch.dropout else None
        loss = cpu_stack.train_step(ch.layout, ch.cand, ch.grad, small.train_x, small.train_y, ch.order, ch.step,
                                    HP.batch_size, b, ch.groups[1], drop, torch.empty(ch.size), codes)
        ref, ref_loss, _ = one_step(plain, 2, step, b)
        assert_close_grads(fused, ch.grad, ref, f"{arch} b={b} codes", b, ch=ch)
        assert_close_losses(fused, loss, ref_loss, f"{arch} b={b} codes", b)


def test_fused_evaluation_counts_what_the_logits_say(small):
    """count_correct against float64 logits: labels are set to the float64 argmax where the top two
    logits are clearly apart and to -1 (never correct) elsewhere, so the count is known exactly."""
    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    for text in ("1*3", "2*1", "4*4", "3*8"):
        fused, plain = pair(text, small)
        assert fused.paths.cpu_step
        x = small.val_x.double()
        m = fused.population.size
        # a member of a width-1 net whose unit is dead has the same logits for every image; if
        # its top two are within 1e-3, no row is clear for it: such a draw is redrawn (from the
        # same generator, so the seed still replays it), and the test's teeth below still hold
        for _ in range(20):
            flat = fused.population.lkg + torch.randn(fused.population.lkg.shape, generator=g) * 0.3
            views = fused.population.layout.views(flat.double())
            h = torch.einsum("bi,moi->mbo", x, views[0][0]) + views[0][1].unsqueeze(1)
            for w, b in views[1:]:
                h = torch.einsum("mbi,moi->mbo", torch.relu(h), w) + b.unsqueeze(1)
            top2 = h.topk(2, dim=2).values
            clear = (top2[..., 0] - top2[..., 1]) > 1e-3
            # one label row for all members: only rows clear for every member count
            rows = clear.all(dim=0)
            if rows.sum().item() > 100:
                break
        y = torch.where(rows, h[0].argmax(dim=1), torch.full_like(small.val_y, -1))
        agree = (h.argmax(dim=2) == y).sum(dim=1)
        got = fused.count_correct(flat, small.val_x, y)
        assert got.tolist() == agree.tolist(), (seed, text)
        assert rows.sum().item() > 100 and agree.max().item() > 0, (seed, text)  # the test has teeth
        ref = plain.count_correct(flat, small.val_x, y)
        assert got.tolist() == ref.tolist(), (seed, text)
        assert m == got.numel()


def test_fused_evaluation_takes_argmax_of_nan_as_torch_does(small):
    """A NaN logit is the largest (the first NaN wins), as torch.argmax decides on the torch path:
    a member whose head bias for class 3 is NaN predicts 3 everywhere; one with NaN at 7 and 2, 2."""
    fused, plain = pair("2*2", small)
    flat = fused.population.lkg.clone()
    head_bias = fused.population.layout.views(flat)[-1][1]
    head_bias[0, 3] = float("nan")
    head_bias[1, 7] = float("nan")
    head_bias[1, 2] = float("nan")
    got = fused.count_correct(flat, small.val_x, small.val_y)
    ref = plain.count_correct(flat, small.val_x, small.val_y)
    assert got.tolist() == ref.tolist()
    assert got[0].item() == (small.val_y == 3).sum().item() and got[1].item() == (small.val_y == 2).sum().item()


@pytest.mark.numeric
def test_a_dead_layer_stops_the_gradient_as_on_the_torch_path(small):
    """A member whose middle layer 6 is off for every row (bias -10, weights 0) gets exactly zero
    gradients below it (the step stops carrying zeros down), while the members before it in its
    seed group leave nonzero sums in the reused buffers: the torch path's gradients, within the
    usual tolerance, and exact zeros below the dead layer."""
    fused, plain = pair("12*2", small)
    for eng in (fused, plain):
        views = eng.population.layout.views(eng.population.lkg)
        for w, b in views[1:-1]:  # every member alive: each middle layer passes its input on
            w.copy_(torch.eye(2).expand_as(w))
            b.fill_(0.1)
        views[6][0][3].zero_()
        views[6][1][3].fill_(-10.0)
    got, loss, ch = one_step(fused, 1, 2, 32, ablate=False)
    ref, ref_loss, _ = one_step(plain, 1, 2, 32, ablate=False)
    assert_close_grads(fused, got, ref, "dead layer", ch=ch)
    assert_close_losses(fused, loss, ref_loss, "dead layer")
    views = fused.population.layout.views(got)
    for layer in range(6):
        assert views[layer][0][3].abs().max().item() == 0.0 and views[layer][1][3].abs().max().item() == 0.0, layer
        assert views[layer][0][2].abs().max().item() > 0.0  # the member before it: a live gradient
    assert views[7][1][3].abs().max().item() > 0.0 and views[8][0][3].abs().max().item() > 0.0  # above: trains
