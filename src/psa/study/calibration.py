"""A study's cost in seconds, population by population: the one estimate of where its time goes
that the dry run, the progress bar and `psa status` share.

A population's cost is `population_seconds` of its shape's probe (psa.study.estimate.probe: the
population's own trainer, timed on this device). The dry run probes every shape; a new study
probes its shapes once, lightly and within a budget (estimate.calibrate), and stores the probes
in its studies row under the plan's "calibration" key, which every later run and `psa status`
read back. A shape left unprobed (the budget ran out) costs its kind's analytic cost terms
(kinds.ModelKind.cost_terms: for psa's nets, FLOPs and layer-steps) at the prices that fit the
probed shapes: a CPU prices a deep narrow net's layer-steps and a wide net's FLOPs quite
otherwise than the analytic model's GPU guess, and two probes, one of each, say how. A study
without probes (created before them, or on Ray) falls back to the analytic cost alone, in
relative units.

Nothing here measures anything; psa.study.estimate does.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass
from typing import Any

import torch

from psa.study.design import StudyDesign
from psa.study.kinds import ModelKind
from psa.study.plan import Plan, PopulationPlan

# The stored record's format; a record of another version is ignored (analytic costs).
RECORD_VERSION = 1


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
    checkpoint_s: float  # one checkpoint's share of the scheduler: the state's host copy (before: the write too)
    seconds: float  # wall time of this probe
    # the write of that copy (safetensors + JSON, to a temp dir), on the driver's checkpoint
    # writer; 0 in records from before the writer, whose checkpoint_s includes it
    write_s: float = 0.0


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
    # the driver checkpoints after the first loop and then every `checkpoint_every` seconds;
    # a write in the background costs the scheduler only where it outlasts the loop after it
    # (the next checkpoint of the population waits for it)
    n_ckpt = loops if checkpoint_every <= 0 else min(loops, 1 + int(train_s // checkpoint_every))
    ckpt_s = p.checkpoint_s * scale + max(0.0, p.write_s * scale - loop_s)
    return (p.setup_s + p.warmup_s) * scale + train_s + n_test * p.eval_image_s * scale + n_ckpt * ckpt_s


@dataclass(frozen=True)
class StudyCosts:
    """What each population of a plan costs, and one trial's meta-loop of each net: the
    progress bar and `psa status` count work in these units (seconds on the calibrated device
    where `measured`, else the analytic model's relative units)."""

    meta_loops: int
    seconds: dict[str, float]  # PopulationPlan.key -> the whole population
    trial_loop: dict[str, float]  # net -> one trial's meta-loop: its populations' cost / their trial-loops
    measured: bool

    @property
    def total(self) -> float:
        """The whole study, populations one after another."""
        return sum(self.seconds.values())

    def loop(self, pp: PopulationPlan) -> float:
        """One meta-loop of population `pp` (its net's trial-loop cost x its members, so that the
        bar, which counts populations, and `psa status`, which counts trials, agree)."""
        return self.trial_loop[pp.net] * pp.size

    def per_net(self, plan: Plan) -> dict[str, float]:
        """Each net's populations added up, in design order."""
        out = {net: 0.0 for net in plan.design.nets}
        for pp in plan.populations:
            out[pp.net] += self.seconds[pp.key]
        return out


def plan_costs(plan: Plan, seconds: dict[PopulationPlan, float], measured: bool) -> StudyCosts:
    """StudyCosts from every population's cost."""
    loops = plan.design.hparams.meta_loops
    cost: dict[str, float] = {}
    trial_loops: dict[str, int] = {}
    for pp, s in seconds.items():
        cost[pp.net] = cost.get(pp.net, 0.0) + s
        trial_loops[pp.net] = trial_loops.get(pp.net, 0) + pp.size * loops
    return StudyCosts(loops, {pp.key: s for pp, s in seconds.items()},
                      {net: cost[net] / trial_loops[net] for net in cost}, measured)


def analytic_costs(kind: ModelKind, plan: Plan) -> StudyCosts:
    """The kind's loop cost alone (relative units): a study without probes."""
    loops = plan.design.hparams.meta_loops
    return plan_costs(plan, {pp: kind.loop_cost(pp) * loops for pp in plan.populations}, measured=False)


def fit_terms(terms: list[tuple[float, ...]], seconds: list[float]) -> tuple[float, ...]:
    """Non-negative prices c, one per term, such that sum_j c_j terms[i][j] is seconds[i] as
    nearly as may be (relative error, least squares). The candidates: one price for every term
    (the analytic cost scaled), and every subset of the terms priced on its own, no larger than
    there are points; negative prices are rejected, and the smallest error wins, fewer prices on
    a tie (one point prices the analytic cost as a whole)."""
    k = len(terms[0])
    rel = torch.tensor([[t / y for t in row] for row, y in zip(terms, seconds)], dtype=torch.float64)
    one = torch.ones(len(seconds), 1, dtype=torch.float64)
    candidates: list[tuple[float, int, tuple[float, ...]]] = []
    total = rel.sum(1, keepdim=True)
    scale = float((total * one).sum() / (total * total).sum())
    candidates.append((float(((total * scale - one) ** 2).sum()), 1, (scale,) * k))
    for size in range(1, min(k, len(seconds)) + 1):
        for cols in itertools.combinations(range(k), size):
            c = torch.linalg.lstsq(rel[:, cols], one).solution.flatten()
            if bool((c < 0).any()) or not bool((c > 0).any()):
                continue
            price = [0.0] * k
            for j, v in zip(cols, c.tolist()):
                price[j] = v
            candidates.append((float(((rel[:, cols] @ c[:, None] - one) ** 2).sum()), size, tuple(price)))
    # a tie within rounding goes to the fewer prices, then to the earlier candidate (the whole scaled)
    return min(candidates, key=lambda x: (round(x[0], 9), x[1]))[2]


def probe_costs(kind: ModelKind, plan: Plan, probes: dict[str, Probe], n_val: int, n_test: int,
                checkpoint_every: float = 60.0) -> StudyCosts:
    """Every population's population_seconds from its net's probe; a net without one costs its
    kind's analytic cost terms (kinds.ModelKind.cost_terms) at the prices that fit the probed
    populations (fit_terms). No probes: analytic_costs."""
    if not probes:
        return analytic_costs(kind, plan)
    design = plan.design
    loops = design.hparams.meta_loops
    seconds = {pp: population_seconds(probes[pp.net], design, pp.size, n_val, n_test, checkpoint_every)
               for pp in plan.populations if pp.net in probes}
    if len(seconds) < len(plan.populations):
        prices = fit_terms([kind.cost_terms(pp) for pp in seconds], [s / loops for s in seconds.values()])
        for pp in plan.populations:
            if pp not in seconds:
                seconds[pp] = loops * sum(c * t for c, t in zip(prices, kind.cost_terms(pp)))
    return plan_costs(plan, {pp: seconds[pp] for pp in plan.populations}, measured=True)


# ---------------------------------------------------------------------------------------------
# The stored record: the studies row's design JSON, under plan.calibration


def calibration_record(probes: dict[str, Probe], device: str, n_val: int, n_test: int, checkpoint_every: float,
                       seconds: float) -> dict[str, Any]:
    """What a study stores of its calibration (JSON): the probes, and what their costs need."""
    return {"version": RECORD_VERSION, "device": device, "n_val": n_val, "n_test": n_test,
            "checkpoint_every": checkpoint_every, "seconds": seconds,
            "probes": [dataclasses.asdict(p) for p in probes.values()]}


def describe_calibration(record: dict[str, Any], shapes: int) -> str:
    """One line for people: what a calibration probed, and what it took."""
    n = len(record.get("probes", []))
    return (f"costs: probed {n} of {shapes} population shape{'s' if shapes != 1 else ''} on {record.get('device')} "
            f"in {float(record.get('seconds', 0.0)):.1f} s (stored with the study; the progress bar's and psa "
            f"status's ETA weigh the work by them)")


def record_probes(record: Any) -> dict[str, Probe] | None:
    """The probes of a stored record, by net; None for a missing or unreadable one."""
    if not isinstance(record, dict) or record.get("version") != RECORD_VERSION:
        return None
    names = [f.name for f in dataclasses.fields(Probe)]
    optional = {f.name for f in dataclasses.fields(Probe) if f.default is not dataclasses.MISSING}
    try:
        return {str(p["net"]): Probe(**{k: p[k] for k in names if k in p or k not in optional})
                for p in record["probes"]}
    except (KeyError, TypeError):
        return None


def stored_costs(kind: ModelKind, plan: Plan, record: Any) -> StudyCosts:
    """The costs of a study from its stored record (plan.calibration), or the analytic ones
    where it has none."""
    probes = record_probes(record)
    if not probes:
        return analytic_costs(kind, plan)
    nets = set(plan.design.nets)
    try:
        n_val, n_test = int(record["n_val"]), int(record["n_test"])
        every = float(record.get("checkpoint_every", 60.0))
    except (KeyError, TypeError, ValueError):
        return analytic_costs(kind, plan)
    return probe_costs(kind, plan, {n: p for n, p in probes.items() if n in nets}, n_val, n_test, every)
