"""Counter-based randomness: the three implementations agree bit for bit, and the draws are
permutations and Bernoulli masks with the right rates, independent of everything but their keys."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from psa.core import rng

from .conftest import fresh_seed


def fresh_words(n: int) -> tuple[list[int], int]:
    seed = fresh_seed()
    r = random.Random(seed)
    return [r.getrandbits(32) for _ in range(n)] + [0, 1, 2**31 - 1, 2**31, 2**32 - 1], seed


def mix32_int(x: int) -> int:
    """lowbias32 of one Python int: the definition, one word at a time (the reference)."""
    x &= rng.MASK32
    x ^= x >> 16
    x = (x * rng.MIX_C1) & rng.MASK32
    x ^= x >> 15
    x = (x * rng.MIX_C2) & rng.MASK32
    return x ^ (x >> 16)


def test_mix32_paths_agree_with_the_definition():
    words, seed = fresh_words(5000)
    ref = [mix32_int(w) for w in words]
    t = torch.tensor(words, dtype=torch.int64)
    assert rng.mix32(t).tolist() == ref, seed  # numpy uint32 path (CPU)
    assert rng._mix32_torch(t).tolist() == ref, seed  # exact int64 path (accelerators)
    # a bijection: distinct inputs, distinct outputs
    assert len(set(ref)) == len(set(words))


def test_mul32_is_exact_modular_multiplication():
    words, seed = fresh_words(2000)
    for c in (rng.MIX_C1, rng.MIX_C2, 1, 0xFFFFFFFF):
        got = rng.mul32(torch.tensor(words, dtype=torch.int64), c).tolist()
        assert got == [(w * c) % 2**32 for w in words], (c, seed)


def test_data_order_is_a_permutation_per_seed_and_loop():
    order = rng.data_order([3, 4, 3], 7, 50_000, "cpu")
    assert order.shape == (3, 50_000) and order.dtype == torch.int64
    for row in order:
        assert torch.equal(row.sort().values, torch.arange(50_000))
    assert torch.equal(order[0], order[2])  # a function of (seed, loop) alone
    assert not torch.equal(order[0], order[1])
    assert not torch.equal(order[0], rng.data_order([3], 8, 50_000, "cpu")[0])
    # a shuffle, not a rotation: positions spread over the whole range, no fixed structure
    first = order[0, :1000].float()
    assert 20_000 < first.mean().item() < 30_000
    assert abs(torch.corrcoef(torch.stack([torch.arange(1000.0), first]))[0, 1].item()) < 0.1


def test_data_order_matches_the_torch_path():
    keys = torch.tensor([rng.loop_keys(11, "order", 5)], dtype=torch.int64)
    i = torch.arange(4096).unsqueeze(0)
    h = rng._mix32_torch(rng._mix32_torch(i ^ keys[:, :1]) ^ keys[:, 1:])
    assert torch.equal(torch.sort(h, dim=1).indices, rng.data_order([11], 5, 4096, "cpu"))


@pytest.mark.parametrize("p", [0.0, 0.1, 0.5, 0.9])
def test_dropout_noise_rate_scale_and_paths(p):
    rows, units = 64, 96
    keys = torch.tensor([rng.loop_keys(s, "dropout", 2) for s in range(5)], dtype=torch.int64)
    ks = rng.step_keys(keys, torch.tensor(9))
    thr = torch.full((5,), rng.dropout_threshold(p), dtype=torch.int64)
    scale = torch.ones(5) / (1.0 - torch.full((5,), p))
    ph = rng.position_hash(rows, units, "cpu")
    noise = rng.dropout_noise(ph, ks, thr, scale)
    assert noise.shape == (5, rows, units)
    h = rng._mix32_torch(ph.unsqueeze(0) ^ ks.view(-1, 1, 1))
    ref = (h >= thr.view(-1, 1, 1)).float() * scale.view(-1, 1, 1)
    assert torch.equal(noise, ref)
    kept = (noise > 0).float().mean().item()
    assert abs(kept - (1 - p)) < 0.02
    assert torch.all((noise == 0) | (noise == scale.view(-1, 1, 1)))
    if p > 0:
        assert not torch.equal(noise[0], noise[1])  # members draw independent masks


def test_step_keys_differ_by_step_and_member():
    keys = torch.tensor([rng.loop_keys(s, "dropout", 1) for s in range(4)], dtype=torch.int64)
    per_step = torch.stack([rng.step_keys(keys, torch.tensor(s)) for s in range(196)])
    assert per_step.unique().numel() == per_step.numel()


def test_dropout_threshold_bounds():
    assert rng.dropout_threshold(0.0) == 0
    assert rng.dropout_threshold(0.1) == round(0.1 * 2**32)
    assert rng.dropout_threshold(0.999999999999) == 2**32 - 1
    assert np.uint32(rng.dropout_threshold(0.5)) == 2**31
