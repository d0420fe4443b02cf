"""Plans: a design's trials partitioned into populations, ordered largest work first."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from psa.core.member import Member
from psa.study.design import DesignError, StudyDesign


@dataclass(frozen=True)
class PopulationPlan:
    """One population: consecutive trials of one net (an architecture, or a factory of a model
    of your own), in every mode of the design (and every variant's conditions beside them)."""

    net: str
    first: int  # first trial index (1-based)
    last: int  # last trial index, inclusive
    modes: tuple[str, ...]
    variants: tuple[tuple[str, str, Any], ...] = ()  # (mode, variant name, Variant) beyond the plain modes

    @property
    def key(self) -> str:
        """A stable name, used for the checkpoint file: e.g. 1x2048-t01-10."""
        slug = re.sub(r"[^0-9A-Za-z]+", "_", self.net.replace("*", "x")).strip("_") or "none"
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
        return f"{self.net} {t}"


@dataclass(frozen=True)
class Plan:
    """A design's populations, largest estimated work first."""

    design: StudyDesign
    population_size: int  # most members per population
    populations: tuple[PopulationPlan, ...]

    @property
    def largest(self) -> int:
        """The most members any population holds: population_size, or a trial's conditions where
        they are more (a trial's conditions always train together)."""
        return max((p.size for p in self.populations), default=0)

    def size_text(self) -> str:
        """'at most N members', saying why where a trial's conditions exceed population_size."""
        n = self.largest
        if n <= self.population_size:
            return f"at most {self.population_size} members"
        return (f"at most {n} members, as a trial's {len(self.design.conditions())} conditions train together "
                f"and the population size is {self.population_size}")

    def to_dict(self) -> dict[str, Any]:
        """What the studies row records about the plan. The population size is stored under its
        old name, "chunk", so that a plan's JSON (and with it the studies row) stays the same."""
        return {"chunk": self.population_size, "populations": [[p.net, p.first, p.last] for p in self.populations]}


def make_plan(design: StudyDesign, population_size: int, cost: Callable[[PopulationPlan], float] | None = None
              ) -> Plan:
    """Partition each net's trials into populations of at most `population_size` members
    (whole trials: every mode of a trial shares a population, so it shares one data order and
    one first-layer matmul; one trial each where its conditions alone are more), as evenly as
    possible; order them by `cost` (a loop's estimated work: the model kind's,
    psa.study.kinds), largest first (default: by members).

    A pure function of (design, population_size): a resume rebuilds exactly the same populations.
    """
    if population_size < 1:
        raise DesignError(f"a population needs at least 1 member, got {population_size}")
    per = max(1, population_size // len(design.conditions()))
    beside = tuple(c for c in design.conditions() if c[1])
    pops = []
    for net in design.nets:
        n = -(-design.trials // per)
        base, extra = divmod(design.trials, n)
        first = 1
        for i in range(n):
            size = base + (1 if i < extra else 0)
            pops.append(PopulationPlan(net, first, first + size - 1, design.modes, beside))
            first += size
    work = {p: (cost(p) if cost is not None else float(p.size)) for p in pops}
    order = sorted(range(len(pops)), key=lambda i: (-work[pops[i]], i))
    return Plan(design, population_size, tuple(pops[i] for i in order))
