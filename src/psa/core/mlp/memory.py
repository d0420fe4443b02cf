"""What a member costs in device memory while it trains, by the paths its engine takes."""

from __future__ import annotations

from typing import Any

from psa.core.arch import Arch
from psa.core.device import Execution
from psa.core.model import DEFAULT_MODEL, dropout_units, linear_shapes, param_count

# Share of a device's free memory a population may plan to use; the rest absorbs the
# allocator's fragmentation and what the estimate misses.
FREE_MEMORY_FRACTION = 0.8


def working_bytes(arch: Arch, batch_size: int, triton_stack: bool = False, precision: str = "fp32",
                  graphs: bool = False, model: str = DEFAULT_MODEL) -> int:
    """Device memory one member needs to train, besides its LKG: candidate, gradient and AdamW's
    two moments (16 bytes a parameter) and one step's activations (kept for the backward pass,
    transient layer-sized buffers, dropout noise, the gathered batch).

    `triton_stack` (the Triton stack kernels, in `precision`) adds the backward's weight-gradient
    scratch (stack_scratch_bytes): up to width 32 per-row-block partials, as many copies of the
    middle stack's parameters as a batch has row blocks (16 at widths 17-32, four times the 16
    bytes a parameter counted above); wider, every middle layer's dLoss/dz, the product's
    result and the step's two staged copies of the middle weights (and biases). `graphs`
    adds the graph's private pool, which keeps every temporary of a captured step for as long
    as the graph lives and lends none of it to other engines: the labels, the loss's softmax
    buffers and, on the torch path, the dropout hashes (two int64 a unit); and so the
    evaluation's staged copy of a wide stack's weights comes on top of the step's."""
    if model != DEFAULT_MODEL:  # a ResMLP keeps three activations a step (input, inner, output)
        outs = [o for o, _ in linear_shapes(arch, model)]
        acts = batch_size * (3 * sum(outs) + 3 * max(outs) + arch.n_in) * 4
        total = param_count(arch, model) * 16 + acts
        if graphs:
            total += batch_size * (8 + 2 * 4 * arch.n_out + 16 * dropout_units(arch, model))
        return total
    w = arch.widths
    acts = batch_size * (3 * sum(w[1:]) + 2 * max(w[1:]) + w[0]) * 4
    total = arch.params * 16 + acts
    if triton_stack:
        total += stack_scratch_bytes(arch, batch_size, precision)
    if graphs:
        per_row = 8 + 2 * 4 * arch.n_out + (0 if triton_stack else 16 * sum(arch.hidden))
        total += batch_size * per_row
        if triton_stack:
            total += eval_staged_bytes(arch)
    return total


def eval_staged_bytes(arch: Arch) -> int:
    """Per member, the forward copy of the middle weights (and biases) an evaluation stages
    for the wide stack kernels (triton_stack.stage_weights), 0 for a narrow stack."""
    from psa.core.kernels import triton_stack as kernels

    hidden = arch.hidden
    if len(hidden) < 2 or kernels.triton is None or not kernels.weights_staged(hidden[0]):
        return 0
    return (len(hidden) - 1) * kernels.staged_floats(hidden[0], backward=False) * 4


def stack_scratch_bytes(arch: Arch, batch_size: int, precision: str = "fp32") -> int:
    """Per member, what a training step on the Triton stack kernels allocates for the middle
    layers on a batch of `batch_size` rows, besides the activations: the backward's scratch for
    the weight gradients (psa.core.kernels.triton_stack.stack_backward) and the staged weights.
    Up to width 32: one copy of their parameters per row block, none when one block covers the
    batch (the kernel then writes the gradient directly). Wider: every middle layer's dLoss/dz
    (B x W floats) and the batched product's weight and bias gradients; the middle weights
    staged once for the step, for the forward (with the biases) and transposed for the
    backward, each padded to the kernels' (WP, WP) (triton_stack.stage_weights); and in bf16 on
    a GPU the product's two bf16 operands and its bf16 result."""
    from psa.core.kernels import triton_stack as kernels

    hidden = arch.hidden
    if len(hidden) < 2 or kernels.triton is None:
        return 0
    width, n_mid = hidden[0], len(hidden) - 1
    wp, block_r, _ = kernels.launch_config(width, batch_size, precision, backward=True)
    if kernels.wide_path(wp):
        operands = (2 * batch_size * width + width * width) * 2 if precision == "bf16" else 0
        staged = kernels.staged_floats(width) * 4 if kernels.weights_staged(width) else 0
        return n_mid * (batch_size * width * 4 + width * (width + 1) * 4 + operands + staged)
    n_blocks = -(-batch_size // block_r)
    return 0 if n_blocks == 1 else n_blocks * n_mid * width * (width + 1) * 4


def stack_path_reason(arch: Arch, ex: Execution, model: str = DEFAULT_MODEL) -> str:
    """Why the hidden stack of `arch` takes the plain torch path under `ex`, or "" when the
    Triton stack kernels run it: a SimpleMLP (the kernel computes a plain ReLU stack, no
    residual), Triton on, one width, no wider than ex.stack_max_width (or the kernels' limit)."""
    from psa.core.kernels import triton_stack as kernels

    hidden = arch.hidden
    if model != DEFAULT_MODEL:
        return f"model {model}: the stack kernel runs a SimpleMLP's plain ReLU stack"
    if not ex.triton:
        return "Triton kernels are off"
    if not hidden:
        return "no hidden layer"
    if len(set(hidden)) > 1:
        return (f"hidden layers of unequal widths ({', '.join(map(str, dict.fromkeys(hidden)))}); "
                "the stack kernel runs stacks of one width")
    limit = min(ex.stack_max_width, kernels.MAX_WIDTH)
    if hidden[0] > limit:
        return f"width {hidden[0]} above the stack kernel's limit of {limit} here"
    return ""


def stack_fits_kernel(arch: Arch, ex: Execution, model: str = DEFAULT_MODEL) -> bool:
    """Whether the hidden stack of `arch` runs through the Triton stack kernels under `ex`
    (stack_path_reason says why not)."""
    return not stack_path_reason(arch, ex, model)


def memory_paths(arch: Arch, ex: Execution, model: str = DEFAULT_MODEL) -> dict[str, Any]:
    """The paths an engine for `model` of `arch` under `ex` takes that change its memory, as
    working_bytes' keyword arguments (graphs: if the whole population fits)."""
    return {"triton_stack": stack_fits_kernel(arch, ex, model), "precision": ex.precision, "graphs": ex.graphs,
            "model": model}
