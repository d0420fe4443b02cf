"""The Frustration Engine on a population of psa's own nets: every member's meta-loop, in lockstep.

One meta-loop (NOTES.md): clone the LKG into a candidate, ablate one neuron in the ablative
modes (never in loop 1), train one epoch with a fresh AdamW, and promote the candidate iff its
validation accuracy strictly beats the LKG's. All members do this at once (psa.core.mlp.step:
one batched matmul per layer per step, the forward and backward by hand).

What the engine decides, once, and why:
- Its paths (psa.core.mlp.step.Paths): the Triton stack kernels for hidden stacks of one width
  on a GPU, the fused CPU step for narrow SimpleMLPs on a CPU, else torch's batched matmuls.
  A path chosen automatically that fails is turned off with one warning and the chunk retried.
- Members at once: all of them if they fit the device's free memory, else chunks of whole seed
  groups trained one after another within each loop (halved again on an out-of-memory error).
- CUDA graphs: on a GPU, with the whole population in one chunk, each training step is captured
  once and replayed (the step reads only tensors at fixed addresses).
- `launch` queues a loop and returns; its PendingLoop's `result()` waits. Ablation, promotion
  and weight decay act on strided views with device-side masks, so nothing waits for the device
  until a loop's results are read, and engines on their own CUDA streams keep one GPU busy
  together (psa.study runs several populations that way).
- Engine variants (psa.core.variant, docs/variants.md) are per-member settings on the same path:
  which neurons are zeroed, patience's promotion (psa.core.loop.promotion), the AdamW state kept
  with the LKG (Chunk.keep_optimizer) and mode schedules (at loop boundaries).
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from psa.core.kernels import cpu_stack
from psa.core.ablation import choose_neurons
from psa.core.arch import Arch
from psa.core.data import Dataset
from psa.core.device import (
    Execution,
    free_memory,
    is_out_of_memory,
    new_streams,
    on_device,
    release_cached,
    side_stream,
)
from psa.core.errors import ConfigError
from psa.core.hparams import HParams
from psa.core.loop import (
    Ablations,
    LoopResult,
    StepCallback,
    loop_result,
    note_once,
    promotion,
    scheduled_members,
)
from psa.core.member import Member
from psa.core.mlp import evaluate
from psa.core.mlp.checkpoint import population_checkpoint
from psa.core.mlp.chunk import Chunk, batch_groups
from psa.core.mlp.memory import FREE_MEMORY_FRACTION, stack_fits_kernel, stack_path_reason, working_bytes
from psa.core.mlp.population import Layout, Population
from psa.core.mlp.step import Paths, TrainStep
from psa.core.model import DEFAULT_MODEL, res_steps
from psa.core.precision import Matmul


@dataclass
class DeviceLoop:
    """A meta-loop queued on the device (psa.core.loop.PendingLoop); result() waits for it."""

    engine: "Engine"
    loop: int
    ablated: Ablations
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
        eng = self.engine
        outcome = {k: v.tolist() for k, v in self.host.items()}
        self._result = loop_result(eng.population, eng.hp, self.loop, self.ablated, outcome, self.t0)
        eng._pending = None
        return self._result


class Engine:
    """Runs meta-loops on a Population with a Dataset already on the population's device
    (psa.core.loop.Trainer)."""

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
        self.population = population
        self.data = data
        self.hp = hparams
        self.ex = ex
        triton_stack = stack_fits_kernel(arch, ex, population.model)
        if ex.triton and not triton_stack and len(set(arch.hidden)) > 1:
            note_once(f"psa: {arch.short} trains its hidden stack on the plain torch path: "
                      f"{stack_path_reason(arch, ex, population.model)}")
        # the fused CPU step reads the batch straight from the training set, which must then be
        # one contiguous block of rows
        cpu_step = (not triton_stack and population.model == DEFAULT_MODEL and data.train_x.is_contiguous()
                    and data.train_y.is_contiguous() and cpu_stack.step_fits_cpu(arch, ex))
        self.paths = Paths(arch, population.model, Matmul(ex.precision, population.device), ex.triton, triton_stack,
                           cpu_step, tuple(res_steps(arch)) if population.model == "resmlp" else None)
        self.step = TrainStep(self.paths, hparams, data, cpu_stack.input_codes(data.train_x) if cpu_step else None)
        self.members_at_once = self._members_at_once()
        self.use_graphs = ex.graphs and self.members_at_once >= population.size
        if stream is None and population.device.type == "cuda":
            stream = new_streams(population.device, 1, avoid=(side_stream(population.device),))[0]
        self.stream = stream
        self._whole: Chunk | None = None
        self._storage: tuple[torch.Tensor, torch.Tensor] | None = None
        self._pending: DeviceLoop | None = None

    # ---------------------------------------------------------------- members at once
    def _members_at_once(self) -> int:
        """All members if they fit the device's free memory (or the execution's max_members),
        else the most whole seed groups that do."""
        pop, ex = self.population, self.ex
        m = pop.size
        k = pop.groups()[1]
        limit = ex.max_members
        if limit is None:
            free = free_memory(pop.device)
            if free is None:
                return m
            budget = free * FREE_MEMORY_FRACTION - ex.eval_bytes
            triton_stack, precision = self.paths.triton_stack, self.paths.precision
            per = working_bytes(pop.arch, self.hp.batch_size, triton_stack, precision, ex.graphs, pop.model)
            limit = int(budget // per) if budget > 0 else 0
            if ex.graphs and limit < m:  # chunks train eagerly: no graph pool to hold
                per = working_bytes(pop.arch, self.hp.batch_size, triton_stack, precision, model=pop.model)
                limit = int(budget // per) if budget > 0 else 0
            if limit < 1:
                raise ConfigError(
                    f"one member of {pop.arch.short} needs about {per / 2**30:.2f} GiB to train; "
                    f"{pop.device} has {free / 2**30:.2f} GiB free")
        if limit >= m:
            return m
        return max(k, limit // k * k) if limit >= k else limit

    def _chunk(self, m0: int, m1: int) -> Chunk:
        pop = self.population
        n_train = self.data.train_x.shape[0]
        if (m0, m1) == (0, pop.size):
            if self._whole is None:
                self._whole = Chunk(pop, self.hp, n_train, 0, pop.size, torch.empty_like(pop.lkg),
                                    torch.empty_like(pop.lkg))
            return self._whole
        # chunks share one candidate/gradient store; each gets a fresh optimizer and workspace
        numel = Layout.of(pop.arch, self.members_at_once, pop.model).numel
        if self._storage is None or self._storage[0].numel() < numel:
            self._storage = (torch.empty(numel, device=pop.device), torch.empty(numel, device=pop.device))
        n = Layout.of(pop.arch, m1 - m0, pop.model).numel
        return Chunk(pop, self.hp, n_train, m0, m1, self._storage[0][:n], self._storage[1][:n])

    def _drop_chunks(self) -> None:
        self._whole = None
        self._storage = None

    def _shrink(self) -> None:
        """After an out-of-memory error: half as many members at once (whole seed groups)."""
        pop = self.population
        k = pop.groups()[1]
        if self.members_at_once <= 1:
            raise ConfigError(f"out of memory on {pop.device} training a single member of {pop.arch.short}")
        half = self.members_at_once // 2
        self.members_at_once = max(k, half // k * k) if half >= k else max(1, half)
        self.use_graphs = False
        self._drop_chunks()
        release_cached(pop.device)

    def _fall_back(self, e: Exception) -> bool:
        """After a failure in a fast path that was chosen automatically (the Triton kernels, then
        the CUDA graphs), say so once and retry the chunk without it; False if none is left."""
        if self.paths.triton and self.ex.kernels_fall_back:
            what = "the Triton kernels"
            self.paths = dataclasses.replace(self.paths, triton=False, triton_stack=False)
            self.step = dataclasses.replace(self.step, paths=self.paths, _pos_hash={})
        elif self.use_graphs:
            what, self.use_graphs = "CUDA graphs", False
        else:
            return False
        warnings.warn(f"psa: {what} failed on {self.population.device} ({type(e).__name__}: "
                      f"{str(e).splitlines()[0][:200]}); continuing without them", RuntimeWarning, stacklevel=2)
        self._drop_chunks()
        return True

    @property
    def cand(self) -> torch.Tensor:
        """The candidate buffer of a population trained in one chunk (its layout is the LKG's)."""
        return self._chunk(0, self.population.size).cand

    @property
    def groups(self) -> tuple[int, int]:
        """(G, k) batch groups of the whole population (see batch_groups)."""
        return batch_groups(self.population.arch, self.population.members)

    # ---------------------------------------------------------------- evaluation
    def count_correct(self, flat: torch.Tensor, x_all: torch.Tensor, y_all: torch.Tensor,
                      layout: Layout | None = None) -> torch.Tensor:
        """Correct predictions (M,) of every member's weights in `flat` (of `layout`, by default
        the population's) on (x_all, y_all) (psa.core.mlp.evaluate)."""
        with self._device_context():
            return evaluate.count_correct(self.paths, flat, x_all, y_all, layout or self.population.layout,
                                          self.ex.eval_bytes)

    def test_accuracy(self) -> list[float]:
        """Test-set accuracy (%) of every member's bounty model (its LKG, unless it has patience)."""
        with self._stream_context():
            correct = self.count_correct(self.population.bounty_model(), self.data.test_x, self.data.test_y)
            return [100.0 * c / self.data.test_y.numel() for c in correct.tolist()]

    def checkpoint(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The population's whole state as (tensors, metadata) (psa.core.mlp.checkpoint)."""
        return population_checkpoint(self.population)

    # ---------------------------------------------------------------- the meta-loop
    @contextlib.contextmanager
    def _stream_context(self) -> Iterator[None]:
        if self.stream is None:
            yield
            return
        with on_device(self.population.device):
            # inputs (LKG, data) were written on the caller's stream: order our work after it
            self.stream.wait_stream(torch.cuda.current_stream(self.population.device))
            with torch.cuda.stream(self.stream):
                yield

    @contextlib.contextmanager
    def _device_context(self) -> Iterator[None]:
        with on_device(self.population.device), self.paths.mm.context(), torch.no_grad():
            yield

    def _ablations(self, loop: int) -> Ablations:
        pop = self.population
        return tuple(choose_neurons(pop.arch, mem.mode, mem.seed, loop, mem.variant, self.hp.meta_loops, pop.model)
                     for mem in pop.members)

    def _follow_schedules(self, loop: int) -> None:
        """Members on a mode schedule switch mode at a loop boundary, as `psa train --resume
        --mode` does: the new mode's rates (HParams.member), a mode_history entry, and chunks
        rebuilt for the new members (their dropout and decay are set up per chunk)."""
        pop = self.population
        members = scheduled_members(tuple(pop.members), self.hp, loop, pop.mode_history)
        if members != tuple(pop.members):
            pop.members = members
            self._drop_chunks()

    def _run_chunks(self, loop: int, ablated: Ablations, on_step: StepCallback | None,
                    validate: bool) -> dict[str, torch.Tensor]:
        """Train every chunk for one epoch of `loop` (and, if `validate`, score and promote it);
        per-member outcomes as device tensors."""
        pop = self.population
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
            m1 = min(m, m0 + self.members_at_once)
            ch = correct = None
            out_of_memory = retry = False
            try:
                ch = self._chunk(m0, m1)
                ablations = [(j - m0, pop.members[j].mode, *a) for j in range(m0, m1) for a in ablated[j]]
                ch.begin(pop, loop, ablations, self.step, self.ex.graph_steps if self.use_graphs else 0)
                ch.train_epoch(self.step, on_step)
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
                assert ch is not None and correct is not None
                promote, forced, improved = self._promote(ch, correct)
                out["correct"][m0:m1] = correct
                out["promoted"][m0:m1] = promote
                out["forced"][m0:m1] = forced
                out["improved"][m0:m1] = improved
            m0 = m1
        return out

    def _promote(self, ch: Chunk, correct: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The promotion decision for chunk `ch`'s candidates (psa.core.loop.promotion), applied
        in place: LKG weights and scores, and the variants' state (bounty model, patience
        counters, AdamW state). Returns (promote, forced, improved) per member of the chunk."""
        pop, m0, m1 = self.population, ch.m0, ch.m1
        patience = None
        if pop.streak is not None:
            assert pop.allowance is not None and pop.bounty_correct is not None
            patience = (pop.streak[m0:m1], pop.allowance[m0:m1], pop.bounty_correct[m0:m1])
        promote, forced, improved = promotion(correct, ch.diverged, pop.lkg_correct[m0:m1], self.hp, ch.members,
                                              patience)
        if pop.bounty_state is not None:
            self._copy_rows(ch.cand_runs, pop.bounty_state, improved, m0, m1)
        self._copy_rows(ch.cand_runs, pop.lkg, promote, m0, m1)
        ch.keep_optimizer(pop, promote)
        return promote, forced, improved

    def _copy_rows(self, cand_runs: list[tuple[torch.Tensor, torch.Tensor]], dest: torch.Tensor, mask: torch.Tensor,
                   m0: int, m1: int) -> None:
        """Members m0.. of the flat buffer `dest` take the candidate's weights where `mask`."""
        p = mask.view(1, -1, 1)
        for (cw, cb), (lw, lb) in zip(cand_runs, self.population.layout.runs(dest)):
            lw, lb = lw[:, m0:m1], lb[:, m0:m1]
            # in place (out= is the destination itself): no temporary the size of a layer run
            torch.where(p, cw, lw, out=lw)
            torch.where(p, cb, lb, out=lb)

    def launch(self, on_step: StepCallback | None = None) -> DeviceLoop:
        """Queue one meta-loop for every member and return without waiting for the device.

        The population's LKG and scores move forward on the device; call .result() on the
        returned loop (before the next launch) for the outcome and the bounty loops.
        """
        if self._pending is not None:
            raise RuntimeError("the previous meta-loop's result() has not been read")
        t0 = time.perf_counter()
        pop = self.population
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
        self._pending = DeviceLoop(self, loop, ablated, host, event, t0)
        return self._pending

    def meta_loop(self, on_step: StepCallback | None = None) -> LoopResult:
        """One meta-loop for every member; the population's LKG state moves forward by one loop."""
        return self.launch(on_step).result()

    def train_epoch(self, loop: int, on_step: StepCallback | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One epoch of loop `loop` for every candidate (cloned from the LKG, not ablated, not
        scored or promoted): for calibration and benchmarks. Returns (mean loss, diverged)."""
        with self._stream_context(), self._device_context():
            out = self._run_chunks(loop, ((),) * self.population.size, on_step, validate=False)
        return out["loss"], out["diverged"]


def kernel_launches(arch: Arch, members: list[Member] | tuple[Member, ...], data: Dataset, hparams: HParams,
                    ex: Execution, model: str = DEFAULT_MODEL) -> list[Any]:
    """The Triton launches (psa.core.kernels.triton_stack.Launch) that a meta-loop and the test
    of a population of `members` of `arch` would make under `ex` (trained whole, as one chunk),
    for triton_stack.precompile(). Found by running the step and the evaluations on the meta
    device with the kernels recording: the same code, so the same arguments, but only shapes and
    offsets, nothing allocated or computed. Empty where such an engine would not use Triton."""
    from psa.core.kernels import triton_stack

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
    with triton_stack.recording() as launches, torch.no_grad():
        for b in sorted(set(ch.batch_sizes())):
            x = ch.buf("x", (g * b, mdata.train_x.shape[1])).view(g, b, -1)
            eng.step.forward_backward(ch, x, torch.empty((ch.size, b), dtype=torch.int64, device=meta))
        eng.count_correct(ch.cand, mdata.val_x, mdata.val_y, ch.layout)
        eng.count_correct(pop.lkg, mdata.test_x, mdata.test_y)
    return launches
