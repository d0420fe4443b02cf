"""The two kinds of model a study can train, behind one interface: psa's own nets (SimpleMLP and
ResMLP, psa.core.mlp) and a model of your own (a module:function factory, psa.core.module; its
kind lives in psa.study.modules). A command chooses the kind once, where it starts
(`model_kind(design)`), and everything below it (the driver, the backends, the dry run, the
progress display) asks the kind instead of asking which kind it is.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from psa.core.data import Dataset
from psa.core.device import Execution
from psa.core.loop import Trainer
from psa.core.mlp.checkpoint import population_from
from psa.core.mlp.engine import Engine, kernel_launches
from psa.core.mlp.memory import memory_paths
from psa.core.mlp.population import Population
from psa.core.model import flops_per_sample, param_count
from psa.core.precision import PrecisionError
from psa.core.precision import resolve as resolve_precision
from psa.study.cost import DEFAULT_CALIBRATION, auto_population_size, bytes_per_member, design_arch
from psa.study.design import DesignError, StudyDesign
from psa.study.options import RunOptions
from psa.study.plan import PopulationPlan


class ModelKind(Protocol):
    """What a study needs to know of the model it trains. The contract:

    - `check(data)` builds and checks every net of the design on its data before anything is
      written (DesignError, one line, where a net cannot train); a kind that keeps what it
      learns there (a factory's units, its path) keeps it for the methods below.
    - `precision(opt, device)` is the precision a new study on `device` trains in (its matrix
      products'), or a refusal (DesignError) where a flag of `opt` does not apply to this kind.
    - `record(device, opt)` is what the kind stores in a new study's plan (JSON); `restore(stored,
      name, opt, recorded)` reads it back on every later run (`recorded`: the meta-loops each net
      has recorded so far) and refuses (StudyError) to mix what changed, or returns what the
      stored plan must now say instead (a net that trained nothing yet may change its path).
    - `new_trainer(pp, data, ex, start, stream)` is the Trainer (psa.core.loop) of population `pp`
      on `data` (already data_view'd), from `start` (parse_checkpoint's result) or from scratch.
    - `parse_checkpoint(tensors, meta)` turns a checkpoint's contents (a Trainer's checkpoint()) back
      into a start (CheckpointError if they are not this kind's); `start_net(start)` is the net a
      start trains, in the form of a PopulationPlan's `net`.
    - Sizes and costs: `population_size(budget)`, `bytes_per_member(net, data, ex)` (device
      memory), `loop_cost(pp)` (a loop's relative work, analytic: the plan's order) and
      `cost_terms(pp)` (its positive terms, which add up to it: what a study's calibration
      fits to the shapes it probed, for those it did not, psa.study.calibration).
    """

    design: StudyDesign
    noun: str  # what the design's nets are, for people: "architectures" or "models"

    def data_view(self, data: Dataset) -> Dataset:
        """The data set as this kind's models take it."""

    def check(self, data: Dataset) -> list[str]:
        """Every net checked on `data` (DesignError if one cannot train); notes to print once."""

    def precision(self, opt: RunOptions, device: torch.device) -> str:
        """The precision a new study trains in (DesignError where a flag does not apply)."""

    def record(self, device: torch.device, opt: RunOptions) -> dict[str, Any]:
        """What a new study's plan stores of this kind (JSON)."""

    def restore(self, stored_plan: dict[str, Any], name: str, opt: RunOptions,
                recorded: dict[str, int]) -> dict[str, Any]:
        """Read a stored plan's record back; StudyError where this run may not continue it; the
        plan's keys to store anew (empty: nothing changes)."""

    def announce(self) -> list[str]:
        """Lines for the study's start, beside its plan."""

    def trial_model(self, net: str) -> str:
        """What the trials table records as a trial's model."""

    def population_size(self, budget: int) -> int:
        """Members per population that fit `budget` bytes."""

    def bytes_per_member(self, net: str, data: Dataset, ex: Execution) -> int:
        """Device memory one member of `net` needs to train under `ex`."""

    def loop_cost(self, pp: PopulationPlan) -> float:
        """A meta-loop's relative work (positive)."""

    def cost_terms(self, pp: PopulationPlan) -> tuple[float, ...]:
        """loop_cost's terms, one per kind of cost the kind models."""

    def facts(self, net: str, data: Dataset) -> dict[str, Any]:
        """What the dry run shows of a net: params, flops_per_example (forward, None if not
        countable) and its unit layers (text, "" where the architecture says it)."""

    def new_trainer(self, pp: PopulationPlan, data: Dataset, ex: Execution, start: Any = None,
                    stream: Any = None) -> Trainer:
        """The trainer of population `pp`."""

    def parse_checkpoint(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> Any:
        """A start from a checkpoint's contents (on the CPU)."""

    def start_net(self, start: Any) -> str:
        """The net a start trains."""

    def precompile(self, plans: list[PopulationPlan], ex: Execution, data: Dataset) -> list[Any]:
        """The Triton launches these populations will make (psa.core.kernels.triton_stack)."""


class OwnNets:
    """psa's own nets: the design's architectures as SimpleMLPs or ResMLPs (design.model),
    trained by psa.core.mlp.engine.Engine."""

    noun = "architectures"

    def __init__(self, design: StudyDesign) -> None:
        self.design = design

    def data_view(self, data: Dataset) -> Dataset:
        """The data as it is: flat rows."""
        return data

    def check(self, data: Dataset) -> list[str]:
        """Nothing to build: the design checked its architectures already."""
        return []

    def precision(self, opt: RunOptions, device: torch.device) -> str:
        """--precision, `auto` resolved for `device` (tf32 on a GPU); --batched is a model of
        your own's."""
        if opt.batched != "auto":
            raise DesignError("--batched applies to a model given as module:function (psa's own engine batches its "
                              "populations itself)")
        try:
            return resolve_precision(opt.precision, device)
        except PrecisionError as e:
            raise DesignError(str(e)) from None

    def record(self, device: torch.device, opt: RunOptions) -> dict[str, Any]:
        """Nothing beyond the design and the plan."""
        return {}

    def restore(self, stored_plan: dict[str, Any], name: str, opt: RunOptions,
                recorded: dict[str, int]) -> dict[str, Any]:
        """Nothing to read back."""
        return {}

    def announce(self) -> list[str]:
        """No lines of its own."""
        return []

    def trial_model(self, net: str) -> str:
        """The design's model: simplemlp or resmlp."""
        return self.design.model

    def population_size(self, budget: int) -> int:
        """As many members of the largest architecture as fit (psa.study.cost)."""
        return auto_population_size(self.design, budget)

    def bytes_per_member(self, net: str, data: Dataset, ex: Execution) -> int:
        """What the engine's paths under `ex` need per member (psa.core.mlp.memory)."""
        arch = data.arch(net)
        paths = memory_paths(arch, ex, self.design.model)
        return bytes_per_member(arch, self.design.hparams.batch_size, **paths)

    def loop_cost(self, pp: PopulationPlan) -> float:
        """psa.study.cost's rough time model."""
        d = self.design
        return DEFAULT_CALIBRATION.loop_seconds(design_arch(d, pp.net), pp.size, d.hparams.batch_size, d.n_train,
                                                d.model)

    def cost_terms(self, pp: PopulationPlan) -> tuple[float, float]:
        """The time model's compute (FLOPs) and per-layer-step terms: a deep narrow net is all
        the second, a wide one all the first, and a device prices them differently."""
        d = self.design
        return DEFAULT_CALIBRATION.loop_terms(design_arch(d, pp.net), pp.size, d.hparams.batch_size, d.n_train,
                                              d.model)

    def facts(self, net: str, data: Dataset) -> dict[str, Any]:
        """Parameters and forward FLOPs of the architecture."""
        arch = data.arch(net)
        return {"params": param_count(arch, self.design.model),
                "flops_per_example": flops_per_sample(arch, self.design.model), "layers": ""}

    def new_trainer(self, pp: PopulationPlan, data: Dataset, ex: Execution, start: Population | None = None,
                    stream: Any = None) -> Engine:
        """An Engine on a fresh population of `pp`, or on `start` moved to ex's device."""
        pop = start.to(ex.device) if start is not None else Population.create(
            data.arch(pp.net), pp.members(self.design), ex.device, n_val=data.val_y.numel(), model=self.design.model)
        return Engine(pop, data, self.design.hparams, ex, stream=stream)

    def parse_checkpoint(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> Population:
        """The population a checkpoint holds, on the CPU."""
        return population_from(tensors, meta, "cpu")

    def start_net(self, start: Population) -> str:
        """The population's architecture, in short form."""
        return start.arch.short

    def precompile(self, plans: list[PopulationPlan], ex: Execution, data: Dataset) -> list[Any]:
        """The Triton launches of one population per distinct shape (trials differ only in seeds)."""
        launches: list[Any] = []
        seen: set[tuple[str, int, tuple[str, ...]]] = set()
        for pp in plans:
            key = (pp.net, pp.size, pp.modes)
            if key not in seen:
                seen.add(key)
                launches += kernel_launches(data.arch(pp.net), pp.members(self.design), data, self.design.hparams,
                                            ex, self.design.model)
        return launches


def model_kind(design: StudyDesign) -> ModelKind:
    """The kind of model `design` trains: chosen here, once per command."""
    if design.is_module:
        from psa.study.modules import ModuleModels

        return ModuleModels(design)
    return OwnNets(design)


def count_nets(kind: ModelKind, n: int) -> str:
    """`n` of a kind's nets, for people: "1 architecture", "3 architectures"."""
    return f"{n} {kind.noun if n != 1 else kind.noun[:-1]}"
