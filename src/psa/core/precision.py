"""Matmul precision: strict fp32, TF32 tensor cores, or bf16 operands with fp32 accumulation.

Only the matrix products change: losses, softmax, AdamW and the master weights stay float32
in every precision.

- fp32: IEEE single precision throughout (the paper's arithmetic).
- tf32: each operand rounded to TF32 (8-bit exponent, 10-bit mantissa), products accumulated
  in fp32: what an Ampere-or-later GPU's tensor cores do with float32 matmuls when allowed.
- bf16: each operand rounded to bfloat16 (7-bit mantissa), accumulated in fp32, result fp32.

On a CUDA GPU tf32 and bf16 run on the tensor cores. Elsewhere they are emulated exactly as
defined above (operands rounded to nearest-even, then an fp32 matmul), so a CPU run with
`--precision tf32` does the GPU's arithmetic class, only slower.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch

PRECISIONS = ("fp32", "tf32", "bf16")
CHOICES = ("auto", *PRECISIONS)


class PrecisionError(ValueError):
    """An unknown precision name."""


def resolve(precision: str, device: torch.device) -> str:
    """The precision `auto` stands for on `device`: tf32 on a CUDA GPU (the tensor cores; the
    study's default there), strict fp32 elsewhere. Named precisions are returned unchanged."""
    if precision == "auto":
        return "tf32" if device.type == "cuda" else "fp32"
    if precision not in PRECISIONS:
        raise PrecisionError(f"unknown precision {precision!r}; choose from {', '.join(CHOICES)}")
    return precision


def round_tf32(t: torch.Tensor) -> torch.Tensor:
    """`t` (float32) rounded to the nearest TF32 value (ties to even); NaN and inf kept.

    Integer arithmetic on the bit pattern: add half of the 13 dropped bits' range (plus the
    kept LSB, for ties to even) and clear them. Specials are zeroed before the add, so nothing
    overflows, and put back after.
    """
    bits = t.detach().contiguous().view(torch.int32)
    special = (bits & 0x7F800000) == 0x7F800000
    safe = bits.masked_fill(special, 0)
    rounded = (safe + (0xFFF + ((safe >> 13) & 1))) & -0x2000
    return torch.where(special, bits, rounded).view(torch.float32)


def round_bf16(t: torch.Tensor) -> torch.Tensor:
    """`t` rounded to the nearest bfloat16 value (ties to even), returned as float32."""
    return t.to(torch.bfloat16).to(torch.float32)


class Matmul:
    """The engine's matrix products in one precision on one device.

    Every product of the engine goes through bmm/baddbmm/addmm here, so that the precision is
    decided in one place.
    """

    def __init__(self, precision: str, device: torch.device) -> None:
        self.precision = resolve(precision, device)
        self.device = device
        self.native = device.type == "cuda"
        self._round: Callable[[torch.Tensor], torch.Tensor] | None = None
        self._bf16_out_fp32 = False
        if not self.native and self.precision != "fp32":
            # a CPU (or MPS) has no TF32 units; emulate the arithmetic by rounding operands
            self._round = round_tf32 if self.precision == "tf32" else round_bf16
        if self.native and self.precision == "bf16":
            self._bf16_out_fp32 = _has_out_dtype(device)

    @contextlib.contextmanager
    def context(self) -> Iterator[None]:
        """Where the engine runs (or captures) its products: sets cuBLAS's float32 mode for
        the duration (TF32 on or off) and restores it afterwards."""
        if not self.native:
            yield
            return
        old = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision("high" if self.precision == "tf32" else "highest")
        try:
            yield
        finally:
            torch.set_float32_matmul_precision(old)

    def _operands(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self._round is not None:
            return self._round(a), self._round(b)
        return a, b

    def bmm(self, a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """a @ b, batched; into `out` (float32) if given."""
        if self.native and self.precision == "bf16":
            r = self._bf16(a, b)
            return r if out is None else out.copy_(r)
        a, b = self._operands(a, b)
        return torch.bmm(a, b, out=out) if out is not None else torch.bmm(a, b)

    def baddbmm(self, bias: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                out: torch.Tensor | None = None) -> torch.Tensor:
        """bias + a @ b, batched (the bias added in float32); into `out` if given."""
        if self.native and self.precision == "bf16":
            r = self._bf16(a, b)
            if out is None:
                return r.add_(bias)
            return torch.add(r, bias, out=out)
        a, b = self._operands(a, b)
        if out is not None:
            return torch.baddbmm(bias, a, b, out=out)
        return torch.baddbmm(bias, a, b)

    def addmm(self, bias: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """bias + a @ b for matrices."""
        return self.baddbmm(bias.unsqueeze(0), a.unsqueeze(0), b.unsqueeze(0)).squeeze(0)

    def _bf16(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        a16, b16 = a.to(torch.bfloat16), b.to(torch.bfloat16)
        if self._bf16_out_fp32:
            return torch.bmm(a16, b16, out_dtype=torch.float32)
        return torch.bmm(a16, b16).to(torch.float32)


def _has_out_dtype(device: torch.device) -> bool:
    """Whether this torch offers bmm(..., out_dtype=float32) for bf16 operands on `device`
    (fp32 results without a bf16 rounding of the output)."""
    try:
        a = torch.ones(1, 2, 2, dtype=torch.bfloat16, device=device)
        return torch.bmm(a, a, out_dtype=torch.float32).dtype == torch.float32
    except (RuntimeError, TypeError, NotImplementedError):
        return False
