"""Devices and how the engine computes on them: `auto` resolved once, where a command starts.

`resolve_execution` turns what a user asked for (`--device`, `--precision`, `--kernels`,
`--no-graphs`) into an `Execution` of concrete choices; the engine accepts only those, and
nothing downstream resolves or rewrites them.
"""

from __future__ import annotations

import contextlib
import gc
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from psa.core.errors import ConfigError
from psa.core.precision import CHOICES as PRECISION_CHOICES
from psa.core.precision import resolve as resolve_precision

KERNEL_CHOICES = ("auto", "torch", "triton")
# Widest equal-width hidden stack that kernels="auto" runs through the Triton stack kernels:
# all they take, since they beat cuBLAS's batched GEMMs a layer at a time on every deep square
# timed on a card (docs/gpu.md, bench/results/gpu_study-h200.md).
AUTO_STACK_MAX_WIDTH = 128
# Widest equal-width hidden stack that kernels="auto" trains through the fused CPU step
# (psa.core.kernels.cpu_stack) on a CPU in fp32: where a layer is too narrow for torch's per-op
# cost to pay off (bench/results/narrow_cpu.md).
AUTO_CPU_STACK_MAX_WIDTH = 8


@dataclass(frozen=True)
class Execution:
    """How the engine runs its arithmetic (never what it computes), every choice concrete."""

    device: torch.device  # where the population and the data live
    precision: str = "fp32"  # of the matrix products: fp32 | tf32 | bf16 (psa.core.precision)
    triton: bool = False  # Triton kernels for dropout noise and narrow hidden stacks
    stack_max_width: int = 0  # widest equal-width hidden stack run through the stack kernels
    kernels_fall_back: bool = False  # chosen automatically: a failure warns and turns them off
    cpu_stack_max_width: int = 0  # widest equal-width hidden stack run by psa.core.kernels.cpu_stack (0: none)
    graphs: bool = False  # capture each training step as a CUDA graph (CUDA devices only)
    # consecutive training steps per graph replay (with graphs): 1 replays a graph per step;
    # more cut the host's launches per epoch by as much (psa.core.mlp.chunk.graph_segments).
    # Not yet the study's default: untimed on a card, and working_bytes counts a one-step pool
    graph_steps: int = 1
    max_members: int | None = None  # members trained at once; None: as many as free memory holds
    eval_bytes: int = 256 << 20  # activation memory one block of validation may use

    def __post_init__(self) -> None:
        object.__setattr__(self, "device", canonical_device(self.device))
        if self.precision not in PRECISION_CHOICES or self.precision == "auto":
            raise ConfigError(f"precision must be resolved to fp32, tf32 or bf16, got {self.precision!r}")
        if self.graphs and self.device.type != "cuda":
            raise ConfigError(f"CUDA graphs need a CUDA device, not {self.device}")
        if self.graph_steps < 1:
            raise ConfigError(f"graph_steps must be at least 1, got {self.graph_steps}")
        if self.max_members is not None and self.max_members < 1:
            raise ConfigError(f"max_members must be at least 1, got {self.max_members}")

    @property
    def kernels(self) -> str:
        """The resolved --kernels choice, as runs record it: torch or triton."""
        return "triton" if self.triton else "torch"


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """`auto` picks cuda, then mps, then cpu; an explicit device must exist (else one
    ConfigError line saying why it is not available, never torch's own error)."""
    if isinstance(name, str) and name.strip().lower() == "auto":
        if torch.cuda.is_available():
            return canonical_device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(name.strip() if isinstance(name, str) else name)
    except (RuntimeError, TypeError):
        raise ConfigError(f"unknown device {name!r}: give 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'") from None
    what = f"device {str(dev)!r} is not available"
    if dev.type == "cuda":
        if torch.version.cuda is None and getattr(torch.version, "hip", None) is None:
            raise ConfigError(f"{what}: this torch ({torch.__version__}) was built without CUDA")
        if not torch.cuda.is_available():
            raise ConfigError(f"{what}: torch {torch.__version__} finds no CUDA device (check the driver and "
                              f"CUDA_VISIBLE_DEVICES)")
        n = torch.cuda.device_count()
        if dev.index is not None and dev.index >= n:
            raise ConfigError(f"{what}: this machine has {n} CUDA device{'s' if n != 1 else ''} "
                              f"(cuda:0{f'..cuda:{n - 1}' if n > 1 else ''})")
    if dev.type == "mps" and not _mps_available():
        mps = getattr(torch.backends, "mps", None)
        built = mps is not None and mps.is_built()
        raise ConfigError(f"{what}: " + ("this machine has no MPS device" if built
                                         else f"this torch ({torch.__version__}) was built without MPS"))
    return canonical_device(dev)


def _mps_available() -> bool:
    return getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()


def resolve_execution(device: str | torch.device = "auto", precision: str = "auto", kernels: str = "auto",
                      graphs: bool = True, max_members: int | None = None) -> Execution:
    """The concrete Execution for what a command was asked: `auto` precision is tf32 on a CUDA
    GPU and fp32 elsewhere; `auto` kernels are Triton's on a CUDA GPU where Triton is installed
    (stacks up to AUTO_STACK_MAX_WIDTH); on a CPU in fp32, `auto` runs stacks up to
    AUTO_CPU_STACK_MAX_WIDTH through the fused CPU step (psa.core.kernels.cpu_stack; `torch` never does),
    and `graphs` apply on CUDA devices only."""
    from psa.core.kernels import triton_stack as triton_kernels

    dev = resolve_device(device) if isinstance(device, str) else canonical_device(device)
    if kernels not in KERNEL_CHOICES:
        raise ConfigError(f"unknown kernels {kernels!r}; choose from {', '.join(KERNEL_CHOICES)}")
    if kernels == "triton":
        if not triton_kernels.available():
            raise ConfigError("kernels 'triton' need Triton and a CUDA GPU (or TRITON_INTERPRET=1 to run them in "
                              "Triton's interpreter)")
        triton, widest = True, triton_kernels.MAX_WIDTH
    elif kernels == "auto" and dev.type == "cuda" and triton_kernels.available():
        triton, widest = True, AUTO_STACK_MAX_WIDTH
    else:
        triton, widest = False, 0
    try:
        prec = resolve_precision(precision, dev)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    cpu_widest = AUTO_CPU_STACK_MAX_WIDTH if kernels == "auto" and dev.type == "cpu" and prec == "fp32" else 0
    return Execution(device=dev, precision=prec, triton=triton, stack_max_width=widest,
                     kernels_fall_back=kernels == "auto", cpu_stack_max_width=cpu_widest,
                     graphs=graphs and dev.type == "cuda", max_members=max_members)


def canonical_device(device: torch.device | str) -> torch.device:
    """The device tensors actually land on ("cuda" -> "cuda:0"), so devices compare equal."""
    dev = torch.device(device)
    if dev.type == "cuda":
        # an explicit index needs no CUDA to name (a plan or a test can speak of cuda:0)
        return dev if dev.index is not None else torch.device("cuda", torch.cuda.current_device())
    return torch.empty(0, device=dev).device


def to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU tensor copied to `device` without stalling the host: on a GPU through pinned
    memory and an asynchronous copy (a plain copy from pageable memory waits for the stream)."""
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def synchronize(device: torch.device) -> None:
    """Wait for every queued kernel on `device` (for timings)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_seconds(fn: Callable[[], object], device: torch.device, repeat: int) -> float:
    """Best wall seconds of `repeat` calls of fn, after one warm-up, each waited for on `device`."""
    fn()
    synchronize(device)
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return best


def describe_device(device: torch.device) -> str:
    """`device` for people: "cpu (N threads)" with torch's thread count, "cuda:K (the GPU's name)",
    anything else as torch names it."""
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    if device.type == "cpu":
        return f"cpu ({torch.get_num_threads()} threads)"
    return str(device)


def total_memory(device: torch.device) -> int:
    """Bytes of memory `device` has in all (a study plans from this, not from free memory, so
    that one device always yields one plan)."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    try:
        return int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 8 << 30


def free_memory(device: torch.device) -> int | None:
    """Bytes this process can still use on `device`, or None where that is unknown.

    On CUDA: the driver's free memory and the allocator's cached blocks, except those cached in
    a graph's private pool (other engines' captured steps), which no other allocation can use."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(free + cached - graph_pool_cached(device))
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        try:
            return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None
    return None


def graph_pool_cached(device: torch.device) -> int:
    """Bytes cached but unallocated in CUDA graphs' private pools on `device`."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    return sum(seg["total_size"] - seg["allocated_size"] for seg in torch.cuda.memory_snapshot()
               if seg.get("device", index) == index and tuple(seg.get("segment_pool_id", (0, 0))) != (0, 0))


# what an allocation that does not fit raises (torch.OutOfMemoryError is the same class)
OOM_ERRORS: tuple[type[BaseException], ...] = (torch.cuda.OutOfMemoryError,)


# Messages of other errors that mean the device ran out of memory: cuBLAS failing to allocate
# its workspace or handle, the CUDA runtime or driver (a Triton kernel's module load), cuDNN.
OOM_MESSAGES = ("out of memory", "cublas_status_alloc_failed", "cudnn_status_alloc_failed",
                "cudaerrormemoryallocation", "cuda_error_out_of_memory")


def is_out_of_memory(e: BaseException) -> bool:
    """Whether `e` says the device ran out of memory (which a smaller chunk may fix), as
    opposed to a failure of a fast path (which falling back to the plain path may fix)."""
    if isinstance(e, OOM_ERRORS):
        return True
    msg = str(e).lower()
    return isinstance(e, RuntimeError) and any(m in msg for m in OOM_MESSAGES)


def release_cached(device: torch.device) -> None:
    """Give the allocator's cached blocks on `device` back to the driver, after a collection for
    tensors that only reference cycles still hold (a no-op off CUDA)."""
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()


# PyTorch hands out CUDA streams from a pool of this many per device and priority, round robin:
# a stream made per engine is shared with every 32nd (populations p and p+16 when each engine
# also made a side stream for its warm-up), and the two then serialise each other's work.
STREAM_POOL = 32


_SIDE_STREAMS: dict[torch.device, Any] = {}


def side_stream(device: torch.device) -> Any:
    """The one stream of CUDA `device` on which every engine of this process warms up and
    captures its graphs (made on first use)."""
    s = _SIDE_STREAMS.get(device)
    if s is None:
        s = _SIDE_STREAMS[device] = torch.cuda.Stream(device)
    return s


def new_streams(device: torch.device, n: int, avoid: tuple[Any, ...] = ()) -> list[Any]:
    """`n` streams of CUDA `device`, distinct from one another and from those in `avoid`; fewer
    only when the pool has fewer (n + len(avoid) > STREAM_POOL)."""
    taken = {s.cuda_stream for s in avoid}
    out: list[Any] = []
    for _ in range(STREAM_POOL):  # one turn of the pool meets each of its streams once
        if len(out) >= n:
            break
        s = torch.cuda.Stream(device)
        if s.cuda_stream not in taken:
            taken.add(s.cuda_stream)
            out.append(s)
    return out


def on_device(device: torch.device) -> contextlib.AbstractContextManager:
    """`device` as the current CUDA device for the duration, or nothing off CUDA: Triton launches
    on the current device's stream, and a graph is captured and its pool made there, so an engine
    on cuda:1 must not rely on the current device being its own."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
