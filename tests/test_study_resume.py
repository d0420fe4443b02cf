"""A study SIGKILLed at random moments and restarted ends with exactly the rows of an uninterrupted
run; `psa status`/`psa export` while it runs; two writers on one database."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest

from psa.cli import main

from .conftest import (
    TINY,
    env,
    integrity,
    leftover_checkpoints,
    progress,
    psa_cmd,
    rows,
    run_psa,
    tiny_as,
)


# 4 populations x 12 meta-loops on 4,096 images: a few seconds of work between startups; a
# checkpoint at most every 0.3 s, so that kills land both right after one and loops past one
KILL = [*tiny_as("killme", "12", "4096"), "--checkpoint-every", "0.3"]
KILL_TRIALS, KILL_LOOP_ROWS = 24, 24 * 12


def _wait_for_progress(proc: subprocess.Popen, db: Path, before: int, timeout: float = 300) -> bool:
    """Until the study records more than `before` (True) or the process ends (False)."""
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        if progress(db) > before:
            return True
        time.sleep(0.02)
    return False


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["study", *KILL, "--db", "ref.sqlite"]) == 0  # uninterrupted, in this process
    reference = rows(tmp_path / "ref.sqlite")
    assert len(reference["meta_loops"]) == KILL_LOOP_ROWS

    db = tmp_path / "k.sqlite"
    rng = random.Random(20240611)
    kills: list[int] = []
    checked_live = checked_interrupted = False
    # first strike: while the database and the study's rows are being created
    proc = subprocess.Popen(psa_cmd("study", *KILL, "--db", db.name), cwd=tmp_path, env=env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while proc.poll() is None and not db.exists():
        time.sleep(0.002)
    time.sleep(rng.uniform(0.0, 0.05))
    proc.kill()
    proc.wait()
    early = progress(db)
    assert early <= 0  # no loop recorded yet
    for _ in range(12):
        proc = subprocess.Popen(psa_cmd("study", *KILL, "--db", db.name), cwd=tmp_path, env=env(),
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            if not _wait_for_progress(proc, db, max(progress(db), 0)):
                break  # finished before we struck
            if not checked_live:
                # mid-run (frozen with SIGSTOP so that it cannot finish meanwhile): status reads the
                # progress, export writes a consistent partial snapshot, a second identical command refuses
                proc.send_signal(signal.SIGSTOP)
                st = run_psa("status", "--db", db.name, "--json", cwd=tmp_path)
                assert st.returncode == 0, st.stderr
                (info,) = json.loads(st.stdout)["studies"]
                assert info["state"] == "running" and info["owner"]["pid"] == proc.pid
                assert info["eta_seconds"] is not None and info["eta_seconds"] >= 0
                assert 0 < info["loops_done"] < KILL_LOOP_ROWS and info["trials"] == KILL_TRIALS
                ex = run_psa("export", "--db", db.name, "--out", "partial", "--format", "csv", cwd=tmp_path)
                assert ex.returncode == 0, ex.stderr
                n_rows = len((tmp_path / "partial" / "meta_loops.csv").read_text().splitlines()) - 1
                assert 0 < n_rows < KILL_LOOP_ROWS
                second = run_psa("study", *KILL, "--db", db.name, cwd=tmp_path)
                assert second.returncode == 2
                assert f"already being run by pid {proc.pid}" in second.stderr
                assert len(second.stderr.strip().splitlines()) == 1
                proc.send_signal(signal.SIGCONT)
                checked_live = True
            # let a random number of loops commit, then strike right after a commit (inside the
            # checkpoint write) or somewhere in the next loop
            for _ in range(rng.randint(0, 7)):
                if not _wait_for_progress(proc, db, progress(db)):
                    break
            time.sleep(rng.choice([0.0, rng.uniform(0.0, 0.03), rng.uniform(0.0, 0.3)]))
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                kills.append(progress(db))
                if not checked_interrupted:
                    st = run_psa("status", "--db", db.name, cwd=tmp_path)
                    assert st.returncode == 0 and "interrupted" in st.stdout
                    checked_interrupted = True
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        if len(kills) >= 5:
            break
    assert len(kills) >= 4, f"only {len(kills)} kills landed: {kills}"
    assert checked_live and checked_interrupted
    assert integrity(db) == "ok"
    final = run_psa("study", *KILL, "--db", db.name, cwd=tmp_path)
    assert final.returncode == 0, final.stderr
    got = rows(db)
    assert got["trials"] == reference["trials"]
    assert got["meta_loops"] == reference["meta_loops"]  # no duplicates, none missing, same values
    assert got["studies"] == reference["studies"]
    assert leftover_checkpoints(db) == []
    print(f"kills landed at progress {early} (startup), then {kills}")


@pytest.mark.slow
def test_two_studies_write_one_database_at_once(tmp_path: Path, monkeypatch) -> None:
    a, b = tiny_as("left", "6", "2048"), tiny_as("right", "6", "2048")
    procs = [subprocess.Popen(psa_cmd("study", *d, "--db", "shared.sqlite"), cwd=tmp_path, env=env(),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for d in (a, b)]
    errs = [p.communicate(timeout=600)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errs
    monkeypatch.chdir(tmp_path)
    assert main(["study", *TINY, "--db", "solo.sqlite"]) == 0
    shared, ref = rows(tmp_path / "shared.sqlite"), rows(tmp_path / "solo.sqlite")
    assert integrity(tmp_path / "shared.sqlite") == "ok"
    for name in ("left", "right"):
        assert [r[1:] for r in shared["trials"] if r[0] == name] == [r[1:] for r in ref["trials"]]
        assert [r[1:] for r in shared["meta_loops"] if r[0] == name] == [r[1:] for r in ref["meta_loops"]]
