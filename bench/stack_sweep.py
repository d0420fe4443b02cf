"""Time the stack kernels' launch settings on a card: rows per program, warps and (wide
stacks) pipeline depth, for the paper's deep squares (issue 23: "the kernel's occupancy, tile
shapes and weight staging decide them") and its deep narrow nets.

`psa.core.kernels.launch.launch_config` takes its settings from a fixed table (wide
stacks: the most rows that compile without spills, docs/gpu.md#launch-configurations) and from
row budgets (narrow ones: at most 256 rows a program at width 1, so that a 60-member
population of `2048*1` is 60 programs of one warp on a card of 132 SMs), made without a card to
time them. This bench times the alternatives on the card, one direction at a time, on the
shapes a study trains: a 60-member population (6 modes x 10 seeds, half of them with dropout),
a full batch of 256 rows, every middle layer of the architecture. For each (architecture,
precision) it stages the weights once (wide stacks: `stage_weights`, timed), then for every candidate
setting of the forward (training) and of the backward (with its weight-gradient product, which
no setting changes) compiles it (all candidates in parallel, `triton_stack.precompile`), runs
it `--reps` times after a warm-up and records the median in ms, and how far its output is
from the table's setting's (0 where the same products run; the tensor cores' instruction can
change with the rows, and with it the order of a product's sums). A candidate that does not
compile or launch is recorded with its error. Last, per case, the step's stack time with the
table's settings and with the fastest candidates, and what that is over 100 meta-loops of 196
steps.

    python bench/stack_sweep.py --out $OUT/stack-sweep.json            # on the card, about a minute
    TRITON_INTERPRET=1 python bench/stack_sweep.py --device cpu --arch 3*40 --members 2 --rows 16 --reps 1 --quick

Results: bench/results/stack-sweep-<card>.json (via `bench/paper_study.py collect`). Compare
timings only within one file: one card, one call.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

from psa.core import rng  # noqa: E402
from psa.core.arch import parse_arch  # noqa: E402
from psa.core.device import resolve_device, synchronize  # noqa: E402
from psa.core.kernels.launch import next_power_of_2  # noqa: E402

# the deep squares of the paper's study by padded width: 115*115 (128, 13% of the one-at-a-time
# estimate on an H200) and 35*35 (64); the deepest narrow ones, 2048*1 and 632*4 (1 and 4)
ARCHS = ["115*115", "35*35", "2048*1", "632*4"]
STEPS, LOOPS = 196, 100  # an epoch of the paper's 50,000 images in batches of 256; its meta-loops
# (rows per program, warps) to time per padded width, arithmetic (tensor-core dots, or fp32 on
# the FMA units; the narrow widths multiply on the FMA units in every precision) and direction,
# the wide ones each at pipeline depths 3 and 2: what compiles for sm_90 with Triton 3.6 without
# spilling (bench/kernel_registers.py --sweep, bench/results/kernel-registers-sm90.md), and two
# that spill a little: the 64-row tf32 backward at width 128 (240-252 bytes), the only backward
# there on wgmma (64 rows at least), and the 32-row fp32 backward at 128 (20-24 bytes), the
# table's next step from 16. The narrow ones: from the table's (256 rows at width 1, 128 at 4)
# down to 16 rows, for more programs on the serial chain of a deep net.
NARROW = {1: [(256, 1), (128, 1), (64, 1), (32, 1), (16, 1), (128, 4)],
          4: [(128, 4), (64, 2), (32, 1), (16, 1), (32, 2)]}
CANDIDATES: dict[tuple[int, str, str], list[tuple[int, int]]] = {
    **{(w, kind, d): c for w, c in NARROW.items() for kind in ("dot", "fp32") for d in ("forward", "backward")},
    (128, "dot", "forward"): [(16, 8), (32, 8), (64, 8)],
    (128, "dot", "backward"): [(16, 8), (32, 8), (64, 8)],
    (64, "dot", "forward"): [(32, 8), (64, 8), (128, 8), (32, 4), (64, 4), (64, 16)],
    (64, "dot", "backward"): [(32, 8), (64, 8), (32, 4), (64, 16)],
    (128, "fp32", "forward"): [(16, 8), (32, 8), (64, 16)],
    (128, "fp32", "backward"): [(16, 8), (32, 8)],
    (64, "fp32", "forward"): [(32, 8), (64, 8), (32, 4), (64, 4), (64, 16)],
    (64, "fp32", "backward"): [(32, 8), (64, 16)],
}


def has_candidates(padded: int) -> bool:
    """Whether CANDIDATES has settings for stacks of this padded width."""
    return any(k[0] == padded for k in CANDIDATES)


def candidates(padded: int, precision: str, backward: bool, quick: bool = False) -> list[tuple[int, int, int]]:
    """(rows per program, warps, stages) to time for one direction (CANDIDATES; the narrow
    kernels have no pipeline: one depth); `quick`: two."""
    from psa.core.kernels import triton_stack as K

    kind = "fp32" if precision == "fp32" else "dot"
    stages = (3, 2) if K.wide_path(padded) else (K.launch.wide_stages(),)
    out = [(r, w, s) for r, w in CANDIDATES[padded, kind, "backward" if backward else "forward"] for s in stages]
    return out[:2] if quick else out


def stack_case(arch: str, members: int, rows: int, device: torch.device, seed: int = 0) -> dict[str, Any]:
    """A population's hidden stack on `device`: flat weights (He-scaled, packed layout), z0, the
    upstream gradient, acts, and the dropout of every other member (the study's dropout mode)."""
    a = parse_arch(arch)
    width, n_layers = a.hidden[0], len(a.hidden)
    g = torch.Generator(device=device).manual_seed(seed)
    stride = members * width * (width + 1)
    flat = torch.randn((n_layers - 1) * stride, generator=g, device=device)
    mid = flat.view(n_layers - 1, stride)
    mid[:, :members * width * width] *= (2.0 / width) ** 0.5
    mid[:, members * width * width:] *= 0.1
    on = torch.arange(members, device=device) % 2 == 0
    p = 0.1
    thr = on.to(torch.int64) * rng.dropout_threshold(p)
    sc = torch.where(on, torch.tensor(1.0 / (1.0 - p), device=device), torch.tensor(1.0, device=device))
    ks = torch.randint(0, 2**32, (members,), generator=g, device=device, dtype=torch.int64)
    return {"arch": arch, "width": width, "layers": n_layers, "flat": flat, "stride": stride,
            "z0": torch.randn(members, rows, width, generator=g, device=device),
            "da": torch.randn(members, rows, width, generator=g, device=device),
            "acts": torch.empty(n_layers, members, rows, width, device=device), "drop": (ks, thr, sc)}


def median_ms(fn: Callable[[], Any], device: torch.device, reps: int) -> float:
    """The median wall time of `fn` in ms over `reps` runs after one warm-up (CUDA events on a
    GPU, the host clock elsewhere)."""
    fn()
    synchronize(device)
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def sweep_case(c: dict[str, Any], precision: str, reps: int, quick: bool, deadline: float) -> dict[str, Any]:
    """Every candidate of both directions of one case (see the module doc)."""
    from psa.core.kernels import triton_stack as K

    width, n_layers, flat, stride = c["width"], c["layers"], c["flat"], c["stride"]
    members, rows = c["z0"].shape[:2]
    device = flat.device
    b_off = members * width * width
    geometry = (0, b_off, stride)
    padded, table_rows_f, warps_f = K.launch_config(width, rows, precision)
    _, table_rows_b, warps_b = K.launch_config(width, rows, precision, backward=True)
    stages = K.launch.wide_stages()
    table = {"forward": (table_rows_f, warps_f, stages), "backward": (table_rows_b, warps_b, stages)}
    staged = K.stage_weights(flat, *geometry, n_layers, width, members, precision)
    grad = torch.zeros_like(flat)

    def forward() -> None:
        K.stack_forward(c["z0"], flat, *geometry, n_layers, width, acts=c["acts"], drop=c["drop"],
                        precision=precision, weights=staged)

    def backward() -> torch.Tensor:
        return K.stack_backward(c["da"], c["acts"], flat, grad, *geometry, n_layers, width, scale=c["drop"][2],
                                precision=precision, weights=staged)

    out: dict[str, Any] = {"arch": c["arch"], "precision": precision, "width": width, "padded": padded,
                           "layers": n_layers, "members": members, "rows": rows,
                           "table": {d: dict(zip(("rows", "warps", "stages"), t)) for d, t in table.items()},
                           "stage_ms": 0.0 if staged is None else median_ms(
                               lambda: K.stage_weights(flat, *geometry, n_layers, width, members, precision),
                               device, reps)}
    forward()
    reference_acts = c["acts"].clone()
    reference_dz0 = backward().clone()
    reference_grad = grad.clone()
    todo = {d: candidates(padded, precision, d == "backward", quick) for d in ("forward", "backward")}
    for d in todo:  # the table's own setting first: the yardstick, timed like the rest
        todo[d] = [table[d], *[t for t in todo[d] if t != table[d]]]
    # compile every candidate before timing any, in parallel (the launches recorded, not made)
    launches = []
    for d, settings in todo.items():
        for r, w, s in settings:
            with K.stack_settings(padded, precision, stages=s, **{d: (r, w)}), K.recording() as rec:
                forward() if d == "forward" else backward()
            launches += rec
    t0 = time.perf_counter()
    if device.type == "cuda":
        K.precompile(launches, device)
    out["compile_s"] = time.perf_counter() - t0
    for d, settings in todo.items():
        rows_out = out[d] = []
        for r, w, s in settings:
            row: dict[str, Any] = {"rows": r, "warps": w, "stages": s, "table": (r, w, s) == table[d]}
            rows_out.append(row)
            if time.perf_counter() > deadline:
                row["error"] = "not timed: out of time"
                continue
            try:
                with K.stack_settings(padded, precision, stages=s, **{d: (r, w)}):
                    if d == "forward":
                        row["ms"] = median_ms(forward, device, reps)
                        row["max_abs_diff"] = float((c["acts"] - reference_acts).abs().max())
                    else:
                        # on the table's activations, so that each setting's backward sees the same input
                        c["acts"].copy_(reference_acts)
                        row["ms"] = median_ms(backward, device, reps)
                        dz0 = backward()
                        row["max_abs_diff"] = max(float((dz0 - reference_dz0).abs().max()),
                                                  float((grad - reference_grad).abs().max()))
            except Exception as e:  # noqa: BLE001 - a setting that fails is a result, not the end of the sweep
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}" if str(e) else type(e).__name__
            c["acts"].copy_(reference_acts)
    timed = {d: [x for x in out[d] if "ms" in x] for d in ("forward", "backward")}
    if all(timed.values()):
        best = {d: min(timed[d], key=lambda x: x["ms"]) for d in timed}
        mine = {d: next((x for x in timed[d] if x["table"]), None) for d in timed}
        out["best"] = {d: {k: best[d][k] for k in ("rows", "warps", "stages", "ms")} for d in best}
        out["step_ms_best"] = out["stage_ms"] + best["forward"]["ms"] + best["backward"]["ms"]
        if all(mine.values()):
            out["step_ms_table"] = out["stage_ms"] + sum(x["ms"] for x in mine.values() if x)
            out["loops_s_table"] = out["step_ms_table"] * STEPS * LOOPS / 1e3
        out["loops_s_best"] = out["step_ms_best"] * STEPS * LOOPS / 1e3
    return out


def write_json(path: Path, doc: dict[str, Any]) -> None:
    """Atomically: a call cut off leaves the last complete document."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    tmp.replace(path)


def usage(message: str) -> None:
    print(f"stack_sweep: {message}", file=sys.stderr)
    sys.exit(2)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", nargs="+", default=ARCHS,
                   help=f"stacks of one width with candidates (default: {' '.join(ARCHS)})")
    p.add_argument("--precision", nargs="+", default=["tf32"], choices=["fp32", "tf32", "bf16"],
                   help="default tf32: psa's `auto` on a card")
    p.add_argument("--members", type=int, default=60, help="population size (the study's: 60)")
    p.add_argument("--rows", type=int, default=256, help="batch rows (the paper's batch: 256)")
    p.add_argument("--reps", type=int, default=10, help="timed runs per setting, after a warm-up")
    p.add_argument("--seconds", type=float, default=120.0, help="stop timing new settings after this long")
    p.add_argument("--quick", action="store_true", help="two settings per direction (for a test)")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default=None, help="write the results as JSON here (rewritten after each case)")
    args = p.parse_args()
    deadline = time.perf_counter() + args.seconds
    if min(args.members, args.rows, args.reps) < 1:
        usage("--members, --rows and --reps must be at least 1")
    try:
        device = resolve_device(args.device)
    except ValueError as e:
        usage(str(e))
    for a in args.arch:
        try:
            arch = parse_arch(a)
        except ValueError as e:
            usage(f"--arch {a}: {e}")
        if len(arch.hidden) < 2 or len(set(arch.hidden)) > 1 or not 1 <= arch.hidden[0] <= 128:
            usage(f"--arch {a}: needs two or more hidden layers of one width up to 128 (the stack kernels)")
        padded = next_power_of_2(arch.hidden[0])
        if not has_candidates(padded):
            usage(f"--arch {a}: no candidate settings for its padded width {padded} "
                  f"(stack_sweep.CANDIDATES has {sorted({k[0] for k in CANDIDATES})})")
    from psa.core.kernels import triton_stack as K

    if not K.available():
        usage("needs Triton and a CUDA GPU (or TRITON_INTERPRET=1 with --device cpu)")
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        usage("off a GPU the kernels run only in Triton's interpreter: set TRITON_INTERPRET=1")
    import triton

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    doc: dict[str, Any] = {"device": name, "torch": torch.__version__, "triton": triton.__version__,
                           "date": time.strftime("%Y-%m-%d", time.gmtime()), "reps": args.reps, "cases": []}
    print(f"{name}, torch {torch.__version__}, Triton {triton.__version__}: {args.members} members x {args.rows} rows")
    print(f"{'arch':>8} {'prec':>5} {'direction':>9} {'rows':>5} {'warps':>5} {'stages':>6} {'ms':>9} "
          f"{'max diff':>9}")
    for a in args.arch:
        for precision in args.precision:
            if time.perf_counter() > deadline:  # a case's set-up and compiles alone take seconds on a card
                print(f"{a} {precision}: not swept, out of time")
                continue
            c = stack_case(a, args.members, args.rows, device)
            res = sweep_case(c, precision, args.reps, args.quick, deadline)
            del c
            doc["cases"].append(res)
            for d in ("forward", "backward"):
                for x in res[d]:
                    ms = f"{x['ms']:9.3f}" if "ms" in x else f"{'-':>9}"
                    diff = f"{x['max_abs_diff']:9.2e}" if "max_abs_diff" in x else f"{'-':>9}"
                    print(f"{a:>8} {precision:>5} {d:>9} {x['rows']:>5} {x['warps']:>5} {x['stages']:>6} {ms} {diff}"
                          f"{'  (table)' if x['table'] else ''}{'  ' + x['error'] if 'error' in x else ''}",
                          flush=True)
            if "step_ms_best" in res:
                print(f"{a} {precision}: staging {res['stage_ms']:.3f} ms; stack per step "
                      f"{res.get('step_ms_table', float('nan')):.3f} ms with the table's settings, "
                      f"{res['step_ms_best']:.3f} ms with the fastest; over {LOOPS} meta-loops "
                      f"{res.get('loops_s_table', float('nan')):.1f} s -> {res['loops_s_best']:.1f} s")
            if args.out:
                write_json(Path(args.out), doc)
            if device.type == "cuda":
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
