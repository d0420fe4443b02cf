"""A study's results as the analysis sees them: finished trials, per-loop curves, the design.

Everything downstream works on these plain structures (lists of `Trial`, curves keyed by
(arch, mode, trial)) so that the figures and the report can be checked without a database, and
so that a study that is still running, or one with missing cells, gives whatever it can
instead of an exception.

Sources: a results database written by the study runner (its SQL lives in `psa.study.store`), or
the authors' published data shipped in `psa/resources/`: their per-trial peak accuracies, one
plotted convergence curve per cell, and the printed Table V.
"""

from __future__ import annotations

import dataclasses

import csv
import io
import json
import sqlite3
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from psa.core.arch import (
    N_IN,
    N_OUT,
    ArchError,
    is_parameter_matched,
    parse_arch,
    study_architectures,
    study_matching,
)
from psa.core.errors import ConfigError
from psa.core.model import DEFAULT_MODEL, param_count
from psa.core.member import MODES
from psa.core.variant import Variant, condition_label
from psa.study import store


class ReportError(RuntimeError):
    """Input the report cannot use at all (no data source, unknown reference, bad output dir)."""


@dataclass(frozen=True)
class Trial:
    """One finished trial: its peak validation accuracy (the bounty) and where it was reached."""

    arch: str
    mode: str
    trial: int
    peak: float
    bounty_loop: int | None = None
    test_acc: float | None = None
    seed: int | None = None
    variant: str = ""  # the engine variant's name ("": the paper's engine); `mode` then reads "hidden+name"
    ends_in: str = ""  # the mode a variant's mode schedule ends in ("": no schedule)


@dataclass(frozen=True)
class Curve:
    """Per-loop record of one trial: candidate accuracy (NaN where missing: a diverged candidate
    under diverged = "discard"), LKG score, promotions, divergences (None where not recorded)."""

    candidate: np.ndarray
    lkg: np.ndarray
    promoted: np.ndarray
    diverged: np.ndarray | None = None


@dataclass(frozen=True)
class Design:
    """What the study set out to run: the cells and trials a complete study has."""

    archs: tuple[str, ...]
    modes: tuple[str, ...]
    trials: int
    meta_loops: int | None = None
    train_subset: int | None = None  # the study trained on the first N training examples only


@dataclass
class StudyData:
    """A study as the report sees it: finished trials, their curves, and what is missing."""

    source: str
    trials: list[Trial]
    curves: dict[tuple[str, str, int], Curve]
    design: Design
    dataset: str = "mnist"
    model: str = DEFAULT_MODEL  # the net the study's architectures describe (one per study)
    paired: bool = True  # trial k of every mode shares a seed
    incomplete: list[dict] = field(default_factory=list)  # trials not done: arch, mode, trial, status, loops_done
    notes: list[str] = field(default_factory=list)
    curves_note: str = ""  # what the curves are (all trials, or one plotted trial per cell)
    # the study's study_datasets row (name, checksum, n_in, n_classes, zero_r, ...); None for
    # the published data and for databases from before psa recorded data sets (MNIST)
    dataset_info: dict | None = None
    # the study's stored design JSON as text: its plan holds what a module study built (the
    # persistence verdicts psa.analysis.persistence reads); None for the published data
    design_text: str | None = None
    # how its trials' hyperparameters and data depart from the paper's (design_departures)
    departures: list[str] = field(default_factory=list)

    @property
    def io(self) -> tuple[int, int]:
        """(inputs, classes) of the data set: what equation 1 counts the nets' parameters with."""
        if self.dataset_info is None:
            return N_IN, N_OUT
        return int(self.dataset_info["n_in"]), int(self.dataset_info["n_classes"])

    @property
    def archs(self) -> list[str]:
        """Architectures with at least one finished trial, in design order."""
        present = {t.arch for t in self.trials}
        return order_archs(present, self.design.archs)

    def cell(self, arch: str, mode: str) -> list[Trial]:
        """Finished trials of one cell, by trial index."""
        return sorted((t for t in self.trials if t.arch == arch and t.mode == mode), key=lambda t: t.trial)


# --------------------------------------------------------------------------------------------
# Architectures


def order_archs(archs: Iterable[str], preferred: Sequence[str] = ()) -> list[str]:
    """Architectures in the preferred (design or authors') order; unknown ones after, by size."""
    archs = set(archs)
    authors = [a.short for a in study_architectures()]
    ordered = [a for a in preferred if a in archs]
    ordered += [a for a in authors if a in archs and a not in ordered]
    rest = sorted(archs - set(ordered), key=lambda a: (arch_shape(a) or (0, 0), a))
    return ordered + rest


def arch_shape(arch: str) -> tuple[int, int] | None:
    """(depth, width) of an architecture for the design-space plots; None when it has no place
    there: no hidden layer, unparsable, or heterogeneous (layers of unequal widths, which
    `is_heterogeneous` sends to their own table and plot against parameters)."""
    try:
        a = parse_arch(arch)
    except ArchError:
        return None
    if a.depth == 0 or len(set(a.hidden)) > 1:
        return None
    return a.depth, a.hidden[0]


def is_heterogeneous(arch: str) -> bool:
    """Hidden layers of more than one width, e.g. "[2*128, 1*10, 4*16]"."""
    try:
        return len(set(parse_arch(arch).hidden)) > 1
    except ArchError:
        return False


def arch_params(arch: str, io: tuple[int, int] = (N_IN, N_OUT), model: str = DEFAULT_MODEL) -> int | None:
    """Trainable parameters of `model` for an architecture string and a data set's (inputs,
    classes) (MNIST's by default); None if unparsable."""
    try:
        return param_count(parse_arch(arch, *io), model)
    except (ArchError, ConfigError):
        return None


def matching_label(arch: str) -> str:
    """Table IV's Matched/Asymmetric label (computed by equation 2 for shapes outside the study)."""
    label = study_matching().get(arch)
    if label:
        return label
    try:
        return "Matched" if is_parameter_matched(parse_arch(arch)) else "Asymmetric"
    except ArchError:
        return "?"


def _short(arch: str) -> str:
    try:
        return parse_arch(arch).short
    except ArchError:
        return arch


# --------------------------------------------------------------------------------------------
# The authors' published data


def _resource_text(name: str) -> str:
    return resources.files("psa").joinpath(f"resources/{name}").read_text()


def published_design() -> Design:
    """The authors' design: 98 architectures x 6 modes x 10 trials x 100 meta-loops."""
    return Design(tuple(a.short for a in study_architectures()), MODES, 10, 100)


def load_published() -> StudyData:
    """The authors' final per-trial data and their plotted convergence curves (one trial per cell).

    Their trials were not seeded (hardware randomness), so trial k of two modes is not a pair:
    `paired` is False and paired tests over them only pair by index. The bounty loop of a trial is
    known only for the plotted trial of each cell, from its curve.
    """
    trials = []
    for r in csv.DictReader(io.StringIO(_resource_text("published_trials.csv"))):
        trials.append(Trial(r["arch"], r["mode"], int(r["trial"]), float(r["peak_val_acc"])))
    curves = published_curves()
    # The plotted trial of each cell is the one whose peak equals the curve's maximum; attach
    # its curve and bounty loop to that trial (the first such index when several share a peak).
    by_cell: dict[tuple[str, str], list[int]] = defaultdict(list)
    for i, t in enumerate(trials):
        by_cell[(t.arch, t.mode)].append(i)
    curve_map: dict[tuple[str, str, int], Curve] = {}
    for (arch, mode), curve in curves.items():
        peak = float(np.nanmax(curve.candidate))
        for i in by_cell.get((arch, mode), []):
            t = trials[i]
            if abs(t.peak - peak) < 0.005:
                loop = int(np.nanargmax(curve.candidate)) + 1
                trials[i] = Trial(t.arch, t.mode, t.trial, t.peak, loop, None, None)
                curve_map[(arch, mode, t.trial)] = curve
                break
    data = StudyData(
        source="published data (authors' final per-trial results)",
        trials=trials,
        curves=curve_map,
        design=published_design(),
        dataset="mnist",
        paired=False,
        curves_note=(f"published convergence: one plotted trial per cell ({len(curves)} of 588 cells; "
                     f"{len(curve_map)} matched to a trial by its peak)"),
    )
    data.notes.append("The authors' trials were unseeded: paired tests pair them by trial index only.")
    data.notes.append("Bounty loops are known only for the plotted trial of each cell (published_convergence.csv).")
    return data


def published_curves() -> dict[tuple[str, str], Curve]:
    """The authors' plotted convergence curve of each cell: {(arch, mode): Curve}."""
    series: dict[tuple[str, str], dict[int, float]] = defaultdict(dict)
    for r in csv.DictReader(io.StringIO(_resource_text("published_convergence.csv"))):
        series[(r["arch"], r["mode"])][int(r["meta_loop"])] = float(r["val_acc"])
    curves = {}
    for key, s in series.items():
        n = max(s)
        cand = np.array([s.get(i, np.nan) for i in range(1, n + 1)], dtype=float)
        lkg = np.fmax.accumulate(np.where(np.isnan(cand), -np.inf, cand))
        promoted = np.r_[True, lkg[1:] > lkg[:-1]]
        curves[key] = Curve(cand, lkg, promoted)
    return curves


@dataclass(frozen=True)
class SeedCell:
    """A cell of the paper's printed Table V: mean and population std, rounded to 2 decimals."""

    arch: str
    mode: str
    mean: float
    std: float


def load_seed_table() -> dict[tuple[str, str], SeedCell]:
    """The printed Table V (67 architectures complete): {(arch, mode): SeedCell}."""
    out = {}
    for r in csv.DictReader(io.StringIO(_resource_text("seed_table_v.csv"))):
        out[(r["arch"], r["mode"])] = SeedCell(r["arch"], r["mode"], float(r["mean"]), float(r["std"]))
    return out


# --------------------------------------------------------------------------------------------
# A results database


def load_data(db: str | None, reference: str | None, study: str | None) -> StudyData:
    """The study to report on: a database, or the authors' published data."""
    if reference is not None:
        if reference != "published":
            raise ReportError(f"psa report reads per-trial data; --reference {reference} has none (use published)")
        return load_published()
    if db is None:
        raise ReportError("nothing to report: give --db PATH or --reference published")
    return load_db(db, study)


def load_db(path: str | Path, study: str | None = None) -> StudyData:
    """A study from the results database: finished trials, their per-loop curves, and what is
    not done yet. Raises StoreError for a file that is no results database; an empty one gives
    an empty StudyData with a note."""
    con = store.connect(path, readonly=True)
    try:
        return _read_study(con, Path(path), study)
    except sqlite3.DatabaseError as e:
        raise store.StoreError(f"{path}: cannot read the results database ({e})") from None
    finally:
        con.close()


def _read_study(con: sqlite3.Connection, path: Path, study: str | None) -> StudyData:
    empty_design = Design((), (), 0, None)
    if not {"studies", "trials", "meta_loops"} <= store.table_names(con):
        data = StudyData(f"database {path}", [], {}, empty_design)
        data.notes.append(f"{path} holds no psa results tables: an empty database, nothing to report")
        return data
    studies = store.list_studies(con)
    if not studies:
        data = StudyData(f"database {path}", [], {}, empty_design)
        data.notes.append(f"{path} holds no study yet: nothing to report")
        return data
    row, notes = _choose_study(studies, path, study)
    sid = row["id"]
    trows = store.load_trials(con, sid)
    trials, incomplete, done_ids = [], [], {}
    datasets = set()
    for r in trows:
        arch = _short(r["arch"])
        label = condition_label(r["mode"], r["variant"])
        if r["status"] == "done" and r["bounty"] is not None:
            trials.append(Trial(arch, label, int(r["trial"]), float(r["bounty"]),
                                None if r["bounty_loop"] is None else int(r["bounty_loop"]),
                                None if r["test_acc"] is None else float(r["test_acc"]),
                                int(r["seed"]), r["variant"] or "", schedule_end(r["variant_settings"])))
            done_ids[r["id"]] = (arch, label, int(r["trial"]))
            datasets.add(r["dataset"])
        else:
            status = r["status"] if r["status"] != "done" else "done without a bounty"
            incomplete.append({"arch": arch, "mode": label, "trial": int(r["trial"]),
                               "status": status, "loops_done": int(r["loops_done"] or 0)})
    design, dnotes = _design_from_json(row["design"], trials)
    notes += dnotes
    # each engine variant's condition is a column of its own, after the design's modes
    labels = [condition_label(r["mode"], r["variant"]) for r in trows if r["variant"]]
    if labels:
        design = dataclasses.replace(design, modes=design.modes + tuple(dict.fromkeys(labels)))
    curves = _curves(store.load_meta_loops(con, sid), done_ids)
    paired = _seeds_paired(trials)
    if trials and not paired:
        notes.append("trial k of different modes does not share one seed everywhere: paired tests pair by trial index")
    if len(datasets) > 1:
        raise ReportError(f"study {row['name']!r} mixes data sets ({', '.join(sorted(datasets))}); report them apart")
    dataset = datasets.pop() if datasets else (str(trows[0]["dataset"]) if trows else "mnist")
    info = store.study_dataset(con, sid)
    model = _design_model(row["design"])
    return StudyData(
        source=f"study {row['name']!r} in {path}" + ("" if model == DEFAULT_MODEL else f" ({model})"),
        model=model,
        trials=trials,
        curves=curves,
        design=design,
        dataset=dataset,
        paired=paired,
        incomplete=incomplete,
        notes=notes,
        curves_note=f"per-loop records of {len(curves)} finished trials",
        dataset_info=None if info is None else dict(info),
        design_text=row["design"],
        departures=design_departures(trows),
    )


def design_departures(rows: Iterable[Any]) -> list[str]:
    """How trials (rows indexed by column: mode, meta_loops, lr, batch_size, weight_decay, dropout and
    dataset, as the trials table and psa export hold them) depart from the paper's design
    (Table VI: psa.core.hparams.HParams' defaults; decay and dropout in their own modes only,
    all 50,000 training images), one phrase each; empty for the paper's design. A comparison
    with the published study then differs for that alone."""
    from psa.core.hparams import HParams

    paper = HParams()
    seen: dict[str, set] = defaultdict(set)
    for r in rows:
        mode = str(r["mode"])
        for key, want in (("meta_loops", paper.meta_loops), ("lr", paper.lr), ("batch_size", paper.batch_size),
                          ("weight_decay", paper.weight_decay if mode == "decay" else 0.0),
                          ("dropout", paper.dropout if mode == "dropout" else 0.0)):
            value = r[key]
            if value is None or value == "":
                continue
            got = float(value)
            if not np.isclose(got, want, rtol=1e-9, atol=0.0):
                name = key if key in ("meta_loops", "lr", "batch_size") or mode in ("decay", "dropout") else \
                    f"{key} outside {'decay' if key == 'weight_decay' else 'dropout'} mode"
                seen[name].add((f"{got:g}", f"{want:g}"))
        dataset = str(r["dataset"] or "mnist")
        if dataset != "mnist":
            seen["trained on"].add((dataset, "all 50,000 MNIST training images"))
    return [f"{name} {', '.join(sorted(g for g, _ in pairs))} (the paper's: {next(iter(pairs))[1]})"
            for name, pairs in seen.items()]


def schedule_end(settings: str | None) -> str:
    """The mode a variant's mode schedule ends in, from its stored settings JSON ("" without one)."""
    try:
        return Variant.from_json(settings).end_mode("")
    except (ValueError, TypeError, ConfigError):  # settings psa cannot read: tested as without a schedule
        return ""


def _choose_study(studies: Sequence[sqlite3.Row], path: Path, study: str | None) -> tuple[sqlite3.Row, list[str]]:
    """The studies row named `study`, else the latest (with a note when there are several)."""
    names = ", ".join(s["name"] for s in studies)
    if study is not None:
        chosen = [s for s in studies if s["name"] == study]
        if not chosen:
            raise ReportError(f"{path} has no study named {study!r} (it has: {names})")
        return chosen[0], []
    row = studies[-1]
    if len(studies) > 1:
        return row, [f"the database holds {len(studies)} studies ({names}); this report reads the latest, "
                     f"{row['name']!r} (choose another with --study)"]
    return row, []


def _design_model(text: str | None) -> str:
    """The model a stored design names ('simplemlp' where it names none, as designs of the
    paper's SimpleMLP do)."""
    try:
        d = json.loads(text) if text else {}
    except ValueError:
        return DEFAULT_MODEL
    m = d.get("model", DEFAULT_MODEL) if isinstance(d, dict) else DEFAULT_MODEL
    return m if isinstance(m, str) and m else DEFAULT_MODEL


def _design_from_json(text: str | None, trials: list[Trial]) -> tuple[Design, list[str]]:
    """The design a study declared, read defensively: the runner's JSON may name its fields
    'archs' or 'architectures', 'trials' or 'n_trials'. Falls back to what the trials show."""
    notes = []
    seen_archs = order_archs({t.arch for t in trials})
    seen_modes = [m for m in MODES if any(t.mode == m for t in trials)]
    seen_trials = max((t.trial for t in trials), default=0)
    try:
        d = json.loads(text) if text else {}
        if not isinstance(d, dict):
            raise ValueError("not an object")
    except ValueError:
        notes.append("the study's design record is not readable JSON; expected cells inferred from the trials")
        d = {}
    archs = d.get("archs", d.get("architectures"))
    modes = d.get("modes")
    n = d.get("trials", d.get("n_trials"))
    loops = d.get("meta_loops")
    norm_archs: list[str] = []
    if isinstance(archs, list):
        for a in archs:
            try:
                norm_archs.append(parse_arch(str(a)).short)
            except ArchError:
                norm_archs.append(str(a))
    else:
        norm_archs = seen_archs
    if not isinstance(modes, list):
        modes = seen_modes
    if not isinstance(n, int) or isinstance(n, bool):
        n = seen_trials
    if not isinstance(loops, int) or isinstance(loops, bool):
        loops = None
    subset = d.get("train_subset")
    if not isinstance(subset, int) or isinstance(subset, bool):
        subset = None
    return Design(tuple(norm_archs), tuple(str(m) for m in modes), int(n), loops, subset), notes


def _curves(rows: Iterable[Sequence], done: Mapping[int, tuple[str, str, int]]) -> dict:
    """Per-loop rows (trial_id, loop, candidate, lkg, promoted, diverged) as one Curve per finished trial."""
    acc: dict[int, list[tuple[int, float, float, int, int]]] = defaultdict(list)
    for tid, loop, cand, lkg, prom, div in rows:
        acc[tid].append((loop, np.nan if cand is None else cand, lkg, prom, div))
    curves = {}
    for tid, recs in acc.items():
        if tid not in done:
            continue
        n = max(r[0] for r in recs)
        cand = np.full(n, np.nan)
        lkg = np.full(n, np.nan)
        prom = np.zeros(n, dtype=bool)
        div = np.zeros(n, dtype=bool)
        for loop, c, k, p, d in recs:
            cand[loop - 1], lkg[loop - 1], prom[loop - 1], div[loop - 1] = c, k, bool(p), bool(d)
        curves[done[tid]] = Curve(cand, lkg, prom, div)
    return curves


def _seeds_paired(trials: list[Trial]) -> bool:
    seeds: dict[tuple[str, int], set] = defaultdict(set)
    for t in trials:
        seeds[(t.arch, t.trial)].add(t.seed)
    return all(len(s) == 1 for s in seeds.values())


# --------------------------------------------------------------------------------------------
# What is missing


def missing_report(data: StudyData) -> list[str]:
    """Plain-language lines on what the study lacks against its design (empty when complete)."""
    lines = []
    d = data.design
    have: dict[tuple[str, str], int] = defaultdict(int)
    for t in data.trials:
        have[(t.arch, t.mode)] += 1
    if not data.trials:
        lines.append("no finished trial")
    missing_cells = [(a, m) for a in d.archs for m in d.modes if have.get((a, m), 0) == 0]
    short_cells = [(a, m, have[(a, m)]) for a in d.archs for m in d.modes if 0 < have.get((a, m), 0) < d.trials]
    if missing_cells and data.trials:
        by_arch: dict[str, list[str]] = defaultdict(list)
        for a, m in missing_cells:
            by_arch[a].append(m)
        whole = [a for a, ms in by_arch.items() if len(ms) == len(d.modes)]
        lines.append(f"{len(missing_cells)} of {len(d.archs) * len(d.modes)} designed cells have no finished trial"
                     + (f"; architectures with none at all: {short_list(whole)}" if whole else ""))
        part = [f"{a} ({', '.join(ms)})" for a, ms in by_arch.items() if len(ms) < len(d.modes)]
        if part:
            lines.append(f"cells missing in otherwise started architectures: {short_list(part)}")
    if short_cells:
        lines.append(f"{len(short_cells)} cells have fewer than the designed {d.trials} trials: "
                     + short_list([f"{a} {m} ({n})" for a, m, n in short_cells]))
    if data.incomplete:
        by_status: dict[str, int] = defaultdict(int)
        for r in data.incomplete:
            by_status[r["status"]] += 1
        lines.append("trials not finished: " + ", ".join(f"{n} {s}" for s, n in sorted(by_status.items()))
                     + " (left out of every table and figure)")
    extra = sorted({t.arch for t in data.trials} - set(d.archs))
    if extra and d.archs:
        lines.append(f"architectures outside the declared design: {short_list(extra)}")
    return lines


def short_list(items: Sequence[str], limit: int = 12) -> str:
    """Items joined by commas, the ones past `limit` counted instead of named."""
    items = list(items)
    if len(items) <= limit:
        return ", ".join(items)
    return ", ".join(items[:limit]) + f" and {len(items) - limit} more"
