"""`psa selftest`: flags onto a SelftestConfig, the checks of psa.core.mlp.selftest, the verdict table."""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from psa.cli.argtypes import seed_int
from psa.core.errors import ConfigError


@dataclass(frozen=True)
class SelftestConfig:
    """What `psa selftest` was asked."""

    device: str = "auto"  # auto, cpu, cuda, cuda:N, mps
    seed: int = 0  # of every random input; printed so that a failure can be replayed
    quick: bool = False  # smaller checks, one timing
    json: str | None = None  # where to write the rows as JSON


def _interpret_off_gpu(device: Any) -> None:
    """Off CUDA, run the Triton kernels in Triton's interpreter so that they are checked too.
    The interpreter is chosen when the kernels are defined, so only before their first import."""
    import sys
    from importlib.util import find_spec

    if device.type != "cuda" and "psa.core.kernels.programs" not in sys.modules and find_spec("triton"):
        os.environ.setdefault("TRITON_INTERPRET", "1")


def _fmt(x: float | None, pct: bool = False) -> str:
    if x is None or x != x:
        return "-"
    if pct:
        return f"{100 * x:.1f}%"
    return "0" if x == 0 else f"{x:.3g}"


def cmd_selftest(args: argparse.Namespace) -> int:
    """Run the checks and timings; exit 1 if any check failed."""
    cfg = SelftestConfig(device=args.device, seed=args.seed, quick=args.quick, json=args.json)
    from rich.table import Table

    from psa.core.device import resolve_device

    device = resolve_device(cfg.device)
    if cfg.json:  # refused before a minute of checks, not after
        parent = Path(cfg.json).resolve().parent
        if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
            raise ConfigError(f"--json {cfg.json}: {parent} is not a writable directory")
        if Path(cfg.json).is_dir():
            raise ConfigError(f"--json {cfg.json} is a directory; give a file name, e.g. "
                              f"{Path(cfg.json) / 'selftest.json'}")
    _interpret_off_gpu(device)
    from psa.core.mlp import selftest
    from psa.core.checkpoint import atomic_write
    from psa.core.device import describe_device
    from psa.study.console import err_console, out_console

    err_console.print(f"psa selftest on {describe_device(device)}: seed {cfg.seed} (--seed N to change)"
                      f"{', quick' if cfg.quick else ''}")
    colour = {"PASS": "green", "FAIL": "bold red", "SKIP": "yellow"}

    def on_row(row: selftest.Check | selftest.Timing) -> None:
        if isinstance(row, selftest.Check):
            err_console.print(f"  [{colour[row.status]}]{row.status}[/] {row.name}")
            if row.detail.startswith("FALLBACK") or "FALLBACK:" in row.detail:
                err_console.print(f"  {row.name}: {row.detail}", soft_wrap=True, markup=False)
        else:
            err_console.print(f"  timed {row.arch}: {_fmt(row.loop_ms)} ms/loop")

    report = selftest.run(device, cfg.seed, cfg.quick, on_row)
    if cfg.json:
        try:
            atomic_write(cfg.json, json.dumps(report.to_dict(), indent=1) + "\n")
        except OSError as e:
            raise ConfigError(f"--json {cfg.json}: cannot write there ({e.strerror})") from None

    checks = Table(title=f"psa selftest on {report.device}, seed {report.seed}", title_justify="left")
    for col, just in (("check", "left"), ("status", "left"), ("measure", "right"), ("limit", "right"),
                      ("detail", "left")):
        checks.add_column(col, justify=just)  # type: ignore[arg-type]
    for c in report.checks:
        checks.add_row(c.name, f"[{colour[c.status]}]{c.status}[/]", _fmt(c.measure), _fmt(c.limit), c.detail)
    timings = Table(title="meta-loop timings (synthetic MNIST-shaped data)", title_justify="left")
    for col in ("arch", "members", "steps", "loop ms", "TFLOP/s", "peak TFLOP/s", "of peak", "path"):
        timings.add_column(col, justify="left" if col in ("arch", "path") else "right")
    for t in report.timings:
        timings.add_row(t.arch, str(t.members), str(t.steps), _fmt(t.loop_ms), _fmt(t.tflops), _fmt(t.peak_tflops),
                        _fmt(t.fraction, pct=True), t.path)
    out_console.print(checks)
    out_console.print(timings)
    failed = [c.name for c in report.checks if c.status == "FAIL"]
    skipped = sum(c.status == "SKIP" for c in report.checks)
    if failed:
        out_console.print(f"[bold red]FAIL[/]: {', '.join(failed)} (replay with --seed {report.seed})")
        return 1
    out_console.print(f"[green]PASS[/]: {len(report.checks) - skipped} checks passed, {skipped} skipped")
    return 0


def register(sub: Any) -> None:
    """Add `selftest` to psa's subcommands."""
    p = sub.add_parser("selftest", help="check the fast paths against the plain torch path here, and time them")
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N, mps")
    p.add_argument("--seed", type=seed_int, default=0, help="seed of the random inputs (default 0)")
    p.add_argument("--quick", action="store_true", help="smaller checks and one timing (well under a minute)")
    p.add_argument("--json", metavar="PATH", help="also write the rows as JSON to PATH")
    p.set_defaults(func=cmd_selftest)
