"""The local backend: a study's unfinished populations on this process's device, several in
flight at once on a GPU, each yielding its events (psa.study.events) to the driver."""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from psa.core.device import (STREAM_POOL, Execution, describe_device, free_memory, new_streams, release_cached,
                              side_stream)
from psa.core.mlp.memory import FREE_MEMORY_FRACTION
from psa.study.events import Event, PopulationFailed
from psa.study.kinds import ModelKind
from psa.study.runner import PopulationProgress, PopulationRun, design_data
from psa.study.schedule import admits

# How long the backend sleeps between looks at the loops in flight when none has finished: far
# below a small net's loop (tens of ms on a card), and a look costs microseconds.
POLL_SECONDS = 2e-4


def slots_for(device: torch.device, concurrency: int | None) -> int:
    """Populations in flight at once: `concurrency`, else 8 on a GPU (so that small populations
    fill it together) and 1 elsewhere (one after another). On a GPU at most the streams there
    are besides the side stream (STREAM_POOL - 1), one per population: the dry run simulates
    the run with as many as the run will have."""
    slots = concurrency or (8 if device.type == "cuda" else 1)
    return min(slots, STREAM_POOL - 1) if device.type == "cuda" else slots


def memory_budget(device: torch.device) -> float | None:
    """The device memory the populations in flight may hold together, as found now (None:
    unknown): the backend's admission limit, and the dry run's when it simulates it."""
    free = free_memory(device)
    return None if free is None else free * FREE_MEMORY_FRACTION


def first_ready(pending: Sequence[Any], wait: Callable[[], None] = lambda: time.sleep(POLL_SECONDS)) -> int:
    """The index of the first loop in `pending` that has finished (None counts as finished),
    looking again after each `wait` until one has. Waiting on the oldest instead would hold a
    small population's quick loops behind a big one's: on a card, eight populations in flight
    would advance at the pace of the slowest.

    One loop alone is taken at once: its result() waits for the device, with nothing to poll
    for (a study's tail is often one big population, whose loop takes seconds). A loop whose
    ready() raises (a CUDA error the device reported) counts as finished: its result() raises
    it again where the backend records that population's failure, rather than out of the
    study. No loop at all is a caller's error, not a wait forever."""
    if not pending:
        raise ValueError("first_ready needs at least one loop in flight")
    if len(pending) == 1:
        return 0
    while True:
        for i, p in enumerate(pending):
            try:
                if p is None or p.ready():
                    return i
            except Exception:  # noqa: BLE001 - re-raised by its result(), inside the backend's handling
                return i
        wait()

def _failed(st: PopulationProgress, e: BaseException) -> PopulationFailed:
    return PopulationFailed(st.plan.key, f"{type(e).__name__}: {e}".splitlines()[0])


def _drain(device: torch.device, stream: Any = None) -> None:
    """Wait for the work a failed population left queued (on `stream`, else on the whole
    device): it may still write into memory that is about to be freed and handed to the next
    population."""
    if stream is None and device.type != "cuda":
        return
    # a broken CUDA context fails this too; the next population will report it
    with contextlib.suppress(RuntimeError):
        if stream is not None:
            stream.synchronize()
        else:
            torch.cuda.synchronize(device)


class StreamSlots:
    """The CUDA streams of the populations in flight: made once, one per slot, each lent to one
    population at a time. Engines that made their own would share PyTorch's pooled streams
    (populations p and p+16 on one stream, serialising each other). Off CUDA every slot is None."""

    def __init__(self, device: torch.device, slots: int) -> None:
        if device.type == "cuda":
            self.free: list[Any] = new_streams(device, slots, avoid=(side_stream(device),))
        else:
            self.free = [None] * slots
        self.slots = len(self.free)

    def take(self) -> Any:
        """A stream no population in flight has."""
        return self.free.pop(0)

    def give(self, stream: Any) -> None:
        """Return a population's stream; the population must have no work left queued on it."""
        self.free.append(stream)


def precompile_kernels(kind: ModelKind, todo: list[PopulationProgress], ex: Execution, data: Any) -> int:
    """Compile the Triton kernels that the populations in `todo` will launch on a CUDA device,
    up front and in parallel (triton_stack.precompile), rather than one population's at its
    first loop while the GPU waits. Returns the number of kernel variants (0 off CUDA or without
    Triton); a failure here only warns: the kernels then compile at their first launch."""
    from psa.core.kernels import triton_stack

    if ex.device.type != "cuda" or not ex.triton:
        return 0
    try:
        launches = kind.precompile([st.plan for st in todo], ex, data)
        return triton_stack.precompile(launches, ex.device) if launches else 0
    except Exception as e:  # noqa: BLE001 - an optimisation; the study runs without it
        warnings.warn(f"psa: precompiling the Triton kernels failed ({type(e).__name__}: {e}); they compile at "
                      f"their first launch", RuntimeWarning, stacklevel=2)
        return 0


def local_events(kind: ModelKind, todo: list[PopulationProgress], ex: Execution, data_dir: str | None = None,
                 concurrency: int | None = None) -> Iterator[Event]:
    """The populations `todo` (largest work first) on this process's device, up to
    `concurrency` in flight at once (slots_for: 8 on a GPU, 1 elsewhere), each engine on its
    slot's CUDA stream.

    Every running population has one meta-loop queued on the device; this takes the first
    that has finished (first_ready), hands its events on (the consumer records
    them and checkpoints), and queues that population's next loop while the others keep the
    device busy. A population is admitted while the estimated memory of those in flight fits
    the device's free memory (at least one always runs). Each engine computes exactly what it
    would alone, so the rows are those of a one-at-a-time run. A population that raises yields
    PopulationFailed and the others go on.
    """
    device = ex.device
    data = design_data(kind, data_dir, device)
    precompile_kernels(kind, todo, ex, data)
    streams = StreamSlots(device, slots_for(device, concurrency))
    where = describe_device(device)
    queue = list(todo)
    active: list[tuple[PopulationProgress, PopulationRun, Any]] = []
    budget = memory_budget(device)
    per_member: dict[str, int] = {}

    def need(st: PopulationProgress) -> int:
        net = st.plan.net
        if net not in per_member:
            per_member[net] = kind.bytes_per_member(net, data, ex)
        return st.plan.size * per_member[net]

    def retire(failed: PopulationFailed, stream: Any) -> Iterator[Event]:
        # called out of the except block (only the message kept, so no traceback holds the
        # failed engine), after its stream drained and its run was dropped: the stream goes
        # back to the slots and the memory to the device
        streams.give(stream)
        release_cached(device)
        yield failed

    while queue or active:
        while queue and streams.free and admits(sum(need(s) for s, _, _ in active), need(queue[0]), budget,
                                                bool(active)):
            st = queue.pop(0)
            stream = streams.take()
            run = failed = None
            try:
                run = PopulationRun.of_plan(kind, st.plan, data, st.start, ex, st.prior_seconds, where, stream)
                yield run.started()
                if run.to_go <= 0:
                    yield run.finish()
                    run = None
                    streams.give(stream)
                    continue
                run.launch()
            except Exception as e:  # noqa: BLE001 - one population's failure must not stop the study
                failed = _failed(st, e)
            if failed is not None:
                _drain(device, stream)  # its queued writes land before its memory is freed
                run = None
                yield from retire(failed, stream)
                continue
            active.append((st, run, stream))
        if not active:
            continue
        i = first_ready([r.pending for _, r, _ in active])
        st, run, stream = active.pop(i)
        failed = None
        try:
            events = run.collect()
        except Exception as e:  # noqa: BLE001
            failed = _failed(st, e)
        if failed is None:
            yield from events  # the consumer checkpoints before we queue the next loop
            if run.to_go <= 0:
                run = None  # done: its memory goes before the next population is admitted
                streams.give(stream)
                continue
            try:
                run.launch()
            except Exception as e:  # noqa: BLE001
                failed = _failed(st, e)
        if failed is not None:
            _drain(device, stream)
            run = None
            yield from retire(failed, stream)
            continue
        active.append((st, run, stream))
