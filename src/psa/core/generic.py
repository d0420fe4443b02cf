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

import contextlib
import copy
import functools
import importlib
import math
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad_and_value, vmap

from psa.core import rng
from psa.core.ablation import choose_neurons, choose_unit
from psa.core.arch import Arch
from psa.core.chunk import adamw_update, step_dtype
from psa.core.data import Dataset
from psa.core.device import canonical_device, is_out_of_memory
from psa.core.engine import LoopResult, note_once, patience_decision, scheduled_members
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

    @property
    def arch(self) -> Arch:
        """The unit layers' widths as a SimpleMLP shape: what psa.core.variant and
        psa.core.ablation.choose_neurons draw over (unit layer i is Linear layer i there)."""
        return Arch(tuple((1, w) for w in self.hidden), n_in=1, n_out=self.n_out)

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


def check_member(spec: ModelSpec, mem: Member, name: str = "the model") -> None:
    """ConfigError unless `mem` can train on a model of `spec`: every mode it runs in (its
    schedule's) has what it needs, and its variant's ablation settings fit the unit layers."""
    modes = [m for m, _ in mem.variant.schedule] or [mem.mode]
    for mode in modes:
        if mode not in MODES:
            raise ConfigError(f"unknown mode {mode!r}")
        if mode == "hidden" and not spec.hidden:
            raise ConfigError(f"mode 'hidden' needs a hidden unit layer; {name} has only {spec.describe()}")
        if mode == "dropout" and not spec.dropouts:
            raise ConfigError(f"mode 'dropout' sets the rate of every nn.Dropout of the model; {name} has none")
    try:
        mem.variant.check(spec.arch, mem.variant.start_mode(mem.mode))
    except ConfigError as e:
        raise ConfigError(f"{name} (unit layers {spec.describe()}): {e}") from None


# ---------------------------------------------------------------------------------------------
# The engine's arithmetic under vmap
#
# psa's engine computes a Linear layer as one baddbmm (the bias accumulated inside the matrix
# product), its gradients as bmm(dz^T, h), bmm(dz, W) and sum(dz), and the loss's gradient as
# (exp(z - logsumexp(z)) - onehot) / b. vmap of F.linear instead runs bmm and then adds the
# bias, and autograd's cross-entropy goes through log_softmax's backward: the same numbers
# up to the last bit, but AdamW's first steps turn a last-bit difference in a near-zero
# gradient into an lr-sized one, and over hundreds of steps a member drifts apart (2e-4 after
# 256 steps, docs/module.md). So every plain nn.Linear and the loss run the engine's own
# operations, batched by hand under vmap (each Function's `vmap` rule) and for one member as a
# batch of one: the batched path, the one-at-a-time path and the engine round alike.


def _batch_front(info: Any, in_dims: tuple[int | None, ...], *ts: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The tensors of a vmap rule with the vmapped dimension first (expanded where absent)."""
    n = info.batch_size
    return tuple(t.movedim(d, 0) if d is not None else t.expand(n, *t.shape) for t, d in zip(ts, in_dims))


def _linear_grads(dz: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(dL/dW, dL/db) of members' Linear layers from (C, b, o) dz and (C, b, i) x, as the engine."""
    return torch.bmm(dz.transpose(1, 2), x), dz.sum(dim=1)


class _LinearGrad(torch.autograd.Function):
    """The weight and bias gradients of _Linear (a Function of its own, so that vmap batches
    them by hand)."""

    @staticmethod
    def forward(dz: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, ...]:  # type: ignore[override]
        return tuple(t[0] for t in _linear_grads(dz.unsqueeze(0), x.unsqueeze(0)))

    @staticmethod
    def setup_context(ctx: Any, inputs: Any, output: Any) -> None:
        pass

    @staticmethod
    def vmap(info: Any, in_dims: Any, dz: torch.Tensor, x: torch.Tensor) -> Any:
        return _linear_grads(*_batch_front(info, in_dims, dz, x)), (0, 0)


class _LinearInputGrad(torch.autograd.Function):
    """The input gradient of _Linear, bmm(dz, W); computed only where the input needs one (the
    engine never computes it for the first layer)."""

    @staticmethod
    def forward(dz: torch.Tensor, w: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return torch.bmm(dz.unsqueeze(0), w.unsqueeze(0))[0]

    @staticmethod
    def setup_context(ctx: Any, inputs: Any, output: Any) -> None:
        pass

    @staticmethod
    def vmap(info: Any, in_dims: Any, dz: torch.Tensor, w: torch.Tensor) -> Any:
        return torch.bmm(*_batch_front(info, in_dims, dz, w)), 0


class _Linear(torch.autograd.Function):
    """F.linear of a (b, i) input as the engine computes it: baddbmm, bias inside the product."""

    @staticmethod
    def forward(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return torch.baddbmm(b.view(1, 1, -1), x.unsqueeze(0), w.t().unsqueeze(0))[0]

    @staticmethod
    def setup_context(ctx: Any, inputs: Any, output: Any) -> None:
        x, w, _ = inputs
        ctx.save_for_backward(x, w)

    @staticmethod
    def backward(ctx: Any, dz: torch.Tensor) -> Any:  # type: ignore[override]
        x, w = ctx.saved_tensors
        gw, gb = _LinearGrad.apply(dz, x)
        return (_LinearInputGrad.apply(dz, w) if ctx.needs_input_grad[0] else None), gw, gb

    @staticmethod
    def vmap(info: Any, in_dims: Any, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> Any:
        x, w, b = _batch_front(info, in_dims, x, w, b)
        return torch.baddbmm(b.unsqueeze(1), x, w.transpose(1, 2)), 0


class _EngineLinear(nn.Linear):
    """nn.Linear whose forward and backward are the engine's operations (same parameters)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """F.linear, by the engine's arithmetic for a (batch, features) input with a bias."""
        if x.dim() != 2 or self.bias is None:
            return F.linear(x, self.weight, self.bias)
        return _Linear.apply(x, self.weight, self.bias)


def _ce_loss(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(C,) mean cross-entropy of members' (C, b, n) logits, as the engine."""
    y3 = y.unsqueeze(2)
    lse = torch.logsumexp(z, dim=2, keepdim=True)
    return (lse - z.gather(2, y3)).mean(dim=(1, 2))


def _ce_grad(z: torch.Tensor, y: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """(C, b, n) gradient of _ce_loss times the incoming (C,) gradient `g`, as the engine."""
    y3 = y.unsqueeze(2)
    dz = torch.exp(z - torch.logsumexp(z, dim=2, keepdim=True))
    dz.scatter_add_(2, y3, torch.full_like(y3, -1, dtype=dz.dtype))
    dz.mul_(1.0 / z.shape[1])
    return dz * g.view(-1, 1, 1)


class _CrossEntropyGrad(torch.autograd.Function):
    @staticmethod
    def forward(z: torch.Tensor, y: torch.Tensor, g: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return _ce_grad(z.unsqueeze(0), y.unsqueeze(0), g.unsqueeze(0))[0]

    @staticmethod
    def setup_context(ctx: Any, inputs: Any, output: Any) -> None:
        pass

    @staticmethod
    def vmap(info: Any, in_dims: Any, z: torch.Tensor, y: torch.Tensor, g: torch.Tensor) -> Any:
        return _ce_grad(*_batch_front(info, in_dims, z, y, g)), 0


class _CrossEntropy(torch.autograd.Function):
    """F.cross_entropy of (b, n) logits (mean over the batch) by the engine's arithmetic."""

    @staticmethod
    def forward(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return _ce_loss(z.unsqueeze(0), y.unsqueeze(0))[0]

    @staticmethod
    def setup_context(ctx: Any, inputs: Any, output: Any) -> None:
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> Any:  # type: ignore[override]
        z, y = ctx.saved_tensors
        return _CrossEntropyGrad.apply(z, y, g), None

    @staticmethod
    def vmap(info: Any, in_dims: Any, z: torch.Tensor, y: torch.Tensor) -> Any:
        return _ce_loss(*_batch_front(info, in_dims, z, y)), 0


def cross_entropy(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of (b, n) logits against (b,) labels, rounded as psa's engine rounds it."""
    if z.dim() != 2:
        return F.cross_entropy(z, y)
    return _CrossEntropy.apply(z, y)


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


def _engine_template(module: nn.Module, spec: ModelSpec, holder: _Noise) -> nn.Module:
    """A copy of `module` that computes as psa's engine: its nn.Dropout modules draw psa's masks
    from `holder`, its plain nn.Linear modules run the engine's arithmetic (_EngineLinear)."""
    template = copy.deepcopy(module)
    off = 0
    for name, units in spec.dropouts:
        parent_name, _, attr = name.rpartition(".")
        parent = template.get_submodule(parent_name) if parent_name else template
        setattr(parent, attr, _MaskedDropout(holder, off, units))
        off += units
    for m in template.modules():
        if type(m) is nn.Linear:
            m.__class__ = _EngineLinear  # same parameters and state; only the forward differs
    return template


# ---------------------------------------------------------------------------------------------
# The population


TensorDict = dict[str, torch.Tensor]


@dataclass
class ModulePopulation:
    """The persistent state of M trials of one model factory: LKG parameters and buffers
    stacked (M, ...), LKG scores, bounty loops, loops done; and the engine variants' state
    (psa.core.variant), present only where some member needs it, as in psa's Population."""

    factory: Factory
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
    bounty: TensorDict | None = field(default=None, repr=False)
    bounty_correct: torch.Tensor | None = None
    streak: torch.Tensor | None = None
    allowance: torch.Tensor | None = None
    # optimizer_state "persist": the LKG's AdamW moments (per parameter) and step counts
    opt_avg: TensorDict | None = field(default=None, repr=False)
    opt_sq: TensorDict | None = field(default=None, repr=False)
    opt_step: torch.Tensor | None = None
    mode_history: list[list[tuple[str, int]]] = field(default_factory=list)  # (mode, from loop) per member

    @classmethod
    def create(cls, factory: Factory, members: list[Member] | tuple[Member, ...], data: Dataset,
               device: torch.device | str = "cpu", n_classes: int | None = None) -> "ModulePopulation":
        """Fresh members (sorted by seed): each seed's initialisation by the factory, LKG score -1.
        The model is checked on a batch of the training data first (ConfigError if it cannot run),
        and every member's mode and variant against the model's units."""
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
        pop = cls(factory, spec, members, dev, params, buffers, tuple(first.state_dict().keys()),
                  torch.full((len(members),), -1, dtype=torch.int64, device=dev), data.val_y.numel(),
                  [0] * len(members), template=first,
                  mode_history=[[(m.variant.start_mode(m.mode), 1)] for m in members])
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
        if self.patient and self.bounty is None:
            self.bounty = {k: v.clone() for k, v in {**self.params, **self.buffers}.items()}
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
        return {**self.params, **self.buffers} if self.bounty is None else self.bounty

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


def _per_member(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(C,) per-member values shaped to broadcast over a stacked (C, ...) tensor."""
    return values.view(-1, *([1] * (like.dim() - 1)))


class _MemberAdamW:
    """AdamW over stacked (C, ...) parameters with a step count per member: the update of psa's
    MemberAdamW (psa.core.chunk.adamw_update), for chunks where some member's optimizer state
    persists. `rows` steps a slice of the members (the one-at-a-time path)."""

    def __init__(self, params: TensorDict, hp: HParams) -> None:
        self.exp_avg = {k: torch.zeros_like(v) for k, v in params.items()}
        self.exp_avg_sq = {k: torch.zeros_like(v) for k, v in params.items()}
        dev = next(iter(params.values())).device
        self.steps = torch.zeros(next(iter(params.values())).shape[0], dtype=step_dtype(dev), device=dev)
        self.hp = hp

    def step(self, params: TensorDict, grads: TensorDict, rows: slice = slice(None)) -> None:
        """One AdamW step of members `rows` (params and grads hold just those rows)."""
        hp = self.hp
        steps = self.steps[rows]
        steps += 1
        step_size = (hp.lr / (1 - hp.betas[0] ** steps)).to(torch.float32)
        bc2_sqrt = torch.sqrt(1 - hp.betas[1] ** steps).to(torch.float32)
        for k, p in params.items():
            adamw_update(p, grads[k], self.exp_avg[k][rows], self.exp_avg_sq[k][rows], _per_member(step_size, p),
                         _per_member(bc2_sqrt, p), hp.betas[0], hp.betas[1], hp.eps)


@contextlib.contextmanager
def fp32_arithmetic() -> Iterator[None]:
    """fp32 as written and the same sums on every run: cuDNN runs fp32 convolutions in TF32
    unless told not to (torch's default `cudnn.allow_tf32 = True`: a small CNN was 3e-4 away
    from the CPU after one loop on an H200) and may pick algorithms that add in any order; a
    user may have turned cuBLAS's TF32 on. Both are set for psa's work and restored after."""
    matmul = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.backends.cudnn.flags(enabled=torch.backends.cudnn.enabled, benchmark=False,
                                        deterministic=True, allow_tf32=False):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul


def _in_fp32(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def inner(*args: Any, **kwargs: Any) -> Any:
        with fp32_arithmetic():
            return fn(*args, **kwargs)
    return inner


# ---------------------------------------------------------------------------------------------
# batched="auto": which path trains a population faster, by a fixed rule


def convolutions(model: nn.Module) -> tuple[str, ...]:
    """The names of `model`'s convolution modules (nn.Conv1d/2d/3d and the transposed ones)."""
    return tuple(n for n, m in model.named_modules() if isinstance(m, nn.modules.conv._ConvNd))


def auto_batched(convs: tuple[str, ...] | list[str], device: torch.device | str) -> tuple[bool, str]:
    """batched="auto" for a model with convolution modules `convs` on `device`: (batched, why).

    A rule of the model's structure and the device's type, never of a timing, so the same
    command on the same device always trains on the same path (the two paths round
    differently). Measured on a quiet 2-core CPU (bench/results/batching-cpu.md): under vmap
    each convolution becomes one grouped convolution, which the CPU's kernels run slower than
    the members' plain ones one after another (CNNs of tens of members: the population 2-4x
    slower, a tiny one even), while an MLP's population is about 1.9x faster than its members
    one at a time. On a GPU the population fills the device; psa does not time it there and
    keeps it.
    """
    kind = torch.device(device).type
    if kind == "cpu" and convs:
        return False, (f"it has {len(convs)} convolution{'s' if len(convs) > 1 else ''}, which a CPU runs slower "
                       f"under vmap (as grouped convolutions)")
    if kind == "cpu":
        return True, "it has no convolution, and on a CPU its population (vmap) is faster"
    return True, f"on {kind} the population (vmap) fills the device"


BATCHED = (True, False, "auto")


class ModuleEngine:
    """The Frustration Engine on a ModulePopulation: every member's meta-loop, in lockstep,
    engine variants included (psa.core.variant; docs/variants.md)."""

    def __init__(self, pop: ModulePopulation, data: Dataset, hparams: HParams, batched: bool | str = "auto",
                 max_members: int | None = None, eval_rows: int = 2048) -> None:
        """`batched`: True vmaps the members together, False trains them one at a time with
        plain autograd (the fallback where vmap cannot batch the model), "auto" picks by
        auto_batched's rule and says so once; `max_members`: members trained at once (None:
        all, halved on out-of-memory); `eval_rows`: validation images per evaluation block."""
        if data.train_x.device != pop.device:
            raise ConfigError(f"data on {data.train_x.device} but population on {pop.device}")
        if not any(batched is b for b in BATCHED) and batched != "auto":
            raise ConfigError(f"batched must be True, False or 'auto', got {batched!r}")
        self.pop, self.data, self.hp = pop, data, hparams
        if batched == "auto":
            assert pop.template is not None
            batched, why = auto_batched(convolutions(pop.template), pop.device)
            note_once(f"psa: {factory_name(pop.factory)} on {pop.device.type}: batched='auto' chose "
                      f"{'the population (vmap)' if batched else 'one member at a time'}: {why}")
            self.batching = f"auto: {why}"
        else:
            self.batching = "batched=True: the members together (vmap)" if batched else \
                "batched=False: one member at a time"
        self.batched = bool(batched)
        self.chunk_size = max_members or pop.size
        self.eval_rows = eval_rows
        self.holder = _Noise()
        assert pop.template is not None
        self.model = _engine_template(pop.template, pop.spec, self.holder).to(pop.device)
        units = pop.spec.dropout_units
        self.pos_hash = rng.position_hash(hparams.batch_size, units, pop.device) if units else None
        self.ablated_last: tuple[tuple[int, int] | None, ...] = ()

    # ------------------------------------------------------------ member settings
    # Everything a member's settings decide is read here: its ablations, optimizer, weight
    # decay, dropout rate, and (_follow_schedules) its mode.
    def _ablations(self, loop: int) -> tuple[tuple[tuple[int, int], ...], ...]:
        """Every (unit layer, unit) each member ablates at `loop` (psa.core.ablation.choose_neurons
        over the model's unit layers: a plain MLP gets its SimpleMLP's neurons)."""
        arch = self.pop.spec.arch
        return tuple(choose_neurons(arch, m.mode, m.seed, loop, m.variant, self.hp.meta_loops)
                     for m in self.pop.members)

    def _follow_schedules(self, loop: int) -> None:
        """Members on a mode schedule switch mode at a loop boundary, as psa's engine does: the
        new mode's rates (HParams.member) and a mode_history entry."""
        pop = self.pop
        pop.members = scheduled_members(pop.members, self.hp, loop, pop.mode_history)

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
    def _ablate(self, tensors: TensorDict, m0: int, ablated: tuple[tuple[tuple[int, int], ...], ...]) -> None:
        """Zero in `tensors` (a chunk's parameters, or AdamW moments keyed alike) what each member
        j's ablations name: the unit's incoming weights and bias, its BatchNorm scale and shift,
        and in `hidden` mode its columns (or input channel) in the consumer."""
        spec = self.pop.spec
        for j, units in enumerate(ablated):
            mode = self.pop.members[m0 + j].mode
            for layer_index, u in units:
                layer = spec.layers[layer_index]
                names = [(f"{layer.name}.weight", u), (f"{layer.name}.bias", u)]
                if layer.norm is not None:
                    names += [(f"{layer.norm}.weight", u), (f"{layer.norm}.bias", u)]
                for key, idx in names:
                    t = tensors.get(key)
                    if t is not None:
                        t[j, idx].zero_()
                if mode == "hidden" and layer.consumer is not None:
                    c = layer.consumer
                    tensors[f"{c.name}.weight"][j][:, u * c.block : (u + 1) * c.block].zero_()

    # ------------------------------------------------------------ one loop
    def _loss(self, params: TensorDict, buffers: TensorDict, x: torch.Tensor, y: torch.Tensor,
              noise: torch.Tensor | None) -> torch.Tensor:
        self.holder.noise = noise
        try:
            out = functional_call(self.model, (params, buffers), (x,))
        finally:
            self.holder.noise = None
        return cross_entropy(out, y)

    def _steps(self) -> list[int]:
        bs, n = self.hp.batch_size, self.data.train_x.shape[0]
        full, tail = divmod(n, bs)
        return [bs] * full + ([tail] if tail else [])

    def _train_batched(self, params: TensorDict, buffers: TensorDict, members: tuple[Member, ...], loop: int,
                       member_adamw: _MemberAdamW | None) -> tuple[torch.Tensor, torch.Tensor]:
        """One epoch of the members in `params` (C, ...) together; (loss sum, diverged) (C,)."""
        dev, data, hp = self.pop.device, self.data, self.hp
        c = len(members)
        order = rng.data_order([m.seed for m in members], loop, data.train_x.shape[0], dev)
        names = list(params)
        opt = self._new_optimizer([params[k] for k in names]) if member_adamw is None else None
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
                if member_adamw is not None:
                    member_adamw.step(params, grads)
                    continue
                for k in names:
                    params[k].grad = grads[k]
                assert opt is not None
                opt.step()
        for k in names:
            params[k].grad = None
        return loss_sum, diverged

    def _train_single(self, params: TensorDict, buffers: TensorDict, members: tuple[Member, ...], loop: int,
                      member_adamw: _MemberAdamW | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The same epoch one member after another with plain autograd (modules vmap cannot batch)."""
        dev, data, hp = self.pop.device, self.data, self.hp
        c = len(members)
        loss_sum = torch.zeros(c, device=dev)
        diverged = torch.zeros(c, dtype=torch.bool, device=dev)
        decay = self._decay(members)
        self.model.train()
        for j, mem in enumerate(members):
            order = rng.data_order([mem.seed], loop, data.train_x.shape[0], dev)[0]
            # (1, ...) rows of the chunk's tensors: trained in place, stepped like a chunk of one
            p_j = {k: v[j : j + 1].detach().requires_grad_() for k, v in params.items()}
            b_j = {k: v[j] for k, v in buffers.items()}
            opt = self._new_optimizer(list(p_j.values())) if member_adamw is None else None
            drop = self._dropout((mem,), loop)
            for s, b in enumerate(self._steps()):
                idx = order[s * hp.batch_size : s * hp.batch_size + b]
                noise = None
                if drop is not None:
                    assert self.pos_hash is not None
                    keys = rng.step_keys(drop[0], torch.tensor(s, dtype=torch.int64, device=dev))
                    noise = rng.dropout_noise(self.pos_hash[:b], keys, drop[1], drop[2])[0]
                loss = self._loss({k: v[0] for k, v in p_j.items()}, b_j, data.train_x[idx], data.train_y[idx],
                                  noise)
                for v in p_j.values():
                    v.grad = None
                loss.backward()
                loss_sum[j] += loss.detach()
                diverged[j] |= ~torch.isfinite(loss.detach())
                with torch.no_grad():
                    if decay is not None:
                        for v in p_j.values():
                            v.mul_(decay[j])
                    if member_adamw is not None:
                        member_adamw.step(p_j, {k: v.grad for k, v in p_j.items()}, slice(j, j + 1))
                    else:
                        assert opt is not None
                        opt.step()
            for v in p_j.values():
                v.grad = None
        return loss_sum, diverged

    @torch.no_grad()
    def count_correct(self, params: TensorDict, buffers: TensorDict, x_all: torch.Tensor,
                      y_all: torch.Tensor) -> torch.Tensor:
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

    def _begin(self, m0: int, m1: int, ablated: tuple[tuple[tuple[int, int], ...], ...]
               ) -> tuple[TensorDict, TensorDict, _MemberAdamW | None]:
        """A chunk's candidates (the LKG rows, ablated) and, where some member persists its
        optimizer state, its per-member AdamW (the LKG's state for those members, fresh for the
        rest, the ablated units' moments zeroed)."""
        pop = self.pop
        params = {k: v[m0:m1].clone() for k, v in pop.params.items()}
        buffers = {k: v[m0:m1].clone() for k, v in pop.buffers.items()}
        self._ablate(params, m0, ablated[m0:m1])
        members = pop.members[m0:m1]
        if not any(m.variant.optimizer_state == "persist" for m in members):
            return params, buffers, None
        assert pop.opt_avg is not None and pop.opt_sq is not None and pop.opt_step is not None
        opt = _MemberAdamW(params, self.hp)
        keep = torch.tensor([m.variant.optimizer_state == "persist" for m in members], device=pop.device)
        for src, dst in ((pop.opt_avg, opt.exp_avg), (pop.opt_sq, opt.exp_avg_sq)):
            for k, v in dst.items():
                v.copy_(torch.where(_per_member(keep, v), src[k][m0:m1], v))
        opt.steps.copy_(torch.where(keep, pop.opt_step[m0:m1], opt.steps))
        self._ablate(opt.exp_avg, m0, ablated[m0:m1])  # an ablated unit's moments die with it
        self._ablate(opt.exp_avg_sq, m0, ablated[m0:m1])
        return params, buffers, opt

    def _run_chunk(self, m0: int, m1: int, loop: int, ablated: tuple[tuple[tuple[int, int], ...], ...]
                   ) -> tuple[torch.Tensor, ...]:
        pop = self.pop
        members = pop.members[m0:m1]
        while True:
            params, buffers, member_adamw = self._begin(m0, m1, ablated)
            try:
                train = self._train_batched if self.batched else self._train_single
                loss, diverged = train(params, buffers, members, loop, member_adamw)
                break
            except Exception as e:  # noqa: BLE001 - only vmap's limits fall back
                if not self.batched or is_out_of_memory(e):
                    raise
                why = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                warnings.warn(f"psa: torch.func.vmap cannot batch {factory_name(pop.factory)} ({why}); training "
                              f"its members one at a time", RuntimeWarning, stacklevel=3)
                self.batched = False
                self.batching = f"vmap cannot batch it ({why}): one member at a time"
        fixed = tuple(a if m.variant.fixed else () for a, m in zip(ablated[m0:m1], members))
        if any(fixed):  # a fixed set stays dead: re-zeroed where it could regrow (output rows)
            self._ablate(params, m0, fixed)
            if member_adamw is not None:
                self._ablate(member_adamw.exp_avg, m0, fixed)
                self._ablate(member_adamw.exp_avg_sq, m0, fixed)
        correct = self.count_correct(params, buffers, self.data.val_x, self.data.val_y)
        with torch.no_grad():
            promote, forced, improved = self._promote(m0, m1, correct, diverged)
            for store, cand in ((pop.params, params), (pop.buffers, buffers)):
                for k, v in cand.items():
                    dst = store[k][m0:m1]
                    dst.copy_(torch.where(_per_member(promote, v), v, dst))
            if pop.bounty is not None:
                for k, v in {**params, **buffers}.items():
                    dst = pop.bounty[k][m0:m1]
                    dst.copy_(torch.where(_per_member(improved, v), v, dst))
            if member_adamw is not None:
                assert pop.opt_avg is not None and pop.opt_sq is not None and pop.opt_step is not None
                persist = torch.tensor([m.variant.optimizer_state == "persist" for m in members], device=pop.device)
                keep = promote & persist
                for src, store in ((member_adamw.exp_avg, pop.opt_avg), (member_adamw.exp_avg_sq, pop.opt_sq)):
                    for k, v in src.items():
                        dst = store[k][m0:m1]
                        dst.copy_(torch.where(_per_member(keep, v), v, dst))
                lkg_step = pop.opt_step[m0:m1]
                lkg_step.copy_(torch.where(keep, member_adamw.steps, lkg_step))
        return correct, promote, loss / len(self._steps()), diverged, forced, improved

    def _promote(self, m0: int, m1: int, correct: torch.Tensor, diverged: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The promotion decision of members m0..m1, as psa's engine makes it (Engine._promote):
        strictly better than the LKG (a diverged candidate scored like any other unless
        hparams.diverged is "discard"), or forced in by patience. Updates the LKG scores and the
        patience state; returns (promote, forced, improved: the bounty was beaten)."""
        pop = self.pop
        lkg_correct = pop.lkg_correct[m0:m1]
        ok = ~diverged if self.hp.diverged == "discard" else torch.ones_like(diverged)
        beats = ok & (correct > lkg_correct)
        promote, forced, improved = beats, torch.zeros_like(beats), beats
        if pop.streak is not None:
            assert pop.allowance is not None and pop.bounty_correct is not None
            members = pop.members[m0:m1]
            dev = correct.device
            k = torch.tensor([m.variant.patience for m in members], dtype=torch.int64, device=dev)
            growth = torch.tensor([m.variant.patience_growth for m in members], dtype=torch.int64, device=dev)
            promote, forced, improved = patience_decision(correct, beats, ok, diverged, k, growth,
                                                          pop.streak[m0:m1], pop.allowance[m0:m1],
                                                          pop.bounty_correct[m0:m1])
        lkg_correct.copy_(torch.where(promote, correct, lkg_correct))
        return promote, forced, improved

    @_in_fp32
    def meta_loop(self) -> LoopResult:
        """One meta-loop for every member; the population's LKG state moves forward by one loop."""
        t0 = time.perf_counter()
        pop = self.pop
        loop = pop.loop + 1
        self._follow_schedules(loop)
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
        correct, promoted, loss, diverged, forced, improved = (torch.cat(t).tolist() for t in zip(*outs))
        for j, b in enumerate(improved):
            if b:
                pop.bounty_loop[j] = loop
        pop.loop = loop
        n = pop.n_val
        discard = self.hp.diverged == "discard"
        return LoopResult(
            loop=loop,
            candidate_acc=tuple(math.nan if d and discard else 100.0 * c / n for c, d in zip(correct, diverged)),
            promoted=tuple(bool(p) for p in promoted),
            ablated=tuple(a[0] if a else None for a in ablated),
            lkg_score=tuple(pop.lkg_score()),
            train_loss=tuple(float(v) for v in loss),
            diverged=tuple(bool(d) for d in diverged),
            seconds=time.perf_counter() - t0,
            ablations=ablated,
            forced=tuple(bool(f) if m.variant.patience > 0 else None for f, m in zip(forced, pop.members)),
        )

    @_in_fp32
    def test_accuracy(self) -> list[float]:
        """Test-set accuracy (%) of every member's bounty model (its LKG, unless it has patience)."""
        model = self.pop.bounty_model()
        params = {k: model[k] for k in self.pop.params}
        buffers = {k: model[k] for k in self.pop.buffers}
        correct = self.count_correct(params, buffers, self.data.test_x, self.data.test_y)
        return [100.0 * c / self.data.test_y.numel() for c in correct.tolist()]


__all__ = ["ABLATIVE_MODES", "BATCHED", "Consumer", "ModelSpec", "ModuleEngine", "ModulePopulation", "UnitLayer",
           "auto_batched", "build", "convolutions", "cross_entropy", "factory_name", "fp32_arithmetic",
           "inspect_model", "resolve_factory"]
