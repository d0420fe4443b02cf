"""The paired table of engine variants against the paper's engine, from a study database, at the
last meta-loop every trial of an architecture has reached (or --loop N): for a study still
running, or stopped, as well as a finished one.

A trial's bounty after loop N is the best candidate accuracy of loops 1..N, for every variant
(greedy: a candidate is promoted iff it beats the LKG score, the best so far; patience: the
bounty model is the best candidate ever). For finished trials the script checks that this equals
the stored bounty. Statistics are psa's own (psa.analysis.stats: exact sign-flip test, Holm per
architecture), the same as `psa report`'s variant_tests table.

    python bench/variants_table.py --db bench/results/variants.sqlite [--loop N]
"""

from __future__ import annotations

import argparse
import math
import sqlite3
from collections import defaultdict

from psa.analysis.results import Trial, condition_label, schedule_end
from psa.analysis.stats import StatsConfig, summaries, variant_comparisons
from psa.analysis.table import fp


def main() -> int:
    """Print one Markdown table per architecture."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--db", required=True)
    ap.add_argument("--loop", type=int, help="compare at this meta-loop (default: the last every trial reached)")
    ap.add_argument("--zero-r", type=float, default=11.02, help="validation ZeroR, for the collapsed mark")
    args = ap.parse_args()
    con = sqlite3.connect(f"file:{args.db}?mode=ro", uri=True)
    trials = con.execute("SELECT id, arch, mode, variant, trial, seed, status, bounty, loops_done, meta_loops, "
                         "variant_settings FROM trials").fetchall()
    curves: dict[int, list[float]] = defaultdict(list)
    for tid, loop, acc in con.execute("SELECT trial_id, loop, candidate_acc FROM meta_loops ORDER BY trial_id, loop"):
        curves[tid].append(math.nan if acc is None else acc)
    for arch in sorted({t[1] for t in trials}):
        rows = [t for t in trials if t[1] == arch]
        reached = min(len(curves[t[0]]) for t in rows)
        loop = min(args.loop or reached, reached)
        if loop < 1:
            print(f"{arch}: no meta-loop recorded yet\n")
            continue
        ours = []
        for tid, _, mode, variant, k, seed, status, bounty, _done, _loops, settings in rows:
            best = max((a for a in curves[tid][:loop] if not math.isnan(a)), default=-1.0)
            if status == "done" and loop == len(curves[tid]):
                assert abs(best - bounty) < 1e-9, (tid, best, bounty)
            ours.append(Trial(arch, condition_label(mode, variant), k, best, seed=seed, variant=variant or "",
                              ends_in=schedule_end(settings)))
        modes = list(dict.fromkeys(m for _, _, m, v, *_ in sorted(rows, key=lambda t: t[0]) if v is None))
        comps = variant_comparisons(ours, [arch], modes, StatsConfig(zero_r=args.zero_r))
        summ = summaries(ours)
        n_done = sum(1 for t in rows if t[6] == "done")
        print(f"**{arch}**, bounty after meta-loop {loop} of {max(t[9] for t in rows) if rows else 0} "
              f"({n_done}/{len(rows)} trials finished)\n")
        print("| Condition | Trials | Bounty (mean ± std) | Reference | Reference bounty | Diff. | 95% CI | p | "
              "p (Holm) | Verdict |")
        print("|---|---:|---:|---|---:|---:|---|---:|---:|---|")
        for c in comps:
            v, r = summ[(arch, c.ablative)], summ[(arch, c.baseline)]
            print(f"| {c.ablative} | {c.n} | {v.mean:.2f} ± {v.std:.2f} | {c.baseline} | {r.mean:.2f} ± {r.std:.2f} | "
                  f"{c.mean_diff:+.2f} | [{c.ci_low:+.2f}, {c.ci_high:+.2f}] | {fp(c.p)} | {fp(c.p_holm)} | "
                  f"{c.verdict}{' (collapsed)' if c.collapsed else ''} |")
        print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
