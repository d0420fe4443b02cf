"""Statistics of peak accuracies: ZeroR, cell summaries, winners and paired ablative-vs-baseline tests."""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from psa.analysis.results import ReportError, StudyData, Trial
from psa.core.member import ABLATIVE_MODES, BASELINE_MODES, MODES

# Accuracies are multiples of 0.01 (100 * correct / 10,000) but arrive as floats computed in
# different ways (100.0 * 1102 / 10000 == 11.02, yet 1102 / 10000 * 100 == 11.020000000000001):
# "exceeds ZeroR" must not hinge on the last bit.
ACC_EPS = 1e-6


# --------------------------------------------------------------------------------------------
# ZeroR


def base_dataset(label: str) -> str:
    """The data set of a trials row's label: "mnist" for "mnist[train:4096]"."""
    return re.sub(r"\[train:\d+\]$", "", label)


def train_subset_of(label: str) -> int | None:
    """The training examples of a trials row's label: 4096 for "mnist[train:4096]", None for all."""
    m = re.search(r"\[train:(\d+)\]$", label)
    return int(m.group(1)) if m else None


def validation_zero_r(dataset: str = "mnist", data_dir: str | None = None) -> float:
    """ZeroR (%) of the validation split, from the training labels and the split rule alone
    (idx data sets), else from the whole data set loaded on the CPU."""
    import hashlib

    # reads the labels only, not the images that `psa.core.data.load()` decodes; equals `load().zero_r()`
    from psa.core import data as d

    dataset = base_dataset(dataset)
    if dataset not in d.SHA256:
        try:
            d.check_spec(dataset)
            return d.load_dataset(dataset, "cpu", data_dir).zero_r()
        except d.DataError as e:
            raise ReportError(f"cannot compute the validation ZeroR of data set {dataset!r} ({e}); "
                              "pass --zero-r PERCENT") from None
    try:
        directory = d.locate(dataset, data_dir)
        stem = d.FILES["train_labels"]
        path = d._find_file(directory, stem)
        if path is None:
            raise d.DataError(f"{directory}: missing {stem}")
        raw = d._read_maybe_gzip(path)
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


def resolve_zero_r(data: StudyData, override: float | None) -> tuple[float, str]:
    """The validation ZeroR: the override, or computed from the study's data set."""
    if override is not None:
        return override, "given with --zero-r"
    info = data.dataset_info
    if info is not None and base_dataset(data.dataset) not in ("mnist", "fashion-mnist"):
        # a data set that does not ship with psa: the value measured when the study was created
        return float(info["zero_r"]), f"of the {data.dataset} validation split, recorded with the study"
    return validation_zero_r(data.dataset), f"computed from the {data.dataset} validation labels"


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
    """Summary of one cell; the std is the population std (ddof=0), as the published tables print it."""
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
    too (docs/report.md compares both with the printed Table V)."""
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
    if n == 0 or not np.isfinite(d).all():  # a NaN bounty (a trial that never scored) tests nothing
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
    p_min_holm: float = math.nan  # smallest Holm-adjusted p any outcome of these pairs could give


def paired_comparisons(data_trials: Iterable[Trial], archs: Sequence[str],
                       cfg: StatsConfig = StatsConfig()) -> list[Comparison]:
    """Every ablative mode against every baseline, for each architecture, paired by trial index
    (trial k of every mode shares its seed). Holm's correction runs over the (up to) 9
    comparisons of one architecture: the family is the question "does ablation change this
    architecture's accuracy". Verdicts: 'cannot decide' when even the most extreme sign pattern
    of these pairs could not reach alpha after Holm's correction, else better/worse when the
    Holm-adjusted p is below alpha, else 'no detectable difference'.

    "Could not reach": Holm's adjusted p-values never fall when a raw p-value rises, so the
    smallest adjusted p a comparison can get, over every outcome of its family, is its entry
    of holm() applied to every comparison's smallest possible p (p_min_holm). When all 9
    comparisons of an architecture differ in k of their pairs, k must be at least 9 (9 x 2/2^8
    = 0.07); uncorrected, 6 would seem enough (2/2^6 = 0.03)."""
    peaks: dict[tuple[str, str], dict[int, float]] = defaultdict(dict)
    for t in data_trials:
        peaks[(t.arch, t.mode)][t.trial] = t.peak
    out: list[Comparison] = []
    for arch in archs:
        rows = []
        for a in ABLATIVE_MODES:
            for b in BASELINE_MODES:
                row = _paired_row(arch, a, b, peaks.get((arch, a), {}), peaks.get((arch, b), {}), cfg)
                if row is not None:
                    rows.append(row)
        out += _judged(rows, cfg, "ablation")
    return out


def _judged(rows: list[dict[str, Any]], cfg: StatsConfig, what: str) -> list[Comparison]:
    """One family's rows (from _paired_row) Holm-corrected and judged: 'cannot decide' when no
    outcome of its pairs could reach alpha after Holm (p_min_holm, see paired_comparisons), else
    '<what> better/worse' when the Holm-adjusted p is below alpha, else 'no detectable
    difference'."""
    out = []
    for r, ph, ph_min in zip(rows, holm([r["p"] for r in rows]), holm([r["p_min"] for r in rows])):
        if ph_min >= cfg.alpha or r["n"] < 2:
            verdict = "cannot decide"
        elif ph < cfg.alpha:
            verdict = f"{what} better" if r["mean_diff"] > 0 else f"{what} worse"
        else:
            verdict = "no detectable difference"
        out.append(Comparison(p_holm=float(ph), verdict=verdict, p_min_holm=float(ph_min), **r))
    return out


def _paired_row(arch: str, a: str, b: str, pa: dict[int, float], pb: dict[int, float],
                cfg: StatsConfig) -> dict[str, Any] | None:
    """Condition `a` against `b` on one architecture, paired by trial index (peaks `pa`, `pb`):
    a Comparison's fields before Holm's correction; None when no trial index has both."""
    keys = sorted(set(pa) & set(pb))
    if not keys:
        return None
    d = np.array([pa[k] - pb[k] for k in keys])
    collapsed = cfg.zero_r is not None and max(max(pa.values()), max(pb.values())) <= (
        cfg.zero_r + cfg.escape_margin)
    p = sign_flip_test(d, cfg.max_exact, cfg.n_flips, cfg.seed)
    lo, hi = bootstrap_ci(d, cfg.n_boot, cfg.seed)
    return dict(arch=arch, ablative=a, baseline=b, n=len(keys), n_nonzero=int(np.count_nonzero(np.abs(d) > ACC_EPS)),
                mean_diff=float(d.mean()), ci_low=lo, ci_high=hi, p=p, d_z=cohens_dz(d), r_rb=rank_biserial(d),
                p_min=min_sign_flip_p(d), collapsed=bool(collapsed))


def variant_comparisons(data_trials: Iterable[Trial], archs: Sequence[str], modes: Sequence[str],
                        cfg: StatsConfig = StatsConfig()) -> list[Comparison]:
    """Every engine-variant condition (a trial with a `variant`, its mode "hidden+name") against
    the paper's engine in its own mode; a mode schedule against the plain mode it ends in
    (dropout:50,hidden:50 against hidden), else the one it starts in, else the design's first
    plain mode: paired by trial
    index (trial k of every condition shares its seed), Holm-corrected over the variant
    conditions of one architecture and judged as paired_comparisons judges (so "cannot decide"
    also means: not after Holm). In the returned Comparisons `ablative` is the variant's
    condition and `baseline` its reference; verdicts read "variant better/worse"."""
    peaks: dict[tuple[str, str], dict[int, float]] = defaultdict(dict)
    variant_of: dict[str, tuple[str, str]] = {}  # condition -> (the mode it starts in, the mode it ends in)
    for t in data_trials:
        peaks[(t.arch, t.mode)][t.trial] = t.peak
        if t.variant:
            variant_of[t.mode] = (t.mode[: -len(t.variant) - 1], t.ends_in)
    plain = [m for m in modes if "+" not in m]
    out: list[Comparison] = []
    for arch in archs:
        rows = []
        for label, (start, end) in variant_of.items():
            ref = next((m for m in (end, start) if m in plain), plain[0] if plain else None)
            if ref is None:
                continue
            row = _paired_row(arch, label, ref, peaks.get((arch, label), {}), peaks.get((arch, ref), {}), cfg)
            if row is not None:
                rows.append(row)
        out += _judged(rows, cfg, "variant")
    return out


ABLATION_EFFECTS = ("beneficial", "harmful", "mixed", "no detectable effect", "undecidable", "collapsed")


def ablation_effects(comparisons: Iterable[Comparison]) -> dict[str, dict]:
    """Per architecture, the effect of ablation from the significant comparisons: beneficial
    (some ablative mode significantly better than a baseline, none worse), harmful, mixed (both),
    no detectable effect (none significant though some were decidable), or undecidable (10
    trials cannot decide any of its comparisons).

    'collapsed' overrides them all when no trial of any compared mode beats ZeroR by the escape
    margin: the tests then compare constant predictors (output ablation, for one, tends to keep
    the majority class at ZeroR while collapsed baselines sit on other classes), a real
    difference that says nothing about learning."""
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
