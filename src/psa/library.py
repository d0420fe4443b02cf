"""psa.fit: PSA on your own model, as a library call (`psa.fit` is this module's fit, exported lazily).

    import psa
    result = psa.fit(make_model, train=(x, y), val=(xv, yv), test=(xt, yt),
                     modes=["none", "hidden", "output"], trials=10, meta_loops=100)
    result.table()   # bounty per mode, mean +- std, paired tests against none

`make_model` is any function that returns a torch.nn.Module mapping a batch of inputs to
(N, classes) logits. Trial k of every mode starts from the same weights (the factory called
under seed + k - 1) and sees the same data order: the paper's paired design. All members
train together (psa.core.generic). This module sits above psa's layers: it uses the core
engine and the analysis statistics.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from psa.analysis.results import Trial
from psa.analysis.stats import StatsConfig, paired_comparisons, summarize
from psa.core.checkpoint import FORMAT, save_tensors
from psa.core.data import Dataset
from psa.core.device import canonical_device
from psa.core.errors import ConfigError
from psa.core.generic import ModelSpec, ModuleEngine, ModulePopulation, factory_name
from psa.core.hparams import HParams
from psa.core.population import ABLATIVE_MODES, MODES

Split = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class LoopRecord:
    """One meta-loop of one trial, as psa's studies record it."""

    mode: str
    trial: int
    seed: int
    loop: int
    candidate_acc: float  # validation accuracy (%), NaN for a diverged candidate
    promoted: bool
    ablated: tuple[str, int] | None  # (unit layer's module name, unit)
    lkg_score: float
    train_loss: float


@dataclass
class FitResult:
    """What psa.fit ran: per-loop records, each trial's bounty, and each trial's LKG weights."""

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
    _states: dict[tuple[str, int], dict[str, torch.Tensor]] = field(default_factory=dict, repr=False)

    def state_dict(self, mode: str, trial: int) -> dict[str, torch.Tensor]:
        """Trial k's (1-based) LKG of `mode` as a state_dict of your factory's module."""
        key = (mode, trial)
        if key not in self._states:
            raise KeyError(f"no trial {trial} of mode {mode!r}")
        return {k: v.clone() for k, v in self._states[key].items()}

    def save(self, directory: str | Path) -> list[Path]:
        """Each trial's LKG as `<mode>-trial<k>.safetensors` (a state_dict, loadable with
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
            if (mode, k) in self.test_acc:
                meta["test_acc"] = self.test_acc[(mode, k)]
            save_tensors(p, state, meta)
            paths.append(p)
        return paths

    def summary(self) -> list[dict[str, Any]]:
        """One row per mode: the bounty's n, mean, population std (as the paper), min, max, and
        for ablative modes the paired sign-flip test against `none` (Holm-adjusted over the
        ablative modes, psa.analysis.stats)."""
        trials = [Trial("model", mode, k, self.bounty[(mode, k)], self.bounty_loop[(mode, k)],
                        self.test_acc.get((mode, k)), self.seed + k - 1)
                  for mode in self.modes for k in range(1, self.trials + 1)]
        tests = {c.ablative: c for c in paired_comparisons(trials, ["model"], StatsConfig())
                 if c.baseline == "none"} if "none" in self.modes else {}
        rows = []
        for mode in self.modes:
            s = summarize([self.bounty[(mode, k)] for k in range(1, self.trials + 1)], "model", mode)
            row: dict[str, Any] = {"mode": mode, "n": s.n, "mean": s.mean, "std": s.std, "min": s.min, "max": s.max}
            if self.test_acc:
                row["test_mean"] = sum(self.test_acc[(mode, k)] for k in range(1, self.trials + 1)) / self.trials
            c = tests.get(mode)
            if c is not None:
                row.update(diff=c.mean_diff, p=c.p, p_holm=c.p_holm, verdict=c.verdict)
            rows.append(row)
        return rows

    def table(self) -> None:
        """Print the summary as a table: bounty per mode (mean +- std), paired tests against none."""
        from rich.console import Console
        from rich.table import Table

        rows = self.summary()
        t = Table(title=f"PSA on {self.model}: {self.trials} trials x {self.hparams.meta_loops} meta-loops, "
                        f"peak validation accuracy (%)")
        for col in ("mode", "bounty", "min", "max", *(("test",) if self.test_acc else ()),
                    "vs none", "p (Holm)", "verdict"):
            t.add_column(col, justify="left" if col in ("mode", "verdict") else "right")
        for r in rows:
            tested = "diff" in r
            t.add_row(r["mode"], f"{r['mean']:.2f} ± {r['std']:.2f}", f"{r['min']:.2f}", f"{r['max']:.2f}",
                      *((f"{r['test_mean']:.2f}",) if self.test_acc else ()),
                      f"{r['diff']:+.2f}" if tested else "", f"{r['p_holm']:.3f}" if tested else "",
                      r.get("verdict", ""))
        Console().print(t)


def _split(name: str, value: Any) -> Split:
    if not (isinstance(value, (tuple, list)) and len(value) == 2 and all(torch.is_tensor(v) for v in value)):
        raise ConfigError(f"{name} must be a pair of tensors (inputs, labels)")
    x, y = value
    if y.dim() != 1 or y.dtype.is_floating_point or y.dtype == torch.bool:
        raise ConfigError(f"{name} labels must be a 1-d integer tensor, got {tuple(y.shape)} {y.dtype}")
    if x.shape[0] != y.shape[0] or x.shape[0] == 0:
        raise ConfigError(f"{name}: {x.shape[0]} inputs but {y.shape[0]} labels")
    if not x.is_floating_point():
        raise ConfigError(f"{name} inputs must be floating point, got {x.dtype}")
    if int(y.min()) < 0:
        raise ConfigError(f"{name} labels must be >= 0")
    return x, y.to(torch.int64)


def fit(
    make_model: Callable[[], nn.Module],
    train: Split,
    val: Split,
    test: Split | None = None,
    *,
    modes: Sequence[str] = ("none", "hidden", "output"),
    trials: int = 10,
    meta_loops: int = 100,
    seed: int = 0,
    lr: float = 1e-4,
    batch_size: int = 256,
    weight_decay: float = 1e-4,
    dropout: float = 0.1,
    n_classes: int | None = None,
    device: str | torch.device = "cpu",
    batched: bool = True,
    max_members: int | None = None,
    on_loop: Callable[[int, float], None] | None = None,
) -> FitResult:
    """Run PSA's meta-loop on `trials` x `modes` trials of `make_model`, all trained together.

    `train`/`val`/`test`: (inputs, integer labels) tensors; inputs as the model takes them.
    `modes`: any of none, decay, dropout, full, hidden, output. `lr`, `batch_size`,
    `weight_decay` (decay mode only), `dropout` (the rate of every nn.Dropout, dropout mode
    only): the paper's values by default. `n_classes`: default 1 + the largest label.
    `batched=False` trains one member at a time (what psa falls back to where vmap cannot
    batch the model). `max_members`: members trained at once (default all). `on_loop(loop,
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
    hp = HParams(lr=lr, batch_size=batch_size, weight_decay=weight_decay, dropout=dropout, meta_loops=meta_loops)
    dev = canonical_device(device)
    (tx, ty), (vx, vy) = _split("train", train), _split("val", val)
    sx, sy = _split("test", test) if test is not None else (vx[:0], vy[:0])
    classes = n_classes or 1 + max(int(ty.max()), int(vy.max()), int(sy.max()) if sy.numel() else 0)
    data = Dataset("tensors", tx.to(dev, torch.float32), ty.to(dev), vx.to(dev, torch.float32), vy.to(dev),
                   sx.to(dev, torch.float32), sy.to(dev), "given")
    members = [hp.member(mode, seed + k) for k in range(trials) for mode in modes]
    pop = ModulePopulation.create(make_model, members, data, dev, n_classes=classes)
    eng = ModuleEngine(pop, data, hp, batched=batched, max_members=max_members)
    index = {(m.mode, m.seed): j for j, m in enumerate(pop.members)}
    records: list[LoopRecord] = []
    seconds = 0.0
    for _ in range(meta_loops):
        r = eng.meta_loop()
        seconds += r.seconds
        for mode in modes:
            for k in range(1, trials + 1):
                j = index[(mode, seed + k - 1)]
                a = r.ablated[j]
                records.append(LoopRecord(mode, k, seed + k - 1, r.loop, r.candidate_acc[j], r.promoted[j],
                                          None if a is None else (pop.spec.layers[a[0]].name, a[1]),
                                          r.lkg_score[j], r.train_loss[j]))
        if on_loop is not None:
            on_loop(r.loop, r.seconds)
    test_acc = eng.test_accuracy() if test is not None else []
    keys = {(mode, k): index[(mode, seed + k - 1)] for mode in modes for k in range(1, trials + 1)}
    score = pop.lkg_score()
    return FitResult(
        model=factory_name(make_model), spec=pop.spec, modes=modes, trials=trials, seed=seed, hparams=hp,
        records=records,
        bounty={key: score[j] if score[j] >= 0 else math.nan for key, j in keys.items()},
        bounty_loop={key: pop.bounty_loop[j] for key, j in keys.items()},
        test_acc={key: test_acc[j] for key, j in keys.items()} if test_acc else {},
        seconds=seconds,
        _states={key: pop.member_state_dict(j) for key, j in keys.items()},
    )


__all__ = ["ABLATIVE_MODES", "FitResult", "LoopRecord", "fit"]
