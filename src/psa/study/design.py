"""Study designs: what a study runs (architectures x modes x trials x meta-loops, seeds and
hyperparameters), from presets, TOML files and flags, validated before anything runs."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from psa.core.arch import ArchError, parse_arch, study_architectures
from psa.core.data import N_TRAIN, DataError, check_spec
from psa.core.hparams import KNOB_DEFAULTS, HParams
from psa.core.model import DEFAULT_MODEL, check_model_name
from psa.core.errors import ConfigError
from psa.core.member import MODES, Member, seed_problem
from psa.core.variant import DEFAULT, VARIANT_NAME, Variant, format_schedule

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised only on 3.10
    import tomli as tomllib


class DesignError(ConfigError):
    """A study design (flags or TOML file) that cannot run."""


# A study of your own model (psa.core.module) names it `module:function`; its design's `model`
# is then MODULE_MODEL and its nets are the factories, one cell each.
MODULE_MODEL = "module"
# A study's trials: its rows, plan and progress live in memory, so a typo's 10**20 trials must be
# a line, not the machine out of memory. The paper's study has 5,880; this is 170 times that.
MAX_TRIALS = 1_000_000
_FACTORY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*"
                      r":[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


def is_factory_spec(text: object) -> bool:
    """True for a model given as `module:function` (a factory of an nn.Module)."""
    return isinstance(text, str) and ":" in text


def factory_specs(model: object) -> tuple[str, ...] | None:
    """The factories a design's `model` names (`"pkg.mod:make"`, or a list of them), checked
    for their form only (importing them is psa.study.modules' job); None for psa's own models."""
    if isinstance(model, (list, tuple)):
        if not model:
            raise DesignError("model: give at least one model")
        if len(model) == 1 and not is_factory_spec(model[0]):
            return None
        if not all(is_factory_spec(m) for m in model):
            raise DesignError("give one of psa's models (simplemlp, resmlp) or one or more factories "
                              "module:function, not both")
    elif is_factory_spec(model):
        model = (model,)
    else:
        return None
    for m in model:
        if not _FACTORY.match(m):
            raise DesignError(f"model {m!r}: give a factory as module:function (e.g. mypkg.models:make_cnn)")
    if len(set(model)) != len(model):
        raise DesignError(f"model {sorted(m for m in model if model.count(m) > 1)[0]} is listed more than once")
    return tuple(model)


# the design's fields that are hyperparameters: flat in flags, TOML and the stored JSON
HPARAM_FIELDS = ("meta_loops", "lr", "batch_size", "weight_decay", "dropout", "diverged", "base_weight_decay",
                 "block_dropout")


@dataclass(frozen=True)
class StudyDesign:
    """What a study runs. Validated on construction; architectures are stored in short form.

    `nets` are what the study trains, one cell each: architecture strings of psa's own nets
    ("2*16"), or, for a model of your own (model MODULE_MODEL), its factories (module:function).
    Flags, design files and the stored design call the field "architectures"."""

    nets: tuple[str, ...]
    modes: tuple[str, ...] = MODES  # canonical order, so "hidden,none" and "none,hidden" are one design
    trials: int = 10  # per (architecture, mode); trial k of every mode trains with seed + k - 1
    seed: int = 0
    hparams: HParams = HParams()  # what every trial trains with (Table VI)
    dataset: str = "mnist"
    model: str = DEFAULT_MODEL  # psa.core.model.MODELS: which net every architecture describes
    # Train on only the first N of the 50,000 training images: for tests and quick checks of
    # the machinery only; results are not comparable with the paper's (trials record it).
    train_subset: int | None = None
    # Named engine variants (psa.core.variant), each run beside the paper's engine: crossed with
    # the modes it applies to (a schedule runs once, in its own modes). Trial k of every
    # condition shares one seed, so a variant pairs with its mode's paper-engine trials.
    variants: tuple[tuple[str, Variant], ...] = ()

    @classmethod
    def from_fields(cls, **fields: Any) -> "StudyDesign":
        """A design from flat fields, as flags, TOML files and stored designs give them
        (`lr`, `meta_loops`... beside `architectures`, `modes`...)."""
        hp = {k: fields.pop(k) for k in HPARAM_FIELDS if k in fields}
        if "architectures" in fields:
            fields["nets"] = fields.pop("architectures")
        factories = factory_specs(fields.get("model"))
        if factories is not None:
            # your own model: its factories are the study's cells, where architectures would be
            if fields.get("nets") not in (None, factories):
                raise DesignError("architectures (--arch, --arch-file, a preset's or a design file's) describe a "
                                  "SimpleMLP or ResMLP; a model given as module:function is its own architecture "
                                  "(give --model once per factory, without architectures)")
            fields.update(nets=factories, model=MODULE_MODEL)
        elif isinstance(fields.get("model"), (list, tuple)):
            fields["model"] = fields["model"][0]
        for name in ("meta_loops", "batch_size"):
            v = hp.get(name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise DesignError(f"{name} must be a positive integer, got {v!r}")
        for name in ("lr", "weight_decay", "dropout", "base_weight_decay"):
            v = hp.get(name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
                raise DesignError(f"{name} must be a number, got {v!r}")
        if hp.get("diverged") is None:
            hp.pop("diverged", None)
        try:
            hparams = HParams(**hp)
        except ConfigError as e:
            raise DesignError(str(e)) from None
        return cls(**fields, hparams=hparams)

    def __post_init__(self) -> None:
        if not self.nets:
            raise DesignError("a study needs at least one architecture")
        shorts = []
        for a in self.nets:
            if self.is_module:
                if factory_specs(a) is None:
                    raise DesignError(f"model {MODULE_MODEL}: {a!r} is not a factory module:function")
                shorts.append(a)
                continue
            try:
                shorts.append(parse_arch(a).short)
            except ArchError as e:
                raise DesignError(f"unknown architecture {a!r}: {e}") from None
        dup = sorted({s for s in shorts if shorts.count(s) > 1})
        if dup:
            raise DesignError(f"architecture {dup[0]} is listed more than once")
        object.__setattr__(self, "nets", tuple(shorts))
        if not self.modes:
            raise DesignError("a study needs at least one mode")
        for m in self.modes:
            if m not in MODES:
                raise DesignError(f"unknown mode {m!r}; choose from {', '.join(MODES)}")
        if len(set(self.modes)) != len(self.modes):
            raise DesignError("a mode is listed more than once")
        object.__setattr__(self, "modes", tuple(m for m in MODES if m in self.modes))
        if not isinstance(self.trials, int) or isinstance(self.trials, bool) or self.trials < 1:
            raise DesignError(f"trials must be a positive integer, got {self.trials!r}")
        if self.train_subset is not None and (not isinstance(self.train_subset, int) or isinstance(
                self.train_subset, bool) or not 1 <= self.train_subset <= N_TRAIN):
            raise DesignError(f"train_subset must be an integer in 1..{N_TRAIN}, got {self.train_subset!r}")
        if not isinstance(self.hparams, HParams):
            raise DesignError(f"hparams must be an HParams, got {type(self.hparams).__name__}")
        try:
            check_spec(self.dataset)
        except DataError as e:
            raise DesignError(str(e)) from None
        if not self.is_module:
            try:
                check_model_name(self.model)
            except ConfigError as e:
                raise DesignError(str(e)) from None
        if self.model != "resmlp" and self.hparams.block_dropout != "mode":
            raise DesignError("block_dropout applies to the residual blocks of model resmlp only")
        if "hidden" in self.modes and not self.is_module:  # a module's layers are checked when it is built
            flat = [a for a in self.nets if parse_arch(a).depth == 0]
            if flat:
                raise DesignError(f"mode 'hidden' needs a hidden layer; architecture {flat[0]} has none")
        self._check_variants()
        if self.n_trials > MAX_TRIALS:  # before anything builds a row, a plan or a population per trial
            raise DesignError(f"a study of {self.n_trials:,} trials ({len(self.nets)} architectures x "
                              f"{len(self.conditions())} conditions x {self.trials:,} trials) is more than psa's "
                              f"{MAX_TRIALS:,}; split it into several studies")
        if (problem := seed_problem(self.seed, self.trials)) is not None:
            raise DesignError(problem)

    @property
    def is_module(self) -> bool:
        """True for a study of your own model: its architectures are `module:function` factories."""
        return self.model == MODULE_MODEL

    def _check_variants(self) -> None:
        if self.variants and self.model not in (DEFAULT_MODEL, MODULE_MODEL):
            raise DesignError(f"engine variants are not available for model {self.model} yet")
        names, settings = set(), {}
        for name, v in self.variants:
            if not isinstance(name, str) or not VARIANT_NAME.match(name) or name in MODES or name == "paper":
                raise DesignError(f"bad variant name {name!r}: letters, digits, '_' or '-' (at most 32), "
                                  f"not a mode's name or 'paper'")
            if name in names:
                raise DesignError(f"variant {name!r} is defined twice")
            names.add(name)
            if not isinstance(v, Variant) or v.is_default:
                raise DesignError(f"variant {name!r} is the paper's engine: give it a setting")
            if v.to_json() in settings:
                raise DesignError(f"variants {settings[v.to_json()]!r} and {name!r} have the same settings")
            settings[v.to_json()] = name
            if not any(True for _ in v.modes_in(self.modes)):
                raise DesignError(f"variant {name!r} applies to none of the design's modes "
                                  f"({', '.join(self.modes)}): its ablation settings need an ablative mode")
            if self.is_module:
                # a factory's unit layers are known once it is built: psa.study.modules checks the
                # variant against them; what needs no model is checked here
                if v.schedule and sum(n for _, n in v.schedule) != self.hparams.meta_loops:
                    raise DesignError(f"variant {name!r}: schedule {format_schedule(v.schedule)} covers "
                                      f"{sum(n for _, n in v.schedule)} meta-loops, the run has "
                                      f"{self.hparams.meta_loops}")
                continue
            for arch in self.nets:
                for mode in v.modes_in(self.modes):
                    try:
                        v.check(parse_arch(arch), mode, self.hparams.meta_loops)
                    except ConfigError as e:
                        raise DesignError(f"variant {name!r} on {arch} {mode}: {e}") from None

    def conditions(self) -> tuple[tuple[str, str, Variant], ...]:
        """Every (mode, variant name, variant) a trial index runs: each mode with the paper's
        engine (name ""), then each variant in each mode it applies to."""
        out = [(m, "", DEFAULT) for m in self.modes]
        for name, v in self.variants:
            out += [(m, name, v) for m in v.modes_in(self.modes)]
        return tuple(out)

    def conditions_text(self) -> str:
        """"6 modes", or "1 modes + 5 variant conditions", for people."""
        extra = len(self.conditions()) - len(self.modes)
        return f"{len(self.modes)} modes" + (f" + {extra} variant conditions" if extra else "")

    def seed_of(self, trial: int) -> int:
        """The seed of trial k (1-based), shared by every mode: the paired design."""
        return self.seed + trial - 1

    def member(self, mode: str, trial: int, variant: Variant = DEFAULT) -> Member:
        """The Member that trial k of `mode` (and `variant`) is."""
        return self.hparams.member(mode, self.seed_of(trial), variant)

    def fields(self) -> dict[str, Any]:
        """The design as flat fields (the inverse of from_fields)."""
        hp = self.hparams
        d: dict[str, Any] = {"architectures": self.nets, "modes": self.modes, "trials": self.trials,
                             "meta_loops": hp.meta_loops, "seed": self.seed, "lr": hp.lr,
                             "batch_size": hp.batch_size, "weight_decay": hp.weight_decay, "dropout": hp.dropout,
                             "diverged": hp.diverged, "dataset": self.dataset, "train_subset": self.train_subset,
                             "model": self.model, "base_weight_decay": hp.base_weight_decay,
                             "block_dropout": hp.block_dropout}
        if self.variants:
            d["variants"] = self.variants
        return d

    def to_dict(self) -> dict[str, Any]:
        """The design as JSON-able data (the studies row's `design`, with the plan added).

        AdamW's betas and eps are not a factor of studies: every study trains with the paper's.
        """
        d = self.fields()
        d["architectures"] = list(self.nets)
        d["modes"] = list(self.modes)
        if self.train_subset is None:
            del d["train_subset"]  # absent unless set: the digest of a full-data design has no such key
        if self.model == DEFAULT_MODEL:
            del d["model"]  # likewise: designs of the paper's SimpleMLP keep their digests
        for name, default in KNOB_DEFAULTS.items():
            if d[name] == default:
                del d[name]
        if self.variants:  # absent unless set, likewise
            d["variants"] = {name: v.settings() for name, v in self.variants}
        return d

    @property
    def n_train(self) -> int:
        """Training images per epoch."""
        return self.train_subset or N_TRAIN

    @property
    def dataset_label(self) -> str:
        """What the trials table records as the data set: "mnist", or "mnist[train:2048]"."""
        return self.dataset if self.train_subset is None else f"{self.dataset}[train:{self.train_subset}]"

    def digest(self) -> str:
        """SHA-256 of the canonical design: two commands with equal digests are one study."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()

    @property
    def n_trials(self) -> int:
        """Trials in the whole study."""
        return len(self.nets) * len(self.conditions()) * self.trials


# the fields flags and design files give (`architectures` is the field `nets`)
DESIGN_FIELDS = {f.name for f in dataclasses.fields(StudyDesign)} - {"hparams", "nets"} | {"architectures"} | set(
    HPARAM_FIELDS)


def preset(name: str) -> StudyDesign:
    """The design of preset `name` (one of PRESETS); DesignError for any other name.

    `paper`: the authors' 98 architectures x 6 modes x 10 trials x 100 meta-loops. `resmlp`: the
    same 98 shapes as ResMLPs (D residual blocks of width W). `smoke`: 1*32, 2*16 and 4*8 x 6
    modes x 2 trials x 10 meta-loops on real MNIST, a check that everything works (how long it
    takes: docs/study.md)."""
    if name == "paper":
        return StudyDesign(nets=tuple(a.short for a in study_architectures()))
    if name == "resmlp":
        return StudyDesign(nets=tuple(a.short for a in study_architectures()), model="resmlp")
    if name == "smoke":
        return StudyDesign(nets=("1*32", "2*16", "4*8"), trials=2, hparams=HParams(meta_loops=10))
    raise DesignError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")


PRESETS = ("paper", "resmlp", "smoke")


def read_arch_file(path: str | os.PathLike) -> tuple[str, ...]:
    """Architectures from a text file: one per line; blank lines and `#` comments ignored."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise DesignError(f"cannot read architecture file {p}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise DesignError(f"architecture file {p} is not UTF-8 text (byte {e.start})") from None
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        try:
            out.append(parse_arch(line).short)
        except ArchError as e:
            raise DesignError(f"{p}:{n}: {e}") from None
    if not out:
        raise DesignError(f"architecture file {p} lists no architecture")
    return tuple(out)


def arch_list(value: str | Sequence[str]) -> tuple[str, ...]:
    """An architecture list as given: "paper" for the 98, else the listed architectures."""
    if isinstance(value, str):
        if value.strip().lower() == "paper":
            return tuple(a.short for a in study_architectures())
        value = [value]
    if not isinstance(value, (list, tuple)):  # a design file's `architectures = 5`
        raise DesignError(f"architectures must be a list of strings like \"1*128\" (or \"paper\"), got {value!r}")
    out = []
    for a in value:
        if not isinstance(a, str):
            raise DesignError(f"architectures must be strings like \"1*128\", got {a!r}")
        if a.strip().lower() == "paper":
            out.extend(x.short for x in study_architectures())
        else:
            try:
                out.append(parse_arch(a).short)
            except ArchError as e:
                raise DesignError(f"unknown architecture {a!r}: {e}") from None
    return tuple(out)


TOML_KEYS = {"name", "preset", "architectures", "architectures_file", "modes", "trials", "meta_loops", "seed",
             "dataset", "train_subset", "model", "training", "variants"}
TOML_TRAINING_KEYS = {"lr", "batch_size", "weight_decay", "dropout", "diverged", "base_weight_decay", "block_dropout"}


def read_design_file(path: str | os.PathLike) -> tuple[str | None, str | None, dict[str, Any]]:
    """Parse a TOML design: (name or None, preset or None, design fields).

    Example:
        name = "widths"
        architectures = ["1*64", "1*128", "[2*128, 4*64]"]   # or "paper", or architectures_file
        modes = ["none", "hidden"]                            # default: all six
        trials = 10
        meta_loops = 100
        seed = 0
        model = "simplemlp"                                   # or "resmlp", or your own model(s):
                                                              # "mypkg.models:make_cnn" or a list of them,
                                                              # without architectures
        [training]
        lr = 1e-4
        [variants.patience5]                                  # run beside the paper's engine
        patience = 5
    """
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise DesignError(f"cannot read design file {p}: {e.strerror}") from None
    try:
        doc = tomllib.loads(raw.decode())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise DesignError(f"design file {p} does not parse as TOML: {e}") from None
    unknown = sorted(set(doc) - TOML_KEYS)
    if unknown:
        raise DesignError(f"design file {p}: unknown key {unknown[0]!r} (known: {', '.join(sorted(TOML_KEYS))})")
    fields: dict[str, Any] = {}
    name = doc.get("name")
    if name is not None and not isinstance(name, str):
        raise DesignError(f"design file {p}: name must be a string")
    pre = doc.get("preset")
    if pre is not None and pre not in PRESETS:
        raise DesignError(f"design file {p}: unknown preset {pre!r}; choose from {', '.join(PRESETS)}")
    if "architectures" in doc and "architectures_file" in doc:
        raise DesignError(f"design file {p}: give architectures or architectures_file, not both")
    try:
        if "architectures" in doc:
            fields["architectures"] = arch_list(doc["architectures"])
        if "architectures_file" in doc:
            if not isinstance(doc["architectures_file"], str):
                raise DesignError(f"architectures_file must be a file name, got {doc['architectures_file']!r}")
            f = Path(doc["architectures_file"])
            fields["architectures"] = read_arch_file(f if f.is_absolute() else p.parent / f)
        if "modes" in doc:
            modes = doc["modes"]
            if isinstance(modes, str):
                modes = [m.strip() for m in modes.split(",") if m.strip()]
            if not isinstance(modes, list):
                raise DesignError("modes must be a list of mode names")
            fields["modes"] = tuple(modes)
    except DesignError as e:
        raise DesignError(f"design file {p}: {e}") from None
    for key in ("trials", "meta_loops", "seed", "dataset", "train_subset", "model"):
        if key in doc:
            fields[key] = doc[key]
    training = doc.get("training", {})
    if not isinstance(training, dict):
        raise DesignError(f"design file {p}: [training] must be a table")
    unknown = sorted(set(training) - TOML_TRAINING_KEYS)
    if unknown:
        raise DesignError(f"design file {p}: unknown key training.{unknown[0]} "
                          f"(known: {', '.join(sorted(TOML_TRAINING_KEYS))})")
    fields.update(training)
    if "variants" in doc:
        try:
            fields["variants"] = parse_variants(doc["variants"])
        except ConfigError as e:
            raise DesignError(f"design file {p}: {e}") from None
    return name, pre, fields


def parse_variants(table: Any) -> tuple[tuple[str, Variant], ...]:
    """Named variants from a TOML table {name: {setting: value}} (or a stored design's
    {name: settings}); settings are Variant's fields, with `ablate` also "N" or "P%" and
    `schedule` also "dropout:50,hidden:50"."""
    if not isinstance(table, dict):
        raise DesignError("[variants] must be a table of named variants, e.g. [variants.patience5]")
    out = []
    for name, settings in table.items():
        if not isinstance(settings, dict):
            raise DesignError(f"variants.{name} must be a table of settings")
        try:
            out.append((str(name), Variant.from_settings(settings)))
        except (ConfigError, TypeError) as e:
            raise DesignError(f"variants.{name}: {e}") from None
    return tuple(out)


_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def check_name(name: str) -> str:
    """Study names become directory names: letters, digits, '.', '_', '-' (64 at most)."""
    if not _NAME.match(name):
        raise DesignError(f"bad study name {name!r}: use letters, digits, '.', '_' or '-' (at most 64)")
    return name


def resolve_design(
    preset_name: str | None = None,
    design_file: str | None = None,
    name: str | None = None,
    overrides: dict[str, Any] | None = None,
) -> tuple[str, StudyDesign]:
    """The (name, design) a command line asks for: preset or file, then flags on top.

    The default name is the preset's or the file's `name` (or file stem) when flags change
    nothing, else that base plus 8 hex digits of the design digest, so re-running the same
    command finds the same study and a different design never lands in an existing one.
    """
    if preset_name is not None and design_file is not None:
        raise DesignError("give a design file or --preset, not both")
    base_fields: dict[str, Any] = {}
    base_name = "study"
    file_name = None
    if preset_name is not None:
        base_fields = preset(preset_name).fields()
        base_name = preset_name
    if design_file is not None:
        file_name, file_preset, fields = read_design_file(design_file)
        if file_preset:
            base_fields = preset(file_preset).fields()
        base_fields.update(fields)
        base_name = file_name or Path(design_file).stem
    over = {k: v for k, v in (overrides or {}).items() if v is not None}
    unknown = set(over) - DESIGN_FIELDS
    if unknown:  # a programming error, not a user's
        raise ValueError(f"unknown design fields {sorted(unknown)}")
    fields = {**base_fields, **over}
    if "architectures" not in fields and factory_specs(fields.get("model")) is None:
        raise DesignError("no architectures: pass --arch (repeatable), --arch-file, a design file, --preset, or "
                          "your own model as --model module:function")
    design = StudyDesign.from_fields(**fields)
    if name is None:
        unchanged = not over or all(base_fields.get(k) == (tuple(v) if isinstance(v, list) else v)
                                    for k, v in over.items())
        if (preset_name or design_file) and unchanged:
            name = file_name or base_name
        else:
            name = f"{base_name}-{design.digest()[:8]}"
    return check_name(name), design
