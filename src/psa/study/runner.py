"""Populations into events: one population's meta-loops, and the local backend that runs many.

PopulationRun trains one population and reports each meta-loop as it finishes; local_events
runs a study's unfinished populations on this process's device and yields their events
(psa.study.ray does the same on a Ray cluster). Neither writes anything: the driver records.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from psa.core.chunk import StepCallback
from psa.core.data import Dataset
from psa.core.device import (
    Execution,
    describe_device,
    free_memory,
    new_streams,
    release_cached,
    side_stream,
)
from psa.core.engine import Engine, LoopResult, PendingLoop, kernel_launches
from psa.core.hparams import HParams
from psa.core.memory import FREE_MEMORY_FRACTION, memory_paths
from psa.core.population import Population
from psa.study.design import StudyDesign
from psa.study.events import Event, LoopDone, PopulationDone, PopulationFailed, Started
from psa.study.plan import PopulationPlan, bytes_per_member


@dataclass
class PopulationState:
    """What the driver knows about one population of the plan while the study runs; a backend
    starts it from `start` (a checkpoint) or from scratch."""

    plan: PopulationPlan
    trial_ids: dict[tuple[str, str, int], int]  # Member.key -> trial id
    done: bool
    loops_done: int  # from the database: min over members
    start: Population | None = None
    prior_seconds: float = 0.0
    loop: int = 0
    attempts: int = 0
    batched: bool = True  # a module model's members trained together (vmap), as the study chose


# ---------------------------------------------------------------------------------------------
# One population


def _finite_or_none(x: float) -> float | None:
    return x if math.isfinite(x) else None


class PopulationRun:
    """One population in training: its engine, and the events of its meta-loops as they finish.

    launch() queues the next meta-loop on the device and returns; collect() waits for it and
    returns its LoopDone (and the PopulationDone after the last loop). The LoopDone's
    population is the live object: a consumer that checkpoints it must do so before the next
    launch(). `psa study` and `psa train` both drive their populations through this class.
    """

    def __init__(self, key: str, pop: Population, data: Dataset, hparams: HParams, ex: Execution,
                 prior_seconds: float = 0.0, where: str = "", stream: Any = None, engine: Any = None) -> None:
        """`engine`: what trains `pop` if not psa's Engine (a module model's, psa.study.modules)."""
        self.key, self.pop, self.hparams = key, pop, hparams
        self.engine = engine if engine is not None else Engine(pop, data, hparams, ex, stream=stream)
        self.prior_seconds = prior_seconds
        self.where = where or str(pop.device)
        self.t0 = time.perf_counter()
        self.pending: PendingLoop | None = None
        self.last: LoopResult | None = None  # the latest collected loop, as the engine reported it

    @classmethod
    def of_plan(cls, design: StudyDesign, pp: PopulationPlan, data: Dataset, start: Any,
                ex: Execution, prior_seconds: float = 0.0, where: str = "", stream: Any = None,
                batched: bool = True) -> "PopulationRun":
        """The run of population `pp` of a study: from `start` (a checkpoint) or from scratch;
        `batched`: a module model's path (the study's choice, psa.study.modules.choose_batching)."""
        if design.is_module:  # your own model: its factory is the plan's architecture
            from psa.study import modules

            pop = modules.new_population(pp.arch, pp.members(design), data, ex.device, start)
            return cls(pp.key, pop, data, design.hparams, ex, prior_seconds, where,  # type: ignore[arg-type]
                       engine=modules.new_engine(pop, data, design.hparams, batched))
        if start is None:
            start = Population.create(data.arch(pp.arch), pp.members(design), ex.device, n_val=data.val_y.numel(),
                                      model=design.model)
        return cls(pp.key, start, data, design.hparams, ex, prior_seconds, where, stream=stream)

    def started(self) -> Started:
        """The Started event (where, and from which loop)."""
        return Started(self.key, self.where, self.pop.loop)

    @property
    def to_go(self) -> int:
        """Meta-loops not yet launched."""
        return self.hparams.meta_loops - self.pop.loop

    def seconds(self) -> float:
        """Wall seconds of this population so far, over all sessions."""
        return self.prior_seconds + time.perf_counter() - self.t0

    def launch(self, on_step: StepCallback | None = None) -> None:
        """Queue the next meta-loop."""
        self.pending = self.engine.launch(on_step)

    def collect(self) -> list[LoopDone | PopulationDone]:
        """Wait for the queued meta-loop: its LoopDone, and the PopulationDone if it was the last."""
        assert self.pending is not None
        r = self.last = self.pending.result()
        self.pending = None
        rows = []
        for j, mem in enumerate(self.pop.members):
            a = r.ablated[j]
            forced = r.forced[j] if r.forced else None
            rows.append((
                mem.key, mem.mode,
                _finite_or_none(r.candidate_acc[j]), int(r.promoted[j]),
                None if a is None else int(a[0]), None if a is None else int(a[1]),
                float(r.lkg_score[j]), _finite_or_none(r.train_loss[j]), int(r.diverged[j]),
                None if forced is None else int(forced),
            ))
        events: list[LoopDone | PopulationDone] = [LoopDone(self.key, r.loop, rows, self.pop, self.seconds())]
        if self.to_go <= 0:
            events.append(self.finish())
        return events

    def bounty_score(self) -> list[float]:
        """Every member's bounty (%), -1 before its first promotion."""
        return self.pop.bounty_score()

    def finish(self) -> PopulationDone:
        """Test accuracy of every bounty model and the final results."""
        test = self.engine.test_accuracy()
        scores = self.bounty_score()
        return PopulationDone(
            key=self.key,
            members=[m.key for m in self.pop.members],
            bounty=[s if s >= 0 else None for s in scores],
            bounty_loop=[bl if bl > 0 else None for bl in self.pop.bounty_loop],
            test_acc=list(test),
            seconds=self.seconds(),
        )


def population_events(design: StudyDesign, pp: PopulationPlan, data: Dataset, start: Population | None,
                      ex: Execution, prior_seconds: float = 0.0, where: str = "") -> Iterator[Event]:
    """Train one population to the design's meta-loops, from scratch or from `start`, one loop
    at a time: Started, one LoopDone per meta-loop and a final PopulationDone."""
    run = PopulationRun.of_plan(design, pp, data, start, ex, prior_seconds, where)
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
                               bounty_loop=list(pop.bounty_loop), mode_history=[list(h) for h in pop.mode_history],
                               **{k: v.to(dev) for k, v in pop.variant_state().items()})


# ---------------------------------------------------------------------------------------------
# The data populations train on


_DATA_CACHE: dict[tuple[Any, ...], Dataset] = {}


def _file_stamp(name: str) -> tuple[int, int] | None:
    """(size, mtime) of an npz data set's file: a file rewritten under the same name is not
    served from the cache (the store's checksum check then sees the new contents)."""
    if not name.startswith("npz:"):
        return None
    try:
        st = os.stat(name[4:])
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


def cached_data(name: str, data_dir: str | None, device: torch.device) -> Dataset:
    """The data set on `device`, loaded once per process (Ray reuses worker processes)."""
    from psa.core.data import load_dataset

    key = (name, data_dir, str(device), _file_stamp(name))
    if key not in _DATA_CACHE:
        _DATA_CACHE.clear()
        _DATA_CACHE[key] = load_dataset(name, device, data_dir)
    return _DATA_CACHE[key]


def design_data(design: StudyDesign, data_dir: str | None, device: torch.device) -> Dataset:
    """The data a design trains on: the data set, cut to `train_subset` images if it says so."""
    return design_data_view(design, cached_data(design.dataset, data_dir, device))


def design_data_view(design: StudyDesign, data: Dataset) -> Dataset:
    """`data` (the whole data set) as `design` trains on it: cut to `train_subset` images, and
    for a model given as module:function with its images shaped as images."""
    if design.train_subset is not None:
        n = design.train_subset
        data = dataclasses.replace(data, train_x=data.train_x[:n], train_y=data.train_y[:n])
    if design.is_module:
        from psa.study.modules import module_data

        data = module_data(data)  # images as images
    return data


# ---------------------------------------------------------------------------------------------
# The local backend


def _failed(st: PopulationState, e: BaseException) -> PopulationFailed:
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


def precompile_kernels(design: StudyDesign, todo: list[PopulationState], ex: Execution, data: Dataset) -> int:
    """Compile the Triton kernels that the populations in `todo` will launch on a CUDA device,
    up front and in parallel (kernels.precompile), rather than one population's at its first
    loop while the GPU waits. Returns the number of kernel variants (0 off CUDA or without
    Triton); a failure here only warns: the kernels then compile at their first launch."""
    from psa.core import kernels

    if ex.device.type != "cuda" or not ex.triton or design.is_module:
        return 0
    launches: list[Any] = []
    seen: set[tuple[str, int, tuple[str, ...]]] = set()
    try:
        for st in todo:
            key = (st.plan.arch, st.plan.size, st.plan.modes)  # trials differ only in their seeds
            if key not in seen:
                seen.add(key)
                launches += kernel_launches(data.arch(st.plan.arch), st.plan.members(design), data, design.hparams, ex,
                                            design.model)
        return kernels.precompile(launches, ex.device)
    except Exception as e:  # noqa: BLE001 - an optimisation; the study runs without it
        warnings.warn(f"psa: precompiling the Triton kernels failed ({type(e).__name__}: {e}); they compile at "
                      f"their first launch", RuntimeWarning, stacklevel=2)
        return 0


def local_events(design: StudyDesign, todo: list[PopulationState], ex: Execution, data_dir: str | None = None,
                 concurrency: int | None = None) -> Iterator[Event]:
    """The populations `todo` (largest work first) on this process's device, up to
    `concurrency` in flight at once (default: 8 on a GPU, so that small populations fill it
    together; 1 elsewhere, i.e. one after another), each engine on its slot's CUDA stream.

    Every running population has one meta-loop queued on the device; this takes the first
    that has finished (else waits for the oldest), hands its events on (the consumer records
    them and checkpoints), and queues that population's next loop while the others keep the
    device busy. A population is admitted while the estimated memory of those in flight fits
    the device's free memory (at least one always runs). Each engine computes exactly what it
    would alone, so the rows are those of a one-at-a-time run. A population that raises yields
    PopulationFailed and the others go on.
    """
    device = ex.device
    data = design_data(design, data_dir, device)
    precompile_kernels(design, todo, ex, data)
    streams = StreamSlots(device, concurrency or (8 if device.type == "cuda" else 1))
    where = describe_device(device)
    queue = list(todo)
    active: list[tuple[PopulationState, PopulationRun, Any]] = []
    free = free_memory(device)
    budget = None if free is None else free * FREE_MEMORY_FRACTION
    per_member: dict[str, int] = {}

    def need(st: PopulationState) -> int:
        a = st.plan.arch
        if a not in per_member and design.is_module:
            from psa.study.modules import inspect_factory

            per_member[a] = inspect_factory(a, design, data).bytes_per_member(design.hparams.batch_size)
        if a not in per_member:
            arch = data.arch(a)
            paths = memory_paths(arch, ex, design.model)
            per_member[a] = bytes_per_member(arch, design.hparams.batch_size, **paths)
        return st.plan.size * per_member[a]

    def retire(failed: PopulationFailed, stream: Any) -> Iterator[Event]:
        # called out of the except block (only the message kept, so no traceback holds the
        # failed engine), after its stream drained and its run was dropped: the stream goes
        # back to the slots and the memory to the device
        streams.give(stream)
        release_cached(device)
        yield failed

    while queue or active:
        while queue and streams.free and (
                not active or budget is None or sum(need(s) for s, _, _ in active) + need(queue[0]) <= budget):
            st = queue.pop(0)
            stream = streams.take()
            run = failed = None
            try:
                start = st.start
                if start is not None and not design.is_module:  # a module checkpoint is restored on the device
                    start = population_to(start, device)
                run = PopulationRun.of_plan(design, st.plan, data, start, ex, st.prior_seconds, where, stream,
                                            st.batched)
                yield run.started()
                if run.to_go <= 0:
                    yield run.finish()
                    run = None
                    streams.give(stream)
                    continue
                run.launch()
            except Exception as e:  # noqa: BLE001 - one population's failure must not stop the study
                failed = _failed(st, e)
            if failed is not None:
                _drain(device, stream)  # its queued writes land before its memory is freed
                run = None
                yield from retire(failed, stream)
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
            failed = _failed(st, e)
        if failed is None:
            yield from events  # the consumer checkpoints before we queue the next loop
            if run.to_go <= 0:
                run = None  # done: its memory goes before the next population is admitted
                streams.give(stream)
                continue
            try:
                run.launch()
            except Exception as e:  # noqa: BLE001
                failed = _failed(st, e)
        if failed is not None:
            _drain(device, stream)
            run = None
            yield from retire(failed, stream)
            continue
        active.append((st, run, stream))
