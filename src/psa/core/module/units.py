"""What PSA can ablate in a model of your own, found once by running and tracing it
(docs/module.md#what-it-does-precisely, "Units"):

- its unit layers, in the order the forward first calls them: the output features of every
  nn.Linear, the output channels of every nn.Conv1d/2d/3d, the heads of every
  nn.MultiheadAttention, and the rows of a logits layer computed as F.linear(h, W) on a
  parameter (a tied output layer); the last is the output layer. Recurrent, embedding and
  transposed-convolution weights are never units (a note says so);
- what an ablation zeroes for unit u (`UnitLayer.zeroes`): its incoming weights and bias, the
  scale and shift of a norm that belongs to it (BatchNorm, or a LayerNorm/GroupNorm right after
  it), and in `hidden` mode its columns in the one layer that reads it (psa.core.module.trace);
- whether an ablation there persists under training, and why (`UnitLayer.persists`,
  `ModelSpec.summary_rows`), decided from the gradients by psa.core.module.trace;
- the model's nn.Dropout modules and other dropout sites, and notes to print once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from psa.core.ablation import choose_unit
from psa.core.arch import Arch
from psa.core.errors import ConfigError, one_line
from psa.core.member import MODES, Member
from psa.core.module.trace import (  # noqa: F401 - the pass-through sets are re-exported for callers
    MIXING_NORMS,
    NEVER_UNITS,
    NORM_TYPES,
    OUTPUT_REGROWS,
    PASS_FUNCTIONS,
    PASS_METHODS,
    PASS_MODULES,
    PER_UNIT_NORMS,
    UNIT_TYPES,
    Consumer,
    Graph,
    Wiring,
    trace,
)

Index = tuple[slice, ...]


@dataclass(frozen=True)
class Cut:
    """The entries of parameter `param` that belong to each unit: unit u owns indices
    [offset + u*block, offset + (u+1)*block) along dimension `dim`."""

    param: str
    dim: int = 0
    block: int = 1
    offset: int = 0

    def index(self, unit: int) -> Index:
        """Unit `unit`'s entries, as an index of the parameter."""
        a = self.offset + unit * self.block
        return (slice(None),) * self.dim + (slice(a, a + self.block),)


@dataclass(frozen=True)
class UnitLayer:
    """A layer whose units PSA can ablate: what a unit is, what its ablation zeroes, and whether
    that ablation persists under training.

    `persists` is the verdict for `full` mode (the incoming side: also what `output` zeroes on the
    output layer), `persists_hidden` for `hidden` mode (None on the output layer, which `hidden`
    never picks); each is True (the zeroed entries get exactly zero gradient and stay zero), False
    (they regrow) or None (psa cannot tell: a model torch.fx cannot trace, an operation psa does
    not follow). `persistence` says why, in one clause."""

    name: str  # module path in the model ("features.0"); for a functional output layer, its weight's path
    units: int  # out_features, out_channels, heads, or the weight's rows
    has_bias: bool
    consumer: Consumer | None  # None for the output layer, or where it is ambiguous
    norm: str | None  # a norm that directly normalises this layer's units (its scale and shift are theirs)
    kind: str = "Linear"  # the module's type, or "F.linear" for a functional output layer
    incoming: tuple[Cut, ...] = ()  # what every ablative mode zeroes for a unit
    persists: bool | None = None
    persists_hidden: bool | None = None
    persistence: str = ""

    @property
    def outgoing(self) -> tuple[Cut, ...]:
        """What `hidden` mode zeroes besides `incoming`: the unit's columns in its consumer."""
        c = self.consumer
        return () if c is None else (Cut(c.weight, 1, c.block),)

    def zeroes(self, unit: int, mode: str) -> tuple[tuple[str, Index], ...]:
        """(parameter, index) of every entry that ablating `unit` in `mode` zeroes: the
        incoming cuts in every ablative mode, and the outgoing ones in `hidden` mode."""
        cuts = self.incoming + (self.outgoing if mode == "hidden" else ())
        return tuple((c.param, c.index(unit)) for c in cuts)

    def persists_in(self, mode: str) -> bool | None:
        """Whether an ablation of this layer in `mode` persists (True), regrows (False) or psa
        cannot tell (None); None too where `mode` never ablates this layer."""
        return self.persists_hidden if mode == "hidden" else self.persists if mode in ("full", "output") else None

    def verdict(self) -> str:
        """For people: "persists", "regrows", "cannot tell", or per mode where they differ
        ("full regrows, hidden persists")."""
        def word(v: bool | None) -> str:
            return "persists" if v else "regrows" if v is False else "cannot tell"

        if self.persists_hidden is None or self.persists_hidden == self.persists:
            return word(self.persists)
        return f"full {word(self.persists)}, hidden {word(self.persists_hidden)}"


@dataclass(frozen=True)
class ModelSpec:
    """What psa found in a model: its unit layers (call order), its nn.Dropout modules with the
    units each drops per example (call order; a module called k times has k entries), its other
    dropout sites (functional and attention dropout, psa.core.module.noise), its tied
    parameters, and notes to print once."""

    layers: tuple[UnitLayer, ...]
    dropouts: tuple[tuple[str, int], ...]
    notes: tuple[str, ...] = ()
    functional_dropouts: int = 0
    classes: int = 0  # the width of the model's logits
    tied: tuple[tuple[str, tuple[str, ...]], ...] = ()  # (parameter, the operations that read it)
    persistence_notes: tuple[str, ...] = ()  # those of `notes` that persistence_lines() states per layer

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

    def summary_rows(self) -> list[dict[str, Any]]:
        """One row per unit layer, for tables: layer, kind, units, role ("hidden" or "output"),
        the verdict of each mode that ablates it ("persists", "regrows", "cannot tell"; "" where
        the mode never picks the layer) under `full`, `hidden` and `output`, and `why`."""
        def word(v: bool | None) -> str:
            return "persists" if v else "regrows" if v is False else "cannot tell"

        rows = []
        for i, layer in enumerate(self.layers):
            output = i == len(self.layers) - 1
            rows.append({"layer": layer.name, "kind": layer.kind, "units": layer.units,
                         "role": "output" if output else "hidden", "full": word(layer.persists),
                         "hidden": "" if output else word(layer.persists_hidden),
                         "output": word(layer.persists) if output else "", "why": layer.persistence})
        return rows

    def persistence_lines(self) -> list[str]:
        """For people, one line per unit layer: "fc (Linear, 32 units, hidden): persists
        (relu (ReLU) stops its gradient at 0)"."""
        lines = []
        for i, layer in enumerate(self.layers):
            role = "output" if i == len(self.layers) - 1 else "hidden"
            lines.append(f"{layer.name} ({layer.kind}, {layer.units} {_unit_word(layer)}, {role}): "
                         f"{layer.verdict()} ({layer.persistence})")
        return lines


def _unit_word(layer: UnitLayer) -> str:
    if layer.kind == "MultiheadAttention":
        return "heads"
    return "channels" if layer.kind.startswith("Conv") else "units"


def _call_order(module: nn.Module, x: torch.Tensor) -> tuple[list[str], dict[str, list[int]], torch.Tensor]:
    """Run `module` (eval) on `x`: its unit layers (Linear, Conv, attention) in the order first
    called (a module's hook runs when it returns), the per-example output size of every call of
    every nn.Dropout, and the output."""
    names = {id(m): n for n, m in module.named_modules()}
    order: list[str] = []
    drop: dict[str, list[int]] = {}
    kinds = (*UNIT_TYPES, nn.MultiheadAttention)

    def hook(m: nn.Module, inp: Any, out: Any) -> None:
        n = names[id(m)]
        if isinstance(m, kinds) and n not in order:
            order.append(n)
        if type(m) is nn.Dropout and torch.is_tensor(out):
            drop.setdefault(n, []).append(out[0].numel())

    handles = [m.register_forward_hook(hook) for m in module.modules() if isinstance(m, (*kinds, nn.Dropout))]
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


def _incoming(m: nn.Module | None, weight: str, bias: str | None, norm: nn.Module | None,
              canonical: dict[int, str]) -> tuple[Cut, ...]:
    """What every ablative mode zeroes for a unit of a layer: for a Linear or Conv its row (or
    filter) and bias; for attention a head's query, key and value rows and biases (and its
    slice of bias_k and bias_v); for a functional output layer its weight's row and bias; and
    the unit's entries in the scale and shift of its norm. Parameters by their first name."""
    def name(p: torch.Tensor) -> str:
        return canonical[id(p)]

    cuts: list[Cut] = []
    if isinstance(m, nn.MultiheadAttention):
        d, e = m.head_dim, m.embed_dim
        if m._qkv_same_embed_dim:  # q, k and v stacked in one (3E, E) weight: head u's rows in each
            cuts += [Cut(name(m.in_proj_weight), 0, d, off) for off in (0, e, 2 * e)]
        else:
            cuts += [Cut(name(p), 0, d) for p in (m.q_proj_weight, m.k_proj_weight, m.v_proj_weight)]
        if m.in_proj_bias is not None:
            cuts += [Cut(name(m.in_proj_bias), 0, d, off) for off in (0, e, 2 * e)]
        cuts += [Cut(name(p), 2, d) for p in (m.bias_k, m.bias_v) if p is not None]  # (1, 1, E) each
    else:
        cuts += [Cut(weight)] + ([Cut(bias)] if bias is not None else [])
    if norm is not None:
        cuts += [Cut(name(p)) for p in (getattr(norm, "weight", None), getattr(norm, "bias", None)) if p is not None]
    return tuple(cuts)


def inspect_model(module: nn.Module, sample_x: torch.Tensor, n_classes: int | None,
                  name: str = "the model") -> ModelSpec:
    """The unit layers, consumers, persistence and dropouts of `module`, checked on a batch of
    the data: it must have a Linear, Conv or attention layer, and map (N, ...) inputs to
    (N, n_classes) logits (n_classes None: any (N, C) logits, the model's C classes)."""
    for n, m in module.named_modules():
        if isinstance(m, nn.modules.dropout._DropoutNd) and type(m) is not nn.Dropout:
            raise ConfigError(f"{name}: {n} is a {type(m).__name__}; psa drives nn.Dropout modules only")
    if not any(isinstance(m, (*UNIT_TYPES, nn.MultiheadAttention)) for m in module.modules()):
        raise ConfigError(f"{name} has no nn.Linear or nn.Conv layer: PSA has no unit to ablate")
    try:
        order, drop, out = _call_order(module, sample_x)
    except Exception as e:  # noqa: BLE001
        raise ConfigError(f"{name} fails on a batch of the data of shape {tuple(sample_x.shape)}: "
                          f"{one_line(e)}{_dtype_hint(module, sample_x)}") from None
    _check_stored(module, order, name)
    if torch.is_tensor(out) and out.dim() == 2 and n_classes is None:
        n_classes = out.shape[1]  # the model's own width: the labels are checked against it
    if not torch.is_tensor(out) or out.dim() != 2 or out.shape != (sample_x.shape[0], n_classes):
        n = sample_x.shape[0]
        if not torch.is_tensor(out):  # a tuple or dict of outputs: psa does not guess which are the logits
            raise ConfigError(f"{name} maps a batch of {n} to a {type(out).__name__}; it must return one tensor "
                              f"of ({n}, {n_classes or 'classes'}) logits")
        # n_classes None here: not 2-d, so the model's own width is unknown
        need = f"the data has {n_classes} classes, so it" if n_classes is not None else "it"
        raise ConfigError(f"{name} maps a batch of {n} to {tuple(out.shape)}; {need} must give "
                          f"({n}, {n_classes or 'classes'}) logits")
    if not order:
        raise ConfigError(f"{name}'s forward calls no nn.Linear or nn.Conv layer: PSA has no unit to ablate")
    sites, trained_out = _training_forward(module, sample_x)
    # aux heads (Inception's) or an extra loss returned only while training would reach the loss
    # as if they were the logits; psa does not guess which output is which
    if trained_out is not None and (not torch.is_tensor(trained_out) or trained_out.shape != out.shape):
        got = tuple(trained_out.shape) if torch.is_tensor(trained_out) else f"a {type(trained_out).__name__}"
        raise ConfigError(f"{name} maps a batch of {out.shape[0]} to {got} in training mode but to {tuple(out.shape)} "
                          f"logits in eval mode; it must return the same one tensor of logits in both (turn off "
                          f"auxiliary outputs)")
    graph, untraced = trace(module)
    g = Graph(module, graph) if graph is not None else None
    notes = []
    mods = dict(module.named_modules())
    # an attention's out_proj is no layer of its own: it is the heads' outgoing side
    heads_out = {f"{n}.out_proj" if n else "out_proj" for n, m in mods.items() if isinstance(m, nn.MultiheadAttention)}
    unused = [n for n, m in mods.items() if isinstance(m, (*UNIT_TYPES, nn.MultiheadAttention))
              and n not in order and n not in heads_out]
    if unused:
        notes.append(f"{name}: {', '.join(unused)} never run in forward and are not ablated")
    # psa leaves a frozen parameter untrained (psa.core.module.engine), which the verdicts below,
    # found from the graph alone, do not know
    frozen = [n for n, p in module.named_parameters() if not p.requires_grad]
    if frozen:
        notes.append(f"{name}: {', '.join(frozen[:6])}{f' and {len(frozen) - 6} more' if len(frozen) > 6 else ''} "
                     f"(requires_grad=False) are not trained: what an ablation zeroes there stays 0, whatever the "
                     f"persistence verdict of its layer")
    if untraced:
        notes.append(f"{name}: {untraced}; `hidden` mode zeroes only the incoming weights of a unit, and psa cannot "
                     f"tell whether an ablation persists")
    layers, ambiguous = _unit_layers(module, order, g, int(out.shape[1]))
    notes += [f"{name}: no unambiguous consumer of {n} ({why}); `hidden` mode zeroes only its incoming weights"
              for n, why in ambiguous]
    tied = g.tied() if g is not None else {}
    persistence = persistence_notes(name, layers, traced=g is not None)
    notes += _unit_notes(name, module, layers, tied) + persistence
    dropouts = tuple((n, u) for n, m in module.named_modules() if type(m) is nn.Dropout and n in drop
                     for u in drop[n])
    return ModelSpec(tuple(layers), dropouts, tuple(notes), sites, int(out.shape[1]),
                     tuple((p, tuple(r)) for p, r in tied.items()), tuple(persistence))


def _dtype_hint(module: nn.Module, x: torch.Tensor) -> str:
    """What psa's inputs are, where that may be why the model failed on them: float32, or int64
    for integer inputs (token ids)."""
    kinds = sorted({str(p.dtype).removeprefix("torch.") for p in module.parameters()
                    if p.is_floating_point() and p.dtype != torch.float32})
    if kinds:
        return (f" (psa trains in float32 and gives the model float32 inputs; its parameters are "
                f"{', '.join(kinds)}: build it in float32)")
    if not x.is_floating_point():
        return " (psa gives integer inputs to the model as int64 token ids; give images as floating point)"
    return ""


def _check_stored(module: nn.Module, order: list[str], name: str) -> None:
    """ConfigError where a unit layer's weight or bias, or a norm's scale or shift, is computed
    from other parameters (weight_norm, spectral_norm, any parametrization) instead of stored:
    an ablation zeroes stored entries, and a parametrization would recompute them."""
    stored = {id(p) for p in module.parameters()}
    for n, m in module.named_modules():
        if n not in order and not isinstance(m, (*PER_UNIT_NORMS, *MIXING_NORMS)):
            continue
        for attr in ("weight", "bias", "in_proj_weight", "in_proj_bias", "q_proj_weight", "k_proj_weight",
                     "v_proj_weight"):
            v = getattr(m, attr, None)
            if torch.is_tensor(v) and id(v) not in stored:
                raise ConfigError(f"{name}: {n}.{attr} is computed from other parameters (weight_norm, spectral_norm "
                                  f"or another parametrization), not stored; psa ablates a unit by zeroing its stored "
                                  f"weights, so build {n} without it (torch.nn.utils.parametrize."
                                  f"remove_parametrizations)")


def _unit_layers(module: nn.Module, order: list[str], g: Graph | None, classes: int
                 ) -> tuple[list[UnitLayer], list[tuple[str, str]]]:
    """The unit layers of `module`: the ones it calls in `order` (Linear, Conv, attention), then
    a functional logits layer the graph `g` shows, the output layer last (`classes` wide: the
    logits' width); and (layer, why) for each hidden layer of a traced model that has no
    unambiguous consumer."""
    mods = dict(module.named_modules())
    params = dict(module.named_parameters())
    canonical = {id(p): n for n, p in module.named_parameters()}  # a shared parameter's first name
    found: list[tuple[str, nn.Module | None, str, str | None]] = []  # (name, module, weight, bias)
    for n in order:
        m = mods[n]
        found.append((n, m, "", None) if isinstance(m, nn.MultiheadAttention) else
                     (n, m, canonical[id(m.weight)], None if m.bias is None else canonical[id(m.bias)]))
    functional = g.functional_output() if g is not None else None
    if functional is not None:
        found.append((functional[0], None, *functional))

    def units_of(n: str, m: nn.Module | None) -> int:
        if isinstance(m, nn.MultiheadAttention):
            return m.num_heads
        if m is not None:
            return m.out_features if isinstance(m, nn.Linear) else m.out_channels
        return params[n].shape[0]  # a functional output layer: its weight's rows

    # a layer called after the logits layer (a learned temperature or gate) is not the output
    # layer: the last one as wide as the logits is
    wide = [i for i, (n, m, _, _) in enumerate(found) if units_of(n, m) == classes]
    if found and units_of(*found[-1][:2]) != classes and wide:
        found.append(found.pop(wide[-1]))
    if found and units_of(*found[-1][:2]) != classes:
        # no unit layer gives the logits, so none is the output layer: `output` mode would ablate
        # a hidden layer, and `hidden` mode would spare the last one
        n, m = found[-1][:2]
        raise ConfigError(f"the logits ({classes} wide) come from no nn.Linear, nn.Conv or F.linear layer of that "
                          f"width (the last unit layer, {n}, has {units_of(n, m)} units); PSA needs the output "
                          f"layer to be one: give the model such a last layer")
    layers, ambiguous = [], []
    for i, (n, m, weight, bias) in enumerate(found):
        output = i == len(found) - 1
        units = units_of(n, m)
        if g is not None:
            own = _incoming(m, weight, bias, None, canonical)
            w = g.wiring(n, units, output, tuple(c.param for c in own))
        else:  # the logits are in the loss whatever the graph
            w = Wiring(persists=False, why=OUTPUT_REGROWS) if output else Wiring(why="torch.fx cannot trace the model")
        consumer = None if output else w.consumer  # the output layer: no mode zeroes its outgoing side
        if consumer is None and not output and g is not None:
            ambiguous.append((n, w.no_consumer))
        norm = mods[w.norm] if w.norm is not None else None
        has_bias = m.in_proj_bias is not None if isinstance(m, nn.MultiheadAttention) else bias is not None
        layers.append(UnitLayer(n, units, has_bias, consumer, w.norm, type(m).__name__ if m is not None else "F.linear",
                                _incoming(m, weight, bias, norm, canonical), w.persists,
                                None if output else w.persists_hidden, w.why))
    return layers, ambiguous


def _unit_notes(name: str, module: nn.Module, layers: list[UnitLayer], tied: dict[str, list[str]]) -> list[str]:
    """The notes about what a unit is in this model: its attention heads, the weights that are
    never units and its tied weights."""
    notes = []
    owned = {c.param for layer in layers for c in layer.incoming}
    for layer in layers:
        if layer.kind == "MultiheadAttention":
            notes.append(f"{name}: the units of {layer.name} (MultiheadAttention) are its {layer.units} heads: an "
                         f"ablation zeroes a head's query, key and value rows and biases, and `hidden` mode also its "
                         f"out_proj columns")
    never = [f"{n} ({type(m).__name__})" for n, m in module.named_modules()
             if isinstance(m, NEVER_UNITS) and not any(f"{n}.{p}" in owned for p, _ in m.named_parameters())]
    if never:
        notes.append(f"{name}: {', '.join(never)} {'is' if len(never) == 1 else 'are'} never ablated: psa's units are "
                     f"the outputs of Linear and Conv layers and attention heads; recurrent, embedding and "
                     f"transposed-convolution weights are never units")
    out = layers[-1]
    for p, readers in tied.items():
        if not (out.incoming and out.incoming[0].param == p):
            notes.append(f"{name}: {p} is read by {', '.join(readers)} (tied weights): an ablation that zeroes part "
                         f"of it zeroes it for all of them")
            continue
        others = [r for r in readers if not r.startswith(f"{out.name} ") and r != "F.linear"]
        embeds = [r.split(" ")[0] for r in others if r.endswith("(Embedding)")]
        if out.kind == "F.linear":
            logits = f"F.linear(h, {p}), so the output layer's units are its rows"
        else:
            logits = f"{out.name} ({out.kind}), whose weight is {p}"
        also = f"token u's embedding in {embeds[0]}" if embeds else f"row u of {p} where {', '.join(others)} read it"
        notes.append(f"{name}: the logits are {logits}, shared with {', '.join(others)} (tied weights): an `output` "
                     f"or `full` ablation of output unit u also zeroes {also}")
    return notes


def persistence_notes(name: str, layers: Sequence[UnitLayer], traced: bool) -> list[str]:
    """The notes on the hidden layers where an ablation regrows, or where psa cannot tell (a model
    fx cannot trace has its own note): what a study's table of verdicts states layer by layer."""
    notes, regrow, unknown = [], [], []
    for layer in layers[:-1]:  # the output layer regrows as in psa's own nets: its logit is in the loss
        if not traced:
            break
        modes = [m for m in ("full", "hidden") if layer.persists_in(m) is False]
        if modes:
            regrow.append(f"{layer.name} ({', '.join(modes)}: {layer.persistence})")
        if any(layer.persists_in(m) is None for m in ("full", "hidden")):
            unknown.append(f"{layer.name} ({layer.persistence})")
    if regrow:
        notes.append(f"{name}: an ablation does not persist (training regrows the zeroed weights) in "
                     f"{'; '.join(regrow)}")
    if unknown:
        notes.append(f"{name}: psa cannot tell whether an ablation persists in {'; '.join(unknown)}")
    return notes


def _training_forward(module: nn.Module, x: torch.Tensor) -> tuple[int, Any]:
    """(the dropout sites a training forward of `module` calls besides its nn.Dropout modules,
    its output): F.dropout in its own code, and attention whose dropout is on (psa computes it
    with F.dropout: psa.core.module.functional.Attention). Run on a copy: a training forward
    moves a BatchNorm's running statistics. The output is None where the forward failed."""
    import copy

    from psa.core.module.noise import MemberRandomness, member_forward

    twin = copy.deepcopy(module).train()
    for m in twin.modules():
        if type(m) is nn.Dropout:
            m.forward = lambda t: t  # type: ignore[method-assign]  # counted apart, as modules
    mode = MemberRandomness()
    try:  # attention's own dropout draws here: from a forked generator, so the caller's is untouched
        with torch.random.fork_rng(devices=[]), member_forward(mode, None), torch.no_grad():
            out = twin(x)
    except Exception:  # noqa: BLE001 - the model ran in eval mode: a count of 0 only forgoes dropout mode
        return 0, None
    attention = sum(1 for m in twin.modules() if isinstance(m, nn.MultiheadAttention) and m.dropout > 0)
    return mode.sites + attention, out


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
        mem.variant.check(spec.arch, mem.variant.start_mode(mem.mode), net=name)
    except ConfigError as e:
        raise ConfigError(f"{name} (unit layers {spec.describe()}): {e}") from None

