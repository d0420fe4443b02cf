"""Launch settings of the Triton stack kernels (psa.core.kernels.triton_stack): the padded
width, rows per program, warps and pipeline depth of every launch, chosen in one place so that
they can be checked without a card (bench/kernel_registers.py) and timed on one
(bench/stack_sweep.py, through stack_settings). Needs no Triton.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

MAX_WIDTH: int = 128
PRECISIONS = ("fp32", "tf32", "bf16")

# Padded widths from this on use tl.dot (which needs every dimension >= 16) with the asked
# precision; narrower ones use broadcast multiply-adds, where a (rows, W, W) product tile is
# cheap. Those round their operands in tf32 and bf16 exactly as psa.core.precision does, so that a
# precision means one arithmetic on every path (the products of rounded operands are exact in
# fp32). At a padded width of 16 the broadcast form is not safe: Triton's compiler rewrites
# sum(x[:, :, None] * y[None, :, :]) into a dot of its default (tf32) precision, which the
# interpreter never does (what it did to fp32 stacks on a card: docs/gpu.md), so 16 takes the
# explicit dot.
DOT_MIN_WIDTH = 16
# Rows per program: at most 512 / Wpad (the (rows, W) activation tiles) and 2048 / Wpad**2
# (the (rows, W, W) product tiles), so that both directions compile for sm_90 at 4 warps with
# no spills (the registers ptxas reported: docs/gpu.md#launch-configurations).
_ROW_BUDGET = 512
_TILE_BUDGET = 2048
# Padded widths from here on stream their weights through shared memory (triton_stack's doc).
_WIDE_MIN_WIDTH = 64
# Wide path: (rows per program, num_warps) by padded width and precision, for the forward and
# for the backward. Every program re-reads each layer's weight tile (16 KB at 64, 64 KB at 128,
# fp32) from L2 for its own rows, so each weight fetched serves `rows` multiply-adds: larger row
# blocks reuse the tile better (at 16 rows a 128-wide layer moves 0.25 byte per multiply-add).
# Each entry is the most rows, up to 64, that compile for sm_90 without spills (8 warps to
# spread the (W, W) operands; shared memory <= 208 KB; what ptxas reports for each, with Triton
# 3.6: bench/kernel_registers.py, docs/gpu.md#launch-configurations). The fp32 ("ieee") dot runs
# on FMA units and holds whole K-slices of its operands in registers: it gets fewer rows, and
# its backward at width 128 stays at 16 (32 reaches 255 registers and spills 20-24 bytes). tf32
# and bf16 are one kernel (weights staged and rounded beforehand, activations in registers), so
# they share their entries. Untimed: bench/stack_sweep.py times the alternatives on a card.
_WIDE_CONFIG = {
    (64, "fp32"): ((64, 8), (32, 8)),
    (64, "tf32"): ((64, 8), (64, 8)),
    (64, "bf16"): ((64, 8), (64, 8)),
    (128, "fp32"): ((32, 8), (16, 8)),
    (128, "tf32"): ((32, 8), (32, 8)),
    (128, "bf16"): ((32, 8), (32, 8)),
}
# Pipeline depth of the wide layer loop: 3 stages = 2 shared-memory buffers per streamed tile, so
# the next layer's weights load during the whole current layer (2 x 64 KB at width 128, fp32).
_WIDE_STAGES = 3


def _check(ok: bool, msg: str) -> None:
    if not ok:
        raise ValueError(msg)


def next_power_of_2(n: int) -> int:
    """The least power of two >= n (n >= 1), as triton.next_power_of_2."""
    return 1 << (n - 1).bit_length()


def wide_stages() -> int:
    """The wide layer loops' pipeline depth now (_WIDE_STAGES, or stack_settings' within it)."""
    return _WIDE_STAGES


def wide_path(padded_width: int) -> bool:
    """Whether a stack of this padded width (launch_config's first value) takes the wide path:
    weights staged beforehand (triton_stack.weights_staged) and streamed through shared memory,
    and the weight gradients one batched product after the backward (triton_stack.stack_backward)."""
    return padded_width >= _WIDE_MIN_WIDTH


def launch_config(width: int, rows: int, precision: str = "fp32",
                  backward: bool = False) -> tuple[int, int, int]:
    """(padded width, rows per program, num_warps) for a stack of `width` on `rows` rows.

    The one place the launch heuristics live, so they can be tuned on the target GPU. Each
    layer is a serial step whatever the tile, so rows per program only trade registers (and
    occupancy) against programs re-reading the same weights; the budgets keep a program small.
    `backward` picks the backward kernel's setting, which differs for widths above 32. `width`
    must be at most MAX_WIDTH and `precision` one of fp32, tf32 and bf16 (the launchers check
    both). Within stack_settings, its setting instead.
    """
    wp = next_power_of_2(width)
    want = max(16, next_power_of_2(rows))
    tried = _SETTINGS.get((wp, precision), (None, None))[backward]
    if wide_path(wp):
        block_r, num_warps = tried or _WIDE_CONFIG[wp, precision][backward]
        # fewer rows for a small batch, but not below 32 where the table has more: only 2 block
        # sizes per setting need compiling (and checking)
        return wp, max(min(block_r, want), min(block_r, 32)), num_warps
    if tried is not None:
        return wp, max(16, min(tried[0], want)), tried[1]
    if wp > DOT_MIN_WIDTH:
        # tl.dot's minimum of 16 rows; the fp32 ("ieee") dot runs on FMA units and needs twice
        # the threads to stay clear of spills
        return wp, 16, 8 if precision == "fp32" else 4
    block_r = min(want, max(16, min(_ROW_BUDGET // wp, _TILE_BUDGET // (wp * wp))))
    num_warps = min(4, max(1, block_r * wp * wp // 256))
    return wp, block_r, num_warps


# (padded width, precision) -> the (rows, warps) of the forward and of the backward that
# stack_settings is trying (None: launch_config's own)
_SETTINGS: dict[tuple[int, str], tuple[tuple[int, int] | None, tuple[int, int] | None]] = {}


@contextlib.contextmanager
def stack_settings(padded_width: int, precision: str, forward: tuple[int, int] | None = None,
                   backward: tuple[int, int] | None = None, stages: int | None = None) -> Iterator[None]:
    """Within, launch_config gives (rows per program, warps) `forward` and `backward` (None:
    its own) for the stacks of this padded width (a power of two up to MAX_WIDTH) and
    precision, and the wide layer loops pipeline `stages` deep (None: _WIDE_STAGES). A small
    batch still takes fewer rows, as from the table. For benchmarks that time candidate
    settings (bench/stack_sweep.py) and for checking them (bench/kernel_registers.py); not
    thread-safe."""
    _check(precision in PRECISIONS and padded_width in [2**k for k in range(8)],
           f"no stack setting for width {padded_width} in {precision}")
    for rows, warps in (x for x in (forward, backward) if x is not None):
        _check(rows in (16, 32, 64, 128, 256, 512) and warps in (1, 2, 4, 8, 16),
               f"not a setting: {rows} rows, {warps} warps")
    global _WIDE_STAGES
    key, old_stages = (padded_width, precision), _WIDE_STAGES
    old = _SETTINGS.get(key)
    _SETTINGS[key] = (forward, backward)
    _WIDE_STAGES = stages or old_stages
    try:
        yield
    finally:
        _WIDE_STAGES = old_stages
        if old is None:
            _SETTINGS.pop(key, None)
        else:
            _SETTINGS[key] = old
