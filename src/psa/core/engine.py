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
  when Triton is available (psa.core.kernels): a 2048-layer net is a few launches per step.
  On a CPU, a net whose hidden layers are all one width up to 8 trains each step in one call
  to a small compiled C++ routine (psa.core.cpu_stack.train_step: batch rows read by index,
  first layer, stack, head, loss and every gradient), where torch would pay per layer and op.
- Data order and dropout masks are counter-based hashes (psa.core.rng), computed on the device.
- Ablation, promotion and weight decay act on a handful of strided views (Layout.runs) with
  device-side masks: nothing waits for the device until a loop's results are read.
- `launch` queues a loop and returns; `PendingLoop.result()` waits for it. Engines on their own
  CUDA streams can keep one GPU busy together (psa.study runs several populations that way).
- A population larger than the free memory of its device trains in chunks of whole seed
  groups, one chunk after another within each loop.
- A ResMLP population (psa.core.model) runs the same step with a residual forward and
  backward on the torch path (the Triton stack kernel computes a plain stack, so it never
  takes a ResMLP: memory.stack_fits_kernel); graphs, chunks and the dropout kernel apply.
- Engine variants (psa.core.variant, docs/variants.md) are per-member settings on the same
  path: which neurons are zeroed (choose_neurons), the promotion decision (`_promote`, the one
  place it is made: patience, the bounty model), the AdamW state kept with the LKG
  (Chunk.keep_optimizer) and mode schedules (`_follow_schedules`, at loop boundaries).
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch

from psa.core import cpu_stack, rng
from psa.core.ablation import choose_neurons
from psa.core.arch import Arch
from psa.core.chunk import Chunk, StepCallback, adamw_step, batch_groups
from psa.core.data import Dataset
from psa.core.device import (
    Execution,
    free_memory,
    is_out_of_memory,
    new_streams,
    on_device,
    release_cached,
    side_stream,
    to_device,
)
from psa.core.errors import ConfigError
from psa.core.hparams import HParams
from psa.core.memory import FREE_MEMORY_FRACTION, stack_fits_kernel, stack_path_reason, working_bytes
from psa.core.model import DEFAULT_MODEL, ResStep, dropout_units, res_steps
from psa.core.population import Layout, Member, Population
from psa.core.precision import Matmul


@dataclass(frozen=True)
class LoopResult:
    """What one meta-loop did to every member (tuples in population order)."""

    loop: int
    candidate_acc: tuple[float, ...]  # validation accuracy (%); NaN for a diverged one under diverged="discard"
    promoted: tuple[bool, ...]
    ablated: tuple[tuple[int, int] | None, ...]  # (Linear layer, neuron) or None
    lkg_score: tuple[float, ...]  # after this loop's promotion decision
    train_loss: tuple[float, ...]  # mean training loss over the epoch
    diverged: tuple[bool, ...]  # a non-finite loss occurred during the epoch
    seconds: float
    # variants (psa.core.variant): every neuron ablated (ablated holds the first of them), and
    # whether patience forced the candidate in (None for members without patience)
    ablations: tuple[tuple[tuple[int, int], ...], ...] = ()
    forced: tuple[bool | None, ...] = ()


@dataclass
class PendingLoop:
    """A meta-loop queued on the device; result() waits for it and reads its outcome."""

    engine: "Engine"
    loop: int
    ablated: tuple[tuple[tuple[int, int], ...], ...]
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
        diverged = [bool(d) for d in self.host["diverged"].tolist()]
        lkg = self.host["lkg_correct"].tolist()
        discard = eng.hp.diverged == "discard"
        forced = [bool(f) for f in self.host["forced"].tolist()]
        for j, b in enumerate(self.host["improved"].tolist()):
            if b:
                pop.bounty_loop[j] = self.loop
        self._result = LoopResult(
            loop=self.loop,
            candidate_acc=tuple(float("nan") if d and discard else 100.0 * c / pop.n_val
                                for c, d in zip(correct, diverged)),
            promoted=tuple(promoted),
            ablated=tuple(a[0] if a else None for a in self.ablated),
            lkg_score=tuple(c if c < 0 else 100.0 * c / pop.n_val for c in lkg),
            train_loss=tuple(self.host["loss"].tolist()),
            diverged=tuple(diverged),
            seconds=time.perf_counter() - self.t0,
            ablations=self.ablated,
            forced=tuple(f if mem.variant.patience > 0 else None for f, mem in zip(forced, pop.members)),
        )
        eng._pending = None
        return self._result


def patience_decision(correct: torch.Tensor, beats: torch.Tensor, ok: torch.Tensor, diverged: torch.Tensor,
                      k: torch.Tensor, growth: torch.Tensor, streak: torch.Tensor, allowance: torch.Tensor,
                      bounty_correct: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Patience's promotion decision (psa.core.variant) for candidates scoring `correct`, of
    which `beats` beat their LKG and `ok` may be promoted at all; updates the discards in a row
    (`streak`), the `allowance` and `bounty_correct` in place. Returns (promote, forced,
    improved: the bounty was beaten). The one place it is written: Engine._promote and
    psa.core.generic's ModuleEngine both call it."""
    improved = ok & (correct > bounty_correct)
    # a diverged candidate scores, but is never forced in: its NaN weights would stay the
    # LKG for good (docs/variants.md)
    forced = (k > 0) & ~diverged & ~beats & (streak >= allowance)
    promote = beats | forced
    streak.copy_(torch.where(promote, torch.zeros_like(streak), streak + 1))
    # capped far beyond any run's length, so that K * G^n cannot overflow
    grown = torch.clamp(allowance * growth, max=1 << 40)
    allowance.copy_(torch.where(improved, k, torch.where(forced, grown, allowance)))
    bounty_correct.copy_(torch.where(improved, correct, bounty_correct))
    return promote, forced, improved


def scheduled_members(members: tuple[Member, ...], hp: HParams, loop: int,
                      mode_history: list[list[tuple[str, int]]]) -> tuple[Member, ...]:
    """The members for meta-loop `loop`: a member on a mode schedule whose mode changes there
    becomes the new mode's member (HParams.member: its rates) and gets a mode_history entry.
    The one place it is written: Engine and psa.core.generic's ModuleEngine both call it."""
    out = list(members)
    for j, mem in enumerate(out):
        mode = mem.variant.mode_at(mem.mode, loop)
        if mode != mem.mode:
            out[j] = hp.member(mode, mem.seed, mem.variant)
            mode_history[j].append((mode, loop))
    return tuple(out)


_NOTED: set[str] = set()


def note_once(message: str) -> None:
    """Warn with `message` the first time this process meets it (one line per architecture,
    not one per population or chunk)."""
    if message not in _NOTED:
        _NOTED.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


class Engine:
    """Runs meta-loops on a Population with a Dataset already on the population's device."""

    def __init__(self, population: Population, data: Dataset, hparams: HParams, execution: Execution | None = None,
                 stream: Any = None) -> None:
        """`hparams`: what every member trains with; `execution`: how, already resolved (None:
        the plain path on the population's device: fp32, torch ops, no graphs). `stream`: the
        CUDA stream the engine queues its work on (psa.study lends one per population in
        flight); None: a stream of its own on a CUDA device."""
        ex = execution or Execution(device=population.device)
        arch = population.arch
        if data.n_in != arch.n_in or data.n_classes != arch.n_out:
            raise ConfigError(f"architecture {arch.short} has {arch.n_in} inputs and {arch.n_out} outputs, data set "
                              f"{data.name} {data.n_in} and {data.n_classes} classes (build it with data.arch(...))")
        if data.train_x.device != population.lkg.device:
            raise ConfigError(f"data on {data.train_x.device} but population on {population.lkg.device}")
        if ex.device != population.device:
            raise ConfigError(f"execution on {ex.device} but population on {population.device}")
        if stream is not None and population.device.type != "cuda":
            raise ConfigError(f"a CUDA stream was given for a population on {population.device}")
        self.pop = population
        self.data = data
        self.hp = hparams
        self.ex = ex
        dev = population.device
        self.mm = Matmul(ex.precision, dev)
        self.precision = ex.precision
        self.triton = ex.triton
        self.fused = stack_fits_kernel(population.arch, ex, population.model)
        if ex.triton and not self.fused and len(set(population.arch.hidden)) > 1:
            note_once(f"psa: {population.arch.short} trains its hidden stack on the plain torch path: "
                      f"{stack_path_reason(population.arch, ex, population.model)}")
        self.res_steps: list[ResStep] | None = res_steps(population.arch) if population.model == "resmlp" else None
        # the fused CPU step (psa.core.cpu_stack.train_step) runs a SimpleMLP's plain ReLU stack
        # only, and reads the batch straight from the training set, which must then be one
        # contiguous block of rows; anything else takes the torch path
        self.cpu_step = (not self.fused and population.model == DEFAULT_MODEL
                         and data.train_x.is_contiguous() and data.train_y.is_contiguous()
                         and cpu_stack.step_fits_cpu(population.arch, ex))
        # 8-bit images (MNIST's) as codes: a quarter of the bytes per batch row, where a narrow
        # net's step is bound by reading the rows from memory
        self.cpu_codes = cpu_stack.input_codes(data.train_x) if self.cpu_step else None
        self.chunk_size = self._chunk_size()
        self.use_graphs = ex.graphs and self.chunk_size >= population.size
        if stream is None and dev.type == "cuda":
            stream = new_streams(dev, 1, avoid=(side_stream(dev),))[0]
        self.stream = stream
        self._whole: Chunk | None = None
        self._storage: tuple[torch.Tensor, torch.Tensor] | None = None
        self._pos_hash: dict[int, torch.Tensor] = {}
        self._pending: PendingLoop | None = None

    # ---------------------------------------------------------------- set-up decisions
    def _chunk_size(self) -> int:
        """Members trained at once: all of them if they fit the device's free memory (or the
        execution's max_members), else the most whole seed groups that do."""
        pop, ex = self.pop, self.ex
        m = pop.size
        k = pop.groups()[1]
        limit = ex.max_members
        if limit is None:
            free = free_memory(pop.device)
            if free is None:
                return m
            budget = free * FREE_MEMORY_FRACTION - ex.eval_bytes
            per = working_bytes(pop.arch, self.hp.batch_size, self.fused, self.precision, ex.graphs, pop.model)
            limit = int(budget // per) if budget > 0 else 0
            if ex.graphs and limit < m:  # chunks train eagerly: no graph pool to hold
                per = working_bytes(pop.arch, self.hp.batch_size, self.fused, self.precision, model=pop.model)
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
        numel = Layout.of(self.pop.arch, self.chunk_size, self.pop.model).numel
        if self._storage is None or self._storage[0].numel() < numel:
            self._storage = (torch.empty(numel, device=self.pop.device), torch.empty(numel, device=self.pop.device))
        n = Layout.of(self.pop.arch, m1 - m0, self.pop.model).numel
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
        if self.triton and self.ex.kernels_fall_back:
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
            t = self._pos_hash[units] = rng.position_hash(self.hp.batch_size, units, self.pop.device)
        return t

    def _step(self, ch: Chunk, b: int) -> None:
        """One training step of chunk `ch` on a batch of `b` images: gather, forward, backward,
        decay, AdamW, counter. Reads its inputs from device tensors only (graph-capturable)."""
        data = self.data
        g, k = ch.groups
        if self.cpu_step:  # -- the fused CPU step: gather, forward and backward in one call
            drop = (ch.drop_keys, ch.drop_thr, ch.drop_scale) if ch.dropout else None
            loss = cpu_stack.train_step(ch.layout, ch.cand, ch.grad, data.train_x, data.train_y, ch.order, ch.step,
                                        self.hp.batch_size, b, k, drop, ch.buf("loss", (ch.size,)), self.cpu_codes)
        else:
            pos = ch.step * self.hp.batch_size + ch.arange[:b]
            flat_idx = ch.order.index_select(1, pos).reshape(-1)
            x = torch.index_select(data.train_x, 0, flat_idx, out=ch.buf("x", (g * b, data.train_x.shape[1])))
            x = x.view(g, b, -1)
            y = data.train_y.index_select(0, flat_idx).view(g, 1, b).expand(g, k, b).reshape(ch.size, b)
            loss = self._forward_backward(ch, x, y)
        ch.loss_sum += loss
        ch.diverged |= ~torch.isfinite(loss)
        if ch.decay is not None:
            f = ch.decay.view(1, -1, 1)
            for w, bias in ch.cand_runs:
                w.mul_(f)
                bias.mul_(f)
        assert ch.adamw is not None
        adamw_step(ch.adamw)
        ch.step += 1

    def _stack_geometry(self, layout: Layout, m0: int = 0) -> tuple[int, int, int]:
        """(w_off, b_off, layer_stride) of the middle stack (Linear layers 1..L-1) of members
        m0.. in a buffer of `layout`, as psa.core.kernels addresses it."""
        w = self.pop.arch.hidden[0]
        if len(layout.blocks) < 3:
            return 0, 0, 0  # one hidden layer: no middle stack, the kernel reads no weights
        w0, b0, _, _ = layout.blocks[1]
        return w0 + m0 * w * w, b0 + m0 * w, layout.size_m * w * (w + 1)

    def _noise(self, ch: Chunk, keys: torch.Tensor, b: int, block: bool = False) -> torch.Tensor:
        """(D, b, units) dropout multipliers of the dropout members for this step (`block`: at
        the rates of a ResMLP's blocks; a unit's hash is the same, only the threshold differs)."""
        units = dropout_units(self.pop.arch, self.pop.model)
        thr, sc = (ch.block_thr, ch.block_scale) if block else (ch.drop_thr, ch.drop_scale)
        if ch.drop_rows_all:
            ks = keys
        else:
            ks = keys.index_select(0, ch.drop_rows)
            thr = thr.index_select(0, ch.drop_rows)
            sc = sc.index_select(0, ch.drop_rows)
        if self.triton:
            from psa.core import kernels

            return kernels.dropout_noise(b, units, ks, thr, sc)
        return rng.dropout_noise(self._pos_hash_for(units)[:b], ks, thr, sc)

    def _forward_backward(self, ch: Chunk, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Gradients of every member's mean cross-entropy into ch.grad; returns the losses (C,).

        x: (G, b, n_in) one batch per batch group; y: (C, b) labels per member.
        """
        if self.res_steps is not None:
            return self._res_forward_backward(ch, x, y)
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
            # the head as a plain layer, then the middle stack in one Triton call
            w, _ = views[depth]
            gw, gb = gviews[depth]
            mm.bmm(dz.transpose(1, 2), hs[0], out=gw)
            torch.sum(dz, dim=1, out=gb)
            dh = mm.bmm(dz, w, out=buf(("dh", 0), (m, b, w.shape[2])))
            width = self.pop.arch.hidden[0]
            geometry = self._stack_geometry(ch.layout)
            dz0 = buf("dz0", (m, b, width))
            from psa.core import kernels

            dz = kernels.stack_backward(dh, acts, ch.cand, ch.grad, *geometry, depth, width, dz0=dz0,
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


    # ---------------------------------------------------------------- ResMLP
    def _first_linear(self, ch: Chunk, x: torch.Tensor) -> torch.Tensor:
        """(C, b, o0): the first Linear of every member, one matmul per batch group."""
        mm, buf = self.mm, ch.buf
        g, b = x.shape[0], x.shape[1]
        k = ch.size // g
        w0, b0 = ch.views[0]
        o0 = w0.shape[1]
        if k > 1:
            zg = mm.baddbmm(b0.view(g, 1, k * o0), x, w0.view(g, k * o0, -1).transpose(1, 2),
                            out=buf("z0g", (g, b, k * o0)))
            z = buf(("z", 0), (ch.size, b, o0))
            z.view(g, k, b, o0).copy_(zg.view(g, b, k, o0).transpose(1, 2))
            return z
        return mm.baddbmm(b0.unsqueeze(1), x, w0.transpose(1, 2), out=buf(("z", 0), (ch.size, b, o0)))

    def _first_linear_grad(self, ch: Chunk, x: torch.Tensor, dz: torch.Tensor) -> None:
        """The first Linear's weight and bias gradients from dz (C, b, o0)."""
        mm = self.mm
        g, b = x.shape[0], x.shape[1]
        k = ch.size // g
        gw0, gb0 = ch.grad_views[0]
        o0 = gw0.shape[1]
        if k > 1:
            dzg = ch.buf("dz0g", (g, b, k * o0))
            dzg.view(g, b, k, o0).copy_(dz.view(g, k, b, o0).transpose(1, 2))
            mm.bmm(dzg.transpose(1, 2), x, out=gw0.view(g, k * o0, -1))
        else:
            mm.bmm(dz.transpose(1, 2), x, out=gw0)
        torch.sum(dz, dim=1, out=gb0)

    def _drop(self, ch: Chunk, h: torch.Tensor, noise: torch.Tensor | None, off: int) -> int:
        """Multiply `h` (C, b, width) in place by its slice of `noise` from unit `off`; the next offset."""
        width = h.shape[2]
        if noise is None:
            return off + width
        sl = noise[:, :, off : off + width]
        if ch.drop_rows_all:
            h.mul_(sl)
        else:
            h.index_copy_(0, ch.drop_rows, h.index_select(0, ch.drop_rows) * sl)
        return off + width

    def _drop_grad(self, ch: Chunk, dz: torch.Tensor, scale: torch.Tensor | None) -> None:
        """Dropout's backward after ReLU's (the dropped units are already 0): times 1 / (1 - p)."""
        if scale is None:
            return
        sc = scale.view(-1, 1, 1)
        if ch.drop_rows_all:
            dz.mul_(sc)
        else:
            rows = ch.drop_rows
            dz.index_copy_(0, rows, dz.index_select(0, rows) * sc.index_select(0, rows))

    def _res_forward_backward(self, ch: Chunk, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """_forward_backward for a ResMLP: projections ReLU(Linear(h)) with the mode's dropout,
        blocks ReLU(h + fc2(dropout(ReLU(fc1(h))))), a Linear head.

        The backward keeps each step's input, its inner activation and its output: ReLU's
        gradient after the sum is 0 exactly where the output is 0 (output = ReLU(sum)), and the
        block's input gradient is the skip's (that gradient itself) plus the branch's.
        """
        mm, buf = self.mm, ch.buf
        views, gviews = ch.views, ch.grad_views
        b = x.shape[1]
        steps = self.res_steps
        assert steps is not None
        noise = block_noise = None
        if ch.dropout:
            keys = rng.step_keys(ch.drop_keys, ch.step)
            noise = self._noise(ch, keys, b)
            block_noise = self._noise(ch, keys, b, block=True) if ch.block_noise else noise

        def linear(layer: int, h: torch.Tensor | None, name: object) -> torch.Tensor:
            if layer == 0:
                return self._first_linear(ch, x)
            w, bias = views[layer]
            return mm.baddbmm(bias.unsqueeze(1), h, w.transpose(1, 2), out=buf(name, (ch.size, b, w.shape[1])))

        # The input of the first step is x itself only when it is a block (the first stack is
        # as wide as the input): batch_groups then gathers per member, so x is (C, b, n_in).
        h: torch.Tensor | None = x if x.shape[0] == ch.size else None
        saved: list[tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]] = []  # (input, inner, output)
        off = 0
        for i, st in enumerate(steps):
            a = linear(st.first, h, ("a", i)).relu_()
            off = self._drop(ch, a, noise if st.kind == "proj" else block_noise, off)
            if st.kind == "proj":
                saved.append((h, a, a))
                h = a
            else:
                assert h is not None
                out = linear(st.first + 1, a, ("s", i)).add_(h).relu_()
                saved.append((h, a, out))
                h = out
        head = len(views) - 1
        z = linear(head, h, "logits")

        y3 = y.unsqueeze(2)
        lse = torch.logsumexp(z, dim=2, keepdim=True)
        loss = (lse - z.gather(2, y3)).mean(dim=(1, 2))
        dz = torch.exp(z - lse)
        dz.scatter_add_(2, y3, torch.full_like(y3, -1, dtype=dz.dtype))
        dz.mul_(1.0 / b)

        flip = 0

        def grads(layer: int, d: torch.Tensor, inp: torch.Tensor, dinp: torch.Tensor | None) -> torch.Tensor:
            """Weight and bias gradients of Linear `layer` from its output gradient `d`; returns
            the gradient of its input (added to `dinp` if given) in a fresh buffer."""
            nonlocal flip
            w, _ = views[layer]
            gw, gb = gviews[layer]
            mm.bmm(d.transpose(1, 2), inp, out=gw)
            torch.sum(d, dim=1, out=gb)
            flip += 1
            dest = buf(("dh", flip % 3), (ch.size, b, w.shape[2]))
            if dinp is None:
                return mm.bmm(d, w, out=dest)
            return mm.baddbmm(dinp, d, w, out=dest)

        if head == 0:  # no hidden layer: logistic regression
            self._first_linear_grad(ch, x, dz)
            return loss
        dh = grads(head, dz, h, None)
        for i in range(len(steps) - 1, -1, -1):
            st = steps[i]
            inp, a, out = saved[i]
            if st.kind == "block":
                ds = torch.ops.aten.threshold_backward.grad_input(dh, out, 0, grad_input=dh)
                da = grads(st.first + 1, ds, a, None)
            else:
                ds, da = None, dh
            da = torch.ops.aten.threshold_backward.grad_input(da, a, 0, grad_input=da)
            if noise is not None:
                self._drop_grad(ch, da, ch.drop_scale if st.kind == "proj" else ch.block_scale)
            if st.first == 0:
                self._first_linear_grad(ch, x, da)
                break
            assert inp is not None
            dh = grads(st.first, da, inp, ds)
        return loss

    @torch.no_grad()
    def _res_logits(self, views: list[tuple[torch.Tensor, torch.Tensor]], z0: torch.Tensor, x: torch.Tensor,
                    m0: int, m1: int) -> torch.Tensor:
        """Logits (members m0..m1, rows, n_out) of a ResMLP whose first Linear gave z0; x (rows,
        n_in) is the input (the skip of a first block as wide as the input)."""
        mm = self.mm
        steps = self.res_steps
        assert steps is not None

        def linear(layer: int, h: torch.Tensor) -> torch.Tensor:
            if layer == 0:
                return z0
            w, bias = views[layer]
            return mm.baddbmm(bias[m0:m1].unsqueeze(1), h, w[m0:m1].transpose(1, 2))

        h = x
        for st in steps:
            a = torch.relu(linear(st.first, h))
            h = a if st.kind == "proj" else torch.relu(linear(st.first + 1, a) + h)
        return linear(len(views) - 1, h)

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
        budget = max(1, self.ex.eval_bytes // 8)  # floats: two live activations of 4 bytes
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
                    if self.res_steps is not None:
                        z = self._res_logits(views, z, x, m0, m1)
                    elif depth and self.fused:
                        from psa.core import kernels

                        h = kernels.stack_forward(z, flat, *self._stack_geometry(layout, m0), depth, arch.hidden[0],
                                                  precision=self.precision)
                        w, bias = views[depth]
                        z = mm.baddbmm(bias[m0:m1].unsqueeze(1), h, w[m0:m1].transpose(1, 2))
                    elif depth and self.cpu_step:  # -- the fused CPU evaluation: stack, head, argmax
                        correct[m0:m1] += cpu_stack.count_correct(z, flat, layout, m0, y_all[c0 : c0 + rows])
                        continue
                    else:
                        for w, bias in views[1:]:
                            z = mm.baddbmm(bias[m0:m1].unsqueeze(1), torch.relu(z), w[m0:m1].transpose(1, 2))
                    correct[m0:m1] += (z.argmax(dim=2) == y_all[c0 : c0 + rows]).sum(dim=1)
        return correct

    def test_accuracy(self) -> list[float]:
        """Test-set accuracy (%) of every member's bounty model (its LKG, unless it has patience)."""
        with self._stream_context():
            correct = self.count_correct(self.pop.bounty_model(), self.data.test_x, self.data.test_y)
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

    def _ablations(self, loop: int) -> tuple[tuple[tuple[int, int], ...], ...]:
        pop = self.pop
        return tuple(choose_neurons(pop.arch, mem.mode, mem.seed, loop, mem.variant, self.hp.meta_loops, pop.model)
                     for mem in pop.members)

    def _follow_schedules(self, loop: int) -> None:
        """Members on a mode schedule switch mode at a loop boundary, as `psa train --resume
        --mode` does: the new mode's rates (HParams.member), a mode_history entry, and chunks
        rebuilt for the new members (their dropout and decay are set up per chunk)."""
        pop = self.pop
        members = scheduled_members(tuple(pop.members), self.hp, loop, pop.mode_history)
        if members != tuple(pop.members):
            pop.members = members
            self._whole = None
            self._storage = None

    def _run_chunks(self, loop: int, ablated: tuple[tuple[tuple[int, int], ...], ...], on_step: StepCallback | None,
                    validate: bool) -> dict[str, torch.Tensor]:
        """Train every chunk for one epoch of `loop` (and, if `validate`, score and promote it);
        per-member outcomes as device tensors."""
        pop = self.pop
        dev = pop.device
        m = pop.size
        out = {"correct": torch.zeros(m, dtype=torch.int64, device=dev),
               "promoted": torch.zeros(m, dtype=torch.bool, device=dev),
               "loss": torch.zeros(m, dtype=torch.float32, device=dev),
               "diverged": torch.zeros(m, dtype=torch.bool, device=dev),
               "forced": torch.zeros(m, dtype=torch.bool, device=dev),
               "improved": torch.zeros(m, dtype=torch.bool, device=dev)}
        m0 = 0
        while m0 < m:
            m1 = min(m, m0 + self.chunk_size)
            ch = correct = None
            out_of_memory = retry = False
            try:
                ch = self._chunk(m0, m1)
                ablations = [(j - m0, pop.members[j].mode, *a) for j in range(m0, m1) for a in ablated[j]]
                ch.begin(self, loop, ablations)
                ch.train_epoch(self, on_step)
                fixed = [a for a in ablations if pop.members[m0 + a[0]].variant.fixed]
                if fixed:  # a fixed set stays dead: re-zeroed where it could regrow (output rows)
                    ch.refix(fixed)
                out["loss"][m0:m1] = ch.loss_sum / len(ch.batch_sizes())
                out["diverged"][m0:m1] = ch.diverged
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
                promote, forced, improved = self._promote(ch, correct)
                out["correct"][m0:m1] = correct
                out["promoted"][m0:m1] = promote
                out["forced"][m0:m1] = forced
                out["improved"][m0:m1] = improved
            m0 = m1
        return out

    def _promote(self, ch: Chunk, correct: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The promotion decision for chunk `ch`'s candidates, applied in place: LKG weights and
        scores, and the variants' state (bounty model, patience counters, AdamW state).

        The paper's engine: promote iff the candidate's validation count strictly beats the
        LKG's; a diverged candidate is scored like any other (the harness's rule: NaN logits
        predict class 0, see README) unless hparams.diverged is "discard", which never promotes
        it. With patience K (psa.core.variant): after `allowance` discarded candidates in a row
        the next one that did not diverge is promoted whatever its score (forced) and the allowance grows by the member's growth factor; a candidate
        that beats the bounty is promoted and resets the allowance to K. Returns (promote,
        forced, improved: the bounty was beaten) per member of the chunk."""
        pop, m0, m1 = self.pop, ch.m0, ch.m1
        lkg_correct = pop.lkg_correct[m0:m1]
        # which candidates may be promoted at all: all of them under the harness's rule
        ok = ~ch.diverged if self.hp.diverged == "discard" else torch.ones_like(ch.diverged)
        beats = ok & (correct > lkg_correct)
        promote, forced, improved = beats, torch.zeros_like(beats), beats
        if pop.streak is not None:
            assert pop.allowance is not None and pop.bounty_correct is not None and pop.bounty is not None
            k = to_device(torch.tensor([m.variant.patience for m in ch.members], dtype=torch.int64), correct.device)
            growth = to_device(torch.tensor([m.variant.patience_growth for m in ch.members], dtype=torch.int64),
                               correct.device)
            streak, allowance = pop.streak[m0:m1], pop.allowance[m0:m1]
            bounty_correct = pop.bounty_correct[m0:m1]
            promote, forced, improved = patience_decision(correct, beats, ok, ch.diverged, k, growth, streak,
                                                          allowance, bounty_correct)
            self._copy_rows(ch.cand_runs, pop.bounty, improved, m0, m1)
        lkg_correct.copy_(torch.where(promote, correct, lkg_correct))
        self._copy_rows(ch.cand_runs, pop.lkg, promote, m0, m1)
        ch.keep_optimizer(self, promote)
        return promote, forced, improved

    def _copy_rows(self, cand_runs: list[tuple[torch.Tensor, torch.Tensor]], dest: torch.Tensor, mask: torch.Tensor,
                   m0: int, m1: int) -> None:
        """Members m0.. of the flat buffer `dest` take the candidate's weights where `mask`."""
        p = mask.view(1, -1, 1)
        for (cw, cb), (lw, lb) in zip(cand_runs, self.pop.layout.runs(dest)):
            lw, lb = lw[:, m0:m1], lb[:, m0:m1]
            # in place (out= is the destination itself): no temporary the size of a layer run
            torch.where(p, cw, lw, out=lw)
            torch.where(p, cb, lb, out=lb)

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
        self._follow_schedules(loop)
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
            out = self._run_chunks(loop, ((),) * self.pop.size, on_step, validate=False)
        return out["loss"], out["diverged"]


def kernel_launches(arch: Arch, members: list[Member] | tuple[Member, ...], data: Dataset, hparams: HParams,
                    ex: Execution, model: str = DEFAULT_MODEL) -> list[Any]:
    """The Triton launches (psa.core.kernels.Launch) that a meta-loop and the test of a population of
    `members` of `arch` would make under `ex` (trained whole, as one chunk), for
    kernels.precompile(). Found by running the step and the evaluations on the meta device with
    the kernels recording: the same code, so the same arguments, but only shapes and offsets,
    nothing allocated or computed. Empty where such an engine would not use Triton."""
    from psa.core import kernels

    if not ex.triton:
        return []
    meta = torch.device("meta")
    mdata = dataclasses.replace(data, **{f: torch.empty(getattr(data, f).shape, dtype=getattr(data, f).dtype,
                                                        device=meta)
                                         for f in ("train_x", "train_y", "val_x", "val_y", "test_x", "test_y")})
    members = tuple(sorted(members, key=lambda mem: mem.seed))  # as Population.create keeps them
    layout = Layout.of(arch, len(members), model)
    pop = Population(arch, members, meta, layout, torch.empty(layout.numel, device=meta),
                     torch.full((len(members),), -1, dtype=torch.int64, device=meta), mdata.val_y.numel(),
                     [0] * len(members))
    eng = Engine(pop, mdata, hparams, dataclasses.replace(ex, device=meta, graphs=False, max_members=None))
    ch = eng._chunk(0, pop.size)
    g = ch.groups[0]
    with kernels.recording() as launches, torch.no_grad():
        for b in sorted(set(ch.batch_sizes())):
            x = ch.buf("x", (g * b, mdata.train_x.shape[1])).view(g, b, -1)
            eng._forward_backward(ch, x, torch.empty((ch.size, b), dtype=torch.int64, device=meta))
        eng.count_correct(ch.cand, mdata.val_x, mdata.val_y, ch.layout)
        eng.count_correct(pop.lkg, mdata.test_x, mdata.test_y)
    return launches
