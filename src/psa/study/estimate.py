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

from psa.core.checkpoint import save_population
from psa.core.data import N_VAL, Dataset
from psa.core.device import Execution, describe_device, synchronize
from psa.core.engine import Engine
from psa.core.population import Population
from psa.study.design import StudyDesign
from psa.study.plan import Plan, PopulationPlan

# How long one probe's timed training may take: enough steps that a busy machine's hiccups
# average out, few enough that a dry run of the paper's 98 architectures stays minutes.
PROBE_SECONDS = 0.6
PROBE_REPEATS = 3
EVAL_IMAGES = 1_000  # validation images of the probe's meta-loops
# The estimate's uncertainty never drops below this: the model's error on bench/estimate.py's
# architectures where the probes' own spread was small (up to 17%, 64*1, on a busy 2-core CPU:
# bench/results/estimate-cpu.md, whose +- column was printed with 15%).
MODEL_ERROR = 0.20


@dataclass(frozen=True)
class Probe:
    """One population shape (architecture x members) timed on this device."""

    arch: str
    members: int
    setup_s: float  # Population.create + Engine
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
    per_arch: dict[str, float]  # seconds of each architecture's populations
    probes: tuple[Probe, ...]
    uncertainty: float  # relative: the estimate is total x (1 +- uncertainty)
    calibration_s: float  # how long the probes took

    @property
    def total(self) -> float:
        """The whole study, populations one after another."""
        return self.startup_s + sum(self.per_arch.values())

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


def probe(ex: Execution, data: Dataset, design: StudyDesign, pp: PopulationPlan,
          seconds: float = PROBE_SECONDS) -> Probe:
    """Time population `pp` of `design` on `ex`'s device, on the first few training batches
    and EVAL_IMAGES validation images: its set-up, a first meta-loop (the warm-up), the
    training steps (PROBE_REPEATS epochs of as many steps as fit `seconds`), the scoring, one
    more whole meta-loop (for what a loop costs beyond its steps and scoring: ablations,
    promotion, results to the host) and one checkpoint."""
    t_start = time.perf_counter()
    device = ex.device
    bs = design.hparams.batch_size
    arch = data.arch(pp.arch)  # sized for the data set
    members = pp.members(design)
    full_steps = -(-design.n_train // bs)
    n_eval = min(EVAL_IMAGES, data.val_y.numel())

    def engine(steps: int) -> Engine:
        n = min(design.n_train, steps * bs)
        sub = dataclasses.replace(data, train_x=data.train_x[:n], train_y=data.train_y[:n],
                                  val_x=data.val_x[:n_eval], val_y=data.val_y[:n_eval])
        return Engine(Population.create(arch, members, device, n_val=n_eval, model=design.model), sub,
                      design.hparams, ex)

    steps = first_steps = min(2, full_steps)
    t = time.perf_counter()
    eng = engine(steps)
    setup_s = time.perf_counter() - t
    first = _timed(eng.meta_loop, device)  # also warms up the scoring
    # Epochs of s1 and s2 = 2 x s1 steps, alternated: their difference is the cost of a step
    # without an epoch's fixed cost (the candidate's clone, AdamW's reset, the data order),
    # which a probe's few steps would otherwise inflate many times over. s2 is as many steps
    # as fill `seconds` over the repeats (the first loop, slower than the rest, errs short).
    s2 = min(full_steps, max(2 * steps, math.ceil(seconds / PROBE_REPEATS / max(first / steps, 1e-6))))
    s1 = max(1, s2 // 2)
    short = eng if s1 == steps else engine(s1)
    long_ = engine(s2)
    if short is not eng:
        short.meta_loop()
    long_.meta_loop()
    t1, t2 = [], []
    for _ in range(PROBE_REPEATS):
        t1.append(_timed(lambda: short.train_epoch(short.pop.loop + 1), device))
        t2.append(_timed(lambda: long_.train_epoch(long_.pop.loop + 1), device))
    m1, m2 = statistics.median(t1), statistics.median(t2)
    # a busy machine can make the difference meaningless: then the long epochs' mean step
    step_s = (m2 - m1) / (s2 - s1) if s2 > s1 and m2 > m1 else m2 / s2
    eng, steps = long_, s2
    # scoring the whole validation set, as every loop does (and the test set, as large): its
    # cost is not proportional to the images (blocks of rows and members, a fixed cost per
    # layer and block), so a part of it would not scale to the whole
    x, y = data.val_x, data.val_y
    eval_image_s = _timed(lambda: eng.count_correct(eng.pop.lkg, x, y), device) / x.shape[0]
    loop = _timed(eng.meta_loop, device)
    loop_extra_s = max(0.0, loop - steps * step_s - n_eval * eval_image_s)  # n_eval: the probe's own
    warmup_s = max(0.0, first - first_steps * step_s - n_eval * eval_image_s - loop_extra_s)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint_s = _timed(lambda: save_population(Path(tmp) / "probe.safetensors", eng.pop, {}), device)
    return Probe(pp.arch, pp.size, setup_s, step_s, (max(t2) - min(t2)) / 2 / m2, warmup_s, eval_image_s,
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


def population_seconds(p: Probe, design: StudyDesign, size: int, checkpoint_every: float = 60.0) -> float:
    """Wall seconds of one population of `size` members from its probe (measured at p.members;
    another size scales the per-member terms linearly, a rough correction for the few
    populations that are a trial or so smaller than the probed one)."""
    scale = size / p.members
    loops = design.hparams.meta_loops
    steps = -(-design.n_train // design.hparams.batch_size)
    loop_s = scale * (steps * p.step_s + N_VAL * p.eval_image_s) + p.loop_extra_s
    train_s = loops * loop_s
    # the driver checkpoints after the first loop and then every `checkpoint_every` seconds
    n_ckpt = loops if checkpoint_every <= 0 else min(loops, 1 + int(train_s // checkpoint_every))
    return (p.setup_s + p.warmup_s) * scale + train_s + 10_000 * p.eval_image_s * scale + n_ckpt * p.checkpoint_s * scale


def estimate(ex: Execution, data: Dataset, plan: Plan, startup_s: float, checkpoint_every: float = 60.0) -> Estimate:
    """Probe every distinct population shape of `plan` (an architecture's largest population)
    and add up the study."""
    design = plan.design
    t0 = time.perf_counter()
    largest: dict[str, PopulationPlan] = {}
    for pp in plan.populations:
        if pp.arch not in largest or pp.size > largest[pp.arch].size:
            largest[pp.arch] = pp
    probes: dict[str, Probe] = {}
    for arch, pp in largest.items():
        probes[arch] = probe(ex, data, design, pp)
    per_arch = {a: 0.0 for a in design.architectures}
    for pp in plan.populations:
        per_arch[pp.arch] += population_seconds(probes[pp.arch], design, pp.size, checkpoint_every=checkpoint_every)
    spread = max(p.spread for p in probes.values()) if probes else 0.0
    return Estimate(describe_device(ex.device), startup_s, per_arch, tuple(probes.values()), max(MODEL_ERROR, spread),
                    time.perf_counter() - t0)
