"""Populations in flight: the local backend's rule for admitting them, and the study's wall time
when several share one device (what `psa study --dry-run` estimates on a GPU).

A population alone on a GPU rarely fills it: a small net's loop is a chain of tiny kernels,
each using a few of the card's multiprocessors, so eight of them on eight streams can take
little longer than one. Each population's `share` says how much of the device it occupies
alone, measured (psa.study.estimate.concurrent_share) as the wall time of k copies in flight
over k x the time of one: 1/k for a net that k copies overlap perfectly, 1 for one that fills
the device. The wall time of a study is then simulated as the backend runs it: populations
admitted in plan order while a slot is free and their memory fits, and the device shared in
proportion: while the shares of those in flight add up to s > 1, each progresses at 1/s of
its own speed alone (and at its own speed while s <= 1).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from dataclasses import dataclass


def admits(in_flight_bytes: int, bytes_needed: int, budget: float | None, any_in_flight: bool) -> bool:
    """Whether a population needing `bytes_needed` may start beside those in flight: always when
    none is in flight, else while the total fits `budget` (None: memory unknown, no limit)."""
    return not any_in_flight or budget is None or in_flight_bytes + bytes_needed <= budget


@dataclass(frozen=True)
class Job:
    """One population as the schedule sees it."""

    seconds: float  # its wall time alone on the device
    bytes: int = 0  # device memory it holds while in flight
    share: float = 1.0  # the part of the device it occupies alone, in (0, 1]
    net: str = ""  # what it trains, for people
    key: str = ""  # its population's PopulationPlan.key, for a study's part left


def in_flight_seconds(jobs: Sequence[Job], slots: int, budget: float | None = None) -> float:
    """The wall time of `jobs` run in order by the local backend's rule: up to `slots` in
    flight, each admitted while its memory fits `budget` (see `admits`), the device shared in
    proportion to the shares in flight. One slot: the sum of the jobs' seconds."""
    queue = list(jobs)
    active: list[list[float]] = []  # [seconds left alone, share, bytes]
    t = 0.0
    while queue or active:
        while queue and len(active) < max(1, slots) and admits(
                int(sum(a[2] for a in active)), queue[0].bytes, budget, bool(active)):
            j = queue.pop(0)
            active.append([max(0.0, j.seconds), min(1.0, max(j.share, 1e-6)), float(j.bytes)])
        rate = 1.0 / max(1.0, sum(a[1] for a in active))
        dt = min(a[0] for a in active) / rate
        t += dt
        for a in active:
            a[0] -= dt * rate
        # the one that set dt has finished; others within rounding of it too
        active = [a for a in active if a[0] > 1e-9 * max(1.0, t)]
    return t


def interpolate_share(step_s: float, measured: Sequence[tuple[float, float]]) -> float:
    """The share of a population whose training step takes `step_s` alone, from those measured
    ((step seconds, share) pairs): linear in log(step seconds) between the two nearest, the
    nearest's beyond them. A net's step time is what says how much of the device it fills;
    nothing measured: 1 (the device is not shared)."""
    if not measured:
        return 1.0
    pts = sorted((math.log(max(s, 1e-12)), share) for s, share in measured)
    xs = [p[0] for p in pts]
    x = math.log(max(step_s, 1e-12))
    i = bisect.bisect_left(xs, x)
    if i == 0:
        return pts[0][1]
    if i == len(pts):
        return pts[-1][1]
    (x0, y0), (x1, y1) = pts[i - 1], pts[i]
    return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
