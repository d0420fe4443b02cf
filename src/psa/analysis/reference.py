"""Our cells against a reference's: the published per-trial data or the printed Table V."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

from psa.analysis.results import ReportError, Trial, load_published, load_seed_table
from psa.analysis.stats import ACC_EPS, holm, summarize
from psa.core.arch import study_architectures
from psa.core.member import MODES

REFERENCES = ("published", "seed")


@dataclass(frozen=True)
class CompareConfig:
    """Settings of the per-cell tests against a reference."""

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

    @property
    def tested(self) -> bool:
        """False where the test has no p (Welch's t with fewer than 2 trials on a side)."""
        return not math.isnan(self.p)

    def consistent(self, alpha: float) -> bool:
        """True when the test cannot tell ours from theirs at `alpha`; an untested cell is not
        counted as consistent (it was never tested)."""
        return self.tested and not (self.p < alpha)


def escapes(values: Sequence[float], zero_r: float, margin: float) -> int:
    """How many trials beat ZeroR by more than `margin` points."""
    return int(sum(v > zero_r + margin for v in values))


def welch_from_stats(m1: float, s1: float, n1: int, m2: float, s2: float, n2: int) -> float:
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
    ours_cells: dict[tuple[str, str], list[float]] = defaultdict(list)
    for t in ours:
        ours_cells[(t.arch, t.mode)].append(t.peak)
    if reference == "seed":
        out = _against_seed_table(ours_cells, cfg)
    elif reference == "published":
        out = _against_trials(ours_cells, ref_trials if ref_trials is not None else load_published().trials, cfg)
    else:
        raise ReportError(f"unknown reference {reference!r} (choose published or seed)")
    adj = holm([c.p for c in out])
    return [replace(c, p_holm=float(h)) for c, h in zip(out, adj)]


def _against_seed_table(ours_cells: dict[tuple[str, str], list[float]], cfg: CompareConfig) -> list[CellComparison]:
    """Welch's t-test from summaries against the printed Table V (n = 10 assumed)."""
    table = load_seed_table()
    out = []
    for key in sorted(set(ours_cells) & set(table), key=_cell_key):
        o = summarize(ours_cells[key])
        r = table[key]
        p = welch_from_stats(o.mean, o.std, o.n, r.mean, max(r.std, cfg.std_floor), 10)
        out.append(CellComparison(key[0], key[1], o.n, o.mean, o.std, 10, r.mean, r.std, "Welch t (summary)", p))
    return out


def _against_trials(ours_cells: dict[tuple[str, str], list[float]], ref: Iterable[Trial],
                    cfg: CompareConfig) -> list[CellComparison]:
    """Fisher's exact test on escapes where most trials sit at ZeroR, Welch's t-test elsewhere."""
    from scipy.stats import fisher_exact, mannwhitneyu

    ref_cells: dict[tuple[str, str], list[float]] = defaultdict(list)
    for t in ref:
        ref_cells[(t.arch, t.mode)].append(t.peak)
    out = []
    for key in sorted(set(ours_cells) & set(ref_cells), key=_cell_key):
        a, b = ours_cells[key], ref_cells[key]
        o, r = summarize(a), summarize(b)
        ea, eb = escapes(a, cfg.zero_r, cfg.escape_margin), escapes(b, cfg.zero_r, cfg.escape_margin)
        if ea + eb < (len(a) + len(b)) / 2:
            p = float(fisher_exact([[ea, len(a) - ea], [eb, len(b) - eb]]).pvalue)
            out.append(CellComparison(key[0], key[1], o.n, o.mean, o.std, r.n, r.mean, r.std,
                                      "Fisher (escapes)", p, f"{ea}/{len(a)}", f"{eb}/{len(b)}"))
        else:
            p = welch_from_stats(o.mean, o.std, o.n, r.mean, r.std, r.n)
            pm = float(mannwhitneyu(a, b, alternative="two-sided").pvalue) if len(a) and len(b) else math.nan
            out.append(CellComparison(key[0], key[1], o.n, o.mean, o.std, r.n, r.mean, r.std,
                                      "Welch t", p, f"{ea}/{len(a)}", f"{eb}/{len(b)}", pm))
    return out


def _cell_key(key: tuple[str, str]) -> tuple[int, int]:
    authors = {a.short: i for i, a in enumerate(study_architectures())}
    return authors.get(key[0], 10_000), MODES.index(key[1]) if key[1] in MODES else 99
