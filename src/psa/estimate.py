"""psa.fit(..., dry_run=True): how long the run would take here, from a few short meta-loops of
its own population, timed as `psa study --dry-run` times a study's (psa.study.estimate).

The population is the run's, built by the factory and on the run's path (vmap or one at a
time) and device. Its trainer runs whole meta-loops on the first s1 and s2 training batches
(their difference is the cost of a step without a loop's fixed cost) and s1 batches scoring
more validation images (the cost of scoring an image), up to PROBE_REPEATS times each, at
least twice (a slow loop is repeated less: a dry run of a few long loops stays shorter than
the run). The fastest repeat counts: the first psa.fit of a process warms up for more than
one loop. Then

    run = set-up + first-loop warm-up + meta_loops x (steps x step + validation + the loop's rest)
          + the test set

The estimate assumes the machine stays as busy as it is now. Like psa.library, this module
stands above psa's layers.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass

import torch

from psa.core.data import Dataset
from psa.core.device import describe_device, synchronize
from psa.core.hparams import HParams
from psa.core.module.engine import ModuleEngine
from psa.core.module.population import ModulePopulation
from psa.progress import duration

# timed training per probe length, over its repeats: enough that a busy machine's hiccups
# average out, few enough that a dry run stays seconds (the study's dry run uses the same)
PROBE_SECONDS = 0.6
PROBE_REPEATS = 3
# validation images scored by the scoring probe: past a few blocks the cost per image is flat
SCORE_IMAGES = 1024
# The estimate's uncertainty never drops below this: the study's estimate, made the same way,
# was within 20% on bench/estimate.py's nets (psa.study.estimate.MODEL_ERROR); on a busy 2-core
# CPU single models were off by more (docs/module.md, "Dry run"), as much as the machine's own noise.
MODEL_ERROR = 0.20


@dataclass(frozen=True)
class FitEstimate:
    """What psa.fit(..., dry_run=True) returns: the run's seconds on this device, `seconds` x
    (1 +- `uncertainty`), and what they were made of."""

    model: str
    device: str  # where it was timed, for people
    conditions: tuple[str, ...]
    trials: int
    meta_loops: int
    members: int  # conditions x trials: the models trained
    batched: bool  # the path the run takes: the members together (vmap) or one at a time
    batching: str  # why that path
    seconds: float  # the whole run
    uncertainty: float  # relative
    setup_seconds: float  # building the population (the factory, once per trial) and choosing the path
    loop_seconds: float  # one meta-loop of every member, in the steady state
    step_seconds: float  # one training step of every member
    steps_per_loop: int
    probe_seconds: float  # how long this dry run took

    @property
    def low(self) -> float:
        """The estimate's lower end, seconds."""
        return self.seconds * max(0.0, 1 - self.uncertainty)

    @property
    def high(self) -> float:
        """The estimate's upper end, seconds."""
        return self.seconds * (1 + self.uncertainty)

    def __str__(self) -> str:
        def n(count: int, what: str) -> str:
            return f"{count} {what}{'s' if count != 1 else ''}"

        path = "the members together (vmap)" if self.batched else "one member at a time"
        return (f"about {duration(self.seconds)} ± {self.uncertainty * 100:.0f}% for {self.model}: "
                f"{n(len(self.conditions), 'condition')} x {n(self.trials, 'trial')} x {n(self.meta_loops, 'meta-loop')} "
                f"({n(self.members, 'member')}, {n(self.steps_per_loop, 'step')} and {duration(self.loop_seconds)} a "
                f"loop), {path} on {self.device}")

    def __repr__(self) -> str:
        return (f"FitEstimate(seconds={self.seconds:.1f}, uncertainty={self.uncertainty:.2f}, model={self.model!r}, "
                f"members={self.members}, meta_loops={self.meta_loops}, batched={self.batched}, "
                f"device={self.device!r})")


def _timed(fn: object, device: torch.device) -> float:
    synchronize(device)
    t = time.perf_counter()
    fn()  # type: ignore[operator]
    synchronize(device)
    return time.perf_counter() - t


def estimate_fit(pop: ModulePopulation, data: Dataset, hp: HParams, batched: bool, batching: str,
                 max_members: int | None, setup_s: float, conditions: tuple[str, ...], trials: int,
                 seconds: float = PROBE_SECONDS) -> FitEstimate:
    """Time `pop` (a fresh population of the run, built in `setup_s`) on the first few batches
    of `data` and scale to the run. The population's state is spent: it trains probe loops."""
    t_start = time.perf_counter()
    device = pop.device
    bs = hp.batch_size
    n_train, n_val, n_test = (int(t.shape[0]) for t in (data.train_y, data.val_y, data.test_y))
    full_steps = -(-n_train // bs)
    # every probe loop is the run's second loop: loop 1 ablates nothing and clones no LKG
    at = 1 if hp.meta_loops > 1 else 0

    path = [batched, batching]  # a model vmap fails on only in training falls back for good, as in the run

    def engine(steps: int, n_score: int = 1) -> ModuleEngine:
        n = min(n_train, steps * bs)
        sub = dataclasses.replace(data, train_x=data.train_x[:n], train_y=data.train_y[:n],
                                  val_x=data.val_x[:n_score], val_y=data.val_y[:n_score])
        return ModuleEngine(pop, sub, hp, batched=path[0], batching=path[1], max_members=max_members)

    def loop(eng: ModuleEngine) -> float:
        pop.loop = at
        took = _timed(eng.meta_loop, device)
        path[:] = [eng.batched, eng.batching]
        return took

    first_steps = min(2, full_steps)
    short = engine(first_steps)
    first = loop(short)  # the warm-up: allocations, torch's first calls
    # s2 is as many steps as fill `seconds` over the repeats (the first loop, slower than the
    # rest, errs short); s1 half of them. A slow loop is timed fewer times (twice at least), so
    # that the dry run of a few long loops stays shorter than the run.
    s2 = min(full_steps, max(2 * first_steps, math.ceil(seconds / PROBE_REPEATS / max(first / first_steps, 1e-6))))
    s1 = max(1, s2 // 2)
    repeats = max(2, min(PROBE_REPEATS, round(seconds / max(first, 1e-6))))
    if s1 != first_steps:
        short = engine(s1)
        loop(short)
    long_ = None
    if s2 > s1:
        long_ = engine(s2)
        loop(long_)
    n_score = min(n_val, SCORE_IMAGES)
    scoring = engine(s1, n_score)
    t1, t2, t3 = [], [], []
    for _ in range(repeats):
        t1.append(loop(short))
        if long_ is not None:
            t2.append(loop(long_))
        t3.append(loop(scoring))
    # the fastest of the repeats: the first psa.fit of a process still warms up after its first
    # loop (4.5 s, then 2.0 s, against the run's 2.1 and 1.6 s for a small CNN here), and a busy
    # machine's hiccups only ever add
    m1 = min(t1)
    m2 = min(t2) if t2 else m1
    # the difference is a step's cost without the loop's fixed cost; where there is no
    # difference to take (an epoch of a batch or two), or a busy machine made it meaningless,
    # the loops' mean step
    step_s = (m2 - m1) / (s2 - s1) if t2 and m2 > m1 else m2 / s2
    eval_image_s = max(0.0, min(t3) - m1) / max(1, n_score - 1)
    loop_extra_s = max(0.0, m1 - s1 * step_s)
    warmup_s = max(0.0, first - first_steps * step_s - loop_extra_s)
    loop_s = full_steps * step_s + n_val * eval_image_s + loop_extra_s
    total = setup_s + warmup_s + hp.meta_loops * loop_s + n_test * eval_image_s
    spread = (max(t2 or t1) - min(t2 or t1)) / 2 / m2 if m2 > 0 else 0.0
    return FitEstimate(pop.factory, describe_device(device), conditions, trials, hp.meta_loops, pop.size, path[0],
                       path[1], total, max(MODEL_ERROR, spread), setup_s, loop_s, step_s, full_steps,
                       setup_s + time.perf_counter() - t_start)
