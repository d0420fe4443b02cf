"""The oracle: one SimpleMLP or ResMLP trained the plain PyTorch way (nn.Module, autograd,
torch AdamW).

It draws the same randomness as the engine (initial weights from the seed, the data order,
the ablated neuron and the dropout noise, all functions of (seed, loop), from psa.core.rng and
psa.core.ablation) and uses nothing else of the product: the engine's batched hand-written
training must reproduce it.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from psa.core import rng
from psa.core.ablation import choose_neuron, choose_neurons
from psa.core.arch import Arch
from psa.core.data import Dataset
from psa.core.hparams import HParams
from psa.core.model import SimpleMLP
from psa.core.variant import Variant


@dataclass
class OracleResult:
    lkg: dict[str, torch.Tensor]
    lkg_correct: int
    accs: list[int] = field(default_factory=list)  # candidate correct counts per loop
    promoted: list[bool] = field(default_factory=list)
    # variants: the bounty model and its score, forced acceptances, and the mode of each loop
    bounty: dict[str, torch.Tensor] = field(default_factory=dict)
    bounty_correct: int = -1
    forced: list[bool] = field(default_factory=list)
    modes: list[str] = field(default_factory=list)


def dropout_mask(seed: int, loop: int, step: int, rows: int, units: int, drop: float) -> torch.Tensor:
    """(rows, units) F.dropout's multiplier for one step of one trial, from psa.core.rng's hash:
    one draw per hidden unit of the whole net per step, layers taking consecutive slices."""
    keys = torch.tensor([rng.loop_keys(seed, "dropout", loop)], dtype=torch.int64)
    ks = rng.step_keys(keys, torch.tensor(step, dtype=torch.int64))
    thr = torch.tensor([rng.dropout_threshold(drop)], dtype=torch.int64)
    scale = torch.ones(1) / (1.0 - torch.tensor([drop], dtype=torch.float32))  # as the engine rounds it
    return rng.dropout_noise(rng.position_hash(rows, units, "cpu"), ks, thr, scale)[0]


def forward(model: SimpleMLP, x: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
    """SimpleMLP's forward with dropout applied as F.dropout does, with the multipliers `noise`
    (rows, hidden units) instead of a generator's draw."""
    lins = model.linears()
    h, off = x, 0
    for lin in lins[:-1]:
        h = torch.relu(lin(h))
        if noise is not None:
            h = h * noise[:, off : off + lin.out_features]
            off += lin.out_features
    return lins[-1](h)


class Block(nn.Module):
    """One residual block; its parts named as psa.core.model.ResidualBlock names them."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, width)
        self.drop = nn.Dropout(0.0)
        self.fc2 = nn.Linear(width, width)


class PlainResMLP(nn.Module):
    """A ResMLP written out the plain way, independently of psa.core.model.ResMLP (whose
    state_dict keys it shares): Linear -> ReLU -> Dropout projections wherever the width
    changes, residual blocks ReLU(h + fc2(drop(ReLU(fc1(h))))), a Linear head."""

    def __init__(self, arch: Arch) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = arch.n_in
        self.units = 0  # dropout sites: every projection's and every block's inner units
        for w in arch.hidden:
            if w != width:
                layers += [nn.Linear(width, w), nn.ReLU(), nn.Dropout(0.0)]
                self.units += w
            layers.append(Block(w))
            self.units += w
            width = w
        layers.append(nn.Linear(width, arch.n_out))
        self.net = nn.Sequential(*layers)

    def linears(self) -> list[nn.Linear]:
        return [m for m in self.net.modules() if isinstance(m, nn.Linear)]

    def forward(self, x: torch.Tensor, noise: torch.Tensor | None = None,
                block_noise: torch.Tensor | None = None) -> torch.Tensor:
        """Logits; dropout as F.dropout with the multipliers `noise` (projections) and
        `block_noise` (blocks), (rows, units) over the dropout sites in compute order."""
        h, off = x.flatten(1), 0
        for m in self.net:
            if isinstance(m, Block):
                a = torch.relu(m.fc1(h))
                if block_noise is not None:
                    a = a * block_noise[:, off : off + a.shape[1]]
                off += a.shape[1]
                h = torch.relu(h + m.fc2(a))
            elif isinstance(m, nn.Dropout):
                if noise is not None:
                    h = h * noise[:, off : off + h.shape[1]]
                off += h.shape[1]
            else:
                h = m(h)
        return h


def run(
    arch: Arch,
    ds: Dataset,
    seed: int,
    mode: str,
    loops: int,
    cfg: HParams,
    persistent_optimizer: bool = False,
    adamw_weight_decay: float | None = None,
    model_name: str = "simplemlp",
) -> OracleResult:
    """`loops` meta-loops of one trial, the way a plain PyTorch harness writes them."""
    torch.manual_seed(seed)
    resmlp = model_name == "resmlp"
    model = PlainResMLP(arch) if resmlp else SimpleMLP(arch)
    wd = cfg.weight_decay if mode == "decay" else cfg.base_weight_decay
    if adamw_weight_decay is not None:
        wd = adamw_weight_decay
    drop = cfg.dropout if mode == "dropout" else 0.0
    block_drop = cfg.dropout if cfg.block_dropout == "always" else drop
    lkg = {k: v.clone() for k, v in model.state_dict().items()}
    best = -1
    out = OracleResult(lkg, best)
    opt = None
    n = ds.train_x.shape[0]
    for loop in range(1, loops + 1):
        model.load_state_dict(lkg)
        a = choose_neuron(arch, mode, seed, loop, model_name)
        if a is not None:
            layer, neuron = a
            lins = model.linears()
            with torch.no_grad():
                lins[layer].weight[neuron].zero_()
                lins[layer].bias[neuron].zero_()
                if mode == "hidden":
                    lins[layer + 1].weight[:, neuron].zero_()
        if opt is None or not persistent_optimizer:
            opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=wd)
        perm = rng.data_order([seed], loop, n, "cpu")[0]
        units = model.units if resmlp else sum(arch.hidden)
        model.train()
        for step, s in enumerate(range(0, n, cfg.batch_size)):
            idx = perm[s : s + cfg.batch_size]
            noise = dropout_mask(seed, loop, step, len(idx), units, drop) if drop > 0 and units else None
            if resmlp:
                bn = dropout_mask(seed, loop, step, len(idx), units, block_drop) if block_drop > 0 and units else None
                logits = model(ds.train_x[idx], noise, bn)
            else:
                logits = forward(model, ds.train_x[idx], noise)
            loss = F.cross_entropy(logits, ds.train_y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            correct = int((model(ds.val_x).argmax(1) == ds.val_y).sum())
        out.accs.append(correct)
        out.promoted.append(correct > best)
        if correct > best:
            best = correct
            lkg = {k: v.clone() for k, v in model.state_dict().items()}
    out.lkg, out.lkg_correct = lkg, best
    return out


def run_variant(arch: Arch, ds: Dataset, seed: int, mode: str, loops: int, cfg: HParams, variant: Variant) -> OracleResult:
    """`loops` meta-loops of one trial of `mode` with an engine variant (psa.core.variant),
    written plainly: patience with a bounty model apart from the LKG, the AdamW state kept with
    the LKG, several or fixed neurons, a mode schedule. The neurons come from
    psa.core.ablation.choose_neurons (randomness, like choose_neuron above); the rest is this loop."""
    torch.manual_seed(seed)
    model = SimpleMLP(arch)
    lkg = {k: v.clone() for k, v in model.state_dict().items()}
    lkg_correct, bounty_correct = -1, -1
    out = OracleResult(lkg, -1, bounty=lkg)
    lkg_opt = None  # the LKG's AdamW state_dict (optimizer_state = persist)
    streak, allowance = 0, variant.patience
    n = ds.train_x.shape[0]
    units = sum(arch.hidden)
    lins = model.linears()
    for loop in range(1, loops + 1):
        m = variant.mode_at(mode, loop)
        out.modes.append(m)
        wd = cfg.weight_decay if m == "decay" else 0.0
        drop = cfg.dropout if m == "dropout" else 0.0
        model.load_state_dict(lkg)
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=wd)
        if variant.optimizer_state == "persist" and lkg_opt is not None:
            opt.load_state_dict(copy.deepcopy(lkg_opt))  # load_state_dict keeps the tensors it is given
            for g in opt.param_groups:
                g["weight_decay"] = wd  # the mode's, which a schedule may have changed
        ablations = choose_neurons(arch, m, seed, loop, variant, cfg.meta_loops)

        def kill() -> None:
            with torch.no_grad():
                for layer, neuron in ablations:
                    rows = [(lins[layer].weight, (neuron,)), (lins[layer].bias, (neuron,))]
                    if m == "hidden" and layer + 1 < len(lins):
                        rows.append((lins[layer + 1].weight, (slice(None), neuron)))
                    for p, idx in rows:
                        p[idx] = 0.0
                        st = opt.state.get(p)
                        if st:  # the neuron's moments die with it
                            st["exp_avg"][idx] = 0.0
                            st["exp_avg_sq"][idx] = 0.0

        kill()
        perm = rng.data_order([seed], loop, n, "cpu")[0]
        model.train()
        for step, s in enumerate(range(0, n, cfg.batch_size)):
            idx = perm[s : s + cfg.batch_size]
            noise = dropout_mask(seed, loop, step, len(idx), units, drop) if drop > 0 and units else None
            loss = F.cross_entropy(forward(model, ds.train_x[idx], noise), ds.train_y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        if variant.fixed:
            kill()  # the fixed set is re-zeroed after every epoch
        model.eval()
        with torch.no_grad():
            correct = int((model(ds.val_x).argmax(1) == ds.val_y).sum())
        out.accs.append(correct)
        beats = correct > lkg_correct
        forced = variant.patience > 0 and not beats and streak >= allowance
        promote = beats or forced
        state = {k: v.clone() for k, v in model.state_dict().items()}
        if promote:
            lkg, lkg_correct, streak = state, correct, 0
            lkg_opt = copy.deepcopy(opt.state_dict())
        else:
            streak += 1
        if correct > bounty_correct:
            out.bounty, bounty_correct, allowance = state, correct, variant.patience
        elif forced:
            allowance *= variant.patience_growth
        out.promoted.append(promote)
        out.forced.append(forced)
    out.lkg, out.lkg_correct, out.bounty_correct = lkg, lkg_correct, bounty_correct
    return out
