"""Reading a study: trial tables, summaries, winners, the regime classifier and paired statistics.

Everything here works on plain structures (lists of `Trial`, dicts keyed by (arch, mode)) so that
the figures and the report can be checked without a database, and so that a study that is still
running, or one with missing cells, gives whatever it can instead of an exception.

Sources: a results database written by the study runner (schema of `psa.store`), or the
authors' published data shipped in `psa/resources/` (5,880 peak accuracies, one plotted
convergence curve per cell, and the printed Table V).
"""

from __future__ import annotations

import csv
import io
import json
import math
import sqlite3
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path

import numpy as np

from .arch import ArchError, parse_arch, study_architectures, study_matching
from . import store
from .store import StoreError, connect

MODES = ("none", "decay", "dropout", "full", "hidden", "output")
BASELINE_MODES = ("none", "decay", "dropout")
ABLATIVE_MODES = ("full", "hidden", "output")

# Accuracies are multiples of 0.01 (100 * correct / 10,000) but arrive as floats computed in
# different ways (100.0 * 1102 / 10000 == 11.02, yet 1102 / 10000 * 100 == 11.020000000000001):
# "exceeds ZeroR" must not hinge on the last bit.
ACC_EPS = 1e-6

REGIME_NAMES = {
    "I": "Beneficial Regularization",
    "II": "Optimally Sized",
    "III": "Chaotic Optimization",
    "IV": "Architectural Failure",
    "unknown": "unknown (no rule fired)",
    "unclassified": "unclassified (no equation fired)",
    "n/a": "not classified (missing modes)",
}
REGIMES = ("I", "II", "III", "IV")


class ReportError(RuntimeError):
    """Input the report cannot use at all (no data source, unknown reference, bad output dir)."""


# --------------------------------------------------------------------------------------------
# Loading


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


@dataclass(frozen=True)
class Curve:
    """Per-loop record of one trial: candidate accuracy (NaN when diverged), LKG score, promotions."""

    candidate: np.ndarray
    lkg: np.ndarray
    promoted: np.ndarray


@dataclass(frozen=True)
class Design:
    """What the study set out to run: the cells and trials a complete study has."""

    archs: tuple[str, ...]
    modes: tuple[str, ...]
    trials: int
    meta_loops: int | None = None


@dataclass
class StudyData:
    """A study as the report sees it: finished trials, their curves, and what is missing."""

    source: str
    trials: list[Trial]
    curves: dict[tuple[str, str, int], Curve]
    design: Design
    dataset: str = "mnist"
    paired: bool = True  # trial k of every mode shares a seed
    incomplete: list[dict] = field(default_factory=list)  # trials not done: arch, mode, trial, status, loops_done
    notes: list[str] = field(default_factory=list)
    curves_note: str = ""  # what the curves are (all trials, or one plotted trial per cell)

    @property
    def archs(self) -> list[str]:
        """Architectures with at least one finished trial, in design order."""
        present = {t.arch for t in self.trials}
        return order_archs(present, self.design.archs)

    def cell(self, arch: str, mode: str) -> list[Trial]:
        """Finished trials of one cell, by trial index."""
        return sorted((t for t in self.trials if t.arch == arch and t.mode == mode), key=lambda t: t.trial)


def order_archs(archs: Iterable[str], preferred: Sequence[str] = ()) -> list[str]:
    """Architectures in the preferred (design or authors') order; unknown ones after, by size."""
    archs = set(archs)
    authors = [a.short for a in study_architectures()]
    ordered = [a for a in preferred if a in archs]
    ordered += [a for a in authors if a in archs and a not in ordered]
    rest = sorted(archs - set(ordered), key=lambda a: (arch_shape(a) or (0, 0), a))
    return ordered + rest


def arch_shape(arch: str) -> tuple[int, int] | None:
    """(depth, width) of an architecture for the design-space plots; the widest layer for
    mixed shapes; None when it cannot be drawn on log axes (no hidden layer, unparsable)."""
    try:
        a = parse_arch(arch)
    except ArchError:
        return None
    if a.depth == 0:
        return None
    return a.depth, max(a.hidden)


def arch_params(arch: str) -> int | None:
    """Trainable parameters of an architecture string (None if unparsable)."""
    try:
        return parse_arch(arch).params
    except ArchError:
        return None


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
    curves = _published_curves()
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


def _published_curves() -> dict[tuple[str, str], Curve]:
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
    return Design(tuple(norm_archs), tuple(str(m) for m in modes), int(n), loops), notes


def load_db(path: str | Path, study: str | None = None) -> StudyData:
    """A study from the results database: finished trials, their per-loop curves, and what is
    not done yet. Raises StoreError for a file that is no results database; an empty one gives
    an empty StudyData with a note."""
    con = connect(path, readonly=True)
    try:
        return _load_db(con, Path(path), study)
    except sqlite3.DatabaseError as e:
        raise StoreError(f"{path}: cannot read the results database ({e})") from None
    finally:
        con.close()


def _load_db(con: sqlite3.Connection, path: Path, study: str | None) -> StudyData:
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
    notes = []
    if study is not None:
        chosen = [s for s in studies if s["name"] == study]
        if not chosen:
            names = ", ".join(s["name"] for s in studies)
            raise ReportError(f"{path} has no study named {study!r} (it has: {names})")
        row = chosen[0]
    else:
        row = studies[-1]
        if len(studies) > 1:
            names = ", ".join(s["name"] for s in studies)
            notes.append(f"the database holds {len(studies)} studies ({names}); this report reads the latest, "
                         f"{row['name']!r} (choose another with --study)")
    sid = row["id"]
    trows = store.load_trials(con, sid)
    trials, incomplete, done_ids = [], [], {}
    datasets = set()
    for r in trows:
        arch = _short(r["arch"])
        if r["status"] == "done" and r["bounty"] is not None:
            trials.append(Trial(arch, r["mode"], int(r["trial"]), float(r["bounty"]),
                                None if r["bounty_loop"] is None else int(r["bounty_loop"]),
                                None if r["test_acc"] is None else float(r["test_acc"]),
                                int(r["seed"])))
            done_ids[r["id"]] = (arch, r["mode"], int(r["trial"]))
            datasets.add(r["dataset"])
        else:
            status = r["status"] if r["status"] != "done" else "done without a bounty"
            incomplete.append({"arch": arch, "mode": r["mode"], "trial": int(r["trial"]),
                               "status": status, "loops_done": int(r["loops_done"] or 0)})
    design, dnotes = _design_from_json(row["design"], trials)
    notes += dnotes
    curves = _db_curves(con, sid, done_ids)
    paired = _seeds_paired(trials)
    if trials and not paired:
        notes.append("trial k of different modes does not share one seed everywhere: paired tests pair by trial index")
    if len(datasets) > 1:
        raise ReportError(f"study {row['name']!r} mixes data sets ({', '.join(sorted(datasets))}); report them apart")
    dataset = datasets.pop() if datasets else (str(trows[0]["dataset"]) if trows else "mnist")
    return StudyData(
        source=f"study {row['name']!r} in {path}",
        trials=trials,
        curves=curves,
        design=design,
        dataset=dataset,
        paired=paired,
        incomplete=incomplete,
        notes=notes,
        curves_note=f"per-loop records of {len(curves)} finished trials",
    )


def _short(arch: str) -> str:
    try:
        return parse_arch(arch).short
    except ArchError:
        return arch


def _db_curves(con: sqlite3.Connection, sid: int, done: Mapping[int, tuple[str, str, int]]) -> dict:
    rows = store.load_meta_loops(con, sid)
    acc: dict[int, list[tuple[int, float, float, int]]] = defaultdict(list)
    for tid, loop, cand, lkg, prom in rows:
        acc[tid].append((loop, np.nan if cand is None else cand, lkg, prom))
    curves = {}
    for tid, recs in acc.items():
        if tid not in done:
            continue
        n = max(r[0] for r in recs)
        cand = np.full(n, np.nan)
        lkg = np.full(n, np.nan)
        prom = np.zeros(n, dtype=bool)
        for loop, c, k, p in recs:
            cand[loop - 1], lkg[loop - 1], prom[loop - 1] = c, k, bool(p)
        curves[done[tid]] = Curve(cand, lkg, prom)
    return curves


def _seeds_paired(trials: list[Trial]) -> bool:
    seeds: dict[tuple[str, int], set] = defaultdict(set)
    for t in trials:
        seeds[(t.arch, t.trial)].add(t.seed)
    return all(len(s) == 1 for s in seeds.values())


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
                     + (f"; architectures with none at all: {_list(whole)}" if whole else ""))
        part = [f"{a} ({', '.join(ms)})" for a, ms in by_arch.items() if len(ms) < len(d.modes)]
        if part:
            lines.append(f"cells missing in otherwise started architectures: {_list(part)}")
    if short_cells:
        lines.append(f"{len(short_cells)} cells have fewer than the designed {d.trials} trials: "
                     + _list([f"{a} {m} ({n})" for a, m, n in short_cells]))
    if data.incomplete:
        by_status: dict[str, int] = defaultdict(int)
        for r in data.incomplete:
            by_status[r["status"]] += 1
        lines.append("trials not finished: " + ", ".join(f"{n} {s}" for s, n in sorted(by_status.items()))
                     + " (left out of every table and figure)")
    extra = sorted({t.arch for t in data.trials} - set(d.archs))
    if extra and d.archs:
        lines.append(f"architectures outside the declared design: {_list(extra)}")
    return lines


def _list(items: Sequence[str], limit: int = 12) -> str:
    items = list(items)
    if len(items) <= limit:
        return ", ".join(items)
    return ", ".join(items[:limit]) + f" and {len(items) - limit} more"


# --------------------------------------------------------------------------------------------
# ZeroR


def validation_zero_r(dataset: str = "mnist", data_dir: str | None = None) -> float:
    """ZeroR (%) of the validation split, computed from the data's labels.

    Reads only the training labels (60 KB) and the authors' split, not the 47 MB of images that
    `psa.data.load()` decodes; the result equals `load().zero_r()` (11.02 on MNIST).
    """
    from . import data as d

    if dataset not in d.SHA256:
        raise ReportError(f"cannot compute the validation ZeroR of data set {dataset!r}; pass --zero-r PERCENT")
    try:
        directory = d.locate(dataset, data_dir)
        stem = d.FILES["train_labels"]
        path = d._find_file(directory, stem)
        if path is None:
            raise d.DataError(f"{directory}: missing {stem}")
        raw = d._read_maybe_gzip(path)
        import hashlib

        if hashlib.sha256(raw).hexdigest() != d.SHA256[dataset][stem]:
            raise d.DataError(f"{path}: SHA-256 mismatch")
        labels = d._parse_idx(raw, path)
    except d.DataError as e:
        raise ReportError(f"cannot compute the validation ZeroR ({e}); pass --zero-r PERCENT") from None
    _, val = d.split_indices(labels.shape[0])
    counts = np.bincount(labels[val.numpy()], minlength=10)
    return zero_r_from_counts(counts)


def zero_r_from_counts(counts: Sequence[int]) -> float:
    """Accuracy (%) of always predicting the most frequent class, from per-class counts."""
    counts = np.asarray(counts)
    return 100.0 * int(counts.max()) / int(counts.sum())


# --------------------------------------------------------------------------------------------
# Summaries and winners


@dataclass(frozen=True)
class CellSummary:
    """Peak accuracies of one (architecture, mode) cell: n, mean, population std, min, max."""

    arch: str
    mode: str
    n: int
    mean: float
    std: float
    min: float
    max: float


def summarize(values: Sequence[float], arch: str = "", mode: str = "") -> CellSummary:
    """Summary of one cell. The std is the population std (ddof=0), as the published tables print
    it (NOTES.md: 588 of 588 published cells match with ddof=0, 82 with ddof=1)."""
    v = np.asarray(values, dtype=float)
    if v.size == 0:
        return CellSummary(arch, mode, 0, math.nan, math.nan, math.nan, math.nan)
    return CellSummary(arch, mode, int(v.size), float(v.mean()), float(v.std(ddof=0)), float(v.min()), float(v.max()))


def summaries(trials: Iterable[Trial]) -> dict[tuple[str, str], CellSummary]:
    """{(arch, mode): CellSummary} over the cells that have at least one trial."""
    cells: dict[tuple[str, str], list[float]] = defaultdict(list)
    for t in trials:
        cells[(t.arch, t.mode)].append(t.peak)
    return {k: summarize(v, *k) for k, v in cells.items()}


def round2(x: float) -> float:
    """Two decimals, as the published tables print means and stds."""
    return float(f"{x:.2f}")


def winners(means: Mapping[str, float], tolerance: float = 0.0) -> list[str]:
    """Modes with the best mean after rounding to 2 decimals, in mode order (several = a tie).

    The ties are decided on the printed (rounded) means, so a reader of Table V can check every
    winner by eye. With `tolerance`, modes within that many points of the best rounded mean tie
    too. The authors' printed Table V is reproduced on 62 of its 67 complete rows with the
    default (see docs/report.md for the 5 others)."""
    r = {m: round2(v) for m, v in means.items() if v is not None and not math.isnan(v)}
    if not r:
        return []
    best = max(r.values())
    order = [m for m in MODES if m in r] + sorted(m for m in r if m not in MODES)
    return [m for m in order if r[m] >= best - tolerance - 1e-9]


def best_trial_winners(cells: Mapping[str, Sequence[float]]) -> list[str]:
    """Modes whose best trial is the highest (Fig. 6: 'the highest score from all trials')."""
    best = {m: max(v) for m, v in cells.items() if len(v)}
    if not best:
        return []
    top = max(best.values())
    return [m for m in MODES if m in best and best[m] >= top - ACC_EPS]


# --------------------------------------------------------------------------------------------
# The regime classifier


@dataclass(frozen=True)
class Regime:
    """A regime, the rule that assigned it, and whether the data behind it was incomplete."""

    regime: str
    rule: str
    provisional: bool = False
    detail: str = ""

    @property
    def name(self) -> str:
        """The regime's long name."""
        return REGIME_NAMES.get(self.regime, self.regime)


@dataclass(frozen=True)
class ClassifierConfig:
    """Constants of the classifier (the paper's values)."""

    zero_r: float = 11.02
    min_sigma: float = 0.5  # sigma_eff floor, the paper's 0.5%
    uplift: float = 0.5  # chaotic rule (b): ablative mean above the baseline mean by this much
    chaotic_std: float = 15.0  # published rule 4c: some baseline std above this
    i_gap: float = 0.01  # published rule 2b
    ii_gap: float = 0.1  # published rule 3c


def _exceeds(x: float, z: float) -> bool:
    return x > z + ACC_EPS


def classify(cells: Mapping[str, CellSummary], cfg: ClassifierConfig = ClassifierConfig(),
             rules: str = "published", expected_trials: int | None = None) -> Regime:
    """Regime of one architecture from its per-mode summaries (unrounded means, ddof=0 stds).

    rules="published": the rules that drew the authors' published regime map (NOTES.md), giving
    46 IV, 24 II, 17 III and 11 I on their final data. rules="paper": equations 6-8 and the
    chaotic rule as printed in section II.H, which leave 8 of the 98 unclassified.
    Needs at least one baseline and one ablative mode; with modes missing or cells short of
    `expected_trials` the result is marked provisional.
    """
    if rules not in ("published", "paper"):
        raise ReportError(f"unknown rule set {rules!r} (choose published or paper)")
    B = [m for m in BASELINE_MODES if m in cells and cells[m].n > 0]
    A = [m for m in ABLATIVE_MODES if m in cells and cells[m].n > 0]
    missing = [m for m in MODES if m not in B + A]
    if not B or not A:
        return Regime("n/a", "needs at least one baseline and one ablative mode", True,
                      f"missing: {', '.join(missing)}")
    short = [m for m in B + A if expected_trials and cells[m].n < expected_trials]
    provisional = bool(missing or short)
    detail = "; ".join(s for s in (
        f"missing modes: {', '.join(missing)}" if missing else "",
        f"short cells: {', '.join(f'{m} (n={cells[m].n})' for m in short)}" if short else "") if s)
    mean = {m: cells[m].mean for m in B + A}
    mx = {m: cells[m].max for m in B + A}
    sd = {m: cells[m].std for m in B + A}
    Z = cfg.zero_r
    mu_B = float(np.mean([mean[m] for m in B]))
    mu_A = float(np.mean([mean[m] for m in A]))
    s = max(float(np.std([mean[m] for m in B])), cfg.min_sigma)

    def out(regime: str, rule: str) -> Regime:
        return Regime(regime, rule, provisional, detail)

    if rules == "paper":
        if not any(_exceeds(mx[m], Z) for m in B + A):
            return out("IV", "eq. 6: no mode's best trial exceeds ZeroR")
        if all(abs(mean[m] - mu_B) <= s for m in B + A):
            return out("I", "eq. 7: every mode mean within sigma_eff of the baseline mean")
        if mu_A < mu_B - s:
            return out("II", "eq. 8: ablative mean below baseline mean - sigma_eff")
        if not any(_exceeds(mx[b], Z) for b in B) and any(_exceeds(mx[a], Z) for a in A):
            return out("III", "chaotic (a): baselines never exceed ZeroR, an ablative mode does")
        if mu_A > mu_B + cfg.uplift:
            return out("III", "chaotic (b): ablative mean above baseline mean + 0.5")
        return out("unclassified", "no equation fired")

    # The published rules, in the order NOTES.md gives them.
    if not any(_exceeds(mx[m], Z) for m in B + A):
        return out("IV", "1a: no mode's best trial exceeds ZeroR")
    if all(not _exceeds(mean[m], Z) for m in B + A) and not any(_exceeds(mx[a], Z) for a in A):
        return out("IV", "1b: every mean at or below ZeroR and no ablative trial above it")
    if not any(mean[a] > mu_B + s for a in A):
        if all(abs(mean[m] - mu_B) <= s for m in B + A):
            return out("I", "2a: every mode mean within s of the baseline mean")
        if all(abs(mean[b] - mu_B) <= s for b in B) and max(mean[a] for a in A) - min(mean[b] for b in B) >= cfg.i_gap:
            return out("I", "2b: baselines within s, best ablative mean >= worst baseline mean + 0.01")
    s_A = max(float(np.std([mean[m] for m in A])), cfg.min_sigma)
    if mu_A < mu_B - s:
        return out("II", "3a: ablative mean below baseline mean - s")
    if max(mx[b] for b in B) > max(mx[a] for a in A) and mu_A <= mu_B:
        return out("II", "3b: best baseline trial beats best ablative trial, ablative mean not above")
    if (all(abs(mean[b] - mu_B) <= s for b in B) and all(abs(mean[a] - mu_A) <= s_A for a in A)
            and mu_A < mu_B and max(mean[a] for a in A) <= min(mean[b] for b in B) and mu_B - mu_A > cfg.ii_gap):
        return out("II", "3c: tight groups, every ablative mean below every baseline mean by > 0.1 overall")
    if not any(_exceeds(mx[b], Z) for b in B) and any(_exceeds(mx[a], Z) for a in A):
        return out("III", "4a: baselines never exceed ZeroR, an ablative mode does")
    if mu_A > mu_B + cfg.uplift:
        return out("III", "4b: ablative mean above baseline mean + 0.5")
    if any(sd[b] > cfg.chaotic_std for b in B):
        return out("III", "4c: a baseline std above 15")
    return out("unknown", "no rule fired")


def classify_all(summ: Mapping[tuple[str, str], CellSummary], archs: Sequence[str],
                 cfg: ClassifierConfig = ClassifierConfig(), rules: str = "published",
                 expected_trials: int | None = None) -> dict[str, Regime]:
    """{arch: Regime} for every architecture in `archs`."""
    out = {}
    for a in archs:
        cells = {m: summ[(a, m)] for m in MODES if (a, m) in summ}
        out[a] = classify(cells, cfg, rules, expected_trials)
    return out


# --------------------------------------------------------------------------------------------
# Paired statistics


@dataclass(frozen=True)
class StatsConfig:
    """Settings of the paired ablative-vs-baseline statistics."""

    alpha: float = 0.05
    n_boot: int = 10_000
    seed: int = 0  # of the bootstrap and of the Monte Carlo sign flips (n > 16 pairs only)
    max_exact: int = 16  # enumerate all 2^n sign flips up to this many pairs
    n_flips: int = 65_536  # Monte Carlo sign flips beyond it
    zero_r: float | None = None  # with it, comparisons where no trial learns are marked collapsed
    escape_margin: float = 0.5


def sign_flip_test(d: Sequence[float], max_exact: int = 16, n_flips: int = 65_536, seed: int = 0) -> float:
    """Two-sided paired randomisation test of mean(d) = 0: the share of the 2^n sign assignments
    of the differences whose |mean| is at least the observed one.

    Exact (all 2^n assignments) up to `max_exact` pairs, a seeded Monte Carlo with the add-one
    correction beyond. Why this test: it assumes only that, without an effect, each difference
    is as likely positive as negative; it tests the mean difference the tables print; and unlike
    the Wilcoxon signed-rank test it stays exact with the zero differences and ties that cells at
    ZeroR (11.02 everywhere) produce by the dozen.
    """
    d = np.asarray(d, dtype=float)
    n = d.size
    if n == 0:
        return math.nan
    obs = abs(d.mean())
    if obs == 0.0:
        return 1.0
    tol = 1e-9 * max(1.0, float(np.abs(d).max()))
    if n <= max_exact:
        signs = 1 - 2 * ((np.arange(2 ** n)[:, None] >> np.arange(n)) & 1)
        stats = np.abs(signs @ d) / n
        return float(np.mean(stats >= obs - tol))
    rng = np.random.default_rng(seed)
    signs = rng.choice(np.array([-1.0, 1.0]), size=(n_flips, n))
    stats = np.abs(signs @ d) / n
    return float((1 + np.sum(stats >= obs - tol)) / (1 + n_flips))


def min_sign_flip_p(d: Sequence[float]) -> float:
    """The smallest p-value the sign-flip test could give with these |differences|: 2 / 2^k for
    k non-zero differences. Above alpha, no outcome of these pairs could be significant."""
    k = int(np.count_nonzero(np.abs(np.asarray(d, dtype=float)) > ACC_EPS))
    return 1.0 if k == 0 else min(1.0, 2.0 / 2 ** k)


def holm(pvalues: Sequence[float]) -> np.ndarray:
    """Holm's step-down adjusted p-values (NaNs ignored and kept): the i-th smallest of m is
    multiplied by (m - i + 1), made non-decreasing, and capped at 1."""
    p = np.asarray(pvalues, dtype=float)
    out = np.full(p.shape, np.nan)
    ok = ~np.isnan(p)
    q = p[ok]
    m = q.size
    if m == 0:
        return out
    order = np.argsort(q, kind="stable")
    adj = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * q[order]))
    res = np.empty(m)
    res[order] = adj
    out[ok] = res
    return out


def cohens_dz(d: Sequence[float]) -> float:
    """Cohen's d_z: mean difference over the sample std (ddof=1) of the differences; NaN when
    the differences do not vary (undefined), or fewer than 2 pairs."""
    d = np.asarray(d, dtype=float)
    if d.size < 2:
        return math.nan
    sd = d.std(ddof=1)
    if sd <= ACC_EPS:
        return math.nan
    return float(d.mean() / sd)


def rank_biserial(d: Sequence[float]) -> float:
    """Matched-pairs rank-biserial correlation (Kerby 2014): (T+ - T-) / (T+ + T-) over the
    average ranks of the non-zero |differences|; in [-1, 1], NaN when every difference is 0."""
    from scipy.stats import rankdata

    d = np.asarray(d, dtype=float)
    d = d[np.abs(d) > ACC_EPS]
    if d.size == 0:
        return math.nan
    r = rankdata(np.abs(d))
    tp, tm = r[d > 0].sum(), r[d < 0].sum()
    return float((tp - tm) / (tp + tm))


def bootstrap_ci(d: Sequence[float], n_boot: int = 10_000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean difference, resampling pairs with a fixed seed.
    With 10 pairs it is narrower than it should be (percentile intervals under-cover for small
    n); it describes the data and is not a test."""
    d = np.asarray(d, dtype=float)
    if d.size == 0:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, d.size, size=(n_boot, d.size))
    means = d[idx].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)


@dataclass(frozen=True)
class Comparison:
    """One ablative mode against one baseline on one architecture, paired by trial index."""

    arch: str
    ablative: str
    baseline: str
    n: int
    n_nonzero: int
    mean_diff: float  # ablative minus baseline, accuracy points
    ci_low: float
    ci_high: float
    p: float
    p_holm: float
    d_z: float
    r_rb: float
    p_min: float  # smallest p these pairs could give
    verdict: str
    collapsed: bool = False  # no trial of either mode beats ZeroR + margin: constant predictors only


VERDICTS = ("ablation better", "ablation worse", "no detectable difference", "cannot decide")


def paired_comparisons(data_trials: Iterable[Trial], archs: Sequence[str],
                       cfg: StatsConfig = StatsConfig()) -> list[Comparison]:
    """Every ablative mode against every baseline, for each architecture, paired by trial index
    (trial k of every mode shares its seed). Holm's correction runs over the (up to) 9
    comparisons of one architecture: the family is the question "does ablation change this
    architecture's accuracy". Verdicts: 'cannot decide' when even the most extreme sign pattern
    of these pairs could not reach alpha (fewer than 6 non-zero differences), else better/worse
    when the Holm-adjusted p is below alpha, else 'no detectable difference'."""
    peaks: dict[tuple[str, str], dict[int, float]] = defaultdict(dict)
    for t in data_trials:
        peaks[(t.arch, t.mode)][t.trial] = t.peak
    out: list[Comparison] = []
    for arch in archs:
        rows = []
        for a in ABLATIVE_MODES:
            for b in BASELINE_MODES:
                pa, pb = peaks.get((arch, a), {}), peaks.get((arch, b), {})
                keys = sorted(set(pa) & set(pb))
                if not keys:
                    continue
                d = np.array([pa[k] - pb[k] for k in keys])
                collapsed = cfg.zero_r is not None and max(max(pa.values()), max(pb.values())) <= (
                    cfg.zero_r + cfg.escape_margin)
                p = sign_flip_test(d, cfg.max_exact, cfg.n_flips, cfg.seed)
                lo, hi = bootstrap_ci(d, cfg.n_boot, cfg.seed)
                rows.append(dict(arch=arch, ablative=a, baseline=b, n=len(keys),
                                 n_nonzero=int(np.count_nonzero(np.abs(d) > ACC_EPS)),
                                 mean_diff=float(d.mean()), ci_low=lo, ci_high=hi, p=p,
                                 d_z=cohens_dz(d), r_rb=rank_biserial(d), p_min=min_sign_flip_p(d),
                                 collapsed=bool(collapsed)))
        adj = holm([r["p"] for r in rows])
        for r, ph in zip(rows, adj):
            if r["p_min"] > cfg.alpha or r["n"] < 2:
                verdict = "cannot decide"
            elif ph < cfg.alpha:
                verdict = "ablation better" if r["mean_diff"] > 0 else "ablation worse"
            else:
                verdict = "no detectable difference"
            out.append(Comparison(p_holm=float(ph), verdict=verdict, **r))
    return out


ABLATION_EFFECTS = ("beneficial", "harmful", "mixed", "no detectable effect", "undecidable", "collapsed")


def ablation_effects(comparisons: Iterable[Comparison]) -> dict[str, dict]:
    """Per architecture, the effect of ablation from the significant comparisons: beneficial
    (some ablative mode significantly better than a baseline, none worse), harmful, mixed (both),
    no detectable effect (none significant though some were decidable), or undecidable (10
    trials cannot decide any of its comparisons).

    'collapsed' overrides them all when no trial of any compared mode beats ZeroR by the escape
    margin: the tests then compare constant predictors (output ablation, for one, tends to keep
    the majority class at 11.02 while collapsed baselines sit on other classes at 9.72-10.12),
    a real difference that says nothing about learning."""
    by_arch: dict[str, list[Comparison]] = defaultdict(list)
    for c in comparisons:
        by_arch[c.arch].append(c)
    out = {}
    for arch, cs in by_arch.items():
        better = sum(c.verdict == "ablation better" for c in cs)
        worse = sum(c.verdict == "ablation worse" for c in cs)
        undecidable = sum(c.verdict == "cannot decide" for c in cs)
        if all(c.collapsed for c in cs):
            effect = "collapsed"
        elif better and worse:
            effect = "mixed"
        elif better:
            effect = "beneficial"
        elif worse:
            effect = "harmful"
        elif undecidable == len(cs):
            effect = "undecidable"
        else:
            effect = "no detectable effect"
        out[arch] = {"effect": effect, "better": better, "worse": worse, "undecidable": undecidable,
                     "n_comparisons": len(cs)}
    return out


# --------------------------------------------------------------------------------------------
# Comparison with a reference


@dataclass(frozen=True)
class CompareConfig:
    """Settings of `psa compare`."""

    alpha: float = 0.01
    escape_margin: float = 0.5  # a trial escapes ZeroR when its peak exceeds ZeroR by more than this
    zero_r: float = 11.02
    std_floor: float = 0.005  # a printed std of 0.00 may be anything below 0.005


@dataclass(frozen=True)
class CellComparison:
    """Our cell against the reference's: summaries, the test used and its p-value."""

    arch: str
    mode: str
    n_ours: int
    mean_ours: float
    std_ours: float
    n_ref: int
    mean_ref: float
    std_ref: float
    test: str
    p: float
    escape_ours: str = ""  # "k/n" escaping ZeroR, for the Fisher cells
    escape_ref: str = ""
    p_mwu: float = math.nan  # Mann-Whitney U, a rank-based second opinion (per-trial references)
    p_holm: float = math.nan

    def consistent(self, alpha: float) -> bool:
        """True when the test cannot tell ours from theirs at `alpha`."""
        return not (self.p < alpha)


def escapes(values: Sequence[float], zero_r: float, margin: float) -> int:
    """How many trials beat ZeroR by more than `margin` points."""
    return int(sum(v > zero_r + margin for v in values))


def _welch_from_stats(m1: float, s1: float, n1: int, m2: float, s2: float, n2: int) -> float:
    """Welch's t-test p-value from means and *population* stds (converted to ddof=1)."""
    from scipy.stats import ttest_ind_from_stats

    if n1 < 2 or n2 < 2:
        return math.nan
    s1 = s1 * math.sqrt(n1 / (n1 - 1))
    s2 = s2 * math.sqrt(n2 / (n2 - 1))
    if s1 == 0 and s2 == 0:
        return 1.0 if abs(m1 - m2) < ACC_EPS else 0.0
    return float(ttest_ind_from_stats(m1, s1, n1, m2, s2, n2, equal_var=False).pvalue)


def compare_cells(ours: Iterable[Trial], reference: str, cfg: CompareConfig = CompareConfig(),
                  ref_trials: Iterable[Trial] | None = None) -> list[CellComparison]:
    """Per cell present in both: our mean/std against the reference's, with a two-sample test.

    reference="published" (per-trial data): cells where more than half of all trials (ours and
    theirs together) stay within `escape_margin` of ZeroR are compared by the share that escapes
    it (Fisher's exact test); the others by Welch's t-test, with the Mann-Whitney U p-value as a
    rank-based second opinion. reference="seed" (the printed Table V: mean and std only): Welch's
    t-test from the summary statistics, assuming n = 10 and a printed std of 0.00 as 0.005.
    """
    from scipy.stats import fisher_exact, mannwhitneyu

    ours_cells: dict[tuple[str, str], list[float]] = defaultdict(list)
    for t in ours:
        ours_cells[(t.arch, t.mode)].append(t.peak)
    out = []
    if reference == "seed":
        table = load_seed_table()
        for key in sorted(set(ours_cells) & set(table), key=_cell_key):
            o = summarize(ours_cells[key])
            r = table[key]
            p = _welch_from_stats(o.mean, o.std, o.n, r.mean, max(r.std, cfg.std_floor), 10)
            out.append(CellComparison(key[0], key[1], o.n, o.mean, o.std, 10, r.mean, r.std, "Welch t (summary)", p))
    elif reference == "published":
        ref = ref_trials if ref_trials is not None else load_published().trials
        ref_cells: dict[tuple[str, str], list[float]] = defaultdict(list)
        for t in ref:
            ref_cells[(t.arch, t.mode)].append(t.peak)
        for key in sorted(set(ours_cells) & set(ref_cells), key=_cell_key):
            a, b = ours_cells[key], ref_cells[key]
            o, r = summarize(a), summarize(b)
            ea, eb = escapes(a, cfg.zero_r, cfg.escape_margin), escapes(b, cfg.zero_r, cfg.escape_margin)
            if ea + eb < (len(a) + len(b)) / 2:
                p = float(fisher_exact([[ea, len(a) - ea], [eb, len(b) - eb]]).pvalue)
                out.append(CellComparison(key[0], key[1], o.n, o.mean, o.std, r.n, r.mean, r.std,
                                          "Fisher (escapes)", p, f"{ea}/{len(a)}", f"{eb}/{len(b)}"))
            else:
                p = _welch_from_stats(o.mean, o.std, o.n, r.mean, r.std, r.n)
                pm = float(mannwhitneyu(a, b, alternative="two-sided").pvalue) if len(a) and len(b) else math.nan
                out.append(CellComparison(key[0], key[1], o.n, o.mean, o.std, r.n, r.mean, r.std,
                                          "Welch t", p, f"{ea}/{len(a)}", f"{eb}/{len(b)}", pm))
    else:
        raise ReportError(f"unknown reference {reference!r} (choose published or seed)")
    adj = holm([c.p for c in out])
    return [replace(c, p_holm=float(h)) for c, h in zip(out, adj)]


def _cell_key(key: tuple[str, str]) -> tuple[int, int]:
    authors = {a.short: i for i, a in enumerate(study_architectures())}
    return authors.get(key[0], 10_000), MODES.index(key[1]) if key[1] in MODES else 99


def matching_label(arch: str) -> str:
    """Table IV's Matched/Asymmetric label (computed by equation 2 for shapes outside the study)."""
    from .arch import is_parameter_matched

    label = study_matching().get(arch)
    if label:
        return label
    try:
        return "Matched" if is_parameter_matched(parse_arch(arch)) else "Asymmetric"
    except ArchError:
        return "?"
