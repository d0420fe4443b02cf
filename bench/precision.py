"""Does reduced matmul precision change the science? Peak accuracy per trial in fp32 vs tf32/bf16.

For each architecture, the 60-member population of the study (6 modes x 10 seeds) trains for
`--meta-loops` meta-loops in each precision; each trial's peak validation accuracy (its
bounty) is compared, per architecture and mode, between fp32 and every reduced precision:

- paired: trial k of both precisions shares its seed (initial weights, data order, ablations,
  dropout masks), so the ten differences get an exact two-sided sign-flip test;
- unpaired: Mann-Whitney U and two-sample Kolmogorov-Smirnov (scipy) on the two samples of ten.

Holm's correction runs over all cells of one precision and test. Results are cached per
(architecture, precision) in the JSON output as they finish, so a long CPU run can be resumed.
Off a GPU, tf32 and bf16 are emulated (operands rounded, fp32 products: psa.core.precision).

    python bench/precision.py --arch 8*8 1*128 --device cpu
    python bench/precision.py                     # 1*2048, 1*128, 8*8 on the GPU
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

from psa.analysis.stats import holm, sign_flip_test  # noqa: E402
from psa.core import data as psa_data  # noqa: E402
from psa.core.arch import parse_arch  # noqa: E402
from psa.core.device import describe_device, resolve_execution  # noqa: E402
from psa.core.mlp.engine import Engine  # noqa: E402
from psa.core.hparams import HParams  # noqa: E402
from psa.core.member import MODES  # noqa: E402
from psa.core.mlp.population import Population  # noqa: E402

HP = HParams()  # the paper's

SEEDS = range(10)


def train(arch: str, precision: str, loops: int, ds: psa_data.Dataset, kernels: str) -> dict:
    """Bounties (mode -> ten peak accuracies, seed order) of one population in one precision."""
    members = [HP.member(m, s) for s in SEEDS for m in MODES]
    pop = Population.create(parse_arch(arch), members, ds.device, n_val=ds.val_y.numel())
    eng = Engine(pop, ds, HP, resolve_execution(ds.device, precision, kernels))
    t0 = time.perf_counter()
    for _ in range(loops):
        eng.meta_loop()
    seconds = time.perf_counter() - t0
    scores = pop.lkg_score()
    out: dict[str, list[float]] = {m: [] for m in MODES}
    for mem, s in sorted(zip(pop.members, scores), key=lambda t: t[0].seed):
        out[mem.mode].append(s)
    return {"bounty": out, "seconds": seconds, "precision": eng.paths.precision}


def compare(cache: dict, archs: list[str], precisions: list[str]) -> list[dict]:
    """One row per (architecture, mode, reduced precision) with the three p-values (Holm-adjusted)."""
    from scipy.stats import ks_2samp, mannwhitneyu

    rows = []
    for p in precisions:
        if p == "fp32":
            continue
        for a in archs:
            ref, low = cache.get(f"{a}|fp32"), cache.get(f"{a}|{p}")
            if ref is None or low is None:
                continue
            for m in MODES:
                x, y = np.array(ref["bounty"][m]), np.array(low["bounty"][m])
                d = y - x
                same = bool(np.all(d == 0))
                rows.append({
                    "arch": a, "mode": m, "precision": p,
                    "fp32_mean": float(x.mean()), "fp32_std": float(x.std()),
                    "low_mean": float(y.mean()), "low_std": float(y.std()),
                    "mean_diff": float(d.mean()),
                    "p_sign_flip": 1.0 if same else float(sign_flip_test(d.tolist())),
                    "p_mann_whitney": 1.0 if same else float(mannwhitneyu(x, y, alternative="two-sided").pvalue),
                    "p_ks": float(ks_2samp(x, y).pvalue),
                })
    for p in {r["precision"] for r in rows}:
        sel = [r for r in rows if r["precision"] == p]
        for test in ("p_sign_flip", "p_mann_whitney", "p_ks"):
            for r, adj in zip(sel, holm([r[test] for r in sel])):
                r[test + "_holm"] = float(adj)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--arch", nargs="+", default=["1*2048", "1*128", "8*8"])
    ap.add_argument("--precisions", nargs="+", default=["fp32", "tf32", "bf16"])
    ap.add_argument("--meta-loops", type=int, default=100)
    ap.add_argument("--train-subset", type=int, help="train on the first N training images only (default all); "
                    "validation stays whole")
    ap.add_argument("--kernels", default="auto", choices=("auto", "torch", "triton"))
    ap.add_argument("--out", help="JSON results and cache (default bench/results/precision-<device>.json)")
    args = ap.parse_args()
    if "fp32" not in args.precisions:
        args.precisions.insert(0, "fp32")

    from rich.console import Console
    from rich.table import Table

    console = Console(width=160)
    device = torch.device(args.device)
    desc = describe_device(torch.empty(0, device=device).device)
    slug = "".join(c if c.isalnum() else "-" for c in desc).strip("-").lower()
    out = Path(args.out) if args.out else HERE / "results" / f"precision-{slug}.json"
    doc = json.loads(out.read_text()) if out.exists() else {}
    cache = doc.get("runs", {})
    ds = psa_data.load("mnist", device=device)
    if args.train_subset:
        ds = dataclasses.replace(ds, train_x=ds.train_x[: args.train_subset], train_y=ds.train_y[: args.train_subset])
    for a in args.arch:
        for p in args.precisions:
            key = f"{a}|{p}"
            # a cached run counts only if it trained as this one would (a cache from before --train-subset
            # trained on every image: no train_subset, as the default)
            cached = cache.get(key, {})
            if cached.get("meta_loops") == args.meta_loops and cached.get("train_subset") == args.train_subset:
                continue
            r = train(a, p, args.meta_loops, ds, args.kernels)
            cache[key] = {**r, "meta_loops": args.meta_loops, "train_subset": args.train_subset}
            console.print(f"{a:>7} {p:<5} {r['seconds']:8.1f} s  " + "  ".join(
                f"{m} {np.mean(v):.2f}" for m, v in r["bounty"].items()))
            doc = {"device": desc, "torch": torch.__version__, "runs": cache}
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(doc, indent=1))
    rows = compare(cache, args.arch, args.precisions)
    subset = f", first {args.train_subset:,} training images" if args.train_subset else ""
    t = Table(title=f"peak validation accuracy, 10 trials per cell, {args.meta_loops} meta-loops{subset}, on {desc}")
    for col in ("arch", "mode", "prec", "fp32 mean±std", "low mean±std", "Δ mean", "p sign-flip", "p MWU", "p KS",
                "Holm min"):
        t.add_column(col, justify="right")
    for r in rows:
        t.add_row(r["arch"], r["mode"], r["precision"], f"{r['fp32_mean']:.2f}±{r['fp32_std']:.2f}",
                  f"{r['low_mean']:.2f}±{r['low_std']:.2f}", f"{r['mean_diff']:+.3f}", f"{r['p_sign_flip']:.3f}",
                  f"{r['p_mann_whitney']:.3f}", f"{r['p_ks']:.3f}",
                  f"{min(r['p_sign_flip_holm'], r['p_mann_whitney_holm'], r['p_ks_holm']):.3f}")
    console.print(t)
    doc = {"device": desc, "torch": torch.__version__, "meta_loops": args.meta_loops,
           "train_subset": args.train_subset, "runs": cache, "comparison": rows}
    out.write_text(json.dumps(doc, indent=1))
    console.print(f"wrote {out}")


if __name__ == "__main__":
    main()
