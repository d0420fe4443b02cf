"""What a backend reports about the populations it runs: the same events for every backend.

A population's events, in order: Started, one LoopDone per meta-loop, then PopulationDone;
or PopulationFailed at any point. The driver (psa.study.driver) records them.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

import torch

# A population's checkpoint: (tensors, JSON-able metadata), as psa.core.loop.Trainer.checkpoint gives it
CheckpointState = tuple[dict[str, torch.Tensor], dict[str, Any]]


@dataclass
class Started:
    """A population began (or resumed) on a device."""

    key: str
    where: str
    loop: int


@dataclass
class LoopDone:
    """One meta-loop of a population: a row per member, and its checkpoint after it.

    `checkpoint` says who decides whether this loop is checkpointed: None, the recorder by its
    own clock (a local run, whose `state` is a weak reference to the live trainer's
    checkpoint(), to call before the population's next loop); True or False, the runner (a Ray
    worker ships the state's tensors, on the CPU and hundreds of MB for a big population, only
    when a checkpoint is due, and None in its place otherwise).
    """

    key: str
    loop: int
    # per member: (Member.key, mode, candidate_acc, promoted, layer, index, lkg_score, loss, diverged, forced)
    rows: list[tuple]
    state: weakref.WeakMethod | CheckpointState | None
    seconds: float  # wall seconds of the population so far, over all sessions
    checkpoint: bool | None = None

    def checkpoint_state(self) -> CheckpointState | None:
        """The population's checkpoint after this loop, if the event carries one (and, from a
        local run, its trainer is still alive)."""
        if isinstance(self.state, weakref.WeakMethod):
            checkpoint = self.state()
            return None if checkpoint is None else checkpoint()
        return self.state


@dataclass
class PopulationDone:
    """A population's final results, per member in population order."""

    key: str
    members: list[tuple[str, str, int]]  # Member.key: (start mode, variant settings JSON, seed)
    bounty: list[float | None]
    bounty_loop: list[int | None]
    test_acc: list[float | None]  # None: the member kept no model (its bounty is None too)
    seconds: float


@dataclass
class PopulationFailed:
    """A population raised; its trials are marked failed and a rerun retries them."""

    key: str
    message: str


Event = Started | LoopDone | PopulationDone | PopulationFailed
