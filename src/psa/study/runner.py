"""One population's meta-loops as events, and the data populations train on.

PopulationRun drives one population's Trainer (psa.core.loop) and reports each meta-loop as it
finishes; the backends (psa.study.backends) run a study's unfinished populations with it and
yield their events. Nothing here writes anything: the driver records.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from psa.core.data import Dataset
from psa.core.device import Execution
from psa.core.loop import LoopResult, PendingLoop, StepCallback, Trainer
from psa.study.design import DesignError, StudyDesign
from psa.study.events import Event, LoopDone, PopulationDone, Started
from psa.study.kinds import ModelKind
from psa.study.plan import PopulationPlan


@dataclass
class PopulationProgress:
    """What the driver knows about one population of the plan while the study runs; a backend
    starts it from `start` (its kind's parsed checkpoint) or from scratch."""

    plan: PopulationPlan
    trial_ids: dict[tuple[str, str, int], int]  # Member.key -> trial id
    done: bool
    loops_done: int  # from the database: min over members
    start: Any = None
    prior_seconds: float = 0.0
    loop: int = 0
    attempts: int = 0


def _finite_or_none(x: float) -> float | None:
    return x if math.isfinite(x) else None


class PopulationRun:
    """One population in training: its trainer, and the events of its meta-loops as they finish.

    launch() queues the next meta-loop on the device and returns; collect() waits for it and
    returns its LoopDone (and the PopulationDone after the last loop). The LoopDone's state is
    the live trainer's checkpoint: a consumer that saves it must do so before the next
    launch(). `psa study` and `psa train` both drive their populations through this class.
    """

    def __init__(self, key: str, trainer: Trainer, meta_loops: int, prior_seconds: float = 0.0,
                 where: str = "") -> None:
        self.key, self.trainer, self.meta_loops = key, trainer, meta_loops
        self.population = trainer.population
        self.prior_seconds = prior_seconds
        self.where = where or str(self.population.device)
        self.t0 = time.perf_counter()
        self.pending: PendingLoop | None = None
        self.last: LoopResult | None = None  # the latest collected loop, as the trainer reported it

    @classmethod
    def of_plan(cls, kind: ModelKind, pp: PopulationPlan, data: Dataset, start: Any, ex: Execution,
                prior_seconds: float = 0.0, where: str = "", stream: Any = None) -> "PopulationRun":
        """The run of population `pp` of a study: from `start` (a checkpoint) or from scratch."""
        trainer = kind.new_trainer(pp, data, ex, start, stream)
        return cls(pp.key, trainer, kind.design.hparams.meta_loops, prior_seconds, where)

    def started(self) -> Started:
        """The Started event (where, and from which loop)."""
        return Started(self.key, self.where, self.population.loop)

    @property
    def to_go(self) -> int:
        """Meta-loops not yet launched."""
        return self.meta_loops - self.population.loop

    def seconds(self) -> float:
        """Wall seconds of this population so far, over all sessions."""
        return self.prior_seconds + time.perf_counter() - self.t0

    def launch(self, on_step: StepCallback | None = None) -> None:
        """Queue the next meta-loop."""
        self.pending = self.trainer.launch(on_step)

    def collect(self) -> list[LoopDone | PopulationDone]:
        """Wait for the queued meta-loop: its LoopDone, and the PopulationDone if it was the last."""
        assert self.pending is not None
        r = self.last = self.pending.result()
        self.pending = None
        rows = []
        for j, mem in enumerate(self.population.members):
            a = r.ablated[j]
            forced = r.forced[j] if r.forced else None
            rows.append((
                mem.key, mem.mode,
                _finite_or_none(r.candidate_acc[j]), int(r.promoted[j]),
                None if a is None else int(a[0]), None if a is None else int(a[1]),
                float(r.lkg_score[j]), _finite_or_none(r.train_loss[j]), int(r.diverged[j]),
                None if forced is None else int(forced),
            ))
        # the event reaches the trainer's checkpoint weakly: a consumer that keeps the event must
        # not keep a finished or failed population's memory alive
        events: list[LoopDone | PopulationDone] = [LoopDone(self.key, r.loop, rows,
                                                            weakref.WeakMethod(self.trainer.checkpoint),
                                                            self.seconds())]
        if self.to_go <= 0:
            events.append(self.finish())
        return events

    def finish(self) -> PopulationDone:
        """Test accuracy of every bounty model and the final results."""
        test = self.trainer.test_accuracy()
        scores = self.population.bounty_score()
        return PopulationDone(
            key=self.key,
            members=[m.key for m in self.population.members],
            bounty=[s if s >= 0 else None for s in scores],
            bounty_loop=[bl if bl > 0 else None for bl in self.population.bounty_loop],
            # no candidate was ever kept (every one diverged and was discarded): no model to test
            test_acc=[t if s >= 0 else None for t, s in zip(test, scores)],
            seconds=self.seconds(),
        )


def population_events(kind: ModelKind, pp: PopulationPlan, data: Dataset, start: Any, ex: Execution,
                      prior_seconds: float = 0.0, where: str = "") -> Iterator[Event]:
    """Train one population to the design's meta-loops, from scratch or from `start`, one loop
    at a time: Started, one LoopDone per meta-loop and a final PopulationDone."""
    run = PopulationRun.of_plan(kind, pp, data, start, ex, prior_seconds, where)
    yield run.started()
    if run.to_go <= 0:
        yield run.finish()
        return
    while run.to_go > 0:
        run.launch()
        yield from run.collect()


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


def design_data(kind: ModelKind, data_dir: str | None, device: torch.device) -> Dataset:
    """The data a study trains on (design_data_view of the whole data set, loaded once)."""
    return design_data_view(kind, cached_data(kind.design.dataset, data_dir, device))


def design_data_view(kind: ModelKind, data: Dataset) -> Dataset:
    """`data` (the whole data set) as the study trains on it: cut to the design's `train_subset`
    images if it says so, and shaped as the kind's models take it."""
    design: StudyDesign = kind.design
    if design.train_subset is not None:
        n = design.train_subset
        if n > data.train_x.shape[0]:  # the design checked MNIST's 50,000 only; its trials would record n
            raise DesignError(f"train_subset {n:,} is more than the {data.train_x.shape[0]:,} training examples of "
                              f"{data.source}")
        data = dataclasses.replace(data, train_x=data.train_x[:n], train_y=data.train_y[:n])
    return kind.data_view(data)
