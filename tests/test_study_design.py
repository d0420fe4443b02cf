"""Study designs and plans: pairing, presets, TOML files and names, the partition into
populations; bad designs are one line, exit status 2 and nothing written."""

from __future__ import annotations

from pathlib import Path

import pytest

from psa.core.hparams import HParams
from psa.study.design import StudyDesign, preset, resolve_design
from psa.study.cost import DEFAULT_CALIBRATION, arch_flops, auto_population_size, bytes_per_member
from psa.study.kinds import model_kind
from psa.study.plan import make_plan

from .conftest import one_line_error, run_main


# ------------------------------------------------------------------------------------------
# design and plan


def test_design_is_paired_and_canonical() -> None:
    d = StudyDesign(nets=("[1*8]", "2*16"), modes=("hidden", "none"), trials=3, seed=7)
    assert d.nets == ("1*8", "2*16")
    assert d.modes == ("none", "hidden")
    assert [d.seed_of(k) for k in (1, 2, 3)] == [7, 8, 9]
    assert {d.member(m, 2).seed for m in d.modes} == {8}
    assert d.member("decay", 1).weight_decay == 1e-4 and d.member("none", 1).weight_decay == 0.0
    assert d.member("dropout", 1).dropout == 0.1 and d.member("hidden", 1).dropout == 0.0
    # mode order does not change the design
    assert d.digest() == StudyDesign(nets=("1*8", "2*16"), modes=("none", "hidden"), trials=3,
                                     seed=7).digest()
    assert d.digest() != StudyDesign(nets=("1*8", "2*16"), modes=("none", "hidden"), trials=3,
                                     seed=8).digest()


def test_diverged_rule_is_part_of_a_design_only_when_it_is_not_the_harnesss() -> None:
    base = StudyDesign(nets=("1*8",), trials=2)
    # the default (the harness's rule) leaves the stored design, and so every digest, as before
    assert "diverged" not in base.to_dict()
    assert base.digest() == StudyDesign.from_fields(architectures=("1*8",), trials=2, diverged="score").digest()
    discard = StudyDesign.from_fields(architectures=("1*8",), trials=2, diverged="discard")
    assert discard.hparams.diverged == "discard" and discard.to_dict()["diverged"] == "discard"
    assert discard.digest() != base.digest()
    assert StudyDesign.from_fields(**discard.fields()) == discard


def test_bad_diverged_rule_is_one_line_and_exit_2(tmp_path: Path) -> None:
    design = tmp_path / "d.toml"
    design.write_text('architectures = ["1*8"]\n[training]\ndiverged = "ignore"\n')
    code, _, err = run_main(["study", str(design), "--dry-run"], cwd=tmp_path)
    assert code == 2 and "diverged must be one of score, discard" in one_line_error(err)
    code, _, err = run_main(["train", "--arch", "1*8", "--diverged", "ignore"], cwd=tmp_path)
    assert code == 2 and "--diverged" in err
    assert list(tmp_path.iterdir()) == [design]


def test_paper_preset_is_the_authors_design() -> None:
    d = preset("paper")
    assert len(d.nets) == 98 and d.nets[0] == "1*2048"
    assert d.modes == ("none", "decay", "dropout", "full", "hidden", "output")
    assert (d.trials, d.hparams.meta_loops, d.n_trials) == (10, 100, 5880)
    total = sum(arch_flops(a, d.hparams.meta_loops) * 60 for a in d.nets)
    assert total / 1e15 == pytest.approx(27.2, abs=0.15)  # NOTES.md: about 27.2 PFLOP
    big = sum(arch_flops(a, d.hparams.meta_loops) * 60 for a in ("4*632", "2*939", "1*2048", "115*115"))
    assert big / 1e15 == pytest.approx(12.6, abs=0.1)
    # on any realistic budget every architecture is one population of 60
    plan = make_plan(d, auto_population_size(d, 8 << 30))
    assert len(plan.populations) == 98 and {p.size for p in plan.populations} == {60}


@pytest.mark.parametrize("trials,chunk", [(10, 60), (10, 24), (10, 7), (7, 18), (3, 1), (5, 6)])
def test_plan_is_a_pure_even_partition(trials: int, chunk: int) -> None:
    d = StudyDesign(nets=("1*2048", "4*4", "64*1", "[2*16, 1*8]"), trials=trials)
    plan = make_plan(d, chunk, model_kind(d).loop_cost)
    assert plan == make_plan(d, chunk, model_kind(d).loop_cost)  # a pure function: resumes rebuild the same populations
    per = max(1, chunk // 6)
    for arch in d.nets:
        pops = [p for p in plan.populations if p.net == arch]
        covered = sorted(k for p in pops for k in p.trials)
        assert covered == list(range(1, trials + 1))
        sizes = [len(p.trials) for p in pops]
        assert max(sizes) <= per and max(sizes) - min(sizes) <= 1
        assert all(p.modes == d.modes for p in pops)
    keys = [p.key for p in plan.populations]
    assert len(set(keys)) == len(keys)
    work = [DEFAULT_CALIBRATION.loop_seconds(p.net, p.size) for p in plan.populations]
    assert work == sorted(work, reverse=True)  # largest work first


def test_a_population_size_below_a_trials_conditions_is_said() -> None:
    """A trial's conditions train together: a population size below them is exceeded, and the
    plan says so rather than claiming "at most 4 members" over populations of 6."""
    d = StudyDesign(nets=("1*8",), trials=3)
    assert make_plan(d, 12).size_text() == "at most 12 members"
    small = make_plan(d, 4)
    assert small.largest == 6 and {p.size for p in small.populations} == {6}
    assert small.size_text() == ("at most 6 members, as a trial's 6 conditions train together and the population "
                                 "size is 4")


def test_auto_population_size_fits_the_budget() -> None:
    d = preset("paper")
    worst = max(bytes_per_member(a) for a in d.nets)
    assert auto_population_size(d, 10 * worst) == 10
    assert auto_population_size(d, 1) == 1
    assert auto_population_size(d, 1 << 40) == 60


def test_the_stored_plan_keeps_the_old_key() -> None:
    """The stored plan names the population size "chunk", as studies before the rename did: a
    design's studies row stays the same, and databases written before the rename still open."""
    d = StudyDesign(nets=("1*8",), trials=3)
    plan = make_plan(d, 12)
    assert plan.population_size == 12
    assert plan.to_dict() == {"chunk": 12, "populations": [["1*8", 1, 2], ["1*8", 3, 3]]}


def test_toml_design_and_names(tmp_path: Path) -> None:
    f = tmp_path / "widths.toml"
    f.write_text('name = "widths"\narchitectures = ["1*64", "[2*8, 1*4]"]\nmodes = ["none", "hidden"]\n'
                 'trials = 3\nmeta_loops = 5\nseed = 11\n[training]\nlr = 2e-4\nbatch_size = 128\n')
    name, d = resolve_design(design_file=str(f))
    assert name == "widths"
    assert d == StudyDesign.from_fields(architectures=("1*64", "[2*8, 1*4]"), modes=("none", "hidden"), trials=3,
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
    assert len(resolve_design(design_file=str(g))[1].nets) == 98


def test_modes_all_is_the_default_design(tmp_path: Path) -> None:
    """`--modes all`, as the help calls the default, names the same study as no --modes at all."""
    base = ["study", "--arch", "1*8", "--trials", "1", "--meta-loops", "1", "--dry-run", "--quiet"]
    rc_all, out_all, _ = run_main([*base, "--modes", "all"], tmp_path)
    rc_def, out_def, _ = run_main(base, tmp_path)
    rc_two, out_two, _ = run_main([*base, "--modes", "none,hidden"], tmp_path)
    assert rc_all == rc_def == rc_two == 0
    title = next(line for line in out_def.splitlines() if "plan" in line)
    assert title.startswith("study study-") and title in out_all and title not in out_two
    assert "6 modes" in out_all and "2 modes" in out_two


# ------------------------------------------------------------------------------------------
# bad input: one line, non-zero status, nothing written


BAD_DESIGNS = [
    (["--arch", "1*8", "--arch", "3*x"], "unknown architecture '3*x'"),
    (["--arch", "1*8", "--modes", "none,sideways"], "unknown mode 'sideways'"),
    (["--arch", "1*8", "--modes", "none,,hidden"], "an empty mode in 'none,,hidden'"),
    (["--arch", "[]", "--modes", "hidden"], "needs a hidden layer"),
    (["--arch", "1*8", "--arch", "[1*8]"], "listed more than once"),
    (["--arch", "1*8", "--trials", "0"], "an integer >= 1"),
    (["--arch", "1*8", "--trials", "10000000"], "a study of 60,000,000 trials (1 architectures x 6 conditions"),
    (["--arch", "1*8", "--lr", "-1"], "learning rate"),
    (["--arch", "1*8", "--name", "../evil"], "bad study name"),
    (["--preset", "nope"], "invalid choice"),
    (["--arch", "1*8", "--backend", "local", "--address", "x:1"], "apply to --backend ray"),
    ([], "no architectures"),
]


@pytest.mark.parametrize("argv,message", BAD_DESIGNS)
def test_bad_design_flags(argv: list[str], message: str, tmp_path: Path) -> None:
    rc, out, err = run_main(["study", *argv, "--quiet"], tmp_path)
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
    ("architectures = 5\n", "architectures must be a list of strings"),  # not a TypeError traceback
    ("architectures_file = 5\n", "architectures_file must be a file name"),
    ('architectures = ["1*8"]\ntrials = 99999999999999999999\n', "is more than psa's 1,000,000"),
    (b'\xff\xfe'.decode("latin-1"), "does not parse"),
])
def test_bad_design_files(text: str, message: str, tmp_path: Path) -> None:
    f = tmp_path / "design.toml"
    f.write_text(text)
    rc, out, err = run_main(["study", str(f), "--quiet"], tmp_path)
    assert rc == 2
    assert message in one_line_error(err)
    assert not (tmp_path / "results").exists()


def test_bad_arch_file(tmp_path: Path) -> None:
    (tmp_path / "archs.txt").write_text("# widths\n1*8\n\n2*banana\n")
    rc, out, err = run_main(["study", "--arch-file", "archs.txt"], tmp_path)
    assert rc == 2
    assert "archs.txt:4" in one_line_error(err)
    (tmp_path / "binary.txt").write_bytes(b"\xff\xfe1*8\n")  # UTF-16's byte-order mark: not UTF-8
    rc, out, err = run_main(["study", "--arch-file", "binary.txt", "--dry-run"], tmp_path)
    assert rc == 2 and "architecture file binary.txt is not UTF-8 text (byte 0)" in one_line_error(err)
    assert not (tmp_path / "results").exists()


def test_population_seconds_adds_the_measured_terms() -> None:
    """A population's estimate from its probe, by hand: set-up and warm-up once, every loop its
    steps, validation and the rest of a loop, the test set once, and a checkpoint after the
    first loop and then every `checkpoint_every` seconds."""
    from psa.study.calibration import Probe, population_seconds

    d = StudyDesign(nets=("1*8",), trials=2, hparams=HParams(meta_loops=10))  # 196 steps of 256
    p = Probe("1*8", 12, setup_s=1.0, step_s=0.01, spread=0.0, warmup_s=2.0, eval_image_s=1e-5,
              loop_extra_s=0.5, checkpoint_s=0.25, seconds=0.0)
    loop = 196 * 0.01 + 10_000 * 1e-5 + 0.5  # 2.56 s
    train = 10 * loop
    want = 1.0 + 2.0 + train + 10_000 * 1e-5 + (1 + int(train // 60)) * 0.25
    assert population_seconds(p, d, 12, 10_000, 10_000, checkpoint_every=60) == pytest.approx(want)
    assert population_seconds(p, d, 12, 10_000, 10_000, checkpoint_every=10) == pytest.approx(want + 2 * 0.25)  # 25.6 s: 3
    assert population_seconds(p, d, 12, 10_000, 10_000, checkpoint_every=0) == pytest.approx(want + 9 * 0.25)  # every loop


def test_a_checkpoint_write_costs_only_what_outlasts_a_loop() -> None:
    """The write runs beside the next loop (psa.study.checkpoints): a population's estimate
    counts only the part of it that outlasts a loop (the next checkpoint waits for it); a
    record from before the writer (no write_s) reads as it did."""
    import dataclasses

    from psa.study.calibration import Probe, population_seconds, record_probes

    d = StudyDesign(nets=("1*8",), trials=2, hparams=HParams(meta_loops=10))
    base = Probe("1*8", 12, setup_s=1.0, step_s=0.01, spread=0.0, warmup_s=2.0, eval_image_s=1e-5,
                 loop_extra_s=0.5, checkpoint_s=0.25, seconds=0.0)  # a loop: 2.56 s
    plain = population_seconds(base, d, 12, 10_000, 10_000, checkpoint_every=0)
    short = dataclasses.replace(base, write_s=2.0)
    assert population_seconds(short, d, 12, 10_000, 10_000, checkpoint_every=0) == pytest.approx(plain)
    long_ = dataclasses.replace(base, write_s=3.56)
    assert population_seconds(long_, d, 12, 10_000, 10_000, checkpoint_every=0) == pytest.approx(plain + 10 * 1.0)
    old = {k: v for k, v in dataclasses.asdict(long_).items() if k != "write_s"}
    record = {"version": 1, "probes": [old]}
    assert record_probes(record) == {"1*8": base}
    assert record_probes({"version": 1, "probes": [{k: v for k, v in old.items() if k != "step_s"}]}) is None
