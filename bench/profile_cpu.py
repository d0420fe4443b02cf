"""Where the CPU time of one meta-loop goes: a 60-member population (6 modes x 10 seeds) of
4*2, 16*2, 64*1 and 18*18, on the plain torch path (`--kernels torch`) and on the default
path (`--kernels auto`: the fused CPU step for nets whose hidden layers are one width up to 8),
phase by phase; then a tiny study's store writes and checkpoints (the host copies on the
scheduler's thread, the writes on the checkpoint writer's).

Phases are timed by wrapping the engine's own functions (nothing is re-implemented here):
- begin:        Chunk.begin: candidate = LKG, ablation, data order, dropout keys, AdamW reset
- gather+decay: a step's batch gather, weight decay and counter (the step minus the phases below)
- first layer:  the matmuls that read or write the 784-wide input (forward and weight gradient)
- other mm:     the hidden and output layers' matmuls (torch path: one per layer and direction)
- fused step:   psa.core.kernels.cpu_stack.train_step: gather, forward and backward in one call (default path)
- rest of f/b:  loss, softmax gradient, ReLU, dropout masks, bias gradients
- AdamW:        the fused AdamW step
- validation:   count_correct on the 10,000 validation images (the candidate's score)
- promote etc.: promotion, the loop's outcome read back, everything else of the loop

The epoch is `--steps` batches scaled to 196 (every per-step phase scaled alike); validation
and the rest run in full.

    python bench/profile_cpu.py --threads 2
"""

from __future__ import annotations

import argparse
import collections
import tempfile
import time
from pathlib import Path

import torch

MODES = ("none", "decay", "dropout", "full", "hidden", "output")
SEEDS = range(10)
EPOCH_STEPS = 196
PER_STEP = ("gather+decay", "first layer", "other mm", "fused step", "rest of f/b", "AdamW")
ORDER = ("begin", *PER_STEP, "validation", "promote etc.")


class Timers:
    """Seconds per phase, from wrappers around the engine's functions."""

    def __init__(self) -> None:
        self.t: dict[str, float] = collections.defaultdict(float)
        self.depth = 0

    def wrap(self, obj, name: str, phase, *, method: bool = False):
        """Replace obj.name by a timed call that adds to `phase` (a str, or fn(args) -> str|None)."""
        fn = getattr(obj, name)

        def timed(*args, **kwargs):
            ph = phase(args) if callable(phase) else phase
            if ph is None:
                return fn(*args, **kwargs)
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.t[ph] += time.perf_counter() - t0

        setattr(obj, name, timed)
        return fn


def profile_loop(arch_text: str, kernels: str, ds, steps: int) -> dict[str, float]:
    from psa.core.arch import parse_arch
    from psa.core.data import Dataset
    from psa.core.device import resolve_execution
    from psa.core.mlp.engine import Engine
    from psa.core.hparams import HParams
    from psa.core.kernels import cpu_stack
    from psa.core.mlp import chunk as chunk_mod
    from psa.core.mlp import step as step_mod
    from psa.core.mlp.population import Population

    arch = parse_arch(arch_text)
    hp = HParams()
    n = steps * hp.batch_size
    sub = Dataset(ds.name, ds.train_x[:n], ds.train_y[:n], ds.val_x, ds.val_y, ds.test_x, ds.test_y, ds.source)
    members = [hp.member(m, s) for s in SEEDS for m in MODES]
    pop = Population.create(arch, members, "cpu", n_val=ds.val_y.numel())
    eng = Engine(pop, sub, hp, resolve_execution("cpu", "fp32", "torch" if kernels == "torch" else "auto"))
    eng.meta_loop()  # loop 1: allocations, the library's first call
    tm = Timers()
    n_in = arch.n_in
    originals = []
    in_step = [False]

    def mm_phase(args):
        if not in_step[0]:
            return None  # validation's matmuls count as validation
        return "first layer" if any(isinstance(a, torch.Tensor) and a.shape[-1] == n_in for a in args) else "other mm"

    for name in ("bmm", "baddbmm", "addmm"):
        originals.append((eng.paths.mm, name, tm.wrap(eng.paths.mm, name, mm_phase)))
    originals.append((cpu_stack, "train_step", tm.wrap(cpu_stack, "train_step",
                                                         lambda a: "fused step" if in_step[0] else None)))
    # the engine's AdamW step (psa.core.optim.adamw_step, as the step module that calls it imported it):
    # after its first step it calls the fused kernel without torch.optim.AdamW.step
    originals.append((step_mod, "adamw_step", tm.wrap(step_mod, "adamw_step", "AdamW")))
    originals.append((chunk_mod.Chunk, "begin", tm.wrap(chunk_mod.Chunk, "begin", "begin")))
    originals.append((eng, "count_correct", tm.wrap(eng, "count_correct", "validation")))
    fb = eng.step.forward_backward
    step = eng.step

    def timed_fb(*a, **k):
        t0 = time.perf_counter()
        try:
            return fb(*a, **k)
        finally:
            tm.t["f/b"] += time.perf_counter() - t0

    def timed_step(*a, **k):
        in_step[0] = True
        t0 = time.perf_counter()
        try:
            return step(*a, **k)
        finally:
            in_step[0] = False
            tm.t["step"] += time.perf_counter() - t0

    step.forward_backward = timed_fb  # type: ignore[method-assign]
    eng.step = timed_step  # type: ignore[assignment]  # the chunks call what the engine hands them
    t0 = time.perf_counter()
    eng.meta_loop()
    total = time.perf_counter() - t0
    for obj, name, fn in originals:
        setattr(obj, name, fn)
    t = tm.t
    t["rest of f/b"] = t["f/b"] - t["first layer"] - t["other mm"]
    t["gather+decay"] = t["step"] - t["f/b"] - t["fused step"] - t["AdamW"]
    t["promote etc."] = total - t["begin"] - t["step"] - t["validation"]
    scale = EPOCH_STEPS / steps
    out = {k: t[k] * (scale if k in PER_STEP else 1.0) for k in ORDER}
    out["total"] = sum(out.values())
    return out


def profile_study(trials: int = 10, meta_loops: int = 3, train_subset: int = 2560) -> dict[str, float]:
    """A tiny study in this process (4*2, `trials` trials of 6 modes, `meta_loops` meta-loops on
    `train_subset` images, a checkpoint every loop): its wall time, and the time inside the
    store's writes, the checkpoints' host copies (the scheduler's thread) and their writes (the
    checkpoint writer's thread, beside it)."""
    from psa.cli import main
    from psa.study import checkpoints, driver, store

    tm = Timers()
    originals = [(store, n, tm.wrap(store, n, "store writes")) for n in
                 ("record_loop", "finish_trials", "mark_running", "create_study", "start_run", "end_run")]
    originals.append((driver, "host_copy", tm.wrap(driver, "host_copy", "checkpoint copies")))
    originals.append((checkpoints, "save_tensors", tm.wrap(checkpoints, "save_tensors", "checkpoint writes")))
    with tempfile.TemporaryDirectory() as tmp:
        argv = ["study", "--arch", "4*2", "--trials", str(trials), "--meta-loops", str(meta_loops),
                "--train-subset", str(train_subset),
                "--db", str(Path(tmp) / "p.db"), "--name", "profile", "--quiet", "--checkpoint-every", "1"]
        t0 = time.perf_counter()
        try:
            rc = main(argv)
        except SystemExit as e:
            rc = e.code
        if rc not in (0, None):  # psa reports a user error by its status: timings of a failed study mean nothing
            raise SystemExit(f"the tiny study failed (psa exit status {rc})")
        total = time.perf_counter() - t0
    for obj, name, fn in originals:
        setattr(obj, name, fn)
    return {"study wall": total, "store writes": tm.t["store writes"], "checkpoint copies": tm.t["checkpoint copies"],
            "checkpoint writes": tm.t["checkpoint writes"]}


def main() -> None:
    from psa.core import data

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", nargs="*", default=["4*2", "16*2", "64*1", "18*18"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--trials", type=int, default=10, help="the tiny study's trials per mode")
    ap.add_argument("--meta-loops", type=int, default=3, help="the tiny study's meta-loops")
    ap.add_argument("--train-subset", type=int, default=2560, help="the tiny study's training images")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ds = data.load("mnist")
    cols = [(a, k) for a in args.arch for k in ("torch", "auto")]
    res = {c: profile_loop(c[0], c[1], ds, args.steps) for c in cols}
    print(f"one meta-loop, 60 members, cpu {args.threads} threads, seconds ({args.steps} steps scaled to {EPOCH_STEPS})")
    print("| phase | " + " | ".join(f"{a} {k}" for a, k in cols) + " |")
    print("|---|" + "---:|" * len(cols))
    for ph in (*ORDER, "total"):
        print(f"| {ph} | " + " | ".join(f"{res[c][ph]:.3f}" for c in cols) + " |")
    st = profile_study(args.trials, args.meta_loops, args.train_subset)
    print()
    print(f"tiny study (4*2, {6 * args.trials} trials, {args.meta_loops} meta-loops on {args.train_subset:,} images, "
          "checkpoint every loop), seconds")
    print("| study wall | store writes | checkpoint copies | checkpoint writes (background) |")
    print("|---:|---:|---:|---:|")
    print(f"| {st['study wall']:.2f} | {st['store writes']:.3f} | {st['checkpoint copies']:.3f} | "
          f"{st['checkpoint writes']:.3f} |")


if __name__ == "__main__":
    main()
