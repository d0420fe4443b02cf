"""The tests' tolerance policy (docs/architecture.md, "Tolerances in the tests"), in one place.

Two computations of the same value that differ in the order of their float operations (another
kernel, blocking, vector width, fused multiply-add, a batched path against a one-model loop, a
float64 reference) differ by rounding. Its size is modelled as a random walk: each operation
on the longest chain that leads to the value adds an independent error of about eps relative to
the magnitudes involved, so two results that n operations separate differ by about
eps * sqrt(n) of the value's scale (Higham and Mary's probabilistic rounding error analysis; the
worst case, eps * n, is far too loose to catch a one-step error in a training run of 10^5
operations). The bound is

    |got - ref| <= c * eps * sqrt(n) * scale

with scale the largest |value| of the reference tensor (each tensor of a state dict on its own)
unless a test names the quantity's natural scale, and c one of two constants:

- ONE_PASS = 4 for one computation (a forward, a step's gradients, a loss): the probabilistic
  bound's lambda = 3 for each side, and sqrt(2) for the difference of two independent roundings.
- TRAINED = 32 for parameters that went through AdamW steps: AdamW divides each gradient element
  by its own running magnitude, so an element whose gradient is a small difference of large
  terms (a first layer in front of batch normalization; a pixel that few images light) takes
  lr-sized steps whose rounding is relative to that small gradient, not to the layer. The
  largest difference measured is 6 eps sqrt(n) on AVX2, 3.4 on torch's default kernels and
  about 8 on AVX-512 (estimated from a report there), all in the module tests' BatchNorm MLP
  (tests/test_module.py); 32 leaves 4x above it, and a step left out of a run still lands 30x
  or more above the bound (tests/test_tolerance.py).

Set PSA_TOLERANCE_LOG=<file> to append every comparison's ratio (observed / bound), its kind
(close: must be <= 1; apart: must be > 1; compare: the test decides), its test and its bound to
<file>: the measurement the constants come from, to redo on a new machine.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

EPS32 = torch.finfo(torch.float32).eps  # 2^-23: float32's spacing at 1
EPS_TF32 = 2.0**-10  # the tensor cores' operands: 10 mantissa bits
EPS_BF16 = 2.0**-7  # 7 mantissa bits
EPS64 = torch.finfo(torch.float64).eps  # a float64 reference checked against float64
ONE_PASS = 4.0
TRAINED = 32.0
ADAMW_OPS = 12  # AdamW's elementwise operations on one parameter per step (moments, bias corrections, sqrt, update)

Tensors = torch.Tensor | Mapping[str, torch.Tensor]


@dataclass(frozen=True)
class Bound:
    """The largest |got - ref| allowed as a fraction of the scale, and how it was derived."""

    rel: float
    why: str

    def __str__(self) -> str:
        return f"{self.rel:.3g} = {self.why}"


def bound(n_ops: int, c: float = ONE_PASS, eps: float = EPS32, ops: str = "") -> Bound:
    """c * eps * sqrt(n_ops); `ops` says where n_ops comes from."""
    name = {EPS32: "eps32", EPS_TF32: "eps_tf32", EPS_BF16: "eps_bf16", EPS64: "eps64"}.get(eps, f"{eps:.3g}")
    return Bound(c * eps * math.sqrt(n_ops), f"{c:g} {name} sqrt({n_ops}{': ' + ops if ops else ''})")


def pass_ops(widths: Sequence[int], batch: int = 0, extra: int = 0) -> int:
    """The float operations on the longest chain of one forward and backward pass through a net
    whose dot products have lengths `widths`, input first (an MLP's layer widths; a convolution
    counts in_channels x kernel area): each layer's sum over its inputs and the softmax over the
    classes (sum(widths)), the backward's sums over each hidden layer's consumers
    (sum(widths[2:])), the weight gradient's sum over the `batch` rows, and `extra` (batch
    normalization's four reductions over the batch, say)."""
    return sum(widths) + sum(widths[2:]) + batch + extra


def pass_bound(widths: Sequence[int], batch: int = 0, extra: int = 0, eps: float = EPS32) -> Bound:
    """One forward and backward pass (no optimizer step between the two results): ONE_PASS."""
    n = pass_ops(widths, batch, extra)
    return bound(n, ONE_PASS, eps, f"one pass through {tuple(widths)}, batch {batch}"
                 + (f" + {extra}" if extra else ""))


def training_bound(steps: int, widths: Sequence[int], batch: int, extra: int = 0,
                   c: float = TRAINED) -> Bound:
    """`steps` training steps of pass_ops(...) + ADAMW_OPS each: TRAINED for the parameters. A
    loss along the run takes c=ONE_PASS: AdamW's amplification sits on elements whose gradient
    all but vanishes, which therefore barely move the loss."""
    per = pass_ops(widths, batch, extra) + ADAMW_OPS
    return bound(steps * per, c, EPS32, f"{steps} steps x {per} ops, widths {tuple(widths)}, batch {batch}"
                 + (f" + {extra}" if extra else ""))


def net_widths(arch, model: str = "simplemlp") -> tuple[int, ...]:
    """pass_ops' widths of psa's own nets: a ResMLP's dot products in compute order (its skips
    add a term, not a chain)."""
    from psa.core.model import linear_shapes

    shapes = linear_shapes(arch, model)
    return (shapes[0][1], *(o for o, _ in shapes))


def epoch_steps(n: int, batch: int) -> int:
    """Steps of one epoch of n rows (the last batch partial)."""
    return -(-n // batch)


@dataclass(frozen=True)
class Comparison:
    ratio: float  # the worst entry's (max |got - ref| / scale) / bound.rel: above 1 (or NaN) fails
    message: str


def _entries(x: Tensors) -> dict[str, torch.Tensor]:
    return dict(x) if isinstance(x, Mapping) else {"": x}


def compare(what: str, got: Tensors, ref: Tensors, b: Bound, scale: float | None = None,
            kind: str = "compare") -> Comparison:
    """`got` against `ref` (tensors, or dicts of them compared key by key) under bound `b`,
    relative to `scale`, or else to each reference tensor's largest |value|. Integer tensors
    must be equal; NaN and infinities must sit where the reference has them. `kind` (close,
    apart, compare) goes to the log only."""
    g, r = _entries(got), _entries(ref)
    assert g.keys() == r.keys(), f"{what}: keys {sorted(g)} != {sorted(r)}"
    worst, message = 0.0, f"{what}: within {b}"
    for key, a in g.items():
        ref_t = r[key]
        name = f"{what} {key}".rstrip()
        if not ref_t.is_floating_point():
            if not torch.equal(a, ref_t):
                return Comparison(math.inf, f"{name}: integer values differ (compared exactly)")
            continue
        a64, r64 = a.detach().double().cpu(), ref_t.detach().double().cpu()
        same = (a64 == r64) | (a64.isnan() & r64.isnan())
        diff = torch.where(same, 0.0, (a64 - r64).abs())
        d = diff.max().item() if diff.numel() else 0.0
        s = scale if scale is not None else (r64[r64.isfinite()].abs().max().item() if r64.isfinite().any() else 0.0)
        ratio = (0.0 if d == 0 else math.inf) if s == 0 else d / s / b.rel
        if not ratio <= worst:  # NaN included
            worst = ratio
            message = (f"{name}: differs from its reference by {d:.3g} = {d / s if s else math.inf:.3g} of "
                       f"{'the scale' if scale is not None else 'its largest |value|'} {s:.3g}, "
                       f"{ratio:.3g}x the bound {b}")
            if math.isnan(ratio):
                break
    log = os.environ.get("PSA_TOLERANCE_LOG")
    if log:
        with open(log, "a") as f:
            f.write(f"{worst:.4g}\t{kind}\t{os.environ.get('PYTEST_CURRENT_TEST', '?')}\t{what}\t{b}\n")
    return Comparison(worst, message)


def assert_close(what: str, got: Tensors, ref: Tensors, b: Bound, scale: float | None = None) -> None:
    """compare(...), failing with its message where the difference exceeds the bound."""
    c = compare(what, got, ref, b, scale, "close")
    assert c.ratio <= 1, c.message


def assert_apart(what: str, got: Tensors, ref: Tensors, b: Bound, scale: float | None = None) -> None:
    """The opposite: `got` is a different computation (another learning rate, optimizer, decay),
    and the bound must tell it from `ref`."""
    c = compare(what, got, ref, b, scale, "apart")
    assert c.ratio > 1, f"{what}: a different computation passes as rounding: {c.message}"
