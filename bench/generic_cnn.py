"""PSA on a small CNN through psa.fit: MNIST and Fashion-MNIST, `none` against `hidden` and
`output`, and the population's speed against the one-at-a-time loop.

The CNN: Conv2d(1->8, 5x5, stride 2) -> ReLU -> Conv2d(8->16, 5x5, stride 2) -> ReLU ->
Flatten -> Linear(256 -> 10). Data: psa's own loader (psa.core.data.load: the copies that ship
with the package, or --data-dir / $PSA_DATA_DIR), so it runs on a fresh clone: the paper's split
(50,000 / 10,000 by random_split with seed 1337, the official test set), pixels standardised as
psa standardises them (MNIST: 0.1307, 0.3081; Fashion-MNIST: its training pixels' mean and std).

1. Speed: `--speed-loops` meta-loops of the same population (all modes x trials) trained
   together (vmap) and one member at a time (plain autograd), side by side in this run, on
   the first `--speed-train` training images, for each of `--speed-models` (the CNN below,
   tests/factories.py's, a wider CNN, an MLP); whether both paths gave the same records, and
   which path batched="auto" picks for the model on this device (psa.core.module.engine.auto_batched).
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
from psa.core.module.engine import auto_batched, convolutions  # noqa: E402
from psa.core.data import NORMALISATION, load_dataset  # noqa: E402

MODES = ("none", "hidden", "output")


def small_cnn() -> nn.Module:
    """Two conv layers and one Linear head: 8 + 16 hidden channels, 10 outputs."""
    return nn.Sequential(
        nn.Conv2d(1, 8, 5, stride=2), nn.ReLU(),
        nn.Conv2d(8, 16, 5, stride=2), nn.ReLU(),
        nn.Flatten(), nn.Linear(16 * 4 * 4, 10),
    )


def small_mlp() -> nn.Module:
    """An MLP 784-128-10 with dropout, for the speed comparison."""
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 128), nn.ReLU(), nn.Dropout(), nn.Linear(128, 10))


def tiny_cnn() -> nn.Module:
    """tests/factories.py's small CNN: 4 and 6 channels, a Dropout before the head."""
    return nn.Sequential(nn.Conv2d(1, 4, 5, stride=2), nn.ReLU(), nn.Conv2d(4, 6, 5, stride=2), nn.ReLU(),
                         nn.Flatten(), nn.Dropout(), nn.Linear(6 * 4 * 4, 10))


def wide_cnn() -> nn.Module:
    """A wider CNN: 32 and 64 channels, the kind a user may bring."""
    return nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(32, 64, 3, padding=1),
                         nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(64 * 7 * 7, 10))


SPEED_MODELS = {"small_cnn": small_cnn, "tiny_cnn": tiny_cnn, "wide_cnn": wide_cnn, "mlp": small_mlp}


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
    ap.add_argument("--speed-repeats", type=int, default=2)
    ap.add_argument("--speed-models", nargs="+", default=["small_cnn", "mlp"], choices=sorted(SPEED_MODELS))
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

    # 1. the population against the one-at-a-time loop, side by side, for each model; and the
    #    path batched="auto" picks for it on this device
    if not args.skip_speed:
        s = sets[args.sets[0]]
        n = args.speed_train
        tr = (s["train"][0][:n], s["train"][1][:n])
        say(f"speed ({args.sets[0]}, first {n} training images, {s['val'][0].shape[0]} validation images, "
            f"{len(MODES) * args.trials} members, {args.speed_loops} meta-loops incl. validation, after one "
            f"warm-up call of each; {args.speed_repeats} timings of each path, alternating)")
        for name in args.speed_models:
            make = SPEED_MODELS[name]
            res, secs = {}, {True: [], False: []}

            def timed(batched: bool, make=make) -> None:
                t0 = time.perf_counter()
                res[batched] = psa.fit(make, tr, s["val"], modes=MODES, trials=args.trials, device=args.device,
                                       meta_loops=args.speed_loops, batched=batched)
                secs[batched].append(time.perf_counter() - t0)

            for batched in (True, False):  # warm-up: imports, the first AdamW, thread pools
                timed(batched)
                secs[batched].clear()
            for _ in range(args.speed_repeats):
                for batched in (True, False):
                    timed(batched)
            pop, one = min(secs[True]), min(secs[False])
            diff = max(abs(a.candidate_acc - b.candidate_acc) for a, b in zip(res[True].records, res[False].records))
            same = all(a == b for a, b in zip(res[True].records, res[False].records))
            chose, why = auto_batched(convolutions(make()), args.device)
            say(f"  {name:10} population {', '.join(f'{t:.2f}' for t in secs[True])} s; one at a time "
                f"{', '.join(f'{t:.2f}' for t in secs[False])} s; one-at-a-time / population (best of each) "
                f"{one / pop:.2f}x; records {'identical' if same else f'differ (max candidate-accuracy difference {diff:.3f} points)'}; "
                f"auto: {'population' if chose else 'one at a time'} ({why})")

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
                    device=args.device, on_loop=on_loop)
        say(f"{name}: the members trained {'together (vmap)' if r.batched else 'one at a time'} ({r.batching})")
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
