"""The report's tables: the builders that fill a `Table` (psa.analysis.table) from an analysis."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import asdict

import numpy as np

from psa.analysis.convergence import Convergence
from psa.analysis.findings import Analysis
from psa.analysis.harm import MEASURES, ArchHarm, Separation, rho_text
from psa.analysis.regimes import regime_counts
from psa.analysis.results import Curve, arch_params, arch_shape, is_heterogeneous, matching_label
from psa.core.arch import N_IN, N_OUT, parse_arch
from psa.core.model import DEFAULT_MODEL
from psa.analysis.stats import winners
from psa.analysis.table import Table, f2, fp
from psa.core.member import ABLATIVE_MODES, BASELINE_MODES, MODES


# --------------------------------------------------------------------------------------------
# The report's tables


def table_iv(archs: Sequence[str], io: tuple[int, int] = (N_IN, N_OUT), model: str = DEFAULT_MODEL) -> Table:
    """Table IV: parameters (equation 1 for a data set of `io` = (inputs, classes); a ResMLP's
    own count for `model` resmlp) and Matched/Asymmetric (of the SimpleMLP shape) of every
    architecture."""
    rows, raw = [], []
    for a in archs:
        p = arch_params(a, io, model)
        m = matching_label(a)
        rows.append([a, f"{p:,}" if p is not None else "?", m])
        raw.append({"arch": a, "params": p, "matching": m})
    notes = [] if model == DEFAULT_MODEL else [
        f"Parameters of the {model}; the matching label is that of the SimpleMLP of the same shape (equation 2)."]
    return Table("table_iv", "Table IV: parameters of the network architectures", ["Architecture", "Parameters",
                 "Parameter matching"], rows, notes, raw=raw)


def table_v(A: Analysis, tie_tolerance: float = 0.0) -> Table:
    """Table V: mean +- std (ddof=0) of the peak validation accuracy per mode, and the winner."""
    rows, raw = [], []
    expected = A.data.design.trials
    short = False
    for a in A.archs:
        cells, means = [], {}
        rec: dict = {"arch": a}
        for m in MODES:
            s = A.summ.get((a, m))
            if s is None:
                cells.append("-")
                rec.update({f"{m}_mean": None, f"{m}_std": None, f"{m}_n": 0})
                continue
            txt = f"{s.mean:.2f} ± {s.std:.2f}"
            if expected and s.n < expected:
                txt += f" (n={s.n})"
                short = True
            cells.append(txt)
            means[m] = s.mean
            rec.update({f"{m}_mean": s.mean, f"{m}_std": s.std, f"{m}_n": s.n})
        w = winners(means, tie_tolerance)
        win = w[0] if len(w) == 1 else ("Tie: " + "/".join(w) if w else "-")
        rec["winner"] = win
        rows.append([a, *cells, win])
        raw.append(rec)
    notes = ["Mean and population standard deviation (ddof=0, as the published tables) of the peak validation "
             "accuracy (%) over the trials of each cell.",
             "Winner: the best mean after rounding to 2 decimals; modes with equal rounded means tie"
             + (f" (within {tie_tolerance:g} points)" if tie_tolerance else "") + "."]
    if short:
        notes.append("(n=k): fewer trials than the design's "
                     f"{expected}; such means are provisional.")
    return Table("table_v", "Table V: mean ± std of peak validation accuracy (%)", ["Architecture", *MODES, "Winner"],
                 rows, notes, raw)


def table_summary(A: Analysis) -> Table:
    """Tables I-III for every architecture: n, mean, std, min, max per mode."""
    rows, raw = [], []
    for a in A.archs:
        p = arch_params(a, A.data.io, A.data.model)
        for m in MODES:
            s = A.summ.get((a, m))
            if s is None:
                continue
            rows.append([a, f"{p:,}" if p else "?", m, str(s.n), f2(s.mean), f2(s.std), f2(s.min), f2(s.max)])
            raw.append({"arch": a, "params": p, **{k: v for k, v in asdict(s).items() if k != "arch"}})
    return Table("summary", "Per-architecture performance summaries (as Tables I-III)",
                 ["Architecture", "Parameters", "Mode", "N", "Mean", "Std", "Min", "Max"], rows,
                 ["Std is the population standard deviation (ddof=0)."], raw, html_collapsed=True)


def table_models(A: Analysis) -> Table:
    """A study of your own models (module:function): the bounty of each model and mode (mean ±
    population std, min, max over the trials) and the mean test accuracy of the trials' LKGs."""
    rows, raw = [], []
    for a in A.archs:
        for m in A.data.design.modes:
            s = A.summ.get((a, m))
            if s is None:
                continue
            tests = [t.test_acc for t in A.data.cell(a, m) if t.test_acc is not None]
            test = sum(tests) / len(tests) if tests else None
            rows.append([a, m, str(s.n), f"{s.mean:.2f} ± {s.std:.2f}", f2(s.min), f2(s.max), f2(test)])
            raw.append({**{k: v for k, v in asdict(s).items()}, "model": a, "test_mean": test})
    return Table("models", "Bounty per model and mode: peak validation accuracy (%)",
                 ["Model", "Mode", "N", "Bounty (mean ± std)", "Min", "Max", "Test acc. (mean)"], rows,
                 ["Std is the population standard deviation (ddof=0); trial k of every mode shares its seed."], raw)


def table_trials(A: Analysis, unit: str = "Architecture") -> Table:
    """Every finished trial (`unit`: what the first column holds)."""
    order = {a: i for i, a in enumerate(A.archs)}
    ts = sorted(A.data.trials, key=lambda t: (order.get(t.arch, 1e9), MODES.index(t.mode) if t.mode in MODES else 9,
                                              t.trial))
    rows = [[t.arch, t.mode, str(t.trial), "-" if t.seed is None else str(t.seed), f2(t.peak),
             "-" if t.bounty_loop is None else str(t.bounty_loop), f2(t.test_acc)] for t in ts]
    raw = [asdict(t) for t in ts]
    return Table("trials", "Per-trial results", [unit, "Mode", "Trial", "Seed", "Peak val. acc.",
                 "Bounty loop", "Test acc."], rows, raw=raw, html_collapsed=True)


def table_regimes(A: Analysis, rules: str) -> Table:
    """The regime of every architecture under both rule sets, with the rule that fired."""
    rows, raw = [], []
    other = "paper" if rules == "published" else "published"
    for a in A.archs:
        r, o = A.regimes[rules][a], A.regimes[other][a]
        shape = arch_shape(a)
        prov = " (provisional)" if r.provisional else ""
        params = arch_params(a, A.data.io, A.data.model)
        rows.append([a, f"{params or 0:,}", r.regime + prov, r.name, r.rule, o.regime, o.rule])
        raw.append({"arch": a, "depth": shape[0] if shape else None, "width": shape[1] if shape else None,
                    "params": params, f"regime_{rules}": r.regime, f"rule_{rules}": r.rule,
                    f"regime_{other}": o.regime, f"rule_{other}": o.rule, "provisional": r.provisional,
                    "detail": r.detail})
    label = {"published": "published rules", "paper": "eqs. 6-8"}
    counts = regime_counts(A.regimes[rules])
    notes = [f"ZeroR = {A.zero_r:.2f}% ({A.zero_r_source}).",
             "Counts (" + label[rules] + "): " + ", ".join(f"{n} {k}" for k, n in counts.items()),
             "Rules: the published rules reproduce the authors' regime map (docs/report.md); eqs. 6-8 are "
             "section II.H as printed."]
    prov = [a for a in A.archs if A.regimes[rules][a].provisional]
    if prov:
        notes.append(f"Provisional (modes missing or cells short of the design): {', '.join(prov)}.")
    return Table("regimes", f"Training regimes ({label[rules]}; the other rule set alongside)",
                 ["Architecture", "Parameters", "Regime", "Name", "Rule that fired", f"Regime ({label[other]})",
                  f"Rule ({label[other]})"], rows, notes, raw)


def table_heterogeneous(A: Analysis, rules: str) -> Table:
    """The heterogeneous nets (hidden layers of unequal widths), which the depth x width maps
    cannot place: widths, parameters, best baseline and ablative means, regime."""
    rows, raw = [], []
    for a in A.archs:
        if not is_heterogeneous(a):
            continue
        hidden = parse_arch(a).hidden
        p = arch_params(a, A.data.io)
        best = {}
        for group, modes in (("baseline", BASELINE_MODES), ("ablative", ABLATIVE_MODES)):
            cells = [(A.summ[(a, m)].mean, m) for m in modes if (a, m) in A.summ]
            best[group] = max(cells) if cells else None
        r = A.regimes[rules][a]
        rows.append([a, "-".join(map(str, hidden)), f"{p or 0:,}",
                     *(f"{v[0]:.2f} ({v[1]})" if v else "-" for v in best.values()),
                     r.regime + (" (provisional)" if r.provisional else "")])
        raw.append({"arch": a, "hidden": list(hidden), "depth": len(hidden), "params": p,
                    **{f"best_{g}_mean": v[0] if v else None for g, v in best.items()},
                    **{f"best_{g}_mode": v[1] if v else None for g, v in best.items()}, "regime": r.regime})
    return Table("heterogeneous", "Heterogeneous architectures (layers of unequal widths)",
                 ["Architecture", "Hidden widths", "Parameters", "Best baseline mean", "Best ablative mean",
                  "Regime"], rows,
                 ["Nets with hidden layers of more than one width have no place on the depth x width maps; "
                  "the accuracy-against-parameters figure draws them beside the nets of one width.",
                  "Means are of the peak validation accuracy (%) over the trials of a cell; the mode in brackets."],
                 raw)


def table_tests(A: Analysis, alpha: float, unit: str = "Architecture") -> Table:
    """Every paired ablative-vs-baseline comparison (`unit`: what the first column holds)."""
    rows, raw = [], []
    for c in A.comparisons:
        rows.append([c.arch, c.ablative, c.baseline, str(c.n), f"{c.mean_diff:+.2f}",
                     f"[{c.ci_low:+.2f}, {c.ci_high:+.2f}]", fp(c.p), fp(c.p_holm),
                     "-" if math.isnan(c.d_z) else f"{c.d_z:+.2f}", "-" if math.isnan(c.r_rb) else f"{c.r_rb:+.2f}",
                     c.verdict + (" (collapsed)" if c.collapsed else "")])
        raw.append(asdict(c))
    pairing = ("trial k of both modes shares its seed" if A.data.paired
               else "pairs by trial index only (these trials were not seeded in pairs)")
    notes = [f"Paired by trial index: {pairing}.",
             "Test: exact two-sided sign-flip (randomisation) test of the mean paired difference over all 2^n sign "
             "assignments; Holm-corrected over the "
             + ("9 comparisons of each architecture." if unit == "Architecture"
                else f"comparisons of each {unit.lower()}."),
             _undecidable(alpha, "the architecture's comparisons"),
             "Effect sizes: Cohen's d_z (mean / sd of the differences; '-' when they do not vary) and the "
             "matched-pairs rank-biserial r. CI: 95% percentile bootstrap of the mean difference (pairs resampled).",
             "Difference = ablative minus baseline, in accuracy points.",
             "(collapsed): no trial of either mode beats ZeroR by the escape margin; the test then compares "
             "constant predictors (e.g. output ablation keeping the majority class at ZeroR), not learning."]
    return Table("paired_tests", "Ablative vs baseline modes: paired tests",
                 [unit, "Ablative", "Baseline", "Pairs", "Mean diff.", "95% CI", "p", "p (Holm)", "d_z",
                  "r_rb", "Verdict"], rows, notes, raw, html_collapsed=unit == "Architecture")


def _undecidable(alpha: float, family: str) -> str:
    """The verdict note of a table of paired tests Holm-corrected over `family`."""
    return (f"Verdict at alpha = {alpha:g}: 'cannot decide' when no outcome could be significant after Holm's "
            f"correction (the smallest possible p, 2/2^k for k differing pairs, Holm-adjusted over {family}, is at "
            f"least alpha).")


def table_variants(A: Analysis, alpha: float, unit: str = "Architecture") -> Table:
    """Every engine variant against the paper's engine (psa.analysis.stats.variant_comparisons);
    `unit` names the first column ("Model" for a study of your own models)."""
    rows, raw = [], []
    for c in A.variants:
        mv, mr = A.summ.get((c.arch, c.ablative)), A.summ.get((c.arch, c.baseline))
        rows.append([c.arch, c.ablative, c.baseline, str(c.n),
                     "-" if mv is None else f"{mv.mean:.2f} ± {mv.std:.2f}",
                     "-" if mr is None else f"{mr.mean:.2f} ± {mr.std:.2f}", f"{c.mean_diff:+.2f}",
                     f"[{c.ci_low:+.2f}, {c.ci_high:+.2f}]", fp(c.p), fp(c.p_holm),
                     c.verdict + (" (collapsed)" if c.collapsed else "")])
        raw.append(asdict(c))
    notes = ["Peak validation accuracy (the bounty), mean ± population std over the trials.",
             "Paired by trial index: trial k of every condition shares its seed (initial weights, data order).",
             "Test: exact two-sided sign-flip test of the mean paired difference (variant minus reference); "
             f"Holm-corrected over the variant conditions of each {unit.lower()}.",
             _undecidable(alpha, f"the variant conditions of the {unit.lower()}")]
    return Table("variant_tests", "Engine variants vs the paper's engine: paired tests",
                 [unit, "Condition", "Reference", "Pairs", "Condition mean", "Reference mean",
                  "Mean diff.", "95% CI", "p", "p (Holm)", "Verdict"], rows, notes, raw)


def table_effects(A: Analysis) -> Table:
    """Per architecture: what the paired tests say about ablation."""
    rows, raw = [], []
    for a in A.archs:
        e = A.effects.get(a)
        if e is None:
            continue
        reg = A.regimes["published"][a].regime
        rows.append([a, reg, e["effect"], str(e["better"]), str(e["worse"]), str(e["undecidable"]),
                     str(e["n_comparisons"])])
        raw.append({"arch": a, "regime_published": reg, **e})
    return Table("ablation_effects", "Ablation effect per architecture, from the paired tests",
                 ["Architecture", "Regime", "Effect", "Better", "Worse", "Cannot decide", "Comparisons"], rows,
                 raw=raw, html_collapsed=True)


CHECKPOINTS = (1, 10, 25, 50, 75, 100)


def _cell_curves(A: Analysis) -> dict[tuple[str, str], list[tuple[int, Curve]]]:
    out: dict[tuple[str, str], list[tuple[int, Curve]]] = defaultdict(list)
    for (a, m, k), c in A.data.curves.items():
        out[(a, m)].append((k, c))
    return out


def _diverged_share(curves: list[Curve], n_loops: int) -> float:
    """Share of a cell's candidates that diverged: the recorded flags where a study has them,
    else (published curves) the missing accuracies."""
    if not curves or not n_loops:
        return math.nan
    flags = [c.diverged if c.diverged is not None else np.isnan(c.candidate) for c in curves]
    return float(np.mean(np.concatenate(flags)))


def table_lkg(A: Analysis) -> tuple[Table, Table, list[dict], list[dict]]:
    """LKG growth and convergence per cell, plus their per-loop long forms (CSV only)."""
    cells = _cell_curves(A)
    n_loops = max([c.lkg.size for v in cells.values() for _, c in v] + [0])
    checks = [c for c in CHECKPOINTS if c <= n_loops] or ([n_loops] if n_loops else [])
    if n_loops and n_loops not in checks:
        checks.append(n_loops)
    mid = max(n_loops // 2, 1)
    bounty_loops: dict[tuple[str, str], list[int]] = defaultdict(list)
    for t in A.data.trials:
        if t.bounty_loop is not None:
            bounty_loops[(t.arch, t.mode)].append(t.bounty_loop)
    g_rows, g_raw, c_rows, c_raw, growth_long, conv_long = [], [], [], [], [], []
    for a in A.archs:
        for m in MODES:
            cc = cells.get((a, m))
            if not cc:
                continue
            lkg = _stack([c.lkg for _, c in cc], n_loops)
            cand = _stack([c.candidate for _, c in cc], n_loops)
            prom = [int(c.promoted.sum()) for _, c in cc]
            lkg_at = {c: _nanmean(lkg[:, c - 1]) for c in checks}
            cand_at = {c: _nanmean(cand[:, c - 1]) for c in checks}
            gain = _nanmean(lkg[:, -1] - lkg[:, mid - 1]) if n_loops else math.nan
            g_rows.append([a, m, str(len(cc)), f"{np.mean(prom):.1f}", *[f2(lkg_at[c]) for c in checks], f2(gain)])
            g_raw.append({"arch": a, "mode": m, "curves": len(cc), "mean_promotions": float(np.mean(prom)),
                          **{f"lkg_loop{c}": lkg_at[c] for c in checks}, f"gain_after_loop{mid}": gain})
            bl = bounty_loops.get((a, m), [])
            diverged = _diverged_share([c for _, c in cc], n_loops)
            med = f"{np.median(bl):.0f}" if bl else "-"
            late = f"{100 * np.mean(np.array(bl) > mid):.0f}%" if bl else "-"
            c_rows.append([a, m, *[f2(cand_at[c]) for c in checks], f"{100 * diverged:.1f}%", med, late])
            c_raw.append({"arch": a, "mode": m, **{f"candidate_loop{c}": cand_at[c] for c in checks},
                          "diverged_share": diverged, "median_bounty_loop": float(np.median(bl)) if bl else None,
                          f"bounty_after_loop{mid}_share": float(np.mean(np.array(bl) > mid)) if bl else None})
            for k, c in cc:
                for i in np.flatnonzero(c.promoted):
                    growth_long.append({"arch": a, "mode": m, "trial": k, "loop": int(i) + 1,
                                        "lkg_score": float(c.lkg[i])})
            for i in range(n_loops):
                col = cand[:, i]
                fin = col[np.isfinite(col)]
                conv_long.append({"arch": a, "mode": m, "loop": i + 1, "n": int(fin.size),
                                  "candidate_mean": float(fin.mean()) if fin.size else None,
                                  "candidate_min": float(fin.min()) if fin.size else None,
                                  "candidate_max": float(fin.max()) if fin.size else None,
                                  "lkg_mean": _nanmean(lkg[:, i])})
    src = A.data.curves_note or "per-loop records"
    growth = Table("lkg_growth", "LKG growth: mean LKG score (%) at chosen meta-loops",
                   ["Architecture", "Mode", "Curves", "Promotions", *[f"LKG @{c}" for c in checks],
                    f"Gain after loop {mid}"], g_rows,
                   [f"From {src}.", "Per-promotion records: lkg_growth_per_loop.csv."], g_raw, html_collapsed=True)
    conv = Table("convergence", "Convergence: mean candidate validation accuracy (%) at chosen meta-loops",
                 ["Architecture", "Mode", *[f"Loop {c}" for c in checks], "Diverged", "Median bounty loop",
                  f"Bounty after loop {mid}"], c_rows,
                 [f"From {src}.", "Every loop: convergence_per_loop.csv."], c_raw, html_collapsed=True)
    return growth, conv, growth_long, conv_long


def _nanmean(x: np.ndarray) -> float:
    """np.nanmean, and NaN without its RuntimeWarning where nothing is finite: no candidate scored,
    or loops past a cell's last (exports of studies with fewer meta-loops, read as one)."""
    return float(np.nanmean(x)) if np.isfinite(x).any() else math.nan


def _stack(arrays: Sequence[np.ndarray], n: int) -> np.ndarray:
    out = np.full((len(arrays), n), np.nan)
    for i, a in enumerate(arrays):
        out[i, : a.size] = a
    return out


def table_missing(A: Analysis) -> Table:
    """What the study lacks against its design, cell by cell."""
    d = A.data.design
    have: dict[tuple[str, str], int] = defaultdict(int)
    for t in A.data.trials:
        have[(t.arch, t.mode)] += 1
    rows = []
    for a in d.archs:
        for m in d.modes:
            n = have.get((a, m), 0)
            if n < d.trials:
                rows.append([a, m, str(n), str(d.trials)])
    notes = list(A.missing)
    if A.data.incomplete:
        notes.append("Unfinished trials, one per line: incomplete_trials.csv.")
    raw = [{"arch": r[0], "mode": r[1], "finished": int(r[2]), "designed": int(r[3])} for r in rows]
    return Table("missing", "Cells short of the design", ["Architecture", "Mode", "Finished trials",
                 "Designed"], rows, notes, raw, html_collapsed=len(rows) > 30)


# --------------------------------------------------------------------------------------------
# Convergence dynamics and the harm rate


def _opt(x: float | None, fmt: str = "{:.0f}") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else fmt.format(x)


def table_bounty_convergence(C: Convergence) -> Table:
    """Per cell: when the bounty reached 99% of its final value (and of its gain), and whether
    it still rose in the last 10% of the loops."""
    rows, raw = [], []
    for c in C.cells:
        share = c.improving_share
        rows.append([c.arch, c.condition, str(c.n), str(c.loops), f2(c.final_median), _opt(c.t99_median, "{:g}"),
                     _opt(c.t99_gain_median, "{:g}"), f"{c.improving}/{c.judged}" if c.judged else "-",
                     _opt(c.tail_rise_mean, "{:+.2f}")])
        raw.append({"arch": c.arch, "mode": c.condition, "trials": c.n, "loops": c.loops,
                    "final_bounty_median": c.final_median, "t99_median": c.t99_median,
                    "t99_gain_median": c.t99_gain_median, "still_improving": c.improving, "judged": c.judged,
                    "still_improving_share": share, "tail_rise_mean": c.tail_rise_mean})
    notes = ["Bounty curve: the running maximum of the LKG score after each meta-loop (-1 before the first valid "
             "candidate).",
             "Loop to 99%: first loop whose bounty is at least 99% of the final bounty; to 99% of the gain: first "
             "loop that has covered 99% of the rise from the first valid bounty to the final one (none for a "
             "trial that never rises). Medians over the cell's trials with per-loop records.",
             "Still improving: the bounty rose in the last 10% of the loops; "
             "rise: mean over the cell's trials of the final bounty minus the bounty before those loops.",
             "Per trial: bounty_convergence_per_trial.csv."]
    return Table("bounty_convergence", "Bounty convergence per cell: loop to 99% and still improving",
                 ["Architecture", "Mode", "Trials", "Loops", "Median bounty", "Loop to 99%", "Loop to 99% of gain",
                  "Still improving", "Last-10% rise"], rows, notes, raw, html_collapsed=True)


def table_still_improving(C: Convergence) -> Table:
    """Per condition over every architecture: which still improve in their last 10% of loops."""
    rows, raw = [], []
    for x in C.conditions:
        share = x.improving_share
        rows.append([x.condition, str(x.trials), f"{x.improving}/{x.judged}" if x.judged else "-",
                     _opt(None if share is None else 100 * share, "{:.0f}%"),
                     _opt(None if x.rising_share is None else 100 * x.rising_share, "{:.0f}%") + f" of {x.rising}",
                     f"{x.cells_majority_improving}/{x.cells}", _opt(x.tail_rise_mean, "{:+.3f}"),
                     _opt(x.t99_median, "{:g}"), _opt(x.t99_gain_median, "{:g}")])
        raw.append({"mode": x.condition, "trials": x.trials, "still_improving": x.improving, "judged": x.judged,
                    "still_improving_share": share, "rising": x.rising, "rising_share": x.rising_share,
                    "cells": x.cells,
                    "cells_majority_improving": x.cells_majority_improving, "tail_rise_mean": x.tail_rise_mean,
                    "t99_median": x.t99_median, "t99_gain_median": x.t99_gain_median})
    span = f"the last {C.tail_loops} of its {C.loops} meta-loops" if C.loops else "the last 10% of its meta-loops"
    notes = [f"A trial still improves when its bounty rose in {span} "
             "(b(T) > b(T - k), k = ceil(10% of T)); trials with per-loop records only.",
             "Of rising trials: the share among the trials whose bounty rose at all (nets stuck at ZeroR never do).",
             "Cells: architectures where more than half of the mode's trials still improve.",
             "Loop to 99% (of the final bounty, and of its gain): medians over the mode's trials (of its gain: "
             "over the trials whose bounty rose at all)."]
    return Table("still_improving", "Which modes still improve in their last 10% of meta-loops",
                 ["Mode", "Trials", "Still improving", "Share", "Of rising trials", "Cells (majority)",
                  "Mean last-10% rise", "Median loop to 99%", "Median loop to 99% of gain"], rows, notes + C.notes, raw)


def table_harm(harms: Sequence[ArchHarm], ablative: Sequence[str] = ABLATIVE_MODES) -> Table:
    """Per architecture: the harm rate of each ablative mode against none, and discard fractions."""
    rows, raw = [], []
    for h in harms:
        rows.append([h.arch, f"{h.params:,}" if h.params else "?", h.regime,
                     *[_opt(h.delta.get(m), "{:+.2f}") for m in ablative], _opt(h.harm, "{:+.2f}"),
                     _opt(h.discard.get("none"), "{:.2f}"), _opt(h.discard_ablative, "{:.2f}")])
        raw.append({"arch": h.arch, "params": h.params, "regime": h.regime,
                    **{f"delta_{m}": h.delta.get(m) for m in ablative},
                    **{f"pairs_{m}": h.pairs.get(m) for m in ablative}, "harm": h.harm,
                    **{f"discard_{m}": h.discard.get(m) for m in MODES}, "discard_ablative": h.discard_ablative,
                    **{f"curves_{m}": h.curves.get(m, 0) for m in MODES}})
    notes = ["Harm rate: mean bounty (peak validation accuracy) of the ablative mode minus that of none, in points; "
             "paired by seed (mean of the per-trial differences) when trial k of every mode shares its seed, else "
             "the difference of the means. Negative: ablation costs accuracy. 'Harm': mean over the ablative modes.",
             "Discard fraction: share of meta-loops 2..T whose candidate was not promoted (discarded or diverged), "
             "mean over the trials with per-loop records; 'ablative': mean over the ablative modes.",
             "Regime: the report's rule set (see the regimes table)."]
    return Table("harm_rate", "Harm rate per architecture: ablative modes against none",
                 ["Architecture", "Parameters", "Regime", *[f"Δ {m}" for m in ablative], "Harm",
                  "Discard none", "Discard ablative"], rows, notes, raw, html_collapsed=True)


def table_harm_separation(seps: Sequence[Separation], rho: Mapping[str, tuple[float, float, int]]) -> Table:
    """How well the harm rate, the discard fraction and the parameter count separate each regime."""
    rows, raw = [], []
    for s in seps:
        side = ">" if s.direction == 1 else "<"
        rows.append([MEASURES[s.measure][0], s.regime, f"{s.n_regime}/{s.n}", f"{s.auc:.3f}",
                     "none (majority)" if s.constant else f"{side} {s.threshold:.4g}", f"{100 * s.accuracy:.1f}%",
                     f"{100 * s.loo_accuracy:.1f}%", f"{100 * s.majority_accuracy:.1f}%"])
        raw.append(asdict(s))
    notes = ["Each regime against the other three, over the architectures classified I-IV; 'II vs I': the "
             "optimally sized nets against the over-sized ones, those two regimes only.",
             "AUC: probability that a net of the regime scores higher than one outside it (ties half); 0.5 is no "
             "separation, near 0 or 1 strong separation (near 0: the regime scores lower).",
             "Threshold: the single cut with the best in-sample accuracy; leave-one-out: each net classified by the "
             "cut fitted without it; majority: always answering 'not this regime'. A cut beyond every value is "
             "the majority answer ('none').",
             "The classifier reads the same mode means as the harm rate (regime II: ablative mean below the "
             "baselines), so harm-rate separation of II is partly by construction; the parameter count is not "
             "read by the classifier."]
    for m, (r, p, n) in rho.items():
        notes.append(f"Spearman rank correlation of the {MEASURES[m][0]} with the parameter count: "
                     f"{rho_text(r, p, n)}.")
    return Table("harm_separation", "Harm rate as a capacity detector: separation of the regimes",
                 ["Measure", "Regime", "Nets in regime", "AUC", "Best threshold", "Accuracy", "Leave-one-out",
                  "Majority"], rows, notes, raw)
