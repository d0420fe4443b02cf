"""Members trained at once (a chunk of a population): their candidate, gradient, AdamW state,
data order, step counter and workspace at fixed addresses, and the captured training step.

A chunk knows nothing of the engine that trains it: it is given the population, the
hyperparameters and the step to run (psa.core.mlp.step.TrainStep), a callable `step(chunk, b)`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from psa.core import rng
from psa.core.arch import Arch
from psa.core.device import on_device, side_stream, to_device
from psa.core.hparams import HParams
from psa.core.loop import StepCallback, batch_sizes
from psa.core.member import Member, seed_groups
from psa.core.mlp.population import Layout, Population, ablate
from psa.core.optim import member_adamw_step, new_adamw, reset_adamw, step_dtype

# step(chunk, b): one training step of the chunk on its next batch of b images
Step = Callable[["Chunk", int], None]


class MemberAdamW:
    """AdamW over a chunk's flat buffer with a step count per member, for chunks where some
    member's optimizer state persists (so members are at different steps): psa.core.optim's
    member_adamw_step over the buffer's layer runs. Its state sits at fixed addresses (the step
    counts are device tensors), so a CUDA graph can capture it."""

    def __init__(self, param: torch.Tensor, layout: Layout, hp: HParams) -> None:
        self.param = param
        self.exp_avg = torch.zeros_like(param)
        self.exp_avg_sq = torch.zeros_like(param)
        self.steps = torch.zeros(layout.size_m, dtype=step_dtype(param.device), device=param.device)
        self.hp = hp
        self.runs = list(zip(layout.runs(param), layout.runs(param.grad), layout.runs(self.exp_avg),
                             layout.runs(self.exp_avg_sq)))

    def reset(self) -> None:
        """A fresh optimizer for every member, in place."""
        self.exp_avg.zero_()
        self.exp_avg_sq.zero_()
        self.steps.zero_()

    def step(self) -> None:
        """One AdamW step of every member (runs hold the members along axis 1)."""
        member_adamw_step((quad for run in self.runs for quad in zip(*run)), self.steps, self.hp, member_dim=1)


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


def graph_segments(sizes: list[int], steps_per_graph: int) -> list[tuple[int, ...]]:
    """An epoch's batch sizes (in order) cut into runs of `steps_per_graph` consecutive steps
    (the last run shorter), one CUDA graph replay each. A graph of several steps replays the
    same kernels in the same order as that many one-step graphs: the same bits, with one launch
    from the host instead of several, for nets whose steps are a few microseconds of work each."""
    k = max(1, steps_per_graph)
    return [tuple(sizes[i : i + k]) for i in range(0, len(sizes), k)]


class Chunk:
    """Members [m0, m1) of a population, trained together: their candidate, gradient and AdamW
    state, data order, dropout keys, step counter and workspace, all at fixed addresses.

    It keeps no reference to its engine or population (the methods take what they need): an
    engine that owned a chunk that pointed back would be a reference cycle, and its buffers
    (gigabytes for a big population) would outlive it until the garbage collector ran."""

    def __init__(self, pop: Population, hp: HParams, n_train: int, m0: int, m1: int, cand: torch.Tensor,
                 grad: torch.Tensor) -> None:
        dev = pop.device
        self.hp = hp
        self.m0, self.m1 = m0, m1
        self.members = pop.members[m0:m1]
        self.size = m1 - m0
        self.whole = m0 == 0 and m1 == pop.size
        self.layout = Layout.of(pop.arch, self.size, pop.model)
        self.cand, self.grad = cand, grad
        self.cand.grad = grad  # read by the optimizer
        self.views = self.layout.views(cand)
        self.grad_views = self.layout.views(grad)
        self.cand_runs = self.layout.runs(cand)
        self.groups = batch_groups(pop.arch, self.members)
        g, k = self.groups
        self.group_seeds = [self.members[j * k].seed for j in range(g)]
        n = self.n_train = n_train
        self.batch_size = hp.batch_size
        # valid indices from the start: the warm-up before a graph capture gathers with them
        self.order = torch.arange(n, device=dev).repeat(g, 1)
        self.step = torch.zeros((), dtype=torch.int64, device=dev)
        self.arange = torch.arange(hp.batch_size, device=dev)
        self.loss_sum = torch.zeros(self.size, dtype=torch.float32, device=dev)
        self.diverged = torch.zeros(self.size, dtype=torch.bool, device=dev)
        # AdamW's decoupled decay, param *= 1 - lr*wd, per member, evaluated in float32 as
        # torch.optim.AdamW does; with the paper's lr = wd = 1e-4 it is exactly 1.0: a no-op.
        # Per-member constants are built on the host and sent with to_device (pinned, queued):
        # a plain copy from pageable memory would wait for the stream, i.e. for the previous
        # chunk's epoch, and a chunked population would lose all overlap.
        decay = torch.tensor([1.0 - hp.lr * m.weight_decay for m in self.members], dtype=torch.float32)
        self.decay = None if bool((decay == 1.0).all()) else to_device(decay, dev)
        # A ResMLP's blocks may drop at another rate than its projections (HParams.block_dropout)
        block_p = [hp.block_dropout_rate(m) for m in self.members] if pop.model == "resmlp" else []
        drop_rows = [j for j, m in enumerate(self.members) if m.dropout > 0 or (block_p and block_p[j] > 0)]
        drop_rows = drop_rows if pop.arch.depth else []
        self.dropout = bool(drop_rows)
        if self.dropout:
            self.drop_scale, self.drop_thr = self._dropout_constants([m.dropout for m in self.members], dev)
            self.block_scale, self.block_thr = self.drop_scale, self.drop_thr
            # the blocks draw their own noise only where their rates differ from the projections' rates
            self.block_noise = bool(block_p) and block_p != [m.dropout for m in self.members]
            if self.block_noise:
                self.block_scale, self.block_thr = self._dropout_constants(block_p, dev)
            self.drop_keys = torch.zeros((self.size, 2), dtype=torch.int64, device=dev)
            self.drop_rows = to_device(torch.tensor(drop_rows, dtype=torch.int64), dev)
            self.drop_rows_all = len(drop_rows) == self.size
        self.adamw: torch.optim.AdamW | MemberAdamW | None = None
        # members whose AdamW state travels with their LKG (psa.core.variant): the chunk then
        # trains with MemberAdamW (a step count per member) instead of torch's fused AdamW
        persist = [m.variant.optimizer_state == "persist" for m in self.members]
        self.persist = to_device(torch.tensor(persist), dev) if any(persist) else None
        self.graphs: dict[tuple[int, ...], Any] = {}  # CUDA graphs by the batch sizes of the steps they hold
        self.segments: list[tuple[int, ...]] = []  # an epoch's steps, one graph replay each (graph_segments)
        self.work: dict[tuple[object, tuple[int, ...]], torch.Tensor] = {}

    @staticmethod
    def _dropout_constants(rates: list[float], dev: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, threshold) per member of dropout `rates`, on `dev`."""
        p = torch.tensor(rates, dtype=torch.float32)
        # F.dropout's scale 1 / (1 - p) in float32; exactly 1.0 for members without dropout
        scale = to_device(torch.ones(len(rates), dtype=torch.float32) / (1.0 - p), dev)
        thr = to_device(torch.tensor([rng.dropout_threshold(r) for r in rates], dtype=torch.int64), dev)
        return scale, thr

    def buf(self, name: object, shape: tuple[int, ...]) -> torch.Tensor:
        """A reusable workspace tensor: large activations are written in place step after step
        instead of being allocated (and page-faulted in) anew."""
        key = (name, shape)
        t = self.work.get(key)
        if t is None:
            t = self.work[key] = torch.empty(shape, dtype=torch.float32, device=self.cand.device)
        return t

    def begin(self, pop: Population, loop: int, ablations: list[tuple[int, str, int, int]], step: Step,
              graphs: int) -> None:
        """Set up one loop: candidate = LKG rows, ablation, data order, dropout keys, counters
        and AdamW state (a fresh one, or the LKG's for members that persist it), all in place;
        with `graphs` (> 0: the steps per graph), the epoch's steps are captured as CUDA graphs
        first (once)."""
        if graphs and not self.graphs:
            self._capture(pop, step, graphs)
        if self.whole:
            self.cand.copy_(pop.lkg)
        else:
            for (cw, cb), (lw, lb) in zip(self.cand_runs, pop.layout.runs(pop.lkg)):
                cw.copy_(lw[:, self.m0 : self.m1])
                cb.copy_(lb[:, self.m0 : self.m1])
        ablate(self.cand, self.layout, ablations)
        self._reset_optimizer(pop)
        if isinstance(self.adamw, MemberAdamW):
            # an ablated neuron's moments die with its weights
            ablate(self.adamw.exp_avg, self.layout, ablations)
            ablate(self.adamw.exp_avg_sq, self.layout, ablations)
        self.order.copy_(rng.data_order(self.group_seeds, loop, self.n_train, pop.device))
        if self.dropout:
            keys = torch.tensor([rng.loop_keys(m.seed, "dropout", loop) for m in self.members], dtype=torch.int64)
            self.drop_keys.copy_(to_device(keys, pop.device))
        self.step.zero_()
        self.loss_sum.zero_()
        self.diverged.zero_()

    def new_optimizer(self) -> torch.optim.AdamW | MemberAdamW:
        """The chunk's optimizer: torch's fused AdamW, or MemberAdamW where some member persists."""
        if self.persist is not None:
            return MemberAdamW(self.cand, self.layout, self.hp)
        return new_adamw([self.cand], self.hp, capturable=self.cand.device.type == "cuda")

    def _reset_optimizer(self, pop: Population) -> None:
        if self.adamw is None:
            self.adamw = self.new_optimizer()
        elif isinstance(self.adamw, MemberAdamW):
            self.adamw.reset()
        else:
            reset_adamw(self.adamw)
        if self.persist is not None:
            assert isinstance(self.adamw, MemberAdamW)
            opt = self.adamw
            assert pop.opt_avg is not None and pop.opt_sq is not None and pop.opt_step is not None
            p = self.persist.view(1, -1, 1)
            for src, dst in ((pop.opt_avg, opt.exp_avg), (pop.opt_sq, opt.exp_avg_sq)):
                for (sw, sb), (dw, db) in zip(pop.layout.runs(src), self.layout.runs(dst)):
                    torch.where(p, sw[:, self.m0 : self.m1], dw, out=dw)
                    torch.where(p, sb[:, self.m0 : self.m1], db, out=db)
            torch.where(self.persist, pop.opt_step[self.m0 : self.m1], opt.steps, out=opt.steps)

    def keep_optimizer(self, pop: Population, promote: torch.Tensor) -> None:
        """After the promotion decision: the promoted candidates' AdamW state becomes their
        LKG's, for members that persist it (in place, with the same masks as the weights)."""
        if self.persist is None:
            return
        opt = self.adamw
        assert isinstance(opt, MemberAdamW) and pop.opt_avg is not None and pop.opt_sq is not None
        assert pop.opt_step is not None
        keep = promote & self.persist
        p = keep.view(1, -1, 1)
        for src, dst in ((opt.exp_avg, pop.opt_avg), (opt.exp_avg_sq, pop.opt_sq)):
            for (sw, sb), (dw, db) in zip(self.layout.runs(src), pop.layout.runs(dst)):
                dw, db = dw[:, self.m0 : self.m1], db[:, self.m0 : self.m1]
                torch.where(p, sw, dw, out=dw)
                torch.where(p, sb, db, out=db)
        lkg_step = pop.opt_step[self.m0 : self.m1]
        torch.where(keep, opt.steps, lkg_step, out=lkg_step)

    def refix(self, ablations: list[tuple[int, str, int, int]]) -> None:
        """Zero a fixed ablation set again after the epoch (weights and, if kept, moments):
        an output neuron's bias and row regrow under training."""
        ablate(self.cand, self.layout, ablations)
        if isinstance(self.adamw, MemberAdamW):
            ablate(self.adamw.exp_avg, self.layout, ablations)
            ablate(self.adamw.exp_avg_sq, self.layout, ablations)

    def batch_sizes(self) -> list[int]:
        """The batch size of every step of an epoch (the last, partial batch kept)."""
        return batch_sizes(self.n_train, self.batch_size)

    def train_epoch(self, step: Step, on_step: StepCallback | None) -> None:
        """Every step of one epoch: graph replays on a GPU, the same step run eagerly elsewhere."""
        sizes = self.batch_sizes()
        if self.graphs:
            done = 0
            for seg in self.segments:
                self.graphs[seg].replay()
                done += len(seg)
                if on_step is not None:
                    on_step(done, len(sizes))
            return
        for s, b in enumerate(sizes):
            step(self, b)
            if on_step is not None:
                on_step(s + 1, len(sizes))

    def _warm_up(self, step: Step, sizes: list[int]) -> None:
        """Two training steps per batch size in `sizes`, each as the first step of an epoch.

        The counter is reset before every step: left to advance, four warm-up steps read data
        order positions up to 3 * batch + tail, past the end of an epoch of fewer than three
        full batches and a tail (a device-side assert on a GPU, which ends the CUDA context for
        every later population of the process)."""
        for b in sizes:
            for _ in range(2):
                self.step.zero_()
                step(self, b)

    def _capture(self, pop: Population, step: Step, steps_per_graph: int = 1) -> None:
        """Record the epoch's training steps as CUDA graphs of `steps_per_graph` consecutive
        steps (graph_segments: one graph per distinct run of batch sizes; with 1, one per batch
        size) after a warm-up on a side stream that compiles the kernels, creates cuBLAS's
        workspaces and AdamW's state. The warm-up trains on a copy of the LKG; begin() then
        resets everything it touched."""
        dev = pop.device
        self.cand.copy_(pop.lkg)
        if self.adamw is None:
            self.adamw = self.new_optimizer()
        sizes = sorted(set(self.batch_sizes()), reverse=True)
        side = side_stream(dev)
        with on_device(dev):
            side.wait_stream(torch.cuda.current_stream(dev))
            with torch.cuda.stream(side):
                self._warm_up(step, sizes)
            torch.cuda.current_stream(dev).wait_stream(side)
            pool = torch.cuda.graph_pool_handle()
            segments = graph_segments(self.batch_sizes(), steps_per_graph)
            for seg in dict.fromkeys(segments):
                g = torch.cuda.CUDAGraph()
                # captured on the side stream too: torch's default capture stream is one more
                # pooled stream, which may be some engine's
                with torch.cuda.graph(g, pool=pool, stream=side):
                    for b in seg:  # each step reads and advances the device's step counter
                        step(self, b)
                self.graphs[seg] = g
            self.segments = segments
