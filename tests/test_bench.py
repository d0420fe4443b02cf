"""The GPU benchmarks run end to end (on the CPU, tiny settings) and write what they promise.
No timing is asserted here: speed lives in the benchmarks' own output."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from .conftest import env

BENCH = Path(__file__).resolve().parents[1] / "bench"


def run(script: str, *args: str, tmp: Path) -> dict:
    out = tmp / "out.json"
    p = subprocess.run([sys.executable, str(BENCH / script), *args, "--out", str(out)], env=env(), cwd=tmp,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(out.read_text())


def test_gpu_study_bench_times_and_extrapolates(tmp_path: Path) -> None:
    doc = run("gpu_study.py", "--device", "cpu", "--arch", "1*8", "4*2", "--steps", "2", "--loops", "1",
              tmp=tmp_path)
    assert doc["device"].startswith("cpu") and doc["steps_timed"] == 2
    assert {"matmul_fp32_tflops", "copy_gbps"} <= set(doc["peaks"])
    assert [r["arch"] for r in doc["architectures"]] == ["1*8", "4*2"]
    for r in doc["architectures"]:
        assert r["members"] == 60 and r["precision"] == "fp32"
        assert 0 < r["loop_s"] <= r["est_100_loops_s"] and r["tflops"] > 0
        assert abs(r["est_100_loops_s"] - (r["first_loop_s"] + 99 * r["loop_s"])) < 1e-6
    assert abs(doc["estimate_s"] - sum(r["est_100_loops_s"] for r in doc["architectures"])) < 1e-6


def test_precision_bench_compares_every_mode(tmp_path: Path) -> None:
    doc = run("precision.py", "--device", "cpu", "--arch", "1*4", "--precisions", "fp32", "bf16",
              "--meta-loops", "1", tmp=tmp_path)
    assert set(doc["runs"]) == {"1*4|fp32", "1*4|bf16"}
    rows = doc["comparison"]
    assert [r["mode"] for r in rows] == ["none", "decay", "dropout", "full", "hidden", "output"]
    for r in rows:
        assert r["precision"] == "bf16"
        for test in ("p_sign_flip", "p_mann_whitney", "p_ks"):
            assert 0.0 <= r[test] <= r[test + "_holm"] <= 1.0
