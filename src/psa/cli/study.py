"""`psa study`, `psa status` and `psa export`: flags onto StudyDesign/RunOptions, and the views."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import sys
from pathlib import Path
from typing import Any

from psa.cli.argtypes import nonneg_int, positive_int, seconds, seed_int
from psa.cli.flags import add_engine_flags, add_model_flags, add_training_flags
from psa.core.member import MODES
from psa.study import store
from psa.study.design import (
    DESIGN_FIELDS,
    PRESETS,
    DesignError,
    StudyDesign,
    arch_list,
    read_arch_file,
    parse_variants,
    resolve_design,
)
from psa.study.calibration import StudyCosts, stored_costs
from psa.study.driver import run_study
from psa.study.stored import stored_design
from psa.study.dry_run import dry_run
from psa.study.lock import checkpoint_root, lock_held, lock_owner
from psa.study.options import DEFAULT_DB, RunOptions
from psa.study.kinds import model_kind
from psa.study.eta import status_eta
from psa.study.plan import Plan, make_plan
from psa.study.export import export
from psa.study.store import StoreError


def _modes(text: str) -> tuple[str, ...]:
    """--modes: comma-separated mode names, or `all` for the six."""
    if text.strip().lower() == "all":
        return MODES
    modes = tuple(m.strip() for m in text.split(","))
    if not any(modes):
        raise argparse.ArgumentTypeError("expected a comma-separated list of modes")
    if not all(modes):  # "none,,hidden" or a trailing comma: as --arch refuses an empty block
        raise argparse.ArgumentTypeError(f"an empty mode in {text!r}; write the modes separated by single commas")
    for m in modes:
        if m not in MODES:
            raise argparse.ArgumentTypeError(f"unknown mode {m!r}; choose from {', '.join(MODES)}")
    return modes


def _variant(text: str) -> tuple[str, dict[str, Any]]:
    """--variant "NAME key=value ...": one named engine variant (keys as in a design file's
    [variants.NAME] table, e.g. "patience5 patience=5" or "sched schedule=dropout:50,hidden:50")."""
    if not text.split():
        raise argparse.ArgumentTypeError(f"--variant {text!r}: write NAME key=value ...")
    name, *pairs = text.split()
    settings: dict[str, Any] = {}
    for pair in pairs:
        key, eq, value = pair.partition("=")
        if not eq or not key:
            raise argparse.ArgumentTypeError(f"--variant {text!r}: write NAME key=value ..., got {pair!r}")
        if key.replace("-", "_") in settings:
            raise argparse.ArgumentTypeError(f"--variant {text!r}: {key} is given twice")
        low = value.lower()
        if low in ("true", "false"):
            settings[key.replace("-", "_")] = low == "true"
            continue
        try:
            settings[key.replace("-", "_")] = int(value)
        except ValueError:
            try:
                settings[key.replace("-", "_")] = float(value)
            except ValueError:
                settings[key.replace("-", "_")] = value
    if not settings:
        raise argparse.ArgumentTypeError(f"--variant {text!r}: give at least one key=value setting")
    return name, settings


def _formats(text: str) -> tuple[str, ...]:
    fmts = tuple(f.strip().lower() for f in text.split(",") if f.strip())
    bad = [f for f in fmts if f not in ("csv", "parquet")]
    if bad or not fmts:
        raise argparse.ArgumentTypeError(f"formats are csv and parquet, got {text!r}")
    return fmts


def _run_options(args: argparse.Namespace) -> RunOptions:
    """The running flags onto RunOptions: each flag fills the field of its name."""
    if args.chunk is not None:
        if args.population_size is not None:
            raise DesignError("give --population-size or its old name --chunk, not both")
        print("psa: warning: --chunk is deprecated; use --population-size", file=sys.stderr)
    flags = vars(args)
    same = {f.name: flags[f.name] for f in dataclasses.fields(RunOptions) if f.name in flags}
    return RunOptions(**{**same, "db": Path(args.db), "graphs": not args.no_graphs,
                         "population_size": args.chunk if args.chunk is not None else args.population_size})


def cmd_study(args: argparse.Namespace) -> int:
    """Run, resume or --dry-run a study."""
    archs: tuple[str, ...] | None = None
    if args.arch:
        archs = tuple(a for value in args.arch for a in arch_list(value))
    if args.arch_file:
        if archs:
            raise DesignError("give --arch or --arch-file, not both")
        archs = read_arch_file(args.arch_file)
    overrides: dict[str, Any] = {
        "architectures": archs, "modes": args.modes, "trials": args.trials, "meta_loops": args.meta_loops,
        "seed": args.seed, "lr": args.lr, "batch_size": args.batch_size, "weight_decay": args.weight_decay,
        "dropout": args.dropout, "diverged": args.diverged, "train_subset": args.train_subset,
        "dataset": args.dataset,
        "model": None if args.model is None else args.model[0] if len(args.model) == 1 else tuple(args.model),
        "block_dropout": args.block_dropout, "base_weight_decay": args.base_weight_decay,
        "variants": parse_variants(dict(args.variant)) if args.variant else None,
    }
    names = [n for n, _ in args.variant or ()]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:  # dict() would keep the last silently
        raise DesignError(f"--variant {twice[0]} is given more than once")
    name, design = resolve_design(args.preset, args.design, args.name, overrides)
    opt = _run_options(args)
    if args.backend == "local" and (args.address or args.num_cpus):
        raise DesignError("--address and --num-cpus apply to --backend ray")
    if args.backend == "ray" and args.device != "auto":
        raise DesignError("--device applies to the local backend; Ray tasks use the GPU they are given, else the CPU")
    if args.json and not args.dry_run:
        raise DesignError("--json applies to --dry-run")
    if args.dry_run:
        if args.json:
            with contextlib.redirect_stdout(sys.stderr):
                plan = dry_run(name, design, opt)
            print(json.dumps(plan, indent=1))
        else:
            dry_run(name, design, opt)
        return 0
    result = run_study(name, design, opt)
    if result.failed:
        first = result.failed[0]
        more = f" (and {len(result.failed) - 1} more)" if len(result.failed) > 1 else ""
        print(f"psa: error: {len(result.failed)} population(s) failed: {first}{more}; "
              f"rerun the same command to retry them", file=sys.stderr)
        return 1
    return 0


# ---------------------------------------------------------------------------------------------
# psa status


def _parse_time(text: str | None) -> datetime.datetime | None:
    if not text:
        return None
    try:
        return datetime.datetime.fromisoformat(text)
    except ValueError:
        return None


def stored_study_costs(row: Any) -> tuple[StudyCosts, Plan] | None:
    """Each population's cost (psa.study.calibration: from the stored calibration, else the
    analytic weights) and the plan, from a studies row's stored design; None if unreadable."""
    d = stored_design(row)
    try:
        design = StudyDesign.from_fields(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items()
                                            if k in DESIGN_FIELDS})
        kind = model_kind(design)
        plan = make_plan(design, int(d["plan"]["chunk"]))  # the population size, under its old name
    except (DesignError, KeyError, TypeError, ValueError):
        return None
    return stored_costs(kind, plan, d["plan"].get("calibration")), plan


def study_status(con: Any, db: Path, row: Any) -> dict[str, Any]:
    """Everything `psa status` shows about one study, as data."""
    sid = int(row["id"])
    counts = store.trial_counts(con, sid)
    total = sum(counts.values())
    archs = [dict(r) for r in store.arch_progress(con, sid)]
    loops_done = sum(int(a["loops_done"] or 0) for a in archs)
    loops_total = sum(int(a["loops_total"] or 0) for a in archs)
    run = store.latest_run(con, sid)
    ckpt = checkpoint_root(db) / row["name"]
    held = lock_held(ckpt)
    now = datetime.datetime.now(datetime.timezone.utc)
    state: str
    if counts["done"] == total and total:
        state = "finished"
    elif held:
        state = "running"
    elif held is None and run is not None and run["finished_at"] is None:
        beat = _parse_time(run["heartbeat_at"])
        state = "running" if beat and (now - beat).total_seconds() < 600 else "interrupted"
    elif run is None:
        state = "not started"
    elif run["finished_at"] is None or run["outcome"] == "interrupted":
        state = "interrupted"
    else:
        state = "stopped"
    out: dict[str, Any] = {
        "study": row["name"], "state": state, "trials": total, **counts,
        "loops_done": loops_done, "loops_total": loops_total,
        "started_at": row["started_at"], "finished_at": row["finished_at"], "device": row["device"],
        "code_version": row["code_version"], "architectures": archs, "eta_seconds": None,
    }
    plan = stored_design(row).get("plan")
    modules = plan.get("modules") if isinstance(plan, dict) else None
    if isinstance(modules, dict) and modules:  # a study of your own models: the path each one's members train on
        out["models"] = {spec: {"batched": m.get("batched", True), "batching": m.get("batching", "")}
                         for spec, m in modules.items()}
    if run is not None:
        out["run"] = {k: run[k] for k in run.keys()}
    if state == "running":
        owner = lock_owner(ckpt / "lock") or {}
        out["owner"] = owner
        costs = stored_study_costs(row)
        if costs is not None and run is not None:
            out["eta_seconds"] = status_eta(*costs, archs, dict(run), now)
    elif state == "stopped" and run is not None:
        out["outcome"] = run["outcome"]
    return out


def cmd_status(args: argparse.Namespace) -> int:
    """Progress of every study in a database (or one), readable while a study runs."""
    from rich.table import Table

    from psa.study.console import fmt_seconds, out_console

    db = Path(args.db)
    con = store.connect(db, readonly=True)
    try:
        if args.study is not None:
            row = store.get_study(con, args.study)
            if row is None:
                names = ", ".join(r["name"] for r in store.list_studies(con)) or "none"
                raise StoreError(f"no study named {args.study!r} in {db} (studies: {names})")
            rows = [row]
        else:
            rows = store.list_studies(con)
        con.execute("BEGIN")  # one snapshot
        try:
            infos = [study_status(con, db, r) for r in rows]
        finally:
            con.execute("COMMIT")
    finally:
        con.close()
    if args.json:
        print(json.dumps({"db": str(db), "studies": infos}, indent=1))
        return 0
    if not infos:
        out_console.print(f"{db}: no study yet")
        return 0
    for info in infos:
        n = info["trials"] or 1
        state = info["state"]
        if state == "running":
            o = info.get("owner") or {}
            state = f"[green]running[/] (pid {o.get('pid', '?')} on {o.get('host', '?')} since {o.get('since', '?')})"
        elif state == "interrupted":
            state = "[yellow]interrupted[/]: no process is running it; rerun the same `psa study` command to resume"
        elif state == "finished":
            state = f"[bold]finished[/] at {info['finished_at']}"
        elif state == "stopped":
            state = f"stopped ({info.get('outcome')})"
        out_console.print(f"[bold]study {info['study']}[/] in {db}: {state}", soft_wrap=True)
        out_console.print(
            f"  trials: {info['done']} done, {info['running']} running, {info['pending']} pending, "
            f"{info['failed']} failed of {info['trials']} ({100.0 * info['done'] / n:.0f}%); meta-loops "
            f"{info['loops_done']:,} of {info['loops_total']:,} "
            f"({100.0 * info['loops_done'] / max(1, info['loops_total']):.0f}%)", soft_wrap=True)
        for spec, m in info.get("models", {}).items():
            out_console.print(f"  {spec}: {'the members together (vmap)' if m['batched'] else 'one member at a time'}"
                              f"{' (' + m['batching'] + ')' if m['batching'] else ''}", soft_wrap=True, markup=False)
        if info["state"] == "running":
            eta = "unknown yet" if info["eta_seconds"] is None else fmt_seconds(info["eta_seconds"], rough=True)
            out_console.print(f"  eta: {eta} (the study's costs left x this run's pace so far)")
        t = Table(show_edge=False, pad_edge=False, box=None)
        for col in ("arch", "trials", "done", "running", "pending", "failed", "meta-loops", "best bounty"):
            t.add_column(col, justify="left" if col == "arch" else "right")
        archs = info["architectures"]
        shown = archs
        hidden_done = hidden_pending = 0
        if len(archs) > 30:  # a long study: show what is in flight, count the rest
            shown = [a for a in archs if a["running"] or a["failed"] or (a["done"] and a["done"] < a["trials"])]
            hidden_done = sum(1 for a in archs if a["done"] == a["trials"])
            hidden_pending = sum(1 for a in archs if a["pending"] == a["trials"])
        for a in shown:
            best = f"{a['best_bounty']:.2f}" if a["best_bounty"] is not None else "-"
            t.add_row(a["arch"], str(a["trials"]), str(a["done"]), str(a["running"]), str(a["pending"]),
                      str(a["failed"]), f"{a['loops_done']}/{a['loops_total']}", best)
        out_console.print(t)
        if hidden_done or hidden_pending:
            out_console.print(f"  (+ {hidden_done} architectures finished, {hidden_pending} not started; "
                              f"--json lists all)")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """Write trials and meta-loops as CSV and/or Parquet."""
    db = Path(args.db)
    formats = args.format
    note = None
    if formats is None:  # the default: both, or CSV alone where pyarrow is not installed
        try:
            import pyarrow  # noqa: F401

            formats = ("csv", "parquet")
        except ImportError:
            formats = ("csv",)
            note = 'parquet skipped: pyarrow is not installed (pip install -e ".[parquet]")'
    con = store.connect(db, readonly=True)
    try:
        counts = export(con, args.out, formats, args.study)
    finally:
        con.close()
    for path, n in counts.items():
        print(f"{path}: {n:,} rows")
    if note:
        print(f"note: {note}", file=sys.stderr)
    return 0


# ---------------------------------------------------------------------------------------------
# The parser


def register(sub: Any) -> None:
    """Add `study`, `status` and `export` to psa's subcommands."""
    p = sub.add_parser("study", help="run (or resume) a study: architectures x modes x trials, into SQLite",
                       description="Run a study design into a results database. Re-running the same command "
                                   "resumes it: finished trials are skipped, unfinished ones continue from their "
                                   "checkpoints.")
    p.add_argument("design", nargs="?", help="a TOML design file (see docs/study.md)")
    p.add_argument("--preset", choices=PRESETS, help="paper: the authors' 98 x 6 x 10 x 100; resmlp: the same 98 "
                   "shapes as ResMLPs; smoke: a one-minute check")
    p.add_argument("--name", help="study name (default: the preset's or file's, else derived from the design)")
    g = p.add_argument_group("design (overrides the preset or file)")
    g.add_argument("--arch", action="append", metavar="ARCH",
                   help='an architecture, e.g. 1*128 or "[2*128, 4*64]"; repeatable; "paper" for the 98')
    g.add_argument("--arch-file", help="architectures, one per line")
    g.add_argument("--modes", type=_modes, help=f"comma-separated, or all (the default: {','.join(MODES)})")
    g.add_argument("--trials", type=positive_int, help="trials per architecture and mode (default 10)")
    g.add_argument("--meta-loops", type=positive_int, help="meta-loops per trial (default 100)")
    g.add_argument("--seed", type=seed_int, help="base seed: trial k of every mode uses seed+k-1 (default 0)")
    g.add_argument("--variant", type=_variant, action="append", metavar='"NAME key=value ..."',
                   help='an engine variant run beside the paper\'s engine, e.g. "patience5 patience=5"; repeatable; '
                        "replaces the design file's [variants] (docs/variants.md)")
    add_training_flags(g)
    add_model_flags(g, factories=True)
    g.add_argument("--train-subset", type=positive_int, metavar="N",
                   help="train on the first N of the 50,000 training images: for tests and quick checks only, "
                        "not comparable with the paper (recorded in the trials' dataset column)")
    r = p.add_argument_group("running")
    r.add_argument("--db", default=str(DEFAULT_DB), help=f"results database (default {DEFAULT_DB})")
    r.add_argument("--population-size", type=positive_int, metavar="N",
                   help="most members per population (default: fit the device's memory; fixed at creation)")
    r.add_argument("--chunk", type=positive_int, metavar="N", help="deprecated: the old name of --population-size")
    r.add_argument("--backend", choices=("local", "ray"), default="local", help="local (default) or ray")
    r.add_argument("--address", help="ray: address of an existing cluster (default: start a local instance)")
    r.add_argument("--num-cpus", type=positive_int, help="ray: CPUs of the local instance (default all)")
    r.add_argument("--cpus-per-task", type=positive_int, default=1,
                   help="ray: CPUs per population where there is no GPU (default 1)")
    r.add_argument("--per-device", type=positive_int, default=1,
                   help="ray: populations that may share one GPU (default 1)")
    r.add_argument("--max-retries", type=nonneg_int, default=3,
                   help="ray: resubmissions of a population whose worker died (default 3)")
    add_engine_flags(r, "auto", "fixed when the study is created")
    r.add_argument("--batched", choices=("auto", "yes", "no"), default="auto",
                   help="a model given as module:function: train its members together through vmap (yes), one at "
                        "a time (no), or auto (default): one at a time for a model with convolutions on a CPU, "
                        "else together; fixed when the study is created")
    r.add_argument("--concurrency", type=positive_int,
                   help="populations in flight at once on one device (default 8 on a GPU, 1 elsewhere)")
    r.add_argument("--checkpoint-every", type=seconds, default=60.0, metavar="SECONDS",
                   help="seconds between a population's checkpoints (default 60; 0: after every meta-loop); "
                        "a resume recomputes the loops since the last one")
    r.add_argument("--busy-timeout", type=seconds, default=60.0,
                   help="seconds to wait for another writer's transaction (default 60)")
    r.add_argument("--dry-run", action="store_true",
                   help="print the plan, FLOPs and a time estimate for this device; write nothing")
    r.add_argument("--json", action="store_true",
                   help="with --dry-run: the plan and the estimate as JSON on stdout (the table goes to stderr)")
    r.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=cmd_study)

    p = sub.add_parser("status", help="progress of the studies in a results database (works while they run)")
    p.add_argument("--db", default=str(DEFAULT_DB), help=f"results database (default {DEFAULT_DB})")
    p.add_argument("--study", help="only this study")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("export", help="write trials and meta-loops to CSV and Parquet")
    p.add_argument("--db", default=str(DEFAULT_DB), help=f"results database (default {DEFAULT_DB})")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--format", type=_formats,
                   help="csv, parquet or csv,parquet (default both; CSV alone without pyarrow)")
    p.add_argument("--study", help="only this study (default all)")
    p.set_defaults(func=cmd_export)
