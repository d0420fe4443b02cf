"""Narrow MLPs on the CPU: the whole training step in one call (train_step) and the
evaluation's stack, head and argmax in one call (count_correct), from psa.core.kernels.cpu_stack.cpp
(with its helpers in cpu_stack.h).

train_step does a SimpleMLP's forward and backward for a population whose hidden layers are all
one width up to 8: per seed group (threads split the groups), the batch rows read straight from
the training set by index (no gathered copy of 8 MB a step), the first layer for the group's
members while the rows are in cache, then per member and block of 64 rows the middle stack's
forward saving every layer's activations (at most ~0.6 MB a member for the study's deepest
stacks: L2), the head, the mean cross-entropy and its gradient, and the stack's backward from
the saved activations; then the first layer's gradients from the same rows. A block's rows stay
in registers from layer to layer (a narrow layer is a few instructions; a round trip through
memory per layer would cost more). Where a block's gradient is exactly zero from some layer down
(deep narrow nets die), the backward stops there. A training set of 8-bit images normalised by
one scalar mean and std (MNIST's) is read as its 8-bit codes (input_codes): a quarter of the
bytes, where a width-1 net's step is otherwise bound by reading the rows from memory.

On a CPU a stack of width 1-8 costs torch several operations per layer and direction, each
costing more in dispatch than its few hundred multiply-adds: a 64-layer net is ~800 such
operations per training step (docs/architecture.md#the-fused-cpu-step).

count_correct starts from the first layer's output (the engine's one torch GEMM for a block of
members, who all see the same images) and runs the stack and head through the step's own
forward code: each piece of arithmetic has one implementation here, so a member is scored by
the arithmetic it trained with. The parameters and dropout masks are laid out as
psa.core.kernels.triton_stack's Triton kernels read them; fp32 only.

Why a C++ file built by the system compiler and loaded with ctypes (rather than numba, a torch
C++ extension or torch.compile): it needs no new dependency (numba, llvmlite), no torch headers
and no ninja (a torch extension compiles torch's headers, far longer than this one file builds:
docs/architecture.md#the-fused-cpu-step), and nothing is traced or recompiled per shape at run
time (the stack is a loop over layers, which torch.compile would unroll per depth; nor would it
fuse a gather by index into a GEMM's operand, the step's largest saving). The build is cached on
disk by the hash of the sources (the .cpp and every header it includes), compiler and flags
($PSA_CACHE_DIR, else $XDG_CACHE_HOME/psa, else ~/.cache/psa), so a machine compiles it once.
Without a compiler, or if the build fails, `load()` says so in one warning line and the engine
trains on the plain torch path.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings
import weakref
from pathlib import Path
from typing import Protocol

import torch

from psa.core.arch import Arch
from psa.core.device import Execution


class Layout(Protocol):
    """Where a population's flat buffer keeps each Linear layer (psa.core.mlp.population.Layout):
    the kernels read it, and know nothing else of populations."""

    @property
    def blocks(self) -> tuple[tuple[int, int, int, int], ...]:
        """(weight offset, bias offset, out, in) of every Linear layer."""

    @property
    def size_m(self) -> int:
        """Members."""

    @property
    def numel(self) -> int:
        """Floats in the buffer."""

    @property
    def model(self) -> str:
        """psa.core.model.MODELS."""

# Widest equal-width stack the compiled code takes (its template instantiations).
MAX_WIDTH = 8
SOURCE = Path(__file__).with_name("cpu_stack.cpp")
# the files SOURCE includes ("..."): part of the build's cache key, so editing one rebuilds
HEADERS = (Path(__file__).with_name("cpu_stack.h"),)

_LOCK = threading.Lock()
_LIB: ctypes.CDLL | None = None
_FAILED: str | None = None  # why the build or load failed, once known

_I64 = ctypes.c_int64
_PTR = ctypes.c_void_p


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")


def _flags() -> list[str]:
    # -ffp-contract=fast: a * b + c is one FMA where the CPU has them (one rounding, not two)
    flags = ["-O3", "-std=c++17", "-shared", "-fPIC", "-pthread", "-fno-math-errno", "-ffp-contract=fast"]
    # vector units torch itself found on this CPU: AVX2 and FMA where it dispatches to AVX2/AVX512,
    # and AVX-512 where it dispatches to that (torch checks the CPU): twice the floats per instruction
    capability = torch.backends.cpu.get_cpu_capability()
    if capability in ("AVX2", "AVX512"):
        flags += ["-mavx2", "-mfma"]
    if capability == "AVX512":
        flags += ["-mavx512f", "-mavx512vl", "-mavx512bw", "-mavx512dq", "-mprefer-vector-width=512"]
    return flags


def cache_dir() -> Path:
    """Where the built library is kept: $PSA_CACHE_DIR, else $XDG_CACHE_HOME/psa, else ~/.cache/psa."""
    if os.environ.get("PSA_CACHE_DIR"):
        return Path(os.environ["PSA_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "psa"


def _cache_key(flags: list[str], version: str) -> str:
    """The build's name in the cache: a hash of every file compiled (SOURCE and HEADERS, each
    with its name), the flags and the compiler's version."""
    parts = [b"%s\0%s" % (f.name.encode(), f.read_bytes()) for f in (SOURCE, *HEADERS)]
    return hashlib.sha256(b"\0".join([*parts, " ".join(flags).encode(), version.encode()])).hexdigest()[:16]


def _build() -> ctypes.CDLL:
    cxx = _compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler (g++ or $CXX) on PATH")
    flags = _flags()
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=60).stdout
    target = cache_dir() / f"cpu_stack-{_cache_key(flags, version)}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        # built under a temporary name and renamed: concurrent processes never load half a file
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
        try:
            done = subprocess.run([cxx, *flags, str(SOURCE), "-o", tmp], capture_output=True, text=True, timeout=600)
            if done.returncode != 0:
                lines = (done.stderr or done.stdout).strip().splitlines()
                raise RuntimeError(f"{Path(cxx).name} failed: {lines[0][:200] if lines else done.returncode}")
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    lib = ctypes.CDLL(str(target))
    lib.psa_count_correct.restype = ctypes.c_int
    lib.psa_count_correct.argtypes = [_PTR, _I64, _I64, _I64, _PTR, _I64, _I64, _I64, _I64, _I64, _PTR, _PTR, _I64,
                                      _PTR, _PTR, _I64, _I64, ctypes.c_int]
    lib.psa_train_step.restype = ctypes.c_int
    lib.psa_train_step.argtypes = [_PTR, _PTR, ctypes.c_float, ctypes.c_float, _PTR, _I64, _PTR, _I64, _PTR, _I64,
                                   _I64, _PTR, _PTR, _I64, _I64, _I64,
                                   _I64, _I64, _I64, _I64, _I64, _I64, _I64, _I64, _PTR, _PTR, _PTR, _PTR, _I64,
                                   ctypes.c_int]
    if lib.psa_stack_max_width() != MAX_WIDTH:
        raise RuntimeError(f"the built library takes widths up to {lib.psa_stack_max_width()}, not {MAX_WIDTH}")
    return lib


def load(warn: bool = True) -> bool:
    """Build (or find in the cache) and load the library; True if it is ready. On failure, one
    warning line (once per process, if `warn`) and False: the caller runs plain torch ops."""
    global _LIB, _FAILED
    with _LOCK:
        if _LIB is None and _FAILED is None:
            try:
                _LIB = _build()
            except Exception as e:  # noqa: BLE001 - any failure means: use the torch path
                _FAILED = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
                if warn:
                    warnings.warn(f"psa: the fused CPU stack could not be built ({_FAILED}); narrow nets train "
                                  f"on the plain torch path", RuntimeWarning, stacklevel=2)
        return _LIB is not None


def step_fits_cpu(arch: Arch, ex: Execution) -> bool:
    """Whether a SimpleMLP of `arch` trains through train_step under `ex`: asked for
    (ex.cpu_stack_max_width, which `--kernels auto` sets on a CPU), on a CPU in fp32, one or more
    hidden layers of one width up to that, and the library built here (else one warning and False)."""
    hidden = arch.hidden
    if not (ex.cpu_stack_max_width and ex.device.type == "cpu" and ex.precision == "fp32" and hidden
            and len(set(hidden)) == 1 and hidden[0] <= min(ex.cpu_stack_max_width, MAX_WIDTH)):
        return False
    return load()


def failure() -> str | None:
    """Why load() failed in this process (None if it did not, or was not tried)."""
    return _FAILED


def _lib() -> ctypes.CDLL:
    if _LIB is None and not load(warn=False):
        raise RuntimeError(f"the fused CPU stack is not available ({_FAILED})")
    assert _LIB is not None
    return _LIB


def _check(ok: bool, msg: str) -> None:
    if not ok:
        raise ValueError(msg)


def _check_common(t: torch.Tensor, name: str, shape: tuple[int, ...]) -> None:
    _check(isinstance(t, torch.Tensor) and t.dtype == torch.float32 and t.device.type == "cpu",
           f"{name} must be a float32 CPU tensor")
    _check(tuple(t.shape) == shape, f"{name} must have shape {shape}, got {tuple(t.shape)}")
    _check(t.is_contiguous(), f"{name} must be contiguous")


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _check_input(name: str, t: torch.Tensor, width: int) -> tuple[int, int]:
    _check(isinstance(t, torch.Tensor) and t.dim() == 3 and t.dtype == torch.float32 and t.device.type == "cpu",
           f"{name} must be a 3-d (M, B, W) float32 CPU tensor")
    _check(t.shape[2] == width, f"{name} has width {t.shape[2]}, expected {width}")
    return t.shape[0], t.shape[1]


def count_correct(z0: torch.Tensor, flat: torch.Tensor, layout: Layout, m0: int, y: torch.Tensor) -> torch.Tensor:
    """Correct predictions (M,) int64 of members m0 .. m0 + M - 1 of `flat` (a SimpleMLP of
    `layout`, hidden layers of one width up to MAX_WIDTH) from their first layer's
    pre-activation z0 (M, B, W) float32, any strides, against labels y (B,): the hidden stack,
    the head and torch.argmax's choice (the first largest logit; a NaN counts as the largest) in
    one call, as the engine's evaluation does. The logits are those of the training step's
    arithmetic, so a near tie can go the other way than on the torch path (by rounding). fp32 only.
    """
    blocks = layout.blocks
    depth = len(blocks) - 1
    _check(depth >= 1 and layout.model == "simplemlp", "count_correct takes a SimpleMLP with hidden layers")
    width = blocks[0][2]
    hw_off, hb_off, n_out, head_in = blocks[-1]
    _check(1 <= width <= MAX_WIDTH and head_in == width and all(o == width == i for _, _, o, i in blocks[1:-1]),
           f"count_correct takes hidden layers of one width up to {MAX_WIDTH}")
    members, rows = _check_input("z0", z0, width)
    _check(0 <= m0 and m0 + members <= layout.size_m, "the members run past the layout")
    _check(flat.dim() == 1 and flat.dtype == torch.float32 and flat.device.type == "cpu" and flat.is_contiguous()
           and flat.numel() == layout.numel, f"flat must be a contiguous ({layout.numel},) float32 CPU tensor")
    _check(tuple(y.shape) == (rows,) and y.dtype == torch.int64 and y.device.type == "cpu",
           f"y must be a ({rows},) int64 CPU tensor")
    y = y.contiguous()
    size_m = layout.size_m
    w_off, b_off = (blocks[1][0] + m0 * width * width, blocks[1][1] + m0 * width) if depth > 1 else (0, 0)
    base = flat.data_ptr()
    correct = torch.zeros(members, dtype=torch.int64)
    if members and rows:
        rc = _lib().psa_count_correct(z0.data_ptr(), *z0.stride(), base, w_off, b_off, size_m * width * (width + 1),
                                      depth, width, base + 4 * (hw_off + m0 * n_out * width),
                                      base + 4 * (hb_off + m0 * n_out), n_out, y.data_ptr(), correct.data_ptr(),
                                      members, rows, torch.get_num_threads())
        _check(rc == 0, f"the fused CPU evaluation failed (code {rc})")
    return correct


_HUGE = 2 << 20  # bytes in an x86-64 / arm64 huge page


def _huge_page_tensor(n: int) -> torch.Tensor:
    """An uninitialised uint8 tensor of n bytes that Linux backs with 2 MB pages where it can
    (madvise MADV_HUGEPAGE before the first write, as transparent huge pages in `madvise` mode
    ask). The step reads 256 rows a step at random places of the training set's codes: with 4 KB
    pages each row is a TLB miss, which the prefetches do not hide (bench/results/narrow_cpu.md).
    Below 8 MB (four huge pages) or off Linux: ordinary pages; where madvise is refused or
    missing, the same 2 MB-aligned slice on ordinary pages."""
    if n < 4 * _HUGE or not sys.platform.startswith("linux"):
        return torch.empty(n, dtype=torch.uint8)
    buf = torch.empty(n + _HUGE, dtype=torch.uint8)
    start = buf.data_ptr()
    off = (-start) % _HUGE
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        libc.madvise(start + off, n // _HUGE * _HUGE, 14)  # MADV_HUGEPAGE; a refusal changes nothing
    except (OSError, AttributeError):
        pass
    return buf[off:off + n]


# input_codes' answers by id of the training-set tensor: (a weak reference to it, its version
# then, the answer); an entry goes with its tensor, and an in-place change asks again
_CODES: dict[int, tuple[weakref.ref, int, tuple[torch.Tensor, float, float] | None]] = {}
_CODES_LOCK = threading.Lock()


def input_codes(x: torch.Tensor, rows: int = 512) -> tuple[torch.Tensor, float, float] | None:
    """`x` as 8-bit codes, if it is one: (codes (N, n_in) uint8, alpha, beta) with every element of
    x within 4 float32 ulps (of x's largest magnitude) of alpha * code + beta, both float32
    numbers; else None. A data set of 8-bit images normalised by one scalar mean and std (MNIST,
    Fashion-MNIST, CIFAR-10 in psa.core.data) is one: its floats take at most 256 values, evenly
    spaced. train_step then reads a quarter of the bytes per batch row.

    Found from x alone (its minimum is code 0, its maximum code 255), so a subset, a copy or a
    user's tensor qualifies or not by its values, never by where it came from; the answer is
    kept per tensor (until it is changed in place). Reads x once or twice, `rows` rows at a time.
    """
    if not (isinstance(x, torch.Tensor) and x.dim() == 2 and x.dtype == torch.float32 and x.device.type == "cpu"
            and x.is_contiguous() and x.numel() > 0):
        return None
    with _CODES_LOCK:
        hit = _CODES.get(id(x))
        if hit is not None and hit[0]() is x and hit[1] == x._version:
            return hit[2]
    version = x._version
    lo, hi = float(x.min()), float(x.max())
    out = None
    if torch.isfinite(torch.tensor([lo, hi])).all() and hi > lo:
        # the float32 numbers the C++ step multiplies and adds; the check below holds for them
        alpha = float(torch.tensor((hi - lo) / 255.0, dtype=torch.float32))
        beta = float(torch.tensor(lo, dtype=torch.float32))
        tol = 4 * torch.finfo(torch.float32).eps * max(abs(lo), abs(hi))
        codes = _huge_page_tensor(x.shape[0] * x.shape[1]).view(x.shape)
        ok = True
        for r0 in range(0, x.shape[0], rows):
            block = x[r0:r0 + rows].double()
            c = ((block - beta) / alpha).round_()
            if c.min() < 0 or c.max() > 255 or (c * alpha + beta - block).abs().max() > tol:
                ok = False
                break
            codes[r0:r0 + rows] = c.to(torch.uint8)
        if ok:
            out = (codes, alpha, beta)
    key = id(x)

    def forget(_: weakref.ref) -> None:
        with _CODES_LOCK:
            if key in _CODES and _CODES[key][0]() is None:
                del _CODES[key]

    with _CODES_LOCK:
        _CODES[key] = (weakref.ref(x, forget), version, out)
    return out


def train_step(layout: Layout, flat: torch.Tensor, grad: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
               order: torch.Tensor, step: torch.Tensor, batch_size: int, b: int, k: int,
               drop: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None, loss: torch.Tensor,
               codes: tuple[torch.Tensor, float, float] | None = None) -> torch.Tensor:
    """One training step's forward and backward of every member of `flat` (a SimpleMLP of
    `layout`, hidden layers of one width up to MAX_WIDTH) in one call: writes every gradient into
    `grad` (the layout of `flat`) and each member's mean cross-entropy into `loss` (M,); returns it.

    Member m trains on the rows x[order[m // k, step * batch_size + r]] for r < b, labels from y
    (k consecutive members share a seed group's data order); `step` a 0-d int64 tensor (read here),
    `drop` None or (keys (M, 2) from rng.loop_keys(seed, "dropout", loop), threshold (M,), scale
    (M,)), the step's dropout keys derived as rng.step_keys does. `codes`: None, or x as 8-bit
    codes (input_codes(x)), which the first layer then reads instead of x's floats (the products
    then differ from x's by float32 rounding). fp32 only; the same bits for any thread count
    (threads split the seed groups).
    """
    blocks = layout.blocks
    m, depth = layout.size_m, len(blocks) - 1
    _check(depth >= 1 and layout.model == "simplemlp", "the fused CPU step takes a SimpleMLP with hidden layers")
    w0_off, b0_off, width, n_in = blocks[0]
    hw_off, hb_off, n_out, head_in = blocks[-1]
    _check(1 <= width <= MAX_WIDTH and head_in == width and all(o == width == i for _, _, o, i in blocks[1:-1]),
           f"the fused CPU step takes hidden layers of one width up to {MAX_WIDTH}")
    w_off, b_off = (blocks[1][0], blocks[1][1]) if depth > 1 else (0, 0)
    for name, t in (("flat", flat), ("grad", grad)):
        _check(t.dim() == 1 and t.dtype == torch.float32 and t.device.type == "cpu" and t.is_contiguous()
               and t.numel() == layout.numel, f"{name} must be a contiguous ({layout.numel},) float32 CPU tensor")
    _check(x.dim() == 2 and x.shape[1] == n_in and x.dtype == torch.float32 and x.device.type == "cpu"
           and x.is_contiguous(), f"x must be a contiguous (N, {n_in}) float32 CPU tensor")
    n = x.shape[0]
    _check(tuple(y.shape) == (n,) and y.dtype == torch.int64 and y.is_contiguous() and y.device.type == "cpu",
           f"y must be a contiguous ({n},) int64 CPU tensor")
    _check(isinstance(k, int) and k >= 1 and m % k == 0, f"k must divide the {m} members")
    _check(tuple(order.shape) == (m // k, n) and order.dtype == torch.int64 and order.is_contiguous()
           and order.device.type == "cpu", f"order must be a contiguous ({m // k}, {n}) int64 CPU tensor")
    _check(step.dim() == 0 and step.dtype == torch.int64 and step.device.type == "cpu",
           "step must be a 0-d int64 tensor")
    _check(1 <= b <= batch_size and int(step) * batch_size + b <= n, "the batch runs past the end of the data order")
    _check_common(loss, "loss", (m,))
    if drop is not None:
        keys, thr, sc = drop
        for name, t, shape, dt in (("keys", keys, (m, 2), torch.int64), ("thr", thr, (m,), torch.int64),
                                   ("sc", sc, (m,), torch.float32)):
            _check(tuple(t.shape) == shape and t.dtype == dt and t.is_contiguous() and t.device.type == "cpu",
                   f"drop {name} must be a contiguous {shape} {dt} CPU tensor")
    ks, thr, sc = drop if drop is not None else (None, None, None)
    xc, alpha, beta = codes if codes is not None else (None, 1.0, 0.0)
    if xc is not None:
        _check(isinstance(xc, torch.Tensor) and xc.dtype == torch.uint8 and tuple(xc.shape) == tuple(x.shape)
               and xc.is_contiguous() and xc.device.type == "cpu", f"codes must be a contiguous {tuple(x.shape)} "
               "uint8 CPU tensor")
    rc = _lib().psa_train_step(x.data_ptr(), _ptr(xc), alpha, beta, y.data_ptr(), n_in, order.data_ptr(), n,
                               step.data_ptr(), batch_size, b, flat.data_ptr(), grad.data_ptr(), m, k, w0_off, b0_off,
                               w_off, b_off, m * width * (width + 1), depth, hw_off, hb_off, n_out, _ptr(ks), _ptr(thr),
                               _ptr(sc), loss.data_ptr(), width, torch.get_num_threads())
    _check(rc != 3, f"a label outside 0..{n_out - 1} or a data order index outside the training set")
    _check(rc == 0, f"the fused CPU step failed (code {rc})")
    return loss
