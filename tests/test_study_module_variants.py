"""Engine variants in studies of your own model (`psa study --model module:function --variant ...`):
every kind runs and records what psa.fit computes with the same variants, pairs with the
paper-engine trials, resumes byte for byte from a checkpoint that carries the variant state,
is counted by the dry run and reported per model; bad settings are one line, exit 2."""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path

import pytest
import torch

import psa
from psa.core import data as psa_data
from psa.core.checkpoint import load_tensors
from psa.study import modules

from . import factories
from .conftest import on_each_loop, one_line_error, run_main, study_db

CNN, MLP = "tests.factories:small_cnn", "tests.factories:small_mlp"
# every kind of variant: patience, the persistent optimizer, N units per loop, a fixed output
# unit, a mode schedule
VARIANTS = {"p1": "patience=1", "keep": "optimizer_state=persist", "a2": "ablate=2",
            "fo": "ablate_layers=output fixed=true", "sched": "schedule=dropout:2,hidden:2"}
FLAGS = [f for name, s in VARIANTS.items() for f in ("--variant", f"{name} {s}")]
STUDY = ["--model", CNN, "--model", MLP, "--modes", "none,hidden", "--trials", "2", "--meta-loops", "4",
         "--train-subset", "512", "--name", "var", "--quiet", *FLAGS]


def full_rows(db: Path) -> dict[str, list[tuple]]:
    """Every result column of trials and meta-loops (variants and forced flags included), keyed
    by natural keys, without wall-clock columns or ids."""
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        key = "t.arch, t.mode, COALESCE(t.variant, ''), t.trial"
        return {
            "trials": con.execute(
                f"SELECT {key}, t.variant_settings, t.model, t.seed, t.weight_decay, t.dropout, t.dataset, t.status, "
                f"t.bounty, t.bounty_loop, t.test_acc, t.loops_done FROM trials t ORDER BY 1, 2, 3, 4").fetchall(),
            "meta_loops": con.execute(
                f"SELECT {key}, m.loop, m.mode, m.candidate_acc, m.promoted, m.ablated_layer, m.ablated_index, "
                f"m.lkg_score, m.train_loss, m.diverged, m.forced FROM meta_loops m JOIN trials t ON t.id = m.trial_id "
                f"ORDER BY 1, 2, 3, 4, 5").fetchall(),
        }
    finally:
        con.close()


@pytest.fixture(scope="module")
def variant_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return study_db(tmp_path_factory, "module-variants", STUDY)


def test_every_kind_of_variant_runs_on_a_module_and_records_what_psa_fit_computes(
        variant_db: Path, mnist: psa_data.Dataset) -> None:
    got = full_rows(variant_db)
    conds = sorted({(arch, mode, variant) for arch, mode, variant, *_ in got["trials"]})
    # p1 and keep in both modes, a2 and fo only in hidden (they ablate), the schedule once (dropout)
    for spec in (CNN, MLP):
        assert [c[1:] for c in conds if c[0] == spec] == [
            ("dropout", "sched"), ("hidden", ""), ("hidden", "a2"), ("hidden", "fo"), ("hidden", "keep"),
            ("hidden", "p1"), ("none", ""), ("none", "keep"), ("none", "p1")]
    assert {t[10] for t in got["trials"]} == {"done"}
    # paired: trial k of every condition has the paper-engine trial k's seed
    assert {(t[3], t[6]) for t in got["trials"]} == {(1, 0), (2, 1)}
    # patience's forced flag is recorded (0 or 1) for its trials only
    assert {(v == "p1", f is not None) for _, _, v, _, _, _, *_, f in got["meta_loops"]} == {(True, True),
                                                                                          (False, False)}
    # the schedule's rows record the mode each loop trained in
    assert [r[5] for r in got["meta_loops"] if r[0] == CNN and r[2] == "sched" and r[3] == 1] == [
        "dropout", "dropout", "hidden", "hidden"]
    # the same population through psa.fit, with the same variants: the same rows, bounties and tests
    images = lambda x: x.view(-1, 1, 28, 28)  # noqa: E731
    variants = {"p1": {"patience": 1}, "keep": {"optimizer_state": "persist"}, "a2": {"ablate": 2},
                "fo": {"ablate_layers": ["output"], "fixed": True}, "sched": {"schedule": "dropout:2,hidden:2"}}
    assert list(variants) == list(VARIANTS)  # the study's order: the same members, in the same population
    for spec, make in ((CNN, factories.small_cnn), (MLP, factories.small_mlp)):
        fit = psa.fit(make, train=(images(mnist.train_x[:512]), mnist.train_y[:512]),
                      val=(images(mnist.val_x), mnist.val_y), test=(images(mnist.test_x), mnist.test_y),
                      modes=("none", "hidden"), trials=2, meta_loops=4, variants=variants)
        label = lambda mode, v: f"{mode}+{v}" if v else mode  # noqa: E731
        mine = {(label(mode, v), k, loop): (cand, bool(prom), lkg, None if forced is None else bool(forced))
                for arch, mode, v, k, loop, _, cand, prom, _, _, lkg, _, _, forced in got["meta_loops"]
                if arch == spec}
        theirs = {(r.mode, r.trial, r.loop): (r.candidate_acc, r.promoted, r.lkg_score, r.forced) for r in fit.records}
        assert mine == theirs
        trials = {(label(mode, v), k): (b, bl, t) for arch, mode, v, k, *_, b, bl, t, _ in got["trials"]
                  if arch == spec}
        assert trials == {key: (fit.bounty[key], fit.bounty_loop[key], fit.test_acc[key]) for key in trials}


def test_report_status_and_the_variants_table_of_a_module_study(variant_db: Path, tmp_path: Path) -> None:
    rc, _, err = run_main(["report", "--db", str(variant_db), "--out", "rep"], tmp_path)
    assert rc == 0, err
    md = (tmp_path / "rep" / "tables" / "variant_tests.md").read_text()
    for spec in (CNN, MLP):
        for cond, ref in [("hidden+p1", "hidden"), ("none+keep", "none"), ("hidden+a2", "hidden"),
                          ("hidden+fo", "hidden"), ("dropout+sched", "hidden")]:
            assert f"| {spec} | {cond} | {ref} | 2 |" in md, md
    rc, out, _ = run_main(["status", "--db", str(variant_db), "--json"], tmp_path)
    (info,) = json.loads(out)["studies"]
    assert rc == 0 and info["state"] == "finished" and info["done"] == 2 * 9 * 2
    rc, _, err = run_main(["export", "--db", str(variant_db), "--out", "exp", "--format", "csv"], tmp_path)
    assert rc == 0, err
    assert "variant_settings" in (tmp_path / "exp" / "trials.csv").read_text().splitlines()[0]


# patience + persist + schedule, on the batched (MLP) and the one-at-a-time (CNN on a CPU) paths
RESUME = ["--model", CNN, "--model", MLP, "--modes", "hidden", "--trials", "2", "--meta-loops", "4",
          "--train-subset", "512", "--name", "r", "--quiet", "--variant", "p1 patience=1",
          "--variant", "keep optimizer_state=persist patience=2", "--variant", "sched schedule=dropout:2,hidden:2"]


def _keeping_last_checkpoints(keep: Path):
    """A context in which every population's checkpoint is copied to `keep` after its last
    meta-loop (the study deletes it once the population is done)."""

    def copying(study, ev):
        if ev.loop == study.design.hparams.meta_loops:
            path = study._ckpt_path(study.pops[ev.key].plan)
            shutil.copy(path, keep / path.name)

    return on_each_loop(copying)


@pytest.fixture(scope="module")
def resume_reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """An uninterrupted run of RESUME, checkpointing every loop: (database, last checkpoints)."""
    d = tmp_path_factory.mktemp("module-variants-ref")
    (d / "last").mkdir()
    with _keeping_last_checkpoints(d / "last"):
        rc, _, err = run_main(["study", *RESUME, "--db", "ref.sqlite", "--checkpoint-every", "0"], d)
    assert rc == 0, err
    return d / "ref.sqlite", d / "last"


@pytest.mark.parametrize("every", ["0", "1000"])
def test_an_interrupted_module_variant_study_resumes_byte_for_byte(every: str, resume_reference: tuple[Path, Path],
                                                                   tmp_path: Path) -> None:
    """Ctrl-C after the third loop of the first population (past the schedule's switch to
    hidden), with checkpoints after every loop or only after the first; the resume's rows and
    its populations' final state (LKGs, bounty models, patience counters, AdamW moments and
    steps, mode histories) are the uninterrupted run's."""
    ref_db, ref_last = resume_reference
    seen: list[int] = []

    def interrupt(study, ev):
        seen.append(ev.loop)
        if len(seen) == 3:
            ckpt = next((tmp_path / "k.ckpt" / "r").glob("*.safetensors"))
            tensors, meta = load_tensors(ckpt)
            assert meta["loop"] == (3 if every == "0" else 1)
            assert {"bounty_correct", "streak", "allowance", "opt_step"} <= set(tensors)
            assert any(k.startswith("bounty.") for k in tensors) and any(k.startswith("opt_avg.") for k in tensors)
            raise KeyboardInterrupt

    argv = ["study", *RESUME, "--db", "k.sqlite", "--checkpoint-every", every]
    with on_each_loop(interrupt):
        rc, _, err = run_main(argv, tmp_path)
    assert rc == 130 and seen == [1, 2, 3]
    (tmp_path / "last").mkdir()
    # the resume checkpoints every loop, so that its last state can be compared
    resume = [a for a in argv if a != "--quiet"][:-1] + ["0"]
    with _keeping_last_checkpoints(tmp_path / "last"):
        rc, _, err = run_main(resume, tmp_path)
    assert rc == 0, err
    assert "1 populations continue from their checkpoints" in err
    assert full_rows(tmp_path / "k.sqlite") == full_rows(ref_db)
    names = sorted(p.name for p in ref_last.iterdir())
    assert names == sorted(p.name for p in (tmp_path / "last").iterdir()) and len(names) == 2
    for name in names:
        (a, meta_a), (b, meta_b) = load_tensors(ref_last / name), load_tensors(tmp_path / "last" / name)
        assert set(a) == set(b) and all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
        assert {k: v for k, v in meta_a.items() if k != "seconds"} == {k: v for k, v in meta_b.items()
                                                                      if k != "seconds"}
        sched = [h for m, h in zip(meta_a["members"], meta_a["mode_history"]) if m[4:] and "schedule" in m[4]]
        assert sched == [[["dropout", 1], ["hidden", 3]]] * 2


def test_the_dry_run_counts_the_variant_conditions(tmp_path: Path) -> None:
    rc, out, err = run_main(["study", *STUDY, "--db", "x.sqlite", "--dry-run", "--json"], tmp_path)
    assert rc == 0, err
    plan = json.loads(out)
    assert [r["trials"] for r in plan["architectures"]] == [9 * 2, 9 * 2]  # 2 modes + 7 variant conditions
    assert "2 modes + 7 variant conditions" in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("flags, message", [
    (["--variant", "a ablate_layers=5"], "variant 'a' in mode hidden: tests.factories:small_mlp (unit layers"),
    (["--variant", "a ablate=0"], "at least 1 neuron"),
    (["--variant", "p patience=-1"], "patience must be an integer >= 0"),
    (["--variant", "s schedule=dropout:2,hidden:1"], "covers 3 meta-loops, the run has 2"),
    (["--variant", "hidden patience=2"], "bad variant name"),
    (["--variant", "s schedule=none:1,dropout:1"], "has none"),  # a schedule through a mode the model lacks
])
def test_bad_variants_of_a_module_study_are_one_line(tmp_path: Path, flags: list[str], message: str) -> None:
    model = "tests.factories:no_dropout" if "none:1" in flags[1] else MLP
    argv = ["study", "--model", model, "--modes", "none,hidden", "--trials", "1", "--meta-loops", "2",
            "--train-subset", "256", "--quiet", "--db", "x.sqlite", *flags]
    rc, _, err = run_main(argv, tmp_path)
    assert rc == 2 and message in one_line_error(err)
    assert list(tmp_path.iterdir()) == []


def test_a_checkpoint_of_the_papers_engine_reads_as_before(tmp_path: Path, mnist: psa_data.Dataset) -> None:
    """A population without variants writes the checkpoint it wrote before (members as four
    fields, no variant tensors); one without `mode_history` (older psa) reads as one mode each."""
    data = modules.module_data(psa_data.Dataset(mnist.name, mnist.train_x[:64], mnist.train_y[:64], mnist.val_x[:32],
                                                mnist.val_y[:32], mnist.test_x[:8], mnist.test_y[:8], "given"))
    from psa.core.hparams import HParams

    from psa.core.module.checkpoint import load_module_population, save_module_population
    from psa.core.module.population import ModulePopulation

    members = [HParams().member(m, 3) for m in ("none", "hidden")]
    pop = ModulePopulation.create(modules.make_model(MLP), members, data, "cpu", factory=MLP)
    save_module_population(tmp_path / "p.safetensors", pop)
    tensors, meta = load_tensors(tmp_path / "p.safetensors")
    assert all(len(m) == 4 for m in meta["members"])
    assert set(tensors) == {"lkg_correct", *(f"param.{k}" for k in pop.params)}
    del meta["mode_history"]
    from psa.core.checkpoint import save_tensors

    save_tensors(tmp_path / "old.safetensors", tensors, meta)
    ckpt, _ = load_module_population(tmp_path / "old.safetensors")
    assert ckpt.mode_history == [[("none", 1)], [("hidden", 1)]] and ckpt.variant == {}
