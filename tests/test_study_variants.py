"""Engine variants in studies: stored per trial, checkpointed and resumed, grouped on in reports,
and bad input refused before anything is written."""

from __future__ import annotations

import dataclasses
import re
import sqlite3
from pathlib import Path

import pytest
import torch

from psa.core.arch import parse_arch
from psa.core.mlp.checkpoint import load_population, save_population
from psa.core.mlp.engine import Engine
from psa.core.mlp.population import Population
from psa.core.variant import Variant
from psa.study import store
from psa.study.export import export

from .conftest import ENGINE_HP, one_line_error, run_main, subset

VARIANTS = ["--variant", "p1 patience=1", "--variant", "a2 ablate=2", "--variant", "keep optimizer_state=persist",
            "--variant", "sched schedule=dropout:2,hidden:2"]
STUDY = ["study", "--arch", "1*8", "--modes", "none,hidden", "--trials", "2", "--meta-loops", "4",
         "--train-subset", "512", "--name", "var", "--quiet", *VARIANTS]


@pytest.fixture(scope="module")
def variant_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("variants")
    rc, _, err = run_main([*STUDY, "--db", "v.sqlite"], cwd=d)
    assert rc == 0, err
    return d / "v.sqlite"


def test_trials_store_their_variant_and_loops_their_forced_flag(variant_db: Path) -> None:
    con = sqlite3.connect(variant_db)
    conds = con.execute("SELECT mode, variant, variant_settings, COUNT(*), SUM(status = 'done') FROM trials "
                        "GROUP BY mode, variant ORDER BY mode, variant").fetchall()
    # none and hidden with the paper's engine; p1 and keep in both modes; a2 only in hidden (it
    # ablates); the schedule once, starting in dropout
    assert conds == [
        ("dropout", "sched", '{"schedule":[["dropout",2],["hidden",2]]}', 2, 2),
        ("hidden", None, None, 2, 2),
        ("hidden", "a2", '{"ablate":2}', 2, 2),
        ("hidden", "keep", '{"optimizer_state":"persist"}', 2, 2),
        ("hidden", "p1", '{"patience":1}', 2, 2),
        ("none", None, None, 2, 2),
        ("none", "keep", '{"optimizer_state":"persist"}', 2, 2),
        ("none", "p1", '{"patience":1}', 2, 2),
    ]
    forced = dict(con.execute("SELECT t.variant, COUNT(m.forced) FROM meta_loops m JOIN trials t ON t.id = m.trial_id "
                              "GROUP BY t.variant").fetchall())
    assert forced == {None: 0, "a2": 0, "keep": 0, "p1": 16, "sched": 0}  # p1: 4 trials x 4 loops
    modes = [r[0] for r in con.execute("SELECT m.mode FROM meta_loops m JOIN trials t ON t.id = m.trial_id "
                                       "WHERE t.variant = 'sched' AND t.trial = 1 ORDER BY m.loop")]
    assert modes == ["dropout", "dropout", "hidden", "hidden"]
    # a paired trial of one seed starts from the same weights in every condition: loop 1 of the
    # schedule (dropout) differs, loop 1 of hidden+a2 and hidden is one and the same candidate
    loop1 = dict(con.execute("SELECT COALESCE(t.variant, ''), m.candidate_acc FROM meta_loops m JOIN trials t "
                             "ON t.id = m.trial_id WHERE t.mode = 'hidden' AND t.trial = 1 AND m.loop = 1").fetchall())
    assert loop1[""] == loop1["a2"] == loop1["p1"]
    con.close()


def test_report_and_compare_show_each_variant_as_its_own_condition(variant_db: Path, tmp_path: Path) -> None:
    rc, _, err = run_main(["report", "--db", str(variant_db), "--out", str(tmp_path / "rep"), "--zero-r", "11.35"])
    assert rc == 0, err
    md = (tmp_path / "rep" / "tables" / "variant_tests.md").read_text()
    for cond, ref in [("hidden+p1", "hidden"), ("hidden+a2", "hidden"), ("none+keep", "none"),
                      ("dropout+sched", "hidden")]:  # a schedule against the plain mode it ends in
        assert f"| 1*8 | {cond} | {ref} | 2 |" in md, md
    # 2 pairs over 4 conditions can never reach alpha: the note gives the rule the verdict follows
    assert "| cannot decide |" in md and "Holm-adjusted over the variant conditions of the architecture" in md
    # an export carries each variant's settings: the same references from it
    assert run_main(["export", "--db", str(variant_db), "--out", str(tmp_path / "exp")])[0] == 0
    rc, _, err = run_main(["report", "--export", str(tmp_path / "exp"), "--out", str(tmp_path / "rep2"),
                           "--zero-r", "11.35"])
    assert rc == 0, err
    assert (tmp_path / "rep2" / "tables" / "variant_tests.md").read_text() == md
    rc, out, err = run_main(["compare", "--db", str(variant_db), "--out", str(tmp_path / "cmp"), "--zero-r", "11.35"])
    assert rc == 0, err
    assert "engine variants against the paper's engine" in out and "hidden+keep" in out


def test_population_checkpoint_resumes_a_variant_exactly(small, tmp_path: Path) -> None:
    """Patience counters, the bounty model and persisted AdamW state survive a checkpoint: 3 + 3
    loops through save/load give the 6 loops of an uninterrupted run, bit for bit."""
    data = subset(small, 512)
    hp = dataclasses.replace(ENGINE_HP, meta_loops=6)
    arch = parse_arch("[2*8]")
    members = [hp.member("hidden", s, v) for s in (3, 4) for v in
               (Variant(patience=1), Variant(optimizer_state="persist", patience=2),
                Variant(schedule=(("dropout", 3), ("hidden", 3))))]

    def run(pop: Population, loops: int) -> list:
        eng = Engine(pop, data, hp)
        return [eng.meta_loop() for _ in range(loops)]

    whole = Population.create(arch, members, "cpu", n_val=data.val_y.numel())
    ref = run(whole, 6)
    part = Population.create(arch, members, "cpu", n_val=data.val_y.numel())
    first = run(part, 3)
    save_population(tmp_path / "p.safetensors", part)
    resumed, _ = load_population(tmp_path / "p.safetensors", "cpu")
    assert resumed.members == part.members
    second = run(resumed, 3)
    strip = lambda rs: [(r.candidate_acc, r.promoted, r.forced, r.ablations, r.lkg_score) for r in rs]  # noqa: E731
    assert strip(first + second) == strip(ref)
    assert torch.equal(resumed.lkg, whole.lkg) and torch.equal(resumed.bounty_state, whole.bounty_state)
    assert torch.equal(resumed.opt_avg, whole.opt_avg) and torch.equal(resumed.opt_step, whole.opt_step)
    assert resumed.mode_history == whole.mode_history


def test_the_progress_line_shows_each_variant_condition(tmp_path: Path) -> None:
    """A variant's members share their mode with the paper engine's: the line that ends a
    population gives each condition's best bounty, not one per mode over both."""
    rc, out, err = run_main(["study", "--arch", "1*4", "--modes", "none,hidden", "--trials", "1", "--meta-loops", "2",
                             "--train-subset", "256", "--db", "p.sqlite", "--variant", "p patience=1",
                             "--variant", "s schedule=dropout:1,hidden:1"], tmp_path)
    assert rc == 0, err
    (line,) = [x for x in (out + err).splitlines() if x.startswith("done 1*4")]
    found = re.findall(r"(\S+) (\d+\.\d\d)", line.partition("best bounty")[2])
    assert [c for c, _ in found] == ["none", "hidden", "none+p", "hidden+p", "dropout+s"], line


@pytest.mark.parametrize("flags, message", [
    (["--variant", "p patience=-1"], "patience must be an integer >= 0"),
    (["--variant", "a ablate=0"], "at least 1 neuron"),
    (["--variant", "a ablate=150%"], "a percentage must be in (0%, 100%]"),
    (["--variant", "a ablate_layers=middle"], "unknown layer 'middle'"),
    (["--variant", "s schedule=dropout:2,hidden:1"], "covers 3 meta-loops, the run has 4"),
    (["--variant", "hidden patience=2"], "bad variant name"),
    (["--variant", "f fixed=no"], "fixed must be true or false, got 'no'"),  # a truthy string: it ran fixed
    (["--variant", "f fixed=2"], "fixed must be true or false, got 2"),
    (["--variant", "s ablate_schedule=5"], "ablate-schedule must be constant, linear or step:L, got 5"),
    (["--variant", "s schedule=4"], "schedule must be MODE:LOOPS,... (e.g. dropout:50,hidden:50), got 4"),
    (["--variant", "p patience=5 patience=6"], "patience is given twice"),
])
def test_bad_study_variants_write_nothing(tmp_path: Path, flags: list[str], message: str) -> None:
    argv = ["study", "--arch", "1*8", "--modes", "hidden", "--trials", "1", "--meta-loops", "4",
            "--train-subset", "512", "--quiet", "--db", "x.sqlite", *flags]
    rc, _, err = run_main(argv, cwd=tmp_path)
    assert rc == 2 and message in one_line_error(err)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("flags, message", [
    (["--patience", "-1"], "patience must be an integer >= 0"),
    (["--mode", "hidden", "--ablate", "0"], "at least 1 neuron"),
    (["--mode", "hidden", "--ablate", "150%"], "a percentage must be in (0%, 100%]"),
    (["--mode", "hidden", "--ablate-layers", "middle"], "unknown layer 'middle'"),
    (["--schedule", "dropout:1,hidden:1"], "covers 2 meta-loops, the run has 3"),
])
def test_bad_train_variants_write_nothing(tmp_path: Path, flags: list[str], message: str) -> None:
    rc, _, err = run_main(["train", "--arch", "1*8", "--meta-loops", "3", "--out", "run", *flags], cwd=tmp_path)
    assert rc == 2 and message in one_line_error(err)
    assert not (tmp_path / "run").exists()


def test_train_resume_keeps_its_variant(tmp_path: Path) -> None:
    base = ["train", "--arch", "1*8", "--meta-loops", "2", "--json"]
    rc, _, err = run_main([*base, "--schedule", "dropout:1,hidden:1", "--patience", "1", "--out", "r"], cwd=tmp_path)
    assert rc == 0, err
    before = sorted(p.name for p in (tmp_path / "r").iterdir())
    assert before == ["lkg.safetensors", "loops.jsonl", "population.safetensors", "run.json"]
    for flags, message in [(["--patience", "3"], "a resumed run keeps its variant"),
                           (["--mode", "none"], "--mode cannot change it")]:
        rc, _, err = run_main(["train", "--resume", "r", "--meta-loops", "1", *flags], cwd=tmp_path)
        assert rc == 2 and message in one_line_error(err)
    plain = ["train", "--arch", "1*8", "--meta-loops", "1", "--out", "plain"]
    assert run_main(plain, cwd=tmp_path)[0] == 0
    rc, _, err = run_main(["train", "--resume", "plain", "--meta-loops", "1", "--ablate", "2", "--mode", "hidden"],
                          cwd=tmp_path)
    assert rc == 2 and "a resumed run keeps its variant" in one_line_error(err)
    rc, out, err = run_main(["train", "--resume", "r", "--meta-loops", "1", "--json"], cwd=tmp_path)
    assert rc == 0, err
    assert '"mode_history": [\n  [\n   "dropout",\n   1\n  ],\n  [\n   "hidden",\n   2\n  ]\n ]' in out


def test_a_database_from_before_variants_reads_as_the_papers_engine(tmp_path: Path) -> None:
    """An old schema (no variant columns, the old UNIQUE constraint) gains the columns on open,
    reads as the paper's engine, and refuses a study with variants in one line."""
    db = tmp_path / "old.sqlite"
    old_schema = store.SCHEMA.replace("    variant TEXT,\n    variant_settings TEXT\n",
                                      "    UNIQUE (study_id, arch, mode, trial)\n")
    old_schema = old_schema.replace("    forced INTEGER,\n", "").replace(
        "CREATE UNIQUE INDEX IF NOT EXISTS trials_unique ON trials (study_id, arch, mode, COALESCE(variant, ''), trial);",
        "")
    assert "variant" not in old_schema and "forced" not in old_schema
    con = sqlite3.connect(db)
    con.executescript(old_schema)
    con.execute("INSERT INTO studies (id, name, design, design_hash) VALUES (1, 'old', '{}', 'x')")
    con.execute("INSERT INTO trials (study_id, arch, mode, trial, seed, meta_loops, lr, batch_size, weight_decay, "
                "dropout, dataset, status) VALUES (1, '1*8', 'hidden', 1, 0, 1, 1e-4, 256, 0, 0, 'mnist', 'pending')")
    con.commit()
    con.close()
    ro = store.connect(db, readonly=True)
    (trial,) = store.load_trials(ro, 1)
    assert trial["variant"] is None  # no variant column: read as the paper's engine
    export(ro, tmp_path / "export")
    header = (tmp_path / "export" / "trials.csv").read_text().splitlines()[0]
    assert header.endswith(",variant,variant_settings")
    ro.close()
    rc, _, err = run_main(["study", "--arch", "1*8", "--modes", "hidden", "--trials", "1", "--meta-loops", "1",
                           "--train-subset", "256", "--quiet", "--db", str(db), "--variant", "p patience=2"])
    assert rc != 0 and "created by a psa without engine variants" in one_line_error(err)
    cols = {r[1] for r in sqlite3.connect(db).execute("PRAGMA table_info(trials)")}
    assert {"variant", "variant_settings"} <= cols
