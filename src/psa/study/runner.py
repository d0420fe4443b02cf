"""Populations into events: one population's meta-loops, and the local backend that runs many.

PopulationRun trains one population and reports each meta-loop as it finishes; local_events
runs a study's unfinished populations on this process's device and yields their events
(psa.study.ray does the same on a Ray cluster). Neither writes anything: the driver records.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from psa.core.arch import parse_arch
from psa.core.data import Dataset
from psa.core.engine import FREE_MEMORY_FRACTION, Engine, PendingLoop, TrainConfig, free_memory
from psa.core.population import Population
from psa.study.design import StudyDesign
from psa.study.events import Event, LoopDone, PopulationDone, PopulationFailed, Started
from psa.study.plan import PopulationPlan, bytes_per_member, describe_device


@dataclass
class PopulationState:
    """What the driver knows about one population of the plan while the study runs; a backend
    starts it from `start` (a checkpoint) or from scratch."""

    plan: PopulationPlan
    trial_ids: dict[tuple[str, int], int]  # (mode, seed) -> trial id
    done: bool
    loops_done: int  # from the database: min over members
    start: Population | None = None
    prior_seconds: float = 0.0
    loop: int = 0
    attempts: int = 0


# ---------------------------------------------------------------------------------------------
# One population


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
                 config: TrainConfig | None = None, prior_seconds: float = 0.0, where: str = "") -> None:
        device = data.device
        if start is None:
            pop = Population.create(parse_arch(pp.arch), pp.members(design), device, n_val=data.val_y.numel())
        else:
            pop = start
        self.design, self.pp, self.pop = design, pp, pop
        self.engine = Engine(pop, data, config or design.train_config())
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
# The data populations train on


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


# ---------------------------------------------------------------------------------------------
# The local backend


def _failed(st: PopulationState, e: BaseException, device: torch.device) -> PopulationFailed:
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return PopulationFailed(st.plan.key, f"{type(e).__name__}: {e}".splitlines()[0])


def local_events(design: StudyDesign, todo: list[PopulationState], device: torch.device, config: TrainConfig,
                 data_dir: str | None = None, concurrency: int | None = None) -> Iterator[Event]:
    """The populations `todo` (largest work first) on this process's device, up to
    `concurrency` in flight at once (default: 8 on a GPU, so that small populations fill it
    together; 1 elsewhere, i.e. one after another), each engine on its own CUDA stream.

    Every running population has one meta-loop queued on the device; this takes the first
    that has finished (else waits for the oldest), hands its events on (the consumer records
    them and checkpoints), and queues that population's next loop while the others keep the
    device busy. A population is admitted while the estimated memory of those in flight fits
    the device's free memory (at least one always runs). Each engine computes exactly what it
    would alone, so the rows are those of a one-at-a-time run. A population that raises yields
    PopulationFailed and the others go on.
    """
    data = design_data(design, data_dir, device)
    slots = concurrency or (8 if device.type == "cuda" else 1)
    where = describe_device(device)
    queue = list(todo)
    active: list[tuple[PopulationState, PopulationRun]] = []
    free = free_memory(device)
    budget = None if free is None else free * FREE_MEMORY_FRACTION

    def need(st: PopulationState) -> int:
        return st.plan.size * bytes_per_member(st.plan.arch, design.batch_size)

    while queue or active:
        while queue and len(active) < slots and (
                not active or budget is None or sum(need(s) for s, _ in active) + need(queue[0]) <= budget):
            st = queue.pop(0)
            try:
                start = population_to(st.start, device) if st.start is not None else None
                run = PopulationRun(design, st.plan, data, start, config, st.prior_seconds, where)
                yield run.started()
                if run.to_go <= 0:
                    yield run.finish()
                    continue
                run.launch()
            except Exception as e:  # noqa: BLE001 - one population's failure must not stop the study
                yield _failed(st, e, device)
                continue
            active.append((st, run))
        if not active:
            continue
        # the first population whose loop has finished, else the oldest: a small population's
        # quick loops need not wait behind a big one's
        i = next((i for i, (_, r) in enumerate(active) if r.pending is not None and r.pending.ready()), 0)
        st, run = active.pop(i)
        try:
            events = run.collect()
        except Exception as e:  # noqa: BLE001
            yield _failed(st, e, device)
            continue
        yield from events  # the consumer checkpoints before we queue the next loop
        if run.to_go > 0:
            try:
                run.launch()
            except Exception as e:  # noqa: BLE001
                yield _failed(st, e, device)
                continue
            active.append((st, run))
