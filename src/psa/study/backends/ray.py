"""`psa study --backend ray`: populations as Ray tasks; the driver stays the only database writer.

Each population runs as one Ray generator task that asks for a GPU (or a fraction of one, with
--per-device N) where the cluster has GPUs, else --cpus-per-task CPUs. The task loads MNIST
itself (from the installed package) and streams one event per meta-loop back to the driver:
that loop's rows and, when a checkpoint is due (--checkpoint-every), a CPU copy of the
population, which the driver commits to SQLite and checkpoints beside the database as the
local backend does. Shipping the copy every loop would move hundreds of MB per loop for a big
population only for the driver to drop most of them.

A task whose worker or node is lost is resubmitted by the driver from the population's latest
checkpoint, up to --max-retries times (Ray's own task retry would replay a generator from its
first meta-loop; resubmitting from the checkpoint recomputes at most --checkpoint-every
seconds of loops, whose rows are already recorded and are not written again, and never mixes
two attempts' trajectories). Exceptions raised by the training itself are not retried: the
population is marked failed and a rerun of the same command retries it.

Ray is optional (`pip install -e ".[ray]"`) and imported only here, only when asked for.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import time
from collections.abc import Iterator
from typing import Any

from psa.core.device import resolve_execution
from psa.study.events import Event, LoopDone, PopulationFailed, Started
from psa.study.kinds import ModelKind
from psa.study.options import RunOptions, StudyError
from psa.study.plan import PopulationPlan
from psa.study.runner import PopulationProgress, cached_data, design_data_view, population_events


def import_ray() -> Any:
    """The ray module, or a one-line StudyError saying how to install it."""
    try:
        import ray
    except ImportError:
        raise StudyError('--backend ray needs Ray: pip install -e ".[ray]" (or pip install "ray[default]")') from None
    return ray


def worker_data_paths(dataset: str, data_dir: str | None) -> tuple[str, str | None]:
    """The data set spec and data directory as a Ray worker must read them: relative paths
    made absolute here, on the driver, since a worker's working directory is not the driver's
    (Ray starts workers in its own session directories)."""
    if dataset.startswith("npz:"):
        dataset = "npz:" + os.path.abspath(os.path.expanduser(dataset[len("npz:"):]))
    return dataset, (os.path.abspath(os.path.expanduser(data_dir)) if data_dir else None)


def _population_task(kind: ModelKind, pp: PopulationPlan, start: Any, prior_seconds: float,
                     data: tuple[str, str | None], threads: int, execution: dict[str, Any], checkpoint_every: float
                     ) -> Iterator[Event]:
    """Runs on a Ray worker: train one population, yielding its events; a loop's event carries
    the population's checkpoint (CPU tensors) only when one is due (every `checkpoint_every`
    seconds, and after the first loop), as the local backend checkpoints. `execution` holds the
    study's precision and the run's kernels and graphs choices, resolved here for the worker's
    device."""
    import ray
    import torch

    torch.set_num_threads(max(1, threads))
    device = torch.device("cuda") if ray.get_gpu_ids() and torch.cuda.is_available() else torch.device("cpu")
    ex = resolve_execution(device, **execution)
    dataset, data_dir = data  # absolute paths (worker_data_paths)
    data = design_data_view(kind, cached_data(dataset, data_dir, device))
    where = f"{socket.gethostname()}:{device} (pid {os.getpid()})"
    shipped_at = -math.inf
    for ev in population_events(kind, pp, data, start, ex, prior_seconds, where):
        if isinstance(ev, LoopDone):
            # the state must be taken before the generator queues the next loop, i.e. here
            now = time.monotonic()
            ev.checkpoint = now - shipped_at >= checkpoint_every
            state = ev.checkpoint_state() if ev.checkpoint else None
            ev.state = None if state is None else ({k: v.detach().cpu() for k, v in state[0].items()}, state[1])
            if ev.checkpoint:
                shipped_at = now
        yield ev


_started_here = False  # whether this process started (or connected) Ray, and so shuts it down


def _check_reachable(address: str) -> None:
    """StudyError unless something listens at a "host:port" or "ray://host:port" address: Ray
    itself retries an unreachable one for minutes, printing as it goes."""
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not port.isdigit() or address in ("auto", "local"):
        return  # "auto" and the like: Ray finds the cluster itself
    try:
        socket.create_connection((host.strip("[]") or "127.0.0.1", int(port)), timeout=5).close()
    except OSError as e:
        raise StudyError(f"cannot reach Ray at {address}: {e.strerror or e or 'timed out'}") from None


def start_ray(opt: RunOptions) -> tuple[dict[str, Any], int]:
    """Start a local Ray instance or reach opt.address (once per process), and check that the
    cluster can run a task as asked: (the tasks' Ray options, threads per task). Called before
    a study writes anything, so that a bad address or --cpus-per-task leaves the database as it was."""
    global _started_here
    ray = import_ray()
    if not ray.is_initialized():
        kwargs: dict[str, Any] = {"include_dashboard": False, "logging_level": logging.ERROR,
                                  "log_to_driver": False}
        if opt.address:
            _check_reachable(opt.address)
            kwargs["address"] = opt.address
        elif opt.num_cpus:
            kwargs["num_cpus"] = opt.num_cpus
        try:
            ray.init(**kwargs)
        except Exception as e:  # noqa: BLE001 - connection errors come in many types
            raise StudyError(f"cannot start or reach Ray ({opt.address or 'local instance'}): "
                             f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
        _started_here = True
    resources = ray.cluster_resources()
    if resources.get("GPU", 0) > 0:
        return {"num_gpus": 1.0 / max(1, opt.per_device), "num_cpus": 1}, 1
    cpus = max(1, opt.cpus_per_task)
    if cpus > resources.get("CPU", 0):
        stop_ray()
        raise StudyError(f"--cpus-per-task {cpus} exceeds the cluster's {resources.get('CPU', 0):g} CPUs")
    return {"num_cpus": cpus}, cpus


def stop_ray() -> None:
    """Shut Ray down if start_ray started it here."""
    global _started_here
    if _started_here:
        import ray

        ray.shutdown()
        _started_here = False


def ray_events(kind: ModelKind, todo: list[PopulationProgress], precision: str, opt: RunOptions,
               console: Any) -> Iterator[Event]:
    """Submit every unfinished population (largest work first) and yield their events as they
    come; `console` tells of lost workers and resubmissions. Ray is stopped at the end if this
    process started it (start_ray)."""
    ray = import_ray()
    task_opts, threads = start_ray(opt)
    remote = ray.remote(max_retries=0)(_population_task)
    execution = {"precision": precision, "kernels": opt.kernels, "graphs": opt.graphs}
    data_paths = worker_data_paths(kind.design.dataset, opt.data_dir)
    pending: dict[Any, PopulationProgress] = {}
    latest: dict[str, tuple[Any, float]] = {}

    def submit(st: PopulationProgress) -> None:
        start, prior = latest.get(st.plan.key, (st.start, st.prior_seconds))
        gen = remote.options(**task_opts).remote(kind, st.plan, start, prior, data_paths, threads, execution,
                                                 opt.checkpoint_every)
        pending[gen] = st

    def lost(st: PopulationProgress, err: BaseException) -> Iterator[Any]:
        st.attempts += 1
        msg = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        if st.attempts > opt.max_retries:
            yield PopulationFailed(st.plan.key, f"worker lost {st.attempts} times; last: {msg}")
        else:
            console.print(f"[yellow]worker lost[/] running {st.plan.label()} ({msg}); resubmitting from its "
                          f"checkpoint (attempt {st.attempts + 1})", soft_wrap=True, highlight=False)
            submit(st)

    try:
        for st in todo:
            submit(st)
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            for gen in ready:
                st = pending[gen]
                try:
                    ev = ray.get(next(gen))
                except StopIteration:
                    del pending[gen]
                    continue
                except ray.exceptions.RayTaskError as e:
                    del pending[gen]
                    yield PopulationFailed(st.plan.key, _task_error(e))
                    continue
                except ray.exceptions.RayError as e:
                    del pending[gen]
                    yield from lost(st, e)
                    continue
                state = ev.checkpoint_state() if isinstance(ev, LoopDone) else None
                if state is not None:  # a resubmission continues from here
                    latest[st.plan.key] = (kind.parse_checkpoint(*state), ev.seconds)
                if isinstance(ev, Started) and st.attempts:
                    ev.loop = max(ev.loop, st.loop)
                yield ev
    finally:
        for gen in list(pending):
            try:
                ray.cancel(gen, force=True)
            except Exception:  # noqa: BLE001 - best effort on the way out
                pass
        stop_ray()


def _task_error(e: Any) -> str:
    cause = getattr(e, "cause", None)
    if cause is not None:
        return f"{type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''}"
    return str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
