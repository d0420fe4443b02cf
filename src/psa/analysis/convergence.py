"""Convergence dynamics: when a trial's bounty settles, how the conditions' bounty curves rise,
and which conditions are still improving when the run ends.

Definitions (docs/report.md states them for readers):

* **Bounty curve** b(t), t = 1..T: the running maximum of the LKG score recorded after each
  meta-loop. Before the first valid candidate the LKG score is -1 ("nothing yet"), and b(t) is
  -1 there. A loop without a record (NaN) carries the last recorded value forward. PSA only
  promotes a strictly better candidate, so b is the LKG score itself; the running maximum makes
  the definition hold for any per-loop record (the published curves give candidate accuracies).
* **Loop to 99%** (`t99`): the first loop t with b(t) >= 0.99 * b(T), the issue's "loop at which
  the bounty reaches 99% of its final value"; None when b(T) < 0 (no valid candidate at all).
  With accuracies in percent this fires early for any net that learns (99% of 98% is 97%), so
  beside it **loop to 99% of the gain** (`t99_gain`): the first t with
  b(t) - b0 >= 0.99 * (b(T) - b0), b0 the first valid (>= 0) bounty; loops before b0 never
  count; None when the bounty never rises (a net stuck at ZeroR has no rise to time).
* **Still improving**: a trial still improves when its bounty rose during the last 10% of its
  loops: b(T) > b(T - k), k = max(1, ceil(0.1 * T)). Per condition: the share of its trials that
  do, and the mean rise b(T) - b(T - k). A run of fewer than k + 1 loops cannot tell (None).
* **Median curves with bootstrap bands**: at every loop, the median of the trials' curves, and
  a 95% percentile band from resampling the trials with replacement (`band_resamples` times,
  numpy's generator seeded with (seed, the condition's index): same seed, same band).
  Pooled over architectures, each curve is first made scale-free as its **progress**:
  (b(t) - b0) / (b(T) - b0), 0 before b0; trials whose bounty never rises are left out.

Everything groups trials by `condition()`, today the mode: the one place to change when a
study's trials carry more than a mode (a variant) to compare.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from psa.analysis.results import Curve, StudyData, Trial
from psa.core.member import MODES

TARGET = 0.99  # the share of the final bounty (or of its gain) a trial must reach
TAIL = 0.10  # the last share of the loops in which "still improving" looks for a rise
BAND_LEVEL = 0.95
BAND_RESAMPLES = 1000  # bootstrap resamples of a band: at most this many (a band is descriptive)
_CHUNK = 64  # resamples per batch: bounds memory at 1,000 loops x many trials


def condition(key: tuple) -> str:
    """The condition a trial belongs to, from its curve key (arch, mode, trial): its mode."""
    return str(key[1])


def trial_condition(t: Trial) -> str:
    """The condition of a finished trial, as `condition` gives it for its curve."""
    return condition((t.arch, t.mode, t.trial))


def condition_order(conds: Sequence[str]) -> list[str]:
    """Conditions in the paper's mode order, any others after them by name."""
    conds = set(conds)
    return [m for m in MODES if m in conds] + sorted(c for c in conds if c not in MODES)


# --------------------------------------------------------------------------------------------
# One trial


def bounty_curve(curve: Curve) -> np.ndarray:
    """b(t): running maximum of the LKG score, -1 before the first valid candidate, NaN (no
    record) carrying the last value forward."""
    lkg = np.asarray(curve.lkg, dtype=float)
    filled = np.where(np.isnan(lkg), -1.0, lkg)
    return np.maximum.accumulate(np.maximum(filled, -1.0)) if filled.size else filled


def loop_to_final(b: np.ndarray, target: float = TARGET) -> int | None:
    """First loop (1-based) with b(t) >= target * b(T); None when b(T) < 0 or b is empty."""
    if b.size == 0 or b[-1] < 0:
        return None
    return int(np.argmax(b >= target * b[-1])) + 1


def loop_to_gain(b: np.ndarray, target: float = TARGET) -> int | None:
    """First loop with b(t) - b0 >= target * (b(T) - b0), b0 the first valid bounty; None when
    there is none or the bounty never rises. Loops before b0 never count."""
    valid = np.flatnonzero(b >= 0)
    if valid.size == 0:
        return None
    first = int(valid[0])
    b0 = b[first]
    gain = b[-1] - b0
    if gain <= 0:
        return None
    reached = (b - b0 >= target * gain) & (np.arange(b.size) >= first)
    return int(np.argmax(reached)) + 1


def tail_loops(n_loops: int, tail: float = TAIL) -> int:
    """k: how many final loops 'the last 10%' spans (at least one)."""
    return max(1, math.ceil(tail * n_loops - 1e-9))


def tail_rise(b: np.ndarray, tail: float = TAIL) -> float | None:
    """b(T) - b(T - k): how much the bounty rose in the last k loops; None when T <= k."""
    k = tail_loops(b.size, tail)
    if b.size <= k:
        return None
    return float(b[-1] - b[b.size - 1 - k])


def progress(b: np.ndarray) -> np.ndarray | None:
    """(b(t) - b0) / (b(T) - b0), 0 before b0; None when the bounty never rises."""
    valid = np.flatnonzero(b >= 0)
    if valid.size == 0 or b[-1] - b[valid[0]] <= 0:
        return None
    b0 = b[valid[0]]
    p = (b - b0) / (b[-1] - b0)
    p[: valid[0]] = 0.0
    return p


# --------------------------------------------------------------------------------------------
# Medians and bands


def median_band(curves: np.ndarray, seed: int | Sequence[int], n_boot: int = BAND_RESAMPLES,
                level: float = BAND_LEVEL) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-loop median of `curves` (trials x loops) and a percentile-bootstrap band of it.

    Trials are resampled with replacement, `n_boot` times, from numpy's generator seeded with
    `seed`: the same curves and seed give the same band. One trial gives a band of zero width.
    """
    curves = np.asarray(curves, dtype=float)
    n, t = curves.shape
    med = np.median(curves, axis=0)
    if n < 2:
        return med, med.copy(), med.copy()
    rng = np.random.default_rng(seed)
    meds = np.empty((n_boot, t))
    for s in range(0, n_boot, _CHUNK):
        m = min(_CHUNK, n_boot - s)
        idx = rng.integers(0, n, size=(m, n))
        meds[s:s + m] = np.median(curves[idx], axis=1)
    lo, hi = np.quantile(meds, [(1 - level) / 2, 1 - (1 - level) / 2], axis=0)
    return med, lo, hi


# --------------------------------------------------------------------------------------------
# A study


@dataclass(frozen=True)
class TrialConvergence:
    """One trial's convergence numbers."""

    arch: str
    condition: str
    trial: int
    loops: int
    final: float
    t99: int | None
    t99_gain: int | None
    tail_rise: float | None


@dataclass(frozen=True)
class CellConvergence:
    """One (architecture, condition) cell: medians over its trials with per-loop records."""

    arch: str
    condition: str
    n: int
    loops: int
    final_median: float
    t99_median: float | None
    t99_gain_median: float | None
    improving: int  # trials whose bounty rose in the last 10% of loops
    judged: int  # trials long enough to tell
    tail_rise_mean: float | None

    @property
    def improving_share(self) -> float | None:
        """Share of the judged trials still improving."""
        return self.improving / self.judged if self.judged else None


@dataclass(frozen=True)
class ConditionConvergence:
    """One condition over every architecture: is it still improving at the end?"""

    condition: str
    trials: int
    improving: int
    judged: int
    rising: int  # judged trials whose bounty rose at all (nets stuck at ZeroR never do)
    cells: int
    cells_majority_improving: int
    tail_rise_mean: float | None
    t99_median: float | None
    t99_gain_median: float | None

    @property
    def improving_share(self) -> float | None:
        """Share of the judged trials still improving."""
        return self.improving / self.judged if self.judged else None

    @property
    def rising_share(self) -> float | None:
        """Share of the judged trials that rose at all and are still improving."""
        return self.improving / self.rising if self.rising else None


@dataclass
class Band:
    """A median curve and its bootstrap band over `n` trials."""

    n: int
    median: np.ndarray
    lo: np.ndarray
    hi: np.ndarray

    def as_dict(self) -> dict:
        """JSON-able form (the figure's data)."""
        return {"n": self.n, "median": self.median.tolist(), "lo": self.lo.tolist(), "hi": self.hi.tolist()}


@dataclass
class Convergence:
    """Every convergence number of a study."""

    trials: list[TrialConvergence]
    cells: list[CellConvergence]
    conditions: list[ConditionConvergence]
    loops: int  # T of the pooled progress curves (the most common run length)
    progress: dict[str, Band]  # condition -> pooled progress median and band
    progress_left_out: dict[str, int]  # condition -> trials without a rise (no progress curve)
    bounty: dict[tuple[str, str], Band]  # (arch, condition) -> median bounty curve and band
    tail_loops: int
    notes: list[str] = field(default_factory=list)


def _median_or_none(values: Sequence[float | None]) -> float | None:
    v = [x for x in values if x is not None]
    return float(np.median(v)) if v else None


def _mean_or_none(values: Sequence[float | None]) -> float | None:
    v = [x for x in values if x is not None]
    return float(np.mean(v)) if v else None


def analyse_convergence(data: StudyData, archs: Sequence[str], seed: int = 0, n_boot: int = BAND_RESAMPLES,
                        band_archs: Sequence[str] = ()) -> Convergence:
    """Per trial, cell and condition: the loop to 99%, still improving; per condition the pooled
    progress curve with its band; per (arch, condition) of `band_archs` the bounty curve's band."""
    n_boot = min(n_boot, BAND_RESAMPLES)
    by_cell: dict[tuple[str, str], list[tuple[int, np.ndarray]]] = defaultdict(list)
    for key in sorted(data.curves):
        b = bounty_curve(data.curves[key])
        if b.size:
            by_cell[(key[0], condition(key))].append((int(key[2]), b))
    conds = condition_order({c for _, c in by_cell})
    trials, cells = [], []
    for a in archs:
        for c in conds:
            recs = by_cell.get((a, c))
            if not recs:
                continue
            ts = [TrialConvergence(a, c, k, b.size, float(b[-1]), loop_to_final(b), loop_to_gain(b), tail_rise(b))
                  for k, b in recs]
            trials += ts
            rises = [t.tail_rise for t in ts if t.tail_rise is not None]
            cells.append(CellConvergence(
                a, c, len(ts), max(t.loops for t in ts), float(np.median([t.final for t in ts])),
                _median_or_none([t.t99 for t in ts]), _median_or_none([t.t99_gain for t in ts]),
                sum(r > 0 for r in rises), len(rises), _mean_or_none(rises)))
    per_cond = []
    for c in conds:
        ts = [t for t in trials if t.condition == c]
        cs = [x for x in cells if x.condition == c]
        rises = [t.tail_rise for t in ts if t.tail_rise is not None]
        rising = sum(1 for t in ts if t.tail_rise is not None and t.t99_gain is not None)
        per_cond.append(ConditionConvergence(
            c, len(ts), sum(r > 0 for r in rises), len(rises), rising, len(cs),
            sum(1 for x in cs if x.judged and x.improving * 2 > x.judged), _mean_or_none(rises),
            _median_or_none([t.t99 for t in ts]), _median_or_none([t.t99_gain for t in ts])))
    lengths = Counter(b.size for recs in by_cell.values() for _, b in recs)
    loops = lengths.most_common(1)[0][0] if lengths else 0
    notes = []
    if len(lengths) > 1:
        notes.append(f"runs of {loops} meta-loops only in the pooled progress curves; "
                     + ", ".join(f"{n} of {t}" for t, n in sorted(lengths.items()) if t != loops) + " left out")
    prog, left_out = {}, {}
    for i, c in enumerate(conds):
        ps, skipped = [], 0
        for a in archs:
            for _, b in by_cell.get((a, c), []):
                if b.size != loops:
                    continue
                p = progress(b)
                if p is None:
                    skipped += 1
                else:
                    ps.append(p)
        left_out[c] = skipped
        if ps:
            med, lo, hi = median_band(np.stack(ps), (seed, i), n_boot)
            prog[c] = Band(len(ps), med, lo, hi)
    bands = {}
    for j, a in enumerate(band_archs):
        for i, c in enumerate(conds):
            bs = [b for _, b in by_cell.get((a, c), []) if b.size == loops]
            if bs:
                med, lo, hi = median_band(np.stack(bs), (seed, i, j + 1), n_boot)
                bands[(a, c)] = Band(len(bs), med, lo, hi)
    return Convergence(trials, cells, per_cond, loops, prog, left_out, bands, tail_loops(loops), notes)


def progress_records(C: Convergence) -> list[dict]:
    """Long form of the pooled progress curves: mode (the condition), loop, n, median, band (CSV)."""
    out = []
    for c, band in C.progress.items():
        for t in range(band.median.size):
            out.append({"mode": c, "loop": t + 1, "n": band.n, "median": float(band.median[t]),
                        "lo": float(band.lo[t]), "hi": float(band.hi[t])})
    return out


def as_json(C: Convergence) -> Mapping:
    """The manifest's summary of the convergence analysis."""
    return {"loops": C.loops, "tail_loops": C.tail_loops,
            "conditions": {x.condition: {"trials": x.trials, "improving": x.improving, "judged": x.judged,
                                         "improving_share": x.improving_share, "rising": x.rising,
                                         "t99_median": x.t99_median, "t99_gain_median": x.t99_gain_median}
                           for x in C.conditions}}
