"""The module oracle: one trial of any nn.Module trained the plain PyTorch way (the module itself,
autograd, torch AdamW, load_state_dict), one member at a time.

Like tests/oracle.py it draws psa's randomness (initial weights from the seed, data order,
ablated unit, dropout masks: psa.core.rng and psa.core.ablation.choose_unit) and nothing else of
the product. What it ablates is told explicitly by the test (`Units`), not discovered, so the
product's discovery is checked too.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from psa.core import rng
from psa.core.ablation import choose_unit
from psa.core.data import Dataset
from psa.core.hparams import HParams


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


def run(make, units: Units, ds: Dataset, seed: int, mode: str, loops: int, cfg: HParams) -> Result:
    """`loops` meta-loops of one trial of `make`'s module."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = make()
    wd = cfg.weight_decay if mode == "decay" else 0.0
    drop = cfg.dropout if mode == "dropout" else 0.0
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
    hidden = [u for _, u in units.layers[:-1]]
    n_out = units.layers[-1][1]
    lkg = {k: v.clone() for k, v in model.state_dict().items()}
    best = -1
    out = Result(lkg)
    n = ds.train_x.shape[0]
    for loop in range(1, loops + 1):
        model.load_state_dict(lkg)
        a = choose_unit(hidden, n_out, mode, seed, loop)
        if a is not None:
            name, _ = units.layers[a[0]]
            u = a[1]
            with torch.no_grad():
                mods[name].weight[u].zero_()
                if mods[name].bias is not None:
                    mods[name].bias[u].zero_()
                if name in units.norms:
                    bn = mods[units.norms[name]]
                    bn.weight[u] = 0.0
                    bn.bias[u] = 0.0
                if mode == "hidden" and name in units.consumers:
                    c, block = units.consumers[name]
                    mods[c].weight[:, u * block : (u + 1) * block].zero_()
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=wd)
        perm = rng.data_order([seed], loop, n, "cpu")[0]
        model.train()
        finite = True
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
            finite = finite and bool(torch.isfinite(loss))
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            correct = int((model(ds.val_x).argmax(1) == ds.val_y).sum())
        out.accs.append(correct)
        out.promoted.append(finite and correct > best)
        if finite and correct > best:
            best = correct
            lkg = {k: v.clone() for k, v in model.state_dict().items()}
    out.lkg = lkg
    return out
