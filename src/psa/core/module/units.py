"""What PSA can ablate in a model of your own, found once by running and tracing it: its unit
layers (the output features of every nn.Linear and the output channels of every nn.Conv the
forward calls, in the order it first calls them; the last is the output layer), the one layer
that consumes each unit (through elementwise and per-channel operations: `hidden` mode zeroes
the unit's weights there too), a BatchNorm that normalises a unit (its scale and shift are
zeroed with it, or the unit would output the constant shift), and the nn.Dropout modules.

Where the consumer is ambiguous (a residual add, a concatenation, a module fx cannot trace) the
model gets one note and `hidden` mode zeroes only the incoming side.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from psa.core.ablation import choose_unit
from psa.core.arch import Arch
from psa.core.errors import ConfigError
from psa.core.member import MODES, Member

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
    units each drops per example (call order), its other dropout sites (functional and attention
    dropout, psa.core.module.noise), and notes to print once."""

    layers: tuple[UnitLayer, ...]
    dropouts: tuple[tuple[str, int], ...]
    notes: tuple[str, ...] = ()
    functional_dropouts: int = 0
    classes: int = 0  # the width of the model's logits

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
            if isinstance(m, PASS_MODULES) or type(m).__name__ == "MaskedDropout":
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


def inspect_model(module: nn.Module, sample_x: torch.Tensor, n_classes: int | None,
                  name: str = "the model") -> ModelSpec:
    """The unit layers, consumers and dropouts of `module`, checked on a batch of the data:
    it must have a Linear or Conv layer, and map (N, ...) inputs to (N, n_classes) logits
    (n_classes None: any (N, C) logits, the model's C classes)."""
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
    if torch.is_tensor(out) and out.dim() == 2 and n_classes is None:
        n_classes = out.shape[1]  # the model's own width: the labels are checked against it
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
    return ModelSpec(tuple(layers), dropouts, tuple(notes), _functional_dropouts(module, sample_x), int(out.shape[1]))


def _functional_dropouts(module: nn.Module, x: torch.Tensor) -> int:
    """The dropout sites a training forward of `module` calls besides its nn.Dropout modules:
    F.dropout in its own code, and attention whose dropout is on (psa computes it with
    F.dropout: psa.core.module.functional.Attention). Counted on a copy: a training forward
    moves a BatchNorm's running statistics."""
    import copy

    from psa.core.module.noise import MemberRandomness, member_forward

    twin = copy.deepcopy(module).train()
    for m in twin.modules():
        if type(m) is nn.Dropout:
            m.forward = lambda t: t  # type: ignore[method-assign]  # counted apart, as modules
    mode = MemberRandomness()
    try:  # attention's own dropout draws here: from a forked generator, so the caller's is untouched
        with torch.random.fork_rng(devices=[]), member_forward(mode, None), torch.no_grad():
            twin(x)
    except Exception:  # noqa: BLE001 - the model ran in eval mode: a count of 0 only forgoes dropout mode
        return 0
    attention = sum(1 for m in twin.modules() if isinstance(m, nn.MultiheadAttention) and m.dropout > 0)
    return mode.sites + attention


def check_member(spec: ModelSpec, mem: Member, name: str = "the model") -> None:
    """ConfigError unless `mem` can train on a model of `spec`: every mode it runs in (its
    schedule's) has what it needs, and its variant's ablation settings fit the unit layers."""
    modes = [m for m, _ in mem.variant.schedule] or [mem.mode]
    for mode in modes:
        if mode not in MODES:
            raise ConfigError(f"unknown mode {mode!r}")
        if mode == "hidden" and not spec.hidden:
            raise ConfigError(f"mode 'hidden' needs a hidden unit layer; {name} has only {spec.describe()}")
        if mode == "dropout" and not spec.dropouts and not spec.functional_dropouts:
            raise ConfigError(f"mode 'dropout' sets the rate of every dropout of the model (nn.Dropout, F.dropout, "
                              f"attention dropout); {name} has none")
    try:
        mem.variant.check(spec.arch, mem.variant.start_mode(mem.mode))
    except ConfigError as e:
        raise ConfigError(f"{name} (unit layers {spec.describe()}): {e}") from None

