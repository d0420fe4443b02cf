"""The time estimate of `psa study --dry-run`: every architecture's population timed on this
device by the engine itself, then scaled to the whole study.

A study's wall time is more than its training FLOPs. On a CPU, a small net's step costs
dozens of small operations whose fixed cost dwarfs the arithmetic, and on a busy machine
every parallel operation waits for its threads; a FLOP rate fitted on two architectures (the
estimate before this one) was 2.5-3x short on narrow nets. So nothing here is a constant: each
distinct population shape of the plan trains a few real steps and scores real images with the
design's hyperparameters and the run's execution (precision, kernels, graphs), and the
estimate is

    study = start-up (imports, data) + the process's shut-down + sum over populations of
            set-up + first-loop warm-up + loops x (steps x step + validation + per-loop records)
            + the test set + checkpoints

with every term measured here. A change to the engine (a fused CPU path, say) changes the
probes and so the estimate; the estimate assumes the machine stays as busy as it is now.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from psa.core.checkpoint import save_tensors
from psa.core.data import Dataset
from psa.core.device import Execution, describe_device, synchronize
from psa.core.loop import Trainer, meta_loop
from psa.study.design import StudyDesign
from psa.study.kinds import ModelKind
from psa.study.plan import Plan, PopulationPlan

# How long one probe's timed training may take: enough steps that a busy machine's hiccups
# average out, few enough that a dry run of the paper's 98 architectures stays minutes.
PROBE_SECONDS = 0.6
PROBE_REPEATS = 3
# The estimate's uncertainty never drops below this: the model's error on bench/estimate.py's
# architectures where the probes' own spread was small (up to 17%, 64*1, on a busy 2-core CPU:
# bench/results/estimate-cpu.md, whose +- column was printed with 15%).
MODEL_ERROR = 0.20


@dataclass(frozen=True)
class Probe:
    """One population shape (architecture x members) timed on this device."""

    net: str
    members: int
    setup_s: float  # the population and its trainer
    step_s: float  # one training step (median of the repeats)
    spread: float  # half the range of the repeated (longer) epochs' timings, over their median
    warmup_s: float  # the first epoch's extra time over the steady one (allocation, first touch)
    eval_image_s: float  # scoring every member on one image (validation and test)
    loop_extra_s: float  # a meta-loop's time beyond its steps and scoring
    checkpoint_s: float  # one checkpoint of the population (safetensors + JSON, to a temp dir)
    seconds: float  # wall time of this probe


@dataclass(frozen=True)
class Estimate:
    """Seconds of a study on this device, per architecture, with the terms they came from."""

    device: str  # where the probes ran, for people
    startup_s: float  # outside the populations: imports, data loading, the process's start and exit
    per_net: dict[str, float]  # seconds of each net's populations
    probes: tuple[Probe, ...]
    uncertainty: float  # relative: the estimate is total x (1 +- uncertainty)
    calibration_s: float  # how long the probes took

    @property
    def total(self) -> float:
        """The whole study, populations one after another."""
        return self.startup_s + sum(self.per_net.values())

    def describe(self) -> str:
        """How the estimate was made, for the dry run's last lines."""
        n = len(self.probes)
        return (f"probed {n} population shape{'s' if n != 1 else ''} on this device in {self.calibration_s:.1f} s "
                f"(real training steps, validation and a checkpoint of each; the time per step ranged "
                f"{min(p.step_s for p in self.probes) * 1e3:.3g}-{max(p.step_s for p in self.probes) * 1e3:.3g} ms); "
                f"+-{self.uncertainty * 100:.0f}% is the probes' spread or the model's error on "
                f"bench/estimate.py, whichever is larger, and assumes the machine stays as busy as now")


def _timed(fn: Callable[[], object], device: torch.device) -> float:
    synchronize(device)
    t = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - t


def probe(kind: ModelKind, ex: Execution, data: Dataset, pp: PopulationPlan, seconds: float = PROBE_SECONDS) -> Probe:
    """Time population `pp` of a study on `ex`'s device through its kind's trainer, on the first
    few training batches: its set-up, a first meta-loop (the warm-up), whole meta-loops of s1 and
    s2 training steps scoring one validation image (PROBE_REPEATS each: their difference is the
    cost of a step without a loop's fixed cost), one of s1 steps scoring the whole validation
    set (the cost of scoring an image: a part of the set would not scale, as blocks of rows and
    members have a fixed cost), and one checkpoint."""
    t_start = time.perf_counter()
    device = ex.device
    design = kind.design
    bs = design.hparams.batch_size
    full_steps = -(-design.n_train // bs)

    def trainer(steps: int, n_val: int = 1) -> Trainer:
        n = min(design.n_train, steps * bs)
        sub = dataclasses.replace(data, train_x=data.train_x[:n], train_y=data.train_y[:n],
                                  val_x=data.val_x[:n_val], val_y=data.val_y[:n_val])
        return kind.new_trainer(pp, sub, ex)

    steps = first_steps = min(2, full_steps)
    t = time.perf_counter()
    first_trainer = trainer(steps)
    setup_s = time.perf_counter() - t
    first = _timed(lambda: meta_loop(first_trainer), device)
    # s2 is as many steps as fill `seconds` over the repeats (the first loop, slower than the
    # rest, errs short); s1 half of them
    s2 = min(full_steps, max(2 * steps, math.ceil(seconds / PROBE_REPEATS / max(first / steps, 1e-6))))
    s1 = max(1, s2 // 2)
    short = first_trainer if s1 == steps else trainer(s1)
    long_ = trainer(s2)
    if short is not first_trainer:
        meta_loop(short)
    meta_loop(long_)
    t1, t2 = [], []
    for _ in range(PROBE_REPEATS):
        t1.append(_timed(lambda: meta_loop(short), device))
        t2.append(_timed(lambda: meta_loop(long_), device))
    m1, m2 = statistics.median(t1), statistics.median(t2)
    # a busy machine can make the difference meaningless: then the long loops' mean step
    step_s = (m2 - m1) / (s2 - s1) if s2 > s1 and m2 > m1 else m2 / s2
    n_val = int(data.val_y.numel())
    scoring = trainer(s1, n_val)
    meta_loop(scoring)
    eval_image_s = max(0.0, _timed(lambda: meta_loop(scoring), device) - m1) / n_val
    loop_extra_s = max(0.0, m1 - s1 * step_s)
    warmup_s = max(0.0, first - first_steps * step_s - loop_extra_s)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint_s = _timed(lambda: save_tensors(Path(tmp) / "probe.safetensors", *long_.checkpoint()), device)
    return Probe(pp.net, pp.size, setup_s, step_s, (max(t2) - min(t2)) / 2 / m2, warmup_s, eval_image_s,
                 loop_extra_s, checkpoint_s, time.perf_counter() - t_start)


def process_overhead(timeout: float = 120.0) -> float:
    """Seconds a `psa` process spends outside its own code: the interpreter's start before psa
    is imported and its shut-down after psa returns. With torch loaded the shut-down is most of
    a second on a small CPU (module teardown, thread pools), and more once torch.optim's first
    optimizer has imported torch._dynamo (as every run's first AdamW does): the missing
    0.6-1.7 s of bench/results/estimate-cpu-idle.md. Measured on a child process that imports
    what a run imports, as the wall time of the child less its own import time; 0 if the child
    cannot run."""
    code = ("import sys, time; t = time.perf_counter(); import torch, torch._dynamo, psa.cli; "
            "sys.stdout.write(repr(time.perf_counter() - t))")
    t = time.perf_counter()
    try:
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout)
        inside = float(r.stdout) if r.returncode == 0 else None
    except (OSError, subprocess.SubprocessError, ValueError):
        inside = None
    wall = time.perf_counter() - t
    return 0.0 if inside is None else max(0.0, wall - inside)


def population_seconds(p: Probe, design: StudyDesign, size: int, n_val: int, n_test: int,
                       checkpoint_every: float = 60.0) -> float:
    """Wall seconds of one population of `size` members from its probe (measured at p.members;
    another size scales the per-member terms linearly, a rough correction for the few
    populations that are a trial or so smaller than the probed one)."""
    scale = size / p.members
    loops = design.hparams.meta_loops
    steps = -(-design.n_train // design.hparams.batch_size)
    loop_s = scale * (steps * p.step_s + n_val * p.eval_image_s) + p.loop_extra_s
    train_s = loops * loop_s
    # the driver checkpoints after the first loop and then every `checkpoint_every` seconds
    n_ckpt = loops if checkpoint_every <= 0 else min(loops, 1 + int(train_s // checkpoint_every))
    return ((p.setup_s + p.warmup_s) * scale + train_s + n_test * p.eval_image_s * scale
            + n_ckpt * p.checkpoint_s * scale)


def estimate(kind: ModelKind, ex: Execution, data: Dataset, plan: Plan, startup_s: float,
             checkpoint_every: float = 60.0) -> Estimate:
    """Probe every distinct population shape of `plan` (a net's largest population) and add up
    the study."""
    design = plan.design
    t0 = time.perf_counter()
    largest: dict[str, PopulationPlan] = {}
    for pp in plan.populations:
        if pp.net not in largest or pp.size > largest[pp.net].size:
            largest[pp.net] = pp
    probes = {net: probe(kind, ex, data, pp) for net, pp in largest.items()}
    n_val, n_test = int(data.val_y.numel()), int(data.test_y.numel())
    per_net = {a: 0.0 for a in design.nets}
    for pp in plan.populations:
        per_net[pp.net] += population_seconds(probes[pp.net], design, pp.size, n_val, n_test, checkpoint_every)
    spread = max(p.spread for p in probes.values()) if probes else 0.0
    return Estimate(describe_device(ex.device), startup_s, per_net, tuple(probes.values()), max(MODEL_ERROR, spread),
                    time.perf_counter() - t0)
