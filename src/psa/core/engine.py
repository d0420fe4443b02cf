"""The Frustration Engine on a population: every member's meta-loop, in lockstep.

One meta-loop (NOTES.md): clone the LKG into a candidate, ablate one neuron in the ablative
modes (never in loop 1), train one epoch with a fresh AdamW, and promote the candidate iff its
validation accuracy strictly beats the LKG's. All members do this at once: one batched matmul
per layer per step, the forward and backward written out by hand (no autograd graph), AdamW
on one flat parameter buffer.

How a loop runs, and why:
- The training step reads everything from device tensors that keep their address: the
  epoch's data order, a step counter, the dropout keys, the AdamW state (zeroed in place every
  loop, which is exactly a fresh optimizer). On a CUDA GPU the whole step (batch gather,
  forward, backward, AdamW) is therefore captured once as a CUDA graph and replayed.
- Hidden stacks of equal width up to kernels.MAX_WIDTH run as one Triton kernel per direction
  when Triton is available (psa.kernels): a 2048-layer net is a few launches per step.
- Data order and dropout masks are counter-based hashes (psa.rng), computed on the device.
- Ablation, promotion and weight decay act on a handful of strided views (Layout.runs) with
  device-side masks: nothing waits for the device until a loop's results are read.
- `launch` queues a loop and returns; `PendingLoop.result()` waits for it. Engines on their own
  CUDA streams can keep one GPU busy together (psa.study runs several populations that way).
- A population larger than the free memory of its device trains in chunks of whole seed
  groups, one chunk after another within each loop.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import math
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from psa.core import rng
from psa.core.ablation import ablate, choose_neuron
from psa.core.arch import Arch
from psa.core.data import Dataset
from psa.core.population import ConfigError, Layout, Member, Population, seed_groups, to_device
from psa.core.precision import CHOICES as PRECISION_CHOICES
from psa.core.precision import Matmul
from psa.core.precision import resolve as resolve_precision

StepCallback = Callable[[int, int], None]
KERNEL_CHOICES = ("auto", "torch", "triton")
# Share of a device's free memory a population may plan to use; the rest absorbs the
# allocator's fragmentation and what the estimate misses.
FREE_MEMORY_FRACTION = 0.8
# Widest equal-width hidden stack that kernels="auto" runs through the Triton stack kernels.
# Narrow stacks are launch-bound, so fusing them is a clear win; for wider ones (the kernels
# go to kernels.MAX_WIDTH) cuBLAS's batched GEMMs may be faster: kernels="triton" uses the
# kernels up to their limit, so that a GPU measurement can settle it.
AUTO_STACK_MAX_WIDTH = 32


@dataclass(frozen=True)
class TrainConfig:
    """Hyperparameters shared by all members (Table VI); per-mode rates live on each Member.

    The last four fields choose how the arithmetic runs, not what it computes: `precision` of
    the matrix products (psa.precision; auto is tf32 on a CUDA GPU, fp32 elsewhere), `kernels`
    (auto: the Triton kernels on a CUDA GPU when Triton is installed), `graphs` (capture the
    training step as a CUDA graph on CUDA devices) and `max_members` (members trained at once;
    None: as many as the device's free memory holds).
    """

    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    batch_size: int = 256
    weight_decay: float = 1e-4  # the rate `decay` mode trains with
    dropout: float = 0.1  # the rate `dropout` mode trains with
    eval_chunk_bytes: int = 256 << 20  # activation memory allowed for a validation chunk
    precision: str = "auto"
    kernels: str = "auto"
    graphs: bool = True
    max_members: int | None = None

    def __post_init__(self) -> None:
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"learning rate must be a positive number, got {self.lr}")
        if self.batch_size < 1:
            raise ConfigError(f"batch size must be at least 1, got {self.batch_size}")
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"betas must lie in [0, 1), got {self.betas}")
        if not (self.eps > 0):
            raise ConfigError(f"eps must be positive, got {self.eps}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ConfigError(f"weight decay must be a number >= 0, got {self.weight_decay}")
        if not (0.0 <= self.dropout < 1.0):
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.precision not in PRECISION_CHOICES:
            raise ConfigError(f"unknown precision {self.precision!r}; choose from {', '.join(PRECISION_CHOICES)}")
        if self.kernels not in KERNEL_CHOICES:
            raise ConfigError(f"unknown kernels {self.kernels!r}; choose from {', '.join(KERNEL_CHOICES)}")
        if self.max_members is not None and self.max_members < 1:
            raise ConfigError(f"max_members must be at least 1, got {self.max_members}")


@dataclass(frozen=True)
class LoopResult:
    """What one meta-loop did to every member (tuples in population order)."""

    loop: int
    candidate_acc: tuple[float, ...]  # validation accuracy (%), NaN for a diverged candidate
    promoted: tuple[bool, ...]
    ablated: tuple[tuple[int, int] | None, ...]  # (Linear layer, neuron) or None
    lkg_score: tuple[float, ...]  # after this loop's promotion decision
    train_loss: tuple[float, ...]  # mean training loss over the epoch
    diverged: tuple[bool, ...]  # a non-finite loss occurred during the epoch
    seconds: float


def new_adamw(param: torch.Tensor, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over a flat buffer, fused where this torch and device have it (and capturable in
    a CUDA graph on a GPU).

    The fused kernel makes one pass over parameters, gradients and moments instead of a dozen
    (10x faster on a 60-member 1*2048 population on the CPU); it rounds differently from the
    reference loop by about 1e-7 relative, far below what the oracle tests allow.
    """
    kw: dict[str, Any] = dict(lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=0.0)
    if param.device.type == "cuda":
        kw["capturable"] = True  # its step count lives on the device: no host sync, graph-safe
    try:
        return torch.optim.AdamW([param], fused=True, **kw)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW([param], **kw)


def reset_adamw(opt: torch.optim.Optimizer) -> None:
    """Zero the step count and both moments in place: the state of a freshly built AdamW,
    at the same addresses (which a captured graph relies on)."""
    for state in opt.state.values():
        for v in state.values():
            if torch.is_tensor(v):
                v.zero_()


def working_bytes(arch: Arch, batch_size: int, fused: bool = False, precision: str = "fp32",
                  graphs: bool = False) -> int:
    """Device memory one member needs to train, besides its LKG: candidate, gradient and AdamW's
    two moments (16 bytes a parameter) and one step's activations (kept for the backward pass,
    transient layer-sized buffers, dropout noise, the gathered batch).

    `fused` (the Triton stack kernels, in `precision`) adds the backward's per-row-block weight
    gradient partials: as many copies of the middle stack's parameters as a batch has row
    blocks (16 at widths 17-32, four times the 16 bytes a parameter counted above). `graphs`
    adds the graph's private pool, which keeps every temporary of a captured step for as long
    as the graph lives and lends none of it to other engines: the labels, the loss's softmax
    buffers and, on the torch path, the dropout hashes (two int64 a unit)."""
    w = arch.widths
    acts = batch_size * (3 * sum(w[1:]) + 2 * max(w[1:]) + w[0]) * 4
    total = arch.params * 16 + acts
    if fused:
        total += stack_partial_bytes(arch, batch_size, precision)
    if graphs:
        per_row = 8 + 2 * 4 * arch.n_out + (0 if fused else 16 * sum(arch.hidden))
        total += batch_size * per_row
    return total


def stack_partial_bytes(arch: Arch, batch_size: int, precision: str = "fp32") -> int:
    """Per member, the Triton stack backward's weight-gradient partials for a batch of
    `batch_size` rows: one copy of the middle layers' parameters per row block, none when one
    block covers the batch (the kernel then writes the gradient directly)."""
    from psa.core import kernels

    hidden = arch.hidden
    if len(hidden) < 2 or kernels.triton is None:
        return 0
    width = hidden[0]
    _, block_r, _ = kernels.launch_config(width, batch_size, precision, backward=True)
    n_blocks = -(-batch_size // block_r)
    return 0 if n_blocks == 1 else n_blocks * (len(hidden) - 1) * width * (width + 1) * 4


def stack_fits_kernel(arch: Arch, kernels_choice: str) -> bool:
    """Whether the hidden stack of `arch` runs through the Triton stack kernels under the
    `kernels` choice (when the engine uses Triton at all): equal widths, up to
    AUTO_STACK_MAX_WIDTH under auto and kernels.MAX_WIDTH under triton."""
    from psa.core import kernels

    hidden = arch.hidden
    widest = kernels.MAX_WIDTH if kernels_choice == "triton" else AUTO_STACK_MAX_WIDTH
    return bool(hidden) and len(set(hidden)) == 1 and hidden[0] <= min(widest, kernels.MAX_WIDTH)


def memory_paths(arch: Arch, device: torch.device, cfg: TrainConfig) -> dict[str, Any]:
    """The paths an engine for `arch` on `device` takes that change its memory, as working_bytes'
    keyword arguments (graphs: if the whole population fits)."""
    from psa.core import kernels

    triton = cfg.kernels == "triton" or (cfg.kernels == "auto" and device.type == "cuda" and kernels.available())
    return {"fused": triton and stack_fits_kernel(arch, cfg.kernels),
            "precision": resolve_precision(cfg.precision, device),
            "graphs": cfg.graphs and device.type == "cuda"}


def kernel_launches(arch: Arch, members: list[Member] | tuple[Member, ...], data: Dataset, cfg: TrainConfig,
                    device: torch.device) -> list[Any]:
    """The Triton launches (psa.kernels.Launch) that a meta-loop and the test of a population of
    `members` of `arch` on `device` would make with `cfg` (trained whole, as one chunk), for
    kernels.precompile(). Found by running the step and the evaluations on the meta device with
    the kernels recording: the same code, so the same arguments, but only shapes and offsets,
    nothing allocated or computed. Empty where such an engine would not use Triton."""
    from psa.core import kernels

    if not (cfg.kernels == "triton" or (cfg.kernels == "auto" and device.type == "cuda" and kernels.available())):
        return []
    meta = torch.device("meta")
    mdata = dataclasses.replace(data, **{f: torch.empty(getattr(data, f).shape, dtype=getattr(data, f).dtype,
                                                        device=meta)
                                         for f in ("train_x", "train_y", "val_x", "val_y", "test_x", "test_y")})
    members = tuple(sorted(members, key=lambda mem: mem.seed))  # as Population.create keeps them
    layout = Layout.of(arch, len(members))
    pop = Population(arch, members, meta, layout, torch.empty(layout.numel, device=meta),
                     torch.full((len(members),), -1, dtype=torch.int64, device=meta), mdata.val_y.numel(),
                     [0] * len(members))
    eng = Engine(pop, mdata, dataclasses.replace(cfg, precision=resolve_precision(cfg.precision, device),
                                                 kernels="auto", graphs=False, max_members=None))
    # the choices of an engine on `device` (on the meta device auto picks neither)
    eng.triton, eng.fused = True, memory_paths(arch, device, cfg)["fused"]
    ch = eng._chunk(0, pop.size)
    g = ch.groups[0]
    with kernels.recording() as launches, torch.no_grad():
        for b in sorted(set(ch.batch_sizes())):
            x = ch.buf("x", (g * b, mdata.train_x.shape[1])).view(g, b, -1)
            eng._forward_backward(ch, x, torch.empty((ch.size, b), dtype=torch.int64, device=meta))
        eng.count_correct(ch.cand, mdata.val_x, mdata.val_y, ch.layout)
        eng.count_correct(pop.lkg, mdata.test_x, mdata.test_y)
    return launches


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


def batch_groups(arch: Arch, members: tuple[Member, ...] | list[Member]) -> tuple[int, int]:
    """(G, k): G batch groups of k consecutive members that train on one gathered batch.

    Members of one seed share their data order, so gathering the batch once per seed and
    running the first layer as one matmul per seed saves memory traffic, at the price of
    reordering the first layer's output. When that output is wider than half the input the
    reordering costs more than the gathers it saves, and every member gathers its own.
    Members must be sorted by seed; uneven seed counts also give (M, 1).
    """
    g, k = seed_groups(members)
    if k > 1 and 2 * arch.widths[1] < arch.n_in:
        return g, k
    return len(members), 1


class Chunk:
    """Members [m0, m1) of a population, trained together: their candidate, gradient and AdamW
    state, data order, dropout keys, step counter and workspace, all at fixed addresses.

    It keeps no reference to its Engine (the methods take it): an engine that owned a chunk
    that pointed back would be a reference cycle, and its buffers (gigabytes for a big
    population) would outlive it until the garbage collector ran."""

    def __init__(self, engine: "Engine", m0: int, m1: int, cand: torch.Tensor, grad: torch.Tensor) -> None:
        pop, cfg = engine.pop, engine.cfg
        dev = pop.device
        self.m0, self.m1 = m0, m1
        self.members = pop.members[m0:m1]
        self.size = m1 - m0
        self.whole = m0 == 0 and m1 == pop.size
        self.layout = Layout.of(pop.arch, self.size)
        self.cand, self.grad = cand, grad
        self.cand.grad = grad  # read by the optimizer
        self.views = self.layout.views(cand)
        self.grad_views = self.layout.views(grad)
        self.cand_runs = self.layout.runs(cand)
        self.groups = batch_groups(pop.arch, self.members)
        g, k = self.groups
        self.group_seeds = [self.members[j * k].seed for j in range(g)]
        n = self.n_train = engine.data.train_x.shape[0]
        self.batch_size = cfg.batch_size
        # valid indices from the start: the warm-up before a graph capture gathers with them
        self.order = torch.arange(n, device=dev).repeat(g, 1)
        self.step = torch.zeros((), dtype=torch.int64, device=dev)
        self.arange = torch.arange(cfg.batch_size, device=dev)
        self.loss_sum = torch.zeros(self.size, dtype=torch.float32, device=dev)
        self.bad = torch.zeros(self.size, dtype=torch.bool, device=dev)
        # AdamW's decoupled decay, param *= 1 - lr*wd, per member, evaluated in float32 as
        # torch.optim.AdamW does; with the paper's lr = wd = 1e-4 it is exactly 1.0: a no-op.
        # Per-member constants are built on the host and sent with to_device (pinned, queued):
        # a plain copy from pageable memory would wait for the stream, i.e. for the previous
        # chunk's epoch, and a chunked population would lose all overlap.
        decay = torch.tensor([1.0 - cfg.lr * m.weight_decay for m in self.members], dtype=torch.float32)
        self.decay = None if bool((decay == 1.0).all()) else to_device(decay, dev)
        drop_rows = [j for j, m in enumerate(self.members) if m.dropout > 0] if pop.arch.depth else []
        self.dropout = bool(drop_rows)
        if self.dropout:
            p = torch.tensor([m.dropout for m in self.members], dtype=torch.float32)
            # F.dropout's scale 1 / (1 - p) in float32; exactly 1.0 for members without dropout
            self.drop_scale = to_device(torch.ones(self.size, dtype=torch.float32) / (1.0 - p), dev)
            self.drop_thr = to_device(torch.tensor([rng.dropout_threshold(m.dropout) for m in self.members],
                                                   dtype=torch.int64), dev)
            self.drop_keys = torch.zeros((self.size, 2), dtype=torch.int64, device=dev)
            self.drop_rows = to_device(torch.tensor(drop_rows, dtype=torch.int64), dev)
            self.drop_rows_all = len(drop_rows) == self.size
        self.opt: torch.optim.AdamW | None = None
        self.graphs: dict[int, Any] = {}
        self.work: dict[tuple[object, tuple[int, ...]], torch.Tensor] = {}

    def buf(self, name: object, shape: tuple[int, ...]) -> torch.Tensor:
        """A reusable workspace tensor: large activations are written in place step after step
        instead of being allocated (and page-faulted in) anew."""
        key = (name, shape)
        t = self.work.get(key)
        if t is None:
            t = self.work[key] = torch.empty(shape, dtype=torch.float32, device=self.cand.device)
        return t

    def begin(self, eng: "Engine", loop: int, ablations: list[tuple[int, str, int, int]]) -> None:
        """Set up one loop: candidate = LKG rows, ablation, data order, dropout keys, counters
        and AdamW state, all in place."""
        pop = eng.pop
        if eng.use_graphs and not self.graphs:
            self._capture(eng)
        if self.whole:
            self.cand.copy_(pop.lkg)
        else:
            for (cw, cb), (lw, lb) in zip(self.cand_runs, pop.layout.runs(pop.lkg)):
                cw.copy_(lw[:, self.m0 : self.m1])
                cb.copy_(lb[:, self.m0 : self.m1])
        ablate(self.cand, self.layout, ablations)
        self.order.copy_(rng.data_order(self.group_seeds, loop, self.n_train, pop.device))
        if self.dropout:
            keys = torch.tensor([rng.loop_keys(m.seed, "dropout", loop) for m in self.members], dtype=torch.int64)
            self.drop_keys.copy_(to_device(keys, pop.device))
        self.step.zero_()
        self.loss_sum.zero_()
        self.bad.zero_()
        if self.opt is None:
            self.opt = new_adamw(self.cand, eng.cfg)
        else:
            reset_adamw(self.opt)

    def batch_sizes(self) -> list[int]:
        """The batch size of every step of an epoch (the last, partial batch kept)."""
        bs = self.batch_size
        full, tail = divmod(self.n_train, bs)
        return [bs] * full + ([tail] if tail else [])

    def train_epoch(self, eng: "Engine", on_step: StepCallback | None) -> None:
        """Every step of one epoch: graph replays on a GPU, the same step run eagerly elsewhere."""
        sizes = self.batch_sizes()
        for s, b in enumerate(sizes):
            if self.graphs:
                self.graphs[b].replay()
            else:
                eng._step(self, b)
            if on_step is not None:
                on_step(s + 1, len(sizes))

    def _warm_up(self, eng: "Engine", sizes: list[int]) -> None:
        """Two training steps per batch size in `sizes`, each as the first step of an epoch.

        The counter is reset before every step: left to advance, four warm-up steps read data
        order positions up to 3 * batch + tail, past the end of an epoch of fewer than three
        full batches and a tail (a device-side assert on a GPU, which ends the CUDA context for
        every later population of the process)."""
        for b in sizes:
            for _ in range(2):
                self.step.zero_()
                eng._step(self, b)

    def _capture(self, eng: "Engine") -> None:
        """Record the training step (one graph per batch size) after a warm-up on a side stream
        that compiles the kernels, creates cuBLAS's workspaces and AdamW's state. The warm-up
        trains on a copy of the LKG; begin() then resets everything it touched."""
        dev = eng.pop.device
        self.cand.copy_(eng.pop.lkg)
        if self.opt is None:
            self.opt = new_adamw(self.cand, eng.cfg)
        sizes = sorted(set(self.batch_sizes()), reverse=True)
        side = side_stream(dev)
        with on_device(dev):
            side.wait_stream(torch.cuda.current_stream(dev))
            with torch.cuda.stream(side):
                self._warm_up(eng, sizes)
            torch.cuda.current_stream(dev).wait_stream(side)
            pool = torch.cuda.graph_pool_handle()
            for b in sizes:
                g = torch.cuda.CUDAGraph()
                # captured on the side stream too: torch's default capture stream is one more
                # pooled stream, which may be some engine's
                with torch.cuda.graph(g, pool=pool, stream=side):
                    eng._step(self, b)
                self.graphs[b] = g


@dataclass
class PendingLoop:
    """A meta-loop queued on the device; result() waits for it and reads its outcome."""

    engine: "Engine"
    loop: int
    ablated: tuple[tuple[int, int] | None, ...]
    host: dict[str, torch.Tensor]
    event: Any
    t0: float
    _result: LoopResult | None = field(default=None, repr=False)

    def ready(self) -> bool:
        """True when the device has finished the loop (result() will not wait)."""
        return self.event is None or bool(self.event.query())

    def result(self) -> LoopResult:
        """The loop's LoopResult (waits for the device); updates the population's bounty loops."""
        if self._result is not None:
            return self._result
        if self.event is not None:
            self.event.synchronize()
        eng, pop = self.engine, self.engine.pop
        correct = self.host["correct"].tolist()
        promoted = [bool(p) for p in self.host["promoted"].tolist()]
        diverged = [bool(d) for d in self.host["bad"].tolist()]
        lkg = self.host["lkg_correct"].tolist()
        for j, p in enumerate(promoted):
            if p:
                pop.bounty_loop[j] = self.loop
        self._result = LoopResult(
            loop=self.loop,
            candidate_acc=tuple(float("nan") if d else 100.0 * c / pop.n_val for c, d in zip(correct, diverged)),
            promoted=tuple(promoted),
            ablated=self.ablated,
            lkg_score=tuple(c if c < 0 else 100.0 * c / pop.n_val for c in lkg),
            train_loss=tuple(self.host["loss"].tolist()),
            diverged=tuple(diverged),
            seconds=time.perf_counter() - self.t0,
        )
        eng._pending = None
        return self._result


class Engine:
    """Runs meta-loops on a Population with a Dataset already on the population's device."""

    def __init__(self, population: Population, data: Dataset, config: TrainConfig, stream: Any = None) -> None:
        """`stream`: the CUDA stream the engine queues its work on (psa.study lends one per
        population in flight); None: a stream of its own on a CUDA device."""
        if data.train_x.device != population.lkg.device:
            raise ConfigError(f"data on {data.train_x.device} but population on {population.lkg.device}")
        if stream is not None and population.device.type != "cuda":
            raise ConfigError(f"a CUDA stream was given for a population on {population.device}")
        self.pop = population
        self.data = data
        self.cfg = config
        dev = population.device
        self.mm = Matmul(config.precision, dev)
        self.precision = self.mm.precision
        self.triton = self._want_triton()
        self.fused = self.triton and self._stack_fits_kernel()
        self.chunk_size = self._chunk_size()
        self.use_graphs = config.graphs and dev.type == "cuda" and self.chunk_size >= population.size
        if stream is None and dev.type == "cuda":
            stream = new_streams(dev, 1, avoid=(side_stream(dev),))[0]
        self.stream = stream
        self._whole: Chunk | None = None
        self._storage: tuple[torch.Tensor, torch.Tensor] | None = None
        self._pos_hash: dict[int, torch.Tensor] = {}
        self._pending: PendingLoop | None = None

    # ---------------------------------------------------------------- set-up decisions
    def _want_triton(self) -> bool:
        from psa.core import kernels

        choice = self.cfg.kernels
        if choice == "torch":
            return False
        if choice == "triton":
            if not kernels.available():
                raise ConfigError("kernels 'triton' need Triton and a CUDA GPU (or TRITON_INTERPRET=1 to "
                                  "run them in Triton's interpreter)")
            return True
        return self.pop.device.type == "cuda" and kernels.available()

    def _stack_fits_kernel(self) -> bool:
        return stack_fits_kernel(self.pop.arch, self.cfg.kernels)

    def _chunk_size(self) -> int:
        """Members trained at once: all of them if they fit the device's free memory (or the
        config's max_members), else the most whole seed groups that do."""
        pop, cfg = self.pop, self.cfg
        m = pop.size
        k = pop.groups()[1]
        limit = cfg.max_members
        if limit is None:
            free = free_memory(pop.device)
            if free is None:
                return m
            budget = free * FREE_MEMORY_FRACTION - cfg.eval_chunk_bytes
            graphs = cfg.graphs and pop.device.type == "cuda"
            per = working_bytes(pop.arch, cfg.batch_size, self.fused, self.precision, graphs)
            limit = int(budget // per) if budget > 0 else 0
            if graphs and limit < m:  # chunks train eagerly: no graph pool to hold
                per = working_bytes(pop.arch, cfg.batch_size, self.fused, self.precision)
                limit = int(budget // per) if budget > 0 else 0
            if limit < 1:
                raise ConfigError(
                    f"one member of {pop.arch.short} needs about {per / 2**30:.2f} GiB to train; "
                    f"{pop.device} has {free / 2**30:.2f} GiB free")
        if limit >= m:
            return m
        return max(k, limit // k * k) if limit >= k else limit

    # ---------------------------------------------------------------- chunks
    def _chunks(self) -> list[tuple[int, int]]:
        c, m = self.chunk_size, self.pop.size
        return [(m0, min(m, m0 + c)) for m0 in range(0, m, c)]

    def _chunk(self, m0: int, m1: int) -> Chunk:
        if (m0, m1) == (0, self.pop.size):
            if self._whole is None:
                self._whole = Chunk(self, 0, self.pop.size, torch.empty_like(self.pop.lkg),
                                    torch.empty_like(self.pop.lkg))
            return self._whole
        # chunks share one candidate/gradient store; each gets a fresh optimizer and workspace
        numel = Layout.of(self.pop.arch, self.chunk_size).numel
        if self._storage is None or self._storage[0].numel() < numel:
            self._storage = (torch.empty(numel, device=self.pop.device), torch.empty(numel, device=self.pop.device))
        n = Layout.of(self.pop.arch, m1 - m0).numel
        return Chunk(self, m0, m1, self._storage[0][:n], self._storage[1][:n])

    def _shrink(self) -> None:
        """After an out-of-memory error: half as many members at once (whole seed groups)."""
        k = self.pop.groups()[1]
        if self.chunk_size <= 1:
            raise ConfigError(f"out of memory on {self.pop.device} training a single member of {self.pop.arch.short}")
        half = self.chunk_size // 2
        self.chunk_size = max(k, half // k * k) if half >= k else max(1, half)
        self.use_graphs = False
        self._whole = None
        self._storage = None
        release_cached(self.pop.device)

    def _fall_back(self, e: Exception) -> bool:
        """After a failure in a fast path that was chosen automatically (the Triton kernels, then
        the CUDA graphs), say so once and retry the chunk without it; False if none is left."""
        if self.triton and self.cfg.kernels == "auto":
            what, self.triton, self.fused = "the Triton kernels", False, False
        elif self.use_graphs:
            what, self.use_graphs = "CUDA graphs", False
        else:
            return False
        warnings.warn(f"psa: {what} failed on {self.pop.device} ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                      f"continuing without them", RuntimeWarning, stacklevel=2)
        self._whole = None
        self._storage = None
        return True

    # ---------------------------------------------------------------- one training step
    @property
    def cand(self) -> torch.Tensor:
        """The candidate buffer of a population trained in one chunk (its layout is the LKG's)."""
        return self._chunk(0, self.pop.size).cand

    @property
    def groups(self) -> tuple[int, int]:
        """(G, k) batch groups of the whole population (see batch_groups)."""
        return batch_groups(self.pop.arch, self.pop.members)

    def _pos_hash_for(self, units: int) -> torch.Tensor:
        t = self._pos_hash.get(units)
        if t is None:
            t = self._pos_hash[units] = rng.position_hash(self.cfg.batch_size, units, self.pop.device)
        return t

    def _step(self, ch: Chunk, b: int) -> None:
        """One training step of chunk `ch` on a batch of `b` images: gather, forward, backward,
        decay, AdamW, counter. Reads its inputs from device tensors only (graph-capturable)."""
        data = self.data
        g, k = ch.groups
        pos = ch.step * self.cfg.batch_size + ch.arange[:b]
        flat_idx = ch.order.index_select(1, pos).reshape(-1)
        x = torch.index_select(data.train_x, 0, flat_idx, out=ch.buf("x", (g * b, data.train_x.shape[1])))
        x = x.view(g, b, -1)
        y = data.train_y.index_select(0, flat_idx).view(g, 1, b).expand(g, k, b).reshape(ch.size, b)
        loss = self._forward_backward(ch, x, y)
        ch.loss_sum += loss
        ch.bad |= ~torch.isfinite(loss)
        if ch.decay is not None:
            f = ch.decay.view(1, -1, 1)
            for w, bias in ch.cand_runs:
                w.mul_(f)
                bias.mul_(f)
        assert ch.opt is not None
        ch.opt.step()
        ch.step += 1

    def _stack_geometry(self, layout: Layout, m0: int = 0) -> tuple[int, int, int]:
        """(w_off, b_off, layer_stride) of the middle stack (Linear layers 1..L-1) of members
        m0.. in a buffer of `layout`, as psa.kernels addresses it."""
        w = self.pop.arch.hidden[0]
        if len(layout.blocks) < 3:
            return 0, 0, 0  # one hidden layer: no middle stack, the kernel reads no weights
        w0, b0, _, _ = layout.blocks[1]
        return w0 + m0 * w * w, b0 + m0 * w, layout.size_m * w * (w + 1)

    def _noise(self, ch: Chunk, keys: torch.Tensor, b: int) -> torch.Tensor:
        """(D, b, units) dropout multipliers of the dropout members for this step."""
        units = sum(self.pop.arch.hidden)
        if ch.drop_rows_all:
            ks, thr, sc = keys, ch.drop_thr, ch.drop_scale
        else:
            ks = keys.index_select(0, ch.drop_rows)
            thr = ch.drop_thr.index_select(0, ch.drop_rows)
            sc = ch.drop_scale.index_select(0, ch.drop_rows)
        if self.triton:
            from psa.core import kernels

            return kernels.dropout_noise(b, units, ks, thr, sc)
        return rng.dropout_noise(self._pos_hash_for(units)[:b], ks, thr, sc)

    def _forward_backward(self, ch: Chunk, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Gradients of every member's mean cross-entropy into ch.grad; returns the losses (C,).

        x: (G, b, n_in) one batch per batch group; y: (C, b) labels per member.
        """
        mm = self.mm
        m = ch.size
        g, b = x.shape[0], x.shape[1]
        k = m // g
        views, gviews = ch.views, ch.grad_views
        depth = len(views) - 1
        buf = ch.buf

        # first layer: one matmul per batch group (members of one seed share the batch)
        w0, b0 = views[0]
        o0 = w0.shape[1]
        if k > 1:
            zg = mm.baddbmm(b0.view(g, 1, k * o0), x, w0.view(g, k * o0, -1).transpose(1, 2),
                            out=buf("z0g", (g, b, k * o0)))
            z = buf(("z", 0), (m, b, o0))
            z.view(g, k, b, o0).copy_(zg.view(g, b, k, o0).transpose(1, 2))
        else:
            z = mm.baddbmm(b0.unsqueeze(1), x, w0.transpose(1, 2), out=buf(("z", 0), (m, b, o0)))

        # hidden stack: z becomes the logits; hs (or acts) keeps what the backward needs
        keys = rng.step_keys(ch.drop_keys, ch.step) if ch.dropout else None
        hs: list[torch.Tensor] = []
        acts = None
        noise = None
        if depth and self.fused:
            from psa.core import kernels

            width = self.pop.arch.hidden[0]
            acts = buf("acts", (depth, m, b, width))
            drop = (keys, ch.drop_thr, ch.drop_scale) if ch.dropout else None
            kernels.stack_forward(z, ch.cand, *self._stack_geometry(ch.layout), depth, width, acts=acts, drop=drop,
                                  precision=self.precision)
            hs = [acts[depth - 1]]
            w, bias = views[depth]
            z = mm.baddbmm(bias.unsqueeze(1), hs[0], w.transpose(1, 2), out=buf(("z", depth), (m, b, w.shape[1])))
        elif depth:
            if ch.dropout:
                noise = self._noise(ch, keys, b)
            off = 0
            for layer in range(1, depth + 1):
                h = z.relu_()
                if noise is not None:
                    width = h.shape[2]
                    sl = noise[:, :, off : off + width]
                    if ch.drop_rows_all:
                        h.mul_(sl)
                    else:
                        h.index_copy_(0, ch.drop_rows, h.index_select(0, ch.drop_rows) * sl)
                    off += width
                hs.append(h)
                w, bias = views[layer]
                z = mm.baddbmm(bias.unsqueeze(1), h, w.transpose(1, 2), out=buf(("z", layer), (m, b, w.shape[1])))

        # mean cross-entropy and its gradient (softmax - onehot) / b, per member
        y3 = y.unsqueeze(2)
        lse = torch.logsumexp(z, dim=2, keepdim=True)
        loss = (lse - z.gather(2, y3)).mean(dim=(1, 2))
        dz = torch.exp(z - lse)
        dz.scatter_add_(2, y3, torch.full_like(y3, -1, dtype=dz.dtype))
        dz.mul_(1.0 / b)

        if depth and self.fused:
            from psa.core import kernels

            w, _ = views[depth]
            gw, gb = gviews[depth]
            mm.bmm(dz.transpose(1, 2), hs[0], out=gw)
            torch.sum(dz, dim=1, out=gb)
            dh = mm.bmm(dz, w, out=buf(("dh", 0), (m, b, w.shape[2])))
            width = self.pop.arch.hidden[0]
            dz = kernels.stack_backward(dh, acts, ch.cand, ch.grad, *self._stack_geometry(ch.layout), depth, width,
                                        dz0=buf("dz0", (m, b, width)),
                                        scale=ch.drop_scale if ch.dropout else None, precision=self.precision)
        else:
            for layer in range(depth, 0, -1):
                h = hs[layer - 1]
                w, _ = views[layer]
                gw, gb = gviews[layer]
                mm.bmm(dz.transpose(1, 2), h, out=gw)
                torch.sum(dz, dim=1, out=gb)
                dh = mm.bmm(dz, w, out=buf(("dh", layer % 2), (m, b, w.shape[2])))
                # ReLU's backward in place: gradient 0 where the unit is off (at 0 too, as PyTorch)
                dz = torch.ops.aten.threshold_backward.grad_input(dh, h, 0, grad_input=dh)
                if noise is not None:
                    sc = ch.drop_scale.view(-1, 1, 1)
                    if ch.drop_rows_all:
                        dz.mul_(sc)
                    else:
                        rows = ch.drop_rows
                        dz.index_copy_(0, rows, dz.index_select(0, rows) * sc.index_select(0, rows))
        gw0, gb0 = gviews[0]
        if k > 1:
            dzg = buf("dz0g", (g, b, k * o0))
            dzg.view(g, b, k, o0).copy_(dz.view(g, k, b, o0).transpose(1, 2))
            mm.bmm(dzg.transpose(1, 2), x, out=gw0.view(g, k * o0, -1))
        else:
            mm.bmm(dz.transpose(1, 2), x, out=gw0)
        torch.sum(dz, dim=1, out=gb0)
        return loss

    # ---------------------------------------------------------------- evaluation
    @torch.no_grad()
    def count_correct(self, flat: torch.Tensor, x_all: torch.Tensor, y_all: torch.Tensor,
                      layout: Layout | None = None) -> torch.Tensor:
        """Correct predictions (M,) of every member's weights in `flat` (of `layout`, by default
        the population's) on (x_all, y_all).

        Every member sees the same images, so a block of members runs its first layer as one
        GEMM against all their first-layer weights. Blocks are as many rows and members as the
        activation budget allows, rows first: tall GEMMs run faster than wide ones.
        """
        layout = layout or self.pop.layout
        mm = self.mm
        views = layout.views(flat)
        m = layout.size_m
        n = x_all.shape[0]
        arch = self.pop.arch
        budget = max(1, self.cfg.eval_chunk_bytes // 8)  # floats: two live activations of 4 bytes
        widest = max(arch.widths[1:])
        rows = max(1, min(n, budget // widest))
        block = max(1, min(m, budget // (rows * widest)))
        correct = torch.zeros(m, dtype=torch.int64, device=flat.device)
        o0 = views[0][0].shape[1]
        depth = arch.depth
        with self._device_context():
            for m0 in range(0, m, block):
                m1 = min(m, m0 + block)
                w0 = views[0][0][m0:m1].reshape((m1 - m0) * o0, -1)
                b0 = views[0][1][m0:m1].reshape(1, -1)
                for c0 in range(0, n, rows):
                    x = x_all[c0 : c0 + rows]
                    z = mm.addmm(b0, x, w0.t()).view(x.shape[0], m1 - m0, o0).transpose(0, 1)
                    if depth and self.fused:
                        from psa.core import kernels

                        h = kernels.stack_forward(z, flat, *self._stack_geometry(layout, m0), depth, arch.hidden[0],
                                                  precision=self.precision)
                        w, bias = views[depth]
                        z = mm.baddbmm(bias[m0:m1].unsqueeze(1), h, w[m0:m1].transpose(1, 2))
                    else:
                        for w, bias in views[1:]:
                            z = mm.baddbmm(bias[m0:m1].unsqueeze(1), torch.relu(z), w[m0:m1].transpose(1, 2))
                    correct[m0:m1] += (z.argmax(dim=2) == y_all[c0 : c0 + rows]).sum(dim=1)
        return correct

    def test_accuracy(self) -> list[float]:
        """Test-set accuracy (%) of every member's LKG."""
        with self._stream_context():
            correct = self.count_correct(self.pop.lkg, self.data.test_x, self.data.test_y)
            return [100.0 * c / self.data.test_y.numel() for c in correct.tolist()]

    # ---------------------------------------------------------------- the meta-loop
    @contextlib.contextmanager
    def _stream_context(self):
        if self.stream is None:
            yield
            return
        with on_device(self.pop.device):
            # inputs (LKG, data) were written on the caller's stream: order our work after it
            self.stream.wait_stream(torch.cuda.current_stream(self.pop.device))
            with torch.cuda.stream(self.stream):
                yield

    @contextlib.contextmanager
    def _device_context(self):
        with on_device(self.pop.device), self.mm.context(), torch.no_grad():
            yield

    def _ablations(self, loop: int) -> tuple[tuple[int, int] | None, ...]:
        pop = self.pop
        return tuple(choose_neuron(pop.arch, mem.mode, mem.seed, loop) for mem in pop.members)

    def _run_chunks(self, loop: int, ablated: tuple[tuple[int, int] | None, ...], on_step: StepCallback | None,
                    validate: bool) -> dict[str, torch.Tensor]:
        """Train every chunk for one epoch of `loop` (and, if `validate`, score and promote it);
        per-member outcomes as device tensors."""
        pop = self.pop
        dev = pop.device
        m = pop.size
        out = {"correct": torch.zeros(m, dtype=torch.int64, device=dev),
               "promoted": torch.zeros(m, dtype=torch.bool, device=dev),
               "loss": torch.zeros(m, dtype=torch.float32, device=dev),
               "bad": torch.zeros(m, dtype=torch.bool, device=dev)}
        m0 = 0
        while m0 < m:
            m1 = min(m, m0 + self.chunk_size)
            ch = correct = None
            out_of_memory = retry = False
            try:
                ch = self._chunk(m0, m1)
                ablations = [(j - m0, pop.members[j].mode, *ablated[j]) for j in range(m0, m1)
                             if ablated[j] is not None]
                ch.begin(self, loop, ablations)
                ch.train_epoch(self, on_step)
                out["loss"][m0:m1] = ch.loss_sum / len(ch.batch_sizes())
                out["bad"][m0:m1] = ch.bad
                if validate:
                    correct = self.count_correct(ch.cand, self.data.val_x, self.data.val_y, ch.layout)
            except Exception as e:  # noqa: BLE001 - only memory and an automatic choice are retried
                out_of_memory = is_out_of_memory(e)
                if not out_of_memory and not self._fall_back(e):
                    raise
                retry = True
            if retry:
                # Out of the handler, the exception and its traceback (the failed step's frames
                # and tensors) are gone; the chunk goes now (candidate, gradient, AdamW moments,
                # workspace, graphs and their pool). Only then is the cache emptied and a smaller
                # chunk allocated: under real pressure the retry needs that memory.
                ch = correct = None
                if out_of_memory:
                    self._shrink()  # nothing of this chunk was promoted yet: retry it smaller
                continue
            if validate:
                lkg_correct = pop.lkg_correct[m0:m1]
                promote = ~ch.bad & (correct > lkg_correct)
                lkg_correct.copy_(torch.where(promote, correct, lkg_correct))
                p = promote.view(1, -1, 1)
                for (cw, cb), (lw, lb) in zip(ch.cand_runs, pop.layout.runs(pop.lkg)):
                    lw, lb = lw[:, m0:m1], lb[:, m0:m1]
                    # in place (out= is the LKG itself): no temporary the size of a layer run
                    torch.where(p, cw, lw, out=lw)
                    torch.where(p, cb, lb, out=lb)
                out["correct"][m0:m1] = correct
                out["promoted"][m0:m1] = promote
            m0 = m1
        return out

    def launch(self, on_step: StepCallback | None = None) -> PendingLoop:
        """Queue one meta-loop for every member and return without waiting for the device.

        The population's LKG and scores move forward on the device; call .result() on the
        returned PendingLoop (before the next launch) for the outcome and the bounty loops.
        """
        if self._pending is not None:
            raise RuntimeError("the previous meta-loop's result() has not been read")
        t0 = time.perf_counter()
        pop = self.pop
        loop = pop.loop + 1
        ablated = self._ablations(loop)
        with self._stream_context(), self._device_context():
            out = self._run_chunks(loop, ablated, on_step, validate=True)
            out["lkg_correct"] = pop.lkg_correct
            if pop.device.type == "cuda":
                host = {k: torch.empty(v.shape, dtype=v.dtype, pin_memory=True).copy_(v, non_blocking=True)
                        for k, v in out.items()}
                event = torch.cuda.Event()
                event.record()
            else:
                host = {k: v.clone() if k == "lkg_correct" else v for k, v in out.items()}
                event = None
        pop.loop = loop
        self._pending = PendingLoop(self, loop, ablated, host, event, t0)
        return self._pending

    def meta_loop(self, on_step: StepCallback | None = None) -> LoopResult:
        """One meta-loop for every member; the population's LKG state moves forward by one loop."""
        return self.launch(on_step).result()

    def train_epoch(self, loop: int, on_step: StepCallback | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One epoch of loop `loop` for every candidate (cloned from the LKG, not ablated, not
        scored or promoted): for calibration and benchmarks. Returns (mean loss, diverged)."""
        with self._stream_context(), self._device_context():
            out = self._run_chunks(loop, (None,) * self.pop.size, on_step, validate=False)
        return out["loss"], out["bad"]
