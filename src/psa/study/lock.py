"""One writer per study: an flock beside the database, and who holds it.

A study's checkpoints and its lock live in `<database stem>.ckpt/<study name>/` for a `.sqlite`
database (results/psa.sqlite -> results/psa.ckpt), else in `<database name>.ckpt/<study name>/`.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Any

from psa.study import store
from psa.study.options import StudyError


def checkpoint_root(db: Path) -> Path:
    """Where a database's population checkpoints live: results/psa.sqlite -> results/psa.ckpt,
    results/psa.db -> results/psa.db.ckpt (so that psa.sqlite and psa.db beside it do not share
    one; `psa` without a suffix and `psa.sqlite` would, which StudyLock refuses)."""
    return db.with_name(db.stem + ".ckpt") if db.suffix == ".sqlite" else db.with_name(db.name + ".ckpt")


class StudyLock:
    """An exclusive flock on `<checkpoint dir>/lock`, held while a study runs.

    The kernel drops it when the process dies (even SIGKILL), so a crash never leaves a stale
    lock. Two `psa study` processes on one study: the second refuses; different studies in one
    database cooperate through SQLite's own locking (short IMMEDIATE transactions).
    """

    def __init__(self, directory: Path, study: str, db: Path) -> None:
        self.path = directory / "lock"
        self.study = study
        self.db = db
        self.fd: int | None = None

    def acquire(self, attempts: int = 20) -> None:
        """Take the lock or raise StudyError naming the process that holds it."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise StudyError(f"cannot create {self.path}: {e.strerror}") from None
        for i in range(attempts):  # `psa status` takes a shared lock for an instant: retry briefly
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if i == attempts - 1:
                    owner = lock_owner(self.path) or {}
                    os.close(fd)
                    who = f"pid {owner.get('pid', '?')} on {owner.get('host', '?')}"
                    since = f" since {owner['since']}" if owner.get("since") else ""
                    raise StudyError(f"study {self.study!r} in {self.db} is already being run by {who}{since}; "
                                     f"wait for it to finish or stop it first") from None
                time.sleep(0.1)
        # the last holder's note names its database: another one (the same checkpoint folder) would
        # find this one's checkpoints unusable and delete them
        other = (lock_owner(self.path) or {}).get("database")
        if other is not None and other != self.db.name and (self.db.parent / other).exists():
            os.close(fd)
            raise StudyError(f"{self.path.parent} holds the checkpoints of study {self.study!r} in {other}, which "
                             f"shares its checkpoint folder with {self.db}; rename one of the two databases")
        info = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": store.utc_now(),
                           "database": self.db.name})
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, info.encode(), 0)
        except OSError:
            pass  # the lock itself is what matters; the note is for messages
        self.fd = fd

    def release(self) -> None:
        """Drop the lock (also dropped when the process exits)."""
        if self.fd is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self.fd, fcntl.LOCK_UN)
                os.close(self.fd)
            self.fd = None


def lock_owner(path: Path) -> dict[str, Any] | None:
    """The pid/host/since note in a lock file, if readable."""
    try:
        return json.loads(path.read_text() or "null")
    except (OSError, ValueError):
        return None


def lock_held(directory: Path) -> bool | None:
    """Whether a process holds the study lock in `directory` now (None: cannot tell)."""
    path = directory / "lock"
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    except BlockingIOError:
        return True
    except OSError:
        return None
    finally:
        os.close(fd)
