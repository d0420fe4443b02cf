"""One measured psa.fit run per model family of the test zoo (tests/zoo.py) on this machine:
every mode that applies to the family, its bounty against `none`, trials x meta-loops, the path
that trained it, and the wall time. Prints a Markdown table; `--out FILE` writes it too.

    python bench/zoo_runs.py                       # 3 trials x 4 meta-loops on 2,048 images, batches of 64
    python bench/zoo_runs.py --family gru cnn --trials 2 --meta-loops 2 --train 512

A mode that does not apply to a family (no hidden unit layer, no dropout) is left out with its
reason. Small runs: the bounties say that each family trains and how the modes compare on
these settings, not what the paper's 100 meta-loops on 50,000 images would give.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT))

import psa  # noqa: E402
from psa.core.data import load_dataset  # noqa: E402
from psa.core.errors import ConfigError  # noqa: E402
from psa.core.member import MODES  # noqa: E402
from tests.zoo import ZOO, ZooModel  # noqa: E402


def applicable(z: ZooModel, x: torch.Tensor, y: torch.Tensor) -> tuple[list[str], dict[str, str]]:
    """The modes psa can run on family `z` (a one-trial, one-loop fit on a few examples each),
    and why each other mode cannot."""
    ok, why = [], {}
    for mode in MODES:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                psa.fit(z.factory, (x, y), (x, y), modes=[mode], trials=1, meta_loops=1, progress=False)
            ok.append(mode)
        except ConfigError as e:
            why[mode] = str(e)
    return ok, why


def run(z: ZooModel, data: psa.core.data.Dataset, trials: int, loops: int, batch_size: int) -> dict:
    """The family's fit in every applicable mode, timed."""
    tx, vx, sx = (z.inputs(t) for t in (data.train_x, data.val_x, data.test_x))
    modes, skipped = applicable(z, tx[:64], data.train_y[:64])
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = psa.fit(z.factory, (tx, data.train_y), (vx, data.val_y), (sx, data.test_y), modes=modes,
                    trials=trials, meta_loops=loops, batch_size=batch_size, progress=False)
    seconds = time.perf_counter() - t0
    bounty = {m: [r.bounty[(m, k)] for k in range(1, trials + 1)] for m in modes}
    return {"family": z.name, "modes": modes, "skipped": skipped, "bounty": bounty, "seconds": seconds,
            "path": "vmap" if r.batched else "one at a time", "units": r.spec.describe()}


def table(rows: list[dict], trials: int, loops: int, n_train: int, batch_size: int) -> str:
    """The runs as Markdown: bounty of `none` (mean +- std) and every other mode's mean difference."""
    lines = [f"psa.fit on {n_train:,} MNIST training images, {trials} trials x {loops} meta-loops per mode, "
             f"batches of {batch_size}, the paper's other hyperparameters "
             f"({platform.processor() or platform.machine()}, torch {torch.__version__}, "
             f"{torch.get_num_threads()} threads, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})", "",
             "| family | path | unit layers | none (bounty %) | other modes: mean diff vs none | not run | time |",
             "|---|---|---|---:|---|---|---:|"]
    for r in rows:
        b = r["bounty"]
        none = b.get("none")
        base = f"{statistics.mean(none):.2f} ± {statistics.pstdev(none):.2f}" if none else "-"
        diffs = ", ".join(f"{m} {statistics.mean(b[m]) - statistics.mean(none):+.2f}"
                          for m in r["modes"] if m != "none" and none)
        lines.append(f"| {r['family']} | {r['path']} | {r['units']} | {base} | {diffs} | "
                     f"{', '.join(r['skipped']) or '-'} | {r['seconds']:.0f} s |")
    return "\n".join(lines) + "\n"


def main() -> None:
    """Run the families asked for and print the table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--family", nargs="*", default=[z.name for z in ZOO], choices=[z.name for z in ZOO])
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--meta-loops", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=64, help="smaller than the paper's 256: a few thousand "
                    "images give the epoch a few dozen steps")
    ap.add_argument("--train", type=int, default=2048, help="training images (validation and test: half as many)")
    ap.add_argument("--out", type=Path, help="also write the table here")
    args = ap.parse_args()
    full = load_dataset("mnist", "cpu")
    n, m = args.train, max(1, args.train // 2)
    data = psa.core.data.Dataset(full.name, full.train_x[:n], full.train_y[:n], full.val_x[:m], full.val_y[:m],
                                 full.test_x[:m], full.test_y[:m], full.source)
    load_before = os.getloadavg()
    rows = []
    for z in ZOO:
        if z.name in args.family:
            rows.append(run(z, data, args.trials, args.meta_loops, args.batch_size))
            print(f"{z.name}: {rows[-1]['seconds']:.0f} s", file=sys.stderr)
    text = table(rows, args.trials, args.meta_loops, n, args.batch_size)
    # the times are this machine's under whatever else ran: say how busy it was
    text += (f"\nLoad average (1, 5, 15 min) before: {', '.join(f'{v:.1f}' for v in load_before)}; "
             f"after: {', '.join(f'{v:.1f}' for v in os.getloadavg())}.\n")
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
