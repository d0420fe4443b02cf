"""Plans: a design's trials partitioned into populations that fit the device, largest work
first; the rough cost model behind the order and the progress bars' ETAs (`psa study
--dry-run`'s estimate times the populations themselves: psa.study.estimate)."""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Any

import torch

from psa.core.arch import Arch, parse_arch
from psa.core.data import N_TRAIN, N_VAL, dataset_shape
from psa.core.device import total_memory
from psa.core.memory import working_bytes
from psa.core.model import DEFAULT_MODEL, flops_per_sample, linear_shapes, param_count
from psa.core.population import Member
from psa.study.design import DesignError, StudyDesign

# ---------------------------------------------------------------------------------------------
# Cost model, population size and the plan


@functools.lru_cache(maxsize=8)
def _dataset_io(dataset: str) -> tuple[int, int]:
    return dataset_shape(dataset)


def design_arch(design: StudyDesign, arch: str) -> Arch:
    """An architecture of `design` with its data set's input size and class count."""
    return parse_arch(arch, *_dataset_io(design.dataset))


def _arch(arch: str | Arch) -> Arch:
    return arch if isinstance(arch, Arch) else parse_arch(arch)  # a string: MNIST's sizes


def arch_flops(arch: str | Arch, meta_loops: int, n_train: int = N_TRAIN, n_val: int = N_VAL,
               model: str = DEFAULT_MODEL) -> float:
    """FLOPs of one trial of `model`: per loop forward+backward (3x forward) over the training
    set and a forward over the validation set, plus the final test forward (10,000 images)."""
    f = flops_per_sample(_arch(arch), model)
    return meta_loops * (3 * f * n_train + f * n_val) + f * 10_000


@dataclass(frozen=True)
class Calibration:
    """Seconds per loop of a population ~ seconds_per_flop * FLOPs + seconds_per_layer_step *
    (Linear layers x training steps): compute plus per-kernel overhead. Only the ratios between
    populations matter here (the order of a plan, the progress bars)."""

    seconds_per_flop: float
    seconds_per_layer_step: float
    device: str
    method: str

    def loop_seconds(self, arch: str | Arch, members: int, batch_size: int = 256, n_train: int = N_TRAIN,
                     model: str = DEFAULT_MODEL) -> float:
        """Estimated wall seconds of one meta-loop of a population of `members` of `model` for `arch`."""
        a = _arch(arch)
        steps = -(-n_train // batch_size)
        flops = members * flops_per_sample(a, model) * (3 * n_train + N_VAL)
        return self.seconds_per_flop * flops + self.seconds_per_layer_step * len(linear_shapes(a, model)) * steps


# Uncalibrated weights for progress bars and ETAs: roughly a mid-range GPU (they only need
# the right ratios between populations).
DEFAULT_CALIBRATION = Calibration(1.0 / 5e12, 60e-6, "default", "fixed guess")


def bytes_per_member(arch: str | Arch, batch_size: int = 256, fused: bool = False, precision: str = "fp32",
                     graphs: bool = False, model: str = DEFAULT_MODEL) -> int:
    """Device memory one member needs: what it trains with (memory.working_bytes: candidate,
    gradient, AdamW's moments, a step's activations, and with `fused` and `graphs` the Triton
    backward's partials and the graph's pool) plus its LKG and as much again as slack."""
    a = _arch(arch)
    return working_bytes(a, batch_size, fused, precision, graphs, model) + param_count(a, model) * 4 * 2


def device_budget(device: torch.device) -> int:
    """Bytes a study may plan to use on `device`: a fixed fraction of the device's total memory
    (not its free memory, so that the same device always yields the same plan)."""
    total = total_memory(device)
    if device.type == "cuda":
        return int(total * 0.6)
    return int(min(total * 0.25, 16 << 30))


def auto_population_size(design: StudyDesign, budget: int) -> int:
    """Members per population that fit `budget` for the design's largest architecture, capped at
    a whole architecture (all modes x all trials): the default population size. (A design of
    your own model: psa.study.modules.auto_population_size, which builds it.)"""
    worst = max(bytes_per_member(design_arch(design, a), design.hparams.batch_size, model=design.model)
                for a in design.architectures)
    fit = max(1, budget // worst)
    cap = len(design.conditions()) * design.trials
    return int(min(cap, fit))


@dataclass(frozen=True)
class PopulationPlan:
    """One population: consecutive trials of one architecture, in every mode of the design
    (and every variant's conditions beside them)."""

    arch: str
    first: int  # first trial index (1-based)
    last: int  # last trial index, inclusive
    modes: tuple[str, ...]
    variants: tuple[tuple[str, str, Any], ...] = ()  # (mode, variant name, Variant) beyond the plain modes

    @property
    def key(self) -> str:
        """A stable name, used for the checkpoint file: e.g. 1x2048-t01-10."""
        slug = re.sub(r"[^0-9A-Za-z]+", "_", self.arch.replace("*", "x")).strip("_") or "none"
        return f"{slug}-t{self.first:02d}-{self.last:02d}"

    @property
    def trials(self) -> range:
        """The trial indices of this population."""
        return range(self.first, self.last + 1)

    @property
    def size(self) -> int:
        """Number of members."""
        return len(self.trials) * (len(self.modes) + len(self.variants))

    def conditions(self) -> list[tuple[str, str, Any]]:
        """(mode, variant name, Variant) of each member of one trial index, in member order."""
        from psa.core.variant import DEFAULT

        return [(m, "", DEFAULT) for m in self.modes] + list(self.variants)

    def members(self, design: StudyDesign) -> list[Member]:
        """The members, in the order Population.create keeps them (by seed, then condition)."""
        return [design.member(m, k, v) for k in self.trials for m, _, v in self.conditions()]

    def label(self) -> str:
        """For people: "1*2048 trials 1-10"."""
        t = f"trial {self.first}" if self.first == self.last else f"trials {self.first}-{self.last}"
        return f"{self.arch} {t}"


@dataclass(frozen=True)
class Plan:
    """A design's populations, largest estimated work first."""

    design: StudyDesign
    population_size: int  # most members per population
    populations: tuple[PopulationPlan, ...]

    def to_dict(self) -> dict[str, Any]:
        """What the studies row records about the plan. The population size is stored under its
        old name, "chunk", so that a plan's JSON (and with it the studies row) stays the same."""
        return {"chunk": self.population_size, "populations": [[p.arch, p.first, p.last] for p in self.populations]}


def make_plan(design: StudyDesign, population_size: int, calibration: Calibration = DEFAULT_CALIBRATION) -> Plan:
    """Partition each architecture's trials into populations of at most `population_size`
    members (whole trials: every mode of a trial shares a population, so it shares one data
    order and one first-layer matmul), as evenly as possible; order them largest work first.

    A pure function of (design, population_size): a resume rebuilds exactly the same populations.
    """
    if population_size < 1:
        raise DesignError(f"a population needs at least 1 member, got {population_size}")
    per = max(1, population_size // len(design.conditions()))
    beside = tuple(c for c in design.conditions() if c[1])
    pops = []
    for arch in design.architectures:
        n = -(-design.trials // per)
        base, extra = divmod(design.trials, n)
        first = 1
        for i in range(n):
            size = base + (1 if i < extra else 0)
            pops.append(PopulationPlan(arch, first, first + size - 1, design.modes, beside))
            first += size
    if design.is_module:  # a factory's cost is not known without building it: by members alone
        work = {p: float(p.size) for p in pops}
    else:
        work = {p: calibration.loop_seconds(design_arch(design, p.arch), p.size, design.hparams.batch_size,
                                            design.n_train, design.model)
                for p in pops}
    order = sorted(range(len(pops)), key=lambda i: (-work[pops[i]], i))
    return Plan(design, population_size, tuple(pops[i] for i in order))
