"""Torch-Pruning's DepGraph beside psa's torch.fx tracing, as the finder of what one ablated unit
touches, on every model of the test zoo (tests/zoo.py).

For each model:
  psa   `psa.core.module.units.inspect_model`: its unit layers, the consumer found (or not) for
        each, the BatchNorm that belongs to it, the notes;
  DG    `torch_pruning.DependencyGraph().build_dependency`, then for every prunable layer
        (Linear, Conv, Embedding, MultiheadAttention, LSTM, GRU) the pruning group of output
        unit 0 (`get_pruning_group(layer, <its prune_out_channels>, idxs=[0])`).
Then, per layer:
  - the parameter slices DG's group removes, read off by pruning a copy whose every parameter
    holds its own flat indices (what survives names what was kept), compared with the slices
    psa's `hidden` mode zeroes for the same unit (psa.core.module.engine's `_ablate`:
    incoming row and bias, its BatchNorm's scale and shift, the consumer's columns);
  - whether the pruned copy still runs, and whether it computes what the unpruned model computes
    with the same slices zeroed (removal = zeroing? max |difference| of the logits, eval mode);
  - whether a zeroing persists under training: the largest |gradient| on the zeroed entries
    after one forward and backward in train mode (0: the entries stay 0 under AdamW and decay,
    so the ablation persists; > 0: training regrows them), for psa's slices and DG's.

Needs torch-pruning 1.6.1 importable, kept out of psa's dependencies:

    /work/main/.venv/bin/pip install --target /tmp/tp torch-pruning==1.6.1 --no-deps
    PYTHONPATH=/tmp/tp:src python bench/depgraph_compare.py [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import datetime
import importlib.metadata
import inspect
import os
import json
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT)]

from psa.core.data import normalise, read_raw, shipped_dir  # noqa: E402
from psa.core.module.units import ModelSpec, UnitLayer, inspect_model  # noqa: E402
from tests.zoo import CLASSES, ZOO, RowAttention, RowTransformer, ZooModel  # noqa: E402

try:
    import torch_pruning as tp
except ImportError:
    sys.exit("torch_pruning is not importable: pip install --target /tmp/tp torch-pruning==1.6.1 --no-deps, "
             "then PYTHONPATH=/tmp/tp:src")

# what a researcher would call a layer with units; DG has pruners for all but GRU (and RNN)
ROOT_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding, nn.MultiheadAttention, nn.LSTM, nn.GRU,
              nn.RNN)
# the attention models again with one head: DG's group removes one embedding dimension, which
# two heads cannot share out evenly, so only a one-head model shows what that removal computes
PROBES = (ZooModel("mha-1head", lambda: RowAttention(heads=1), "rows"),
          ZooModel("transformer-1head", lambda: RowTransformer(heads=1), "rows"))
TRACE_N = 8  # examples the two finders trace with
GRAD_N = 64  # examples of the persistence check's one backward
Slices = dict[str, set[int]]  # parameter name -> flat indices of its zeroed (or removed) entries


@dataclass
class LayerRow:
    """One prunable layer of a model, as both finders see it."""

    model: str
    layer: str
    kind: str
    psa_units: int | None = None  # None: not one of psa's unit layers
    psa_consumer: str = ""
    psa_norm: str | None = None
    dg_units: int | None = None
    dg_status: str = "ok"  # ok, or why DG has no group
    dg_modules: list[str] = field(default_factory=list)  # modules the group prunes (ops aside)
    dg_slices: list[str] = field(default_factory=list)  # parameter slices the group removes
    vs_psa: str = ""  # DG's slices against psa's hidden-mode slices
    pruned_runs: str = ""  # the pruned copy's forward: ok, or its error
    removal_vs_zero: float | None = None  # max |pruned logits - zeroed logits|
    grad_psa: float | None = None  # max |grad| on psa's zeroed entries
    grad_dg: float | None = None  # max |grad| on DG's zeroed entries


@dataclass
class ModelRow:
    """A model: what each finder reported as a whole."""

    model: str
    takes: str
    params: int
    psa_layers: str = ""
    psa_consumers: str = ""  # hidden unit layers with a consumer / hidden unit layers
    psa_notes: list[str] = field(default_factory=list)
    psa_error: str = ""
    psa_ms: float | None = None
    dg_warnings: list[str] = field(default_factory=list)
    dg_error: str = ""
    dg_ms: float | None = None
    layers: list[LayerRow] = field(default_factory=list)


def short(e: BaseException, n: int = 90) -> str:
    """An exception as one short line."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {text[:n]}"


def best_ms(fn, repeats: int = 3) -> float:
    """The fastest of `repeats` calls of fn, in ms: the machine is shared, the minimum is the
    least disturbed."""
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return 1e3 * best


# ------------------------------------------------------------------ psa's side
def psa_view(model: nn.Module, x: torch.Tensor) -> ModelSpec:
    """psa's tracing: the unit layers, their consumers and norms, the notes."""
    return inspect_model(model, x, CLASSES)


def psa_slices(layer: UnitLayer, params: dict[str, torch.Tensor], unit: int = 0) -> Slices:
    """What psa's `hidden` mode zeroes for `unit` of `layer` (psa.core.module.engine._ablate): the
    incoming row (or filter) and bias, its BatchNorm's scale and shift, the consumer's columns."""
    out: Slices = {}

    def add(name: str, index: tuple) -> None:
        if name in params:
            flat = torch.arange(params[name].numel()).view(params[name].shape)[index]
            out.setdefault(name, set()).update(flat.flatten().tolist())

    add(f"{layer.name}.weight", (unit,))
    add(f"{layer.name}.bias", (unit,))
    if layer.norm is not None:
        add(f"{layer.norm}.weight", (unit,))
        add(f"{layer.norm}.bias", (unit,))
    if layer.consumer is not None:
        c = layer.consumer
        add(f"{c.name}.weight", (slice(None), slice(unit * c.block, (unit + 1) * c.block)))
    return out


# ------------------------------------------------------------------ DG's side
def dg_build(model: nn.Module, x: torch.Tensor) -> tp.DependencyGraph:
    """Torch-Pruning's dependency graph of `model` (which it leaves in eval mode)."""
    return tp.DependencyGraph().build_dependency(model, example_inputs=x)


def dg_group(dg: tp.DependencyGraph, layer: nn.Module, unit: int = 0) -> tp.dependency.Group:
    """The pruning group of output unit `unit` of `layer`, through its own prune_out_channels
    (Linear, Conv, Embedding, MultiheadAttention, LSTM: each type has its pruner)."""
    pruner = dg.get_pruner_of_module(layer)
    if pruner is None:
        raise LookupError(f"DG has no pruner for {type(layer).__name__}")
    return dg.get_pruning_group(layer, pruner.prune_out_channels, idxs=[unit])


def dg_slices(model: nn.Module, x: torch.Tensor, name: str, unit: int = 0) -> tuple[Slices, nn.Module, list[str]]:
    """What DG's group for `unit` of module `name` removes, as the flat indices of each parameter;
    the pruned model (holding its original values), and the modules the group names.

    Every parameter of a copy is set to its own flat indices before pruning: DG prunes by index,
    never by value, so the values that survive are the indices it kept."""
    pruned = copy.deepcopy(model)
    originals = {n: p.detach().clone() for n, p in pruned.named_parameters()}
    with torch.no_grad():
        for p in pruned.parameters():
            p.copy_(torch.arange(p.numel(), dtype=p.dtype).view(p.shape))  # exact: every tensor < 2**24 entries
    dg = dg_build(pruned, x)
    group = dg_group(dg, dict(pruned.named_modules())[name], unit)
    modules = []
    for item in group.items:
        label = dg._module2name.get(item.dep.target.module)
        if label is not None and label not in modules:
            modules.append(label)
    group.prune()
    removed: Slices = {}
    kept = dict(pruned.named_parameters())
    with torch.no_grad():
        for n, orig in originals.items():
            survivors = kept[n].detach().flatten().long()
            gone = set(range(orig.numel())) - set(survivors.tolist())
            if gone:
                removed[n] = gone
            kept[n].copy_(orig.flatten()[survivors].view(kept[n].shape))
    return removed, pruned, modules


# ------------------------------------------------------------------ both
def zeroed(model: nn.Module, slices: Slices) -> nn.Module:
    """A copy of `model` with `slices` zeroed (what psa would do with them)."""
    out = copy.deepcopy(model)
    params = dict(out.named_parameters())
    with torch.no_grad():
        for n, idx in slices.items():
            params[n].view(-1)[torch.tensor(sorted(idx))] = 0.0
    return out


def grad_on(model: nn.Module, slices: Slices, x: torch.Tensor, y: torch.Tensor) -> float:
    """Largest |gradient| on the zeroed `slices` after one train-mode step's backward: 0 means
    AdamW (zero moments in, zero update out) and decay keep them 0, so the ablation persists."""
    m = zeroed(model, slices).train()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # the dropout masks
        F.cross_entropy(m(x), y).backward()
    params = dict(m.named_parameters())
    worst = 0.0
    for n, idx in slices.items():
        g = params[n].grad
        if g is not None:
            worst = max(worst, g.view(-1)[torch.tensor(sorted(idx))].abs().max().item())
    return worst


def describe(name: str, shape: torch.Size, flat: set[int]) -> str:
    """`flat` entries of parameter `name` as slices, e.g. `fc.weight[0,:]`, `head.weight[:,0:16]`,
    `attn.in_proj_weight[{0,16,32},:]+[:,0]`."""
    index = torch.zeros(shape, dtype=torch.bool).view(-1)
    index[torch.tensor(sorted(flat))] = True
    mask = index.view(shape)
    if mask.all():
        return f"{name}[all]"
    parts, covered = [], torch.zeros_like(mask)
    for d in range(len(shape)):
        others = [i for i in range(len(shape)) if i != d]
        full = mask.all(dim=others) if others else mask
        hit = full.nonzero().flatten().tolist()
        if hit:
            spec = [":"] * len(shape)
            spec[d] = indices(hit)
            parts.append("[" + ",".join(spec) + "]")
            sel = [slice(None)] * len(shape)
            sel[d] = torch.tensor(hit)
            covered[tuple(sel)] = True
    text = name + "+".join(parts) if parts else name
    return text if torch.equal(covered, mask) else f"{name} ({len(flat)} scattered entries)"


def indices(ix: list[int]) -> str:
    """0, 0:16, 0:224:8 or {0,5,9}."""
    if len(ix) == 1:
        return str(ix[0])
    step = ix[1] - ix[0]
    if all(b - a == step for a, b in zip(ix, ix[1:])):
        return f"{ix[0]}:{ix[-1] + 1}" + (f":{step}" if step != 1 else "")
    return "{" + ",".join(map(str, ix)) + "}"


def compare(psa: Slices, dg: Slices) -> str:
    """DG's slices against psa's: `=`, `DG adds ...`, `DG lacks ...`, or both."""
    if psa == dg:
        return "="
    more = sorted(n for n in dg if dg[n] - psa.get(n, set()))
    less = sorted(n for n in psa if psa[n] - dg.get(n, set()))
    out = []
    if more:
        out.append("DG adds " + ", ".join(more))
    if less:
        out.append("DG lacks " + ", ".join(less))
    return "; ".join(out)


def roots(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Prunable layers in definition order, less those inside another (MultiheadAttention's
    out_proj is the attention's own: its pruner handles it)."""
    found: list[tuple[str, nn.Module]] = []
    for n, m in model.named_modules():
        if isinstance(m, ROOT_TYPES) and not any(n.startswith(p + ".") for p, _ in found):
            found.append((n, m))
    return found


def compare_layer(model_name: str, model: nn.Module, name: str, module: nn.Module, layer: UnitLayer | None,
                  is_output: bool, dg: tp.DependencyGraph | None, x: torch.Tensor, xg: torch.Tensor,
                  y: torch.Tensor) -> LayerRow:
    """Layer `name` of `model` through both finders: psa's unit layer (None if it is none) and
    DG's graph `dg` (None if it could not be built), unit 0."""
    lr = LayerRow(model_name, name, type(module).__name__)
    params = dict(model.named_parameters())
    mine: Slices | None = None
    if layer is not None:
        lr.psa_units, lr.psa_norm = layer.units, layer.norm
        if is_output:
            lr.psa_consumer = "output layer"
        elif layer.consumer is None:
            lr.psa_consumer = "none"
        else:
            lr.psa_consumer = layer.consumer.name + (f" x{layer.consumer.block}" if layer.consumer.block > 1 else "")
        mine = psa_slices(layer, params)
        lr.grad_psa = grad_on(model, mine, xg, y)
    if dg is None:
        lr.dg_status = "no graph"
        return lr
    # dg was built on a copy: find the copy's module of the same name
    graph_module = dict(dg.model.named_modules())[name]
    if graph_module not in dg.module2node:
        lr.dg_status = "not in graph"
        return lr
    try:
        lr.dg_units = dg.get_out_channels(graph_module)
        dg_group(dg, graph_module)
    except Exception as e:  # noqa: BLE001 - a failure is a finding
        lr.dg_status = short(e)
        return lr
    try:
        theirs, pruned, lr.dg_modules = dg_slices(model, x, name)
    except Exception as e:  # noqa: BLE001
        lr.dg_status = "prune fails: " + short(e)
        return lr
    lr.dg_slices = [describe(n, params[n].shape, theirs[n]) for n in params if n in theirs]
    if mine is not None:
        lr.vs_psa = compare(mine, theirs)
    lr.grad_dg = grad_on(model, theirs, xg, y)
    try:
        with torch.no_grad():
            got = pruned.eval()(x)
            want = zeroed(model, theirs).eval()(x)
        if got.shape != want.shape and got.shape[1] == want.shape[1] - 1:
            want = want[:, 1:]  # the output layer's unit 0 is a logit: removal drops it
        lr.pruned_runs = "ok"
        lr.removal_vs_zero = (got - want).abs().max().item()
    except Exception as e:  # noqa: BLE001
        lr.pruned_runs = short(e, 60)
    return lr


def study(z: ZooModel, x_rows: torch.Tensor, y: torch.Tensor) -> ModelRow:
    """Both finders on zoo model `z`."""
    model = z.build(0)
    x, xg = z.inputs(x_rows[:TRACE_N]), z.inputs(x_rows[:GRAD_N])
    row = ModelRow(z.name, z.takes, sum(p.numel() for p in model.parameters()))
    spec = None
    try:
        spec = psa_view(model, x)
        row.psa_ms = best_ms(lambda: psa_view(model, x))
        row.psa_layers = ", ".join(f"{layer.name}[{layer.units}]" for layer in spec.layers)
        hidden = spec.layers[:-1]
        row.psa_consumers = f"{sum(layer.consumer is not None for layer in hidden)}/{len(hidden)}"
        row.psa_notes = [n.removeprefix("the model: ") for n in spec.notes]
    except Exception as e:  # noqa: BLE001 - a failure is a finding
        row.psa_error = short(e)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            dg = dg_build(copy.deepcopy(model), x)
        row.dg_warnings = sorted({str(w.message).splitlines()[0][:160] for w in caught})
        row.dg_ms = best_ms(lambda: dg_build(copy.deepcopy(model), x))
    except Exception as e:  # noqa: BLE001
        row.dg_error, dg = short(e), None
    unit_layers = {layer.name: layer for layer in spec.layers} if spec else {}
    last = spec.layers[-1].name if spec else None
    for name, m in roots(model):
        layer = unit_layers.get(name)
        row.layers.append(compare_layer(z.name, model, name, m, layer, name == last, dg, x, xg, y[:GRAD_N]))
    return row


# ------------------------------------------------------------------ code size
def code_lines(paths: list[Path]) -> int:
    """Non-blank lines that are not only a comment."""
    n = 0
    for p in paths:
        for line in p.read_text().splitlines():
            s = line.strip()
            n += bool(s) and not s.startswith("#")
    return n


def function_lines(*fns) -> int:
    """Code lines of the given functions (docstrings included)."""
    return sum(sum(1 for line in inspect.getsource(f).splitlines() if line.strip() and not line.strip().startswith("#"))
               for f in fns)


def sizes() -> dict[str, object]:
    """Lines of code of each finder and the glue this script needs to use it; the package's size."""
    units = ROOT / "src" / "psa" / "core" / "module" / "units.py"
    pkg = Path(tp.__file__).parent
    finder = sorted((pkg / "dependency").glob("*.py")) + [pkg / "pruner" / "function.py", pkg / "ops.py",
                                                           pkg / "_helpers.py"]
    every = sorted(p for p in pkg.rglob("*.py"))
    files = [p for p in pkg.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    return {
        "psa_units_py": code_lines([units]),
        "dg_finder": code_lines(finder),
        "dg_package": code_lines(every),
        "dg_package_files": len(every),
        "dg_package_kb": round(sum(p.stat().st_size for p in files) / 1024),
        "glue_psa": function_lines(psa_view, psa_slices),
        "glue_dg": function_lines(dg_build, dg_group, dg_slices),
    }


# ------------------------------------------------------------------ tables
def fmt(v: float | None) -> str:
    """A gradient or difference: 0 exactly, or 2 significant digits."""
    if v is None:
        return "-"
    return "0" if v == 0 else f"{v:.1g}"


def tables(rows: list[ModelRow]) -> str:
    """The two Markdown tables: per model and per layer."""
    out = ["| model | input | psa unit layers | psa consumers (hidden) | psa notes | DG layers in graph "
           "| DG groups that prune to a running model | psa ms | DG ms |",
           "|---|---|---|---|---:|---|---|---:|---:|"]
    for r in rows:
        in_graph = [layer for layer in r.layers if layer.dg_status == "ok" or layer.dg_status.startswith("prune")]
        runs = [layer for layer in in_graph if layer.pruned_runs == "ok"]
        graph = r.dg_error or f"{len(in_graph)}/{len(r.layers)}"
        ms = " | ".join(f"{v:.1f}" if v is not None else "-" for v in (r.psa_ms, r.dg_ms))
        out.append(f"| {r.model} | {r.takes} | {r.psa_layers or r.psa_error} | {r.psa_consumers or '-'} "
                   f"| {len(r.psa_notes)} | {graph} | {len(runs)}/{len(in_graph)} | {ms} |")
    out += ["", "| model | layer | type | units psa / DG | psa consumer | DG group: modules pruned with unit 0 "
            "| DG slices vs psa's | pruned model runs | removal - zeroing | grad on zeroed psa / DG |",
            "|---|---|---|---|---|---|---|---|---:|---|"]
    for r in rows:
        for x in r.layers:
            units = f"{x.psa_units if x.psa_units is not None else '-'} / {x.dg_units if x.dg_units is not None else '-'}"
            consumer = x.psa_consumer + (f" (+{x.psa_norm})" if x.psa_norm else "") if x.psa_units else "not a unit layer"
            mods = ", ".join(m for m in x.dg_modules if m != x.layer) or ("-" if x.dg_status == "ok" else x.dg_status)
            out.append(f"| {r.model} | {x.layer} | {x.kind} | {units} | {consumer} | {mods} | {x.vs_psa or '-'} "
                       f"| {x.pruned_runs or '-'} | {fmt(x.removal_vs_zero)} | {fmt(x.grad_psa)} / {fmt(x.grad_dg)} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, help="write every row (slices, notes, warnings) here")
    ap.add_argument("--only", nargs="*", help="zoo models to run (default: all)")
    args = ap.parse_args()
    torch.set_num_threads(1)  # a shared two-core machine
    # DG warns at every build; study() records each model's warnings once
    warnings.filterwarnings("ignore", module="torch_pruning")
    raw = read_raw(shipped_dir("mnist"))
    x_rows = normalise(raw["test_images"][:GRAD_N])
    y = torch.from_numpy(raw["test_labels"][:GRAD_N].astype("int64"))
    rows = [study(z, x_rows, y) for z in ZOO + PROBES if not args.only or z.name in args.only]
    size = sizes()
    # the 1.6.1 wheel's torch_pruning.__version__ says 1.6.0: the installed distribution is the truth
    head = (f"{datetime.date.today()}  torch {torch.__version__}  torch-pruning "
            f"{importlib.metadata.version('torch-pruning')} (__version__ {tp.__version__})  "
            f"python {sys.version.split()[0]}  load average {os.getloadavg()[0]:.1f}")
    print(head, "\n")
    print(tables(rows))
    print("\nDG slices per layer (unit 0):")
    for r in rows:
        for x in r.layers:
            if x.dg_slices:
                print(f"  {r.model}.{x.layer}: {'; '.join(x.dg_slices)}")
    print("\npsa notes and DG warnings:")
    for r in rows:
        for n in r.psa_notes:
            print(f"  {r.model} psa: {n}")
        for w in r.dg_warnings:
            print(f"  {r.model} DG: {w}")
    print("\nlines of code:", json.dumps(size))
    if args.json:
        args.json.write_text(json.dumps({"header": head, "sizes": size, "models": [asdict(r) for r in rows]},
                                        indent=1))


if __name__ == "__main__":
    main()
