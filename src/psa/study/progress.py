"""A running study on the terminal: one bar weighted by the study's costs (psa.study.calibration)
with their ETA (psa.study.eta), a line per population."""

from __future__ import annotations

from typing import Any

from psa.core.variant import condition_label
from psa.study.calibration import StudyCosts
from psa.study.eta import RunPace
from psa.study.events import Event, LoopDone, PopulationDone, PopulationFailed, Started
from psa.study.kinds import ModelKind
from psa.study.runner import PopulationProgress


def clock_text(seconds: float | None) -> str:
    """h:mm:ss, as rich's time columns write it; -:--:-- for unknown."""
    if seconds is None:
        return "-:--:--"
    s = int(seconds + 0.5)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def eta_column(pace: RunPace, main: list[Any]) -> Any:
    """A rich column: the study's ETA (RunPace.eta) on the study's bar (`main` holds its task id
    once it exists), rich's own estimate from each population's recent loops on its line."""
    from rich.progress import TimeRemainingColumn
    from rich.text import Text

    class EtaColumn(TimeRemainingColumn):
        def render(self, task: Any) -> Text:
            if main and task.id == main[0]:
                return Text(clock_text(0.0 if task.finished else pace.eta()), style="progress.remaining")
            return super().render(task)

    return EtaColumn()


class StudyProgress:
    """A rich progress bar over the whole study (weighted by its costs) with the run's ETA, a
    line per running population, and a one-line summary per finished one."""

    def __init__(self, name: str, kind: ModelKind, pops: dict[str, PopulationProgress], console: Any,
                 quiet: bool, costs: StudyCosts, pace: RunPace) -> None:
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        self.kind = kind
        design = self.design = kind.design
        self.pops = pops
        self.quiet = quiet
        self.console = console
        self.costs = costs
        loops = design.hparams.meta_loops
        self.trials_total = design.n_trials
        self.trials_done = sum(st.plan.size for st in pops.values() if st.done)
        main: list[Any] = []
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            TextColumn("eta"),
            eta_column(pace, main),
            console=self.console,
            transient=False,
            disable=quiet or not self.console.is_terminal,
        )
        # the bar shows the loops trained this run, recomputed ones included (the ETA counts
        # only new ones, as psa status does)
        done = sum(costs.loop(st.plan) * (loops if st.done else st.loop) for st in pops.values())
        self.main = self.progress.add_task(f"study {name}", total=max(costs.total, 1e-9), completed=done,
                                           info=self._trials_info())
        main.append(self.main)
        self.rows: dict[str, Any] = {}

    def _trials_info(self) -> str:
        return f"{self.trials_done}/{self.trials_total} trials"

    def __enter__(self) -> "StudyProgress":
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.progress.__exit__(*exc)

    def finish(self) -> None:
        """Fill the study bar (its float sum of costs may fall short)."""
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
            self.progress.advance(self.main, self.costs.loop(pp))
            if ev.key in self.rows:
                self.progress.update(self.rows[ev.key], completed=ev.loop)
        elif isinstance(ev, PopulationDone):
            self.trials_done += pp.size
            self.progress.update(self.main, info=self._trials_info())
            if ev.key in self.rows:
                self.progress.remove_task(self.rows.pop(ev.key))
            # each condition apart: a variant's members share their mode with the paper engine's
            label = {(v.start_mode(m), v.to_json()): condition_label(m, name) for m, name, v in pp.conditions()}
            best: dict[str, float] = {}
            for (mode, settings, _), b in zip(ev.members, ev.bounty):
                c = label.get((mode, settings), mode)
                if b is not None:
                    best[c] = max(best.get(c, -1.0), b)
            bounties = "  ".join(f"{c} {best[c]:.2f}" if c in best else f"{c} -" for c in dict.fromkeys(label.values()))
            self.print(f"done {pp.label()}: {pp.size} members, {loops} meta-loops, {ev.seconds:.1f}s; "
                       f"best bounty {bounties}  [{self.trials_done}/{self.trials_total} trials]")
        elif isinstance(ev, PopulationFailed):
            if ev.key in self.rows:
                self.progress.remove_task(self.rows.pop(ev.key))
            self.print(f"[red]FAILED[/] {pp.label()}: {ev.message}")
