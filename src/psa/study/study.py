"""Studies: many architectures x modes x trials, planned into populations, resumable, in SQLite.

A design (design.StudyDesign) says what to run; a plan (plan.Plan) partitions its trials into
populations; this module runs them (run_study) and writes every meta-loop to the results database.

Invariants that make a killed study resume to exactly the rows of an uninterrupted one:
- Trial k of every mode has seed `seed + k - 1` (paired design).
- The partition of trials into populations is a pure function of the design and the chunk
  size (stored with the study), never of what is left to do: a member's floating-point results
  may depend on which members share its population, so a resume rebuilds the same populations.
- Per meta-loop of a population, the driver first commits that loop's rows (INSERT OR REPLACE,
  keyed by trial and loop) with the trials' progress in one transaction, then, when one is due
  (opt.checkpoint_every), atomically replaces the population's checkpoint. A kill leaves the
  database some loops ahead of the checkpoint; the resume recomputes those loops from the
  checkpoint (all randomness is a function of seed and loop, so they are the same loops) and
  overwrites their rows. The study's precision and the random streams' version are fixed
  when it is created; a checkpoint of other streams or precision is not continued.
- Final results (bounty, test accuracy, status 'done') commit in one transaction; only then is
  the checkpoint removed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import json
import math
import os
import socket
import subprocess
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from psa import __version__
from psa.core import rng
from psa.study import store
from psa.core.arch import parse_arch
from psa.core.checkpoint import CheckpointError, load_population, save_population
from psa.core.data import N_VAL, Dataset
from psa.study.design import DesignError, StudyDesign
from psa.core.engine import (
    FREE_MEMORY_FRACTION,
    Engine,
    PendingLoop,
    TrainConfig,
    free_memory,
    kernel_launches,
    memory_paths,
    new_streams,
    release_cached,
    side_stream,
)
from psa.study.plan import (
    DEFAULT_CALIBRATION,
    PopulationPlan,
    Plan,
    arch_flops,
    auto_chunk,
    bytes_per_member,
    calibrate,
    describe_device,
    device_budget,
    fmt_seconds,
    make_plan,
)
from psa.core.population import Population
from psa.core.precision import resolve as resolve_precision
from psa.study.store import StoreError

DEFAULT_DB = Path("results") / "psa.sqlite"


class StudyError(RuntimeError):
    """A study that cannot start or continue: locked, disk full, different design, failures."""


# ---------------------------------------------------------------------------------------------
# Running one population: a generator of events, the same for every backend


@dataclass
class Started:
    """A population began (or resumed) on a device."""

    key: str
    where: str
    loop: int


@dataclass
class LoopDone:
    """One meta-loop of a population: a row per member, and the population after it.

    `checkpoint` says who decides whether this loop's population is checkpointed: None, the
    recorder by its own clock (a local run, which always attaches the live population); True or
    False, the runner (a Ray worker ships a CPU copy of its population, hundreds of MB for a
    big one, only when a checkpoint is due, and None in its place otherwise).
    """

    key: str
    loop: int
    rows: list[tuple]  # per member: (mode, seed, candidate_acc, promoted, layer, index, lkg_score, loss, diverged)
    population: Population | None
    seconds: float  # wall seconds of the population so far, over all sessions
    checkpoint: bool | None = None


@dataclass
class PopulationDone:
    """A population's final results, per member in population order."""

    key: str
    members: list[tuple[str, int]]  # (mode, seed)
    bounty: list[float | None]
    bounty_loop: list[int | None]
    test_acc: list[float]
    seconds: float


@dataclass
class PopulationFailed:
    """A population raised; its trials are marked failed and a rerun retries them."""

    key: str
    message: str


def _finite_or_none(x: float) -> float | None:
    return x if math.isfinite(x) else None


class PopulationRun:
    """One population in training: its engine, and the events of its meta-loops as they finish.

    launch() queues the next meta-loop on the device and returns; collect() waits for it and
    returns its LoopDone (and the PopulationDone after the last loop). The LoopDone's
    population is the live object: a consumer that checkpoints it must do so before the next
    launch().
    """

    def __init__(self, design: StudyDesign, pp: PopulationPlan, data: Dataset, start: Population | None,
                 config: TrainConfig | None = None, prior_seconds: float = 0.0, where: str = "",
                 stream: Any = None) -> None:
        device = data.device
        if start is None:
            pop = Population.create(parse_arch(pp.arch), pp.members(design), device, n_val=data.val_y.numel())
        else:
            pop = start
        self.design, self.pp, self.pop = design, pp, pop
        self.engine = Engine(pop, data, config or design.train_config(), stream=stream)
        self.prior_seconds = prior_seconds
        self.where = where or str(device)
        self.t0 = time.perf_counter()
        self.pending: PendingLoop | None = None

    def started(self) -> Started:
        """The Started event (where, and from which loop)."""
        return Started(self.pp.key, self.where, self.pop.loop)

    @property
    def to_go(self) -> int:
        """Meta-loops not yet launched."""
        return self.design.meta_loops - self.pop.loop

    def seconds(self) -> float:
        """Wall seconds of this population so far, over all sessions."""
        return self.prior_seconds + time.perf_counter() - self.t0

    def launch(self) -> None:
        """Queue the next meta-loop."""
        self.pending = self.engine.launch()

    def collect(self) -> list[LoopDone | PopulationDone]:
        """Wait for the queued meta-loop: its LoopDone, and the PopulationDone if it was the last."""
        assert self.pending is not None
        r = self.pending.result()
        self.pending = None
        rows = []
        for j, mem in enumerate(self.pop.members):
            a = r.ablated[j]
            rows.append((
                mem.mode, mem.seed,
                _finite_or_none(r.candidate_acc[j]), int(r.promoted[j]),
                None if a is None else int(a[0]), None if a is None else int(a[1]),
                float(r.lkg_score[j]), _finite_or_none(r.train_loss[j]), int(r.diverged[j]),
            ))
        events: list[LoopDone | PopulationDone] = [LoopDone(self.pp.key, r.loop, rows, self.pop, self.seconds())]
        if self.to_go <= 0:
            events.append(self.finish())
        return events

    def finish(self) -> PopulationDone:
        """Test accuracy of every LKG and the final results."""
        test = self.engine.test_accuracy()
        scores = self.pop.lkg_score()
        return PopulationDone(
            key=self.pp.key,
            members=[(m.mode, m.seed) for m in self.pop.members],
            bounty=[s if s >= 0 else None for s in scores],
            bounty_loop=[bl if bl > 0 else None for bl in self.pop.bounty_loop],
            test_acc=list(test),
            seconds=self.seconds(),
        )


def population_events(
    design: StudyDesign,
    pp: PopulationPlan,
    data: Dataset,
    start: Population | None,
    prior_seconds: float = 0.0,
    where: str = "",
    config: TrainConfig | None = None,
) -> Iterator[Started | LoopDone | PopulationDone]:
    """Train one population to the design's meta-loops, from scratch or from `start`, one loop
    at a time: Started, one LoopDone per meta-loop and a final PopulationDone. `config`
    defaults to the design's hyperparameters with the engine's defaults."""
    run = PopulationRun(design, pp, data, start, config, prior_seconds, where)
    yield run.started()
    if run.to_go <= 0:
        yield run.finish()
        return
    while run.to_go > 0:
        run.launch()
        yield from run.collect()


def population_to(pop: Population, device: torch.device | str) -> Population:
    """A copy of `pop` on another device (the CPU for shipping, a worker's device to train)."""
    lkg = pop.lkg.to(device)
    dev = lkg.device  # as tensors see it ("cuda" -> "cuda:0"), which is what the engine compares
    return dataclasses.replace(pop, device=dev, lkg=lkg, lkg_correct=pop.lkg_correct.to(dev),
                               bounty_loop=list(pop.bounty_loop), mode_history=[list(h) for h in pop.mode_history])


# ---------------------------------------------------------------------------------------------
# The study lock: one writer per study


def checkpoint_root(db: Path) -> Path:
    """Where a database's population checkpoints live: results/psa.sqlite -> results/psa.ckpt."""
    return db.with_name(db.stem + ".ckpt") if db.suffix else db.with_name(db.name + ".ckpt")


class StudyLock:
    """An exclusive flock on `<checkpoint dir>/lock`, held while a study runs.

    The kernel drops it when the process dies (even SIGKILL), so a crash never leaves a stale
    lock. Two `psa study` processes on one study: the second refuses; different studies in one
    database cooperate through SQLite's own locking (short IMMEDIATE transactions).
    """

    def __init__(self, directory: Path, study: str, db: Path) -> None:
        self.path = directory / "lock"
        self.study = study
        self.db = db
        self.fd: int | None = None

    def acquire(self, attempts: int = 20) -> None:
        """Take the lock or raise StudyError naming the process that holds it."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise StudyError(f"cannot create {self.path}: {e.strerror}") from None
        for i in range(attempts):  # `psa status` takes a shared lock for an instant: retry briefly
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if i == attempts - 1:
                    owner = lock_owner(self.path) or {}
                    os.close(fd)
                    who = f"pid {owner.get('pid', '?')} on {owner.get('host', '?')}"
                    since = f" since {owner['since']}" if owner.get("since") else ""
                    raise StudyError(f"study {self.study!r} in {self.db} is already being run by {who}{since}; "
                                     f"wait for it to finish or stop it first") from None
                time.sleep(0.1)
        info = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": store.utc_now()})
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, info.encode(), 0)
        except OSError:
            pass  # the lock itself is what matters; the note is for messages
        self.fd = fd

    def release(self) -> None:
        """Drop the lock (also dropped when the process exits)."""
        if self.fd is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self.fd, fcntl.LOCK_UN)
                os.close(self.fd)
            self.fd = None


def lock_owner(path: Path) -> dict[str, Any] | None:
    """The pid/host/since note in a lock file, if readable."""
    try:
        return json.loads(path.read_text() or "null")
    except (OSError, ValueError):
        return None


def lock_held(directory: Path) -> bool | None:
    """Whether a process holds the study lock in `directory` now (None: cannot tell)."""
    path = directory / "lock"
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    except BlockingIOError:
        return True
    except OSError:
        return None
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------
# The driver


@dataclass(frozen=True)
class RunOptions:
    """How to run a study (not what: that is the design)."""

    db: Path = DEFAULT_DB
    device: str = "auto"
    chunk: int | None = None  # None: the stored chunk, else auto_chunk for the device
    backend: str = "local"  # local | ray
    address: str | None = None  # ray: an existing cluster; None starts a local instance
    num_cpus: int | None = None  # ray: CPUs of a local instance
    cpus_per_task: int = 1  # ray: CPUs per population where there is no GPU
    per_device: int = 1  # ray: populations sharing one GPU
    max_retries: int = 3  # ray: resubmissions of a population whose worker was lost
    data_dir: str | None = None
    busy_timeout: float = 60.0
    quiet: bool = False
    precision: str = "auto"  # of the matmuls (psa.precision); fixed when the study is created
    kernels: str = "auto"  # auto | torch | triton (TrainConfig.kernels)
    graphs: bool = True  # CUDA graphs on a GPU
    concurrency: int | None = None  # populations in flight on one GPU; None: 8 on a GPU, 1 elsewhere
    checkpoint_every: float = 60.0  # seconds between a population's checkpoints (0: every meta-loop)


def code_version() -> str:
    """psa's version, plus the git commit when running from a checkout."""
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "-C", str(here), "describe", "--always", "--dirty"], capture_output=True,
                             text=True, timeout=5, check=False)
        if out.returncode == 0 and out.stdout.strip():
            return f"{__version__}+{out.stdout.strip()}"
    except (OSError, subprocess.SubprocessError):
        pass
    return __version__


def trial_rows(design: StudyDesign) -> list[dict[str, Any]]:
    """The trials table rows of a design, in design order (architecture, mode, trial)."""
    cfg = design.train_config()
    out = []
    for arch in design.architectures:
        for mode in design.modes:
            for k in range(1, design.trials + 1):
                m = design.member(mode, k)
                out.append({"arch": arch, "mode": mode, "trial": k, "seed": m.seed, "meta_loops": design.meta_loops,
                            "lr": cfg.lr, "batch_size": cfg.batch_size, "weight_decay": m.weight_decay,
                            "dropout": m.dropout, "dataset": design.dataset_label})
    return out


def stored_design(row: Any) -> dict[str, Any]:
    """The design JSON of a studies row."""
    try:
        d = json.loads(row["design"])
        return d if isinstance(d, dict) else {}
    except (TypeError, ValueError):
        return {}


def _design_difference(stored: dict[str, Any], design: StudyDesign) -> str:
    new = design.to_dict()
    for k in [*new, *(k for k in stored if k not in new and k not in ("plan", "seeds"))]:
        v, old = new.get(k), stored.get(k)
        if old != v:
            if isinstance(v, list) and isinstance(old, list) and len(v) > 6:
                return f"{k}: {len(old)} entries there, {len(v)} here" if len(old) != len(v) else f"{k} differ"
            return f"{k}: {old!r} there, {v!r} here"
    return "the design"


@dataclass
class PopulationState:
    """What the driver knows about one population of the plan while the study runs."""

    plan: PopulationPlan
    trial_ids: dict[tuple[str, int], int]  # (mode, seed) -> trial id
    done: bool
    loops_done: int  # from the database: min over members
    start: Population | None = None
    prior_seconds: float = 0.0
    loop: int = 0
    attempts: int = 0


class Study:
    """A study bound to a database: plans, resumes, runs, and records."""

    def __init__(self, name: str, design: StudyDesign, options: RunOptions, console: Any = None) -> None:
        from psa.study.console import err_console

        self.name = name
        self.design = design
        self.opt = options
        self.db = Path(options.db)
        self.console = console or err_console
        self.ckpt_dir = checkpoint_root(self.db) / name
        self.lock = StudyLock(self.ckpt_dir, name, self.db)
        self.con: Any = None
        self.study_id = 0
        self.run_id = 0
        self.plan: Plan | None = None
        self.pops: dict[str, PopulationState] = {}
        self.precision = "fp32"
        self._saved_at: dict[str, float] = {}
        self._full_sync = True

    # ------------------------------------------------------------------ setup
    def open(self, device_desc: str, device: torch.device) -> None:
        """Connect, lock the study, create or check its row and trials, and load the plan."""
        try:
            self.con = store.connect(self.db, timeout=self.opt.busy_timeout)
        except OSError as e:
            raise StudyError(f"cannot create the results database {self.db}: {e.strerror or e}") from None
        # a commit must be on disk before the checkpoint that follows it (power loss): see _durable
        self.con.execute("PRAGMA synchronous=FULL")
        self._full_sync = True
        self.lock.acquire()
        row = store.get_study(self.con, self.name)
        if row is None:
            chunk = self.opt.chunk
            if chunk is None:
                budget = 8 << 30 if self.opt.backend == "ray" else device_budget(device)
                chunk = auto_chunk(self.design, budget)
            plan = make_plan(self.design, chunk)
            engine = {"precision": resolve_precision(self.opt.precision, device), "rng": rng.VERSION}
            doc = {**self.design.to_dict(), "seeds": "trial k of every mode: seed + k - 1",
                   "plan": {**plan.to_dict(), "engine": engine}}
            self.study_id = store.create_study(self.con, self.name, json.dumps(doc), self.design.digest(),
                                               code_version(), device_desc, trial_rows(self.design))
            row = store.get_study(self.con, self.name)
        self.study_id = int(row["id"])
        if row["design_hash"] != self.design.digest():
            raise StudyError(
                f"study {self.name!r} in {self.db} was created with a different design "
                f"({_design_difference(stored_design(row), self.design)}); pass --name to start a new study")
        stored_plan = stored_design(row).get("plan", {})
        chunk = int(stored_plan.get("chunk", 0)) or None
        if chunk is None:
            raise StudyError(f"study {self.name!r} in {self.db} has no stored plan; was it written by another tool?")
        if self.opt.chunk is not None and self.opt.chunk != chunk:
            raise StudyError(f"study {self.name!r} was planned with --chunk {chunk}; resume it with the same chunk "
                             f"(or omit --chunk)")
        # studies from before the field ran in strict fp32
        self.precision = str(stored_plan.get("engine", {}).get("precision", "fp32"))
        if self.opt.precision != "auto" and resolve_precision(self.opt.precision, device) != self.precision:
            raise StudyError(f"study {self.name!r} was created with --precision {self.precision}; resume it with "
                             f"the same precision (or omit --precision)")
        self.plan = make_plan(self.design, chunk)
        stored_pops = sorted(tuple(x) for x in stored_plan.get("populations", []))
        if stored_pops and stored_pops != sorted((p.arch, p.first, p.last) for p in self.plan.populations):
            raise StudyError(f"study {self.name!r}: the stored plan does not match this version's planner")
        trials = store.study_trials(self.con, self.study_id)
        by_key = {(t["arch"], t["mode"], t["trial"]): t for t in trials}
        if len(by_key) != self.design.n_trials:
            raise StudyError(f"study {self.name!r} in {self.db} has {len(by_key)} trials, "
                             f"its design {self.design.n_trials}")
        for pp in self.plan.populations:
            rows = [by_key[(pp.arch, m, k)] for k in pp.trials for m in pp.modes]
            ids = {(r["mode"], int(r["seed"])): int(r["id"]) for r in rows}
            done = all(r["status"] == "done" for r in rows)
            self.pops[pp.key] = PopulationState(pp, ids, done, min(int(r["loops_done"]) for r in rows))

    def train_config(self) -> TrainConfig:
        """The engine configuration of this study's populations: the design's hyperparameters,
        the study's precision, and how this run was asked to execute them."""
        return dataclasses.replace(self.design.train_config(), precision=self.precision,
                                   kernels=self.opt.kernels, graphs=self.opt.graphs)

    def _ckpt_path(self, pp: PopulationPlan) -> Path:
        return self.ckpt_dir / f"{pp.key}.safetensors"

    def load_checkpoints(self) -> list[str]:
        """Attach every usable checkpoint to its population; clean up the rest. Returns notes."""
        notes = []
        for tmp in self.ckpt_dir.glob(".*.tmp"):  # an atomic write killed half-way
            with contextlib.suppress(OSError):
                tmp.unlink()
        known = {self._ckpt_path(st.plan).name for st in self.pops.values()}
        for f in self.ckpt_dir.glob("*.safetensors"):
            if f.name not in known:
                notes.append(f"ignoring unknown checkpoint {f}")
        for st in self.pops.values():
            path = self._ckpt_path(st.plan)
            if not path.exists():
                continue
            if st.done:
                with contextlib.suppress(OSError):
                    path.unlink()  # finished after its last checkpoint: nothing to resume
                continue
            try:
                pop, meta = load_population(path, "cpu")
                expected = [(m.mode, m.seed, m.weight_decay, m.dropout) for m in st.plan.members(self.design)]
                got = [(m.mode, m.seed, m.weight_decay, m.dropout) for m in pop.members]
                if meta.get("study") != self.name or meta.get("design_hash") != self.design.digest():
                    raise CheckpointError("it belongs to another study or design")
                if meta.get("rng") != rng.VERSION:
                    raise CheckpointError("an older psa wrote it, whose data order and dropout were drawn differently")
                if meta.get("precision", "fp32") != self.precision:
                    raise CheckpointError(f"it was trained in {meta.get('precision', 'fp32')}, the study is {self.precision}")
                if got != expected or str(pop.arch) != str(parse_arch(st.plan.arch)):
                    raise CheckpointError("its members differ from the plan's")
                if not 0 <= pop.loop <= self.design.meta_loops:
                    raise CheckpointError(f"it is at meta-loop {pop.loop}")
                if st.loops_done < pop.loop:
                    # rows always commit before the checkpoint is written; anything else means the
                    # database was replaced: start over rather than leave holes
                    raise CheckpointError(f"the database has only {st.loops_done} of its {pop.loop} meta-loops")
            except CheckpointError as e:
                notes.append(f"restarting {st.plan.label()} from scratch: checkpoint {path.name} unusable ({e})")
                continue
            st.start = pop
            st.prior_seconds = float(meta.get("seconds", 0.0))
            st.loop = pop.loop
        return notes

    # ------------------------------------------------------------------ event handling
    def work_units(self, pp: PopulationPlan, loops: int) -> float:
        """Progress weight of `loops` meta-loops of a population (estimated seconds)."""
        return DEFAULT_CALIBRATION.loop_seconds(pp.arch, pp.size, self.design.batch_size, self.design.n_train) * loops

    def handle(self, ev: Started | LoopDone | PopulationDone | PopulationFailed) -> None:
        """Record one event: rows first, then the checkpoint (see the module docstring)."""
        st = self.pops[ev.key]
        if isinstance(ev, Started):
            store.mark_running(self.con, list(st.trial_ids.values()))
        elif isinstance(ev, LoopDone):
            if ev.loop <= st.loop:
                return  # a replay (retried task) of a loop already recorded
            # Checkpoints are written every opt.checkpoint_every seconds, not every loop: a big
            # population's is hundreds of MB. A resume recomputes the loops since the last one
            # (the same loops: all randomness is a function of seed and loop) and overwrites them.
            now = time.monotonic()
            if ev.checkpoint is None:
                due = now - self._saved_at.get(ev.key, -math.inf) >= self.opt.checkpoint_every
            else:
                due = ev.checkpoint and ev.population is not None
            self._durable(due)  # the commit before a checkpoint must be on disk first
            rows = [(st.trial_ids[(mode, seed)], ev.loop, mode, *rest) for mode, seed, *rest in ev.rows]
            store.record_loop(self.con, self.run_id, rows, ev.loop, ev.seconds, list(st.trial_ids.values()))
            st.loop = ev.loop
            if not due:
                return
            extra = {"study": self.name, "population": st.plan.key, "design_hash": self.design.digest(),
                     "seconds": ev.seconds, "rng": rng.VERSION, "precision": self.precision}
            try:
                save_population(self._ckpt_path(st.plan), ev.population, extra)
            except OSError as e:
                raise StudyError(self._disk_message(e, self._ckpt_path(st.plan))) from None
            self._saved_at[ev.key] = now
        elif isinstance(ev, PopulationDone):
            self._durable(True)
            results = []
            for (mode, seed), b, bl, t in zip(ev.members, ev.bounty, ev.bounty_loop, ev.test_acc):
                results.append((st.trial_ids[(mode, seed)], b, bl, t, ev.seconds, self.design.meta_loops))
            store.finish_trials(self.con, self.run_id, results)
            st.done = True
            with contextlib.suppress(FileNotFoundError):
                self._ckpt_path(st.plan).unlink()
        elif isinstance(ev, PopulationFailed):
            store.fail_trials(self.con, list(st.trial_ids.values()))

    def _durable(self, full: bool) -> None:
        """synchronous=FULL (fsync at commit) or NORMAL for the next commits. In WAL mode a FULL
        commit also makes every earlier NORMAL one durable, so one fsync before each checkpoint
        keeps the rows-before-checkpoint order through a power loss, without one per loop."""
        if full != self._full_sync:
            self.con.execute(f"PRAGMA synchronous={'FULL' if full else 'NORMAL'}")
            self._full_sync = full

    def _disk_message(self, e: OSError, path: Path) -> str:
        if e.errno == errno.ENOSPC:
            return (f"no space left on device writing {path}; the database and the previous checkpoint are intact: "
                    f"free some space and rerun the same command to resume")
        return f"cannot write {path}: {e.strerror or e}; the database is intact: rerun the same command to resume"


def resolve_device_name(name: str) -> torch.device:
    """`psa train`'s device rules (auto: cuda, then mps, then cpu)."""
    from psa.study.train import resolve_device

    return resolve_device(name)


# ---------------------------------------------------------------------------------------------
# Progress on the terminal


class StudyProgress:
    """A rich progress bar over the whole study (weighted by estimated work, so its ETA means
    something), a line per running population, and a one-line summary per finished one."""

    def __init__(self, study: Study, quiet: bool) -> None:
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self.study = study
        self.quiet = quiet
        self.console = study.console
        total = sum(study.work_units(st.plan, study.design.meta_loops) for st in study.pops.values())
        done = sum(study.work_units(st.plan, study.design.meta_loops if st.done else st.loop)
                   for st in study.pops.values())
        self.trials_total = study.design.n_trials
        self.trials_done = sum(st.plan.size for st in study.pops.values() if st.done)
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=self.console,
            transient=False,
            speed_estimate_period=3600.0,
            disable=quiet or not self.console.is_terminal,
        )
        self.main = self.progress.add_task(f"study {study.name}", total=max(total, 1e-9), completed=done,
                                           info=self._trials_info())
        self.rows: dict[str, Any] = {}
        self.best: dict[str, dict[str, float]] = {}

    def _trials_info(self) -> str:
        return f"{self.trials_done}/{self.trials_total} trials"

    def __enter__(self) -> "StudyProgress":
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.progress.__exit__(*exc)

    def finish(self) -> None:
        """Fill the study bar (its work units are estimates; their float sum may fall short)."""
        task = self.progress.tasks[0]
        self.progress.update(self.main, completed=task.total)

    def print(self, text: str) -> None:
        """A line above the bars (or on its own without a terminal)."""
        if not self.quiet:
            self.progress.console.print(text, soft_wrap=True, highlight=False)

    def event(self, ev: Any) -> None:
        """Advance the display after the study recorded `ev`."""
        st = self.study.pops[ev.key]
        pp = st.plan
        loops = self.study.design.meta_loops
        if isinstance(ev, Started):
            if ev.key not in self.rows:
                self.rows[ev.key] = self.progress.add_task(f"  {pp.label()}", total=loops, completed=ev.loop,
                                                           info=f"{pp.size} members on {ev.where}")
        elif isinstance(ev, LoopDone):
            self.progress.advance(self.main, self.study.work_units(pp, 1))
            if ev.key in self.rows:
                self.progress.update(self.rows[ev.key], completed=ev.loop)
        elif isinstance(ev, PopulationDone):
            self.trials_done += pp.size
            self.progress.update(self.main, info=self._trials_info())
            if ev.key in self.rows:
                self.progress.remove_task(self.rows.pop(ev.key))
            best: dict[str, float] = {}
            for (mode, _), b in zip(ev.members, ev.bounty):
                if b is not None:
                    best[mode] = max(best.get(mode, -1.0), b)
            bounties = "  ".join(f"{m} {best[m]:.2f}" if m in best else f"{m} -" for m in pp.modes)
            self.print(f"done {pp.label()}: {pp.size} members, {loops} meta-loops, {ev.seconds:.1f}s; "
                       f"best bounty {bounties}  [{self.trials_done}/{self.trials_total} trials]")
        elif isinstance(ev, PopulationFailed):
            if ev.key in self.rows:
                self.progress.remove_task(self.rows.pop(ev.key))
            self.print(f"[red]FAILED[/] {pp.label()}: {ev.message}")


# ---------------------------------------------------------------------------------------------
# Backends


_DATA_CACHE: dict[tuple[str, str | None, str], Dataset] = {}


def cached_data(name: str, data_dir: str | None, device: torch.device) -> Dataset:
    """The data set on `device`, loaded once per process (Ray reuses worker processes)."""
    from psa.core.data import load

    key = (name, data_dir, str(device))
    if key not in _DATA_CACHE:
        _DATA_CACHE.clear()
        _DATA_CACHE[key] = load(name, data_dir, device)
    return _DATA_CACHE[key]


def design_data(design: StudyDesign, data_dir: str | None, device: torch.device) -> Dataset:
    """The data a design trains on: the data set, cut to `train_subset` images if it says so."""
    data = cached_data(design.dataset, data_dir, device)
    if design.train_subset is not None:
        n = design.train_subset
        data = dataclasses.replace(data, train_x=data.train_x[:n], train_y=data.train_y[:n])
    return data


def local_events(study: Study, todo: list[PopulationState], device: torch.device) -> Iterator[Any]:
    """Populations on this process's device, largest work first: one after another, or on a
    GPU several at once (opt.concurrency), so that small populations fill the device together."""
    data = design_data(study.design, study.opt.data_dir, device)
    precompile_kernels(study, todo, device, data)
    slots = study.opt.concurrency or (8 if device.type == "cuda" else 1)
    if slots > 1:
        yield from concurrent_events(study, todo, device, data, slots)
        return
    for st in todo:
        start = population_to(st.start, device) if st.start is not None else None
        gen = population_events(study.design, st.plan, data, start, st.prior_seconds, describe_device(device),
                                study.train_config())
        failed = None
        try:
            for ev in gen:
                yield ev
        except Exception as e:  # noqa: BLE001 - one population's failure must not stop the study
            failed = _failed(st, e, device)
        if failed is not None:
            _drain(device)
            del gen  # out of the handler: its traceback no longer holds the engine
            release_cached(device)
            yield failed


def precompile_kernels(study: Study, todo: list[PopulationState], device: torch.device, data: Dataset) -> int:
    """Compile the Triton kernels that the populations in `todo` will launch on CUDA `device`, up
    front and in parallel (kernels.precompile), rather than one population's at its first loop
    while the GPU waits. Returns the number of kernel variants (0 off CUDA or without Triton);
    a failure here only warns: the kernels then compile at their first launch."""
    from psa.core import kernels

    if device.type != "cuda" or not kernels.available():
        return 0
    cfg = study.train_config()
    launches: list[kernels.Launch] = []
    seen: set[tuple[str, int, tuple[str, ...]]] = set()
    try:
        for st in todo:
            key = (st.plan.arch, st.plan.size, st.plan.modes)  # trials differ only in their seeds
            if key not in seen:
                seen.add(key)
                launches += kernel_launches(parse_arch(st.plan.arch), st.plan.members(study.design), data, cfg, device)
        return kernels.precompile(launches, device)
    except Exception as e:  # noqa: BLE001 - an optimisation; the study runs without it
        warnings.warn(f"psa: precompiling the Triton kernels failed ({type(e).__name__}: {e}); they compile at "
                      f"their first launch", RuntimeWarning, stacklevel=2)
        return 0


def _failed(st: PopulationState, e: BaseException, device: torch.device) -> PopulationFailed:
    return PopulationFailed(st.plan.key, f"{type(e).__name__}: {e}".splitlines()[0])


def _drain(device: torch.device, stream: Any = None) -> None:
    """Wait for the work a failed population left queued (on `stream`, else on the whole
    device): it may still write into memory that is about to be freed and handed to the next
    population."""
    if stream is None and device.type != "cuda":
        return
    # a broken CUDA context fails this too; the next population will report it
    with contextlib.suppress(RuntimeError):
        if stream is not None:
            stream.synchronize()
        else:
            torch.cuda.synchronize(device)


class StreamSlots:
    """The CUDA streams of the populations in flight: made once, one per slot, each lent to one
    population at a time. Engines that made their own would share PyTorch's pooled streams
    (populations p and p+16 on one stream, serialising each other). Off CUDA every slot is None."""

    def __init__(self, device: torch.device, slots: int) -> None:
        if device.type == "cuda":
            self.free: list[Any] = new_streams(device, slots, avoid=(side_stream(device),))
        else:
            self.free = [None] * slots
        self.slots = len(self.free)

    def take(self) -> Any:
        """A stream no population in flight has."""
        return self.free.pop(0)

    def give(self, stream: Any) -> None:
        """Return a population's stream; the population must have no work left queued on it."""
        self.free.append(stream)


def concurrent_events(study: Study, todo: list[PopulationState], device: torch.device, data: Dataset,
                      slots: int) -> Iterator[Any]:
    """Up to `slots` populations in flight at once, each engine on its slot's CUDA stream.

    Every running population has one meta-loop queued on the device; the driver takes the
    first that has finished (else waits for the oldest), hands its events on (the consumer
    records them and checkpoints), and queues that population's next loop while the others
    keep the device busy. A population is admitted while the estimated memory of those in
    flight fits the device's free memory (at least one always runs). Each engine computes exactly what it would alone, so the rows are those of a
    one-at-a-time run.
    """
    queue = list(todo)
    active: list[tuple[PopulationState, PopulationRun, Any]] = []
    streams = StreamSlots(device, slots)
    free = free_memory(device)
    budget = None if free is None else free * FREE_MEMORY_FRACTION
    bs = study.design.batch_size
    cfg = study.train_config()
    per_member: dict[str, int] = {}

    def need(st: PopulationState) -> int:
        a = st.plan.arch
        if a not in per_member:
            per_member[a] = bytes_per_member(a, bs, **memory_paths(parse_arch(a), device, cfg))
        return st.plan.size * per_member[a]

    while queue or active:
        while queue and streams.free and (
                not active or budget is None or sum(need(s) for s, _, _ in active) + need(queue[0]) <= budget):
            st = queue.pop(0)
            stream = streams.take()
            run = failed = None
            try:
                start = population_to(st.start, device) if st.start is not None else None
                run = PopulationRun(study.design, st.plan, data, start, study.train_config(), st.prior_seconds,
                                    describe_device(device), stream=stream)
                yield run.started()
                if run.to_go <= 0:
                    yield run.finish()
                    run = None
                    streams.give(stream)
                    continue
                run.launch()
            except Exception as e:  # noqa: BLE001 - one population's failure must not stop the study
                failed = _failed(st, e, device)
            if failed is not None:
                _drain(device, stream)
                run = None
                yield from _give_back_failed(streams, stream, failed, device)
                continue
            active.append((st, run, stream))
        if not active:
            continue
        # the first population whose loop has finished, else the oldest: a small population's
        # quick loops need not wait behind a big one's
        i = next((i for i, (_, r, _) in enumerate(active) if r.pending is not None and r.pending.ready()), 0)
        st, run, stream = active.pop(i)
        failed = None
        try:
            events = run.collect()
        except Exception as e:  # noqa: BLE001
            failed = _failed(st, e, device)
        if failed is None:
            yield from events  # the consumer checkpoints before we queue the next loop
            if run.to_go <= 0:
                run = None  # done: its memory goes before the next population is admitted
                streams.give(stream)
                continue
            try:
                run.launch()
            except Exception as e:  # noqa: BLE001
                failed = _failed(st, e, device)
        if failed is not None:
            _drain(device, stream)
            run = None
            yield from _give_back_failed(streams, stream, failed, device)
            continue
        active.append((st, run, stream))


def _give_back_failed(streams: StreamSlots, stream: Any, failed: PopulationFailed,
                      device: torch.device) -> Iterator[PopulationFailed]:
    """A failed population's end, once the caller has drained its stream and dropped it: the
    stream back to the slots, the memory back to the device, then the event."""
    streams.give(stream)
    release_cached(device)
    yield failed


# ---------------------------------------------------------------------------------------------
# The command


@dataclass
class StudyResult:
    """What a `psa study` invocation did."""

    name: str
    trials: int
    done: int
    failed: list[str] = field(default_factory=list)
    seconds: float = 0.0
    complete: bool = False


def run_study(name: str, design: StudyDesign, opt: RunOptions, console: Any = None) -> StudyResult:
    """Run (or resume) a study to completion; every result lands in opt.db as it happens."""
    t0 = time.perf_counter()
    if opt.backend not in ("local", "ray"):
        raise DesignError(f"unknown backend {opt.backend!r}; choose local or ray")
    if opt.backend == "ray":
        from psa.study.ray import import_ray

        import_ray()  # a missing Ray is a clear error before anything is written
        device = torch.device("cpu")
        device_desc = f"ray ({opt.address or 'local instance'})"
    else:
        device = resolve_device_name(opt.device)
        device_desc = describe_device(device)
    study = Study(name, design, opt, console)
    outcome = "error"
    try:
        study.open(device_desc, device)
        notes = study.load_checkpoints()
        todo = [st for st in study.pops.values() if not st.done]
        done_trials = sum(st.plan.size for st in study.pops.values() if st.done)
        progress = StudyProgress(study, opt.quiet)
        assert study.plan is not None
        progress.print(
            f"study [bold]{name}[/]: {len(design.architectures)} architectures x {len(design.modes)} modes x "
            f"{design.trials} trials x {design.meta_loops} meta-loops = {design.n_trials} trials in "
            f"{len(study.plan.populations)} populations (at most {study.plan.chunk} members); "
            f"{device_desc}; {study.db}")
        for n in notes:
            progress.print(f"[yellow]note[/]: {n}")
        if not todo:
            store.end_run(study.con, store.start_run(study.con, study.study_id, opt.backend, device_desc, 0.0),
                          "complete", study.study_id)
            progress.print(f"study {name} is complete ({design.n_trials} trials); nothing to do")
            outcome = "complete"
            return StudyResult(name, design.n_trials, design.n_trials, complete=True)
        resumed = [st for st in todo if st.start is not None]
        if done_trials or resumed:
            progress.print(f"resuming: {done_trials} trials done, {len(resumed)} populations continue from "
                           f"their checkpoints, {len(todo) - len(resumed)} start fresh")
        work_done = sum(study.work_units(st.plan, design.meta_loops if st.done else st.loop)
                        for st in study.pops.values())
        study.run_id = store.start_run(study.con, study.study_id, opt.backend, device_desc, work_done)
        failed: list[str] = []
        if opt.backend == "ray":
            from psa.study.ray import ray_events

            events = ray_events(study, todo)
        else:
            events = local_events(study, todo, device)
        with progress:
            try:
                for ev in events:
                    study.handle(ev)
                    progress.event(ev)
                    if isinstance(ev, PopulationFailed):
                        failed.append(f"{study.pops[ev.key].plan.label()}: {ev.message}")
            finally:
                close = getattr(events, "close", None)
                if close is not None:
                    close()
            done = sum(st.plan.size for st in study.pops.values() if st.done)
            complete = done == design.n_trials
            if complete:
                progress.finish()
        outcome = "complete" if complete else f"failed: {len(failed)} populations"
        store.end_run(study.con, study.run_id, outcome, study.study_id if complete else None)
        seconds = time.perf_counter() - t0
        if complete:
            progress.print(f"study [bold]{name}[/] complete: {design.n_trials} trials in {seconds:.1f}s -> {study.db} "
                           f"(see `psa status`, `psa export`)")
        return StudyResult(name, design.n_trials, done, failed, seconds, complete)
    except KeyboardInterrupt:
        outcome = "interrupted"
        raise
    except (StoreError, StudyError) as e:
        outcome = f"error: {e}"
        raise
    finally:
        if study.con is not None and study.run_id and outcome not in ("complete",) and not outcome.startswith("failed"):
            with contextlib.suppress(StoreError, Exception):
                store.end_run(study.con, study.run_id, outcome[:500])
        study.lock.release()
        if study.con is not None:
            with contextlib.suppress(Exception):
                study.con.close()


# ---------------------------------------------------------------------------------------------
# --dry-run: the plan, its FLOPs, and a time estimate for this device


def dry_run(name: str, design: StudyDesign, opt: RunOptions, calibrate_device: bool = True) -> dict[str, Any]:
    """Print the plan (populations, FLOPs, time estimate) without writing anything; returns it."""
    from rich.table import Table

    from psa.study.console import out_console

    device = resolve_device_name(opt.device) if opt.backend == "local" else resolve_device_name("auto")
    db = Path(opt.db)
    chunk = opt.chunk
    precision = resolve_precision(opt.precision, device)
    status_by_key: dict[tuple[str, str, int], str] = {}
    existing = None
    if db.is_file():
        con = store.connect(db, readonly=True)
        try:
            existing = store.get_study(con, name)
            if existing is not None:
                if existing["design_hash"] != design.digest():
                    raise StudyError(f"study {name!r} in {db} was created with a different design "
                                     f"({_design_difference(stored_design(existing), design)}); pass --name")
                stored_chunk = int(stored_design(existing).get("plan", {}).get("chunk", 0)) or None
                if chunk is not None and stored_chunk is not None and chunk != stored_chunk:
                    raise StudyError(f"study {name!r} was planned with --chunk {stored_chunk}; resume it with the "
                                     f"same chunk (or omit --chunk)")
                chunk = chunk or stored_chunk
                precision = str(stored_design(existing).get("plan", {}).get("engine", {}).get("precision", "fp32"))
                for t in store.study_trials(con, int(existing["id"])):
                    status_by_key[(t["arch"], t["mode"], int(t["trial"]))] = t["status"]
        finally:
            con.close()
    if chunk is None:
        chunk = auto_chunk(design, 8 << 30 if opt.backend == "ray" else device_budget(device))
    cal = DEFAULT_CALIBRATION
    if calibrate_device:
        data = cached_data(design.dataset, opt.data_dir, device)
        config = dataclasses.replace(design.train_config(), precision=precision, kernels=opt.kernels,
                                     graphs=opt.graphs)
        cal = calibrate(device, data, design, config=config)
    plan = make_plan(design, chunk, cal)
    table = Table(title=f"study {name}: plan", title_justify="left")
    for col in ("arch", "params", "trials", "pops", "TFLOP/trial", "PFLOP", "time", "to do"):
        table.add_column(col, justify="left" if col == "arch" else "right", no_wrap=True)
    rows = []
    total_flops = total_time = todo_time = 0.0
    for arch in design.architectures:
        pops = [p for p in plan.populations if p.arch == arch]
        n_trials = len(design.modes) * design.trials
        f_trial = arch_flops(arch, design.meta_loops, design.n_train)
        t_arch = sum(cal.loop_seconds(arch, p.size, design.batch_size, design.n_train) * design.meta_loops
                     for p in pops)
        todo = sum(1 for m in design.modes for k in range(1, design.trials + 1)
                   if status_by_key.get((arch, m, k), "pending") != "done")
        t_todo = t_arch * todo / n_trials
        sizes = sorted({p.size for p in pops})
        table.add_row(arch, f"{parse_arch(arch).params:,}", str(n_trials),
                      f"{len(pops)} x {'/'.join(map(str, sizes))}", f"{f_trial / 1e12:.3g}",
                      f"{f_trial * n_trials / 1e15:.3g}", fmt_seconds(t_arch), str(todo))
        rows.append({"arch": arch, "params": parse_arch(arch).params, "trials": n_trials, "populations": len(pops),
                     "flops_per_trial": f_trial, "flops": f_trial * n_trials, "seconds": t_arch, "todo": todo})
        total_flops += f_trial * n_trials
        total_time += t_arch
        todo_time += t_todo
    out_console.print(table)
    n_todo = sum(r["todo"] for r in rows)
    out_console.print(
        f"{design.n_trials} trials ({len(design.architectures)} architectures x {len(design.modes)} modes x "
        f"{design.trials} trials, seeds {design.seed}..{design.seed + design.trials - 1}) in "
        f"{len(plan.populations)} populations of at most {plan.chunk} members, {design.meta_loops} meta-loops each",
        soft_wrap=True)
    out_console.print(f"work: {total_flops / 1e15:.3g} PFLOP (forward+backward = 3 x forward over {design.n_train:,} "
                      f"images + forward over {N_VAL:,} per meta-loop, + the test set once)", soft_wrap=True)
    out_console.print(f"estimate on {cal.device} in {precision}: {fmt_seconds(total_time)} for the whole study, "
                      f"one population at a time"
                      + (f", {fmt_seconds(todo_time)} for the {n_todo} trials still to do" if existing else ""),
                      soft_wrap=True)
    out_console.print(f"calibration: {cal.method}", soft_wrap=True)
    if existing is not None:
        out_console.print(f"study {name} exists in {db}: {design.n_trials - n_todo} of {design.n_trials} trials done",
                          soft_wrap=True)
    out_console.print("dry run: nothing was written", soft_wrap=True)
    return {"name": name, "chunk": plan.chunk, "populations": [dataclasses.asdict(p) | {"key": p.key}
                                                                for p in plan.populations],
            "architectures": rows, "flops": total_flops, "seconds": total_time, "calibration": dataclasses.asdict(cal)}
