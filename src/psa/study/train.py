"""`psa train`: one trial (a population of one) with checkpoints, resume and a readable log.

A run directory holds `lkg.safetensors` (the LKG as a SimpleMLP state_dict, with the run's
summary as JSON in its header), `run.json` (the same summary, for people and scripts) and
`loops.jsonl` (one line per meta-loop). After every meta-loop the loop's record is appended to
`loops.jsonl` and the other two are rewritten atomically without the per-loop records, so that a
long run writes a fixed amount per loop (rewriting a growing list every loop would be quadratic);
a killed run resumes where it stopped. When the command ends, both summaries carry every record.
"""

from __future__ import annotations

import errno
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from psa import __version__
from psa.core import rng
from psa.core.arch import Arch, ArchError, parse_arch
from psa.core.checkpoint import FORMAT, CheckpointError, atomic_write
from psa.core.data import Dataset, load_dataset
from psa.core.device import Execution, resolve_execution
from psa.core.errors import ConfigError
from psa.core.loop import LoopResult
from psa.core.member import Member, seed_problem
from psa.core.mlp.checkpoint import load_member, load_population, restore_member, save_member, save_population
from psa.core.mlp.engine import Engine
from psa.core.mlp.population import Population
from psa.core.hparams import HParams
from psa.core.model import DEFAULT_MODEL, check_model_name, layer_table, param_count
from psa.core.variant import Variant, format_schedule
from psa.study.console import arch_table, err_console, loop_progress
from psa.study.events import PopulationDone
from psa.study.runner import PopulationRun

CHECKPOINT = "lkg.safetensors"
SUMMARY = "run.json"
RECORDS = "loops.jsonl"
# A run with an engine variant also keeps its whole state here (the LKG apart from the bounty
# model, patience counters, AdamW moments): lkg.safetensors then holds the bounty model.
ENGINE_STATE = "population.safetensors"


@dataclass(frozen=True)
class TrialConfig:
    """Everything `psa train` was asked to do. None: the paper's value (HParams), or on resume
    the run's own."""

    arch: str | None = None  # hidden layers, e.g. "[2*128, 4*64]"
    mode: str | None = None  # default none; on resume, may switch the run to another mode
    meta_loops: int | None = None  # loops to run (default HParams'); on resume, this many more
    seed: int | None = None  # default 0
    lr: float | None = None
    batch_size: int | None = None
    weight_decay: float | None = None  # the rate decay mode uses (others use exactly 0)
    dropout: float | None = None  # the rate dropout mode uses (others use none)
    diverged: str | None = None  # how a diverged candidate is scored (HParams.diverged)
    model: str | None = None  # psa.core.model.MODELS; default simplemlp, on resume the run's own
    block_dropout: str | None = None  # resmlp: "mode" (default) or "always"
    base_weight_decay: float | None = None  # decay of every mode but decay's (default 0)
    device: str = "auto"  # auto: cuda, then mps, then cpu
    dataset: str | None = None  # mnist, fashion-mnist, cifar10 or npz:PATH; default mnist, on resume the run's own
    data_dir: str | None = None  # else $PSA_DATA_DIR, the shipped copy, ./dataset
    out: str | None = None  # the run directory (default runs/ARCH-MODE-seedN)
    resume: str | None = None  # a run directory to continue
    quiet: bool = False  # no progress or log (--json)
    precision: str | None = None  # None: auto, or on resume the run's own
    kernels: str = "auto"  # auto | torch | triton
    graphs: bool = True  # CUDA graphs on a GPU
    variant: dict[str, Any] | None = None  # engine variant settings given (psa.core.variant); on resume, must match


@dataclass
class Trial:
    """Where a trial stands before this command's meta-loops: fresh, or read from its run directory."""

    arch: Arch
    seed: int
    mode: str
    hparams: HParams
    precision: str | None  # the run's own precision on resume, None for a fresh run
    model: str = DEFAULT_MODEL
    done: int = 0  # meta-loops already trained
    run_dir: Path | None = None
    records: list[dict[str, Any]] = field(default_factory=list)
    prior_seconds: float = 0.0
    mode_history: list[tuple[str, int]] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)  # the checkpoint's header on resume
    variant: Variant = Variant()
    state: dict[str, torch.Tensor] = field(default_factory=dict)  # the checkpoint's LKG on resume
    notes: list[str] = field(default_factory=list)

    @property
    def target(self) -> int:
        """The loop this command trains up to."""
        return self.hparams.meta_loops


def _overrides(cfg: TrialConfig) -> dict[str, Any]:
    return {"lr": cfg.lr, "batch_size": cfg.batch_size, "weight_decay": cfg.weight_decay, "dropout": cfg.dropout,
            "diverged": cfg.diverged, "block_dropout": cfg.block_dropout, "base_weight_decay": cfg.base_weight_decay}


def _check_knobs(model: str, hp: HParams) -> None:
    if model != "resmlp" and hp.block_dropout != "mode":
        raise ConfigError("--block-dropout applies to the residual blocks of --model resmlp only")


def fresh_trial(cfg: TrialConfig) -> Trial:
    """A new trial as `cfg` asks for it."""
    if cfg.arch is None:
        raise ConfigError("--arch is required (or --resume RUN_DIR)")
    model = check_model_name(cfg.model or DEFAULT_MODEL)
    hp = HParams().updated(**_overrides(cfg), meta_loops=cfg.meta_loops)
    _check_knobs(model, hp)
    variant = Variant.from_settings(cfg.variant or {})
    if model != DEFAULT_MODEL and not variant.is_default:
        raise ConfigError(f"engine variants are not available for --model {model} yet")
    arch = parse_arch(cfg.arch)
    mode = cfg.mode or variant.start_mode("none")
    variant.check(arch, mode, hp.meta_loops)
    seed = cfg.seed or 0
    if (problem := seed_problem(seed)) is not None:
        raise ConfigError(problem)
    return Trial(arch, seed, mode, hp, precision=None, model=model, variant=variant)


def resumed_trial(cfg: TrialConfig) -> Trial:
    """The trial in `cfg.resume`, checked against what `cfg` asks of it."""
    run_dir = Path(cfg.resume or "")
    if cfg.out is not None and Path(cfg.out).resolve() != run_dir.resolve():
        # the run continues in its own directory: an --out elsewhere would be silently ignored
        raise ConfigError(f"--out {cfg.out}: a resumed run continues in its own directory {run_dir}; "
                          f"give --resume alone (copy the run directory first to fork it)")
    state, meta = load_member(run_dir / CHECKPOINT)
    try:
        arch = parse_arch(meta["arch"])
    except (KeyError, ArchError) as e:
        raise CheckpointError(f"{run_dir / CHECKPOINT}: bad architecture in metadata ({e})") from None
    if cfg.arch is not None and parse_arch(cfg.arch) != arch:
        raise CheckpointError(f"checkpoint {run_dir} is architecture {arch}, not {parse_arch(cfg.arch)}")
    try:
        model = check_model_name(meta.get("model", DEFAULT_MODEL))
    except ConfigError as e:
        raise CheckpointError(f"{run_dir / CHECKPOINT}: {e}") from None
    if cfg.model is not None and cfg.model != model:
        raise CheckpointError(f"checkpoint {run_dir} is a {model}, not a {cfg.model}")
    if cfg.seed is not None and cfg.seed != meta["seed"]:
        raise ConfigError(f"checkpoint {run_dir} was trained with seed {meta['seed']}, not {cfg.seed}")
    done = int(meta["loop"])
    if cfg.meta_loops is not None:
        target = done + cfg.meta_loops
    else:
        target = int(meta["target_loops"])
        if target <= done:
            raise ConfigError(f"run {run_dir} already completed {done} meta-loops; pass --meta-loops N to train N more")
    stored = meta["hyperparameters"]
    own = HParams.from_dict(stored)
    hp = own.updated(**_overrides(cfg), meta_loops=target)
    changed = [f"{k} {getattr(own, k)}, not {getattr(hp, k)}" for k in _overrides(cfg)
               if getattr(hp, k) != getattr(own, k)]
    if changed:
        # its records and run.json describe one set of hyperparameters (mode switches are recorded)
        raise ConfigError(f"run {run_dir} trains with {'; '.join(changed)}: a resumed run keeps its hyperparameters "
                          f"(start a new run to train with others)")
    records = list(meta["records"]) if "records" in meta else read_records(run_dir / RECORDS, done)
    _check_knobs(model, hp)
    trial = Trial(arch, int(meta["seed"]), cfg.mode or meta["mode"], hp, model=model,
                  precision=stored.get("precision", "fp32"), done=done, run_dir=run_dir,
                  records=records, prior_seconds=float(meta.get("train_seconds", 0.0)),
                  mode_history=[(str(m), int(t)) for m, t in meta["mode_history"]], meta=meta, state=state)
    trial.variant = Variant.from_settings(meta.get("variant", {}))
    if cfg.variant:
        asked = Variant.from_settings({**trial.variant.settings(), **cfg.variant})
        if asked != trial.variant:
            raise ConfigError(f"run {run_dir} was started with engine variant {trial.variant.to_json()}, not "
                              f"{asked.to_json()}; a resumed run keeps its variant")
    if trial.variant.schedule:
        if cfg.mode is not None:
            raise ConfigError(f"run {run_dir} follows the schedule {format_schedule(trial.variant.schedule)}; "
                              f"--mode cannot change it")
        trial.mode = trial.variant.mode_at(meta["mode"], done + 1)
    if meta.get("rng") != rng.VERSION:
        trial.notes.append("this run was started by an older psa: its next meta-loops draw their data order and "
                           "dropout masks from psa's current random streams")
    return trial


def read_records(path: Path, done: int) -> list[dict[str, Any]]:
    """The first `done` loop records of a run's loops.jsonl. Lines past them (a loop appended
    before a kill stopped its checkpoint, or a half-written last line) are left out."""
    records: list[dict[str, Any]] = []
    try:
        with open(path) as f:
            for line in f:
                if len(records) == done:
                    break
                records.append(json.loads(line))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing; the checkpoint keeps its loop records there") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        pass  # a half-written line: counted as missing below
    if len(records) < done or [r.get("loop") for r in records] != list(range(1, done + 1)):
        raise CheckpointError(f"{path}: holds {len(records)} readable loop records, the checkpoint {done}")
    return records


def append_record(path: Path, record: dict[str, Any]) -> None:
    """Append one loop's record to loops.jsonl, on disk before the checkpoint that counts it."""
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def trial_data(trial: Trial, cfg: TrialConfig, device: torch.device) -> Dataset:
    """The data set the trial trains on, on `device`; the trial's architecture then takes its
    input size and class count. A resumed run keeps its data set (same name and checksum)."""
    stored = trial.meta.get("dataset") if trial.run_dir is not None else None
    if stored is not None and cfg.dataset is not None and cfg.dataset != stored:
        raise ConfigError(f"run {trial.run_dir} trained on {stored}, not {cfg.dataset}; resume it on its own data set")
    data = load_dataset(cfg.dataset or stored or "mnist", device, cfg.data_dir)
    checksum = trial.meta.get("dataset_checksum")
    if checksum is not None and checksum != data.checksum:
        raise ConfigError(f"run {trial.run_dir} trained on {stored} with checksum {checksum[:12]}, but {data.source} "
                          f"has checksum {data.checksum[:12]}: not the same data")
    trial.arch = data.arch(str(trial.arch))
    return data


def prepare_out(out: str | None, arch_short: str, mode: str, seed: int) -> Path:
    """The run directory, created and checked writable: `out` if empty or new, else a fresh
    name under ./runs/."""
    if out is None:
        # "[2*128, 4*64]" as 2x128_4x64: no brackets or spaces in a path people type
        stem = arch_short.replace("[", "").replace("]", "").replace(", ", "_").replace("*", "x").replace(" ", "")
        base = Path("runs") / f"{stem or 'no-hidden'}-{mode}-seed{seed}"
        path, n = base, 1
        while path.exists():
            n += 1
            path = base.with_name(f"{base.name}-{n}")
    else:
        if not out.strip():  # Path("") is the current directory
            raise ConfigError("--out is empty; give a directory name")
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
    try:
        path.mkdir(parents=True, exist_ok=True)
        atomic_write(path / ".write-probe", b"")
        (path / ".write-probe").unlink()
    except OSError as e:
        raise ConfigError(f"--out {path}: cannot write there ({e.strerror})") from None
    return path


def build_population(trial: Trial, member: Member, data: Dataset, device: torch.device) -> Population:
    """The trial's population of one: fresh weights, or the checkpoint's LKG and scores (and,
    for a variant, its whole engine state)."""
    if trial.run_dir is not None and not trial.variant.is_default:
        pop, _ = load_population(trial.run_dir / ENGINE_STATE, device)
        (mem,) = pop.members
        if pop.loop != trial.done or (mem.seed, mem.variant) != (member.seed, member.variant):
            raise CheckpointError(f"{trial.run_dir / ENGINE_STATE} does not match {trial.run_dir / CHECKPOINT}")
        if not member.variant.schedule and mem.mode != member.mode:  # --resume --mode: as below
            pop.members = (member,)
            pop.mode_history[0].append((member.mode, trial.done + 1))
        return pop  # a schedule switches modes in the engine
    pop = Population.create(trial.arch, [member], device, n_val=data.val_y.numel(), model=trial.model)
    if trial.run_dir is None:
        return pop
    restore_member(pop, 0, trial.state)
    pop.loop = trial.done
    pop.lkg_correct.fill_(int(trial.meta["lkg_correct"]))
    pop.bounty_loop = [int(trial.meta["bounty_loop"])]
    pop.mode_history = [list(trial.mode_history)]
    if not trial.mode_history or trial.mode_history[-1][0] != trial.mode:
        pop.mode_history[0].append((trial.mode, trial.done + 1))
    return pop


def loop_record(r: LoopResult, mode: str, j: int = 0) -> dict[str, Any]:
    """Member j's meta-loop as run.json records it."""
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
        **({"forced": r.forced[j]} if r.forced and r.forced[j] is not None else {}),
    }


def summary(trial: Trial, pop: Population, member: Member, ex: Execution, data: Dataset, final: bool,
            test_acc: float | None, train_seconds: float) -> dict[str, Any]:
    """The run's summary: the checkpoint's header and run.json."""
    extra: dict[str, Any] = {}
    if not trial.variant.is_default:  # absent for the paper's engine: its run.json is as it always was
        extra = {"variant": trial.variant.settings(), "lkg_score": pop.lkg_score()[0]}
    return {
        **extra,
        "format": FORMAT,
        "psa_version": __version__,
        "arch": str(trial.arch),
        **({} if trial.model == DEFAULT_MODEL else {"model": trial.model}),  # absent for the paper's SimpleMLP
        "params": param_count(trial.arch, trial.model),
        "seed": trial.seed,
        "mode": trial.mode,
        "mode_history": [list(x) for x in pop.mode_history[0]],
        "loop": pop.loop,
        "target_loops": trial.target,
        "bounty": pop.bounty_score()[0],
        "bounty_loop": pop.bounty_loop[0],
        "lkg_correct": int(pop.lkg_correct[0]),
        "test_acc": test_acc,
        "complete": final,
        # the format run directories have always had: the hyperparameters (the loops are
        # target_loops) and, beside them, the precision the run computes in and the
        # validation block's budget
        "hyperparameters": {**{k: v for k, v in trial.hparams.to_dict().items() if k != "meta_loops"},
                            "eval_chunk_bytes": ex.eval_bytes, "precision": ex.precision},
        "rng": rng.VERSION,
        "member_weight_decay": member.weight_decay,
        "member_dropout": member.dropout,
        "dataset": data.name,
        # MNIST runs keep the run.json they always had (its files are fixed by their SHA-256);
        # other data sets record which files they were
        **({} if data.name == "mnist" else {"dataset_checksum": data.checksum}),
        "device": str(ex.device),
        "train_seconds": train_seconds,
        "records": trial.records,
    }


def _describe_ablation(trial: Trial, a: tuple[int, int] | None) -> str:
    if a is None:
        return "-"
    layer, neuron = a
    if trial.model != DEFAULT_MODEL:
        return f"{layer_table(trial.arch, trial.model)[layer][0]} #{neuron}"
    return f"output #{neuron}" if layer == trial.arch.depth else f"hidden {layer + 1} #{neuron}"


def _print_header(trial: Trial, pop: Population, ex: Execution, data: Dataset) -> None:
    console = err_console
    console.print(arch_table(trial.arch, model=trial.model))
    console.print(f"mode [bold]{trial.mode}[/]  seed {trial.seed}  device {ex.device}  precision {ex.precision}  "
                  f"meta-loops {trial.done + 1}..{trial.target}", soft_wrap=True)
    console.print(f"data {data.source}", soft_wrap=True)
    console.print(f"run  {trial.run_dir}", soft_wrap=True)
    if trial.done:
        console.print(f"resuming after meta-loop {trial.done}: bounty {pop.bounty_score()[0]:.2f}% @ loop "
                      f"{pop.bounty_loop[0]}")
    if not trial.variant.is_default:
        console.print(f"engine variant {trial.variant.to_json()}", soft_wrap=True)
    for n in trial.notes:
        console.print(f"[yellow]note[/]: {n}", soft_wrap=True)


def _loop_line(r: LoopResult, trial: Trial, pop: Population) -> str:
    word, colour = ("DIVERGED", "red") if r.diverged[0] else (
        ("FORCED", "magenta") if r.forced and r.forced[0] else
        ("PROMOTED", "green") if r.promoted[0] else ("DISCARDED", "yellow"))
    score = pop.bounty_score()[0]  # -1 until a candidate is kept
    bounty = f"{score:6.2f}% @ {pop.bounty_loop[0]:<4}" if score >= 0 else f"{'-':>7} @ {'-':<4}"
    return (f"loop {r.loop:>4}/{trial.target}  [{colour}]{word:<9}[/]  candidate {r.candidate_acc[0]:6.2f}%  "
            f"bounty {bounty} "
            f"ablated {_describe_ablation(trial, r.ablated[0]):<14} {r.seconds:5.1f}s")


def _write_failed(e: OSError, run_dir: Path, checkpointed: bool, final: bool = False) -> ConfigError:
    """One line for a run whose files could not be written. A fresh run that had no checkpoint
    yet is emptied again (its --out held nothing before it), so the same command starts over."""
    what = "no space left on device" if e.errno == errno.ENOSPC else f"cannot write ({e.strerror or e})"
    if final:  # every loop is in the last checkpoint; only the test accuracy is not
        return ConfigError(f"{what} in {run_dir} writing the final summary; the checkpoint of the last meta-loop is "
                           f"intact, without the test accuracy: free some space and train on with psa train --resume "
                           f"{run_dir} --meta-loops N")
    if checkpointed:
        return ConfigError(f"{what} in {run_dir}; its last checkpoint is intact: free some space and continue with "
                           f"psa train --resume {run_dir}")
    for f in run_dir.iterdir():
        if f.is_file():
            f.unlink(missing_ok=True)
    return ConfigError(f"{what} in {run_dir} before its first checkpoint, which keeps nothing: free some space and "
                       f"run the same command again")


def train(cfg: TrialConfig) -> dict[str, Any]:
    """Run (or resume) one trial; returns its summary, which is also written to run.json."""
    t_start = time.perf_counter()
    trial = resumed_trial(cfg) if cfg.resume else fresh_trial(cfg)
    if trial.target - trial.done < 1:
        raise ConfigError("--meta-loops must be at least 1")
    member = trial.hparams.member(trial.mode, trial.seed, trial.variant)
    ex = resolve_execution(cfg.device, cfg.precision or trial.precision or "auto", cfg.kernels, cfg.graphs)
    if trial.precision is not None and ex.precision != trial.precision:
        raise ConfigError(f"run {trial.run_dir} computes in {trial.precision}, not {ex.precision}: a resumed run keeps "
                          f"its precision (start a new run to train in another)")
    data = trial_data(trial, cfg, ex.device)
    pop = build_population(trial, member, data, ex.device)
    engine = Engine(pop, data, trial.hparams, ex)  # refuses a member that does not fit before --out is made
    if trial.run_dir is None:
        label = trial.arch.short if trial.model == DEFAULT_MODEL else f"{trial.model}-{trial.arch.short}"
        trial.run_dir = prepare_out(cfg.out, label, trial.mode, trial.seed)
    run_dir = trial.run_dir
    run = PopulationRun(str(run_dir), engine, trial.hparams.meta_loops, where=str(ex.device))

    def checkpoint(final: bool, test_acc: float | None) -> dict[str, Any]:
        s = summary(trial, pop, pop.members[0], ex, data, final, test_acc,
                    trial.prior_seconds + time.perf_counter() - t_start)
        if not trial.variant.is_default:  # written first: a resume checks it against lkg.safetensors' loop
            save_population(run_dir / ENGINE_STATE, pop)
        # between loops the records stay in loops.jsonl only: a fixed amount written per loop
        w = s if final else {**{k: v for k, v in s.items() if k != "records"}, "records_file": RECORDS}
        save_member(run_dir / CHECKPOINT, pop, 0, {k: v for k, v in w.items() if k != "format"})
        atomic_write(run_dir / SUMMARY, json.dumps({**w, "run_dir": str(run_dir)}, indent=1))
        return s

    # the file holds exactly the records so far (a resumed run's may hold loops past its checkpoint);
    # a fresh run's starts with its first loop, so that one stopped before it (Ctrl-C) leaves its
    # --out empty and the same command runs again
    if cfg.resume:
        atomic_write(run_dir / RECORDS, "".join(json.dumps(r) + "\n" for r in trial.records))

    if not cfg.quiet:
        _print_header(trial, pop, ex, data)
    with loop_progress() as progress:
        loops_task = progress.add_task("meta-loop", total=trial.target - trial.done, visible=not cfg.quiet)
        steps_task = progress.add_task("epoch", total=1, visible=not cfg.quiet)

        def on_step(step: int, n_steps: int) -> None:
            if step == 1 or step == n_steps or step % 8 == 0:
                progress.update(steps_task, completed=step, total=n_steps)

        done: PopulationDone | None = None
        while run.to_go > 0:
            run.launch(None if cfg.quiet else on_step)
            events = run.collect()
            assert run.last is not None
            trial.mode = pop.members[0].mode  # a schedule may have switched it
            trial.records.append(loop_record(run.last, trial.mode))
            try:
                append_record(run_dir / RECORDS, trial.records[-1])
                checkpoint(False, None)
            except OSError as e:
                raise _write_failed(e, run_dir, checkpointed=trial.done > 0 or len(trial.records) > 1) from None
            progress.advance(loops_task)
            if not cfg.quiet:
                progress.console.print(_loop_line(run.last, trial, pop), soft_wrap=True)
            done = next((ev for ev in events if isinstance(ev, PopulationDone)), None)
    assert done is not None
    test_acc = done.test_acc[0]
    try:
        s = checkpoint(True, test_acc)
    except OSError as e:
        raise _write_failed(e, run_dir, checkpointed=True, final=True) from None
    wall = time.perf_counter() - t_start
    if not cfg.quiet:
        found = (f"[bold]bounty {s['bounty']:.2f}% @ loop {s['bounty_loop']}[/]  test accuracy of the LKG "
                 f"{test_acc:.2f}%" if test_acc is not None else
                 "[bold]no bounty[/]: every candidate diverged and was discarded, so no model was kept to test")
        err_console.print(f"{found}  ({pop.loop} meta-loops, {wall:.1f}s)  -> {run_dir}", soft_wrap=True)
    out = {k: v for k, v in s.items() if k not in ("format", "train_seconds")}
    out["run_dir"] = str(run_dir)
    out["timing"] = {"wall_seconds": wall, "train_seconds": s["train_seconds"]}
    return out
