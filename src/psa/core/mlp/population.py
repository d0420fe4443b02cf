"""A population: M members of one architecture, their LKG weights stacked in one flat buffer.

Layout: layer-major. For every Linear layer l (o outputs, i inputs) the buffer holds a block of
M*o*i weights, then a block of M*o biases, so that each layer's weights are one contiguous
(M, o, i) tensor and one batched matmul serves the whole population.

Members are kept sorted by seed. When every seed has the same number of members (the study's
paired design: each seed once per mode) the members of one seed form a "group" that shares one
data order, so a training batch is gathered once per group and the first layer runs as one
matmul per group.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np
import torch

from psa.core.arch import Arch
from psa.core.device import canonical_device, to_device
from psa.core.errors import ConfigError
from psa.core.member import MODES, Member, seed_groups
from psa.core.model import DEFAULT_MODEL, check_model_name, init_weights, linear_keys, linear_shapes

@dataclass(frozen=True)
class Layout:
    """Where each layer's (M, o, i) weights and (M, o) biases sit in the flat buffer."""

    arch: Arch
    size_m: int
    blocks: tuple[tuple[int, int, int, int], ...]  # (weight offset, bias offset, o, i)
    numel: int
    model: str = DEFAULT_MODEL  # psa.core.model.MODELS: whose Linear layers these are

    @classmethod
    def of(cls, arch: Arch, m: int, model: str = DEFAULT_MODEL) -> "Layout":
        """The layout of `m` members of `model` for `arch`: its Linear layers in compute order."""
        blocks, off = [], 0
        for o, i in linear_shapes(arch, model):
            blocks.append((off, off + m * o * i, o, i))
            off += m * o * (i + 1)
        return cls(arch, m, tuple(blocks), off, model)

    def views(self, flat: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(weight (M, o, i), bias (M, o)) views of `flat`, one pair per Linear layer."""
        m = self.size_m
        return [
            (flat[w0 : w0 + m * o * i].view(m, o, i), flat[b0 : b0 + m * o].view(m, o))
            for w0, b0, o, i in self.blocks
        ]

    def runs(self, flat: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(weights (R, M, o*i), biases (R, M, o)) strided views of `flat`, one pair per run of R
        consecutive layers of one shape: an L*W net is three runs however deep it is, so a
        per-member operation over the whole buffer costs a handful of kernels, not one per layer."""
        m, base = self.size_m, flat.storage_offset()
        out, start = [], 0
        while start < len(self.blocks):
            w0, b0, o, i = self.blocks[start]
            end = start + 1
            while end < len(self.blocks) and self.blocks[end][2:] == (o, i):
                end += 1
            r, stride = end - start, m * o * (i + 1)  # consecutive layers of one shape are one stride apart
            out.append((flat.as_strided((r, m, o * i), (stride, o * i, 1), base + w0),
                        flat.as_strided((r, m, o), (stride, o, 1), base + b0)))
            start = end
        return out


# The variant state's checkpoint names (the bounty model is stored as "bounty") -> attributes
VARIANT_STATE = {"bounty": "bounty_state", "bounty_correct": "bounty_correct", "streak": "streak",
                 "allowance": "allowance", "opt_avg": "opt_avg", "opt_sq": "opt_sq", "opt_step": "opt_step"}


@dataclass
class Population:
    """The persistent state of M trials: LKG weights, LKG scores, bounty loops, loop count."""

    arch: Arch
    members: tuple[Member, ...]
    device: torch.device
    layout: Layout
    lkg: torch.Tensor  # flat, float32
    lkg_correct: torch.Tensor  # (M,) int64; -1 before the first promotion
    n_val: int
    bounty_loop: list[int]  # loop of the last promotion, 0 before any
    loop: int = 0  # meta-loops completed
    mode_history: list[list[tuple[str, int]]] = field(default_factory=list)  # (mode, first loop)
    # Variant state (psa.core.variant), present only when some member needs it, so the paper's
    # engine allocates nothing more. Patience: the bounty model (best ever; the LKG may be
    # worse), its score, and the discards in a row and the current allowance per member.
    bounty_state: torch.Tensor | None = None  # the bounty model's weights: flat, float32, as lkg
    bounty_correct: torch.Tensor | None = None  # (M,) int64
    streak: torch.Tensor | None = None  # (M,) int64
    allowance: torch.Tensor | None = None  # (M,) int64
    # Persistent optimizer: the LKG's AdamW moments (flat, as lkg) and step counts (M,) float64
    opt_avg: torch.Tensor | None = None
    opt_sq: torch.Tensor | None = None
    opt_step: torch.Tensor | None = None

    @classmethod
    def create(
        cls, arch: Arch, members: list[Member] | tuple[Member, ...], device: torch.device | str, n_val: int,
        model: str = DEFAULT_MODEL,
    ) -> "Population":
        """Fresh members of `model`: each seed's PyTorch-default initialisation, LKG score -1."""
        if not members:
            raise ConfigError("a population needs at least one member")
        check_model_name(model)
        for mem in members:
            if mem.mode not in MODES:
                raise ConfigError(f"unknown mode {mem.mode!r}")
            if mem.mode == "hidden" and arch.depth == 0:
                raise ConfigError("mode 'hidden' needs at least one hidden layer")
        for mem in members:
            mem.variant.check(arch, mem.variant.start_mode(mem.mode))
        members = tuple(sorted(members, key=lambda mem: mem.seed))
        dev = canonical_device(device)
        layout = Layout.of(arch, len(members), model)
        lkg = torch.empty(layout.numel, dtype=torch.float32)
        views = layout.views(lkg)
        for seed in sorted({mem.seed for mem in members}):
            rows = [j for j, mem in enumerate(members) if mem.seed == seed]
            for (w, b), (w0, b0) in zip(views, init_weights(arch, seed, model)):
                w[rows] = w0
                b[rows] = b0
        pop = cls(
            arch=arch,
            members=members,
            device=dev,
            layout=layout,
            lkg=lkg.to(dev),
            lkg_correct=torch.full((len(members),), -1, dtype=torch.int64, device=dev),
            n_val=n_val,
            bounty_loop=[0] * len(members),
            mode_history=[[(mem.mode, 1)] for mem in members],
        )
        pop.init_variant_state()
        return pop

    def to(self, device: torch.device | str) -> "Population":
        """A copy on another device (the CPU for shipping, a worker's device to train)."""
        lkg = self.lkg.to(device)
        dev = lkg.device  # as tensors see it ("cuda" -> "cuda:0"), which is what the engine compares
        return dataclasses.replace(self, device=dev, lkg=lkg, lkg_correct=self.lkg_correct.to(dev),
                                   bounty_loop=list(self.bounty_loop),
                                   mode_history=[list(h) for h in self.mode_history],
                                   **{VARIANT_STATE[k]: v.to(dev) for k, v in self.variant_state().items()})

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
        m, dev = self.size, self.device
        if self.patient and self.bounty_state is None:
            self.bounty_state = self.lkg.clone()
            self.bounty_correct = self.lkg_correct.clone()
            self.streak = torch.zeros(m, dtype=torch.int64, device=dev)
            self.allowance = torch.tensor([mem.variant.patience for mem in self.members], dtype=torch.int64).to(dev)
        if self.persistent and self.opt_avg is None:
            self.opt_avg = torch.zeros_like(self.lkg)
            self.opt_sq = torch.zeros_like(self.lkg)
            # float64 (float32 on MPS, which has none), as psa.core.mlp.chunk.MemberAdamW counts
            self.opt_step = torch.zeros(m, dtype=torch.float32 if dev.type == "mps" else torch.float64, device=dev)

    def variant_state(self) -> dict[str, torch.Tensor]:
        """The variant state tensors by name (those present), for checkpoints."""
        return {n: getattr(self, VARIANT_STATE[n]) for n in VARIANT_STATE
                if getattr(self, VARIANT_STATE[n]) is not None}

    def bounty_model(self) -> torch.Tensor:
        """The flat weights of every member's bounty model (best ever): the LKG without patience."""
        return self.lkg if self.bounty_state is None else self.bounty_state

    def bounty_score(self) -> list[float]:
        """Bounty (best validation accuracy, %) of every member; -1 before its first promotion."""
        c = self.lkg_correct if self.bounty_correct is None else self.bounty_correct
        return [x if x < 0 else 100.0 * x / self.n_val for x in c.tolist()]

    @property
    def model(self) -> str:
        """Which model the members are (psa.core.model.MODELS)."""
        return self.layout.model

    @property
    def size(self) -> int:
        """Number of members M."""
        return len(self.members)

    def groups(self) -> tuple[int, int]:
        """(G, k): G groups of k consecutive members sharing a seed, or (M, 1) if uneven."""
        return seed_groups(self.members)

    def lkg_score(self) -> list[float]:
        """LKG validation accuracy (%) of every member; -1 before its first promotion."""
        return [c if c < 0 else 100.0 * c / self.n_val for c in self.lkg_correct.tolist()]

    def member_state_dict(self, j: int, flat: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Member j's LKG (or its row of `flat`) as a state_dict of its model's nn.Module
        (psa.core.model.SimpleMLP or ResMLP; CPU tensors), loadable by plain PyTorch."""
        out = {}
        for (wk, bk), (w, b) in zip(linear_keys(self.arch, self.model),
                                    self.layout.views(self.lkg if flat is None else flat)):
            out[wk] = w[j].detach().cpu().clone()
            out[bk] = b[j].detach().cpu().clone()
        return out

    def load_member_state_dict(self, j: int, state: dict[str, torch.Tensor], flat: torch.Tensor | None = None) -> None:
        """Overwrite member j's LKG weights (or its row of `flat`) from a state_dict of its model
        and architecture."""
        keys = linear_keys(self.arch, self.model)
        expected = {k for pair in keys for k in pair}
        if set(state) != expected:
            raise ConfigError("checkpoint tensors do not match the architecture's layers")
        for (wk, bk), (w, b) in zip(keys, self.layout.views(self.lkg if flat is None else flat)):
            if tuple(state[wk].shape) != tuple(w[j].shape) or tuple(state[bk].shape) != tuple(b[j].shape):
                raise ConfigError(f"checkpoint tensor {wk} has shape {tuple(state[wk].shape)}, "
                                  f"architecture needs {tuple(w[j].shape)}")
            w[j].copy_(state[wk])
            b[j].copy_(state[bk])


def ablation_indices(layout: Layout, member: int, mode: str, layer: int, neuron: int) -> np.ndarray:
    """Offsets in the flat buffer of every parameter that `mode` zeroes when it ablates `neuron`
    of Linear `layer` in population row `member`: its incoming row and bias, and in `hidden`
    mode its outgoing column in the next layer."""
    m = member
    w0, b0, o, i = layout.blocks[layer]
    parts = [w0 + (m * o + neuron) * i + np.arange(i), np.array([b0 + m * o + neuron])]
    if mode == "hidden" and layer + 1 < len(layout.blocks):  # an output neuron has no outgoing column
        nw0, _, no, ni = layout.blocks[layer + 1]
        parts.append(nw0 + m * no * ni + np.arange(no) * ni + neuron)
    return np.concatenate(parts)


@torch.no_grad()
def ablate(flat: torch.Tensor, layout: Layout, ablations: list[tuple[int, str, int, int]]) -> None:
    """Zero, in place and in one kernel, what each (member, mode, layer, neuron) ablation names."""
    if not ablations:
        return
    idx = np.concatenate([ablation_indices(layout, *a) for a in ablations]).astype(np.int64)
    flat.index_fill_(0, to_device(torch.from_numpy(idx), flat.device), 0.0)
