"""What a study was created with, and the checks a resume (or a dry run) passes: the trials
table a design makes, the stored design and plan read back, the data set's record, and the
precision a study trains in.

A study's row fixes its design (by digest), its population size and planner, its precision and
random streams, and the data set it trains on; a run that would continue it otherwise is refused
with one line (StudyError) before anything is written.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from psa import __version__
from psa.core.data import Dataset
from psa.study import store
from psa.study.cost import device_budget
from psa.study.design import StudyDesign
from psa.study.kinds import ModelKind
from psa.study.options import RunOptions, StudyError
from psa.study.plan import Plan, make_plan
from psa.study.store import StoreError


def code_version() -> str:
    """psa's version, plus the git commit when running from a checkout."""
    here = Path(__file__).resolve().parent
    with contextlib.suppress(OSError, subprocess.SubprocessError):  # no git, or not a checkout
        out = subprocess.run(["git", "-C", str(here), "describe", "--always", "--dirty"], capture_output=True,
                             text=True, timeout=5, check=False)
        if out.returncode == 0 and out.stdout.strip():
            return f"{__version__}+{out.stdout.strip()}"
    return __version__


def trial_rows(kind: ModelKind) -> list[dict[str, Any]]:
    """The trials table rows of a design, in design order (net, mode, trial)."""
    design, hp = kind.design, kind.design.hparams
    out = []
    for net in design.nets:
        for mode, name, v in design.conditions():
            for k in range(1, design.trials + 1):
                m = design.member(mode, k, v)
                row = {"arch": net, "mode": mode, "trial": k, "seed": m.seed, "meta_loops": hp.meta_loops,
                       "lr": hp.lr, "batch_size": hp.batch_size, "weight_decay": m.weight_decay,
                       "dropout": m.dropout, "dataset": design.dataset_label, "model": kind.trial_model(net)}
                if name:  # the paper's engine leaves both NULL: its rows are those of a study without variants
                    row.update(variant=name, variant_settings=v.to_json())
                out.append(row)
    return out


def stored_design(row: Any) -> dict[str, Any]:
    """The design JSON of a studies row."""
    try:
        d = json.loads(row["design"])
        return d if isinstance(d, dict) else {}
    except (TypeError, ValueError):
        return {}


def _design_difference(stored: dict[str, Any], design: StudyDesign) -> str:
    new = design.to_dict()
    for k in [*new, *(k for k in stored if k not in new and k not in ("plan", "seeds"))]:
        v, old = new.get(k), stored.get(k)
        if old != v:
            if isinstance(v, list) and isinstance(old, list) and len(v) > 6:
                return f"{k}: {len(old)} entries there, {len(v)} here" if len(old) != len(v) else f"{k} differ"
            if k not in stored:  # a design stores a setting only where it is not the default
                return f"{k}: the default there, {v!r} here"
            if k not in new:
                return f"{k}: {old!r} there, the default here"
            return f"{k}: {old!r} there, {v!r} here"
    return "the design"


def dataset_record(data: Dataset) -> dict[str, Any]:
    """The study_datasets row of the data a study trains on (before any train_subset cut)."""
    return {"name": data.name, "checksum": data.checksum, "n_in": data.n_in, "n_classes": data.n_classes,
            "n_train": int(data.train_y.numel()), "n_val": int(data.val_y.numel()),
            "n_test": int(data.test_y.numel()), "zero_r": data.zero_r(),
            "constant_acc": json.dumps(data.constant_predictor_accuracy())}


def check_dataset(con: Any, study_id: int, name: str, data: Dataset) -> None:
    """StudyError unless `data` is the data set the study was created with (same checksum);
    a study from before psa recorded data sets gets its record now."""
    row = store.study_dataset(con, study_id)
    if row is None:
        store.record_dataset(con, study_id, dataset_record(data))
        return
    if row["name"] != data.name or row["checksum"] != data.checksum:
        raise StudyError(f"study {name!r} was created with data set {row['name']} (checksum {row['checksum'][:12]}), "
                         f"but {data.name} from {data.source} has checksum {data.checksum[:12]}: "
                         f"refusing to mix them (give another --name to start a new study)")


def default_population_size(kind: ModelKind, opt: RunOptions, device: torch.device) -> int:
    """The population size a new study is planned with: opt's, else as many members as fit
    the device (8 GiB per task with Ray)."""
    if opt.population_size is not None:
        return opt.population_size
    return kind.population_size(8 << 30 if opt.backend == "ray" else device_budget(device))


def recorded_loops(con: Any, study_id: int) -> dict[str, int]:
    """The most meta-loops any trial of each net has recorded."""
    out: dict[str, int] = {}
    for t in store.study_trials(con, study_id):
        out[t["arch"]] = max(out.get(t["arch"], 0), int(t["loops_done"] or 0))
    return out


@dataclass(frozen=True)
class StoredPlan:
    """What a study was created with, checked against how it is asked to run now."""

    plan: Plan
    precision: str
    updates: dict[str, Any] = field(default_factory=dict)  # the plan's keys a run stores anew (kind.restore)


def check_stored(row: Any, name: str, db: Path, kind: ModelKind, opt: RunOptions, precision: str,
                 recorded: dict[str, int]) -> StoredPlan:
    """The stored plan and precision of a studies row, or StudyError where this run may not
    continue it: another design, another population size or precision (`precision`: what this
    run asks for), another planner, or what the model kind stored (kind.restore; `recorded`: the
    meta-loops each net has recorded)."""
    design = kind.design
    if row["design_hash"] != design.digest():
        raise StudyError(f"study {name!r} in {db} was created with a different design ("
                         f"{_design_difference(stored_design(row), design)}); give another --name to start a new study")
    stored_plan = stored_design(row).get("plan", {})
    size = int(stored_plan.get("chunk", 0)) or None  # the population size, under its old name
    if size is None:
        raise StudyError(f"study {name!r} in {db} has no stored plan; was it written by another tool?")
    if opt.population_size is not None and opt.population_size != size:
        raise StudyError(f"study {name!r} was planned with --population-size {size}; resume it with the same "
                         f"population size (or omit --population-size)")
    stored_precision = str(stored_plan.get("engine", {}).get("precision", "fp32"))  # older studies: fp32
    if opt.precision != "auto" and precision != stored_precision:
        raise StudyError(f"study {name!r} was created with --precision {stored_precision}; resume it with "
                         f"the same precision (or omit --precision)")
    plan = make_plan(design, size, kind.loop_cost)
    stored_pops = sorted(tuple(x) for x in stored_plan.get("populations", []))
    if stored_pops and stored_pops != sorted((p.net, p.first, p.last) for p in plan.populations):
        raise StudyError(f"study {name!r}: the stored plan does not match this version's planner")
    return StoredPlan(plan, stored_precision, kind.restore(stored_plan, name, opt, recorded))


def study_precision(name: str, kind: ModelKind, opt: RunOptions, device: torch.device) -> str:
    """The precision study `name` trains in: the one it was created with (a study's precision is
    fixed then; check_stored refuses a --precision that differs), else what `opt` asks of a new
    study on `device` (kind.precision)."""
    asked = kind.precision(opt, device)
    db = Path(opt.db)
    if not db.is_file():
        return asked
    try:
        con = store.connect(db, readonly=True)
    except (StoreError, OSError):
        return asked  # the run itself reports what is wrong with the database
    try:
        row = store.get_study(con, name)
    except sqlite3.DatabaseError:  # killed while being created: no tables yet, the run makes them
        return asked
    finally:
        con.close()
    if row is None:
        return asked
    return str(stored_design(row).get("plan", {}).get("engine", {}).get("precision", "fp32"))  # older: fp32
