"""The `psa` command: flags in, configs out, one clear line on bad input (exit status 2)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence

from psa.core.arch import ArchError, matched_arch, parse_arch
from psa.cli.argtypes import nonneg_int, positive_int
from psa.cli.flags import add_engine_flags, add_training_flags
from psa.core.checkpoint import CheckpointError
from psa.core.data import DataError
from psa.analysis import ReportError
from psa.core.population import MODES, ConfigError
from psa.report import register as register_report
from psa.study.store import StoreError
from psa.study.options import StudyError
from psa.cli.study import register as register_study

USER_ERRORS = (ArchError, ConfigError, DataError, CheckpointError, ReportError, StoreError, StudyError)


class UsageError(Exception):
    """A command line that argparse rejected."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr and exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{self.prog}: error: {message}")


def cmd_arch(args: argparse.Namespace) -> int:
    """Print the layer table and parameter count of an architecture."""
    from psa.study.console import arch_table, out_console

    arch = parse_arch(args.arch)
    matches = [matched_arch(arch, d) for d in args.match or []]
    if args.json:
        print(json.dumps({
            "arch": str(arch),
            "params": arch.params,
            "layers": [{"name": n, "in": a, "out": b, "params": p} for n, a, b, p in arch.layer_table()],
            "matched": [{"arch": str(m), "params": m.params} for m in matches],
        }, indent=1))
        return 0
    out_console.print(arch_table(arch))
    for m in matches:
        out_console.print(f"depth {m.depth}: {m.short} has {m.params:,} parameters "
                          f"({m.params - arch.params:+,} against {arch.short})")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    """Train one trial (or resume one) and print its summary."""
    from psa.study.train import RunConfig, train

    cfg = RunConfig(
        arch=args.arch,
        mode=args.mode,
        meta_loops=args.meta_loops,
        seed=args.seed,
        lr=args.lr,
        batch_size=args.batch_size,
        weight_decay=args.weight_decay,
        dropout=args.dropout,
        device=args.device,
        dataset=args.dataset,
        data_dir=args.data_dir,
        out=args.out,
        resume=args.resume,
        quiet=args.json,
        precision=args.precision,
        kernels=args.kernels,
        graphs=not args.no_graphs,
    )
    summary = train(cfg)
    if args.json:
        print(json.dumps(summary, indent=1))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The whole command line."""
    parser = _Parser(prog="psa", description="Persistent Stochastic Ablation: the Frustration Engine on populations of MLPs.")
    from psa import __version__

    parser.add_argument("--version", action="version", version=f"psa {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser("arch", help="show an architecture's layers and parameter count")
    p.add_argument("arch", help='e.g. "[2*128, 4*64]" or 1*2048')
    p.add_argument("--match", type=positive_int, nargs="+", metavar="DEPTH",
                   help="also print the parameter-matched DEPTH*W net (equation 2)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_arch)

    p = sub.add_parser("train", help="train one trial with the Frustration Engine")
    p.add_argument("--arch", help='hidden layers, e.g. "[1*128]" or "[2*128, 4*64]"')
    p.add_argument("--mode", "--ablation-mode", dest="mode", choices=MODES, help="training mode (default none)")
    p.add_argument("--meta-loops", type=positive_int, help="meta-loops to run (default 100; on resume: this many more)")
    p.add_argument("--seed", type=nonneg_int, help="seed of the initial weights and random streams (default 0)")
    add_training_flags(p)
    p.add_argument("--out", help="run directory (must be new or empty; default runs/ARCH-MODE-seedN)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a run, optionally in another --mode")
    p.add_argument("--json", action="store_true", help="print a machine-readable summary instead of progress")
    add_engine_flags(p, None)
    p.set_defaults(func=cmd_train)

    register_study(sub)  # psa study, psa status, psa export
    register_report(sub)  # psa report, psa compare
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `psa` and `python -m psa`."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return 2
        func: Callable[[argparse.Namespace], int] = args.func
        return func(args)
    except UsageError as e:
        print(str(e), file=sys.stderr)
        return 2
    except USER_ERRORS as e:
        print(f"psa: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("psa: interrupted", file=sys.stderr)
        return 130
