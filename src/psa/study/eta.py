"""The ETA of a running study: the stored cost of the work left (psa.study.calibration) x this
run's pace, the wall seconds it has taken per second of stored cost.

The pace is measured from the run's first recorded meta-loop to its latest. What comes before
the first loop is start-up that the rest of the run does not pay again: imports, data, the
fused CPU step's codes of the training set, Triton's compilation, the first population's
set-up and the process's first-use costs. Until a second loop is recorded, the pace is 1 where
the costs are seconds measured on this device (the calibration taken as it is), and unknown
where they are the analytic model's relative units. With several populations in flight (a GPU),
the loops the others have under way when one is recorded count as half done, which on average
they are; with one in flight, none is under way then. Work that a failed population leaves is
not left to this run.

The progress bar (RunPace, fed the run's events) and `psa status` (status_eta, from the
database's rows) both compute it with eta_seconds.
"""

from __future__ import annotations

import datetime
import time
from collections.abc import Callable, Mapping
from typing import Any

from psa.study.calibration import StudyCosts
from psa.study.events import Event, LoopDone, PopulationDone, PopulationFailed, Started
from psa.study.plan import Plan
from psa.study.runner import PopulationProgress


def eta_seconds(left: float, gained: float, elapsed: float, since: float, measured: bool) -> float | None:
    """Seconds to the study's end: `left` (the stored cost of the work left at the latest
    recorded loop) x the pace (`elapsed` wall seconds over the `gained` stored cost between the
    run's first and latest recorded loops), less the `since` seconds passed after the latest.
    Without a pace yet: 1 where the costs were `measured` in seconds, else None."""
    if gained > 0 and elapsed > 0:
        pace = elapsed / gained
    elif measured:
        pace = 1.0
    else:
        return None
    return max(0.0, left * pace - since)


class RunPace:
    """This run's work and pace, from the events it records: what the progress bar's ETA shows."""

    def __init__(self, costs: StudyCosts, pops: dict[str, PopulationProgress],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.costs = costs
        self.clock = clock
        self.plans = {k: st.plan for k, st in pops.items()}
        # loops as the database counts them (a loop recomputed after a crash is not new work)
        self.loops = {k: costs.meta_loops if st.done else st.loops_done for k, st in pops.items()}
        self.running: set[str] = set()
        self.failed_left = 0.0  # what failed populations leave undone
        self.work_at_start = self._recorded()
        self.anchor: tuple[float, float] | None = None  # (time, work) at the run's first recorded loop
        self.last = (clock(), self.work_at_start)  # (time, work) at its latest

    def _recorded(self) -> float:
        return sum(self.costs.loop(self.plans[k]) * n for k, n in self.loops.items())

    def event(self, ev: Event) -> float | None:
        """Take in one event; returns the work done at it where it is the run's first recorded
        loop (the pace's start, which the runs row keeps for `psa status`), else None."""
        key, pp = ev.key, self.plans[ev.key]
        if isinstance(ev, Started):
            self.running.add(key)
        elif isinstance(ev, PopulationFailed):
            self.running.discard(key)
            self.failed_left += self.costs.loop(pp) * (self.costs.meta_loops - self.loops[key])
        elif isinstance(ev, PopulationDone):
            self.running.discard(key)
            self.loops[key] = self.costs.meta_loops
        elif isinstance(ev, LoopDone):
            self.loops[key] = max(self.loops[key], ev.loop)
            others = sum(self.costs.loop(self.plans[k]) for k in self.running if k != key)
            self.last = (self.clock(), self._recorded() + others / 2)
            if self.anchor is None:
                self.anchor = self.last
                return self.last[1]
        return None

    def eta(self) -> float | None:
        """Seconds to the end of this run's work, now."""
        t, work = self.last
        t0, work0 = self.anchor or self.last
        left = self.costs.total - self.failed_left - work
        return eta_seconds(left, work - work0, t - t0, self.clock() - t, self.costs.measured)


def _utc(text: Any) -> datetime.datetime | None:
    try:
        return datetime.datetime.fromisoformat(str(text)) if text else None
    except ValueError:
        return None


def status_eta(costs: StudyCosts, plan: Plan, archs: list[Mapping[str, Any]], run: Mapping[str, Any],
               now: datetime.datetime) -> float | None:
    """The ETA `psa status` shows for a running study, from its trials' progress per net
    (store.arch_progress's rows) and its latest runs row (the time and work of the run's first
    recorded loop; a run from before those columns, or one that has recorded none, is paced
    from its start). What RunPace computes from the events, but from trials: populations in
    flight are those of its running trials, and a failed trial's share of its net is not left."""
    sizes: dict[str, list[int]] = {}
    for pp in plan.populations:
        sizes.setdefault(pp.net, []).append(pp.size)
    recorded = left = running = n_running = 0.0
    for a in archs:
        w = costs.trial_loop.get(a["arch"])
        if w is None:
            continue
        done, total = int(a["loops_done"] or 0), int(a["loops_total"] or 0)
        live = 1.0 - int(a["failed"] or 0) / max(1, int(a["trials"] or 0))
        recorded += w * done
        left += w * (total - done) * live
        running += w * int(a["running"] or 0)
        n_running += int(a["running"] or 0) / (sum(sizes[a["arch"]]) / len(sizes[a["arch"]]))
    # at the latest loop, the populations in flight but the one recorded were half-way through theirs
    half = running * max(0.0, n_running - 1) / n_running / 2 if n_running > 0 else 0.0
    work = recorded + half
    started = _utc(run.get("started_at"))
    beat = _utc(run.get("heartbeat_at")) or started
    if started is None or beat is None:
        return None
    anchor = _utc(run.get("pace_at"))
    if anchor is None:
        anchor, work0 = started, float(run.get("work_at_start") or 0.0)
    else:
        work0 = float(run.get("work_at_pace") or 0.0)
    return eta_seconds(left - half, work - work0, (beat - anchor).total_seconds(), (now - beat).total_seconds(),
                       costs.measured)
