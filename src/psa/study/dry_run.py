"""`psa study --dry-run`: the plan, its FLOPs and a time estimate for this device (psa.study.estimate:
every net's largest population timed here through its trainer); writes nothing."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from psa.core.device import resolve_device, resolve_execution
from psa.study import store
from psa.study.design import StudyDesign
from psa.study.stored import StoredPlan, check_stored, default_population_size, recorded_loops, study_precision
from psa.study.estimate import Estimate, estimate, process_overhead
from psa.study.backends.local import slots_for
from psa.study.kinds import ModelKind, count_nets, model_kind
from psa.study.options import RunOptions
from psa.study.plan import Plan, make_plan
from psa.study.runner import cached_data, design_data_view


@dataclass(frozen=True)
class Existing:
    """A study already in the database: what it was created with, and each trial's status."""

    stored: StoredPlan
    status: dict[tuple[str, str, str, int], str]  # (net, mode, variant, trial) -> status


def dry_run(name: str, design: StudyDesign, opt: RunOptions) -> dict[str, Any]:
    """Print the plan (populations, FLOPs, time estimate) without writing anything; returns it.
    A study that exists already is checked as a run would check it (design, population size,
    precision, what its kind stored), and what is left of it is estimated too."""
    import psa
    from psa.study.console import out_console, probe_progress

    entered = time.perf_counter()
    kind = model_kind(design)
    device = resolve_device(opt.device if opt.backend == "local" else "auto")
    ex = resolve_execution(device, study_precision(name, kind, opt, device), opt.kernels, opt.graphs)
    t = time.perf_counter()
    data = design_data_view(kind, cached_data(design.dataset, opt.data_dir, device))
    kind.check(data)
    existing = existing_study(name, kind, opt, kind.precision(opt, device))
    if existing is not None:
        size, precision = existing.stored.plan.population_size, existing.stored.precision
    else:
        size, precision = default_population_size(kind, opt, device), ex.precision
        kind.record(device, opt)  # the paths a new study would store
    plan = make_plan(design, size, kind.loop_cost)  # the order the run will take
    # a run starts as this process did (imports), loads the data, and at the end shuts down
    startup = entered - psa.STARTED + time.perf_counter() - t + process_overhead()
    # a Ray worker's populations run one at a time on its device (per_device shares a GPU
    # between workers, which the estimate does not model)
    slots = slots_for(device, opt.concurrency) if opt.backend == "local" else 1
    with probe_progress() as bar:  # a study of big nets takes minutes of probes on a CPU
        task = bar.add_task("dry run: timing", total=None)

        def on_probe(net: str, i: int, n: int) -> None:
            bar.update(task, total=n, completed=i, description=f"dry run: timing {net}" if net else "dry run")
            bar.refresh()

        est = estimate(kind, ex, data, plan, startup, opt.checkpoint_every, slots, on_probe)
    rows = plan_rows(kind, plan, est, data, existing.status if existing is not None else {})
    out_console.print(plan_table(name, kind, rows, alone=est.slots > 1))
    for line in summary(name, kind, plan, est, precision, rows, existing, Path(opt.db), data):
        out_console.print(line, soft_wrap=True)
    flops = [r["flops"] for r in rows]
    return {"name": name, "population_size": plan.population_size,
            "populations": [{"arch": p.net, **{k: v for k, v in dataclasses.asdict(p).items() if k != "net"},
                             "key": p.key} for p in plan.populations],
            "architectures": rows, "flops": None if None in flops else sum(flops), "seconds": est.total,
            "sequential_seconds": est.sequential, "in_flight": est.slots, "shares": est.shares,
            # what is left of a study that exists (the whole of a new one)
            "todo_seconds": est.startup_s + est.populations_s(
                populations_left(plan, existing.status if existing is not None else {})),
            "todo_trials": sum(r["todo"] for r in rows),
            "uncertainty": est.uncertainty, "startup_seconds": est.startup_s,
            "calibration_seconds": est.calibration_s,
            "probes": [{"arch": p.net, **{k: v for k, v in dataclasses.asdict(p).items() if k != "net"}}
                       for p in est.probes]}


def existing_study(name: str, kind: ModelKind, opt: RunOptions, precision: str) -> Existing | None:
    """The study `name` in opt.db (read-only), checked as a run would check it; None if absent."""
    db = Path(opt.db)
    if not db.is_file():
        return None
    con = store.connect(db, readonly=True)
    try:
        store.refuse_foreign(con, db)  # as the run would
        row = store.get_study(con, name)
        if row is None:
            return None
        stored = check_stored(row, name, db, kind, opt, precision, recorded_loops(con, int(row["id"])))
        status = {(t["arch"], t["mode"], t["variant"] or "", int(t["trial"])): t["status"]
                  for t in store.study_trials(con, int(row["id"]))}
        return Existing(stored, status)
    finally:
        con.close()


def plan_rows(kind: ModelKind, plan: Plan, est: Estimate, data: Any,
              status: dict[tuple[str, str, str, int], str]) -> list[dict[str, Any]]:
    """The plan per net, as rows: its size, work and time; trials not 'done' in `status` are
    still to do. A trial's FLOPs: per loop forward+backward (3 x forward) over the training
    images and a forward over the validation images, and the test set once."""
    design = plan.design
    loops, n_val, n_test = design.hparams.meta_loops, int(data.val_y.numel()), int(data.test_y.numel())
    rows = []
    for net in design.nets:
        pops = [p for p in plan.populations if p.net == net]
        n_trials = len(design.conditions()) * design.trials
        facts = kind.facts(net, data)
        f = facts["flops_per_example"]
        f_trial = None if f is None else f * (loops * (3 * design.n_train + n_val) + n_test)
        todo = sum(1 for m, vname, _ in design.conditions() for k in range(1, design.trials + 1)
                   if status.get((net, m, vname, k), "pending") != "done")
        rows.append({"arch": net, **facts, "trials": n_trials, "populations": len(pops),
                     "sizes": sorted({p.size for p in pops}), "flops_per_trial": f_trial,
                     "flops": None if f_trial is None else f_trial * n_trials, "seconds": est.per_net[net],
                     "todo": todo})
    return rows


def populations_left(plan: Plan, status: dict[tuple[str, str, str, int], str]) -> dict[str, float]:
    """The part of each population (by key) whose trials are not 'done' in `status`: 0 or 1 as a
    rule, as a population's trials finish together."""
    left: dict[str, float] = {}
    for pp in plan.populations:
        trials = [(pp.net, m, vname, k) for k in pp.trials for m, vname, _ in pp.conditions()]
        left[pp.key] = sum(1 for t in trials if status.get(t, "pending") != "done") / len(trials)
    return left


def plan_table(name: str, kind: ModelKind, rows: list[dict[str, Any]], alone: bool = False) -> Any:
    """The rows as a table for people; `alone`: each net's time is its populations' one after
    another, not their share of a run that keeps several in flight."""
    from rich.table import Table

    from psa.study.console import fmt_seconds

    layers = any(r.get("layers") for r in rows)
    table = Table(title=f"study {name}: plan", title_justify="left")
    cols = (kind.noun[:-1], *(("unit layers",) if layers else ()), "params", "trials", "pops", "MFLOP/example",
            "TFLOP/trial", "PFLOP", "time alone" if alone else "time", "to do")
    for col in cols:
        table.add_column(col, justify="left" if col in (kind.noun[:-1], "unit layers") else "right",
                         no_wrap=col != "unit layers")

    def num(x: float | None, scale: float) -> str:
        return "?" if x is None else f"{x / scale:.3g}"

    for r in rows:
        table.add_row(r["arch"], *((r.get("layers", ""),) if layers else ()), f"{r['params']:,}", str(r["trials"]),
                      f"{r['populations']} x {'/'.join(map(str, r['sizes']))}", num(r["flops_per_example"], 1e6),
                      num(r["flops_per_trial"], 1e12), num(r["flops"], 1e15), fmt_seconds(r["seconds"]),
                      str(r["todo"]))
    return table


def summary(name: str, kind: ModelKind, plan: Plan, est: Estimate, precision: str, rows: list[dict[str, Any]],
            existing: Existing | None, db: Path, data: Any) -> list[str]:
    """The lines under the table: trials, work, the estimate, and what is done already."""
    from psa.study.console import fmt_seconds

    design = plan.design
    n_todo = sum(r["todo"] for r in rows)
    todo_time = est.startup_s + est.populations_s(populations_left(plan, existing.status if existing else {}))
    pm = f"+-{est.uncertainty * 100:.0f}%"
    flops = [r["flops"] for r in rows]
    lines = [
        f"{design.n_trials} trials ({count_nets(kind, len(design.nets))} x {design.conditions_text()} x "
        f"{design.trials} trials, seeds {design.seed}..{design.seed + design.trials - 1}) in "
        f"{len(plan.populations)} populations of {plan.size_text()}, "
        f"{design.hparams.meta_loops} meta-loops each; inputs {tuple(data.train_x.shape[1:])}",
        *kind.announce(),
        ("work: " + (f"{sum(flops) / 1e15:.3g} PFLOP" if None not in flops else "not countable")
         + f" (forward+backward = 3 x forward over {design.n_train:,} images + forward over "
         f"{int(data.val_y.numel()):,} per meta-loop, + the test set once)"),
        f"estimate on {est.device} in {precision}: {fmt_seconds(est.total)} {pm} for the whole "
        f"study, " + (f"{est.slots} populations in flight ({fmt_seconds(est.sequential)} one at a time), "
                      if est.slots > 1 else "one population at a time, ")
        + f"{fmt_seconds(est.startup_s)} of it the process's start-up and "
        f"shut-down (imports, data, first-use costs, exit)"
        + ("" if existing is None else f"; {fmt_seconds(todo_time)} {pm} for the {n_todo} trials still to do"
           if n_todo else "; nothing is left to do: the study is complete"),
        f"calibration: {est.describe()}",
    ]
    if existing is not None:
        lines.append(f"study {name} exists in {db}: {design.n_trials - n_todo} of {design.n_trials} trials done")
    lines.append("dry run: nothing was written")
    return lines
