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
from psa.core.module.noise import MaskedDropout, Noise
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


class Attention(nn.MultiheadAttention):
    """nn.MultiheadAttention computed step by step (projections, scores, softmax, dropout on the
    attention weights, values, output projection) instead of by torch's fused kernels: its
    dropout is F.dropout, which psa draws from the member's own stream (psa.core.module.noise),
    and vmap batches every step (torch's fused attention has no batching rule on a CPU). Same
    parameters and attributes; engine_template gives this class to the attention modules it
    can compute (supported())."""

    @staticmethod
    def supported(m: nn.MultiheadAttention) -> bool:
        """Whether this forward computes `m`: no bias_k/bias_v, no zero attention."""
        return m.bias_k is None and m.bias_v is None and not m.add_zero_attn

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,  # type: ignore[override]
                key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
                attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """nn.MultiheadAttention.forward's arguments and results."""
        batched = query.dim() == 3
        if not batched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        tgt, n, e = query.shape  # (L, N, E) from here on
        src = key.shape[0]
        h, d = self.num_heads, self.head_dim
        if self._qkv_same_embed_dim:
            wq, wk, wv = self.in_proj_weight.chunk(3)
        else:
            wq, wk, wv = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        bq, bk, bv = self.in_proj_bias.chunk(3) if self.in_proj_bias is not None else (None, None, None)
        q = F.linear(query, wq, bq).reshape(tgt, n * h, d).transpose(0, 1)
        k = F.linear(key, wk, bk).reshape(src, n * h, d).transpose(0, 1)
        v = F.linear(value, wv, bv).reshape(src, n * h, d).transpose(0, 1)
        scores = torch.bmm(q * (d ** -0.5), k.transpose(1, 2))  # (N*H, L, S)
        if attn_mask is None and is_causal:
            attn_mask = torch.ones(tgt, src, dtype=torch.bool, device=query.device).triu(1)
        if attn_mask is not None:
            mask = attn_mask if attn_mask.dim() == 3 else attn_mask.unsqueeze(0)
            scores = scores.masked_fill(mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
        if key_padding_mask is not None:
            pad = key_padding_mask.view(n, 1, 1, src).expand(n, h, 1, src).reshape(n * h, 1, src)
            scores = scores.masked_fill(pad, float("-inf")) if pad.dtype == torch.bool else scores + pad
        weights = torch.softmax(scores, dim=-1)
        if self.dropout > 0.0:  # a dropout site of the model's (psa.core.module.noise)
            weights = F.dropout(weights, p=self.dropout, training=self.training)
        out = torch.bmm(weights, v).transpose(0, 1).reshape(tgt, n, e)
        out = F.linear(out, self.out_proj.weight, self.out_proj.bias)
        if self.batch_first and batched:
            out = out.transpose(0, 1)
        if not batched:
            out = out.squeeze(1)
        if not need_weights:
            return out, None
        w = weights.view(n, h, tgt, src)
        w = w.mean(dim=1) if average_attn_weights else w
        return out, (w if batched else w.squeeze(0))


def engine_template(module: nn.Module, spec: ModelSpec, holder: Noise) -> nn.Module:
    """A copy of `module` that computes as psa's engine: its nn.Dropout modules draw psa's masks
    from `holder`, its plain nn.Linear modules run the engine's arithmetic (_EngineLinear), and
    its attention computes step by step with the member's own dropout (Attention)."""
    template = copy.deepcopy(module)
    calls: dict[str, list[tuple[int, int]]] = {}  # each module's (offset, units) per call
    off = 0
    for name, units in spec.dropouts:
        calls.setdefault(name, []).append((off, units))
        off += units
    named = list(template.named_modules(remove_duplicate=False))
    for name, slices in calls.items():
        masked, original = MaskedDropout(holder, slices), template.get_submodule(name)
        for alias in [n for n, m in named if m is original]:  # the module under every name it has
            parent_name, _, attr = alias.rpartition(".")
            parent = template.get_submodule(parent_name) if parent_name else template
            setattr(parent, attr, masked)
    for m in template.modules():
        # same parameters and state; only the forward differs
        if type(m) is nn.Linear:
            m.__class__ = _EngineLinear
        elif type(m) is nn.MultiheadAttention and Attention.supported(m):
            m.__class__ = Attention
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
    # a Transformer layer's fused inference path would compute its evaluation otherwise than its
    # training (and has no batching rule under vmap)
    mha = getattr(torch.backends, "mha", None)
    fastpath = mha.get_fastpath_enabled() if mha is not None else None
    if mha is not None:
        mha.set_fastpath_enabled(False)
    try:
        with torch.backends.cudnn.flags(enabled=torch.backends.cudnn.enabled, benchmark=False,
                                        deterministic=True, allow_tf32=False):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul
        if mha is not None:
            mha.set_fastpath_enabled(fastpath)


def in_fp32(fn: Callable[..., Any]) -> Callable[..., Any]:
    """`fn` run under fp32_arithmetic()."""

    @functools.wraps(fn)
    def inner(*args: Any, **kwargs: Any) -> Any:
        with fp32_arithmetic():
            return fn(*args, **kwargs)
    return inner

