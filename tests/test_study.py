"""`psa study`, `psa status`, `psa export`: design, plan, results, bad input, crash injection.

The reference study (tests/study_util.TINY) runs once per session in a subprocess; the other
tests compare against its rows. Slower end-to-end tests (SIGKILL resume, Ray) live in
test_study_resume.py and test_study_ray.py.
"""

from __future__ import annotations

import errno
import hashlib
import json
import sqlite3
from pathlib import Path

import pytest

from psa.study import driver, runner, store
from psa.cli import main
from psa.study.design import StudyDesign, preset, resolve_design
from psa.study.plan import DEFAULT_CALIBRATION, arch_flops, auto_population_size, bytes_per_member, make_plan
from psa.study.lock import StudyLock, checkpoint_root, lock_held, lock_owner

from .study_util import TINY, TINY_LOOP_ROWS, TINY_TRIALS, integrity, leftover_checkpoints, rows, run_psa


@pytest.fixture(scope="session")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted run of the tiny design (subprocess): the rows every other run must match."""
    d = tmp_path_factory.mktemp("reference")
    r = run_psa("study", *TINY, "--db", "ref.sqlite", cwd=d)
    assert r.returncode == 0, r.stderr
    return d / "ref.sqlite"


def run_main(argv: list[str], capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch, cwd: Path
             ) -> tuple[int, str, str]:
    """`psa ARGV` in this process, in `cwd`: (exit status, stdout, stderr)."""
    monkeypatch.chdir(cwd)
    rc = main(argv)
    out = capsys.readouterr()
    return rc, out.out, out.err


def one_line_error(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert lines[0].startswith("psa"), err
    return lines[0]


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ------------------------------------------------------------------------------------------
# design and plan


def test_design_is_paired_and_canonical() -> None:
    d = StudyDesign(architectures=("[1*8]", "2*16"), modes=("hidden", "none"), trials=3, seed=7)
    assert d.architectures == ("1*8", "2*16")
    assert d.modes == ("none", "hidden")
    assert [d.seed_of(k) for k in (1, 2, 3)] == [7, 8, 9]
    assert {d.member(m, 2).seed for m in d.modes} == {8}
    assert d.member("decay", 1).weight_decay == 1e-4 and d.member("none", 1).weight_decay == 0.0
    assert d.member("dropout", 1).dropout == 0.1 and d.member("hidden", 1).dropout == 0.0
    # mode order does not change the design
    assert d.digest() == StudyDesign(architectures=("1*8", "2*16"), modes=("none", "hidden"), trials=3,
                                     seed=7).digest()
    assert d.digest() != StudyDesign(architectures=("1*8", "2*16"), modes=("none", "hidden"), trials=3,
                                     seed=8).digest()


def test_paper_preset_is_the_authors_design() -> None:
    d = preset("paper")
    assert len(d.architectures) == 98 and d.architectures[0] == "1*2048"
    assert d.modes == ("none", "decay", "dropout", "full", "hidden", "output")
    assert (d.trials, d.meta_loops, d.n_trials) == (10, 100, 5880)
    total = sum(arch_flops(a, d.meta_loops) * 60 for a in d.architectures)
    assert total / 1e15 == pytest.approx(27.2, abs=0.15)  # NOTES.md: about 27.2 PFLOP
    big = sum(arch_flops(a, d.meta_loops) * 60 for a in ("4*632", "2*939", "1*2048", "115*115"))
    assert big / 1e15 == pytest.approx(12.6, abs=0.1)
    # on any realistic budget every architecture is one population of 60
    plan = make_plan(d, auto_population_size(d, 8 << 30))
    assert len(plan.populations) == 98 and {p.size for p in plan.populations} == {60}


@pytest.mark.parametrize("trials,chunk", [(10, 60), (10, 24), (10, 7), (7, 18), (3, 1), (5, 6)])
def test_plan_is_a_pure_even_partition(trials: int, chunk: int) -> None:
    d = StudyDesign(architectures=("1*2048", "4*4", "64*1", "[2*16, 1*8]"), trials=trials)
    plan = make_plan(d, chunk)
    assert plan == make_plan(d, chunk)  # a pure function: resumes rebuild the same populations
    per = max(1, chunk // 6)
    for arch in d.architectures:
        pops = [p for p in plan.populations if p.arch == arch]
        covered = sorted(k for p in pops for k in p.trials)
        assert covered == list(range(1, trials + 1))
        sizes = [len(p.trials) for p in pops]
        assert max(sizes) <= per and max(sizes) - min(sizes) <= 1
        assert all(p.modes == d.modes for p in pops)
    keys = [p.key for p in plan.populations]
    assert len(set(keys)) == len(keys)
    work = [DEFAULT_CALIBRATION.loop_seconds(p.arch, p.size) for p in plan.populations]
    assert work == sorted(work, reverse=True)  # largest work first


def test_auto_population_size_fits_the_budget() -> None:
    d = preset("paper")
    worst = max(bytes_per_member(a) for a in d.architectures)
    assert auto_population_size(d, 10 * worst) == 10
    assert auto_population_size(d, 1) == 1
    assert auto_population_size(d, 1 << 40) == 60


def test_toml_design_and_names(tmp_path: Path) -> None:
    f = tmp_path / "widths.toml"
    f.write_text('name = "widths"\narchitectures = ["1*64", "[2*8, 1*4]"]\nmodes = ["none", "hidden"]\n'
                 'trials = 3\nmeta_loops = 5\nseed = 11\n[training]\nlr = 2e-4\nbatch_size = 128\n')
    name, d = resolve_design(design_file=str(f))
    assert name == "widths"
    assert d == StudyDesign(architectures=("1*64", "[2*8, 1*4]"), modes=("none", "hidden"), trials=3,
                            meta_loops=5, seed=11, lr=2e-4, batch_size=128)
    # a flag that changes the design changes the default name, so it never lands in "widths"
    name2, d2 = resolve_design(design_file=str(f), overrides={"trials": 4})
    assert d2.trials == 4 and name2.startswith("widths-") and name2 != name
    # a flag that repeats the file's value does not
    assert resolve_design(design_file=str(f), overrides={"trials": 3})[0] == "widths"
    assert resolve_design(preset_name="smoke")[0] == "smoke"
    n1 = resolve_design(overrides={"architectures": ("1*8",)})[0]
    assert n1 == resolve_design(overrides={"architectures": ("1*8",)})[0] and n1.startswith("study-")
    # the paper's list by name, in a file and on the command line
    g = tmp_path / "p.toml"
    g.write_text('architectures = "paper"\ntrials = 1\n')
    assert len(resolve_design(design_file=str(g))[1].architectures) == 98


# ------------------------------------------------------------------------------------------
# bad input: one line, non-zero status, nothing written


BAD_DESIGNS = [
    (["--arch", "1*8", "--arch", "3*x"], "unknown architecture '3*x'"),
    (["--arch", "1*8", "--modes", "none,sideways"], "unknown mode 'sideways'"),
    (["--arch", "[]", "--modes", "hidden"], "needs a hidden layer"),
    (["--arch", "1*8", "--arch", "[1*8]"], "listed more than once"),
    (["--arch", "1*8", "--trials", "0"], "an integer >= 1"),
    (["--arch", "1*8", "--lr", "-1"], "learning rate"),
    (["--arch", "1*8", "--name", "../evil"], "bad study name"),
    (["--preset", "nope"], "invalid choice"),
    (["--arch", "1*8", "--backend", "local", "--address", "x:1"], "apply to --backend ray"),
    ([], "no architectures"),
]


@pytest.mark.parametrize("argv,message", BAD_DESIGNS)
def test_bad_design_flags(argv: list[str], message: str, tmp_path: Path, capsys, monkeypatch) -> None:
    rc, out, err = run_main(["study", *argv, "--quiet"], capsys, monkeypatch, tmp_path)
    assert rc == 2
    assert message in one_line_error(err)
    assert not (tmp_path / "results").exists()  # nothing written


@pytest.mark.parametrize("text,message", [
    ('architectures = ["1*8"\n', "does not parse as TOML"),
    ('architectures = ["1*8"]\ntrails = 3\n', "unknown key 'trails'"),
    ('architectures = ["1*8"]\n[training]\nlr = "fast"\n', "lr must be a number"),
    ('architectures = ["1*8", "1*y"]\n', "unknown architecture '1*y'"),
    ('architectures = ["1*8"]\nmodes = ["none", "bogus"]\n', "unknown mode 'bogus'"),
    ('architectures_file = "missing.txt"\n', "cannot read architecture file"),
    (b'\xff\xfe'.decode("latin-1"), "does not parse"),
])
def test_bad_design_files(text: str, message: str, tmp_path: Path, capsys, monkeypatch) -> None:
    f = tmp_path / "design.toml"
    f.write_text(text)
    rc, out, err = run_main(["study", str(f), "--quiet"], capsys, monkeypatch, tmp_path)
    assert rc == 2
    assert message in one_line_error(err)
    assert not (tmp_path / "results").exists()


def test_bad_arch_file(tmp_path: Path, capsys, monkeypatch) -> None:
    (tmp_path / "archs.txt").write_text("# widths\n1*8\n\n2*banana\n")
    rc, out, err = run_main(["study", "--arch-file", "archs.txt"], capsys, monkeypatch, tmp_path)
    assert rc == 2
    assert "archs.txt:4" in one_line_error(err)


def test_newer_schema_is_refused(tmp_path: Path, capsys, monkeypatch) -> None:
    db = tmp_path / "new.sqlite"
    con = store.connect(db)
    con.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    con.close()
    before = file_digest(db)
    rc, out, err = run_main(["study", *TINY, "--db", str(db)], capsys, monkeypatch, tmp_path)
    assert rc == 2
    assert "schema version 99" in one_line_error(err)
    assert file_digest(db) == before
    for cmd in (["status", "--db", str(db)], ["export", "--db", str(db), "--out", "x"]):
        rc, out, err = run_main(cmd, capsys, monkeypatch, tmp_path)
        assert rc == 2 and "schema version 99" in one_line_error(err)


def test_not_a_database(tmp_path: Path, capsys, monkeypatch) -> None:
    db = tmp_path / "junk.sqlite"
    db.write_bytes(b"this is not sqlite" * 100)
    rc, out, err = run_main(["study", *TINY, "--db", str(db)], capsys, monkeypatch, tmp_path)
    assert rc == 2 and "not a results database" in one_line_error(err)
    rc, out, err = run_main(["status", "--db", str(tmp_path / "absent.sqlite")], capsys, monkeypatch, tmp_path)
    assert rc == 2 and "no results database" in one_line_error(err)


def test_same_study_twice_is_refused(tmp_path: Path, capsys, monkeypatch) -> None:
    db = tmp_path / "r.sqlite"
    lock = StudyLock(checkpoint_root(db) / "tiny", "tiny", db)
    lock.acquire()  # as a running `psa study` on this study would
    try:
        rc, out, err = run_main(["study", *TINY, "--db", str(db)], capsys, monkeypatch, tmp_path)
    finally:
        lock.release()
    import os
    line = one_line_error(err)
    assert rc == 2 and "already being run by pid" in line and str(os.getpid()) in line
    con = sqlite3.connect(db)
    assert con.execute("SELECT COUNT(*) FROM studies").fetchone()[0] == 0  # nothing started
    con.close()


def test_database_locked_by_another_writer(reference: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    db = tmp_path / "locked.sqlite"
    db.write_bytes(reference.read_bytes())
    other = sqlite3.connect(db, isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")  # some other program holds the write lock
    try:
        argv = ["study", *TINY, "--name", "other", "--db", str(db), "--busy-timeout", "0.3"]
        rc, out, err = run_main(argv, capsys, monkeypatch, tmp_path)
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert rc == 2 and "locked by another process" in one_line_error(err)
    assert integrity(db) == "ok"
    assert rows(db) == rows(reference)


def test_ray_backend_without_ray(tmp_path: Path, capsys, monkeypatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    rc, out, err = run_main(["study", *TINY, "--backend", "ray"], capsys, monkeypatch, tmp_path)
    assert rc == 2 and "needs Ray" in one_line_error(err)
    assert not (tmp_path / "results").exists()


def test_export_parquet_without_pyarrow(reference: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "pyarrow", None)
    rc, out, err = run_main(["export", "--db", str(reference), "--out", "x", "--format", "parquet"],
                            capsys, monkeypatch, tmp_path)
    assert rc == 2 and "needs pyarrow" in one_line_error(err)
    assert not (tmp_path / "x").exists()


def test_different_design_under_the_same_name(reference: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    db = tmp_path / "d.sqlite"
    db.write_bytes(reference.read_bytes())
    argv = ["study", *TINY, "--db", str(db)]
    argv[argv.index("--meta-loops") + 1] = "7"
    rc, out, err = run_main(argv, capsys, monkeypatch, tmp_path)
    assert rc == 2 and "different design (meta_loops: 6 there, 7 here)" in one_line_error(err)
    argv = ["study", *TINY, "--db", str(db)]
    argv[argv.index("--population-size") + 1] = "12"
    rc, out, err = run_main(argv, capsys, monkeypatch, tmp_path)
    assert rc == 2 and "planned with --population-size 6" in one_line_error(err)
    assert rows(db) == rows(reference)


# ------------------------------------------------------------------------------------------
# a finished study: its rows, status and export


def test_reference_rows_follow_the_engine_rules(reference: Path) -> None:
    r = rows(reference)
    assert len(r["trials"]) == TINY_TRIALS and len(r["meta_loops"]) == TINY_LOOP_ROWS
    assert integrity(reference) == "ok"
    assert leftover_checkpoints(reference) == []
    loops: dict[tuple, list[tuple]] = {}
    for row in r["meta_loops"]:
        loops.setdefault(row[1:4], []).append(row)
    for (name, arch, mode, k, seed, n_loops, lr, bs, wd, p, dataset, status, bounty, bounty_loop, test, done
         ) in r["trials"]:
        assert (name, status, n_loops, done, lr, bs) == ("tiny", "done", 6, 6, 1e-4, 256)
        assert seed == k - 1  # paired: trial k of every mode shares its seed
        assert dataset == "mnist[train:2048]"
        assert wd == (1e-4 if mode == "decay" else 0.0) and p == (0.1 if mode == "dropout" else 0.0)
        ls = loops[(arch, mode, k)]
        assert [x[4] for x in ls] == [1, 2, 3, 4, 5, 6]
        assert all(x[5] == mode for x in ls)
        scores = [x[10] for x in ls]
        assert scores == sorted(scores)  # the LKG score never falls
        assert ls[0][7] == 1 and ls[0][8] is None  # loop 1: promoted, no ablation
        ablated = [x[8] is not None for x in ls[1:]]
        assert all(ablated) if mode in ("full", "hidden", "output") else not any(ablated)
        promoted = [x for x in ls if x[7]]
        assert bounty == max(x[6] for x in promoted) == scores[-1]
        assert bounty_loop == promoted[-1][4]
        assert 0 < test < 100


def test_status_and_export_of_a_finished_study(reference: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    rc, out, err = run_main(["status", "--db", str(reference), "--json"], capsys, monkeypatch, tmp_path)
    assert rc == 0
    (info,) = json.loads(out)["studies"]
    assert (info["study"], info["state"], info["done"], info["trials"]) == ("tiny", "finished", 24, 24)
    assert (info["loops_done"], info["loops_total"]) == (144, 144)
    assert [a["arch"] for a in info["architectures"]] == ["1*8", "2*8"]
    rc, out, err = run_main(["status", "--db", str(reference)], capsys, monkeypatch, tmp_path)
    assert rc == 0 and "finished" in out and "24 done" in out and "1*8" in out

    rc, out, err = run_main(["export", "--db", str(reference), "--out", "exp"], capsys, monkeypatch, tmp_path)
    assert rc == 0
    exp = tmp_path / "exp"
    assert sorted(p.name for p in exp.iterdir()) == ["meta_loops.csv", "meta_loops.parquet", "trials.csv",
                                                      "trials.parquet"]
    import csv

    import pyarrow.parquet as pq

    with open(exp / "meta_loops.csv") as f:
        loops_csv = list(csv.DictReader(f))
    with open(exp / "trials.csv") as f:
        trials_csv = list(csv.DictReader(f))
    assert len(loops_csv) == TINY_LOOP_ROWS and len(trials_csv) == TINY_TRIALS
    ml = pq.read_table(exp / "meta_loops.parquet").to_pylist()
    tr = pq.read_table(exp / "trials.parquet").to_pylist()
    assert len(ml) == TINY_LOOP_ROWS and len(tr) == TINY_TRIALS
    # exact values: CSV floats round-trip, Parquet is typed, both equal the database
    db_loops = {(x[1], x[2], x[3], x[4]): x for x in rows(reference)["meta_loops"]}
    for c, p in zip(loops_csv, ml):
        key = (c["arch"], c["mode"], int(c["trial"]), int(c["loop"]))
        assert key == (p["arch"], p["mode"], p["trial"], p["loop"])
        assert float(c["candidate_acc"]) == p["candidate_acc"] == db_loops[key][6]
        assert float(c["train_loss"]) == p["train_loss"] == db_loops[key][11]
        assert (c["ablated_layer"] == "") == (p["ablated_layer"] is None)
    assert {t["bounty"] for t in tr} == {float(t["bounty"]) for t in trials_csv}
    # again, CSV only, one study: files are replaced whole, no temporary files stay
    rc, out, err = run_main(["export", "--db", str(reference), "--out", "exp", "--format", "csv", "--study", "tiny"],
                            capsys, monkeypatch, tmp_path)
    assert rc == 0 and not list(exp.glob(".*"))
    rc, out, err = run_main(["export", "--db", str(reference), "--out", "e2", "--study", "nope"],
                            capsys, monkeypatch, tmp_path)
    assert rc == 2 and "no study named 'nope'" in one_line_error(err)


def test_rerun_of_a_finished_study_changes_nothing(reference: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    db = tmp_path / "again.sqlite"
    db.write_bytes(reference.read_bytes())
    rc, out, err = run_main(["study", *[a for a in TINY if a != "--quiet"], "--db", str(db)], capsys, monkeypatch,
                            tmp_path)
    assert rc == 0 and "nothing to do" in err
    assert rows(db) == rows(reference)


def test_dry_run_writes_nothing(reference: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    db = tmp_path / "dry.sqlite"
    db.write_bytes(reference.read_bytes())
    before = file_digest(db)
    rc, out, err = run_main(["study", *TINY, "--db", str(db), "--dry-run"], capsys, monkeypatch, tmp_path)
    assert rc == 0
    assert "1*8" in out and "2*8" in out and "4 populations" in out and "calibration:" in out
    assert "24 of 24 trials done" in out and "nothing was written" in out
    assert file_digest(db) == before and not checkpoint_root(db).exists()
    rc, out, err = run_main(["study", "--arch", "1*8", "--trials", "1", "--dry-run", "--db", "fresh.sqlite"],
                            capsys, monkeypatch, tmp_path)
    assert rc == 0 and not (tmp_path / "fresh.sqlite").exists()


# ------------------------------------------------------------------------------------------
# crashes at chosen moments (in-process): the rows still come out exactly right


class Crash(BaseException):
    """Stands in for a kill at a precise point (not an Exception: nothing may catch it)."""


def _fail_on_call(monkeypatch, target: object, name: str, n: int, exc: BaseException) -> None:
    real = getattr(target, name)
    calls = {"n": 0}

    def wrapper(*a, **k):
        calls["n"] += 1
        if calls["n"] == n:
            raise exc
        return real(*a, **k)

    monkeypatch.setattr(target, name, wrapper)


@pytest.mark.parametrize("where,n", [
    ("save_population", 3),  # killed after a loop's rows committed, before its checkpoint
    ("unlink", 1),  # killed after a population's final commit, before its checkpoint went away
    ("finish_trials", 2),  # killed before a population's final commit
])
def test_crash_between_steps_then_resume(where: str, n: int, reference: Path, tmp_path: Path, capsys,
                                         monkeypatch) -> None:
    db = tmp_path / "c.sqlite"
    with monkeypatch.context() as m:
        if where == "save_population":
            _fail_on_call(m, driver, "save_population", n, Crash())
        elif where == "finish_trials":
            _fail_on_call(m, store, "finish_trials", n, Crash())
        else:
            real_unlink = Path.unlink

            def unlink(self, *a, **k):
                if self.suffix == ".safetensors":
                    raise Crash()
                return real_unlink(self, *a, **k)

            m.setattr(Path, "unlink", unlink)
        with pytest.raises(Crash):
            run_main(["study", *TINY, "--db", str(db)], capsys, monkeypatch, tmp_path)
    assert integrity(db) == "ok"
    assert len(rows(db)["meta_loops"]) < TINY_LOOP_ROWS
    rc, out, err = run_main(["study", *TINY, "--db", str(db)], capsys, monkeypatch, tmp_path)
    assert rc == 0, err
    assert rows(db) == rows(reference)
    assert leftover_checkpoints(db) == []


def test_disk_full_in_the_database(reference: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    """A real SQLITE_FULL (max_page_count reached) mid-study: one line, database intact, resumable."""
    db = tmp_path / "full.sqlite"
    real_record = store.record_loop
    calls = {"n": 0}

    def record_loop(con, *a, **k):
        calls["n"] += 1
        if calls["n"] == 3:  # from now on the file may not grow: the next new page fails
            pages = con.execute("PRAGMA page_count").fetchone()[0]
            con.execute(f"PRAGMA max_page_count = {pages}")
        return real_record(con, *a, **k)

    with monkeypatch.context() as m:
        m.setattr(store, "record_loop", record_loop)
        rc, out, err = run_main(["study", *TINY, "--db", str(db)], capsys, monkeypatch, tmp_path)
    line = one_line_error(err)
    assert rc == 2 and "disk full" in line and "intact" in line
    assert integrity(db) == "ok"
    assert 0 < len(rows(db)["meta_loops"]) < TINY_LOOP_ROWS
    rc, out, err = run_main(["study", *TINY, "--db", str(db)], capsys, monkeypatch, tmp_path)
    assert rc == 0, err
    assert rows(db) == rows(reference)


def test_disk_full_writing_a_checkpoint(reference: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    db = tmp_path / "nospace.sqlite"
    real_write = driver.save_population.__globals__["save_tensors"]
    calls = {"n": 0}

    def save_tensors(*a, **k):
        calls["n"] += 1
        if calls["n"] == 4:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(*a, **k)

    with monkeypatch.context() as m:
        m.setitem(driver.save_population.__globals__, "save_tensors", save_tensors)
        rc, out, err = run_main(["study", *TINY, "--db", str(db)], capsys, monkeypatch, tmp_path)
    line = one_line_error(err)
    assert rc == 2 and "no space left on device" in line and "rerun the same command" in line
    assert integrity(db) == "ok"
    rc, out, err = run_main(["study", *TINY, "--db", str(db)], capsys, monkeypatch, tmp_path)
    assert rc == 0, err
    assert rows(db) == rows(reference)


def test_a_failing_population_is_marked_and_retried(reference: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    db = tmp_path / "fail.sqlite"

    class FailingRun(runner.PopulationRun):
        def __init__(self, design, pp, *a, **k):
            if pp.arch == "2*8" and pp.first == 1:
                raise RuntimeError("CUDA out of memory (simulated)")
            super().__init__(design, pp, *a, **k)

    with monkeypatch.context() as m:
        m.setattr(runner, "PopulationRun", FailingRun)
        rc, out, err = run_main(["study", *TINY, "--db", str(db)], capsys, monkeypatch, tmp_path)
    assert rc == 1
    assert "1 population(s) failed: 2*8 trial 1: RuntimeError: CUDA out of memory (simulated)" in err
    rc2, out, err2 = run_main(["status", "--db", str(db), "--json"], capsys, monkeypatch, tmp_path)
    (info,) = json.loads(out)["studies"]
    assert (info["failed"], info["done"]) == (6, 18)
    rc, out, err = run_main(["study", *TINY, "--db", str(db)], capsys, monkeypatch, tmp_path)
    assert rc == 0, err
    assert rows(db) == rows(reference)


def test_unusable_database_path(tmp_path: Path, capsys, monkeypatch) -> None:
    (tmp_path / "afile").write_text("x")
    rc, out, err = run_main(["study", *TINY, "--db", "afile/psa.sqlite"], capsys, monkeypatch, tmp_path)
    assert rc == 2 and "cannot create the results database" in one_line_error(err)


# ------------------------------------------------------------------------------------------
# how a study runs: concurrency, checkpoint interval, precision, random-stream versions


def test_populations_in_flight_together_write_the_same_rows(reference: Path, tmp_path: Path, capsys,
                                                           monkeypatch) -> None:
    """Several populations interleaved on one device (as on a GPU) compute what each would alone."""
    db = tmp_path / "conc.sqlite"
    rc, out, err = run_main(["study", *TINY, "--db", str(db), "--concurrency", "3"], capsys, monkeypatch, tmp_path)
    assert rc == 0, err
    assert rows(db) == rows(reference)
    assert leftover_checkpoints(db) == []


@pytest.mark.parametrize("every,saves", [("0", 4 * 6), ("3600", 4)])
def test_checkpoint_interval(every: str, saves: int, reference: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    """0: a checkpoint after every meta-loop; a long interval: only after each population's first."""
    db = tmp_path / f"every{every}.sqlite"
    real = driver.save_population
    calls: list[int] = []

    def save_population(path, pop, extra):
        calls.append(pop.loop)
        assert extra["rng"] == driver.rng.VERSION and extra["precision"] == "fp32"
        return real(path, pop, extra)

    with monkeypatch.context() as m:
        m.setattr(driver, "save_population", save_population)
        rc, out, err = run_main(["study", *TINY, "--db", str(db), "--checkpoint-every", every], capsys, monkeypatch,
                                tmp_path)
    assert rc == 0, err
    assert len(calls) == saves
    assert rows(db) == rows(reference)


def test_a_checkpoint_of_older_random_streams_is_not_continued(reference: Path, tmp_path: Path, capsys,
                                                               monkeypatch) -> None:
    """A checkpoint written before the counter-based streams restarts its population from loop 1."""
    db = tmp_path / "old.sqlite"
    with monkeypatch.context() as m:
        _fail_on_call(m, driver, "save_population", 2, Crash())
        with pytest.raises(Crash):
            run_main(["study", *TINY, "--db", str(db), "--checkpoint-every", "0"], capsys, monkeypatch, tmp_path)
    (ckpt,) = list(checkpoint_root(db).rglob("*.safetensors"))
    from psa.core.checkpoint import load_population, save_population

    pop, meta = load_population(ckpt, "cpu")
    del meta["rng"]
    save_population(ckpt, pop, {k: v for k, v in meta.items() if k not in ("format", "kind", "arch", "members",
                                                                           "loop", "bounty_loop", "n_val",
                                                                           "mode_history")})
    loud = [a for a in TINY if a != "--quiet"]
    rc, out, err = run_main(["study", *loud, "--db", str(db)], capsys, monkeypatch, tmp_path)
    assert rc == 0, err
    assert "from scratch" in err and "older psa" in err
    assert rows(db) == rows(reference)


def test_precision_is_fixed_when_the_study_is_created(tmp_path: Path, capsys, monkeypatch) -> None:
    db = tmp_path / "prec.sqlite"
    argv = ["--arch", "1*8", "--trials", "1", "--meta-loops", "1", "--train-subset", "512", "--name", "prec",
            "--db", str(db), "--precision", "bf16"]
    rc, out, err = run_main(["study", *argv], capsys, monkeypatch, tmp_path)
    assert rc == 0, err
    con = sqlite3.connect(db)
    (doc,) = con.execute("SELECT design FROM studies").fetchone()
    con.close()
    assert json.loads(doc)["plan"]["engine"] == {"precision": "bf16", "rng": driver.rng.VERSION}
    rc, out, err = run_main(["study", *[a for a in argv if a not in ("--precision", "bf16")], "--precision", "fp32"],
                            capsys, monkeypatch, tmp_path)
    assert rc == 2 and "--precision bf16" in one_line_error(err)
    rc, out, err = run_main(["study", *[a for a in argv if a not in ("--precision", "bf16")]], capsys, monkeypatch,
                            tmp_path)
    assert rc == 0 and "nothing to do" in err + out


def test_creating_one_database_from_two_processes_at_once_retries(tmp_path: Path, monkeypatch) -> None:
    """Until a new database is in WAL mode SQLite can answer a second creator "locked" at once,
    without waiting (seen in CI: two `psa study` started together). connect() starts again."""
    real_connect = sqlite3.connect
    refusals = {"n": 0}

    class Racing(sqlite3.Connection):
        def execute(self, sql, *a):
            if sql.startswith("PRAGMA journal_mode") and refusals["n"] < 3:
                refusals["n"] += 1
                raise sqlite3.OperationalError("database is locked")
            return super().execute(sql, *a)

    monkeypatch.setattr(store.sqlite3, "connect", lambda *a, **k: real_connect(*a, factory=Racing, **k))
    con = store.connect(tmp_path / "new.sqlite", timeout=5)
    assert refusals["n"] == 3
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    con.close()

    class Stuck(sqlite3.Connection):  # refuses for ever: one clear error once the timeout has passed
        def execute(self, sql, *a):
            if sql.startswith("PRAGMA journal_mode"):
                raise sqlite3.OperationalError("database is locked")
            return super().execute(sql, *a)

    monkeypatch.setattr(store.sqlite3, "connect", lambda *a, **k: real_connect(*a, factory=Stuck, **k))
    with pytest.raises(store.StoreError, match="locked by another process"):
        store.connect(tmp_path / "other.sqlite", timeout=0.3)


# ------------------------------------------------------------------------------------------
# the population size (once "chunk"), dry runs of existing studies, the lock, durations


def test_the_stored_plan_keeps_the_old_key() -> None:
    """The stored plan names the population size "chunk", as studies before the rename did: a
    design's studies row stays the same, and databases written before the rename still open."""
    d = StudyDesign(architectures=("1*8",), trials=3)
    plan = make_plan(d, 12)
    assert plan.population_size == 12
    assert plan.to_dict() == {"chunk": 12, "populations": [["1*8", 1, 2], ["1*8", 3, 3]]}


def test_chunk_is_the_deprecated_name_of_population_size(reference: Path, tmp_path: Path, capsys,
                                                         monkeypatch) -> None:
    """--chunk still works, with a one-line warning: the same plan, the same rows; the stored
    plan keeps its "chunk" key, so databases written before the rename open as they did."""
    warning = "psa: warning: --chunk is deprecated; use --population-size"
    old = ["--chunk" if a == "--population-size" else a for a in TINY]
    db = tmp_path / "alias.sqlite"
    rc, out, err = run_main(["study", *old, "--db", str(db)], capsys, monkeypatch, tmp_path)
    assert rc == 0 and err.strip() == warning
    assert rows(db) == rows(reference)
    con = sqlite3.connect(db)
    (doc,) = con.execute("SELECT design FROM studies").fetchone()
    con.close()
    assert json.loads(doc)["plan"]["chunk"] == 6
    bigger = list(old)
    bigger[bigger.index("--chunk") + 1] = "12"
    rc, out, err = run_main(["study", *bigger, "--db", str(db)], capsys, monkeypatch, tmp_path)
    assert rc == 2 and err.splitlines()[0] == warning
    assert "planned with --population-size 6" in one_line_error("\n".join(err.splitlines()[1:]))
    rc, out, err = run_main(["study", *TINY, "--chunk", "6", "--db", str(db)], capsys, monkeypatch, tmp_path)
    assert rc == 2 and "--population-size or its old name --chunk, not both" in one_line_error(err)


def test_dry_run_checks_an_existing_study_as_a_run_would(reference: Path, tmp_path: Path, capsys,
                                                         monkeypatch) -> None:
    """--dry-run of a study that exists refuses what the run itself would refuse; writes nothing."""
    db = tmp_path / "dry.sqlite"
    db.write_bytes(reference.read_bytes())
    before = file_digest(db)
    for flag, value, message in [
        ("--meta-loops", "7", "different design (meta_loops: 6 there, 7 here)"),
        ("--population-size", "12", "planned with --population-size 6"),
        ("--precision", "bf16", "created with --precision fp32"),
    ]:
        argv = [*TINY, "--precision", "auto"]
        argv[argv.index(flag) + 1] = value
        rc, out, err = run_main(["study", *argv, "--db", str(db), "--dry-run"], capsys, monkeypatch, tmp_path)
        assert rc == 2 and message in one_line_error(err)
    assert file_digest(db) == before and not checkpoint_root(db).exists()


def test_what_status_reads_of_the_lock(tmp_path: Path) -> None:
    """Whether a study's lock is held now, and by whom; where the checkpoints and lock live."""
    import os

    assert checkpoint_root(Path("results/psa.sqlite")) == Path("results/psa.ckpt")
    assert checkpoint_root(Path("results/db")) == Path("results/db.ckpt")
    d = checkpoint_root(tmp_path / "r.sqlite") / "s"
    assert lock_held(d) is False and lock_owner(d / "lock") is None
    lock = StudyLock(d, "s", tmp_path / "r.sqlite")
    lock.acquire()
    try:
        assert lock_held(d) is True
        owner = lock_owner(d / "lock")
        assert owner is not None and owner["pid"] == os.getpid() and owner["since"]
    finally:
        lock.release()
    assert lock_held(d) is False


def test_durations_for_people() -> None:
    """One formatter for the plan's estimates and, rough, for the ETA of `psa status`."""
    from psa.study.console import fmt_seconds

    assert [fmt_seconds(s) for s in (45, 750, 7200, 200_000)] == ["45 s", "12.5 min", "2.0 h", "2.3 d"]
    assert ([fmt_seconds(s, rough=True) for s in (-3, 45, 750, 7200, 200_000)]
            == ["~0 s", "~45 s", "~12 min", "~2.0 h", "~55.6 h"])
