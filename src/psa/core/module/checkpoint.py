"""Checkpoints of a model of your own: a population's stacked parameters and buffers (its LKGs),
LKG scores and engine variants' state (bounty model, patience counters, persistent AdamW moments
and steps) as safetensors; members, loop, bounty loops, mode histories and the factory's name as
JSON. Everything ModuleEngine continues from: data order, dropout masks and ablations are
functions of (seed, loop). The factory is named, never stored: a checkpoint is restored into a
population built fresh by the same factory."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

from psa.core.checkpoint import (
    FORMAT,
    CheckpointError,
    load_tensors,
    member_rows,
    members_of_rows,
    mode_history_of,
    save_tensors,
)
from psa.core.errors import ConfigError
from psa.core.member import Member
from psa.core.module.population import ModulePopulation

KIND = "module-population"

# The variant state in a checkpoint, under the names of psa.core.mlp.population's: per-member tensors
# as they are, per-tensor dicts (the bounty model's parameters and buffers, AdamW's moments) as
# "name.<state_dict key>".
VARIANT_VECTORS = ("bounty_correct", "streak", "allowance", "opt_step")
VARIANT_DICTS = {"bounty": "bounty_state", "opt_avg": "opt_avg", "opt_sq": "opt_sq"}  # name -> attribute


def variant_tensors(pop: ModulePopulation) -> dict[str, torch.Tensor]:
    """The variant state `pop` holds (bounty model, patience counters, persistent AdamW state),
    flat, by checkpoint name."""
    out: dict[str, torch.Tensor] = {}
    for name, attr in VARIANT_DICTS.items():
        d = getattr(pop, attr)
        if d is not None:
            out.update({f"{name}.{k}": v for k, v in d.items()})
    out.update({name: getattr(pop, name) for name in VARIANT_VECTORS if getattr(pop, name) is not None})
    return out


def module_checkpoint(pop: ModulePopulation) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Everything ModuleEngine needs to continue `pop` exactly, as (tensors, metadata): its
    LKGs, and its variant state where some member has one."""
    tensors = {**{f"param.{k}": v for k, v in pop.params.items()},
               **{f"buffer.{k}": v for k, v in pop.buffers.items()}, "lkg_correct": pop.lkg_correct,
               **variant_tensors(pop)}
    meta = {"format": FORMAT, "kind": KIND, "factory": pop.factory, "members": member_rows(pop.members),
            "loop": pop.loop, "bounty_loop": pop.bounty_loop, "n_val": pop.n_val, "mode_history": pop.mode_history}
    return tensors, meta


def save_module_population(path: str | os.PathLike, pop: ModulePopulation, extra: dict[str, Any] | None = None
                           ) -> None:
    """module_checkpoint(pop), with `extra` in its metadata, written atomically to `path`."""
    tensors, meta = module_checkpoint(pop)
    save_tensors(path, tensors, {**meta, **(extra or {})})


@dataclass
class ModuleCheckpoint:
    """A module population's checkpoint, read (CPU tensors), to be restored into a fresh one."""

    factory: str
    members: tuple[Member, ...]  # in the modes of the checkpoint's loop (a schedule may have moved them)
    loop: int
    bounty_loop: list[int]
    n_val: int
    params: dict[str, torch.Tensor]
    buffers: dict[str, torch.Tensor]
    lkg_correct: torch.Tensor
    mode_history: list[list[tuple[str, int]]]
    variant: dict[str, torch.Tensor]  # variant_tensors' names

    def restore(self, pop: ModulePopulation) -> None:
        """Overwrite `pop` (built fresh from the same factory and members) with this state."""
        if [m.key for m in pop.members] != [m.key for m in self.members] or pop.n_val != self.n_val:
            raise CheckpointError("its members differ from the population's")
        for mine, theirs, what in ((self.params, pop.params, "parameters"), (self.buffers, pop.buffers, "buffers")):
            if set(mine) != set(theirs) or any(mine[k].shape != theirs[k].shape for k in mine):
                raise CheckpointError(f"its {what} do not match what the factory {self.factory} builds now")
        fresh = variant_tensors(pop)  # what the members need, allocated by create()
        if set(fresh) != set(self.variant) or any(fresh[k].shape != v.shape for k, v in self.variant.items()):
            raise CheckpointError("its variant state does not match its members")
        with torch.no_grad():
            for store, saved in ((pop.params, self.params), (pop.buffers, self.buffers)):
                for k, v in saved.items():
                    store[k].copy_(v)
            pop.lkg_correct.copy_(self.lkg_correct)
            for k, v in self.variant.items():
                fresh[k].copy_(v)  # views of the population's own tensors: dtypes and device kept
        pop.bounty_loop = list(self.bounty_loop)
        pop.loop = self.loop
        pop.members = self.members
        pop.mode_history = [list(h) for h in self.mode_history]


def load_module_population(path: str | os.PathLike) -> tuple[ModuleCheckpoint, dict[str, Any]]:
    """Read a checkpoint written by save_module_population: (checkpoint, metadata)."""
    tensors, meta = load_tensors(path)
    return module_checkpoint_from(tensors, meta, str(path)), meta


def module_checkpoint_from(tensors: dict[str, torch.Tensor], meta: dict[str, Any], path: str = "checkpoint"
                           ) -> ModuleCheckpoint:
    """The ModuleCheckpoint of a checkpoint's contents (module_checkpoint's); CheckpointError
    (naming `path`) if they are not a whole module population checkpoint."""
    if meta.get("kind") != KIND:
        raise CheckpointError(f"{path}: not a module population checkpoint")
    try:
        members = members_of_rows(meta["members"])
        ckpt = ModuleCheckpoint(
            factory=str(meta["factory"]), members=members, loop=int(meta["loop"]),
            bounty_loop=[int(x) for x in meta["bounty_loop"]], n_val=int(meta["n_val"]),
            params={k[6:]: v for k, v in tensors.items() if k.startswith("param.")},
            buffers={k[7:]: v for k, v in tensors.items() if k.startswith("buffer.")},
            lkg_correct=tensors["lkg_correct"].to(torch.int64),
            mode_history=mode_history_of(meta, members),
            variant={k: v for k, v in tensors.items()
                     if k in VARIANT_VECTORS or k.partition(".")[0] in VARIANT_DICTS})
    except (KeyError, TypeError, ValueError, ConfigError) as e:
        raise CheckpointError(f"{path}: incomplete module population checkpoint ({e})") from None
    m = len(members)
    if ckpt.lkg_correct.shape != (m,) or len(ckpt.bounty_loop) != m or len(ckpt.mode_history) != m or any(
            v.dim() == 0 or v.shape[0] != m for v in (*ckpt.params.values(), *ckpt.buffers.values(),
                                                      *ckpt.variant.values())):
        raise CheckpointError(f"{path}: tensor sizes do not match its {m} members")
    return ckpt
