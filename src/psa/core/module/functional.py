"""A model of your own computed as psa's engine computes: every plain nn.Linear and the loss run
psa.core.ops' arithmetic, batched by hand under torch.func.vmap (each autograd Function's `vmap`
rule) and, for one member, as a batch of one; nn.Dropout modules draw psa's counter-based masks
(psa.core.rng); and fp32 means fp32 (no TF32, deterministic convolutions).

Why: vmap of F.linear runs bmm and then adds the bias, and autograd's cross-entropy goes through
log_softmax's backward: the same numbers up to the last bit, but AdamW's first steps turn a
last-bit difference in a near-zero gradient into an lr-sized one, and over hundreds of steps a
member drifts apart (docs/module.md#arithmetic-the-engines-bit-for-bit). With the engine's
operations the batched path, the one-at-a-time path and psa's own engine round alike.
"""

from __future__ import annotations

import contextlib
import copy
import functools
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from psa.core import ops
from psa.core.module.units import ModelSpec


def _batch_front(info: Any, in_dims: tuple[int | None, ...], *ts: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The tensors of a vmap rule with the vmapped dimension first (expanded where absent)."""
    n = info.batch_size
    return tuple(t.movedim(d, 0) if d is not None else t.expand(n, *t.shape) for t, d in zip(ts, in_dims))


class _LinearGrad(torch.autograd.Function):
    """The weight and bias gradients of _Linear (a Function of its own, so that vmap batches
    them by hand)."""

    @staticmethod
    def forward(dz: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, ...]:  # type: ignore[override]
        return tuple(t[0] for t in ops.linear_grads(dz.unsqueeze(0), x.unsqueeze(0)))

    @staticmethod
    def setup_context(ctx: Any, inputs: Any, output: Any) -> None:
        pass

    @staticmethod
    def vmap(info: Any, in_dims: Any, dz: torch.Tensor, x: torch.Tensor) -> Any:
        return ops.linear_grads(*_batch_front(info, in_dims, dz, x)), (0, 0)


class _LinearInputGrad(torch.autograd.Function):
    """The input gradient of _Linear, bmm(dz, W); computed only where the input needs one (the
    engine never computes it for the first layer)."""

    @staticmethod
    def forward(dz: torch.Tensor, w: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return ops.linear_input_grad(dz.unsqueeze(0), w.unsqueeze(0))[0]

    @staticmethod
    def setup_context(ctx: Any, inputs: Any, output: Any) -> None:
        pass

    @staticmethod
    def vmap(info: Any, in_dims: Any, dz: torch.Tensor, w: torch.Tensor) -> Any:
        return ops.linear_input_grad(*_batch_front(info, in_dims, dz, w)), 0


class _Linear(torch.autograd.Function):
    """F.linear of a (b, i) input as the engine computes it: baddbmm, bias inside the product."""

    @staticmethod
    def forward(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return ops.linear(x.unsqueeze(0), w.unsqueeze(0), b.unsqueeze(0))[0]

    @staticmethod
    def setup_context(ctx: Any, inputs: Any, output: Any) -> None:
        x, w, _ = inputs
        ctx.save_for_backward(x, w)

    @staticmethod
    def backward(ctx: Any, dz: torch.Tensor) -> Any:  # type: ignore[override]
        x, w = ctx.saved_tensors
        gw, gb = _LinearGrad.apply(dz, x)
        return (_LinearInputGrad.apply(dz, w) if ctx.needs_input_grad[0] else None), gw, gb

    @staticmethod
    def vmap(info: Any, in_dims: Any, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> Any:
        return ops.linear(*_batch_front(info, in_dims, x, w, b)), 0


class _EngineLinear(nn.Linear):
    """nn.Linear whose forward and backward are the engine's operations (same parameters)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """F.linear, by the engine's arithmetic for a (batch, features) input with a bias."""
        if x.dim() != 2 or self.bias is None:
            return F.linear(x, self.weight, self.bias)
        return _Linear.apply(x, self.weight, self.bias)


def _ce_loss(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(C,) mean cross-entropy of members' (C, b, n) logits, as the engine."""
    return ops.cross_entropy(z, y)[0]


def _ce_grad(z: torch.Tensor, y: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """(C, b, n) gradient of _ce_loss times the incoming (C,) gradient `g`, as the engine."""
    return ops.cross_entropy_grad(z, y) * g.view(-1, 1, 1)


class _CrossEntropyGrad(torch.autograd.Function):
    @staticmethod
    def forward(z: torch.Tensor, y: torch.Tensor, g: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return _ce_grad(z.unsqueeze(0), y.unsqueeze(0), g.unsqueeze(0))[0]

    @staticmethod
    def setup_context(ctx: Any, inputs: Any, output: Any) -> None:
        pass

    @staticmethod
    def vmap(info: Any, in_dims: Any, z: torch.Tensor, y: torch.Tensor, g: torch.Tensor) -> Any:
        return _ce_grad(*_batch_front(info, in_dims, z, y, g)), 0


class _CrossEntropy(torch.autograd.Function):
    """F.cross_entropy of (b, n) logits (mean over the batch) by the engine's arithmetic."""

    @staticmethod
    def forward(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return _ce_loss(z.unsqueeze(0), y.unsqueeze(0))[0]

    @staticmethod
    def setup_context(ctx: Any, inputs: Any, output: Any) -> None:
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> Any:  # type: ignore[override]
        z, y = ctx.saved_tensors
        return _CrossEntropyGrad.apply(z, y, g), None

    @staticmethod
    def vmap(info: Any, in_dims: Any, z: torch.Tensor, y: torch.Tensor) -> Any:
        return _ce_loss(*_batch_front(info, in_dims, z, y)), 0


def cross_entropy(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of (b, n) logits against (b,) labels, rounded as psa's engine rounds it."""
    if z.dim() != 2:
        return F.cross_entropy(z, y)
    return _CrossEntropy.apply(z, y)


class Noise:
    """The dropout multipliers of the current step, shared by every MaskedDropout of a model:
    (batch, units) for one member (vmap gives each its own), or None for no dropout."""

    def __init__(self) -> None:
        self.noise: torch.Tensor | None = None


class MaskedDropout(nn.Module):
    """nn.Dropout with given multipliers: units [offset, offset + units) of the step's noise,
    shaped as this module's input. Identity in eval() or when the step draws no noise."""

    def __init__(self, holder: Noise, offset: int, units: int) -> None:
        super().__init__()
        self.holder, self.offset, self.units = holder, offset, units

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x times its slice of the noise (training with noise), else x."""
        noise = self.holder.noise
        if not self.training or noise is None:
            return x
        return x * noise[:, self.offset : self.offset + self.units].reshape(x.shape)


def engine_template(module: nn.Module, spec: ModelSpec, holder: Noise) -> nn.Module:
    """A copy of `module` that computes as psa's engine: its nn.Dropout modules draw psa's masks
    from `holder`, its plain nn.Linear modules run the engine's arithmetic (_EngineLinear)."""
    template = copy.deepcopy(module)
    off = 0
    for name, units in spec.dropouts:
        parent_name, _, attr = name.rpartition(".")
        parent = template.get_submodule(parent_name) if parent_name else template
        setattr(parent, attr, MaskedDropout(holder, off, units))
        off += units
    for m in template.modules():
        if type(m) is nn.Linear:
            m.__class__ = _EngineLinear  # same parameters and state; only the forward differs
    return template


@contextlib.contextmanager
def fp32_arithmetic() -> Iterator[None]:
    """A context in which fp32 is computed as written, with the same sums on every run: cuBLAS's
    TF32 off, and cuDNN with TF32 off, deterministic algorithms and no benchmarking (cuDNN left
    enabled or disabled as it was). The previous settings are restored on exit, also when the
    body raises.

    Why: cuDNN runs fp32 convolutions in TF32 unless told not to (torch's default
    `cudnn.allow_tf32 = True`; what that did to a small CNN on a GPU:
    bench/results/gpu-paths-h200.md) and may pick algorithms that add in any order, and a user
    may have turned cuBLAS's TF32 on."""
    matmul = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.backends.cudnn.flags(enabled=torch.backends.cudnn.enabled, benchmark=False,
                                        deterministic=True, allow_tf32=False):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul


def in_fp32(fn: Callable[..., Any]) -> Callable[..., Any]:
    """`fn` run under fp32_arithmetic()."""

    @functools.wraps(fn)
    def inner(*args: Any, **kwargs: Any) -> Any:
        with fp32_arithmetic():
            return fn(*args, **kwargs)
    return inner

