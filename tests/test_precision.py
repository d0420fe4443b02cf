"""Matmul precisions against float64: fp32 is exact to float32, tf32 and bf16 round their
operands as the tensor cores do, and each is measurably coarser than the one above it."""

from __future__ import annotations

import struct

import pytest
import torch

from psa.core.precision import Matmul, PrecisionError, resolve, round_bf16, round_tf32

from .conftest import fresh_seed
from .tolerance import EPS_BF16, EPS_TF32, assert_close, bound


def f32_bits(x: float) -> int:
    return struct.unpack("<I", struct.pack("<f", x))[0]


def bits_f32(b: int) -> float:
    return struct.unpack("<f", struct.pack("<I", b & 0xFFFFFFFF))[0]


def tf32_reference(x: float) -> float:
    """Round-to-nearest-even to a 10-bit mantissa, one float at a time, in integers."""
    b = f32_bits(x)
    if (b >> 23) & 0xFF == 0xFF:
        return x
    low = b & 0x1FFF
    up = low > 0x1000 or (low == 0x1000 and (b >> 13) & 1)
    b = (b & ~0x1FFF) + (0x2000 if up else 0)
    return bits_f32(b)


def test_round_tf32_matches_the_integer_definition():
    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    x = torch.cat([torch.randn(4000, generator=g) * 10 ** torch.randint(-30, 30, (4000,), generator=g).float(),
                   torch.tensor([0.0, -0.0, 1.0, float("inf"), -float("inf"), 3.4e38, 1e-40]),
                   # exact ties: the 13 dropped bits are 1000000000000
                   torch.tensor([bits_f32(0x3F801000), bits_f32(0x3F803000), bits_f32(0xBF801000)])])
    got = round_tf32(x)
    ref = torch.tensor([tf32_reference(v) for v in x.tolist()])
    assert torch.equal(got, ref), seed
    assert torch.isnan(round_tf32(torch.tensor([float("nan")]))).all()
    # representable in 10 mantissa bits: the low 13 bits are zero
    assert ((got.view(torch.int32) & 0x1FFF) == 0)[torch.isfinite(got)].all()


def test_round_bf16_keeps_7_mantissa_bits():
    seed = fresh_seed()
    x = torch.randn(1000, generator=torch.Generator().manual_seed(seed))
    r = round_bf16(x)
    assert r.dtype == torch.float32
    assert ((r.view(torch.int32) & 0xFFFF) == 0).all()
    assert ((r - x).abs() <= x.abs() * 2**-8).all(), seed


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.double() - ref).abs().max() / ref.abs().max()).item()


@pytest.mark.numeric
@pytest.mark.parametrize("op", ["bmm", "baddbmm", "addmm"])
def test_precisions_against_float64(op):
    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(3, 40, 300, generator=g)
    b = torch.randn(3, 300, 20, generator=g)
    bias = torch.randn(3, 1, 20, generator=g)
    if op == "addmm":
        a, b, bias = a[0], b[0], bias[0]
        ref = bias.double() + a.double() @ b.double()
    elif op == "bmm":
        ref = a.double() @ b.double()
    else:
        ref = bias.double() + a.double() @ b.double()
    errs, outs = {}, {}
    for p in ("fp32", "tf32", "bf16"):
        mm = Matmul(p, torch.device("cpu"))
        out = torch.full(ref.shape, float("nan"))
        if op == "bmm":
            got = mm.bmm(a, b, out=out)
        elif op == "baddbmm":
            got = mm.baddbmm(bias, a, b, out=out)
        else:
            got = mm.addmm(bias, a, b)
        assert got.dtype == torch.float32 and torch.isfinite(got).all()
        outs[p], errs[p] = got, rel_err(got, ref)
    # fp32: a pass of 300 products and their sum, and the bias (tests/tolerance.py)
    assert_close(f"fp32 {op} (seed {seed})", outs["fp32"], ref, bound(300 + 1, ops="a sum of 300 products"))
    # tf32 and bf16 round each operand once (the products and sums are fp32's): 2 roundings of
    # their eps per product, which the sum's random signs do not make larger relative to the
    # largest output; and not much smaller than one eps: the operands were rounded
    for p, eps in (("tf32", EPS_TF32), ("bf16", EPS_BF16)):
        assert_close(f"{p} {op} (seed {seed})", outs[p], ref, bound(2, eps=eps, ops="both operands"))
        assert errs[p] > eps / 16, (p, errs, seed)
    assert errs["fp32"] < errs["tf32"] < errs["bf16"], (errs, seed)


def test_resolve():
    assert resolve("auto", torch.device("cpu")) == "fp32"
    assert resolve("auto", torch.device("cuda", 0)) == "tf32"
    assert resolve("bf16", torch.device("cpu")) == "bf16"
    with pytest.raises(PrecisionError):
        resolve("fp16", torch.device("cpu"))
