"""The `psa` command: flags in, configs out, one clear line on bad input (exit status 2)."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import warnings
from collections.abc import Callable, Sequence

from psa.analysis import ReportError
from psa.cli.report import register as register_report
from psa.cli.selftest import register as register_selftest
from psa.cli.study import register as register_study
from psa.cli.train import register as register_train
from psa.core.arch import ArchError
from psa.core.checkpoint import CheckpointError
from psa.core.data import DataError
from psa.core.errors import ConfigError
from psa.study.options import StudyError
from psa.study.store import StoreError

USER_ERRORS = (ArchError, ConfigError, DataError, CheckpointError, ReportError, StoreError, StudyError)


class UsageError(Exception):
    """A command line that argparse rejected."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr and exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{self.prog}: error: {message}")


def build_parser() -> argparse.ArgumentParser:
    """The whole command line."""
    parser = _Parser(prog="psa",
                     description="Persistent Stochastic Ablation: the Frustration Engine on populations of MLPs.")
    from psa import __version__

    parser.add_argument("--version", action="version", version=f"psa {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    register_train(sub)  # psa arch, psa train
    register_study(sub)  # psa study, psa status, psa export
    register_report(sub)  # psa report, psa compare
    register_selftest(sub)  # psa selftest
    return parser


def _one_line(message: Warning | str, category: type[Warning], filename: str, lineno: int,
              line: str | None = None) -> str:
    """psa's own notes as the one line they are (a command has no caller's line to point at);
    any other warning as Python prints it."""
    if str(message).startswith("psa: "):
        return f"{message}\n"
    return _python_format(message, category, filename, lineno, line)


_python_format = warnings.formatwarning


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `psa` and `python -m psa`."""
    parser = build_parser()
    shown = warnings.formatwarning
    warnings.formatwarning = _one_line  # type: ignore[assignment]
    try:
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return 2
        func: Callable[[argparse.Namespace], int] = args.func
        rc = func(args)
        sys.stdout.flush()  # a reader gone early fails here, inside the handlers below, not at exit
        return rc
    except BrokenPipeError:
        # the reader went away (psa arch --json | head -1): nothing left to say to it, and no
        # traceback; exit status 1 and the rest of stdout to /dev/null, as rich does for its own
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except UsageError as e:
        print(str(e), file=sys.stderr)
        return 2
    except USER_ERRORS as e:
        print(f"psa: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("psa: interrupted", file=sys.stderr)
        return 130
    finally:
        warnings.formatwarning = shown
