"""psa.fit: PSA on your own model, as a library call (`psa.fit` is this module's fit, exported lazily).

    import psa
    result = psa.fit(make_model, train=(x, y), val=(xv, yv), test=(xt, yt),
                     modes=["none", "hidden", "output"], trials=10, meta_loops=100)
    print(result.table())   # bounty per mode, mean +- std, paired tests against none
    result.save("runs/mine"); again = psa.load("runs/mine")

`make_model` is any function that returns a torch.nn.Module mapping a batch of inputs to
(N, classes) logits. Trial k of every mode starts from the same weights (the factory called
under seed + k - 1) and sees the same data order: the paper's paired design. Engine variants
(psa.core.variant: patience, the persistent optimizer, ablation strategies, mode schedules)
run beside the paper's engine as named conditions, `variants={"patience5": {"patience": 5}}`,
as in a study design. All members train together (psa.core.module). This module sits above
psa's layers: it uses the core engine, the analysis statistics (through psa.results) and the
top-level psa.progress and psa.estimate.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, TypeVar, overload

import torch
from torch import nn

from psa.core.data import Dataset
from psa.core.device import resolve_device
from psa.core.errors import ConfigError, warnings_at_caller
from psa.core.hparams import HParams
from psa.core.loop import meta_loop, note_once
from psa.core.member import ABLATIVE_MODES, MODES, seed_problem
from psa.core.module.engine import ModuleEngine, choose_batching, convolutions, vmap_check
from psa.core.module.factory import factory_name
from psa.core.module.population import ModulePopulation
from psa.core.variant import VARIANT_NAME, Variant, condition_label, format_schedule
from psa.estimate import FitEstimate, estimate_fit
from psa.progress import FitProgress, conditions_best
from psa.results import FitResult, LoopRecord, load

Split = tuple[torch.Tensor, torch.Tensor]
F = TypeVar("F", bound=Callable[..., Any])
DEVICE_TYPES = ("cpu", "cuda", "mps")


def _at_caller(fn: F) -> F:
    """Run `fn` with psa's warnings raised at the caller's line (psa.core.errors.warnings_at_caller):
    notes about the caller's model and data point at the caller's psa.fit line, not at psa's."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with warnings_at_caller():
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def _device(device: Any) -> torch.device:
    """The device psa.fit trains on: "auto" (cuda, then mps, then cpu), or one that exists here
    (else one ConfigError line saying why not, never torch's own error)."""
    if not isinstance(device, (str, torch.device)):
        raise ConfigError(f"device must be 'auto', 'cpu', 'cuda', 'cuda:N', 'mps' or a torch.device, got {device!r}")
    dev = resolve_device(device)
    if dev.type not in DEVICE_TYPES:
        raise ConfigError(f"psa.fit trains on {', '.join(DEVICE_TYPES)}, not on {dev.type}")
    return dev


def _flag(name: str, value: Any, none: bool = False) -> None:
    if not (value is True or value is False or (none and value is None)):
        raise ConfigError(f"{name} must be True or False{' (or None)' if none else ''}, got {value!r}")


def _split(name: str, value: Any) -> Split:
    """(inputs, int64 labels) of a data split, checked: a pair of tensors of one length, labels
    1-d integers, inputs numbers (floating point, or integers such as token ids), every input
    finite (ConfigError naming the split and the first bad index)."""
    if not (isinstance(value, (tuple, list)) and len(value) == 2 and all(torch.is_tensor(v) for v in value)):
        raise ConfigError(f"{name} must be a pair of tensors (inputs, labels)")
    x, y = value
    if y.dim() != 1 or y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
        raise ConfigError(f"{name} labels must be a 1-d integer tensor, got {tuple(y.shape)} {y.dtype}")
    if x.shape[0] != y.shape[0] or x.shape[0] == 0:
        raise ConfigError(f"{name}: {x.shape[0]} inputs but {y.shape[0]} labels")
    if x.dtype == torch.bool or x.dtype.is_complex:
        raise ConfigError(f"{name} inputs must be real numbers (floating point, or integers such as token ids), "
                          f"got {x.dtype}")
    if x.is_floating_point():
        bad = ~torch.isfinite(x)
        if bool(bad.any()):
            where = tuple(int(i) for i in bad.nonzero()[0])
            what = "NaN" if bool(torch.isnan(x[where])) else ("-inf" if float(x[where]) < 0 else "inf")
            raise ConfigError(f"{name} inputs hold {what} at index {where if len(where) > 1 else where[0]}: "
                              f"every input must be finite")
    return x, y.to(torch.int64)


def _check_labels(name: str, y: torch.Tensor, classes: int) -> None:
    """ConfigError unless every label of `y` is a class of the model, in [0, classes)."""
    bad = (y < 0) | (y >= classes)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ConfigError(f"{name} labels must be in [0, {classes}) (the model gives {classes} logits): label "
                          f"{int(y[i])} at index {i}")


def _variants(variants: Mapping[str, Variant | Mapping[str, Any]] | None, modes: tuple[str, ...],
              meta_loops: int) -> list[tuple[str, Variant, tuple[str, ...]]]:
    """(name, Variant, the modes it runs in) of each named variant, checked as a study design
    checks its [variants] table."""
    if variants is None:
        return []
    if not isinstance(variants, Mapping):
        raise ConfigError("variants must be a dict of named variants, e.g. {'patience5': {'patience': 5}}")
    out: list[tuple[str, Variant, tuple[str, ...]]] = []
    seen: dict[str, str] = {}
    for name, value in variants.items():
        if not isinstance(name, str) or not VARIANT_NAME.match(name):
            raise ConfigError(f"bad variant name {name!r}: letters, digits, '_' or '-' (at most 32), "
                              f"starting with a letter or digit")
        if isinstance(value, Variant):
            v = value
        elif isinstance(value, Mapping):
            try:
                v = Variant.from_settings(dict(value))
            except ConfigError as e:
                raise ConfigError(f"variant {name!r}: {e}") from None
        else:
            raise ConfigError(f"variant {name!r} must be a Variant or a dict of its settings")
        if v.is_default:
            raise ConfigError(f"variant {name!r} is the paper's engine: give it a setting")
        if v.to_json() in seen:
            raise ConfigError(f"variants {seen[v.to_json()]!r} and {name!r} have the same settings")
        seen[v.to_json()] = name
        if v.schedule and sum(n for _, n in v.schedule) != meta_loops:
            raise ConfigError(f"variant {name!r}: schedule {format_schedule(v.schedule)} covers "
                              f"{sum(n for _, n in v.schedule)} meta-loops, the run has {meta_loops}")
        runs_in = v.modes_in(modes)
        if not runs_in:
            raise ConfigError(f"variant {name!r} applies to none of the modes {', '.join(modes)} "
                              f"(its ablation settings need full, hidden or output)")
        out.append((name, v, runs_in))
    return out


@overload
def fit(
    make_model: Callable[[], nn.Module],
    train: Split,
    val: Split,
    test: Split | None = None,
    *,
    modes: Sequence[str] = ("none", "hidden", "output"),
    trials: int = 10,
    meta_loops: int | None = None,
    seed: int = 0,
    hparams: HParams | None = None,
    lr: float | None = None,
    batch_size: int | None = None,
    weight_decay: float | None = None,
    dropout: float | None = None,
    n_classes: int | None = None,
    device: str | torch.device = "auto",
    batched: bool | str = "auto",
    max_members: int | None = None,
    variants: Mapping[str, Variant | Mapping[str, Any]] | None = None,
    progress: bool | None = None,
    on_loop: Callable[[int, float], None] | None = None,
    dry_run: Literal[False] = False,
) -> FitResult: ...


@overload
def fit(
    make_model: Callable[[], nn.Module],
    train: Split,
    val: Split,
    test: Split | None = None,
    *,
    modes: Sequence[str] = ("none", "hidden", "output"),
    trials: int = 10,
    meta_loops: int | None = None,
    seed: int = 0,
    hparams: HParams | None = None,
    lr: float | None = None,
    batch_size: int | None = None,
    weight_decay: float | None = None,
    dropout: float | None = None,
    n_classes: int | None = None,
    device: str | torch.device = "auto",
    batched: bool | str = "auto",
    max_members: int | None = None,
    variants: Mapping[str, Variant | Mapping[str, Any]] | None = None,
    progress: bool | None = None,
    on_loop: Callable[[int, float], None] | None = None,
    dry_run: Literal[True],
) -> FitEstimate: ...


@_at_caller
def fit(
    make_model: Callable[[], nn.Module],
    train: Split,
    val: Split,
    test: Split | None = None,
    *,
    modes: Sequence[str] = ("none", "hidden", "output"),
    trials: int = 10,
    meta_loops: int | None = None,
    seed: int = 0,
    hparams: HParams | None = None,
    lr: float | None = None,
    batch_size: int | None = None,
    weight_decay: float | None = None,
    dropout: float | None = None,
    n_classes: int | None = None,
    device: str | torch.device = "auto",
    batched: bool | str = "auto",
    max_members: int | None = None,
    variants: Mapping[str, Variant | Mapping[str, Any]] | None = None,
    progress: bool | None = None,
    on_loop: Callable[[int, float], None] | None = None,
    dry_run: bool = False,
) -> FitResult | FitEstimate:
    """Run PSA's meta-loop on `trials` x `modes` trials of `make_model`, all trained together.

    `train`/`val`/`test`: (inputs, integer labels) tensors; inputs as the model takes them.
    `modes`: any of none, decay, dropout, full, hidden, output. `hparams`: what every trial
    trains with (psa.core.hparams.HParams; default the paper's Table VI); `meta_loops`, `lr`,
    `batch_size`, `weight_decay` (decay mode only) and `dropout` (the rate of every nn.Dropout,
    dropout mode only), where given, override its fields. `n_classes`: the logits the model
    must give (default: its own output width); every label must be one of them.
    `device`: "auto" (default: cuda, then mps, then cpu), or "cpu", "cuda", "cuda:N", "mps", a
    torch.device; one that this machine or this torch build lacks is a ConfigError saying why.
    `batched`: True trains the members together (vmap), False one at a time (what psa falls
    back to where vmap cannot batch the model), "auto" (default) by a fixed rule of the model
    and device: one at a time for a model with convolutions on a CPU, else together
    (psa.core.module.engine.auto_batched; said once as a warning, and in `result.batching`).
    `max_members`: members trained at once (default all). `variants`: named engine variants
    run beside the paper's engine, {name: Variant or its settings}, e.g.
    {"patience5": {"patience": 5}, "persist": {"optimizer_state": "persist"}, "dh": {"schedule":
    "dropout:50,hidden:50"}}: each in every mode it applies to (a schedule once, in its first
    mode), as condition "mode+name", paired with the same seeds (docs/variants.md).
    `progress`: a progress bar on stderr (meta-loops, the best bounty so far, elapsed time and
    ETA); None (default) shows it where stderr is a terminal and prints nothing elsewhere, True
    shows it anywhere (without a terminal, a line per meta-loop), False never. `on_loop(loop,
    seconds)` is called after every meta-loop.

    Returns a FitResult. With `dry_run=True` nothing is trained to the end: the population is
    built and checked, a few short meta-loops on the first batches are timed, and a FitEstimate
    (the run's seconds here, +- its uncertainty; the members and the path taken) is returned.
    Bad input of any kind is one ConfigError line; psa's warnings (notes on the model, the path
    `batched="auto"` chose) point at the line that called psa.fit.
    """
    if not callable(make_model):
        raise ConfigError("make_model must be a function that returns a torch.nn.Module")
    if isinstance(modes, str):  # iterating it would give its letters
        raise ConfigError(f"modes must be a list of mode names, got the string {modes!r} (write [{modes!r}])")
    modes = tuple(dict.fromkeys(modes))
    if not modes:
        raise ConfigError("give at least one mode")
    for m in modes:
        if m not in MODES:
            raise ConfigError(f"unknown mode {m!r}; choose from {', '.join(MODES)}")
    modes = tuple(m for m in MODES if m in modes)
    if not isinstance(trials, int) or isinstance(trials, bool) or trials < 1:
        raise ConfigError(f"trials must be a positive integer, got {trials!r}")
    if (problem := seed_problem(seed, trials)) is not None:
        raise ConfigError(problem)
    if max_members is not None and (not isinstance(max_members, int) or isinstance(max_members, bool)
                                    or max_members < 1):
        raise ConfigError(f"max_members must be a positive integer or None (all at once), got {max_members!r}")
    if hparams is not None and not isinstance(hparams, HParams):
        raise ConfigError(f"hparams must be a psa.core.hparams.HParams, got {type(hparams).__name__}")
    _flag("progress", progress, none=True)
    _flag("dry_run", dry_run)
    if on_loop is not None and not callable(on_loop):
        raise ConfigError("on_loop must be a function of (loop, seconds)")
    hp = (hparams or HParams()).updated(meta_loops=meta_loops, lr=lr, batch_size=batch_size,
                                        weight_decay=weight_decay, dropout=dropout)
    meta_loops = hp.meta_loops
    dev = _device(device)
    (tx, ty), (vx, vy) = _split("train", train), _split("val", val)
    sx, sy = _split("test", test) if test is not None else (vx[:0], vy[:0])
    if len({x.dtype.is_floating_point for x in (tx, vx, sx)}) > 1:
        raise ConfigError("train, val and test inputs must all be floating point, or all integers")

    def inputs(x: torch.Tensor) -> torch.Tensor:  # integers (token ids) stay integers
        return x.to(dev, torch.float32) if x.is_floating_point() else x.to(dev, torch.int64)

    data = Dataset("tensors", inputs(tx), ty.to(dev), inputs(vx), vy.to(dev), inputs(sx), sy.to(dev), "given")
    named = _variants(variants, modes, meta_loops)
    # the conditions: every mode with the paper's engine, then each variant in its modes
    conditions = [(mode, mode, Variant()) for mode in modes]
    conditions += [(condition_label(mode, name), mode, v) for name, v, runs_in in named for mode in runs_in]
    labels = tuple(label for label, _, _ in conditions)
    members = [hp.member(mode, seed + k, v) for k in range(trials) for _, mode, v in conditions]
    t_setup = time.perf_counter()
    pop = ModulePopulation.create(make_model, members, data, dev, n_classes=n_classes)
    for split, y in (("train", ty), ("val", vy), ("test", sy)):
        _check_labels(split, y, pop.spec.classes)
    assert pop.template is not None
    check = vmap_check(pop, data) if batched is not False else None
    together, why = choose_batching(batched, convolutions(pop.template), dev, check, pop.factory)
    if batched == "auto":
        note_once(f"psa: {pop.factory} on {dev.type}: batched='auto' chose "
                  f"{'the population (vmap)' if together else 'one member at a time'}: {why[len('auto: '):]}")
    setup_s = time.perf_counter() - t_setup
    title = f"psa.fit {pop.factory.rpartition(':')[2]}"
    display = FitProgress(progress, title, meta_loops)
    if dry_run:
        with display.status(f"{title}: timing a few short meta-loops of {pop.size} members on {dev}"):
            est = estimate_fit(pop, data, hp, together, why, max_members, setup_s, labels, trials)
        display.say(f"{title} (dry run): {est}")
        return est
    eng = ModuleEngine(pop, data, hp, batched=together, batching=why, max_members=max_members)
    index = {m.key: j for j, m in enumerate(pop.members)}
    keys = {(label, k): index[(mode, v.to_json(), seed + k - 1)]
            for label, mode, v in conditions for k in range(1, trials + 1)}
    records: list[LoopRecord] = []
    seconds = 0.0

    def unit(a: tuple[int, int]) -> tuple[str, int]:
        return pop.spec.layers[a[0]].name, a[1]

    with display:
        for _ in range(meta_loops):
            r = meta_loop(eng)
            seconds += r.seconds
            for (label, k), j in keys.items():
                records.append(LoopRecord(label, k, seed + k - 1, r.loop, r.candidate_acc[j], r.promoted[j],
                                          None if r.ablated[j] is None else unit(r.ablated[j]), r.lkg_score[j],
                                          r.train_loss[j], r.forced[j], tuple(unit(a) for a in r.ablations[j]),
                                          r.diverged[j]))
            display.loop_done(r.loop, conditions_best(labels, pop.bounty_score(), keys))
            if on_loop is not None:
                on_loop(r.loop, r.seconds)
    test_acc = eng.test_accuracy() if test is not None else []
    score = pop.bounty_score()
    return FitResult(
        model=factory_name(make_model), spec=pop.spec, modes=modes, trials=trials, seed=seed, hparams=hp,
        records=records,
        bounty={key: score[j] if score[j] >= 0 else math.nan for key, j in keys.items()},
        bounty_loop={key: pop.bounty_loop[j] for key, j in keys.items()},
        # NaN where no candidate was ever kept: the weights left are the untrained ones
        test_acc={key: test_acc[j] if score[j] >= 0 else math.nan for key, j in keys.items()} if test_acc else {},
        seconds=seconds,
        conditions=labels,
        variants={name: v for name, v, _ in named},
        batched=eng.batched, batching=eng.batching, device=str(dev),
        _states={key: pop.member_state_dict(j, bounty=True) for key, j in keys.items()},
    )


__all__ = ["ABLATIVE_MODES", "FitEstimate", "FitResult", "LoopRecord", "Variant", "fit", "load"]
