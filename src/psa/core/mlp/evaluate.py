"""Scoring a population: every member's correct predictions on a set of images, on the paths
its engine chose for training (psa.core.mlp.step.Paths)."""

from __future__ import annotations

import torch

from psa.core import ops
from psa.core.kernels import cpu_stack
from psa.core.mlp.population import Layout
from psa.core.mlp.step import Paths


@torch.no_grad()
def count_correct(paths: Paths, flat: torch.Tensor, x_all: torch.Tensor, y_all: torch.Tensor, layout: Layout,
                  eval_bytes: int) -> torch.Tensor:
    """Correct predictions (M,) of every member's weights in `flat` (of `layout`) on (x_all,
    y_all), the activations of one block within `eval_bytes`.

    Every member sees the same images, so a block of members runs its first layer as one GEMM
    against all their first-layer weights. Blocks are as many rows and members as the
    activation budget allows, rows first: tall GEMMs run faster than wide ones.
    """
    mm = paths.mm
    views = layout.views(flat)
    m = layout.size_m
    n = x_all.shape[0]
    arch = paths.arch
    budget = max(1, eval_bytes // 8)  # floats: two live activations of 4 bytes
    widest = max(arch.widths[1:])
    rows = max(1, min(n, budget // widest))
    block = max(1, min(m, budget // (rows * widest)))
    correct = torch.zeros(m, dtype=torch.int64, device=flat.device)
    o0 = views[0][0].shape[1]
    depth = arch.depth
    for m0 in range(0, m, block):
        m1 = min(m, m0 + block)
        w0 = views[0][0][m0:m1].reshape((m1 - m0) * o0, -1)
        b0 = views[0][1][m0:m1].reshape(1, -1)
        staged = None
        if depth and paths.triton_stack and paths.res_steps is None:
            from psa.core.kernels import triton_stack

            geometry = paths.stack_geometry(layout.blocks, layout.size_m, m0)
            # once for every block of rows (None where the kernels read the weights from flat)
            staged = triton_stack.stage_weights(flat, *geometry, depth, arch.hidden[0], m1 - m0, paths.precision,
                                                backward=False)
        for c0 in range(0, n, rows):
            x = x_all[c0 : c0 + rows]
            z = mm.addmm(b0, x, w0.t()).view(x.shape[0], m1 - m0, o0).transpose(0, 1)
            if paths.res_steps is not None:
                z = res_logits(paths, views, z, x, m0, m1)
            elif depth and paths.triton_stack:
                h = triton_stack.stack_forward(z, flat, *geometry, depth, arch.hidden[0], precision=paths.precision,
                                               weights=staged)
                w, bias = views[depth]
                z = ops.linear(h, w[m0:m1], bias[m0:m1], mm)
            elif depth and paths.cpu_step:  # the fused CPU evaluation: stack, head and argmax in one call
                correct[m0:m1] += cpu_stack.count_correct(z, flat, layout, m0, y_all[c0 : c0 + rows])
                continue
            else:
                for w, bias in views[1:]:
                    z = ops.linear(torch.relu(z), w[m0:m1], bias[m0:m1], mm)
            correct[m0:m1] += (z.argmax(dim=2) == y_all[c0 : c0 + rows]).sum(dim=1)
    return correct


@torch.no_grad()
def res_logits(paths: Paths, views: list[tuple[torch.Tensor, torch.Tensor]], z0: torch.Tensor, x: torch.Tensor,
               m0: int, m1: int) -> torch.Tensor:
    """Logits (members m0..m1, rows, n_out) of a ResMLP whose first Linear gave z0; x (rows,
    n_in) is the input (the skip of a first block as wide as the input)."""
    mm = paths.mm
    steps = paths.res_steps
    assert steps is not None

    def linear(layer: int, h: torch.Tensor) -> torch.Tensor:
        if layer == 0:
            return z0
        w, bias = views[layer]
        return ops.linear(h, w[m0:m1], bias[m0:m1], mm)

    h = x
    for st in steps:
        a = torch.relu(linear(st.first, h))
        h = a if st.kind == "proj" else torch.relu(linear(st.first + 1, a) + h)
    return linear(len(views) - 1, h)
