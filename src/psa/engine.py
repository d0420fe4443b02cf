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


def dropout_generators(seeds: list[int], loop: int, device: torch.device) -> list[torch.Generator]:
    """One generator per dropout member for one loop, seeded from (seed, loop) alone, so that a
    member's masks never depend on which other members share its population."""
    return [torch.Generator(device).manual_seed(derive_seed(s, "dropout", loop)) for s in seeds]


def dropout_noise(gens: list[torch.Generator], rows: int, units: int, p: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """F.dropout's multiplier (0 or 1/(1-p)) for every hidden unit of one step, (D, rows, units).

    One draw per member covers all hidden layers of the step (layer l takes its slice of the
    units), so deep nets cost one random call per member, not one per layer.
    """
    dev = p.device
    u = torch.stack([torch.rand((rows, units), generator=g, device=dev) for g in gens])
    return (u >= p).to(torch.float32) * scale


def new_adamw(param: torch.Tensor, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over the flat buffer, fused where this torch and device have it.

    The fused kernel makes one pass over parameters, gradients and moments instead of a dozen
    (10x faster on a 60-member 1*2048 population on the CPU); it rounds differently from the
    reference loop by about 1e-7 relative, far below what the oracle tests allow.
    """
    kw = dict(lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=0.0)
    try:
        return torch.optim.AdamW([param], fused=True, **kw)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW([param], **kw)


class Engine:
    """Runs meta-loops on a Population with a Dataset already on the population's device."""

    def __init__(self, population: Population, data: Dataset, config: TrainConfig) -> None:
        if data.train_x.device != population.lkg.device:
            raise ConfigError(f"data on {data.train_x.device} but population on {population.lkg.device}")
        self.pop = population
        self.data = data
        self.cfg = config
        self.cand = torch.empty_like(population.lkg)
        self.grad = torch.empty_like(population.lkg)
        self.cand_views = population.layout.views(self.cand)
        self.grad_views = population.layout.views(self.grad)
        self._workspace: dict[tuple[object, tuple[int, ...]], torch.Tensor] = {}

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
        """Rows, rates, scales and generators of the members that train with dropout."""
        rows = [j for j, m in enumerate(self.pop.members) if m.dropout > 0]
        if not rows or self.pop.arch.depth == 0:
            return None
        dev = self.pop.device
        p = torch.tensor([self.pop.members[j].dropout for j in rows], dtype=torch.float32)
        # F.dropout's scale: 1 / (1 - p) evaluated in float32
        scale = torch.ones(len(rows), dtype=torch.float32) / (1.0 - p)
        hidden = self.pop.arch.hidden
        return {
            "rows": torch.tensor(rows, dtype=torch.int64, device=dev),
            "p": p.view(-1, 1, 1).to(dev),
            "scale": scale.view(-1, 1, 1).to(dev),
            "gens": dropout_generators([self.pop.members[j].seed for j in rows], loop, dev),
            "offsets": [sum(hidden[:i]) for i in range(len(hidden) + 1)],
        }

    # ---------------------------------------------------------------- one training step
    def _buf(self, name: object, shape: tuple[int, ...]) -> torch.Tensor:
        """A reusable workspace tensor: large activations are written in place step after step
        instead of being allocated (and page-faulted in) anew."""
        key = (name, shape)
        t = self._workspace.get(key)
        if t is None:
            t = self._workspace[key] = torch.empty(shape, dtype=torch.float32, device=self.pop.device)
        return t

    def _forward_backward(self, x: torch.Tensor, y: torch.Tensor, plan: dict | None) -> torch.Tensor:
        """Gradients of every member's mean cross-entropy into self.grad; returns the losses (M,).

        x: (G, b, n_in) one batch per batch group; y: (M, b) labels per member.
        """
        m = self.pop.size
        g, b = x.shape[0], x.shape[1]
        k = m // g
        views, gviews = self.cand_views, self.grad_views
        n_lin = len(views)

        # forward: hs[l] holds layer l's pre-activation, then (in place) its activation
        w0, b0 = views[0]
        o0 = w0.shape[1]
        first = (m, b, o0) if n_lin > 1 else None
        if k > 1:
            zg = torch.baddbmm(b0.view(g, 1, k * o0), x, w0.view(g, k * o0, -1).transpose(1, 2),
                               out=self._buf("z0g", (g, b, k * o0)))
            z = self._buf(("h", 0), (m, b, o0)) if first else torch.empty(m, b, o0, device=x.device)
            z.view(g, k, b, o0).copy_(zg.view(g, b, k, o0).transpose(1, 2))
        else:
            out = self._buf(("h", 0), first) if first else None
            z = torch.baddbmm(b0.unsqueeze(1), x, w0.transpose(1, 2), out=out)
        hs = []
        noise = None
        if plan is not None:
            noise = dropout_noise(plan["gens"], b, plan["offsets"][-1], plan["p"], plan["scale"])
        for layer in range(1, n_lin):
            h = z.relu_()
            if noise is not None:
                self._apply_dropout(h, layer - 1, noise, plan)
            hs.append(h)
            w, bias = views[layer]
            out = self._buf(("h", layer), (m, b, w.shape[1])) if layer < n_lin - 1 else None
            z = torch.baddbmm(bias.unsqueeze(1), h, w.transpose(1, 2), out=out)

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
            dh = torch.bmm(dz, w, out=self._buf(("dh", layer % 2), (m, b, w.shape[2])))
            # ReLU's backward in place: gradient 0 where the unit is off (at 0 too, as PyTorch)
            dz = torch.ops.aten.threshold_backward.grad_input(dh, h, 0, grad_input=dh)
            if plan is not None:
                rows = plan["rows"]
                dz.index_copy_(0, rows, dz.index_select(0, rows) * plan["scale"])
        gw0, gb0 = gviews[0]
        if k > 1:
            dzg = self._buf("dz0g", (g, b, k * o0))
            dzg.view(g, b, k, o0).copy_(dz.view(g, k, b, o0).transpose(1, 2))
            torch.bmm(dzg.transpose(1, 2), x, out=gw0.view(g, k * o0, -1))
        else:
            torch.bmm(dz.transpose(1, 2), x, out=gw0)
        torch.sum(dz, dim=1, out=gb0)
        return loss

    @staticmethod
    def _apply_dropout(h: torch.Tensor, hidden_layer: int, noise: torch.Tensor, plan: dict) -> None:
        """Inverted dropout on the dropout members' rows of h (M, b, width), in place."""
        rows, off = plan["rows"], plan["offsets"]
        h.index_copy_(0, rows, h.index_select(0, rows) * noise[:, :, off[hidden_layer] : off[hidden_layer + 1]])

    # ---------------------------------------------------------------- epoch, evaluation, loop
    @property
    def groups(self) -> tuple[int, int]:
        """(G, k): G batch groups of k consecutive members that train on one gathered batch.

        Members of one seed share their data order, so gathering the batch once per seed and
        running the first layer as one matmul per seed saves memory traffic, at the price of
        reordering the first layer's output. When that output is wider than half the input
        the reordering costs more than the gathers it saves, and every member gathers its own.
        """
        g, k = self.pop.groups()
        if k > 1 and 2 * self.pop.arch.widths[1] < self.pop.arch.n_in:
            return g, k
        return self.pop.size, 1

    def _data_order(self, loop: int) -> torch.Tensor:
        """(G, N) the permutation of the training set of each batch group, drawn on the CPU."""
        n = self.data.train_x.shape[0]
        g, k = self.groups
        seeds = [self.pop.members[j * k].seed for j in range(g)]
        perms = {
            s: torch.randperm(n, generator=torch.Generator().manual_seed(derive_seed(s, "order", loop)))
            for s in dict.fromkeys(seeds)
        }
        return torch.stack([perms[s] for s in seeds]).to(self.pop.device)

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
        opt = new_adamw(self.cand, cfg)
        loss_sum = torch.zeros(m, dtype=torch.float32, device=self.pop.device)
        bad = torch.zeros(m, dtype=torch.bool, device=self.pop.device)
        for step in range(n_steps):
            idx = order[:, step * bs : (step + 1) * bs]
            b = idx.shape[1]
            flat_idx = idx.reshape(-1)
            x = torch.index_select(data.train_x, 0, flat_idx, out=self._buf("x", (g * b, data.train_x.shape[1])))
            x = x.view(g, b, -1)
            y = data.train_y.index_select(0, flat_idx).view(g, 1, b).expand(g, k, b).reshape(m, b)
            loss = self._forward_backward(x, y, plan)
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
        """Correct predictions (M,) of every member's weights in `flat` on (x_all, y_all).

        Every member sees the same images, so a block of members runs its first layer as one
        GEMM against all their first-layer weights. Blocks are as many rows and members as the
        activation budget allows, rows first: tall GEMMs run faster than wide ones.
        """
        views = self.pop.layout.views(flat)
        m = self.pop.size
        n = x_all.shape[0]
        budget = max(1, self.cfg.eval_chunk_bytes // 8)  # floats: two live activations of 4 bytes
        widest = max(self.pop.arch.widths[1:])
        rows = max(1, min(n, budget // widest))
        block = max(1, min(m, budget // (rows * widest)))
        correct = torch.zeros(m, dtype=torch.int64, device=flat.device)
        o0 = views[0][0].shape[1]
        for m0 in range(0, m, block):
            m1 = min(m, m0 + block)
            w0 = views[0][0][m0:m1].reshape((m1 - m0) * o0, -1)
            b0 = views[0][1][m0:m1].reshape(1, -1)
            for c0 in range(0, n, rows):
                x = x_all[c0 : c0 + rows]
                z = torch.addmm(b0, x, w0.t()).view(x.shape[0], m1 - m0, o0).transpose(0, 1)
                for w, bias in views[1:]:
                    z = torch.baddbmm(bias[m0:m1].unsqueeze(1), torch.relu(z), w[m0:m1].transpose(1, 2))
                correct[m0:m1] += (z.argmax(dim=2) == y_all[c0 : c0 + rows]).sum(dim=1)
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
