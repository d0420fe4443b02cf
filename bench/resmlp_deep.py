"""ResMLP where SimpleMLP collapses: the bounties of the `resmlp-deep-*` studies of a results
database (examples/resmlp-deep.toml) beside the published SimpleMLP trials of the same shapes,
with psa's paired tests of each ablative mode against `none` (psa.analysis.stats).

A study still running is read from its per-loop rows: the bounty so far is the best LKG score
up to the last meta-loop that all its trials have finished (printed as "loops").

    python bench/resmlp_deep.py results/resmlp.sqlite
"""

from __future__ import annotations

import argparse
import sqlite3
from collections import defaultdict

from psa.analysis.results import Trial, load_published
from psa.analysis.stats import StatsConfig, paired_comparisons, summaries

ZERO_R = 11.02  # the validation ZeroR of the MNIST split (docs/datasets.md)


def study_trials(con: sqlite3.Connection, study: str) -> tuple[list[Trial], int]:
    """Trials of `study` with their bounty up to the last loop every trial reached; that loop."""
    rows = con.execute(
        "SELECT t.arch, t.mode, t.trial, t.seed, m.loop, m.lkg_score FROM meta_loops m JOIN trials t "
        "ON t.id = m.trial_id JOIN studies s ON s.id = t.study_id WHERE s.name = ?", (study,)).fetchall()
    by_trial: dict[tuple[str, str, int, int], dict[int, float]] = defaultdict(dict)
    for arch, mode, k, seed, loop, lkg in rows:
        by_trial[(arch, mode, k, seed)][loop] = lkg
    if not by_trial:
        return [], 0
    last = min(max(v) for v in by_trial.values())
    trials = [Trial(arch, mode, k, max(v[i] for i in range(1, last + 1)), seed=seed)
              for (arch, mode, k, seed), v in sorted(by_trial.items())]
    return trials, last


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("db")
    args = ap.parse_args()
    con = sqlite3.connect(f"file:{args.db}?mode=ro", uri=True)
    studies = [r[0] for r in con.execute("SELECT name FROM studies WHERE name LIKE 'resmlp-deep%' ORDER BY id")]
    published = load_published()
    cfg = StatsConfig(zero_r=ZERO_R)
    print("| arch | mode | ResMLP bounty (loops) | n | vs none: mean diff [95% CI], p (Holm), verdict "
          "| published SimpleMLP (100 loops) |")
    print("|---|---|---|---|---|---|")
    for study in studies:
        trials, last = study_trials(con, study)
        if not trials:
            continue
        summ = summaries(trials)
        archs = sorted({t.arch for t in trials})
        tests = {(c.arch, c.ablative): c for c in paired_comparisons(trials, archs, cfg) if c.baseline == "none"}
        pub = summaries(t for t in published.trials if t.arch in archs)
        for arch in archs:
            for mode in ("none", "decay", "dropout", "full", "hidden", "output"):
                s = summ.get((arch, mode))
                if s is None:
                    continue
                c = tests.get((arch, mode))
                test = "-" if c is None else (f"{c.mean_diff:+.2f} [{c.ci_low:+.2f}, {c.ci_high:+.2f}], "
                                              f"p={c.p_holm:.3g}, {c.verdict}")
                p = pub.get((arch, mode))
                ptxt = "-" if p is None else f"{p.mean:.2f} ± {p.std:.2f} (max {p.max:.2f})"
                print(f"| {arch} | {mode} | {s.mean:.2f} ± {s.std:.2f} ({last}) | {s.n} | {test} | {ptxt} |")


if __name__ == "__main__":
    main()
