"""A study's results from `psa export`'s files: trials CSVs (gzip or not), with their
meta-loop CSVs for the curves where present, several exports concatenated.

A results database lives and dies with its machine; the CSVs are what survives a run on a lent
card. `load_exports` turns them back into the `StudyData` that `psa compare` and `psa report`
read from a database, so that both give the same tables from either source. Several paths are
several exports concatenated: the paper's study run as slices, each its own study in its own
database, is one study again.

A path is a directory written by `psa export` (every `trials.csv[.gz]` and `*trials.csv[.gz]` in
it) or one trials file. A trials file's meta-loops are the file beside it with `trials` in its
name replaced by `meta_loops` (`trials.csv` -> `meta_loops.csv`, `s1.trials.csv.gz` ->
`s1.meta_loops.csv.gz`); without one, that export has no curves. Columns beyond `psa export`'s
(e.g. `slice`) are ignored, except `precision`: exports of different precisions are refused
together, since a cell would then mix two arithmetics.
"""

from __future__ import annotations

import csv
import gzip
import math
from collections.abc import Iterator, Sequence
from pathlib import Path

from psa.analysis.results import (
    Design,
    ReportError,
    StudyData,
    Trial,
    _curves,
    _seeds_paired,
    _short,
    condition_label,
    design_departures,
    load_data,
    order_archs,
    schedule_end,
    short_list,
)
from psa.analysis.stats import train_subset_of
from psa.core.member import MODES
from psa.core.model import DEFAULT_MODEL
from psa.study.design import MODULE_MODEL

TRIAL_COLUMNS = ("study", "trial_id", "arch", "mode", "trial", "status", "bounty")
LOOP_COLUMNS = ("study", "trial_id", "loop", "candidate_acc", "lkg_score", "promoted")
# the numeric columns the loader converts (None where a row may leave one empty): a file edited
# by hand is refused in one line naming the value, not with a ValueError's traceback
TRIAL_NUMBERS = {"trial": int, "bounty": float, "bounty_loop": int, "test_acc": float, "seed": int,
                 "meta_loops": int, "loops_done": int, "lr": float, "batch_size": int, "weight_decay": float,
                 "dropout": float}
# what says whether the trials ran the paper's design (results.design_departures)
DESIGN_COLUMNS = ("mode", "meta_loops", "lr", "batch_size", "weight_decay", "dropout", "dataset")
LOOP_NUMBERS = {"loop": int, "candidate_acc": float, "lkg_score": float, "promoted": int, "diverged": int}
FILLED = ("trial", "loop", "lkg_score", "promoted")
# what a value can be, beyond its type: accuracies are percentages (an LKG score is -1 until
# a candidate is promoted), flags 0 or 1, counts from 1; `nan` and `inf` parse as floats but
# no study writes them
PERCENT = ("bounty", "test_acc", "candidate_acc", "lkg_score")
FLAGS = ("promoted", "diverged")
COUNTS = ("trial", "loop", "meta_loops", "batch_size")


def _out_of_range(col: str, value: float) -> str | None:
    """Why `value` cannot be in column `col`, or None."""
    if not math.isfinite(value):
        return "not a finite number"
    if col in PERCENT and not (0 <= value <= 100 or (col == "lkg_score" and value == -1)):
        return "not a percentage" + (" (or -1, before a promotion)" if col == "lkg_score" else "")
    if col in FLAGS and value not in (0, 1):
        return "not 0 or 1"
    if col in COUNTS and value < 1:
        return "less than 1"
    return None
SUFFIXES = ("trials.csv", "trials.csv.gz")


def load_source(db: str | None, reference: str | None, study: str | None,
                export: Sequence[str | Path] = ()) -> StudyData:
    """What `psa report` and `psa compare` read: exported CSVs when `export` names any, else a
    database or the published data (`results.load_data`)."""
    if export:
        return load_exports(export, study)
    return load_data(db, reference, study)


def export_files(paths: Sequence[str | Path]) -> list[tuple[Path, Path | None]]:
    """(trials file, its meta-loops file or None) for every export under `paths`, in order."""
    out: list[tuple[Path, Path | None]] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.is_file() and f.name.endswith(SUFFIXES))
            if not found:
                raise ReportError(f"{p}: no trials.csv or *trials.csv.gz of psa export in this directory")
        elif p.is_file():
            if not p.name.endswith((".csv", ".csv.gz")):
                raise ReportError(f"{p}: not a CSV file (expected a trials CSV of psa export, or its directory)")
            found = [p]
        else:
            raise ReportError(f"{p}: no such file or directory")
        for f in found:
            if f not in (t for t, _ in out):
                out.append((f, _meta_loops_beside(f)))
    return out


def _meta_loops_beside(trials: Path) -> Path | None:
    """The meta-loops file written with a trials file, if it is there (gzip or not)."""
    stem = trials.name.removesuffix(".gz").removesuffix(".csv")
    if "trials" not in stem:
        return None
    head, _, tail = stem.rpartition("trials")
    for suffix in (".csv.gz", ".csv"):
        f = trials.with_name(f"{head}meta_loops{tail}{suffix}")
        if f.is_file():
            return f
    return None


def _rows(path: Path, required: Sequence[str]) -> Iterator[dict[str, str]]:
    """The rows of a CSV (gzip when its name ends in .gz), checked to have `required` columns."""
    try:
        raw = gzip.open(path, "rt", newline="") if path.name.endswith(".gz") else open(path, newline="")
    except OSError as e:
        raise ReportError(f"cannot read {path}: {e.strerror or e}") from None
    with raw as f:
        try:
            reader = csv.DictReader(f)
            missing = [c for c in required if c not in (reader.fieldnames or ())]
            if missing:
                raise ReportError(f"{path}: not an export of psa (no column {', '.join(missing)})")
            width = len(reader.fieldnames or ())
            for row in reader:
                # a row with fewer fields than the header (a file cut short) or more (one damaged)
                if None in row or any(v is None for v in row.values()):
                    got = width - sum(v is None for v in row.values()) + len(row.get(None) or ())  # type: ignore
                    raise ReportError(f"{path}, line {reader.line_num}: {got} fields, the header has {width}: the "
                                      f"file is cut short or damaged")
                yield row
        except (OSError, EOFError, csv.Error, UnicodeDecodeError) as e:
            raise ReportError(f"cannot read {path}: {e}") from None


def _bad_value(path: Path, line: int, row: dict[str, str], numbers: dict[str, type]) -> ReportError | None:
    """The error for the first of `numbers`' columns whose value in `row` is not of its type (empty
    is allowed outside FILLED), or None when every one is."""
    for col, kind in numbers.items():
        text = row.get(col)
        if text is None or (text == "" and col not in FILLED):
            continue
        try:
            value = kind(text)
        except ValueError:
            what = "an integer" if kind is int else "a number"
            return ReportError(f"{path}, line {line}: {col} is {text!r}, not {what}")
        if (why := _out_of_range(col, value)) is not None:
            return ReportError(f"{path}, line {line}: {col} is {text!r}, {why}")
    return None


def _opt_int(text: str | None) -> int | None:
    return None if text in (None, "") else int(text)


def _opt_float(text: str | None) -> float | None:
    return None if text in (None, "") else float(text)


def load_exports(paths: Sequence[str | Path], study: str | None = None) -> StudyData:
    """Exported trials (and meta-loops) as one StudyData; `study` keeps that study's rows only.

    The design is what the rows show: their architectures (one study's in its design's order,
    as `psa export` writes its trials; several studies' in the authors' order), the paper's modes
    that occur and then engine variants, the largest trial index and meta-loop count. Exports do
    not carry the study's data-set record, so a data set that psa does not ship needs --zero-r.
    """
    files = export_files(paths)
    trials: list[Trial] = []
    incomplete: list[dict] = []
    done: dict[tuple[int, str, str], tuple[str, str, int]] = {}
    where: dict[tuple[str, str, int], tuple[Path, str]] = {}
    archs: list[str] = []
    labels: list[str] = []
    studies: list[str] = []
    datasets: set[str] = set()
    models: set[str] = set()
    precisions: dict[str, Path] = {}
    n_trials, loops = 0, None
    rows: list[tuple[int, Path, dict[str, str]]] = []
    for i, (tfile, _) in enumerate(files):
        for line, r in enumerate(_rows(tfile, TRIAL_COLUMNS), 2):
            if study is None or r["study"] == study:
                if (bad := _bad_value(tfile, line, r, TRIAL_NUMBERS)) is not None:
                    raise bad
                rows.append((i, tfile, r))
                archs.append(_short(r["arch"]))
                studies.append(r["study"])
    # a database's trials come by cell and trial index (store.load_trials): the same order here
    # gives the same floating-point sums downstream
    rows.sort(key=lambda x: (x[2]["arch"], x[2]["mode"], x[2].get("variant") or "", int(x[2]["trial"])))
    for i, tfile, r in rows:
        arch = _short(r["arch"])
        label = condition_label(r["mode"], r.get("variant") or None)
        key = (arch, label, int(r["trial"]))
        labels.append(label)
        # a study of your own models has one factory per cell (module:function): one kind of model
        model_name = r.get("model") or DEFAULT_MODEL
        models.add(MODULE_MODEL if ":" in model_name else model_name)
        if r.get("precision"):
            precisions.setdefault(r["precision"], tfile)
        n_trials = max(n_trials, key[2])
        if r.get("meta_loops"):
            loops = max(loops or 0, int(r["meta_loops"]))
        if r["status"] == "done" and r["bounty"] != "":
            if key in where:
                first, other = where[key]
                if first == tfile and other != r["study"]:  # one export of a database with several studies
                    raise ReportError(f"trial {key[2]} of {arch} {label} is in two studies of {tfile} ({other} and "
                                      f"{r['study']}): choose one with --study")
                raise ReportError(f"trial {key[2]} of {arch} {label} is in two exports ({first} and "
                                  f"{tfile}): give each trial once")
            where[key] = (tfile, r["study"])
            trials.append(Trial(arch, label, key[2], float(r["bounty"]), _opt_int(r.get("bounty_loop")),
                                _opt_float(r.get("test_acc")), _opt_int(r.get("seed")), r.get("variant") or "",
                                schedule_end(r.get("variant_settings"))))
            done[(i, r["study"], r["trial_id"])] = key
            datasets.add(r.get("dataset") or "mnist")
        else:
            status = r["status"] if r["status"] != "done" else "done without a bounty"
            incomplete.append({"arch": arch, "mode": label, "trial": key[2], "status": status,
                               "loops_done": int(r.get("loops_done") or 0)})
    names = list(dict.fromkeys(studies))
    label = ", ".join(str(f) for f, _ in files)
    if study is not None and not names:
        raise ReportError(f"no study named {study!r} in {label}")
    if len(precisions) > 1:
        raise ReportError("the exports mix precisions (" + ", ".join(f"{p} in {f}" for p, f in precisions.items())
                          + "): compare or report each precision on its own")
    if len(datasets) > 1:
        raise ReportError(f"the exports mix data sets ({', '.join(sorted(datasets))}); report them apart")
    if len(models) > 1:
        raise ReportError(f"the exports mix models ({', '.join(sorted(models))}); report them apart")
    model = models.pop() if models else DEFAULT_MODEL
    # one study: its design's order (the export's row order); several: the authors' order
    arch_order = order_archs(archs, list(dict.fromkeys(archs)) if len(names) == 1 else ())
    modes = [m for m in MODES if m in labels] + [m for m in dict.fromkeys(labels) if m not in MODES]
    curves = _curves(_loop_rows(files, done, study), done)
    paired = _seeds_paired(trials)
    notes = []
    if len(names) > 1:
        notes.append(f"{len(names)} exported studies read as one: {short_list(names)}")
    # slices of one design agree on these; exports of different designs read as one would mix
    # in silence what their cells mean
    mixed = {c: sorted({float(r[c]) for _, _, r in rows if r.get(c)}) for c in ("meta_loops", "lr", "batch_size")}
    if any(len(v) > 1 for v in mixed.values()):
        notes.append("the exports ran different designs: " + "; ".join(
            f"{c} {' and '.join(f'{x:g}' for x in v)}" for c, v in mixed.items() if len(v) > 1))
    if trials and not paired:
        notes.append("trial k of different modes does not share one seed everywhere: paired tests pair by trial index")
    source = (f"exported study {names[0]!r}" if len(names) == 1 else f"{len(names)} exported studies") + f" ({label})"
    dataset = datasets.pop() if datasets else "mnist"
    return StudyData(
        source=source + ("" if model == DEFAULT_MODEL else f" ({model})"),
        model=model,
        trials=trials,
        curves=curves,
        design=Design(tuple(arch_order), tuple(modes), n_trials, loops, train_subset_of(dataset)),
        dataset=dataset,
        paired=paired,
        incomplete=incomplete,
        notes=notes,
        curves_note=f"per-loop records of {len(curves)} finished trials",
        departures=design_departures({k: r.get(k) for k in DESIGN_COLUMNS} for _, _, r in rows),
    )


def _loop_rows(files: Sequence[tuple[Path, Path | None]], done: dict, study: str | None) -> Iterator[tuple]:
    """Meta-loop rows of finished trials as `results._curves` takes them, keyed like `done`
    (export, study, trial_id): trial ids repeat across databases."""
    for i, (_, lfile) in enumerate(files):
        if lfile is None:
            continue
        for line, r in enumerate(_rows(lfile, LOOP_COLUMNS), 2):
            key = (i, r["study"], r["trial_id"])
            if key not in done or (study is not None and r["study"] != study):
                continue
            try:  # checked in full only when a value is off: the paper's study has 588,000 rows
                loop, cand, lkg = int(r["loop"]), _opt_float(r["candidate_acc"]), float(r["lkg_score"])
                promoted, diverged = int(r["promoted"]), int(r.get("diverged") or 0)
                # NaN fails every comparison, so it is caught here too
                if (loop < 1 or promoted not in (0, 1) or diverged not in (0, 1) or not (0 <= lkg <= 100 or lkg == -1)
                        or (cand is not None and not 0 <= cand <= 100)):
                    raise ValueError
                row = (key, loop, cand, lkg, promoted, diverged)
            except ValueError:
                raise (_bad_value(lfile, line, r, LOOP_NUMBERS)
                       or ReportError(f"{lfile}, line {line}: bad row")) from None
            yield row

