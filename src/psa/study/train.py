"""`psa train`: one trial (a population of one) with checkpoints, resume and a readable log.

A run directory holds `lkg.safetensors` (the LKG as a SimpleMLP state_dict, with every record
of the run as JSON in its header) and `run.json` (the same summary, for people and scripts).
Both are rewritten atomically after every meta-loop, so a killed run resumes where it stopped.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from psa import __version__
from psa.core import rng
from psa.core.arch import ArchError, parse_arch
from psa.core.checkpoint import CheckpointError, atomic_write, load_member, restore_member, save_member
from psa.study.console import arch_table, err_console, loop_progress
from psa.core.data import load as load_data
from psa.core.engine import Engine, LoopResult, TrainConfig
from psa.core.population import ConfigError, Population, make_member

CHECKPOINT = "lkg.safetensors"
SUMMARY = "run.json"


@dataclass(frozen=True)
class RunConfig:
    """Everything `psa train` was asked to do."""

    arch: str | None = None
    mode: str | None = None
    meta_loops: int | None = None
    seed: int | None = None  # default 0; on resume, the checkpoint's
    lr: float | None = None  # None: Table VI's value, or the checkpoint's on resume
    batch_size: int | None = None
    weight_decay: float | None = None  # the rate decay mode uses (others use exactly 0)
    dropout: float | None = None  # the rate dropout mode uses (others use none)
    device: str = "auto"
    dataset: str = "mnist"
    data_dir: str | None = None
    out: str | None = None
    resume: str | None = None
    quiet: bool = False  # no progress or log (--json)
    precision: str | None = None  # None: auto, or on resume the run's own
    kernels: str = "auto"
    graphs: bool = True


def resolve_device(name: str) -> torch.device:
    """`auto` picks cuda, then mps, then cpu; an explicit device must exist."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device {name!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device cuda requested but CUDA is not available")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ConfigError("device mps requested but MPS is not available")
    return dev


def _prepare_out(out: str | None, arch_short: str, mode: str, seed: int) -> Path:
    """The run directory: `out` if empty or new, else a fresh name under ./runs/."""
    if out is None:
        base = Path("runs") / f"{arch_short.replace('*', 'x')}-{mode}-seed{seed}"
        path, n = base, 1
        while path.exists():
            n += 1
            path = base.with_name(f"{base.name}-{n}")
    else:
        path = Path(out)
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise ConfigError(f"--out {path} exists and is not an empty directory")
    probe = path
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise ConfigError(f"--out {path}: {probe} is not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"--out {path}: {probe} is not writable")
    return path


def _describe_ablation(arch_depth: int, a: tuple[int, int] | None) -> str:
    if a is None:
        return "-"
    layer, neuron = a
    return f"output #{neuron}" if layer == arch_depth else f"hidden {layer + 1} #{neuron}"


def _loop_record(r: LoopResult, mode: str, j: int = 0) -> dict[str, Any]:
    acc = r.candidate_acc[j]
    return {
        "loop": r.loop,
        "mode": mode,
        "candidate_acc": None if math.isnan(acc) else acc,
        "promoted": r.promoted[j],
        "ablated": list(r.ablated[j]) if r.ablated[j] is not None else None,
        "lkg_score": r.lkg_score[j],
        "train_loss": r.train_loss[j] if math.isfinite(r.train_loss[j]) else None,
        "diverged": r.diverged[j],
    }


def train(cfg: RunConfig) -> dict[str, Any]:
    """Run (or resume) one trial; returns its summary, which is also written to run.json."""
    t_start = time.perf_counter()
    console = err_console
    notes: list[str] = []
    records: list[dict[str, Any]] = []
    prior_seconds = 0.0
    if cfg.resume:
        run_dir = Path(cfg.resume)
        state, meta = load_member(run_dir / CHECKPOINT)
        try:
            arch = parse_arch(meta["arch"])
        except (KeyError, ArchError) as e:
            raise CheckpointError(f"{run_dir / CHECKPOINT}: bad architecture in metadata ({e})") from None
        if cfg.arch is not None and parse_arch(cfg.arch) != arch:
            raise CheckpointError(f"checkpoint {run_dir} is architecture {arch}, not {parse_arch(cfg.arch)}")
        if cfg.seed is not None and cfg.seed != meta["seed"]:
            raise ConfigError(f"checkpoint {run_dir} was trained with seed {meta['seed']}, not {cfg.seed}")
        seed = int(meta["seed"])
        mode = cfg.mode or meta["mode"]
        done = int(meta["loop"])
        if cfg.meta_loops is not None:
            target = done + cfg.meta_loops
        else:
            target = int(meta["target_loops"])
            if target <= done:
                raise ConfigError(f"run {run_dir} already completed {done} meta-loops; pass --meta-loops N to train N more")
        records = list(meta["records"])
        prior_seconds = float(meta.get("train_seconds", 0.0))
        hp = meta["hyperparameters"]
        # runs from before --precision trained in strict fp32
        base = TrainConfig(lr=hp["lr"], batch_size=hp["batch_size"], weight_decay=hp["weight_decay"],
                           dropout=hp["dropout"], betas=tuple(hp["betas"]), eps=hp["eps"],
                           precision=hp.get("precision", "fp32"))
        history = [tuple(x) for x in meta["mode_history"]]
        if meta.get("rng") != rng.VERSION:
            notes.append("this run was started by an older psa: its next meta-loops draw their data order and "
                         "dropout masks from psa's current random streams")
    else:
        if cfg.arch is None:
            raise ConfigError("--arch is required (or --resume RUN_DIR)")
        arch = parse_arch(cfg.arch)
        seed, mode, done = cfg.seed or 0, cfg.mode or "none", 0
        target = cfg.meta_loops if cfg.meta_loops is not None else 100
        base = TrainConfig()
        history = []
        run_dir = None
    if target - done < 1:
        raise ConfigError("--meta-loops must be at least 1")
    overrides = {k: v for k, v in (("lr", cfg.lr), ("batch_size", cfg.batch_size),
                                   ("weight_decay", cfg.weight_decay), ("dropout", cfg.dropout),
                                   ("precision", cfg.precision)) if v is not None}
    train_cfg = replace(base, **overrides, kernels=cfg.kernels, graphs=cfg.graphs)
    member = make_member(mode, seed, decay_rate=train_cfg.weight_decay, dropout_rate=train_cfg.dropout)
    device = resolve_device(cfg.device)
    data = load_data(cfg.dataset, cfg.data_dir, device)
    pop = Population.create(arch, [member], device, n_val=data.val_y.numel())
    if cfg.resume:
        restore_member(pop, 0, state)
        pop.loop = done
        pop.lkg_correct.fill_(int(meta["lkg_correct"]))
        pop.bounty_loop = [int(meta["bounty_loop"])]
        pop.mode_history = [[(str(m), int(t)) for m, t in history]]
        if not history or history[-1][0] != mode:
            pop.mode_history[0].append((mode, done + 1))
    else:
        run_dir = _prepare_out(cfg.out, arch.short, mode, seed)
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write(run_dir / ".write-probe", b"")
            (run_dir / ".write-probe").unlink()
        except OSError as e:
            raise ConfigError(f"--out {run_dir}: cannot write there ({e.strerror})") from None
    engine = Engine(pop, data, train_cfg)
    train_cfg = replace(train_cfg, precision=engine.precision)  # recorded as resolved ("auto" -> what ran)

    def summary(final: bool, test_acc: float | None, train_seconds: float) -> dict[str, Any]:
        return {
            "format": "psa-checkpoint-1",
            "psa_version": __version__,
            "arch": str(arch),
            "params": arch.params,
            "seed": seed,
            "mode": mode,
            "mode_history": [list(x) for x in pop.mode_history[0]],
            "loop": pop.loop,
            "target_loops": target,
            "bounty": pop.lkg_score()[0],
            "bounty_loop": pop.bounty_loop[0],
            "lkg_correct": int(pop.lkg_correct[0]),
            "test_acc": test_acc,
            "complete": final,
            "hyperparameters": {k: v for k, v in asdict(train_cfg).items() if k not in ("kernels", "graphs",
                                                                                      "max_members")},
            "rng": rng.VERSION,
            "member_weight_decay": member.weight_decay,
            "member_dropout": member.dropout,
            "dataset": data.name,
            "device": str(device),
            "train_seconds": train_seconds,
            "records": records,
        }

    def checkpoint(final: bool, test_acc: float | None) -> dict[str, Any]:
        s = summary(final, test_acc, prior_seconds + time.perf_counter() - t_start)
        save_member(run_dir / CHECKPOINT, pop, 0, {k: v for k, v in s.items() if k not in ("format",)})
        atomic_write(run_dir / SUMMARY, json.dumps({**s, "run_dir": str(run_dir)}, indent=1))
        return s

    if not cfg.quiet:
        console.print(arch_table(arch))
        console.print(f"mode [bold]{mode}[/]  seed {seed}  device {device}  precision {engine.precision}  "
                      f"meta-loops {done + 1}..{target}", soft_wrap=True)
        console.print(f"data {data.source}", soft_wrap=True)
        console.print(f"run  {run_dir}", soft_wrap=True)
        if done:
            console.print(f"resuming after meta-loop {done}: bounty {pop.lkg_score()[0]:.2f}% @ loop {pop.bounty_loop[0]}")
        for n in notes:
            console.print(f"[yellow]note[/]: {n}", soft_wrap=True)

    with loop_progress() as progress:
        loops_task = progress.add_task("meta-loop", total=target - done, visible=not cfg.quiet)
        steps_task = progress.add_task("epoch", total=1, visible=not cfg.quiet)

        def on_step(step: int, n_steps: int) -> None:
            if step == 1 or step == n_steps or step % 8 == 0:
                progress.update(steps_task, completed=step, total=n_steps)

        while pop.loop < target:
            r = engine.meta_loop(on_step if not cfg.quiet else None)
            records.append(_loop_record(r, mode))
            checkpoint(False, None)
            progress.advance(loops_task)
            if not cfg.quiet:
                acc = r.candidate_acc[0]
                word, colour = ("DIVERGED", "red") if r.diverged[0] else (
                    ("PROMOTED", "green") if r.promoted[0] else ("DISCARDED", "yellow"))
                verdict = f"[{colour}]{word:<9}[/]"
                progress.console.print(
                    f"loop {r.loop:>4}/{target}  {verdict}  candidate {acc:6.2f}%  "
                    f"bounty {pop.lkg_score()[0]:6.2f}% @ {pop.bounty_loop[0]:<4} "
                    f"ablated {_describe_ablation(arch.depth, r.ablated[0]):<14} {r.seconds:5.1f}s",
                    soft_wrap=True,
                )
    test_acc = engine.test_accuracy()[0]
    s = checkpoint(True, test_acc)
    wall = time.perf_counter() - t_start
    if not cfg.quiet:
        console.print(
            f"[bold]bounty {s['bounty']:.2f}% @ loop {s['bounty_loop']}[/]  test accuracy of the LKG {test_acc:.2f}%  "
            f"({pop.loop} meta-loops, {wall:.1f}s)  -> {run_dir}",
            soft_wrap=True,
        )
    out = {k: v for k, v in s.items() if k not in ("format",)}
    out["run_dir"] = str(run_dir)
    out["timing"] = {"wall_seconds": wall, "train_seconds": s.pop("train_seconds", None)}
    out.pop("train_seconds", None)
    return out

