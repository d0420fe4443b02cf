"""Does a running study's ETA tell the time actually left? Runs one real `psa study` of mixed
architectures, deep narrow nets and wide ones (where psa's analytic weights mislead on a CPU:
they price a layer-step as a GPU's kernel launch), samples `psa status --json` when 10%, 25% and
50% of the study's meta-loops are recorded, and compares each ETA with the time that was
actually left (known once the study has finished). Beside it, at the same moments: what `psa
status` said before the study stored its calibration (the analytic weights, paced from the
run's start), and the stored costs left at pace 1 (the calibration as measured).

    python bench/eta_check.py                                   # about 13 min on 2 shared cores
    python bench/eta_check.py --arch 64*1 1*512 --meta-loops 5  # a quick look

Torch runs on --threads threads (default 1): on a 2-core machine shared with other work, two
threads wait on each other at every parallel operation and a step's time swings 3-6x with the
neighbours' load; one thread keeps the pace steadier.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

ARCHS = ["64*1", "16*2", "2048*1", "1*512", "2*128"]
POINTS = (0.10, 0.25, 0.50)
TOLERANCE = 0.25


def utc(text: str) -> float:
    """A stored UTC time as a POSIX timestamp."""
    return datetime.datetime.fromisoformat(text).timestamp()


def cpu_name() -> str:
    """The CPU's model name, for the record."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def snapshot(db: Path, name: str) -> tuple[float, dict | None, list[dict] | None, dict | None]:
    """(fraction of meta-loops recorded, studies row, per-arch progress, latest runs row)."""
    from psa.study import store

    if not db.exists():
        return 0.0, None, None, None
    try:
        con = store.connect(db, readonly=True)
    except Exception:  # noqa: BLE001 - not created yet
        return 0.0, None, None, None
    try:
        row = store.get_study(con, name)
        if row is None:
            return 0.0, None, None, None
        archs = [dict(a) for a in store.arch_progress(con, int(row["id"]))]
        run = store.latest_run(con, int(row["id"]))
        done = sum(int(a["loops_done"] or 0) for a in archs)
        total = sum(int(a["loops_total"] or 0) for a in archs)
        return done / max(1, total), dict(row), archs, None if run is None else dict(run)
    except sqlite3.Error:
        return 0.0, None, None, None
    finally:
        con.close()


def costs_left(row: dict, archs: list[dict], calibrated: bool) -> tuple[float, float]:
    """(work done, work left) in the study's stored costs (calibrated) or the analytic weights."""
    from psa.cli.study import stored_study_costs
    from psa.study.calibration import analytic_costs
    from psa.study.kinds import model_kind

    costs, plan = stored_study_costs(row)
    if not calibrated:
        costs = analytic_costs(model_kind(plan.design), plan)
    done = sum(costs.trial_loop[a["arch"]] * int(a["loops_done"] or 0) for a in archs)
    left = sum(costs.trial_loop[a["arch"]] * (int(a["loops_total"]) - int(a["loops_done"] or 0)) for a in archs)
    return done, left


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", nargs="+", default=ARCHS)
    ap.add_argument("--trials", type=int, default=2)
    ap.add_argument("--meta-loops", type=int, default=10)
    ap.add_argument("--train-subset", type=int, help="training images per loop (default all 50,000)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the study and status (default 1)")
    ap.add_argument("--out", default=str(HERE / "results" / "eta-cpu.md"))
    args = ap.parse_args()
    import psa.cli.study  # noqa: F401 - imported now, not while the study runs beside this process

    env = os.environ | {"PYTHONPATH": str(HERE.parent / "src"), "OMP_NUM_THREADS": str(args.threads),
                        "MKL_NUM_THREADS": str(args.threads)}
    env.pop("PSA_DATA_DIR", None)
    study = ["study", *(x for a in args.arch for x in ("--arch", a)), "--trials", str(args.trials),
             "--meta-loops", str(args.meta_loops), "--device", "cpu", "--name", "eta", "--quiet",
             *(["--train-subset", str(args.train_subset)] if args.train_subset else [])]
    load_before = os.getloadavg()
    samples = []
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "eta.sqlite"
        t0 = time.time()
        proc = subprocess.Popen([sys.executable, "-m", "psa", *study, "--db", str(db)], env=env, cwd=tmp)
        todo = list(POINTS)
        while proc.poll() is None:
            frac, row, archs, run = snapshot(db, "eta")
            if todo and frac >= todo[0] and row is not None:
                point = todo.pop(0)
                status = ["status", "--db", str(db), "--study", "eta", "--json"]
                st = subprocess.run([sys.executable, "-m", "psa", *status], env=env, capture_output=True, text=True)
                at = time.time()
                (info,) = json.loads(st.stdout)["studies"]
                frac, row, archs, run = snapshot(db, "eta")  # what status read, near enough
                assert row is not None and archs is not None and run is not None
                done_a, left_a = costs_left(row, archs, calibrated=False)
                _, left_c = costs_left(row, archs, calibrated=True)
                elapsed = at - utc(run["started_at"])
                samples.append({"point": point, "loops": frac, "at": at, "elapsed": elapsed,
                                "eta": info["eta_seconds"], "old_eta": elapsed * left_a / done_a if done_a else None,
                                "costs_left": left_c})
                print(f"{point:.0%}: {frac:.1%} of the meta-loops, {info['state']}, eta {info['eta_seconds']} s",
                      flush=True)
            time.sleep(0.25)
        if proc.returncode != 0:
            sys.exit(f"psa study failed ({proc.returncode})")
        _, row, archs, run = snapshot(db, "eta")
        assert row is not None and run is not None
        end = utc(run["finished_at"])
        design = json.loads(row["design"])
        calibration = design["plan"].get("calibration", {})
    wall = time.time() - t0
    load_after = os.getloadavg()

    lines = ["| point | meta-loops done | run so far (s) | eta (s) | actually left (s) | eta / left | "
             "within 25% | before: eta (s) | before / left | stored costs left (s) |",
             "|---|---:|---:|---:|---:|---:|---|---:|---:|---:|"]
    hits = 0
    def num(x: float | None, fmt: str) -> str:
        return "-" if x is None else format(x, fmt)

    for s in samples:
        left = end - s["at"]
        ratio = s["eta"] / left if s["eta"] is not None and left > 0 else None
        ok = ratio is not None and abs(ratio - 1) <= TOLERANCE
        hits += ok
        old = s["old_eta"]
        lines.append(f"| {s['point']:.0%} | {s['loops']:.1%} | {s['elapsed']:.0f} | {num(s['eta'], '.0f')} | "
                     f"{left:.0f} | {num(ratio, '.2f')} | {'yes' if ok else 'NO'} | {num(old, '.0f')} | "
                     f"{num(None if old is None or left <= 0 else old / left, '.2f')} | {s['costs_left']:.0f} |")
    run_s = end - utc(run["started_at"])
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    probes = calibration.get("probes", [])
    text = [f"# A running study's ETA against the clock (CPU, {args.threads} thread{'s' if args.threads != 1 else ''})",
            "",
            f"`python bench/eta_check.py` on {date}, {cpu_name()}, {os.cpu_count()} cores, "
            f"{platform.system()} {platform.release()}; a machine shared with other work: load average "
            f"{', '.join(f'{x:.1f}' for x in load_before)} before, {', '.join(f'{x:.1f}' for x in load_after)} after.",
            "",
            f"The study: `psa {' '.join(study)}` ({', '.join(args.arch)}; one population of "
            f"{6 * args.trials} members each, in the plan's order), {wall:.0f} s in all: its calibration "
            f"{float(calibration.get('seconds', 0)):.1f} s ({len(probes)} of {len(args.arch)} shapes probed: "
            f"{', '.join(p['net'] for p in probes)}), its run (from its runs row's start, after the calibration, "
            f"to its end) {run_s:.0f} s. "
            f"`psa status --json` sampled when 10%, 25% and 50% of the meta-loops were recorded; "
            f"'actually left' is from then to the run's end.",
            "",
            *lines,
            "",
            f"{hits} of {len(samples)} points within +-{TOLERANCE:.0%}. 'before' is `psa status`'s ETA "
            f"before this change at the same moment (the analytic weights, paced from the run's start); "
            f"'stored costs left' is the calibration's own seconds for the work left (pace 1)."]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(text) + "\n")
    print("\n".join(text))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
