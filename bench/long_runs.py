"""Long runs: how a study's database and checkpoint, and a `psa train` run, grow with meta-loops.

1. `psa study` of a tiny population (1*2, modes none and hidden, one trial, 256 training images,
   a checkpoint after every loop) to `--loops` meta-loops, polled while it runs: the database's
   logical size (page_count x page_size, WAL included), its meta_loops rows and the population
   checkpoint's size when the study passes each of `--marks`.
2. The same study killed (SIGKILL) part-way and rerun: it resumes, and its rows must equal the
   uninterrupted run's. The kill lands while this script holds the database's write lock, so the
   study cannot commit another loop between the look and the kill.
3. `psa train` (1*2) for each of `--train-loops`, with this tree and, given `--baseline-src`,
   another tree's psa (e.g. /work/main/src): bytes the process wrote (/proc/self/io wchar) per
   meta-loop, and the run directory's final size.

    python bench/long_runs.py --out bench/results/long_runs.json
    python bench/long_runs.py --loops 200 --marks 50 100 200 --train-loops 20 80   # quicker
    python bench/long_runs.py --parts train --baseline-src ../main/src              # part 3 only
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def psa(*args: str) -> list[str]:
    return [sys.executable, "-m", "psa", *args]


def study_args(loops: int, db: Path) -> list[str]:
    return ["study", "--arch", "1*2", "--modes", "none,hidden", "--trials", "1", "--meta-loops", str(loops),
            "--train-subset", "256", "--checkpoint-every", "0", "--name", "long", "--quiet", "--db", str(db)]


def sample(db: Path) -> dict | None:
    """What the database and the checkpoint hold right now (None before the tables exist)."""
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
        try:
            loops = con.execute("SELECT COALESCE(MIN(loops_done), 0) FROM trials").fetchone()[0]
            rows = con.execute("SELECT COUNT(*) FROM meta_loops").fetchone()[0]
            size = con.execute("PRAGMA page_count").fetchone()[0] * con.execute("PRAGMA page_size").fetchone()[0]
        finally:
            con.close()
    except sqlite3.Error:
        return None
    return {"loops": int(loops), "rows": int(rows), "db_bytes": int(size),
            "ckpt_bytes": max(map(file_size, db.with_name(db.stem + ".ckpt").rglob("*.safetensors")), default=0)}


def file_size(path: Path) -> int:
    """Its size, or 0 where the running study removed it between the listing and this look (a
    population's checkpoint goes when the population finishes: psa.study.driver)."""
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def run_polled(loops: int, marks: list[int], db: Path) -> tuple[list[dict], float]:
    """Run the study to the end, sampling it at each mark."""
    t0 = time.perf_counter()
    p = subprocess.Popen(psa(*study_args(loops, db)), cwd=db.parent, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True)
    seen, todo = [], list(marks)
    while p.poll() is None:
        s = sample(db) if db.exists() else None
        while s and todo and s["loops"] >= todo[0]:
            if not seen or seen[-1]["loops"] != s["loops"]:
                seen.append(s)
            todo.pop(0)
        time.sleep(0.05)
    if p.returncode != 0:
        raise SystemExit(f"psa study failed: {p.stderr.read()[-2000:]}")
    final = sample(db)
    if final and (not seen or seen[-1]["loops"] != final["loops"]):
        seen.append(final)
    return seen, time.perf_counter() - t0


def run_killed(loops: int, kill_at: int, db: Path) -> dict | None:
    """Run the study and SIGKILL it at the first look that finds kill_at or more of its loops
    done, but not all of them; what the database held then (None where the study outran every look).

    Each look takes the database's write lock (BEGIN IMMEDIATE; the study waits on it, psa's busy
    timeout): the study cannot commit a loop between the look and the kill, however fast it runs."""
    p = subprocess.Popen(psa(*study_args(loops, db)), cwd=db.parent, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True)
    try:
        while p.poll() is None:
            # only once the study has made its tables: a lock on a bare file would be the study's problem
            if db.exists() and sample(db) is not None:
                con = sqlite3.connect(db, timeout=0.5, isolation_level=None)
                try:
                    con.execute("BEGIN IMMEDIATE")
                    s = sample(db)
                    if s and kill_at <= s["loops"] < loops:
                        p.send_signal(signal.SIGKILL)
                        p.wait()
                        return s
                    con.execute("ROLLBACK")
                except sqlite3.OperationalError:
                    pass  # the study holds the lock: look again
                finally:
                    con.close()
            time.sleep(0.01)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    return None


def rows_of(db: Path) -> list[tuple]:
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return con.execute("SELECT t.mode, m.loop, m.candidate_acc, m.promoted, m.ablated_layer, m.ablated_index, "
                           "m.lkg_score, m.train_loss, m.diverged FROM meta_loops m JOIN trials t ON t.id = "
                           "m.trial_id ORDER BY 1, 2").fetchall()
    finally:
        con.close()


TRAIN = """
import json, os, sys, time
sys.path.insert(0, {src!r})
from psa.study.train import TrialConfig, train
def wchar():
    with open("/proc/self/io") as f:
        return int(next(l for l in f if l.startswith("wchar")).split()[1])
import psa
w0, t0 = wchar(), time.perf_counter()
s = train(TrialConfig(arch="1*2", meta_loops={loops}, batch_size={batch}, quiet=True, out={out!r}))
w1 = wchar()
files = {{p: os.path.getsize(os.path.join({out!r}, p)) for p in sorted(os.listdir({out!r}))}}
print(json.dumps({{"psa": os.path.dirname(psa.__file__), "written": w1 - w0, "seconds": time.perf_counter() - t0,
                  "files": files, "records": len(s["records"])}}))
"""


def run_train(src: Path, loops: int, out: Path, batch: int) -> dict:
    code = TRAIN.format(src=str(src), loops=loops, out=str(out), batch=batch)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=out.parent)
    if p.returncode != 0:
        raise SystemExit(f"psa train ({src}) failed: {p.stderr[-2000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def study_part(args: argparse.Namespace, tmp: Path, doc: dict) -> None:
    """Parts 1 and 2: the study's growth, and its resume at that length."""
    seen, secs = run_polled(args.loops, [m for m in args.marks if m <= args.loops], tmp / "a.sqlite")
    doc["study"] = {"loops": args.loops, "seconds": secs, "samples": seen}
    print(f"psa study, 1*2 x (none, hidden) x 1 trial, {args.loops} meta-loops: {secs:.0f}s")
    print("| loops | meta_loops rows | database bytes | bytes per row since the previous line | "
          "checkpoint bytes |")
    print("|---:|---:|---:|---:|---:|")
    prev = None
    for s in seen:
        per = ((s["db_bytes"] - prev["db_bytes"]) / (s["rows"] - prev["rows"])
               if prev and s["rows"] > prev["rows"] else float("nan"))
        s["bytes_per_row_since_previous"] = per
        ck = f"{s['ckpt_bytes']:,}" if s["ckpt_bytes"] else "- (removed: done)"
        print(f"| {s['loops']} | {s['rows']} | {s['db_bytes']:,} | {per:.1f} | {ck} |")
        prev = s
    killed = None
    for _ in range(3):
        # a tiny study can run all its loops between two looks; it then starts again from nothing
        for f in tmp.glob("b.*"):
            if f.is_dir():
                shutil.rmtree(f)
            else:
                f.unlink()
        killed = run_killed(args.loops, max(1, args.loops // 2), tmp / "b.sqlite")
        if killed:
            break
    if not killed:
        raise SystemExit(f"the study finished before loop {max(1, args.loops // 2)} could be killed, three times: "
                         "give it more --loops")
    p = subprocess.run(psa(*study_args(args.loops, tmp / "b.sqlite")), cwd=tmp, capture_output=True, text=True)
    same = p.returncode == 0 and rows_of(tmp / "a.sqlite") == rows_of(tmp / "b.sqlite")
    doc["study"]["resume"] = {"killed_at_loop": killed["loops"], "rerun_rc": p.returncode,
                              "rows_identical": same}
    print(f"killed at loop {killed['loops']} and rerun: rc {p.returncode}, rows identical to the "
          f"uninterrupted run: {same}")


def train_part(args: argparse.Namespace, tmp: Path, doc: dict) -> None:
    """Part 3: what `psa train` writes per loop, here and in the baseline tree."""
    trees = [("this tree", ROOT / "src")] + ([("baseline", args.baseline_src)] if args.baseline_src else [])
    print(f"\n| psa train 1*2, batch {args.train_batch_size} | meta-loops | bytes written | per loop | "
          "run directory bytes |")
    print("|---|---:|---:|---:|---:|")
    for label, src in trees:
        for n in args.train_loops:
            out = tmp / f"train-{label.replace(' ', '-')}-{n}"
            r = run_train(src.resolve(), n, out, args.train_batch_size)
            r.update({"tree": label, "src": str(src), "loops": n})
            doc["train"].append(r)
            print(f"| {label} | {n} | {r['written']:,} | {r['written'] / n:,.0f} | {sum(r['files'].values()):,} |",
                  flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--loops", type=int, default=1000)
    ap.add_argument("--marks", type=int, nargs="+", default=[100, 200, 400, 1000])
    ap.add_argument("--train-loops", type=int, nargs="+", default=[25, 100])
    ap.add_argument("--train-batch-size", type=int, default=50_000,
                    help="psa train's batch size (default one batch per epoch: what is written does not depend "
                         "on it, and the loops are quick)")
    ap.add_argument("--parts", nargs="+", choices=["study", "train"], default=["study", "train"])
    ap.add_argument("--baseline-src", type=Path, help="another tree's src/ to run psa train from, for comparison")
    ap.add_argument("--out", type=Path, help="write the results as JSON here")
    args = ap.parse_args()
    doc: dict = {"study": {}, "train": []}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if "study" in args.parts:
            study_part(args, tmp, doc)
        if "train" in args.parts:
            train_part(args, tmp, doc)
    if args.out:
        args.out.write_text(json.dumps(doc, indent=1) + "\n")


if __name__ == "__main__":
    main()
