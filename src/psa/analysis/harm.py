"""PSA's harm rate as a capacity detector: how much ablation costs an architecture against the
`none` control, and how well that cost tells the training regimes apart.

Per architecture:

* **Harm rate** of an ablative condition m: mean bounty of m minus mean bounty of `none`, in
  accuracy points (negative: ablation hurts). In a paired study (trial k of every mode shares a
  seed) it is the mean of the per-seed differences over the trial indices both cells have;
  otherwise the difference of the two means. The architecture's harm rate is the mean over the
  ablative conditions present.
* **Discard fraction** of a trial: the share of its meta-loops 2..T whose candidate was not
  promoted (discarded, or diverged). Loop 1 is left out: any valid candidate replaces the initial
  LKG score of -1. Per cell, the mean over the trials with per-loop records.

How well a measure separates the regimes (`separation`): for each regime R against the rest,
over the architectures with a regime in I-IV, and for II against I alone (the capacity question:
optimally sized or over-sized, among nets that learn and that ablation does not help), the area
under the ROC curve (the Mann-Whitney probability that an R net scores higher than another, ties
counted half: 0.5 is no separation, 0 or 1 perfect) and the best single threshold (either
direction): its in-sample accuracy, its leave-one-out accuracy (threshold refitted without each
net in turn), and the accuracy of always answering "not R" (the majority) to beat. Regimes come
from the classifier, which reads the same mode means, so on regime II ("ablative mean well below
the baselines") the harm rate is partly circular: the log10 parameter count, which the
classifier never reads, is scored alongside.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from psa.analysis.convergence import condition, trial_condition
from psa.analysis.regimes import REGIMES, Regime
from psa.analysis.results import Curve, StudyData, arch_params
from psa.core.member import ABLATIVE_MODES

CONTROL = "none"


def discard_fraction(curve: Curve) -> float | None:
    """Share of loops 2..T whose candidate was not promoted; None for a run of one loop."""
    promoted = np.asarray(curve.promoted, dtype=bool)
    if promoted.size < 2:
        return None
    return float(1.0 - promoted[1:].mean())


@dataclass(frozen=True)
class ArchHarm:
    """One architecture: harm rate per ablative condition, discard fractions, its regime."""

    arch: str
    params: int | None
    regime: str
    delta: dict[str, float]  # ablative condition -> mean bounty minus none's (points)
    pairs: dict[str, int]  # ablative condition -> pairs (paired) or trials (unpaired) behind delta
    discard: dict[str, float]  # condition -> mean discard fraction over its trials with curves
    curves: dict[str, int]  # condition -> trials with per-loop records

    @property
    def harm(self) -> float | None:
        """Mean harm rate over the ablative conditions present."""
        return float(np.mean(list(self.delta.values()))) if self.delta else None

    @property
    def discard_ablative(self) -> float | None:
        """Mean discard fraction over the ablative conditions present."""
        v = [x for c, x in self.discard.items() if c != CONTROL and c in self.delta]
        return float(np.mean(v)) if v else None


def harm_rates(data: StudyData, archs: Sequence[str], regimes: Mapping[str, Regime],
               ablative: Sequence[str] = ABLATIVE_MODES) -> list[ArchHarm]:
    """Per architecture with a `none` cell and an ablative one: harm rates and discard fractions."""
    peaks: dict[tuple[str, str], dict[int, float]] = defaultdict(dict)
    for t in data.trials:
        peaks[(t.arch, trial_condition(t))][t.trial] = t.peak
    discards: dict[tuple[str, str], list[float]] = defaultdict(list)
    for key, curve in sorted(data.curves.items()):
        d = discard_fraction(curve)
        if d is not None:
            discards[(key[0], condition(key))].append(d)
    out = []
    for a in archs:
        ctrl = peaks.get((a, CONTROL))
        if not ctrl:
            continue
        delta, pairs = {}, {}
        for m in ablative:
            cell = peaks.get((a, m))
            if not cell:
                continue
            common = sorted(set(cell) & set(ctrl))
            if data.paired and common:
                delta[m] = float(np.mean([cell[k] - ctrl[k] for k in common]))
                pairs[m] = len(common)
            else:
                delta[m] = float(np.mean(list(cell.values())) - np.mean(list(ctrl.values())))
                pairs[m] = min(len(cell), len(ctrl))
        if not delta:
            continue
        disc = {c: float(np.mean(v)) for (aa, c), v in discards.items() if aa == a}
        ncurves = {c: len(v) for (aa, c), v in discards.items() if aa == a}
        reg = regimes[a].regime if a in regimes else "n/a"
        out.append(ArchHarm(a, arch_params(a), reg, delta, pairs, disc, ncurves))
    return out


# --------------------------------------------------------------------------------------------
# Separation of the regimes


def auc(x: Sequence[float], positive: Sequence[bool]) -> float:
    """P(score of a positive > score of a negative), ties counted half; NaN without both classes."""
    x, y = np.asarray(x, dtype=float), np.asarray(positive, dtype=bool)
    pos, neg = x[y], x[~y]
    if pos.size == 0 or neg.size == 0:
        return math.nan
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0).sum() + 0.5 * (diff == 0).sum()) / diff.size)


def best_threshold(x: Sequence[float], positive: Sequence[bool]) -> tuple[float, int, float]:
    """(threshold, direction, accuracy) of the single cut that classifies best: direction +1
    says 'positive when x > threshold', -1 'positive when x < threshold'. Cuts lie halfway
    between neighbouring distinct values (and beyond both ends); the first best cut wins, +1
    before -1, lower thresholds first, so the answer is deterministic."""
    x, y = np.asarray(x, dtype=float), np.asarray(positive, dtype=bool)
    u = np.unique(x)
    cuts = np.concatenate([[u[0] - 1.0], (u[:-1] + u[1:]) / 2, [u[-1] + 1.0]]) if u.size else np.array([0.0])
    if y.size == 0:
        return float(cuts[0]), 1, math.nan
    above = x[None, :] > cuts[:, None]  # cut x point
    below = x[None, :] < cuts[:, None]
    acc = np.concatenate([(above == y).mean(axis=1), (below == y).mean(axis=1)])
    i = int(np.argmax(acc))  # the first best: +1 before -1, lower cuts first
    return float(cuts[i % cuts.size]), 1 if i < cuts.size else -1, float(acc[i])


def loo_accuracy(x: Sequence[float], positive: Sequence[bool]) -> float:
    """Leave-one-out accuracy of `best_threshold`: each point classified by the cut fitted to the rest."""
    x, y = np.asarray(x, dtype=float), np.asarray(positive, dtype=bool)
    if x.size < 2:
        return math.nan
    hits = 0
    for i in range(x.size):
        keep = np.arange(x.size) != i
        c, d, _ = best_threshold(x[keep], y[keep])
        hits += bool((x[i] > c) if d == 1 else (x[i] < c)) == bool(y[i])
    return hits / x.size


@dataclass(frozen=True)
class Separation:
    """How well one measure tells one regime from the others."""

    measure: str
    regime: str
    n: int
    n_regime: int
    auc: float
    threshold: float
    direction: int
    accuracy: float
    loo_accuracy: float
    majority_accuracy: float
    constant: bool  # the best cut lies beyond every value: it answers the majority class everywhere


MEASURES: dict[str, tuple[str, Callable[[ArchHarm], float | None]]] = {
    "harm": ("harm rate (mean ablative minus none, points)", lambda h: h.harm),
    "discard": ("discard fraction of the ablative conditions", lambda h: h.discard_ablative),
    "log10_params": ("log10 parameter count", lambda h: math.log10(h.params) if h.params else None),
}


# One regime against the other three, then the capacity question itself: among the nets that
# learn and that ablation does not help, the optimally sized (II) against the over-sized (I).
CONTRASTS: tuple[tuple[str, tuple[str, ...]], ...] = (
    *((r, REGIMES) for r in REGIMES),
    ("II", ("I", "II")),
)


def contrast_label(regime: str, among: Sequence[str]) -> str:
    """'II' for II against the rest of I-IV, 'II vs I' for II among I and II only."""
    return regime if tuple(among) == REGIMES else f"{regime} vs " + "/".join(r for r in among if r != regime)


def separation(harms: Sequence[ArchHarm]) -> list[Separation]:
    """Every measure on every contrast (`CONTRASTS`), over the nets classified in the regimes compared."""
    out = []
    for key, (_, get) in MEASURES.items():
        for r, among in CONTRASTS:
            pts = [(get(h), h.regime) for h in harms if h.regime in among and get(h) is not None]
            # means of means tie on paper yet differ in the last bits (harm rates of -0.35333...):
            # rounded far below the data's 0.01 points, so that ties count half and share a cut
            x = np.round(np.array([p[0] for p in pts], dtype=float), 9)
            y = np.array([p[1] == r for p in pts], dtype=bool)
            if not y.any() or y.all():
                continue
            c, d, acc = best_threshold(x, y)
            out.append(Separation(key, contrast_label(r, among), int(x.size), int(y.sum()), auc(x, y), c, d, acc,
                                  loo_accuracy(x, y), float(max(y.mean(), 1 - y.mean())),
                                  bool(c < x.min() or c > x.max())))
    return out


def rho_text(rho: float, p: float, n: int) -> str:
    """'rho = +0.123 (p = 0.0042, n = 98)', or why there is no rho."""
    if math.isnan(rho):
        why = "fewer than 3 nets" if n < 3 else "the values do not vary"
        return f"rho undefined (n = {n}: {why})"
    return f"rho = {rho:+.3f} (p = {p:.3g}, n = {n})"


def spearman(harms: Sequence[ArchHarm], measure: str) -> tuple[float, float, int]:
    """Spearman's rank correlation (rho, two-sided p, n) of a measure with the parameter count."""
    from scipy.stats import spearmanr  # scipy is slow to import and only the report needs it

    get = MEASURES[measure][1]
    pts = [(get(h), h.params) for h in harms if get(h) is not None and h.params]
    if len(pts) < 3:
        return math.nan, math.nan, len(pts)
    res = spearmanr([p[0] for p in pts], [p[1] for p in pts])
    return float(res.statistic), float(res.pvalue), len(pts)
