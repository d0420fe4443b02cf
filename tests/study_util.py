"""Helpers shared by the study tests: a tiny design, subprocess runs, row comparison."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import psa

SRC = str(Path(psa.__file__).resolve().parents[1])

# 2 architectures x 6 modes x 2 trials, 6 meta-loops on 2,048 training images, populations of
# 6 members (one trial each): 4 populations, 24 trials, 144 meta-loop rows, ~10-20 s on 2 cores.
TINY = ["--arch", "1*8", "--arch", "2*8", "--trials", "2", "--meta-loops", "6", "--population-size", "6",
        "--train-subset", "2048", "--name", "tiny", "--quiet"]
TINY_TRIALS = 24
TINY_LOOP_ROWS = 24 * 6


def env() -> dict[str, str]:
    """The environment for a `psa` subprocess that runs this checkout's code."""
    e = dict(os.environ)
    e["PYTHONPATH"] = SRC + (os.pathsep + e["PYTHONPATH"] if e.get("PYTHONPATH") else "")
    e.pop("PSA_DATA_DIR", None)
    return e


def psa_cmd(*args: str) -> list[str]:
    """argv of `python -m psa ARGS`."""
    return [sys.executable, "-m", "psa", *args]


def run_psa(*args: str, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run `psa ARGS` to completion in `cwd`."""
    return subprocess.run(psa_cmd(*args), cwd=cwd, env=env(), capture_output=True, text=True, timeout=timeout)


def rows(db: Path) -> dict[str, list[tuple]]:
    """Every row that results carry, keyed by natural keys, without wall-clock columns or ids."""
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return {
            "studies": con.execute("SELECT name, design, design_hash, finished_at IS NOT NULL FROM studies "
                                   "ORDER BY name").fetchall(),
            "trials": con.execute(
                "SELECT s.name, t.arch, t.mode, t.trial, t.seed, t.meta_loops, t.lr, t.batch_size, t.weight_decay, "
                "t.dropout, t.dataset, t.status, t.bounty, t.bounty_loop, t.test_acc, t.loops_done "
                "FROM trials t JOIN studies s ON s.id = t.study_id ORDER BY 1, 2, 3, 4").fetchall(),
            "meta_loops": con.execute(
                "SELECT s.name, t.arch, t.mode, t.trial, m.loop, m.mode, m.candidate_acc, m.promoted, "
                "m.ablated_layer, m.ablated_index, m.lkg_score, m.train_loss, m.diverged "
                "FROM meta_loops m JOIN trials t ON t.id = m.trial_id JOIN studies s ON s.id = t.study_id "
                "ORDER BY 1, 2, 3, 4, 5").fetchall(),
        }
    finally:
        con.close()


def integrity(db: Path) -> str:
    """PRAGMA integrity_check of a database ("ok" when sound)."""
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return con.execute("PRAGMA integrity_check").fetchone()[0]
    finally:
        con.close()


def progress(db: Path) -> int:
    """Meta-loops recorded so far (+1000 per finished trial), or -1 before the tables exist."""
    if not db.exists():
        return -1
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
        try:
            r = con.execute("SELECT COALESCE(SUM(loops_done), 0) + 1000 * COALESCE(SUM(status = 'done'), 0) "
                            "FROM trials").fetchone()
            return int(r[0])
        finally:
            con.close()
    except sqlite3.Error:
        return -1


def leftover_checkpoints(db: Path) -> list[str]:
    """Checkpoint (and temporary) files left beside a database."""
    root = db.with_name(db.stem + ".ckpt")
    if not root.exists():
        return []
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and p.name != "lock")
