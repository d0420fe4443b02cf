"""The narrow nets on the CPU: one meta-loop of a 60-member population (6 modes x 10 seeds)
on the plain torch path (`--kernels torch`) and with the fused CPU step (`--kernels auto`:
psa.core.kernels.cpu_stack.train_step, the whole forward and backward in one call), against the FLOP
floor.

FLOP floor of a meta-loop: 6 x parameters x 50,000 training images (forward 2, backward 4 per
parameter and image) + 2 x parameters x 10,000 validation images, per member, at the GEMM rate
this machine measures here (one large sgemm, best of 3, with the same threads), measured again
right before and after each architecture (the higher of the two: the stricter floor): on a
shared machine the rate moves with the load, and each row's ratios are against the rate of its
own minutes.

Both paths run in this process, alternating (torch, step, torch, ...), best of
`--repeat`. A meta-loop is timed as `--steps` training steps (a prefix of the epoch, set-up
included, on a training set of just those `--steps` x 256 images) scaled to the epoch's 196
steps, plus validation on all 10,000 images; the step count is the same for every path.
`--steps 0` times whole meta-loops on the whole 50,000-image training set instead: slower, but
the batch rows then come from memory as in a study (a 3,072-image training set stays in cache).
`--no-torch` leaves the torch path out (minutes a loop on the deepest nets).

    python bench/narrow_cpu.py                      # every study architecture of width <= 8
    python bench/narrow_cpu.py --arch 4*2 16*2 --threads 2
"""

from __future__ import annotations

import argparse
import time

import torch

MODES = ("none", "decay", "dropout", "full", "hidden", "output")
SEEDS = range(10)
EPOCH_STEPS = 196
N_TRAIN, N_VAL = 50_000, 10_000


def gemm_rate(n: int = 2048, repeat: int = 3) -> float:
    """FLOP/s of one (n x n) @ (n x n) float32 matmul, best of `repeat` after a warm-up."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    out = torch.empty(n, n)
    torch.mm(a, b, out=out)
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        torch.mm(a, b, out=out)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def floor_seconds(arch, rate: float, members: int = 60) -> float:
    """The FLOP floor of one meta-loop of `members` members of `arch` at `rate` FLOP/s."""
    return members * arch.params * (6 * N_TRAIN + 2 * N_VAL) / rate


def engines(arch, ds, steps: int, paths: tuple[str, ...]):
    """One engine per path ("torch", "step") on populations of 60 members, trained on `steps`
    batches."""
    from psa.core.data import Dataset
    from psa.core.device import resolve_execution
    from psa.core.mlp.engine import Engine
    from psa.core.hparams import HParams
    from psa.core.mlp.population import Population

    hp = HParams()
    n = steps * hp.batch_size if steps else ds.train_x.shape[0]
    sub = Dataset(ds.name, ds.train_x[:n], ds.train_y[:n], ds.val_x, ds.val_y, ds.test_x, ds.test_y, ds.source)
    out = []
    for path in paths:
        members = [hp.member(m, s) for s in SEEDS for m in MODES]
        pop = Population.create(arch, members, "cpu", n_val=ds.val_y.numel())
        eng = Engine(pop, sub, hp, resolve_execution("cpu", "fp32", "torch" if path == "torch" else "auto"))
        out.append(eng)
    return out


def loop_seconds(eng, steps: int) -> float:
    """One meta-loop of `eng`, its epoch of `steps` batches scaled to EPOCH_STEPS (0: the whole
    epoch, unscaled), validation whole."""
    t0 = time.perf_counter()
    eng.train_epoch(2)
    t_train = time.perf_counter() - t0
    if not steps:
        steps = EPOCH_STEPS
    t0 = time.perf_counter()
    eng.count_correct(eng.cand, eng.data.val_x, eng.data.val_y).tolist()
    t_val = time.perf_counter() - t0
    return t_train * EPOCH_STEPS / steps + t_val


def main() -> None:
    from psa.core import data
    from psa.core.arch import parse_arch, study_architectures

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", nargs="*", help="architectures (default: every study architecture of width <= 8)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=12,
                    help="training steps timed per meta-loop (scaled to 196); 0: whole epochs on all 50,000 images")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--no-torch", action="store_true", help="leave the plain torch path out")
    ap.add_argument("--gemm-size", type=int, default=2048,
                    help="n of the n x n sgemm that measures the GEMM rate (default 2048; smaller: a quicker, "
                         "lower rate)")
    args = ap.parse_args()
    paths = ("step",) if args.no_torch else ("torch", "step")
    torch.set_num_threads(args.threads)
    archs = ([parse_arch(a) for a in args.arch] if args.arch
             else [a for a in study_architectures() if max(a.hidden) <= 8])
    ds = data.load("mnist")
    rate = gemm_rate(args.gemm_size)
    epoch = (f"{args.steps} steps scaled to {EPOCH_STEPS}" if args.steps
             else f"a whole epoch ({EPOCH_STEPS} steps, {N_TRAIN:,} images)")
    print(f"cpu, {args.threads} threads; GEMM rate {rate / 1e9:.1f} GFLOP/s ({args.gemm_size}^3 sgemm, best of 3); "
          f"one meta-loop of 60 members = {epoch} + validation on {N_VAL:,}")
    print("| arch | params | GEMM GFLOP/s | FLOP floor s | " + " | ".join(f"{p} s" for p in paths) + " | "
          + " | ".join(f"{p}/floor" for p in paths) + " |" + (" step vs torch |" if len(paths) > 1 else ""))
    print("|---|---:|---:|---:|" + "---:|" * (2 * len(paths) + (len(paths) > 1)))
    for arch in archs:
        rate = gemm_rate(args.gemm_size)
        engs = engines(arch, ds, args.steps, paths)
        for eng in engs:  # warm-up: allocations, the library's first call
            eng.train_epoch(1)
        best = [float("inf")] * len(engs)
        for _ in range(args.repeat):
            for i, eng in enumerate(engs):
                best[i] = min(best[i], loop_seconds(eng, args.steps))
        rate = max(rate, gemm_rate(args.gemm_size))
        fl = floor_seconds(arch, rate)
        print(f"| {arch.short} | {arch.params:,} | {rate / 1e9:.0f} | {fl:.3f} | "
              + " | ".join(f"{t:.3f}" for t in best) + " | " + " | ".join(f"{t / fl:.1f}" for t in best)
              + " |" + (f" {best[0] / best[-1]:.2f}x |" if len(best) > 1 else ""), flush=True)


if __name__ == "__main__":
    main()
