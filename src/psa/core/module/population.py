"""A population of a model of your own: every member's parameters and buffers stacked (M, ...),
LKG scores, bounty loops and the engine variants' state, as psa's own Population keeps them."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from psa.core.data import Dataset
from psa.core.device import canonical_device
from psa.core.errors import ConfigError
from psa.core.member import Member
from psa.core.module.factory import MakeModel, build, factory_name
from psa.core.module.units import ModelSpec, check_member, inspect_model
from psa.core.optim import step_dtype

TensorDict = dict[str, torch.Tensor]


def _check_same_model(models: dict[int, nn.Module], name: str) -> None:
    """ConfigError unless every seed's module has the first's parameters and buffers (names,
    shapes, dtypes): the members are stacked, so a factory must build one architecture."""
    def layout(m: nn.Module) -> dict[str, str]:
        return {k: f"{tuple(v.shape)} {str(v.dtype).removeprefix('torch.')}"
                for k, v in (*m.named_parameters(), *m.named_buffers())}

    (s0, m0), *rest = models.items()
    want = layout(m0)
    for s, m in rest:
        got = layout(m)
        if got != want:
            k = next(k for k in (*want, *got) if want.get(k) != got.get(k))
            raise ConfigError(f"{name} builds another model for seed {s} than for seed {s0} ({k}: "
                              f"{got.get(k, 'missing')}, not {want.get(k, 'missing')}); the factory must build the "
                              f"same architecture every call")


@dataclass
class ModulePopulation:
    """The persistent state of M trials of one model factory: LKG parameters and buffers
    stacked (M, ...), LKG scores, bounty loops, loops done; and the engine variants' state
    (psa.core.variant), present only where some member needs it, as in psa's Population."""

    make_model: MakeModel  # the factory
    spec: ModelSpec
    members: tuple[Member, ...]
    device: torch.device
    params: TensorDict
    buffers: TensorDict
    state_keys: tuple[str, ...]  # the module's state_dict keys (what a checkpoint holds)
    lkg_correct: torch.Tensor
    n_val: int
    bounty_loop: list[int]
    loop: int = 0
    template: nn.Module | None = field(default=None, repr=False)
    # patience: the bounty model (best ever, parameters and buffers), its score, the discards
    # in a row and the current allowance per member
    bounty_state: TensorDict | None = field(default=None, repr=False)
    bounty_correct: torch.Tensor | None = None
    streak: torch.Tensor | None = None
    allowance: torch.Tensor | None = None
    # optimizer_state "persist": the LKG's AdamW moments (per parameter) and step counts
    opt_avg: TensorDict | None = field(default=None, repr=False)
    opt_sq: TensorDict | None = field(default=None, repr=False)
    opt_step: torch.Tensor | None = None
    mode_history: list[list[tuple[str, int]]] = field(default_factory=list)  # (mode, from loop) per member
    factory: str = ""  # the factory's name as module:function (what checkpoints and studies record)
    frozen: frozenset[str] = frozenset()  # parameters built with requires_grad=False: never trained

    @classmethod
    def create(cls, make_model: MakeModel, members: list[Member] | tuple[Member, ...], data: Dataset,
               device: torch.device | str = "cpu", n_classes: int | None = None,
               factory: str | None = None) -> "ModulePopulation":
        """Fresh members (sorted by seed): each seed's initialisation by `make_model`, LKG score -1.
        The model is checked on a batch of the training data first (ConfigError if it cannot run),
        and every member's mode and variant against the model's units. `n_classes`: the logits
        the model must give (None: its own output width). `factory`: its name as module:function
        (default: its module and qualified name)."""
        if not members:
            raise ConfigError("a population needs at least one member")
        members = tuple(sorted(members, key=lambda mem: mem.seed))
        dev = canonical_device(device)
        name = factory or factory_name(make_model)
        models = {s: build(make_model, s) for s in sorted({mem.seed for mem in members})}
        if len({id(m) for m in models.values()}) < len(models):
            # every trial would train one shared module from one initialisation
            raise ConfigError(f"{name} returned the same module object for two seeds; the factory must build a "
                              f"new module on every call")
        first = next(iter(models.values()))
        _check_same_model(models, name)
        spec = inspect_model(first, data.train_x[:2].cpu(), n_classes, name)
        for mem in members:
            check_member(spec, mem, name)
        for note in spec.notes:
            warnings.warn(f"psa: {note}", RuntimeWarning, stacklevel=2)
        params = {k: torch.stack([dict(models[m.seed].named_parameters())[k].detach() for m in members]).to(dev)
                  for k, _ in first.named_parameters()}
        buffers = {k: torch.stack([dict(models[m.seed].named_buffers())[k].detach() for m in members]).to(dev)
                   for k, _ in first.named_buffers()}
        for k, v in params.items():
            if not v.is_floating_point():
                raise ConfigError(f"{name}: parameter {k} is not floating point")
        pop = cls(make_model, spec, members, dev, params, buffers, tuple(first.state_dict().keys()),
                  torch.full((len(members),), -1, dtype=torch.int64, device=dev), data.val_y.numel(),
                  [0] * len(members), template=first,
                  mode_history=[[(m.variant.start_mode(m.mode), 1)] for m in members], factory=name,
                  frozen=frozenset(k for k, v in first.named_parameters() if not v.requires_grad))
        pop.init_variant_state()
        return pop

    @property
    def size(self) -> int:
        """Number of members M."""
        return len(self.members)

    @property
    def patient(self) -> bool:
        """True when some member promotes with patience (a bounty model apart from the LKG)."""
        return any(m.variant.patience > 0 for m in self.members)

    @property
    def persistent(self) -> bool:
        """True when some member's AdamW state travels with its LKG."""
        return any(m.variant.optimizer_state == "persist" for m in self.members)

    def init_variant_state(self) -> None:
        """Allocate the variant state the members need, as a fresh population has it (the
        bounty model = the LKG, no discards, the allowance = patience, zero moments)."""
        dev, m = self.device, self.size
        if self.patient and self.bounty_state is None:
            self.bounty_state = {k: v.clone() for k, v in {**self.params, **self.buffers}.items()}
            self.bounty_correct = self.lkg_correct.clone()
            self.streak = torch.zeros(m, dtype=torch.int64, device=dev)
            self.allowance = torch.tensor([mem.variant.patience for mem in self.members], dtype=torch.int64).to(dev)
        if self.persistent and self.opt_avg is None:
            self.opt_avg = {k: torch.zeros_like(v) for k, v in self.params.items()}
            self.opt_sq = {k: torch.zeros_like(v) for k, v in self.params.items()}
            self.opt_step = torch.zeros(m, dtype=step_dtype(dev), device=dev)

    def lkg_score(self) -> list[float]:
        """LKG validation accuracy (%) of every member; -1 before its first promotion."""
        return [c if c < 0 else 100.0 * c / self.n_val for c in self.lkg_correct.tolist()]

    def bounty_score(self) -> list[float]:
        """Bounty (best validation accuracy, %) of every member: the LKG's without patience."""
        c = self.lkg_correct if self.bounty_correct is None else self.bounty_correct
        return [x if x < 0 else 100.0 * x / self.n_val for x in c.tolist()]

    def bounty_model(self) -> TensorDict:
        """Every member's bounty model (best ever; the LKG without patience), parameters and
        buffers stacked (M, ...)."""
        return {**self.params, **self.buffers} if self.bounty_state is None else self.bounty_state

    def member_state_dict(self, j: int, bounty: bool = False) -> TensorDict:
        """Member j's LKG (`bounty`: its bounty model) as the factory's module's state_dict (CPU
        tensors, buffers included)."""
        both = self.bounty_model() if bounty else {**self.params, **self.buffers}
        return {k: both[k][j].detach().cpu().clone() for k in self.state_keys if k in both}

    def load_member_state_dict(self, j: int, state: TensorDict) -> None:
        """Overwrite member j's LKG from a state_dict of the factory's module."""
        both = {**self.params, **self.buffers}
        expected = {k for k in self.state_keys if k in both}
        if set(state) != expected:
            raise ConfigError("checkpoint tensors do not match the model's state_dict")
        for k in expected:
            if tuple(state[k].shape) != tuple(both[k].shape[1:]):
                raise ConfigError(f"checkpoint tensor {k} has shape {tuple(state[k].shape)}, the model needs "
                                  f"{tuple(both[k].shape[1:])}")
            both[k][j].copy_(state[k])

