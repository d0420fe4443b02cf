"""psa.core.cpu_stack (the fused hidden stack on the CPU) against a float64 reference, against
the engine's torch path and the oracle, and its fallback when it cannot be built.

Random inputs come from fresh_seed() (printed in each assertion; PSA_TEST_SEED replays one).
Output buffers start poisoned with NaN: an element the stack should write but does not shows up
as non-finite, and the regions of `grad` it must not write must still hold the poison.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from psa.core import cpu_stack, rng
from psa.core.arch import parse_arch
from psa.core.device import Execution, resolve_execution
from psa.core.member import MODES

from . import oracle
from .conftest import ENGINE_HP as HP
from .conftest import engine, fresh_seed, population

if not cpu_stack.load(warn=False):
    pytest.skip(f"the fused CPU stack cannot be built here ({cpu_stack.failure()})", allow_module_level=True)

NAN = float("nan")
PREFIX, SUFFIX = 11, 7  # stand-ins for layer 0 and the output layer around the middle stack


@dataclasses.dataclass
class Case:
    seed: int
    M: int
    B: int
    W: int
    L: int
    flat: torch.Tensor
    w_off: int
    b_off: int
    stride: int
    z0: torch.Tensor
    da: torch.Tensor
    drop: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None

    def __str__(self) -> str:
        return f"seed={self.seed} M={self.M} B={self.B} W={self.W} L={self.L} dropout={self.drop is not None}"

    @property
    def geometry(self) -> tuple[int, int, int]:
        return self.w_off, self.b_off, self.stride

    def layer(self, t: torch.Tensor, l: int) -> tuple[torch.Tensor, torch.Tensor]:
        w0 = self.w_off + (l - 1) * self.stride
        b0 = self.b_off + (l - 1) * self.stride
        return (t[w0:w0 + self.M * self.W * self.W].view(self.M, self.W, self.W),
                t[b0:b0 + self.M * self.W].view(self.M, self.W))


def case(seed: int, M: int, B: int, W: int, L: int, dropout: bool = False) -> Case:
    """Packed layout (as psa's Layout): per middle layer M*W*W weights then M*W biases."""
    g = torch.Generator().manual_seed(seed)
    stride = M * W * (W + 1)
    flat = torch.randn(PREFIX + (L - 1) * stride + SUFFIX, generator=g) * (1.5 / W ** 0.5)
    z0 = torch.randn(M, B, W, generator=g)
    da = torch.randn(M, B, W, generator=g)
    drop = None
    if dropout:
        ks = torch.randint(0, 2**32, (M,), generator=g, dtype=torch.int64)
        p = torch.rand(M, generator=g) * 0.6
        p[0] = 0.0  # a member without dropout in a chunk with dropout: threshold 0, scale 1
        thr = torch.tensor([rng.dropout_threshold(float(x)) for x in p], dtype=torch.int64)
        drop = (ks, thr, torch.ones(M) / (1.0 - p))
    return Case(seed, M, B, W, L, flat, PREFIX, PREFIX + M * W * W, stride, z0, da, drop)


def ref_forward(c: Case) -> list[torch.Tensor]:
    """Every a_l in float64 (dropout multipliers from psa.core.rng, the definition to match)."""
    noise = None
    if c.drop is not None:
        noise = rng.dropout_noise(rng.position_hash(c.B, c.L * c.W, "cpu"), *c.drop).double()
    acts = []
    z = c.z0.double()
    for l in range(c.L):
        if l:
            w, b = c.layer(c.flat, l)
            z = torch.bmm(acts[-1], w.double().transpose(1, 2)) + b.double().unsqueeze(1)
        a = torch.relu(z)
        if noise is not None:
            a = a * noise[:, :, l * c.W:(l + 1) * c.W]
        acts.append(a)
    return acts


def ref_backward(c: Case, acts: list[torch.Tensor]) -> tuple[dict[int, tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
    """(gradients of every middle layer, dz0) in float64, by autograd-free backpropagation."""
    sc = c.drop[2].double().view(-1, 1, 1) if c.drop is not None else 1.0
    g = c.da.double()
    grads = {}
    for l in range(c.L - 1, -1, -1):
        dz = torch.where(acts[l] > 0, g, torch.zeros_like(g)) * sc
        if l == 0:
            return grads, dz
        grads[l] = (torch.bmm(dz.transpose(1, 2), acts[l - 1]), dz.sum(dim=1))
        w, _ = c.layer(c.flat, l)
        g = torch.bmm(dz, w.double())
    raise AssertionError("unreachable")


def close(ours: torch.Tensor, ref: torch.Tensor, what: str, c: Case, tol: float = 1e-5) -> None:
    assert torch.isfinite(ours).all(), f"{what}: non-finite (unwritten?) for {c}"
    err = ((ours.double() - ref).abs().max() / ref.abs().max().clamp_min(1.0)).item()
    assert err < tol, f"{what}: relative error {err:.2e} for {c}"


@pytest.mark.parametrize("W", [1, 2, 3, 4, 7, 8])
@pytest.mark.parametrize("L,M,B", [(1, 3, 20), (2, 4, 33), (6, 3, 256), (12, 2, 130)])
@pytest.mark.parametrize("dropout", [False, True])
def test_stack_matches_reference(W, L, M, B, dropout):
    c = case(fresh_seed(), M, B, W, L, dropout)
    out = torch.full((M, B, W), NAN)
    assert cpu_stack.stack_forward(c.z0, c.flat, *c.geometry, L, W, out=out, drop=c.drop) is out
    ref = ref_forward(c)
    close(out, ref[-1], f"a_{L - 1}", c)
    grad = torch.full_like(c.flat, NAN)
    dz0 = torch.full((M, B, W), NAN)
    assert cpu_stack.stack_backward(c.da, c.z0, c.flat, grad, *c.geometry, L, W, dz0=dz0, drop=c.drop) is dz0
    grads, ref_dz0 = ref_backward(c, ref)
    close(dz0, ref_dz0, "dz0", c)
    for l, (gw, gb) in grads.items():
        w, b = c.layer(grad, l)
        close(w, gw, f"grad W_{l}", c)
        close(b, gb, f"grad b_{l}", c)
    # layer 0 and the output layer (stand-ins) are not the stack's to write
    assert grad[:PREFIX].isnan().all() and grad[-SUFFIX:].isnan().all(), str(c)


def test_first_layer_is_bitwise_relu_and_rng_noise():
    """a_0 = relu(z0) * the rng module's multiplier, bit for bit: the torch path's arithmetic."""
    c = case(fresh_seed(), 5, 70, 4, 1, dropout=True)
    out = cpu_stack.stack_forward(c.z0, c.flat, *c.geometry, 1, 4, drop=c.drop)
    noise = rng.dropout_noise(rng.position_hash(70, 4, "cpu"), *c.drop)
    assert torch.equal(out, torch.relu(c.z0) * noise), str(c)


@pytest.mark.parametrize("W,L", [(1, 64), (4, 5), (8, 3)])
def test_eval_path_transposed_input(W, L):
    """Validation hands the stack z0 as a transposed view of one GEMM's (rows, M, W) output."""
    c = case(fresh_seed(), 6, 301, W, L)
    z0 = c.z0.transpose(0, 1).contiguous().transpose(0, 1)  # (M, B, W) with strides (W, M*W, 1)
    c = dataclasses.replace(c, z0=z0)
    out = cpu_stack.stack_forward(z0, c.flat, *c.geometry, L, W)
    close(out, ref_forward(c)[-1], "eval a_{L-1}", c)


def test_non_contiguous_upstream_gradient():
    c = case(fresh_seed(), 3, 40, 4, 4)
    da = c.da.transpose(0, 1).contiguous().transpose(0, 1)
    dz0 = cpu_stack.stack_backward(da, c.z0, c.flat, torch.zeros_like(c.flat), *c.geometry, 4, 4)
    _, ref_dz0 = ref_backward(c, ref_forward(c))
    close(dz0, ref_dz0, "dz0", c)


def test_same_bits_for_any_thread_count():
    """Work is split by member and row block, and each member's gradient is summed by one thread
    in one order: the thread count changes nothing."""
    c = case(fresh_seed(), 7, 300, 2, 9, dropout=True)
    outs = []
    for threads in (1, 2, 3):
        torch.set_num_threads(threads)
        out = cpu_stack.stack_forward(c.z0, c.flat, *c.geometry, 9, 2, drop=c.drop)
        grad = torch.zeros_like(c.flat)
        dz0 = cpu_stack.stack_backward(c.da, c.z0, c.flat, grad, *c.geometry, 9, 2, drop=c.drop)
        outs.append((out, grad, dz0))
    for other in outs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(outs[0], other)), str(c)


def test_nan_stays_in_its_member():
    """A diverged member keeps NaN (detectable) and does not touch the others."""
    c = case(fresh_seed(), 3, 50, 4, 4)
    c.z0[1, 7, 2] = NAN
    out = cpu_stack.stack_forward(c.z0, c.flat, *c.geometry, 4, 4)
    assert out[1].isnan().any()
    assert torch.isfinite(out[[0, 2]]).all()


def test_validation():
    c = case(fresh_seed(), 2, 10, 4, 3)
    with pytest.raises(ValueError, match="fp32"):
        cpu_stack.stack_forward(c.z0, c.flat, *c.geometry, 3, 4, precision="tf32")
    with pytest.raises(ValueError, match="width"):
        cpu_stack.stack_forward(torch.zeros(2, 10, 9), c.flat, *c.geometry, 3, 9)
    with pytest.raises(ValueError, match="past the end"):
        cpu_stack.stack_forward(c.z0, c.flat[:50], *c.geometry, 3, 4)
    with pytest.raises(ValueError, match="contiguous"):
        cpu_stack.stack_forward(c.z0, c.flat, *c.geometry, 3, 4, out=torch.empty(10, 2, 4).transpose(0, 1))
    with pytest.raises(ValueError, match="z0"):
        cpu_stack.stack_backward(c.da, c.z0[:, :5], c.flat, torch.zeros_like(c.flat), *c.geometry, 3, 4)


# ------------------------------------------------------------------------------------------
# where the engine uses it


def test_auto_picks_it_on_a_cpu_for_narrow_stacks_only():
    cpu = torch.device("cpu")
    auto = resolve_execution(cpu, "auto", "auto")
    assert auto.cpu_stack_max_width == 8
    assert resolve_execution(cpu, "auto", "torch").cpu_stack_max_width == 0
    assert resolve_execution(cpu, "tf32", "auto").cpu_stack_max_width == 0
    for text, fits in [("4*2", True), ("64*1", True), ("8*8", True), ("2*16", False), ("1*8", False),
                       ("[2*4, 2*2]", False), ("[]", False)]:
        assert cpu_stack.stack_fits_cpu(parse_arch(text), auto) is fits, text
    assert not cpu_stack.stack_fits_cpu(parse_arch("4*2"), Execution(device=cpu))


def test_engine_matches_the_torch_path_and_the_oracle(small):
    """Every mode (dropout, decay, ablations) with the fused CPU stack against the plain torch path
    and against the one-model oracle, over meta-loops with a last partial batch."""
    arch = parse_arch("[3*4]")
    specs = [(m, s) for s in (1, 2) for m in MODES]
    data = dataclasses.replace(small, train_x=small.train_x[:330], train_y=small.train_y[:330])
    torch_pop = population(arch, data, specs)
    torch_eng = engine(torch_pop, data, kernels="torch")
    assert not torch_eng.cpu_stack
    torch_res = [torch_eng.meta_loop() for _ in range(3)]
    pop = population(arch, data, specs)
    eng = engine(pop, data)
    assert eng.cpu_stack and not eng.paths.triton_stack
    res = [eng.meta_loop() for _ in range(3)]
    diff = (pop.lkg - torch_pop.lkg).abs().max().item()
    assert diff < 1e-5, diff
    for a, b in zip(res, torch_res):
        assert a.promoted == b.promoted and a.diverged == b.diverged and a.ablated == b.ablated
        assert all(abs(x - y) <= 100.0 / data.val_y.numel() for x, y in zip(a.candidate_acc, b.candidate_acc))
    for j, mem in enumerate(pop.members):
        ref = oracle.run(arch, data, mem.seed, mem.mode, 3, HP)
        got = pop.member_state_dict(j)
        assert max((got[k] - ref.lkg[k]).abs().max().item() for k in got) < 1e-5, mem
    # the test accuracy goes through the same stack (eval path, whole test set in one block)
    assert all(abs(x - y) < 0.11 for x, y in zip(eng.test_accuracy(), torch_eng.test_accuracy()))


def test_chunks_train_as_the_whole(small):
    """A population trained in chunks of seed groups follows the population trained whole (to
    the rounding of torch's batched first layer, as on the torch path)."""
    arch = parse_arch("[5*2]")
    specs = [(m, s) for s in (1, 2) for m in MODES]
    data = dataclasses.replace(small, train_x=small.train_x[:512], train_y=small.train_y[:512])
    out = []
    for max_members in (None, 6):
        pop = population(arch, data, specs)
        eng = engine(pop, data, max_members=max_members)
        assert eng.cpu_stack and len(eng._chunks()) == (1 if max_members is None else 2)
        out.append(([eng.meta_loop().promoted for _ in range(2)], pop.lkg))
    assert out[0][0] == out[1][0]
    assert (out[0][1] - out[1][1]).abs().max().item() < 1e-6


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
    assert not eng.cpu_stack and not eng.paths.cpu_step
    assert [eng.meta_loop().candidate_acc] == ref
    assert torch.equal(pop.lkg, ref_pop.lkg)
    # the failure is remembered: no second attempt, no second warning
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not engine(population(arch, small, specs), small).cpu_stack
    monkeypatch.setattr(cpu_stack, "_FAILED", None)
    monkeypatch.setattr(cpu_stack, "_compiler", lambda: None)
    with pytest.warns(RuntimeWarning, match="no C\\+\\+ compiler"):
        assert not cpu_stack.load()
