"""The paper's whole study (98 architectures x 6 modes x 10 trials x 100 meta-loops) on one device.

1. Measures the device: matmul throughput in fp32, tf32 and bf16 and copy bandwidth.
2. For each architecture builds its 60-member population (6 modes x 10 seeds, as the study
   does), runs loop 1 (which captures the CUDA graphs and compiles the kernels), times `--loops`
   further meta-loops and extrapolates to the 100 of the study: first loop + 99 x the mean loop.
   Prints per architecture the loop time, the achieved TFLOP/s and the estimate, and the
   estimate for the whole study, one population after another (`psa study` overlaps several
   populations on a GPU, so the real run is faster than this sum).
3. With --full, runs the real thing (`psa study --preset paper`) into a results database and
   records its wall time.

Writes its results as JSON to bench/results/gpu_study-<device>.json (or --out).

    python bench/gpu_study.py                          # all 98, estimate only
    python bench/gpu_study.py --full --db /tmp/paper.sqlite
    python bench/gpu_study.py --device cpu --arch 1*8 8*8 --steps 8   # a quick look on a CPU

On a CPU (or with --steps) each timed loop trains on the first `steps` batches only; the
training time is scaled up to the 196 steps of an epoch (validation is always timed in full).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

from psa.core import data as psa_data  # noqa: E402
from psa.core.kernels import triton_stack as kernels  # noqa: E402
from psa.core.arch import parse_arch, study_architectures  # noqa: E402
from psa.core.device import (  # noqa: E402
    Execution,
    best_seconds,
    describe_device,
    resolve_execution,
    synchronize,
)
from psa.core.mlp.engine import Engine, kernel_launches  # noqa: E402
from psa.core.hparams import HParams  # noqa: E402
from psa.core.member import MODES  # noqa: E402
from psa.core.mlp.population import Population  # noqa: E402
from psa.core.mlp.selftest import matmul_peak  # noqa: E402
from psa.study.console import fmt_seconds  # noqa: E402
from psa.study.cost import arch_flops  # noqa: E402

HP = HParams()  # the paper's

SEEDS = range(10)
META_LOOPS = 100
EPOCH_STEPS = 196


def device_peaks(device: torch.device) -> dict[str, float]:
    """Dense matmul TFLOP/s in fp32, tf32 and bf16, and device-to-device copy GB/s (read + write)."""
    out: dict[str, float] = {}
    for name in ("fp32", "tf32", "bf16"):
        if name == "tf32" and device.type != "cuda":
            continue
        out[f"matmul_{name}_tflops"] = matmul_peak(device, name, quick=False)
    size = (1 << 28) if device.type == "cuda" else (1 << 25)  # floats: 1 GiB / 128 MiB
    src = torch.empty(size, device=device)
    dst = torch.empty_like(src)
    t = best_seconds(lambda: dst.copy_(src), device, 5)
    out["copy_gbps"] = 2 * size * 4 / t / 1e9
    return out


def time_architecture(arch_text: str, ds: psa_data.Dataset, ex: Execution, loops: int,
                      steps: int | None) -> dict:
    """Loop 1 and `loops` more meta-loops of the 60-member population of one architecture."""
    device = ds.device
    arch = parse_arch(arch_text)
    sub = ds
    if steps is not None:
        n = min(ds.train_x.shape[0], steps * HP.batch_size)
        sub = dataclasses.replace(ds, train_x=ds.train_x[:n], train_y=ds.train_y[:n])
    members = [HP.member(m, s) for s in SEEDS for m in MODES]
    pop = Population.create(arch, members, device, n_val=ds.val_y.numel())
    eng = Engine(pop, sub, HP, ex)
    synchronize(device)
    t0 = time.perf_counter()
    eng.meta_loop()
    synchronize(device)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(loops):
        eng.meta_loop()
    synchronize(device)
    loop = (time.perf_counter() - t0) / loops
    val = best_seconds(lambda: eng.count_correct(pop.lkg, ds.val_x, ds.val_y), device, 1)
    if steps is not None and steps < EPOCH_STEPS:
        # a loop's training scales with its steps; loop 1's extra (capture, compilation,
        # allocation) is paid once and does not. The training is timed on its own: a loop
        # minus a separately timed validation is noise once a few steps take milliseconds
        once = first - loop
        t0 = time.perf_counter()
        for _ in range(loops):
            eng.train_epoch(pop.loop + 1)
        synchronize(device)
        train = (time.perf_counter() - t0) / loops
        loop += train * (EPOCH_STEPS / steps - 1)
        first = loop + once
    flops = arch_flops(arch_text, 1) - arch_flops(arch_text, 0)  # one loop of one member
    est = first + (META_LOOPS - 1) * loop
    return {"arch": arch_text, "params": arch.params, "members": pop.size, "precision": eng.paths.precision,
            "triton_stack": eng.paths.triton_stack, "graphs": eng.use_graphs, "first_loop_s": first, "loop_s": loop, "val_s": val,
            "tflops": flops * pop.size / loop / 1e12, "est_100_loops_s": est, "steps_timed": steps or EPOCH_STEPS}


def run_full(args: argparse.Namespace) -> dict:
    """`psa study --preset paper` in a subprocess; its wall time and outcome."""
    cmd = [sys.executable, "-m", "psa", "study", "--preset", "paper", "--db", args.db, "--quiet",
           "--device", args.device, "--name", args.name]
    if args.precision:
        cmd += ["--precision", args.precision]
    if args.concurrency:
        cmd += ["--concurrency", str(args.concurrency)]
    env = {**os.environ, "PYTHONPATH": str(HERE.parent / "src")}
    t0 = time.perf_counter()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    return {"command": " ".join(cmd[1:]), "returncode": p.returncode, "wall_s": wall,
            "stderr_tail": p.stderr[-2000:], "db": args.db}


def slug(text: str) -> str:
    return re.sub(r"[^0-9A-Za-z]+", "-", text).strip("-").lower()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--arch", nargs="+", help="architectures (default: the study's 98)")
    ap.add_argument("--loops", type=int, default=2, help="timed meta-loops per architecture after loop 1")
    ap.add_argument("--steps", type=int, help="train on this many batches per timed loop and scale up "
                                              "(default: whole epochs on a GPU, 4 on a CPU)")
    ap.add_argument("--precision", choices=("auto", "fp32", "tf32", "bf16"), default="auto")
    ap.add_argument("--kernels", choices=("auto", "torch", "triton"), default="auto")
    ap.add_argument("--no-graphs", action="store_true")
    ap.add_argument("--no-precompile", action="store_true",
                    help="compile each architecture's Triton kernels at its first loop, not all up front")
    ap.add_argument("--full", action="store_true", help="also run the whole study and record its wall time")
    ap.add_argument("--db", default="results/gpu_study.sqlite", help="results database of --full")
    ap.add_argument("--name", default="paper-bench", help="study name of --full")
    ap.add_argument("--concurrency", type=int, help="populations in flight in --full (default psa's)")
    ap.add_argument("--out", help="JSON output (default bench/results/gpu_study-<device>.json)")
    args = ap.parse_args()

    from rich.console import Console
    from rich.table import Table

    console = Console(width=150)
    device = torch.device(args.device)
    if device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device() if device.index is None else device.index)
    steps = args.steps if args.steps is not None else (None if device.type == "cuda" else 4)
    desc = describe_device(device)
    console.print(f"device {desc}, torch {torch.__version__}")
    peaks = device_peaks(device)
    console.print("peaks: " + ", ".join(f"{k} {v:.1f}" for k, v in peaks.items()))
    ds = psa_data.load("mnist", device=device)
    ex = resolve_execution(device, args.precision, args.kernels, not args.no_graphs)
    archs = args.arch or [a.short for a in study_architectures()]
    precompile_s = None
    if not args.no_precompile and ex.triton:
        # as psa study does: every architecture's kernel variants compiled in parallel first
        t0 = time.perf_counter()
        members = [HP.member(m, s) for s in SEEDS for m in MODES]
        launches = [lc for a in archs for lc in kernel_launches(parse_arch(a), members, ds, HP, ex)]
        n = kernels.precompile(launches, device)
        precompile_s = time.perf_counter() - t0
        console.print(f"precompiled {n} kernel variants in {precompile_s:.1f} s")
    rows = []
    for a in archs:
        r = time_architecture(a, ds, ex, args.loops, steps)
        rows.append(r)
        console.print(f"{a:>9} {r['loop_s'] * 1e3:9.1f} ms/loop  {r['tflops']:7.3g} TFLOP/s  "
                      f"first {r['first_loop_s']:6.2f} s  est {fmt_seconds(r['est_100_loops_s']):>8}"
                      f"{'  triton-stack' if r['triton_stack'] else ''}{'  graphs' if r['graphs'] else ''}")
        if device.type == "cuda":
            torch.cuda.empty_cache()
    total = sum(r["est_100_loops_s"] for r in rows)
    flops = sum(arch_flops(r["arch"], META_LOOPS) * r["members"] for r in rows)
    t = Table(title=f"gpu_study on {desc}: 60 members x {META_LOOPS} meta-loops per architecture")
    for col in ("arch", "params", "loop ms", "TFLOP/s", "first s", "est 100 loops"):
        t.add_column(col, justify="right")
    for r in sorted(rows, key=lambda r: -r["est_100_loops_s"]):
        t.add_row(r["arch"], f"{r['params']:,}", f"{r['loop_s'] * 1e3:.1f}", f"{r['tflops']:.3g}",
                  f"{r['first_loop_s']:.2f}", fmt_seconds(r["est_100_loops_s"]))
    console.print(t)
    console.print(f"{len(rows)} architectures, {flops / 1e15:.2f} PFLOP: {fmt_seconds(total)} one population at a "
                  f"time ({flops / total / 1e12:.3g} TFLOP/s overall)")
    result = {"device": desc, "torch": torch.__version__, "precision": ex.precision, "kernels": ex.kernels,
              "graphs": ex.graphs, "loops_timed": args.loops, "steps_timed": steps or EPOCH_STEPS,
              "peaks": peaks, "precompile_s": precompile_s, "architectures": rows, "estimate_s": total, "pflop": flops / 1e15,
              "date": time.strftime("%Y-%m-%d")}
    try:
        import triton

        result["triton"] = triton.__version__
    except ImportError:
        pass
    if args.full:
        Path(args.db).parent.mkdir(parents=True, exist_ok=True)
        full = run_full(args)
        result["full"] = full
        console.print(f"full study: exit {full['returncode']}, {fmt_seconds(full['wall_s'])} wall -> {args.db}")
    out = Path(args.out) if args.out else HERE / "results" / f"gpu_study-{slug(desc)}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    console.print(f"wrote {out}")


if __name__ == "__main__":
    main()
