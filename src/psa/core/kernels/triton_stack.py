"""Triton kernels for the hidden stack of narrow MLPs: every hidden layer in one launch.

A population of deep, narrow nets (2048 layers of width 1, 632 of width 4, ...) costs several
torch kernels per layer and direction, so thousands of launches per training step, each doing
almost no work. Here one program owns one member and one block of batch rows and carries its
activations through the whole middle stack in registers: the forward is one launch, the
backward is one launch plus the weight gradients' reduction (narrow stacks) or product (wide).

Parameters live in psa's flat, layer-major buffer (psa.core.mlp.population): for the middle layer l
(1 <= l <= L-1) of member m, weight[o, i] is at w_off + (l-1)*layer_stride + m*W*W + o*W + i
and bias[o] at b_off + (l-1)*layer_stride + m*W + o. Gradients use the same layout.

Dropout masks are the counter-based hashes of psa.core.rng, computed in the kernel with native
uint32 arithmetic, so they equal rng.dropout_noise bit for bit on any device.

Widths up to 32 keep the next layer's weights in registers while a layer computes. From 33 to
128 (padded to 64 or 128) a layer's weights (up to 64 KB) are too big for that: the layer loop
is a tl.range that Triton software-pipelines, copying the next layer's weights into shared
memory while the current one computes, and the tiles are sized so that nothing spills. They
read the weights from a staged copy (stage_weights: padded to 64 or 128, rounded to the
precision, transposed for the backward) made once a step, so that every copy is 16 bytes. Their
backward keeps only the input gradient's product on the serial chain: it writes each layer's
dLoss/dz, and the weight gradients of all layers and members are one batched GEMM afterwards
(at width 115, 60 members and 32-row blocks, per-row-block partials would be 2.9 GB written
and read again per step, for 0.8 GB of dz).

Without a GPU, set TRITON_INTERPRET=1 before importing this module to run the kernels in
Triton's interpreter (the tests do).
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from psa.core.kernels import launch, programs
from psa.core.kernels.launch import MAX_WIDTH, launch_config, stack_settings, wide_path  # noqa: F401 (re-exported)
from psa.core.kernels.launch import _check
from psa.core.kernels.programs import triton
from psa.core.precision import Matmul

# the programs' precision codes: fp32 0, tf32 1, bf16 2, in launch.PRECISIONS' order
_PRECISIONS = {p: code for code, p in enumerate(launch.PRECISIONS)}


def available() -> bool:
    """Whether the kernels can run here: triton importable, and a GPU or the interpreter."""
    if triton is None:
        return False
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


_FOR_LOOPS_OK: bool | None = None


def _for_loops_ok() -> bool:
    """Whether the wide kernels can loop over layers with tl.range (which Triton pipelines).

    Always when compiled. Triton 3.6's interpreter cannot take a kernel argument as a range
    bound under numpy >= 2.4 (later interpreters can), so there the same layer body runs in a
    while loop instead: asked once, by running a tiny kernel.
    """
    global _FOR_LOOPS_OK
    if _FOR_LOOPS_OK is None:
        from triton.runtime.interpreter import InterpretedFunction

        if not isinstance(programs._range_probe_kernel, InterpretedFunction):
            _FOR_LOOPS_OK = True
        else:
            out = torch.zeros(2)
            try:
                programs._range_probe_kernel[(1,)](out, 3)
                _FOR_LOOPS_OK = bool((out == 3).all())
            except Exception:  # the interpreter's error for the bound; any failure means no
                _FOR_LOOPS_OK = False
    return _FOR_LOOPS_OK


def _require_triton() -> None:
    if triton is None:
        raise RuntimeError("psa.core.kernels.triton_stack needs triton (pip install triton); it is not installed")
    if not available():
        raise RuntimeError("psa.core.kernels.triton_stack needs a CUDA GPU, or TRITON_INTERPRET=1 set before import "
                           "to run on the CPU in Triton's interpreter")


@dataclass(frozen=True)
class Launch:
    """One kernel launch as Triton's compiler sees it: the kernel, its grid, and its arguments
    with every tensor replaced by its dtype (what `warmup` takes; Triton specialises on the
    integers' values and the pointers' alignment, which psa's buffers always have)."""

    kernel: Any
    grid: tuple[int, ...]
    args: tuple[Any, ...]
    kwargs: tuple[tuple[str, Any], ...]


_RECORD: list[Launch] | None = None


@contextlib.contextmanager
def recording() -> Iterator[list[Launch]]:
    """Within, the kernels record their launches in the yielded list instead of making them:
    nothing is computed or written. Run a step on the meta device under it to learn what to
    precompile()."""
    global _RECORD
    outer, _RECORD = _RECORD, []
    try:
        yield _RECORD
    finally:
        _RECORD = outer


def _launch(kernel: Any, grid: tuple[int, ...], *args: Any, **kwargs: Any) -> bool:
    """Launch `kernel` on the CUDA device of its tensors (Triton launches on the current device's
    stream), or record it under recording(); True if it ran."""
    if _RECORD is not None:
        _RECORD.append(Launch(kernel, tuple(grid), tuple(a.dtype if isinstance(a, torch.Tensor) else a for a in args),
                              tuple(sorted(kwargs.items()))))
        return False
    dev = next(a.device for a in args if isinstance(a, torch.Tensor))
    with torch.cuda.device(dev) if dev.type == "cuda" else contextlib.nullcontext():
        kernel[grid](*args, **kwargs)
    return True


def precompile(launches: Iterable[Launch], device: torch.device | None = None, workers: int | None = None) -> int:
    """Compile the distinct `launches` for CUDA `device` (the current one by default) before they
    are made, in `workers` threads where this Triton compiles asynchronously, so that a study
    does not compile kernel after kernel while the GPU waits. Triton's caches keep the results,
    its on-disk cache (TRITON_CACHE_DIR, default ~/.triton/cache) for later processes too. A
    launch that fails to compile is skipped: the real launch fails again, where the engine
    falls back. Returns the number of distinct launches (compiled or found in the cache).
    Under Triton's interpreter nothing is compiled."""
    _require_triton()
    todo = list(dict.fromkeys(launches))
    if not todo:
        return 0
    try:
        from triton.runtime._async_compile import AsyncCompileMode
    except ImportError:  # an older Triton: one after another
        AsyncCompileMode = None  # noqa: N806
    dev = device if device is not None else (torch.device("cuda", torch.cuda.current_device())
                                             if torch.cuda.is_available() else torch.device("cpu"))
    workers = workers or min(len(todo), os.cpu_count() or 4)
    with torch.cuda.device(dev) if dev.type == "cuda" else contextlib.nullcontext():
        if AsyncCompileMode is not None and workers > 1:
            with ThreadPoolExecutor(workers) as pool, AsyncCompileMode(pool, ignore_errors=True):
                for lc in todo:
                    _warm(lc)
        else:
            for lc in todo:
                _warm(lc)
    return len(todo)


def _warm(lc: Launch) -> None:
    try:
        lc.kernel.warmup(*lc.args, grid=lc.grid, **dict(lc.kwargs))
    except Exception:  # noqa: BLE001 - see precompile: the real launch reports it
        pass


def _check_tensor(name: str, t: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype,
                  device: torch.device, contiguous: bool = False) -> None:
    _check(isinstance(t, torch.Tensor), f"{name} must be a tensor, got {type(t).__name__}")
    _check(tuple(t.shape) == tuple(shape), f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    _check(t.dtype == dtype, f"{name} must be {dtype}, got {t.dtype}")
    _check(t.device == device, f"{name} must be on {device}, got {t.device}")
    if contiguous:
        _check(t.is_contiguous(), f"{name} must be contiguous")


def _check_stack(flat: torch.Tensor, w_off: int, b_off: int, layer_stride: int, n_layers: int,
                 width: int, members: int, device: torch.device, name: str = "flat") -> None:
    _check(isinstance(n_layers, int) and n_layers >= 1, f"n_layers must be an int >= 1, got {n_layers!r}")
    _check(isinstance(width, int) and 1 <= width <= MAX_WIDTH,
           f"width must be an int in [1, {MAX_WIDTH}], got {width!r}")
    _check(isinstance(flat, torch.Tensor) and flat.dim() == 1 and flat.dtype == torch.float32,
           f"{name} must be a 1-d float32 tensor")
    _check(flat.device == device, f"{name} must be on {device}, got {flat.device}")
    _check(flat.is_contiguous(), f"{name} must be contiguous")
    if n_layers == 1:
        return  # no middle layer: the buffer is never touched
    _check(min(w_off, b_off) >= 0 and layer_stride >= 0, "w_off, b_off and layer_stride must be >= 0")
    last = n_layers - 2
    _check(w_off + last * layer_stride + members * width * width <= flat.numel()
           and b_off + last * layer_stride + members * width <= flat.numel(),
           f"the {n_layers - 1} middle layers (w_off={w_off}, b_off={b_off}, "
           f"layer_stride={layer_stride}) run past the end of {name} ({flat.numel()} elements)")


def _check_drop(drop: tuple[torch.Tensor, torch.Tensor, torch.Tensor], members: int,
                device: torch.device) -> None:
    _check(isinstance(drop, tuple) and len(drop) == 3, "drop must be a tuple (ks, thr, sc)")
    ks, thr, sc = drop
    _check_tensor("drop ks", ks, (members,), torch.int64, device, contiguous=True)
    _check_tensor("drop thr", thr, (members,), torch.int64, device, contiguous=True)
    _check_tensor("drop sc", sc, (members,), torch.float32, device, contiguous=True)


def _precision_code(precision: str) -> int:
    _check(precision in _PRECISIONS, f"precision must be one of {sorted(_PRECISIONS)}, got {precision!r}")
    # every width: narrow stacks gain no speed from rounding, but the torch path and the CPU
    # emulation round, and a precision label must mean the same arithmetic on every path
    return _PRECISIONS[precision]


def weights_staged(width: int) -> bool:
    """Whether the kernels read the middle weights of a stack of `width` from a staged copy
    (stage_weights): the wide ones (wide_path), in every precision. Read from the flat buffer,
    a wide program's weight loads were 4-byte copies wherever W is not a multiple of 4 (115,
    91, 71 and 35 of the paper's deep squares) and in every backward (its product's operand is
    W untransposed, which the tensor cores take K-contiguous), and rounded in the kernel, every
    row block's program rounded the same (W, W) tile again each layer, on the serial chain and
    in registers (at width 128 in tf32 on sm_90 with Triton 3.6: 255 registers and 60-68 bytes
    spilled a thread). Staged: 16-byte copies in both directions, no mask, nothing to round
    (bench/results/kernel-registers-sm90.md). The forward's biases are staged with its weights."""
    return wide_path(launch.next_power_of_2(width))


@dataclass(frozen=True)
class StagedWeights:
    """A wide stack's middle weights as its kernels read them (stage_weights): each member's
    (W, W) weights per middle layer rounded to `precision` and padded with zeros to (WP, WP),
    (L-1, M, WP, WP) float32; `forward` holds W, `backward` W transposed (None: not made), and
    `bias` the biases, as they are, padded to (L-1, M, WP) (made with `forward`)."""

    forward: torch.Tensor | None
    backward: torch.Tensor | None
    precision: str
    bias: torch.Tensor | None = None


def staged_floats(width: int, forward: bool = True, backward: bool = True) -> int:
    """Floats stage_weights allocates per member and middle layer of a wide stack of `width`:
    the forward's (WP, WP) tile and (WP,) biases, the backward's (WP, WP) tile."""
    wp = launch.next_power_of_2(width)
    return (wp * wp + wp if forward else 0) + (wp * wp if backward else 0)


def stage_weights(flat: torch.Tensor, w_off: int, b_off: int, layer_stride: int, n_layers: int, width: int,
                  members: int, precision: str, forward: bool = True,
                  backward: bool = True) -> StagedWeights | None:
    """The middle layers' weights of `members` staged for the wide kernels (weights_staged), in
    one launch for the directions asked: rounded to `precision` as their products round operands
    and padded to the kernels' width; with the forward's, the biases. None where the kernels
    read `flat` itself (a narrow stack) or there is no middle layer. Layout and arguments as for
    stack_forward. The training step stages both directions once for its forward and backward;
    an evaluation the forward."""
    _require_triton()
    prec = _precision_code(precision)  # checks the name
    _check_stack(flat, w_off, b_off, layer_stride, n_layers, width, members, flat.device)
    if n_layers < 2 or not weights_staged(width):
        return None
    wp = launch.next_power_of_2(width)
    shape = (n_layers - 1, members, wp, wp)
    fwd = torch.empty(shape, dtype=torch.float32, device=flat.device) if forward else None
    bias = torch.empty(shape[:3], dtype=torch.float32, device=flat.device) if forward else None
    bwd = torch.empty(shape, dtype=torch.float32, device=flat.device) if backward else None
    some = fwd if fwd is not None else bwd
    if members and some is not None:
        block_o = min(wp, 32)  # a (32, WP) tile a program: at most 16 KB in flight
        _launch(programs._stage_kernel, ((n_layers - 1) * members, wp // block_o), flat, w_off, b_off,
                layer_stride, some if fwd is None else fwd, some if bias is None else bias,
                some if bwd is None else bwd, members,
                W=width, WP=wp, BLOCK_O=block_o, PREC=prec, FWD=fwd is not None, BWD=bwd is not None, num_warps=4)
    return StagedWeights(fwd, bwd, precision, bias)


def _weights_operand(weights: StagedWeights | None, flat: torch.Tensor, w_off: int, b_off: int, layer_stride: int,
                     n_layers: int, width: int, members: int, precision: str,
                     backward: bool) -> tuple[torch.Tensor, int, int, torch.Tensor, int]:
    """(buffer, offset, layer stride) a direction's kernel reads the middle weights from, and
    (buffer, layer stride) of the forward's biases: the staged copies where due (`weights`, or
    staged here), else `flat` itself (biases from offset 0: the narrow kernels read b_off of flat)."""
    if n_layers < 2 or not weights_staged(width):
        return flat, w_off, layer_stride, flat, layer_stride
    if weights is None:
        weights = stage_weights(flat, w_off, b_off, layer_stride, n_layers, width, members, precision,
                                forward=not backward, backward=backward)
        assert weights is not None
    _check(isinstance(weights, StagedWeights), "weights must be stage_weights()'s StagedWeights")
    _check(weights.precision == precision,
           f"weights were staged for {weights.precision}, the kernels run in {precision}")
    tiles = weights.backward if backward else weights.forward
    _check(tiles is not None, f"weights were staged without their {'backward' if backward else 'forward'} copy")
    assert tiles is not None
    wp = launch.next_power_of_2(width)
    _check_tensor("weights", tiles, (n_layers - 1, members, wp, wp), torch.float32, flat.device, contiguous=True)
    if backward:
        return tiles, 0, members * wp * wp, tiles, 0
    _check(weights.bias is not None, "weights were staged without the forward's biases")
    assert weights.bias is not None
    _check_tensor("bias", weights.bias, (n_layers - 1, members, wp), torch.float32, flat.device, contiguous=True)
    return tiles, 0, members * wp * wp, weights.bias, members * wp


def stack_forward(z0: torch.Tensor, flat: torch.Tensor, w_off: int, b_off: int, layer_stride: int,
                  n_layers: int, width: int, acts: torch.Tensor | None = None,
                  out: torch.Tensor | None = None,
                  drop: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                  precision: str = "fp32", weights: StagedWeights | None = None) -> torch.Tensor:
    """Run the hidden stack a_0 = drop(relu(z0)), a_l = drop(relu(W_l a_{l-1} + b_l)) in one launch.

    z0 (M, B, W) float32, any strides: hidden layer 0's pre-activation. Training: `acts`, a
    contiguous (L, M, B, W) float32 tensor, receives every a_l and acts[L-1] is returned;
    `drop` is None or (ks, thr, sc), each (M,): per-step key and threshold (int64 holding
    uint32) and scale (float32), as rng.dropout_noise takes them (thr=0, sc=1 for members
    without dropout). Eval: acts is None and only a_{L-1} is written, to `out` (contiguous
    (M, B, W), allocated if None), which is returned; drop must then be None.
    precision ("fp32", "tf32", "bf16") of the layer products: above width 16 tl.dot's (tensor
    cores on a GPU), up to 16 operands rounded as psa.core.precision rounds them. `weights`:
    stage_weights() of these layers (its forward copy), staged here when due and not given
    (the training step stages them once for its forward and backward).
    """
    _require_triton()
    _check(isinstance(z0, torch.Tensor) and z0.dim() == 3 and z0.dtype == torch.float32,
           "z0 must be a 3-d (M, B, W) float32 tensor")
    members, rows, w = z0.shape
    device = z0.device
    _check_stack(flat, w_off, b_off, layer_stride, n_layers, width, members, device)
    _check(w == width, f"z0 has width {w}, expected {width}")
    prec = _precision_code(precision)
    if acts is not None:
        _check_tensor("acts", acts, (n_layers, members, rows, width), torch.float32, device, contiguous=True)
        _check(out is None, "pass acts (training) or out (eval), not both")
        target, store_all = acts, True
    else:
        _check(drop is None, "dropout needs the training path: pass acts")
        if out is None:
            out = torch.empty(members, rows, width, dtype=torch.float32, device=device)
        _check_tensor("out", out, (members, rows, width), torch.float32, device, contiguous=True)
        target, store_all = out, False
    if drop is not None:
        _check_drop(drop, members, device)
        ks, thr, sc = drop
    else:
        ks = thr = sc = z0  # never read
    if members == 0 or rows == 0:
        return target[n_layers - 1] if store_all else target

    wp, block_r, num_warps = launch_config(width, rows, precision)
    wide = wide_path(wp)
    wr, wr_off, wr_stride, br, br_stride = _weights_operand(weights, flat, w_off, b_off, layer_stride, n_layers,
                                                            width, members, precision, backward=False)
    grid = (members, triton.cdiv(rows, block_r))
    _launch(
        programs._stack_fwd_kernel, grid,
        z0, z0.stride(0), z0.stride(1), z0.stride(2),
        flat, w_off, b_off, layer_stride, wr, wr_off, wr_stride, br, br_stride,
        target, members * rows * width,
        ks, thr, sc,
        rows, n_layers, n_layers * width,
        W=width, WP=wp, BLOCK_R=block_r,
        HAS_DROP=drop is not None, STORE_ALL=store_all, PREC=prec, DOT=wp >= launch.DOT_MIN_WIDTH,
        WIDE=wide, FOR_LOOP=wide and _for_loops_ok(), STAGES=launch.wide_stages(),
        num_warps=num_warps,
    )
    return target[n_layers - 1] if store_all else target


def stack_backward(da: torch.Tensor, acts: torch.Tensor, flat: torch.Tensor, grad: torch.Tensor,
                   w_off: int, b_off: int, layer_stride: int, n_layers: int, width: int,
                   dz0: torch.Tensor | None = None, scale: torch.Tensor | None = None,
                   precision: str = "fp32", weights: StagedWeights | None = None) -> torch.Tensor:
    """Backpropagate da = dLoss/da_{L-1} (M, B, W) through the hidden stack; return dz0.

    acts is stack_forward's (L, M, B, W) output and scale the (M,) float32 dropout scale (None:
    no dropout, 1.0). The middle layers' weight and bias gradients are written over `grad` (same
    layout as `flat`); nothing else of `grad` is touched. dz0 = dLoss/dz0, the gradient at
    hidden layer 0's pre-activation, goes to `dz0` (contiguous (M, B, W), allocated if None).
    Deterministic: no atomics. Up to width 32 the kernel computes the weight gradients per row
    block and torch sums the partials in a fixed order; from 33 on it writes every middle
    layer's dLoss/dz (as big as `acts` less one layer) and the weight gradients are one batched
    product in `precision` after it. `weights`: as for stack_forward (its backward copy).
    """
    _require_triton()
    _check(isinstance(da, torch.Tensor) and da.dim() == 3 and da.dtype == torch.float32,
           "da must be a 3-d (M, B, W) float32 tensor")
    members, rows, w = da.shape
    device = da.device
    _check(w == width, f"da has width {w}, expected {width}")
    _check_stack(flat, w_off, b_off, layer_stride, n_layers, width, members, device)
    _check_stack(grad, w_off, b_off, layer_stride, n_layers, width, members, device, name="grad")
    _check(grad.numel() == flat.numel(), "grad must have the same layout (size) as flat")
    _check_tensor("acts", acts, (n_layers, members, rows, width), torch.float32, device, contiguous=True)
    if scale is not None:
        _check_tensor("scale", scale, (members,), torch.float32, device, contiguous=True)
    if dz0 is None:
        dz0 = torch.empty(members, rows, width, dtype=torch.float32, device=device)
    _check_tensor("dz0", dz0, (members, rows, width), torch.float32, device, contiguous=True)
    prec = _precision_code(precision)
    n_mid = n_layers - 1
    if members == 0 or rows == 0:
        if n_mid:
            _write_grad(grad, torch.zeros(n_mid, members * width * (width + 1), device=device),
                        w_off, b_off, layer_stride, members, width)
        return dz0

    wp, block_r, num_warps = launch_config(width, rows, precision, backward=True)
    wide = wide_path(wp)
    n_blocks = triton.cdiv(rows, block_r)
    if wide:
        # the kernel writes dLoss/dz of every middle layer (laid out like acts); the weight
        # gradients are then one batched product over layers and members (_wide_weight_grads)
        part = torch.empty(n_mid, members, rows, width, dtype=torch.float32, device=device) if n_mid else da
        p_w, p_b, p_layer, p_block = 0, 0, 0, 0
    else:
        # partials straight into grad when one row block covers the batch (no reduction);
        # otherwise into scratch laid out like the middle stack, one copy per row block
        direct = n_mid == 0 or n_blocks == 1
        if direct:
            part, p_w, p_b, p_layer, p_block = grad, w_off, b_off, layer_stride, 0
        else:
            mid_stride = members * width * (width + 1)
            part = torch.empty(n_blocks, n_mid, mid_stride, dtype=torch.float32, device=device)
            p_w, p_b, p_layer, p_block = 0, members * width * width, mid_stride, n_mid * mid_stride
    # the kernel reads only weights from flat: give it the staged transposed copy where due
    wr, wr_off, wr_stride, _, _ = _weights_operand(weights, flat, w_off, b_off, layer_stride, n_layers, width,
                                                   members, precision, backward=True)
    ran = _launch(
        programs._stack_bwd_kernel, (members, n_blocks),
        da, da.stride(0), da.stride(1), da.stride(2),
        acts, members * rows * width,
        wr, wr_off, wr_stride,
        part, p_w, p_b, p_layer, p_block,
        dz0, scale if scale is not None else da,
        rows, n_layers,
        W=width, WP=wp, BLOCK_R=block_r,
        HAS_SCALE=scale is not None, PREC=prec, DOT=wp >= launch.DOT_MIN_WIDTH,
        WIDE=wide, FOR_LOOP=wide and _for_loops_ok(), STAGES=launch.wide_stages(),
        num_warps=num_warps,
    )
    if ran and wide and n_mid:
        _wide_weight_grads(grad, part, acts, w_off, b_off, layer_stride, precision)
    elif ran and not wide and not direct:
        _write_grad(grad, part, w_off, b_off, layer_stride, members, width)
    return dz0


def _wide_weight_grads(grad: torch.Tensor, dz: torch.Tensor, acts: torch.Tensor, w_off: int, b_off: int,
                       layer_stride: int, precision: str) -> None:
    """The middle layers' weight and bias gradients from the wide backward's dz (L-1, M, B, W):
    dW_l = dz_l^T @ a_{l-1} for every layer and member in one batched product (in `precision`,
    as psa.core.precision.Matmul computes the engine's other products), db_l = dz_l summed over
    rows; written over `grad`."""
    n_mid, members, rows, width = dz.shape
    mm = _matmul(precision, dz.device)
    with mm.context():
        gw = mm.bmm(dz.view(n_mid * members, rows, width).transpose(1, 2),
                    acts[:n_mid].view(n_mid * members, rows, width))
    gb = dz.sum(dim=2)
    n_w = members * width * width
    grad.as_strided((n_mid, n_w), (layer_stride, 1), w_off).copy_(gw.view(n_mid, n_w))
    grad.as_strided((n_mid, members * width), (layer_stride, 1), b_off).copy_(gb.view(n_mid, members * width))


@functools.lru_cache(maxsize=None)
def _matmul(precision: str, device: torch.device) -> Matmul:
    """One Matmul per precision and device: made once, not every step (in bf16 on a GPU, making
    one runs a probe product, which has no place in a captured step)."""
    return Matmul(precision, device)


def _write_grad(grad: torch.Tensor, part: torch.Tensor, w_off: int, b_off: int, layer_stride: int,
                members: int, width: int) -> None:
    """Sum (n_blocks, L-1, M*W*(W+1)) partials (or take (L-1, M*W*(W+1)) sums) into grad."""
    n_mid, mid_stride = part.shape[-2], part.shape[-1]
    n_w = members * width * width
    if b_off == w_off + n_w and layer_stride == mid_stride:
        # the usual packed layout: the whole middle stack is one contiguous slice of grad
        dst = grad[w_off:w_off + n_mid * mid_stride].view(n_mid, mid_stride)
        if part.dim() == 3:
            torch.sum(part, dim=0, out=dst)
        else:
            dst.copy_(part)
        return
    red = part.sum(dim=0) if part.dim() == 3 else part
    grad.as_strided((n_mid, n_w), (layer_stride, 1), w_off).copy_(red[:, :n_w])
    grad.as_strided((n_mid, mid_stride - n_w), (layer_stride, 1), b_off).copy_(red[:, n_w:])


def dropout_noise(rows: int, units: int, ks: torch.Tensor, thr: torch.Tensor,
                  sc: torch.Tensor) -> torch.Tensor:
    """(D, rows, units) float32 dropout multipliers (0 or sc[d]) in one launch.

    Bit for bit rng.dropout_noise(rng.position_hash(rows, units, device), ks, thr, sc):
    ks and thr (D,) int64 holding uint32 words, sc (D,) float32, all on one device.
    """
    _require_triton()
    _check(isinstance(ks, torch.Tensor) and ks.dim() == 1, "ks must be a 1-d tensor")
    _check(rows >= 0 and units >= 0, f"rows and units must be >= 0, got {rows}, {units}")
    n_members = ks.numel()
    _check_drop((ks, thr, sc), n_members, ks.device)
    out = torch.empty(n_members, rows, units, dtype=torch.float32, device=ks.device)
    n = rows * units
    if n == 0 or n_members == 0:
        return out
    block = 1024
    _launch(programs._dropout_noise_kernel, (triton.cdiv(n, block), n_members), out, ks, thr, sc, n, BLOCK=block,
            num_warps=4)
    return out
