"""The meta-loop, as every engine runs it: the trainer protocol, what a loop reports, and the
decisions that do not depend on the model (the epoch's batches, mode schedules, the promotion
rule with its patience variant).

Two engines implement the protocol: psa.core.mlp.engine.Engine (psa's own SimpleMLP and ResMLP
populations, hand-written and batched) and psa.core.module.engine.ModuleEngine (any nn.Module
factory, through torch.func). A command chooses one where it starts and drives it only through
`Trainer`, so a study, `psa train` and `psa.fit` share every line above the engine.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from psa.core.device import to_device
from psa.core.errors import warn
from psa.core.hparams import HParams
from psa.core.member import Member

# Validation and test images scored per block, where a block's activations are bounded by rows
# rather than bytes (a model of your own: its per-image activations are not known in advance).
EVAL_ROWS = 2048

# on_step(step, steps): called after each training step of an epoch (1-based)
StepCallback = Callable[[int, int], None]

Ablations = tuple[tuple[tuple[int, int], ...], ...]  # per member: every (unit layer, unit) zeroed


@dataclass(frozen=True)
class LoopResult:
    """What one meta-loop did to every member (tuples in population order)."""

    loop: int
    candidate_acc: tuple[float, ...]  # validation accuracy (%); NaN for a diverged one under diverged="discard"
    promoted: tuple[bool, ...]
    ablated: tuple[tuple[int, int] | None, ...]  # (unit layer, unit) or None: the first of `ablations`
    lkg_score: tuple[float, ...]  # after this loop's promotion decision
    train_loss: tuple[float, ...]  # mean training loss over the epoch
    diverged: tuple[bool, ...]  # a non-finite loss occurred during the epoch
    seconds: float
    # variants (psa.core.variant): every unit ablated (ablated holds the first of them), and
    # whether patience forced the candidate in (None for members without patience)
    ablations: Ablations = ()
    forced: tuple[bool | None, ...] = ()


class PopulationState(Protocol):
    """The persistent state of a population's trials, whatever the model: what callers of a
    Trainer read between loops (psa.core.mlp.population.Population,
    psa.core.module.population.ModulePopulation)."""

    members: tuple[Member, ...]  # sorted by seed; a mode schedule may replace a member at a loop boundary
    device: torch.device
    n_val: int  # validation images: the denominator of every score
    loop: int  # meta-loops completed
    bounty_loop: list[int]  # per member: the loop of its last bounty improvement, 0 before any
    mode_history: list[list[tuple[str, int]]]  # per member: (mode, first loop) of every mode it ran in

    @property
    def size(self) -> int:
        """Number of members."""

    def lkg_score(self) -> list[float]:
        """Every member's LKG validation accuracy (%), -1 before its first promotion."""

    def bounty_score(self) -> list[float]:
        """Every member's bounty (best validation accuracy, %), -1 before its first promotion."""


class PendingLoop(Protocol):
    """A meta-loop that was launched: its outcome, once the device has finished it."""

    def ready(self) -> bool:
        """True when result() will not wait."""

    def result(self) -> LoopResult:
        """The loop's outcome (waits for the device). Read it before the next launch."""


class Trainer(Protocol):
    """Trains one population through its meta-loops. The contract, for every engine:

    - `population` is the state the trainer moves forward: one meta-loop per `launch`. Between
      loops (after `result()`, before the next `launch`) callers may read it and checkpoint it;
      they never write it.
    - `launch(on_step)` runs or queues the next meta-loop of every member (clone the LKG, ablate,
      train one epoch, score, promote) and returns its PendingLoop; at most one loop is pending,
      and its `result()` must be read before the next `launch`. A trainer that computes
      synchronously returns a loop that is already done. `on_step(step, steps)`, if given, is
      called after training steps where the trainer can report them.
    - Each member's draws and decisions depend only on its own seed, mode, variant and the
      hyperparameters, never on the rest of the population, the call's timing or the global
      random generator; its weights too, up to the last bits of rounding where kernels group
      members (psa.core.mlp.chunk).
    - `test_accuracy()` scores every member's bounty model (its LKG, unless a variant keeps them
      apart) on the test split, in population order.
    - `checkpoint()` returns the population's whole state as (tensors, JSON-able metadata): what
      the kind's `load` needs to continue exactly (random streams are functions of seed and
      loop, so there is no generator state to save). Call it between loops.
    """

    @property
    def population(self) -> PopulationState:
        """The state this trainer moves forward (each engine's own population class)."""

    def launch(self, on_step: StepCallback | None = None) -> PendingLoop:
        """Start the next meta-loop of every member."""

    def test_accuracy(self) -> list[float]:
        """Test accuracy (%) of every member's bounty model."""

    def checkpoint(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The population's state as (tensors, metadata)."""


@dataclass
class FinishedLoop:
    """A meta-loop that already ran (a trainer that computes synchronously)."""

    loop_result: LoopResult

    def ready(self) -> bool:
        """Always True."""
        return True

    def result(self) -> LoopResult:
        """The loop's outcome."""
        return self.loop_result


def meta_loop(trainer: Trainer, on_step: StepCallback | None = None) -> LoopResult:
    """One meta-loop of every member, waited for: launch(...).result()."""
    return trainer.launch(on_step).result()


def batch_sizes(n_train: int, batch_size: int) -> list[int]:
    """The batch size of every step of an epoch over `n_train` images (the last, partial batch
    kept, as the paper's DataLoader keeps it)."""
    full, tail = divmod(n_train, batch_size)
    return [batch_size] * full + ([tail] if tail else [])


def scheduled_members(members: tuple[Member, ...], hp: HParams, loop: int,
                      mode_history: list[list[tuple[str, int]]]) -> tuple[Member, ...]:
    """The members for meta-loop `loop`: a member on a mode schedule whose mode changes there
    becomes the new mode's member (HParams.member: its rates) and gets a mode_history entry."""
    out = list(members)
    for j, mem in enumerate(out):
        mode = mem.variant.mode_at(mem.mode, loop)
        if mode != mem.mode:
            out[j] = hp.member(mode, mem.seed, mem.variant)
            mode_history[j].append((mode, loop))
    return tuple(out)


def patience_decision(correct: torch.Tensor, beats: torch.Tensor, ok: torch.Tensor, diverged: torch.Tensor,
                      k: torch.Tensor, growth: torch.Tensor, streak: torch.Tensor, allowance: torch.Tensor,
                      bounty_correct: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Patience's promotion decision (psa.core.variant) for candidates scoring `correct`, of
    which `beats` beat their LKG and `ok` may be promoted at all; updates the discards in a row
    (`streak`), the `allowance` and `bounty_correct` in place. Returns (promote, forced,
    improved: the bounty was beaten)."""
    improved = ok & (correct > bounty_correct)
    # a diverged candidate scores, but is never forced in: its NaN weights would stay the
    # LKG for good (docs/variants.md)
    forced = (k > 0) & ~diverged & ~beats & (streak >= allowance)
    promote = beats | forced
    streak.copy_(torch.where(promote, torch.zeros_like(streak), streak + 1))
    # capped far beyond any run's length, so that K * G^n cannot overflow
    grown = torch.clamp(allowance * growth, max=1 << 40)
    allowance.copy_(torch.where(improved, k, torch.where(forced, grown, allowance)))
    bounty_correct.copy_(torch.where(improved, correct, bounty_correct))
    return promote, forced, improved


def promotion(correct: torch.Tensor, diverged: torch.Tensor, lkg_correct: torch.Tensor, hp: HParams,
              members: Sequence[Member], patience: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The promotion decision for candidates scoring `correct` (validation counts) against their
    LKG's `lkg_correct`, which it updates in place with the promoted scores.

    The paper's engine: promote iff the candidate strictly beats its LKG; a diverged candidate is
    scored like any other (the harness's rule: NaN logits predict class 0, docs/engine.md) unless
    hp.diverged is "discard", which never promotes it. `patience`: the members' (streak,
    allowance, bounty_correct) views where some member has patience (patience_decision, updated
    in place), else None. Returns (promote, forced, improved: the bounty was beaten) per member.
    """
    ok = ~diverged if hp.diverged == "discard" else torch.ones_like(diverged)
    beats = ok & (correct > lkg_correct)
    promote, forced, improved = beats, torch.zeros_like(beats), beats
    if patience is not None:
        dev = correct.device
        k = to_device(torch.tensor([m.variant.patience for m in members], dtype=torch.int64), dev)
        growth = to_device(torch.tensor([m.variant.patience_growth for m in members], dtype=torch.int64), dev)
        promote, forced, improved = patience_decision(correct, beats, ok, diverged, k, growth, *patience)
    lkg_correct.copy_(torch.where(promote, correct, lkg_correct))
    return promote, forced, improved


def loop_result(pop: PopulationState, hp: HParams, loop: int, ablated: Ablations, outcome: dict[str, list[Any]],
                t0: float) -> LoopResult:
    """The LoopResult of meta-loop `loop` from its per-member `outcome` lists (correct,
    promoted, diverged, lkg_correct, loss, forced, improved: host values in population order),
    begun at perf_counter `t0`; records the loop in the population's bounty loops."""
    for j, b in enumerate(outcome["improved"]):
        if b:
            pop.bounty_loop[j] = loop
    n_val = pop.n_val
    discard = hp.diverged == "discard"
    diverged = [bool(d) for d in outcome["diverged"]]
    return LoopResult(
        loop=loop,
        candidate_acc=tuple(math.nan if d and discard else 100.0 * c / n_val
                            for c, d in zip(outcome["correct"], diverged)),
        promoted=tuple(bool(p) for p in outcome["promoted"]),
        ablated=tuple(a[0] if a else None for a in ablated),
        lkg_score=tuple(c if c < 0 else 100.0 * c / n_val for c in outcome["lkg_correct"]),
        train_loss=tuple(float(v) for v in outcome["loss"]),
        diverged=tuple(diverged),
        seconds=time.perf_counter() - t0,
        ablations=ablated,
        forced=tuple(bool(f) if mem.variant.patience > 0 else None for f, mem in zip(outcome["forced"], pop.members)),
    )


_NOTED: set[str] = set()


def note_once(message: str, stacklevel: int | None = None) -> None:
    """Warn with `message` the first time this process meets it (one line per architecture or
    model, not one per population or chunk), at the line of the caller's code that called into
    psa (psa.core.errors.warn), or at `stacklevel` counted from here where given."""
    if message not in _NOTED:
        _NOTED.add(message)
        if stacklevel is None:
            warn(message)
        else:
            warnings.warn(message, RuntimeWarning, stacklevel=stacklevel)
