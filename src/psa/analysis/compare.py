"""`psa compare`: a study (or the published data) against a reference, cell by cell and regime by regime."""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from psa.analysis import figures as fg
from psa.analysis.exported import load_source
from psa.analysis.figures import Figure
from psa.analysis.outdir import MANIFEST, OutputDir, write_figure_data, write_table
from psa.analysis.page import figure, page, paragraph, preformatted
from psa.analysis.reference import (
    REFERENCES,
    CellComparison,
    CompareConfig,
    compare_cells,
)
from psa.analysis.regimes import OUTCOMES, ClassifierConfig, Regime, classify_all
from psa.analysis.results import (
    ReportError,
    StudyData,
    load_published,
    load_seed_table,
    missing_report,
    published_curves,
    short_list,
)
from psa.analysis.stats import base_dataset, resolve_zero_r, summaries, validation_zero_r
from psa.analysis.table import Table, fp
from psa.core.model import DEFAULT_MODEL
from psa.core.member import MODES
from psa.study.design import MODULE_MODEL

REFERENCE_LABELS = {"published": "published per-trial data (final)", "seed": "printed Table V"}


@dataclass(frozen=True)
class CompareOptions:
    """What `psa compare` reads."""

    db: str | None = "results/psa.sqlite"
    ours_published: bool = False  # compare the published data itself (a check of the machinery)
    reference: str = "published"
    study: str | None = None
    out: str = "compare"
    rules: str = "published"
    zero_r: float | None = None
    alpha: float = 0.01
    escape_margin: float = 0.5
    convergence: tuple[str, ...] | None = None  # None: see figures.convergence_targets
    worst: int = 10
    export: tuple[str, ...] = ()  # psa export's files or directories, read instead of `db`


@dataclass
class CompareResult:
    """The verdict and what was written."""

    out: Path
    verdict: list[str]
    summary: dict


@dataclass(frozen=True)
class RegimeAgreement:
    """Our regimes against the published map, over the architectures both have."""

    ours: dict[str, Regime]
    published: dict[str, Regime]
    archs: list[str]  # compared: classified on both sides
    agree: list[str]
    disagree: list[str]
    missing_modes: list[str] = field(default_factory=list)  # not compared: a side lacks the modes to classify


def build_compare(opt: CompareOptions) -> CompareResult:
    """Compare a study (or the published data) with a reference, write the comparison, and
    return the one-screen verdict."""
    if opt.reference not in REFERENCES:
        raise ReportError(f"unknown reference {opt.reference!r} (choose published or seed)")
    data = load_published() if opt.ours_published else load_source(opt.db, None, opt.study, opt.export)
    if data.model == MODULE_MODEL:
        raise ReportError(f"{data.source} trains models given as module:function, which have no published "
                          f"counterpart (use psa report)")
    if data.model != DEFAULT_MODEL:
        # the published trials are SimpleMLPs: a ResMLP "18*18" is another net with the same name
        raise ReportError(f"{data.source} trains {data.model} nets; the {REFERENCE_LABELS[opt.reference]} is "
                          f"of the paper's {DEFAULT_MODEL}, so only {DEFAULT_MODEL} studies can be compared "
                          f"with it (use psa report)")
    if base_dataset(data.dataset) != "mnist":
        raise ReportError(f"{data.source} trained on {data.dataset}; the {REFERENCE_LABELS[opt.reference]} is "
                          f"MNIST's, so only MNIST studies can be compared with it (use psa report)")
    out = OutputDir(opt.out)
    try:
        res = _write_compare(opt, data, out)
        out.commit()
    except BaseException:
        out.abort()
        raise
    res.out = out.target
    return res


def _write_compare(opt: CompareOptions, data: StudyData, out: OutputDir) -> CompareResult:
    ref_label = REFERENCE_LABELS[opt.reference]
    if not data.trials:
        return _write_empty_compare(data, ref_label, out)
    zero_r, zsrc = resolve_zero_r(data, opt.zero_r)
    published = load_published()
    cells = compare_cells(data.trials, opt.reference,
                          CompareConfig(alpha=opt.alpha, escape_margin=opt.escape_margin, zero_r=zero_r),
                          published.trials)
    regimes = regime_agreement(data, published, zero_r, opt.rules)
    cell_table, agreement_table, confusion_table = _compare_tables(opt, cells, regimes, ref_label, zero_r)
    for t in (cell_table, agreement_table, confusion_table):
        write_table(out, t)
    figs = _write_compare_figures(opt, data, cells, zero_r, ref_label, out)
    verdict, summary = _verdict(opt, data, published, cells, regimes, ref_label, zero_r, zsrc)
    verdict += _variant_lines(data, opt.alpha, zero_r, opt.escape_margin)
    out.write("verdict.txt", "\n".join(verdict) + "\n")
    sections = [("Verdict", preformatted("\n".join(verdict))),
                ("Cells", "".join(figure(f) for f in figs if f.name == "compare_means") + cell_table.html()),
                ("Regimes", confusion_table.html() + agreement_table.html())]
    if any(f.name == "convergence_overlay" for f in figs):
        sections.append(("Convergence against the published curves",
                         "".join(figure(f) for f in figs if f.name == "convergence_overlay")))
    out.write("index.html", page("PSA comparison with the published results", sections, paragraph(data.source)))
    out.write(MANIFEST, json.dumps(summary, indent=1, default=str))
    return CompareResult(out.target, verdict, summary)


def _write_empty_compare(data: StudyData, ref_label: str, out: OutputDir) -> CompareResult:
    """A study without a finished trial: nothing to compare, and why."""
    msg = data.notes + missing_report(data)
    verdict = [f"psa compare: {data.source} against the {ref_label}", "  nothing to compare: no finished trial"]
    verdict += [f"  {m}" for m in msg]
    out.write("verdict.txt", "\n".join(verdict) + "\n")
    out.write("index.html", page("PSA comparison", [("Verdict", preformatted("\n".join(verdict)))]))
    summary = {"psa_report": 1, "kind": "compare", "cells": 0}
    out.write(MANIFEST, json.dumps(summary, indent=1))
    return CompareResult(out.target, verdict, summary)


def regime_agreement(data: StudyData, published: StudyData, zero_r: float, rules: str) -> RegimeAgreement:
    """Our regimes against the authors' map, both by `rules`."""
    # the map always comes from the authors' per-trial data: the printed Table V has no
    # per-mode maxima, which the rules need; and it is MNIST, so its ZeroR is MNIST's
    ref_zero_r = zero_r if data.dataset == "mnist" else validation_zero_r("mnist")
    ours_summ = summaries(data.trials)
    ref_summ = summaries(published.trials)
    archs = data.archs
    ours = classify_all(ours_summ, archs, ClassifierConfig(zero_r=zero_r), rules, data.design.trials or None)
    ref_archs = [a for a in archs if any((a, m) in ref_summ for m in MODES)]
    ref = classify_all(ref_summ, ref_archs, ClassifierConfig(zero_r=ref_zero_r), rules, 10)
    # "n/a" is no regime (a side lacks a baseline or an ablative mode): nothing to agree with
    compared = [a for a in ref_archs if "n/a" not in (ours[a].regime, ref[a].regime)]
    agree = [a for a in compared if ours[a].regime == ref[a].regime]
    return RegimeAgreement(ours, ref, compared, agree, [a for a in compared if a not in agree],
                           [a for a in ref_archs if a not in compared])


def _compare_tables(opt: CompareOptions, cells: Sequence[CellComparison], regimes: RegimeAgreement, ref_label: str,
                    zero_r: float) -> tuple[Table, Table, Table]:
    """The per-cell tests, the regime agreement and the regime confusion matrix."""
    rows, raw = [], []
    for c in cells:
        rows.append([c.arch, c.mode, f"{c.mean_ours:.2f} ± {c.std_ours:.2f}", str(c.n_ours),
                     f"{c.mean_ref:.2f} ± {c.std_ref:.2f}", str(c.n_ref), f"{c.mean_ours - c.mean_ref:+.2f}", c.test,
                     f"{c.escape_ours} vs {c.escape_ref}" if c.test.startswith("Fisher") else "", fp(c.p),
                     fp(c.p_holm), "untested" if not c.tested else "yes" if c.consistent(opt.alpha) else "NO"])
        raw.append(asdict(c))
    notes = [f"Reference: {ref_label}.",
             f"Consistent: p >= alpha = {opt.alpha:g} (per cell, uncorrected); p (Holm) is corrected over all cells.",
             "Stds are population stds (ddof=0); the tests convert them to sample stds."]
    if opt.reference == "published":
        notes.append(f"Fisher's exact test on the share of trials escaping ZeroR (peak > {zero_r:.2f} + "
                     f"{opt.escape_margin:g}) where most trials of the cell (ours and theirs pooled) stay at ZeroR; "
                     "Welch's t-test elsewhere (Mann-Whitney U p-value in the CSV as a second opinion).")
    else:
        notes.append("Welch's t-test from summary statistics (the printed table has no per-trial data), n = 10 "
                     "assumed for the reference, a printed std of 0.00 taken as 0.005. The printed table predates "
                     "the authors' weight-decay fix (NOTES.md).")
    cell_table = Table("compare_cells", "Cells: ours against the reference", ["Architecture", "Mode", "Ours", "n",
                       "Reference", "n", "Diff.", "Test", "Escapes", "p", "p (Holm)", "Consistent"], rows, notes, raw,
                       html_collapsed=True)
    ours, ref, archs, agree = regimes.ours, regimes.published, regimes.archs, regimes.agree
    agreement_table = Table(
        "regime_agreement", "Regimes: ours against the published map",
        ["Architecture", "Ours", "Published", "Agree", "Our rule"],
        [[a, ours[a].regime, ref[a].regime, "yes" if a in agree else "NO", ours[a].rule] for a in archs],
        [f"Both classified with the {opt.rules} rules; the published side from the authors' per-trial data."]
        + ([f"Not compared (a side lacks the modes to classify it): {', '.join(regimes.missing_modes)}."]
           if regimes.missing_modes else []),
        [{"arch": a, "ours": ours[a].regime, "published": ref[a].regime, "agree": a in agree,
          "our_rule": ours[a].rule, "published_rule": ref[a].rule} for a in archs])
    confusion = Counter((ref[a].regime, ours[a].regime) for a in archs)
    labels = [k for k in OUTCOMES if any(k in key for key in confusion)]
    confusion_table = Table("regime_confusion", "Regime confusion (rows: published, columns: ours)",
                            ["Published", *labels], [[r, *[str(confusion[(r, c)]) for c in labels]] for r in labels])
    return cell_table, agreement_table, confusion_table


def _write_compare_figures(opt: CompareOptions, data: StudyData, cells: Sequence[CellComparison], zero_r: float,
                           ref_label: str, out: OutputDir) -> list[Figure]:
    """The means scatter and, where there are per-loop records, the overlay on the published curves."""
    figdir = out.tmp / "figures"
    figs = [fg.compare_scatter(cells, opt.alpha, figdir, ref_label)]
    targets, _ = fg.convergence_targets(opt.convergence, data.curves, data.archs)
    if targets:
        figs.append(fg.convergence(targets, data.curves, data.trials, zero_r, figdir, "convergence_overlay",
                                   reference=published_curves(), ref_label="published"))
    for f in figs:
        write_figure_data(out, f.name, f.data)
    return figs


def _variant_lines(data: StudyData, alpha: float, zero_r: float, margin: float) -> list[str]:
    """The engine variants of `data` against the paper's engine in the same study (paired by
    trial, Holm per architecture; stats.variant_comparisons), as verdict lines; none without variants."""
    from psa.analysis.stats import StatsConfig, summaries, variant_comparisons

    comps = variant_comparisons(data.trials, data.archs, data.design.modes,
                                StatsConfig(alpha=alpha, zero_r=zero_r, escape_margin=margin))
    if not comps:
        return []
    summ = summaries(data.trials)
    lines = ["engine variants against the paper's engine in this study (paired by seed, Holm per architecture):",
             f"  {'arch':<9}{'condition':<26}{'mean':>14}{'reference':>22}{'diff':>8}{'p (Holm)':>10}  verdict"]
    for c in comps:
        v, r = summ[(c.arch, c.ablative)], summ[(c.arch, c.baseline)]
        lines.append(f"  {c.arch:<9}{c.ablative:<26}{v.mean:>7.2f} ± {v.std:<5.2f}{c.baseline:>9} {r.mean:>6.2f} ± "
                     f"{r.std:<5.2f}{c.mean_diff:>+8.2f}{fp(c.p_holm):>10}  {c.verdict}")
    return lines


def _verdict(opt: CompareOptions, data: StudyData, published: StudyData, cells: Sequence[CellComparison],
             regimes: RegimeAgreement, ref_label: str, zero_r: float, zsrc: str) -> tuple[list[str], dict]:
    """The one-screen verdict (verdict.txt, stdout) and the manifest's summary of it."""
    n = len(cells)
    ok = [c for c in cells if c.consistent(opt.alpha)]
    ok_holm = [c for c in cells if c.tested and not (c.p_holm < opt.alpha)]
    by_test: dict[str, list] = defaultdict(list)
    for c in cells:
        by_test[c.test].append(c)
    # per test: [consistent, tested], for the verdict's line and the manifest alike
    per_test = {t: [sum(c.consistent(opt.alpha) for c in cs), sum(c.tested for c in cs)]
                for t, cs in sorted(by_test.items())}
    ref_cells = (set(load_seed_table()) if opt.reference == "seed"
                 else {(t.arch, t.mode) for t in published.trials})
    ours_cells = {(t.arch, t.mode) for t in data.trials}
    verdict = [f"psa compare: {data.source}",
               f"  against the {ref_label}; alpha = {opt.alpha:g}; ZeroR {zero_r:.2f}% ({zsrc})",
               f"cells compared: {n} (reference has {len(ref_cells)}; {len(ref_cells - ours_cells)} of them missing in "
               f"ours; {len(ours_cells - ref_cells)} of ours without a reference)"]
    if data.departures:
        verdict.insert(2, f"  not the paper's design: {'; '.join(data.departures)}; cells may differ for that alone")
    tested = sum(c.tested for c in cells)
    if n:
        # over the tested cells: an untested one is neither consistent nor different
        share = f"{100 * len(ok) / tested:.1f}%" if tested else "none tested"
        verdict.append(f"consistent at alpha = {opt.alpha:g}: {len(ok)}/{tested} tested cells ({share}); "
                       f"if every cell agreed, about {opt.alpha * tested:.1f} would be flagged by chance")
        verdict.append("  " + "; ".join(f"{t}: {ok_t}/{tested_t}" for t, (ok_t, tested_t) in per_test.items()))
        verdict.append(f"  after Holm over all cells: {len(ok_holm)}/{tested}")
        if tested < n:
            verdict.append(f"  untested: {n - tested} (fewer than 2 trials a side: Welch's t has no p; counted neither "
                           f"consistent nor different; run more --trials)")
    ours, ref, disagree = regimes.ours, regimes.published, regimes.disagree
    verdict.append(f"regimes agreeing ({opt.rules} rules): {len(regimes.agree)}/{len(regimes.archs)}"
                   + (f"; differing: {short_list([f'{a} ({ref[a].regime}->{ours[a].regime})' for a in disagree], 10)}"
                      if disagree else ""))
    if regimes.missing_modes:
        verdict.append(f"  not compared (a side lacks the modes to classify it): {short_list(regimes.missing_modes)}")
    verdict.append("  (NOTES.md: bootstrap resamples of the published trials keep the regime of 93 of 98 "
                   "architectures, median; a handful may move between honest runs)")
    worst = sorted(cells, key=lambda c: (c.p, -abs(c.mean_ours - c.mean_ref)))[: opt.worst]
    if worst:
        verdict.append("worst cells (smallest p):")
        verdict.append(f"  {'arch':<9}{'mode':<8}{'ours':>16}{'reference':>16}  {'test':<18}{'p':>9}")
        for c in worst:
            verdict.append(f"  {c.arch:<9}{c.mode:<8}{c.mean_ours:>9.2f} ± {c.std_ours:<5.2f}"
                           f"{c.mean_ref:>9.2f} ± {c.std_ref:<5.2f}  {c.test:<18}{fp(c.p):>9}")
    summary = {"psa_report": 1, "kind": "compare", "source": data.source, "reference": opt.reference,
               "alpha": opt.alpha, "cells": n, "tested": tested, "consistent": len(ok), "consistent_holm": len(ok_holm),
               "by_test": per_test,
               "regimes_compared": len(regimes.archs), "regimes_agree": len(regimes.agree),
               "regimes_differ": disagree, "worst": [asdict(c) for c in worst], "departures": data.departures}
    return verdict, summary
