"""The results database: SQLite (WAL), one versioned schema for studies, trials and meta-loops.

Schema version 1:
- studies(id, name, design JSON, design_hash, code_version, device, started_at, finished_at)
- trials(id, study_id, arch, mode, trial, seed, meta_loops, lr, batch_size, weight_decay,
  dropout, dataset, status, bounty, bounty_loop, test_acc, wall_seconds, loops_done)
  `trial` is the 1-based trial index k within its (arch, mode) cell; trial k of every mode
  shares one seed (paired design). `bounty` is the peak validation accuracy in percent.
- meta_loops(trial_id, loop, mode, candidate_acc, promoted, ablated_layer, ablated_index,
  lkg_score, train_loss, diverged); candidate_acc is NULL for a diverged candidate;
  ablated_layer counts Linear layers from 0 (== depth for the output layer).
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

SCHEMA_VERSION = 1

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS studies (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    design TEXT NOT NULL,
    design_hash TEXT NOT NULL,
    code_version TEXT,
    device TEXT,
    started_at TEXT,
    finished_at TEXT
);
CREATE TABLE IF NOT EXISTS trials (
    id INTEGER PRIMARY KEY,
    study_id INTEGER NOT NULL REFERENCES studies(id),
    arch TEXT NOT NULL,
    mode TEXT NOT NULL,
    trial INTEGER NOT NULL,
    seed INTEGER NOT NULL,
    meta_loops INTEGER NOT NULL,
    lr REAL NOT NULL,
    batch_size INTEGER NOT NULL,
    weight_decay REAL NOT NULL,
    dropout REAL NOT NULL,
    dataset TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('pending', 'running', 'done', 'failed')),
    bounty REAL,
    bounty_loop INTEGER,
    test_acc REAL,
    wall_seconds REAL,
    loops_done INTEGER NOT NULL DEFAULT 0,
    UNIQUE (study_id, arch, mode, trial)
);
CREATE TABLE IF NOT EXISTS meta_loops (
    trial_id INTEGER NOT NULL REFERENCES trials(id),
    loop INTEGER NOT NULL,
    mode TEXT NOT NULL,
    candidate_acc REAL,
    promoted INTEGER NOT NULL,
    ablated_layer INTEGER,
    ablated_index INTEGER,
    lkg_score REAL NOT NULL,
    train_loss REAL,
    diverged INTEGER NOT NULL,
    PRIMARY KEY (trial_id, loop)
);
CREATE INDEX IF NOT EXISTS trials_by_cell ON trials (study_id, arch, mode);
"""


class StoreError(RuntimeError):
    """A database that cannot be used: newer schema, locked, corrupt, unwritable."""


def connect(path: str | Path, readonly: bool = False, timeout: float = 30.0) -> sqlite3.Connection:
    """Open (and for writers, create or migrate) a results database."""
    path = Path(path)
    if readonly:
        if not path.is_file():
            raise StoreError(f"no results database at {path}")
        try:
            con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=timeout)
            check_version(con, path)
        except sqlite3.DatabaseError as e:
            raise StoreError(f"{path}: not a readable results database ({e})") from None
        con.row_factory = sqlite3.Row
        return con
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        con = sqlite3.connect(path, timeout=timeout, isolation_level=None)
        con.execute("PRAGMA journal_mode=WAL")
        con.execute("PRAGMA foreign_keys=ON")
        con.execute("PRAGMA synchronous=NORMAL")
        check_version(con, path)
        con.executescript(SCHEMA)  # idempotent: IF NOT EXISTS throughout
        con.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
    except sqlite3.OperationalError as e:
        raise StoreError(f"{path}: cannot open the results database ({e})") from None
    except sqlite3.DatabaseError as e:
        raise StoreError(f"{path}: not a results database ({e})") from None
    con.row_factory = sqlite3.Row
    return con


def check_version(con: sqlite3.Connection, path: str | Path) -> None:
    """Refuse a database written by a newer psa (a schema this code does not know)."""
    has_meta = con.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='meta'").fetchone()
    if not has_meta:
        return
    row = con.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
    if row is not None and int(row[0]) > SCHEMA_VERSION:
        raise StoreError(f"{path} has schema version {row[0]}; this psa understands up to {SCHEMA_VERSION}")
