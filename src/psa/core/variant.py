"""Variants of the Frustration Engine: the paper's future work as per-member settings.

A Variant is what a member's meta-loop does beyond its mode. Its defaults are the paper's
engine, bit for bit: greedy promotion, a fresh AdamW every loop, one neuron per loop drawn
from the whole mode's pool, and one mode for the whole run. A population can mix variants as
it mixes modes.

- patience (the paper's "Frustration with Patience"): after `patience` discarded candidates in
  a row the next candidate becomes the LKG even if it is worse (a *forced* acceptance) and the
  allowance grows by `patience_growth`; a candidate that beats the bounty resets it. The bounty
  model (best ever) is kept apart from the LKG.
- optimizer_state "persist": the AdamW moments and step count travel with the LKG.
- ablate / ablate_percent / ablate_layers / ablate_schedule / fixed: how many neurons, from
  which Linear layers, how the count changes over the run, or one seeded set kept dead.
- schedule: the member's mode as a function of the meta-loop ("dropout:50,hidden:50").

Choices the paper leaves open are written down in docs/variants.md.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, fields
from typing import Any

from psa.core.arch import Arch
from psa.core.errors import ConfigError

OPTIMIZER_STATES = ("reset", "persist")
VARIANT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,31}$")
ABLATIVE = ("full", "hidden", "output")


@dataclass(frozen=True)
class Variant:
    """A member's engine settings beyond its mode; the defaults are the paper's engine."""

    patience: int = 0  # discarded candidates in a row before a forced acceptance; 0: greedy
    patience_growth: int = 2  # the allowance is patience * growth**n after n forced acceptances
    optimizer_state: str = "reset"  # reset: a fresh AdamW every loop; persist: its state travels with the LKG
    ablate: int = 1  # neurons ablated per meta-loop (ignored when ablate_percent is set)
    ablate_percent: float = 0.0  # > 0: this percentage of the eligible neurons (at least one)
    ablate_layers: tuple[str, ...] = ()  # eligible Linear layers: indices, "last-hidden", "output"; (): the mode's
    ablate_schedule: str = "constant"  # constant | linear | step:L
    fixed: bool = False  # one seeded set of neurons, dead from loop 1, instead of fresh draws every loop
    schedule: tuple[tuple[str, int], ...] = ()  # (mode, loops) stages; (): the member's mode throughout

    def __post_init__(self) -> None:
        for name in ("patience", "patience_growth", "ablate"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool):
                raise ConfigError(f"{name.replace('_', '-')} must be an integer, got {v!r}")
        if self.patience < 0:
            raise ConfigError(f"patience must be an integer >= 0, got {self.patience}")
        if self.patience_growth < 1:
            raise ConfigError(f"patience-growth must be an integer >= 1, got {self.patience_growth}")
        if not isinstance(self.fixed, bool):  # "no" would be truthy: fixed ablation nobody asked for
            raise ConfigError(f"fixed must be true or false, got {self.fixed!r}")
        if not isinstance(self.ablate_schedule, str):
            raise ConfigError(f"ablate-schedule must be constant, linear or step:L, got {self.ablate_schedule!r}")
        if self.optimizer_state not in OPTIMIZER_STATES:
            raise ConfigError(f"optimizer-state must be reset or persist, got {self.optimizer_state!r}")
        if self.ablate < 1:
            raise ConfigError(f"ablate must be at least 1 neuron, got {self.ablate}")
        p = self.ablate_percent
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not (0.0 <= p <= 100.0) or not math.isfinite(p):
            raise ConfigError(f"ablate percentage must be in (0, 100], got {p!r}")
        object.__setattr__(self, "ablate_percent", float(p))
        for spec in self.ablate_layers:
            if not (spec in ("last-hidden", "output") or re.fullmatch(r"\d+", spec)):
                raise ConfigError(f"unknown layer {spec!r} for ablate-layers: use layer indices (0 = the first "
                                  f"Linear layer, or a model's first unit layer), last-hidden or output")
        schedule_stop(self.ablate_schedule)
        if self.fixed and self.ablate_schedule != "constant":
            raise ConfigError("fixed ablation keeps one set of neurons dead: it takes no ablate-schedule")
        for mode, n in self.schedule:
            if mode not in ("none", "decay", "dropout", "full", "hidden", "output"):
                raise ConfigError(f"unknown mode {mode!r} in schedule")
            if not isinstance(n, int) or n < 1:
                raise ConfigError(f"schedule stage {mode}:{n} needs a positive number of meta-loops")

    # ---------------------------------------------------------------- identity
    @property
    def is_default(self) -> bool:
        """True for the paper's engine."""
        return self == Variant()

    def settings(self) -> dict[str, Any]:
        """The settings that differ from the paper's engine (JSON-able, canonical)."""
        out: dict[str, Any] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if v != f.default:
                out[f.name] = [list(s) for s in v] if f.name == "schedule" else (list(v) if isinstance(v, tuple) else v)
        return out

    def to_json(self) -> str:
        """Canonical JSON of settings(): equal variants give equal strings."""
        return json.dumps(self.settings(), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_settings(cls, d: dict[str, Any]) -> "Variant":
        """The inverse of settings(): unknown keys and bad values raise ConfigError."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown variant setting {unknown[0]!r} (known: {', '.join(sorted(known))})")
        kw = dict(d)
        if "ablate_layers" in kw:
            v = kw["ablate_layers"]
            if isinstance(v, (str, int)) and not isinstance(v, bool):
                v = str(v).split(",")
            if not isinstance(v, (list, tuple)):
                raise ConfigError(f"ablate_layers must be a list of layers, got {v!r}")
            kw["ablate_layers"] = tuple(str(x).strip() for x in v)
        if "schedule" in kw:
            v = kw["schedule"]
            if isinstance(v, str):
                kw["schedule"] = parse_schedule(v)
            elif isinstance(v, (list, tuple)) and all(isinstance(s, (list, tuple)) and len(s) == 2 for s in v):
                kw["schedule"] = tuple((str(m), n) for m, n in v)
            else:
                raise ConfigError(f"schedule must be MODE:LOOPS,... (e.g. dropout:50,hidden:50), got {v!r}")
        if kw.get("fixed") in (0, 1) and not isinstance(kw["fixed"], bool):
            kw["fixed"] = bool(kw["fixed"])  # 1 and 0 as TOML and JSON readers write true and false
        if "ablate" in kw and isinstance(kw["ablate"], str):
            kw.update(parse_ablate(kw.pop("ablate")))
        return cls(**kw)

    @classmethod
    def from_json(cls, text: str | None) -> "Variant":
        """A variant from its stored JSON; None or "" is the paper's engine."""
        return cls.from_settings(json.loads(text)) if text else cls()

    # ---------------------------------------------------------------- what it does
    def check(self, arch: Arch, mode: str, meta_loops: int | None = None, net: str = "") -> None:
        """ConfigError unless this variant can run on `arch` starting in `mode` (and, with
        `meta_loops`, unless a schedule covers exactly that many loops). `net` names a model of
        your own in the messages, whose unit layers `arch` stands for."""
        modes = [m for m, _ in self.schedule] or [mode]
        if self.schedule and self.schedule[0][0] != mode:
            raise ConfigError(f"a member with schedule {format_schedule(self.schedule)} starts in mode "
                              f"{self.schedule[0][0]}, not {mode}")
        if self.schedule and meta_loops is not None and sum(n for _, n in self.schedule) != meta_loops:
            raise ConfigError(f"schedule {format_schedule(self.schedule)} covers "
                              f"{sum(n for _, n in self.schedule)} meta-loops, the run has {meta_loops}")
        ablation_settings = (self.ablate != 1 or self.ablate_percent or self.ablate_layers or self.fixed
                             or self.ablate_schedule != "constant")
        if ablation_settings and not any(m in ABLATIVE for m in modes):
            raise ConfigError(f"ablation settings need an ablative mode (full, hidden, output), not {mode}")
        for m in modes:
            if m in ABLATIVE:
                eligible_layers(arch, m, self.ablate_layers, net)

    def mode_at(self, mode: str, loop: int) -> str:
        """The mode of meta-loop `loop` (1-based) of a member that started in `mode`."""
        end = 0
        for m, n in self.schedule:
            end += n
            if loop <= end:
                return m
        return self.schedule[-1][0] if self.schedule else mode

    def start_mode(self, mode: str) -> str:
        """The mode a member of this variant starts in."""
        return self.schedule[0][0] if self.schedule else mode

    def end_mode(self, mode: str) -> str:
        """The mode a member of this variant that started in `mode` ends in."""
        return self.schedule[-1][0] if self.schedule else mode

    def modes_in(self, modes: tuple[str, ...] | list[str]) -> tuple[str, ...]:
        """The modes of `modes` this variant runs in beside the paper's engine: a schedule once,
        in its own first mode; ablation settings in the ablative modes; anything else in all."""
        if self.schedule:
            return (self.schedule[0][0],)
        ablation = (self.ablate != 1 or self.ablate_percent or self.ablate_layers or self.fixed
                    or self.ablate_schedule != "constant")
        return tuple(m for m in modes if not ablation or m in ABLATIVE)


def condition_label(mode: str, variant: str | None) -> str:
    """How psa names a (mode, engine variant) condition: the mode for the paper's engine, else
    "mode+variant" (e.g. "hidden+patience5")."""
    return f"{mode}+{variant}" if variant else mode


def schedule_stop(spec: str) -> int | None:
    """The loop where a `step:L` ablation schedule stops ablating (None for constant and linear)."""
    if spec in ("constant", "linear"):
        return None
    m = re.fullmatch(r"step:(\d+)", spec)
    if not m or int(m.group(1)) < 1:
        raise ConfigError(f"unknown ablate-schedule {spec!r}: use constant, linear or step:L (L >= 1)")
    return int(m.group(1))


def parse_ablate(text: str) -> dict[str, Any]:
    """`--ablate N` or `--ablate P%` as Variant fields."""
    s = str(text).strip()
    try:
        value = float(s[:-1]) if s.endswith("%") else int(s)
    except ValueError:
        raise ConfigError(f"--ablate {s!r}: give a number of neurons (e.g. 2) or a percentage (e.g. 5%)") from None
    if s.endswith("%"):
        if not (0.0 < value <= 100.0):
            raise ConfigError(f"--ablate {s}: a percentage must be in (0%, 100%]")
        return {"ablate_percent": value}
    n = value
    if n < 1:
        raise ConfigError(f"--ablate {s}: at least 1 neuron per meta-loop")
    return {"ablate": n}


def parse_schedule(text: str) -> tuple[tuple[str, int], ...]:
    """"dropout:50,hidden:50" -> (("dropout", 50), ("hidden", 50))."""
    out = []
    for part in str(text).split(","):
        part = part.strip()
        m = re.fullmatch(r"([a-z]+):(\d+)", part)
        if not m:
            raise ConfigError(f"bad schedule stage {part!r}: write MODE:LOOPS, e.g. dropout:50,hidden:50")
        out.append((m.group(1), int(m.group(2))))
    if not out:
        raise ConfigError("an empty schedule")
    return tuple(out)


def format_schedule(schedule: tuple[tuple[str, int], ...]) -> str:
    """The inverse of parse_schedule."""
    return ",".join(f"{m}:{n}" for m, n in schedule)


def eligible_layers(arch: Arch, mode: str, specs: tuple[str, ...], net: str = "") -> tuple[int, ...]:
    """The Linear layers (0-based, `arch.depth` = output) that `mode` may ablate under `specs`;
    `net` names a model of your own (whose unit layers `arch` stands for) in the messages."""
    who, layers = (net, "unit layers (in call order)") if net else (f"architecture {arch.short}", "Linear layers")
    default = {"full": tuple(range(arch.depth + 1)), "hidden": tuple(range(arch.depth)),
               "output": (arch.depth,)}[mode]
    if not specs:
        return default
    out = set()
    for s in specs:
        if s == "output":
            out.add(arch.depth)
        elif s == "last-hidden":
            if arch.depth == 0:
                raise ConfigError(f"ablate-layers last-hidden: {who} has no hidden layer")
            out.add(arch.depth - 1)
        else:
            i = int(s)
            if i > arch.depth:
                raise ConfigError(f"ablate-layers {i}: {who} has {layers} 0..{arch.depth}")
            out.add(i)
    if mode == "output" and out != {arch.depth}:
        raise ConfigError("mode output ablates the output layer only; ablate-layers can only be output there")
    return tuple(sorted(out))


def ablation_count(v: Variant, arch: Arch, mode: str, loop: int, meta_loops: int) -> int:
    """Neurons `v` ablates at `loop` of a run of `meta_loops` (before capping at the eligible count).

    linear: ablate * (T - loop) / (T - 2), rounded half up, from `ablate` at loop 2 down to 0 at
    the last loop T; step:L: `ablate` before loop L, none from L on."""
    layers = eligible_layers(arch, mode, v.ablate_layers)
    widths = arch.hidden + (arch.n_out,)
    pool = sum(widths[i] for i in layers)
    n = max(1, math.floor(pool * v.ablate_percent / 100.0)) if v.ablate_percent else v.ablate
    n = min(n, pool)
    stop = schedule_stop(v.ablate_schedule)
    if stop is not None:
        return n if loop < stop else 0
    if v.ablate_schedule == "linear" and meta_loops > 2:
        return math.floor(n * (meta_loops - loop) / (meta_loops - 2) + 0.5)
    return n


DEFAULT = Variant()
