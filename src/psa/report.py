"""`psa report` and `psa compare`: tables (Markdown, CSV, LaTeX), figures and one offline HTML page.

The output directory is built in a temporary sibling and swapped in at the end, so a crash or
Ctrl-C leaves either the previous report or none, never half of one. A directory that holds
something other than a psa report is never overwritten.
"""

from __future__ import annotations

import argparse
import base64
import csv
import html
import io
import json
import math
import os
import re
import shutil
import tempfile
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from psa import analysis as an
from psa.cli.argtypes import nonneg_int, nonneg_real, number, percentage, probability
from psa.analysis import MODES, REGIMES, ReportError, StudyData

MANIFEST = "manifest.json"
DEFAULT_CONVERGENCE = ("1*2048", "18*18")  # the authors' `make-convergence-plots` targets


def convergence_targets(requested: Sequence[str] | None, curves: Mapping[tuple[str, str], object],
                        archs: Sequence[str]) -> tuple[list[str], list[str]]:
    """(drawn, missing) architectures of a convergence plot.

    Asked for explicitly: those with per-loop records, and the rest as missing. By default: the
    authors' targets where the study has them, else the first and last of the study's own
    architectures with records, so that a study of other nets still gets its plot.
    """
    recorded = [a for a in archs if any(k[0] == a for k in curves)]
    if requested is not None:
        drawn = [a for a in requested if any(k[0] == a for k in curves)]
        return drawn, [a for a in requested if a not in drawn]
    drawn = [a for a in DEFAULT_CONVERGENCE if a in recorded]
    if not drawn and recorded:
        drawn = list(dict.fromkeys([recorded[0], recorded[-1]]))
    return drawn, []


# --------------------------------------------------------------------------------------------
# Tables


@dataclass
class Table:
    """A table in display form (rounded strings) plus, for the CSV, the unrounded records."""

    name: str
    title: str
    columns: list[str]
    rows: list[list[str]]
    notes: list[str] = field(default_factory=list)
    raw: list[dict] | None = None  # CSV records at full precision; `rows` when None
    html_collapsed: bool = False  # long tables fold away on the page

    def markdown(self) -> str:
        """GitHub-flavoured Markdown."""
        def esc(s: str) -> str:
            s = str(s).replace("|", "\\|")
            # one '*' (1*2048) cannot start emphasis; escape only where two could pair up
            return s.replace("*", "\\*") if s.count("*") > 1 else s

        out = [f"## {self.title}", ""]
        out.append("| " + " | ".join(esc(c) for c in self.columns) + " |")
        out.append("|" + "|".join("---" if i == 0 else "---:" if _numeric_col(self.rows, i) else "---"
                                  for i in range(len(self.columns))) + "|")
        for r in self.rows:
            out.append("| " + " | ".join(esc(c) for c in r) + " |")
        if not self.rows:
            out.append("| " + " | ".join(["(no data)"] + [""] * (len(self.columns) - 1)) + " |")
        if self.notes:
            out.append("")
            out += [f"- {n}" for n in self.notes]
        return "\n".join(out) + "\n"

    def csv(self) -> str:
        """CSV: the full-precision records when there are some, else the displayed rows."""
        buf = io.StringIO()
        if self.raw is not None:
            keys = list(self.raw[0]) if self.raw else self.columns
            w = csv.DictWriter(buf, fieldnames=keys, lineterminator="\n", extrasaction="ignore")
            w.writeheader()
            for r in self.raw:
                w.writerow({k: _csv_value(v) for k, v in r.items()})
        else:
            w = csv.writer(buf, lineterminator="\n")
            w.writerow(self.columns)
            w.writerows(self.rows)
        return buf.getvalue()

    def latex(self) -> str:
        """A booktabs table (longtable past 40 rows): \\usepackage{booktabs,longtable}."""
        align = "".join("l" if i == 0 or not _numeric_col(self.rows, i) else "r" for i in range(len(self.columns)))
        head = " & ".join(_tex(c) for c in self.columns) + r" \\"
        body = [" & ".join(_tex(c) for c in r) + r" \\" for r in self.rows] or [
            r"\multicolumn{%d}{l}{(no data)} \\" % len(self.columns)]
        label = f"tab:psa-{self.name.replace('_', '-')}"
        notes = "".join(f"% {n}\n" for n in self.notes)
        if len(self.rows) > 40:
            return (f"% {self.title}\n{notes}\\begin{{longtable}}{{{align}}}\n"
                    f"\\caption{{{_tex(self.title)}}}\\label{{{label}}}\\\\\n\\toprule\n{head}\n\\midrule\n\\endfirsthead\n"
                    f"\\toprule\n{head}\n\\midrule\n\\endhead\n\\bottomrule\n\\endfoot\n"
                    + "\n".join(body) + "\n\\end{longtable}\n")
        return (f"% {self.title}\n{notes}\\begin{{table}}[htbp]\n\\centering\n\\caption{{{_tex(self.title)}}}\\label{{{label}}}\n"
                f"\\begin{{tabular}}{{{align}}}\n\\toprule\n{head}\n\\midrule\n" + "\n".join(body)
                + "\n\\bottomrule\n\\end{tabular}\n\\end{table}\n")

    def html(self) -> str:
        """An HTML table with its notes, folded away when long."""
        head = "".join(f"<th>{html.escape(c)}</th>" for c in self.columns)
        rows = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in self.rows)
        if not self.rows:
            rows = f'<tr><td colspan="{len(self.columns)}">(no data)</td></tr>'
        notes = "".join(f"<li>{html.escape(n)}</li>" for n in self.notes)
        table = f'<table id="table-{self.name}"><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>'
        if notes:
            table += f'<ul class="notes">{notes}</ul>'
        files = f'<p class="files">files: tables/{self.name}.md, .csv, .tex</p>'
        if self.html_collapsed:
            return (f'<details><summary>{html.escape(self.title)} ({len(self.rows)} rows)</summary>'
                    f"{table}{files}</details>")
        return f"<h3>{html.escape(self.title)}</h3>{table}{files}"


def _numeric_col(rows: Sequence[Sequence[str]], i: int) -> bool:
    vals = [str(r[i]) for r in rows if i < len(r) and str(r[i]) not in ("", "-", "n/a")]
    if not vals:
        return False
    def num(s: str) -> bool:
        try:
            float(s.replace(",", "").replace("%", "").split(" ")[0].lstrip("+"))
            return True
        except ValueError:
            return False
    return all(num(v) for v in vals)


def _tex(s: object) -> str:
    s = str(s)
    for a, b in (("\\", r"\textbackslash{}"), ("&", r"\&"), ("%", r"\%"), ("$", r"\$"), ("#", r"\#"),
                 ("_", r"\_"), ("{", r"\{"), ("}", r"\}"), ("~", r"\textasciitilde{}"), ("^", r"\textasciicircum{}")):
        s = s.replace(a, b)
    return (s.replace("±", r"$\pm$").replace("≤", r"$\le$").replace("≥", r"$\ge$").replace("−", "-")
            .replace("<", r"\textless{}").replace(">", r"\textgreater{}"))


def _csv_value(v: object) -> object:
    if isinstance(v, float) and math.isnan(v):
        return ""
    return v


def f2(x: float | None) -> str:
    """Two decimals, or '-' for a missing value."""
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.2f}"


def fp(p: float) -> str:
    """A p-value, three significant digits."""
    if p is None or math.isnan(p):
        return "-"
    return f"{p:.3g}" if p >= 1e-4 else f"{p:.1e}"


# --------------------------------------------------------------------------------------------
# Report configuration and the analysis bundle


@dataclass(frozen=True)
class ReportConfig:
    """What `psa report` reads and how it classifies and tests."""

    db: str | None = "results/psa.sqlite"
    reference: str | None = None  # "published": the authors' data instead of a database
    study: str | None = None
    out: str = "report"
    rules: str = "published"
    zero_r: float | None = None  # computed from the data set when None
    alpha: float = 0.05
    n_boot: int = 10_000
    seed: int = 0
    convergence: tuple[str, ...] | None = None  # None: see convergence_targets
    escape_margin: float = 0.5
    tie_tolerance: float = 0.0


@dataclass
class Analysis:
    """Everything computed from one study, shared by the tables, figures and page."""

    data: StudyData
    zero_r: float
    zero_r_source: str
    archs: list[str]
    summ: dict
    regimes: dict  # rules -> {arch: Regime}
    comparisons: list
    effects: dict
    missing: list[str]


def load_data(db: str | None, reference: str | None, study: str | None) -> StudyData:
    """The study to report on: a database, or the authors' published data."""
    if reference is not None:
        if reference != "published":
            raise ReportError(f"psa report reads per-trial data; --reference {reference} has none (use published)")
        return an.load_published()
    if db is None:
        raise ReportError("nothing to report: give --db PATH or --reference published")
    return an.load_db(db, study)


def resolve_zero_r(data: StudyData, override: float | None) -> tuple[float, str]:
    """The validation ZeroR: the override, or computed from the study's data set."""
    if override is not None:
        return override, "given with --zero-r"
    return an.validation_zero_r(data.dataset), f"computed from the {data.dataset} validation labels"


def analyse(data: StudyData, zero_r: float, zero_r_source: str, alpha: float = 0.05, n_boot: int = 10_000,
            seed: int = 0, escape_margin: float = 0.5) -> Analysis:
    """Summaries, both rule sets' regimes, the paired tests and the ablation effects."""
    archs = data.archs
    summ = an.summaries(data.trials)
    cfg = an.ClassifierConfig(zero_r=zero_r)
    regimes = {r: an.classify_all(summ, archs, cfg, r, data.design.trials or None) for r in ("published", "paper")}
    comps = an.paired_comparisons(data.trials, archs, an.StatsConfig(alpha=alpha, n_boot=n_boot, seed=seed,
                                                                     zero_r=zero_r, escape_margin=escape_margin))
    effects = an.ablation_effects(comps)
    return Analysis(data, zero_r, zero_r_source, archs, summ, regimes, comps, effects, an.missing_report(data))


# --------------------------------------------------------------------------------------------
# Building the tables


def table_iv(archs: Sequence[str]) -> Table:
    """Table IV: parameters (equation 1) and Matched/Asymmetric of every architecture."""
    rows, raw = [], []
    for a in archs:
        p = an.arch_params(a)
        m = an.matching_label(a)
        rows.append([a, f"{p:,}" if p is not None else "?", m])
        raw.append({"arch": a, "params": p, "matching": m})
    return Table("table_iv", "Table IV: parameters of the network architectures", ["Architecture", "Parameters",
                 "Parameter matching"], rows, raw=raw)


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
        w = an.winners(means, tie_tolerance)
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
        p = an.arch_params(a)
        for m in MODES:
            s = A.summ.get((a, m))
            if s is None:
                continue
            rows.append([a, f"{p:,}" if p else "?", m, str(s.n), f2(s.mean), f2(s.std), f2(s.min), f2(s.max)])
            raw.append({"arch": a, "params": p, **{k: v for k, v in asdict(s).items() if k != "arch"}})
    return Table("summary", "Per-architecture performance summaries (as Tables I-III)",
                 ["Architecture", "Parameters", "Mode", "N", "Mean", "Std", "Min", "Max"], rows,
                 ["Std is the population standard deviation (ddof=0)."], raw, html_collapsed=True)


def table_trials(A: Analysis) -> Table:
    """Every finished trial."""
    order = {a: i for i, a in enumerate(A.archs)}
    ts = sorted(A.data.trials, key=lambda t: (order.get(t.arch, 1e9), MODES.index(t.mode) if t.mode in MODES else 9,
                                              t.trial))
    rows = [[t.arch, t.mode, str(t.trial), "-" if t.seed is None else str(t.seed), f2(t.peak),
             "-" if t.bounty_loop is None else str(t.bounty_loop), f2(t.test_acc)] for t in ts]
    raw = [asdict(t) for t in ts]
    return Table("trials", "Per-trial results", ["Architecture", "Mode", "Trial", "Seed", "Peak val. acc.",
                 "Bounty loop", "Test acc."], rows, raw=raw, html_collapsed=True)


def table_regimes(A: Analysis, rules: str) -> Table:
    """The regime of every architecture under both rule sets, with the rule that fired."""
    rows, raw = [], []
    other = "paper" if rules == "published" else "published"
    for a in A.archs:
        r, o = A.regimes[rules][a], A.regimes[other][a]
        shape = an.arch_shape(a)
        prov = " (provisional)" if r.provisional else ""
        rows.append([a, f"{an.arch_params(a) or 0:,}", r.regime + prov, r.name, r.rule, o.regime, o.rule])
        raw.append({"arch": a, "depth": shape[0] if shape else None, "width": shape[1] if shape else None,
                    "params": an.arch_params(a), f"regime_{rules}": r.regime, f"rule_{rules}": r.rule,
                    f"regime_{other}": o.regime, f"rule_{other}": o.rule, "provisional": r.provisional,
                    "detail": r.detail})
    label = {"published": "published rules", "paper": "eqs. 6-8"}
    counts = Counter(A.regimes[rules][a].regime for a in A.archs)
    notes = [f"ZeroR = {A.zero_r:.2f}% ({A.zero_r_source}).",
             "Counts (" + label[rules] + "): " + ", ".join(f"{counts[k]} {k}" for k in (*REGIMES, "unknown",
                                                                                      "unclassified", "n/a") if counts[k]),
             "Rules: the published rules reproduce the authors' regime map (docs/report.md); eqs. 6-8 are "
             "section II.H as printed."]
    prov = [a for a in A.archs if A.regimes[rules][a].provisional]
    if prov:
        notes.append(f"Provisional (modes missing or cells short of the design): {', '.join(prov)}.")
    return Table("regimes", f"Training regimes ({label[rules]}; the other rule set alongside)",
                 ["Architecture", "Parameters", "Regime", "Name", "Rule that fired", f"Regime ({label[other]})",
                  f"Rule ({label[other]})"], rows, notes, raw)


def table_tests(A: Analysis, alpha: float) -> Table:
    """Every paired ablative-vs-baseline comparison."""
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
             "assignments; Holm-corrected over the 9 comparisons of each architecture.",
             f"Verdict at alpha = {alpha:g}: 'cannot decide' when fewer than 6 pairs differ, so that no outcome "
             "could be significant (smallest possible p = 2/2^k for k differing pairs).",
             "Effect sizes: Cohen's d_z (mean / sd of the differences; '-' when they do not vary) and the "
             "matched-pairs rank-biserial r. CI: 95% percentile bootstrap of the mean difference (pairs resampled).",
             "Difference = ablative minus baseline, in accuracy points.",
             "(collapsed): no trial of either mode beats ZeroR by the escape margin; the test then compares "
             "constant predictors (e.g. output ablation keeping the majority class at ZeroR), not learning."]
    return Table("paired_tests", "Ablative vs baseline modes: paired tests",
                 ["Architecture", "Ablative", "Baseline", "Pairs", "Mean diff.", "95% CI", "p", "p (Holm)", "d_z",
                  "r_rb", "Verdict"], rows, notes, raw, html_collapsed=True)


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


def _cell_curves(A: Analysis) -> dict[tuple[str, str], list[tuple[int, an.Curve]]]:
    out: dict[tuple[str, str], list[tuple[int, an.Curve]]] = defaultdict(list)
    for (a, m, k), c in A.data.curves.items():
        out[(a, m)].append((k, c))
    return out


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
            lkg_at = {c: float(np.nanmean(lkg[:, c - 1])) for c in checks}
            cand_at = {c: float(np.nanmean(cand[:, c - 1])) if np.isfinite(cand[:, c - 1]).any() else math.nan
                       for c in checks}
            gain = float(np.nanmean(lkg[:, -1] - lkg[:, mid - 1])) if n_loops else math.nan
            g_rows.append([a, m, str(len(cc)), f"{np.mean(prom):.1f}", *[f2(lkg_at[c]) for c in checks], f2(gain)])
            g_raw.append({"arch": a, "mode": m, "curves": len(cc), "mean_promotions": float(np.mean(prom)),
                          **{f"lkg_loop{c}": lkg_at[c] for c in checks}, f"gain_after_loop{mid}": gain})
            bl = bounty_loops.get((a, m), [])
            diverged = float(np.mean(np.isnan(cand))) if cand.size else math.nan
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
                                  "lkg_mean": float(np.nanmean(lkg[:, i]))})
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
# Writing: atomic output directory


class OutputDir:
    """A temporary directory beside `target`, swapped in by `commit()`."""

    def __init__(self, target: str | Path):
        self.target = Path(target)
        if self.target.exists():
            if not self.target.is_dir():
                raise ReportError(f"{self.target} exists and is not a directory")
            if any(self.target.iterdir()) and not (self.target / MANIFEST).is_file():
                raise ReportError(f"{self.target} exists and is not a psa report (no {MANIFEST}); "
                                  "choose another --out or remove it")
        try:
            self.target.parent.mkdir(parents=True, exist_ok=True)
            self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.target.name}.tmp-", dir=self.target.parent))
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(self.tmp, 0o777 & ~umask)  # mkdtemp makes 0700; the report is for sharing
        except OSError as e:
            raise ReportError(f"cannot write to {self.target.parent}: {e.strerror or e}") from None
        self.files: list[Path] = []

    def write(self, rel: str, content: str | bytes) -> Path:
        """Write one file under the temporary directory."""
        p = self.tmp / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, str):
            p.write_text(content, encoding="utf-8")
        else:
            p.write_bytes(content)
        self.files.append(p)
        return p

    def commit(self) -> Path:
        """Swap the finished directory in place of the old report."""
        old = None
        if self.target.exists():
            old = self.target.with_name(f".{self.target.name}.old-{os.getpid()}")
            if old.exists():
                shutil.rmtree(old)
            os.replace(self.target, old)
        os.replace(self.tmp, self.target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return self.target

    def abort(self) -> None:
        """Remove the temporary directory."""
        shutil.rmtree(self.tmp, ignore_errors=True)


def write_table(out: OutputDir, t: Table) -> None:
    """The three forms of one table under tables/."""
    out.write(f"tables/{t.name}.md", t.markdown())
    out.write(f"tables/{t.name}.csv", t.csv())
    out.write(f"tables/{t.name}.tex", t.latex())


def write_records(out: OutputDir, rel: str, records: Sequence[dict], columns: Sequence[str]) -> None:
    """A long CSV from a list of dicts."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(columns), lineterminator="\n", extrasaction="ignore")
    w.writeheader()
    for r in records:
        w.writerow({k: _csv_value(v) if v is not None else "" for k, v in r.items()})
    out.write(rel, buf.getvalue())


# --------------------------------------------------------------------------------------------
# The HTML page

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,Helvetica,Arial,sans-serif;max-width:1200px;margin:2em auto;
padding:0 1em;color:#222;line-height:1.45}
h1{font-size:1.6em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:2em}h3{margin-top:1.4em}
table{border-collapse:collapse;font-size:.82em;margin:.5em 0}th,td{border-bottom:1px solid #e4e4e4;padding:.2em .6em;
text-align:right}th:first-child,td:first-child{text-align:left}thead th{border-bottom:2px solid #999;background:#fafafa}
figure{margin:1.5em 0}figure img{max-width:100%;height:auto;border:1px solid #eee}figcaption{font-size:.88em;color:#555}
.warn{background:#fff6e0;border-left:4px solid #f0a500;padding:.5em 1em}.notes,.files{font-size:.82em;color:#555}
details{margin:.6em 0}summary{cursor:pointer;font-weight:600}pre{background:#f6f6f6;padding:.8em;overflow-x:auto}
.counts td,.counts th{text-align:left}
"""


def _img(fig) -> str:
    if fig.png is None or not fig.png.is_file():
        return ""
    b64 = base64.b64encode(fig.png.read_bytes()).decode("ascii")
    return (f'<figure id="fig-{fig.name}"><img alt="{html.escape(fig.title)}" src="data:image/png;base64,{b64}">'
            f"<figcaption><b>{html.escape(fig.title)}.</b> {html.escape(fig.caption)} "
            f"(figures/{fig.name}.png, .pdf)</figcaption></figure>")


def page(title: str, sections: Sequence[tuple[str, str]], intro: str = "") -> str:
    """A self-contained HTML page: inline CSS, images as data URIs, no script, no external link."""
    toc = "".join(f'<li><a href="#s{i}">{html.escape(h)}</a></li>' for i, (h, _) in enumerate(sections))
    body = "".join(f'<h2 id="s{i}">{html.escape(h)}</h2>{content}' for i, (h, content) in enumerate(sections))
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>"
            f"<h1>{html.escape(title)}</h1>{intro}<ul>{toc}</ul>{body}</body></html>\n")


def _json_default(o: object) -> object:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _p(text: str) -> str:
    return f"<p>{html.escape(text)}</p>"


def _ul(items: Sequence[str], cls: str = "") -> str:
    c = f' class="{cls}"' if cls else ""
    return f"<ul{c}>" + "".join(f"<li>{html.escape(i)}</li>" for i in items) + "</ul>"


# --------------------------------------------------------------------------------------------
# psa report


@dataclass
class ReportResult:
    """What a report wrote and found (also written to manifest.json)."""

    out: Path
    summary: dict
    lines: list[str]
    figures: list = field(default_factory=list)


def regime_counts(regimes: Mapping[str, an.Regime]) -> dict[str, int]:
    """How many architectures fall in each regime."""
    c = Counter(r.regime for r in regimes.values())
    return {k: c[k] for k in (*REGIMES, "unknown", "unclassified", "n/a") if c[k]}


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
                     f"comparisons (fewer than 6 pairs differ at all, mostly cells stuck at ZeroR): {an._list(und, 20)}.")
    if verdicts["cannot decide"]:
        lines.append(f"{verdicts['cannot decide']} of {len(A.comparisons)} comparisons cannot be decided with these "
                     "trials, whatever their outcome.")
    if verdicts["no detectable difference"]:
        lines.append(f"{verdicts['no detectable difference']} comparisons show no detectable difference: the data are "
                     "compatible with no effect, which is not evidence of none; the bootstrap intervals in the "
                     "paired-tests table show how large an effect could hide.")
    study_wide = an.holm([c.p for c in A.comparisons])
    n_sig = int(np.sum(study_wide < alpha)) if len(study_wide) else 0
    line = (f"Holm over all {len(A.comparisons)} comparisons of the study at once would keep {n_sig} of them "
            "(the report's family is the 9 comparisons of one architecture)")
    n_max = max((c.n for c in A.comparisons), default=0)
    if n_max and len(A.comparisons) * 2.0 / 2 ** n_max >= alpha:
        line += (f": with {n_max} pairs the smallest possible p is 2/2^{n_max} = {2 / 2 ** n_max:.4f}, too large to "
                 f"survive a family of {len(A.comparisons)} at alpha = {alpha:g}, whatever the data")
    lines.append(line + ".")
    return lines


def build_report(cfg: ReportConfig) -> ReportResult:
    """Load, analyse and write the whole report into cfg.out (atomically)."""
    data = load_data(cfg.db, cfg.reference, cfg.study)
    if cfg.rules not in ("published", "paper"):
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
    from psa import figures as fg

    lines = [f"psa report: {data.source}"]
    if not data.trials:
        missing = an.missing_report(data)
        msg = data.notes + missing
        sections = [("Nothing to report", _ul(msg, "warn") or _p("no finished trial"))]
        if data.design.archs:
            fig = fg.design_space(list(data.design.archs), out.tmp / "figures")
            out.files += fig.files
            sections.append(("Design", _img(fig)))
            write_table(out, table_iv(list(data.design.archs)))
        out.write("index.html", page("PSA report", sections, _p(data.source)))
        summary = {"psa_report": 1, "source": data.source, "trials": 0, "notes": msg}
        out.write(MANIFEST, json.dumps(summary, indent=1))
        lines += [f"  {m}" for m in msg] + [f"wrote {Path(cfg.out) / 'index.html'} (no finished trial: nothing else to draw)"]
        return ReportResult(out.target, summary, lines)

    zero_r, zsrc = resolve_zero_r(data, cfg.zero_r)
    A = analyse(data, zero_r, zsrc, cfg.alpha, cfg.n_boot, cfg.seed, cfg.escape_margin)
    archs = A.archs
    design_archs = an.order_archs(set(data.design.archs) | set(archs), data.design.archs)

    tables = [table_iv(design_archs), table_v(A, cfg.tie_tolerance), table_regimes(A, cfg.rules), table_summary(A),
              table_effects(A), table_tests(A, cfg.alpha)]
    growth, conv, growth_long, conv_long = table_lkg(A)
    tables += [growth, conv, table_trials(A)]
    if A.missing or A.data.incomplete:
        tables.append(table_missing(A))
    for t in tables:
        write_table(out, t)
    write_records(out, "tables/lkg_growth_per_loop.csv", growth_long, ["arch", "mode", "trial", "loop", "lkg_score"])
    write_records(out, "tables/convergence_per_loop.csv", conv_long,
                  ["arch", "mode", "loop", "n", "candidate_mean", "candidate_min", "candidate_max", "lkg_mean"])
    if data.incomplete:
        write_records(out, "tables/incomplete_trials.csv", data.incomplete,
                      ["arch", "mode", "trial", "status", "loops_done"])

    figdir = out.tmp / "figures"
    regimes = A.regimes[cfg.rules]
    best = {a: an.best_trial_winners({m: [t.peak for t in data.cell(a, m)] for m in MODES}) for a in archs}
    conv_targets, conv_missing = convergence_targets(cfg.convergence, data.curves, archs)
    figs = [
        fg.design_space(design_archs, figdir),
        fg.regime_map(archs, regimes, figdir, cfg.rules),
        fg.winning_strategy(archs, best, figdir),
        fg.instability(archs, A.summ, figdir),
        fg.baseline_performance(archs, A.summ, zero_r, figdir),
        fg.ablation_effects_map(archs, A.summ, figdir),
        fg.ablation_significance(archs, A.effects, cfg.alpha, figdir),
        fg.parameter_matching(design_archs, figdir),
    ]
    if conv_targets:
        figs.append(fg.convergence(conv_targets, data.curves, data.trials, zero_r, figdir))
    figs.append(fg.late_breakthroughs(data.trials, zero_r, cfg.escape_margin, figdir, data.design.meta_loops))
    for f in figs:
        out.files += f.files
        # what each figure drew, to re-plot it elsewhere (and what the tests check)
        out.write(f"figures/{f.name}.json", json.dumps(f.data, indent=1, default=_json_default))

    counts = {r: regime_counts(A.regimes[r]) for r in ("published", "paper")}
    uncl = [a for a in archs if A.regimes["paper"][a].regime == "unclassified"]
    notes = list(data.notes)
    if conv_missing:
        notes.append(f"no per-loop records for {', '.join(conv_missing)}: left out of the convergence plot")
    if not data.curves:
        notes.append("no per-loop records at all: convergence, LKG growth and late breakthroughs are empty")
    und = undecided_statement(A, cfg.alpha)

    # The page
    rlabel = {"published": "published rules", "paper": "equations 6-8 as printed"}

    def fmt(c: Mapping[str, int]) -> str:
        return ", ".join(f"{n} {k}" for k, n in c.items())
    overview = [
        f"Source: {data.source}.",
        f"{len(data.trials):,} finished trials over {len(archs)} architectures and "
        f"{len({t.mode for t in data.trials})} modes.",
        f"Validation ZeroR: {zero_r:.2f}% ({zsrc}).",
        f"Regimes ({rlabel['published']}): {fmt(counts['published'])}.",
        f"Regimes ({rlabel['paper']}): {fmt(counts['paper'])}"
        + (f"; unclassified: {', '.join(uncl)}." if uncl else "."),
    ]
    warn = A.missing + notes
    fig_by = {f.name: f for f in figs}
    tbl = {t.name: t for t in tables}
    sections = [("Overview", _ul(overview) + (f'<div class="warn">{_ul(warn)}</div>' if warn else ""))]
    sections.append(("Regimes", _img(fig_by["regime_map"]) + tbl["regimes"].html()))
    sections.append(("Design space", _img(fig_by["design_space"]) + _img(fig_by["parameter_matching"])
                     + tbl["table_iv"].html()))
    sections.append(("Table V", tbl["table_v"].html()))
    sections.append(("Performance maps", "".join(_img(fig_by[n]) for n in
                                                 ("winning_strategy", "instability", "baseline_performance",
                                                  "ablation_effects"))))
    sections.append(("Statistics the paper lacks", _ul(und) + _img(fig_by["ablation_significance"])
                     + tbl["ablation_effects"].html() + tbl["paired_tests"].html()))
    dyn = (_img(fig_by["convergence"]) if "convergence" in fig_by else _p("No per-loop records for the chosen "
                                                                         "architectures."))
    sections.append(("Convergence and late breakthroughs", dyn + _img(fig_by["late_breakthroughs"])
                     + tbl["lkg_growth"].html() + tbl["convergence"].html()))
    sections.append(("All tables", tbl["summary"].html() + tbl["trials"].html()
                     + (tbl["missing"].html() if "missing" in tbl else "")))
    out.write("index.html", page("PSA report", sections, _p(data.source)))

    summary = {
        "psa_report": 1,
        "source": data.source,
        "trials": len(data.trials),
        "architectures": len(archs),
        "zero_r": zero_r,
        "zero_r_source": zsrc,
        "rules": cfg.rules,
        "regime_counts": counts,
        "regimes": {a: {"published": asdict(A.regimes["published"][a]), "paper": asdict(A.regimes["paper"][a])}
                    for a in archs},
        "unclassified_by_paper_rules": uncl,
        "verdicts": dict(Counter(c.verdict for c in A.comparisons)),
        "ablation_effects": dict(Counter(e["effect"] for e in A.effects.values())),
        "missing": A.missing,
        "notes": notes,
        "tables": [t.name for t in tables],
        "figures": {f.name: [p.name for p in f.files] for f in figs},
        "config": {k: v for k, v in asdict(cfg).items()},
    }
    out.write(MANIFEST, json.dumps(summary, indent=1, default=str))
    lines += [f"  {s}" for s in overview[1:]]
    lines += [f"  missing: {m}" for m in A.missing] + [f"  note: {n}" for n in notes]
    lines.append(f"wrote {Path(cfg.out) / 'index.html'}, {len(tables)} tables (md, csv, tex) and {len(figs)} figures (png, pdf)")
    return ReportResult(out.target, summary, lines, figs)


# --------------------------------------------------------------------------------------------
# psa compare


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
    convergence: tuple[str, ...] | None = None  # None: see convergence_targets
    worst: int = 10


@dataclass
class CompareResult:
    """The verdict and what was written."""

    out: Path
    verdict: list[str]
    summary: dict


def build_compare(opt: CompareOptions) -> CompareResult:
    """Compare a study (or the published data) with a reference, write the comparison, and
    return the one-screen verdict."""
    if opt.reference not in ("published", "seed"):
        raise ReportError(f"unknown reference {opt.reference!r} (choose published or seed)")
    data = an.load_published() if opt.ours_published else load_data(opt.db, None, opt.study)
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
    from psa import figures as fg

    ref_label = {"published": "published per-trial data (final)", "seed": "printed Table V"}[opt.reference]
    if not data.trials:
        msg = data.notes + an.missing_report(data)
        verdict = [f"psa compare: {data.source} against the {ref_label}", "  nothing to compare: no finished trial"]
        verdict += [f"  {m}" for m in msg]
        out.write("verdict.txt", "\n".join(verdict) + "\n")
        out.write("index.html", page("PSA comparison", [("Verdict", f"<pre>{html.escape(chr(10).join(verdict))}</pre>")]))
        summary = {"psa_report": 1, "kind": "compare", "cells": 0}
        out.write(MANIFEST, json.dumps(summary, indent=1))
        return CompareResult(out.target, verdict, summary)

    zero_r, zsrc = resolve_zero_r(data, opt.zero_r)
    # the published data is MNIST: its ZeroR is ours unless we ran on another data set
    ref_zero_r = zero_r if data.dataset == "mnist" else an.validation_zero_r("mnist")
    ccfg = an.CompareConfig(alpha=opt.alpha, escape_margin=opt.escape_margin, zero_r=zero_r)
    published = an.load_published()
    cells = an.compare_cells(data.trials, opt.reference, ccfg, published.trials)

    # Regimes: ours against the authors' map (always from their per-trial data: the printed
    # Table V has no per-mode maxima, which the rules need).
    ours_summ = an.summaries(data.trials)
    ref_summ = an.summaries(published.trials)
    archs = data.archs
    ours_reg = an.classify_all(ours_summ, archs, an.ClassifierConfig(zero_r=zero_r), opt.rules,
                               data.design.trials or None)
    ref_archs = [a for a in archs if any((a, m) in ref_summ for m in MODES)]
    ref_reg = an.classify_all(ref_summ, ref_archs, an.ClassifierConfig(zero_r=ref_zero_r), opt.rules, 10)
    agree = [a for a in ref_archs if ours_reg[a].regime == ref_reg[a].regime]
    disagree = [a for a in ref_archs if a not in agree]

    # Tables
    rows, raw = [], []
    for c in cells:
        rows.append([c.arch, c.mode, f"{c.mean_ours:.2f} ± {c.std_ours:.2f}", str(c.n_ours),
                     f"{c.mean_ref:.2f} ± {c.std_ref:.2f}", str(c.n_ref), f"{c.mean_ours - c.mean_ref:+.2f}", c.test,
                     f"{c.escape_ours} vs {c.escape_ref}" if c.test.startswith("Fisher") else "", fp(c.p),
                     fp(c.p_holm), "yes" if c.consistent(opt.alpha) else "NO"])
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
    ctab = Table("compare_cells", "Cells: ours against the reference", ["Architecture", "Mode", "Ours", "n",
                 "Reference", "n", "Diff.", "Test", "Escapes", "p", "p (Holm)", "Consistent"], rows, notes, raw,
                 html_collapsed=True)
    rrows = [[a, ours_reg[a].regime, ref_reg[a].regime, "yes" if a in agree else "NO", ours_reg[a].rule]
             for a in ref_archs]
    rtab = Table("regime_agreement", "Regimes: ours against the published map", ["Architecture", "Ours", "Published",
                 "Agree", "Our rule"], rrows,
                 [f"Both classified with the {opt.rules} rules; the published side from the authors' per-trial data."],
                 [{"arch": a, "ours": ours_reg[a].regime, "published": ref_reg[a].regime, "agree": a in agree,
                   "our_rule": ours_reg[a].rule, "published_rule": ref_reg[a].rule} for a in ref_archs])
    confusion = Counter((ref_reg[a].regime, ours_reg[a].regime) for a in ref_archs)
    labels = [k for k in (*REGIMES, "unknown", "unclassified", "n/a")
              if any(k in key for key in confusion)]
    ctab2 = Table("regime_confusion", "Regime confusion (rows: published, columns: ours)", ["Published", *labels],
                  [[r, *[str(confusion[(r, c)]) for c in labels]] for r in labels])
    for t in (ctab, rtab, ctab2):
        write_table(out, t)

    # Figures
    figdir = out.tmp / "figures"
    figs = [fg.compare_scatter(cells, opt.alpha, figdir, ref_label)]
    targets, _ = convergence_targets(opt.convergence, data.curves, data.archs)
    ref_curves = an._published_curves()
    if targets:
        figs.append(fg.convergence(targets, data.curves, data.trials, zero_r, figdir, "convergence_overlay",
                                   reference=ref_curves, ref_label="published"))
    for f in figs:
        out.write(f"figures/{f.name}.json", json.dumps(f.data, indent=1, default=_json_default))

    # Verdict
    n = len(cells)
    ok = [c for c in cells if c.consistent(opt.alpha)]
    ok_holm = [c for c in cells if not (c.p_holm < opt.alpha)]
    by_test: dict[str, list] = defaultdict(list)
    for c in cells:
        by_test[c.test].append(c)
    ref_cells = (set(an.load_seed_table()) if opt.reference == "seed"
                 else {(t.arch, t.mode) for t in published.trials})
    ours_cells = {(t.arch, t.mode) for t in data.trials}
    verdict = [f"psa compare: {data.source}",
               f"  against the {ref_label}; alpha = {opt.alpha:g}; ZeroR {zero_r:.2f}% ({zsrc})",
               f"cells compared: {n} (reference has {len(ref_cells)}; {len(ref_cells - ours_cells)} of them missing in "
               f"ours; {len(ours_cells - ref_cells)} of ours without a reference)"]
    if n:
        verdict.append(f"consistent at alpha = {opt.alpha:g}: {len(ok)}/{n} ({100 * len(ok) / n:.1f}%); "
                       f"if every cell agreed, about {opt.alpha * n:.1f} would be flagged by chance")
        verdict.append("  " + "; ".join(f"{t}: {sum(c.consistent(opt.alpha) for c in cs)}/{len(cs)}"
                                        for t, cs in sorted(by_test.items())))
        verdict.append(f"  after Holm over all cells: {len(ok_holm)}/{n}")
    verdict.append(f"regimes agreeing ({opt.rules} rules): {len(agree)}/{len(ref_archs)}"
                   + (f"; differing: {an._list([f'{a} ({ref_reg[a].regime}->{ours_reg[a].regime})' for a in disagree], 10)}"
                      if disagree else ""))
    verdict.append("  (NOTES.md: bootstrap resamples of the published trials keep the regime of 93 of 98 "
                   "architectures, median; a handful may move between honest runs)")
    worst = sorted(cells, key=lambda c: (c.p, -abs(c.mean_ours - c.mean_ref)))[: opt.worst]
    if worst:
        verdict.append("worst cells (smallest p):")
        verdict.append(f"  {'arch':<9}{'mode':<8}{'ours':>16}{'reference':>16}  {'test':<18}{'p':>9}")
        for c in worst:
            verdict.append(f"  {c.arch:<9}{c.mode:<8}{c.mean_ours:>9.2f} ± {c.std_ours:<5.2f}"
                           f"{c.mean_ref:>9.2f} ± {c.std_ref:<5.2f}  {c.test:<18}{fp(c.p):>9}")
    out.write("verdict.txt", "\n".join(verdict) + "\n")
    sections = [("Verdict", f"<pre>{html.escape(chr(10).join(verdict))}</pre>"),
                ("Cells", "".join(_img(f) for f in figs if f.name == "compare_means") + ctab.html()),
                ("Regimes", ctab2.html() + rtab.html())]
    if targets:
        sections.append(("Convergence against the published curves",
                         "".join(_img(f) for f in figs if f.name == "convergence_overlay")))
    out.write("index.html", page("PSA comparison with the published results", sections, _p(data.source)))
    summary = {"psa_report": 1, "kind": "compare", "source": data.source, "reference": opt.reference,
               "alpha": opt.alpha, "cells": n, "consistent": len(ok), "consistent_holm": len(ok_holm),
               "by_test": {t: [sum(c.consistent(opt.alpha) for c in cs), len(cs)] for t, cs in by_test.items()},
               "regimes_compared": len(ref_archs), "regimes_agree": len(agree), "regimes_differ": disagree,
               "worst": [asdict(c) for c in worst]}
    out.write(MANIFEST, json.dumps(summary, indent=1, default=str))
    return CompareResult(out.target, verdict, summary)


# --------------------------------------------------------------------------------------------
# Command line


def _archs_arg(text: str) -> tuple[str, ...]:
    from psa.core.arch import ArchError, parse_arch

    out = []
    # "1*2048,18*18" or "1*2048 18*18"; a bracketed "[2*128, 4*64]" stays one architecture
    for a in re.findall(r"\[[^\]]*\]|[^,;\s\[\]]+", text):
        try:
            out.append(parse_arch(a).short)
        except ArchError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    if not out:
        raise argparse.ArgumentTypeError(f"no architecture in {text!r}")
    return tuple(out)


RESAMPLES = number(int, 100, 1_000_000, noun="a number of resamples")


def cmd_report(args: argparse.Namespace) -> int:
    """`psa report`."""
    cfg = ReportConfig(
        db=None if args.reference else args.db,
        reference=args.reference,
        study=args.study,
        out=args.out,
        rules=args.rules,
        zero_r=args.zero_r,
        alpha=args.alpha,
        n_boot=args.bootstrap,
        seed=args.seed,
        convergence=args.convergence,
        escape_margin=args.escape_margin,
        tie_tolerance=args.tie_tolerance,
    )
    res = build_report(cfg)
    print("\n".join(res.lines))
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    """`psa compare`."""
    opt = CompareOptions(
        db=None if args.published else args.db,
        ours_published=args.published,
        reference=args.reference,
        study=args.study,
        out=args.out,
        rules=args.rules,
        zero_r=args.zero_r,
        alpha=args.alpha,
        escape_margin=args.escape_margin,
        convergence=args.convergence,
    )
    res = build_compare(opt)
    print("\n".join(res.verdict))
    print(f"wrote {Path(opt.out) / 'index.html'}, verdict.txt and tables/compare_cells.{{md,csv,tex}}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add `report` and `compare` to the `psa` command line."""
    p = sub.add_parser("report", help="tables, regimes, statistics, figures and an HTML page from a study")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--db", default="results/psa.sqlite", help="results database (default results/psa.sqlite)")
    src.add_argument("--reference", choices=["published"], help="report on the authors' published data instead")
    p.add_argument("--study", help="study name, when the database holds several (default: the latest)")
    p.add_argument("--out", default="report", help="output directory (default report/)")
    p.add_argument("--rules", choices=["published", "paper"], default="published",
                   help="regime rules: those that drew the published map (default) or eqs. 6-8 as printed")
    p.add_argument("--zero-r", type=percentage, help="validation ZeroR in %% (default: computed from the data set)")
    p.add_argument("--alpha", type=probability, default=0.05, help="level of the paired tests (default 0.05)")
    p.add_argument("--bootstrap", type=RESAMPLES, default=10_000, help="bootstrap resamples (default 10000)")
    p.add_argument("--seed", type=nonneg_int, default=0, help="seed of the bootstrap (default 0)")
    p.add_argument("--convergence", type=_archs_arg, default=None, metavar="ARCHS",
                   help="architectures of the convergence plot, comma-separated "
                        "(default 1*2048,18*18 where present, else the study's first and last)")
    p.add_argument("--escape-margin", type=nonneg_real, default=0.5,
                   help="a trial escapes ZeroR when its peak exceeds it by more than this (default 0.5 points)")
    p.add_argument("--tie-tolerance", type=nonneg_real, default=0.0,
                   help="Table V winners: rounded means within this many points tie (default 0: equal)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("compare", help="compare a study with the published results or the printed Table V")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--db", default="results/psa.sqlite", help="results database (default results/psa.sqlite)")
    src.add_argument("--published", action="store_true",
                     help="compare the published data itself (e.g. against --reference seed)")
    p.add_argument("--reference", choices=["published", "seed"], default="published",
                   help="published: the authors' final per-trial data; seed: the paper's printed Table V")
    p.add_argument("--study", help="study name, when the database holds several (default: the latest)")
    p.add_argument("--out", default="compare", help="output directory (default compare/)")
    p.add_argument("--rules", choices=["published", "paper"], default="published", help="regime rules")
    p.add_argument("--zero-r", type=percentage, help="validation ZeroR in %% (default: computed from the data set)")
    p.add_argument("--alpha", type=probability, default=0.01, help="level of the per-cell tests (default 0.01)")
    p.add_argument("--escape-margin", type=nonneg_real, default=0.5,
                   help="a trial escapes ZeroR when its peak exceeds it by more than this (default 0.5 points)")
    p.add_argument("--convergence", type=_archs_arg, default=None, metavar="ARCHS",
                   help="architectures of the convergence overlay "
                        "(default 1*2048,18*18 where present, else the study's first and last)")
    p.set_defaults(func=cmd_compare)
