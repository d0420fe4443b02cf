"""`psa report`: a study's tables (Markdown, CSV, LaTeX), figures and one offline HTML page."""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from psa.analysis import convergence as cv
from psa.analysis import figures as fg
from psa.analysis import harm as hm
from psa.analysis import maps
from psa.analysis.exported import load_source
from psa.analysis.figures import Figure
from psa.analysis.findings import Analysis, analyse
from psa.analysis.outdir import (
    MANIFEST,
    OutputDir,
    write_figure_data,
    write_records,
    write_table,
)
from psa.analysis.page import bullets, figure, page, paragraph
from psa.analysis.persistence import stored_unit_layers, table_unit_layers
from psa.analysis.regimes import RULE_SETS, regime_counts
from psa.analysis.results import (
    ReportError,
    StudyData,
    missing_report,
    order_archs,
    is_heterogeneous,
    short_list,
)
from psa.analysis.stats import best_trial_winners, holm, resolve_zero_r
from psa.analysis.table import Table
from psa.analysis.tables import (
    table_bounty_convergence,
    table_effects,
    table_harm,
    table_harm_separation,
    table_heterogeneous,
    table_iv,
    table_lkg,
    table_missing,
    table_models,
    table_regimes,
    table_still_improving,
    table_summary,
    table_tests,
    table_trials,
    table_v,
    table_variants,
)
from psa.core.member import MODES
from psa.study.design import MODULE_MODEL
from psa.study.options import DEFAULT_DB

RULE_LABELS = {"published": "published rules", "paper": "equations 6-8 as printed"}


@dataclass(frozen=True)
class ReportConfig:
    """What `psa report` reads and how it classifies and tests."""

    db: str | None = str(DEFAULT_DB)  # the results database to report on
    reference: str | None = None  # "published": the authors' data instead of a database
    study: str | None = None  # which study of the database (None: the latest)
    out: str = "report"  # the output directory, replaced atomically
    rules: str = "published"  # regime rules: those behind the published map, or "paper" (eqs. 6-8)
    zero_r: float | None = None  # validation ZeroR in %; computed from the data set when None
    alpha: float = 0.05  # level of the paired tests, after Holm's correction
    n_boot: int = 10_000  # bootstrap resamples of the effect intervals
    seed: int = 0  # of the bootstrap
    convergence: tuple[str, ...] | None = None  # None: see figures.convergence_targets
    escape_margin: float = 0.5  # points above ZeroR for a trial to count as escaped
    tie_tolerance: float = 0.0  # Table V: rounded means this close tie
    export: tuple[str, ...] = ()  # psa export's files or directories, read instead of `db`


@dataclass
class Dynamics:
    """The report's convergence and harm-rate analyses (psa.analysis.convergence, .harm)."""

    conv: cv.Convergence
    harms: list[hm.ArchHarm]
    separation: list[hm.Separation]
    rho: dict[str, tuple[float, float, int]]  # measure -> Spearman (rho, p, n) with the parameter count


def dynamics(A: Analysis, rules: str, seed: int, n_boot: int, band_archs: Sequence[str]) -> Dynamics:
    """Convergence per cell and mode, harm rates and how well they separate the regimes."""
    conv = cv.analyse_convergence(A.data, A.archs, seed, n_boot, band_archs)
    harms = hm.harm_rates(A.data, A.archs, A.regimes[rules])
    rho = {m: hm.spearman(harms, m) for m in ("harm", "discard")}
    return Dynamics(conv, harms, hm.separation(harms), rho)


@dataclass
class ReportResult:
    """What a report wrote and found (also written to manifest.json)."""

    out: Path
    summary: dict
    lines: list[str]
    figures: list[Figure] = field(default_factory=list)


def build_report(cfg: ReportConfig) -> ReportResult:
    """Load, analyse and write the whole report into cfg.out (atomically)."""
    data = load_source(cfg.db, cfg.reference, cfg.study, cfg.export)
    if cfg.rules not in RULE_SETS:
        raise ReportError(f"unknown rule set {cfg.rules!r}")
    out = OutputDir(cfg.out)
    try:
        result = _write_report(cfg, data, out)
        tmp = out.tmp
        out.commit()
    except BaseException:
        out.abort()
        raise
    result.out = out.target
    for f in result.figures:  # the files moved with the directory
        f.files = [out.target / p.relative_to(tmp) for p in f.files]
    return result


def _write_report(cfg: ReportConfig, data: StudyData, out: OutputDir) -> ReportResult:
    if not data.trials:
        return _write_empty_report(cfg, data, out)
    zero_r, zsrc = resolve_zero_r(data, cfg.zero_r)
    A = analyse(data, zero_r, zsrc, cfg.alpha, cfg.n_boot, cfg.seed, cfg.escape_margin)
    if data.model == MODULE_MODEL:
        return _write_module_report(cfg, A, out)
    design_archs = order_archs(set(data.design.archs) | set(A.archs), data.design.archs)
    conv_targets, conv_missing = fg.convergence_targets(cfg.convergence, data.curves, A.archs)
    D = dynamics(A, cfg.rules, cfg.seed, cfg.n_boot, conv_targets)
    tables = _write_tables(cfg, A, D, design_archs, out)
    figs = _write_figures(cfg, A, D, design_archs, conv_targets, out)
    notes = list(data.notes)
    if conv_missing:
        notes.append(f"no per-loop records for {', '.join(conv_missing)}: left out of the convergence plot")
    if not data.curves:
        notes.append("no per-loop records at all: convergence, LKG growth and late breakthroughs are empty")
    overview = _overview(A)
    out.write("index.html", _report_page(cfg, A, D, overview, notes, tables, figs))
    summary = _manifest(cfg, A, D, notes, tables, figs)
    out.write(MANIFEST, json.dumps(summary, indent=1, default=str))
    lines = [f"psa report: {data.source}"]
    lines += [f"  {s}" for s in overview[1:]]
    lines += [f"  missing: {m}" for m in A.missing] + [f"  note: {n}" for n in notes]
    lines.append(f"wrote {Path(cfg.out) / 'index.html'}, {len(tables)} tables (md, csv, tex) "
                 f"and {len(figs)} figures (png, pdf)")
    return ReportResult(out.target, summary, lines, figs)


MODULE_NOTE = ("Models given as module:function: the regimes, Tables IV and V, the depth x width maps and the "
               "harm rate describe the paper's SimpleMLP architectures and are not drawn; the report has the bounty "
               "of each model and mode, the paired tests and the convergence of the trials.")


def _write_module_report(cfg: ReportConfig, A: Analysis, out: OutputDir) -> ReportResult:
    """A study of your own models: tables per model and mode, the paired tests, convergence."""
    data = A.data
    conv_targets = [a for a in A.archs if any(k[0] == a for k in data.curves)]
    conv = cv.analyse_convergence(data, A.archs, cfg.seed, cfg.n_boot, conv_targets)
    growth, conv_table, growth_long, conv_long = table_lkg(A)
    tables = [table_models(A), table_tests(A, cfg.alpha, unit="Model"), growth, conv_table,
              table_still_improving(conv), table_bounty_convergence(conv), table_trials(A, unit="Model")]
    # whether each unit layer's ablation persists, as the study stored it: which results were real ablations
    units, unit_notes = stored_unit_layers(data.design_text, A.archs)
    if units:
        tables.append(table_unit_layers(units, A.archs))
    if A.variants:
        tables.append(table_variants(A, cfg.alpha, unit="Model"))
    if A.missing or data.incomplete:
        tables.append(table_missing(A))
    for t in tables:
        write_table(out, t)
    write_records(out, "tables/lkg_growth_per_loop.csv", growth_long, ["arch", "mode", "trial", "loop", "lkg_score"])
    write_records(out, "tables/convergence_per_loop.csv", conv_long,
                  ["arch", "mode", "loop", "n", "candidate_mean", "candidate_min", "candidate_max", "lkg_mean"])
    figdir = out.tmp / "figures"
    figs = []
    if conv_targets:
        figs.append(fg.convergence(conv_targets, data.curves, data.trials, A.zero_r, figdir))
    figs.append(fg.bounty_progress(conv, figdir, A.zero_r))
    for f in figs:
        out.files += f.files
        write_figure_data(out, f.name, f.data)
    notes = [MODULE_NOTE, *data.notes, *unit_notes]
    overview = [
        f"Source: {data.source}.",
        f"{len(data.trials):,} finished trials over {len(A.archs)} models and {len({t.mode for t in data.trials})} "
        f"modes.",
        *([f"Data set: {_dataset_line(data)}."] if data.dataset_info is not None else []),
        f"Validation ZeroR: {A.zero_r:.2f}% ({A.zero_r_source}).",
    ]
    tbl = {t.name: t for t in tables}
    fig = {f.name: f for f in figs}
    warn = A.missing + notes
    sections = [
        ("Overview", bullets(overview) + f'<div class="warn">{bullets(warn)}</div>'),
        ("Bounty per model and mode", tbl["models"].html()),
        ("Paired tests", tbl["paired_tests"].html()),
        *([("Unit layers", tbl["unit_layers"].html())] if "unit_layers" in tbl else []),
        *([("Engine variants", tbl["variant_tests"].html())] if "variant_tests" in tbl else []),
        ("Convergence", (figure(fig["convergence"]) if "convergence" in fig else "")
         + bullets(convergence_statement(Dynamics(conv, [], [], {}), data.curves_note))
         + figure(fig["bounty_progress"]) + tbl["lkg_growth"].html() + tbl["convergence"].html()
         + tbl["still_improving"].html() + tbl["bounty_convergence"].html()),
        ("All tables", tbl["trials"].html() + (tbl["missing"].html() if "missing" in tbl else "")),
    ]
    out.write("index.html", page("PSA report", sections, paragraph(data.source)))
    summary = {"psa_report": 1, "source": data.source, "trials": len(data.trials), "models": A.archs,
               "zero_r": A.zero_r, "zero_r_source": A.zero_r_source, "dataset": data.dataset,
               **({"dataset_record": data.dataset_info} if data.dataset_info is not None else {}),
               "verdicts": dict(Counter(c.verdict for c in A.comparisons)), "convergence": cv.as_json(conv),
               "missing": A.missing, "notes": notes, "tables": [t.name for t in tables],
               "figures": {f.name: [p.name for p in f.files] for f in figs},
               "config": {k: v for k, v in asdict(cfg).items()}}
    out.write(MANIFEST, json.dumps(summary, indent=1, default=str))
    lines = [f"psa report: {data.source}"] + [f"  {s}" for s in overview[1:]]
    lines += [f"  missing: {m}" for m in A.missing] + [f"  note: {n}" for n in notes]
    lines.append(f"wrote {Path(cfg.out) / 'index.html'}, {len(tables)} tables (md, csv, tex) "
                 f"and {len(figs)} figures (png, pdf)")
    return ReportResult(out.target, summary, lines, figs)


def _write_empty_report(cfg: ReportConfig, data: StudyData, out: OutputDir) -> ReportResult:
    """A study without a finished trial: what is missing, and the design when there is one."""
    msg = data.notes + missing_report(data)
    sections = [("Nothing to report", bullets(msg, "warn") or paragraph("no finished trial"))]
    if data.design.archs and data.model != MODULE_MODEL:
        fig = maps.design_space(list(data.design.archs), out.tmp / "figures", data.io, data.model)
        out.files += fig.files
        sections.append(("Design", figure(fig)))
        write_table(out, table_iv(list(data.design.archs), data.io, data.model))
    out.write("index.html", page("PSA report", sections, paragraph(data.source)))
    summary = {"psa_report": 1, "source": data.source, "trials": 0, "notes": msg}
    out.write(MANIFEST, json.dumps(summary, indent=1))
    lines = [f"psa report: {data.source}"] + [f"  {m}" for m in msg]
    lines.append(f"wrote {Path(cfg.out) / 'index.html'} (no finished trial: nothing else to draw)")
    return ReportResult(out.target, summary, lines)


def _write_tables(cfg: ReportConfig, A: Analysis, D: Dynamics, design_archs: Sequence[str],
                  out: OutputDir) -> list[Table]:
    """Every table in its three forms, and the per-loop long CSVs beside them."""
    tables = [table_iv(design_archs, A.data.io, A.data.model), table_v(A, cfg.tie_tolerance),
              table_regimes(A, cfg.rules)]
    if any(is_heterogeneous(a) for a in A.archs):
        tables.append(table_heterogeneous(A, cfg.rules))
    tables += [table_summary(A), table_effects(A), table_tests(A, cfg.alpha)]
    growth, conv, growth_long, conv_long = table_lkg(A)
    tables += [growth, conv, table_still_improving(D.conv), table_bounty_convergence(D.conv), table_harm(D.harms),
               table_harm_separation(D.separation, D.rho), table_trials(A)]
    if A.variants:
        tables.append(table_variants(A, cfg.alpha))
    if A.missing or A.data.incomplete:
        tables.append(table_missing(A))
    for t in tables:
        write_table(out, t)
    write_records(out, "tables/lkg_growth_per_loop.csv", growth_long, ["arch", "mode", "trial", "loop", "lkg_score"])
    write_records(out, "tables/convergence_per_loop.csv", conv_long,
                  ["arch", "mode", "loop", "n", "candidate_mean", "candidate_min", "candidate_max", "lkg_mean"])
    per_trial = [{"arch": t.arch, "mode": t.condition, "trial": t.trial, "loops": t.loops, "final_bounty": t.final,
                  "t99": t.t99, "t99_gain": t.t99_gain, "tail_rise": t.tail_rise} for t in D.conv.trials]
    write_records(out, "tables/bounty_convergence_per_trial.csv", per_trial,
                  ["arch", "mode", "trial", "loops", "final_bounty", "t99", "t99_gain", "tail_rise"])
    write_records(out, "tables/bounty_progress_per_loop.csv", cv.progress_records(D.conv),
                  ["mode", "loop", "n", "median", "lo", "hi"])
    if A.data.incomplete:
        write_records(out, "tables/incomplete_trials.csv", A.data.incomplete,
                      ["arch", "mode", "trial", "status", "loops_done"])
    return tables


def _write_figures(cfg: ReportConfig, A: Analysis, D: Dynamics, design_archs: Sequence[str],
                   conv_targets: Sequence[str], out: OutputDir) -> list[Figure]:
    """Every figure (PNG, PDF) with the data it drew (JSON)."""
    data, archs, figdir = A.data, A.archs, out.tmp / "figures"
    best = {a: best_trial_winners({m: [t.peak for t in data.cell(a, m)] for m in MODES}) for a in archs}
    figs = [
        maps.design_space(design_archs, figdir, data.io, data.model),
        maps.regime_map(archs, A.regimes[cfg.rules], figdir, cfg.rules),
        maps.winning_strategy(archs, best, figdir),
        maps.instability(archs, A.summ, figdir),
        maps.baseline_performance(archs, A.summ, A.zero_r, figdir),
        maps.ablation_effects_map(archs, A.summ, figdir),
        maps.ablation_significance(archs, A.effects, cfg.alpha, figdir),
        maps.parameter_matching(design_archs, figdir, data.io, data.model),
    ]
    if any(is_heterogeneous(a) for a in archs):
        figs.append(fg.accuracy_vs_params(archs, A.summ, figdir, data.io))
    if conv_targets:
        figs.append(fg.convergence(conv_targets, data.curves, data.trials, A.zero_r, figdir))
    figs.append(fg.late_breakthroughs(data.trials, A.zero_r, cfg.escape_margin, figdir, data.design.meta_loops))
    figs.append(fg.bounty_progress(D.conv, figdir, A.zero_r))
    figs.append(fg.harm_rate(D.harms, figdir, cfg.rules))
    for f in figs:
        out.files += f.files
        write_figure_data(out, f.name, f.data)
    return figs


def _unclassified(A: Analysis) -> list[str]:
    """Architectures the printed equations leave unclassified."""
    return [a for a in A.archs if A.regimes["paper"][a].regime == "unclassified"]


def _overview(A: Analysis) -> list[str]:
    """The page's overview lines: source, size, ZeroR, regime counts under both rule sets."""
    counts = {r: regime_counts(A.regimes[r]) for r in RULE_SETS}
    uncl = _unclassified(A)

    def fmt(c: Mapping[str, int]) -> str:
        return ", ".join(f"{n} {k}" for k, n in c.items())
    return [
        f"Source: {A.data.source}.",
        f"{len(A.data.trials):,} finished trials over {len(A.archs)} architectures and "
        f"{len({t.mode for t in A.data.trials})} modes.",
        *([f"Data set: {_dataset_line(A.data)}."] if A.data.dataset_info is not None else []),
        f"Validation ZeroR: {A.zero_r:.2f}% ({A.zero_r_source}).",
        f"Regimes ({RULE_LABELS['published']}): {fmt(counts['published'])}.",
        f"Regimes ({RULE_LABELS['paper']}): {fmt(counts['paper'])}"
        + (f"; unclassified: {', '.join(uncl)}." if uncl else "."),
    ]


def _dataset_line(data: StudyData) -> str:
    """The study's data set as recorded: name, sizes and checksum."""
    d = data.dataset_info or {}
    subset = data.design.train_subset
    trained = f" (the study trained on the first {subset:,} training examples)" if subset else ""
    return (f"{data.dataset}, {d['n_in']:,} inputs, {d['n_classes']} classes, {d['n_train']:,}/{d['n_val']:,}/"
            f"{d['n_test']:,} training/validation/test examples{trained}, SHA-256 {str(d['checksum'])[:16]}...")


def undecided_statement(A: Analysis, alpha: float = 0.05) -> list[str]:
    """Where 10 trials cannot decide, in plain words."""
    n_trials = A.data.design.trials or "the"
    und = [a for a, e in A.effects.items() if e["effect"] == "undecidable"]
    col = [a for a, e in A.effects.items() if e["effect"] == "collapsed"]
    verdicts = Counter(c.verdict for c in A.comparisons)
    lines = []
    if col:
        lines.append(f"{len(col)} architectures never learn in any mode (no trial beats ZeroR by the escape margin): "
                     "their tests compare constant predictors and the ablation-effect map draws them black. "
                     f"{sum(A.effects[a]['better'] + A.effects[a]['worse'] > 0 for a in col)} of them still show "
                     "'significant' differences, e.g. output ablation holding the majority class at ZeroR.")
    if und:
        lines.append(f"{len(und)} architectures: {n_trials} trials cannot decide any of their ablative-vs-baseline "
                     "comparisons (too few pairs differ for any outcome to survive Holm's correction, mostly cells "
                     "stuck at ZeroR): "
                     f"{short_list(und, 20)}.")
    if verdicts["cannot decide"]:
        lines.append(f"{verdicts['cannot decide']} of {len(A.comparisons)} comparisons cannot be decided with these "
                     "trials, whatever their outcome.")
    if verdicts["no detectable difference"]:
        lines.append(f"{verdicts['no detectable difference']} comparisons show no detectable difference: the data are "
                     "compatible with no effect, which is not evidence of none; the bootstrap intervals in the "
                     "paired-tests table show how large an effect could hide.")
    study_wide = holm([c.p for c in A.comparisons])
    n_sig = int(np.sum(study_wide < alpha)) if len(study_wide) else 0
    line = (f"Holm over all {len(A.comparisons)} comparisons of the study at once would keep {n_sig} of them "
            "(the report's family is the 9 comparisons of one architecture)")
    n_max = max((c.n for c in A.comparisons), default=0)
    if n_max and len(A.comparisons) * 2.0 / 2 ** n_max >= alpha:
        line += (f": with {n_max} pairs the smallest possible p is 2/2^{n_max} = {2 / 2 ** n_max:.4f}, too large to "
                 f"survive a family of {len(A.comparisons)} at alpha = {alpha:g}, whatever the data")
    lines.append(line + ".")
    return lines


def convergence_statement(D: Dynamics, curves_note: str = "") -> list[str]:
    """The convergence section's findings, in words."""
    C = D.conv
    if not C.trials:
        return ["No per-loop records: nothing to say about convergence."]
    lines = [f"From {curves_note}."] if curves_note else []
    judged = [x for x in C.conditions if x.judged]
    if judged:
        ranked = sorted(judged, key=lambda x: -(x.improving_share or 0))
        lines.append(f"Still improving in the last {C.tail_loops} of {C.loops} meta-loops (share of trials): "
                     + ", ".join(f"{x.condition} {100 * x.improving_share:.0f}% ({x.improving}/{x.judged})"
                                 for x in ranked) + ".")
    t99 = [x for x in C.conditions if x.t99_gain_median is not None]
    if t99:
        lines.append("Median loop at which the bounty has covered 99% of its rise: "
                     + ", ".join(f"{x.condition} {x.t99_gain_median:g}" for x in t99)
                     + " (99% of the final value itself: "
                     + ", ".join(f"{x.condition} {x.t99_median:g}" for x in t99 if x.t99_median is not None) + ").")
    return lines + list(C.notes)


def harm_statement(D: Dynamics) -> list[str]:
    """The harm-rate section's findings, in words."""
    if not D.harms:
        return ["No architecture has both a none cell and an ablative cell: no harm rate."]
    lines = []
    for m, (r, p, n) in D.rho.items():
        if not math.isnan(r):
            lines.append(f"Spearman rank correlation of the {hm.MEASURES[m][0]} with the parameter count: "
                         f"{hm.rho_text(r, p, n)}.")
    for s in D.separation:
        if s.measure == "harm":
            cut = ("no threshold beats the majority answer" if s.constant else
                   f"best threshold ({'<' if s.direction < 0 else '>'} {s.threshold:+.2f} points) "
                   f"{100 * s.accuracy:.1f}% in-sample")
            lines.append(f"Regime {s.regime} ({s.n_regime} of {s.n}) from the harm rate: AUC {s.auc:.3f}; {cut}, "
                         f"{100 * s.loo_accuracy:.1f}% leave-one-out, against {100 * s.majority_accuracy:.1f}% "
                         "for the majority answer.")
    return lines


def _report_page(cfg: ReportConfig, A: Analysis, D: Dynamics, overview: Sequence[str], notes: Sequence[str],
                 tables: Sequence[Table], figs: Sequence[Figure]) -> str:
    """index.html: overview and warnings, then one section per question the report answers."""
    warn = A.missing + list(notes)
    fig = {f.name: f for f in figs}
    tbl = {t.name: t for t in tables}
    dyn = (figure(fig["convergence"]) if "convergence" in fig
           else paragraph("No per-loop records for the chosen architectures."))
    sections = [
        ("Overview", bullets(overview) + (f'<div class="warn">{bullets(warn)}</div>' if warn else "")),
        ("Regimes", figure(fig["regime_map"]) + tbl["regimes"].html()),
        ("Design space", figure(fig["design_space"]) + figure(fig["parameter_matching"]) + tbl["table_iv"].html()),
        ("Table V", tbl["table_v"].html()),
        *([("Heterogeneous architectures", figure(fig["accuracy_vs_params"]) + tbl["heterogeneous"].html())]
          if "heterogeneous" in tbl else []),
        ("Performance maps", "".join(figure(fig[n]) for n in
                                     ("winning_strategy", "instability", "baseline_performance", "ablation_effects"))),
        ("Statistics the paper lacks", bullets(undecided_statement(A, cfg.alpha)) + figure(fig["ablation_significance"])
         + tbl["ablation_effects"].html() + tbl["paired_tests"].html()),
        ("Convergence and late breakthroughs", dyn + figure(fig["late_breakthroughs"])
         + tbl["lkg_growth"].html() + tbl["convergence"].html()),
        ("Convergence dynamics", bullets(convergence_statement(D, A.data.curves_note)) + figure(fig["bounty_progress"])
         + tbl["still_improving"].html() + tbl["bounty_convergence"].html()),
        ("Harm rate as a capacity detector", bullets(harm_statement(D)) + figure(fig["harm_rate"])
         + tbl["harm_separation"].html() + tbl["harm_rate"].html()),
        ("All tables", tbl["summary"].html() + tbl["trials"].html()
         + (tbl["missing"].html() if "missing" in tbl else "")),
    ]
    return page("PSA report", sections, paragraph(A.data.source))


def _manifest(cfg: ReportConfig, A: Analysis, D: Dynamics, notes: Sequence[str], tables: Sequence[Table],
              figs: Sequence[Figure]) -> dict:
    """manifest.json: what the report found and wrote, and the configuration that made it."""
    return {
        "psa_report": 1,
        "source": A.data.source,
        "trials": len(A.data.trials),
        "architectures": len(A.archs),
        "zero_r": A.zero_r,
        "zero_r_source": A.zero_r_source,
        "dataset": A.data.dataset,
        **({"dataset_record": A.data.dataset_info} if A.data.dataset_info is not None else {}),
        "rules": cfg.rules,
        "regime_counts": {r: regime_counts(A.regimes[r]) for r in RULE_SETS},
        "regimes": {a: {"published": asdict(A.regimes["published"][a]), "paper": asdict(A.regimes["paper"][a])}
                    for a in A.archs},
        "unclassified_by_paper_rules": _unclassified(A),
        "verdicts": dict(Counter(c.verdict for c in A.comparisons)),
        "ablation_effects": dict(Counter(e["effect"] for e in A.effects.values())),
        "convergence": cv.as_json(D.conv),
        "harm_separation": {"spearman_with_params": {m: {"rho": r, "p": p, "n": n} for m, (r, p, n) in D.rho.items()},
                            "by_regime": [asdict(s) for s in D.separation]},
        "missing": A.missing,
        "notes": list(notes),
        "tables": [t.name for t in tables],
        "figures": {f.name: [p.name for p in f.files] for f in figs},
        "config": {k: v for k, v in asdict(cfg).items()},
    }
