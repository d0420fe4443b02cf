"""`psa train` and `psa arch` as a user meets them: results, determinism, resume, bad input."""

from __future__ import annotations

import json

import pytest
import torch

from psa.core.model import SimpleMLP
from psa.core.arch import parse_arch
from safetensors.torch import load_file

from .conftest import damage_tensors, run_main, run_psa


def run_json(argv):
    rc, out, err = run_main([*argv, "--json"])
    assert rc == 0, err
    return json.loads(out)


def strip(summary):
    return {k: v for k, v in summary.items() if k not in ("run_dir", "timing")}


@pytest.mark.slow
def test_real_mnist_1x32_three_loops_passes_85(tmp_path, mnist):
    s = run_json(["train", "--arch", "[1*32]", "--meta-loops", "3", "--out", str(tmp_path / "r")])
    assert s["loop"] == 3 and len(s["records"]) == 3
    assert s["bounty"] > 85.0
    assert s["records"][0]["promoted"] and s["records"][0]["ablated"] is None
    # the exported LKG is a plain SimpleMLP state_dict: load it and recompute the test accuracy
    model = SimpleMLP(parse_arch("[1*32]"))
    model.load_state_dict(load_file(str(tmp_path / "r" / "lkg.safetensors")))
    model.eval()
    with torch.no_grad():
        acc = 100.0 * int((model(mnist.test_x).argmax(1) == mnist.test_y).sum()) / mnist.test_y.numel()
    assert acc == pytest.approx(s["test_acc"], abs=1e-9)
    assert json.loads((tmp_path / "r" / "run.json").read_text())["bounty"] == s["bounty"]


def test_same_command_twice_gives_identical_json(tmp_path):
    argv = ["train", "--arch", "[1*8]", "--mode", "full", "--meta-loops", "2", "--seed", "3", "--batch-size", "512"]
    a = run_json([*argv, "--out", str(tmp_path / "a")])
    b = run_json([*argv, "--out", str(tmp_path / "b")])
    assert strip(a) == strip(b)
    wa, wb = load_file(str(tmp_path / "a" / "lkg.safetensors")), load_file(str(tmp_path / "b" / "lkg.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_a_database_under_a_file_says_so(tmp_path):
    (tmp_path / "afile").write_text("x")
    rc, _, err = run_main(["study", "--arch", "1*8", "--trials", "1", "--meta-loops", "1", "--train-subset", "256",
                           "--db", str(tmp_path / "afile" / "x.sqlite"), "--quiet"], tmp_path)
    assert rc == 2 and err.strip().endswith("afile is a file, not a directory"), err  # it said "File exists"


def test_resume_in_another_mode_continues_the_run(tmp_path):
    out = str(tmp_path / "r")
    common = ["--batch-size", "512", "--seed", "1"]
    run_json(["train", "--arch", "[1*8]", "--mode", "dropout", "--meta-loops", "2", "--out", out, *common])
    s = run_json(["train", "--resume", out, "--mode", "hidden", "--meta-loops", "2", "--batch-size", "512"])
    assert s["loop"] == 4 and [r["mode"] for r in s["records"]] == ["dropout", "dropout", "hidden", "hidden"]
    assert s["mode_history"] == [["dropout", 1], ["hidden", 3]]
    assert s["records"][2]["ablated"] is not None  # loop 3 is not loop 1: hidden mode ablates
    # an uninterrupted four-loop run with the same switch gives the same records
    straight = str(tmp_path / "s")
    run_json(["train", "--arch", "[1*8]", "--mode", "dropout", "--meta-loops", "2", "--out", straight, *common])
    s2 = run_json(["train", "--resume", straight, "--mode", "hidden", "--meta-loops", "2"])
    assert strip(s)["records"] == strip(s2)["records"]
    # a finished run refuses to resume without more loops
    rc, _, err = run_main(["train", "--resume", out])
    assert rc == 2
    assert "already completed" in err


BAD_ARGS = [
    ["arch", "[0*5]"],
    ["arch", "[2*]"],
    ["arch", "[-1*3]"],
    ["arch", "[1*10**9]"],
    ["arch", "[1*128"],
    ["arch", "[abc]"],
    ["train", "--arch", "[0*5]"],
    ["train", "--arch", "[1*8]", "--mode", "bogus"],
    ["train", "--arch", "[1*8]", "--meta-loops", "0"],
    ["train", "--arch", "[1*8]", "--meta-loops", "-3"],
    ["train", "--arch", "[1*8]", "--batch-size", "0"],
    ["train", "--arch", "[1*8]", "--batch-size", "1000000000000"],  # refused before runs/ is made
    ["train", "--arch", "[1*8]", "--lr", "-1"],
    ["train", "--arch", "[1*8]", "--lr", "fast"],
    ["train", "--arch", "[1*8]", "--dropout", "1.5"],
    ["train", "--arch", "[]", "--mode", "hidden"],
    ["train", "--arch", "[1*8]", "--device", "cuda:7"],
    ["train", "--arch", "[1*8]", "--device", "warp-drive"],
    ["train", "--arch", "[1*8]", "--seed", str(2**64)],  # was torch.manual_seed's overflow, as a traceback
    ["train", "--arch", "[1*8]", "--out", ""],  # was taken for the current directory
    ["study", "--arch", "[1*8]", "--seed", str(2**63 - 1), "--trials", "2", "--dry-run"],
    ["study", "--arch", "1*8", "--modes", "hidden", "--variant", "p5 patience=5", "--variant", "p5 patience=3",
     "--dry-run"],  # the first was dropped silently
    ["study", "--arch", "1*8", "--variant", "", "--dry-run"],
    ["train"],
    ["train", "--bogus-flag"],
]


@pytest.mark.parametrize("argv", BAD_ARGS, ids=[" ".join(a) for a in BAD_ARGS])
def test_bad_input_is_one_line_exit_2(argv, tmp_path):
    rc, _, err = run_main(argv, tmp_path)
    assert rc == 2
    err = err.strip()
    assert len(err.splitlines()) == 1 and "error" in err and "Traceback" not in err
    assert not (tmp_path / "runs").exists()


def test_bad_paths_and_files(tmp_path):
    nonempty = tmp_path / "full"
    nonempty.mkdir()
    (nonempty / "x").write_text("keep me")
    afile = tmp_path / "afile"
    afile.write_text("")
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "lkg.safetensors").write_bytes(b"\x00" * 64)
    cases = [
        (["--arch", "[1*8]", "--out", str(nonempty)], "not an empty directory"),
        (["--arch", "[1*8]", "--out", str(afile / "run")], "not a directory"),
        (["--arch", "[1*8]", "--data-dir", str(tmp_path / "nowhere")], "does not exist"),
        (["--arch", "[1*8]", "--data-dir", str(afile)], "is a file, not a directory"),
        (["--arch", "[1*8]", "--data-dir", str(tmp_path)], "lacks"),
        (["--resume", str(tmp_path / "nothing-here")], "no checkpoint"),
        (["--resume", str(corrupt)], "not a readable safetensors"),
    ]
    for argv, message in cases:
        rc, _, err = run_main(["train", *argv])
        assert rc == 2, argv
        err = err.strip()
        assert len(err.splitlines()) == 1 and message in err, err
    assert [p.name for p in nonempty.iterdir()] == ["x"]


def test_resume_of_a_damaged_checkpoint_is_refused(tmp_path):
    """Flipped bytes in the LKG's tensors, the header intact: refused, not trained on."""
    out = tmp_path / "r"
    run_json(["train", "--arch", "[1*8]", "--meta-loops", "1", "--batch-size", "1024", "--out", str(out)])
    ckpt = out / "lkg.safetensors"
    damaged = damage_tensors(ckpt)
    rc, _, err = run_main(["train", "--resume", str(out), "--meta-loops", "1"])
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert "damaged: its tensors do not match the checksum written with them" in err
    assert ckpt.read_bytes() == damaged


def test_resume_keeps_the_runs_hyperparameters_and_precision(tmp_path):
    """run.json holds one set of hyperparameters for the whole run: another value on resume is
    refused (it was taken, and the run's history rewritten); the same value is fine."""
    out = str(tmp_path / "r")
    run_json(["train", "--arch", "[1*8]", "--meta-loops", "1", "--batch-size", "1024", "--out", out])
    before = (tmp_path / "r" / "run.json").read_text()
    for flags, message in ((["--lr", "0.01"], "trains with lr 0.0001, not 0.01"),
                           (["--batch-size", "32"], "trains with batch_size 1024, not 32"),
                           (["--dropout", "0.5"], "trains with dropout 0.1, not 0.5"),
                           (["--precision", "bf16"], "computes in fp32, not bf16")):
        rc, _, err = run_main(["train", "--resume", out, "--meta-loops", "1", *flags])
        assert rc == 2 and len(err.strip().splitlines()) == 1 and message in err, (flags, err)
    assert (tmp_path / "r" / "run.json").read_text() == before
    s = run_json(["train", "--resume", out, "--meta-loops", "1", "--batch-size", "1024", "--precision", "fp32"])
    assert s["loop"] == 2 and s["hyperparameters"]["batch_size"] == 1024


def test_resume_with_another_architecture_is_refused(tmp_path):
    out = str(tmp_path / "r")
    run_json(["train", "--arch", "[1*8]", "--meta-loops", "1", "--batch-size", "1024", "--out", out])
    before = (tmp_path / "r" / "lkg.safetensors").read_bytes()
    rc, _, err = run_main(["train", "--resume", out, "--arch", "[1*16]", "--meta-loops", "1"])
    assert rc == 2
    assert "architecture" in err
    assert (tmp_path / "r" / "lkg.safetensors").read_bytes() == before


def test_subprocess_bad_arch_has_no_traceback(tmp_path):
    p = run_psa("train", "--arch", "[2*]", cwd=tmp_path)
    assert p.returncode == 2
    assert p.stderr.strip().startswith("psa: error:") and "Traceback" not in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1


def test_a_reader_that_goes_away_gets_no_traceback(tmp_path):
    """`psa arch --json | head -1`: the closed pipe ends psa quietly (exit 1), no BrokenPipeError."""
    import subprocess

    from .conftest import env, psa_cmd

    p = subprocess.Popen(psa_cmd("arch", "[1*8]", "--json"), cwd=tmp_path, env=env(),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.close()  # the reader is gone before psa writes a byte
    err = p.stderr.read().decode()
    p.stderr.close()
    assert p.wait() == 1 and err == ""


def test_arch_command():
    rc, text, _ = run_main(["arch", "[1*2048]", "--json", "--match", "2"])
    assert rc == 0
    out = json.loads(text)
    assert out["params"] == 1_628_170 and out["matched"][0]["arch"] == "[2*939]"
    rc, text, _ = run_main(["arch", "[2*128, 4*64]"])
    assert rc == 0
    assert "hidden 6" in text and f"{parse_arch('[2*128, 4*64]').params:,}" in text


def test_ctrl_c_in_the_first_loop_leaves_out_reusable(tmp_path, monkeypatch):
    """Ctrl-C before the first loop's checkpoint leaves --out empty: the same command runs again
    (not "--out exists and is not an empty directory" over a run with nothing to resume)."""
    from psa.study import train as train_mod

    argv = ["train", "--arch", "[1*8]", "--meta-loops", "1", "--batch-size", "1024", "--out", str(tmp_path / "r")]

    def interrupted(self):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(train_mod.PopulationRun, "collect", interrupted)
        rc, _, err = run_main(argv)
    assert rc == 130 and err.strip().endswith("psa: interrupted")
    assert list((tmp_path / "r").iterdir()) == []
    assert run_json(argv)["loop"] == 1


def test_resume_with_out_elsewhere_is_refused(tmp_path):
    """--resume continues in the run's own directory: an --out elsewhere is refused, not ignored."""
    out = str(tmp_path / "r")
    run_json(["train", "--arch", "[1*8]", "--meta-loops", "1", "--batch-size", "1024", "--out", out])
    before = (tmp_path / "r" / "lkg.safetensors").read_bytes()
    rc, _, err = run_main(["train", "--resume", out, "--out", str(tmp_path / "fork"), "--meta-loops", "1"])
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "continues in its own directory" in err
    assert (tmp_path / "r" / "lkg.safetensors").read_bytes() == before and not (tmp_path / "fork").exists()
    assert run_json(["train", "--resume", out, "--out", out, "--meta-loops", "1"])["loop"] == 2  # the same: fine
