"""How a model's graph wires its units, read once with torch.fx: for each unit layer, the one
layer that reads its units (what `hidden` mode zeroes too), a norm that belongs to it, whether
an ablation there persists under training (and why), the parameters several operations share
(tied weights), and a logits layer computed by F.linear on a parameter (a tied output layer).

Persistence is decided from the gradients. An ablated unit outputs a constant 0; its zeroed
weights stay exactly zero under AdamW (and decoupled weight decay) iff every gradient reaching
them is exactly zero. Walking forward from the unit's output: a ReLU stops the gradient at 0
(its derivative there is 0); dropout, pooling, reshapes and activations that keep 0 at 0 (GELU,
tanh, SiLU, ...) pass it on; a per-unit norm whose scale and shift were zeroed with the unit
(BatchNorm) outputs 0 and passes it on; anything else that reads the unit (a Linear, attention,
a sum with a skip connection, a norm mixing units, the logits) sends a gradient back, and the
ablation regrows. `hidden` mode also zeroes the unit's columns in its one reader, which then
sends nothing back. The verdicts are checked on the test zoo by tests/test_units.py.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

UNIT_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
NORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
# statistics per unit: a unit that outputs a constant 0 is normalised to 0 (to its shift)
PER_UNIT_NORMS = (*NORM_TYPES, nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)
# statistics over several units: a zeroed unit still moves the others' mean and variance
MIXING_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm, *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()))
# modules whose weights psa never ablates, said in a note
NEVER_UNITS = (nn.RNNBase, nn.RNNCellBase, nn.Embedding, nn.EmbeddingBag, nn.modules.conv._ConvTransposeNd)
# pooling: over a Conv's spatial dimensions it keeps each channel apart; over a Linear's output
# it pools the last dimensions, which hold the Linear's units, and mixes them
POOL_MODULES = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
                nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
                nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)
POOL_FUNCTIONS = {F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
                  F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d}
# modules that map each unit (feature or channel) to itself: a chain through them keeps the unit
PASS_MODULES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.Mish,
                nn.Hardtanh, nn.Softplus, nn.Identity, nn.Dropout, *POOL_MODULES)
PASS_FUNCTIONS = {torch.relu, F.relu, F.relu6, F.leaky_relu, F.elu, F.gelu, F.silu, torch.tanh, torch.sigmoid,
                  F.mish, F.dropout, *POOL_FUNCTIONS}
PASS_METHODS = {"relu", "sigmoid", "tanh", "contiguous"}
# of those, the ones whose derivative at 0 is 0 (torch's backward: grad * (x > 0)) ...
BLOCK_MODULES = (nn.ReLU, nn.ReLU6)
BLOCK_FUNCTIONS = {torch.relu, F.relu, F.relu6}
BLOCK_METHODS = {"relu"}
# ... and the ones that turn a 0 into a nonzero constant
NONZERO_MODULES = (nn.Sigmoid, nn.Softplus)
NONZERO_FUNCTIONS = {torch.sigmoid}
NONZERO_METHODS = {"sigmoid"}
# moves entries without changing them: a unit's zeros stay zeros (somewhere else)
LAYOUT_FUNCTIONS = {operator.getitem, torch.flatten, torch.reshape, torch.transpose, torch.permute, torch.squeeze,
                    torch.unsqueeze, torch.cat, torch.stack}
LAYOUT_METHODS = {"reshape", "view", "flatten", "permute", "transpose", "squeeze", "unsqueeze", "contiguous"}
REDUCE_METHODS = {"mean", "sum"}  # keeps the unit's zeros unless it reduces over the units
NO_GRADIENT = {("call_function", getattr), ("call_method", "size"), ("call_method", "dim")}
LINEAR_FUNCTIONS = {F.linear, torch._C._nn.linear}
OUTPUT_REGROWS = "the output layer: its logits are in the loss"


@dataclass(frozen=True)
class Consumer:
    """Where `hidden` mode also zeroes a unit: `block` consecutive input columns (a Linear, after
    a Flatten of `block` positions per channel; F.linear; an attention's in_proj; an attention's
    out_proj for a head) or one input channel (a Conv) of parameter `param` of module `name`."""

    name: str
    block: int
    param: str = "weight"

    @property
    def weight(self) -> str:
        """The parameter's path in the model ("fc.weight")."""
        return f"{self.name}.{self.param}" if self.name else self.param


@dataclass(frozen=True)
class Wiring:
    """What the graph says about one unit layer: its reader for `hidden` mode (or why there is
    none), a norm that belongs to its units, and whether an ablation there persists in `full`
    mode and in `hidden` mode (None: psa cannot tell), with the reason."""

    consumer: Consumer | None = None
    norm: str | None = None
    no_consumer: str = ""
    persists: bool | None = None
    persists_hidden: bool | None = None
    why: str = ""


class _DeepTracer(fx.Tracer):
    """fx's tracer, but entering torch.nn containers that hold unit layers (a
    TransformerEncoderLayer, whose Linear layers, attention and skip sums psa must see) and
    keeping attention and recurrent layers whole."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if isinstance(m, (nn.MultiheadAttention, nn.RNNBase)):
            return True
        if m.__module__.startswith("torch.nn") and any(
                isinstance(c, (*UNIT_TYPES, nn.MultiheadAttention)) for c in m.modules() if c is not m):
            return False
        return super().is_leaf_module(m, qualname)


def trace(module: nn.Module) -> tuple[fx.Graph | None, str]:
    """`module`'s graph (entering torch.nn containers where it can), or None and why not."""
    mha = getattr(torch.backends, "mha", None)
    fastpath = mha.get_fastpath_enabled() if mha is not None else None
    if mha is not None:  # a TransformerEncoderLayer's fused path branches on tensor values
        mha.set_fastpath_enabled(False)
    try:
        try:
            return _DeepTracer().trace(module), ""
        except Exception:  # noqa: BLE001 - a container fx cannot enter: take it whole, as fx does
            return fx.Tracer().trace(module), ""
    except Exception as e:  # noqa: BLE001 - dynamic control flow etc.
        return None, f"torch.fx cannot trace the model ({type(e).__name__}: {str(e).splitlines()[0][:120]})"
    finally:
        if mha is not None:
            mha.set_fastpath_enabled(fastpath)


def _type(m: nn.Module) -> str:
    return type(m).__name__


class Graph:
    """A traced model: its unit layers' wiring, its shared parameters and its logits layer."""

    def __init__(self, module: nn.Module, graph: fx.Graph) -> None:
        self.module, self.graph = module, graph
        self.mods = dict(module.named_modules())
        self.canonical = {id(p): n for n, p in module.named_parameters()}  # a shared one's first name
        self.uses = self._parameter_uses()

    # ------------------------------------------------------------ shared parameters
    def _parameter_uses(self) -> dict[str, list[str]]:
        """Every parameter's readers in the graph, one entry per operation: the module calls
        that hold it (a module fx took whole holds its children's too) and the operations
        reading it directly ("F.linear", "add", ...)."""
        uses: dict[str, list[str]] = {}
        for node in self.graph.nodes:
            if node.op == "call_module":
                for p in self.mods[str(node.target)].parameters():
                    uses.setdefault(self.canonical[id(p)], []).append(self._what(node))
            elif node.op == "get_attr" and id(self._attr(str(node.target))) in self.canonical:
                p = self.canonical[id(self._attr(str(node.target)))]
                uses.setdefault(p, []).extend(self._what(u) for u in node.users)
        return uses

    def _attr(self, target: str) -> Any:
        obj: Any = self.module
        for part in target.split("."):
            obj = getattr(obj, part, None)
        return obj

    def tied(self) -> dict[str, list[str]]:
        """The parameters that more than one layer or operation reads (tied weights; a module
        called twice is not tied, its weights are its own): {parameter: its readers}."""
        return {p: list(dict.fromkeys(u)) for p, u in self.uses.items() if len(set(u)) > 1}

    def _what(self, node: fx.Node) -> str:
        """An operation for people: "fc (Linear)", "F.linear", "add"."""
        if node.op == "call_module":
            return f"{node.target} ({_type(self.mods[str(node.target)])})"
        if node.op == "call_function" and node.target in LINEAR_FUNCTIONS:
            return "F.linear"
        return str(getattr(node.target, "__name__", node.target))

    # ------------------------------------------------------------ the logits layer
    def functional_output(self) -> tuple[str, str | None] | None:
        """(weight, bias or None) where the model's logits are F.linear(h, W[, b]) of its own
        parameters (a tied or functional output layer); else None."""
        out = next(n for n in self.graph.nodes if n.op == "output").args[0]
        if not (isinstance(out, fx.Node) and out.op == "call_function" and out.target in LINEAR_FUNCTIONS):
            return None
        args = list(out.args) + [None] * 3
        w, b = out.kwargs.get("weight", args[1]), out.kwargs.get("bias", args[2])
        names = []
        for a in (w, b):
            if a is None:
                names.append(None)
                continue
            if not (isinstance(a, fx.Node) and a.op == "get_attr" and id(self._attr(str(a.target))) in self.canonical):
                return None
            names.append(self.canonical[id(self._attr(str(a.target)))])
        return names[0], names[1]  # type: ignore[return-value]

    def _nodes(self, layer: str) -> list[fx.Node]:
        return [n for n in self.graph.nodes if n.op == "call_module" and n.target == layer]

    def _functional_nodes(self, weight: str) -> list[fx.Node]:
        def weight_of(n: fx.Node) -> Any:
            return n.args[1] if len(n.args) > 1 else n.kwargs.get("weight")

        return [n for n in self.graph.nodes if n.op == "call_function" and n.target in LINEAR_FUNCTIONS
                and isinstance(weight_of(n), fx.Node) and weight_of(n).op == "get_attr"
                and self.canonical.get(id(self._attr(str(weight_of(n).target)))) == weight]

    # ------------------------------------------------------------ a unit layer's wiring
    def wiring(self, layer: str, units: int, output: bool, weights: tuple[str, ...]) -> Wiring:
        """The wiring of unit layer `layer` (a module path, or for a functional output layer
        its weight's path) of `units` units, whose incoming weights are `weights`; `output`:
        it gives the logits."""
        m = self.mods.get(layer)
        nodes = self._nodes(layer) if m is not None else self._functional_nodes(layer)
        tied = self.tied()
        shared = [p for p in weights if p in tied]
        if output:
            return Wiring(no_consumer="it is the output layer", persists=False, persists_hidden=None,
                          why=OUTPUT_REGROWS)
        if isinstance(m, nn.MultiheadAttention):
            return Wiring(Consumer(layer, m.head_dim, "out_proj.weight"), persists=False, persists_hidden=True,
                          why="a head's values reach out_proj with no ReLU between (its queries and keys stay "
                              "zero); `hidden` mode also zeroes the head's out_proj columns, their only reader")
        if not nodes:
            where = self._owner(layer)
            why = f"it runs inside {where}, which torch.fx does not trace into"
            return Wiring(no_consumer=why, why=why)
        consumer, norm, reason, reader = (None, None, "it is called more than once", None)
        if len(nodes) == 1 and m is not None:
            consumer, norm, reason, reader = self._follow(nodes[0], m, units)
        if shared:
            others = list(dict.fromkeys(u for p in shared for u in tied[p] if not u.startswith(f"{layer} ")))
            why = f"its weights are tied to {', '.join(others)}, whose gradient reaches them"
            return Wiring(consumer, norm, reason, False, False, why)
        full, why_full = self._gradient(nodes, norm, None)
        if consumer is None:
            return Wiring(None, norm, reason, full, full, why_full)
        hidden, why_hidden = self._gradient(nodes, norm, reader)
        if full == hidden:
            return Wiring(consumer, norm, reason, full, hidden, why_full)
        if hidden:
            why = f"{why_full}; `hidden` mode also zeroes its columns in {consumer.weight}, their only reader"
        else:
            why = why_hidden
        return Wiring(consumer, norm, reason, full, hidden, why)

    def _owner(self, layer: str) -> str:
        """The module fx took whole that runs `layer`."""
        parts = layer.split(".")
        for i in range(1, len(parts)):
            name = ".".join(parts[:i])
            if any(n.op == "call_module" and n.target == name for n in self.graph.nodes):
                return f"{name} ({_type(self.mods[name])})"
        return "a module"

    def _follow(self, node: fx.Node, src: nn.Module, units: int
                ) -> tuple[Consumer | None, str | None, str, fx.Node | None]:
        """Walk from a unit layer's output through unit-preserving operations to the one Linear,
        Conv, F.linear or self-attention that reads it: (consumer, the unit's norm, why no
        consumer, the consumer's node)."""
        mods, norm, flattened, cur, first = self.mods, None, False, node, True
        linear = isinstance(src, nn.Linear)
        while True:
            # x.size(0) in x.view(x.size(0), -1) reads the shape, not the units: not a second use
            users = [u for u in cur.users if (u.op, u.target) not in NO_GRADIENT]
            if len(users) != 1:
                return None, norm, f"its output is used {len(users)} times" if users else "its output is unused", None
            u = users[0]
            if u.op == "call_module" and isinstance(mods[str(u.target)], (*UNIT_TYPES, nn.MultiheadAttention)) and len(
                    self._nodes(str(u.target))) > 1:  # its columns also read its other calls' inputs, which regrow them
                return None, norm, f"its reader {u.target} is called more than once", None
            if u.op == "call_module" and isinstance(mods[str(u.target)], nn.MultiheadAttention):
                m = mods[str(u.target)]
                if (u.args[:3] == (cur, cur, cur) and all(v is not cur for v in u.kwargs.values()) and linear
                        and not flattened and m._qkv_same_embed_dim and m.embed_dim == units
                        and not self._shared(self.canonical[id(m.in_proj_weight)])):
                    return Consumer(str(u.target), 1, "in_proj_weight"), norm, "", u
                return None, norm, f"attention {u.target} reads it other than as its query, key and value", None
            if not u.args or u.args[0] is not cur or any(a is cur for a in u.args[1:]) or any(
                    v is cur for v in u.kwargs.values()):
                return None, norm, f"it flows into {u.op} {self._what(u)} other than as its input", None
            if u.op == "call_function" and u.target in LINEAR_FUNCTIONS:
                w = u.args[1] if len(u.args) > 1 else u.kwargs.get("weight")
                is_param = isinstance(w, fx.Node) and w.op == "get_attr"
                p = self.canonical.get(id(self._attr(str(w.target)))) if is_param else None  # type: ignore[union-attr]
                if p is None:
                    return None, norm, "F.linear reads it with a weight that is no parameter", None
                if len(self.uses.get(p, ())) > 1 and not self._shared(p):
                    return None, norm, f"its reader F.linear(·, {p}) is called more than once", None
                if self._shared(p):
                    others = ", ".join(x for x in dict.fromkeys(self.uses[p]) if x != "F.linear")
                    why = f"its reader F.linear(·, {p}) shares that weight with {others} (tied weights)"
                    return None, norm, why, None
                if flattened or self._attr(str(w.target)).shape[1] != units:
                    return None, norm, f"F.linear(·, {p}) reads it in an unknown layout", None
                owner, _, attr = p.rpartition(".")
                return Consumer(owner, 1, attr), norm, "", u
            if u.op == "call_module":
                m = mods[str(u.target)]
                if isinstance(m, UNIT_TYPES) and self._shared(self.canonical[id(m.weight)]):
                    return None, norm, f"{u.target}'s weight is shared with another layer (tied weights)", None
                if isinstance(m, nn.Linear):
                    if linear and not flattened and m.in_features == units:
                        return Consumer(str(u.target), 1), norm, "", u
                    # a channel flattens to a block of columns; a Linear's unit is its last dimension,
                    # which flattens to every `units`-th column (a block only where it is all there is)
                    if flattened and m.in_features % units == 0 and (not linear or m.in_features == units):
                        return Consumer(str(u.target), m.in_features // units), norm, "", u
                    return None, norm, f"{u.target} reads it in an unknown layout", None
                if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
                    # a Conv's channels are dimension 1, a Linear's units the last: only a Conv's are those
                    if not linear and not flattened and m.in_channels == units and m.groups == 1:
                        return Consumer(str(u.target), 1), norm, "", u
                    return None, norm, f"{u.target} reads it in an unknown layout", None
                if self._unit_norm(m, src, units):
                    if first:
                        norm = str(u.target)
                        cur, first = u, False
                        continue
                    return None, norm, f"{u.target} normalises it after other operations", None
                if linear and isinstance(m, POOL_MODULES):
                    return None, norm, f"{u.target} ({type(m).__name__}) pools the dimensions that hold its units", None
                if isinstance(m, PASS_MODULES) or type(m).__name__ == "MaskedDropout":
                    cur, first = u, False
                    continue
                if isinstance(m, nn.Flatten) and m.start_dim == 1 and m.end_dim == -1 and not flattened:
                    flattened, cur, first = True, u, False
                    continue
                return None, norm, f"it passes through {type(m).__name__}", None
            if u.op == "call_function" and linear and u.target in POOL_FUNCTIONS:
                return None, norm, f"{u.target.__name__} pools the dimensions that hold its units", None  # type: ignore[union-attr]
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
            return None, norm, f"it passes through {u.op} {getattr(u.target, '__name__', u.target)}", None

    def _shared(self, param: str) -> bool:
        return len(set(self.uses.get(param, ()))) > 1

    @staticmethod
    def _unit_norm(m: nn.Module, src: nn.Module, units: int) -> bool:
        """Whether norm `m`, right after a unit layer `src`, normalises each of its units in
        place (feature u in, feature u out): its scale and shift for a unit are the unit's."""
        if isinstance(m, PER_UNIT_NORMS):
            return m.num_features == units
        if isinstance(m, nn.GroupNorm):
            return m.num_channels == units
        if isinstance(m, nn.LayerNorm):
            return isinstance(src, nn.Linear) and tuple(m.normalized_shape) == (units,)
        return False

    def _gradient(self, starts: list[fx.Node], norm: str | None, reader: fx.Node | None) -> tuple[bool | None, str]:
        """Whether a unit of the layer called at `starts`, its incoming weights and bias zeroed
        (and its `norm`'s scale and shift), gets exactly zero gradient: (persists, why); None
        where the walk meets an operation it cannot follow. `reader`: the consumer whose columns
        `hidden` mode zeroed, which sends nothing back while its input is exactly zero."""
        blockers: list[str] = []
        reaches: list[str] = []  # readers that send a gradient back
        effects: list[str] = []  # operations that make the zeroed unit matter again
        unknown: list[str] = []
        # the unit's own per-unit norm with a scale (zeroed with the unit): the gradient through
        # it to the unit's weights and to the scale is the zeroed scale times something, so they
        # stay 0 for good, and what follows the norm decides only whether the shift regrows
        scaled = norm is not None and getattr(self.mods[norm], "weight", None) is not None
        before_scale = False  # whether something not behind that norm sends a gradient back
        # (node, whether the unit's entries there are still exactly 0: True, or None for unknown,
        # whether the node is past the scaled norm)
        stack: list[tuple[fx.Node, bool | None, bool]] = [(n, True, False) for n in starts]
        seen: set[tuple[fx.Node, bool | None, bool]] = set()
        linear = any(n.op == "call_module" and isinstance(self.mods[str(n.target)], nn.Linear) for n in starts)
        while stack:
            cur, zero, past = stack.pop()
            if (cur, zero, past) in seen:
                continue
            seen.add((cur, zero, past))
            for u in cur.users:
                if (u.op, u.target) in NO_GRADIENT:
                    continue
                what = self._what(u)
                if u.op == "output":
                    reaches.append("the logits")
                    before_scale |= not past
                    continue
                kind = "reader" if u is reader else self._kind(u, cur, norm)
                if kind == "pass" and linear and _pools(u, self.mods):
                    kind = "reduce"  # a Linear's units pooled together: the unit's 0 need not stay 0
                after = past or (scaled and kind == "pass" and u.op == "call_module" and str(u.target) == norm)
                sent = len(reaches) + len(effects)  # a branch below that grows these sends a gradient back
                if kind in ("block", "reader") and zero:
                    blockers.append(what)
                elif kind in ("block", "reader"):
                    unknown.append(f"{what} (psa cannot tell whether its input is still 0)")
                elif kind in ("pass", "layout"):
                    stack.append((u, zero, after))
                elif kind == "reduce":
                    stack.append((u, None, after))
                elif kind == "nonzero":
                    effects.append(f"{what} turns its 0 into a nonzero output")
                elif kind == "mixing":
                    effects.append(f"{what} normalises it with the other units")
                elif kind == "shift":
                    effects.append(f"{what} shifts it by its own bias")
                elif kind == "sum":
                    reaches.append(f"a sum ({u.name})")
                elif kind == "reads":
                    reaches.append(what)
                else:
                    unknown.append(what)
                before_scale |= not past and len(reaches) + len(effects) > sent
        if reaches or effects:
            said = "; ".join(dict.fromkeys(([f"it reaches {_join(reaches)} with no ReLU between"] if reaches else [])
                                           + effects))
            if not before_scale:
                return False, (f"only the shift of its norm {norm} regrows ({said}): the norm's zeroed scale keeps "
                               f"the unit's weights and itself at 0, so the unit comes back as a constant")
            return False, said
        if unknown:
            return None, f"its output reaches {_join(unknown)}, which psa does not follow"
        if not blockers:
            return True, "its output is never used"
        return True, f"{_join(blockers)} stops its gradient at 0"

    def _kind(self, u: fx.Node, cur: fx.Node, norm: str | None) -> str:
        """What operation `u` does to the unit in `cur`, for the gradient walk."""
        as_input = bool(u.args) and u.args[0] is cur and not any(a is cur for a in u.args[1:]) and not any(
            v is cur for v in u.kwargs.values())
        if u.op == "call_module":
            m = self.mods[str(u.target)]
            if not as_input:
                return "reads"
            if isinstance(m, BLOCK_MODULES):
                return "block"
            if isinstance(m, NONZERO_MODULES):
                return "nonzero"
            if isinstance(m, PASS_MODULES) or type(m).__name__ == "MaskedDropout" or isinstance(
                    m, (nn.Flatten, nn.Unflatten)):
                return "pass"
            if str(u.target) == norm:
                # the unit's own norm, its scale and shift zeroed: outputs 0 and, if per unit,
                # passes the gradient on; a norm over several units sends one back through them
                return "mixing" if isinstance(m, MIXING_NORMS) and not _per_unit_groups(m) else "pass"
            if isinstance(m, MIXING_NORMS):
                return "pass" if _per_unit_groups(m) and not _affine(m) else "mixing"
            if isinstance(m, PER_UNIT_NORMS):
                return "shift" if _affine(m) else "pass"
            return "reads"
        tensors = [a for a in (*u.args, *u.kwargs.values()) if isinstance(a, fx.Node)]
        if u.op == "call_function":
            if u.target in (operator.add, operator.sub, torch.add, torch.sub, operator.iadd):
                return "pass" if all(a is cur for a in tensors) else "sum"
            if _scales(u, cur, u.target in (operator.mul, torch.mul), u.target in (operator.truediv, torch.div)):
                return "pass"
            if u.target in LAYOUT_FUNCTIONS:
                return "layout"
            if not as_input:
                return "reads"
            if u.target in BLOCK_FUNCTIONS:
                return "block"
            if u.target in NONZERO_FUNCTIONS:
                return "nonzero"
            if u.target in PASS_FUNCTIONS:
                return "pass"
            if u.target in LINEAR_FUNCTIONS or u.target in (torch.matmul, operator.matmul, operator.mul, torch.mul):
                return "reads"
            return "unknown"
        if u.op == "call_method":
            if u.target in ("add", "sub", "add_", "sub_"):
                return "pass" if all(a is cur for a in tensors) else "sum"
            if _scales(u, cur, u.target == "mul", u.target == "div"):
                return "pass"
            if not as_input:
                return "reads"
            if u.target in BLOCK_METHODS:
                return "block"
            if u.target in NONZERO_METHODS:
                return "nonzero"
            if u.target in PASS_METHODS or u.target in LAYOUT_METHODS:
                return "layout" if u.target in LAYOUT_METHODS else "pass"
            if u.target in REDUCE_METHODS:
                return "reduce"
            return "unknown"
        return "unknown"


def _scales(u: fx.Node, cur: fx.Node, mul: bool, div: bool) -> bool:
    """Whether `u` (a product if `mul`, a quotient if `div`) scales `cur` elementwise, by a
    constant or another tensor (a buffer, a gate): cur's 0 stays 0, and its gradient (the
    incoming one times the factor) passes on. Not a division by `cur`."""
    if mul:
        return any(a is cur for a in u.args[:2])
    return div and bool(u.args) and u.args[0] is cur and not any(a is cur for a in u.args[1:])


def _pools(u: fx.Node, mods: dict[str, nn.Module]) -> bool:
    """Whether `u` is a pooling (module or function)."""
    if u.op == "call_module":
        return isinstance(mods[str(u.target)], POOL_MODULES)
    return u.op == "call_function" and u.target in POOL_FUNCTIONS


def _per_unit_groups(m: nn.Module) -> bool:
    """A GroupNorm with one channel per group normalises each unit alone."""
    return isinstance(m, nn.GroupNorm) and m.num_groups == m.num_channels


def _affine(m: nn.Module) -> bool:
    return getattr(m, "weight", None) is not None or getattr(m, "bias", None) is not None


def _join(items: list[str]) -> str:
    items = list(dict.fromkeys(items))
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]
