"""Convergence dynamics and the harm rate: synthetic curves and tables with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from psa.analysis import convergence as cv
from psa.analysis import harm as hm
from psa.analysis.regimes import Regime
from psa.analysis.results import Curve, Design, StudyData, Trial
from psa.analysis.tables import table_harm_separation


def curve(lkg, candidate=None, promoted=None) -> Curve:
    """A Curve from an LKG-score list (candidate = LKG, promoted where it rose, unless given)."""
    lkg = np.array(lkg, dtype=float)
    if promoted is None:
        prev = np.r_[-1.0, lkg[:-1]]
        promoted = lkg > prev
    return Curve(np.array(candidate if candidate is not None else lkg, dtype=float), lkg,
                 np.array(promoted, dtype=bool))


# ---- one trial -----------------------------------------------------------------------------

def test_bounty_curve_is_the_running_max_with_minus_one_before_the_first_candidate():
    b = cv.bounty_curve(curve([-1, -1, 20, np.nan, 30, 25]))
    assert b.tolist() == [-1, -1, 20, 20, 30, 30]


def test_loop_to_99_percent_of_the_final_value_and_of_the_gain():
    b = np.array([50, 60, 90, 99, 99.5, 100.0])
    assert cv.loop_to_final(b) == 4  # 99 >= 0.99 * 100
    assert cv.loop_to_gain(b) == 5  # 99.5 - 50 >= 0.99 * 50; 99 - 50 = 49 is not
    # a diverged first loop: -1 never counts, the gain runs from the first valid bounty (loop 3)
    b = cv.bounty_curve(curve([-1, -1, 20, 21, 29.8, 30]))
    assert cv.loop_to_final(b) == 5 and cv.loop_to_gain(b) == 6
    assert cv.loop_to_final(np.array([-1.0, -1.0])) is None and cv.loop_to_gain(np.array([-1.0])) is None
    flat = np.full(7, 11.02)  # never rises: 99% of its value at loop 1, no rise to time
    assert cv.loop_to_final(flat) == 1 and cv.loop_to_gain(flat) is None
    assert cv.loop_to_final(np.array([])) is None


def test_still_improving_looks_at_the_last_tenth_of_the_loops():
    assert cv.tail_loops(100) == 10 and cv.tail_loops(20) == 2 and cv.tail_loops(5) == 1 and cv.tail_loops(1000) == 100
    b = np.concatenate([np.linspace(10, 90, 90), np.full(10, 90.0)])
    assert cv.tail_rise(b) == 0.0  # flat for the last 10 of 100
    b[-1] = 91.0
    assert cv.tail_rise(b) == pytest.approx(1.0)  # b(100) - b(90)
    assert cv.tail_rise(np.array([5.0])) is None  # one loop cannot tell
    assert cv.tail_rise(np.array([-1.0, 5.0])) == 6.0  # rose from nothing


def test_progress_is_the_share_of_the_trials_own_rise():
    p = cv.progress(np.array([-1.0, 10, 20, 30, 30]))
    assert p.tolist() == [0.0, 0.0, 0.5, 1.0, 1.0]
    assert cv.progress(np.full(4, 11.02)) is None and cv.progress(np.array([-1.0, -1.0])) is None


# ---- bands ---------------------------------------------------------------------------------

def test_median_band_is_deterministic_in_its_seed_and_brackets_the_median():
    rng = np.random.default_rng(123)
    curves = np.cumsum(rng.random((9, 30)), axis=1)
    a = cv.median_band(curves, (0, 1), 500)
    b = cv.median_band(curves, (0, 1), 500)
    c = cv.median_band(curves, (1, 1), 500)
    for x, y in zip(a, b):
        assert np.array_equal(x, y)
    assert not np.array_equal(a[1], c[1])
    med, lo, hi = a
    assert np.array_equal(med, np.median(curves, axis=0))
    assert np.all(lo <= med) and np.all(med <= hi) and np.any(lo < hi)
    # every resampled median lies between the smallest and largest curve
    assert np.all(lo >= curves.min(axis=0)) and np.all(hi <= curves.max(axis=0))


def test_median_band_of_identical_curves_or_one_curve_has_no_width():
    same = np.tile(np.arange(10.0), (5, 1))
    med, lo, hi = cv.median_band(same, 0, 200)
    assert np.array_equal(med, lo) and np.array_equal(med, hi)
    one = np.arange(4.0)[None, :]
    med, lo, hi = cv.median_band(one, 0, 200)
    assert med.tolist() == lo.tolist() == hi.tolist() == [0, 1, 2, 3]


# ---- a study -------------------------------------------------------------------------------

def study(curves: dict, peaks: dict | None = None, paired: bool = True) -> StudyData:
    """StudyData of the given curves {(arch, mode, trial): Curve}; peaks from the curves unless given."""
    peaks = peaks or {k: float(np.nanmax(c.lkg)) for k, c in curves.items()}
    trials = [Trial(a, m, k, p) for (a, m, k), p in peaks.items()]
    archs = tuple(dict.fromkeys(k[0] for k in peaks))
    modes = tuple(dict.fromkeys(k[1] for k in peaks))
    return StudyData("test", trials, curves, Design(archs, modes, 2, 20), paired=paired)


def test_analyse_convergence_counts_improving_trials_per_cell_and_mode():
    rise = list(np.linspace(50, 90, 20))  # still rising at the end
    flat = list(np.linspace(50, 90, 10)) + [90.0] * 10  # done by loop 10
    data = study({("1*8", "none", 1): curve(rise), ("1*8", "none", 2): curve(flat),
                  ("1*8", "hidden", 1): curve(flat), ("1*8", "hidden", 2): curve(flat),
                  ("2*8", "none", 1): curve(rise), ("2*8", "none", 2): curve(rise)})
    C = cv.analyse_convergence(data, ["1*8", "2*8"], seed=0, n_boot=200, band_archs=["1*8"])
    assert C.loops == 20 and C.tail_loops == 2
    cells = {(c.arch, c.condition): c for c in C.cells}
    assert (cells[("1*8", "none")].improving, cells[("1*8", "none")].judged) == (1, 2)
    assert cells[("1*8", "hidden")].improving == 0 and cells[("2*8", "none")].improving == 2
    assert cells[("1*8", "hidden")].t99_gain_median == 10  # flat reaches 90 at loop 10
    conds = {c.condition: c for c in C.conditions}
    assert (conds["none"].improving, conds["none"].judged, conds["none"].cells_majority_improving) == (3, 4, 1)
    assert conds["hidden"].improving_share == 0.0
    assert [x.condition for x in C.conditions] == ["none", "hidden"]  # the paper's mode order
    assert C.progress["none"].n == 4 and C.progress["none"].median[-1] == 1.0
    assert set(C.bounty) == {("1*8", "none"), ("1*8", "hidden")}
    # a trial that never rises has no progress curve and is counted as left out
    data.curves[("2*8", "hidden", 1)] = curve([11.02] * 20)
    C = cv.analyse_convergence(data, ["1*8", "2*8"], seed=0, n_boot=200)
    assert C.progress_left_out["hidden"] == 1 and C.progress["hidden"].n == 2
    hidden = next(x for x in C.conditions if x.condition == "hidden")
    assert (hidden.trials, hidden.judged, hidden.rising, hidden.improving) == (3, 3, 2, 0)
    none = next(x for x in C.conditions if x.condition == "none")
    assert none.rising == 4 and none.rising_share == 0.75
    assert [r["loop"] for r in cv.progress_records(C) if r["mode"] == "none"] == list(range(1, 21))


def test_runs_of_another_length_stay_out_of_the_pooled_curves():
    data = study({("1*8", "none", 1): curve(np.linspace(10, 20, 20)), ("1*8", "none", 2): curve(np.linspace(10, 20, 20)),
                  ("1*8", "none", 3): curve(np.linspace(10, 20, 8))})
    C = cv.analyse_convergence(data, ["1*8"], n_boot=100)
    assert C.loops == 20 and C.progress["none"].n == 2 and "1 of 8 left out" in C.notes[0]


# ---- harm rate ---------------------------------------------------------------------------

def test_discard_fraction_leaves_out_loop_one():
    assert hm.discard_fraction(curve([10, 10, 20, 20, 20])) == 0.75  # loops 2..5: one promotion of 4
    assert hm.discard_fraction(curve([10])) is None
    assert hm.discard_fraction(curve([-1, -1, -1])) == 1.0  # diverged throughout: nothing promoted


def test_harm_rate_on_a_hand_made_table():
    peaks = {("A", "none", 1): 90.0, ("A", "none", 2): 92.0, ("A", "hidden", 1): 85.0, ("A", "hidden", 2): 89.0,
             ("A", "output", 1): 91.0, ("A", "output", 2): 93.0,
             ("B", "none", 1): 20.0, ("B", "full", 1): 60.0, ("B", "full", 2): 40.0,
             ("C", "hidden", 1): 50.0}  # no none: no harm rate
    curves = {("A", "none", 1): curve([80, 85, 90]), ("A", "hidden", 1): curve([80, 80, 80]),
              ("A", "hidden", 2): curve([80, 81, 81])}
    regimes = {"A": Regime("II", "3a"), "B": Regime("III", "4b"), "C": Regime("n/a", "-")}
    data = study(curves, peaks, paired=True)
    harms = {h.arch: h for h in hm.harm_rates(data, ["A", "B", "C"], regimes)}
    assert set(harms) == {"A", "B"}
    a, b = harms["A"], harms["B"]
    assert a.delta == {"hidden": -4.0, "output": 1.0} and a.pairs == {"hidden": 2, "output": 2}
    assert a.harm == -1.5 and a.regime == "II" and a.params is None  # "A" is no architecture
    assert a.discard == {"none": 0.0, "hidden": 0.75} and a.discard_ablative == 0.75
    # paired: only trial 1 of B's full has a none partner
    assert b.delta == {"full": 40.0} and b.pairs == {"full": 1}
    unpaired = {h.arch: h for h in hm.harm_rates(study(curves, peaks, paired=False), ["A", "B"], regimes)}
    assert unpaired["B"].delta == {"full": 30.0}  # mean(60, 40) - 20
    assert unpaired["B"].discard_ablative is None


def test_auc_and_thresholds_known_answers():
    x, y = [1.0, 2.0, 3.0, 4.0], [False, False, True, True]
    assert hm.auc(x, y) == 1.0 and hm.auc(x, [not v for v in y]) == 0.0
    assert hm.auc([1.0, 1.0], [True, False]) == 0.5 and math.isnan(hm.auc(x, [True] * 4))
    assert hm.best_threshold(x, y) == (2.5, 1, 1.0)
    assert hm.best_threshold(x, [True, True, False, False]) == (2.5, -1, 1.0)
    assert hm.loo_accuracy([1.0, 2.0, 3.4, 4.0], y) == 1.0  # every held-out point lands on its side of the cut
    # held out, 3 lies exactly on the cut (3.0) fitted to 1, 2, 4: '> 3' calls it negative
    assert hm.loo_accuracy(x, y) == 0.75
    # one positive among negatives on both sides: no cut beats the majority, and LOO can do worse
    x, y = [1.0, 2.0, 3.0, 4.0, 5.0], [False, False, True, False, False]
    c, d, acc = hm.best_threshold(x, y)
    assert acc == 0.8 and (c < 1 or c > 5)
    # held out, 4 or 5 leave '> 2.5' as good as the majority on the rest (3 of 4): the first best
    # cut calls them positive; 3 itself is then the only positive, unseen: wrong too
    assert hm.loo_accuracy(x, y) == 0.4


def test_separation_scores_each_regime_against_the_rest():
    regimes = {f"1*{w}": Regime(r, "-") for w, r in ((2, "II"), (4, "II"), (8, "I"), (16, "I"), (32, "IV"))}
    peaks = {}
    for (a, reg), harm in zip(regimes.items(), (-5.0, -4.0, -0.1, -0.2, 0.0)):
        peaks[(a, "none", 1)] = 50.0
        peaks[(a, "hidden", 1)] = 50.0 + harm
    harms = hm.harm_rates(study({}, peaks), list(regimes), regimes)
    seps = {(s.measure, s.regime): s for s in hm.separation(harms)}
    ii = seps[("harm", "II")]
    assert (ii.n, ii.n_regime, ii.auc, ii.accuracy, ii.direction, ii.constant) == (5, 2, 0.0, 1.0, -1, False)
    assert seps[("log10_params", "I")].n == 5 and ("discard", "I") not in seps  # no curves, no discard
    vs = seps[("harm", "II vs I")]  # the two II nets against the two I nets only
    assert (vs.n, vs.n_regime, vs.auc, vs.loo_accuracy) == (4, 2, 0.0, 1.0)
    assert ("harm", "III") not in seps  # no III net: nothing to separate
    rho, p, n = hm.spearman(harms, "harm")
    assert n == 5 and rho == pytest.approx(0.9)  # harm ranks 1, 2, 4, 3, 5 against size ranks 1..5


# ---- the report ----------------------------------------------------------------------------

def _csv(path):
    import csv

    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_report_on_the_tiny_reference_study_has_the_new_sections(reference, tmp_path):
    import sqlite3
    from collections import defaultdict

    from .conftest import run_main

    out = tmp_path / "rep"
    rc, stdout, err = run_main(["report", "--db", str(reference), "--out", str(out), "--bootstrap", "200",
                               "--zero-r", "11.02"], tmp_path)  # a --train-subset data set: ZeroR not computed
    assert rc == 0, err
    html = (out / "index.html").read_text()
    assert "Convergence dynamics" in html and "Harm rate as a capacity detector" in html
    for name in ("bounty_progress", "harm_rate"):
        assert f'id="fig-{name}"' in html and (out / "figures" / f"{name}.pdf").is_file()
    for name in ("still_improving", "bounty_convergence", "harm_rate", "harm_separation"):
        assert f'id="table-{name}"' in html and (out / "tables" / f"{name}.tex").is_file()
    # recomputed from the database's rows with SQL, independently of psa.analysis
    con = sqlite3.connect(f"file:{reference}?mode=ro", uri=True)
    lkg = defaultdict(dict)
    for arch, mode, trial, loop, score in con.execute(
            "SELECT t.arch, t.mode, t.trial, m.loop, m.lkg_score FROM meta_loops m JOIN trials t ON t.id = m.trial_id"):
        lkg[(arch, mode, trial)][loop] = score
    peaks = {(a, m, k): (b, s) for a, m, k, b, s in con.execute("SELECT arch, mode, trial, bounty, seed FROM trials")}
    con.close()
    loops = 6  # the tiny design; the last 10% of 6 loops is loop 6 alone: b(6) > b(5)
    improving = defaultdict(int)
    for (a, m, k), s in lkg.items():
        assert len(s) == loops
        improving[m] += max(s.values()) > max(s[i] for i in range(1, loops))
    rows = {r["mode"]: r for r in _csv(out / "tables" / "still_improving.csv")}
    assert {m: int(r["still_improving"]) for m, r in rows.items()} == dict(improving)
    assert all(int(r["judged"]) == 4 for r in rows.values())
    per_trial = {(r["arch"], r["mode"], int(r["trial"])): r
                 for r in _csv(out / "tables" / "bounty_convergence_per_trial.csv")}
    for key, s in lkg.items():
        final = s[loops]
        want = min(i for i in s if s[i] >= 0.99 * final) if final >= 0 else None
        got = per_trial[(key[0].replace("[", "").replace("]", ""), key[1], key[2])]["t99"]
        assert (int(got) if got else None) == want
    harm = {r["arch"]: r for r in _csv(out / "tables" / "harm_rate.csv")}
    assert set(harm) == {"1*8", "2*8"}
    for a in ("1*8", "2*8"):
        for m in ("full", "hidden", "output"):
            diffs = [peaks[(aa, m, k)][0] - peaks[(aa, "none", k)][0] for (aa, mm, k) in peaks
                     if mm == "none" and aa.strip("[]") == a]
            assert float(harm[a][f"delta_{m}"]) == pytest.approx(sum(diffs) / len(diffs))
    bands = json_of(out / "figures" / "bounty_progress.json")
    assert bands["loops"] == loops and set(bands["bounty"]) <= {f"{a}/{m}" for a in ("1*8", "2*8")
                                                                for m in ("none", "decay", "dropout", "full",
                                                                          "hidden", "output")}


def json_of(path):
    import json

    return json.loads(path.read_text())


def test_harm_rates_equal_on_paper_tie_in_the_separation():
    """10.3 - 10.0 and 50.3 - 50.0 are both 0.3 points, but not in float64: the two nets tie,
    so the AUC counts them half, whichever regime each is in."""
    regimes = {"1*2": Regime("II", "-"), "1*4": Regime("I", "-")}
    peaks = {("1*2", "none", 1): 10.0, ("1*2", "hidden", 1): 10.3, ("1*4", "none", 1): 50.0,
             ("1*4", "hidden", 1): 50.3}
    harms = hm.harm_rates(study({}, peaks), list(regimes), regimes)
    assert harms[0].harm != harms[1].harm  # the float noise this is about
    seps = {(s.measure, s.regime): s for s in hm.separation(harms)}
    assert seps[("harm", "II")].auc == 0.5 and seps[("harm", "II vs I")].auc == 0.5
    assert seps[("harm", "II")].accuracy == 0.5  # no cut can part them


def test_a_rho_that_cannot_be_computed_is_said_in_words():
    regimes = {"1*2": Regime("II", "-"), "1*4": Regime("I", "-")}
    peaks = {("1*2", "none", 1): 10.0, ("1*2", "hidden", 1): 10.5, ("1*4", "none", 1): 50.0,
             ("1*4", "hidden", 1): 50.3}
    harms = hm.harm_rates(study({}, peaks), list(regimes), regimes)
    assert hm.rho_text(*hm.spearman(harms, "harm")) == "rho undefined (n = 2: fewer than 3 nets)"
    notes = " ".join(table_harm_separation(hm.separation(harms), {"harm": hm.spearman(harms, "harm")}).notes)
    assert "nan" not in notes and "rho undefined (n = 2: fewer than 3 nets)" in notes
    assert hm.rho_text(0.5, 0.0042, 98) == "rho = +0.500 (p = 0.0042, n = 98)"


def test_published_report_harm_rate_and_its_separation(published_report):
    import csv
    import io
    from collections import defaultdict
    from importlib import resources

    out, stdout = published_report
    raw = resources.files("psa").joinpath("resources/published_trials.csv").read_text()
    cells = defaultdict(list)
    for r in csv.DictReader(io.StringIO(raw)):
        cells[(r["arch"], r["mode"])].append(float(r["peak_val_acc"]))
    harm = {r["arch"]: r for r in _csv(out / "tables" / "harm_rate.csv")}
    assert len(harm) == 98
    for a, r in harm.items():
        for m in ("full", "hidden", "output"):
            if (a, m) in cells:  # the authors' trials are unseeded: the difference of the means
                want = np.mean(cells[(a, m)]) - np.mean(cells[(a, "none")])
                assert float(r[f"delta_{m}"]) == pytest.approx(want, abs=1e-9)
        assert int(r["curves_none"]) == 1  # one plotted trial per published cell
    manifest = json_of(out / "manifest.json")
    seps = {(s["measure"], s["regime"]): s for s in manifest["harm_separation"]["by_regime"]}
    assert len(seps) == 15 and all(s["n"] == 98 for (_, r), s in seps.items() if "vs" not in r)
    assert seps[("harm", "II vs I")]["n"] == 11 + 24  # the published map's I and II nets
    # regime II (optimally sized) has the most negative harm rates: AUC near 0
    assert seps[("harm", "II")]["auc"] < 0.05 and seps[("harm", "II")]["loo_accuracy"] > 0.85
    rho = manifest["harm_separation"]["spearman_with_params"]["harm"]
    assert rho["n"] == 98 and -1 <= rho["rho"] <= 1
    conv = manifest["convergence"]
    assert conv["loops"] == 100 and conv["tail_loops"] == 10
    assert sum(c["trials"] for c in conv["conditions"].values()) == 585  # the plotted curves
