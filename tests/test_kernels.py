"""psa.core.kernels.triton_stack against a float64 torch reference, in Triton's interpreter when there is no GPU.

Every check draws fresh random inputs from a seed printed in its assertion message, so a
failure can be replayed with `case(seed=...)`. Output buffers start poisoned with NaN, so an
element the kernels should write but do not shows up as non-finite, and the regions of `grad`
they must not write (layer 0, the output layer, gaps between layers) must still hold the poison.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import pytest
import torch

pytest.importorskip("triton")

from psa.core import rng  # noqa: E402
from psa.core.kernels import launch  # noqa: E402
from psa.core.kernels import triton_stack as kernels  # noqa: E402
from psa.core.precision import Matmul  # noqa: E402

from . import tolerance as policy  # noqa: E402
from .conftest import fresh_seed  # noqa: E402
from .tolerance import EPS32, EPS64, EPS_BF16, EPS_TF32, ONE_PASS, Bound, bound, pass_bound  # noqa: E402

if not kernels.available():
    pytest.skip("no GPU and TRITON_INTERPRET is not 1", allow_module_level=True)

NAN = float("nan")
PREFIX, SUFFIX = 11, 7  # stand-ins for layer 0 and the output layer around the middle stack
EPS = {"fp32": EPS32, "tf32": EPS_TF32, "bf16": EPS_BF16}


DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


class OnDevice:
    """psa.core.kernels.triton_stack with every tensor argument copied to DEVICE and every tensor copied back
    after the call (outputs are written in place), so that the tests build inputs and check
    results on the CPU while the kernels run where they run: compiled on a GPU, interpreted on
    a CPU (where the copies are the tensors themselves)."""

    def __getattr__(self, name: str):
        fn = getattr(kernels, name)
        if DEVICE.type == "cpu":
            return fn

        def call(*args, **kwargs):
            moved: list[tuple[torch.Tensor, torch.Tensor]] = []

            def to_dev(x):
                if isinstance(x, torch.Tensor):
                    d = x.to(DEVICE)  # keeps the strides of a dense view (transposes, slices)
                    moved.append((x, d))
                    return d
                if isinstance(x, tuple):
                    return tuple(to_dev(v) for v in x)
                if isinstance(x, kernels.StagedWeights):  # read only: copied there, not back
                    return staged_to(x, DEVICE)
                return x

            args = [to_dev(a) for a in args]
            kwargs = {k: to_dev(v) for k, v in kwargs.items()}
            ret = fn(*args, **kwargs)
            for host, dev in moved:
                host.copy_(dev.cpu())
            if ret is None or isinstance(ret, kernels.StagedWeights):
                return ret if ret is None else staged_to(ret, torch.device("cpu"))
            for host, dev in moved:  # a returned argument, or a view of one: the same of the host's
                if ret is dev:
                    return host
                if ret.untyped_storage().data_ptr() == dev.untyped_storage().data_ptr():
                    return host.as_strided(ret.shape, ret.stride(),
                                           host.storage_offset() + ret.storage_offset() - dev.storage_offset())
            return ret.cpu()

        return call


def staged_to(w: kernels.StagedWeights, device: torch.device) -> kernels.StagedWeights:
    """Staged weights with their tensors on `device`."""
    return dataclasses.replace(w, **{k: None if getattr(w, k) is None else getattr(w, k).to(device)
                                     for k in ("forward", "backward", "bias")})


K = OnDevice()


@dataclass
class Case:
    """One population's hidden stack: parameters in a flat buffer, layer-0 pre-activations,
    per-member dropout settings and the upstream gradient."""

    seed: int
    M: int
    B: int
    W: int
    L: int
    flat: torch.Tensor
    w_off: int
    b_off: int
    layer_stride: int
    z0: torch.Tensor
    da: torch.Tensor
    ks: torch.Tensor
    thr: torch.Tensor
    sc: torch.Tensor
    dropout: bool

    def __str__(self) -> str:
        return (f"seed={self.seed} M={self.M} B={self.B} W={self.W} L={self.L} "
                f"dropout={self.dropout} layer_stride={self.layer_stride}")

    @property
    def drop(self):
        return (self.ks, self.thr, self.sc) if self.dropout else None

    @property
    def scale(self):
        return self.sc if self.dropout else None

    def weight(self, l: int) -> torch.Tensor:
        start = self.w_off + (l - 1) * self.layer_stride
        return self.flat[start:start + self.M * self.W * self.W].view(self.M, self.W, self.W)

    def bias(self, l: int) -> torch.Tensor:
        start = self.b_off + (l - 1) * self.layer_stride
        return self.flat[start:start + self.M * self.W].view(self.M, self.W)

    def noise(self) -> torch.Tensor | None:
        """(M, B, L*W) dropout multipliers from psa.core.rng, the definition the kernels must match."""
        if not self.dropout:
            return None
        return rng.dropout_noise(rng.position_hash(self.B, self.L * self.W, "cpu"), self.ks, self.thr, self.sc)

    def middle(self) -> torch.Tensor:
        """Bool mask over flat: True on the middle stack's weight and bias blocks."""
        mask = torch.zeros(self.flat.numel(), dtype=torch.bool)
        n_w, n_b = self.M * self.W * self.W, self.M * self.W
        for l in range(1, self.L):
            mask[self.w_off + (l - 1) * self.layer_stride:][:n_w] = True
            mask[self.b_off + (l - 1) * self.layer_stride:][:n_b] = True
        return mask


def case(seed: int, M: int, B: int, W: int, L: int, dropout: bool = False, gap: int = 0) -> Case:
    """A random Case. `gap` spare floats after each middle layer test a non-packed layout."""
    g = torch.Generator().manual_seed(seed)
    layer_stride = M * W * (W + 1) + gap
    flat = torch.randn(PREFIX + (L - 1) * layer_stride + SUFFIX, generator=g)
    # He-scaled weights and small biases keep activations alive and bounded through deep stacks
    for l in range(1, L):
        start = PREFIX + (l - 1) * layer_stride
        flat[start:start + M * W * W] *= (2.0 / W) ** 0.5
        flat[start + M * W * W:start + M * W * (W + 1)] *= 0.1
    z0 = torch.randn(M, B, W, generator=g)
    da = torch.randn(M, B, W, generator=g)
    ks = torch.randint(0, 2**32, (M,), generator=g, dtype=torch.int64)
    p = torch.rand(M, generator=g) * 0.5 + 0.1
    # dropout on some members only: the others pass thr=0, sc=1 and must equal plain relu
    on = torch.arange(M) % 2 == 0 if dropout else torch.zeros(M, dtype=torch.bool)
    thr = torch.tensor([rng.dropout_threshold(float(q)) if o else 0 for q, o in zip(p, on)], dtype=torch.int64)
    sc = torch.where(on, 1.0 / (1.0 - p), torch.ones(M)).to(torch.float32)
    return Case(seed, M, B, W, L, flat, PREFIX, PREFIX + M * W * W, layer_stride, z0, da, ks, thr, sc, dropout)


# ---------------------------------------------------------------- float64 reference


def ref_forward(c: Case, z0: torch.Tensor | None = None, flat: torch.Tensor | None = None,
                dropout: bool = True) -> list[torch.Tensor]:
    """a_0..a_{L-1}, each (M, B, W) float64, differentiable in z0 and flat when they require grad."""
    z0 = c.z0 if z0 is None else z0
    flat = c.flat if flat is None else flat
    noise = c.noise() if dropout else None
    W, M = c.W, c.M
    acts = []
    z = z0.double()
    for l in range(c.L):
        if l:
            s = c.w_off + (l - 1) * c.layer_stride
            w = flat[s:s + M * W * W].view(M, W, W).double()
            s = c.b_off + (l - 1) * c.layer_stride
            b = flat[s:s + M * W].view(M, 1, W).double()
            z = acts[-1] @ w.transpose(1, 2) + b
        a = torch.relu(z)
        if noise is not None:
            # a dropped unit is 0 even when its pre-activation is NaN (NaN * 0 would be NaN)
            keep = noise[:, :, l * W:(l + 1) * W].double()
            a = torch.where(keep != 0, a * keep, 0.0)
        acts.append(a)
    return acts


def ref_backward(c: Case, acts: list[torch.Tensor] | torch.Tensor):
    """(weight grads {l: (M, W, W)}, bias grads {l: (M, W)}, dz0), float64, written out."""
    sc = c.sc.double().view(-1, 1, 1) if c.dropout else 1.0
    da = c.da.double()
    gw, gb = {}, {}
    for l in range(c.L - 1, 0, -1):
        a, a_in = acts[l].double(), acts[l - 1].double()
        dz = torch.where(a > 0, da * sc, 0.0)
        gw[l] = dz.transpose(1, 2) @ a_in
        gb[l] = dz.sum(1)
        da = dz @ c.weight(l).double()
    return gw, gb, torch.where(acts[0].double() > 0, da * sc, 0.0)


def tolerance(c: Case, precision: str = "fp32") -> Bound:
    """tests/tolerance.py's bound for one pass through case c's stack. In fp32: its layers' sums
    over W inputs forward and backward and the weight gradient's over B rows. In tf32 and bf16
    the operands' roundings dominate: each middle layer rounds both operands of its products
    once forward and once backward, 4 (L - 1) roundings at the format's eps (the interpreter
    truncates to bf16 where a GPU rounds to nearest: up to twice the error, within c)."""
    if precision == "fp32":
        return pass_bound((c.W,) * c.L, c.B)
    return bound(4 * max(c.L - 1, 1), ONE_PASS, EPS[precision], "4 operand roundings per middle layer")


def assert_close(ours: torch.Tensor, ref: torch.Tensor, tol: Bound, what: str, c: Case) -> None:
    """The error relative to the reference's largest |value| (tests/tolerance.py)."""
    assert torch.isfinite(ours).all(), f"{what}: non-finite values ({c})"
    policy.assert_close(f"{what} ({c})", ours, ref, tol)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)


def run(c: Case, precision: str = "fp32"):
    """Both kernels on NaN-poisoned outputs: (acts, grad, dz0)."""
    acts = torch.full((c.L, c.M, c.B, c.W), NAN)
    last = K.stack_forward(c.z0, c.flat, c.w_off, c.b_off, c.layer_stride, c.L, c.W,
                                 acts=acts, drop=c.drop, precision=precision)
    grad = torch.full_like(c.flat, NAN)
    dz0 = torch.full((c.M, c.B, c.W), NAN)
    ret = K.stack_backward(c.da, acts, c.flat, grad, c.w_off, c.b_off, c.layer_stride, c.L, c.W,
                                 dz0=dz0, scale=c.scale, precision=precision)
    assert ret is dz0
    assert last.data_ptr() == acts[c.L - 1].data_ptr() and last.shape == (c.M, c.B, c.W)
    return acts, grad, dz0


def check(c: Case, precision: str = "fp32") -> None:
    tol = tolerance(c, precision)
    acts, grad, dz0 = run(c, precision)
    assert_close(acts, torch.stack(ref_forward(c)), tol, "activations", c)

    # the backward against the reference on the kernel's own activations, so a reduced
    # precision forward cannot flip a relu mask between the two
    gw, gb, ref_dz0 = ref_backward(c, acts)
    assert_close(dz0, ref_dz0, tol, "dz0", c)
    mid = c.middle()
    assert torch.isfinite(grad[mid]).all(), f"unwritten gradient elements ({c})"
    assert torch.isnan(grad[~mid]).all(), f"gradient written outside the middle stack ({c})"
    if c.L > 1:
        ours_w = torch.stack([grad[c.w_off + (l - 1) * c.layer_stride:][:c.M * c.W * c.W] for l in range(1, c.L)])
        ours_b = torch.stack([grad[c.b_off + (l - 1) * c.layer_stride:][:c.M * c.W] for l in range(1, c.L)])
        assert_close(ours_w, torch.stack([gw[l].flatten() for l in range(1, c.L)]), tol, "weight grads", c)
        assert_close(ours_b, torch.stack([gb[l].flatten() for l in range(1, c.L)]), tol, "bias grads", c)


# ---------------------------------------------------------------- tests

WIDTHS = (1, 2, 3, 4, 8, 13, 16, 32)
MBD = [(1, 7, False), (3, 33, True), (3, 80, False), (1, 80, True), (3, 7, True), (1, 33, False)]
FP32_CASES = [(W, L, *MBD[(i + j) % len(MBD)]) for i, W in enumerate(WIDTHS) for j, L in enumerate((1, 2, 5))]
DEEP_CASES = [(1, 40, 3, 33, True), (4, 40, 1, 7, True), (13, 40, 3, 7, False)]
# more rows than one program takes, so that gradient partials are reduced over row blocks
MANY_ROWS = [(1, 5, 3, 1100, True), (2, 3, 1, 600, False), (3, 5, 3, 200, True), (8, 2, 1, 300, False)]
# widths above 32 (padded to 64 or 128; the pipelined path): small batches that are no multiple
# of the row blocks (16, 32 or 64 rows), several of them spanning more than one block
WIDE_CASES = [
    (33, 2, 3, 37, True), (33, 12, 1, 5, False),
    (64, 1, 3, 9, True), (64, 3, 1, 70, False),
    (100, 2, 3, 21, True), (100, 10, 1, 6, True),
    (128, 3, 1, 19, False), (128, 2, 3, 40, True),
]


@pytest.mark.numeric
@pytest.mark.parametrize("W,L,M,B,dropout", FP32_CASES + DEEP_CASES + MANY_ROWS + WIDE_CASES)
def test_stack_matches_reference(W, L, M, B, dropout):
    check(case(fresh_seed(), M, B, W, L, dropout))


@pytest.mark.parametrize("W,L,M,B", [(100, 3, 1, 150), (64, 2, 2, 100)])
def test_wide_gradient_over_row_blocks(W, L, M, B):
    # the wide backward over several row blocks, each writing its rows of dLoss/dz before the product
    _, block_r, _ = kernels.launch_config(W, B, "fp32", backward=True)
    assert B > 2 * block_r and B % block_r
    check(case(fresh_seed(), M, B, W, L, dropout=True))


# In Triton's interpreter (no GPU) tl.dot ignores input_precision: only psa's own operand
# rounding makes these tf32 runs tf32 (test_stack_rounds_like_the_torch_path checks it); the
# tolerance here could not tell them from plain fp32.
@pytest.mark.numeric
@pytest.mark.parametrize("precision", ["tf32", "bf16"])
@pytest.mark.parametrize("W,L,M,B", [(20, 2, 3, 33), (32, 5, 1, 40), (44, 3, 1, 70), (115, 2, 1, 37)])
def test_reduced_precision(precision, W, L, M, B):
    check(case(fresh_seed(), M, B, W, L, dropout=True), precision)


def emulated(c: Case, precision: str, acts: torch.Tensor):
    """The engine's torch path in `precision` on the CPU (psa.core.precision.Matmul: operands rounded
    to tf32 or bf16, products in fp32), one layer at a time from the kernel's own activations
    `acts`, so that both sides round the very same operands and can differ only in the order of
    fp32 sums: (activations, {l: weight grad}, {l: bias grad}, dz0), float32."""
    mm = Matmul(precision, torch.device("cpu"))
    noise = c.noise()
    sc = c.sc.view(-1, 1, 1) if c.dropout else 1.0

    def act(z: torch.Tensor, l: int) -> torch.Tensor:
        a = torch.relu(z)
        return a * noise[:, :, l * c.W:(l + 1) * c.W] if noise is not None else a

    out = [act(c.z0, 0)]
    for l in range(1, c.L):
        out.append(act(mm.baddbmm(c.bias(l).unsqueeze(1), acts[l - 1], c.weight(l).transpose(1, 2)), l))
    gw, gb = {}, {}
    da = c.da
    for l in range(c.L - 1, 0, -1):
        dz = torch.where(acts[l] > 0, da * sc, 0.0)
        gw[l] = mm.bmm(dz.transpose(1, 2), acts[l - 1])
        gb[l] = dz.sum(1)
        da = mm.bmm(dz, c.weight(l))
    return torch.stack(out), gw, gb, torch.where(acts[0] > 0, da * sc, 0.0)


# numeric (CI's second run): fp32, where torch's own kernels are the reference
@pytest.mark.parametrize("precision", [pytest.param("fp32", marks=pytest.mark.numeric), "tf32", "bf16"])
@pytest.mark.parametrize("W,M,B,seed", [(1, 3, 40, 11), (3, 2, 33, 12), (8, 3, 70, 13), (13, 1, 50, 14),
                                        (16, 2, 40, 15), (20, 2, 33, 16), (44, 1, 37, 17)])
def test_stack_rounds_like_the_torch_path(precision, W, M, B, seed):
    """In tf32 and bf16 the kernels must round their operands as the torch path and its CPU
    emulation do, not silently compute in fp32: widths up to 16 multiply without tl.dot, wider
    ones (20, 44) with it. Triton's interpreter ignores tl.dot's input_precision (its dot is
    plain fp32), so on the CPU this is the only test that tells a tf32 or bf16 dot from an
    fp32 one: it passes there because psa's _matmul rounds the operands itself before the dot
    (test_reduced_precision's tf32 cases, against float64 with tf32's tolerance, would pass
    in plain fp32 too). The forward is checked layer by layer (4 layers); the backward on 2
    layers, where every rounded operand is one both sides share (deeper, an fp32 sum's last
    bit can tip a rounding either way)."""
    for L in (4, 2):
        c = case(seed, M, B, W, L, dropout=True)
        tol = tolerance(c)  # both sides round the same operands: fp32 sums apart
        acts, grad, dz0 = run(c, precision)
        want, gw, gb, want_dz0 = emulated(c, precision, acts)
        assert_close(acts, want, tol, f"{precision} activations", c)
        # the check can fail: these inputs are far from fp32 when rounded
        if precision != "fp32":
            assert policy.compare(f"fp32 against {precision} ({c})", emulated(c, "fp32", acts)[0], want,
                                  tol).ratio > 10
        if L == 2:
            assert_close(dz0, want_dz0, tol, f"{precision} dz0", c)
            assert_close(grad[c.w_off:][:M * W * W], gw[1].flatten(), tol, f"{precision} weight grads", c)
            assert_close(grad[c.b_off:][:M * W], gb[1].flatten(), tol, f"{precision} bias grads", c)


@pytest.mark.parametrize("W,B", [(3, 7), (3, 600), (40, 9), (40, 50)])
def test_non_packed_layout(W, B):
    # spare floats between middle layers: the kernels must honour b_off/layer_stride and leave
    # the gaps alone, both when writing grad directly and when reducing row-block partials
    check(case(fresh_seed(), 3, B, W, 4, dropout=True, gap=5))


def test_reference_backward_is_autograd():
    c = case(fresh_seed(), 3, 9, 5, 4, dropout=True)
    z0 = c.z0.double().requires_grad_()
    flat = c.flat.double().requires_grad_()
    acts = ref_forward(c, z0, flat)
    (acts[-1] * c.da.double()).sum().backward()
    gw, gb, dz0 = ref_backward(c, [a.detach() for a in acts])
    # a = relu(z0) * noise, so dL/dz0 = dL/da_0 * noise * [z0 > 0]: the reference's dz0
    tol = bound(policy.pass_ops((c.W,) * c.L, c.B), ONE_PASS, EPS64, "both sides float64")
    policy.assert_close(f"dz0 ({c})", z0.grad, dz0, tol)
    for l in range(1, c.L):
        s = c.w_off + (l - 1) * c.layer_stride
        policy.assert_close(f"layer {l} weight grads ({c})", flat.grad[s:s + c.M * c.W * c.W].view(c.M, c.W, c.W),
                            gw[l], tol)
        s = c.b_off + (l - 1) * c.layer_stride
        policy.assert_close(f"layer {l} bias grads ({c})", flat.grad[s:s + c.M * c.W].view(c.M, c.W), gb[l], tol)


def test_first_layer_is_bitwise_relu_and_rng_noise():
    c = case(fresh_seed(), 3, 50, 6, 3, dropout=True)
    acts, _, _ = run(c)
    noise = c.noise()[:, :, :c.W]
    want = torch.relu(c.z0) * noise
    assert torch.equal(bits(acts[0]), bits(want)), f"a_0 != relu(z0) * rng noise ({c})"
    assert torch.equal(bits(acts[0][1]), bits(torch.relu(c.z0[1]))), f"member without dropout ({c})"
    # deeper layers: exactly the rng mask's zeros (kept units with z > 0 are non-zero)
    full = c.noise()
    for l in range(1, c.L):
        dropped = full[:, :, l * c.W:(l + 1) * c.W] == 0
        assert (acts[l][dropped] == 0).all(), f"layer {l} kept a dropped unit ({c})"


@pytest.mark.parametrize("W,L,M,B", [(3, 4, 3, 33), (32, 3, 2, 20), (1, 6, 2, 9), (100, 3, 2, 40)])
def test_eval_path_transposed_input(W, L, M, B):
    c = case(fresh_seed(), M, B, W, L)
    g = torch.Generator().manual_seed(c.seed + 1)
    z0 = torch.randn(B, M, W, generator=g).transpose(0, 1)  # (M, B, W), not contiguous
    assert not z0.is_contiguous()
    c.z0 = z0
    out = torch.full((M, B, W), NAN)
    ret = K.stack_forward(z0, c.flat, c.w_off, c.b_off, c.layer_stride, L, W, out=out)
    assert ret is out
    assert_close(out, ref_forward(c)[-1], tolerance(c), "eval output", c)
    # the same arithmetic as the training path without dropout, so the same bits
    acts = torch.empty(L, M, B, W)
    K.stack_forward(z0, c.flat, c.w_off, c.b_off, c.layer_stride, L, W, acts=acts)
    assert torch.equal(bits(out), bits(acts[-1])), f"eval != training without dropout ({c})"
    alloc = K.stack_forward(z0, c.flat, c.w_off, c.b_off, c.layer_stride, L, W)
    assert torch.equal(bits(alloc), bits(out))


def test_non_contiguous_upstream_gradient():
    c = case(fresh_seed(), 3, 40, 5, 3, dropout=True)
    c.da = c.da.transpose(0, 1).contiguous().transpose(0, 1)
    assert not c.da.is_contiguous()
    check(c)


@pytest.mark.parametrize("precision", ["fp32", "tf32", "bf16"])
@pytest.mark.parametrize("W,gap", [(40, 0), (100, 3)])
def test_staged_weights_are_the_precisions_rounding_padded(precision, W, gap):
    """The wide kernels' weights, staged once a step: every middle weight (nothing of the biases
    or the gaps between layers), bit for bit psa.core.precision's rounding (fp32: as it is), in
    layer and member order, each (W, W) tile padded with zeros to the kernels' (WP, WP); the
    backward's copy the forward's transposed; with the forward's, the biases as they are,
    padded to WP."""
    from psa.core.precision import round_bf16, round_tf32

    c = case(fresh_seed(), 3, 5, W, 4, gap=gap)
    got = K.stage_weights(c.flat, c.w_off, c.b_off, c.layer_stride, c.L, c.W, c.M, precision)
    wp = 64 if W <= 64 else 128
    want = torch.zeros(c.L - 1, c.M, wp, wp)
    want[:, :, :W, :W] = torch.stack([c.weight(l) for l in range(1, c.L)])
    if precision != "fp32":
        want = round_tf32(want) if precision == "tf32" else round_bf16(want)
    assert got is not None and got.precision == precision
    assert torch.equal(bits(got.forward), bits(want))
    assert torch.equal(bits(got.backward), bits(want.transpose(2, 3)))
    raw = torch.stack([c.weight(l) for l in range(1, c.L)])
    assert torch.equal(bits(got.forward[:, :, :W, :W]), bits(raw)) == (precision == "fp32")
    bias = torch.zeros(c.L - 1, c.M, wp)
    bias[:, :, :W] = torch.stack([c.bias(l) for l in range(1, c.L)])
    assert torch.equal(bits(got.bias), bits(bias))
    fwd_only = K.stage_weights(c.flat, c.w_off, c.b_off, c.layer_stride, c.L, c.W, c.M, precision, backward=False)
    assert fwd_only.backward is None and torch.equal(bits(fwd_only.forward), bits(want))
    assert torch.equal(bits(fwd_only.bias), bits(bias))
    bwd_only = K.stage_weights(c.flat, c.w_off, c.b_off, c.layer_stride, c.L, c.W, c.M, precision, forward=False)
    assert bwd_only.forward is None and bwd_only.bias is None
    assert torch.equal(bits(bwd_only.backward), bits(want.transpose(2, 3)))


def test_staged_weights_only_where_the_kernels_take_them():
    """None where the kernels read the weights from flat: widths up to 32 (which round in the
    kernel), a stack without a middle layer."""
    c = case(fresh_seed(), 2, 5, 40, 3)
    assert kernels.weights_staged(40) and kernels.weights_staged(128) and not kernels.weights_staged(32)
    assert K.stage_weights(c.flat, c.w_off, c.b_off, c.layer_stride, 1, c.W, c.M, "tf32") is None
    n = case(fresh_seed(), 2, 5, 32, 3)
    assert K.stage_weights(n.flat, n.w_off, n.b_off, n.layer_stride, n.L, n.W, n.M, "tf32") is None


@pytest.mark.parametrize("precision", ["fp32", "tf32", "bf16"])
def test_given_staged_weights_are_what_the_kernels_read(precision):
    """The step stages once for both directions and hands the copies over: the kernels then read
    the weights from them, not from flat (weights of 0 give z = bias and da = 0 below layer
    L-1), and compute with them what they compute with the copies they stage themselves, bit
    for bit."""
    c = case(fresh_seed(), 2, 21, 40, 3, dropout=True)
    acts, grad, dz0 = run(c, precision)
    wr = K.stage_weights(c.flat, c.w_off, c.b_off, c.layer_stride, c.L, c.W, c.M, precision)
    acts2 = torch.full_like(acts, NAN)
    K.stack_forward(c.z0, c.flat, c.w_off, c.b_off, c.layer_stride, c.L, c.W, acts=acts2, drop=c.drop,
                    precision=precision, weights=wr)
    grad2, dz02 = torch.full_like(c.flat, NAN), torch.full_like(dz0, NAN)
    K.stack_backward(c.da, acts2, c.flat, grad2, c.w_off, c.b_off, c.layer_stride, c.L, c.W, dz0=dz02,
                     scale=c.scale, precision=precision, weights=wr)
    assert torch.equal(bits(acts2), bits(acts)) and torch.equal(bits(dz02), bits(dz0))
    mid = c.middle()
    assert torch.equal(bits(grad2[mid]), bits(grad[mid]))

    zeros = kernels.StagedWeights(torch.zeros_like(wr.forward), torch.zeros_like(wr.backward), precision, wr.bias)
    K.stack_forward(c.z0, c.flat, c.w_off, c.b_off, c.layer_stride, c.L, c.W, acts=acts2, drop=c.drop,
                    precision=precision, weights=zeros)
    for l in range(1, c.L):
        noise = c.noise()[:, :, l * c.W:(l + 1) * c.W]
        assert torch.equal(acts2[l], torch.relu(c.bias(l)).unsqueeze(1).expand_as(noise) * noise)
    K.stack_backward(c.da, acts2, c.flat, grad2, c.w_off, c.b_off, c.layer_stride, c.L, c.W, dz0=dz02,
                     scale=c.scale, precision=precision, weights=zeros)
    assert not dz02.any()
    # each direction reads its own copy: the forward's alone does not serve the backward, and
    # the forward needs its biases
    with pytest.raises(ValueError, match="without the forward's biases"):
        K.stack_forward(c.z0, c.flat, c.w_off, c.b_off, c.layer_stride, c.L, c.W, acts=acts2, drop=c.drop,
                        precision=precision, weights=kernels.StagedWeights(wr.forward, None, precision))
    with pytest.raises(ValueError, match="without their backward copy"):
        K.stack_backward(c.da, acts2, c.flat, grad2, c.w_off, c.b_off, c.layer_stride, c.L, c.W,
                         scale=c.scale, precision=precision, weights=kernels.StagedWeights(wr.forward, None, precision))


@pytest.mark.parametrize("W,L,M,B", [(8, 4, 3, 80), (32, 3, 2, 40), (1, 5, 2, 1100), (64, 3, 2, 70)])
def test_deterministic(W, L, M, B):
    c = case(fresh_seed(), M, B, W, L, dropout=True)
    first, second = run(c), run(c)
    for name, x, y in zip(("acts", "grad", "dz0"), first, second):
        assert torch.equal(bits(x), bits(y)), f"{name} differs between two calls ({c})"


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")
@pytest.mark.parametrize("value", [NAN, float("inf")])
@pytest.mark.parametrize("dropout", [False, True])
@pytest.mark.parametrize("W", [3, 33])
def test_non_finite_stays_in_its_row(W, value, dropout):
    # W=3 pads to 4 and W=33 to 64: padded units must not turn inf into NaN (0 * inf) and feed it back
    c = case(fresh_seed(), 3, 20, W, 4, dropout)
    clean, _, _ = run(c)
    c.z0 = c.z0.clone()
    c.z0[0, 5, 1] = value  # member 0 is a dropout member when dropout is on
    acts, _, _ = run(c)
    ref = torch.stack(ref_forward(c))
    msg = f"value={value} ({c})"
    assert torch.equal(torch.isnan(acts), torch.isnan(ref)), f"NaN pattern differs from the reference, {msg}"
    assert torch.equal(torch.isinf(acts), torch.isinf(ref)), f"inf pattern differs from the reference, {msg}"
    bad = ~torch.isfinite(acts)
    assert not bad[:, 1:].any() and not bad[:, 0, :5].any() and not bad[:, 0, 6:].any(), msg
    others = torch.ones_like(bad)
    others[:, 0, 5] = False
    assert torch.equal(bits(acts[others]), bits(clean[others])), f"other rows or members changed, {msg}"
    # eval path too: a diverged member stays detectable in its output
    out = K.stack_forward(c.z0, c.flat, c.w_off, c.b_off, c.layer_stride, c.L, c.W)
    ref = ref_forward(c, dropout=False)[-1]
    assert torch.equal(torch.isnan(out), torch.isnan(ref)) and torch.equal(torch.isinf(out), torch.isinf(ref)), msg
    assert torch.isfinite(out[1:]).all() and torch.isfinite(out[0, :5]).all(), msg


def test_nan_is_kept_and_detectable():
    c = case(fresh_seed(), 2, 9, 4, 3)
    c.z0 = c.z0.clone()
    c.z0[1, 3] = NAN
    acts, _, _ = run(c)
    assert torch.isnan(acts[:, 1, 3]).all(), f"a NaN pre-activation gave a number ({c})"
    assert torch.isfinite(acts[:, 0]).all() and torch.isfinite(acts[:, 1, :3]).all(), f"({c})"


@pytest.mark.parametrize("rows,units", [(1, 1), (7, 13), (33, 100), (5, 3000), (40, 700)])
def test_dropout_noise_bitwise(rows, units):
    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    ks = torch.cat([torch.tensor([0, 2**32 - 1]), torch.randint(0, 2**32, (3,), generator=g, dtype=torch.int64)])
    thr = torch.tensor([0, rng.dropout_threshold(0.5), 2**32 - 1, rng.dropout_threshold(0.1),
                        int(torch.randint(0, 2**32, (1,), generator=g))], dtype=torch.int64)
    sc = torch.tensor([1.0, 2.0, 3.0, 1 / 0.9, 1.7], dtype=torch.float32)
    ours = K.dropout_noise(rows, units, ks, thr, sc)
    want = rng.dropout_noise(rng.position_hash(rows, units, "cpu"), ks, thr, sc)
    assert ours.shape == (5, rows, units)
    assert torch.equal(bits(ours), bits(want)), f"seed={seed} rows={rows} units={units}"


def test_validation():
    c = case(fresh_seed(), 2, 5, 3, 3, dropout=True)
    args = (c.flat, c.w_off, c.b_off, c.layer_stride, c.L, c.W)
    acts = torch.empty(c.L, c.M, c.B, c.W)
    wide = kernels.MAX_WIDTH + 1
    with pytest.raises(ValueError, match="width"):
        K.stack_forward(torch.zeros(2, 5, wide), c.flat, 0, 0, 0, 1, wide)
    with pytest.raises(ValueError, match="z0 has width"):
        K.stack_forward(torch.zeros(2, 5, 4), *args)
    with pytest.raises(ValueError, match="float32"):
        K.stack_forward(c.z0.double(), *args)
    with pytest.raises(ValueError, match="acts must be contiguous"):
        K.stack_forward(c.z0, *args, acts=torch.empty(c.M, c.L, c.B, c.W).transpose(0, 1))
    with pytest.raises(ValueError, match="acts must have shape"):
        K.stack_forward(c.z0, *args, acts=acts[:2])
    with pytest.raises(ValueError, match="training path"):
        K.stack_forward(c.z0, *args, drop=c.drop)
    with pytest.raises(ValueError, match="run past the end"):
        K.stack_forward(c.z0, c.flat[:-SUFFIX - 1], *args[1:])
    with pytest.raises(ValueError, match="precision"):
        K.stack_forward(c.z0, *args, acts=acts, precision="fp16")
    with pytest.raises(ValueError, match="drop thr"):
        K.stack_forward(c.z0, *args, acts=acts, drop=(c.ks, c.thr.int(), c.sc))
    K.stack_forward(c.z0, *args, acts=acts, drop=c.drop)
    grad = torch.empty_like(c.flat)
    with pytest.raises(ValueError, match="dz0 must be contiguous"):
        K.stack_backward(c.da, acts, c.flat, grad, *args[1:],
                               dz0=torch.empty(c.B, c.M, c.W).transpose(0, 1))
    with pytest.raises(ValueError, match="scale"):
        K.stack_backward(c.da, acts, c.flat, grad, *args[1:], scale=c.sc[:1])
    with pytest.raises(ValueError, match="grad must"):
        K.stack_backward(c.da, acts, c.flat, grad[:-1], *args[1:])
    with pytest.raises(ValueError, match="out must be contiguous"):
        K.stack_forward(c.z0, *args, out=torch.empty(c.B, c.M, c.W).transpose(0, 1))
    w = case(1, 2, 5, 40, 3)
    wargs = (w.flat, w.w_off, w.b_off, w.layer_stride, w.L, w.W)
    short = kernels.StagedWeights(torch.zeros(1, w.M, 64, 64), None, "tf32")  # one layer short
    with pytest.raises(ValueError, match="weights must have shape"):
        K.stack_forward(w.z0, *wargs, precision="tf32", weights=short)
    with pytest.raises(ValueError, match="staged for tf32"):
        K.stack_forward(w.z0, *wargs, precision="bf16", weights=short)
    with pytest.raises(ValueError, match="StagedWeights"):
        K.stack_forward(w.z0, *wargs, precision="tf32", weights=torch.zeros(2, w.M, 64, 64))
    with pytest.raises(ValueError, match="precision"):
        K.stage_weights(w.flat, w.w_off, w.b_off, w.layer_stride, w.L, w.W, w.M, "fp16")


def test_stack_settings_are_what_launch_config_gives_and_compute_the_same():
    """A bench's candidate setting (rows per program, warps; pipeline depth for the wide kernels)
    is what the kernels launch with inside stack_settings and nowhere else, wide or narrow, and
    it computes what the table's setting computes (the same products, summed in an order that
    may differ)."""
    table_f, table_b = kernels.launch_config(40, 256, "tf32"), kernels.launch_config(40, 256, "tf32", backward=True)
    narrow = kernels.launch_config(4, 256, "fp32")
    stages = launch.wide_stages()
    c = case(fresh_seed(), 2, 37, 40, 3, dropout=True)
    n = case(fresh_seed(), 3, 70, 4, 5, dropout=True)
    acts, grad, dz0 = run(c, "tf32")
    n_acts, n_grad, n_dz0 = run(n)
    with kernels.stack_settings(64, "tf32", forward=(128, 4), backward=(16, 8), stages=2), \
            kernels.stack_settings(4, "fp32", forward=(16, 1), backward=(32, 2)):
        assert kernels.launch_config(40, 256, "tf32") == (64, 128, 4)
        assert kernels.launch_config(40, 256, "tf32", backward=True) == (64, 16, 8)
        assert kernels.launch_config(40, 256, "fp32") != (64, 128, 4)  # another precision's entry
        assert kernels.launch_config(4, 256, "fp32") == (4, 16, 1)
        assert kernels.launch_config(4, 256, "fp32", backward=True) == (4, 32, 2)
        assert kernels.launch_config(4, 20, "fp32", backward=True) == (4, 32, 2)  # not more rows than a batch
        assert launch.wide_stages() == 2
        acts2, grad2, dz02 = run(c, "tf32")
        n_acts2, n_grad2, n_dz02 = run(n)
    # another row block is another product shape (for the interpreter's BLAS as for a card's
    # tensor cores) and another grouping of the narrow backward's partial sums
    for cc, got, want in ((c, (acts2, grad2, dz02), (acts, grad, dz0)), (n, (n_acts2, n_grad2, n_dz02),
                                                                      (n_acts, n_grad, n_dz0))):
        tol, mid = tolerance(cc), cc.middle()
        assert_close(got[0], want[0], tol, "activations", cc)
        assert_close(got[2], want[2], tol, "dz0", cc)
        assert_close(got[1][mid], want[1][mid], tol, "gradient", cc)
    assert kernels.launch_config(40, 256, "tf32") == table_f and launch.wide_stages() == stages
    assert kernels.launch_config(4, 256, "fp32") == narrow and not launch._SETTINGS
    with pytest.raises(RuntimeError, match="inside"), kernels.stack_settings(128, "bf16", forward=(64, 8)):
        raise RuntimeError("inside")
    assert kernels.launch_config(100, 256, "bf16")[1] != 64 and kernels.launch_config(40, 256, "tf32",
                                                                                       backward=True) == table_b
    with pytest.raises(ValueError, match="not a setting"), kernels.stack_settings(64, "tf32", forward=(24, 8)):
        pass
    with pytest.raises(ValueError, match="no stack setting"), kernels.stack_settings(40, "tf32", forward=(32, 8)):
        pass
    with pytest.raises(ValueError, match="no stack setting"), kernels.stack_settings(64, "fp16", forward=(32, 8)):
        pass
