"""Run a study into SQLite: open or create it, resume its populations, record their events.

A design (design.StudyDesign) says what to run; a plan (plan.Plan) partitions its trials into
populations; a backend (backends.local, backends.ray) trains them and yields events
(psa.study.events); this module records every meta-loop in the results database as it happens.

Invariants that make a killed study resume to exactly the rows of an uninterrupted one:
- Trial k of every mode has seed `seed + k - 1` (paired design).
- The partition of trials into populations is a pure function of the design and the
  population size (stored with the study), never of what is left to do: a member's
  floating-point results may depend on which members share its population, so a resume
  rebuilds the same populations.
- Per meta-loop of a population, the driver first commits that loop's rows (INSERT OR REPLACE,
  keyed by trial and loop) with the trials' progress in one transaction, then, when one is due
  (opt.checkpoint_every), hands a copy of the population's state to the checkpoint writer
  (psa.study.checkpoints), which atomically replaces the population's checkpoint in the
  background, in order. A kill leaves the database some loops ahead of the checkpoint; the
  resume recomputes those loops from the checkpoint (all randomness is a function of seed and
  loop, so they are the same loops) and overwrites their rows. The study's precision and the
  random streams' version are fixed when it is created; a checkpoint of other streams or
  precision is not continued.
- Final results (bounty, test accuracy, status 'done') commit in one transaction, after the
  population's last checkpoint is written; only then is the checkpoint removed.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from psa.core import rng
from psa.core.checkpoint import CheckpointError, load_tensors
from psa.core.data import Dataset
from psa.core.device import Execution, describe_device, resolve_device, resolve_execution
from psa.core.variant import Variant
from psa.study import store
from psa.study.backends.local import local_events
from psa.study.calibration import StudyCosts, describe_calibration, stored_costs
from psa.study.checkpoints import CheckpointWriter, host_copy
from psa.study.design import DesignError, StudyDesign
from psa.study.estimate import calibrate
from psa.study.eta import RunPace
from psa.study.events import Event, LoopDone, PopulationDone, PopulationFailed, Started
from psa.study.kinds import ModelKind, count_nets, model_kind
from psa.study.lock import StudyLock, checkpoint_root
from psa.study.options import RunOptions, StudyError
from psa.study.plan import Plan, PopulationPlan, make_plan
from psa.study.progress import StudyProgress
from psa.study.runner import PopulationProgress, cached_data, design_data_view
from psa.study.store import StoreError
from psa.study.stored import (check_dataset, check_stored, code_version, dataset_record,
                              default_population_size, recorded_loops, stored_design, study_precision, trial_rows)

# ---------------------------------------------------------------------------------------------
# The study in its database


class Study:
    """A study bound to a database: plans, resumes, runs, and records."""

    def __init__(self, name: str, kind: ModelKind, options: RunOptions, console: Any = None) -> None:
        from psa.study.console import err_console

        self.name = name
        self.kind = kind
        self.design = kind.design
        self.opt = options
        self.db = Path(options.db)
        self.console = console or err_console
        self.ckpt_dir = checkpoint_root(self.db) / name
        self.lock = StudyLock(self.ckpt_dir, name, self.db)
        self.con: Any = None
        self.study_id = 0
        self.run_id = 0
        self.plan: Plan | None = None
        self.pops: dict[str, PopulationProgress] = {}
        self.precision = "fp32"
        self.execution: Execution | None = None  # how this run trains the study's populations (open)
        self.notes: list[str] = []  # what checking the design's nets found (open)
        self.costs: StudyCosts | None = None  # each population's cost, from the stored calibration (open)
        self.calibrated: dict[str, Any] | None = None  # the calibration this run made and stored, if it made one
        self.pace: RunPace | None = None  # this run's work and pace (run_study)
        self._saved_at: dict[str, float] = {}
        self.checkpoints = CheckpointWriter()
        self._full_sync = True

    # ------------------------------------------------------------------ setup
    def open(self, execution: Execution, device_desc: str) -> None:
        """Connect, lock the study, create or check its row and trials, and load the plan; the
        study's populations then train under `execution` (resolved for the study's own
        precision: study_precision)."""
        device = execution.device
        data = cached_data(self.design.dataset, self.opt.data_dir,
                           device if self.opt.backend == "local" else torch.device("cpu"))
        # build and check every net on the data before anything is written; its notes said once
        self.notes = self.kind.check(design_data_view(self.kind, data))
        # the paths chosen now: one that cannot train (--batched yes where vmap cannot batch) is
        # refused before anything is written and before the notes (a refusal is its one line)
        paths = self.kind.record(device, self.opt)  # stored by a new study (_create)
        existed = Path(self.db).exists()
        try:
            self.con = store.connect(self.db, timeout=self.opt.busy_timeout)
        except OSError as e:
            above = next((p for p in Path(self.db).parents if p.exists()), None)
            why = f"{above} is a file, not a directory" if above is not None and not above.is_dir() else e.strerror or e
            raise StudyError(f"cannot create the results database {self.db}: {why}") from None
        # a commit must be on disk before the checkpoint that follows it (power loss): see _durable
        self.con.execute("PRAGMA synchronous=FULL")
        self._full_sync = True
        try:
            self.lock.acquire()
        except StudyError:
            if not existed:  # refused before anything of its own was written: no empty database left behind
                self.con.close()
                for f in (Path(self.db), Path(f"{self.db}-wal"), Path(f"{self.db}-shm")):
                    f.unlink(missing_ok=True)
            raise
        # the data the populations train on (loaded above, cached: the local backend reuses it),
        # recorded with a new study and checked against the record on a resume
        row = store.get_study(self.con, self.name)
        if row is None:
            row = self._create(device_desc, execution, data, paths)
        self.study_id = int(row["id"])
        stored = check_stored(row, self.name, self.db, self.kind, self.opt, self.kind.precision(self.opt, device),
                              recorded_loops(self.con, self.study_id))
        check_dataset(self.con, self.study_id, self.name, data)
        if stored.updates:
            store.update_plan(self.con, self.study_id, stored.updates)
        self.plan, self.precision = stored.plan, stored.precision
        self.execution = execution
        self._load_populations()
        self.costs = self._costs(row, data)

    def _create(self, device_desc: str, execution: Execution, data: Dataset, paths: dict[str, Any]) -> Any:
        """The studies row and trials of a new study (its plan, precision and calibration fixed here)."""
        size = default_population_size(self.kind, self.opt, execution.device)
        plan = make_plan(self.design, size, self.kind.loop_cost)
        numerics = {"precision": execution.precision, "rng": rng.VERSION}  # stored as the plan's "engine"
        doc = {**self.design.to_dict(), "seeds": "trial k of every mode: seed + k - 1",
               "plan": {**plan.to_dict(), "engine": numerics, **paths}}  # kind.record's: probed on those paths
        self.calibrated = self._calibrate(plan, execution, data)
        if self.calibrated is not None:
            doc["plan"]["calibration"] = self.calibrated
        store.create_study(self.con, self.name, json.dumps(doc), self.design.digest(), code_version(), device_desc,
                           trial_rows(self.kind), dataset_record(data))
        return store.get_study(self.con, self.name)

    def _calibrate(self, plan: Plan, execution: Execution, data: Dataset) -> dict[str, Any] | None:
        """Light probes of the plan's shapes on this run's device (estimate.calibrate); None with
        Ray, whose tasks train on devices this process does not see."""
        if self.opt.backend != "local":
            return None
        return calibrate(self.kind, execution, design_data_view(self.kind, data), plan, self.opt.checkpoint_every)

    def _costs(self, row: Any, data: Dataset) -> StudyCosts:
        """Each population's cost from the stored calibration; a study created without one (by
        an older psa, or on Ray) is calibrated now, if it has work left, and keeps it."""
        assert self.plan is not None and self.execution is not None
        doc = stored_design(row)
        record = doc.get("plan", {}).get("calibration")
        if record is None and not all(st.done for st in self.pops.values()):
            record = self.calibrated = self._calibrate(self.plan, self.execution, data)
            if record is not None:
                doc.setdefault("plan", {})["calibration"] = record
                store.update_design(self.con, self.study_id, json.dumps(doc))
        return stored_costs(self.kind, self.plan, record)

    def _load_populations(self) -> None:
        """Each population of the plan, with its trial ids and progress from the database."""
        assert self.plan is not None
        trials = store.study_trials(self.con, self.study_id)
        by_key = {(t["arch"], t["mode"], t["variant"] or "", t["trial"]): t for t in trials}
        if len(by_key) != self.design.n_trials:
            raise StudyError(f"study {self.name!r} in {self.db} has {len(by_key)} trials, "
                             f"its design {self.design.n_trials}")
        for pp in self.plan.populations:
            rows = [by_key[(pp.net, m, name, k)] for k in pp.trials for m, name, _ in pp.conditions()]
            ids = {(r["mode"], Variant.from_json(r["variant_settings"]).to_json(), int(r["seed"])): int(r["id"])
                   for r in rows}
            done = all(r["status"] == "done" for r in rows)
            self.pops[pp.key] = PopulationProgress(pp, ids, done, min(int(r["loops_done"]) for r in rows))

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
                tensors, meta = load_tensors(path)
                start = self.kind.parse_checkpoint(tensors, meta)
                self._check_checkpoint(st, start, meta)
            except CheckpointError as e:
                notes.append(f"restarting {st.plan.label()} from scratch: checkpoint {path.name} unusable ({e})")
                continue
            st.start = start
            st.prior_seconds = float(meta.get("seconds", 0.0))
            st.loop = start.loop
        return notes

    def _check_checkpoint(self, st: PopulationProgress, pop: Any, meta: dict[str, Any]) -> None:
        """CheckpointError unless `pop` continues `st` in this study exactly."""
        hp = self.design.hparams
        expected = [(m.key, m.weight_decay, m.dropout) for m in (
            hp.member(m.variant.mode_at(m.mode, max(pop.loop, 1)), m.seed, m.variant)
            for m in st.plan.members(self.design))]
        got = [(m.key, m.weight_decay, m.dropout) for m in pop.members]
        if meta.get("study") != self.name or meta.get("design_hash") != self.design.digest():
            raise CheckpointError("it belongs to another study or design")
        if meta.get("rng") != rng.VERSION:
            raise CheckpointError("an older psa wrote it, whose data order and dropout were drawn differently")
        if meta.get("precision", "fp32") != self.precision:
            raise CheckpointError(f"it was trained in {meta.get('precision', 'fp32')}, the study is {self.precision}")
        if got != expected or self.kind.start_net(pop) != st.plan.net:
            raise CheckpointError(f"its members or {self.kind.noun[:-1]} differ from the plan's")
        if not 0 <= pop.loop <= self.design.hparams.meta_loops:
            raise CheckpointError(f"it is at meta-loop {pop.loop}")
        if st.loops_done < pop.loop:
            # rows always commit before the checkpoint is written; anything else means the
            # database was replaced: start over rather than leave holes
            raise CheckpointError(f"the database has only {st.loops_done} of its {pop.loop} meta-loops")

    def trials_done(self) -> int:
        """Trials of finished populations."""
        return sum(st.plan.size for st in self.pops.values() if st.done)

    # ------------------------------------------------------------------ event handling
    def handle(self, ev: Event) -> None:
        """Record one event: rows first, then the checkpoint (see the module docstring)."""
        self.checkpoints.check()  # a checkpoint that failed to write stops the study at once
        st = self.pops[ev.key]
        if self.pace is not None:
            self.pace.event(ev)
        if isinstance(ev, Started):
            store.mark_running(self.con, list(st.trial_ids.values()))
        elif isinstance(ev, LoopDone):
            self._record_loop(st, ev)
        elif isinstance(ev, PopulationDone):
            # its last checkpoint written first: a write that failed stops the study before
            # the population is marked done, and none lands after the file is removed
            self.checkpoints.wait(ev.key)
            self._durable(True)
            results = []
            for key, b, bl, t in zip(ev.members, ev.bounty, ev.bounty_loop, ev.test_acc):
                results.append((st.trial_ids[key], b, bl, t, ev.seconds, self.design.hparams.meta_loops))
            store.finish_trials(self.con, self.run_id, results)
            st.done = True
            with contextlib.suppress(FileNotFoundError):
                self._ckpt_path(st.plan).unlink()
        elif isinstance(ev, PopulationFailed):
            store.fail_trials(self.con, list(st.trial_ids.values()))

    def _record_loop(self, st: PopulationProgress, ev: LoopDone) -> None:
        if ev.loop <= st.loop:
            return  # a replay (retried task) of a loop already recorded
        # Checkpoints are written every opt.checkpoint_every seconds, not every loop: a big
        # population's is hundreds of MB. A resume recomputes the loops since the last one
        # (the same loops: all randomness is a function of seed and loop) and overwrites them.
        now = time.monotonic()
        if ev.checkpoint is None:
            due = now - self._saved_at.get(ev.key, -math.inf) >= self.opt.checkpoint_every
        else:
            due = bool(ev.checkpoint) and ev.state is not None
        self._durable(due)  # the commit before a checkpoint must be on disk first
        rows = [(st.trial_ids[key], ev.loop, mode, *rest) for key, mode, *rest in ev.rows]
        anchor = None if self.pace is None or self.pace.anchor is None else self.pace.anchor[1]
        store.record_loop(self.con, self.run_id, rows, ev.loop, ev.seconds, list(st.trial_ids.values()), anchor)
        st.loop = ev.loop
        if not due:
            return
        extra = {"study": self.name, "population": st.plan.key, "design_hash": self.design.digest(),
                 "seconds": ev.seconds, "rng": rng.VERSION, "precision": self.precision}
        state = ev.checkpoint_state()
        assert state is not None
        # a local run's state is its trainer's own, which the next loop overwrites: copied now;
        # a Ray worker's arrives as host tensors of its own
        tensors = host_copy(state[0], live=not isinstance(ev.state, tuple))
        self.checkpoints.submit(ev.key, self._ckpt_path(st.plan), tensors, {**state[1], **extra})
        self._saved_at[ev.key] = now

    def _durable(self, full: bool) -> None:
        """synchronous=FULL (fsync at commit) or NORMAL for the next commits. In WAL mode a FULL
        commit also makes every earlier NORMAL one durable, so one fsync before each checkpoint
        keeps the rows-before-checkpoint order through a power loss, without one per loop."""
        if full != self._full_sync:
            self.con.execute(f"PRAGMA synchronous={'FULL' if full else 'NORMAL'}")
            self._full_sync = full

    def close(self, outcome: str) -> None:
        """Write the checkpoints still queued, end this invocation's run row with `outcome` unless
        it already ended (a complete or failed run), drop the lock and close the database."""
        try:
            self.checkpoints.close()  # under the lock: no other run may start on them meanwhile
        finally:  # a second Ctrl-C while they are written still ends the run row and drops the lock
            if self.con is not None and self.run_id and outcome != "complete" and not outcome.startswith("failed"):
                with contextlib.suppress(Exception):
                    store.end_run(self.con, self.run_id, outcome[:500])
            self.lock.release()
            if self.con is not None:
                with contextlib.suppress(Exception):
                    self.con.close()


# ---------------------------------------------------------------------------------------------
# psa study


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
    kind = model_kind(design)  # the one place a study's kind of model is chosen
    device, device_desc = _backend_device(opt)
    # how the study trains, resolved once, before anything is written (a Ray worker resolves
    # its own device's kernels for the same precision)
    execution = resolve_execution(device, study_precision(name, kind, opt, device), opt.kernels, opt.graphs)
    study = Study(name, kind, opt, console)
    outcome = "error"
    try:
        result = _run(study, execution, device_desc, t0)
        outcome = "complete" if result.complete else f"failed: {len(result.failed)} populations"
        return result
    except KeyboardInterrupt:
        outcome = "interrupted"
        raise
    except SystemExit:
        # Ray's SIGTERM handler exits the driver this way: the run was stopped, as by Ctrl-C
        outcome = "interrupted"
        raise KeyboardInterrupt from None
    except (StoreError, StudyError) as e:
        outcome = f"error: {e}"
        raise
    finally:
        study.close(outcome)
        if opt.backend == "ray":  # Ray started for this study (start_ray) and not yet stopped
            from psa.study.backends.ray import stop_ray

            stop_ray()


def _backend_device(opt: RunOptions) -> tuple[torch.device, str]:
    """The device the driver plans for, and how the run describes where it trains."""
    if opt.backend not in ("local", "ray"):
        raise DesignError(f"unknown backend {opt.backend!r}; choose local or ray")
    if opt.backend == "ray":
        from psa.study.backends.ray import import_ray

        import_ray()  # a missing Ray is a clear error before anything is written
        return torch.device("cpu"), f"ray ({opt.address or 'local instance'})"
    device = resolve_device(opt.device)
    return device, describe_device(device)


def _run(study: Study, execution: Execution, device_desc: str, t0: float) -> StudyResult:
    """Open the study, train what is left, and end its run row."""
    design, opt = study.design, study.opt
    if opt.backend == "ray":
        from psa.study.backends.ray import start_ray

        start_ray(opt)  # an unreachable address or too few CPUs refused before anything is written
    study.open(execution, device_desc)
    notes = study.load_checkpoints()
    todo = [st for st in study.pops.values() if not st.done]
    assert study.costs is not None
    study.pace = RunPace(study.costs, study.pops)
    progress = StudyProgress(study.name, study.kind, study.pops, study.console, opt.quiet, study.costs, study.pace)
    _announce(study, progress, device_desc, notes, todo)
    if not todo:
        store.end_run(study.con, store.start_run(study.con, study.study_id, opt.backend, device_desc, 0.0),
                      "complete", study.study_id)
        progress.print(f"study {study.name} is complete ({design.n_trials} trials); nothing to do")
        return StudyResult(study.name, design.n_trials, design.n_trials, complete=True)
    study.run_id = store.start_run(study.con, study.study_id, opt.backend, device_desc, study.pace.work_at_start)
    failed = _record(study, progress, _events(study, todo))
    study.checkpoints.wait()  # a failed population's last checkpoint, for its rerun
    done = study.trials_done()
    complete = done == design.n_trials
    store.end_run(study.con, study.run_id, "complete" if complete else f"failed: {len(failed)} populations",
                  study.study_id if complete else None)
    seconds = time.perf_counter() - t0
    if complete:
        progress.print(f"study [bold]{study.name}[/] complete: {design.n_trials} trials in {seconds:.1f}s -> "
                       f"{study.db} (see `psa status`, `psa export`)")
    return StudyResult(study.name, design.n_trials, done, failed, seconds, complete)


def _announce(study: Study, progress: StudyProgress, device_desc: str, notes: list[str],
              todo: list[PopulationProgress]) -> None:
    """What the study is, where it runs, and what a resume continues."""
    from rich.markup import escape

    design = study.design
    assert study.plan is not None
    progress.print(
        f"study [bold]{study.name}[/]: {count_nets(study.kind, len(design.nets))} x {design.conditions_text()} x "
        f"{design.trials} trials x {design.hparams.meta_loops} meta-loops = {design.n_trials} trials in "
        f"{len(study.plan.populations)} populations ({study.plan.size_text()}); "
        f"{device_desc}; {study.db}")
    for line in study.kind.announce():
        progress.print(escape(line))
    if study.calibrated is not None:
        progress.print(escape(describe_calibration(study.calibrated, len(design.nets))))
    for n in [*study.notes, *notes]:
        progress.print(f"[yellow]note[/]: {escape(n.removeprefix('psa: '))}")
    if study.opt.quiet:
        for n in study.notes:  # what the nets' check found is about the user's model: said even so
            warnings.warn(n, RuntimeWarning, stacklevel=3)
    resumed = [st for st in todo if st.start is not None]
    done_trials = study.trials_done()
    if todo and (done_trials or resumed):
        progress.print(f"resuming: {done_trials} trials done, {len(resumed)} populations continue from "
                       f"their checkpoints, {len(todo) - len(resumed)} start fresh")


def _events(study: Study, todo: list[PopulationProgress]) -> Iterator[Event]:
    """The backend's events for the populations `todo`."""
    if study.opt.backend == "ray":
        from psa.study.backends.ray import ray_events

        return ray_events(study.kind, todo, study.precision, study.opt, study.console)
    assert study.execution is not None
    return local_events(study.kind, todo, study.execution, study.opt.data_dir, study.opt.concurrency)


def _record(study: Study, progress: StudyProgress, events: Iterator[Event]) -> list[str]:
    """Record every event and show it; the failed populations, for people."""
    failed: list[str] = []
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
        if study.trials_done() == study.design.n_trials:
            progress.finish()  # inside the display, so that the full bar is what stays on screen
    return failed
