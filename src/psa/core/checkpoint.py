"""Checkpoints: safetensors for tensors, JSON for everything else, always written atomically.

Nothing here unpickles: a checkpoint handed to us is parsed as safetensors + JSON only. What a
population's checkpoint holds is its engine's (psa.core.mlp.checkpoint,
psa.core.module.checkpoint); the files, their atomic writes and the members' rows are here.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file as st_save_file

from psa.core.member import Member
from psa.core.variant import Variant

FORMAT = "psa-checkpoint-1"
# the metadata key of the tensors' checksum: safetensors checks a file's header, not its data,
# so a damaged checkpoint would otherwise load as weights that were never trained
CHECKSUM = "tensors_sha256"


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
    """Atomically write `tensors` as safetensors with `meta` as JSON in its header metadata,
    fsynced before the rename. Written straight to the file: a population's checkpoint is
    hundreds of MB, which serialising into bytes first would hold in memory twice over."""
    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    meta = {**meta, CHECKSUM: tensors_checksum(cpu)}
    with atomic_path(path) as tmp:
        try:
            st_save_file(cpu, str(tmp), metadata={"psa": json.dumps(meta, sort_keys=True)})
        except SafetensorError as e:
            # safetensors reports the file system's errors (a full disk) as its own exception type:
            # given back as the OSError they are, which every caller turns into one line
            code = re.search(r"os error (\d+)", str(e))
            if code is None:
                raise
            raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(tmp)) from None
        fd = os.open(tmp, os.O_RDWR)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def tensors_checksum(tensors: dict[str, torch.Tensor]) -> str:
    """A SHA-256 digest of CPU tensors: every name, dtype, shape and byte, in name order (SHA-256
    for its speed: the SHA extensions of current x86 and ARM CPUs hash above 1 GB/s)."""
    h = hashlib.sha256()
    for k in sorted(tensors):
        t = tensors[k].contiguous()
        h.update(f"{k}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


def load_tensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a checkpoint written by save_tensors: (tensors on the CPU, metadata), its tensors
    checked against the checksum written with them (checkpoints from before it have none)."""
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
    checksum = meta.pop(CHECKSUM, None)
    if checksum is not None and checksum != tensors_checksum(tensors):
        raise CheckpointError(f"{path}: damaged: its tensors do not match the checksum written with them")
    return tensors, meta


def member_rows(members: tuple[Member, ...] | list[Member]) -> list[list[Any]]:
    """The members as a checkpoint's JSON rows: [mode, seed, weight decay, dropout], and a fifth
    entry, the variant's settings, only for members that are not the paper's engine."""
    return [[m.mode, m.seed, m.weight_decay, m.dropout, *([m.variant.settings()] if not m.variant.is_default else [])]
            for m in members]


def members_of_rows(rows: Any) -> tuple[Member, ...]:
    """The inverse of member_rows (KeyError, TypeError, ValueError or ConfigError on a bad row)."""
    return tuple(Member(str(a), int(b), float(c), float(d), Variant.from_settings(v[0]) if v else Variant())
                 for a, b, c, d, *v in rows)


def mode_history_of(meta: dict[str, Any], members: tuple[Member, ...]) -> list[list[tuple[str, int]]]:
    """The members' mode histories from a checkpoint's metadata (one mode each in checkpoints
    from before mode schedules)."""
    history = meta.get("mode_history")
    if history is None:
        return [[(m.mode, 1)] for m in members]
    return [[(str(m), int(t)) for m, t in h] for h in history]
