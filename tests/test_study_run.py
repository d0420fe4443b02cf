"""`psa study` end to end (in this process): the reference study's rows, reruns, --dry-run, and
the ways of running it that must give the same rows (concurrency, checkpoint interval); what
a study fixes when it is created (design, population size, precision, random streams).

The reference study (conftest.TINY) runs once per session in a subprocess; the tests compare
against its rows. Slower end-to-end tests (SIGKILL resume, Ray) live in test_study_resume.py
and test_study_ray.py."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from psa.study import checkpoints, driver
from psa.study.lock import checkpoint_root

from .conftest import (
    TINY,
    TINY_LOOP_ROWS,
    TINY_TRIALS,
    file_digest,
    integrity,
    leftover_checkpoints,
    one_line_error,
    rows,
    run_main,
    with_flag,
)


# ------------------------------------------------------------------------------------------
# a finished study


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


def test_rerun_of_a_finished_study_changes_nothing(reference: Path, tmp_path: Path) -> None:
    db = tmp_path / "again.sqlite"
    db.write_bytes(reference.read_bytes())
    rc, out, err = run_main(["study", *[a for a in TINY if a != "--quiet"], "--db", str(db)], tmp_path)
    assert rc == 0 and "nothing to do" in err
    assert rows(db) == rows(reference)


def test_dry_run_writes_nothing(reference: Path, tmp_path: Path) -> None:
    db = tmp_path / "dry.sqlite"
    db.write_bytes(reference.read_bytes())
    before = file_digest(db)
    rc, out, err = run_main(["study", *TINY, "--db", str(db), "--dry-run"], tmp_path)
    assert rc == 0
    assert "1*8" in out and "2*8" in out and "4 populations" in out and "calibration:" in out
    assert "24 of 24 trials done" in out and "nothing was written" in out
    assert "nothing is left to do: the study is complete" in out and "for the 0 trials" not in out
    assert file_digest(db) == before and not checkpoint_root(db).exists()
    rc, out, err = run_main(["study", "--arch", "1*8", "--trials", "1", "--dry-run", "--db", "fresh.sqlite"],
                            tmp_path)
    assert rc == 0 and not (tmp_path / "fresh.sqlite").exists() and "(1 architecture x" in out


def test_dry_run_json_has_the_estimate_and_its_terms(reference: Path, tmp_path: Path) -> None:
    """--dry-run --json: the plan and an estimate built from one probe per architecture (its
    largest population), with its uncertainty, and what is left (all of a new study, nothing
    of a finished one); the table goes to stderr. --json alone is a usage error."""
    rc, out, err = run_main(["study", *TINY, "--db", "j.sqlite", "--dry-run", "--json"], tmp_path)
    assert rc == 0 and "calibration:" in err and not (tmp_path / "j.sqlite").exists()
    plan = json.loads(out)
    assert plan["todo_trials"] == TINY_TRIALS and plan["todo_seconds"] == pytest.approx(plan["seconds"])
    (tmp_path / "done.sqlite").write_bytes(reference.read_bytes())
    rc, out, err = run_main(["study", *TINY, "--db", "done.sqlite", "--dry-run", "--json"], tmp_path)
    done = json.loads(out)
    assert rc == 0 and done["todo_trials"] == 0 and done["todo_seconds"] == pytest.approx(done["startup_seconds"])
    probes = {p["arch"]: p for p in plan["probes"]}
    assert sorted(probes) == ["1*8", "2*8"] and all(p["members"] == 6 for p in probes.values())
    assert all(p["step_s"] > 0 and p["eval_image_s"] > 0 for p in plan["probes"])
    assert plan["uncertainty"] >= 0.15 and plan["calibration_seconds"] > 0
    assert plan["seconds"] == pytest.approx(plan["startup_seconds"] + sum(r["seconds"] for r in plan["architectures"]))
    # 6 loops of 8 steps of 256 each (2,048 images) dominate each population's time
    for r in plan["architectures"]:
        assert r["seconds"] > 2 * 6 * 8 * probes[r["arch"]]["step_s"]
    rc, out, err = run_main(["study", *TINY, "--db", "j.sqlite", "--json"], tmp_path)
    assert rc == 2 and "--json applies to --dry-run" in err


def test_process_overhead_times_a_child_and_is_zero_when_it_cannot_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """The estimate's start-up counts the interpreter's start and shut-down around psa (a child
    that imports torch, torch._dynamo and psa.cli): more than nothing, less than the child's
    whole life; 0 when no child can run."""
    import sys
    import time

    from psa.study import estimate

    t = time.perf_counter()
    overhead = estimate.process_overhead()
    assert 0 < overhead < time.perf_counter() - t
    monkeypatch.setattr(sys, "executable", "/nonexistent/python")
    assert estimate.process_overhead() == 0.0


def test_dry_run_checks_an_existing_study_as_a_run_would(reference: Path, tmp_path: Path) -> None:
    """--dry-run of a study that exists refuses what the run itself would refuse; writes nothing."""
    db = tmp_path / "dry.sqlite"
    db.write_bytes(reference.read_bytes())
    before = file_digest(db)
    for argv, message in [
        (with_flag(TINY, "--meta-loops", "7"), "different design (meta_loops: 6 there, 7 here)"),
        (with_flag(TINY, "--population-size", "12"), "planned with --population-size 6"),
        ([*TINY, "--precision", "bf16"], "created with --precision fp32"),
        ([*TINY, "--diverged", "discard"], "different design (diverged: the default there, 'discard' here)"),
    ]:
        rc, out, err = run_main(["study", *argv, "--db", str(db), "--dry-run"], tmp_path)
        assert rc == 2 and message in one_line_error(err)
    assert file_digest(db) == before and not checkpoint_root(db).exists()


# ------------------------------------------------------------------------------------------
# what a study fixes when it is created


def test_different_design_under_the_same_name(reference: Path, tmp_path: Path) -> None:
    db = tmp_path / "d.sqlite"
    db.write_bytes(reference.read_bytes())
    argv = ["study", *TINY, "--db", str(db)]
    argv[argv.index("--meta-loops") + 1] = "7"
    rc, out, err = run_main(argv, tmp_path)
    assert rc == 2 and "different design (meta_loops: 6 there, 7 here)" in one_line_error(err)
    rc, out, err = run_main(["study", *with_flag(TINY, "--population-size", "12"), "--db", str(db)], tmp_path)
    assert rc == 2 and "planned with --population-size 6" in one_line_error(err)
    assert rows(db) == rows(reference)


def test_chunk_is_the_deprecated_name_of_population_size(reference: Path, tmp_path: Path) -> None:
    """--chunk still works, with a one-line warning: the same plan, the same rows; the stored
    plan keeps its "chunk" key, so databases written before the rename open as they did."""
    warning = "psa: warning: --chunk is deprecated; use --population-size"
    old = ["--chunk" if a == "--population-size" else a for a in TINY]
    db = tmp_path / "alias.sqlite"
    rc, out, err = run_main(["study", *old, "--db", str(db)], tmp_path)
    assert rc == 0 and err.strip() == warning
    assert rows(db) == rows(reference)
    con = sqlite3.connect(db)
    (doc,) = con.execute("SELECT design FROM studies").fetchone()
    con.close()
    assert json.loads(doc)["plan"]["chunk"] == 6
    rc, out, err = run_main(["study", *with_flag(old, "--chunk", "12"), "--db", str(db)], tmp_path)
    assert rc == 2 and err.splitlines()[0] == warning
    assert "planned with --population-size 6" in one_line_error("\n".join(err.splitlines()[1:]))
    rc, out, err = run_main(["study", *TINY, "--chunk", "6", "--db", str(db)], tmp_path)
    assert rc == 2 and "--population-size or its old name --chunk, not both" in one_line_error(err)


def test_precision_is_fixed_when_the_study_is_created(tmp_path: Path) -> None:
    db = tmp_path / "prec.sqlite"
    argv = ["--arch", "1*8", "--trials", "1", "--meta-loops", "1", "--train-subset", "512", "--name", "prec",
            "--db", str(db), "--precision", "bf16"]
    rc, out, err = run_main(["study", *argv], tmp_path)
    assert rc == 0, err
    con = sqlite3.connect(db)
    (doc,) = con.execute("SELECT design FROM studies").fetchone()
    con.close()
    assert json.loads(doc)["plan"]["engine"] == {"precision": "bf16", "rng": driver.rng.VERSION}
    rc, out, err = run_main(["study", *[a for a in argv if a not in ("--precision", "bf16")], "--precision", "fp32"],
                            tmp_path)
    assert rc == 2 and "--precision bf16" in one_line_error(err)
    rc, out, err = run_main(["study", *[a for a in argv if a not in ("--precision", "bf16")]], tmp_path)
    assert rc == 0 and "nothing to do" in err + out


# ------------------------------------------------------------------------------------------
# ways of running it that give the same rows


def test_populations_in_flight_together_write_the_same_rows(reference: Path, tmp_path: Path) -> None:
    """Several populations interleaved on one device (as on a GPU) compute what each would alone."""
    db = tmp_path / "conc.sqlite"
    rc, out, err = run_main(["study", *TINY, "--db", str(db), "--concurrency", "3"], tmp_path)
    assert rc == 0, err
    assert rows(db) == rows(reference)
    assert leftover_checkpoints(db) == []


@pytest.mark.parametrize("every,saves", [("0", 4 * 6), ("3600", 4)])
def test_checkpoint_interval(every: str, saves: int, reference: Path, tmp_path: Path, monkeypatch) -> None:
    """0: a checkpoint after every meta-loop; a long interval: only after each population's first."""
    db = tmp_path / f"every{every}.sqlite"
    real = checkpoints.save_tensors
    calls: list[int] = []

    def save_tensors(path, tensors, meta):
        calls.append(meta["loop"])
        assert meta["rng"] == driver.rng.VERSION and meta["precision"] == "fp32"
        return real(path, tensors, meta)

    with monkeypatch.context() as m:
        m.setattr(checkpoints, "save_tensors", save_tensors)
        rc, out, err = run_main(["study", *TINY, "--db", str(db), "--checkpoint-every", every], tmp_path)
    assert rc == 0, err
    assert len(calls) == saves
    assert rows(db) == rows(reference)


# ------------------------------------------------------------------------------------------
# populations in flight on a GPU: streams and compiled kernels (fakes where a CPU lacks them)


class FakeStream:
    """A stand-in for a CUDA stream: its handle, whether a population holds it, and a log of
    what happened to it."""

    def __init__(self, handle: int, log: list) -> None:
        self.cuda_stream = handle
        self.in_use = False
        self.log = log

    def synchronize(self) -> None:
        self.log.append(("sync", self.cuda_stream))


def test_populations_in_flight_hold_distinct_streams_and_a_failed_one_is_drained(
        reference: Path, tmp_path: Path, monkeypatch) -> None:
    """The streams are made once for the slots; no two populations in flight share one. A
    population that fails has its stream synchronised before its engine is freed and before
    the stream goes to another population (its queued writes would land in freed memory)."""
    import weakref

    from psa.study.backends import local as runner

    log: list = []
    made: list = []
    lent: list = []

    class Slots(runner.StreamSlots):
        def __init__(self, device, slots):
            assert device.type == "cpu"  # here; on a GPU the real class makes CUDA streams
            self.free = [FakeStream(0x100 + i, log) for i in range(slots)]
            self.slots = slots
            made.append(list(self.free))

        def take(self):
            s = super().take()
            assert not s.in_use
            s.in_use = True
            return s

        def give(self, s):
            assert s.in_use
            s.in_use = False
            log.append(("give", s.cuda_stream))
            super().give(s)

    real_run = runner.PopulationRun
    failing = "2x8-t02-02"

    class Run(real_run):
        @classmethod
        def of_plan(cls, kind, pp, data, start, ex, prior_seconds=0.0, where="", stream=None):
            assert stream is not None and stream.in_use
            run = super().of_plan(kind, pp, data, start, ex, prior_seconds, where)  # the CPU engine takes no stream
            lent.append((run.key, stream.cuda_stream))
            weakref.finalize(run.trainer, log.append, ("freed", run.key))
            run.stream = stream
            return run

        def launch(self, on_step=None):
            if self.key == failing and self.population.loop == 2:
                raise RuntimeError("CUDA error: an illegal memory access was encountered (simulated)")
            super().launch(on_step)

    monkeypatch.setattr(runner, "StreamSlots", Slots)
    monkeypatch.setattr(runner, "PopulationRun", Run)
    db = tmp_path / "streams.sqlite"
    rc, out, err = run_main(["study", *TINY, "--db", str(db), "--concurrency", "3"], tmp_path)
    assert rc != 0 and "1 population(s) failed" in err and "illegal memory access" in err
    assert len(made) == 1 and len(made[0]) == 3  # made once, one per slot
    assert len(lent) == 4 and all(not s.in_use for s in made[0])
    key_stream = dict(lent)
    s = key_stream[failing]
    i = log.index(("sync", s))
    assert log[i + 1:i + 3] == [("freed", failing), ("give", s)]
    assert sum(1 for e in log if e[0] == "sync") == 1  # only the failed population waits
    got, ref = rows(db), rows(reference)
    assert [t for t in got["trials"] if t[1:4] != ("2*8", t[2], 2)] == \
           [t for t in ref["trials"] if t[1:4] != ("2*8", t[2], 2)]


def test_kernels_are_compiled_up_front_once_per_population_shape(monkeypatch) -> None:
    """On a CUDA device the study hands kernels.precompile() the launches of every population to
    come, each shape once (trials of one architecture differ only in their seeds). Run here for a
    CUDA device that is not there: the launches are found on the meta device, and the compile
    step is a fake."""
    import dataclasses

    import torch

    from psa.core.kernels import triton_stack as kernels
    from psa.core.arch import parse_arch
    from psa.core.data import Dataset
    from psa.core.device import AUTO_STACK_MAX_WIDTH, Execution
    from psa.core.mlp.engine import kernel_launches
    from psa.study.backends import local
    from psa.study.design import StudyDesign
    from psa.study.kinds import model_kind
    from psa.study.plan import make_plan
    from psa.study.runner import PopulationProgress

    pytest.importorskip("triton")
    d = StudyDesign.from_fields(architectures=("2*8", "1*300", "3*4"), trials=4, meta_loops=2, train_subset=300)
    plan = make_plan(d, 12)  # two populations of 2 trials per architecture
    assert len(plan.populations) == 6
    todo = [PopulationProgress(p, {}, False, 0) for p in plan.populations]

    def split(n):
        return torch.empty(n, 784), torch.empty(n, dtype=torch.int64)

    data = Dataset("mnist", *split(300), *split(1000), *split(1000), source="test")
    got = []
    monkeypatch.setattr(kernels, "precompile", lambda launches, device=None: got.append(list(launches)) or 7)
    cuda = Execution(torch.device("cuda", 0), precision="tf32", triton=True, stack_max_width=AUTO_STACK_MAX_WIDTH,
                     kernels_fall_back=True)
    assert local.precompile_kernels(model_kind(d), todo, cuda, data) == 7
    want = []
    for arch in d.nets:  # 1*300: too wide for the stack kernels, but the dropout kernel
        pp = next(p for p in plan.populations if p.net == arch)
        one = kernel_launches(parse_arch(arch), pp.members(d), data, d.hparams, cuda)
        assert one
        want += one
    assert len(got) == 1 and sorted(map(repr, got[0])) == sorted(map(repr, want))
    cpu = dataclasses.replace(cuda, device=torch.device("cpu"))
    assert local.precompile_kernels(model_kind(d), todo, cpu, data) == 0  # nothing to compile there
