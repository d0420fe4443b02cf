"""Studies of your own model (`--model module:function`): the model kind (psa.study.kinds) whose
nets are factories, trained by psa.core.module.engine.ModuleEngine.

- Data: a model of your own sees its data set's images as images: (N, 1, 28, 28) for MNIST and
  Fashion-MNIST, (N, 3, 32, 32) for CIFAR-10; an npz data set's rows stay flat (N, features).
- Checked before anything is written: every factory is imported, built and inspected on the
  data (its unit layers, its variants' settings), one DesignError line where it cannot train.
- Stored with the study: what each factory built (its unit layers, parameters and a fingerprint,
  checked on every resume) and whether its members train together through vmap or one at a time
  (--batched, or psa.core.module.engine's rule), which every resume keeps: the two paths round
  differently.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import sys
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from psa.core.data import Dataset
from psa.core.device import Execution
from psa.core.errors import ConfigError
from psa.core.loop import EVAL_ROWS
from psa.core.module.checkpoint import ModuleCheckpoint, module_checkpoint_from
from psa.core.module.engine import ModuleEngine, VmapCheck, batching_text, choose_batching, convolutions, vmap_check
from psa.core.module.factory import MakeModel, resolve_factory
from psa.core.module.population import ModulePopulation
from psa.core.module.units import check_member
from psa.study.design import DesignError, StudyDesign
from psa.study.options import RunOptions, StudyError
from psa.study.plan import PopulationPlan

# The shape of one example of the data sets psa ships or reads, for models that take images.
IMAGE_SHAPES = {"mnist": (1, 28, 28), "fashion-mnist": (1, 28, 28), "cifar10": (3, 32, 32)}
BATCHED_FLAGS = ("auto", "yes", "no")
# studies created before batched="auto" trained every model's members together
BATCHED_BEFORE_AUTO = (True, "created before batched='auto', when every module model trained this way")


def input_shape(data: Dataset) -> tuple[int, ...]:
    """The shape of one example as a model of your own receives it (without the batch dimension)."""
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


_FACTORIES: dict[str, MakeModel] = {}


def make_model(factory: str, root: str | None = None) -> MakeModel:
    """The function `factory` (module:function) names, imported once per process; `root`: a
    directory its module may live in (the study's driver's working directory: a Ray worker
    runs elsewhere), searched after sys.path."""
    if factory not in _FACTORIES:
        if root is not None and root not in sys.path:
            sys.path.append(root)
        _FACTORIES[factory] = resolve_factory(factory)
    return _FACTORIES[factory]


@dataclass(frozen=True)
class ModuleInfo:
    """A factory's model, as built for trial 1 and checked on the data."""

    factory: str  # module:function
    layers: str  # its unit layers and their widths ("0[8], 2[16], 5[10]")
    units: int  # ablatable units (output features and channels)
    params: int  # trainable parameters
    buffer_numel: int  # elements of its buffers (BatchNorm statistics, ...)
    flops: int | None  # forward FLOPs per example (matmuls and convolutions), None if not countable
    activations: int  # output elements of every leaf module per example: what a step keeps
    fingerprint: str  # SHA-256 of its state_dict's names, shapes and dtypes and its unit layers
    notes: tuple[str, ...] = ()
    convolutions: tuple[str, ...] = ()  # its convolution modules (what batched="auto" looks at)
    vmap_error: str | None = None  # why torch.func.vmap cannot batch it (psa.core.module.engine.vmap_check)
    vmap_slow: str | None = None  # an operation vmap batches only by looping over the members
    # per unit layer, whether an ablation there persists (ModelSpec.summary_rows), and as lines
    persistence: tuple[dict[str, Any], ...] = ()
    persistence_lines: tuple[str, ...] = ()

    @property
    def vmap(self) -> VmapCheck:
        """What trying vmap on the model found."""
        return VmapCheck(self.vmap_error, self.vmap_slow)

    def bytes_per_member(self, batch_size: int, eval_rows: int = EVAL_ROWS) -> int:
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


def inspect_factory(factory: str, design: StudyDesign, data: Dataset) -> ModuleInfo:
    """Build `factory`'s model for trials 1 and 2 of every mode of `design` and check it on `data` (a
    ConfigError line if it cannot be imported, is no nn.Module, has no Linear/Conv layer, does
    not map a batch to the data's classes, or lacks what a mode or a variant needs); what it is."""
    data = module_data(data)
    sample = dataclasses.replace(data, train_x=data.train_x[:2].cpu(), train_y=data.train_y[:2].cpu(),
                                 val_x=data.val_x[:1].cpu(), val_y=data.val_y[:1].cpu(),
                                 test_x=data.test_x[:1].cpu(), test_y=data.test_y[:1].cpu())
    # trial 2 too: a factory that builds another model for another seed is refused before anything is written
    members = [design.member(m, k) for m in design.modes for k in range(1, min(design.trials, 2) + 1)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pop = ModulePopulation.create(make_model(factory), members, sample, "cpu", n_classes=data.n_classes,
                                      factory=factory)
    # the persistence notes are said by the study's table of verdicts (ModuleModels.announce)
    tabled = {f"psa: {n}" for n in pop.spec.persistence_notes}
    notes = tuple(str(w.message) for w in caught if str(w.message) not in tabled)
    for name, mode, v in ((name, mode, v) for mode, name, v in design.conditions() if name):
        try:
            check_member(pop.spec, design.member(mode, 1, v), factory)
        except ConfigError as e:
            raise DesignError(f"variant {name!r} in mode {mode}: {e}") from None
    assert pop.template is not None
    model = pop.template.eval()
    x = sample.train_x[:1]
    shapes = sorted((k, tuple(v.shape), str(v.dtype)) for k, v in model.state_dict().items())
    fingerprint = hashlib.sha256(json.dumps([shapes, pop.spec.describe()]).encode()).hexdigest()
    check = vmap_check(pop, sample)
    return ModuleInfo(factory, pop.spec.describe(), sum(layer.units for layer in pop.spec.layers),
                      sum(p.numel() for p in model.parameters()), sum(b.numel() for b in model.buffers()),
                      _flops(model, x), _activations(model, x), fingerprint, notes, convolutions(model),
                      check.error, check.slow, tuple(pop.spec.summary_rows()), tuple(pop.spec.persistence_lines()))


class ModuleModels:
    """A model of your own: the design's nets are factories (module:function), each checked on
    the data once (check) and trained by ModuleEngine on the path the study stored."""

    noun = "models"

    def __init__(self, design: StudyDesign) -> None:
        self.design = design
        self.infos: dict[str, ModuleInfo] = {}  # per factory, once check() has run
        self.batching: dict[str, tuple[bool, str]] = {}  # per factory: (members together, why)
        # where the factories are imported from: the command's working directory, which a Ray
        # worker (started in a directory of Ray's) adds to its path (a cluster's nodes need the
        # module at the same path, or installed)
        self.import_root = os.getcwd()

    def data_view(self, data: Dataset) -> Dataset:
        """Images as images (module_data)."""
        return module_data(data)

    def check(self, data: Dataset) -> list[str]:
        """Import, build and inspect every factory on `data` (already data_view'd); their notes."""
        self.infos = {f: inspect_factory(f, self.design, data) for f in self.design.nets}
        return [note for info in self.infos.values() for note in info.notes]

    def precision(self, opt: RunOptions, device: torch.device) -> str:
        """fp32 through torch.func: psa's precisions, kernels and graphs are its own engine's."""
        if opt.precision not in ("auto", "fp32"):
            raise DesignError(f"--precision {opt.precision} applies to psa's own engine; a model given as "
                              f"module:function trains in fp32")
        if opt.batched not in BATCHED_FLAGS:
            raise DesignError(f"--batched must be one of {', '.join(BATCHED_FLAGS)}, got {opt.batched!r}")
        return "fp32"

    def record(self, device: torch.device, opt: RunOptions) -> dict[str, Any]:
        """What each factory built, checked on every resume (a factory is named, not stored), and
        the path its members train on (--batched, else the rule on `device`), kept by every resume."""
        asked: bool | str = "auto" if opt.batched == "auto" else opt.batched == "yes"
        self.batching = {}
        for f, info in self.infos.items():
            try:
                together, why = choose_batching(asked, info.convolutions, device, info.vmap, f)
            except ConfigError:
                raise DesignError(f"--batched yes: torch.func.vmap cannot batch {f} ({info.vmap_error}); train it with "
                                  f"--batched no (or auto)") from None
            self.batching[f] = (together, why if opt.batched == "auto" else f"--batched {opt.batched}")
        # the persistence verdicts are stored for the report, which reads them without importing the factory
        return {"modules": {f: {"layers": m.layers, "params": m.params, "fingerprint": m.fingerprint,
                                "batched": self.batching[f][0], "batching": self.batching[f][1],
                                "units": list(m.persistence)}
                            for f, m in self.infos.items()}}

    def restore(self, stored_plan: dict[str, Any], name: str, opt: RunOptions,
                recorded: dict[str, int]) -> dict[str, Any]:
        """Every factory must build what it built when the study was created, and keeps its path:
        --batched may ask for the other one only where the factory has recorded no meta-loop yet
        (a study that failed on one path resumes on the other), which the stored plan then says;
        else StudyError (the two paths round differently: no factory mixes them)."""
        built = stored_plan.get("modules", {})
        changed = False
        for f in self.design.nets:
            was = built.get(f, {})
            info = self.infos.get(f)
            if info is not None and was.get("fingerprint") != info.fingerprint:
                raise StudyError(f"study {name!r}: {f} now builds another model ({info.layers}, "
                                 f"{info.params:,} parameters) than the study was created with "
                                 f"({was.get('layers', '?')}, {_count(was.get('params'))} parameters): refusing to mix "
                                 f"them (give another --name to start a new study)")
            self.batching[f] = ((bool(was["batched"]), str(was.get("batching", ""))) if "batched" in was
                                else BATCHED_BEFORE_AUTO)
            if opt.batched == "auto" or self.batching[f][0] == (opt.batched == "yes"):
                continue
            if recorded.get(f, 0) > 0:
                raise StudyError(f"study {name!r} trains {f} with --batched {'yes' if self.batching[f][0] else 'no'} "
                                 f"({self.batching[f][1]}) and has recorded {recorded[f]} meta-loops so; resume it "
                                 f"with the same (or omit --batched)")
            info = self.infos.get(f)
            if opt.batched == "yes" and info is not None and info.vmap_error is not None:
                raise StudyError(f"--batched yes: torch.func.vmap cannot batch {f} ({info.vmap_error})")
            self.batching[f] = (opt.batched == "yes", f"--batched {opt.batched} on a resume, before any meta-loop "
                                                      f"of it was recorded")
            changed = True
        if not changed:
            return {}
        return {"modules": {f: {**built.get(f, {}), "batched": self.batching[f][0], "batching": self.batching[f][1]}
                            for f in self.design.nets}}

    def announce(self) -> list[str]:
        """Each factory's path, then once per factory whether an ablation persists in each of its
        unit layers (docs/module.md#what-it-does-precisely, "Persistence"): where it regrows, a
        `hidden` result is no lasting ablation, which a reader of the results needs to know."""
        lines = [f"{f}: {batching_text(*self.batching[f])}" for f in self.design.nets if f in self.batching]
        for f in self.design.nets:
            info = self.infos.get(f)
            if info is not None and info.persistence_lines:
                lines.append(f"{f}: does an ablation persist? (per unit layer)")
                lines += [f"  {line}" for line in info.persistence_lines]
        return lines

    def trial_model(self, net: str) -> str:
        """The factory itself."""
        return net

    def population_size(self, budget: int) -> int:
        """Members per population that fit `budget` for the design's largest model, capped at a
        whole factory (all modes x all trials)."""
        worst = max(info.bytes_per_member(self.design.hparams.batch_size) for info in self.infos.values())
        return int(min(len(self.design.conditions()) * self.design.trials, max(1, budget // worst)))

    def bytes_per_member(self, net: str, data: Dataset, ex: Execution) -> int:
        """From what the factory built (ModuleInfo)."""
        info = self.infos.get(net) or inspect_factory(net, self.design, data)
        return info.bytes_per_member(self.design.hparams.batch_size)

    def loop_cost(self, pp: PopulationPlan) -> float:
        """A factory's cost is not modelled: by members."""
        return float(pp.size)

    def cost_terms(self, pp: PopulationPlan) -> tuple[float]:
        """By members, one term."""
        return (float(pp.size),)

    def facts(self, net: str, data: Dataset) -> dict[str, Any]:
        """What the factory built: parameters, forward FLOPs (torch's counter) and unit layers."""
        info = self.infos.get(net) or inspect_factory(net, self.design, data)
        batched, why = self.batching.get(net, BATCHED_BEFORE_AUTO)
        return {"params": info.params, "flops_per_example": info.flops, "layers": info.layers, "batched": batched,
                "batching": why}

    def new_trainer(self, pp: PopulationPlan, data: Dataset, ex: Execution, start: ModuleCheckpoint | None = None,
                    stream: Any = None) -> ModuleEngine:
        """A ModuleEngine on a fresh population of `pp`'s factory, continued from `start` if given,
        on the path the study stored."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # its notes were said once, when the study was checked
            pop = ModulePopulation.create(make_model(pp.net, self.import_root), pp.members(self.design), data,
                                          ex.device, n_classes=data.n_classes, factory=pp.net)
        if start is not None:
            start.restore(pop)
        batched, why = self.batching.get(pp.net, BATCHED_BEFORE_AUTO)
        return ModuleEngine(pop, data, self.design.hparams, batched=batched, batching=why)

    def parse_checkpoint(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> ModuleCheckpoint:
        """A module population's checkpoint, to be restored into a fresh population."""
        return module_checkpoint_from(tensors, meta)

    def start_net(self, start: ModuleCheckpoint) -> str:
        """The factory the checkpoint was trained from."""
        return start.factory

    def precompile(self, plans: list[PopulationPlan], ex: Execution, data: Dataset) -> list[Any]:
        """torch.func launches no Triton kernel of psa's."""
        return []


def _count(n: object) -> str:
    """A stored parameter count as the message prints counts (thousands separated), or ?."""
    return f"{n:,}" if isinstance(n, int) and not isinstance(n, bool) else "?"
