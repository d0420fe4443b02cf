"""PSA on any torch.nn.Module: its ablatable units, what consumes them, and a population of it
trained through torch.func.

- Units: the output features of every nn.Linear and the output channels of every
  nn.Conv1d/2d/3d the forward calls, in the order it first calls them; the last is the output
  layer. `choose_unit` draws over them exactly as psa's engine draws over an MLP's neurons.
- Consumers (torch.fx): the one Linear/Conv that reads a unit, through elementwise and
  per-channel operations (activations, nn.Dropout, BatchNorm, pooling, one Flatten). `hidden`
  mode zeroes the unit's weights there too; where the consumer is ambiguous (a residual add, a
  concatenation, a module fx cannot trace) the model gets one note and only the incoming side.
  A BatchNorm right after the unit belongs to it: its scale and shift for the unit are zeroed
  in every ablative mode, since an ablated unit would otherwise output the constant shift.
- Population: the members' parameters and buffers stacked (M, ...), one step of all of them
  as vmap over torch.func.functional_call, one AdamW over the stack. nn.Dropout modules draw
  psa.core.rng's counter-based masks (consecutive slices of one draw per step, as the engine's
  hidden layers), so an MLP given as a plain nn.Module reproduces the engine. A module vmap
  cannot batch trains one member at a time with plain autograd (one warning says why).
"""

from __future__ import annotations

import copy
import importlib
import math
import os
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad_and_value, vmap

from psa.core import rng
from psa.core.ablation import choose_unit
from psa.core.data import Dataset
from psa.core.device import canonical_device, is_out_of_memory
from psa.core.engine import LoopResult
from psa.core.errors import ConfigError
from psa.core.hparams import HParams
from psa.core.population import ABLATIVE_MODES, MODES, Member

Factory = Callable[[], nn.Module]

UNIT_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
NORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
# modules that map each unit (feature or channel) to itself: a chain through them keeps the unit
PASS_MODULES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.Mish,
                nn.Hardtanh, nn.Softplus, nn.Identity, nn.Dropout, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d,
                nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
                nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)
PASS_FUNCTIONS = {torch.relu, F.relu, F.relu6, F.leaky_relu, F.elu, F.gelu, F.silu, torch.tanh, torch.sigmoid,
                  F.mish, F.dropout, F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d,
                  F.avg_pool3d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d}
PASS_METHODS = {"relu", "sigmoid", "tanh", "contiguous"}


# ---------------------------------------------------------------------------------------------
# The factory


def resolve_factory(spec: str) -> Factory:
    """The function `module:function` names, imported with the current directory on sys.path.

    Any failure is one ConfigError line: the factory is named, never unpickled or serialised.
    """
    mod_name, sep, fn_name = spec.partition(":")
    if not sep or not mod_name or not fn_name:
        raise ConfigError(f"--model {spec!r}: give the factory as module:function (e.g. mypkg.models:make_cnn)")
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)
    try:
        mod = importlib.import_module(mod_name)
    except Exception as e:  # noqa: BLE001 - whatever the user's module raises is one line
        raise ConfigError(f"--model {spec}: cannot import {mod_name} ({type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''})") from None
    fn = mod
    for part in fn_name.split("."):
        fn = getattr(fn, part, None)
        if fn is None:
            raise ConfigError(f"--model {spec}: module {mod_name} has no {fn_name}")
    if not callable(fn):
        raise ConfigError(f"--model {spec}: {fn_name} is not callable")
    return fn  # type: ignore[return-value]


def factory_name(factory: Factory) -> str:
    """`module:qualname` of a factory: what studies and checkpoints record of it."""
    return f"{getattr(factory, '__module__', '?')}:{getattr(factory, '__qualname__', repr(factory))}"


def build(factory: Factory, seed: int) -> nn.Module:
    """The factory's module, its parameters drawn from `seed` on the CPU (the global RNG is
    forked, so callers are not disturbed): the same initialisation as psa's SimpleMLP."""
    name = factory_name(factory)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            module = factory()
        except Exception as e:  # noqa: BLE001
            raise ConfigError(f"model factory {name} failed: {type(e).__name__}: {e}") from None
    if not isinstance(module, nn.Module):
        raise ConfigError(f"model factory {name} returned {type(module).__name__}, not a torch.nn.Module")
    return module


# ---------------------------------------------------------------------------------------------
# Units, consumers, dropouts


@dataclass(frozen=True)
class Consumer:
    """Where `hidden` mode also zeroes a unit: `block` consecutive input columns (Linear, after a
    Flatten of `block` positions per channel) or one input channel (Conv) of module `name`."""

    name: str
    block: int


@dataclass(frozen=True)
class UnitLayer:
    """A Linear or Conv layer whose output units PSA can ablate."""

    name: str  # module path in the model ("features.0")
    units: int  # out_features or out_channels
    has_bias: bool
    consumer: Consumer | None  # None for the output layer, or where it is ambiguous
    norm: str | None  # a BatchNorm that directly normalises this layer's output


@dataclass(frozen=True)
class ModelSpec:
    """What psa found in a model: its unit layers (call order), its nn.Dropout modules with the
    units each drops per example (call order), and notes to print once."""

    layers: tuple[UnitLayer, ...]
    dropouts: tuple[tuple[str, int], ...]
    notes: tuple[str, ...] = ()

    @property
    def hidden(self) -> tuple[int, ...]:
        """Units of each hidden layer (every unit layer but the last)."""
        return tuple(layer.units for layer in self.layers[:-1])

    @property
    def n_out(self) -> int:
        """Units of the output layer."""
        return self.layers[-1].units

    @property
    def dropout_units(self) -> int:
        """Dropped units per example over all nn.Dropout modules."""
        return sum(u for _, u in self.dropouts)

    def choose(self, mode: str, seed: int, loop: int) -> tuple[int, int] | None:
        """(layer index, unit) that `mode` ablates at `loop` (psa.core.ablation.choose_unit)."""
        return choose_unit(self.hidden, self.n_out, mode, seed, loop)

    def describe(self) -> str:
        """One line: the unit layers and their widths."""
        return ", ".join(f"{layer.name}[{layer.units}]" for layer in self.layers)


def _call_order(module: nn.Module, x: torch.Tensor) -> tuple[list[str], dict[str, int], torch.Tensor]:
    """Run `module` (eval) on `x`: the unit layers in the order first called, the per-example
    output size of every nn.Dropout, and the output."""
    names = {id(m): n for n, m in module.named_modules()}
    order: list[str] = []
    drop: dict[str, int] = {}

    def hook(m: nn.Module, inp: Any, out: Any) -> None:
        n = names[id(m)]
        if isinstance(m, UNIT_TYPES) and n not in order:
            order.append(n)
        if type(m) is nn.Dropout and torch.is_tensor(out):
            drop.setdefault(n, out[0].numel())

    handles = [m.register_forward_hook(hook) for m in module.modules() if isinstance(m, (*UNIT_TYPES, nn.Dropout))]
    was = module.training
    try:
        module.eval()
        with torch.no_grad():
            out = module(x)
    finally:
        module.train(was)
        for h in handles:
            h.remove()
    return order, drop, out


def _trace_consumers(module: nn.Module, layers: list[str]) -> tuple[dict[str, tuple[Consumer | None, str | None, str]],
                                                                      str | None]:
    """For each unit layer: (consumer or None, directly following BatchNorm or None, why no
    consumer); or a note why the model cannot be traced at all."""
    import torch.fx as fx

    try:
        gm = fx.symbolic_trace(module)
    except Exception as e:  # noqa: BLE001 - dynamic control flow etc.: incoming side only
        return {}, f"torch.fx cannot trace the model ({type(e).__name__}: {str(e).splitlines()[0][:120]})"
    mods = dict(module.named_modules())
    out: dict[str, tuple[Consumer | None, str | None, str]] = {}
    calls = [n for n in gm.graph.nodes if n.op == "call_module" and n.target in layers]
    for name in layers:
        nodes = [n for n in calls if n.target == name]
        if len(nodes) != 1:
            out[name] = (None, None, "it is called more than once")
            continue
        out[name] = _follow(nodes[0], mods)
    return out, None


def _follow(node: Any, mods: dict[str, nn.Module]) -> tuple[Consumer | None, str | None, str]:
    """Walk from a unit layer's output through unit-preserving operations to the one Linear or
    Conv that reads it."""
    src = mods[node.target]
    units = src.out_features if isinstance(src, nn.Linear) else src.out_channels
    norm = None
    flattened = False
    cur = node
    first = True
    while True:
        users = list(cur.users)
        if len(users) != 1:
            return None, norm, f"its output is used {len(users)} times" if users else "its output is unused"
        u = users[0]
        if not u.args or u.args[0] is not cur or any(a is cur for a in u.args[1:]) or any(
                v is cur for v in u.kwargs.values()):
            return None, norm, f"it flows into {u.op} {u.target} other than as its input"
        if u.op == "call_module":
            m = mods[str(u.target)]
            if isinstance(m, nn.Linear):
                if isinstance(src, nn.Linear) and not flattened and m.in_features == units:
                    return Consumer(str(u.target), 1), norm, ""
                if flattened and m.in_features % units == 0:
                    return Consumer(str(u.target), m.in_features // units), norm, ""
                return None, norm, f"{u.target} reads it in an unknown layout"
            if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
                if not flattened and m.in_channels == units and m.groups == 1:
                    return Consumer(str(u.target), 1), norm, ""
                return None, norm, f"{u.target} reads it in an unknown layout"
            if isinstance(m, NORM_TYPES):
                if first and m.num_features == units:
                    norm = str(u.target)
                    cur, first = u, False
                    continue
                return None, norm, f"{u.target} normalises it after other operations"
            if isinstance(m, PASS_MODULES) or type(m).__name__ == "_MaskedDropout":
                cur, first = u, False
                continue
            if isinstance(m, nn.Flatten) and m.start_dim == 1 and m.end_dim == -1 and not flattened:
                flattened, cur, first = True, u, False
                continue
            return None, norm, f"it passes through {type(m).__name__}"
        if u.op == "call_function" and u.target in PASS_FUNCTIONS:
            cur, first = u, False
            continue
        if u.op == "call_method" and u.target in PASS_METHODS:
            cur, first = u, False
            continue
        is_flatten = (u.op == "call_function" and u.target is torch.flatten) or (
            u.op == "call_method" and u.target == "flatten")
        if is_flatten and not flattened and tuple(u.args[1:]) in ((1,), (1, -1)) and not u.kwargs:
            flattened, cur, first = True, u, False
            continue
        return None, norm, f"it passes through {u.op} {getattr(u.target, '__name__', u.target)}"


def inspect_model(module: nn.Module, sample_x: torch.Tensor, n_classes: int, name: str = "the model") -> ModelSpec:
    """The unit layers, consumers and dropouts of `module`, checked on a batch of the data:
    it must have a Linear or Conv layer, and map (N, ...) inputs to (N, n_classes) logits."""
    for n, m in module.named_modules():
        if isinstance(m, nn.modules.dropout._DropoutNd) and type(m) is not nn.Dropout:
            raise ConfigError(f"{name}: {n} is a {type(m).__name__}; psa drives nn.Dropout modules only")
    if not any(isinstance(m, UNIT_TYPES) for m in module.modules()):
        raise ConfigError(f"{name} has no nn.Linear or nn.Conv layer: PSA has no unit to ablate")
    try:
        order, drop, out = _call_order(module, sample_x)
    except Exception as e:  # noqa: BLE001
        raise ConfigError(f"{name} fails on a batch of the data of shape {tuple(sample_x.shape)}: "
                          f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}") from None
    if not torch.is_tensor(out) or out.dim() != 2 or out.shape != (sample_x.shape[0], n_classes):
        shape = tuple(out.shape) if torch.is_tensor(out) else type(out).__name__
        raise ConfigError(f"{name} maps a batch of {sample_x.shape[0]} to {shape}; the data has {n_classes} "
                          f"classes, so it must give ({sample_x.shape[0]}, {n_classes}) logits")
    if not order:
        raise ConfigError(f"{name}'s forward calls no nn.Linear or nn.Conv layer: PSA has no unit to ablate")
    mods = dict(module.named_modules())
    notes = []
    unused = [n for n, m in module.named_modules() if isinstance(m, UNIT_TYPES) and n not in order]
    if unused:
        notes.append(f"{name}: {', '.join(unused)} never run in forward and are not ablated")
    traced, why = _trace_consumers(module, order)
    if why:
        notes.append(f"{name}: {why}; `hidden` mode zeroes only the incoming weights of a unit")
    layers = []
    for i, n in enumerate(order):
        m = mods[n]
        units = m.out_features if isinstance(m, nn.Linear) else m.out_channels
        consumer, norm, reason = traced.get(n, (None, None, ""))
        if i == len(order) - 1:
            consumer = None  # the output layer: no mode zeroes its outgoing side
        elif consumer is None and not why:
            notes.append(f"{name}: no unambiguous consumer of {n} ({reason}); `hidden` mode zeroes only its "
                         f"incoming weights")
        layers.append(UnitLayer(n, units, m.bias is not None, consumer, norm))
    dropouts = tuple((n, drop[n]) for n, m in module.named_modules() if type(m) is nn.Dropout and n in drop)
    return ModelSpec(tuple(layers), dropouts, tuple(notes))


# ---------------------------------------------------------------------------------------------
# Dropout with psa's masks


class _Noise:
    """The dropout multipliers of the current step, shared by every _MaskedDropout of a model:
    (batch, units) for one member (vmap gives each its own), or None for no dropout."""

    def __init__(self) -> None:
        self.noise: torch.Tensor | None = None


class _MaskedDropout(nn.Module):
    """nn.Dropout with given multipliers: units [offset, offset + units) of the step's noise,
    shaped as this module's input. Identity in eval() or when the step draws no noise."""

    def __init__(self, holder: _Noise, offset: int, units: int) -> None:
        super().__init__()
        self.holder, self.offset, self.units = holder, offset, units

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x times its slice of the noise (training with noise), else x."""
        noise = self.holder.noise
        if not self.training or noise is None:
            return x
        return x * noise[:, self.offset : self.offset + self.units].reshape(x.shape)


def _with_masked_dropout(module: nn.Module, spec: ModelSpec, holder: _Noise) -> nn.Module:
    """A copy of `module` whose nn.Dropout modules draw psa's masks from `holder`."""
    template = copy.deepcopy(module)
    off = 0
    for name, units in spec.dropouts:
        parent_name, _, attr = name.rpartition(".")
        parent = template.get_submodule(parent_name) if parent_name else template
        setattr(parent, attr, _MaskedDropout(holder, off, units))
        off += units
    return template


# ---------------------------------------------------------------------------------------------
# The population


@dataclass
class ModulePopulation:
    """The persistent state of M trials of one model factory: LKG parameters and buffers
    stacked (M, ...), LKG scores, bounty loops, loops done."""

    factory: Factory
    spec: ModelSpec
    members: tuple[Member, ...]
    device: torch.device
    params: dict[str, torch.Tensor]
    buffers: dict[str, torch.Tensor]
    state_keys: tuple[str, ...]  # the module's state_dict keys (what a checkpoint holds)
    lkg_correct: torch.Tensor
    n_val: int
    bounty_loop: list[int]
    loop: int = 0
    template: nn.Module | None = field(default=None, repr=False)

    @classmethod
    def create(cls, factory: Factory, members: list[Member] | tuple[Member, ...], data: Dataset,
               device: torch.device | str = "cpu", n_classes: int | None = None) -> "ModulePopulation":
        """Fresh members (sorted by seed): each seed's initialisation by the factory, LKG score -1.
        The model is checked on a batch of the training data first (ConfigError if it cannot run)."""
        if not members:
            raise ConfigError("a population needs at least one member")
        members = tuple(sorted(members, key=lambda mem: mem.seed))
        dev = canonical_device(device)
        name = factory_name(factory)
        n_classes = n_classes or int(max(int(data.train_y.max()), int(data.val_y.max()))) + 1
        models = {s: build(factory, s) for s in sorted({mem.seed for mem in members})}
        first = next(iter(models.values()))
        spec = inspect_model(first, data.train_x[:2].cpu(), n_classes, name)
        for mem in members:
            if mem.mode not in MODES:
                raise ConfigError(f"unknown mode {mem.mode!r}")
            if mem.mode == "hidden" and not spec.hidden:
                raise ConfigError(f"mode 'hidden' needs a hidden unit layer; {name} has only {spec.describe()}")
            if mem.dropout > 0 and not spec.dropouts:
                raise ConfigError(f"mode 'dropout' sets the rate of every nn.Dropout of the model; {name} has none")
        for note in spec.notes:
            warnings.warn(f"psa: {note}", RuntimeWarning, stacklevel=2)
        params = {k: torch.stack([dict(models[m.seed].named_parameters())[k].detach() for m in members]).to(dev)
                  for k, _ in first.named_parameters()}
        buffers = {k: torch.stack([dict(models[m.seed].named_buffers())[k].detach() for m in members]).to(dev)
                   for k, _ in first.named_buffers()}
        for k, v in params.items():
            if not v.is_floating_point():
                raise ConfigError(f"{name}: parameter {k} is not floating point")
        return cls(factory, spec, members, dev, params, buffers, tuple(first.state_dict().keys()),
                   torch.full((len(members),), -1, dtype=torch.int64, device=dev), data.val_y.numel(),
                   [0] * len(members), template=first)

    @property
    def size(self) -> int:
        """Number of members M."""
        return len(self.members)

    def lkg_score(self) -> list[float]:
        """LKG validation accuracy (%) of every member; -1 before its first promotion."""
        return [c if c < 0 else 100.0 * c / self.n_val for c in self.lkg_correct.tolist()]

    def member_state_dict(self, j: int) -> dict[str, torch.Tensor]:
        """Member j's LKG as the factory's module's state_dict (CPU tensors, buffers included)."""
        both = {**self.params, **self.buffers}
        return {k: both[k][j].detach().cpu().clone() for k in self.state_keys if k in both}

    def load_member_state_dict(self, j: int, state: dict[str, torch.Tensor]) -> None:
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


def _per_member(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(C,) per-member values shaped to broadcast over a stacked (C, ...) tensor."""
    return values.view(-1, *([1] * (like.dim() - 1)))


class ModuleEngine:
    """The Frustration Engine on a ModulePopulation: every member's meta-loop, in lockstep."""

    def __init__(self, pop: ModulePopulation, data: Dataset, hparams: HParams, batched: bool = True,
                 max_members: int | None = None, eval_rows: int = 2048) -> None:
        """`batched`: vmap the members together (False: one at a time, plain autograd, the
        fallback and the reference for speed); `max_members`: members trained at once (None:
        all, halved on out-of-memory); `eval_rows`: validation images per evaluation block."""
        if data.train_x.device != pop.device:
            raise ConfigError(f"data on {data.train_x.device} but population on {pop.device}")
        self.pop, self.data, self.hp = pop, data, hparams
        self.batched = batched
        self.chunk_size = max_members or pop.size
        self.eval_rows = eval_rows
        self.holder = _Noise()
        assert pop.template is not None
        self.model = _with_masked_dropout(pop.template, pop.spec, self.holder).to(pop.device)
        units = pop.spec.dropout_units
        self.pos_hash = rng.position_hash(hparams.batch_size, units, pop.device) if units else None
        self.ablated_last: tuple[tuple[int, int] | None, ...] = ()

    # ------------------------------------------------------------ member settings
    # Everything a member's settings decide is read here, so that a setting (a variant) is added
    # in one place: its ablation, optimizer, weight decay and dropout rate.
    def _ablations(self, loop: int) -> tuple[tuple[int, int] | None, ...]:
        return tuple(self.pop.spec.choose(m.mode, m.seed, loop) for m in self.pop.members)

    def _new_optimizer(self, params: list[torch.Tensor]) -> torch.optim.AdamW:
        """A fresh AdamW (fused where available), as the engine's every loop; weight decay is
        applied per member by the step."""
        hp = self.hp
        kw: dict[str, Any] = dict(lr=hp.lr, betas=hp.betas, eps=hp.eps, weight_decay=0.0)
        try:
            return torch.optim.AdamW(params, fused=True, **kw)
        except (RuntimeError, TypeError, ValueError):
            return torch.optim.AdamW(params, **kw)

    def _decay(self, members: tuple[Member, ...]) -> torch.Tensor | None:
        """(C,) AdamW's decoupled decay factor 1 - lr*wd per member (float32), or None if 1."""
        f = torch.tensor([1.0 - self.hp.lr * m.weight_decay for m in members], dtype=torch.float32)
        return None if bool((f == 1.0).all()) else f.to(self.pop.device)

    def _dropout(self, members: tuple[Member, ...], loop: int) -> tuple[torch.Tensor, ...] | None:
        """(keys (C, 2), thresholds (C,), scales (C,)) of the members' dropout, or None."""
        if not any(m.dropout > 0 for m in members) or self.pos_hash is None:
            return None
        dev = self.pop.device
        keys = torch.tensor([rng.loop_keys(m.seed, "dropout", loop) for m in members], dtype=torch.int64)
        thr = torch.tensor([rng.dropout_threshold(m.dropout) for m in members], dtype=torch.int64)
        p = torch.tensor([m.dropout for m in members], dtype=torch.float32)
        return keys.to(dev), thr.to(dev), (torch.ones(len(members)) / (1.0 - p)).to(dev)

    # ------------------------------------------------------------ ablation
    @torch.no_grad()
    def _ablate(self, params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor], m0: int,
                ablated: tuple[tuple[int, int] | None, ...]) -> None:
        spec = self.pop.spec
        for j, a in enumerate(ablated):
            if a is None:
                continue
            mode = self.pop.members[m0 + j].mode
            layer = spec.layers[a[0]]
            u = a[1]
            params[f"{layer.name}.weight"][j, u].zero_()
            if layer.has_bias:
                params[f"{layer.name}.bias"][j, u].zero_()
            if layer.norm is not None:
                for k in ("weight", "bias"):
                    t = params.get(f"{layer.norm}.{k}")
                    if t is not None:
                        t[j, u].zero_()
            if mode == "hidden" and layer.consumer is not None:
                c = layer.consumer
                w = params[f"{c.name}.weight"][j]
                w[:, u * c.block : (u + 1) * c.block].zero_()

    # ------------------------------------------------------------ one loop
    def _loss(self, params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor], x: torch.Tensor,
              y: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
        self.holder.noise = noise
        try:
            out = functional_call(self.model, (params, buffers), (x,))
        finally:
            self.holder.noise = None
        return F.cross_entropy(out, y)

    def _steps(self) -> list[int]:
        bs, n = self.hp.batch_size, self.data.train_x.shape[0]
        full, tail = divmod(n, bs)
        return [bs] * full + ([tail] if tail else [])

    def _train_batched(self, params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor],
                       members: tuple[Member, ...], loop: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One epoch of the members in `params` (C, ...) together; (loss sum, diverged) (C,)."""
        dev, data, hp = self.pop.device, self.data, self.hp
        c = len(members)
        order = rng.data_order([m.seed for m in members], loop, data.train_x.shape[0], dev)
        names = list(params)
        opt = self._new_optimizer([params[k] for k in names])
        decay = self._decay(members)
        drop = self._dropout(members, loop)
        loss_sum = torch.zeros(c, device=dev)
        diverged = torch.zeros(c, dtype=torch.bool, device=dev)
        step_grad = vmap(grad_and_value(self._loss), in_dims=(0, 0, 0, 0, 0 if drop else None))
        self.model.train()
        for s, b in enumerate(self._steps()):
            idx = order[:, s * hp.batch_size : s * hp.batch_size + b]
            x = data.train_x[idx.reshape(-1)].view(c, b, *data.train_x.shape[1:])
            y = data.train_y[idx]
            noise = None
            if drop is not None:
                assert self.pos_hash is not None
                keys = rng.step_keys(drop[0], torch.tensor(s, dtype=torch.int64, device=dev))
                noise = rng.dropout_noise(self.pos_hash[:b], keys, drop[1], drop[2])
            grads, loss = step_grad(params, buffers, x, y, noise)
            loss_sum += loss.detach()
            diverged |= ~torch.isfinite(loss.detach())
            with torch.no_grad():
                if decay is not None:
                    for k in names:
                        params[k].mul_(_per_member(decay, params[k]))
                for k in names:
                    params[k].grad = grads[k]
                opt.step()
        for k in names:
            params[k].grad = None
        return loss_sum, diverged

    def _train_single(self, params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor],
                      members: tuple[Member, ...], loop: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The same epoch one member after another with plain autograd (modules vmap cannot batch)."""
        dev, data, hp = self.pop.device, self.data, self.hp
        c = len(members)
        loss_sum = torch.zeros(c, device=dev)
        diverged = torch.zeros(c, dtype=torch.bool, device=dev)
        decay = self._decay(members)
        self.model.train()
        for j, mem in enumerate(members):
            order = rng.data_order([mem.seed], loop, data.train_x.shape[0], dev)[0]
            p_j = {k: v[j].detach().requires_grad_() for k, v in params.items()}
            b_j = {k: v[j] for k, v in buffers.items()}
            opt = self._new_optimizer(list(p_j.values()))
            drop = self._dropout((mem,), loop)
            for s, b in enumerate(self._steps()):
                idx = order[s * hp.batch_size : s * hp.batch_size + b]
                noise = None
                if drop is not None:
                    assert self.pos_hash is not None
                    keys = rng.step_keys(drop[0], torch.tensor(s, dtype=torch.int64, device=dev))
                    noise = rng.dropout_noise(self.pos_hash[:b], keys, drop[1], drop[2])[0]
                loss = self._loss(p_j, b_j, data.train_x[idx], data.train_y[idx], noise)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                loss_sum[j] += loss.detach()
                diverged[j] |= ~torch.isfinite(loss.detach())
                with torch.no_grad():
                    if decay is not None:
                        for v in p_j.values():
                            v.mul_(decay[j])
                opt.step()
        return loss_sum, diverged

    @torch.no_grad()
    def count_correct(self, params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor],
                      x_all: torch.Tensor, y_all: torch.Tensor) -> torch.Tensor:
        """(C,) correct predictions of each member (eval mode) on (x_all, y_all)."""
        c = next(iter(params.values())).shape[0]
        correct = torch.zeros(c, dtype=torch.int64, device=self.pop.device)
        self.model.eval()
        try:
            for r0 in range(0, x_all.shape[0], self.eval_rows):
                x, y = x_all[r0 : r0 + self.eval_rows], y_all[r0 : r0 + self.eval_rows]
                if self.batched:
                    out = vmap(lambda p, b: functional_call(self.model, (p, b), (x,)))(params, buffers)
                else:
                    out = torch.stack([functional_call(self.model, ({k: v[j] for k, v in params.items()},
                                                                    {k: v[j] for k, v in buffers.items()}), (x,))
                                       for j in range(c)])
                correct += (out.argmax(dim=2) == y).sum(dim=1)
        finally:
            self.model.train()
        return correct

    def _run_chunk(self, m0: int, m1: int, loop: int, ablated: tuple[tuple[int, int] | None, ...]
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        pop = self.pop
        members = pop.members[m0:m1]
        params = {k: v[m0:m1].clone() for k, v in pop.params.items()}
        buffers = {k: v[m0:m1].clone() for k, v in pop.buffers.items()}
        self._ablate(params, buffers, m0, ablated[m0:m1])
        while True:
            try:
                train = self._train_batched if self.batched else self._train_single
                loss, diverged = train(params, buffers, members, loop)
                break
            except Exception as e:  # noqa: BLE001 - only vmap's limits fall back
                if not self.batched or is_out_of_memory(e):
                    raise
                warnings.warn(f"psa: torch.func.vmap cannot batch {factory_name(pop.factory)} "
                              f"({type(e).__name__}: {str(e).splitlines()[0][:200]}); training its members "
                              f"one at a time", RuntimeWarning, stacklevel=3)
                self.batched = False
                params = {k: v[m0:m1].clone() for k, v in pop.params.items()}
                buffers = {k: v[m0:m1].clone() for k, v in pop.buffers.items()}
                self._ablate(params, buffers, m0, ablated[m0:m1])
        correct = self.count_correct(params, buffers, self.data.val_x, self.data.val_y)
        with torch.no_grad():
            lkg_correct = pop.lkg_correct[m0:m1]
            promote = ~diverged & (correct > lkg_correct)
            lkg_correct.copy_(torch.where(promote, correct, lkg_correct))
            for store, cand in ((pop.params, params), (pop.buffers, buffers)):
                for k, v in cand.items():
                    dst = store[k][m0:m1]
                    dst.copy_(torch.where(_per_member(promote, v), v, dst))
        return correct, promote, loss / len(self._steps()), diverged

    def meta_loop(self) -> LoopResult:
        """One meta-loop for every member; the population's LKG state moves forward by one loop."""
        t0 = time.perf_counter()
        pop = self.pop
        loop = pop.loop + 1
        ablated = self._ablations(loop)
        outs: list[tuple[torch.Tensor, ...]] = []
        m0 = 0
        while m0 < pop.size:
            m1 = min(pop.size, m0 + self.chunk_size)
            try:
                outs.append(self._run_chunk(m0, m1, loop, ablated))
            except Exception as e:  # noqa: BLE001
                if not is_out_of_memory(e) or self.chunk_size <= 1:
                    raise
                self.chunk_size = max(1, self.chunk_size // 2)  # nothing of this chunk was promoted yet
                continue
            m0 = m1
        correct, promoted, loss, diverged = (torch.cat(t).tolist() for t in zip(*outs))
        for j, p in enumerate(promoted):
            if p:
                pop.bounty_loop[j] = loop
        pop.loop = loop
        n = pop.n_val
        return LoopResult(
            loop=loop,
            candidate_acc=tuple(math.nan if d else 100.0 * c / n for c, d in zip(correct, diverged)),
            promoted=tuple(bool(p) for p in promoted),
            ablated=ablated,
            lkg_score=tuple(pop.lkg_score()),
            train_loss=tuple(float(v) for v in loss),
            diverged=tuple(bool(d) for d in diverged),
            seconds=time.perf_counter() - t0,
        )

    def test_accuracy(self) -> list[float]:
        """Test-set accuracy (%) of every member's LKG."""
        correct = self.count_correct(self.pop.params, self.pop.buffers, self.data.test_x, self.data.test_y)
        return [100.0 * c / self.data.test_y.numel() for c in correct.tolist()]


__all__ = ["ABLATIVE_MODES", "Consumer", "ModelSpec", "ModuleEngine", "ModulePopulation", "UnitLayer", "build",
           "factory_name", "inspect_model", "resolve_factory"]
