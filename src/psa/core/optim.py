"""AdamW, the one optimizer of every meta-loop: torch's (fused where it can be) for members that
start each loop afresh, and a per-member step count for members whose optimizer state travels
with their LKG (psa.core.variant's persistent optimizer). Both engines (psa.core.mlp and
psa.core.module) build and step their optimizers here.

Weight decay is never AdamW's here: the engines apply each member's decoupled decay themselves
(param *= 1 - lr * wd, in float32 as torch.optim.AdamW evaluates it), so one optimizer serves
members of different rates.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import Any

import torch

from psa.core.hparams import HParams


def new_adamw(params: list[torch.Tensor], hp: HParams, capturable: bool = False) -> torch.optim.AdamW:
    """A fresh AdamW over `params` (weight_decay 0), fused where this torch and device have it.

    The fused kernel makes one pass over parameters, gradients and moments instead of a dozen;
    it rounds differently from the reference loop in the last bits only, within what the oracle
    tests allow. `capturable`: its step count lives on the device (no host sync), as a CUDA graph
    needs. Where this torch or device refuses the fused kernel, torch's default AdamW instead.
    """
    kw: dict[str, Any] = dict(lr=hp.lr, betas=hp.betas, eps=hp.eps, weight_decay=0.0)
    if capturable:
        kw["capturable"] = True
    try:
        return torch.optim.AdamW(params, fused=True, **kw)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(params, **kw)


def adamw_step(opt: torch.optim.Optimizer) -> None:
    """One step of `opt`, the same update as opt.step(). For a fused AdamW over one flat CPU
    buffer, every step after the first makes the two calls opt.step() makes (the step count,
    then torch._fused_adamw_) directly, without torch.optim's per-call Python, which is a
    noticeable share of a narrow net's step on a CPU (bench/results/narrow_cpu.md). The first
    step of an optimizer (which creates its state) and any other optimizer take opt.step(); so
    does every step after the direct call once failed (another torch's signature: one warning,
    the step count restored, nothing else written)."""
    direct = getattr(opt, "_psa_direct", None)
    if direct is None:
        opt.step()
        if isinstance(opt, torch.optim.AdamW) and not getattr(opt, "_psa_failed", False):
            group = opt.param_groups[0]
            params = group["params"]
            st = opt.state.get(params[0], {}) if len(params) == 1 else {}
            if (len(params) == 1 and params[0].device.type == "cpu" and group.get("fused")
                    and not group.get("amsgrad") and not group.get("maximize") and len(opt.param_groups) == 1
                    and {"step", "exp_avg", "exp_avg_sq"} <= set(st) and torch.is_tensor(st["step"])
                    and isinstance(group["lr"], float)):
                beta1, beta2 = group["betas"]
                opt._psa_direct = (params[0], st["exp_avg"], st["exp_avg_sq"], st["step"],  # type: ignore[attr-defined]
                                   {"amsgrad": False, "lr": group["lr"], "beta1": beta1, "beta2": beta2,
                                    "weight_decay": group["weight_decay"], "eps": group["eps"], "maximize": False})
        return
    p, exp_avg, exp_avg_sq, step, kw = direct
    torch._foreach_add_([step], 1)
    try:
        torch._fused_adamw_([p], [p.grad], [exp_avg], [exp_avg_sq], [], [step], **kw)
    except (RuntimeError, TypeError) as e:
        # the direct call rejected its arguments (checked before anything is written): undo the
        # count and take the documented path from now on
        step.sub_(1)
        opt._psa_direct = None  # type: ignore[attr-defined]
        opt._psa_failed = True  # type: ignore[attr-defined]
        warnings.warn(f"psa: AdamW's direct step failed ({type(e).__name__}); using optimizer.step()",
                      RuntimeWarning, stacklevel=2)
        opt.step()


def reset_adamw(opt: torch.optim.Optimizer) -> None:
    """Zero the step count and both moments in place: the state of a freshly built AdamW, at
    the same addresses (which a captured graph relies on)."""
    for state in opt.state.values():
        for v in state.values():
            if torch.is_tensor(v):
                v.zero_()


def step_dtype(device: torch.device) -> torch.dtype:
    """AdamW step counts per member: float64 (bias corrections as torch's AdamW computes them in
    Python floats), float32 on MPS, which has no float64."""
    return torch.float32 if device.type == "mps" else torch.float64


Moments = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]  # parameter, gradient, m, v


def member_adamw_step(tensors: Iterable[Moments], steps: torch.Tensor, hp: HParams, member_dim: int) -> None:
    """One AdamW step of members at different step counts: `steps` (C,) counts each member's
    steps (advanced here), and every (parameter, gradient, first moment, second moment) of
    `tensors` holds the C members along axis `member_dim`. The update is torch.optim.AdamW's
    single-tensor one (weight_decay 0) with each member's own bias corrections."""
    beta1, beta2 = hp.betas
    steps += 1
    step_size = (hp.lr / (1 - beta1 ** steps)).to(torch.float32)
    bc2_sqrt = torch.sqrt(1 - beta2 ** steps).to(torch.float32)
    for p, g, m, v in tensors:
        shape = [1] * p.dim()
        shape[member_dim] = -1
        m.lerp_(g, 1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        denom = (v.sqrt() / bc2_sqrt.view(shape)).add_(hp.eps)
        p.sub_(step_size.view(shape) * m / denom)
