"""Helpers of the report tests: small results databases built with plain SQL.

The databases follow the schema of `psa.study.store` (the contract with the study runner) and are
filled from the authors' published per-trial peaks, with synthetic meta-loops that reach each
peak at a known loop, so the tests need neither the study runner nor any training.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
from collections.abc import Iterable, Mapping, Sequence
from importlib import resources
from pathlib import Path

import numpy as np

from psa.study import store
from psa.analysis.results import Trial
from psa.cli import main
from psa.core.member import MODES


def run(argv: list[str]) -> tuple[int, str, str]:
    """`psa ARGV` in this process: (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    return rc, out.getvalue(), err.getvalue()


def read_csv(path: Path) -> list[dict]:
    """The rows of a CSV file as dicts."""
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def fig_data(out: Path, name: str) -> dict:
    """What a report's figure drew (figures/NAME.json)."""
    return json.loads((out / "figures" / f"{name}.json").read_text())


def trials_of(arch: str, values_by_mode: Mapping[str, Sequence[float]]) -> list[Trial]:
    """Finished trials of one architecture, trial k taking the k-th value of each mode."""
    return [Trial(arch, m, k + 1, v) for m, vs in values_by_mode.items() for k, v in enumerate(vs)]


def published_peaks() -> dict[tuple[str, str], list[float]]:
    """{(arch, mode): [peak of trial 1..10]} from the shipped published_trials.csv."""
    text = resources.files("psa").joinpath("resources/published_trials.csv").read_text()
    out: dict[tuple[str, str], dict[int, float]] = {}
    for r in csv.DictReader(io.StringIO(text)):
        out.setdefault((r["arch"], r["mode"]), {})[int(r["trial"])] = float(r["peak_val_acc"])
    return {k: [v[i] for i in sorted(v)] for k, v in out.items()}


def synthetic_curve(peak: float, bounty_loop: int, loops: int, rng: np.random.Generator,
                    diverge_at: int | None = None) -> list[tuple[float | None, bool, float]]:
    """(candidate_acc, promoted, lkg_score) per loop: rising to `peak` at `bounty_loop`, below it
    afterwards, so the LKG is promoted on every loop up to the bounty and never after."""
    rows = []
    start = max(peak - 5.0, 0.0)
    lkg = -1.0
    for loop in range(1, loops + 1):
        if diverge_at == loop:
            rows.append((None, False, lkg))
            continue
        if loop < bounty_loop:
            cand = start + (peak - start) * loop / bounty_loop
        elif loop == bounty_loop:
            cand = peak
        else:
            cand = peak - float(rng.uniform(0.01, 1.0))
        promoted = cand > lkg
        if promoted:
            lkg = cand
        rows.append((cand, promoted, lkg))
    return rows


def make_db(path: Path, archs: Iterable[str], modes: Iterable[str] = MODES, trials: int = 10, loops: int = 20,
            design_archs: Iterable[str] | None = None, design_trials: int | None = None, study: str = "test",
            skip: Iterable[tuple[str, str, int]] = (), running: Iterable[tuple[str, str, int]] = (),
            seed: int = 0) -> dict:
    """Write one study into a fresh database; returns what was written (for expectations).

    `skip`: (arch, mode, trial) never inserted; `running`: inserted with status 'running'.
    """
    archs, modes = list(archs), list(modes)
    peaks = published_peaks()
    rng = np.random.default_rng(seed)
    con = store.connect(path)
    design = {"archs": list(design_archs or archs), "modes": list(modes), "trials": design_trials or trials,
              "meta_loops": loops}
    con.execute("INSERT INTO studies (name, design, design_hash, code_version, device, started_at) "
                "VALUES (?, ?, ?, 'test', 'cpu', '2025-01-01T00:00:00')", (study, json.dumps(design), "h" * 16))
    sid = con.execute("SELECT id FROM studies WHERE name=?", (study,)).fetchone()[0]
    skip, running = set(skip), set(running)
    written = {"trials": [], "bounty_loops": {}}
    con.execute("BEGIN")  # one transaction: the store's connection is in autocommit mode
    for a in archs:
        for m in modes:
            for k in range(1, trials + 1):
                if (a, m, k) in skip:
                    continue
                peak = peaks[(a, m)][k - 1]
                bl = int(rng.integers(1, loops + 1))
                status = "running" if (a, m, k) in running else "done"
                wd = 1e-4 if m == "decay" else 0.0
                dr = 0.1 if m == "dropout" else 0.0
                cur = con.execute(
                    "INSERT INTO trials (study_id, arch, mode, trial, seed, meta_loops, lr, batch_size, weight_decay, "
                    "dropout, dataset, status, bounty, bounty_loop, test_acc, wall_seconds, loops_done) "
                    "VALUES (?, ?, ?, ?, ?, ?, 1e-4, 256, ?, ?, 'mnist', ?, ?, ?, ?, 1.0, ?)",
                    (sid, a, m, k, 1000 + k, loops, wd, dr, status, peak if status == "done" else None,
                     bl if status == "done" else None, peak - 0.1 if status == "done" else None,
                     loops if status == "done" else loops // 2))
                tid = cur.lastrowid
                diverge = loops if (k == 1 and m == "output" and bl < loops) else None
                rows = synthetic_curve(peak, bl, loops if status == "done" else loops // 2, rng, diverge)
                for loop, (cand, prom, lkg) in enumerate(rows, start=1):
                    con.execute("INSERT INTO meta_loops (trial_id, loop, mode, candidate_acc, promoted, ablated_layer, "
                                "ablated_index, lkg_score, train_loss, diverged) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                                (tid, loop, m, cand, int(prom), None, None, lkg, 0.5, int(cand is None)))
                if status == "done":
                    written["trials"].append((a, m, k, peak))
                    written["bounty_loops"][(a, m, k)] = bl
    con.execute("COMMIT")
    con.close()
    return written
