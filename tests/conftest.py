"""Shared fixtures and helpers: the real MNIST split (loaded once), small slices of it and
population builders for engine tests, `psa` runners (in this process and as a subprocess),
the tiny reference study and row comparison for the study tests, and the published report
and comparison, each built once per session."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# Without a GPU, the Triton kernels run in Triton's interpreter. It is chosen when a kernel
# is decorated, so the variable must be set before psa.core.kernels.programs is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import psa  # noqa: E402
from psa.analysis.results import load_published  # noqa: E402
from psa.analysis.stats import summaries  # noqa: E402
from psa.cli import main  # noqa: E402
from psa.core import data as psa_data  # noqa: E402
from psa.core.device import resolve_execution  # noqa: E402
from psa.core.mlp.engine import Engine  # noqa: E402
from psa.core.hparams import HParams  # noqa: E402
from psa.core.mlp.population import Population  # noqa: E402

from .report_helpers import make_db  # noqa: E402

SRC = str(Path(psa.__file__).resolve().parents[1])


# ------------------------------------------------------------------------------------------
# data and populations


@pytest.fixture(scope="session")
def mnist() -> psa_data.Dataset:
    """The real MNIST split on the CPU."""
    return psa_data.load("mnist", device="cpu")


def subset(ds: psa_data.Dataset, n_train: int, n_val: int = 2000, n_test: int = 1000) -> psa_data.Dataset:
    """The first rows of each split: same format, fewer images, for tests of engine semantics."""
    return psa_data.Dataset(
        name=ds.name,
        train_x=ds.train_x[:n_train].clone(),
        train_y=ds.train_y[:n_train].clone(),
        val_x=ds.val_x[:n_val].clone(),
        val_y=ds.val_y[:n_val].clone(),
        test_x=ds.test_x[:n_test].clone(),
        test_y=ds.test_y[:n_test].clone(),
        source=ds.source,
    )


@pytest.fixture(scope="session")
def small(mnist: psa_data.Dataset) -> psa_data.Dataset:
    """2,048 training images: 64 steps of 32 per epoch."""
    return subset(mnist, 2048)


# The engine tests' hyperparameters: Table VI's learning rate; larger decay and dropout so that
# each mechanism visibly moves the weights within a few hundred steps (with lr = wd = 1e-4,
# AdamW's decay rounds away in fp32). At lr = 1e-3 the fused AdamW's last-bit rounding (vs the
# oracle's reference AdamW) grows to ~1e-5 through chaotic ablated runs; at the paper's 1e-4 it
# stays near 1e-7.
ENGINE_HP = HParams(lr=1e-4, weight_decay=0.05, dropout=0.3, batch_size=32)


def population(arch, ds: psa_data.Dataset, specs, hp: HParams = ENGINE_HP, device="cpu") -> Population:
    """A population of one member per (mode, seed) in `specs`, with `hp`'s decay and dropout
    rates, validating on `ds`."""
    members = [hp.member(mode, seed) for mode, seed in specs]
    return Population.create(arch, members, device, n_val=ds.val_y.numel())


def engine(pop: Population, ds: psa_data.Dataset, hp: HParams = ENGINE_HP, stream: object = None,
           **how: object) -> Engine:
    """An Engine for `pop` on `ds`, its execution resolved from `how` (precision, kernels, graphs,
    max_members) as the command line resolves its flags: `auto` unless given."""
    return Engine(pop, ds, hp, resolve_execution(pop.device, **how), stream=stream)


def layers(pop: Population, flat: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The population's LKG (or `flat`) as one weight and one bias tensor per Linear layer, all
    members stacked: what tests/tolerance.py compares, each layer against its own scale."""
    views = pop.layout.views(pop.lkg if flat is None else flat)
    return {f"layer {i} {name}": t for i, (w, b) in enumerate(views) for name, t in (("weight", w), ("bias", b))}


def set_paths(eng: Engine, **paths: bool) -> None:
    """Force an engine's paths (as kernels=auto picks them elsewhere: Triton on a GPU, ...)."""
    import dataclasses

    eng.paths = dataclasses.replace(eng.paths, **paths)
    eng.step = dataclasses.replace(eng.step, paths=eng.paths)


@pytest.fixture(autouse=True)
def _fixed_threads():
    # kernels may pick different reduction orders for different thread counts
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def fresh_seed() -> int:
    """A new random seed for a test's inputs, or PSA_TEST_SEED when it is set: a failure
    prints its seed, and `PSA_TEST_SEED=<seed> pytest ...` replays it."""
    fixed = os.environ.get("PSA_TEST_SEED")
    if fixed:
        return int(fixed)
    return int.from_bytes(os.urandom(4), "little")


# ------------------------------------------------------------------------------------------
# running psa


def run_main(argv: list[str], cwd: str | os.PathLike | None = None) -> tuple[int, str, str]:
    """`psa ARGV` in this process (in `cwd` if given): (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    here = os.getcwd()
    try:
        if cwd is not None:
            os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = main(argv)
    finally:
        os.chdir(here)
    return rc, out.getvalue(), err.getvalue()


@contextlib.contextmanager
def on_each_loop(fn, written: bool = True):
    """While inside: after a study handles each LoopDone event (psa.study.driver.Study.handle),
    fn(study, event) runs; it may raise KeyboardInterrupt to stop the study there, as Ctrl-C
    would. `written`: the checkpoints handed to the study's writer so far are on disk when fn
    runs (the writer's thread waited for), so that fn may read them. The handler is restored on
    leaving."""
    from psa.study import driver
    from psa.study.events import LoopDone

    handle = driver.Study.handle

    def patched(self, ev):
        handle(self, ev)
        if isinstance(ev, LoopDone):
            if written:
                self.checkpoints.wait()
            fn(self, ev)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(driver.Study, "handle", patched)
        yield


def study_db(tmp_path_factory: pytest.TempPathFactory, name: str, argv: list[str]) -> Path:
    """`psa study ARGV --db ref.sqlite` in this process, in a fresh temporary folder named after
    `name`; checked to succeed; returns the database's path."""
    d = tmp_path_factory.mktemp(name)
    rc, _, err = run_main(["study", *argv, "--db", "ref.sqlite"], d)
    assert rc == 0, err
    return d / "ref.sqlite"


def damage_tensors(path: Path, n: int = 64) -> bytes:
    """Flip the last `n` bytes of a safetensors file (the end of its last tensor, not its header),
    as a disk or a copy might; returns the damaged bytes."""
    data = bytearray(path.read_bytes())
    data[-n:] = bytes(b ^ 0x5A for b in data[-n:])
    path.write_bytes(bytes(data))
    return bytes(data)


def one_line_error(err: str) -> str:
    """The one line of a user error (exit status 2), checked to be one line without a traceback."""
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert lines[0].startswith("psa"), err
    return lines[0]


def env() -> dict[str, str]:
    """The environment for a `psa` subprocess that runs this checkout's code."""
    e = dict(os.environ)
    e["PYTHONPATH"] = SRC + (os.pathsep + e["PYTHONPATH"] if e.get("PYTHONPATH") else "")
    e.pop("PSA_DATA_DIR", None)
    return e


def psa_cmd(*args: str) -> list[str]:
    """argv of `python -m psa ARGS`."""
    return [sys.executable, "-m", "psa", *args]


def run_psa(*args: str, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run `psa ARGS` as a subprocess to completion in `cwd`."""
    return subprocess.run(psa_cmd(*args), cwd=cwd, env=env(), capture_output=True, text=True, timeout=timeout)


# ------------------------------------------------------------------------------------------
# studies: the tiny reference design, and what a results database holds

# 2 architectures x 6 modes x 2 trials, 6 meta-loops on 2,048 training images, populations of
# 6 members (one trial each): 4 populations, 24 trials, 144 meta-loop rows, ~10-20 s on 2 cores.
TINY = ["--arch", "1*8", "--arch", "2*8", "--trials", "2", "--meta-loops", "6", "--population-size", "6",
        "--train-subset", "2048", "--name", "tiny", "--quiet"]
TINY_TRIALS = 24
TINY_LOOP_ROWS = 24 * 6


def with_flag(argv: list[str], flag: str, value: str) -> list[str]:
    """`argv` with `flag`'s value replaced."""
    out = list(argv)
    out[out.index(flag) + 1] = value
    return out


def tiny_as(name: str, meta_loops: str, train_subset: str) -> list[str]:
    """TINY's flags under another study name, with other meta-loops and training images."""
    return with_flag(with_flag(with_flag(TINY, "--name", name), "--meta-loops", meta_loops),
                     "--train-subset", train_subset)


@pytest.fixture(scope="session")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted run of the tiny design (subprocess): the rows every other run must match."""
    d = tmp_path_factory.mktemp("reference")
    r = run_psa("study", *TINY, "--db", "ref.sqlite", cwd=d)
    assert r.returncode == 0, r.stderr
    return d / "ref.sqlite"


def _without_calibration(design: str) -> str:
    """A stored design without plan.calibration: probe timings of this machine, not results."""
    doc = json.loads(design)
    doc.get("plan", {}).pop("calibration", None)
    return json.dumps(doc)


def rows(db: Path) -> dict[str, list[tuple]]:
    """Every row that results carry, keyed by natural keys, without wall-clock columns (the
    design's calibration among them) or ids."""
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return {
            "studies": [(name, _without_calibration(design), digest, finished) for name, design, digest, finished in
                        con.execute("SELECT name, design, design_hash, finished_at IS NOT NULL FROM studies "
                                    "ORDER BY name")],
            "trials": con.execute(
                "SELECT s.name, t.arch, t.mode, t.trial, t.seed, t.meta_loops, t.lr, t.batch_size, t.weight_decay, "
                "t.dropout, t.dataset, t.status, t.bounty, t.bounty_loop, t.test_acc, t.loops_done "
                "FROM trials t JOIN studies s ON s.id = t.study_id ORDER BY 1, 2, 3, 4").fetchall(),
            "meta_loops": con.execute(
                "SELECT s.name, t.arch, t.mode, t.trial, m.loop, m.mode, m.candidate_acc, m.promoted, "
                "m.ablated_layer, m.ablated_index, m.lkg_score, m.train_loss, m.diverged "
                "FROM meta_loops m JOIN trials t ON t.id = m.trial_id JOIN studies s ON s.id = t.study_id "
                "ORDER BY 1, 2, 3, 4, 5").fetchall(),
        }
    finally:
        con.close()


def integrity(db: Path) -> str:
    """PRAGMA integrity_check of a database ("ok" when sound)."""
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return con.execute("PRAGMA integrity_check").fetchone()[0]
    finally:
        con.close()


def progress(db: Path) -> int:
    """Meta-loops recorded so far (+1000 per finished trial), or -1 before the tables exist."""
    if not db.exists():
        return -1
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
        try:
            r = con.execute("SELECT COALESCE(SUM(loops_done), 0) + 1000 * COALESCE(SUM(status = 'done'), 0) "
                            "FROM trials").fetchone()
            return int(r[0])
        finally:
            con.close()
    except sqlite3.Error:
        return -1


def leftover_checkpoints(db: Path) -> list[str]:
    """Checkpoint (and temporary) files left beside a database."""
    from psa.study.lock import checkpoint_root

    root = checkpoint_root(db)
    if not root.exists():
        return []
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and p.name != "lock")


def file_digest(path: Path) -> str:
    """SHA-256 of a file's bytes."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ------------------------------------------------------------------------------------------
# the published report and comparison


@pytest.fixture(scope="session")
def published_report(tmp_path_factory):
    """`psa report --reference published` run once for the whole session: (out dir, stdout)."""
    out = tmp_path_factory.mktemp("pub") / "report"
    rc, stdout, _ = run_main(["report", "--reference", "published", "--out", str(out)])
    assert rc == 0
    return out, stdout


@pytest.fixture(scope="session")
def published_compare(tmp_path_factory):
    """`psa compare --published --reference seed` run once for the session: (out dir, stdout)."""
    out = tmp_path_factory.mktemp("cmp") / "compare"
    rc, stdout, _ = run_main(["compare", "--published", "--reference", "seed", "--out", str(out)])
    assert rc == 0
    return out, stdout


@pytest.fixture(scope="session")
def published_data():
    """The authors' published data and its cell summaries: (StudyData, {(arch, mode): CellSummary})."""
    data = load_published()
    return data, summaries(data.trials)


@pytest.fixture(scope="session")
def full_db(tmp_path_factory):
    """A complete study of five architectures holding their published peaks: (path, what was written)."""
    path = tmp_path_factory.mktemp("db") / "psa.sqlite"
    written = make_db(path, ["1*2048", "1*32", "4*4", "18*18", "21*21"], loops=20)
    return path, written
