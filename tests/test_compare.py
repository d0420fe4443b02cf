"""`psa compare` and the reference comparison of `psa.analysis.reference`: the tests per cell, end to end."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import stats as sps

from psa.analysis.reference import CompareConfig, compare_cells, welch_from_stats
from psa.analysis.results import load_published

from .report_helpers import fig_data, published_peaks, read_csv, run, trials_of

# ---- the tests per cell -----------------------------------------------------------------

def test_welch_from_population_stds_matches_scipy_on_raw_data():
    rng = np.random.default_rng(5)
    a, b = rng.normal(97, 0.2, 10), rng.normal(97.2, 0.4, 8)
    want = sps.ttest_ind(a, b, equal_var=False).pvalue
    got = welch_from_stats(a.mean(), a.std(ddof=0), 10, b.mean(), b.std(ddof=0), 8)
    assert got == pytest.approx(want, rel=1e-9)


def test_compare_cells_chooses_fisher_for_zero_r_cells():
    zr = [11.02] * 10
    ref = trials_of("A", {"none": [11.02] * 5 + [40.0] * 5, "full": [97.0, 97.1] * 5})
    ours = trials_of("A", {"none": zr, "full": [97.05, 97.0] * 5})
    got = {c.mode: c for c in compare_cells(ours, "published", CompareConfig(), ref)}
    f = got["none"]
    # 0 of 10 escape against 5 of 10: Fisher's exact two-sided p = 2 * C(10,5)/C(20,10) summed
    assert f.test == "Fisher (escapes)" and (f.escape_ours, f.escape_ref) == ("0/10", "5/10")
    assert f.p == pytest.approx(sps.fisher_exact([[0, 10], [5, 5]]).pvalue)
    assert f.p == pytest.approx(0.0325, abs=5e-4)
    w = got["full"]
    assert w.test == "Welch t" and w.consistent(0.01)
    assert w.p == pytest.approx(sps.ttest_ind([97.05, 97.0] * 5, [97.0, 97.1] * 5, equal_var=False).pvalue)


def test_compare_against_seed_uses_summary_welch():
    data = load_published()
    cells_ = compare_cells(data.trials, "seed", CompareConfig())
    assert len(cells_) == 402 and {c.test for c in cells_} == {"Welch t (summary)"}
    c = next(c for c in cells_ if (c.arch, c.mode) == ("1*2048", "none"))
    # NOTES.md: the printed 98.19 against the final 98.25
    assert (round(c.mean_ref, 2), round(c.mean_ours, 2)) == (98.19, 98.25)
    s0 = 0.06 * math.sqrt(10 / 9)
    want = sps.ttest_ind_from_stats(c.mean_ours, c.std_ours * math.sqrt(10 / 9), 10, 98.19, s0, 10,
                                    equal_var=False).pvalue
    assert c.p == pytest.approx(want)


def test_a_cell_without_a_p_is_untested_not_consistent():
    """Welch's t needs 2 trials a side: one trial of ours far from the reference is untested,
    not counted as consistent."""
    ref = trials_of("A", {"full": [97.0, 97.1] * 5})
    (c,) = compare_cells(trials_of("A", {"full": [60.0]}), "published", CompareConfig(), ref)
    assert c.test == "Welch t" and math.isnan(c.p)
    assert not c.tested and not c.consistent(0.01)


def test_compare_one_trial_study_says_untested(tmp_path):
    from .report_helpers import make_db

    path = tmp_path / "one.sqlite"
    make_db(path, ["1*32"], modes=["none", "full"], trials=1, loops=3)
    rc, stdout, err = run(["compare", "--db", str(path), "--out", str(tmp_path / "c"), "--zero-r", "11.02"])
    assert rc == 0, err
    # an untested cell is counted neither consistent nor different: not in the share's denominator
    assert "consistent at alpha = 0.01: 0/0 tested cells (none tested)" in stdout
    assert "untested: 2 (fewer than 2 trials" in stdout
    assert json.loads((tmp_path / "c" / "manifest.json").read_text())["tested"] == 0
    assert "untested" in (tmp_path / "c" / "tables" / "compare_cells.md").read_text()


def test_an_architecture_without_an_ablative_mode_is_not_compared(tmp_path):
    """Ours cannot be classified without an ablative mode ("n/a"): that is no regime to agree or
    disagree with, so it is left out of the count and named."""
    from .report_helpers import make_db

    path = tmp_path / "none-only.sqlite"
    make_db(path, ["1*32", "18*18"], modes=["none"], trials=2, loops=3)
    rc, stdout, err = run(["compare", "--db", str(path), "--out", str(tmp_path / "c"), "--zero-r", "11.02"])
    assert rc == 0, err
    assert "regimes agreeing (published rules): 0/0" in stdout
    assert "not compared (a side lacks the modes to classify it): 1*32, 18*18" in stdout
    s = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert (s["regimes_compared"], s["regimes_agree"], s["regimes_differ"]) == (0, 0, [])


# ---- end to end --------------------------------------------------------------------------

def test_compare_database_against_published(full_db, tmp_path):
    path, _ = full_db
    out = tmp_path / "cmp"
    rc, stdout, err = run(["compare", "--db", str(path), "--reference", "published", "--out", str(out),
                           "--zero-r", "11.02"])
    assert rc == 0, err
    # the database holds exactly the published peaks of its five architectures
    assert "cells compared: 30 (reference has 588; 558 of them missing in ours" in stdout
    assert "consistent at alpha = 0.01: 30/30 tested cells (100.0%)" in stdout
    assert "regimes agreeing (published rules): 5/5" in stdout
    cells = read_csv(out / "tables" / "compare_cells.csv")
    assert all(float(c["p"]) == 1.0 for c in cells)
    assert {c["test"] for c in cells} == {"Welch t", "Fisher (escapes)"}
    d = fig_data(out, "convergence_overlay")
    assert d["cells"]["18*18/output"]["reference_peak"] == pytest.approx(max(published_peaks()[("18*18", "output")]))
    assert (out / "verdict.txt").read_text().startswith("psa compare:")


def test_compare_published_against_seed_and_itself(published_compare, tmp_path):
    out, stdout = published_compare
    assert "cells compared: 402" in stdout and "consistent at alpha = 0.01: 400/402 tested cells" in stdout
    worst = stdout.split("worst cells (smallest p):")[1].splitlines()
    assert worst[2].split()[:2] == ["1*512", "none"]
    s = json.loads((out / "manifest.json").read_text())
    assert (s["cells"], s["consistent"]) == (402, 400)
    rc, stdout, err = run(["compare", "--published", "--reference", "published", "--out", str(tmp_path / "b"),
                           "--convergence", "1*2048"])
    assert rc == 0, err
    assert "consistent at alpha = 0.01: 588/588 tested cells" in stdout
    assert "regimes agreeing (published rules): 98/98" in stdout
    assert len(stdout.splitlines()) < 25  # one screen



def test_compare_says_where_the_design_is_not_the_papers(full_db, tmp_path):
    """A study of another design than the paper's (fewer meta-loops, another learning rate,
    decay where the paper has none, a subset of the images) is compared all the same, with a
    line that says so; the paper's own design gets no such line."""
    from psa.analysis.results import design_departures

    from .report_helpers import make_db

    paper = [{"mode": m, "meta_loops": 100, "lr": 1e-4, "batch_size": 256, "dataset": "mnist",
              "weight_decay": 1e-4 if m == "decay" else 0.0, "dropout": 0.1 if m == "dropout" else 0.0}
             for m in ("none", "decay", "dropout", "full")]
    assert design_departures(paper) == []
    other = [*paper, {**paper[0], "weight_decay": 0.01, "lr": "0.001"}, {**paper[1], "dataset": "mnist[train:512]"}]
    assert design_departures(other) == ["lr 0.001 (the paper's: 0.0001)",
                                        "weight_decay outside decay mode 0.01 (the paper's: 0)",
                                        "trained on mnist[train:512] (the paper's: all 50,000 MNIST training images)"]
    path = tmp_path / "paper.sqlite"
    make_db(path, ["1*32"], modes=["none", "full"], trials=2, loops=100)
    rc, stdout, err = run(["compare", "--db", str(path), "--out", str(tmp_path / "p"), "--zero-r", "11.02"])
    assert rc == 0, err
    assert "not the paper's design" not in stdout
    assert json.loads((tmp_path / "p" / "manifest.json").read_text())["departures"] == []
    rc, stdout, err = run(["compare", "--db", str(full_db[0]), "--out", str(tmp_path / "f"), "--zero-r", "11.02"])
    assert rc == 0, err
    assert "not the paper's design: meta_loops 20 (the paper's: 100); cells may differ for that alone" in stdout
    assert json.loads((tmp_path / "f" / "manifest.json").read_text())["departures"] == ["meta_loops 20 (the paper's: 100)"]
