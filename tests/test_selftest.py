"""`psa selftest --quick` on the CPU: every check passes or says why it skipped, the JSON holds the
rows, a planted mismatch fails its check and the command, a failing fast path is a SKIP."""

from __future__ import annotations

import json

import pytest
import torch

from psa.core.kernels import triton_stack as kernels
from psa.core.mlp.engine import Engine

from .conftest import one_line_error, run_main


def selftest(tmp_path, *extra: str) -> tuple[int, dict, str, str]:
    path = tmp_path / "selftest.json"
    rc, out, err = run_main(["selftest", "--quick", "--device", "cpu", "--json", str(path), *extra])
    return rc, json.loads(path.read_text()), out, err


def by_name(report: dict) -> dict[str, dict]:
    return {c["name"]: c for c in report["checks"]}


def test_quick_selftest_passes_on_the_cpu(tmp_path):
    rc, report, out, err = selftest(tmp_path, "--seed", "3")
    assert rc == 0, out + err
    assert report["seed"] == 3 and report["ok"] and "seed 3" in err
    checks = by_name(report)
    for c in checks.values():
        assert c["status"] in ("PASS", "SKIP"), c
        if c["status"] == "SKIP":
            assert c["detail"] and c["measure"] is None, c
        else:
            assert c["measure"] <= c["limit"], c
    assert checks["CUDA graph vs eager step"]["status"] == "SKIP"
    assert "CUDA device" in checks["CUDA graph vs eager step"]["detail"]
    assert checks["engine vs one-model reference"]["status"] == "PASS"
    assert checks["matmul bf16 vs float64"]["status"] == "PASS"
    if kernels.available():  # Triton installed: interpreted here, as conftest sets TRITON_INTERPRET
        assert all(checks[f"stack kernels {p} {d}"]["status"] == "PASS"
                   for p in ("fp32", "tf32", "bf16") for d in ("forward", "backward"))
        assert checks["dropout noise kernel"]["status"] == "PASS"
        assert "triton stack" in checks["engine vs one-model reference"]["detail"]
    (t,) = report["timings"]
    assert t["arch"] == "32*32" and t["loop_ms"] > 0 and t["tflops"] > 0 and t["peak_tflops"] > 0
    assert "stack kernels fp32 forward" in out and "32*32" in out and "PASS" in out


def test_a_planted_engine_mismatch_fails_the_engine_check(tmp_path, monkeypatch):
    real = Engine.meta_loop

    def off(self, *a, **k):
        res = real(self, *a, **k)
        self.population.lkg.add_(1e-4)  # a bug that moves every weight a little
        return res

    monkeypatch.setattr(Engine, "meta_loop", off)
    rc, report, out, _ = selftest(tmp_path)
    assert rc == 1
    assert not report["ok"]
    eng = by_name(report)["engine vs one-model reference"]
    assert eng["status"] == "FAIL" and eng["measure"] > eng["limit"]
    assert "FAIL" in out and "engine vs one-model reference" in out.split("FAIL")[-1]
    assert by_name(report)["matmul tf32 vs float64"]["status"] == "PASS"  # the others are untouched


def test_a_planted_kernel_mismatch_fails_the_kernel_check(tmp_path, monkeypatch):
    pytest.importorskip("triton")
    if not kernels.available():
        pytest.skip("no GPU and TRITON_INTERPRET is not 1")
    real = kernels.stack_forward

    def off(*a, **k):
        last = real(*a, **k)
        if k.get("acts") is not None:
            k["acts"][0].mul_(1.5)  # the first layer's activations wrong by half their size
        return last

    monkeypatch.setattr(kernels, "stack_forward", off)
    rc, report, _, _ = selftest(tmp_path)
    assert rc == 1
    checks = by_name(report)
    assert all(checks[f"stack kernels {p} forward"]["status"] == "FAIL" for p in ("fp32", "tf32", "bf16"))
    assert checks["stack kernels fp32 backward"]["status"] == "PASS"  # judged on the kernel's own activations


def test_a_failing_kernel_is_a_fallback_not_a_crash(tmp_path, monkeypatch):
    pytest.importorskip("triton")
    if not kernels.available():
        pytest.skip("no GPU and TRITON_INTERPRET is not 1")

    def broken(*a, **k):
        raise RuntimeError("PTX compilation failed (simulated)")

    monkeypatch.setattr(kernels, "stack_forward", broken)
    rc, report, _, err = selftest(tmp_path)
    assert rc == 0
    checks = by_name(report)
    fwd = checks["stack kernels fp32 forward"]
    assert fwd["status"] == "SKIP" and "FALLBACK" in fwd["detail"] and "simulated" in fwd["detail"]
    # the engine warned, dropped the kernels and still matched the reference on the torch path
    eng = checks["engine vs one-model reference"]
    assert eng["status"] == "PASS" and "FALLBACK" in eng["detail"] and "fp32+torch" in eng["detail"]
    assert "FALLBACK" in err


def test_without_triton_the_kernel_checks_skip_with_the_reason(tmp_path, monkeypatch):
    monkeypatch.setattr(kernels, "available", lambda: False)
    rc, report, _, _ = selftest(tmp_path)
    assert rc == 0
    checks = by_name(report)
    for p in ("fp32", "tf32", "bf16"):
        c = checks[f"stack kernels {p} forward"]
        assert c["status"] == "SKIP" and "torch path" in c["detail"]
    assert checks["dropout noise kernel"]["status"] == "SKIP"
    assert checks["engine vs one-model reference"]["status"] == "PASS"


def test_reference_loop_differs_from_an_untrained_member():
    """The reference trains: its weights after a loop are not the initial ones (else the engine
    check could pass on an engine that never steps)."""
    from psa.core.arch import parse_arch
    from psa.core.model import SimpleMLP
    from psa.core.mlp.selftest import CHECK_HP, reference_loop, synthetic_data

    arch = parse_arch("[3*4]")
    data = synthetic_data(64, 20, 0, torch.device("cpu"))
    state, correct = reference_loop(arch, data, CHECK_HP.member("none", 1), CHECK_HP)
    torch.manual_seed(1)
    init = SimpleMLP(arch).state_dict()
    assert 0 <= correct <= 20
    assert max((state[k] - init[k]).abs().max().item() for k in state) > 1e-5


def test_bad_seed_is_a_usage_error():
    rc, _, err = run_main(["selftest", "--seed", "-1"])
    assert rc == 2
    assert "seed" in one_line_error(err)


def test_a_json_path_that_cannot_be_written_is_refused_before_the_checks(tmp_path, monkeypatch):
    """One line and exit 2, before any check runs, and nothing written."""
    from psa.core.mlp import selftest

    ran = []
    monkeypatch.setattr(selftest, "run", lambda *a, **k: ran.append(1))
    target = tmp_path / "missing" / "out.json"
    rc, out, err = run_main(["selftest", "--quick", "--device", "cpu", "--json", str(target)], tmp_path)
    assert rc == 2 and ran == []
    assert one_line_error(err).startswith("psa: error: --json") and "not a writable directory" in err
    assert not target.parent.exists()
    (tmp_path / "adir").mkdir()  # a directory: refused before the checks too, not after them
    rc, out, err = run_main(["selftest", "--quick", "--device", "cpu", "--json", "adir"], tmp_path)
    assert rc == 2 and ran == [] and "is a directory" in one_line_error(err)
