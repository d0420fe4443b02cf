"""The models psa trains, as plain nn.Modules, and the facts about them the engine needs.

- SimpleMLP, the paper's testbed: [Linear -> ReLU -> Dropout] x L, Linear.
- ResMLP, the authors' next study (paper, section V), built as their public ResMLP harness
  builds it so that results are comparable: `[D*W]` is D residual blocks of width W, a block
  is Linear(W,W) -> ReLU -> Dropout -> Linear(W,W) with output ReLU(x + branch); a Linear ->
  ReLU -> Dropout projection in front of every stack whose width differs from what comes
  before it (the input projection 784 -> W, and the transitions of heterogeneous nets); a
  Linear head. No normalisation, no branch scaling, PyTorch's default initialisation.

The engine sees either model as its list of Linear layers in compute order (`linear_shapes`):
one (M, o, i) + (M, o) block per Linear in the flat buffer, the order also used by the
ablations ("the next Linear" of `hidden` mode) and by the state_dict keys of checkpoints.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from psa.core.arch import Arch
from psa.core.errors import ConfigError

MODELS = ("simplemlp", "resmlp")
DEFAULT_MODEL = "simplemlp"


def check_model_name(name: object) -> str:
    """`name` if psa can train that model, else a ConfigError naming the choices."""
    if not isinstance(name, str) or name not in MODELS:
        raise ConfigError(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
    return name


class SimpleMLP(nn.Module):
    """Flatten, then per hidden layer Linear -> ReLU -> Dropout, then a Linear head to n_out logits.

    Dropout modules sit in every model so that all modes share one graph; they only act in
    `dropout` mode and only in training (paper, section II.B).
    """

    def __init__(self, arch: Arch, dropout: float = 0.0) -> None:
        super().__init__()
        self.arch = arch
        layers: list[nn.Module] = []
        widths = arch.widths
        for a, b in zip(widths[:-2], widths[1:-1]):
            layers += [nn.Linear(a, b), nn.ReLU(), nn.Dropout(dropout)]
        layers.append(nn.Linear(widths[-2], widths[-1]))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for a batch of images of any shape (N, ...)."""
        return self.net(x.flatten(1))

    def linears(self) -> list[nn.Linear]:
        """The Linear layers, input to output."""
        return [m for m in self.net if isinstance(m, nn.Linear)]


class ResidualBlock(nn.Module):
    """Linear -> ReLU -> Dropout -> Linear, added to the input; the ReLU comes after the sum."""

    def __init__(self, width: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, width)
        self.drop = nn.Dropout(dropout)
        self.fc2 = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """ReLU(x + fc2(drop(ReLU(fc1(x)))))."""
        return F.relu(x + self.fc2(self.drop(F.relu(self.fc1(x)))))


class ResMLP(nn.Module):
    """Flatten, then per stack of the architecture a projection (Linear -> ReLU -> Dropout) if
    the width changes, then its residual blocks; a Linear head to n_out logits.

    `dropout` is the rate of the projections' Dropout, `block_dropout` (default: `dropout`) the
    rate inside the blocks. The modules are built in compute order, so the default
    initialisation draws from the seed in the order the authors' harness draws it.
    """

    def __init__(self, arch: Arch, dropout: float = 0.0, block_dropout: float | None = None) -> None:
        super().__init__()
        self.arch = arch
        p_block = dropout if block_dropout is None else block_dropout
        layers: list[nn.Module] = []
        width = arch.n_in
        for depth, w in stacks(arch):
            if w != width:
                layers += [nn.Linear(width, w), nn.ReLU(), nn.Dropout(dropout)]
            layers += [ResidualBlock(w, p_block) for _ in range(depth)]
            width = w
        layers.append(nn.Linear(width, arch.n_out))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for a batch of images of any shape (N, ...)."""
        return self.net(x.flatten(1))

    def linears(self) -> list[nn.Linear]:
        """The Linear layers in compute order (a block's fc1 before its fc2)."""
        return [m for m in self.net.modules() if isinstance(m, nn.Linear)]


def stacks(arch: Arch) -> list[tuple[int, int]]:
    """(blocks, width) of each ResMLP stack: consecutive blocks of one width are one stack, as
    the authors' harness reads "[2*64, 3*64]" (five blocks of 64, no transition between them)."""
    out: list[tuple[int, int]] = []
    for depth, w in arch.blocks:
        if out and out[-1][1] == w:
            out[-1] = (out[-1][0] + depth, w)
        else:
            out.append((depth, w))
    return out


@dataclass(frozen=True)
class ResStep:
    """One step of a ResMLP's forward pass over its Linear layers (indices in compute order).

    kind "proj": ReLU(Linear `first`(h)) with the projection dropout (rate of the mode);
    kind "block": ReLU(h + Linear `first + 1`(block dropout(ReLU(Linear `first`(h))))).
    `width` is the step's output width (and, for a block, its dropout units).
    """

    kind: str
    first: int
    width: int


def res_steps(arch: Arch) -> list[ResStep]:
    """The projections and blocks of a ResMLP of `arch`, in compute order; the head follows."""
    steps, width, layer = [], arch.n_in, 0
    for depth, w in stacks(arch):
        if w != width:
            steps.append(ResStep("proj", layer, w))
            layer += 1
        for _ in range(depth):
            steps.append(ResStep("block", layer, w))
            layer += 2
        width = w
    return steps


def build(arch: Arch, model: str = DEFAULT_MODEL, dropout: float = 0.0,
          block_dropout: float | None = None) -> nn.Module:
    """The nn.Module of `model` for `arch` (dropout rates as SimpleMLP and ResMLP take them)."""
    if check_model_name(model) == "resmlp":
        return ResMLP(arch, dropout, block_dropout)
    return SimpleMLP(arch, dropout)


def linear_shapes(arch: Arch, model: str = DEFAULT_MODEL) -> list[tuple[int, int]]:
    """(out, in) of every Linear layer of `model` for `arch`, in compute order."""
    if check_model_name(model) == "simplemlp":
        w = arch.widths
        return list(zip(w[1:], w[:-1]))
    shapes, width = [], arch.n_in
    for step in res_steps(arch):
        shapes += [(step.width, width)] if step.kind == "proj" else [(step.width, step.width)] * 2
        width = step.width
    return [*shapes, (arch.n_out, width)]


def param_count(arch: Arch, model: str = DEFAULT_MODEL) -> int:
    """Trainable parameters of `model` for `arch` (equation 1 for SimpleMLP)."""
    if check_model_name(model) == "simplemlp":
        return arch.params
    return sum(o * (i + 1) for o, i in linear_shapes(arch, model))


def flops_per_sample(arch: Arch, model: str = DEFAULT_MODEL) -> int:
    """Multiply-adds x 2 of one forward pass of `model` for one image."""
    if check_model_name(model) == "simplemlp":
        return arch.flops_per_sample()
    return sum(2 * o * i for o, i in linear_shapes(arch, model))


def dropout_units(arch: Arch, model: str = DEFAULT_MODEL) -> int:
    """Units one training row draws dropout noise for: every hidden unit of a SimpleMLP; the
    output of every projection and of every block's first Linear of a ResMLP."""
    if check_model_name(model) == "simplemlp":
        return sum(arch.hidden)
    return sum(s.width for s in res_steps(arch))


def layer_table(arch: Arch, model: str = DEFAULT_MODEL) -> list[tuple[str, int, int, int]]:
    """Rows (name, in, out, parameters) for every Linear layer, in compute order."""
    if check_model_name(model) == "simplemlp":
        return arch.layer_table()
    rows, shapes, block, transition = [], linear_shapes(arch, model), 0, 0
    for step in res_steps(arch):
        o, i = shapes[step.first]
        if step.kind == "proj":
            name = "input" if step.first == 0 else f"transition {transition + 1}"
            transition += step.first > 0
            rows.append((name, i, o, o * (i + 1)))
        else:
            block += 1
            rows += [(f"block {block} fc{n}", o, o, o * (o + 1)) for n in (1, 2)]
    o, i = shapes[-1]
    return [*rows, ("output", i, o, o * (i + 1))]


def linear_keys(arch: Arch, model: str = DEFAULT_MODEL) -> list[tuple[str, str]]:
    """State-dict keys (weight, bias) of each Linear layer of `model` for `arch`, compute order."""
    if check_model_name(model) == "simplemlp":
        keys = []
        for i in range(arch.n_linear):
            j = 3 * i  # Linear, ReLU, Dropout per hidden block
            keys.append((f"net.{j}.weight", f"net.{j}.bias"))
        return keys
    with torch.device("meta"):  # the module's own names, without allocating its weights
        net = build(arch, model)
    return [(f"{name}.weight", f"{name}.bias") for name, m in net.named_modules() if isinstance(m, nn.Linear)]


def init_weights(arch: Arch, seed: int, model: str = DEFAULT_MODEL) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """PyTorch's default Linear initialisation of `model` for `arch`, drawn from `seed` on the
    CPU, in compute order.

    Building the real module (rather than re-deriving its init) keeps "PyTorch's default"
    exact across versions; the global RNG is forked so callers are not disturbed.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = build(arch, model)
    return [(lin.weight.detach(), lin.bias.detach()) for lin in net.linears()]
