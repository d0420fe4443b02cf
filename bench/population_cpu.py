"""One meta-loop of a 60-member population (6 modes x 10 seeds), four ways, on this CPU.

- engine:           psa's population engine (one batched matmul per layer for all members);
- one-by-one:       the paper's harness, one model after another, DataLoader over a
                    TensorDataset, torch's default AdamW (foreach);
- one-by-one fused: the strongest plain per-trial PyTorch loop: the same models one after
                    another, but AdamW(fused=True) (what the engine uses) and batches sliced
                    from the tensors on a shuffled index instead of a DataLoader;
- vmap:             the off-the-shelf ensemble, torch.func.stack_module_state +
                    vmap(functional_call), fused AdamW, gathering one batch per seed group (the
                    six modes of a seed share their data order, as in the engine).

Ratios are quoted against the strongest peer: the fastest of the three others on each
architecture.

Each (architecture, method) runs in its own process so that its peak memory (resident memory
above the process's footprint once MNIST is loaded) is its own. Large nets are timed on prefixes of the
epoch of `steps` and 2 x `steps` batches: the difference gives the cost per step, the rest the
fixed cost per meta-loop (cloning, a fresh optimizer, promotion), and the meta-loop is their sum
for 196 steps; validation over all 10,000 images is always timed in full. The one-by-one baseline times `sampled` of the 60
models (every mode equally) and scales by 60 / sampled.

    python bench/population_cpu.py                 # the eight architectures
    python bench/population_cpu.py --arch 1*8 4*4  # a subset
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import resource
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

ARCHS = ["1*8", "4*4", "8*8", "18*18", "64*1", "1*128", "2*354", "1*2048"]
MODES = ("none", "decay", "dropout", "full", "hidden", "output")
SEEDS = range(10)
EPOCH_STEPS = 196
METHODS = ("engine", "one-by-one", "one-by-one-fused", "vmap")
PEERS = METHODS[1:]


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def reset_peak() -> float:
    """Reset the kernel's high-water mark of resident memory; returns the current RSS (MB)."""
    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    return _status_mb("VmRSS")


def peak_mb() -> float:
    """Peak resident memory (MB) since the last reset_peak()."""
    return _status_mb("VmHWM")


def plan(arch, steps: int | None = None, sampled: int | None = None) -> tuple[int, int]:
    """(timed steps, sampled one-by-one models): whole epochs while that stays quick; `steps` and
    `sampled` override the choice by size."""
    if arch.params <= 30_000:
        auto = EPOCH_STEPS, 12
    elif arch.params <= 200_000:
        auto = 48, 6
    else:
        auto = 12, 6
    return (auto[0] if steps is None else steps), (auto[1] if sampled is None else sampled)


def truncated(ds, steps: int):
    from psa.core.data import Dataset

    n = min(ds.train_x.shape[0], steps * 256)
    return Dataset(ds.name, ds.train_x[:n], ds.train_y[:n], ds.val_x, ds.val_y, ds.test_x, ds.test_y, ds.source)


def time_engine(arch, ds, steps):
    from psa.core.device import resolve_execution
    from psa.core.mlp.engine import Engine
    from psa.core.hparams import HParams
    from psa.core.mlp.population import Population

    hp = HParams()
    members = [hp.member(m, s) for s in SEEDS for m in MODES]
    pop = Population.create(arch, members, "cpu", n_val=ds.val_y.numel())
    # as `psa study` and `psa train` resolve it by default (--kernels auto: the fused CPU step for
    # nets of one width up to 8); a bare Execution would be the plain torch path
    eng = Engine(pop, truncated(ds, steps), hp, resolve_execution("cpu", "fp32", "auto"))
    eng.meta_loop()  # warm-up (loop 1): allocations, kernels
    t0 = time.perf_counter()
    eng.meta_loop()  # loop 2: clone, ablate, train, validate, promote
    t_loop = time.perf_counter() - t0
    t0 = time.perf_counter()
    eng.count_correct(eng.cand, ds.val_x, ds.val_y).tolist()
    t_val = time.perf_counter() - t0
    t_train = t_loop - t_val
    return t_train, t_val


def time_one_by_one(arch, ds, steps, sampled, fused=False):
    """The paper's harness: per trial, clone the LKG, ablate, an epoch, evaluate. With `fused`,
    the strongest plain version of it: fused AdamW, batches sliced from the data tensors."""
    from torch.utils.data import DataLoader, TensorDataset

    from psa.core.ablation import choose_neuron
    from psa.core.model import SimpleMLP

    sub = truncated(ds, steps)
    if fused:
        n = sub.train_x.shape[0]

        def train_loader_fn():
            order = torch.randperm(n)
            for s in range(0, n, 256):
                idx = order[s : s + 256]
                yield sub.train_x[idx], sub.train_y[idx]

        val_loader = [(ds.val_x[c : c + 1000], ds.val_y[c : c + 1000]) for c in range(0, ds.val_x.shape[0], 1000)]
    else:
        loader = DataLoader(TensorDataset(sub.train_x, sub.train_y), batch_size=256, shuffle=True, num_workers=0)
        train_loader_fn = lambda: loader  # noqa: E731
        val_loader = DataLoader(TensorDataset(ds.val_x, ds.val_y), batch_size=256, shuffle=False, num_workers=0)
    picks = [(m, s) for s in SEEDS for m in MODES][:sampled]
    t_train = t_val = 0.0
    for i, (mode, seed) in enumerate([picks[0]] + picks):  # the first one is a warm-up
        torch.manual_seed(seed)
        lkg = SimpleMLP(arch, dropout=0.1 if mode == "dropout" else 0.0)
        t0 = time.perf_counter()
        model = copy.deepcopy(lkg)
        a = choose_neuron(arch, mode, seed, 2)
        if a is not None:
            with torch.no_grad():
                lin = model.linears()
                lin[a[0]].weight[a[1]].zero_()
                lin[a[0]].bias[a[1]].zero_()
                if mode == "hidden":
                    lin[a[0] + 1].weight[:, a[1]].zero_()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=1e-4 if mode == "decay" else 0.0,
                                **({"fused": True} if fused else {}))
        model.train()
        for x, y in train_loader_fn():
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
        t1 = time.perf_counter()
        model.eval()
        correct = 0
        with torch.no_grad():
            for x, y in val_loader:
                correct += int((model(x).argmax(1) == y).sum())
        t2 = time.perf_counter()
        if i > 0:
            t_train += t1 - t0
            t_val += t2 - t1
    scale = len(MODES) * len(SEEDS) / sampled
    return t_train * scale, t_val * scale


def time_vmap(arch, ds, steps):
    """torch.func ensemble: stacked parameters, vmap over functional_call, one AdamW.

    vmap cannot give members different dropout rates or weight decays, so every member
    trains as `none` here: a lower bound on this approach's cost for the mixed population.
    AdamW is the fused one, as in the engine.
    """
    from torch.func import functional_call, stack_module_state, vmap

    from psa.core.model import SimpleMLP

    m = len(MODES) * len(SEEDS)
    models = []
    for s in SEEDS:
        for _ in MODES:
            torch.manual_seed(s)
            models.append(SimpleMLP(arch))
    params, buffers = stack_module_state(models)
    base = copy.deepcopy(models[0]).to("meta")

    def loss_fn(p, b, x, y):
        return F.cross_entropy(functional_call(base, (p, b), (x,)), y)

    def logits_fn(p, b, x):
        return functional_call(base, (p, b), (x,))

    # members are seed-major (seed k's six modes at 6k..6k+5) and share seed k's data order,
    # as in the engine: one batch gathered per seed group, then handed to each of its members
    # (vmap maps one dimension, so each member needs its row of a (60, b, 784) input; a nested
    # vmap over the groups, sharing the batch with in_dims None, measured 10x slower on 4*4)
    k = len(MODES)
    g_count = m // k
    batched_loss = vmap(loss_fn, randomness="different")
    batched_logits = vmap(logits_fn, in_dims=(0, 0, None))
    n = min(ds.train_x.shape[0], steps * 256)
    g = torch.Generator().manual_seed(0)
    orders = torch.stack([torch.randperm(n, generator=g) for _ in range(g_count)])
    group_of = torch.arange(m) // k

    def epoch(n_steps):
        opt = torch.optim.AdamW(list(params.values()), lr=1e-4, weight_decay=0.0, fused=True)
        for s in range(n_steps):
            idx = orders[:, s * 256 : (s + 1) * 256]
            x = ds.train_x[idx].index_select(0, group_of)  # 10 random gathers, 60 contiguous copies
            y = ds.train_y[idx].index_select(0, group_of)
            opt.zero_grad()
            batched_loss(params, buffers, x, y).sum().backward()
            opt.step()

    epoch(2)  # warm-up
    t0 = time.perf_counter()
    epoch(-(-n // 256))
    t_train = time.perf_counter() - t0
    t0 = time.perf_counter()
    with torch.no_grad():
        correct = torch.zeros(m, dtype=torch.int64)
        for c in range(0, ds.val_x.shape[0], 1000):
            correct += (batched_logits(params, buffers, ds.val_x[c : c + 1000]).argmax(2) == ds.val_y[c : c + 1000]).sum(1)
    t_val = time.perf_counter() - t0
    return t_train, t_val


def measure(arch_text: str, method: str, steps: int | None = None, sampled: int | None = None) -> dict:
    from psa.core import data
    from psa.core.arch import parse_arch

    arch = parse_arch(arch_text)
    ds = data.load()
    steps, sampled = plan(arch, steps, sampled)
    base = reset_peak()
    timer = {
        "engine": time_engine,
        "one-by-one": lambda a, d, k: time_one_by_one(a, d, k, sampled),
        "one-by-one-fused": lambda a, d, k: time_one_by_one(a, d, k, sampled, fused=True),
        "vmap": time_vmap,
    }[method]
    t_train, t_val = timer(arch, ds, steps)
    if steps < EPOCH_STEPS:  # two prefixes: fixed cost + cost per step
        t_double, _ = timer(arch, ds, 2 * steps)
        per_step = (t_double - t_train) / steps
        t_train = (t_train - per_step * steps) + per_step * EPOCH_STEPS
    loop_s = t_train + t_val
    return {"arch": arch_text, "params": arch.params, "method": method, "steps": steps,
            "sampled": sampled if method.startswith("one-by-one") else 60,
            "train_s": t_train, "val_s": t_val, "meta_loop_s": loop_s, "peak_mb": peak_mb() - base}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", nargs="+", default=ARCHS)
    ap.add_argument("--methods", nargs="+", default=list(METHODS))
    ap.add_argument("--steps", type=int, help="training steps timed per meta-loop, scaled to 196 (default: a whole "
                    "epoch up to 30,000 parameters, 48 steps up to 200,000, else 12)")
    ap.add_argument("--sampled", type=int, help="one-by-one models timed of the 60 (default 12 up to 30,000 "
                    "parameters, else 6)")
    ap.add_argument("--json", help="also write the rows to this JSON file")
    ap.add_argument("--one", nargs=2, metavar=("ARCH", "METHOD"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.steps is not None and not 1 <= args.steps <= EPOCH_STEPS:
        ap.error(f"--steps must be in 1..{EPOCH_STEPS}")
    if args.sampled is not None and not 1 <= args.sampled <= len(MODES) * len(SEEDS):
        ap.error(f"--sampled must be in 1..{len(MODES) * len(SEEDS)}")
    if args.one:
        print(json.dumps(measure(*args.one, args.steps, args.sampled)))
        return
    # the child measures with the same overrides
    sizes = [*(["--steps", str(args.steps)] if args.steps is not None else []),
             *(["--sampled", str(args.sampled)] if args.sampled is not None else [])]

    from rich.console import Console
    from rich.table import Table

    rows = []
    failed = 0
    console = Console(width=160)
    for a in args.arch:
        for method in args.methods:
            p = subprocess.run([sys.executable, __file__, "--one", a, method, *sizes], capture_output=True, text=True)
            if p.returncode != 0:
                console.print(f"[red]{a} {method} failed[/]\n{p.stderr[-2000:]}")
                failed += 1
                continue
            row = json.loads(p.stdout.strip().splitlines()[-1])
            rows.append(row)
            console.print(f"{a:>8} {method:<16} {row['meta_loop_s']:8.2f} s/meta-loop  peak {row['peak_mb']:7.0f} MB "
                          f"({row['steps']} steps timed)")
    t = Table(title=f"One meta-loop of 60 members on this CPU ({torch.get_num_threads()} threads, torch {torch.__version__})")
    for col in ("arch", "params", "engine s", "one-by-one s", "one-by-one fused s", "vmap s", "strongest peer",
                "peer / engine", "engine MB", "peer MB"):
        t.add_column(col, justify="right")
    by = {(r["arch"], r["method"]): r for r in rows}
    for a in args.arch:
        e = by.get((a, "engine"))
        peers = [by[(a, p)] for p in PEERS if (a, p) in by]
        best = min(peers, key=lambda r: r["meta_loop_s"]) if peers else None
        any_row = e or best
        if any_row is None:
            continue
        f = lambda r, k, fmt: format(r[k], fmt) if r else "-"  # noqa: E731
        cells = [f(by.get((a, mth)), "meta_loop_s", ".2f") for mth in METHODS]
        ratio = f"{best['meta_loop_s'] / e['meta_loop_s']:.2f}" if (best and e) else "-"
        t.add_row(a, f"{any_row['params']:,}", *cells, best["method"] if best else "-", ratio,
                  f(e, "peak_mb", ".0f"), f(best, "peak_mb", ".0f"))
    console.print(t)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"torch": torch.__version__, "threads": torch.get_num_threads(), "rows": rows}, fh, indent=1)
    if failed:  # the table shows what did run; the status says that some did not
        sys.exit(f"{failed} measurement(s) failed")


if __name__ == "__main__":
    main()
