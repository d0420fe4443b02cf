"""What ptxas makes of the stack kernels on a Hopper card, without the card.

Records the Triton launches the paper's populations make (`psa.core.mlp.engine.kernel_launches`:
the training step and the evaluations, run on the meta device), compiles each distinct one for
sm_90 with the Triton installed here (`GPUTarget("cuda", 90, 32)`: no driver or GPU needed) and
runs that Triton's ptxas with `-v` on the PTX. Prints a table: kernel, width, rows per program,
warps, precision, registers a thread, spilled bytes, shared memory, whether the layer products
run on the tensor cores' `mma` (or `wgmma`), and the sizes of the asynchronous copies into
shared memory (the pipelined weights: 16 bytes each when their rows are 16-byte aligned and
contiguous along the product's K; a 4 says some load went element by element). Exits 1 if a
launch spills or needs more shared memory than an H100 or H200 gives one program (227 KB).

The card has its own Triton (3.6 on the lent machines); its code generation differs from
another version's, so compile with that one (`pip install --target /tmp/t36 triton==3.6.0`,
then `PYTHONPATH=/tmp/t36`). Registers and spills are ptxas's word, not a timing.

    PYTHONPATH=/tmp/t36 python bench/kernel_registers.py                      # the paper's stacks
    PYTHONPATH=/tmp/t36 python bench/kernel_registers.py --arch 115*115 --precision tf32 fp32
    PYTHONPATH=/tmp/t36 python bench/kernel_registers.py --sweep --arch 115*115 35*35 2048*1 632*4 --precision tf32

`--sweep` compiles, instead of the table's settings, every candidate setting that
bench/stack_sweep.py times on a card (rows per program, warps, and the wide kernels' pipeline
stages), so that a sweep's timings can be read beside registers and spills; a spilling
candidate does not make the exit status 1 there.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from collections.abc import Iterator
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

from psa.core.arch import parse_arch  # noqa: E402
from psa.core.device import Execution  # noqa: E402
from psa.core.hparams import HParams  # noqa: E402
from psa.core.member import MODES  # noqa: E402
from psa.core.mlp.engine import kernel_launches  # noqa: E402
from psa.core.mlp.selftest import synthetic_data  # noqa: E402

HP = HParams()
# one of each kind of stack in the paper's design: wide (padded 128 and 64), narrow with tl.dot,
# narrow on the FMA units, deep and narrow
ARCHS = ["115*115", "71*71", "35*35", "32*32", "21*21", "8*8", "185*4", "2048*1"]
SHARED_LIMIT = 227 * 1024  # bytes of shared memory one program may take on sm_90


def signature(kernel: Any, args: tuple, kwargs: dict) -> tuple[dict, dict, dict]:
    """(signature, constexprs, attrs) of one recorded launch for triton.compile, specialised as
    Triton's launcher would: pointers 16-byte aligned (psa's buffers are), integers equal to 1
    constants and multiples of 16 marked divisible (but for do_not_specialize arguments)."""
    dtypes = {torch.float32: "*fp32", torch.int64: "*i64", torch.int32: "*i32", torch.uint8: "*u8"}
    names = kernel.arg_names
    params = {p.name: p for p in kernel.params}
    sig: dict[str, str] = {}
    consts: dict[str, Any] = {}
    attrs: dict[tuple[int, ...], list] = {}
    positional = [n for n in names if not params[n].is_constexpr]
    for name, value in zip(positional, args):
        i = names.index(name)
        dont = params[name].do_not_specialize
        if isinstance(value, torch.dtype):
            sig[name] = dtypes[value]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name}: cannot type {value!r}")
        elif value == 1 and not dont:
            sig[name] = "constexpr"
            consts[name] = 1
        else:
            sig[name] = "i32" if -2**31 <= value < 2**31 else "i64"
            if value % 16 == 0 and not dont:
                attrs[(i,)] = [["tt.divisibility", 16]]
    for name in names:
        if params[name].is_constexpr:
            sig[name] = "constexpr"
            consts[name] = kwargs[name]
    return sig, consts, attrs


def compile_report(kernel: Any, args: tuple, kwargs: dict, ptxas: str, arch: int = 90) -> dict:
    """Compile one launch for sm_`arch` and ask ptxas: registers, spill bytes, shared bytes."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kw = dict(kwargs)
    options = {"num_warps": kw.pop("num_warps", 4)}
    if "num_stages" in kw:
        options["num_stages"] = kw.pop("num_stages")
    sig, consts, attrs = signature(kernel, args, kw)
    src = ASTSource(fn=kernel, signature=sig, constexprs=consts, attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    ptx = compiled.asm["ptx"]
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        Path(path).write_text(ptx)
        p = subprocess.run([ptxas, f"-arch=sm_{arch}a", "-v", path, "-o", os.path.join(tmp, "k.cubin")],
                           capture_output=True, text=True)
    out = p.stdout + p.stderr
    if p.returncode:
        raise RuntimeError(f"ptxas failed: {out.strip()[-400:]}")
    regs = re.search(r"Used (\d+) registers", out)
    spill = re.search(r"(\d+) bytes spill stores", out)
    # cp.async.{ca,cg}.shared.global [dst], [src], SIZE[, src size];
    sizes = re.findall(r"cp\.async\.c[ag]\.shared\.global[^;]*?,\s*(0x[0-9a-f]+|\d+)\s*[,;]", ptx)
    copies = sorted({int(n, 0) for n in sizes}, reverse=True)
    return {"registers": int(regs.group(1)) if regs else None, "spill_bytes": int(spill.group(1)) if spill else 0,
            "shared_bytes": int(compiled.metadata.shared),
            "mma": "wgmma" if "wgmma" in ptx else "mma" if "mma.sync" in ptx else "fma",
            "async_copy_bytes": copies}


def settings(arch: str, precision: str, members: list, data: Any, sweep: bool,
             quick: bool = False) -> Iterator[tuple[str, list]]:
    """(direction, recorded launches) of a population of `arch`: with the table's settings
    (direction ""), or under each of bench/stack_sweep.py's candidate settings of the stack
    kernels ("stack_fwd train" or "stack_bwd"), where it has some for the stack's width."""
    from psa.core.kernels import triton_stack
    from stack_sweep import candidates, has_candidates

    ex = Execution(device=torch.device("cpu"), precision=precision, triton=True, stack_max_width=128)
    a = parse_arch(arch)
    padded = triton_stack.launch_config(a.hidden[0], HP.batch_size, precision)[0] if a.hidden else 0
    if not sweep or not has_candidates(padded) or len(a.hidden) < 2:
        yield "", kernel_launches(a, members, data, HP, ex)
        return
    for name, backward in (("stack_fwd train", False), ("stack_bwd", True)):
        for rows, warps, stages in candidates(padded, precision, backward, quick):
            kw = {"backward" if backward else "forward": (rows, warps)}
            with triton_stack.stack_settings(padded, precision, stages=stages, **kw):
                yield name, kernel_launches(a, members, data, HP, ex)


def find_ptxas(arch: int = 90) -> str:
    """The ptxas the imported Triton runs for sm_`arch` (the one whose PTX version it writes)."""
    from triton.backends.nvidia.compiler import get_ptxas

    return get_ptxas(arch).path


def usage(message: str) -> None:
    """One line on stderr and exit status 2."""
    print(f"kernel_registers: {message}", file=sys.stderr)
    sys.exit(2)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", nargs="+", default=ARCHS)
    p.add_argument("--precision", nargs="+", default=["tf32", "fp32", "bf16"], choices=["fp32", "tf32", "bf16"])
    p.add_argument("--members", type=int, default=60, help="population size (the study's: 60)")
    p.add_argument("--ptxas", default=None, help="ptxas to run (default: the imported Triton's)")
    p.add_argument("--json", default=None, help="also write the rows here")
    p.add_argument("--sweep", action="store_true", help="the candidate settings of bench/stack_sweep.py instead")
    p.add_argument("--quick", action="store_true", help="with --sweep: its --quick candidates (for a test)")
    args = p.parse_args()
    if os.environ.get("TRITON_INTERPRET") == "1":
        usage("unset TRITON_INTERPRET (this compiles the kernels, it does not interpret them)")
    try:
        import triton
    except ImportError:
        usage("needs triton installed")
    ptxas = args.ptxas or find_ptxas()
    if not Path(ptxas).exists():
        usage(f"no ptxas at {ptxas} (--ptxas)")
    for a in args.arch:
        try:
            parse_arch(a)
        except ValueError as e:
            usage(f"--arch {a}: {e}")
    from psa.core.kernels import triton_stack

    # the launches are only recorded (on the meta device), never made: no GPU needed for that
    triton_stack.available = lambda: True
    data = synthetic_data(HP.batch_size * 2 + 80, 64, 0, torch.device("cpu"))
    # the study's order: every mode of seed 0, then of seed 1, ...
    members = [HP.member(m, s) for s in range(-(-args.members // len(MODES))) for m in MODES][:args.members]
    rows, seen, bad = [], set(), 0
    print(f"Triton {triton.__version__}, ptxas {ptxas}, sm_90, {args.members} members, batch {HP.batch_size}")
    print(f"{'arch':>8} {'prec':>5} {'kernel':>16} {'W':>4} {'rows':>4} {'warps':>5} {'stages':>6} {'regs':>5} "
          f"{'spill':>6} {'shared KB':>9} {'mma':>5} {'copies':>7}")
    for arch in args.arch:
        for precision in args.precision:
            for setting, launches in settings(arch, precision, members, data, args.sweep, args.quick):
                for lc in launches:
                    kw = dict(lc.kwargs)
                    # the full batch and the last, short one differ in arguments only
                    key = (lc.kernel.__name__, lc.kwargs)
                    if key in seen or lc.kernel.__name__ not in ("_stack_fwd_kernel", "_stack_bwd_kernel"):
                        continue
                    name = lc.kernel.__name__.strip("_").replace("_kernel", "")
                    if name == "stack_fwd":
                        name += " train" if kw.get("STORE_ALL") else " eval"
                    if setting and name != setting:
                        continue  # a sweep's setting is one direction's; its other launches are the table's
                    seen.add(key)
                    r = compile_report(lc.kernel, lc.args, kw, ptxas)
                    row = {"arch": arch, "precision": precision, "kernel": name, "width": kw["W"],
                           "rows": kw["BLOCK_R"], "warps": kw.get("num_warps"), "stages": kw.get("STAGES"), **r}
                    rows.append(row)
                    fail = r["spill_bytes"] > 0 or r["shared_bytes"] > SHARED_LIMIT
                    bad += fail and not args.sweep
                    print(f"{arch:>8} {precision:>5} {name:>16} {kw['W']:>4} {kw['BLOCK_R']:>4} {row['warps']:>5} "
                          f"{row['stages'] if kw.get('WIDE') else '-':>6} "
                          f"{r['registers']:>5} {r['spill_bytes']:>6} {r['shared_bytes'] / 1024:>9.1f} {r['mma']:>5} "
                          f"{'/'.join(map(str, r['async_copy_bytes'])) or '-':>7}"
                          f"{'  <- spills or too much shared memory' if fail else ''}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"triton": triton.__version__, "target": "sm_90", "rows": rows},
                                              indent=1) + "\n")
    what = "candidate settings compiled (spills are data here)" if args.sweep else "launches compiled"
    print(f"{len(rows)} {what}, {bad} spilling or over {SHARED_LIMIT // 1024} KB of shared memory")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
