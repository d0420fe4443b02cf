"""Terminal output with rich: architecture tables and meta-loop progress."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from psa.core.arch import Arch, is_parameter_matched
from psa.core.model import DEFAULT_MODEL, layer_table, param_count

# Piped into a file, rich would lay tables out for 80 columns and cut their cells short; a
# wider page keeps them whole (COLUMNS, where set, still decides).
PIPED_WIDTH = None if "COLUMNS" in os.environ else 132
err_console = Console(stderr=True, highlight=False, width=None if sys.stderr.isatty() else PIPED_WIDTH)
out_console = Console(highlight=False, width=None if sys.stdout.isatty() else PIPED_WIDTH)


def arch_table(arch: Arch, title: str | None = None, model: str = DEFAULT_MODEL) -> Table:
    """The layer-by-layer summary of `model` for `arch`, with its parameter count (equation 1
    for a SimpleMLP)."""
    if model == DEFAULT_MODEL:
        rows = arch.layer_table()
        matched = "matched" if is_parameter_matched(arch) else "asymmetric"
        total = (f"{arch.depth} hidden", matched if arch.is_homogeneous and arch.blocks else "", arch.params)
        return _layer_rows_table(title or f"SimpleMLP {arch}", rows, _simplemlp_block, total)
    rows = layer_table(arch, model)
    total = (f"{arch.depth} blocks", f"{len(rows)} Linear", param_count(arch, model))
    return _layer_rows_table(title or f"ResMLP {arch}", rows, _resmlp_block, total)


def _simplemlp_block(name: str) -> str:
    return "Linear" if name == "output" else "Linear -> ReLU -> Dropout"


def _resmlp_block(name: str) -> str:
    if name == "output":
        return "Linear"
    return "Linear, ReLU(x + branch)" if name.endswith("fc2") else "Linear -> ReLU -> Dropout"


def _layer_rows_table(title: str, rows: list[tuple[str, int, int, int]], block: Callable[[str], str],
                      total: tuple[str, str, int]) -> Table:
    """Layers (name, inputs, outputs, parameters) as a table, the middle of a long net elided,
    and a total row (shape, block, parameters)."""
    t = Table(title=title, title_justify="left")
    t.add_column("layer")
    t.add_column("shape", justify="right")
    t.add_column("block")
    t.add_column("parameters", justify="right")
    shown = rows if len(rows) <= 12 else rows[:5] + [None] + rows[-5:]
    for row in shown:
        if row is None:
            t.add_row("...", f"({len(rows) - 10} more)", "", "")
            continue
        name, a, b, p = row
        t.add_row(name, f"{a} -> {b}", block(name), f"{p:,}")
    t.add_section()
    t.add_row("total", total[0], total[1], f"{total[2]:,}")
    return t


def loop_progress(console: Console | None = None) -> Progress:
    """A two-bar progress display: meta-loops (with ETA) and steps of the current epoch."""
    return Progress(
        TextColumn("{task.description:<10}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=console or err_console,
        transient=False,
        disable=not (console or err_console).is_terminal and not sys.stderr.isatty(),
    )


def probe_progress() -> Progress:
    """The dry run's progress over its probes, on a terminal only and cleared when done; redrawn
    at each probe rather than by a thread, which would share the CPU with what is timed."""
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err_console,
        transient=True,
        auto_refresh=False,
        disable=not err_console.is_terminal,
    )


def fmt_seconds(s: float, rough: bool = False) -> str:
    """A duration for people: "45 s", "12.5 min", "3.2 h", "2.1 d"; rough (an ETA): "~45 s",
    "~12 min", "~3.2 h", never below zero nor in days."""
    if rough:
        s = max(0.0, s)
        if s < 90:
            return f"~{s:.0f} s"
        if s < 5400:
            return f"~{s / 60:.0f} min"
        return f"~{s / 3600:.1f} h"
    if s < 90:
        return f"{s:.0f} s"
    if s < 5400:
        return f"{s / 60:.1f} min"
    if s < 172800:
        return f"{s / 3600:.1f} h"
    return f"{s / 86400:.1f} d"
