"""psa.core.optim.adamw_step: the fused AdamW's step without torch.optim's per-call Python gives
opt.step()'s bits, across a reset of the state, and falls back to opt.step() when the direct
call is refused."""

from __future__ import annotations

import warnings

import pytest
import torch

from psa.core.optim import adamw_step, new_adamw, reset_adamw
from psa.core.hparams import HParams

from .conftest import fresh_seed


def twins(seed: int, n: int = 1000):
    g = torch.Generator().manual_seed(seed)
    p = torch.randn(n, generator=g)
    q = p.clone()
    hp = HParams(lr=1e-3)
    a, b = new_adamw([p], hp), new_adamw([q], hp)
    if not a.param_groups[0].get("fused"):
        pytest.skip("this torch has no fused AdamW on the CPU")
    p.grad, q.grad = torch.empty_like(p), torch.empty_like(q)
    return g, p, q, a, b


def test_direct_step_gives_the_optimizers_bits():
    seed = fresh_seed()
    g, p, q, a, b = twins(seed)
    for i in range(25):
        grad = torch.randn(p.shape, generator=g) * (10.0 if i % 7 == 0 else 0.1)
        p.grad.copy_(grad)
        q.grad.copy_(grad)
        adamw_step(a)
        b.step()
        if i == 12:  # a new meta-loop: the state zeroed in place
            reset_adamw(a)
            reset_adamw(b)
        assert torch.equal(p, q), (seed, i)
    assert getattr(a, "_psa_direct", None) is not None  # the direct path was taken
    sa, sb = a.state[p], b.state[q]
    for k in ("step", "exp_avg", "exp_avg_sq"):
        assert torch.equal(sa[k], sb[k]), k


def test_a_refused_direct_call_falls_back_with_one_warning(monkeypatch):
    seed = fresh_seed()
    g, p, q, a, b = twins(seed)

    def grads() -> None:
        grad = torch.randn(p.shape, generator=g)
        p.grad.copy_(grad)
        q.grad.copy_(grad)

    for _ in range(2):
        grads()
        adamw_step(a)
        b.step()

    real = torch._fused_adamw_

    def refuse(*args, **kw):  # a torch whose kernel wants an argument that only opt.step() passes
        if "grad_scale" not in kw:
            raise TypeError("missing grad_scale")
        return real(*args, **kw)

    monkeypatch.setattr(torch, "_fused_adamw_", refuse)
    grads()
    with pytest.warns(RuntimeWarning, match="direct step failed"):
        adamw_step(a)
    monkeypatch.undo()
    b.step()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(3):
            grads()
            adamw_step(a)
            b.step()
    assert torch.equal(p, q), seed
    assert torch.equal(a.state[p]["step"], b.state[q]["step"])
