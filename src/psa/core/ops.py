"""The engine's arithmetic on members' stacked tensors, written once for the torch backend: a
Linear layer (bias inside the matrix product) and its gradients, ReLU's backward, and the mean
cross-entropy with its gradient.

psa's own engine (psa.core.mlp.step) calls these on a whole population, and a model of your own
(psa.core.module.functional) calls them under torch.func.vmap, so that an MLP given as a plain
nn.Module rounds exactly as the engine does. The two can differ by rounding only if they add in
another order, and AdamW's first steps turn a last-bit difference in a near-zero gradient into
an lr-sized one (docs/module.md), so this is the one place these sums are written. The Triton
kernels (psa.core.kernels.triton_stack) and the fused CPU step (psa.core.kernels.cpu_stack) are
the other backends of the hidden stack.
"""

from __future__ import annotations

import torch

from psa.core.precision import Matmul

# fp32 products on any device (Matmul in fp32 calls torch's own bmm and baddbmm)
FP32 = Matmul("fp32", torch.device("cpu"))


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, mm: Matmul = FP32,
           out: torch.Tensor | None = None) -> torch.Tensor:
    """(C, rows, o) = x (C, rows, i) @ w (C, o, i)^T + b (C, o): the bias accumulated inside the
    product, as one baddbmm."""
    return mm.baddbmm(b.unsqueeze(1), x, w.transpose(1, 2), out=out)


def linear_grads(dz: torch.Tensor, x: torch.Tensor, mm: Matmul = FP32, gw: torch.Tensor | None = None,
                 gb: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(dL/dw (C, o, i), dL/db (C, o)) of `linear` from its output gradient dz (C, rows, o) and
    its input x (C, rows, i); into `gw` and `gb` where given."""
    gw = mm.bmm(dz.transpose(1, 2), x, out=gw)
    gb = torch.sum(dz, dim=1, out=gb) if gb is not None else dz.sum(dim=1)
    return gw, gb


def linear_input_grad(dz: torch.Tensor, w: torch.Tensor, mm: Matmul = FP32, out: torch.Tensor | None = None,
                      add: torch.Tensor | None = None) -> torch.Tensor:
    """dL/dx (C, rows, i) of `linear` from dz (C, rows, o) and w (C, o, i), plus `add` (a skip
    connection's gradient) inside the product where given."""
    if add is not None:
        return mm.baddbmm(add, dz, w, out=out)
    return mm.bmm(dz, w, out=out)


def relu_grad_(dh: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """ReLU's backward in place in `dh`: 0 where the unit is off (at 0 too, as PyTorch)."""
    return torch.ops.aten.threshold_backward.grad_input(dh, h, 0, grad_input=dh)


def cross_entropy(z: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each member's mean cross-entropy (C,) of logits z (C, rows, n) against labels y (C, rows),
    and the log-sum-exp (C, rows, 1) its gradient reuses."""
    lse = torch.logsumexp(z, dim=2, keepdim=True)
    return (lse - z.gather(2, y.unsqueeze(2))).mean(dim=(1, 2)), lse


def cross_entropy_grad(z: torch.Tensor, y: torch.Tensor, lse: torch.Tensor | None = None) -> torch.Tensor:
    """dLoss/dz (C, rows, n) of `cross_entropy`: (softmax(z) - onehot(y)) / rows, in a new tensor
    (`lse`: cross_entropy's, else computed again, to the same bits)."""
    y3 = y.unsqueeze(2)
    if lse is None:
        lse = torch.logsumexp(z, dim=2, keepdim=True)
    dz = torch.exp(z - lse)
    dz.scatter_add_(2, y3, torch.full_like(y3, -1, dtype=dz.dtype))
    return dz.mul_(1.0 / z.shape[1])
