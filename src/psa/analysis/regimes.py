"""The regime classifier: which of the paper's four training regimes an architecture is in."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from psa.analysis.results import ReportError
from psa.analysis.stats import ACC_EPS, CellSummary
from psa.core.member import ABLATIVE_MODES, BASELINE_MODES, MODES

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
# every outcome of the classifier, in the order counts and tables list them
OUTCOMES = (*REGIMES, "unknown", "unclassified", "n/a")
RULE_SETS = ("published", "paper")


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

    rules="published": the rules that drew the authors' published regime map (NOTES.md).
    rules="paper": equations 6-8 and the chaotic rule as printed in section II.H (docs/report.md
    lists both and what they give on the published data).
    Needs at least one baseline and one ablative mode; with modes missing or cells short of
    `expected_trials` the result is marked provisional.
    """
    if rules not in RULE_SETS:
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


def regime_counts(regimes: Mapping[str, Regime]) -> dict[str, int]:
    """How many architectures fall in each regime (regimes with none left out)."""
    c = Counter(r.regime for r in regimes.values())
    return {k: c[k] for k in OUTCOMES if c[k]}
