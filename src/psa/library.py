"""psa.fit: PSA on your own model, as a library call (`psa.fit` is this module's fit, exported lazily).

    import psa
    result = psa.fit(make_model, train=(x, y), val=(xv, yv), test=(xt, yt),
                     modes=["none", "hidden", "output"], trials=10, meta_loops=100)
    result.table()   # bounty per mode, mean +- std, paired tests against none

`make_model` is any function that returns a torch.nn.Module mapping a batch of inputs to
(N, classes) logits. Trial k of every mode starts from the same weights (the factory called
under seed + k - 1) and sees the same data order: the paper's paired design. Engine variants
(psa.core.variant: patience, the persistent optimizer, ablation strategies, mode schedules)
run beside the paper's engine as named conditions, `variants={"patience5": {"patience": 5}}`,
as in a study design. All members train together (psa.core.module). This module sits above
psa's layers: it uses the core engine and the analysis statistics.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from psa.analysis.results import Trial
from psa.analysis.stats import StatsConfig, paired_comparisons, summarize, variant_comparisons
from psa.core.checkpoint import FORMAT, save_tensors
from psa.core.data import Dataset
from psa.core.device import canonical_device
from psa.core.errors import ConfigError
from psa.core.hparams import HParams
from psa.core.loop import meta_loop, note_once
from psa.core.member import ABLATIVE_MODES, MODES
from psa.core.module.engine import ModuleEngine, choose_batching, convolutions, vmap_check
from psa.core.module.factory import factory_name
from psa.core.module.population import ModulePopulation
from psa.core.module.units import ModelSpec
from psa.core.variant import VARIANT_NAME, Variant, format_schedule

Split = tuple[torch.Tensor, torch.Tensor]


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


@dataclass
class FitResult:
    """What psa.fit ran: per-loop records, each trial's bounty, and each trial's bounty model
    (its LKG, unless a variant with patience keeps them apart). Results are keyed by condition:
    a mode, or "mode+name" for a named variant."""

    model: str  # the factory as module:qualname
    spec: ModelSpec
    modes: tuple[str, ...]
    trials: int
    seed: int
    hparams: HParams
    records: list[LoopRecord]
    bounty: dict[tuple[str, int], float]  # (mode, trial) -> peak validation accuracy (%)
    bounty_loop: dict[tuple[str, int], int]
    test_acc: dict[tuple[str, int], float]  # empty without a test split
    seconds: float
    conditions: tuple[str, ...] = ()  # the modes, then every "mode+name" a variant ran in
    variants: dict[str, Variant] = field(default_factory=dict)
    batched: bool = True  # the members trained together (vmap), or one at a time
    batching: str = ""  # why: "auto: <the rule's reason>", the explicit argument, or vmap's failure
    _states: dict[tuple[str, int], dict[str, torch.Tensor]] = field(default_factory=dict, repr=False)

    def state_dict(self, mode: str, trial: int) -> dict[str, torch.Tensor]:
        """Trial k's (1-based) bounty model of condition `mode` (its LKG unless it has patience)
        as a state_dict of your factory's module."""
        key = (mode, trial)
        if key not in self._states:
            raise KeyError(f"no trial {trial} of mode {mode!r}")
        return {k: v.clone() for k, v in self._states[key].items()}

    def save(self, directory: str | Path) -> list[Path]:
        """Each trial's bounty model as `<mode>-trial<k>.safetensors` (a state_dict, loadable with
        safetensors.torch.load_file and model.load_state_dict), with psa's metadata in the
        header; written atomically. Returns the paths."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        paths = []
        for (mode, k), state in sorted(self._states.items()):
            p = d / f"{mode}-trial{k}.safetensors"
            meta = {"format": FORMAT, "kind": "module-member", "model": self.model, "mode": mode, "trial": k,
                    "seed": self.seed + k - 1, "bounty": self.bounty[(mode, k)],
                    "bounty_loop": self.bounty_loop[(mode, k)], "hparams": self.hparams.to_dict()}
            name = mode.partition("+")[2]
            if name:
                meta["variant"] = {"name": name, **self.variants[name].settings()}
            if (mode, k) in self.test_acc:
                meta["test_acc"] = self.test_acc[(mode, k)]
            save_tensors(p, state, meta)
            paths.append(p)
        return paths

    def summary(self) -> list[dict[str, Any]]:
        """One row per condition: the bounty's n, mean, population std (as the paper), min, max;
        for ablative modes the paired sign-flip test against `none` (Holm-adjusted over the
        ablative modes), for a variant the test against its own mode with the paper's engine
        (Holm-adjusted over the variants; psa.analysis.stats). `vs` names the reference."""
        conditions = self.conditions or self.modes
        trials = [Trial("model", c, k, self.bounty[(c, k)], self.bounty_loop[(c, k)], self.test_acc.get((c, k)),
                        self.seed + k - 1, c.partition("+")[2])
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

    def table(self) -> None:
        """Print the summary as a table: bounty per mode (mean +- std), paired tests against none."""
        from rich.console import Console
        from rich.table import Table

        rows = self.summary()
        t = Table(title=f"PSA on {self.model}: {self.trials} trials x {self.hparams.meta_loops} meta-loops, "
                        f"peak validation accuracy (%)")
        for col in ("condition", "bounty", "min", "max", *(("test",) if self.test_acc else ()),
                    "vs", "diff", "p (Holm)", "verdict"):
            t.add_column(col, justify="left" if col in ("condition", "vs", "verdict") else "right")
        for r in rows:
            tested = "diff" in r
            t.add_row(r["mode"], f"{r['mean']:.2f} ± {r['std']:.2f}", f"{r['min']:.2f}", f"{r['max']:.2f}",
                      *((f"{r['test_mean']:.2f}",) if self.test_acc else ()), r.get("vs", ""),
                      f"{r['diff']:+.2f}" if tested else "", f"{r['p_holm']:.3f}" if tested else "",
                      r.get("verdict", ""))
        Console().print(t)


def _split(name: str, value: Any) -> Split:
    """(inputs, int64 labels) of a data split, checked: a pair of tensors of one length, labels
    1-d integers, inputs numbers (floating point, or integers such as token ids), every input
    finite (ConfigError naming the split and the first bad index)."""
    if not (isinstance(value, (tuple, list)) and len(value) == 2 and all(torch.is_tensor(v) for v in value)):
        raise ConfigError(f"{name} must be a pair of tensors (inputs, labels)")
    x, y = value
    if y.dim() != 1 or y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
        raise ConfigError(f"{name} labels must be a 1-d integer tensor, got {tuple(y.shape)} {y.dtype}")
    if x.shape[0] != y.shape[0] or x.shape[0] == 0:
        raise ConfigError(f"{name}: {x.shape[0]} inputs but {y.shape[0]} labels")
    if x.dtype == torch.bool or x.dtype.is_complex:
        raise ConfigError(f"{name} inputs must be real numbers (floating point, or integers such as token ids), "
                          f"got {x.dtype}")
    if x.is_floating_point():
        bad = ~torch.isfinite(x)
        if bool(bad.any()):
            where = tuple(int(i) for i in bad.nonzero()[0])
            what = "NaN" if bool(torch.isnan(x[where])) else "inf"
            raise ConfigError(f"{name} inputs hold {what} at index {where if len(where) > 1 else where[0]}: "
                              f"every input must be finite")
    return x, y.to(torch.int64)


def _check_labels(name: str, y: torch.Tensor, classes: int) -> None:
    """ConfigError unless every label of `y` is a class of the model, in [0, classes)."""
    bad = (y < 0) | (y >= classes)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ConfigError(f"{name} labels must be in [0, {classes}) (the model gives {classes} logits): label "
                          f"{int(y[i])} at index {i}")


def _variants(variants: Mapping[str, Variant | Mapping[str, Any]] | None, modes: tuple[str, ...],
              meta_loops: int) -> list[tuple[str, Variant, tuple[str, ...]]]:
    """(name, Variant, the modes it runs in) of each named variant, checked as a study design
    checks its [variants] table."""
    if variants is None:
        return []
    if not isinstance(variants, Mapping):
        raise ConfigError("variants must be a dict of named variants, e.g. {'patience5': {'patience': 5}}")
    out: list[tuple[str, Variant, tuple[str, ...]]] = []
    seen: dict[str, str] = {}
    for name, value in variants.items():
        if not isinstance(name, str) or not VARIANT_NAME.match(name):
            raise ConfigError(f"bad variant name {name!r}: letters, digits, '_' or '-' (at most 32), "
                              f"starting with a letter or digit")
        if isinstance(value, Variant):
            v = value
        elif isinstance(value, Mapping):
            try:
                v = Variant.from_settings(dict(value))
            except ConfigError as e:
                raise ConfigError(f"variant {name!r}: {e}") from None
        else:
            raise ConfigError(f"variant {name!r} must be a Variant or a dict of its settings")
        if v.is_default:
            raise ConfigError(f"variant {name!r} is the paper's engine: give it a setting")
        if v.to_json() in seen:
            raise ConfigError(f"variants {seen[v.to_json()]!r} and {name!r} have the same settings")
        seen[v.to_json()] = name
        if v.schedule and sum(n for _, n in v.schedule) != meta_loops:
            raise ConfigError(f"variant {name!r}: schedule {format_schedule(v.schedule)} covers "
                              f"{sum(n for _, n in v.schedule)} meta-loops, the run has {meta_loops}")
        runs_in = v.modes_in(modes)
        if not runs_in:
            raise ConfigError(f"variant {name!r} applies to none of the modes {', '.join(modes)} "
                              f"(its ablation settings need full, hidden or output)")
        out.append((name, v, runs_in))
    return out


def fit(
    make_model: Callable[[], nn.Module],
    train: Split,
    val: Split,
    test: Split | None = None,
    *,
    modes: Sequence[str] = ("none", "hidden", "output"),
    trials: int = 10,
    meta_loops: int | None = None,
    seed: int = 0,
    hparams: HParams | None = None,
    lr: float | None = None,
    batch_size: int | None = None,
    weight_decay: float | None = None,
    dropout: float | None = None,
    n_classes: int | None = None,
    device: str | torch.device = "cpu",
    batched: bool | str = "auto",
    max_members: int | None = None,
    variants: Mapping[str, Variant | Mapping[str, Any]] | None = None,
    on_loop: Callable[[int, float], None] | None = None,
) -> FitResult:
    """Run PSA's meta-loop on `trials` x `modes` trials of `make_model`, all trained together.

    `train`/`val`/`test`: (inputs, integer labels) tensors; inputs as the model takes them.
    `modes`: any of none, decay, dropout, full, hidden, output. `hparams`: what every trial
    trains with (psa.core.hparams.HParams; default the paper's Table VI); `meta_loops`, `lr`,
    `batch_size`, `weight_decay` (decay mode only) and `dropout` (the rate of every nn.Dropout,
    dropout mode only), where given, override its fields. `n_classes`: the logits the model
    must give (default: its own output width); every label must be one of them.
    `batched`: True trains the members together (vmap), False one at a time (what psa falls
    back to where vmap cannot batch the model), "auto" (default) by a fixed rule of the model
    and device: one at a time for a model with convolutions on a CPU, else together
    (psa.core.module.engine.auto_batched; said once as a warning, and in `result.batching`).
    `max_members`: members trained at once (default all). `variants`: named engine variants
    run beside the paper's engine, {name: Variant or its settings}, e.g.
    {"patience5": {"patience": 5}, "persist": {"optimizer_state": "persist"}, "dh": {"schedule":
    "dropout:50,hidden:50"}}: each in every mode it applies to (a schedule once, in its first
    mode), as condition "mode+name", paired with the same seeds (docs/variants.md). `on_loop(loop,
    seconds)` is called after every meta-loop. Returns a FitResult.
    """
    if not callable(make_model):
        raise ConfigError("make_model must be a function that returns a torch.nn.Module")
    modes = tuple(dict.fromkeys(modes))
    if not modes:
        raise ConfigError("give at least one mode")
    for m in modes:
        if m not in MODES:
            raise ConfigError(f"unknown mode {m!r}; choose from {', '.join(MODES)}")
    modes = tuple(m for m in MODES if m in modes)
    if not isinstance(trials, int) or isinstance(trials, bool) or trials < 1:
        raise ConfigError(f"trials must be a positive integer, got {trials!r}")
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ConfigError(f"seed must be an integer >= 0, got {seed!r}")
    if hparams is not None and not isinstance(hparams, HParams):
        raise ConfigError(f"hparams must be a psa.core.hparams.HParams, got {type(hparams).__name__}")
    hp = (hparams or HParams()).updated(meta_loops=meta_loops, lr=lr, batch_size=batch_size,
                                        weight_decay=weight_decay, dropout=dropout)
    meta_loops = hp.meta_loops
    dev = canonical_device(device)
    (tx, ty), (vx, vy) = _split("train", train), _split("val", val)
    sx, sy = _split("test", test) if test is not None else (vx[:0], vy[:0])
    if len({x.dtype.is_floating_point for x in (tx, vx, sx)}) > 1:
        raise ConfigError("train, val and test inputs must all be floating point, or all integers")

    def inputs(x: torch.Tensor) -> torch.Tensor:  # integers (token ids) stay integers
        return x.to(dev, torch.float32) if x.is_floating_point() else x.to(dev, torch.int64)

    data = Dataset("tensors", inputs(tx), ty.to(dev), inputs(vx), vy.to(dev), inputs(sx), sy.to(dev), "given")
    named = _variants(variants, modes, meta_loops)
    # the conditions: every mode with the paper's engine, then each variant in its modes
    conditions = [(mode, mode, Variant()) for mode in modes]
    conditions += [(f"{mode}+{name}", mode, v) for name, v, runs_in in named for mode in runs_in]
    members = [hp.member(mode, seed + k, v) for k in range(trials) for _, mode, v in conditions]
    pop = ModulePopulation.create(make_model, members, data, dev, n_classes=n_classes)
    for split, y in (("train", ty), ("val", vy), ("test", sy)):
        _check_labels(split, y, pop.spec.classes)
    assert pop.template is not None
    check = vmap_check(pop, data) if batched is not False else None
    together, why = choose_batching(batched, convolutions(pop.template), dev, check, pop.factory)
    if batched == "auto":
        note_once(f"psa: {pop.factory} on {dev.type}: batched='auto' chose "
                  f"{'the population (vmap)' if together else 'one member at a time'}: {why[len('auto: '):]}")
    eng = ModuleEngine(pop, data, hp, batched=together, batching=why, max_members=max_members)
    index = {m.key: j for j, m in enumerate(pop.members)}
    keys = {(label, k): index[(mode, v.to_json(), seed + k - 1)]
            for label, mode, v in conditions for k in range(1, trials + 1)}
    records: list[LoopRecord] = []
    seconds = 0.0

    def unit(a: tuple[int, int]) -> tuple[str, int]:
        return pop.spec.layers[a[0]].name, a[1]

    for _ in range(meta_loops):
        r = meta_loop(eng)
        seconds += r.seconds
        for (label, k), j in keys.items():
            records.append(LoopRecord(label, k, seed + k - 1, r.loop, r.candidate_acc[j], r.promoted[j],
                                      None if r.ablated[j] is None else unit(r.ablated[j]), r.lkg_score[j],
                                      r.train_loss[j], r.forced[j], tuple(unit(a) for a in r.ablations[j])))
        if on_loop is not None:
            on_loop(r.loop, r.seconds)
    test_acc = eng.test_accuracy() if test is not None else []
    score = pop.bounty_score()
    return FitResult(
        model=factory_name(make_model), spec=pop.spec, modes=modes, trials=trials, seed=seed, hparams=hp,
        records=records,
        bounty={key: score[j] if score[j] >= 0 else math.nan for key, j in keys.items()},
        bounty_loop={key: pop.bounty_loop[j] for key, j in keys.items()},
        test_acc={key: test_acc[j] for key, j in keys.items()} if test_acc else {},
        seconds=seconds,
        conditions=tuple(label for label, _, _ in conditions),
        variants={name: v for name, v, _ in named},
        batched=eng.batched, batching=eng.batching,
        _states={key: pop.member_state_dict(j, bounty=True) for key, j in keys.items()},
    )


__all__ = ["ABLATIVE_MODES", "FitResult", "LoopRecord", "Variant", "fit"]
