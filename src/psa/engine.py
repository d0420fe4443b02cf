"""The Frustration Engine on a population: every member's meta-loop, in lockstep.

One meta-loop (NOTES.md): clone the LKG into a candidate, ablate one neuron in the ablative
modes (never in loop 1), train one epoch with a fresh AdamW, and promote the candidate iff its
validation accuracy strictly beats the LKG's. All members do this at once: one batched matmul
per layer per step, the forward and backward written out by hand (no autograd graph), AdamW
on the one flat parameter buffer, no host synchronisation inside an epoch.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .ablation import ablate, choose_neuron
from .data import Dataset
from .population import ConfigError, Population, derive_seed

StepCallback = Callable[[int, int], None]

_MASK32 = 0xFFFFFFFF


@dataclass(frozen=True)
class TrainConfig:
    """Hyperparameters shared by all members (Table VI); per-mode rates live on each Member."""

    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    batch_size: int = 256
    weight_decay: float = 1e-4  # the rate `decay` mode trains with
    dropout: float = 0.1  # the rate `dropout` mode trains with
    eval_chunk_bytes: int = 256 << 20  # activation memory allowed for a validation chunk

    def __post_init__(self) -> None:
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"learning rate must be a positive number, got {self.lr}")
        if self.batch_size < 1:
            raise ConfigError(f"batch size must be at least 1, got {self.batch_size}")
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"betas must lie in [0, 1), got {self.betas}")
        if not (self.eps > 0):
            raise ConfigError(f"eps must be positive, got {self.eps}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ConfigError(f"weight decay must be a number >= 0, got {self.weight_decay}")
        if not (0.0 <= self.dropout < 1.0):
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")


@dataclass(frozen=True)
class LoopResult:
    """What one meta-loop did to every member (tuples in population order)."""

    loop: int
    candidate_acc: tuple[float, ...]  # validation accuracy (%), NaN for a diverged candidate
    promoted: tuple[bool, ...]
    ablated: tuple[tuple[int, int] | None, ...]  # (Linear layer, neuron) or None
    lkg_score: tuple[float, ...]  # after this loop's promotion decision
    train_loss: tuple[float, ...]  # mean training loss over the epoch
    diverged: tuple[bool, ...]  # a non-finite loss occurred during the epoch
    seconds: float


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mixer on int64 tensors holding values in [0, 2^32).

    Products stay below 2^59, so no int64 overflow on any backend.
    """
    x = ((x >> 16) ^ x) * 0x45D9F3B & _MASK32
    x = ((x >> 16) ^ x) * 0x45D9F3B & _MASK32
    return (x >> 16) ^ x


def dropout_uniform(key_lo: torch.Tensor, key_hi: torch.Tensor, counter: torch.Tensor) -> torch.Tensor:
    """Uniform [0, 1) float32 numbers, a pure function of per-member keys and element counters.

    Counter-based so that a member's dropout masks depend only on its own seed, loop, layer,
    step and position: never on which other members share the population.
    """
    x = _hash32((counter & _MASK32) ^ key_lo)
    x = _hash32(x ^ key_hi)
    return (x >> 8).to(torch.float32) * (1.0 / (1 << 24))


def dropout_keys(seed: int, loop: int, layer: int) -> tuple[int, int]:
    """The two 32-bit keys of one member's dropout stream for one hidden layer in one loop."""
    k = derive_seed(seed, "dropout", loop, layer)
    return k & _MASK32, (k >> 32) & _MASK32


class Engine:
    """Runs meta-loops on a Population with a Dataset already on the population's device."""

    def __init__(self, population: Population, data: Dataset, config: TrainConfig) -> None:
        if data.device != population.device:
            raise ConfigError(f"data on {data.device} but population on {population.device}")
        self.pop = population
        self.data = data
        self.cfg = config
        self.cand = torch.empty_like(population.lkg)
        self.grad = torch.empty_like(population.lkg)
        self.cand_views = population.layout.views(self.cand)
        self.grad_views = population.layout.views(self.grad)
        self._counters: dict[tuple[int, int], torch.Tensor] = {}

    # ---------------------------------------------------------------- members' settings
    def _decay_factors(self) -> torch.Tensor | None:
        """AdamW's decoupled decay factor (1 - lr*wd) per parameter, or None if all are 1.

        Computed in float32 exactly as torch.optim.AdamW's `param.mul_(1 - lr * wd)` does;
        with the paper's lr = wd = 1e-4 it rounds to 1.0 in float32, i.e. a no-op.
        """
        f = torch.tensor([1.0 - self.cfg.lr * m.weight_decay for m in self.pop.members], dtype=torch.float32)
        if bool((f == 1.0).all()):
            return None
        f = f.to(self.pop.device)
        m = self.pop.size
        parts = [f.view(m, 1).expand(m, blk.shape[1]).reshape(-1) for blk in self.pop.layout.member_blocks(self.cand)]
        return torch.cat(parts)

    def _dropout_plan(self, loop: int) -> dict | None:
        """Rows, rates, scales and per-layer keys of the members that train with dropout."""
        rows = [j for j, m in enumerate(self.pop.members) if m.dropout > 0]
        if not rows or self.pop.arch.depth == 0:
            return None
        dev = self.pop.device
        p = torch.tensor([self.pop.members[j].dropout for j in rows], dtype=torch.float32)
        # F.dropout's scale: 1 / (1 - p) evaluated in float32
        scale = torch.ones(len(rows), dtype=torch.float32) / (1.0 - p)
        keys = [[dropout_keys(self.pop.members[j].seed, loop, layer) for j in rows]
                for layer in range(self.pop.arch.depth)]
        k = torch.tensor(keys, dtype=torch.int64)  # (layers, D, 2)
        return {
            "rows": torch.tensor(rows, dtype=torch.int64, device=dev),
            "p": p.view(-1, 1, 1).to(dev),
            "scale": scale.view(-1, 1, 1).to(dev),
            "key_lo": k[..., 0].view(len(keys), len(rows), 1, 1).to(dev),
            "key_hi": k[..., 1].view(len(keys), len(rows), 1, 1).to(dev),
        }

    def _counter(self, rows: int, width: int) -> torch.Tensor:
        key = (rows, width)
        if key not in self._counters:
            self._counters[key] = torch.arange(rows * width, dtype=torch.int64, device=self.pop.device).view(1, rows, width)
        return self._counters[key]

    # ---------------------------------------------------------------- one training step
    def _forward_backward(self, x: torch.Tensor, y: torch.Tensor, step: int, plan: dict | None) -> torch.Tensor:
        """Gradients of every member's mean cross-entropy into self.grad; returns the losses (M,).

        x: (G, b, n_in) one batch per seed group; y: (M, b) labels per member.
        """
        g, k = self.groups
        m = self.pop.size
        b = x.shape[1]
        views, gviews = self.cand_views, self.grad_views
        n_lin = len(views)

        w0, b0 = views[0]
        o0 = w0.shape[1]
        z = torch.baddbmm(b0.view(g, 1, k * o0), x, w0.view(g, k * o0, -1).transpose(1, 2))
        if k > 1:
            z = z.view(g, b, k, o0).transpose(1, 2).reshape(m, b, o0)
        hs = []
        for layer in range(1, n_lin):
            h = torch.relu(z)
            if plan is not None:
                self._apply_dropout(h, layer - 1, step, plan)
            hs.append(h)
            w, bias = views[layer]
            z = torch.baddbmm(bias.unsqueeze(1), h, w.transpose(1, 2))

        # mean cross-entropy and its gradient (softmax - onehot) / b, per member
        y3 = y.unsqueeze(2)
        lse = torch.logsumexp(z, dim=2, keepdim=True)
        loss = (lse - z.gather(2, y3)).mean(dim=(1, 2))
        dz = torch.exp(z - lse)
        dz.scatter_add_(2, y3, torch.full_like(y3, -1, dtype=dz.dtype))
        dz.mul_(1.0 / b)

        for layer in range(n_lin - 1, 0, -1):
            h = hs[layer - 1]
            w, _ = views[layer]
            gw, gb = gviews[layer]
            torch.bmm(dz.transpose(1, 2), h, out=gw)
            torch.sum(dz, dim=1, out=gb)
            dh = torch.bmm(dz, w)
            dz = torch.ops.aten.threshold_backward(dh, h, 0)  # ReLU': 0 at 0, as PyTorch
            if plan is not None:
                rows = plan["rows"]
                dz.index_copy_(0, rows, dz.index_select(0, rows) * plan["scale"])
        gw0, gb0 = gviews[0]
        dzg = dz.view(g, k, b, o0).transpose(1, 2).reshape(g, b, k * o0) if k > 1 else dz
        torch.bmm(dzg.transpose(1, 2), x, out=gw0.view(g, k * o0, -1))
        torch.sum(dz, dim=1, out=gb0)
        return loss

    def _apply_dropout(self, h: torch.Tensor, hidden_layer: int, step: int, plan: dict) -> None:
        """Inverted dropout on the dropout members' rows of h (M, b, width), in place."""
        rows = plan["rows"]
        b, width = h.shape[1], h.shape[2]
        counter = self._counter(b, width) + step * self.cfg.batch_size * width
        u = dropout_uniform(plan["key_lo"][hidden_layer], plan["key_hi"][hidden_layer], counter)
        noise = (u >= plan["p"]).to(h.dtype) * plan["scale"]
        h.index_copy_(0, rows, h.index_select(0, rows) * noise)

    # ---------------------------------------------------------------- epoch, evaluation, loop
    @property
    def groups(self) -> tuple[int, int]:
        """(G, k) of the population (see Population.groups)."""
        return self.pop.groups()

    def _data_order(self, loop: int) -> torch.Tensor:
        """(G, N) one permutation of the training set per seed group, drawn on the CPU."""
        n = self.data.train_x.shape[0]
        perms = [
            torch.randperm(n, generator=torch.Generator().manual_seed(derive_seed(s, "order", loop)))
            for s in self.pop.group_seeds()
        ]
        return torch.stack(perms).to(self.pop.device)

    @torch.no_grad()
    def train_epoch(self, loop: int, on_step: StepCallback | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One epoch of every candidate; returns (mean loss (M,), diverged (M,)) on the device."""
        cfg, data = self.cfg, self.data
        g, k = self.groups
        m = self.pop.size
        n = data.train_x.shape[0]
        bs = cfg.batch_size
        n_steps = -(-n // bs)
        order = self._data_order(loop)
        decay = self._decay_factors()
        plan = self._dropout_plan(loop)
        self.cand.grad = self.grad
        # A fresh optimizer every meta-loop (paper II.E); decay is applied separately per member.
        opt = torch.optim.AdamW([self.cand], lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=0.0)
        loss_sum = torch.zeros(m, dtype=torch.float32, device=self.pop.device)
        bad = torch.zeros(m, dtype=torch.bool, device=self.pop.device)
        for step in range(n_steps):
            idx = order[:, step * bs : (step + 1) * bs]
            b = idx.shape[1]
            flat_idx = idx.reshape(-1)
            x = data.train_x.index_select(0, flat_idx).view(g, b, -1)
            y = data.train_y.index_select(0, flat_idx).view(g, 1, b).expand(g, k, b).reshape(m, b)
            loss = self._forward_backward(x, y, step, plan)
            loss_sum += loss
            bad |= ~torch.isfinite(loss)
            if decay is not None:
                self.cand.mul_(decay)
            opt.step()
            if on_step is not None:
                on_step(step + 1, n_steps)
        self.cand.grad = None
        return loss_sum / n_steps, bad

    @torch.no_grad()
    def count_correct(self, flat: torch.Tensor, x_all: torch.Tensor, y_all: torch.Tensor) -> torch.Tensor:
        """Correct predictions (M,) of every member's weights in `flat` on (x_all, y_all)."""
        views = self.pop.layout.views(flat)
        m = self.pop.size
        widest = max(self.pop.arch.widths[1:])
        n = x_all.shape[0]
        chunk = max(1, min(n, self.cfg.eval_chunk_bytes // (8 * m * widest)))
        correct = torch.zeros(m, dtype=torch.int64, device=flat.device)
        w0, b0 = views[0]
        o0 = w0.shape[1]
        for c0 in range(0, n, chunk):
            x = x_all[c0 : c0 + chunk]
            rows = x.shape[0]
            # every member sees the same images: one GEMM against all first layers at once
            z = torch.addmm(b0.reshape(1, -1), x, w0.reshape(m * o0, -1).t())
            z = z.view(rows, m, o0).transpose(0, 1)
            for w, bias in views[1:]:
                z = torch.baddbmm(bias.unsqueeze(1), torch.relu(z), w.transpose(1, 2))
            correct += (z.argmax(dim=2) == y_all[c0 : c0 + chunk]).sum(dim=1)
        return correct

    def meta_loop(self, on_step: StepCallback | None = None) -> LoopResult:
        """One meta-loop for every member; the population's LKG state moves forward by one loop."""
        t0 = time.perf_counter()
        pop = self.pop
        loop = pop.loop + 1
        with torch.no_grad():
            self.cand.copy_(pop.lkg)
            ablated = tuple(choose_neuron(pop.arch, mem.mode, mem.seed, loop) for mem in pop.members)
            for j, (mem, a) in enumerate(zip(pop.members, ablated)):
                if a is not None:
                    ablate(self.cand_views, j, mem.mode, *a)
        mean_loss, bad = self.train_epoch(loop, on_step)
        correct = self.count_correct(self.cand, self.data.val_x, self.data.val_y)
        promote = ~bad & (correct > pop.lkg_correct)
        pop.lkg_correct = torch.where(promote, correct, pop.lkg_correct)
        # the one host synchronisation of the loop
        promoted = promote.tolist()
        rows = [j for j, p in enumerate(promoted) if p]
        if rows:
            idx = torch.tensor(rows, dtype=torch.int64, device=pop.device)
            with torch.no_grad():
                for lkg_blk, cand_blk in zip(pop.layout.member_blocks(pop.lkg), pop.layout.member_blocks(self.cand)):
                    lkg_blk.index_copy_(0, idx, cand_blk.index_select(0, idx))
        for j in rows:
            pop.bounty_loop[j] = loop
        pop.loop = loop
        diverged = bad.tolist()
        acc = [float("nan") if d else 100.0 * c / pop.n_val for c, d in zip(correct.tolist(), diverged)]
        return LoopResult(
            loop=loop,
            candidate_acc=tuple(acc),
            promoted=tuple(promoted),
            ablated=ablated,
            lkg_score=tuple(pop.lkg_score()),
            train_loss=tuple(mean_loss.tolist()),
            diverged=tuple(diverged),
            seconds=time.perf_counter() - t0,
        )

    def test_accuracy(self) -> list[float]:
        """Test-set accuracy (%) of every member's LKG."""
        correct = self.count_correct(self.pop.lkg, self.data.test_x, self.data.test_y)
        return [100.0 * c / self.data.test_y.numel() for c in correct.tolist()]
