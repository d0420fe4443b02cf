"""The module oracle: one trial of any nn.Module trained the plain PyTorch way (the module itself,
autograd, torch AdamW, load_state_dict), one member at a time.

Like tests/oracle.py it draws psa's randomness (initial weights from the seed, data order,
ablated units, dropout masks: psa.core.rng and psa.core.ablation.choose_neurons) and nothing else of
the product. What it ablates is told explicitly by the test (`Units`), not discovered, so the
product's discovery is checked too.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from psa.core import rng
from psa.core.ablation import choose_neurons
from psa.core.arch import Arch
from psa.core.data import Dataset
from psa.core.hparams import HParams
from psa.core.variant import Variant


@dataclass(frozen=True)
class Units:
    """The model's unit layers in order (the last is the output), and what `hidden` mode also
    zeroes: layer -> (consumer module, columns per unit); layer -> BatchNorm zeroed with it."""

    layers: tuple[tuple[str, int], ...]  # (module name, units)
    consumers: dict[str, tuple[str, int]] = field(default_factory=dict)
    norms: dict[str, str] = field(default_factory=dict)


@dataclass
class Result:
    lkg: dict[str, torch.Tensor]
    accs: list[int] = field(default_factory=list)
    promoted: list[bool] = field(default_factory=list)
    # variants: the bounty model and its score, forced acceptances, and the mode of each loop
    bounty: dict[str, torch.Tensor] = field(default_factory=dict)
    lkg_correct: int = -1
    bounty_correct: int = -1
    forced: list[bool] = field(default_factory=list)
    modes: list[str] = field(default_factory=list)


def run(make, units: Units, ds: Dataset, seed: int, mode: str, loops: int, cfg: HParams) -> Result:
    """`loops` meta-loops of one trial of `make`'s module (the paper's engine)."""
    return run_variant(make, units, ds, seed, mode, loops, cfg, Variant())


def run_variant(make, units: Units, ds: Dataset, seed: int, mode: str, loops: int, cfg: HParams,
                variant: Variant) -> Result:
    """`loops` meta-loops of one trial of `make`'s module with an engine variant
    (psa.core.variant), written plainly as tests/oracle.py's run_variant: patience with a bounty
    model apart from the LKG, the AdamW state kept with the LKG (load_state_dict), several or
    fixed units, a mode schedule. The units come from psa.core.ablation.choose_neurons over the
    unit layers' widths (randomness, like the data order); the rest is this loop."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = make()
    dropouts = [m for m in model.modules() if type(m) is nn.Dropout]
    sizes: list[int] = []
    state = {"noise": None}

    def record(mod, inp, out):
        sizes.append(out[0].numel())

    handles = [d.register_forward_hook(record) for d in dropouts]
    model.eval()
    with torch.no_grad():
        model(ds.train_x[:2])
    for h in handles:
        h.remove()
    offsets = [sum(sizes[:i]) for i in range(len(sizes))]

    def masked(i):
        def hook(mod, inp, out):
            if not mod.training:
                return inp[0]
            if state["noise"] is None:
                return inp[0]
            x = inp[0]
            return x * state["noise"][:, offsets[i] : offsets[i] + sizes[i]].reshape(x.shape)
        return hook

    for i, d in enumerate(dropouts):
        d.register_forward_hook(masked(i))
    mods = dict(model.named_modules())
    arch = Arch(tuple((1, u) for _, u in units.layers[:-1]), n_in=1, n_out=units.layers[-1][1])
    lkg = {k: v.clone() for k, v in model.state_dict().items()}
    lkg_correct, bounty_correct = -1, -1
    out = Result(lkg, bounty=lkg)
    lkg_opt = None  # the LKG's AdamW state_dict (optimizer_state = persist)
    streak, allowance = 0, variant.patience
    n = ds.train_x.shape[0]
    for loop in range(1, loops + 1):
        m = variant.mode_at(mode, loop)
        out.modes.append(m)
        wd = cfg.weight_decay if m == "decay" else 0.0
        drop = cfg.dropout if m == "dropout" else 0.0
        model.load_state_dict(lkg)
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=wd)
        if variant.optimizer_state == "persist" and lkg_opt is not None:
            opt.load_state_dict(copy.deepcopy(lkg_opt))
            for g in opt.param_groups:
                g["weight_decay"] = wd  # the mode's, which a schedule may have changed
        ablations = choose_neurons(arch, m, seed, loop, variant, cfg.meta_loops)

        def kill() -> None:
            with torch.no_grad():
                for layer, u in ablations:
                    name, _ = units.layers[layer]
                    rows = [(mods[name].weight, (u,))]
                    if mods[name].bias is not None:
                        rows.append((mods[name].bias, (u,)))
                    if name in units.norms:
                        bn = mods[units.norms[name]]
                        rows += [(bn.weight, (u,)), (bn.bias, (u,))]
                    if m == "hidden" and name in units.consumers:
                        c, block = units.consumers[name]
                        rows.append((mods[c].weight, (slice(None), slice(u * block, (u + 1) * block))))
                    for p, idx in rows:
                        p[idx] = 0.0
                        st = opt.state.get(p)
                        if st:  # the unit's moments die with it
                            st["exp_avg"][idx] = 0.0
                            st["exp_avg_sq"][idx] = 0.0

        kill()
        perm = rng.data_order([seed], loop, n, "cpu")[0]
        model.train()
        for step, s in enumerate(range(0, n, cfg.batch_size)):
            idx = perm[s : s + cfg.batch_size]
            state["noise"] = None
            if drop > 0:
                keys = torch.tensor([rng.loop_keys(seed, "dropout", loop)], dtype=torch.int64)
                ks = rng.step_keys(keys, torch.tensor(step, dtype=torch.int64))
                thr = torch.tensor([rng.dropout_threshold(drop)], dtype=torch.int64)
                scale = torch.ones(1) / (1.0 - torch.tensor([drop], dtype=torch.float32))
                state["noise"] = rng.dropout_noise(rng.position_hash(len(idx), sum(sizes), "cpu"), ks, thr, scale)[0]
            loss = F.cross_entropy(model(ds.train_x[idx]), ds.train_y[idx])
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
        snapshot = {k: v.clone() for k, v in model.state_dict().items()}
        if promote:
            lkg, lkg_correct, streak = snapshot, correct, 0
            lkg_opt = copy.deepcopy(opt.state_dict())
        else:
            streak += 1
        if correct > bounty_correct:
            out.bounty, bounty_correct, allowance = snapshot, correct, variant.patience
        elif forced:
            allowance *= variant.patience_growth
        out.promoted.append(promote)
        out.forced.append(forced)
    out.lkg, out.lkg_correct, out.bounty_correct = lkg, lkg_correct, bounty_correct
    return out
