"""`psa export`: a results database's trials and meta-loops as CSV and Parquet files, from one
read snapshot (a study may be running), each file written under a temporary name and all of them
renamed once every one is written."""

from __future__ import annotations

import contextlib
import csv
import os
import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from psa.core.checkpoint import atomic_path
from psa.study.store import ADDED_COLUMNS, StoreError, db_path, get_study, list_studies

TRIAL_EXPORT = (
    ("study", "TEXT"), ("trial_id", "INTEGER"), ("arch", "TEXT"), ("mode", "TEXT"), ("trial", "INTEGER"),
    ("seed", "INTEGER"), ("meta_loops", "INTEGER"), ("lr", "REAL"), ("batch_size", "INTEGER"),
    ("weight_decay", "REAL"), ("dropout", "REAL"), ("dataset", "TEXT"), ("status", "TEXT"),
    ("bounty", "REAL"), ("bounty_loop", "INTEGER"), ("test_acc", "REAL"), ("wall_seconds", "REAL"),
    ("loops_done", "INTEGER"), ("model", "TEXT"), ("variant", "TEXT"), ("variant_settings", "TEXT"),
)
META_LOOP_EXPORT = (
    ("study", "TEXT"), ("trial_id", "INTEGER"), ("arch", "TEXT"), ("mode", "TEXT"), ("trial", "INTEGER"),
    ("seed", "INTEGER"), ("loop", "INTEGER"), ("candidate_acc", "REAL"), ("promoted", "INTEGER"),
    ("ablated_layer", "INTEGER"), ("ablated_index", "INTEGER"), ("lkg_score", "REAL"),
    ("train_loss", "REAL"), ("diverged", "INTEGER"), ("forced", "INTEGER"),
)


def _export_queries(study_ids: Sequence[int], missing: set[str] = frozenset()) -> tuple[str, str]:
    """The export's two queries; `missing` columns (ADDED_COLUMNS that a database from before
    them lacks) export as NULL, and a missing `model` as 'simplemlp'."""
    marks = ", ".join("?" * len(study_ids))

    def col(table: str, c: str) -> str:
        if c in missing:
            return "'simplemlp' AS model" if c == "model" else f"NULL AS {c}"
        return f"{table}.{c}"

    t_cols = ", ".join("s.name" if c == "study" else ("t.id" if c == "trial_id" else col("t", c))
                       for c, _ in TRIAL_EXPORT)
    m_cols = ", ".join(
        "s.name" if c == "study" else ("t.id" if c == "trial_id" else
                                       (f"t.{c}" if c in ("arch", "trial", "seed") else col("m", c)))
        for c, _ in META_LOOP_EXPORT
    )
    trials_q = (f"SELECT {t_cols} FROM trials t JOIN studies s ON s.id = t.study_id "
                f"WHERE t.study_id IN ({marks}) ORDER BY t.id")
    loops_q = (f"SELECT {m_cols} FROM meta_loops m JOIN trials t ON t.id = m.trial_id "
               f"JOIN studies s ON s.id = t.study_id WHERE t.study_id IN ({marks}) ORDER BY m.trial_id, m.loop")
    return trials_q, loops_q


def _csv_value(v: Any) -> Any:
    # repr of a float is the shortest string that reads back to the same double
    return repr(v) if isinstance(v, float) else ("" if v is None else v)


def _write_csv(path: Path, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> int:
    n = 0
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        for r in rows:
            w.writerow([_csv_value(v) for v in r])
            n += 1
    return n


def _write_parquet(path: Path, columns: Sequence[tuple[str, str]], rows: Iterable[Sequence[Any]]) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    types = {"TEXT": pa.string(), "INTEGER": pa.int64(), "REAL": pa.float64()}
    schema = pa.schema([(c, types[t]) for c, t in columns])
    n = 0
    with pq.ParquetWriter(str(path), schema) as writer:
        batch: list[Sequence[Any]] = []

        def flush() -> None:
            cols = list(zip(*batch)) if batch else [[] for _ in columns]
            writer.write_table(pa.table([pa.array(list(c), type=schema.field(i).type) for i, c in enumerate(cols)],
                                        schema=schema))

        for r in rows:
            batch.append(r)
            n += 1
            if len(batch) >= 65536:
                flush()
                batch = []
        if batch or n == 0:
            flush()
    return n


@contextlib.contextmanager
def _renaming_errors(out: Path) -> Iterator[None]:
    """A rename of the finished files that fails is one line too (their writes say their own)."""
    try:
        yield
    except OSError as e:
        raise StoreError(f"cannot move the exported files into {out}: {e.strerror or e}") from None


def export(
    con: sqlite3.Connection,
    out_dir: str | os.PathLike,
    formats: Sequence[str] = ("csv",),
    study: str | None = None,
) -> dict[str, int]:
    """Write trials.{csv,parquet} and meta_loops.{csv,parquet} into `out_dir`; returns rows per file.

    All files come from one read snapshot (a study may be running), each written under a
    temporary name; they are renamed into place only once all are written, so that an export
    that fails half-way (a full disk, Ctrl-C) leaves the previous export's files as they were,
    not a new trials file beside an older snapshot's meta-loops. Every study unless `study`
    names one.
    """
    out = Path(out_dir)
    if "parquet" in formats:
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            raise StoreError('--format parquet needs pyarrow: pip install -e ".[parquet]"') from None
    if study is not None:
        row = get_study(con, study)
        if row is None:
            names = ", ".join(r["name"] for r in list_studies(con)) or "none"
            raise StoreError(f"no study named {study!r} in {db_path(con)} (studies: {names})")
        ids = [int(row["id"])]
    else:
        ids = [int(r["id"]) for r in list_studies(con)]
    if not ids:
        raise StoreError(f"{db_path(con)} holds no study yet")
    if out.exists() and not out.is_dir():  # else mkdir's "File exists" reads as if the directory were the problem
        raise StoreError(f"--out {out} exists and is not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise StoreError(f"cannot create {out}: {e.strerror}") from None
    missing = {c for table, c, _ in (*ADDED_COLUMNS, ("trials", "model", "TEXT"))
               if c not in {r[1] for r in con.execute(f"PRAGMA table_info({table})")}}
    trials_q, loops_q = _export_queries(ids, missing)
    counts: dict[str, int] = {}
    con.execute("BEGIN")  # one snapshot for every file
    try:
        # each temporary file is renamed when the stack closes without an error, else removed
        with _renaming_errors(out), contextlib.ExitStack() as renames:
            for name, query, columns in (("trials", trials_q, TRIAL_EXPORT),
                                         ("meta_loops", loops_q, META_LOOP_EXPORT)):
                for fmt in formats:
                    path = out / f"{name}.{fmt}"
                    rows = (tuple(r) for r in con.execute(query, ids))
                    try:
                        tmp = renames.enter_context(atomic_path(path))
                        if fmt == "csv":
                            counts[str(path)] = _write_csv(tmp, [c for c, _ in columns], rows)
                        else:
                            counts[str(path)] = _write_parquet(tmp, columns, rows)
                    except OSError as e:
                        raise StoreError(f"cannot write {path}: {e.strerror or e}") from None
    finally:
        con.execute("COMMIT")
    return counts
