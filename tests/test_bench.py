"""Every script under bench/ runs end to end on a tiny setting (on the CPU) and prints its
table; the GPU benchmarks also write what they promise. No timing is asserted here: speed lives
in the benchmarks' own output. The scripts import psa's modules by name, so a reorganisation
that moves one breaks a script only at run time: these runs are what notices."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import env, run_main, study_db

BENCH = Path(__file__).resolve().parents[1] / "bench"


def smoke(script: str, *args: str, cwd: Path, timeout: float = 300) -> str:
    """bench/SCRIPT ARGS in a fresh process, checked to exit 0; its stdout."""
    p = subprocess.run([sys.executable, str(BENCH / script), *args], env=env(), cwd=cwd, capture_output=True,
                       text=True, timeout=timeout)
    assert p.returncode == 0, p.stderr[-3000:]
    return p.stdout


def run(script: str, *args: str, tmp: Path) -> tuple[dict, str]:
    """bench/SCRIPT ARGS --out JSON, checked to exit 0: the JSON it wrote, its stdout."""
    out = tmp / "out.json"
    stdout = smoke(script, *args, "--out", str(out), cwd=tmp, timeout=600)
    return json.loads(out.read_text()), stdout


@pytest.mark.slow
def test_gpu_study_bench_times_and_extrapolates(tmp_path: Path) -> None:
    doc, out = run("gpu_study.py", "--device", "cpu", "--arch", "1*8", "4*2", "--steps", "2", "--loops", "1",
                   tmp=tmp_path)
    assert "gpu_study on cpu" in out and "est 100 loops" in out
    assert doc["device"].startswith("cpu") and doc["steps_timed"] == 2
    assert {"matmul_fp32_tflops", "copy_gbps"} <= set(doc["peaks"])
    assert [r["arch"] for r in doc["architectures"]] == ["1*8", "4*2"]
    for r in doc["architectures"]:
        assert r["members"] == 60 and r["precision"] == "fp32"
        assert 0 < r["loop_s"] <= r["est_100_loops_s"] and r["tflops"] > 0
        # the script's own float64 operations in the same order, and JSON keeps a float's repr:
        # bit for bit (docs/architecture.md, "Tolerances in the tests")
        assert r["est_100_loops_s"] == r["first_loop_s"] + 99 * r["loop_s"]
    assert doc["estimate_s"] == sum(r["est_100_loops_s"] for r in doc["architectures"])


@pytest.mark.slow
def test_precision_bench_compares_every_mode(tmp_path: Path) -> None:
    doc, out = run("precision.py", "--device", "cpu", "--arch", "1*4", "--precisions", "fp32", "bf16",
                   "--meta-loops", "1", "--train-subset", "512", tmp=tmp_path)
    assert "peak validation accuracy, 10 trials per cell, 1 meta-loops, first 512 training images" in out
    assert doc["train_subset"] == 512 and all(r["train_subset"] == 512 for r in doc["runs"].values())
    assert set(doc["runs"]) == {"1*4|fp32", "1*4|bf16"}
    rows = doc["comparison"]
    assert [r["mode"] for r in rows] == ["none", "decay", "dropout", "full", "hidden", "output"]
    for r in rows:
        assert r["precision"] == "bf16"
        for test in ("p_sign_flip", "p_mann_whitney", "p_ks"):
            assert 0.0 <= r[test] <= r[test + "_holm"] <= 1.0


# ------------------------------------------------------------------------------------------
# the CPU benchmarks: each on one tiny net, one or two steps


@pytest.mark.slow
def test_profile_cpu_runs_small(tmp_path: Path) -> None:
    out = smoke("profile_cpu.py", "--arch", "1*2", "--steps", "1", "--threads", "1", "--trials", "1",
                "--meta-loops", "1", "--train-subset", "256", cwd=tmp_path)
    assert "| phase | 1*2 torch | 1*2 auto |" in out
    assert "| fused step |" in out and "| AdamW |" in out
    assert "tiny study (4*2, 6 trials, 1 meta-loops on 256 images" in out
    assert "| study wall | store writes | checkpoint copies | checkpoint writes (background) |" in out


@pytest.mark.slow
def test_checkpoint_writer_runs_small(tmp_path: Path) -> None:
    out = smoke("checkpoint_writer.py", "--arch", "1*2", "--members", "2", "--repeat", "1", "--dir", str(tmp_path),
                cwd=tmp_path)
    assert "one checkpoint of a 2-member population" in out
    assert "| population | MB | bytes then file | save_file | scheduler's share | in background | scheduler pace |" in out
    assert "| 1*2 | 0.0 |" in out
    assert not list(tmp_path.glob("tmp*"))  # its temporary folder is gone


@pytest.mark.slow
def test_narrow_cpu_runs_small(tmp_path: Path) -> None:
    out = smoke("narrow_cpu.py", "--arch", "1*2", "--steps", "1", "--repeat", "1", "--gemm-size", "256",
                cwd=tmp_path)
    assert "(256^3 sgemm, best of 3)" in out
    assert "| arch | params | GEMM GFLOP/s | FLOP floor s | torch s | step s |" in out
    assert "| 1*2 | 1,600 |" in out


@pytest.mark.slow
def test_population_cpu_runs_small(tmp_path: Path) -> None:
    # every method, each in its own process as the script runs them
    out = smoke("population_cpu.py", "--arch", "1*2", "--steps", "1", "--sampled", "1", "--json",
                str(tmp_path / "rows.json"), cwd=tmp_path)
    assert "One meta-loop of 60 members on this CPU" in out and "peer / engine" in out
    rows = json.loads((tmp_path / "rows.json").read_text())["rows"]
    assert [r["method"] for r in rows] == ["engine", "one-by-one", "one-by-one-fused", "vmap"]
    # no sign is asserted: one step, extrapolated from the difference of two prefixes, is noise
    assert all(r["steps"] == 1 and r["arch"] == "1*2" for r in rows)


# ------------------------------------------------------------------------------------------
# the scripts that run psa itself


@pytest.mark.slow
def test_estimate_runs_small(tmp_path: Path) -> None:
    out = smoke("estimate.py", "--arch", "1*2", "--trials", "1", "--meta-loops", "1", "--train-subset", "256",
                "--out", str(tmp_path / "est"), cwd=tmp_path)
    assert out.splitlines()[0].split()[:6] == ["arch", "members", "estimate", "s", "+-", "measured"]
    (row,) = json.loads((tmp_path / "est.json").read_text())["rows"]
    assert row["arch"] == "1*2" and row["members"] == 6 and row["estimate_s"] > 0 and row["measured_s"] > 0
    assert "| arch | members | estimate (s) |" in (tmp_path / "est.md").read_text()


@pytest.mark.slow
def test_generic_cnn_runs_small(tmp_path: Path) -> None:
    out = smoke("generic_cnn.py", "--sets", "mnist", "--trials", "2", "--loops", "1", "--train-subset", "256",
                "--val-subset", "256", "--speed-train", "256", "--speed-loops", "1", "--speed-repeats", "1",
                "--speed-models", "small_cnn", "mlp", cwd=tmp_path)
    assert "records identical" in out
    assert "mode     bounty mean" in out
    assert [ln.split()[0] for ln in out.splitlines()[-3:]] == ["none", "hidden", "output"]


def test_zoo_runs_runs_small(tmp_path: Path) -> None:
    out_file = tmp_path / "zoo.md"
    out = smoke("zoo_runs.py", "--family", "mlp", "gru", "--trials", "1", "--meta-loops", "1", "--train", "128",
                "--out", str(out_file), cwd=tmp_path)
    assert "| family | path | unit layers | none (bounty %) |" in out
    rows = {ln.split("|")[1].strip(): ln for ln in out.splitlines() if ln.startswith("| mlp") or ln.startswith("| gru")}
    assert "vmap" in rows["mlp"] and "one at a time" in rows["gru"]
    assert "hidden" in rows["gru"].split("|")[6]  # a GRU with a Linear head has no hidden unit layer: not run
    assert out_file.read_text() in out


@pytest.mark.slow
def test_long_runs_runs_small(tmp_path: Path) -> None:
    # eight loops: the kill, at loop 4 or later, must land while the study still has loops to run
    out = smoke("long_runs.py", "--loops", "8", "--marks", "4", "8", "--train-loops", "1", "--out",
                str(tmp_path / "long.json"), cwd=tmp_path)
    assert "| loops | meta_loops rows | database bytes |" in out
    assert "rows identical to the uninterrupted run: True" in out
    assert "| psa train 1*2, batch 50000 | meta-loops |" in out
    doc = json.loads((tmp_path / "long.json").read_text())
    assert doc["study"]["resume"]["rows_identical"] and doc["train"][0]["records"] == 1


def in_git_checkout() -> bool:
    """Whether bench/ sits in a git checkout (same_results.py exports a revision from it)."""
    return subprocess.run(["git", "-C", str(BENCH), "rev-parse", "HEAD"], capture_output=True).returncode == 0


@pytest.mark.slow
@pytest.mark.skipif(not in_git_checkout(), reason="same_results.py compares against a git revision")
def test_same_results_runs_small(tmp_path: Path) -> None:
    # HEAD against the working tree: the same code in a clean checkout. Only the study of psa's
    # nets: the module study and psa train, even at their smallest, would add about a minute and
    # a half on a 2-core CPU. An uncommitted change to what psa computes fails here, as the
    # script means it to.
    out = smoke("same_results.py", "--before", "HEAD", "--parts", "study", "--trials", "1", "--meta-loops", "1",
                "--train-subset", "256", cwd=tmp_path)
    assert "same (HEAD vs working tree)" in out
    assert [ln.split()[-1] for ln in out.splitlines()[1:]] == ["yes", "yes", "yes"]


def test_paper_study_checks_its_slices(tmp_path: Path) -> None:
    # the committed cut still the one the script makes; its runs, collect, merge and Ray check on
    # the CPU, and the device script, are tests/test_paper_study.py's
    out = smoke("paper_study.py", "slices", "--check", cwd=tmp_path)
    assert "the same slices" in out
    p = subprocess.run([sys.executable, str(BENCH / "paper_study.py"), "run", "--budget", "1"], env=env(),
                       cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "--out" in p.stderr.splitlines()[-1]


def test_same_results_help(tmp_path: Path) -> None:
    out = smoke("same_results.py", "--help", cwd=tmp_path)
    assert "--before" in out and "--parts" in out


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_kernel_registers_compiles_for_sm90_without_a_card(tmp_path: Path) -> None:
    """The stack kernels of one narrow and one wide net compiled for sm_90 by the Triton here,
    ptxas's registers, spills and shared memory for each, as a table and as JSON."""
    e = {k: v for k, v in env().items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "regs.json"
    p = subprocess.run([sys.executable, str(BENCH / "kernel_registers.py"), "--arch", "3*8", "2*40",
                        "--precision", "tf32", "--members", "6", "--json", str(out)], env=e, cwd=tmp_path,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode in (0, 1), p.stderr[-3000:]
    assert "regs  spill shared KB" in p.stdout and "launches compiled" in p.stdout
    rows = json.loads(out.read_text())["rows"]
    assert {(r["width"], r["kernel"]) for r in rows} == {(w, k) for w in (8, 40)
                                                         for k in ("stack_fwd train", "stack_fwd eval", "stack_bwd")}
    assert all(r["registers"] > 0 and r["shared_bytes"] >= 0 for r in rows)
    # a spill or too much shared memory is the exit status
    assert p.returncode == int(any(r["spill_bytes"] or r["shared_bytes"] > 227 * 1024 for r in rows))
    # width 40 multiplies on the tensor cores in tf32, width 8 on the FMA units
    products = {r["width"]: r["mma"] for r in rows if r["kernel"] == "stack_bwd"}
    assert products[8] == "fma" and products[40] in ("mma", "wgmma")
    e["TRITON_INTERPRET"] = "1"
    p = subprocess.run([sys.executable, str(BENCH / "kernel_registers.py")], env=e, capture_output=True, text=True)
    assert p.returncode == 2 and "unset TRITON_INTERPRET" in p.stderr


def test_kernel_registers_compiles_a_sweeps_candidates(tmp_path: Path) -> None:
    """--sweep compiles bench/stack_sweep.py's candidate settings of the wide kernels, one
    direction at a time, instead of the table's: here its --quick pair per direction."""
    sys.path.insert(0, str(BENCH))
    try:
        from stack_sweep import candidates
    finally:
        sys.path.remove(str(BENCH))
    e = {k: v for k, v in env().items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "regs.json"
    p = subprocess.run([sys.executable, str(BENCH / "kernel_registers.py"), "--sweep", "--quick", "--arch", "2*40",
                        "--precision", "tf32", "--members", "6", "--json", str(out)], env=e, cwd=tmp_path,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]  # a spilling candidate is data, not a failure
    assert "candidate settings compiled" in p.stdout
    rows = json.loads(out.read_text())["rows"]
    got = sorted((r["kernel"], r["rows"], r["warps"], r["stages"]) for r in rows)
    want = sorted((k, r, w, s) for k, back in (("stack_fwd train", False), ("stack_bwd", True))
                  for r, w, s in candidates(64, "tf32", back, quick=True))
    assert got == want
    # the staged weights: 16-byte copies into shared memory
    assert all(16 in r["async_copy_bytes"] for r in rows)


def test_stack_sweep_times_each_setting_against_the_tables(tmp_path: Path) -> None:
    """The sweep in Triton's interpreter, tiny, a wide and a narrow stack: the table's setting
    first in each direction, every setting timed with its output beside the table's, the
    step's totals; and its usage errors, one line each."""
    doc, out = run("stack_sweep.py", "--device", "cpu", "--arch", "3*40", "6*1", "--members", "2", "--rows", "16",
                   "--reps", "1", "--quick", tmp=tmp_path)
    wide, narrow = doc["cases"]
    assert (wide["arch"], wide["precision"], wide["padded"], wide["layers"]) == ("3*40", "tf32", 64, 3)
    assert (narrow["arch"], narrow["padded"], narrow["layers"], narrow["stage_ms"]) == ("6*1", 1, 6, 0.0)
    for case in (wide, narrow):
        for d in ("forward", "backward"):
            rows = case[d]
            assert rows[0]["table"] and not any(r["table"] for r in rows[1:]) and len(rows) >= 2
            assert (rows[0]["rows"], rows[0]["warps"], rows[0]["stages"]) == tuple(case["table"][d].values())
            assert all(r["ms"] > 0 and r["max_abs_diff"] < 1e-5 for r in rows)
        assert case["step_ms_best"] <= case["step_ms_table"]
        assert case["loops_s_best"] == pytest.approx(case["step_ms_best"] * 196 * 100 / 1e3)
    # the wide pair differs in pipeline depth only: the same rows, the same sums
    assert all(r["max_abs_diff"] == 0.0 for d in ("forward", "backward") for r in wide[d]) and wide["stage_ms"] > 0
    assert "(table)" in out and "over 100 meta-loops" in out
    for args, says in ((["--arch", "3*20"], "no candidate settings"), (["--arch", "1*40"], "two or more hidden"),
                       (["--arch", "x"], "--arch x"), (["--reps", "0"], "at least 1")):
        p = subprocess.run([sys.executable, str(BENCH / "stack_sweep.py"), "--device", "cpu", *args], env=env(),
                           capture_output=True, text=True, timeout=120)
        assert p.returncode == 2 and p.stderr.count("\n") == 1 and says in p.stderr, p.stderr
    e = {k: v for k, v in env().items() if k != "TRITON_INTERPRET"}
    p = subprocess.run([sys.executable, str(BENCH / "stack_sweep.py"), "--device", "cpu"], env=e,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and ("TRITON_INTERPRET" in p.stderr or "needs Triton" in p.stderr), p.stderr


@pytest.mark.skipif(importlib.util.find_spec("torch_pruning") is None,
                    reason="torch_pruning is not importable (PYTHONPATH=/tmp/tp: see bench/depgraph_compare.py)")
def test_depgraph_compare_runs_small(tmp_path: Path) -> None:
    out = smoke("depgraph_compare.py", "--only", "mlp", "cnn", cwd=tmp_path)
    assert "| model | input | psa unit layers |" in out
    assert "| model | layer | type | units psa / DG |" in out
    assert "| mlp | rows |" in out and "| cnn | images |" in out


# ------------------------------------------------------------------------------------------
# the tables read from a study database: tiny real studies, written by this checkout

STUDY = ["--trials", "2", "--meta-loops", "2", "--train-subset", "256", "--quiet"]


@pytest.fixture(scope="module")
def modes_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One database: a SimpleMLP study of 1*2 and a ResMLP study of 2*2 named as
    examples/resmlp-deep.toml names its studies, every mode, two trials."""
    db = study_db(tmp_path_factory, "bench-modes", ["--arch", "1*2", "--name", "plain", *STUDY])
    rc, _, err = run_main(["study", "--arch", "2*2", "--model", "resmlp", "--name", "resmlp-deep-smoke", *STUDY,
                           "--db", str(db)], db.parent)
    assert rc == 0, err
    return db


@pytest.fixture(scope="module")
def variants_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A study of 1*2 with one engine variant beside the paper's engine, every mode, two trials."""
    return study_db(tmp_path_factory, "bench-variants",
                    ["--arch", "1*2", "--name", "var", "--variant", "p1 patience=1", *STUDY])


def test_dataset_modes_reads_a_study(modes_db: Path, tmp_path: Path) -> None:
    out = smoke("dataset_modes.py", "--db", str(modes_db), "--arch", "1*2", "--out", str(tmp_path / "t.md"),
                cwd=tmp_path)
    assert "1*2 on mnist[train:256]: bounty (peak validation accuracy, %) after meta-loop 2 of 2, 2 trials" in out
    assert "| mode | mnist[train:256] (n=2) | minus none: mean [min, max] |" in out
    assert [ln.split("|")[1].strip() for ln in out.splitlines() if ln.startswith("| ") and "±" in ln] == \
        ["none", "decay", "dropout", "full", "hidden", "output"]
    assert (tmp_path / "t.md").read_text() == out


def test_resmlp_deep_reads_a_study(modes_db: Path, tmp_path: Path) -> None:
    out = smoke("resmlp_deep.py", str(modes_db), cwd=tmp_path)
    assert out.startswith("| arch | mode | ResMLP bounty (loops) | n |")
    rows = [ln for ln in out.splitlines()[2:] if ln.startswith("| ")]
    assert len(rows) == 6 and all(r.startswith("| 2*2 |") and "(2) | 2 |" in r for r in rows)


def test_variants_table_reads_a_study(variants_db: Path, tmp_path: Path) -> None:
    out = smoke("variants_table.py", "--db", str(variants_db), cwd=tmp_path)
    assert "**1*2**, bounty after meta-loop 2 of 2 (24/24 trials finished)" in out
    assert "| Condition | Trials | Bounty (mean ± std) | Reference |" in out
    assert "| hidden+p1 | 2 |" in out
