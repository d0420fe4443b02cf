"""Populations timed on this device by their own trainers: the dry run's estimate, and the
calibration a new study stores (psa.study.calibration turns probes into seconds).

A study's wall time is more than its training FLOPs. On a CPU, a small net's step costs
dozens of small operations whose fixed cost dwarfs the arithmetic, and on a busy machine
every parallel operation waits for its threads; a FLOP rate fitted on two architectures (the
estimate before this one) was 2.5-3x short on narrow nets. So nothing here is a constant: each
distinct population shape of the plan trains a few real steps and scores real images with the
design's hyperparameters and the run's execution (precision, kernels, graphs), and the
estimate is

    study = start-up (imports, data, the process's first-use costs) + the process's shut-down
            + sum over populations of set-up + first-loop warm-up
            + loops x (steps x step + validation + per-loop records) + the test set
            + checkpoints (the host copy, and the write where it outlasts a loop)

with every term measured here. A change to the engine (a fused CPU path, say) changes the
probes and so the estimate; the estimate assumes the machine stays as busy as it is now.

Where a run keeps several populations in flight (a GPU: psa.study.backends.local), the sum is
not the wall time: small nets overlap. There the estimate also measures how much of the device
a population fills alone (concurrent_share: copies of it in flight together), for a spread of
shapes within a budget, and the wall time is the backend's schedule simulated with those
shares (psa.study.schedule).
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
from typing import Any

import torch

from psa.core.checkpoint import save_tensors
from psa.core.data import Dataset
from psa.core.device import OOM_ERRORS, Execution, describe_device, release_cached, synchronize
from psa.core.loop import Trainer, meta_loop
from psa.study.backends.local import StreamSlots, memory_budget, precompile_kernels
from psa.study.calibration import Probe, calibration_record, probe_costs
from psa.study.checkpoints import host_copy
from psa.study.kinds import ModelKind
from psa.study.options import StudyError
from psa.study.plan import Plan, PopulationPlan
from psa.study.runner import PopulationProgress
from psa.study.schedule import Job, in_flight_seconds, interpolate_share

# How long one probe's timed training may take: enough steps that a busy machine's hiccups
# average out, few enough that a dry run of the paper's 98 architectures stays minutes.
PROBE_SECONDS = 0.6
PROBE_REPEATS = 3
# The estimate's uncertainty never drops below this: the model's error on bench/estimate.py's
# architectures where the probes' own spread was small (up to 17%, 64*1, on a busy 2-core CPU:
# bench/results/estimate-cpu.md, whose +- column was printed with 15%).
MODEL_ERROR = 0.20
# A new study's calibration: one repeat of a shorter probe per shape (LIGHT_PROBE_SECONDS of
# timed steps), shapes probed while the time spent stays under both limits (at least one is).
LIGHT_PROBE_SECONDS = 0.2
CALIBRATION_BUDGET_S = 60.0
CALIBRATION_SHARE = 0.03  # of the study's estimated time: a small study is not made much longer
LIGHT_SCORED = (500, 2500)  # test images a light probe scores, on its two trainers
# Populations in flight: each share measurement times one loop of this many seconds alone (at
# most an epoch) and the same loop of every copy at once; shapes are measured, spread over the
# plan's range of step times, while the time spent stays under SHARE_BUDGET_S and SHARE_OF_STUDY
# of the study's populations one at a time (two shapes at least): a slice of a few minutes
# spends seconds on it.
SHARE_LOOP_SECONDS = 0.1
SHARE_BUDGET_S = 30.0
SHARE_OF_STUDY = 0.05


@dataclass(frozen=True)
class Estimate:
    """Seconds of a study on this device, per architecture, with the terms they came from."""

    device: str  # where the probes ran, for people
    startup_s: float  # outside the populations: imports, data loading, the process's start and exit
    per_net: dict[str, float]  # seconds of each net's populations
    probes: tuple[Probe, ...]
    uncertainty: float  # relative: the estimate is total x (1 +- uncertainty)
    calibration_s: float  # how long the probes took
    slots: int = 1  # populations a run keeps in flight
    shares: dict[str, float] = dataclasses.field(default_factory=dict)  # net -> measured share of the device
    jobs: tuple[Job, ...] = ()  # the plan's populations, in its order, as the schedule sees them
    memory_budget: float | None = None  # the device memory populations in flight may hold

    @property
    def sequential(self) -> float:
        """The whole study, populations one after another."""
        return self.startup_s + sum(self.per_net.values())

    @property
    def total(self) -> float:
        """The whole study as a run takes it: `slots` populations in flight."""
        return self.startup_s + self.populations_s()

    def populations_s(self, left: dict[str, float] | None = None) -> float:
        """The populations' wall time with `slots` in flight (schedule.in_flight_seconds), or
        of the part `left` of each population (a fraction by PopulationPlan.key; absent: all of
        it) where a study has some done already. By population, not by net: a population's
        trials finish together, so what is left of a net is some of its populations whole,
        and with shares below 1 two whole populations in flight take twice as long as four
        halves would."""
        if left is None:
            left = {}
        if not self.jobs:  # made without the plan's populations: all of it, one at a time
            return sum(self.per_net.values())
        jobs = [dataclasses.replace(j, seconds=j.seconds * left.get(j.key, 1.0)) for j in self.jobs]
        return in_flight_seconds([j for j in jobs if j.seconds > 0], self.slots, self.memory_budget)

    def describe(self) -> str:
        """How the estimate was made, for the dry run's last lines."""
        n = len(self.probes)
        return (f"probed {n} population shape{'s' if n != 1 else ''} on this device in {self.calibration_s:.1f} s "
                f"(real training steps, validation and a checkpoint of each; the time per step ranged "
                f"{min(p.step_s for p in self.probes) * 1e3:.3g}-{max(p.step_s for p in self.probes) * 1e3:.3g} ms); "
                f"+-{self.uncertainty * 100:.0f}% is the probes' spread or the model's error on "
                f"bench/estimate.py, whichever is larger, and assumes the machine stays as busy as now"
                + (f"; {self.slots} populations in flight: {len(self.shares)} shape"
                   f"{'s' if len(self.shares) != 1 else ''} timed with copies of each in flight, which fill "
                   f"{min(self.shares.values()) * 100:.0f}-{max(self.shares.values()) * 100:.0f}% of the device "
                   f"alone (the rest interpolated by step time)" if self.shares else
                   f"; {self.slots} populations in flight take turns on this device" if self.slots > 1 else ""))


def first_images(data: Dataset, n_train: int) -> Dataset:
    """`data` cut to its first `n_train` training images and one validation image: a short
    loop that scores almost nothing, for warm-ups and share measurements."""
    return dataclasses.replace(data, train_x=data.train_x[:n_train], train_y=data.train_y[:n_train],
                               val_x=data.val_x[:1], val_y=data.val_y[:1])


def _timed(fn: Callable[[], object], device: torch.device) -> float:
    synchronize(device)
    t = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - t


def probe(kind: ModelKind, ex: Execution, data: Dataset, pp: PopulationPlan, seconds: float = PROBE_SECONDS,
          light: bool = False) -> Probe:
    """Time population `pp` of a study on `ex`'s device through its kind's trainer, on the first
    few training batches: its set-up, a first meta-loop (the warm-up), whole meta-loops of s1 and
    s2 training steps scoring one validation image (PROBE_REPEATS each: their difference is the
    cost of a step without a loop's fixed cost), one of s1 steps scoring the whole validation
    set (the cost of scoring an image: a part of the set would not scale, as blocks of rows and
    members have a fixed cost), and one checkpoint (its host copy and its write apart: the
    driver writes in the background).

    `light` (a new study's calibration, about half the time for a wide net, a third for a
    narrow one): one repeat, a first loop of s1 = 1 step (the short loop's trainer), and the
    scoring timed on the two trainers' test sets, cut to LIGHT_SCORED images (the difference:
    a call's fixed cost cancels), instead of a third trainer scoring the whole validation set."""
    t_start = time.perf_counter()
    device = ex.device
    design = kind.design
    bs = design.hparams.batch_size
    full_steps = -(-design.n_train // bs)
    repeats = 1 if light else PROBE_REPEATS
    prefixes: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def trainer(steps: int, n_val: int = 1, n_test: int | None = None) -> Trainer:
        n = min(design.n_train, steps * bs)
        # one tensor per length: the fused CPU step finds a training set's 8-bit codes once per
        # tensor (cpu_stack.input_codes), which would otherwise be most of a small probe
        if n not in prefixes:
            prefixes[n] = (data.train_x[:n], data.train_y[:n])
        x, y = prefixes[n]
        sub = dataclasses.replace(data, train_x=x, train_y=y, val_x=data.val_x[:n_val], val_y=data.val_y[:n_val],
                                  test_x=data.test_x[:n_test], test_y=data.test_y[:n_test])
        return kind.new_trainer(pp, sub, ex)

    n_scored = [min(n, int(data.test_y.numel())) for n in LIGHT_SCORED]
    steps = first_steps = 1 if light else min(2, full_steps)
    t = time.perf_counter()
    first_trainer = trainer(steps, n_test=n_scored[0] if light else None)
    setup_s = time.perf_counter() - t
    first = _timed(lambda: meta_loop(first_trainer), device)
    # s2 is as many steps as fill `seconds` over the repeats (the first loop, slower than the
    # rest, errs short); s1 half of them (light: 1, so that a wide net's few steps differ by 3)
    s2 = min(full_steps, max(4 if light else 2 * steps, math.ceil(seconds / repeats / max(first / steps, 1e-6))))
    s1 = 1 if light else max(1, s2 // 2)
    short = first_trainer if s1 == steps else trainer(s1)
    long_ = trainer(s2, n_test=n_scored[1] if light else None)
    if short is not first_trainer:
        meta_loop(short)
    meta_loop(long_)
    t1, t2 = [], []
    for _ in range(repeats):
        t1.append(_timed(lambda: meta_loop(short), device))
        t2.append(_timed(lambda: meta_loop(long_), device))
    m1, m2 = statistics.median(t1), statistics.median(t2)
    # a busy machine can make the difference meaningless: then the long loops' mean step
    step_s = (m2 - m1) / (s2 - s1) if s2 > s1 and m2 > m1 else m2 / s2
    if light:
        (n_a, n_b), t_a, t_b = n_scored, _timed(short.test_accuracy, device), _timed(long_.test_accuracy, device)
        eval_image_s = (t_b - t_a) / (n_b - n_a) if n_b > n_a and t_b > t_a else t_b / n_b
    else:
        n_val = int(data.val_y.numel())
        scoring = trainer(s1, n_val)
        meta_loop(scoring)
        t_scoring = _timed(lambda: meta_loop(scoring), device)
        # a busy machine can make the difference nothing (scoring is never free): then the
        # scoring loop's time shared by the images it passed forward (a training image's step
        # is about three forwards)
        eval_image_s = ((t_scoring - m1) / n_val if t_scoring > m1
                        else t_scoring / (n_val + 3 * min(design.n_train, s1 * bs)))
    loop_extra_s = max(0.0, m1 - s1 * step_s)
    warmup_s = max(0.0, first - first_steps * step_s - loop_extra_s)
    # a checkpoint as the driver takes it: the host copy on the scheduler's thread, the write
    # on the checkpoint writer's (psa.study.checkpoints)
    tensors, meta = long_.checkpoint()
    copied: dict[str, torch.Tensor] = {}
    checkpoint_s = _timed(lambda: copied.update(host_copy(tensors, live=True)), device)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            write_s = _timed(lambda: save_tensors(Path(tmp) / "probe.safetensors", copied, meta), device)
    except OSError as e:
        raise StudyError(f"cannot time a checkpoint write in {tempfile.gettempdir()} ({e.strerror or e}): set "
                         f"TMPDIR to a directory with room for one population's checkpoint") from None
    return Probe(pp.net, pp.size, setup_s, step_s, (max(t2) - min(t2)) / 2 / m2, warmup_s, eval_image_s,
                 loop_extra_s, checkpoint_s, time.perf_counter() - t_start, write_s)


def concurrent_share(kind: ModelKind, ex: Execution, data: Dataset, pp: PopulationPlan, steps: int,
                     copies: int) -> float:
    """How much of the device population `pp` fills alone, in [1/copies, 1]: `copies` trainers of
    it, each on its own stream as the local backend lends them, train a meta-loop of `steps`
    steps at once; the wall time of that over `copies` x one trainer's loop alone (the faster of
    two of each, after a first loop that captures and allocates). Trainers that compute their
    loop in launch() (off CUDA) give 1."""
    device = ex.device
    n = min(kind.design.n_train, steps * kind.design.hparams.batch_size)
    sub = first_images(data, n)
    streams = StreamSlots(device, copies)
    trainers = [kind.new_trainer(pp, sub, ex, None, streams.take()) for _ in range(streams.slots)]
    for tr in trainers:
        meta_loop(tr)

    def together() -> None:
        pending = [tr.launch() for tr in trainers]
        for loop in pending:
            loop.result()

    alone = min(_timed(lambda: meta_loop(trainers[0]), device) for _ in range(2))
    at_once = min(_timed(together, device) for _ in range(2))
    k = len(trainers)
    return min(1.0, max(1.0 / k, at_once / (k * max(alone, 1e-9))))


def measure_shares(kind: ModelKind, ex: Execution, data: Dataset, shapes: list[PopulationPlan],
                   probes: dict[str, Probe], slots: int, memory_budget: float | None,
                   budget_s: float = SHARE_BUDGET_S) -> dict[str, float]:
    """concurrent_share of `shapes` (their nets' probes give the step time), the quickest step
    first, then the slowest, then those between (spread_order), while the time spent stays under
    `budget_s` (two at least; estimate() passes the smaller of SHARE_BUDGET_S and SHARE_OF_STUDY
    of the study). A shape gets as many copies as `slots` and `memory_budget` allow
    (as the backend would admit them); a shape of which one copy fits is not measured, nor one
    whose copies run out of memory after all. The rest are interpolated by step time
    (schedule.interpolate_share)."""
    # off CUDA a population's launch computes its loop before it returns: those in flight take
    # turns, each filling the device (only CUDA's streams let them overlap)
    if slots < 2 or not shapes or ex.device.type != "cuda":
        return {}
    t0 = time.perf_counter()
    budget = memory_budget
    steps_per_epoch = -(-kind.design.n_train // kind.design.hparams.batch_size)
    order = sorted(shapes, key=lambda pp: probes[pp.net].step_s)
    shares: dict[str, float] = {}
    for i in spread_order(len(order)):
        if len(shares) >= 2 and time.perf_counter() - t0 >= budget_s:
            break
        pp, p = order[i], probes[order[i].net]
        copies = slots
        if budget is not None:
            copies = min(slots, int(budget // max(1, pp.size * kind.bytes_per_member(pp.net, data, ex))))
        if copies < 2:
            continue
        steps = max(1, min(steps_per_epoch, math.ceil(SHARE_LOOP_SECONDS / max(p.step_s, 1e-9))))
        try:
            shares[pp.net] = concurrent_share(kind, ex, data, pp, steps, copies)
        except OOM_ERRORS:
            pass  # the estimate of memory was short: this shape is interpolated like those unmeasured
        release_cached(ex.device)
    return shares


def schedule_jobs(kind: ModelKind, ex: Execution, data: Dataset, plan: Plan, probes: dict[str, Probe],
                  seconds: dict[str, float], shares: dict[str, float]) -> tuple[Job, ...]:
    """The plan's populations, in its order, as the schedule sees them: each one's `seconds` (by
    key) alone, its memory, and its net's share of the device (measured, else interpolated by
    its probe's step time)."""
    measured = [(probes[net].step_s, s) for net, s in shares.items()]
    return tuple(Job(seconds[pp.key], pp.size * kind.bytes_per_member(pp.net, data, ex),
                     shares.get(pp.net, interpolate_share(probes[pp.net].step_s, measured)), pp.net, pp.key)
                 for pp in plan.populations)


def warm_up(kind: ModelKind, ex: Execution, data: Dataset, shapes: list[PopulationPlan]) -> float:
    """The Triton kernels of `shapes` compiled (on a CUDA device) and one meta-loop of one step of
    the first, untimed by any probe; returns their seconds. A process's first loop pays costs no
    population owns (torch's lazy imports and thread pools, the first optimizer's import of
    torch._dynamo, the fused CPU step's library, Triton's compilation, which a run does up front
    for all its populations): a run pays them once, as start-up, and a probe that paid them would
    charge them to every population of its shape."""
    t = time.perf_counter()
    precompile_kernels(kind, [PopulationProgress(pp, {}, False, 0) for pp in shapes], ex, data)
    n = min(kind.design.n_train, kind.design.hparams.batch_size)
    sub = first_images(data, n)
    meta_loop(kind.new_trainer(shapes[0], sub, ex))
    synchronize(ex.device)
    return time.perf_counter() - t


def largest_populations(plan: Plan) -> list[PopulationPlan]:
    """Each net's largest population (the shape its probe times), in plan order."""
    largest: dict[str, PopulationPlan] = {}
    for pp in plan.populations:
        if pp.net not in largest or pp.size > largest[pp.net].size:
            largest[pp.net] = pp
    return list(largest.values())


def spread_order(n: int) -> list[int]:
    """0..n-1 as the first, the last, then the middles of the gaps between those taken, halving
    them: stopped anywhere, the indices taken are spread over the whole range."""
    order = [0, n - 1][:n]
    gaps = [(0, n - 1)]
    while gaps:
        lo, hi = gaps.pop(0)
        if hi - lo >= 2:
            mid = (lo + hi) // 2
            order.append(mid)
            gaps += [(lo, mid), (mid, hi)]
    return order


def calibrate(kind: ModelKind, ex: Execution, data: Dataset, plan: Plan, checkpoint_every: float = 60.0,
              budget_s: float = CALIBRATION_BUDGET_S) -> dict[str, Any]:
    """What a new study stores of its costs (calibration.calibration_record): light probes of its
    shapes, the cheapest first, then the dearest, then those between them (spread_order), while
    the time spent stays under `budget_s` and CALIBRATION_SHARE of the study's estimated time;
    one at least. The shapes left out cost what calibration.probe_costs interpolates."""
    t0 = time.perf_counter()
    shapes = sorted(largest_populations(plan), key=kind.loop_cost)
    n_val, n_test = int(data.val_y.numel()), int(data.test_y.numel())
    warm_up(kind, ex, data, shapes)
    probes: dict[str, Probe] = {}
    for i in spread_order(len(shapes)):
        if probes:
            study_s = probe_costs(kind, plan, probes, n_val, n_test, checkpoint_every).total
            if time.perf_counter() - t0 >= min(budget_s, CALIBRATION_SHARE * study_s):
                break
        probes[shapes[i].net] = probe(kind, ex, data, shapes[i], LIGHT_PROBE_SECONDS, light=True)
    return calibration_record(probes, describe_device(ex.device), n_val, n_test, checkpoint_every,
                              time.perf_counter() - t0)


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


def estimate(kind: ModelKind, ex: Execution, data: Dataset, plan: Plan, startup_s: float,
             checkpoint_every: float = 60.0, slots: int = 1,
             on_probe: Callable[[str, int, int], None] | None = None) -> Estimate:
    """Probe every distinct population shape of `plan` (a net's largest population) and add up
    the study (calibration.probe_costs: the costs a run's progress bar and `psa status` use);
    with `slots` > 1 populations in flight, also measure their shares of the device and
    simulate the run (schedule_jobs; Estimate.total). `on_probe(net, i, n)` is called before
    the i-th of the n probes (0-based) and once more with i = n."""
    t0 = time.perf_counter()
    # what the backend would find free at a run's start, before any probe's engine holds memory
    budget = memory_budget(ex.device)
    shapes = largest_populations(plan)
    warm_s = warm_up(kind, ex, data, shapes) if shapes else 0.0
    probes: dict[str, Probe] = {}
    for i, pp in enumerate(shapes):
        if on_probe is not None:
            on_probe(pp.net, i, len(shapes))
        probes[pp.net] = probe(kind, ex, data, pp)
    if on_probe is not None:
        on_probe("", len(shapes), len(shapes))
    costs = probe_costs(kind, plan, probes, int(data.val_y.numel()), int(data.test_y.numel()), checkpoint_every)
    spread = max(p.spread for p in probes.values()) if probes else 0.0
    shares = measure_shares(kind, ex, data, shapes, probes, slots, budget,
                            min(SHARE_BUDGET_S, SHARE_OF_STUDY * costs.total))
    # one slot too: the part left of a study partly done is counted by population
    jobs = schedule_jobs(kind, ex, data, plan, probes, costs.seconds, shares)
    return Estimate(describe_device(ex.device), startup_s + warm_s, costs.per_net(plan), tuple(probes.values()),
                    max(MODEL_ERROR, spread), time.perf_counter() - t0, slots, shares, jobs, budget)
