"""Where a meta-loop's time goes, for the three classes of the paper's study, and what
populations in flight buy (issue 23, "Measure each class on the card, profile it").

1. `profile`: for each `--arch` (default one per class: `8*8` launch-bound small, `115*115`
   deep square, `2*939` wide shallow) its 60-member population (6 modes x 10 seeds, as the
   study builds it). Loop 1 (graph capture, kernel compilation) runs untimed; then one
   meta-loop runs under torch.profiler. Reported per architecture: the loop's wall time, the
   device's busy time (the union of its kernels' intervals) and so its idle share, kernel and
   graph launches per training step, device time by category (GEMM, Triton stack kernels,
   AdamW and other elementwise kernels, reductions, copies, other) and the top kernels.
   On a CPU the "device time" is the self time of the profiled operators, and idle is not
   measured.
2. `concurrency`: K engines of one small architecture (`--small`), each on its own CUDA
   stream, their meta-loops interleaved as `psa study`'s local backend does (launch every
   engine's loop, then take each result and launch its next): meta-loops per second for each
   K of `--k`, and the gain over K=1. This is what `--concurrency` can buy the study's
   launch-bound nets. Beside it, the host's seconds per meta-loop inside `launch()` (the
   loop's graph replays, its set-up and validation, queued without waiting): where K times
   that nears the wall time of K loops, one thread feeding the card is what limits K. Each K
   runs once per `--graph-steps` (default 1 and 196): the training steps one CUDA graph replay
   holds (psa.core.device.Execution.graph_steps); 196 replays a whole epoch at once, so the
   host launches one graph a loop instead of 196. Not yet the study's default: this is where a
   card says whether it pays (the same kernels in the same order: the same bits).

    python bench/gpu_profile.py --out $OUT/profile.json            # on the card (about 1-2 min)
    python bench/gpu_profile.py --device cpu --arch 1*8 --small 1*2 --k 1 2 --steps 2 --members 2

With `--steps N` each profiled loop trains on the first N batches only (the per-step numbers
hold; the loop's total does not): a full epoch of `115*115` is some 100k kernels to trace. The
concurrency part trains whole epochs on a card (on a CPU, `--steps` too, to stay quick).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

from psa.core import data as psa_data  # noqa: E402
from psa.core.arch import parse_arch  # noqa: E402
from psa.core.device import new_streams, resolve_execution, synchronize  # noqa: E402
from psa.core.hparams import HParams  # noqa: E402
from psa.core.member import MODES  # noqa: E402
from psa.core.mlp.engine import Engine  # noqa: E402
from psa.core.mlp.population import Population  # noqa: E402

HP = HParams()  # the paper's
CLASSES = {"8*8": "launch-bound small", "115*115": "deep square", "2*939": "wide shallow"}
# device kernels (CUDA names) and CPU operators (aten names) by what they do; first match wins
CATEGORIES = [
    ("triton stack", r"stack_(fwd|bwd)|_stack_|stack_forward|stack_backward|cpu_stack|_stage_kernel"),
    ("gemm", r"gemm|gemv|xmma|cutlass|cublas|sm\d+_|matmul|aten::(bmm|baddbmm|mm|addmm|linear)"),
    ("reduction", r"reduce|softmax|nll|argmax|max_|aten::(sum|mean|amax|argmax|max|log_softmax|nll_loss|eq)"),
    ("copy", r"memcpy|memset|copy|aten::(copy_|clone|to|_to_copy|fill_|zero_|index|gather|scatter)"),
    ("adamw/elementwise", r"elementwise|vectorized|foreach|adam|unrolled|aten::(add|mul|div|sub|addcmul|addcdiv|"
                          r"sqrt|lerp|where|relu|threshold|clamp|maximum|exp|neg|rsub)"),
]
LAUNCH_CALLS = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cudaGraphLaunch", "cuLaunchKernelEx")


def category(name: str) -> str:
    """The category of a kernel or operator name (CATEGORIES)."""
    for label, pattern in CATEGORIES:
        if re.search(pattern, name, flags=re.IGNORECASE):
            return label
    return "other"


def busy_seconds(intervals: list[tuple[float, float]]) -> float:
    """The length of the union of (start, end) intervals (microseconds in, seconds out)."""
    total, end = 0.0, float("-inf")
    for s, e in sorted(intervals):
        if s > end:
            total += e - s
            end = e
        elif e > end:
            total += e - end
            end = e
    return total / 1e6


def population(arch: str, ds: psa_data.Dataset, ex: Any, members: int, steps: int | None, stream: Any = None
               ) -> Engine:
    """The study's population of `arch` (the first `members` of its 60) on `ds`, as an engine."""
    every = [HP.member(m, s) for s in range(10) for m in MODES]
    pop = Population.create(parse_arch(arch), every[:members], ds.device, n_val=ds.val_y.numel())
    sub = ds
    if steps is not None:
        n = min(ds.train_x.shape[0], steps * HP.batch_size)
        sub = dataclasses.replace(ds, train_x=ds.train_x[:n], train_y=ds.train_y[:n])
    return Engine(pop, sub, HP, ex, stream=stream)


def profile_arch(arch: str, ds: psa_data.Dataset, ex: Any, members: int, steps: int | None, top: int) -> dict:
    """One profiled meta-loop of `arch`, after an untimed first loop."""
    from torch.profiler import ProfilerActivity, profile

    device = ds.device
    eng = population(arch, ds, ex, members, steps)
    eng.meta_loop()  # capture, compile, allocate
    synchronize(device)
    n_steps = -(-eng.data.train_x.shape[0] // HP.batch_size)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        eng.meta_loop()
        synchronize(device)
        wall = time.perf_counter() - t0
    by_cat: dict[str, float] = defaultdict(float)
    by_name: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    intervals: list[tuple[float, float]] = []
    launches = 0
    on_device = device.type == "cuda"
    for e in prof.events():
        if e.name in LAUNCH_CALLS:
            launches += 1
        is_kernel = on_device and e.device_type == torch.autograd.DeviceType.CUDA
        if on_device and not is_kernel:
            continue
        seconds = (e.time_range.end - e.time_range.start) / 1e6 if is_kernel else e.self_cpu_time_total / 1e6
        if not is_kernel and (not e.name.startswith("aten::") and "stack" not in e.name):
            continue  # on a CPU: operators only, not the Python-level ranges around them
        if is_kernel:
            intervals.append((e.time_range.start, e.time_range.end))
        by_cat[category(e.name)] += seconds
        entry = by_name[e.name]
        entry[0] += seconds
        entry[1] += 1
    # kernels replayed inside a CUDA graph are traced only where CUPTI reports graph nodes: none
    # seen means nothing was measured, not an idle device
    busy = busy_seconds(intervals) if intervals else None
    ranked = sorted(by_name.items(), key=lambda kv: -kv[1][0])[:top]
    return {"arch": arch, "class": CLASSES.get(arch, ""), "members": eng.population.size, "steps": n_steps,
            "precision": eng.paths.precision, "triton_stack": eng.paths.triton_stack, "graphs": eng.use_graphs,
            "loop_s": wall, "busy_s": busy, "idle_share": None if busy is None else max(0.0, 1 - busy / wall),
            "launches_per_step": launches / n_steps if on_device else None, "category_s": dict(sorted(by_cat.items(), key=lambda kv: -kv[1])),
            "top": [{"name": n[:120], "seconds": s, "count": int(c)} for n, (s, c) in ranked]}


def concurrency(arch: str, ds: psa_data.Dataset, ex: Any, members: int, steps: int | None, ks: list[int],
                loops: int, graph_steps: list[int] | None = None) -> list[dict]:
    """Meta-loops per second of K engines of `arch` in flight at once, for each K of `ks` and
    each number of training steps per CUDA graph replay of `graph_steps` (Execution.graph_steps;
    [1], the default, where there are no graphs); the gain is over the first of each at K=1."""
    device = ds.device
    out: list[dict[str, Any]] = []
    first_lkg: dict[int, torch.Tensor] = {}  # per K: engine 0's LKG after its loops, at the first graph_steps
    for g, k in [(g, k) for g in (graph_steps or [1]) for k in ks]:
        exg = dataclasses.replace(ex, graph_steps=g)
        streams = new_streams(device, k) if device.type == "cuda" else [None] * k
        t_setup = time.perf_counter()
        engines = [population(arch, ds, exg, members, steps, stream=s) for s in streams]
        for eng in engines:
            eng.meta_loop()  # capture and compile outside the timing
        synchronize(device)
        setup = time.perf_counter() - t_setup
        launching = [0.0]

        def launch(eng: Engine) -> Any:
            t = time.perf_counter()
            loop = eng.launch()
            launching[0] += time.perf_counter() - t
            return loop

        t0 = time.perf_counter()
        pending = [launch(eng) for eng in engines]
        done = 0
        while done < k * loops:
            for i, eng in enumerate(engines):
                if pending[i] is None:
                    continue
                pending[i].result()
                done += 1
                pending[i] = launch(eng) if eng.population.loop < 1 + loops else None
        synchronize(device)
        wall = time.perf_counter() - t0
        # the same members and loops at any graph_steps: the same bits, or the graphs are wrong
        lkg = engines[0].population.lkg.clone()
        same = bool(torch.equal(first_lkg.setdefault(k, lkg), lkg))
        out.append({"arch": arch, "k": k, "graph_steps": g, "loops_each": loops, "wall_s": wall,
                    "loops_per_s": k * loops / wall, "launch_s_per_loop": launching[0] / (k * loops),
                    "setup_s": setup, "same_bits": same})
        del engines, pending
    for r in out:  # over the first row: the first graph_steps, the fewest in flight (ks sorted)
        r["gain"] = r["loops_per_s"] / out[0]["loops_per_s"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--arch", nargs="+", default=list(CLASSES), help="architectures to profile")
    ap.add_argument("--small", nargs="+", default=["1*2", "8*8"], help="architectures for the concurrency part")
    ap.add_argument("--k", nargs="+", type=int, default=[1, 2, 4, 8], help="populations in flight")
    ap.add_argument("--loops", type=int, default=3, help="timed meta-loops per engine in the concurrency part")
    ap.add_argument("--graph-steps", nargs="+", type=int, default=[1, 196],
                    help="training steps per CUDA graph replay in the concurrency part (196: a whole epoch; "
                         "without graphs only 1 applies)")
    ap.add_argument("--steps", type=int, default=16, help="training batches per profiled loop (0: the whole epoch)")
    ap.add_argument("--members", type=int, default=60, help="members per population (the study's 60)")
    ap.add_argument("--precision", choices=("auto", "fp32", "tf32", "bf16"), default="auto")
    ap.add_argument("--no-graphs", action="store_true", help="launch every kernel eagerly (no CUDA graphs)")
    ap.add_argument("--top", type=int, default=8, help="kernels listed per architecture")
    ap.add_argument("--parts", nargs="+", choices=("profile", "concurrency"), default=["profile", "concurrency"])
    ap.add_argument("--out", type=Path, help="write the results as JSON here")
    args = ap.parse_args()
    if (not 1 <= args.members <= 60 or min(args.k) < 1 or args.loops < 1 or args.steps < 0
            or min(args.graph_steps) < 1):
        ap.error("--members must be 1..60, --k, --loops and --graph-steps at least 1, --steps at least 0")
    device = torch.device(args.device)
    ex = resolve_execution(device, args.precision, graphs=not args.no_graphs)
    ds = psa_data.load("mnist", device=device)
    steps = args.steps or None
    on_card = device.type == "cuda"
    doc: dict[str, Any] = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                           "torch": torch.__version__, "precision": ex.precision, "graphs": not args.no_graphs,
                           "steps": steps,
                           "date": time.strftime("%Y-%m-%d"), "profile": [], "concurrency": []}

    def save() -> None:  # after every row: a timeout keeps what was measured
        if args.out:
            tmp = args.out.with_name(args.out.name + ".tmp")
            tmp.write_text(json.dumps(doc, indent=1) + "\n")
            tmp.replace(args.out)

    graph_steps = sorted(set(args.graph_steps)) if ex.graphs else [1]
    doc["graph_steps"] = graph_steps
    if "profile" in args.parts:
        print(f"| arch | class | loop s ({steps or 'all'} steps) | busy s | idle | launches/step | "
              "gemm | triton stack | adamw/elementwise | reduction | copy | other |")
        print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for arch in args.arch:
            r = profile_arch(arch, ds, ex, args.members, steps, args.top)
            doc["profile"].append(r)
            cat = r["category_s"]
            cells = " | ".join(f"{cat.get(c, 0.0):.4f}" for c in
                               ("gemm", "triton stack", "adamw/elementwise", "reduction", "copy", "other"))
            busy = "-" if r["busy_s"] is None else f"{r['busy_s']:.4f}"
            idle = "-" if r["idle_share"] is None else f"{r['idle_share']:.0%}"
            per_step = "-" if r["launches_per_step"] is None else f"{r['launches_per_step']:.1f}"
            print(f"| {arch} | {r['class']} | {r['loop_s']:.4f} | {busy} | {idle} | {per_step} | {cells} |", flush=True)
            save()
    if "concurrency" in args.parts:
        print("\n| arch | steps per graph | populations in flight | meta-loops/s | gain | host s per loop in launch() "
              "| set-up s | same bits |")
        print("|---|---:|---:|---:|---:|---:|---:|---|")
        for arch in args.small:
            # whole epochs: a loop's share of validation and bookkeeping is what overlaps
            for r in concurrency(arch, ds, ex, args.members, None if on_card else steps, sorted(set(args.k)),
                                 args.loops, graph_steps):
                doc["concurrency"].append(r)
                print(f"| {arch} | {r['graph_steps']} | {r['k']} | {r['loops_per_s']:.2f} | {r['gain']:.2f}x | "
                      f"{r['launch_s_per_loop']:.4f} | {r['setup_s']:.2f} | {'yes' if r['same_bits'] else 'NO'} |",
                      flush=True)
                save()
    save()


if __name__ == "__main__":
    main()
