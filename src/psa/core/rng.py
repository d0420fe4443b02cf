"""Counter-based randomness: the data order and the dropout masks as hashes of integers.

Every random draw of training is a pure function of (seed, loop, step, position), computed with
exact integer arithmetic on whatever device holds the data. So the same seed gives the same
data order and the same dropout masks on a CPU and on a GPU, inside a captured CUDA graph (no
generator state to carry between replays), and whatever other members share the population.

The hash is `lowbias32` (a 32-bit xorshift-multiply finaliser, a bijection on 32-bit words).
Words travel in int64 tensors. torch has no unsigned 32-bit multiply, so on accelerators the
multiply is done exactly in 16-bit halves; on the CPU numpy's uint32 arithmetic (which wraps by
definition) computes it, faster there (docs/engine.md); the Triton programs
(psa.core.kernels.programs) use native uint32. All three compute the same bits, and the tests
hold them to it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from psa.core.device import to_device
from psa.core.member import derive_seed

# Names the streams below; recorded with studies and checkpoints, so that a run is never
# continued with other random streams than it started with.
VERSION = "lowbias32-1"

MASK32 = 0xFFFFFFFF
MIX_C1 = 0x7FEB352D
MIX_C2 = 0x846CA68B


def mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2**32 for int64 tensors holding 32-bit words, without int64 overflow."""
    lo = x & 0xFFFF
    hi = x >> 16
    return (lo * c + (((hi * (c & 0xFFFF)) & 0xFFFF) << 16)) & MASK32


def _mix32_torch(x: torch.Tensor) -> torch.Tensor:
    x = x ^ (x >> 16)
    x = mul32(x, MIX_C1)
    x = x ^ (x >> 15)
    x = mul32(x, MIX_C2)
    return x ^ (x >> 16)


def mix32_np(x: np.ndarray) -> np.ndarray:
    """lowbias32 of a uint32 array (wrapping uint32 arithmetic), in place; returns it."""
    x ^= x >> np.uint32(16)
    x *= np.uint32(MIX_C1)
    x ^= x >> np.uint32(15)
    x *= np.uint32(MIX_C2)
    x ^= x >> np.uint32(16)
    return x


def mix32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 of every 32-bit word in `x` (int64 tensor, values in [0, 2**32))."""
    if x.device.type == "cpu":
        return torch.from_numpy(mix32_np(x.numpy().astype(np.uint32)).astype(np.int64))
    return _mix32_torch(x)


def loop_keys(seed: int, purpose: str, loop: int) -> tuple[int, int]:
    """Two 32-bit keys for one purpose ("order", "dropout") of one trial's meta-loop."""
    k = derive_seed(seed, purpose, loop)
    return k & MASK32, (k >> 32) & MASK32


def data_order(seeds: Sequence[int], loop: int, n: int, device: torch.device | str) -> torch.Tensor:
    """(len(seeds), n) int64: each seed's permutation of range(n) for `loop`.

    Position i sorts by mix32(mix32(i ^ a) ^ b), a keyed bijection of i, so no two keys tie
    and the sort is a permutation, the same on every device.
    """
    keys = to_device(torch.tensor([loop_keys(s, "order", loop) for s in seeds], dtype=torch.int64),
                     torch.device(device))
    i = torch.arange(n, dtype=torch.int64, device=keys.device).unsqueeze(0)
    h = mix32(mix32(i ^ keys[:, :1]) ^ keys[:, 1:])
    if h.device.type == "cpu":
        # the keys are distinct, so any sort gives this permutation; numpy sorts 32-bit keys
        # faster than torch.sort sorts int64 ones (docs/engine.md)
        return torch.from_numpy(np.argsort(h.numpy().astype(np.uint32), axis=1).astype(np.int64))
    return torch.sort(h, dim=1).indices


def dropout_threshold(p: float) -> int:
    """The 32-bit threshold below which a unit is dropped: P(hash < t) = t / 2**32 = p."""
    return min(MASK32, max(0, round(p * 2**32)))


def position_hash(rows: int, units: int, device: torch.device | str) -> torch.Tensor:
    """(rows, units) mix32(r * units + u): the step-independent half of every dropout hash,
    computed once per engine and reused every step."""
    c = torch.arange(rows * units, dtype=torch.int64, device=device).view(rows, units)
    return mix32(c & MASK32)


def step_keys(keys: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """(D,) the key of one training step of each member: keys (D, 2) from loop_keys(seed,
    "dropout", loop); step a 0-d int64 tensor (0-based), so that a graph can advance it."""
    return mix32(mix32(step ^ keys[:, 0]) ^ keys[:, 1])


def dropout_noise(pos_hash: torch.Tensor, keys: torch.Tensor, threshold: torch.Tensor,
                  scale: torch.Tensor) -> torch.Tensor:
    """(D, rows, units) F.dropout's multiplier, 0 or 1/(1-p), for D members at one step.

    pos_hash (rows, units) from position_hash; keys (D,) from step_keys; threshold (D,) int64
    from dropout_threshold; scale (D,) float32. Unit u of row r is kept iff
    mix32(pos_hash[r, u] ^ key) >= threshold.
    """
    if pos_hash.device.type == "cpu":
        h = mix32_np(pos_hash.numpy().astype(np.uint32)[None] ^ keys.numpy().astype(np.uint32).reshape(-1, 1, 1))
        keep = h >= threshold.numpy().astype(np.uint32).reshape(-1, 1, 1)
        return torch.from_numpy(keep).to(torch.float32) * scale.view(-1, 1, 1)
    h = _mix32_torch(pos_hash.unsqueeze(0) ^ keys.view(-1, 1, 1))
    return (h >= threshold.view(-1, 1, 1)).to(torch.float32) * scale.view(-1, 1, 1)
