"""One architecture's six modes on another data set, against MNIST's published trials.

Reads a study (all six modes x 10 trials of one architecture, e.g. 1*128 on Fashion-MNIST) from
its results database and prints, per mode, the mean +- std (ddof=0) of the trials' bounty at
meta-loop L (the LKG score after loop L: the peak so far), the paired difference with `none`
(trial k of every mode shares its seed) with psa's exact sign-flip test, Holm-corrected over the
five modes; beside it the authors' published MNIST numbers for the same architecture: the final
(100-loop) bounties of their 10 trials and, at loop L, their one plotted trial per mode.

L is the last loop every trial of the study has finished (`--loop` to pick an earlier one), so a
study cut short is read honestly as what it is.

    python bench/dataset_modes.py --db results/fashion.sqlite --arch 1*128 --out bench/results/fashion-1x128.md
"""

from __future__ import annotations

import argparse
import csv
import sqlite3
import sys
from importlib import resources
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

from psa.analysis.stats import holm, sign_flip_test  # noqa: E402
from psa.core.member import MODES  # noqa: E402


def study_bounties(db: Path, arch: str, loop: int | None) -> tuple[dict[str, dict[int, float]], int, str, int]:
    """{mode: {trial: LKG score after loop L}}, L, the data set, and the design's meta-loops."""
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    rows = con.execute("SELECT t.mode, t.trial, m.loop, m.lkg_score, t.dataset, t.meta_loops FROM meta_loops m "
                       "JOIN trials t ON t.id = m.trial_id WHERE t.arch = ?", (arch,)).fetchall()
    con.close()
    if not rows:
        raise SystemExit(f"{db}: no meta-loops of {arch}")
    last: dict[tuple[str, int], int] = {}
    for mode, trial, lp, _, _, _ in rows:
        last[(mode, trial)] = max(last.get((mode, trial), 0), lp)
    L = min(last.values()) if loop is None else loop
    out: dict[str, dict[int, float]] = {}
    for mode, trial, lp, score, _, _ in rows:
        if lp == L:
            out.setdefault(mode, {})[trial] = score
    return out, L, rows[0][4], rows[0][5]


def published(arch: str, loop: int) -> tuple[dict[str, list[float]], dict[str, float]]:
    """The authors' MNIST final bounties per mode, and their plotted trial's value at `loop`."""
    root = resources.files("psa").joinpath("resources")
    finals: dict[str, list[float]] = {}
    for r in csv.DictReader(root.joinpath("published_trials.csv").read_text().splitlines()):
        if r["arch"] == arch:
            finals.setdefault(r["mode"], []).append(float(r["peak_val_acc"]))
    curve: dict[str, float] = {}
    for r in csv.DictReader(root.joinpath("published_convergence.csv").read_text().splitlines()):
        if r["arch"] == arch and int(r["meta_loop"]) <= loop:
            curve[r["mode"]] = max(curve.get(r["mode"], -1.0), float(r["val_acc"]))
    return finals, curve


def table(db: Path, arch: str, loop: int | None) -> str:
    ours, L, dataset, meta_loops = study_bounties(db, arch, loop)
    finals, curve = published(arch, L)
    base = ours.get("none", {})
    diffs = {m: [ours[m][k] - base[k] for k in sorted(base) if k in ours[m]] for m in MODES if m in ours and m != "none"}
    ps = {m: sign_flip_test(d) for m, d in diffs.items()}
    adj = dict(zip(ps, holm(list(ps.values())))) if ps else {}
    n = len(base)
    lines = [f"{arch} on {dataset}: bounty (peak validation accuracy, %) after meta-loop {L} of {meta_loops}, "
             f"{n} trials per mode", "",
             f"| mode | {dataset} (n={n}) | minus none: mean [min, max] | sign-flip p | Holm p | "
             f"MNIST published, loop 100 (n=10) | MNIST published, loop {L} (one plotted trial) |",
             "|---|---|---|---|---|---|---|"]
    for m in MODES:
        if m not in ours:
            continue
        v = np.array(list(ours[m].values()))
        pub = np.array(finals.get(m, []))
        cell = f"{v.mean():.2f} ± {v.std():.2f}"
        if m == "none":
            diff = p = h = "-"
        else:
            d = np.array(diffs[m])
            diff = f"{d.mean():+.2f} [{d.min():+.2f}, {d.max():+.2f}]"
            p, h = f"{ps[m]:.4f}", f"{adj[m]:.4f}"
        ref = f"{pub.mean():.2f} ± {pub.std():.2f}" if len(pub) else "-"
        lines.append(f"| {m} | {cell} | {diff} | {p} | {h} | {ref} | {curve.get(m, float('nan')):.2f} |")
    lines += ["", "Means ± population std (ddof=0). Sign-flip: psa.analysis.stats.sign_flip_test (exact, two-sided) "
              "on the paired differences (trial k of every mode shares its seed); Holm over the five modes."]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--db", type=Path, default=Path("results/fashion.sqlite"))
    p.add_argument("--arch", default="1*128")
    p.add_argument("--loop", type=int, help="read the bounties after this meta-loop (default: the last all reached)")
    p.add_argument("--out", type=Path, help="also write the table here")
    args = p.parse_args()
    text = table(args.db, args.arch, args.loop)
    print(text, end="")
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
