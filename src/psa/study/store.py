"""The results database: SQLite (WAL), one versioned schema for studies, trials and meta-loops.

Schema version 1:
- studies(id, name, design JSON, design_hash, code_version, device, started_at, finished_at)
- trials(id, study_id, arch, mode, trial, seed, meta_loops, lr, batch_size, weight_decay,
  dropout, dataset, status, bounty, bounty_loop, test_acc, wall_seconds, loops_done)
  `trial` is the 1-based trial index k within its (arch, mode) cell; trial k of every mode
  shares one seed (paired design). `bounty` is the peak validation accuracy in percent.
- meta_loops(trial_id, loop, mode, candidate_acc, promoted, ablated_layer, ablated_index,
  lkg_score, train_loss, diverged); candidate_acc is NULL for a diverged candidate under the
  design's diverged = "discard" rule;
  ablated_layer counts Linear layers from 0 (== depth for the output layer).
- trials.model: the net every architecture describes ('simplemlp', the paper's, or 'resmlp'; for
  your own model, the factory `module:function`, which `arch` holds too),
  added to version 1 without a version bump: connect() adds the column (default 'simplemlp')
  to a database that lacks it, and readers of such a database read 'simplemlp'.
- runs(id, study_id, pid, host, backend, device, started_at, heartbeat_at, finished_at, outcome,
  work_at_start, pace_at, work_at_pace): one row per `psa study` invocation, for `psa status`
  (liveness, ETA: the work done at the start, and the time and work of the run's first recorded
  meta-loop, from which its pace is measured; work in the study's costs, psa.study.calibration).
  Added to version 1 without a version bump: it is only ever created, never required by
  readers; pace_at and work_at_pace were added later still (ADDED_COLUMNS).
- study_datasets(study_id, name, checksum, n_in, n_classes, n_train, n_val, n_test, zero_r,
  constant_acc JSON): the data set a study trains on, as it was when the study was created
  (its checksum is checked on every resume). Added like `runs`: readers of older databases,
  which lack it, take MNIST.

Timestamps are UTC ISO 8601 strings. Writers (`psa study`) commit every change in short
BEGIN IMMEDIATE transactions; readers (`psa status`, `psa export`, the report) open the file
read-only and, thanks to WAL, see consistent snapshots while a study runs.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import socket
import sqlite3
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any


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
    model TEXT NOT NULL DEFAULT 'simplemlp',
    variant TEXT,
    variant_settings TEXT
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
    forced INTEGER,
    PRIMARY KEY (trial_id, loop)
);
CREATE INDEX IF NOT EXISTS trials_by_cell ON trials (study_id, arch, mode);
CREATE UNIQUE INDEX IF NOT EXISTS trials_unique ON trials (study_id, arch, mode, COALESCE(variant, ''), trial);
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY,
    study_id INTEGER NOT NULL REFERENCES studies(id),
    pid INTEGER NOT NULL,
    host TEXT NOT NULL,
    backend TEXT NOT NULL,
    device TEXT,
    started_at TEXT NOT NULL,
    heartbeat_at TEXT,
    finished_at TEXT,
    outcome TEXT,
    work_at_start REAL NOT NULL DEFAULT 0,
    pace_at TEXT,
    work_at_pace REAL
);
CREATE TABLE IF NOT EXISTS study_datasets (
    study_id INTEGER PRIMARY KEY REFERENCES studies(id),
    name TEXT NOT NULL,
    checksum TEXT NOT NULL,
    n_in INTEGER NOT NULL,
    n_classes INTEGER NOT NULL,
    n_train INTEGER NOT NULL,
    n_val INTEGER NOT NULL,
    n_test INTEGER NOT NULL,
    zero_r REAL NOT NULL,
    constant_acc TEXT NOT NULL
);
"""

DATASET_COLUMNS = ("name", "checksum", "n_in", "n_classes", "n_train", "n_val", "n_test", "zero_r", "constant_acc")


class StoreError(RuntimeError):
    """A database that cannot be used: newer schema, locked, corrupt, unwritable."""


def connect(path: str | Path, readonly: bool = False, timeout: float = 30.0) -> sqlite3.Connection:
    """Open (and for writers, create or migrate) a results database."""
    path = Path(path)
    if readonly:
        if not path.is_file():
            raise StoreError(f"no results database at {path}")
        try:
            ro = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=timeout)
            check_version(ro, path)
        except sqlite3.DatabaseError as e:
            raise StoreError(f"{path}: not a readable results database ({e})") from None
        ro.row_factory = sqlite3.Row
        return ro
    deadline = time.monotonic() + timeout
    while True:
        con: sqlite3.Connection | None = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            con = sqlite3.connect(path, timeout=timeout, isolation_level=None)
            try:
                refuse_foreign(con, path)  # before WAL mode, which rewrites the file's header
            except StoreError:
                con.close()
                raise
            con.execute("PRAGMA journal_mode=WAL")
            con.execute("PRAGMA foreign_keys=ON")
            con.execute("PRAGMA synchronous=NORMAL")
            check_version(con, path)
            _add_variant_columns(con)  # before the schema's index on them
            con.executescript(SCHEMA)  # idempotent: IF NOT EXISTS throughout
            if not has_model_column(con):  # a database from before trials.model
                con.execute("ALTER TABLE trials ADD COLUMN model TEXT NOT NULL DEFAULT 'simplemlp'")
            con.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            break
        except sqlite3.OperationalError as e:
            # Two writers creating one new database at once: until it is in WAL mode, SQLite
            # answers one of them "locked" at once (deadlock avoidance, no busy wait). Every
            # step above is idempotent, so wait a moment and start again.
            if "locked" in str(e).lower() and time.monotonic() < deadline:
                if con is not None:
                    con.close()
                time.sleep(0.05)
                continue
            raise StoreError(f"cannot open the results database: {describe_error(path, e)}") from None
        except sqlite3.DatabaseError as e:
            raise StoreError(f"{path}: not a results database ({e})") from None
    con.row_factory = sqlite3.Row
    return con


# Columns added to schema version 1 without a bump (NULL in older rows, read as the paper's
# engine): trials.variant and trials.variant_settings (name and canonical settings JSON of a
# psa.core.variant.Variant), meta_loops.forced (patience forced the candidate in); runs.pace_at
# and runs.work_at_pace (NULL: a run paced from its start, as psa status did before them).
ADDED_COLUMNS = (("trials", "variant", "TEXT"), ("trials", "variant_settings", "TEXT"),
                 ("meta_loops", "forced", "INTEGER"), ("runs", "pace_at", "TEXT"), ("runs", "work_at_pace", "REAL"))


def _add_variant_columns(con: sqlite3.Connection) -> None:
    """Add ADDED_COLUMNS to a database created before them (a new one gets them from SCHEMA)."""
    for table, column, kind in ADDED_COLUMNS:
        cols = {r[1] for r in con.execute(f"PRAGMA table_info({table})")}
        if cols and column not in cols:
            con.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")


# psa's tables, the first (meta) made first: a file with only some of them is one whose creation
# was cut short, and a file with other tables is another program's
PSA_TABLES = frozenset({"meta", "studies", "trials", "meta_loops", "runs", "study_datasets"})


def refuse_foreign(con: sqlite3.Connection, path: str | Path) -> None:
    """Refuse to write into another program's SQLite database: one with tables but neither
    psa's schema version nor only psa's tables. psa would otherwise add its tables to it and
    switch it to WAL mode."""
    tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")
              if not r[0].startswith("sqlite_")}
    if not tables or tables <= PSA_TABLES:
        return
    if _has_meta(con) and con.execute("SELECT 1 FROM meta WHERE key = 'schema_version'").fetchone():
        return
    names = sorted(tables)
    shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
    raise StoreError(f"{path} is another program's SQLite database (tables: {shown}), not a psa results "
                     f"database; psa leaves it as it is: choose another --db")


def _has_meta(con: sqlite3.Connection) -> bool:
    """Whether the database has psa's meta table (a table of that name with its key and value
    columns; another program may have a meta table of its own)."""
    return {"key", "value"} <= {r[1] for r in con.execute("PRAGMA table_info(meta)")}


def check_version(con: sqlite3.Connection, path: str | Path) -> None:
    """Refuse a database written by a newer psa (a schema this code does not know)."""
    if not _has_meta(con):
        return
    row = con.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
    if row is not None and int(row[0]) > SCHEMA_VERSION:
        raise StoreError(f"{path} has schema version {row[0]}; this psa understands up to {SCHEMA_VERSION}")


# ---------------------------------------------------------------------------------------------
# Writing: short transactions, errors as one readable line


def utc_now() -> str:
    """The current time as the store writes it: UTC, ISO 8601, seconds."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def db_path(con: sqlite3.Connection) -> str:
    """The file behind a connection, for messages."""
    try:
        row = con.execute("PRAGMA database_list").fetchone()
        return row[2] or "the results database"
    except sqlite3.Error:
        return "the results database"


def describe_error(path: str | os.PathLike, e: BaseException) -> str:
    """One line for an SQLite failure: locked, full, read-only, or whatever SQLite said."""
    msg = str(e)
    low = msg.lower()
    if "locked" in low or "busy" in low:
        return (f"{path} is locked by another process (waited for the busy timeout); "
                f"wait for that process to finish, or stop it")
    if "full" in low:
        return (f"{path}: disk full ({msg}); the last transaction was rolled back and the database is intact; "
                f"free some space and rerun the same command to resume")
    if "readonly" in low or "read-only" in low:
        return f"{path} is read-only ({msg})"
    return f"{path}: {msg}"


@contextlib.contextmanager
def transaction(con: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """BEGIN IMMEDIATE ... COMMIT on an autocommit (writer) connection; ROLLBACK on any error.

    IMMEDIATE takes the write lock up front, so a transaction either runs whole or waits (busy
    timeout) before doing anything. SQLite errors leave as StoreError with a readable message.
    """
    try:
        con.execute("BEGIN IMMEDIATE")
    except sqlite3.OperationalError as e:
        raise StoreError(describe_error(db_path(con), e)) from None
    try:
        yield con
        con.execute("COMMIT")
    except BaseException as e:
        with contextlib.suppress(sqlite3.Error):
            con.execute("ROLLBACK")
        if isinstance(e, sqlite3.OperationalError):
            raise StoreError(describe_error(db_path(con), e)) from None
        raise


def get_study(con: sqlite3.Connection, name: str) -> sqlite3.Row | None:
    """The studies row called `name`, or None."""
    if "studies" not in table_names(con):  # an empty file, or another program's SQLite opened read-only
        return None
    return con.execute("SELECT * FROM studies WHERE name = ?", (name,)).fetchone()


def list_studies(con: sqlite3.Connection) -> list[sqlite3.Row]:
    """Every study, oldest first (none in a database without psa's tables: an empty file, or
    another program's SQLite, opened read-only by psa status or psa export)."""
    if "studies" not in table_names(con):
        return []
    return con.execute("SELECT * FROM studies ORDER BY id").fetchall()


TRIAL_INSERT_COLUMNS = ("arch", "mode", "trial", "seed", "meta_loops", "lr", "batch_size",
                        "weight_decay", "dropout", "dataset", "model", "variant", "variant_settings")


# what a trial row holds where the caller leaves a column out: the paper's SimpleMLP, no variant
TRIAL_DEFAULTS = {"model": "simplemlp"}


def has_model_column(con: sqlite3.Connection) -> bool:
    """Whether the trials table has its `model` column (a database opened read-only from
    before it was added does not: every trial there is a SimpleMLP)."""
    return any(r[1] == "model" for r in con.execute("PRAGMA table_info(trials)"))


def create_study(
    con: sqlite3.Connection,
    name: str,
    design_json: str,
    design_hash: str,
    code_version: str,
    device: str,
    trials: Sequence[dict[str, Any]],
    dataset: dict[str, Any] | None = None,
) -> int:
    """Insert a study and all its trials (status 'pending'), and its data set's row when given
    (DATASET_COLUMNS), in one transaction; returns its id.

    If another process created the same study meanwhile, returns that one's id unchanged (the
    caller compares designs).
    """
    with transaction(con):
        row = get_study(con, name)
        if row is not None:
            return int(row["id"])
        cur = con.execute(
            "INSERT INTO studies (name, design, design_hash, code_version, device, started_at) VALUES (?,?,?,?,?,?)",
            (name, design_json, design_hash, code_version, device, utc_now()),
        )
        assert cur.lastrowid is not None  # an INSERT's
        study_id = cur.lastrowid
        cols = ", ".join(TRIAL_INSERT_COLUMNS)
        marks = ", ".join("?" * len(TRIAL_INSERT_COLUMNS))
        try:
            con.executemany(
                f"INSERT INTO trials (study_id, status, {cols}) VALUES (?, 'pending', {marks})",
                [(study_id, *(t.get(c, TRIAL_DEFAULTS.get(c)) for c in TRIAL_INSERT_COLUMNS)) for t in trials],
            )
        except sqlite3.IntegrityError as e:
            if "UNIQUE" not in str(e):
                raise
            # a database created before variants keeps one trial per (arch, mode, trial)
            raise StoreError(f"{db_path(con)} was created by a psa without engine variants and cannot hold "
                             f"this study's variant trials; give the study a new --db") from None
        if dataset is not None:
            _insert_dataset(con, study_id, dataset)
    return study_id


def _insert_dataset(con: sqlite3.Connection, study_id: int, dataset: dict[str, Any]) -> None:
    cols = ", ".join(DATASET_COLUMNS)
    con.execute(f"INSERT INTO study_datasets (study_id, {cols}) VALUES (?, {', '.join('?' * len(DATASET_COLUMNS))})",
                (study_id, *(dataset[c] for c in DATASET_COLUMNS)))


def record_dataset(con: sqlite3.Connection, study_id: int, dataset: dict[str, Any]) -> None:
    """The data set row of a study created before psa recorded them (DATASET_COLUMNS)."""
    with transaction(con):
        if study_dataset(con, study_id) is None:
            _insert_dataset(con, study_id, dataset)


def study_dataset(con: sqlite3.Connection, study_id: int) -> sqlite3.Row | None:
    """The data set row of a study, or None (not recorded, or a database from before the table)."""
    if "study_datasets" not in table_names(con):
        return None
    return con.execute("SELECT * FROM study_datasets WHERE study_id = ?", (study_id,)).fetchone()


def update_design(con: sqlite3.Connection, study_id: int, design_json: str) -> None:
    """Replace a study's design JSON (a resume that adds what the study was created without:
    its calibration); its digest, and so the design, stay as they were."""
    with transaction(con):
        con.execute("UPDATE studies SET design = ? WHERE id = ?", (design_json, study_id))


def study_trials(con: sqlite3.Connection, study_id: int) -> list[sqlite3.Row]:
    """All trials of a study in insertion (design) order."""
    return con.execute("SELECT * FROM trials WHERE study_id = ? ORDER BY id", (study_id,)).fetchall()


def start_run(con: sqlite3.Connection, study_id: int, backend: str, device: str, work_at_start: float) -> int:
    """Record one `psa study` invocation; returns the runs row id."""
    now = utc_now()
    with transaction(con):
        cur = con.execute(
            "INSERT INTO runs (study_id, pid, host, backend, device, started_at, heartbeat_at, work_at_start) "
            "VALUES (?,?,?,?,?,?,?,?)",
            (study_id, os.getpid(), socket.gethostname(), backend, device, now, now, work_at_start),
        )
        assert cur.lastrowid is not None  # an INSERT's
        return cur.lastrowid


def update_plan(con: sqlite3.Connection, study_id: int, updates: dict[str, Any]) -> None:
    """Merge `updates` into the stored design's plan (what a resume may change there: a model
    kind's record), in one transaction; the design's digest is not affected."""
    with transaction(con):
        (text,) = con.execute("SELECT design FROM studies WHERE id = ?", (study_id,)).fetchone()
        doc = json.loads(text)
        doc.setdefault("plan", {}).update(updates)
        con.execute("UPDATE studies SET design = ? WHERE id = ?", (json.dumps(doc), study_id))


def end_run(con: sqlite3.Connection, run_id: int, outcome: str, study_id: int | None = None) -> None:
    """Close a runs row; with `study_id`, also stamp the study finished (every trial done)."""
    now = utc_now()
    with transaction(con):
        con.execute("UPDATE runs SET finished_at = ?, heartbeat_at = ?, outcome = ? WHERE id = ?",
                    (now, now, outcome, run_id))
        if study_id is not None:
            con.execute("UPDATE studies SET finished_at = ? WHERE id = ? AND finished_at IS NULL", (now, study_id))


def mark_running(con: sqlite3.Connection, trial_ids: Sequence[int]) -> None:
    """Trials whose population starts (or restarts) now."""
    with transaction(con):
        con.executemany("UPDATE trials SET status = 'running' WHERE id = ? AND status != 'done'",
                        [(i,) for i in trial_ids])


def record_loop(
    con: sqlite3.Connection,
    run_id: int,
    rows: Sequence[tuple],
    loops_done: int,
    wall_seconds: float,
    trial_ids: Sequence[int],
    work_at_pace: float | None = None,
) -> None:
    """One meta-loop of one population: its meta_loops rows and the trials' progress, atomically.

    rows: (trial_id, loop, mode, candidate_acc, promoted, ablated_layer, ablated_index,
    lkg_score, train_loss, diverged, forced). INSERT OR REPLACE keyed by (trial_id, loop): a loop
    recomputed after a crash overwrites its earlier copy instead of duplicating it.
    `work_at_pace`: the work done at the run's first recorded loop; the run's row keeps the
    first it is given, with this commit's time (psa.study.eta).
    """
    with transaction(con):
        con.executemany(
            "INSERT OR REPLACE INTO meta_loops (trial_id, loop, mode, candidate_acc, promoted, ablated_layer, "
            "ablated_index, lkg_score, train_loss, diverged, forced) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
            rows,
        )
        con.executemany(
            # MAX: a resume that recomputes loops after its checkpoint does not move progress back
            "UPDATE trials SET status = 'running', loops_done = MAX(loops_done, ?), wall_seconds = ? WHERE id = ?",
            [(loops_done, wall_seconds, i) for i in trial_ids],
        )
        now = utc_now()
        con.execute("UPDATE runs SET heartbeat_at = ?, pace_at = COALESCE(pace_at, ?), "
                    "work_at_pace = COALESCE(work_at_pace, ?) WHERE id = ?",
                    (now, None if work_at_pace is None else now, work_at_pace, run_id))


def finish_trials(con: sqlite3.Connection, run_id: int, results: Sequence[tuple]) -> None:
    """Final results of a population's trials: (trial_id, bounty, bounty_loop, test_acc, wall, loops_done)."""
    with transaction(con):
        con.executemany(
            "UPDATE trials SET status = 'done', bounty = ?, bounty_loop = ?, test_acc = ?, wall_seconds = ?, "
            "loops_done = ? WHERE id = ?",
            [(b, bl, t, w, n, i) for i, b, bl, t, w, n in results],
        )
        con.execute("UPDATE runs SET heartbeat_at = ? WHERE id = ?", (utc_now(), run_id))


def fail_trials(con: sqlite3.Connection, trial_ids: Sequence[int]) -> None:
    """Trials whose population raised; a rerun of the study retries them."""
    with transaction(con):
        con.executemany("UPDATE trials SET status = 'failed' WHERE id = ? AND status != 'done'",
                        [(i,) for i in trial_ids])


# ---------------------------------------------------------------------------------------------
# Reading: progress for `psa status`


def trial_counts(con: sqlite3.Connection, study_id: int) -> dict[str, int]:
    """Number of trials per status (every status present, 0 if none)."""
    out = {"pending": 0, "running": 0, "done": 0, "failed": 0}
    for row in con.execute("SELECT status, COUNT(*) FROM trials WHERE study_id = ? GROUP BY status", (study_id,)):
        out[row[0]] = int(row[1])
    return out


def arch_progress(con: sqlite3.Connection, study_id: int) -> list[sqlite3.Row]:
    """Per architecture, in design order: trials, trials per status, meta-loops done and planned."""
    return con.execute(
        """
        SELECT arch, COUNT(*) AS trials,
               SUM(status = 'done') AS done, SUM(status = 'running') AS running,
               SUM(status = 'pending') AS pending, SUM(status = 'failed') AS failed,
               SUM(loops_done) AS loops_done, SUM(meta_loops) AS loops_total,
               MAX(CASE WHEN status = 'done' THEN bounty END) AS best_bounty
        FROM trials WHERE study_id = ? GROUP BY arch ORDER BY MIN(id)
        """,
        (study_id,),
    ).fetchall()


def latest_run(con: sqlite3.Connection, study_id: int) -> sqlite3.Row | None:
    """The most recent `psa study` invocation of a study, or None (runs table absent or empty)."""
    has = con.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='runs'").fetchone()
    if not has:
        return None
    return con.execute("SELECT * FROM runs WHERE study_id = ? ORDER BY id DESC LIMIT 1", (study_id,)).fetchone()


# ---------------------------------------------------------------------------------------------
# Reading: a study for the report


def table_names(con: sqlite3.Connection) -> set[str]:
    """Names of the tables a database holds (an empty file holds none)."""
    return {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}


def load_trials(con: sqlite3.Connection, study_id: int) -> list[sqlite3.Row]:
    """Every trial of a study, whatever its status, ordered by cell and trial index."""
    # a database from before variants has no variant column: all its trials are the paper's engine
    variant = ("variant, variant_settings" if "variant" in {r[1] for r in con.execute("PRAGMA table_info(trials)")}
               else "NULL AS variant, NULL AS variant_settings")
    return con.execute(
        f"SELECT id, arch, mode, trial, seed, status, bounty, bounty_loop, test_acc, loops_done, dataset, {variant}, "
        "meta_loops, lr, batch_size, weight_decay, dropout "
        "FROM trials WHERE study_id=? ORDER BY arch, mode, variant, trial", (study_id,)).fetchall()


def load_meta_loops(con: sqlite3.Connection, study_id: int) -> Iterator[sqlite3.Row]:
    """(trial_id, loop, candidate_acc, lkg_score, promoted, diverged) of a study's finished trials, by trial and
    loop."""
    # a cursor, not a list: a whole study holds millions of meta-loops
    return con.execute(
        "SELECT m.trial_id, m.loop, m.candidate_acc, m.lkg_score, m.promoted, m.diverged FROM meta_loops m "
        "JOIN trials t ON t.id = m.trial_id WHERE t.study_id=? AND t.status='done' "
        "ORDER BY m.trial_id, m.loop", (study_id,))
