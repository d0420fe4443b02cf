"""Checkpoints of psa's own nets: a population (its LKGs, scores, loop, members and variant
state) and a single trial's bounty model as a state_dict of its nn.Module."""

from __future__ import annotations

import os
from typing import Any

import torch

from psa.core.arch import N_IN, N_OUT, ArchError, parse_arch
from psa.core.checkpoint import (
    FORMAT,
    CheckpointError,
    load_tensors,
    member_rows,
    members_of_rows,
    mode_history_of,
    save_tensors,
)
from psa.core.device import canonical_device
from psa.core.errors import ConfigError
from psa.core.mlp.population import VARIANT_STATE, Layout, Population
from psa.core.model import DEFAULT_MODEL, check_model_name

KIND = "population"


def population_checkpoint(pop: Population) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Everything needed to continue a population exactly, as (tensors, metadata): LKG weights,
    scores, loop, members and the variants' state. The random streams are functions of (seed,
    loop), so no generator state is saved."""
    meta = {
        "format": FORMAT,
        "kind": KIND,
        "arch": str(pop.arch),
        "n_in": pop.arch.n_in,  # the data set's input size and class count
        "n_out": pop.arch.n_out,
        **({} if pop.model == DEFAULT_MODEL else {"model": pop.model}),  # absent for the paper's SimpleMLP
        "members": member_rows(pop.members),
        "loop": pop.loop,
        "bounty_loop": pop.bounty_loop,
        "n_val": pop.n_val,
        "mode_history": pop.mode_history,
    }
    return {"lkg": pop.lkg, "lkg_correct": pop.lkg_correct, **pop.variant_state()}, meta


def save_population(path: str | os.PathLike, pop: Population, extra: dict[str, Any] | None = None) -> None:
    """population_checkpoint(pop), with `extra` in its metadata, written atomically to `path`."""
    tensors, meta = population_checkpoint(pop)
    save_tensors(path, tensors, {**meta, **(extra or {})})


def load_population(path: str | os.PathLike, device: torch.device | str) -> tuple[Population, dict[str, Any]]:
    """Rebuild a Population saved by save_population on `device`; also returns the metadata."""
    tensors, meta = load_tensors(path)
    return population_from(tensors, meta, device, str(path)), meta


def population_from(tensors: dict[str, torch.Tensor], meta: dict[str, Any], device: torch.device | str,
                    path: str = "checkpoint") -> Population:
    """The Population of a checkpoint's contents (population_checkpoint's), on `device`;
    CheckpointError (naming `path`) if they are not a whole population checkpoint."""
    if meta.get("kind") != KIND:
        raise CheckpointError(f"{path}: not a population checkpoint")
    try:
        arch = parse_arch(meta["arch"], int(meta.get("n_in", N_IN)), int(meta.get("n_out", N_OUT)))
        model = check_model_name(meta.get("model", DEFAULT_MODEL))
        members = members_of_rows(meta["members"])
        layout = Layout.of(arch, len(members), model)
        lkg, correct = tensors["lkg"], tensors["lkg_correct"]
        n_val, loop = int(meta["n_val"]), int(meta["loop"])
        bounty_loop = [int(x) for x in meta["bounty_loop"]]
        history = mode_history_of(meta, members)
    except (KeyError, TypeError, ValueError, ArchError, ConfigError) as e:
        raise CheckpointError(f"{path}: incomplete population checkpoint ({e})") from None
    if lkg.shape != (layout.numel,) or correct.shape != (len(members),):
        raise CheckpointError(f"{path}: tensor sizes do not match architecture {arch}")
    dev = canonical_device(device)
    pop = Population(
        arch=arch,
        members=members,
        device=dev,
        layout=layout,
        lkg=lkg.to(torch.float32).to(dev),
        lkg_correct=correct.to(torch.int64).to(dev),
        n_val=n_val,
        bounty_loop=bounty_loop,
        loop=loop,
        mode_history=history,
    )
    for name, t in tensors.items():
        if name in ("bounty", "opt_avg", "opt_sq") and t.shape != (layout.numel,) or \
                name in ("bounty_correct", "streak", "allowance", "opt_step") and t.shape != (len(members),):
            raise CheckpointError(f"{path}: variant state {name} has the wrong size")
        if name not in ("lkg", "lkg_correct"):
            setattr(pop, VARIANT_STATE.get(name, name), t.to(dev))
    pop.init_variant_state()
    if set(pop.variant_state()) != set(tensors) - {"lkg", "lkg_correct"}:
        raise CheckpointError(f"{path}: its variant state does not match its members")
    return pop


def save_member(path: str | os.PathLike, pop: Population, j: int, meta: dict[str, Any]) -> None:
    """Member j's bounty model (its LKG, unless it has patience) as a state_dict of its model's
    nn.Module in safetensors, with `meta` in its header."""
    save_tensors(path, pop.member_state_dict(j, pop.bounty_model()), {"format": FORMAT, "kind": "member", **meta})


def load_member(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A member checkpoint: (state_dict of psa.core.model.SimpleMLP or ResMLP, metadata)."""
    tensors, meta = load_tensors(path)
    if meta.get("kind") != "member":
        raise CheckpointError(f"{path}: not a single-trial checkpoint")
    return tensors, meta


def restore_member(pop: Population, j: int, state: dict[str, torch.Tensor]) -> None:
    """Load a state_dict of the population's model into row j, as a CheckpointError if it does not fit."""
    try:
        pop.load_member_state_dict(j, state)
    except ConfigError as e:
        raise CheckpointError(str(e)) from None
