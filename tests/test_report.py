"""`psa report` end to end: tables, figure data, partial and bad input."""

from __future__ import annotations

import csv
import io
import json
import re
import shutil
import statistics
import subprocess
from collections import Counter, defaultdict
from importlib import resources

import numpy as np
import pytest

from psa.study import store
from psa.core.arch import parse_arch, study_architectures
from psa.core.member import MODES

from .report_helpers import fig_data, make_db, published_peaks, read_csv, run

TABLES = ("table_iv", "table_v", "regimes", "summary", "ablation_effects", "paired_tests", "lkg_growth",
          "convergence", "still_improving", "bounty_convergence", "harm_rate", "harm_separation", "trials")
FIGURES = ("design_space", "regime_map", "winning_strategy", "instability", "baseline_performance",
           "ablation_effects", "ablation_significance", "parameter_matching", "convergence", "late_breakthroughs",
           "bounty_progress", "harm_rate")
UNCLASSIFIED = ["1*512", "1*256", "2*214", "4*185", "4*119", "26*26", "4*4", "4*1"]


# ---- the published data --------------------------------------------------------------------

def test_published_report_writes_every_table_and_figure(published_report):
    out, stdout = published_report
    assert "Regimes (published rules): 11 I, 24 II, 17 III, 46 IV." in stdout
    assert "unclassified: " + ", ".join(UNCLASSIFIED) in stdout
    for t in TABLES:
        for ext in ("md", "csv", "tex"):
            p = out / "tables" / f"{t}.{ext}"
            assert p.is_file() and p.stat().st_size > 100, p
    for f in FIGURES:
        png, pdf = out / "figures" / f"{f}.png", out / "figures" / f"{f}.pdf"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
        assert pdf.read_bytes()[:5] == b"%PDF-" and pdf.stat().st_size > 5_000
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["regime_counts"]["published"] == {"I": 11, "II": 24, "III": 17, "IV": 46}
    assert manifest["unclassified_by_paper_rules"] == UNCLASSIFIED
    assert manifest["zero_r"] == 11.02
    assert not list(out.parent.glob(".report.*"))  # the temporary directory was swapped in


def test_table_v_matches_a_recomputation_from_the_published_trials(published_report):
    out, _ = published_report
    # independent of psa: the shipped CSV, the statistics module, population std as published
    raw = resources.files("psa").joinpath("resources/published_trials.csv").read_text()
    cells: dict[tuple[str, str], list[float]] = defaultdict(list)
    for r in csv.DictReader(io.StringIO(raw)):
        cells[(r["arch"], r["mode"])].append(float(r["peak_val_acc"]))
    rows = {r["arch"]: r for r in read_csv(out / "tables" / "table_v.csv")}
    md = (out / "tables" / "table_v.md").read_text()
    md_rows = {line.split("|")[1].strip(): line for line in md.splitlines() if re.match(r"^\| \d", line)}
    assert len(rows) == 98 and len(md_rows) == 98
    for (arch, mode), v in cells.items():
        mean, std = statistics.fmean(v), statistics.pstdev(v)
        assert float(rows[arch][f"{mode}_mean"]) == pytest.approx(mean, abs=1e-9)
        assert float(rows[arch][f"{mode}_std"]) == pytest.approx(std, abs=1e-9)
        # printed as the authors printed: numpy's float mean and population std, then '.2f'
        # (48 cells have an exact mean ending in 5 in the third decimal; float noise rounds them)
        a = np.array(v)
        assert f" {a.mean():.2f} ± {a.std():.2f} " in md_rows[arch]
    # NOTES.md's two examples of the final data
    assert " 98.25 ± " in md_rows["1*2048"] and " 56.48 ± " in md_rows["2*4"]
    # half-way cells as the authors' own summary prints them (results/psa_simplemlp_summary.md
    # in their repository), where round-half-up or half-even of the exact mean would differ
    printed = {("1*256", "hidden"): "97.69", ("1*32", "dropout"): "95.61", ("2*588", "none"): "98.05",
               ("2*588", "hidden"): "98.06", ("4*185", "output"): "96.97", ("19*19", "dropout"): "11.50",
               ("1*16", "dropout"): "93.41", ("2*1", "none"): "14.69"}
    for (arch, mode), want in printed.items():
        assert md_rows[arch].split("|")[2 + MODES.index(mode)].strip().startswith(want + " ± ")


def test_table_iv_parameter_counts(published_report):
    out, _ = published_report
    rows = {r["arch"]: r for r in read_csv(out / "tables" / "table_iv.csv")}
    # as printed in the paper's Table IV
    printed = {"1*2048": 1628170, "2*939": 1629175, "115*115": 1612195, "18*18": 20134, "1*2": 1600,
               "2048*1": 4899, "1*1": 805, "939*2": 7228, "4*4": 3250, "26*26": 38230}
    for a, p in printed.items():
        assert int(rows[a]["params"]) == p
    table = resources.files("psa").joinpath("resources/table_iv.csv").read_text().splitlines()[1:]
    ref = {line.split(",")[0]: (int(line.split(",")[1]), line.split(",")[2]) for line in table}
    assert {a: (int(r["params"]), r["matching"]) for a, r in rows.items()} == ref
    assert [r["arch"] for r in read_csv(out / "tables" / "table_iv.csv")] == [a.short for a in study_architectures()]
    md = (out / "tables" / "table_iv.md").read_text()
    assert "| 1*2048 | 1,628,170 | Matched |" in md


def test_regime_table_names_the_rule_that_fired(published_report):
    out, _ = published_report
    rows = {r["arch"]: r for r in read_csv(out / "tables" / "regimes.csv")}
    assert Counter(r["regime_published"] for r in rows.values()) == {"IV": 46, "II": 24, "III": 17, "I": 11}
    assert sorted(a for a, r in rows.items() if r["regime_paper"] == "unclassified") == sorted(UNCLASSIFIED)
    assert rows["1*2048"]["rule_published"].startswith("2a:") and rows["1*2048"]["rule_paper"].startswith("eq. 7")
    assert rows["1*512"]["rule_published"].startswith("2b:")
    assert rows["115*115"]["rule_published"].startswith("1a:")
    assert "ZeroR = 11.02% (computed from the mnist validation labels)" in (out / "tables" / "regimes.md").read_text()


def test_latex_tables_are_booktabs_and_well_formed(published_report):
    out, _ = published_report
    for t in TABLES:
        tex = (out / "tables" / f"{t}.tex").read_text()
        assert all(k in tex for k in (r"\toprule", r"\midrule", r"\bottomrule", r"\caption{"))
        assert tex.count("{") == tex.count("}")
        body = [line for line in tex.splitlines() if line.endswith(r"\\") and not line.startswith("\\")]
        lines = tex.splitlines()
        head = lines[lines.index(r"\toprule") + 1]  # the column heads
        ncol = head.count("&") + 1
        for line in body:
            assert line.count("&") == ncol - 1, line
            assert not re.search(r"(?<!\\)[%_#]", line), line
        # pdflatex's default input has no Greek (harm_rate's header has a delta); comments may hold anything
        assert all(line.isascii() for line in lines if not line.startswith("%")), t
    assert r"98.25 $\pm$ 0.06" in (out / "tables" / "table_v.tex").read_text()
    _compiles([out / "tables" / f"{t}.tex" for t in TABLES], out.parent / "latex")


def _compiles(tables: list, where) -> None:
    """Where pdflatex is installed: the tables \\input into the preamble their header names compile."""
    if shutil.which("pdflatex") is None:
        return
    where.mkdir(exist_ok=True)
    inputs = "".join(f"\\input{{{p.as_posix()}}}\n\\clearpage\n" for p in tables)
    (where / "doc.tex").write_text("\\documentclass{article}\n\\usepackage{booktabs,longtable}\n"
                                   f"\\begin{{document}}\n{inputs}\\end{{document}}\n")
    done = subprocess.run(["pdflatex", "-halt-on-error", "-interaction=nonstopmode", "doc.tex"], cwd=where,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-2000:]


def test_a_heterogeneous_net_and_greek_in_latex(tmp_path):
    """A row that starts with "[2*16, 1*8]" after the previous row's \\\\ would be read as its
    optional length; a backslash in a cell stays one escaped backslash."""
    from psa.analysis.table import Table

    t = Table("t", "Δ of [2*16, 1*8]", ["arch", "Δ harm"], [["1*16", "±1"], ["[2*16, 1*8]", "a\\b_{c}"]])
    tex = t.latex()
    assert "\n{}[2*16, 1*8] & a\\textbackslash{}b\\_\\{c\\} \\\\\n" in tex
    assert r"$\Delta$ harm" in tex and r"$\pm$1" in tex
    assert all(line.isascii() for line in tex.splitlines() if not line.startswith("%"))
    (tmp_path / "t.tex").write_text(tex)
    _compiles([tmp_path / "t.tex"], tmp_path / "latex")


def test_paired_tests_table(published_report):
    out, _ = published_report
    rows = read_csv(out / "tables" / "paired_tests.csv")
    assert len(rows) == 98 * 9
    v = Counter(r["verdict"] for r in rows)
    assert set(v) <= {"ablation better", "ablation worse", "no detectable difference", "cannot decide"}
    # 115*115: every trial at 11.02 in every mode, so every comparison is undecidable
    assert all(r["verdict"] == "cannot decide" for r in rows if r["arch"] == "115*115")
    # the 1*2048 output mode is clearly worse than the control in the final data
    r = next(r for r in rows if (r["arch"], r["ablative"], r["baseline"]) == ("1*2048", "output", "none"))
    assert r["verdict"] == "ablation worse" and float(r["p"]) == pytest.approx(2 / 1024)
    md = (out / "tables" / "paired_tests.md").read_text()
    assert "pairs by trial index only" in md  # the published trials were not seeded in pairs
    # the tests and the threshold rules tell one story: ablation significantly helps only in
    # chaotic architectures, harms only stable ones, and the failures never learn at all
    eff = read_csv(out / "tables" / "ablation_effects.csv")
    by = defaultdict(set)
    for e in eff:
        by[e["effect"]].add(e["regime_published"])
    assert by["beneficial"] == {"III"} and by["harmful"] <= {"I", "II"} and by["collapsed"] == {"IV"}
    assert sum(e["effect"] == "collapsed" for e in eff) == 45


# ---- figure data (not pixels) -----------------------------------------------------------

def test_figure_data_of_the_published_report(published_report):
    out, _ = published_report
    peaks = published_peaks()
    means = {k: statistics.fmean(v) for k, v in peaks.items()}
    archs = [a.short for a in study_architectures()]

    d = fig_data(out, "design_space")
    assert len(d["points"]) == 98 and not d["skipped"]
    pts = {p["arch"]: p for p in d["points"]}
    for a in archs:
        arch = parse_arch(a)
        assert (pts[a]["depth"], pts[a]["width"], pts[a]["params"]) == (arch.depth, arch.blocks[0][1], arch.params)
    assert Counter(p["matching"] for p in d["points"]) == {"Matched": 40, "Asymmetric": 58}

    d = fig_data(out, "regime_map")
    assert d["counts"] == {"I": 11, "II": 24, "III": 17, "IV": 46} and d["rules"] == "published"

    d = {p["arch"]: p["value"] for p in fig_data(out, "instability")["points"]}
    for a in archs:
        assert d[a] == pytest.approx(max(statistics.pstdev(peaks[(a, m)]) for m in MODES))

    d = {p["arch"]: p["value"] for p in fig_data(out, "baseline_performance")["points"]}
    for a in archs:
        assert d[a] == pytest.approx(max(means[(a, m)] for m in ("none", "decay", "dropout")))

    d = {p["arch"]: p["value"] for p in fig_data(out, "ablation_effects")["points"]}
    for a in archs:
        want = np.mean([means[(a, m)] for m in ("full", "hidden", "output")]) - np.mean(
            [means[(a, m)] for m in ("none", "decay", "dropout")])
        assert d[a] == pytest.approx(want)

    d = fig_data(out, "winning_strategy")
    for a in archs:
        best = max(max(peaks[(a, m)]) for m in MODES)
        assert d["winners"][a] == [m for m in MODES if max(peaks[(a, m)]) == best]
    cat = {p["arch"]: p["category"] for p in d["points"]}
    assert cat["115*115"] == "tie"

    d = fig_data(out, "ablation_significance")
    assert sum(d["counts"].values()) == 98
    manifest = json.loads((out / "manifest.json").read_text())
    assert d["counts"] == manifest["ablation_effects"]

    d = fig_data(out, "parameter_matching")
    assert {p["arch"]: p["params"] for p in d["points"]} == {a: parse_arch(a).params for a in archs}

    # the published curves: one plotted trial per cell; the best trial is the one with the curve
    d = fig_data(out, "convergence")
    assert set(d["cells"]) == {f"{a}/{m}" for a in ("1*2048", "18*18") for m in MODES}
    for key, cell in d["cells"].items():
        a, m = key.split("/")
        assert len(cell["trials"]) == 1 and cell["best_trial"] == cell["trials"][0]
        assert cell["best_peak"] == pytest.approx(peaks[(a, m)][cell["best_trial"] - 1])

    # late breakthroughs: the bounty loop of every plotted trial that beats ZeroR + 0.5
    conv = resources.files("psa").joinpath("resources/published_convergence.csv").read_text()
    curves: dict[tuple[str, str], list[float]] = defaultdict(list)
    for r in csv.DictReader(io.StringIO(conv)):
        curves[(r["arch"], r["mode"])].append(float(r["val_acc"]))
    d = fig_data(out, "late_breakthroughs")
    for m in MODES:
        want = sorted(int(np.argmax(v)) + 1 for (a, mm), v in curves.items() if mm == m and max(v) > 11.52)
        assert sorted(d["bounty_loops"][m]) == want and d["n"][m] == len(want)


# ---- a study database -----------------------------------------------------------------

def test_report_on_a_complete_database(full_db, tmp_path):
    path, written = full_db
    out = tmp_path / "report"
    rc, stdout, err = run(["report", "--db", str(path), "--out", str(out), "--convergence", "18*18,4*4",
                           "--bootstrap", "1000"])
    assert rc == 0, err
    assert f"study 'test' in {path}" in stdout and "missing" not in stdout
    # the database holds the published peaks of these five: the same regimes as the published map
    rows = {r["arch"]: r for r in read_csv(out / "tables" / "regimes.csv")}
    assert {a: r["regime_published"] for a, r in rows.items()} == {"1*2048": "I", "1*32": "II", "4*4": "II",
                                                                    "18*18": "III", "21*21": "IV"}
    trials = read_csv(out / "tables" / "trials.csv")
    assert len(trials) == len(written["trials"]) == 300
    t = next(t for t in trials if (t["arch"], t["mode"], t["trial"]) == ("18*18", "hidden", "3"))
    assert int(t["bounty_loop"]) == written["bounty_loops"][("18*18", "hidden", 3)] and t["seed"] == "1003"
    # the paired design: seeds are shared, so the tests say so
    assert "trial k of both modes shares its seed" in (out / "tables" / "paired_tests.md").read_text()
    # LKG growth: synthetic curves promote on every loop up to the bounty loop and never after
    growth = read_csv(out / "tables" / "lkg_growth_per_loop.csv")
    per_trial = Counter((g["arch"], g["mode"], int(g["trial"])) for g in growth)
    assert per_trial == {k: v for k, v in written["bounty_loops"].items()}
    conv = read_csv(out / "tables" / "convergence_per_loop.csv")
    assert len(conv) == 5 * 6 * 20
    # figure data: convergence of the chosen two, bounty loops of the trials that beat ZeroR
    d = fig_data(out, "convergence")
    assert set(d["cells"]) == {f"{a}/{m}" for a in ("18*18", "4*4") for m in MODES}
    for key, cell in d["cells"].items():
        a, m = key.split("/")
        peaks = {k: p for (aa, mm, k, p) in written["trials"] if (aa, mm) == (a, m)}
        assert len(cell["trials"]) == 10 and peaks[cell["best_trial"]] == max(peaks.values())
    late = fig_data(out, "late_breakthroughs")
    for m in MODES:
        want = sorted(written["bounty_loops"][(a, mm, k)] for (a, mm, k, p) in written["trials"]
                      if mm == m and p > 11.02 + 0.5)
        assert sorted(late["bounty_loops"][m]) == want
    assert late["meta_loops"] == 20
    html = (out / "index.html").read_text()
    assert html.count('src="data:image/png;base64,') == len(FIGURES)


# ---- partial, running, empty and bad input ----------------------------------------------

def test_partial_running_study(tmp_path):
    path = tmp_path / "partial.sqlite"
    skip = [("4*4", "output", k) for k in range(1, 11)] + [("1*32", "none", k) for k in (8, 9, 10)]
    make_db(path, ["1*32", "4*4", "18*18"], design_archs=["1*32", "4*4", "18*18", "2*8"], loops=12, skip=skip,
            running=[("18*18", "full", 9), ("18*18", "full", 10)])
    out = tmp_path / "report"
    rc, stdout, err = run(["report", "--db", str(path), "--out", str(out), "--zero-r", "11.02",
                           "--bootstrap", "500", "--convergence", "4*4,2*8"])
    assert rc == 0, err
    assert err == ""
    assert "architectures with none at all: 2*8" in stdout
    assert "4*4 (output)" in stdout
    assert "fewer than the designed 10 trials: 1*32 none (7), 18*18 full (8)" in stdout
    assert "trials not finished: 2 running" in stdout
    assert "no per-loop records for 2*8" in stdout
    v = (out / "tables" / "table_v.md").read_text()
    assert "(n=7)" in v and "(n=8)" in v
    rows = {r["arch"]: r for r in read_csv(out / "tables" / "regimes.csv")}
    assert rows["4*4"]["provisional"] == "True" and "output" in rows["4*4"]["detail"]
    assert rows["1*32"]["provisional"] == "True"
    missing = read_csv(out / "tables" / "missing.csv")
    assert {(m["arch"], m["mode"], m["finished"]) for m in missing} >= {("4*4", "output", "0"),
                                                                       ("1*32", "none", "7"), ("2*8", "none", "0")}
    assert len(read_csv(out / "tables" / "incomplete_trials.csv")) == 2
    assert (out / "figures" / "regime_map.png").stat().st_size > 10_000
    html = (out / "index.html").read_text()
    assert "architectures with none at all: 2*8" in html
    # paired tests pair only what both modes have: 1*32 none has 7 trials
    tests = read_csv(out / "tables" / "paired_tests.csv")
    assert {int(t["n"]) for t in tests if t["arch"] == "1*32" and t["baseline"] == "none"} == {7}
    assert not any(t["arch"] == "4*4" and t["ablative"] == "output" for t in tests)

    # a second run replaces the first report whole: a table an older report wrote goes with it
    (out / "tables" / "stale.csv").write_text("x")
    rc, _, err = run(["report", "--db", str(path), "--out", str(out), "--zero-r", "11.02", "--bootstrap", "200",
                      "--convergence", "4*4"])
    assert rc == 0, err
    assert not (out / "tables" / "stale.csv").exists() and (out / "index.html").is_file()
    assert [p.name for p in tmp_path.iterdir() if not p.name.startswith("partial")] == ["report"]  # no temp dirs


def test_empty_databases_report_nothing_without_a_traceback(tmp_path):
    empty = tmp_path / "empty.sqlite"
    store.connect(empty).close()  # the schema, no study
    rc, stdout, err = run(["report", "--db", str(empty), "--out", str(tmp_path / "r1")])
    assert rc == 0 and err == "" and "holds no study yet" in stdout
    assert "nothing to report" in (tmp_path / "r1" / "index.html").read_text()
    zero = tmp_path / "zero.sqlite"
    zero.write_bytes(b"")
    rc, stdout, err = run(["report", "--db", str(zero), "--out", str(tmp_path / "r2")])
    assert rc == 0 and err == "" and "no psa results tables" in stdout
    rc, stdout, err = run(["compare", "--db", str(empty), "--out", str(tmp_path / "c")])
    assert rc == 0 and "nothing to compare" in stdout
    # a study declared but nothing finished yet: the design is still drawn
    path = tmp_path / "started.sqlite"
    make_db(path, ["1*32"], trials=2, loops=4, running=[("1*32", m, k) for m in MODES for k in (1, 2)])
    rc, stdout, err = run(["report", "--db", str(path), "--out", str(tmp_path / "r3")])
    assert rc == 0 and err == ""
    assert "trials not finished: 12 running" in stdout
    assert (tmp_path / "r3" / "figures" / "design_space.png").is_file()


def test_several_studies_default_to_the_latest(tmp_path):
    path = tmp_path / "two.sqlite"
    make_db(path, ["1*32"], trials=3, loops=3, study="first")
    make_db(path, ["4*4"], trials=3, loops=3, study="second")
    rc, stdout, _ = run(["report", "--db", str(path), "--out", str(tmp_path / "r"), "--zero-r", "11.02",
                         "--bootstrap", "200"])
    assert rc == 0 and "reporting on" not in stdout
    assert "reads the latest, 'second'" in stdout
    rows = read_csv(tmp_path / "r" / "tables" / "regimes.csv")
    assert [r["arch"] for r in rows] == ["4*4"]
    rc, _, err = run(["report", "--db", str(path), "--study", "third", "--out", str(tmp_path / "r")])
    assert rc == 2 and err.count("\n") == 1 and "no study named 'third' (it has: first, second)" in err


@pytest.mark.parametrize("argv, message", [
    (["report", "--db", "/nonexistent/psa.sqlite"], "psa: error: no results database at /nonexistent/psa.sqlite"),
    (["report", "--alpha", "2"], "expected a number in (0, 1)"),
    (["report", "--zero-r", "-1"], "expected a percentage"),
    (["report", "--convergence", "1*x"], "bad block"),
    (["report", "--reference", "seed"], "invalid choice"),
    (["report", "--db", "x.sqlite", "--reference", "published"], "not allowed with argument"),
    (["compare", "--reference", "mine"], "invalid choice"),
    (["report", "--rules", "best"], "invalid choice"),
    (["report", "--reference", "published", "--study", "foo"], "--reference published is the authors' data"),
    (["compare", "--published", "--study", "foo"], "--published is the authors' data, which has none"),
])
def test_bad_command_lines_are_one_line_exit_2(argv, message, tmp_path):
    rc, stdout, err = run(argv + ["--out", str(tmp_path / "o")])
    assert rc == 2 and message in err and err.count("\n") == 1 and stdout == ""
    assert not (tmp_path / "o").exists()


def test_unusable_files_are_one_line_exit_2(tmp_path):
    garbage = tmp_path / "garbage.sqlite"
    garbage.write_bytes(b"this is not a database" * 100)
    rc, _, err = run(["report", "--db", str(garbage), "--out", str(tmp_path / "o")])
    assert rc == 2 and err.startswith("psa: error: ") and err.count("\n") == 1
    # an output directory holding something else is never overwritten
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    rc, _, err = run(["report", "--reference", "published", "--out", str(other)])
    assert rc == 2 and "is not a psa report" in err
    assert (other / "notes.txt").read_text() == "keep me" and len(list(other.iterdir())) == 1
    assert not list(tmp_path.glob(".mine.*"))


@pytest.mark.parametrize("command", [["report", "--reference", "published"], ["compare", "--published"]])
def test_a_report_directory_holding_other_files_is_not_replaced(command, tmp_path):
    """Replacing a report replaces its directory whole: an export or a database kept beside the
    report would go with it, so the new report is refused and everything stays."""
    out = tmp_path / "r"
    (out / "tables").mkdir(parents=True)
    (out / "manifest.json").write_text("{}")
    (out / "tables" / "table_v.csv").write_text("arch\n")
    (out / "trials.csv").write_text("arch,mode\n")
    (out / "tables" / "notes.txt").write_text("mine")
    (out / "db").mkdir()
    rc, stdout, err = run(command + ["--out", str(out)])
    assert rc == 2 and stdout == "" and err.count("\n") == 1, err
    assert "holds a psa report and files no report writes (db/, tables/notes.txt, trials.csv)" in err
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == [
        "db", "manifest.json", "tables", "tables/notes.txt", "tables/table_v.csv", "trials.csv"]
    assert [p.name for p in tmp_path.iterdir()] == ["r"]  # no temporary directory left


def test_out_the_current_directory_is_one_line_exit_2(tmp_path, monkeypatch):
    """--out . (or "", or a directory above it) cannot be swapped for a report: one line, not a
    traceback from the temporary sibling it has no name for, and nothing written."""
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    for argv in (["report", "--reference", "published", "--out", "."], ["compare", "--published", "--out", ""],
                 ["report", "--reference", "published", "--out", "sub/../.."]):
        rc, stdout, err = run(argv)
        assert rc == 2 and stdout == "" and err.count("\n") == 1, err
        assert err.startswith("psa: error: --out") and "current directory" in err
    assert list(here.iterdir()) == [] and [p.name for p in tmp_path.iterdir()] == ["here"]


def test_rules_paper_draws_the_printed_equations(full_db, tmp_path):
    path, _ = full_db
    out = tmp_path / "r"
    rc, stdout, err = run(["report", "--db", str(path), "--out", str(out), "--rules", "paper", "--zero-r", "11.02",
                           "--bootstrap", "200", "--convergence", "4*4"])
    assert rc == 0, err
    d = fig_data(out, "regime_map")
    # of these five, only 4*4 is one the printed equations cannot classify
    assert d["rules"] == "paper" and d["counts"] == {"I": 1, "II": 1, "III": 1, "IV": 1, "unclassified": 1}
    cat = {p["arch"]: p["category"] for p in d["points"]}
    assert cat["4*4"] == "unclassified"
    header = (out / "tables" / "regimes.csv").read_text().splitlines()[0]
    assert header.startswith("arch,depth,width,params,regime_paper,rule_paper,regime_published")


def test_the_data_set_line_says_when_a_study_trained_on_a_subset():
    """The recorded data set has 50,000 training examples; a --train-subset study used fewer."""
    from psa.analysis.report import _dataset_line
    from psa.analysis.results import Design, StudyData, _design_from_json

    info = {"n_in": 784, "n_classes": 10, "n_train": 50_000, "n_val": 10_000, "n_test": 10_000,
            "checksum": "ab" * 32}
    design, notes = _design_from_json(json.dumps({"archs": ["1*8"], "modes": ["none"], "trials": 2,
                                                  "train_subset": 256}), [])
    assert design.train_subset == 256 and notes == []
    line = _dataset_line(StudyData("x", [], {}, design, dataset_info=info))
    assert "50,000/10,000/10,000 training/validation/test examples (the study trained on the first 256 training " \
           "examples), SHA-256 abababababababab..." in line
    whole = _dataset_line(StudyData("x", [], {}, Design(("1*8",), ("none",), 2), dataset_info=info))
    assert "training/validation/test examples, SHA-256" in whole
