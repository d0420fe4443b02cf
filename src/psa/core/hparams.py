"""The paper's training hyperparameters (Table VI): the one place their defaults are written."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from psa.core.errors import ConfigError
from psa.core.member import Member, make_member
from psa.core.variant import DEFAULT, Variant

DIVERGED_CHOICES = ("score", "discard")


BLOCK_DROPOUT = ("mode", "always")


@dataclass(frozen=True)
class HParams:
    """What every trial trains with, whatever its mode; a mode only decides whether the decay
    and dropout rates apply to it (`member`)."""

    lr: float = 1e-4  # AdamW learning rate
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW's moment decays (PyTorch's defaults)
    eps: float = 1e-8  # AdamW's epsilon
    batch_size: int = 256  # the epoch's last batch keeps the remainder (80 of 50,000 images)
    weight_decay: float = 1e-4  # `decay` mode's AdamW weight decay; every other mode uses exactly 0
    dropout: float = 0.1  # `dropout` mode's rate after every hidden ReLU; no other mode drops
    meta_loops: int = 100  # meta-loops per trial
    # How a candidate whose training loss went non-finite is scored. "score": as the authors'
    # harness does, on whatever its (NaN) logits predict, and promoted like any other candidate;
    # "discard": never promoted, its accuracy recorded as missing (psa's earlier rule,
    # docs/engine.md#a-diverged-candidate).
    diverged: str = "score"
    # Research knobs, off by default (the paper's engine). They reproduce the two defects of
    # the authors' first ResMLP runs: AdamW's default weight decay (0.01) in every mode but
    # `decay` (whose own rate replaced it), and dropout inside the residual blocks in every mode.
    base_weight_decay: float = 0.0  # decay of every mode except `decay`, which uses weight_decay
    block_dropout: str = "mode"  # ResMLP's in-block dropout: "mode" (dropout mode only) or "always"

    def __post_init__(self) -> None:
        for name in ("lr", "eps", "weight_decay", "dropout", "base_weight_decay"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise ConfigError(f"{name.replace('_', ' ')} must be a number, got {v!r}")
            object.__setattr__(self, name, float(v))
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"learning rate must be a positive number, got {self.lr}")
        for name in ("batch_size", "meta_loops"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"{name.replace('_', ' ')} must be a positive integer, got {v!r}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"betas must be two numbers in [0, 1), got {self.betas}")
        if not (self.eps > 0):
            raise ConfigError(f"eps must be positive, got {self.eps}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ConfigError(f"weight decay must be a number >= 0, got {self.weight_decay}")
        if not (0.0 <= self.dropout < 1.0):
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.diverged not in DIVERGED_CHOICES:
            raise ConfigError(f"diverged must be one of {', '.join(DIVERGED_CHOICES)}, got {self.diverged!r}")
        if not (math.isfinite(self.base_weight_decay) and self.base_weight_decay >= 0):
            raise ConfigError(f"base weight decay must be a number >= 0, got {self.base_weight_decay}")
        if self.block_dropout not in BLOCK_DROPOUT:
            raise ConfigError(f"block dropout must be one of {', '.join(BLOCK_DROPOUT)}, got {self.block_dropout!r}")

    def member(self, mode: str, seed: int, variant: Variant = DEFAULT) -> Member:
        """The trial of `mode` and `seed` (and `variant`): decay's rate in `decay` mode only (the
        base weight decay, 0 by default, elsewhere), dropout's in `dropout` mode only, exactly 0
        elsewhere."""
        return make_member(mode, seed, decay_rate=self.weight_decay, dropout_rate=self.dropout,
                           base_decay=self.base_weight_decay, variant=variant)

    def block_dropout_rate(self, member: Member) -> float:
        """The dropout rate inside a ResMLP's residual blocks for `member`: its own (the
        dropout mode's rate, else 0), or with block_dropout "always" this rate in every mode."""
        return self.dropout if self.block_dropout == "always" else member.dropout

    def to_dict(self) -> dict[str, Any]:
        """JSON-able fields (betas as a list), as checkpoints and run.json store them. The
        research knobs are absent at their defaults: files of default runs are unchanged."""
        d = asdict(self)
        d["betas"] = list(self.betas)
        for name, default in KNOB_DEFAULTS.items():
            if d[name] == default:
                del d[name]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> HParams:
        """The inverse of to_dict; keys it does not know (run.json keeps the precision and the
        validation budget beside the hyperparameters) are ignored, missing ones take the
        paper's values."""
        known = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in known}
        if "betas" in kw:
            kw["betas"] = tuple(kw["betas"])
        return cls(**kw)

    def updated(self, **overrides: Any) -> HParams:
        """A copy with the overrides that are not None (flags the user did not give are None)."""
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})



# settings left out of saved hyperparameters and design digests at their defaults, so that runs
# and studies from before they existed read and hash as they did
KNOB_DEFAULTS = {"base_weight_decay": HParams.base_weight_decay, "block_dropout": HParams.block_dropout,
                 "diverged": HParams.diverged}
