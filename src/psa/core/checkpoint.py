"""Checkpoints: safetensors for tensors, JSON for everything else, always written atomically.

Nothing here unpickles: a checkpoint handed to us is parsed as safetensors + JSON only.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as st_save

from psa.core.arch import N_IN, N_OUT, ArchError, parse_arch
from psa.core.device import canonical_device
from psa.core.model import DEFAULT_MODEL, check_model_name
from psa.core.population import ConfigError, Layout, Member, Population
from psa.core.variant import Variant

FORMAT = "psa-checkpoint-1"


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupt, or does not fit what it is used for."""


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside `path` to write; renamed onto `path` only if the block succeeds.

    Readers see the old file or the whole new one, never a half-written one.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would hide results from collaborators
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write(path: str | os.PathLike, payload: bytes | str) -> None:
    """Write `payload` to `path` atomically, fsynced before the rename."""
    data = payload.encode() if isinstance(payload, str) else payload
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Atomically write `tensors` as safetensors with `meta` as JSON in its header metadata."""
    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    atomic_write(path, st_save(cpu, metadata={"psa": json.dumps(meta, sort_keys=True)}))


def load_tensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a checkpoint written by save_tensors: (tensors on the CPU, metadata)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            raw_meta = (f.metadata() or {}).get("psa")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    if raw_meta is None:
        raise CheckpointError(f"{path}: safetensors file without psa metadata")
    try:
        meta = json.loads(raw_meta)
    except json.JSONDecodeError:
        raise CheckpointError(f"{path}: corrupt psa metadata") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a psa checkpoint (format {meta.get('format')!r})")
    return tensors, meta


def save_population(path: str | os.PathLike, pop: Population, extra: dict[str, Any] | None = None) -> None:
    """Everything needed to continue a population exactly: LKG weights, scores, loop, members.

    The random streams are functions of (seed, loop), so no RNG state needs saving.
    """
    meta = {
        "format": FORMAT,
        "kind": "population",
        "arch": str(pop.arch),
        "n_in": pop.arch.n_in,  # the data set's input size and class count
        "n_out": pop.arch.n_out,
        **({} if pop.model == DEFAULT_MODEL else {"model": pop.model}),  # absent for the paper's SimpleMLP
        # a fifth entry, the variant's settings, only for members that are not the paper's engine
        "members": [[m.mode, m.seed, m.weight_decay, m.dropout, *([m.variant.settings()] if not m.variant.is_default
                                                                  else [])] for m in pop.members],
        "loop": pop.loop,
        "bounty_loop": pop.bounty_loop,
        "n_val": pop.n_val,
        "mode_history": pop.mode_history,
        **(extra or {}),
    }
    save_tensors(path, {"lkg": pop.lkg, "lkg_correct": pop.lkg_correct, **pop.variant_state()}, meta)


def load_population(path: str | os.PathLike, device: torch.device | str) -> tuple[Population, dict[str, Any]]:
    """Rebuild a Population saved by save_population on `device`; also returns the metadata."""
    tensors, meta = load_tensors(path)
    if meta.get("kind") != "population":
        raise CheckpointError(f"{path}: not a population checkpoint")
    try:
        arch = parse_arch(meta["arch"], int(meta.get("n_in", N_IN)), int(meta.get("n_out", N_OUT)))
        model = check_model_name(meta.get("model", DEFAULT_MODEL))
        members = tuple(Member(str(a), int(b), float(c), float(d), Variant.from_settings(v[0]) if v else Variant())
                        for a, b, c, d, *v in meta["members"])
        layout = Layout.of(arch, len(members), model)
        lkg, correct = tensors["lkg"], tensors["lkg_correct"]
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
        n_val=int(meta["n_val"]),
        bounty_loop=[int(x) for x in meta["bounty_loop"]],
        loop=int(meta["loop"]),
        mode_history=[[(str(m), int(t)) for m, t in h] for h in meta["mode_history"]],
    )
    for name, t in tensors.items():
        if name in ("bounty", "opt_avg", "opt_sq") and t.shape != (layout.numel,) or \
                name in ("bounty_correct", "streak", "allowance", "opt_step") and t.shape != (len(members),):
            raise CheckpointError(f"{path}: variant state {name} has the wrong size")
        if name not in ("lkg", "lkg_correct"):
            setattr(pop, name, t.to(dev))
    pop.init_variant_state()
    if set(pop.variant_state()) != set(tensors) - {"lkg", "lkg_correct"}:
        raise CheckpointError(f"{path}: its variant state does not match its members")
    return pop, meta


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
