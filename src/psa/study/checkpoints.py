"""A study's checkpoints, written in the background: the scheduler's thread copies a population's
state to the host and goes on; one writer thread writes the copies, in the order they were
taken, each atomically (psa.core.checkpoint.save_tensors).

Why a thread: a big population's checkpoint is hundreds of MB (a 60-member `2*939`, 390 MB),
and serialising and writing it takes a second or two. On the scheduler's thread that second held
every other population in flight on a card, each of which has one meta-loop queued and then
idles. Writing a file and fsyncing it release the GIL, so the writer costs the scheduler little.

What the driver relies on (psa.study.driver's invariants):
- A loop's rows commit, durably, before its checkpoint is handed over, so a checkpoint is never
  ahead of the database; a kill that loses a queued write leaves an older checkpoint (or none),
  and the resume recomputes more loops.
- One write at most is queued per population: handing over the next waits for the previous.
  With the copies held to PENDING_BYTES in all, that bounds the host memory the copies take.
- A failed write (a full disk, anything raised) stops the writer: nothing after it is written,
  as after a kill, and the scheduler's thread raises it at its next call (`check`, `submit`,
  `wait`), which the driver makes at every event.
"""

from __future__ import annotations

import errno
import threading
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from pathlib import Path
from typing import Any

import torch

from psa.core.checkpoint import save_tensors
from psa.study.options import StudyError

# The host copies queued at most, together (the one being handed over always goes, however large)
PENDING_BYTES = 2 << 30


def host_copy(tensors: Mapping[str, torch.Tensor], live: bool) -> dict[str, torch.Tensor]:
    """The tensors on the host, contiguous, and, where `live` (a trainer's own state, which its
    next meta-loop overwrites), copies even of those already there. A device's tensors are
    copied in any case; the copy waits for the device only as long as that takes."""
    return {k: v.detach().to("cpu", copy=live).contiguous() for k, v in tensors.items()}


def disk_message(e: OSError, path: Path) -> str:
    """One line for a checkpoint that could not be written."""
    if e.errno == errno.ENOSPC:
        return (f"no space left on device writing {path}; the database and the previous checkpoint are intact: "
                f"free some space and rerun the same command to resume")
    return f"cannot write {path}: {e.strerror or e}; the database is intact: rerun the same command to resume"


class CheckpointWriter:
    """One thread that writes the checkpoints handed to it, in order (see the module docstring).
    Its methods are called from one thread at a time (the scheduler's)."""

    def __init__(self, max_pending_bytes: int = PENDING_BYTES) -> None:
        self.max_pending_bytes = max_pending_bytes
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="psa-checkpoints")
        self._queued: dict[str, tuple[Future[None], int]] = {}  # population key -> its write, its bytes
        self._failure: tuple[Path, BaseException] | None = None
        self._raised = False
        self._lock = threading.Lock()

    def submit(self, key: str, path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        """Queue population `key`'s checkpoint (`tensors`: host copies no one else writes) for
        `path`, after waiting for its previous one and, while the queued copies would exceed
        max_pending_bytes, for the oldest others. Raises a failed earlier write first."""
        self.wait(key)
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        for other in list(self._queued):  # oldest first: dicts keep their insertion order
            if sum(n for _, n in self._queued.values()) + size <= self.max_pending_bytes:
                break
            self.wait(other)
        self._queued[key] = (self._pool.submit(self._write, path, tensors, meta), size)

    def _write(self, path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        with self._lock:
            if self._failure is not None:
                return  # after a failure nothing more is written, as after a kill
        try:
            save_tensors(path, tensors, meta)
        except BaseException as e:  # noqa: BLE001 - raised again on the scheduler's thread (check)
            with self._lock:
                self._failure = (path, e)

    def check(self) -> None:
        """Raise the failure of a write that has ended, once: a full disk or another OSError as
        StudyError (one line), anything else as it was raised."""
        with self._lock:
            failure = None if self._raised else self._failure
            self._raised = self._raised or failure is not None
        if failure is None:
            return
        path, e = failure
        if isinstance(e, OSError):
            raise StudyError(disk_message(e, path)) from None
        raise e

    def wait(self, key: str | None = None) -> None:
        """Wait until population `key`'s queued checkpoint (None: every one) is written, then
        raise any failure (check)."""
        keys = list(self._queued) if key is None else [key] if key in self._queued else []
        wait_futures([self._queued[k][0] for k in keys])
        for k in keys:
            del self._queued[k]
        self.check()

    def close(self) -> None:
        """Write what is queued and end the thread; a failure is not raised here (a study that
        closes after an error has said why it stopped)."""
        wait_futures([f for f, _ in self._queued.values()])
        self._queued.clear()
        self._pool.shutdown(wait=True)
