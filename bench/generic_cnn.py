"""PSA on a small CNN through psa.fit: MNIST and Fashion-MNIST, `none` against `hidden` and
`output`, and the population's speed against the one-at-a-time loop.

The CNN: Conv2d(1->8, 5x5, stride 2) -> ReLU -> Conv2d(8->16, 5x5, stride 2) -> ReLU ->
Flatten -> Linear(256 -> 10). Data: psa's own loader (psa.core.data.load: the copies that ship
with the package, or --data-dir / $PSA_DATA_DIR), so it runs on a fresh clone: the paper's split
(50,000 / 10,000 by random_split with seed 1337, the official test set), pixels standardised as
psa standardises them (MNIST: 0.1307, 0.3081; Fashion-MNIST: its training pixels' mean and std).

1. Speed: `--speed-loops` meta-loops of the same population (all modes x trials) trained
   together (vmap) and one member at a time (plain autograd), side by side in this run, on
   the first `--speed-train` training images; asserts both give the same records.
2. The study: `--trials` x `--loops` on each set, the summary table of each.

    python bench/generic_cnn.py --out bench/results/generic_cnn-cpu.txt
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

import psa  # noqa: E402
from psa.core.data import NORMALISATION, load_dataset  # noqa: E402

MODES = ("none", "hidden", "output")


def small_cnn() -> nn.Module:
    """Two conv layers and one Linear head: 8 + 16 hidden channels, 10 outputs."""
    return nn.Sequential(
        nn.Conv2d(1, 8, 5, stride=2), nn.ReLU(),
        nn.Conv2d(8, 16, 5, stride=2), nn.ReLU(),
        nn.Flatten(), nn.Linear(16 * 4 * 4, 10),
    )


def load_set(name: str, data_dir: str | None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """train / val / test of one data set through psa's loader, as (N, 1, 28, 28) images."""
    ds = load_dataset(name, "cpu", data_dir)

    def img(x: torch.Tensor) -> torch.Tensor:
        return x.view(-1, 1, 28, 28)

    mean, std = NORMALISATION[name]
    return {"train": (img(ds.train_x), ds.train_y), "val": (img(ds.val_x), ds.val_y),
            "test": (img(ds.test_x), ds.test_y), "stats": (mean, std)}  # type: ignore[dict-item]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=None, help="idx files of the set (default: the shipped copies)")
    ap.add_argument("--sets", nargs="+", default=["mnist", "fashion-mnist"])
    ap.add_argument("--trials", type=int, default=10)
    ap.add_argument("--loops", type=int, default=20)
    ap.add_argument("--train-subset", type=int, default=None, help="first N training images only (default all)")
    ap.add_argument("--val-subset", type=int, default=None, help="first N validation images only (default all)")
    ap.add_argument("--speed-loops", type=int, default=2)
    ap.add_argument("--speed-train", type=int, default=5000)
    ap.add_argument("--skip-study", action="store_true")
    ap.add_argument("--skip-speed", action="store_true", help="no population-vs-one-at-a-time timing")
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    ap.add_argument("--out", default=None, help="also append the printed lines to this file")
    args = ap.parse_args()
    out = open(args.out, "a") if args.out else None

    def say(line: str) -> None:
        print(line, flush=True)
        if out:
            out.write(line + "\n")
            out.flush()

    say(f"# generic_cnn: torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime())} UTC")
    sets = {name: load_set(name, args.data_dir) for name in args.sets}
    if args.val_subset:
        for s in sets.values():
            s["val"] = (s["val"][0][: args.val_subset], s["val"][1][: args.val_subset])
    for name, s in sets.items():
        say(f"{name}: train {tuple(s['train'][0].shape)}, val {tuple(s['val'][0].shape)}, "
            f"test {tuple(s['test'][0].shape)}; standardised with mean {s['stats'][0]:.4f} std {s['stats'][1]:.4f}")

    # 1. the population against the one-at-a-time loop, side by side
    if not args.skip_speed:
        s = sets[args.sets[0]]
        n = args.speed_train
        tr = (s["train"][0][:n], s["train"][1][:n])
        secs = {}
        res = {}
        for batched in (True, False):
            t0 = time.perf_counter()
            res[batched] = psa.fit(small_cnn, tr, s["val"], modes=MODES, trials=args.trials, device=args.device,
                                   meta_loops=args.speed_loops, batched=batched)
            secs[batched] = time.perf_counter() - t0
        same = max(abs(a.candidate_acc - b.candidate_acc) for a, b in zip(res[True].records, res[False].records))
        say(f"speed ({args.sets[0]}, first {n} training images, {s['val'][0].shape[0]} validation images, "
            f"{len(MODES) * args.trials} members, "
            f"{args.speed_loops} meta-loops incl. validation): population {secs[True]:.1f} s, one at a time "
            f"{secs[False]:.1f} s, ratio {secs[False] / secs[True]:.2f}x; max candidate-accuracy difference "
            f"{same:.3f} points")

    # 2. the study on each set
    if args.skip_study:
        return
    for name, s in sets.items():
        train = s["train"]
        if args.train_subset:
            train = (train[0][: args.train_subset], train[1][: args.train_subset])
        t0 = time.perf_counter()

        def on_loop(loop: int, seconds: float, name: str = name) -> None:
            say(f"  {name} loop {loop}: {seconds:.1f} s")

        r = psa.fit(small_cnn, train, s["val"], s["test"], modes=MODES, trials=args.trials, meta_loops=args.loops,
                    device=args.device,
                    on_loop=on_loop)
        say(f"{name}: {args.trials} trials x {args.loops} meta-loops x {len(MODES)} modes on "
            f"{train[0].shape[0]} training images, {s['val'][0].shape[0]} validation images, "
            f"{time.perf_counter() - t0:.0f} s")
        say(f"{'mode':8} {'bounty mean':>11} {'std':>6} {'min':>6} {'max':>6} {'test':>6} {'vs none':>8} "
            f"{'p(Holm)':>8}  verdict")
        for row in r.summary():
            tested = "diff" in row
            say(f"{row['mode']:8} {row['mean']:11.2f} {row['std']:6.2f} {row['min']:6.2f} {row['max']:6.2f} "
                f"{row['test_mean']:6.2f} {row['diff'] if tested else math.nan:+8.2f} "
                f"{row['p_holm'] if tested else math.nan:8.3f}  {row.get('verdict', '')}")
    if out:
        out.close()


if __name__ == "__main__":
    main()
