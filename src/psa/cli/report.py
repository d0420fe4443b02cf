"""`psa report` and `psa compare` on the command line: flags onto configs, configs into calls.

Errors leave as exceptions that `psa.cli.main` turns into one line and exit status 2.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from psa.analysis.results import ReportError
from psa.cli.argtypes import nonneg_real, number, percentage, probability, seed_int
from psa.core.arch import ArchError, parse_arch
from psa.study.options import DEFAULT_DB


def _archs_arg(text: str) -> tuple[str, ...]:
    """Architectures from "1*2048,18*18" or "1*2048 18*18"; a bracketed "[2*128, 4*64]" stays one."""
    out = []
    for a in re.findall(r"\[[^\]]*\]|[^,;\s\[\]]+", text):
        try:
            out.append(parse_arch(a).short)
        except ArchError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    if not out:
        raise argparse.ArgumentTypeError(f"no architecture in {text!r}")
    return tuple(out)


RESAMPLES = number(int, 100, 1_000_000, noun="a number of resamples")


def cmd_report(args: argparse.Namespace) -> int:
    """`psa report`."""
    # imported here: matplotlib is slow to load and only these two commands draw
    from psa.analysis.report import ReportConfig, build_report

    if args.reference and args.study is not None:
        raise ReportError(f"--study chooses a study of a database or an export; --reference {args.reference} "
                          "is the authors' data, which has none")
    cfg = ReportConfig(
        db=None if args.reference or args.export else args.db,
        reference=args.reference,
        study=args.study,
        out=args.out,
        rules=args.rules,
        zero_r=args.zero_r,
        alpha=args.alpha,
        n_boot=args.bootstrap,
        seed=args.seed,
        convergence=args.convergence,
        escape_margin=args.escape_margin,
        tie_tolerance=args.tie_tolerance,
        export=tuple(args.export or ()),
    )
    res = build_report(cfg)
    print("\n".join(res.lines))
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    """`psa compare`."""
    from psa.analysis.compare import CompareOptions, build_compare

    if args.published and args.study is not None:
        raise ReportError("--study chooses a study of a database or an export; --published is the authors' data, "
                          "which has none")
    opt = CompareOptions(
        db=None if args.published or args.export else args.db,
        ours_published=args.published,
        reference=args.reference,
        study=args.study,
        out=args.out,
        rules=args.rules,
        zero_r=args.zero_r,
        alpha=args.alpha,
        escape_margin=args.escape_margin,
        convergence=args.convergence,
        export=tuple(args.export or ()),
    )
    res = build_compare(opt)
    print("\n".join(res.verdict))
    print(f"wrote {Path(opt.out) / 'index.html'}, verdict.txt and tables/compare_cells.{{md,csv,tex}}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add `report` and `compare` to the `psa` command line."""
    p = sub.add_parser("report", help="tables, regimes, statistics, figures and an HTML page from a study")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--db", default=str(DEFAULT_DB), help=f"results database (default {DEFAULT_DB})")
    src.add_argument("--reference", choices=["published"], help="report on the authors' published data instead")
    src.add_argument("--export", nargs="+", metavar="PATH",
                     help="psa export's output instead of a database: directories or trials CSVs (.csv.gz too), "
                          "their meta_loops files beside them; several are concatenated (a study run in slices)")
    p.add_argument("--study", help="study name, when the database holds several (default: the latest; "
                                   "with --export: every exported study)")
    p.add_argument("--out", default="report", help="output directory (default report/)")
    p.add_argument("--rules", choices=["published", "paper"], default="published",
                   help="regime rules: those that drew the published map (default) or eqs. 6-8 as printed")
    p.add_argument("--zero-r", type=percentage, help="validation ZeroR in %% (default: computed from the data set)")
    p.add_argument("--alpha", type=probability, default=0.05, help="level of the paired tests (default 0.05)")
    p.add_argument("--bootstrap", type=RESAMPLES, default=10_000, help="bootstrap resamples (default 10000)")
    p.add_argument("--seed", type=seed_int, default=0, help="seed of the bootstrap (default 0)")
    p.add_argument("--convergence", type=_archs_arg, default=None, metavar="ARCHS",
                   help="architectures of the convergence plot, comma-separated "
                        "(default 1*2048,18*18 where present, else the study's first and last)")
    p.add_argument("--escape-margin", type=nonneg_real, default=0.5,
                   help="a trial escapes ZeroR when its peak exceeds it by more than this (default 0.5 points)")
    p.add_argument("--tie-tolerance", type=nonneg_real, default=0.0,
                   help="Table V winners: rounded means within this many points tie (default 0: equal)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("compare", help="compare a study with the published results or the printed Table V")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--db", default=str(DEFAULT_DB), help=f"results database (default {DEFAULT_DB})")
    src.add_argument("--published", action="store_true",
                     help="compare the published data itself (e.g. against --reference seed)")
    src.add_argument("--export", nargs="+", metavar="PATH",
                     help="psa export's output instead of a database: directories or trials CSVs (.csv.gz too), "
                          "their meta_loops files beside them; several are concatenated (a study run in slices)")
    p.add_argument("--reference", choices=["published", "seed"], default="published",
                   help="published (default): the authors' final per-trial data; seed: the paper's printed Table V")
    p.add_argument("--study", help="study name, when the database holds several (default: the latest; "
                                   "with --export: every exported study)")
    p.add_argument("--out", default="compare", help="output directory (default compare/)")
    p.add_argument("--rules", choices=["published", "paper"], default="published",
                   help="regime rules: those that drew the published map (default) or eqs. 6-8 as printed")
    p.add_argument("--zero-r", type=percentage, help="validation ZeroR in %% (default: computed from the data set)")
    p.add_argument("--alpha", type=probability, default=0.01, help="level of the per-cell tests (default 0.01)")
    p.add_argument("--escape-margin", type=nonneg_real, default=0.5,
                   help="a trial escapes ZeroR when its peak exceeds it by more than this (default 0.5 points)")
    p.add_argument("--convergence", type=_archs_arg, default=None, metavar="ARCHS",
                   help="architectures of the convergence overlay "
                        "(default 1*2048,18*18 where present, else the study's first and last)")
    p.set_defaults(func=cmd_compare)

