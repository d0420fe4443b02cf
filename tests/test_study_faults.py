"""A study meets faults: crashes at chosen moments, a full disk, a failing population, files
that are not results databases, a missing Ray. One line and exit status 2 where the user must
act; the database intact; and a rerun of the same command ends with the reference rows."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

import psa.core.checkpoint
from psa.study import checkpoints, runner, store
from psa.study.backends import local
from psa.study.lock import checkpoint_root

from .conftest import (
    TINY,
    TINY_LOOP_ROWS,
    damage_tensors,
    file_digest,
    integrity,
    leftover_checkpoints,
    on_each_loop,
    one_line_error,
    rows,
    run_main,
)


# ------------------------------------------------------------------------------------------
# files that are not results databases, a missing Ray


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    db = tmp_path / "new.sqlite"
    con = store.connect(db)
    con.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    con.close()
    before = file_digest(db)
    rc, out, err = run_main(["study", *TINY, "--db", str(db)], tmp_path)
    assert rc == 2
    assert "schema version 99" in one_line_error(err)
    assert file_digest(db) == before
    for cmd in (["status", "--db", str(db)], ["export", "--db", str(db), "--out", "x"]):
        rc, out, err = run_main(cmd, tmp_path)
        assert rc == 2 and "schema version 99" in one_line_error(err)


def test_not_a_database(tmp_path: Path) -> None:
    db = tmp_path / "junk.sqlite"
    db.write_bytes(b"this is not sqlite" * 100)
    rc, out, err = run_main(["study", *TINY, "--db", str(db)], tmp_path)
    assert rc == 2 and "not a results database" in one_line_error(err)
    rc, out, err = run_main(["status", "--db", str(tmp_path / "absent.sqlite")], tmp_path)
    assert rc == 2 and "no results database" in one_line_error(err)


def test_a_database_killed_before_its_tables_is_started_afresh(reference: Path, tmp_path: Path) -> None:
    # a kill between SQLite creating the file and psa creating its tables leaves an empty database
    import sqlite3

    db = tmp_path / "k.sqlite"
    sqlite3.connect(db).close()
    assert db.is_file()
    rc, out, err = run_main(["study", *TINY, "--db", str(db)], tmp_path)
    assert rc == 0, err
    assert rows(db) == rows(reference)


def test_another_programs_database_is_left_as_it_is(tmp_path: Path) -> None:
    """--db naming another program's SQLite: the study and its dry run refuse it in one line,
    and the file is not touched (no psa tables, no WAL mode, nothing beside it). A database
    whose psa tables were cut short, or one with a table of psa's own name (meta) of its own
    columns, is told apart by psa's schema version."""
    import sqlite3

    db = tmp_path / "notes.sqlite"
    con = sqlite3.connect(db)
    con.execute("CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT)")
    con.execute("CREATE TABLE meta (k TEXT, v TEXT)")
    con.execute("INSERT INTO notes (body) VALUES ('keep me')")
    con.commit()
    con.close()
    before = file_digest(db)
    for extra in ([], ["--dry-run"]):
        rc, out, err = run_main(["study", *TINY, "--db", str(db), *extra], tmp_path)
        assert rc == 2 and "another program's SQLite database (tables: meta, notes)" in one_line_error(err)
        assert file_digest(db) == before and sorted(p.name for p in tmp_path.iterdir()) == ["notes.sqlite"]
    # psa's tables, some of them (a creation cut short): psa's, continued
    part = tmp_path / "part.sqlite"
    con = sqlite3.connect(part)
    con.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
    con.commit()
    con.close()
    store.connect(part).close()
    con = sqlite3.connect(part)
    assert {"studies", "trials"} <= {r[0] for r in con.execute("SELECT name FROM sqlite_master")}
    # psa's own database with a table of the user's added: still psa's (its schema version says so)
    con.execute("CREATE TABLE my_notes (x)")
    con.commit()
    con.close()
    store.connect(part).close()


def test_unusable_database_path(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("x")
    rc, out, err = run_main(["study", *TINY, "--db", "afile/psa.sqlite"], tmp_path)
    assert rc == 2 and "cannot create the results database" in one_line_error(err)


def test_ray_backend_without_ray(tmp_path: Path, monkeypatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    rc, out, err = run_main(["study", *TINY, "--backend", "ray"], tmp_path)
    assert rc == 2 and "needs Ray" in one_line_error(err)
    assert not (tmp_path / "results").exists()


# ------------------------------------------------------------------------------------------
# crashes at chosen moments (in-process): the rows still come out exactly right


class Crash(BaseException):
    """Stands in for a kill at a precise point (not an Exception: nothing may catch it)."""


def _fail_on_call(monkeypatch, target: object, name: str, n: int, exc: BaseException) -> None:
    real = getattr(target, name)
    calls = {"n": 0}

    def wrapper(*a, **k):
        calls["n"] += 1
        if calls["n"] == n:
            raise exc
        return real(*a, **k)

    monkeypatch.setattr(target, name, wrapper)


@pytest.mark.parametrize("where,n", [
    ("save_tensors", 3),  # killed after a loop's rows committed, before its checkpoint
    ("unlink", 1),  # killed after a population's final commit, before its checkpoint went away
    ("finish_trials", 2),  # killed before a population's final commit
])
def test_crash_between_steps_then_resume(where: str, n: int, reference: Path, tmp_path: Path, monkeypatch) -> None:
    db = tmp_path / "c.sqlite"
    with monkeypatch.context() as m:
        if where == "save_tensors":
            _fail_on_call(m, checkpoints, "save_tensors", n, Crash())
        elif where == "finish_trials":
            _fail_on_call(m, store, "finish_trials", n, Crash())
        else:
            real_unlink = Path.unlink

            def unlink(self, *a, **k):
                if self.suffix == ".safetensors":
                    raise Crash()
                return real_unlink(self, *a, **k)

            m.setattr(Path, "unlink", unlink)
        with pytest.raises(Crash):
            run_main(["study", *TINY, "--db", str(db)], tmp_path)
    assert integrity(db) == "ok"
    assert len(rows(db)["meta_loops"]) < TINY_LOOP_ROWS
    rc, out, err = run_main(["study", *TINY, "--db", str(db)], tmp_path)
    assert rc == 0, err
    assert rows(db) == rows(reference)
    assert leftover_checkpoints(db) == []


def test_disk_full_in_the_database(reference: Path, tmp_path: Path, monkeypatch) -> None:
    """A real SQLITE_FULL (max_page_count reached) mid-study: one line, database intact, resumable."""
    db = tmp_path / "full.sqlite"
    real_record = store.record_loop
    calls = {"n": 0}

    def record_loop(con, *a, **k):
        calls["n"] += 1
        if calls["n"] == 3:  # from now on the file may not grow: the next new page fails
            pages = con.execute("PRAGMA page_count").fetchone()[0]
            con.execute(f"PRAGMA max_page_count = {pages}")
        return real_record(con, *a, **k)

    with monkeypatch.context() as m:
        m.setattr(store, "record_loop", record_loop)
        rc, out, err = run_main(["study", *TINY, "--db", str(db)], tmp_path)
    line = one_line_error(err)
    assert rc == 2 and "disk full" in line and "intact" in line
    assert integrity(db) == "ok"
    assert 0 < len(rows(db)["meta_loops"]) < TINY_LOOP_ROWS
    rc, out, err = run_main(["study", *TINY, "--db", str(db)], tmp_path)
    assert rc == 0, err
    assert rows(db) == rows(reference)


def disk_full_at(call: int) -> Callable[..., None]:
    """safetensors' save_file, failing at its `call`-th call as it does on a full disk: with its
    own exception type, which is no OSError."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    calls = {"n": 0}

    def save(*a, **k):
        calls["n"] += 1
        if calls["n"] == call:
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return save_file(*a, **k)

    return save


def test_disk_full_writing_a_checkpoint(reference: Path, tmp_path: Path, monkeypatch) -> None:
    db = tmp_path / "nospace.sqlite"
    with monkeypatch.context() as m:
        m.setattr(psa.core.checkpoint, "st_save_file", disk_full_at(4))
        rc, out, err = run_main(["study", *TINY, "--db", str(db)], tmp_path)
    line = one_line_error(err)
    assert rc == 2 and "no space left on device" in line and "rerun the same command" in line
    assert integrity(db) == "ok"
    rc, out, err = run_main(["study", *TINY, "--db", str(db)], tmp_path)
    assert rc == 0, err
    assert rows(db) == rows(reference)


def test_disk_full_in_psa_train(tmp_path: Path, monkeypatch) -> None:
    """A full disk stops psa train in one line. Before the first checkpoint its --out is emptied
    again, so the same command starts over; after it, the run continues with --resume."""
    argv = ["train", "--arch", "1*8", "--meta-loops", "3", "--out", "run", "--json"]
    with monkeypatch.context() as m:
        m.setattr(psa.core.checkpoint, "st_save_file", disk_full_at(1))
        rc, out, err = run_main(argv, tmp_path)
    line = one_line_error(err)
    assert rc == 2 and "no space left on device in run before its first checkpoint" in line, err
    assert list((tmp_path / "run").iterdir()) == []
    with monkeypatch.context() as m:
        m.setattr(psa.core.checkpoint, "st_save_file", disk_full_at(2))
        rc, out, err = run_main(argv, tmp_path)
    line = one_line_error(err)
    assert rc == 2 and "its last checkpoint is intact" in line and "psa train --resume run" in line, err
    assert json.loads((tmp_path / "run" / "run.json").read_text())["loop"] == 1
    rc, out, err = run_main(["train", "--resume", "run", "--json"], tmp_path)
    assert rc == 0, err
    resumed = json.loads(out)
    rc, out, err = run_main([*argv[:-3], "--out", "whole", "--json"], tmp_path)
    assert rc == 0, err
    assert [r["candidate_acc"] for r in resumed["records"]] == [r["candidate_acc"] for r in json.loads(out)["records"]]


def test_a_study_stopped_by_system_exit_is_interrupted(reference: Path, tmp_path: Path) -> None:
    """Ray's SIGTERM handler stops its driver with SystemExit: recorded and said as an interruption
    (psa status: rerun to resume), not as an error, and the same command finishes the study."""
    db = tmp_path / "term.sqlite"

    def terminated(study, ev):
        raise SystemExit(15)

    with on_each_loop(terminated):
        rc, out, err = run_main(["study", *TINY, "--db", str(db)], tmp_path)
    assert rc == 130 and err.strip().endswith("psa: interrupted")
    con = store.connect(db, readonly=True)
    assert [r[0] for r in con.execute("SELECT outcome FROM runs")] == ["interrupted"]
    con.close()
    rc, out, err = run_main(["status", "--db", str(db)], tmp_path)
    assert rc == 0 and "interrupted" in out and "rerun the same `psa study` command to resume" in out
    rc, out, err = run_main(["study", *TINY, "--db", str(db)], tmp_path)
    assert rc == 0, err
    assert rows(db) == rows(reference)


def test_a_failing_population_is_marked_and_retried(reference: Path, tmp_path: Path, monkeypatch) -> None:
    db = tmp_path / "fail.sqlite"

    class FailingRun(runner.PopulationRun):
        def __init__(self, key, *a, **k):
            if key.startswith("2x8-t01-"):  # the 2*8 population of the first trials
                raise RuntimeError("CUDA out of memory (simulated)")
            super().__init__(key, *a, **k)

    with monkeypatch.context() as m:
        m.setattr(local, "PopulationRun", FailingRun)
        rc, out, err = run_main(["study", *TINY, "--db", str(db)], tmp_path)
    assert rc == 1
    assert "1 population(s) failed: 2*8 trial 1: RuntimeError: CUDA out of memory (simulated)" in err
    rc2, out, err2 = run_main(["status", "--db", str(db), "--json"], tmp_path)
    (info,) = json.loads(out)["studies"]
    assert (info["failed"], info["done"]) == (6, 18)
    rc, out, err = run_main(["study", *TINY, "--db", str(db)], tmp_path)
    assert rc == 0, err
    assert rows(db) == rows(reference)


def _first_checkpoint_then_crash(db: Path, tmp_path: Path, monkeypatch) -> Path:
    """The tiny study killed as it writes its second checkpoint: the first one is left."""
    with monkeypatch.context() as m:
        _fail_on_call(m, checkpoints, "save_tensors", 2, Crash())
        with pytest.raises(Crash):
            run_main(["study", *TINY, "--db", str(db), "--checkpoint-every", "0"], tmp_path)
    (ckpt,) = list(checkpoint_root(db).rglob("*.safetensors"))
    return ckpt


def _rerun_saying_why(db: Path, tmp_path: Path) -> str:
    """The same study rerun without --quiet, to the end; its stderr (the notes on checkpoints)."""
    rc, _, err = run_main(["study", *(a for a in TINY if a != "--quiet"), "--db", str(db)], tmp_path)
    assert rc == 0, err
    return err


def test_a_checkpoint_of_older_random_streams_is_not_continued(reference: Path, tmp_path: Path, monkeypatch) -> None:
    """A checkpoint written before the counter-based streams restarts its population from loop 1."""
    db = tmp_path / "old.sqlite"
    ckpt = _first_checkpoint_then_crash(db, tmp_path, monkeypatch)
    from psa.core.mlp.checkpoint import load_population, save_population

    pop, meta = load_population(ckpt, "cpu")
    del meta["rng"]
    save_population(ckpt, pop, {k: v for k, v in meta.items() if k not in ("format", "kind", "arch", "members",
                                                                           "loop", "bounty_loop", "n_val",
                                                                           "mode_history")})
    err = _rerun_saying_why(db, tmp_path)
    assert "from scratch" in err and "older psa" in err
    assert rows(db) == rows(reference)


def test_a_damaged_checkpoint_restarts_its_population(reference: Path, tmp_path: Path, monkeypatch) -> None:
    """Bytes of a checkpoint's tensors flipped under an intact header: the checksum written with
    them says so, and the population restarts from loop 1 (it would have continued from weights
    that were never trained)."""
    db = tmp_path / "damaged.sqlite"
    ckpt = _first_checkpoint_then_crash(db, tmp_path, monkeypatch)
    damage_tensors(ckpt)
    err = _rerun_saying_why(db, tmp_path)
    assert "from scratch" in err and "damaged" in err
    assert rows(db) == rows(reference)


def test_a_trial_that_keeps_no_model_has_no_test_accuracy(tmp_path: Path) -> None:
    """Under --diverged discard a trial whose every candidate diverged keeps no model: its bounty
    and its test accuracy are missing (the test accuracy was the untrained weights'), in psa
    train's run.json and line and in a study's rows."""
    rc, out, err = run_main(["train", "--arch", "1*8", "--meta-loops", "2", "--lr", "1e30", "--diverged", "discard",
                             "--out", "run"], tmp_path)
    assert rc == 0, err
    assert json.loads((tmp_path / "run" / "run.json").read_text())["test_acc"] is None
    assert "no bounty: every candidate diverged and was discarded" in err and "-1.00" not in err
    rc, out, err = run_main(["study", "--arch", "1*8", "--modes", "none", "--trials", "1", "--meta-loops", "2",
                             "--train-subset", "1024", "--lr", "1e30", "--diverged", "discard", "--quiet",
                             "--db", "d.sqlite"], tmp_path)
    assert rc == 0, err
    con = store.connect(tmp_path / "d.sqlite", readonly=True)
    assert [tuple(r) for r in con.execute("SELECT status, bounty, test_acc FROM trials")] == [("done", None, None)]
    con.close()
