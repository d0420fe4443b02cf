"""The paper's study on a card, prepared here: psa export's files read back as a study
(psa.analysis.exported; `psa compare/report --export`), and bench/paper_study.py's slices, runs,
collection and merge, end to end on the CPU with tiny settings. No timing is asserted."""

from __future__ import annotations

import csv
import gzip
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from psa.analysis.exported import export_files, load_exports
from psa.analysis.results import ReportError, load_db
from psa.core.arch import study_architectures

from .conftest import env, one_line_error, run_main

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"


def _bench_module():
    spec = importlib.util.spec_from_file_location("paper_study", BENCH / "paper_study.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


ps = _bench_module()


@pytest.fixture(scope="module")
def exported(reference: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """psa export of the tiny reference study (CSV only)."""
    out = tmp_path_factory.mktemp("export") / "exp"
    rc, _, err = run_main(["export", "--db", str(reference), "--out", str(out), "--format", "csv"])
    assert rc == 0, err
    return out


def _gzip(src: Path, dest: Path) -> Path:
    with open(src, "rb") as f, gzip.open(dest, "wb") as g:
        shutil.copyfileobj(f, g)
    return dest


def _split(src: Path, dest_dir: Path, stem: str, keep) -> None:
    """The rows of `src` that `keep` accepts, as DEST_DIR/STEM.csv.gz (a slice of an export)."""
    with open(src, newline="") as f:
        rows = list(csv.reader(f))
    arch = rows[0].index("arch")
    with gzip.open(dest_dir / f"{stem}.csv.gz", "wt", newline="") as g:
        w = csv.writer(g)
        w.writerow(rows[0])
        w.writerows(r for r in rows[1:] if keep(r[arch]))


def assert_same_study(a, b) -> None:
    assert a.trials == b.trials
    assert a.incomplete == b.incomplete
    assert a.design == b.design
    assert (a.dataset, a.model, a.paired) == (b.dataset, b.model, b.paired)
    assert a.curves.keys() == b.curves.keys()
    for k, c in a.curves.items():
        d = b.curves[k]
        assert np.array_equal(c.candidate, d.candidate, equal_nan=True)
        assert np.array_equal(c.lkg, d.lkg) and np.array_equal(c.promoted, d.promoted)
        assert np.array_equal(c.diverged, d.diverged)


# --------------------------------------------------------------------------------------------
# the export loader


def test_an_export_reads_back_as_its_database(reference: Path, exported: Path, tmp_path: Path) -> None:
    db = load_db(reference)
    assert db.trials and db.curves
    assert_same_study(db, load_exports([exported]))
    assert_same_study(db, load_exports([exported / "trials.csv"]))
    # gzipped, under a pack's names: the meta-loops are found beside the trials
    _gzip(exported / "trials.csv", tmp_path / "x.trials.csv.gz")
    _gzip(exported / "meta_loops.csv", tmp_path / "x.meta_loops.csv.gz")
    assert export_files([tmp_path]) == [(tmp_path / "x.trials.csv.gz", tmp_path / "x.meta_loops.csv.gz")]
    assert_same_study(db, load_exports([tmp_path / "x.trials.csv.gz"]))


def test_slices_of_an_export_concatenate_to_the_whole(reference: Path, exported: Path, tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    for name in ("trials", "meta_loops"):
        _split(exported / f"{name}.csv", tmp_path / "a", f"s1.{name}", lambda a: a == "1*8")
        _split(exported / f"{name}.csv", tmp_path / "b", f"s2.{name}", lambda a: a != "1*8")
    whole = load_db(reference)
    parts = load_exports([tmp_path / "a", tmp_path / "b"])
    assert_same_study(whole, parts)
    # without its meta-loops file an export still gives its trials, and no curves
    (tmp_path / "b" / "s2.meta_loops.csv.gz").unlink()
    parts = load_exports([tmp_path / "a", tmp_path / "b"])
    assert parts.trials == whole.trials
    assert {k[0] for k in parts.curves} == {"1*8"}


def test_slices_of_different_meta_loops_tabulate_without_warnings(exported: Path, tmp_path: Path) -> None:
    """Two exports read as one whose studies ran 6 and 3 meta-loops: the LKG tables leave the
    loops a cell never ran empty, and numpy's 'Mean of empty slice' warning (which psa report
    printed three times on stderr) does not fire."""
    import warnings

    from psa.analysis.findings import analyse
    from psa.analysis.tables import table_lkg

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    for name in ("trials", "meta_loops"):
        _split(exported / f"{name}.csv", tmp_path / "a", f"s1.{name}", lambda a: a == "1*8")
    header, *rows = list(csv.reader(open(exported / "meta_loops.csv", newline="")))
    with gzip.open(tmp_path / "b" / "s2.meta_loops.csv.gz", "wt", newline="") as g:
        csv.writer(g).writerows([header, *(r for r in rows if r[header.index("arch")] == "2*8"
                                           and int(r[header.index("loop")]) <= 3)])
    header, *rows = list(csv.reader(open(exported / "trials.csv", newline="")))
    with gzip.open(tmp_path / "b" / "s2.trials.csv.gz", "wt", newline="") as g:
        csv.writer(g).writerows([header, *([v if c != "meta_loops" else "3" for c, v in zip(header, r)]
                                           for r in rows if r[header.index("arch")] == "2*8")])
    data = load_exports([tmp_path / "a", tmp_path / "b"])
    assert "the exports ran different designs: meta_loops 3 and 6" in data.notes
    assert "different designs" not in " ".join(load_exports([tmp_path / "a"]).notes)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        growth, _, _, conv_long = table_lkg(analyse(data, 11.02, "test", n_boot=10))
    by_arch = {r["arch"]: r for r in growth.raw if r["mode"] == "none"}
    assert np.isfinite(by_arch["2*8"]["lkg_loop1"]) and np.isnan(by_arch["2*8"]["lkg_loop6"])
    assert np.isfinite(by_arch["1*8"]["lkg_loop6"])
    past = [r["lkg_mean"] for r in conv_long if r["arch"] == "2*8" and r["mode"] == "none" and r["loop"] > 3]
    assert len(past) == 3 and all(np.isnan(past))


def test_exports_that_cannot_be_one_study_are_refused(exported: Path, tmp_path: Path) -> None:
    with pytest.raises(ReportError, match="two exports"):
        load_exports([exported / "trials.csv", _gzip(exported / "trials.csv", tmp_path / "again.trials.csv.gz")])
    header, *rows = list(csv.reader(open(exported / "trials.csv", newline="")))
    for i, precision in enumerate(("tf32", "fp32")):
        with open(tmp_path / f"p{i}.trials.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow([*header, "precision"])
            w.writerows([*r, precision] for r in rows if (r[header.index("arch")] == "1*8") == (i == 0))
    assert len(load_exports([tmp_path / "p0.trials.csv"]).trials) > 0
    with pytest.raises(ReportError, match="mix precisions"):
        load_exports([tmp_path / "p0.trials.csv", tmp_path / "p1.trials.csv"])
    (tmp_path / "bad.trials.csv").write_text("arch,mode\n1*8,none\n")
    with pytest.raises(ReportError, match="no column"):
        load_exports([tmp_path / "bad.trials.csv"])
    rc, _, err = run_main(["compare", "--export", str(tmp_path / "nothing-here"), "--out", str(tmp_path / "c")])
    assert rc == 2 and "no such file or directory" in one_line_error(err)


def test_an_export_of_a_database_with_two_studies_asks_for_one(exported: Path, tmp_path: Path) -> None:
    """psa export of a database holding two studies of one architecture writes both into one
    trials.csv: refused as two studies of that file (pick one with --study), not as 'two exports'
    naming the same file twice; --study then reads one."""
    header, *rows = list(csv.reader(open(exported / "trials.csv", newline="")))
    (tmp_path / "two").mkdir()
    with open(tmp_path / "two" / "trials.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
        w.writerows([["again" if c == "study" else v for c, v in zip(header, r)] for r in rows])
    rc, _, err = run_main(["report", "--export", str(tmp_path / "two"), "--out", str(tmp_path / "r")])
    line = one_line_error(err)
    assert rc == 2 and "two studies of" in line and "tiny and again" in line and "--study" in line
    assert "two exports" not in line and not (tmp_path / "r").exists()
    assert len(load_exports([tmp_path / "two"], study="again").trials) == len(load_exports([exported]).trials)


def test_a_value_that_is_not_a_number_is_one_line(exported: Path, tmp_path: Path) -> None:
    """An export edited by hand (a bounty or an LKG score that is not a number, or one no study
    writes: NaN, infinite, out of range) is refused in one line naming the file, the line and the
    value, not with a ValueError's traceback or a figure's colour scale failing on NaN."""
    for i, (name, col, value, why) in enumerate((
            ("trials", "bounty", "abc", "not a number"), ("trials", "trial", "", "not an integer"),
            ("meta_loops", "lkg_score", "zz", "not a number"), ("trials", "bounty", "nan", "not a finite number"),
            ("trials", "test_acc", "-inf", "not a finite number"), ("trials", "bounty", "150", "not a percentage"),
            ("trials", "trial", "0", "less than 1"), ("meta_loops", "lkg_score", "-5", "not a percentage (or -1"),
            ("meta_loops", "candidate_acc", "nan", "not a finite number"),
            ("meta_loops", "promoted", "2", "not 0 or 1"),
            ("meta_loops", "loop", "0", "less than 1"))):
        d = tmp_path / f"{name}-{col}-{i}"
        d.mkdir()
        for f in ("trials", "meta_loops"):
            shutil.copy(exported / f"{f}.csv", d / f"{f}.csv")
        header, *rows = list(csv.reader(open(d / f"{name}.csv", newline="")))
        rows[1][header.index(col)] = value
        with open(d / f"{name}.csv", "w", newline="") as f:
            csv.writer(f).writerows([header, *rows])
        for cmd in ("report", "compare"):
            rc, _, err = run_main([cmd, "--export", str(d), "--out", str(tmp_path / f"{cmd}-{d.name}")])
            line = one_line_error(err)
            assert rc == 2 and f"{name}.csv, line 3: {col} is {value!r}, {why}" in line, line


def test_an_export_cut_short_or_with_a_damaged_line_is_one_line(exported: Path, tmp_path: Path) -> None:
    """A trials file cut inside its last row would read as a finished trial with empty fields, and
    a meta-loops file with a stray line appended as nothing at all: each is refused in one line."""
    cut = tmp_path / "cut"
    cut.mkdir()
    shutil.copy(exported / "meta_loops.csv", cut / "meta_loops.csv")
    text = (exported / "trials.csv").read_text()
    last = text.rstrip("\n").rsplit("\n", 1)[1]
    cut_at = len(text.rstrip("\n")) - len(last) + last.index(",", last.index(",") + 1)  # two fields into the row
    (cut / "trials.csv").write_text(text[:cut_at] + "\n")
    n_lines = text.rstrip("\n").count("\n") + 1
    stray = tmp_path / "stray"
    stray.mkdir()
    shutil.copy(exported / "trials.csv", stray / "trials.csv")
    loops = (exported / "meta_loops.csv").read_text()
    (stray / "meta_loops.csv").write_text(loops + "garbage\n")
    n_loop_lines = loops.rstrip("\n").count("\n") + 2
    for d, message in ((cut, f"trials.csv, line {n_lines}: 2 fields, the header has"),
                       (stray, f"meta_loops.csv, line {n_loop_lines}: 1 fields, the header has")):
        rc, _, err = run_main(["report", "--export", str(d), "--out", str(tmp_path / f"report-{d.name}")])
        line = one_line_error(err)
        assert rc == 2 and message in line and "cut short or damaged" in line, line


def _outputs(out: Path) -> dict[str, str]:
    return {str(p.relative_to(out)): p.read_text() for p in sorted((out / "tables").glob("*"))
            if p.suffix in (".csv", ".md")}


@pytest.mark.slow
def test_compare_and_report_from_an_export_equal_those_from_the_database(reference: Path, exported: Path,
                                                                         tmp_path: Path) -> None:
    for cmd in ("compare", "report"):
        rc, out_db, err = run_main([cmd, "--db", str(reference), "--out", str(tmp_path / f"{cmd}-db")])
        assert rc == 0, err
        rc, out_ex, err = run_main([cmd, "--export", str(exported), "--out", str(tmp_path / f"{cmd}-ex")])
        assert rc == 0, err
        db, ex = _outputs(tmp_path / f"{cmd}-db"), _outputs(tmp_path / f"{cmd}-ex")
        assert db and db == ex
    # the verdict says the same but for its source line
    v_db = (tmp_path / "compare-db" / "verdict.txt").read_text().splitlines()
    v_ex = (tmp_path / "compare-ex" / "verdict.txt").read_text().splitlines()
    assert v_db[1:] == v_ex[1:] and "exported study 'tiny'" in v_ex[0]


# --------------------------------------------------------------------------------------------
# slices


def test_the_committed_slices_are_the_cut_and_each_fits_its_budget() -> None:
    committed = json.loads((BENCH / "results" / ps.SLICES_FILE).read_text())
    assert committed == ps.paper_slices(committed["slice_seconds"])  # deterministic: the same cut again
    est = ps.arch_estimates()
    archs = [a for s in committed["slices"] for a in s["archs"]]
    assert sorted(archs) == sorted(a.short for a in study_architectures())  # each of the 98 once
    for s in committed["slices"]:
        assert s["estimate_s"] == pytest.approx(committed["overhead_s"] + sum(est[a] for a in s["archs"]), abs=0.1)
        # within the cap, but for a net too long for it, which is a slice of its own
        assert s["estimate_s"] <= committed["slice_seconds"] or len(s["archs"]) == 1
    alone = [s["archs"][0] for s in committed["slices"] if s["estimate_s"] > committed["slice_seconds"]]
    assert alone == ["115*115", "91*91"]
    # a tighter cap: more slices, every one within it or a single net
    tight = ps.cut_slices(est, [a.short for a in study_architectures()], 100.0)
    assert len(tight) > len(committed["slices"])
    assert all(s["estimate_s"] <= 100.0 or len(s["archs"]) == 1 for s in tight)
    assert ps.cut_slices({"a": 10.0, "b": 10.0}, ["a", "b"], 100.0, overhead=30.0) == [
        {"slice": "s01", "archs": ["a", "b"], "estimate_s": 50.0}]


def test_which_slices_run_next_and_how_long_they_should_take() -> None:
    slices = [{"slice": f"s0{i}", "archs": [f"{i}*8"], "estimate_s": 100.0} for i in (1, 2, 3)]
    records = [{"slice": "s01", "ok": True, "wall_s": 50.0, "estimate_s": 100.0, "archs": ["1*8"], "dry_run_s": 4.0},
               {"slice": "s02", "ok": False, "wall_s": 10.0, "estimate_s": 100.0, "archs": ["2*8"]}]
    assert [s["slice"] for s in ps.pending(slices, records, [])] == ["s02", "s03"]  # a failed slice runs again
    assert [s["slice"] for s in ps.pending(slices, records, ["s03"])] == ["s03"]
    factor, why = ps.device_factor(records, "h100", "auto")
    assert factor == pytest.approx(0.5 * ps.SAFETY) and "learned" in why
    assert ps.device_factor([], "h100", "fp32")[0] == pytest.approx(ps.DEVICE_FACTOR["h100"] * ps.FP32_FACTOR)
    assert ps.dry_run_rate(records, "cuda") == pytest.approx(4.0 * ps.SAFETY)
    # architectures by name (fp32 reruns): packed into slices, those done skipped, numbered on
    done = [{"slice": "f01", "ok": True, "archs": ["1*8"]}]
    made = ps.arch_slices(["1*8", "2*8", "4*8", "8*8"], done, {"2*8": 100.0, "4*8": 100.0, "8*8": 300.0}, "f", 400.0)
    assert [(s["slice"], s["archs"]) for s in made] == [("f02", ["2*8", "4*8"]), ("f03", ["8*8"])]


def test_a_budget_too_small_runs_nothing(tmp_path: Path) -> None:
    p = subprocess.run([sys.executable, str(BENCH / "paper_study.py"), "run", "--tiny", "--device", "cpu",
                        "--budget", "1", "--out", str(tmp_path / "out"), "--results", str(tmp_path / "res")],
                       env=env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "stopping here" in p.stdout and not list((tmp_path / "out").iterdir())


# --------------------------------------------------------------------------------------------
# end to end: the device script's run, collected, merged


RECORD_FIELDS = {"device", "torch", "triton", "precision", "slices", "wall_s", "trials_done", "dry_run_estimate_s",
                 "cells_consistent", "cells_total", "regimes_agree", "regimes_total", "date"}


def _csv_gz(path: Path) -> list[dict]:
    with gzip.open(path, "rt", newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_tiny_run_on_the_cpu_then_merge(tmp_path: Path) -> None:
    out, res = tmp_path / "out", tmp_path / "results"
    e = {**env(), "PSA_PAPER_CPU": "1", "OUT": str(out), "PY": sys.executable}
    # as a device call runs it: the slices, then the fp32 reruns of what disagreed, in one call
    p = subprocess.run(["bash", str(BENCH / "paper_study.sh"), "run", "fp32", "--results", str(res)], env=e,
                       capture_output=True, text=True, timeout=1200)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    names = sorted(f.name for f in out.iterdir())
    tag = "paper-cpu-tiny-auto-s01_s02"
    ftag = "paper-cpu-tiny-fp32-f01"
    assert names == sorted([f"{t}.{x}" for t in (tag, ftag) for x in ("meta_loops.csv.gz", "slices.jsonl",
                                                                       "trials.csv.gz")] + ["paper_study.log"])
    assert all(ps.SAFE_NAME.match(n) for n in names)
    log = (out / "paper_study.log").read_text()
    assert "steps: run fp32" in log and "7 files in $OUT" in log and re.search(r"exit 0 after \d+ s$", log.rstrip())
    trials, loops = _csv_gz(out / f"{tag}.trials.csv.gz"), _csv_gz(out / f"{tag}.meta_loops.csv.gz")
    from psa.study.export import META_LOOP_EXPORT, TRIAL_EXPORT

    assert list(trials[0]) == [c for c, _ in TRIAL_EXPORT] + ["slice", "precision"]
    assert list(loops[0]) == [c for c, _ in META_LOOP_EXPORT] + ["slice", "precision"]
    assert {(r["arch"], r["slice"], r["precision"]) for r in trials} == {("1*8", "s01", "fp32"), ("2*4", "s02", "fp32")}
    assert len(trials) == 12 and all(r["status"] == "done" for r in trials) and len(loops) == 12
    records = [json.loads(x) for x in (out / f"{tag}.slices.jsonl").read_text().splitlines()]
    assert [r["slice"] for r in records] == ["s01", "s02"] and all(r["ok"] for r in records)
    for r in records:
        assert r["wall_s"] > 0 and r["dry_run_estimate_s"] > 0 and r["trials"] == 6 and r["precision"] == "fp32"
    # the tiny study's regimes differ from the published ones (1 meta-loop on 256 images), so
    # both architectures were rerun, by name, as one slice of --precision fp32
    f32 = [json.loads(x) for x in (out / f"{ftag}.slices.jsonl").read_text().splitlines()]
    assert [(r["slice"], r["archs"], r["precision_flag"], r["ok"]) for r in f32] == [("f01", ["1*8", "2*4"], "fp32", True)]
    assert len(_csv_gz(out / f"{ftag}.trials.csv.gz")) == 12
    # a next call on the same machine gets an empty $OUT: it finds every slice done in the cache
    # the run kept, and runs nothing; once collected, the next session finds them committed
    def nothing_to_run(out_dir: Path) -> None:
        for step in ("auto", "fp32"):
            again = run_bench("run", "--tiny", "--device", "cpu", "--budget", "600", "--precision", step, "--out",
                              str(out_dir), "--results", str(res))
            assert again.returncode == 0 and "nothing to run" in again.stdout, again.stdout + again.stderr
        assert not list(out_dir.iterdir())

    assert sorted(f.name for f in (res / ".paper-cache").iterdir()) == sorted(
        f"{t}.{x}" for t in (tag, ftag) for x in ("slices.jsonl", "trials.csv.gz"))
    nothing_to_run(tmp_path / "out2")
    assert run_bench("collect", str(out), "--results", str(res)).returncode == 0
    assert (res / "paper-study-cpu-tiny" / f"{tag}.paper_study.log").exists()
    assert not (res / "paper-study-cpu-tiny" / ".gitignore").exists()  # small meta-loops are committed
    shutil.rmtree(res / ".paper-cache")  # a fresh machine
    nothing_to_run(tmp_path / "out3")
    m = run_bench("merge", "--results", str(res), "--work", str(tmp_path / "work"))
    assert m.returncode == 0, m.stderr[-3000:]
    doc = json.loads((res / "paper-study-cpu-tiny.json").read_text())
    assert RECORD_FIELDS <= set(doc)
    assert doc["wall_is_sum_of_slices"] and doc["wall_s"] == pytest.approx(sum(r["wall_s"] for r in records), abs=0.02)
    assert doc["trials_done"] == 12 and doc["cells_total"] == 12 and doc["regimes_total"] == 2
    assert doc["complete"] and doc["precision"] == "fp32" and [s["slice"] for s in doc["slices"]] == ["s01", "s02"]
    manifest = json.loads((tmp_path / "work" / "compare" / "manifest.json").read_text())
    assert (doc["cells_consistent"], doc["regimes_agree"]) == (manifest["consistent"], manifest["regimes_agree"])
    assert doc["rerun_fp32"] == ["1*8", "2*4"] and doc["regimes_agree"] == 0
    assert doc["fp32"]["archs"] == ["1*8", "2*4"] and doc["fp32"]["cells_total"] == 12
    verdict = (res / "paper-study-cpu-tiny-verdict.md").read_text()
    assert "| Architecture | Mode |" in verdict and "**sum**" in verdict and "## fp32 reruns" in verdict
    assert (tmp_path / "work" / "report" / "index.html").exists()
    assert not list(res.rglob("*.tmp"))


def test_collect_leaves_large_meta_loops_out_of_git(tmp_path: Path) -> None:
    got = tmp_path / "files_at"
    got.mkdir()
    tag = "paper-h100-auto-s01"
    (got / f"{tag}.slices.jsonl").write_text(json.dumps({"slice": "s01", "device": "h100"}) + "\n")
    (got / f"{tag}.trials.csv.gz").write_bytes(b"t")
    (got / f"{tag}.meta_loops.csv.gz").write_bytes(os.urandom(ps.LOOPS_COMMIT_BYTES + 1))
    (got / f"{tag}.trials.csv.gz.tmp").write_bytes(b"half")  # a write the call's end cut off
    (got / "paper_study.log").write_text("log\n")
    (got / "paper-ray-h100.json").write_text("{}\n")
    p = run_bench("collect", str(got), "--results", str(tmp_path / "res"))
    assert p.returncode == 0, p.stderr
    d = tmp_path / "res" / "paper-study-h100"
    assert sorted(f.name for f in d.iterdir()) == sorted(
        [".gitignore", f"{tag}.slices.jsonl", f"{tag}.trials.csv.gz", f"{tag}.meta_loops.csv.gz",
         f"{tag}.paper_study.log"])
    assert (d / ".gitignore").read_text() == f"{tag}.meta_loops.csv.gz\n"
    assert (tmp_path / "res" / "paper-ray-h100.json").exists()
    # collected twice: the same files, the ignore list unchanged
    assert run_bench("collect", str(got), "--results", str(tmp_path / "res")).returncode == 0
    assert (d / ".gitignore").read_text() == f"{tag}.meta_loops.csv.gz\n"
    # a call that only made the Ray check: its log goes beside the Ray JSON
    ray_only = tmp_path / "files_at2"
    ray_only.mkdir()
    (ray_only / "paper-ray-h200.json").write_text("{}\n")
    (ray_only / "paper_study.log").write_text("ray log\n")
    assert run_bench("collect", str(ray_only), "--results", str(tmp_path / "res")).returncode == 0
    assert (tmp_path / "res" / "paper-ray-h200.paper_study.log").read_text() == "ray log\n"
    # nothing of a device call in a folder: one line, exit 1
    p = run_bench("collect", str(tmp_path / "res" / "paper-study-h100" / ".gitignore"), "--results", str(tmp_path / "r2"))
    assert p.returncode == 1 and p.stdout.strip().splitlines()[-1] == "0 files collected"


def run_bench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(BENCH / "paper_study.py"), *args], env=env(), capture_output=True,
                          text=True, timeout=900)


@pytest.mark.slow
def test_ray_check_gives_the_local_rows(tmp_path: Path) -> None:
    pytest.importorskip("ray")
    p = run_bench("ray", "--tiny", "--device", "cpu", "--num-cpus", "2", "--out", str(tmp_path))
    doc = json.loads((tmp_path / "paper-ray-cpu-tiny.json").read_text())
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert doc["rows_equal"] and doc["trials_rows"] == 3 * 6 * 2 and doc["meta_loops_rows"] == 3 * 6 * 2 * 2
    assert doc["local_wall_s"] > 0 and doc["ray_wall_s"] > 0


def test_the_device_script_is_valid_bash() -> None:
    assert subprocess.run(["bash", "-n", str(BENCH / "paper_study.sh")]).returncode == 0
    p = subprocess.run(["bash", str(BENCH / "paper_study.sh"), "nonsense"], capture_output=True, text=True,
                       env={**os.environ, "OUT": "/nonexistent"})
    assert p.returncode == 2 and "usage" in p.stderr
    for env_, says in (({}, "set OUT"), ({"OUT": "/tmp/x", "PSA_PAPER_SECONDS": "9m"}, "PSA_PAPER_SECONDS")):
        e = {k: v for k, v in os.environ.items() if k != "OUT"} | env_
        p = subprocess.run(["bash", str(BENCH / "paper_study.sh"), "run"], capture_output=True, text=True, env=e)
        assert p.returncode == 2 and p.stderr.count("\n") == 1 and says in p.stderr, p.stderr


@pytest.mark.slow
def test_the_selftest_step_gates_the_steps_after_it(tmp_path: Path) -> None:
    """`selftest` runs psa selftest --quick into the log; when it fails (here: no time left for
    it), the steps after it are skipped and the call exits 1."""
    base = {**env(), "PSA_PAPER_CPU": "1", "PY": sys.executable}
    out = tmp_path / "ok"
    p = subprocess.run(["bash", str(BENCH / "paper_study.sh"), "selftest"], env={**base, "OUT": str(out)},
                       capture_output=True, text=True, timeout=600)
    log = (out / "paper_study.log").read_text()
    assert p.returncode == 0, log[-3000:]
    assert "stack kernels tf32 backward" in log and "== selftest: exit 0" in log
    assert sorted(f.name for f in out.iterdir()) == ["paper_study.log"]
    out = tmp_path / "failed"
    p = subprocess.run(["bash", str(BENCH / "paper_study.sh"), "selftest", "run"],
                       env={**base, "OUT": str(out), "PSA_SELFTEST_SECONDS": "0"}, capture_output=True, text=True,
                       timeout=600)
    log = (out / "paper_study.log").read_text()
    assert p.returncode == 1, log[-3000:]
    assert "the selftest failed: the steps after it are skipped" in log and "== auto" not in log


@pytest.mark.slow
def test_the_profile_step_brings_back_one_file_that_collect_names_after_its_card(tmp_path: Path) -> None:
    out, res = tmp_path / "out", tmp_path / "results"
    e = {**env(), "PSA_PAPER_CPU": "1", "OUT": str(out), "PY": sys.executable}
    p = subprocess.run(["bash", str(BENCH / "paper_study.sh"), "profile"], env=e, capture_output=True, text=True,
                       timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert sorted(f.name for f in out.iterdir()) == ["gpu-profile.json", "paper_study.log"]
    doc = json.loads((out / "gpu-profile.json").read_text())
    (prof,) = doc["profile"]
    assert doc["device"] == "cpu" and prof["arch"] == "1*8" and prof["members"] == 2 and prof["steps"] == 2
    # on a CPU the categories are operators' self times: the population's matmuls and AdamW are there
    assert prof["category_s"]["gemm"] > 0 and prof["category_s"]["adamw/elementwise"] > 0
    assert prof["loop_s"] > 0 and prof["busy_s"] is None and prof["launches_per_step"] is None
    assert [(r["arch"], r["k"]) for r in doc["concurrency"]] == [("1*2", 1), ("1*2", 2)]
    assert doc["concurrency"][0]["gain"] == 1.0 and all(r["loops_per_s"] > 0 for r in doc["concurrency"])
    # on a CPU launch() computes the loop: its host time is most of the wall time
    assert all(0 < r["launch_s_per_loop"] * r["k"] * r["loops_each"] <= r["wall_s"] for r in doc["concurrency"])
    assert doc["graph_steps"] == [1] and all(r["graph_steps"] == 1 and r["same_bits"] for r in doc["concurrency"])
    assert run_bench("collect", str(out), "--results", str(res)).returncode == 0
    assert sorted(f.name for f in res.iterdir()) == ["gpu-profile-cpu.json", "gpu-profile-cpu.paper_study.log"]


def test_the_sweep_step_brings_back_one_file_that_collect_names_after_its_card(tmp_path: Path) -> None:
    out, res = tmp_path / "out", tmp_path / "results"
    e = {**env(), "PSA_PAPER_CPU": "1", "OUT": str(out), "PY": sys.executable}
    e.pop("TRITON_INTERPRET", None)  # the step sets it for the CPU itself
    p = subprocess.run(["bash", str(BENCH / "paper_study.sh"), "sweep"], env=e, capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert sorted(f.name for f in out.iterdir()) == ["paper_study.log", "stack-sweep.json"]
    doc = json.loads((out / "stack-sweep.json").read_text())
    assert doc["device"] == "cpu" and [c["arch"] for c in doc["cases"]] == ["3*40"]
    assert "== sweep: exit 0" in (out / "paper_study.log").read_text()
    assert run_bench("collect", str(out), "--results", str(res)).returncode == 0
    assert sorted(f.name for f in res.iterdir()) == ["stack-sweep-cpu.json", "stack-sweep-cpu.paper_study.log"]


def test_profile_categories_and_busy_time() -> None:
    spec = importlib.util.spec_from_file_location("gpu_profile", BENCH / "gpu_profile.py")
    assert spec is not None and spec.loader is not None
    gp = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gp)
    names = {"sm90_xmma_gemm_f32f32_tf32f32_f32_nn_n_tilesize128x128x32": "gemm", "_stack_fwd_kernel": "triton stack",
             "void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<float>>": "adamw/elementwise",
             "multi_tensor_apply_kernel<...FusedAdamMathFunctor...>": "adamw/elementwise",
             "void at::native::reduce_kernel<512, 1>": "reduction", "Memcpy DtoH (Device -> Pinned)": "copy",
             "aten::baddbmm": "gemm", "aten::_fused_adamw_": "adamw/elementwise", "aten::argmax": "reduction",
             "some_unknown_kernel": "other"}
    assert {n: gp.category(n) for n in names} == names
    # overlapping, nested and disjoint kernels (microseconds): their union, in seconds
    assert gp.busy_seconds([(0, 10), (5, 15), (6, 7), (20, 25)]) == pytest.approx(20e-6)
    assert gp.busy_seconds([]) == 0.0
