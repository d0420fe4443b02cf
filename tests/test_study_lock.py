"""Who may write: one `psa study` per study (an flock beside the database), SQLite's own locks
between writers of one database."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import pytest

from psa.study import store
from psa.study.lock import StudyLock, checkpoint_root, lock_held, lock_owner
from psa.study.options import StudyError

from .conftest import TINY, integrity, one_line_error, rows, run_main


def test_same_study_twice_is_refused(tmp_path: Path) -> None:
    db = tmp_path / "r.sqlite"
    lock = StudyLock(checkpoint_root(db) / "tiny", "tiny", db)
    lock.acquire()  # as a running `psa study` on this study would
    try:
        rc, out, err = run_main(["study", *TINY, "--db", str(db)], tmp_path)
    finally:
        lock.release()
    line = one_line_error(err)
    assert rc == 2 and "already being run by pid" in line and str(os.getpid()) in line
    # the database did not exist: none is left behind, empty (the lock's folder was there before)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.ckpt"]
    # in a database that exists, nothing is started
    store.connect(db).close()
    lock.acquire()
    try:
        rc, out, err = run_main(["study", *TINY, "--db", str(db)], tmp_path)
    finally:
        lock.release()
    assert rc == 2 and "already being run by pid" in one_line_error(err)
    con = sqlite3.connect(db)
    assert con.execute("SELECT COUNT(*) FROM studies").fetchone()[0] == 0
    con.close()


def test_what_status_reads_of_the_lock(tmp_path: Path) -> None:
    """Whether a study's lock is held now, and by whom; where the checkpoints and lock live."""
    assert checkpoint_root(Path("results/psa.sqlite")) == Path("results/psa.ckpt")
    assert checkpoint_root(Path("results/db")) == Path("results/db.ckpt")
    assert checkpoint_root(Path("results/psa.db")) == Path("results/psa.db.ckpt")  # not psa.sqlite's
    d = checkpoint_root(tmp_path / "r.sqlite") / "s"
    assert lock_held(d) is False and lock_owner(d / "lock") is None
    lock = StudyLock(d, "s", tmp_path / "r.sqlite")
    lock.acquire()
    try:
        assert lock_held(d) is True
        owner = lock_owner(d / "lock")
        assert owner is not None and owner["pid"] == os.getpid() and owner["since"]
    finally:
        lock.release()
    assert lock_held(d) is False


def test_two_databases_sharing_a_checkpoint_folder_are_refused(tmp_path: Path) -> None:
    """results/psa (no suffix) and results/psa.sqlite would share psa.ckpt/: each would find the
    other's checkpoints unusable and delete them. The second to run a study of the same name is
    refused; the one whose folder it is runs on."""
    first, second = tmp_path / "psa.sqlite", tmp_path / "psa"
    assert checkpoint_root(first) == checkpoint_root(second)
    first.touch()
    second.touch()
    d = checkpoint_root(first) / "s"
    lock = StudyLock(d, "s", first)
    lock.acquire()
    lock.release()  # the note of who held it last stays
    with pytest.raises(StudyError, match=r"holds the checkpoints of study 's' in psa.sqlite, which shares its "
                                         r"checkpoint folder with .*psa; rename one of the two databases"):
        StudyLock(d, "s", second).acquire()
    lock = StudyLock(d, "s", first)
    lock.acquire()
    lock.release()
    first.unlink()  # gone: its checkpoints are nobody's, and the other database may take the folder
    lock = StudyLock(d, "s", second)
    lock.acquire()
    lock.release()
    assert lock_owner(d / "lock")["database"] == "psa"


def test_database_locked_by_another_writer(reference: Path, tmp_path: Path) -> None:
    db = tmp_path / "locked.sqlite"
    db.write_bytes(reference.read_bytes())
    other = sqlite3.connect(db, isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")  # some other program holds the write lock
    try:
        argv = ["study", *TINY, "--name", "other", "--db", str(db), "--busy-timeout", "0.3"]
        rc, out, err = run_main(argv, tmp_path)
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert rc == 2 and "locked by another process" in one_line_error(err)
    assert integrity(db) == "ok"
    assert rows(db) == rows(reference)


def test_creating_one_database_from_two_processes_at_once_retries(tmp_path: Path, monkeypatch) -> None:
    """Until a new database is in WAL mode SQLite can answer a second creator "locked" at once,
    without waiting (seen in CI: two `psa study` started together). connect() starts again."""
    real_connect = sqlite3.connect
    refusals = {"n": 0}

    class Racing(sqlite3.Connection):
        def execute(self, sql, *a):
            if sql.startswith("PRAGMA journal_mode") and refusals["n"] < 3:
                refusals["n"] += 1
                raise sqlite3.OperationalError("database is locked")
            return super().execute(sql, *a)

    monkeypatch.setattr(store.sqlite3, "connect", lambda *a, **k: real_connect(*a, factory=Racing, **k))
    con = store.connect(tmp_path / "new.sqlite", timeout=5)
    assert refusals["n"] == 3
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    con.close()

    class Stuck(sqlite3.Connection):  # refuses for ever: one clear error once the timeout has passed
        def execute(self, sql, *a):
            if sql.startswith("PRAGMA journal_mode"):
                raise sqlite3.OperationalError("database is locked")
            return super().execute(sql, *a)

    monkeypatch.setattr(store.sqlite3, "connect", lambda *a, **k: real_connect(*a, factory=Stuck, **k))
    with pytest.raises(store.StoreError, match="locked by another process"):
        store.connect(tmp_path / "other.sqlite", timeout=0.3)
