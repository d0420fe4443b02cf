"""Do two versions of psa compute the same thing? Runs one small study of psa's own nets, one
study of a model of your own (a CNN and an MLP given as module:function, every mode) and one
`psa train` with the code of a git revision (default: HEAD) and with this working tree, and
compares the trial rows, the meta-loop rows, the stored designs and run.json byte for byte
(wall-clock fields aside). Prints a table; exits 1 on any difference.

    python bench/same_results.py                 # HEAD against the working tree
    python bench/same_results.py --before 3105e58
    python bench/same_results.py --parts study --trials 1 --meta-loops 1 --train-subset 256   # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable
from io import BytesIO
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STUDY = ["study", "--arch", "1*8", "--arch", "[2*16, 1*8]", "--trials", "2", "--meta-loops", "5",
         "--train-subset", "4096", "--name", "same", "--quiet"]
# a model of your own: the factories are written into the work directory (the study imports
# them from there), so that both versions train the very same modules
FACTORIES = """from torch import nn


def cnn():
    return nn.Sequential(nn.Conv2d(1, 4, 5, stride=2), nn.ReLU(), nn.Conv2d(4, 6, 5, stride=2), nn.ReLU(),
                         nn.Flatten(), nn.Dropout(), nn.Linear(6 * 4 * 4, 10))


def mlp():
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 12), nn.ReLU(), nn.Dropout(), nn.Linear(12, 10))
"""
MODULE_STUDY = ["study", "--model", "samefactories:cnn", "--model", "samefactories:mlp", "--trials", "2",
                "--meta-loops", "3", "--train-subset", "1024", "--name", "same-module", "--quiet"]
TRAIN = ["train", "--arch", "1*8", "--mode", "hidden", "--seed", "3", "--meta-loops", "3", "--json"]
# columns that hold wall-clock time, ids of runs or the code's version, not results
TIMING = {"wall_seconds", "train_seconds", "timing", "run_dir", "psa_version", "code_version", "started_at",
          "finished_at", "device"}


def export_tree(rev: str, dest: Path) -> Path:
    """The `src/` of revision `rev`, unpacked under `dest`."""
    raw = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "src"], capture_output=True, check=True).stdout
    with tarfile.open(fileobj=BytesIO(raw)) as tar:
        tar.extractall(dest, filter="data") if hasattr(tarfile, "data_filter") else tar.extractall(dest)
    return dest / "src"


def run_psa(src: Path, args: list[str], cwd: Path) -> str:
    """`python -m psa ARGS` with the package from `src`; its stdout."""
    env = dict(os.environ, PYTHONPATH=str(src))
    env.pop("PSA_DATA_DIR", None)
    proc = subprocess.run([sys.executable, "-m", "psa", *args], cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"psa {' '.join(args[:1])} failed with code {src}:\n{proc.stderr[-2000:]}")
    return proc.stdout


def study_rows(db: Path) -> tuple[list[dict], list[dict], dict]:
    """(trial rows, meta-loop rows, stored design) of the one study in `db`."""
    con = sqlite3.connect(db)
    con.row_factory = sqlite3.Row
    trials = [{k: r[k] for k in r.keys() if k not in TIMING} for r in con.execute("SELECT * FROM trials ORDER BY id")]
    loops = [dict(r) for r in con.execute("SELECT * FROM meta_loops ORDER BY trial_id, loop")]
    design = json.loads(con.execute("SELECT design FROM studies").fetchone()[0])
    design.get("plan", {}).pop("calibration", None)  # a timing on this machine
    con.close()
    return trials, loops, design


def with_value(argv: list[str], flag: str, value: int | None) -> list[str]:
    """`argv` with `flag`'s value replaced by `value` (kept where `value` is None)."""
    if value is None:
        return argv
    out = list(argv)
    out[out.index(flag) + 1] = str(value)
    return out


def sized(argv: list[str], args: argparse.Namespace) -> list[str]:
    """A run's arguments at the sizes asked for (each flag where the run has it)."""
    for flag, value in (("--trials", args.trials), ("--meta-loops", args.meta_loops),
                        ("--train-subset", args.train_subset)):
        if flag in argv:
            argv = with_value(argv, flag, value)
    return argv


def own_study(src: Path, work: Path, args: argparse.Namespace) -> dict[str, object]:
    """The study of psa's own nets: its trial and meta-loop rows and stored design."""
    run_psa(src, [*sized(STUDY, args), "--db", str(work / "study.sqlite")], work)
    trials, loops, design = study_rows(work / "study.sqlite")
    return {"trial rows": trials, "meta-loop rows": loops, "stored design": design}


def module_study(src: Path, work: Path, args: argparse.Namespace) -> dict[str, object]:
    """The study of a model of your own: its trial and meta-loop rows and stored design."""
    (work / "samefactories.py").write_text(FACTORIES)
    run_psa(src, [*sized(MODULE_STUDY, args), "--db", str(work / "module.sqlite")], work)
    m_trials, m_loops, m_design = study_rows(work / "module.sqlite")
    return {"module trial rows": m_trials, "module loop rows": m_loops, "module design": m_design}


def train_run(src: Path, work: Path, args: argparse.Namespace) -> dict[str, object]:
    """One `psa train`: its printed summary and run.json."""
    out = json.loads(run_psa(src, [*sized(TRAIN, args), "--out", str(work / "run")], work))
    run_json = json.loads((work / "run" / "run.json").read_text())
    strip = lambda d: {k: v for k, v in d.items() if k not in TIMING}  # noqa: E731
    return {"psa train summary": strip(out), "run.json": strip(run_json)}


PARTS: dict[str, Callable[[Path, Path, argparse.Namespace], dict[str, object]]] = {
    "study": own_study, "module": module_study, "train": train_run}


def results_of(src: Path, work: Path, args: argparse.Namespace) -> dict[str, object]:
    """Trial rows, meta-loop rows, stored design of both studies, and run.json of one version
    (of the parts in args.parts)."""
    work.mkdir(parents=True)
    out: dict[str, object] = {}
    for part in args.parts:
        out.update(PARTS[part](src, work, args))
    return out


def main() -> int:
    """Compare the two versions and print one line per kind of result."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", default="HEAD", help="git revision to compare against (default HEAD)")
    ap.add_argument("--parts", nargs="+", choices=list(PARTS), default=list(PARTS),
                    help="what to run: the study of psa's nets, the study of a model of your own, psa train "
                         "(default all three)")
    ap.add_argument("--trials", type=int, help="trials per cell of both studies (default 2)")
    ap.add_argument("--meta-loops", type=int, help="meta-loops of every run (default 5 for the study of psa's nets, "
                    "3 for the others)")
    ap.add_argument("--train-subset", type=int, help="training images of both studies (default 4096 for psa's "
                    "nets, 1024 for the model of your own; psa train takes all)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        before = results_of(export_tree(args.before, t / "before-tree"), t / "before", args)
        after = results_of(ROOT / "src", t / "after", args)
    print(f"{'result':<20} {'rows':>6}  same ({args.before} vs working tree)")
    same = True
    # A column that only the working tree's schema has is the same result iff it holds one value
    # in every row: NULL (trials.variant for a study of the paper's engine) or the value every
    # earlier row stands for (trials.model = 'simplemlp'); it is then left out of the comparison.
    for k in ("trial rows", "meta-loop rows", "module trial rows", "module loop rows"):
        if k not in before:
            continue
        rows_b, rows_a = before[k], after[k]
        added = sorted({c for r in rows_a for c in r} - {c for r in rows_b for c in r})
        for c in added:
            values = {r.get(c) for r in rows_a}
            one = len(values) == 1
            print(f"{k}: column {c} only in the working tree, "
                  f"{f'{next(iter(values))!r} in every row' if one else f'{len(values)} values'}")
            if one:
                after[k] = [{x: v for x, v in r.items() if x != c} for r in after[k]]
    # What a module study stores about each factory may grow (the persistence verdicts, "units"):
    # a key only the working tree stores is information, not a result; said, then left out.
    if "module design" in before:
        built_b = before["module design"].get("plan", {}).get("modules", {})
        for f, entry in after["module design"].get("plan", {}).get("modules", {}).items():
            for key in sorted(set(entry) - set(built_b.get(f, {}))):
                print(f"module design: plan.modules[{f!r}].{key} only in the working tree")
                del entry[key]
    for k in before:
        n = len(before[k]) if isinstance(before[k], list) else 1
        ok = before[k] == after[k]
        same &= ok
        print(f"{k:<20} {n:>6}  {'yes' if ok else 'NO'}")
        if not ok and isinstance(before[k], dict):
            for key in sorted(set(before[k]) | set(after[k])):
                if before[k].get(key) != after[k].get(key):
                    print(f"    {key}: {before[k].get(key)!r} -> {after[k].get(key)!r}"[:300])
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
