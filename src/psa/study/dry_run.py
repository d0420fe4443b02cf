"""`psa study --dry-run`: the plan, its FLOPs and a time estimate for this device (psa.study.estimate:
every architecture's population timed here); writes nothing."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from psa.core.data import N_VAL
from psa.core.device import Execution, describe_device, resolve_device, resolve_execution
from psa.core.model import param_count
from psa.study import store
from psa.study.design import StudyDesign
from psa.study.driver import StoredPlan, check_stored, default_population_size
from psa.study.estimate import Estimate, estimate, process_overhead
from psa.study.options import RunOptions
from psa.study.plan import Plan, arch_flops, design_arch, make_plan
from psa.study.runner import design_data, design_data_view


@dataclass(frozen=True)
class Existing:
    """A study already in the database: what it was created with, and each trial's status."""

    stored: StoredPlan
    status: dict[tuple[str, str, int], str]  # (arch, mode, trial) -> status


def dry_run(name: str, design: StudyDesign, opt: RunOptions) -> dict[str, Any]:
    """Print the plan (populations, FLOPs, time estimate) without writing anything; returns it.
    A study that exists already is checked as a run would check it (design, population size,
    precision), and what is left of it is estimated too."""
    import psa
    from psa.study.console import out_console
    from psa.study.driver import module_execution

    entered = time.perf_counter()
    device = resolve_device(opt.device if opt.backend == "local" else "auto")
    requested = module_execution(design, opt, resolve_execution(device, opt.precision, opt.kernels, opt.graphs))
    if design.is_module:
        return module_dry_run(name, design, opt, requested)
    existing = existing_study(name, design, opt, requested)
    if existing is not None:
        size, precision = existing.stored.plan.population_size, existing.stored.precision
    else:
        size, precision = default_population_size(design, opt, device), requested.precision
    ex = dataclasses.replace(requested, precision=precision)
    plan = make_plan(design, size)  # the order the run will take
    t = time.perf_counter()
    data = design_data(design, opt.data_dir, ex.device)
    # a run starts as this process did (imports), loads the data, and at the end shuts down
    startup = entered - psa.STARTED + time.perf_counter() - t + process_overhead()
    est = estimate(ex, data, plan, startup, opt.checkpoint_every)
    table, rows = plan_table(name, plan, est, existing.status if existing is not None else {})
    out_console.print(table)
    for line in summary(name, plan, est, precision, rows, existing, Path(opt.db)):
        out_console.print(line, soft_wrap=True)
    return {"name": name, "population_size": plan.population_size,
            "populations": [dataclasses.asdict(p) | {"key": p.key} for p in plan.populations],
            "architectures": rows, "flops": sum(r["flops"] for r in rows), "seconds": est.total,
            "uncertainty": est.uncertainty, "startup_seconds": est.startup_s,
            "calibration_seconds": est.calibration_s, "probes": [dataclasses.asdict(p) for p in est.probes]}


def existing_study(name: str, design: StudyDesign, opt: RunOptions, requested: Execution) -> Existing | None:
    """The study `name` in opt.db (read-only), checked as a run would check it; None if absent."""
    db = Path(opt.db)
    if not db.is_file():
        return None
    con = store.connect(db, readonly=True)
    try:
        row = store.get_study(con, name)
        if row is None:
            return None
        stored = check_stored(row, name, db, design, opt, requested)
        status = {(t["arch"], t["mode"], t["variant"] or "", int(t["trial"])): t["status"]
                  for t in store.study_trials(con, int(row["id"]))}
        return Existing(stored, status)
    finally:
        con.close()


def plan_table(name: str, plan: Plan, est: Estimate, status: dict[tuple[str, str, int], str]
               ) -> tuple[Any, list[dict[str, Any]]]:
    """The plan per architecture, as a table for people and as rows; trials not 'done' in
    `status` are still to do."""
    from rich.table import Table

    from psa.study.console import fmt_seconds

    design = plan.design
    table = Table(title=f"study {name}: plan", title_justify="left")
    for col in ("arch", "params", "trials", "pops", "TFLOP/trial", "PFLOP", "time", "to do"):
        table.add_column(col, justify="left" if col == "arch" else "right", no_wrap=True)
    rows = []
    for arch in design.architectures:
        pops = [p for p in plan.populations if p.arch == arch]
        n_trials = len(design.conditions()) * design.trials
        a = design_arch(design, arch)
        f_trial = arch_flops(a, design.hparams.meta_loops, design.n_train, model=design.model)
        t_arch = est.per_arch[arch]
        todo = sum(1 for m, name, _ in design.conditions() for k in range(1, design.trials + 1)
                   if status.get((arch, m, name, k), "pending") != "done")
        sizes = sorted({p.size for p in pops})
        params = param_count(a, design.model)
        table.add_row(arch, f"{params:,}", str(n_trials), f"{len(pops)} x {'/'.join(map(str, sizes))}",
                      f"{f_trial / 1e12:.3g}", f"{f_trial * n_trials / 1e15:.3g}", fmt_seconds(t_arch), str(todo))
        rows.append({"arch": arch, "params": params, "trials": n_trials, "populations": len(pops),
                     "flops_per_trial": f_trial, "flops": f_trial * n_trials, "seconds": t_arch, "todo": todo})
    return table, rows


def summary(name: str, plan: Plan, est: Estimate, precision: str, rows: list[dict[str, Any]],
            existing: Existing | None, db: Path) -> list[str]:
    """The lines under the table: trials, work, the estimate, and what is done already."""
    from psa.study.console import fmt_seconds

    design = plan.design
    n_todo = sum(r["todo"] for r in rows)
    total_time = est.total
    todo_time = est.startup_s + sum(r["seconds"] * r["todo"] / r["trials"] for r in rows)
    pm = f"+-{est.uncertainty * 100:.0f}%"
    lines = [
        f"{design.n_trials} trials ({len(design.architectures)} architectures x {design.conditions_text()} x "
        f"{design.trials} trials, seeds {design.seed}..{design.seed + design.trials - 1}) in "
        f"{len(plan.populations)} populations of at most {plan.population_size} members, "
        f"{design.hparams.meta_loops} meta-loops each",
        f"work: {sum(r['flops'] for r in rows) / 1e15:.3g} PFLOP (forward+backward = 3 x forward over "
        f"{design.n_train:,} images + forward over {N_VAL:,} per meta-loop, + the test set once)",
        f"estimate on {est.device} in {precision}: {fmt_seconds(total_time)} {pm} for the whole "
        f"study, one population at a time, {fmt_seconds(est.startup_s)} of it the process's start-up and shut-down (imports, data, exit)"
        + (f"; {fmt_seconds(todo_time)} {pm} for the {n_todo} trials still to do" if existing is not None else ""),
        f"calibration: {est.describe()}",
    ]
    if existing is not None:
        lines.append(f"study {name} exists in {db}: {design.n_trials - n_todo} of {design.n_trials} trials done")
    lines.append("dry run: nothing was written")
    return lines


def module_dry_run(name: str, design: StudyDesign, opt: RunOptions, requested: Execution) -> dict[str, Any]:
    """The dry run of a design of your own model: every factory built and checked on the data,
    its parameters and forward FLOPs counted (torch.utils.flop_counter), its largest population
    timed here for a few batches (psa.study.modules.probe_factory), the plan and the estimate.
    Writes nothing; returns what it printed."""
    import psa
    from rich.table import Table

    from psa.study.console import fmt_seconds, out_console
    from psa.study.estimate import MODEL_ERROR
    from psa.study.modules import batching_text, check_factories, choose_batching, probe_factory
    from psa.study.runner import cached_data

    data = design_data_view(design, cached_data(design.dataset, opt.data_dir, requested.device))
    startup = time.perf_counter() - psa.STARTED  # a run starts as this process did: imports, data
    infos = check_factories(design, data)
    existing = existing_study(name, design, opt, requested)
    size = (existing.stored.plan.population_size if existing is not None
            else default_population_size(design, opt, requested.device, infos))
    plan = make_plan(design, size)
    # the path each model's members train on: the existing study's, else the one it would store
    batching = (existing.stored.batching if existing is not None
                else choose_batching(infos, requested.device, opt.batched))
    t0 = time.perf_counter()
    probes = {}
    for spec in design.architectures:
        largest = max((p for p in plan.populations if p.arch == spec), key=lambda p: p.size)
        probes[spec] = probe_factory(spec, design, data, largest.members(design), requested.device,
                                     batching[spec][0])
    calibration_s = time.perf_counter() - t0
    n_val, n_test = int(data.val_y.numel()), int(data.test_y.numel())
    seconds = {spec: sum(probes[spec].population_seconds(design, p.size, n_val, n_test)
                         for p in plan.populations if p.arch == spec) for spec in design.architectures}
    spread = max(p.spread for p in probes.values())
    uncertainty = max(MODEL_ERROR, spread)
    loops, n_train = design.hparams.meta_loops, design.n_train
    table = Table(title=f"study {name}: plan", title_justify="left")
    for col in ("model", "unit layers", "params", "trials", "pops", "MFLOP/example", "TFLOP/trial", "time",
                "to do"):
        table.add_column(col, justify="left" if col in ("model", "unit layers") else "right", no_wrap=col == "model")
    rows = []
    status = existing.status if existing is not None else {}
    for spec, info in infos.items():
        pops = [p for p in plan.populations if p.arch == spec]
        n_trials = len(design.conditions()) * design.trials
        # per loop: forward+backward (3 x forward) over the training images, a forward over the
        # validation images; and the test set once
        f_trial = None if info.flops is None else info.flops * (loops * (3 * n_train + data.val_y.numel())
                                                                + data.test_y.numel())
        todo = sum(1 for m, vname, _ in design.conditions() for k in range(1, design.trials + 1)
                   if status.get((spec, m, vname, k), "pending") != "done")
        table.add_row(spec, info.layers, f"{info.params:,}", str(n_trials),
                      f"{len(pops)} x {'/'.join(map(str, sorted({p.size for p in pops})))}",
                      "?" if info.flops is None else f"{info.flops / 1e6:.3g}",
                      "?" if f_trial is None else f"{f_trial / 1e12:.3g}", fmt_seconds(seconds[spec]), str(todo))
        rows.append({"arch": spec, "layers": info.layers, "params": info.params, "trials": n_trials,
                     "populations": len(pops), "flops_per_example": info.flops, "flops_per_trial": f_trial,
                     "flops": None if f_trial is None else f_trial * n_trials, "seconds": seconds[spec],
                     "todo": todo, "batched": batching[spec][0], "batching": batching[spec][1]})
    out_console.print(table)
    flops = [r["flops"] for r in rows]
    lines = [
        f"{design.n_trials} trials ({len(design.architectures)} models x {design.conditions_text()} x "
        f"{design.trials} trials, seeds {design.seed}..{design.seed + design.trials - 1}) in "
        f"{len(plan.populations)} populations of at most {plan.population_size} members, {loops} meta-loops each; "
        f"inputs {tuple(data.train_x.shape[1:])}, trained through torch.func in fp32",
        *(f"{spec}: {batching_text(*batching[spec])}" for spec in design.architectures),
        ("work: " + (f"{sum(flops) / 1e15:.3g} PFLOP" if None not in flops else "not countable")
         + " (torch's flop counter: matmuls and convolutions; forward+backward = 3 x forward)"),
        f"estimate on {describe_device(requested.device)}: {fmt_seconds(startup + sum(seconds.values()))} "
        f"+-{uncertainty * 100:.0f}% for the whole study, one population at a time, {fmt_seconds(startup)} of it "
        f"start-up (imports, data)",
        f"calibration: each model's largest population timed here in {calibration_s:.1f} s (whole meta-loops on a "
        f"few training batches and {min(1000, n_val):,} validation images; a step took "
        + ", ".join(f"{p.step_s * 1e3:.3g} ms" for p in probes.values())
        + f"); +-{uncertainty * 100:.0f}% is the probes' spread or {MODEL_ERROR * 100:.0f}%, whichever is larger, "
        f"and assumes the machine stays as busy as now",
    ]
    if existing is not None:
        lines.append(f"study {name} exists in {opt.db}: {design.n_trials - sum(r['todo'] for r in rows)} of "
                     f"{design.n_trials} trials done")
    lines.append("dry run: nothing was written")
    for line in lines:
        out_console.print(line, soft_wrap=True)
    return {"name": name, "population_size": plan.population_size,
            "populations": [dataclasses.asdict(p) | {"key": p.key} for p in plan.populations],
            "architectures": rows, "flops": None if None in flops else sum(flops),
            "seconds": startup + sum(seconds.values()), "uncertainty": uncertainty, "startup_seconds": startup,
            "calibration_seconds": calibration_s,
            "probes": [{"arch": spec, **dataclasses.asdict(p)} for spec, p in probes.items()]}
