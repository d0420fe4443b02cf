"""A running study on the terminal: one bar weighted by estimated work, a line per population."""

from __future__ import annotations

from typing import Any

from psa.study.events import Event, LoopDone, PopulationDone, PopulationFailed, Started
from psa.study.kinds import ModelKind
from psa.study.plan import PopulationPlan
from psa.study.runner import PopulationProgress


def work_units(kind: ModelKind, pp: PopulationPlan, loops: int) -> float:
    """Progress weight of `loops` meta-loops of a population (the kind's loop cost)."""
    return kind.loop_cost(pp) * loops


def work_done(kind: ModelKind, pops: dict[str, PopulationProgress]) -> float:
    """Progress weight of what the populations have recorded so far."""
    loops = kind.design.hparams.meta_loops
    return sum(work_units(kind, st.plan, loops if st.done else st.loop) for st in pops.values())


class StudyProgress:
    """A rich progress bar over the whole study (weighted by estimated work, so its ETA means
    something), a line per running population, and a one-line summary per finished one."""

    def __init__(self, name: str, kind: ModelKind, pops: dict[str, PopulationProgress], console: Any,
                 quiet: bool) -> None:
        from rich.progress import (
            BarColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.kind = kind
        design = self.design = kind.design
        self.pops = pops
        self.quiet = quiet
        self.console = console
        total = sum(work_units(kind, st.plan, design.hparams.meta_loops) for st in pops.values())
        self.trials_total = design.n_trials
        self.trials_done = sum(st.plan.size for st in pops.values() if st.done)
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
        self.main = self.progress.add_task(f"study {name}", total=max(total, 1e-9), completed=work_done(kind, pops),
                                           info=self._trials_info())
        self.rows: dict[str, Any] = {}

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

    def event(self, ev: Event) -> None:
        """Advance the display after the study recorded `ev`."""
        pp = self.pops[ev.key].plan
        loops = self.design.hparams.meta_loops
        if isinstance(ev, Started):
            if ev.key not in self.rows:
                self.rows[ev.key] = self.progress.add_task(f"  {pp.label()}", total=loops, completed=ev.loop,
                                                           info=f"{pp.size} members on {ev.where}")
        elif isinstance(ev, LoopDone):
            self.progress.advance(self.main, work_units(self.kind, pp, 1))
            if ev.key in self.rows:
                self.progress.update(self.rows[ev.key], completed=ev.loop)
        elif isinstance(ev, PopulationDone):
            self.trials_done += pp.size
            self.progress.update(self.main, info=self._trials_info())
            if ev.key in self.rows:
                self.progress.remove_task(self.rows.pop(ev.key))
            best: dict[str, float] = {}
            for (mode, *_), b in zip(ev.members, ev.bounty):
                if b is not None:
                    best[mode] = max(best.get(mode, -1.0), b)
            bounties = "  ".join(f"{m} {best[m]:.2f}" if m in best else f"{m} -" for m in pp.modes)
            self.print(f"done {pp.label()}: {pp.size} members, {loops} meta-loops, {ev.seconds:.1f}s; "
                       f"best bounty {bounties}  [{self.trials_done}/{self.trials_total} trials]")
        elif isinstance(ev, PopulationFailed):
            if ev.key in self.rows:
                self.progress.remove_task(self.rows.pop(ev.key))
            self.print(f"[red]FAILED[/] {pp.label()}: {ev.message}")
