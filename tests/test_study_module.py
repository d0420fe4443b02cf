"""`psa study --model module:function`: a study of your own model (tests/factories.py) records
what psa.fit computes, resumes after an interruption to the rows of an uninterrupted run, and is
read by `psa status`, `psa export` and `psa report`; its dry run counts the built module; bad
input is one line, exit 2, nothing written."""

from __future__ import annotations

import csv
import json
import sqlite3
from pathlib import Path

import pytest
import torch

import psa
from psa.core import data as psa_data
from psa.core.module.checkpoint import load_module_population
from psa.study import modules
from psa.study.design import StudyDesign, resolve_design

from . import factories
from .conftest import on_each_loop, one_line_error, rows, run_main, study_db

CNN, MLP = "tests.factories:small_cnn", "tests.factories:small_mlp"
MODES = ("none", "dropout", "hidden", "output")
# 2 models x 4 modes x 2 trials, 3 meta-loops on 512 training images: one population per model
STUDY = ["--model", CNN, "--model", MLP, "--modes", ",".join(MODES), "--trials", "2", "--meta-loops", "3",
         "--train-subset", "512", "--name", "mine", "--quiet"]


def _trials(db: Path) -> list[sqlite3.Row]:
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    con.row_factory = sqlite3.Row
    try:
        return con.execute("SELECT * FROM trials ORDER BY arch, mode, trial").fetchall()
    finally:
        con.close()


@pytest.fixture(scope="module")
def module_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted run of STUDY, in this process."""
    return study_db(tmp_path_factory, "module", STUDY)


def test_a_module_study_records_what_psa_fit_computes(module_db: Path, mnist: psa_data.Dataset) -> None:
    trials = _trials(module_db)
    assert len(trials) == 2 * len(MODES) * 2
    assert {(t["arch"], t["model"]) for t in trials} == {(CNN, CNN), (MLP, MLP)}  # trials.model: the factory
    assert {t["status"] for t in trials} == {"done"} and {t["dataset"] for t in trials} == {"mnist[train:512]"}
    con = sqlite3.connect(f"file:{module_db}?mode=ro", uri=True)
    design = json.loads(con.execute("SELECT design FROM studies").fetchone()[0])
    con.close()
    assert design["architectures"] == [CNN, MLP] and design["model"] == "module"
    assert "diverged" not in design  # the default, scored as the authors' harness scores it, as for any design
    assert set(design["plan"]["modules"]) == {CNN, MLP}
    assert design["plan"]["modules"][MLP]["params"] == 784 * 12 + 12 + 12 * 10 + 10
    loops = rows(module_db)["meta_loops"]
    assert len(loops) == len(trials) * 3
    # the study's populations are psa.fit's: the same members, data (images as (N, 1, 28, 28)) and engine
    images = lambda x: x.view(-1, 1, 28, 28)  # noqa: E731
    for spec, make in ((CNN, factories.small_cnn), (MLP, factories.small_mlp)):
        fit = psa.fit(make, train=(images(mnist.train_x[:512]), mnist.train_y[:512]),
                      val=(images(mnist.val_x), mnist.val_y), test=(images(mnist.test_x), mnist.test_y),
                      modes=MODES, trials=2, meta_loops=3)
        mine = {(mode, k, loop): (cand, bool(prom), lkg) for _, arch, mode, k, loop, _, cand, prom, _, _, lkg, _, _
                in loops if arch == spec}
        theirs = {(r.mode, r.trial, r.loop): (r.candidate_acc, r.promoted, r.lkg_score) for r in fit.records}
        assert mine == theirs
        got = {(t["mode"], t["trial"]): (t["bounty"], t["bounty_loop"], t["test_acc"]) for t in trials
               if t["arch"] == spec}
        assert got == {key: (fit.bounty[key], fit.bounty_loop[key], fit.test_acc[key]) for key in got}
    # ablations: none in the baselines nor in loop 1; a hidden unit layer in hidden mode (CNN: 2 of 3)
    for _, arch, mode, _, loop, _, _, _, layer, index, _, _, _ in loops:
        if mode in ("none", "dropout") or loop == 1:
            assert layer is None and index is None
        elif mode == "hidden":
            assert layer in ((0, 1) if arch == CNN else (0,))


@pytest.mark.parametrize("every", ["0", "1000"])
def test_an_interrupted_module_study_resumes_to_the_same_rows(every: str, module_db: Path, tmp_path: Path) -> None:
    """Ctrl-C after the second loop of the first population: with checkpoints after every loop,
    or only after the first (the database then runs a loop ahead and the resume recomputes it)."""
    seen: list[int] = []

    def interrupt(study, ev):
        seen.append(ev.loop)
        if len(seen) == 2:
            ckpt = next((tmp_path / "k.ckpt" / "mine").glob("*.safetensors"))
            _, meta = load_module_population(ckpt)
            assert meta["loop"] == (2 if every == "0" else 1) and meta["factory"] == CNN
            raise KeyboardInterrupt

    argv = ["study", *STUDY, "--db", "k.sqlite", "--checkpoint-every", every]
    with on_each_loop(interrupt):
        rc, _, err = run_main(argv, tmp_path)
    assert rc == 130 and seen == [1, 2]
    rc, _, err = run_main(["status", "--db", "k.sqlite"], tmp_path)
    assert rc == 0
    rc, _, err = run_main([a for a in argv if a != "--quiet"], tmp_path)
    assert rc == 0, err
    assert "1 populations continue from their checkpoints" in err
    assert rows(tmp_path / "k.sqlite") == rows(module_db)
    assert not list((tmp_path / "k.ckpt" / "mine").glob("*.safetensors"))


def test_status_export_and_report_of_a_module_study(module_db: Path, tmp_path: Path) -> None:
    rc, out, _ = run_main(["status", "--db", str(module_db), "--json"], tmp_path)
    (info,) = json.loads(out)["studies"]
    assert rc == 0 and info["state"] == "finished" and info["done"] == 16
    assert [a["arch"] for a in info["architectures"]] == [CNN, MLP]
    rc, _, err = run_main(["export", "--db", str(module_db), "--out", "exp", "--format", "csv"], tmp_path)
    assert rc == 0, err
    with open(tmp_path / "exp" / "trials.csv") as f:
        assert {(r["arch"], r["model"]) for r in csv.DictReader(f)} == {(CNN, CNN), (MLP, MLP)}
    rc, out, err = run_main(["report", "--db", str(module_db), "--out", "rep"], tmp_path)
    assert rc == 0, err
    rep = tmp_path / "rep"
    md = (rep / "tables" / "models.md").read_text()
    for spec in (CNN, MLP):
        for mode in MODES:
            assert f"| {spec} | {mode} | 2 |" in md
    tests = (rep / "tables" / "paired_tests.md").read_text()
    assert f"| {MLP} | hidden | none | 2 |" in tests and f"| {CNN} | output | dropout | 2 |" in tests
    manifest = json.loads((rep / "manifest.json").read_text())
    assert "regimes" not in manifest and "table_iv" not in manifest["tables"]
    assert manifest["models"] == [CNN, MLP] and "convergence" in manifest["figures"]
    assert "not drawn" in (rep / "index.html").read_text()
    rc, _, err = run_main(["compare", "--db", str(module_db), "--out", "cmp"], tmp_path)
    assert rc == 2 and "no published counterpart" in one_line_error(err)


def test_dry_run_counts_the_built_module_and_writes_nothing(tmp_path: Path) -> None:
    rc, out, err = run_main(["study", *STUDY, "--db", "x.sqlite", "--dry-run", "--json"], tmp_path)
    assert rc == 0, err
    plan = json.loads(out)
    cnn, mlp = plan["architectures"]
    assert (cnn["arch"], mlp["arch"]) == (CNN, MLP)
    assert cnn["params"] == (4 * 25 + 4) + (6 * 4 * 25 + 6) + (96 * 10 + 10)
    assert mlp["flops_per_example"] == 2 * (784 * 12 + 12 * 10)  # torch's flop counter: 2 per multiply-add
    assert cnn["layers"] == "0[4], 2[6], 6[10]"
    # the estimate: each model's population timed here, every term positive
    assert [p["arch"] for p in plan["probes"]] == [CNN, MLP] and all(p["step_s"] > 0 for p in plan["probes"])
    assert plan["seconds"] > plan["startup_seconds"] > 0 and cnn["seconds"] > 0 and mlp["seconds"] > 0
    assert "estimate on cpu" in err and "time" in err  # the table and lines go to stderr with --json
    assert list(tmp_path.iterdir()) == []


def test_a_factory_that_builds_another_model_is_not_resumed(tmp_path: Path, monkeypatch) -> None:
    argv = ["study", "--model", MLP, "--modes", "none", "--trials", "1", "--meta-loops", "1", "--train-subset", "256",
            "--quiet", "--db", "x.sqlite", "--name", "m"]
    assert run_main(argv, tmp_path)[0] == 0
    monkeypatch.setattr(factories, "small_mlp", factories.wider_mlp)
    monkeypatch.setattr(modules, "_FACTORIES", {})
    rc, _, err = run_main(argv, tmp_path)
    assert rc == 2 and "now builds another model" in one_line_error(err)


@pytest.mark.parametrize("flags, message", [
    (["--model", "tests.no_such_module:make"], "cannot import tests.no_such_module"),
    (["--model", "tests.factories:nope"], "has no nope"),
    (["--model", "tests.factories:"], "give a factory as module:function"),
    (["--model", "tests.factories:not_a_module"], "returned str, not a torch.nn.Module"),
    (["--model", "tests.factories:no_units"], "has no nn.Linear or nn.Conv layer"),
    (["--model", "tests.factories:five_classes"], "the data has 10 classes"),
    (["--model", "tests.factories:no_dropout", "--modes", "dropout"], "has none"),
    (["--model", MLP, "--arch", "1*8"], "is its own architecture"),
    (["--model", MLP, "--preset", "paper"], "architectures (--arch, --arch-file, a preset's or a design file's)"),
    (["--model", MLP, "--model", "resmlp"], "not both"),
    (["--model", MLP, "--precision", "bf16"], "trains in fp32"),
])
def test_bad_module_input_is_one_line_and_writes_nothing(tmp_path: Path, flags: list[str], message: str) -> None:
    argv = ["study", "--modes", "none,hidden", "--trials", "1", "--meta-loops", "1", "--train-subset", "256",
            "--quiet", "--db", "x.sqlite", *flags]
    rc, _, err = run_main(argv, tmp_path)
    assert rc == 2 and message in one_line_error(err)
    assert list(tmp_path.iterdir()) == []


def test_existing_designs_keep_their_digests() -> None:
    """Digests computed by psa before module models existed: the tiny study's flags and the paper's preset."""
    _, tiny = resolve_design(None, None, None, {"architectures": ("1*8", "2*8"), "trials": 2, "meta_loops": 6,
                                                "train_subset": 2048})
    assert tiny.digest() == "5dd8623d8ff7ab4644bf410868344cf92bb8fa6d3dc6386aa5ae7c132781e645"
    assert resolve_design("paper")[1].digest() == "de349b1f368be291d4f80cf3c4d23ae88addcd2c605c7487736eb0f59d17a273"
    _, mine = resolve_design(None, None, None, {"model": MLP})
    assert mine.nets == (MLP,) and mine.is_module and "model" in mine.to_dict()
    assert StudyDesign.from_fields(**mine.fields()) == mine  # a stored design reads back


def test_images_are_shaped_for_the_model(mnist: psa_data.Dataset) -> None:
    shaped = modules.module_data(mnist)
    assert shaped.train_x.shape[1:] == (1, 28, 28) and shaped.val_x.shape[1:] == (1, 28, 28)
    assert torch.equal(shaped.test_x.flatten(1), mnist.test_x) and shaped.train_x.data_ptr() == mnist.train_x.data_ptr()


def test_a_design_file_names_its_models(tmp_path: Path) -> None:
    (tmp_path / "mine.toml").write_text(f'model = ["{CNN}", "{MLP}"]\nmodes = ["none", "output"]\ntrials = 2\n'
                                        f'meta_loops = 5\ntrain_subset = 256\n')
    rc, out, err = run_main(["study", "mine.toml", "--db", "x.sqlite", "--dry-run", "--json"], tmp_path)
    assert rc == 0, err
    plan = json.loads(out)
    assert plan["name"] == "mine" and [r["arch"] for r in plan["architectures"]] == [CNN, MLP]
    assert [r["trials"] for r in plan["architectures"]] == [4, 4]


def test_psa_train_points_a_module_model_to_a_study(tmp_path: Path) -> None:
    rc, _, err = run_main(["train", "--model", MLP, "--arch", "1*8", "--out", "run"], tmp_path)
    assert rc == 2 and f"psa study --model {MLP}" in one_line_error(err)
    assert list(tmp_path.iterdir()) == []
