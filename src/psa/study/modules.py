"""Studies of your own model: populations of a `module:function` factory (psa.core.generic)
behind the runner's engine interface, their checkpoints, and what a plan needs to know of them.

- Data: a module model sees its data set's images as images: (N, 1, 28, 28) for MNIST and
  Fashion-MNIST, (N, 3, 32, 32) for CIFAR-10; an npz data set's rows stay flat (N, features).
- ModuleRunEngine: psa.core.generic.ModuleEngine with psa.core.engine.Engine's face, launch()
  and PendingLoop.result(), so that PopulationRun, the local backend and the driver run it
  unchanged. torch.func trains synchronously: launch() runs the whole meta-loop.
- Checkpoints: the population's stacked parameters and buffers (its LKGs), LKG scores and
  engine variants' state (bounty model, patience counters, persistent AdamW moments and steps)
  as safetensors; members (with their variants), loop, bounty loops, mode histories and the
  factory's name as JSON. Everything ModuleEngine continues from: data order, dropout masks
  and ablations are functions of (seed, loop). The factory is named, never stored.
- check_factories: import, build and inspect every factory of a design on its data, its
  variants included (one ConfigError line on bad input), before a study writes anything.
- choose_batching: whether a new study trains each factory's members together (vmap) or one
  at a time (--batched, or psa.core.generic.auto_batched's rule); the study stores it.
- ModuleInfo: a factory's parameters, forward FLOPs (torch.utils.flop_counter) and activations
  per example: the dry run's table and the memory a member needs. ModuleProbe: a population
  of it timed here, meta-loops on a few batches, for the dry run's time estimate.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import statistics
import time
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from psa.core.checkpoint import FORMAT, CheckpointError, load_tensors, save_tensors
from psa.core.data import Dataset
from psa.core.engine import LoopResult
from psa.core.errors import ConfigError
from psa.core.generic import (
    Factory,
    ModuleEngine,
    ModulePopulation,
    auto_batched,
    check_member,
    convolutions,
    resolve_factory,
)
from psa.core.hparams import HParams
from psa.core.population import Member
from psa.core.variant import Variant
from psa.study.design import DesignError, StudyDesign

# The shape of one example of the data sets psa ships or reads, for models that take images.
IMAGE_SHAPES = {"mnist": (1, 28, 28), "fashion-mnist": (1, 28, 28), "cifar10": (3, 32, 32)}
KIND = "module-population"


def input_shape(data: Dataset) -> tuple[int, ...]:
    """The shape of one example as a module model receives it (without the batch dimension)."""
    shape = IMAGE_SHAPES.get(data.name)
    n = int(data.train_x[0].numel())
    return shape if shape is not None and math.prod(shape) == n else tuple(data.train_x.shape[1:])


def module_data(data: Dataset) -> Dataset:
    """`data` with its inputs viewed in input_shape (no copy)."""
    shape = input_shape(data)
    if tuple(data.train_x.shape[1:]) == shape:
        return data
    return dataclasses.replace(data, **{k: getattr(data, k).view(getattr(data, k).shape[0], *shape)
                                        for k in ("train_x", "val_x", "test_x")})


_FACTORIES: dict[str, Factory] = {}


def factory(spec: str) -> Factory:
    """The function `spec` (module:function) names, imported once per process."""
    if spec not in _FACTORIES:
        _FACTORIES[spec] = resolve_factory(spec)
    return _FACTORIES[spec]


# ---------------------------------------------------------------------------------------------
# What a factory builds


@dataclass(frozen=True)
class ModuleInfo:
    """A factory's model, as built for trial 1 and checked on the data."""

    spec: str  # module:function
    layers: str  # its unit layers and their widths ("0[8], 2[16], 5[10]")
    units: int  # ablatable units (output features and channels)
    params: int  # trainable parameters
    buffer_numel: int  # elements of its buffers (BatchNorm statistics, ...)
    flops: int | None  # forward FLOPs per example (matmuls and convolutions), None if not countable
    activations: int  # output elements of every leaf module per example: what a step keeps
    fingerprint: str  # SHA-256 of its state_dict's names, shapes and dtypes and its unit layers
    notes: tuple[str, ...] = ()
    convolutions: tuple[str, ...] = ()  # its convolution modules (what batched="auto" looks at)

    def bytes_per_member(self, batch_size: int, eval_rows: int = 2048) -> int:
        """Device memory one member needs, roughly: LKG, candidate, gradient and AdamW's two
        moments (fp32), its buffers twice, and a step's (or an evaluation block's) activations,
        with as much again as slack."""
        weights = 4 * (5 * self.params + 2 * self.buffer_numel)
        acts = 4 * self.activations * max(2 * batch_size, eval_rows)
        return 2 * (weights + acts)


def _flops(model: nn.Module, x: torch.Tensor) -> int | None:
    """Forward FLOPs of `model` on one example (torch's flop counter: matmuls and convolutions)."""
    try:
        from torch.utils.flop_counter import FlopCounterMode

        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            model(x)
        return int(counter.get_total_flops())
    except Exception:  # noqa: BLE001 - an estimate only: say it is unavailable
        return None


def _activations(model: nn.Module, x: torch.Tensor) -> int:
    """Output elements of every leaf module of `model` on one example."""
    total = 0

    def hook(m: nn.Module, inp: Any, out: Any) -> None:
        nonlocal total
        if torch.is_tensor(out):
            total += out.numel()

    handles = [m.register_forward_hook(hook) for m in model.modules() if not list(m.children())]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return total


def inspect_factory(spec: str, design: StudyDesign, data: Dataset) -> ModuleInfo:
    """Build `spec`'s model for trial 1 of every mode of `design` and check it on `data` (a
    ConfigError line if it cannot be imported, is no nn.Module, has no Linear/Conv layer, does
    not map a batch to the data's classes, or lacks what a mode or a variant needs); what it is."""
    data = module_data(data)
    sample = dataclasses.replace(data, train_x=data.train_x[:2].cpu(), train_y=data.train_y[:2].cpu(),
                                 val_x=data.val_x[:1].cpu(), val_y=data.val_y[:1].cpu(),
                                 test_x=data.test_x[:1].cpu(), test_y=data.test_y[:1].cpu())
    members = [design.member(m, 1) for m in design.modes]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pop = ModulePopulation.create(factory(spec), members, sample, "cpu", n_classes=data.n_classes)
    notes = tuple(str(w.message) for w in caught)
    for name, mode, v in ((name, mode, v) for mode, name, v in design.conditions() if name):
        try:
            check_member(pop.spec, design.member(mode, 1, v), spec)
        except ConfigError as e:
            raise DesignError(f"variant {name!r} in mode {mode}: {e}") from None
    assert pop.template is not None
    model = pop.template.eval()
    x = sample.train_x[:1]
    shapes = sorted((k, tuple(v.shape), str(v.dtype)) for k, v in model.state_dict().items())
    fingerprint = hashlib.sha256(json.dumps([shapes, pop.spec.describe()]).encode()).hexdigest()
    return ModuleInfo(spec, pop.spec.describe(), sum(layer.units for layer in pop.spec.layers),
                      sum(p.numel() for p in model.parameters()), sum(b.numel() for b in model.buffers()),
                      _flops(model, x), _activations(model, x), fingerprint, notes, convolutions(model))


def check_factories(design: StudyDesign, data: Dataset) -> dict[str, ModuleInfo]:
    """Every factory of a module design checked on its data (inspect_factory), its notes
    printed once as warnings."""
    infos = {spec: inspect_factory(spec, design, data) for spec in design.architectures}
    for info in infos.values():
        for note in info.notes:
            warnings.warn(note, RuntimeWarning, stacklevel=2)
    return infos


BATCHED_FLAGS = ("auto", "yes", "no")


def choose_batching(infos: dict[str, ModuleInfo], device: torch.device, requested: str = "auto"
                    ) -> dict[str, tuple[bool, str]]:
    """How a new study trains each factory's members: (together through vmap, why), as
    `--batched` asks (yes, no), or by psa.core.generic.auto_batched's rule (auto) on `device`.
    The study stores it, so that a resume on another device trains on the same path."""
    if requested not in BATCHED_FLAGS:
        raise DesignError(f"--batched must be one of {', '.join(BATCHED_FLAGS)}, got {requested!r}")
    if requested != "auto":
        return {spec: (requested == "yes", f"--batched {requested}") for spec in infos}
    return {spec: (b, f"auto: {why}") for spec, (b, why) in
            ((spec, auto_batched(info.convolutions, device)) for spec, info in infos.items())}


def batching_text(batched: bool, why: str) -> str:
    """For people: "the members together (vmap): why" or "one member at a time: why"."""
    return f"{'the members together (vmap)' if batched else 'one member at a time'} ({why})"


def auto_population_size(design: StudyDesign, budget: int, infos: dict[str, ModuleInfo]) -> int:
    """Members per population that fit `budget` for the design's largest model, capped at a
    whole factory (all modes x all trials)."""
    worst = max(info.bytes_per_member(design.hparams.batch_size) for info in infos.values())
    return int(min(len(design.conditions()) * design.trials, max(1, budget // worst)))


# ---------------------------------------------------------------------------------------------
# The engine the runner drives


@dataclass
class DoneLoop:
    """A meta-loop ModuleEngine has already run: PendingLoop's face for the runner."""

    loop_result: LoopResult

    def ready(self) -> bool:
        """Always True: the loop ran in launch()."""
        return True

    def result(self) -> LoopResult:
        """The loop's LoopResult."""
        return self.loop_result


class ModuleRunEngine:
    """A ModuleEngine as the runner sees an Engine: launch() -> result(), test_accuracy()."""

    def __init__(self, engine: ModuleEngine) -> None:
        self.engine = engine
        self.pop = engine.pop

    def launch(self, on_step: Any = None) -> DoneLoop:
        """Run the next meta-loop (torch.func trains synchronously; `on_step` is not called)."""
        return DoneLoop(self.engine.meta_loop())

    def meta_loop(self, on_step: Any = None) -> LoopResult:
        """One meta-loop: launch().result()."""
        return self.launch(on_step).result()

    def test_accuracy(self) -> list[float]:
        """Test accuracy (%) of every member's LKG."""
        return self.engine.test_accuracy()


def new_population(spec: str, members: list[Member], data: Dataset, device: torch.device,
                   start: "ModuleCheckpoint | None" = None) -> ModulePopulation:
    """A population of `spec`'s model on `device` (data already shaped by module_data): fresh,
    or continued from a checkpoint."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its notes were said once, when the study was checked
        pop = ModulePopulation.create(factory(spec), members, data, device, n_classes=data.n_classes)
    if start is not None:
        start.restore(pop)
    return pop


def new_engine(pop: ModulePopulation, data: Dataset, hparams: HParams, batched: bool) -> ModuleRunEngine:
    """The engine of a module population, as the runner drives it: its members trained
    together (`batched`, vmap) or one at a time, as the study chose (choose_batching)."""
    return ModuleRunEngine(ModuleEngine(pop, data, hparams, batched=batched))


# ---------------------------------------------------------------------------------------------
# Checkpoints


def _member_rows(members: tuple[Member, ...] | list[Member]) -> list[list[Any]]:
    # a fifth entry, the variant's settings, only for members that are not the paper's engine
    # (as psa.core.checkpoint.save_population writes them)
    return [[m.mode, m.seed, m.weight_decay, m.dropout, *([m.variant.settings()] if not m.variant.is_default else [])]
            for m in members]


# The variant state (psa.core.generic.ModulePopulation) in a checkpoint, under the names of
# psa.core.population.Population.variant_state: per-member tensors as they are, per-tensor
# dicts (the bounty model's parameters and buffers, AdamW's moments) as "name.<state_dict key>".
VARIANT_VECTORS = ("bounty_correct", "streak", "allowance", "opt_step")
VARIANT_DICTS = ("bounty", "opt_avg", "opt_sq")


def variant_tensors(pop: ModulePopulation) -> dict[str, torch.Tensor]:
    """The variant state `pop` holds (bounty model, patience counters, persistent AdamW state),
    flat, by checkpoint name."""
    out: dict[str, torch.Tensor] = {}
    for name in VARIANT_DICTS:
        d = getattr(pop, name)
        if d is not None:
            out.update({f"{name}.{k}": v for k, v in d.items()})
    out.update({name: getattr(pop, name) for name in VARIANT_VECTORS if getattr(pop, name) is not None})
    return out


def save_module_population(path: str | os.PathLike, pop: ModulePopulation, spec: str,
                           extra: dict[str, Any] | None = None) -> None:
    """Everything ModuleEngine needs to continue `pop` exactly, written atomically: its LKGs,
    and its variant state where some member has one."""
    tensors = {**{f"param.{k}": v for k, v in pop.params.items()},
               **{f"buffer.{k}": v for k, v in pop.buffers.items()}, "lkg_correct": pop.lkg_correct,
               **variant_tensors(pop)}
    meta = {"format": FORMAT, "kind": KIND, "factory": spec, "members": _member_rows(pop.members), "loop": pop.loop,
            "bounty_loop": pop.bounty_loop, "n_val": pop.n_val, "mode_history": pop.mode_history, **(extra or {})}
    save_tensors(path, tensors, meta)


@dataclass
class ModuleCheckpoint:
    """A module population's checkpoint, read (CPU tensors), to be restored into a fresh one."""

    factory: str
    members: tuple[Member, ...]  # in the modes of the checkpoint's loop (a schedule may have moved them)
    loop: int
    bounty_loop: list[int]
    n_val: int
    params: dict[str, torch.Tensor]
    buffers: dict[str, torch.Tensor]
    lkg_correct: torch.Tensor
    mode_history: list[list[tuple[str, int]]]
    variant: dict[str, torch.Tensor]  # variant_tensors' names

    def restore(self, pop: ModulePopulation) -> None:
        """Overwrite `pop` (built fresh from the same factory and members) with this state."""
        if [m.key for m in pop.members] != [m.key for m in self.members] or pop.n_val != self.n_val:
            raise CheckpointError("its members differ from the population's")
        for mine, theirs, what in ((self.params, pop.params, "parameters"), (self.buffers, pop.buffers, "buffers")):
            if set(mine) != set(theirs) or any(mine[k].shape != theirs[k].shape for k in mine):
                raise CheckpointError(f"its {what} do not match what the factory {self.factory} builds now")
        fresh = variant_tensors(pop)  # what the members need, allocated by create()
        if set(fresh) != set(self.variant) or any(fresh[k].shape != v.shape for k, v in self.variant.items()):
            raise CheckpointError("its variant state does not match its members")
        with torch.no_grad():
            for store, saved in ((pop.params, self.params), (pop.buffers, self.buffers)):
                for k, v in saved.items():
                    store[k].copy_(v)
            pop.lkg_correct.copy_(self.lkg_correct)
            for k, v in self.variant.items():
                fresh[k].copy_(v)  # views of the population's own tensors: dtypes and device kept
        pop.bounty_loop = list(self.bounty_loop)
        pop.loop = self.loop
        pop.members = self.members
        pop.mode_history = [list(h) for h in self.mode_history]


def load_module_population(path: str | os.PathLike) -> tuple[ModuleCheckpoint, dict[str, Any]]:
    """Read a checkpoint written by save_module_population: (checkpoint, metadata)."""
    tensors, meta = load_tensors(path)
    if meta.get("kind") != KIND:
        raise CheckpointError(f"{path}: not a module population checkpoint")
    try:
        members = tuple(Member(str(a), int(b), float(c), float(d), Variant.from_settings(v[0]) if v else Variant())
                        for a, b, c, d, *v in meta["members"])
        history = meta.get("mode_history")  # absent in checkpoints from before variants: one mode each
        ckpt = ModuleCheckpoint(
            factory=str(meta["factory"]), members=members, loop=int(meta["loop"]),
            bounty_loop=[int(x) for x in meta["bounty_loop"]], n_val=int(meta["n_val"]),
            params={k[6:]: v for k, v in tensors.items() if k.startswith("param.")},
            buffers={k[7:]: v for k, v in tensors.items() if k.startswith("buffer.")},
            lkg_correct=tensors["lkg_correct"].to(torch.int64),
            mode_history=([[(str(m), int(t)) for m, t in h] for h in history] if history is not None
                          else [[(m.mode, 1)] for m in members]),
            variant={k: v for k, v in tensors.items()
                     if k in VARIANT_VECTORS or k.partition(".")[0] in VARIANT_DICTS})
    except (KeyError, TypeError, ValueError, ConfigError) as e:
        raise CheckpointError(f"{path}: incomplete module population checkpoint ({e})") from None
    m = len(members)
    if ckpt.lkg_correct.shape != (m,) or len(ckpt.bounty_loop) != m or len(ckpt.mode_history) != m or any(
            v.dim() == 0 or v.shape[0] != m for v in (*ckpt.params.values(), *ckpt.buffers.values(),
                                                      *ckpt.variant.values())):
        raise CheckpointError(f"{path}: tensor sizes do not match its {m} members")
    return ckpt, meta


# ---------------------------------------------------------------------------------------------
# Timing (the dry run's estimate)

EVAL_IMAGES = 1_000  # validation images of a probe's meta-loops


@dataclass(frozen=True)
class ModuleProbe:
    """A population of one factory timed on this device by ModuleEngine itself."""

    members: int
    setup_s: float  # building the population and its engine
    step_s: float  # one training step of every member
    eval_image_s: float  # scoring every member on one image (validation and test)
    loop_extra_s: float  # a meta-loop's time beyond its steps and scoring
    spread: float  # half the range of the repeated loops' timings, over their median

    def population_seconds(self, design: StudyDesign, size: int, n_val: int, n_test: int) -> float:
        """Wall seconds of a population of `size` members (per-member terms scaled linearly)."""
        scale = size / self.members
        steps = -(-design.n_train // design.hparams.batch_size)
        loop = scale * (steps * self.step_s + n_val * self.eval_image_s) + self.loop_extra_s
        return scale * (self.setup_s + n_test * self.eval_image_s) + design.hparams.meta_loops * loop


def probe_factory(spec: str, design: StudyDesign, data: Dataset, members: list[Member], device: torch.device,
                  batched: bool, steps: tuple[int, int] = (2, 8), repeats: int = 3) -> ModuleProbe:
    """Time a population of `members` of `spec` on `device` (data shaped by module_data), on
    the path the study trains it (`batched`): whole meta-loops on the first s1 and s2 training
    batches and EVAL_IMAGES validation images, whose difference is the cost of a step, and the
    scoring of those images."""
    from psa.core.device import synchronize

    bs = design.hparams.batch_size
    n_eval = min(EVAL_IMAGES, int(data.val_y.numel()))
    full = -(-design.n_train // bs)
    s1, s2 = min(steps[0], full), min(steps[1], full)

    def engine(s: int) -> ModuleEngine:
        n = min(design.n_train, s * bs)
        sub = dataclasses.replace(data, train_x=data.train_x[:n], train_y=data.train_y[:n],
                                  val_x=data.val_x[:n_eval], val_y=data.val_y[:n_eval])
        return ModuleEngine(new_population(spec, members, sub, device), sub, design.hparams, batched=batched)

    def timed(fn: Any) -> float:
        synchronize(device)
        t = time.perf_counter()
        fn()
        synchronize(device)
        return time.perf_counter() - t

    t = time.perf_counter()
    short = engine(s1)
    setup_s = time.perf_counter() - t
    long_ = engine(s2) if s2 > s1 else short
    short.meta_loop()  # warm-up (and vmap's check: a module it cannot batch falls back here)
    if long_ is not short:
        long_.meta_loop()
    t1 = [timed(short.meta_loop) for _ in range(repeats)]
    t2 = [timed(long_.meta_loop) for _ in range(repeats)] if long_ is not short else t1
    m1, m2 = statistics.median(t1), statistics.median(t2)
    eng = long_
    eval_image_s = timed(lambda: eng.count_correct(eng.pop.params, eng.pop.buffers, eng.data.val_x,
                                                   eng.data.val_y)) / n_eval
    if s2 > s1 and m2 > m1:
        step_s = (m2 - m1) / (s2 - s1)
    else:  # a training set of a few batches (or a busy machine): the loop's time beyond scoring
        step_s = max(0.0, m2 - n_eval * eval_image_s) / s2
    extra = max(0.0, m1 - s1 * step_s - n_eval * eval_image_s)
    return ModuleProbe(len(members), setup_s, step_s, eval_image_s, extra, (max(t2) - min(t2)) / 2 / m2)
