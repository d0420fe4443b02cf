"""A trial of a population: its mode, seed, regularisation rates and engine variant, the six
modes, and the seeds derived from a trial's seed. Shared by psa's own nets (psa.core.mlp) and
a model of your own (psa.core.module)."""

from __future__ import annotations

import hashlib
import math
from collections import Counter
from dataclasses import dataclass
from functools import cached_property

from psa.core.errors import ConfigError
from psa.core.variant import DEFAULT, Variant

MODES = ("none", "decay", "dropout", "full", "hidden", "output")
BASELINE_MODES = ("none", "decay", "dropout")
ABLATIVE_MODES = ("full", "hidden", "output")


# the largest seed of a trial: SQLite stores integers in 64 signed bits, and torch.manual_seed
# takes no more either way
MAX_SEED = 2**63 - 1


def seed_problem(seed: object, trials: int = 1) -> str | None:
    """What is wrong with `seed` as the base seed of `trials` trials (seeds seed..seed+trials-1),
    or None: an integer >= 0 whose last trial's seed is at most MAX_SEED."""
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        return f"seed must be an integer >= 0, got {seed!r}"
    if seed + trials - 1 > MAX_SEED:
        return f"seed + trials - 1 must be at most {MAX_SEED:,} (2^63 - 1), got {seed + trials - 1:,}"
    return None


def derive_seed(seed: int, *tags: object) -> int:
    """A 63-bit seed for one purpose (`tags`) of one trial, independent of everything else."""
    text = ":".join(str(t) for t in (seed, *tags)).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") >> 1


@dataclass(frozen=True)
class Member:
    """One trial: its mode, seed and the regularisation rates it trains with."""

    mode: str
    seed: int
    weight_decay: float = 0.0
    dropout: float = 0.0
    variant: Variant = DEFAULT  # the engine's settings beyond the mode; the default is the paper's

    @property
    def ablative(self) -> bool:
        """True for the PSA modes that ablate a neuron every loop after the first."""
        return self.mode in ABLATIVE_MODES

    @cached_property
    def key(self) -> tuple[str, str, int]:
        """What identifies the trial while its mode may change on a schedule: (the mode it
        started in, its variant's settings JSON, seed). Cached: every recorded meta-loop asks
        each member for it, and the JSON costs tens of microseconds."""
        return self.variant.start_mode(self.mode), self.variant.to_json(), self.seed

def make_member(mode: str, seed: int, decay_rate: float, dropout_rate: float, base_decay: float = 0.0,
                variant: Variant = DEFAULT) -> Member:
    """The trial of `mode` and `seed`: `decay_rate` in decay mode only, `dropout_rate` in
    dropout mode only, exactly 0 otherwise (HParams.member passes the paper's rates).

    `base_decay` (default 0) is the decay of every other mode: decay mode's own rate takes its
    place, as AdamW(weight_decay=...) replaced AdamW's default 0.01 in the authors' harnesses."""
    if mode not in MODES:
        raise ConfigError(f"unknown mode {mode!r}; choose from {', '.join(MODES)}")
    wd = decay_rate if mode == "decay" else base_decay
    p = dropout_rate if mode == "dropout" else 0.0
    if not (math.isfinite(wd) and wd >= 0):
        raise ConfigError(f"weight decay must be a finite number >= 0, got {wd}")
    if not (0.0 <= p < 1.0):
        raise ConfigError(f"dropout must be in [0, 1), got {p}")
    return Member(mode, int(seed), float(wd), float(p), variant)


def seed_groups(members: tuple[Member, ...] | list[Member]) -> tuple[int, int]:
    """(G, k): G groups of k consecutive members sharing a seed (members sorted by seed), or
    (M, 1) if the seeds have uneven counts."""
    counts = Counter(m.seed for m in members)
    k = next(iter(counts.values()))
    if all(c == k for c in counts.values()):
        return len(counts), k
    return len(members), 1
