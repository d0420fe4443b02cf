"""Does `psa study --dry-run`'s time estimate match the clock? For each architecture, the dry
run's estimate and then the same study for real, back to back (the estimate times this machine
as busy as it is at that moment, so the two must be close in time), each a fresh `psa` process
as a user would run it; prints estimate, measurement and their ratio.

Each study is short so that a dozen fit in minutes on a CPU: --trials trials x all six modes
(one population of 6 x trials members), --meta-loops meta-loops over the first --train-subset
training images, with the full validation (10,000 images) every loop and the test set at the
end, as in any study.

    nice -n 5 python bench/estimate.py                       # the 12 default architectures
    python bench/estimate.py --arch 1*4 16*2 --meta-loops 3
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

# wide, square, deep-narrow and tiny, from the study's range
ARCHS = ["1*4", "2*4", "4*2", "4*4", "16*2", "64*1", "8*8", "18*18", "1*128", "2*354", "1*1024", "128*8"]
# the widest nets train fewer trials, so that one takes about as long as a tiny one on a CPU
FEW_TRIALS = {"2*354": 2, "1*1024": 2, "128*8": 2}
TOLERANCE = 0.25


def psa(args: list[str]) -> tuple[float, str]:
    """`psa ARGS` in a fresh process: (wall seconds, stdout); stops the bench if it fails."""
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "psa", *args], capture_output=True, text=True,
                       env=os.environ | {"PYTHONPATH": str(HERE.parent / "src")})
    wall = time.perf_counter() - t
    if r.returncode != 0:
        sys.exit(f"psa {' '.join(args)} failed ({r.returncode}):\n{r.stderr[-2000:]}")
    return wall, r.stdout


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", nargs="+", default=ARCHS)
    ap.add_argument("--trials", type=int, default=10, help="trials per mode (default 10; 2 for the widest nets)")
    ap.add_argument("--meta-loops", type=int, default=2)
    ap.add_argument("--train-subset", type=int, default=2560, help="training images per loop (default 2560: 10 steps)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=str(HERE / "results" / "estimate-cpu"), help="writes OUT.json and OUT.md")
    args = ap.parse_args()

    import torch

    from psa.core.device import describe_device, resolve_device

    where = describe_device(resolve_device(args.device))
    rows = []
    print(f"{'arch':>8} {'members':>7} {'estimate s':>10} {'+-':>5} {'measured s':>10} {'ratio':>6} "
          f"{'calib s':>7}  within +-{TOLERANCE:.0%}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for arch in args.arch:
            trials = FEW_TRIALS.get(arch, args.trials) if args.trials == 10 else args.trials
            db = str(Path(tmp) / f"{arch.replace('*', 'x')}.sqlite")
            study = ["study", "--arch", arch, "--trials", str(trials), "--meta-loops", str(args.meta_loops),
                     "--train-subset", str(args.train_subset), "--device", args.device, "--db", db]
            dry_wall, out = psa([*study, "--dry-run", "--json"])
            plan = json.loads(out)
            wall, _ = psa([*study, "--quiet"])
            est = plan["seconds"]
            r = {"arch": arch, "members": 6 * trials, "estimate_s": est, "uncertainty": plan["uncertainty"],
                 "measured_s": wall, "ratio": wall / est, "calibration_s": plan["calibration_seconds"],
                 "dry_run_s": dry_wall, "startup_s": plan["startup_seconds"],
                 "step_ms": 1e3 * plan["probes"][0]["step_s"]}
            r["within"] = abs(r["ratio"] - 1) <= TOLERANCE
            rows.append(r)
            print(f"{arch:>8} {r['members']:>7} {est:>10.1f} {r['uncertainty']:>5.0%} {wall:>10.1f} "
                  f"{r['ratio']:>6.2f} {r['calibration_s']:>7.1f}  {'yes' if r['within'] else 'NO'}", flush=True)

    hits = sum(r["within"] for r in rows)
    ratios = [r["ratio"] for r in rows]
    summary = (f"{hits} of {len(rows)} architectures within +-{TOLERANCE:.0%}; measured / estimated "
               f"{min(ratios):.2f}-{max(ratios):.2f}")
    print(summary)
    cfg = {"device": where, "threads": torch.get_num_threads(), "meta_loops": args.meta_loops,
           "train_subset": args.train_subset, "trials": args.trials, "few_trials": FEW_TRIALS,
           "load_average": os.getloadavg(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"config": cfg, "rows": rows}, indent=1) + "\n")
    lines = [f"# `psa study --dry-run` estimate vs the clock ({where})", "",
             f"`python bench/estimate.py` on {cfg['date']}: per architecture, the dry run's estimate, then the same "
             f"study for real (each a fresh `psa` process): all six modes x trials, {args.meta_loops} meta-loops over "
             f"the first {args.train_subset:,} training images, full validation and test. Load average at the end: "
             f"{', '.join(f'{x:.1f}' for x in cfg['load_average'])} (a shared machine).", "",
             "| arch | members | estimate (s) | +- | measured (s) | measured / estimate | calibration (s) | step (ms) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['arch']} | {r['members']} | {r['estimate_s']:.1f} | {r['uncertainty']:.0%} | "
                     f"{r['measured_s']:.1f} | {r['ratio']:.2f}{'' if r['within'] else ' (miss)'} | "
                     f"{r['calibration_s']:.1f} | {r['step_ms']:.3g} |")
    lines += ["", summary + "."]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out.with_suffix('.md')} and {out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
