"""One training step of a chunk of a population: gather the batch, forward, backward, weight
decay, AdamW and the step counter, every member at once.

The forward and backward are written out by hand on the population's stacked weights (no
autograd graph): one batched matmul per layer, the first layer one matmul per seed group
(members of one seed share the batch). A SimpleMLP's hidden stack of one width runs, where
the engine chose them (Paths), through the Triton stack kernels (psa.core.kernels.triton_stack)
or, on a CPU, the whole step through the fused CPU step (psa.core.kernels.cpu_stack); a ResMLP
runs the same pieces with a residual forward and backward. The step reads everything from
device tensors that keep their address (data order, step counter, dropout keys, AdamW state),
so a CUDA graph can capture it once and replay it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from psa.core import ops, rng
from psa.core.kernels import cpu_stack
from psa.core.arch import Arch
from psa.core.data import Dataset
from psa.core.hparams import HParams
from psa.core.mlp.chunk import Chunk
from psa.core.model import ResStep, dropout_units
from psa.core.optim import adamw_step
from psa.core.precision import Matmul


@dataclass(frozen=True)
class Paths:
    """How an engine computes its population's steps and evaluations, decided once by the
    engine (psa.core.mlp.engine): the same population computes the same way throughout."""

    arch: Arch
    model: str
    mm: Matmul  # every matrix product, in the execution's precision
    triton: bool  # Triton kernels for the dropout noise (and the stack, where triton_stack)
    triton_stack: bool  # the hidden stack through the Triton stack kernels
    cpu_step: bool  # the whole step (and the evaluation's stack) through the fused CPU step
    res_steps: tuple[ResStep, ...] | None  # a ResMLP's projections and blocks; None for a SimpleMLP

    @property
    def precision(self) -> str:
        """The matrix products' precision."""
        return self.mm.precision

    def stack_geometry(self, layout_blocks: tuple[tuple[int, int, int, int], ...], size_m: int,
                       m0: int = 0) -> tuple[int, int, int]:
        """(w_off, b_off, layer_stride) of the middle stack (Linear layers 1..L-1) of members m0..
        in a flat buffer of `layout_blocks` for `size_m` members, as the stack kernels address it."""
        w = self.arch.hidden[0]
        if len(layout_blocks) < 3:
            return 0, 0, 0  # one hidden layer: no middle stack, the kernel reads no weights
        w0, b0, _, _ = layout_blocks[1]
        return w0 + m0 * w * w, b0 + m0 * w, size_m * w * (w + 1)


@dataclass
class TrainStep:
    """The training step of a population's chunks under `paths`: `step(ch, b)` trains chunk
    `ch` on its next batch of `b` images."""

    paths: Paths
    hp: HParams
    data: Dataset
    # 8-bit images (MNIST's) as codes for the fused CPU step: a quarter of the bytes per batch
    # row, where a narrow net's step is bound by reading the rows from memory
    cpu_codes: Any = None
    _pos_hash: dict[int, torch.Tensor] = field(default_factory=dict)

    def __call__(self, ch: Chunk, b: int) -> None:
        """One training step of chunk `ch` on a batch of `b` images: gather, forward, backward,
        decay, AdamW, counter. Reads its inputs from device tensors only (graph-capturable)."""
        data, p = self.data, self.paths
        g, k = ch.groups
        if p.cpu_step:  # the gather, forward and backward in one call
            drop = (ch.drop_keys, ch.drop_thr, ch.drop_scale) if ch.dropout else None
            loss = cpu_stack.train_step(ch.layout, ch.cand, ch.grad, data.train_x, data.train_y, ch.order, ch.step,
                                        self.hp.batch_size, b, k, drop, ch.buf("loss", (ch.size,)), self.cpu_codes)
        else:
            pos = ch.step * self.hp.batch_size + ch.arange[:b]
            flat_idx = ch.order.index_select(1, pos).reshape(-1)
            x = torch.index_select(data.train_x, 0, flat_idx, out=ch.buf("x", (g * b, data.train_x.shape[1])))
            x = x.view(g, b, -1)
            y = data.train_y.index_select(0, flat_idx).view(g, 1, b).expand(g, k, b).reshape(ch.size, b)
            loss = self.forward_backward(ch, x, y)
        ch.loss_sum += loss
        ch.diverged |= ~torch.isfinite(loss)
        if ch.decay is not None:
            f = ch.decay.view(1, -1, 1)
            for w, bias in ch.cand_runs:
                w.mul_(f)
                bias.mul_(f)
        assert ch.adamw is not None
        adamw_step(ch.adamw)
        ch.step += 1

    def forward_backward(self, ch: Chunk, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Gradients of every member's mean cross-entropy into ch.grad; returns the losses (C,).

        x: (G, b, n_in) one batch per batch group; y: (C, b) labels per member.
        """
        if self.paths.res_steps is not None:
            return self._res_forward_backward(ch, x, y)
        mm = self.paths.mm
        m, b = ch.size, x.shape[1]
        views, gviews = ch.views, ch.grad_views
        depth = len(views) - 1
        buf = ch.buf
        width = self.paths.arch.hidden[0] if depth else 0
        z = first_linear(mm, ch, x)

        # hidden stack: z becomes the logits; hs (or acts) keeps what the backward needs
        keys = rng.step_keys(ch.drop_keys, ch.step) if ch.dropout else None
        hs: list[torch.Tensor] = []
        acts = noise = staged = None
        if depth and self.paths.triton_stack:
            from psa.core.kernels import triton_stack

            acts = buf("acts", (depth, m, b, width))
            drop = (keys, ch.drop_thr, ch.drop_scale) if ch.dropout else None
            geometry = self._geometry(ch)
            # once for both directions (None where the kernels read the weights from ch.cand)
            staged = triton_stack.stage_weights(ch.cand, *geometry, depth, width, m, self.paths.precision)
            triton_stack.stack_forward(z, ch.cand, *geometry, depth, width, acts=acts, drop=drop,
                                       precision=self.paths.precision, weights=staged)
            hs = [acts[depth - 1]]
            w, bias = views[depth]
            z = ops.linear(hs[0], w, bias, mm, out=buf(("z", depth), (m, b, w.shape[1])))
        elif depth:
            if ch.dropout:
                noise = self.noise(ch, keys, b)
            off = 0
            for layer in range(1, depth + 1):
                h = z.relu_()
                off = drop_(ch, h, noise, off)
                hs.append(h)
                w, bias = views[layer]
                z = ops.linear(h, w, bias, mm, out=buf(("z", layer), (m, b, w.shape[1])))

        loss, lse = ops.cross_entropy(z, y)
        dz = ops.cross_entropy_grad(z, y, lse)

        if depth and self.paths.triton_stack:
            # the head as a plain layer, then the middle stack in one fused call
            from psa.core.kernels import triton_stack

            w, _ = views[depth]
            gw, gb = gviews[depth]
            ops.linear_grads(dz, hs[0], mm, gw, gb)
            dh = ops.linear_input_grad(dz, w, mm, out=buf(("dh", 0), (m, b, w.shape[2])))
            dz = triton_stack.stack_backward(dh, acts, ch.cand, ch.grad, *geometry, depth, width,
                                             dz0=buf("dz0", (m, b, width)),
                                             scale=ch.drop_scale if ch.dropout else None,
                                             precision=self.paths.precision, weights=staged)
        else:
            for layer in range(depth, 0, -1):
                h = hs[layer - 1]
                w, _ = views[layer]
                gw, gb = gviews[layer]
                ops.linear_grads(dz, h, mm, gw, gb)
                dh = ops.linear_input_grad(dz, w, mm, out=buf(("dh", layer % 2), (m, b, w.shape[2])))
                dz = ops.relu_grad_(dh, h)
                if noise is not None:
                    drop_grad_(ch, dz, ch.drop_scale)
        first_linear_grad(mm, ch, x, dz)
        return loss

    def _geometry(self, ch: Chunk) -> tuple[int, int, int]:
        return self.paths.stack_geometry(ch.layout.blocks, ch.layout.size_m)

    def noise(self, ch: Chunk, keys: torch.Tensor, b: int, block: bool = False) -> torch.Tensor:
        """(D, b, units) dropout multipliers of the dropout members for this step (`block`: at
        the rates of a ResMLP's blocks; a unit's hash is the same, only the threshold differs)."""
        units = dropout_units(self.paths.arch, self.paths.model)
        thr, sc = (ch.block_thr, ch.block_scale) if block else (ch.drop_thr, ch.drop_scale)
        if ch.drop_rows_all:
            ks = keys
        else:
            ks = keys.index_select(0, ch.drop_rows)
            thr = thr.index_select(0, ch.drop_rows)
            sc = sc.index_select(0, ch.drop_rows)
        if self.paths.triton:
            from psa.core.kernels import triton_stack

            return triton_stack.dropout_noise(b, units, ks, thr, sc)
        t = self._pos_hash.get(units)
        if t is None:
            t = self._pos_hash[units] = rng.position_hash(self.hp.batch_size, units, ch.cand.device)
        return rng.dropout_noise(t[:b], ks, thr, sc)

    def _res_forward_backward(self, ch: Chunk, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """forward_backward for a ResMLP: projections ReLU(Linear(h)) with the mode's dropout,
        blocks ReLU(h + fc2(dropout(ReLU(fc1(h))))), a Linear head.

        The backward keeps each step's input, its inner activation and its output: ReLU's
        gradient after the sum is 0 exactly where the output is 0 (output = ReLU(sum)), and the
        block's input gradient is the skip's (that gradient itself) plus the branch's.
        """
        mm, buf = self.paths.mm, ch.buf
        views, gviews = ch.views, ch.grad_views
        b = x.shape[1]
        steps = self.paths.res_steps
        assert steps is not None
        noise = block_noise = None
        if ch.dropout:
            keys = rng.step_keys(ch.drop_keys, ch.step)
            noise = self.noise(ch, keys, b)
            block_noise = self.noise(ch, keys, b, block=True) if ch.block_noise else noise

        def linear(layer: int, h: torch.Tensor | None, name: object) -> torch.Tensor:
            if layer == 0:
                return first_linear(mm, ch, x)
            w, bias = views[layer]
            return ops.linear(h, w, bias, mm, out=buf(name, (ch.size, b, w.shape[1])))

        # The input of the first step is x itself only when it is a block (the first stack is
        # as wide as the input): batch_groups then gathers per member, so x is (C, b, n_in).
        h: torch.Tensor | None = x if x.shape[0] == ch.size else None
        saved: list[tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]] = []  # (input, inner, output)
        off = 0
        for i, st in enumerate(steps):
            a = linear(st.first, h, ("a", i)).relu_()
            off = drop_(ch, a, noise if st.kind == "proj" else block_noise, off)
            if st.kind == "proj":
                saved.append((h, a, a))
                h = a
            else:
                assert h is not None
                out = linear(st.first + 1, a, ("s", i)).add_(h).relu_()
                saved.append((h, a, out))
                h = out
        head = len(views) - 1
        z = linear(head, h, "logits")
        loss, lse = ops.cross_entropy(z, y)
        dz = ops.cross_entropy_grad(z, y, lse)

        flip = 0

        def grads(layer: int, d: torch.Tensor, inp: torch.Tensor, dinp: torch.Tensor | None) -> torch.Tensor:
            """Weight and bias gradients of Linear `layer` from its output gradient `d`; returns
            the gradient of its input (added to `dinp` if given) in a fresh buffer."""
            nonlocal flip
            w, _ = views[layer]
            gw, gb = gviews[layer]
            ops.linear_grads(d, inp, mm, gw, gb)
            flip += 1
            return ops.linear_input_grad(d, w, mm, out=buf(("dh", flip % 3), (ch.size, b, w.shape[2])), add=dinp)

        if head == 0:  # no hidden layer: logistic regression
            first_linear_grad(mm, ch, x, dz)
            return loss
        dh = grads(head, dz, h, None)
        for i in range(len(steps) - 1, -1, -1):
            st = steps[i]
            inp, a, out = saved[i]
            if st.kind == "block":
                ds = ops.relu_grad_(dh, out)
                da = grads(st.first + 1, ds, a, None)
            else:
                ds, da = None, dh
            da = ops.relu_grad_(da, a)
            if noise is not None:
                drop_grad_(ch, da, ch.drop_scale if st.kind == "proj" else ch.block_scale)
            if st.first == 0:
                first_linear_grad(mm, ch, x, da)
                break
            assert inp is not None
            dh = grads(st.first, da, inp, ds)
        return loss


def first_linear(mm: Matmul, ch: Chunk, x: torch.Tensor) -> torch.Tensor:
    """(C, b, o0): the first Linear of every member of `ch`, one matmul per batch group (its k
    members' weights side by side), the output reordered member-major."""
    buf = ch.buf
    g, b = x.shape[0], x.shape[1]
    k = ch.size // g
    w0, b0 = ch.views[0]
    o0 = w0.shape[1]
    if k > 1:
        zg = mm.baddbmm(b0.view(g, 1, k * o0), x, w0.view(g, k * o0, -1).transpose(1, 2),
                        out=buf("z0g", (g, b, k * o0)))
        z = buf(("z", 0), (ch.size, b, o0))
        z.view(g, k, b, o0).copy_(zg.view(g, b, k, o0).transpose(1, 2))
        return z
    return ops.linear(x, w0, b0, mm, out=buf(("z", 0), (ch.size, b, o0)))


def first_linear_grad(mm: Matmul, ch: Chunk, x: torch.Tensor, dz: torch.Tensor) -> None:
    """The first Linear's weight and bias gradients of every member of `ch` from dz (C, b, o0)."""
    g, b = x.shape[0], x.shape[1]
    k = ch.size // g
    gw0, gb0 = ch.grad_views[0]
    o0 = gw0.shape[1]
    if k > 1:
        dzg = ch.buf("dz0g", (g, b, k * o0))
        dzg.view(g, b, k, o0).copy_(dz.view(g, k, b, o0).transpose(1, 2))
        mm.bmm(dzg.transpose(1, 2), x, out=gw0.view(g, k * o0, -1))
        torch.sum(dz, dim=1, out=gb0)
    else:
        ops.linear_grads(dz, x, mm, gw0, gb0)


def drop_(ch: Chunk, h: torch.Tensor, noise: torch.Tensor | None, off: int) -> int:
    """Multiply `h` (C, b, width) in place by its slice of `noise` from unit `off` (the dropout
    members' rows only); the next layer's offset."""
    width = h.shape[2]
    if noise is None:
        return off + width
    sl = noise[:, :, off : off + width]
    if ch.drop_rows_all:
        h.mul_(sl)
    else:
        h.index_copy_(0, ch.drop_rows, h.index_select(0, ch.drop_rows) * sl)
    return off + width


def drop_grad_(ch: Chunk, dz: torch.Tensor, scale: torch.Tensor) -> None:
    """Dropout's backward after ReLU's (the dropped units are already 0): times 1 / (1 - p)."""
    sc = scale.view(-1, 1, 1)
    if ch.drop_rows_all:
        dz.mul_(sc)
    else:
        rows = ch.drop_rows
        dz.index_copy_(0, rows, dz.index_select(0, rows) * sc.index_select(0, rows))

