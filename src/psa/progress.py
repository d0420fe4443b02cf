"""psa.fit's progress on the terminal: one rich bar over the meta-loops with the best bounty so
far and an ETA; nothing at all where stderr is not a terminal, unless asked for, and then a
plain line per meta-loop (for a job's log file).

Like psa.library, this module stands above psa's layers.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

# more conditions than this show the best bounty overall (and whose it is), not each one's
PER_CONDITION_MAX = 4


def duration(seconds: float) -> str:
    """Seconds for people: "0.8 s", "42 s", "3 min 12 s", "2 h 05 min"."""
    if seconds < 10:
        return f"{seconds:.1f} s"
    s = round(seconds)
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


def best_text(best: Mapping[str, float]) -> str:
    """The best bounty so far: each condition's where there are few, else the best of all."""
    if not best:
        return ""
    if len(best) <= PER_CONDITION_MAX:
        return "  ".join(f"{c} {b:.2f}" for c, b in best.items())
    cond = max(best, key=lambda c: best[c])
    return f"best {best[cond]:.2f} ({cond})"


class FitProgress:
    """The display of one psa.fit call. `show`: None (psa.fit's default) shows a live bar where
    stderr is a terminal and nothing elsewhere; True shows it anywhere (a notebook's live bar,
    or a line per meta-loop where output goes to a file); False shows nothing."""

    def __init__(self, show: bool | None, title: str, loops: int, console: Any = None) -> None:
        from rich.console import Console

        self.console = console or Console(stderr=True, highlight=False)
        live = self.console.is_terminal or self.console.is_jupyter
        self.on = bool(self.console.is_terminal if show is None else show)
        self.live = self.on and live
        self.title, self.loops = title, loops
        self.t0 = time.perf_counter()
        self.bar: Any = None
        self.task: Any = None

    def __enter__(self) -> FitProgress:
        self.t0 = time.perf_counter()
        if self.live:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self.bar = Progress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("loops"),
                TextColumn("{task.fields[best]}", markup=False), TimeElapsedColumn(), TextColumn("eta"),
                TimeRemainingColumn(),
                console=self.console,
                # a meta-loop can take minutes: the ETA is the mean over all of them, not the last 30 s
                speed_estimate_period=24 * 3600.0,
            )
            self.bar.__enter__()
            self.task = self.bar.add_task(self.title, total=self.loops, best="")
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.bar is not None:
            self.bar.__exit__(*exc)
            self.bar = None

    def loop_done(self, loop: int, best: Mapping[str, float]) -> None:
        """Meta-loop `loop` of `self.loops` is done; `best` is each condition's best bounty so far."""
        if not self.on:
            return
        text = best_text(best)
        if self.bar is not None:
            self.bar.update(self.task, completed=loop, best=text)
            return
        elapsed = time.perf_counter() - self.t0
        eta = elapsed / loop * (self.loops - loop)
        self.console.print(f"{self.title}: loop {loop}/{self.loops}  {text}  {duration(elapsed)} elapsed, eta "
                           f"{duration(eta)}", markup=False, soft_wrap=True)

    @contextlib.contextmanager
    def status(self, text: str) -> Iterator[None]:
        """A spinner saying `text` while the block runs (a line, without a terminal)."""
        if not self.on:
            yield
        elif self.live:
            with self.console.status(text):
                yield
        else:
            self.console.print(text, markup=False, soft_wrap=True)
            yield

    def say(self, text: str) -> None:
        """One line, where progress is on."""
        if self.on:
            self.console.print(text, markup=False, soft_wrap=True)


def conditions_best(conditions: Sequence[str], scores: Sequence[float], index: Mapping[tuple[str, int], int]
                    ) -> dict[str, float]:
    """Each condition's best bounty over its trials from the population's scores (-1 before a
    first promotion: left out)."""
    best: dict[str, float] = {}
    for (cond, _), j in index.items():
        if scores[j] >= 0:
            best[cond] = max(best.get(cond, -1.0), scores[j])
    return {c: best[c] for c in conditions if c in best}
