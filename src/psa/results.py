"""What psa.fit returns: `FitResult` (every meta-loop's record, each trial's bounty and bounty
model, the paired tests), its table, its records as plain dicts or a DataFrame, and its saved
directory (`FitResult.save`, `psa.load`).

A saved result is safetensors and JSON only, so loading one never runs code:

    <dir>/<condition>-trial<k>.safetensors   each trial's bounty model: a state_dict of the factory's
                                             module (safetensors.torch.load_file), psa's metadata
                                             in its header
    <dir>/records.json                       every meta-loop of every trial: `to_records()`
    <dir>/result.json                        the run (model, modes, hyperparameters, bounties, ...)
                                             and its summary

Like psa.library, this module stands above psa's layers: it uses core and analysis.
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

import torch

from psa import __version__
from psa.analysis.results import Trial
from psa.analysis.stats import StatsConfig, paired_comparisons, summarize, variant_comparisons
from psa.core.checkpoint import FORMAT, CheckpointError, atomic_write, load_tensors, save_tensors
from psa.core.errors import MissingDependency
from psa.core.hparams import HParams
from psa.core.module.units import Consumer, Cut, ModelSpec, UnitLayer
from psa.core.variant import Variant

RESULT_FORMAT = "psa-fit-1"
RESULT_FILE = "result.json"
RECORDS_FILE = "records.json"
# the columns of to_records(), in order: the study's meta_loops export (psa export) where they
# mean the same, the unit layer named as the model names it
RECORD_COLUMNS = ("model", "condition", "mode", "variant", "trial", "seed", "loop", "candidate_acc", "promoted",
                  "ablated_layer", "ablated_unit", "ablations", "lkg_score", "train_loss", "diverged", "forced")


@dataclass(frozen=True)
class LoopRecord:
    """One meta-loop of one trial, as psa's studies record it."""

    mode: str  # the condition: a mode, or "mode+name" for a named variant
    trial: int
    seed: int
    loop: int
    candidate_acc: float  # validation accuracy (%); NaN for a diverged one under diverged="discard"
    promoted: bool
    ablated: tuple[str, int] | None  # (unit layer's module name, unit): the first of `ablations`
    lkg_score: float
    train_loss: float
    forced: bool | None = None  # patience forced the candidate in (None without patience)
    ablations: tuple[tuple[str, int], ...] = ()  # every unit ablated (variants may ablate several)
    diverged: bool = False  # a non-finite loss occurred during the loop's epoch


class SummaryTable:
    """FitResult.table(): the summary as a table, and under it the model's unit layers with
    whether an ablation there persists. `print(t)` or `str(t)` gives it as text (and a REPL or
    notebook shows that text); rich renders it in colour (`rich.print(t)`, or a rich Console),
    through `t.rich`, a rich.table.Table holding `t.bounty` (the summary's table) and `t.units`
    (the unit layers' table; None without unit rows). `t.rows` are summary()'s rows, `t.unit_rows`
    persistence()'s."""

    def __init__(self, rows: list[dict[str, Any]], title: str, with_test: bool,
                 unit_rows: list[dict[str, Any]] | None = None, units_title: str = "") -> None:
        from rich.table import Table

        self.rows = rows
        self.unit_rows = unit_rows or []
        t = Table(title=title)
        for col in ("condition", "bounty", "min", "max", *(("test",) if with_test else ()),
                    "vs", "diff", "p (Holm)", "verdict"):
            t.add_column(col, justify="left" if col in ("condition", "vs", "verdict") else "right")
        for r in rows:
            tested = "diff" in r
            t.add_row(r["mode"], f"{r['mean']:.2f} ± {r['std']:.2f}", f"{r['min']:.2f}", f"{r['max']:.2f}",
                      *((f"{r['test_mean']:.2f}",) if with_test else ()), r.get("vs", ""),
                      f"{r['diff']:+.2f}" if tested else "", f"{r['p_holm']:.3f}" if tested else "",
                      r.get("verdict", ""))
        self.bounty = t
        self.units = _units_table(self.unit_rows, units_title) if self.unit_rows else None
        # one rich renderable for both (a borderless grid: the bounty table first, then the units)
        self.rich = Table.grid()
        self.rich.add_row(t)
        if self.units is not None:
            self.rich.add_row("")
            self.rich.add_row(self.units)

    def __rich__(self) -> Any:
        return self.rich

    def __str__(self) -> str:
        from rich.console import Console

        # wide enough never to wrap a cell: the text is for logs and files as much as terminals
        console = Console(file=io.StringIO(), width=240, color_system=None, force_terminal=False,
                          force_jupyter=False, highlight=False)
        console.print(self.rich)
        return "\n".join(line.rstrip() for line in console.file.getvalue().splitlines())  # type: ignore[attr-defined]

    __repr__ = __str__


def _units_table(rows: list[dict[str, Any]], title: str) -> Any:
    """The unit layers (ModelSpec.summary_rows) as a rich table: whether an ablation persists in
    each ablative mode ("" where the mode never picks the layer), and why."""
    from rich.table import Table

    t = Table(title=title)
    for col in ("layer", "kind", "units", "full", "hidden", "output", "why"):
        t.add_column(col, justify="right" if col == "units" else "left")
    for r in rows:
        t.add_row(str(r["layer"]), str(r["kind"]), str(r["units"]), r["full"], r["hidden"], r["output"], r["why"])
    return t


def _same(a: Any, b: Any) -> bool:
    """a == b, looking into dataclasses, lists, tuples and dicts, with NaN equal to NaN."""
    if isinstance(a, float) and isinstance(b, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    if type(a) is not type(b):
        return bool(a == b)
    if is_dataclass(a) and not isinstance(a, type):
        return all(_same(getattr(a, f.name), getattr(b, f.name)) for f in fields(a) if f.compare)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return bool(a == b)


@dataclass(repr=False)
class FitResult:
    """What psa.fit ran: per-loop records, each trial's bounty, and each trial's bounty model
    (its LKG, unless a variant with patience keeps them apart). Results are keyed by condition:
    a mode, or "mode+name" for a named variant; trials count from 1.

    `table()` prints as the summary table, `summary()` gives its rows, `to_records()` and
    `to_pandas()` every meta-loop, `state_dict(condition, k)` a trial's bounty model, and
    `save(dir)` / `psa.load(dir)` keep the whole result on disk."""

    model: str  # the factory as module:qualname
    spec: ModelSpec
    modes: tuple[str, ...]
    trials: int
    seed: int
    hparams: HParams
    records: list[LoopRecord]
    bounty: dict[tuple[str, int], float]  # (condition, trial) -> peak validation accuracy (%)
    bounty_loop: dict[tuple[str, int], int]
    test_acc: dict[tuple[str, int], float]  # empty without a test split
    seconds: float
    conditions: tuple[str, ...] = ()  # the modes, then every "mode+name" a variant ran in
    variants: dict[str, Variant] = field(default_factory=dict)
    batched: bool = True  # the members trained together (vmap), or one at a time
    batching: str = ""  # why: "auto: <the rule's reason>", the explicit argument, or vmap's failure
    device: str = ""  # where it trained
    # compared apart (tensors have no truth value): see states_equal
    _states: dict[tuple[str, int], dict[str, torch.Tensor]] = field(default_factory=dict, compare=False)

    @property
    def meta_loops(self) -> int:
        """Meta-loops every trial ran."""
        return self.hparams.meta_loops

    def __repr__(self) -> str:
        conds = self.conditions or self.modes
        best = {c: max((self.bounty[(c, k)] for k in range(1, self.trials + 1)), default=math.nan) for c in conds}
        shown = ", ".join(f"{c!r}: {b:.2f}" for c, b in list(best.items())[:6])
        more = f", ... ({len(conds) - 6} more)" if len(conds) > 6 else ""
        return (f"FitResult(model={self.model!r}, conditions={len(conds)}, trials={self.trials}, "
                f"meta_loops={self.meta_loops}, best_bounty={{{shown}{more}}}, seconds={self.seconds:.1f})")

    def state_dict(self, mode: str, trial: int) -> dict[str, torch.Tensor]:
        """Trial k's (1-based) bounty model of condition `mode` (its LKG unless it has patience)
        as a state_dict of your factory's module (CPU tensors)."""
        key = (mode, trial)
        if key not in self._states:
            raise KeyError(f"no trial {trial} of condition {mode!r}")
        return {k: v.clone() for k, v in self._states[key].items()}

    def __eq__(self, other: object) -> bool:
        """Field by field, as a dataclass compares, except that NaN equals NaN: a diverged
        candidate's accuracy is NaN (diverged="discard"), and a result saved and loaded is the
        same result. The bounty models are compared by states_equal."""
        if other.__class__ is not self.__class__:
            return NotImplemented
        return all(_same(getattr(self, f.name), getattr(other, f.name)) for f in fields(self) if f.compare)

    def states_equal(self, other: FitResult) -> bool:
        """True when every trial's bounty model is bit for bit `other`'s (== compares the rest)."""
        return self._states.keys() == other._states.keys() and all(
            a.keys() == b.keys() and all(torch.equal(a[k].cpu(), b[k].cpu()) for k in a)
            for a, b in ((self._states[key], other._states[key]) for key in self._states))

    def summary(self) -> list[dict[str, Any]]:
        """One row per condition: the bounty's n, mean, population std (as the paper), min, max;
        for ablative modes the paired sign-flip test against `none` (Holm-adjusted over the
        ablative modes), for a variant the test against its own mode with the paper's engine
        (Holm-adjusted over the variants; psa.analysis.stats). `vs` names the reference."""
        conditions = self.conditions or self.modes
        def ends_in(name: str) -> str:
            return self.variants[name].end_mode("") if name in self.variants else ""

        trials = [Trial("model", c, k, self.bounty[(c, k)], self.bounty_loop[(c, k)], self.test_acc.get((c, k)),
                        self.seed + k - 1, c.partition("+")[2], ends_in(c.partition("+")[2]))
                  for c in conditions for k in range(1, self.trials + 1)]
        tests = {c.ablative: c for c in paired_comparisons([t for t in trials if not t.variant], ["model"],
                                                           StatsConfig())
                 if c.baseline == "none"} if "none" in self.modes else {}
        tests.update({c.ablative: c for c in variant_comparisons(trials, ["model"], list(conditions), StatsConfig())})
        rows = []
        for cond in conditions:
            s = summarize([self.bounty[(cond, k)] for k in range(1, self.trials + 1)], "model", cond)
            row: dict[str, Any] = {"mode": cond, "n": s.n, "mean": s.mean, "std": s.std, "min": s.min, "max": s.max}
            if self.test_acc:
                row["test_mean"] = sum(self.test_acc[(cond, k)] for k in range(1, self.trials + 1)) / self.trials
            c = tests.get(cond)
            if c is not None:
                row.update(vs=c.baseline, diff=c.mean_diff, p=c.p, p_holm=c.p_holm, verdict=c.verdict)
            rows.append(row)
        return rows

    def persistence(self) -> list[dict[str, Any]]:
        """One row per unit layer of the model (psa.core.module.units.ModelSpec.summary_rows):
        `layer`, `kind`, `units`, `role`, whether an ablation there persists under `full`,
        `hidden` and `output` ("persists", "regrows", "cannot tell"; "" where the mode never picks
        the layer), and `why`. Where it regrows, training brings the zeroed weights back: a result
        of that mode on that layer is no lasting ablation (docs/module.md#what-it-does-precisely,
        "Persistence")."""
        return self.spec.summary_rows()

    def table(self) -> SummaryTable:
        """The summary as a table: bounty per condition (mean ± std, min, max, the test
        accuracy), paired tests against none (or a variant's own mode); under it the unit
        layers and whether an ablation there persists. Print it, or str() it."""
        return SummaryTable(self.summary(), f"PSA on {self.model}: {self.trials} trials x {self.meta_loops} "
                                            f"meta-loops, peak validation accuracy (%)", bool(self.test_acc),
                            self.persistence(), f"Unit layers of {self.model}: does an ablation persist?")

    def to_records(self) -> list[dict[str, Any]]:
        """Every meta-loop of every trial as a plain dict (RECORD_COLUMNS, in order): `condition`
        as the results key it, `mode` the mode the loop trained in (a schedule changes it),
        `variant` the variant's name ("" for the paper's engine), the first ablated unit as
        `ablated_layer` (its module's name) and `ablated_unit`, and every one in `ablations`."""
        out = []
        for r in self.records:
            base, _, name = r.mode.partition("+")
            mode = self.variants[name].mode_at(base, r.loop) if name in self.variants else base
            layer, unit = r.ablated if r.ablated is not None else (None, None)
            out.append({"model": self.model, "condition": r.mode, "mode": mode, "variant": name, "trial": r.trial,
                        "seed": r.seed, "loop": r.loop, "candidate_acc": r.candidate_acc, "promoted": r.promoted,
                        "ablated_layer": layer, "ablated_unit": unit, "ablations": [list(a) for a in r.ablations],
                        "lkg_score": r.lkg_score, "train_loss": r.train_loss, "diverged": r.diverged,
                        "forced": r.forced})
        return out

    def to_pandas(self) -> Any:
        """to_records() as a pandas DataFrame (one row per meta-loop per trial). Needs pandas,
        which psa does not depend on: without it, a MissingDependency (an ImportError and a
        psa.ConfigError) saying how to install it."""
        try:
            import pandas as pd
        except ImportError:
            raise MissingDependency("FitResult.to_pandas() needs pandas, which is not installed: "
                                    "pip install pandas (or use to_records(), plain dicts)") from None
        return pd.DataFrame.from_records(self.to_records(), columns=list(RECORD_COLUMNS))

    def save(self, directory: str | Path, overwrite: bool = False) -> list[Path]:
        """Save the whole result in `directory`: each trial's bounty model as
        `<condition>-trial<k>.safetensors` (a state_dict, loadable with safetensors.torch.load_file
        and model.load_state_dict, psa's metadata in its header), `records.json` (to_records())
        and `result.json` (the run and its summary), each written atomically; `psa.load` reads it
        back. A directory that exists and is not empty is refused (FileExistsError) unless
        `overwrite`: then the files of a result saved there before are replaced and the
        others left alone. Returns the paths of the models."""
        d = Path(directory)
        if d.exists() and not d.is_dir():
            raise FileExistsError(f"cannot save a result to {d}: it is a file")
        if d.is_dir() and any(d.iterdir()) and not overwrite:
            raise FileExistsError(f"{d} exists and is not empty: pass overwrite=True to replace a result saved there, "
                                  f"or save to a new directory")
        before = _saved_files(d) if overwrite else set()
        d.mkdir(parents=True, exist_ok=True)
        paths, rows = [], []
        for (cond, k), state in sorted(self._states.items()):
            p = d / f"{cond}-trial{k}.safetensors"
            meta = {"format": FORMAT, "kind": "module-member", "model": self.model, "mode": cond, "trial": k,
                    "seed": self.seed + k - 1, "bounty": self.bounty[(cond, k)],
                    "bounty_loop": self.bounty_loop[(cond, k)], "hparams": self.hparams.to_dict()}
            name = cond.partition("+")[2]
            if name:
                meta["variant"] = {"name": name, **self.variants[name].settings()}
            if (cond, k) in self.test_acc:
                meta["test_acc"] = self.test_acc[(cond, k)]
            save_tensors(p, state, meta)
            paths.append(p)
        for cond in self.conditions or self.modes:
            for k in range(1, self.trials + 1):
                rows.append({"condition": cond, "trial": k, "seed": self.seed + k - 1,
                             "bounty": self.bounty[(cond, k)], "bounty_loop": self.bounty_loop[(cond, k)],
                             "test_acc": self.test_acc.get((cond, k)),
                             "file": f"{cond}-trial{k}.safetensors" if (cond, k) in self._states else None})
        # a record a line: readable, diffable, and still one JSON array (pandas.read_json reads it)
        atomic_write(d / RECORDS_FILE, "[\n" + ",\n".join(json.dumps(r) for r in self.to_records()) + "\n]\n")
        run = {"format": RESULT_FORMAT, "psa_version": __version__, "model": self.model, "spec": _spec_json(self.spec),
               "modes": list(self.modes), "conditions": list(self.conditions), "trials": self.trials,
               "seed": self.seed, "hparams": self.hparams.to_dict(),
               "variants": {n: v.settings() for n, v in self.variants.items()}, "batched": self.batched,
               "batching": self.batching, "device": self.device, "seconds": self.seconds, "results": rows,
               "summary": self.summary(), "units": self.persistence()}  # units: for readers; load uses spec
        # written last: a directory without it holds no (whole) result, and load says so
        atomic_write(d / RESULT_FILE, json.dumps(run, indent=1) + "\n")
        for stale in before - {p.name for p in paths}:
            (d / stale).unlink(missing_ok=True)
        return paths


def _saved_files(d: Path) -> set[str]:
    """The model files of a result saved in `d` before (none if it holds no readable one)."""
    try:
        run = json.loads((d / RESULT_FILE).read_text())
        names = {r["file"] for r in run["results"] if isinstance(r.get("file"), str)}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return set()
    return {n for n in names if _plain_name(n)}


def _plain_name(name: Any) -> bool:
    # a model file's name and nothing else: a doctored result.json must not reach outside its directory
    return isinstance(name, str) and Path(name).name == name and name.endswith(".safetensors")


def _spec_json(spec: ModelSpec) -> dict[str, Any]:
    """The ModelSpec as JSON: its fields, the unit layers' included."""
    from dataclasses import asdict

    return asdict(spec)


def _spec_of(d: dict[str, Any]) -> ModelSpec:
    """The inverse of _spec_json; a field this psa does not have is skipped and one it has that
    the file lacks keeps its default (a result saved by another version of psa still loads)."""

    def build(cls: Any, values: dict[str, Any], **convert: Any) -> Any:
        names = {f.name for f in fields(cls)}
        return cls(**{k: convert[k](v) if k in convert else v for k, v in values.items() if k in names})

    def layer(v: dict[str, Any]) -> UnitLayer:
        # JSON gives lists where the spec holds tuples: converted back, so that a loaded result == the saved one
        return build(UnitLayer, v, consumer=lambda c: None if c is None else build(Consumer, c),
                     incoming=lambda cs: tuple(build(Cut, c) for c in cs))

    return build(ModelSpec, d, layers=lambda ls: tuple(layer(x) for x in ls),
                 dropouts=lambda ds: tuple((str(n), int(u)) for n, u in ds), notes=tuple, persistence_notes=tuple,
                 tied=lambda ts: tuple((str(p), tuple(str(r) for r in readers)) for p, readers in ts))


def _unit(a: Any) -> tuple[str, int] | None:
    return None if a is None else (str(a[0]), int(a[1]))


def load(directory: str | Path) -> FitResult:
    """The FitResult saved in `directory` by FitResult.save: records, bounties, test accuracies
    and every trial's bounty model (on the CPU), without the factory. FileNotFoundError if there
    is none; psa.core.checkpoint.CheckpointError if its files are not a result psa saved."""
    d = Path(directory)
    path = d / RESULT_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no psa.fit result in {d}: {RESULT_FILE} is missing (FitResult.save writes it)")
    try:
        run = json.loads(path.read_text())
        records_raw = json.loads((d / RECORDS_FILE).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{d}: {RECORDS_FILE} is missing") from None
    except ValueError as e:
        raise CheckpointError(f"{d}: a corrupt JSON file ({e})") from None
    if not isinstance(run, dict) or run.get("format") != RESULT_FORMAT:
        raise CheckpointError(f"{path}: not a psa.fit result (format {run.get('format') if isinstance(run, dict) else None!r})")
    try:
        records = [LoopRecord(r["condition"], int(r["trial"]), int(r["seed"]), int(r["loop"]), float(r["candidate_acc"]),
                              bool(r["promoted"]), _unit(None if r["ablated_layer"] is None
                                                         else (r["ablated_layer"], r["ablated_unit"])),
                              float(r["lkg_score"]), float(r["train_loss"]),
                              None if r["forced"] is None else bool(r["forced"]),
                              tuple(_unit(a) for a in r["ablations"]), bool(r["diverged"]))
                   for r in records_raw]
        rows = run["results"]
        key = lambda r: (str(r["condition"]), int(r["trial"]))  # noqa: E731
        files = {key(r): r["file"] for r in rows if r.get("file")}
        if any(not _plain_name(f) for f in files.values()):
            raise CheckpointError(f"{path}: model files must be plain .safetensors names in {d}")
        states = {k: load_tensors(d / f)[0] for k, f in files.items()}
        return FitResult(
            model=run["model"], spec=_spec_of(run["spec"]), modes=tuple(run["modes"]), trials=int(run["trials"]),
            seed=int(run["seed"]), hparams=HParams.from_dict(run["hparams"]), records=records,
            bounty={key(r): float(r["bounty"]) for r in rows}, bounty_loop={key(r): int(r["bounty_loop"]) for r in rows},
            test_acc={key(r): float(r["test_acc"]) for r in rows if r["test_acc"] is not None},
            seconds=float(run["seconds"]), conditions=tuple(run["conditions"]),
            variants={n: Variant.from_settings(v) for n, v in run["variants"].items()},
            batched=bool(run["batched"]), batching=str(run["batching"]), device=str(run.get("device", "")),
            _states=states)
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{d}: not a whole psa.fit result ({type(e).__name__}: {e})") from None
