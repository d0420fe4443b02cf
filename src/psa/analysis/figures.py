"""The report's figures, with matplotlib (Agg backend: no display needed).

Every figure function draws from plain inputs, writes PNG (for the page) and PDF (for a paper),
and returns a `Figure` whose `data` holds exactly what was drawn, so tests check data, not pixels.
The design-space maps follow the paper: depth on x, width on y, both logarithmic, the dashed
y = x line separating shallow-and-wide from deep-and-narrow nets.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # before pyplot: headless, and no GUI backend probing
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib import colors as mcolors  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

from psa.analysis.convergence import BAND_LEVEL, Convergence, condition_order  # noqa: E402
from psa.analysis.harm import ArchHarm  # noqa: E402
from psa.analysis.reference import CellComparison  # noqa: E402
from psa.analysis.regimes import REGIME_NAMES, REGIMES, Regime  # noqa: E402
from psa.analysis.results import Curve, Trial, arch_params, arch_shape, is_heterogeneous, matching_label  # noqa: E402
from psa.core.arch import N_IN, N_OUT  # noqa: E402
from psa.core.model import DEFAULT_MODEL  # noqa: E402
from psa.analysis.stats import ABLATION_EFFECTS, CellSummary  # noqa: E402
from psa.core.checkpoint import atomic_path  # noqa: E402
from psa.core.member import ABLATIVE_MODES, BASELINE_MODES, MODES  # noqa: E402

MODE_COLORS = {
    "none": "#4d4d4d",
    "decay": "#1f77b4",
    "dropout": "#9467bd",
    "full": "#2ca02c",
    "hidden": "#ff7f0e",
    "output": "#d62728",
}
# The paper's regime colours: I green, II red, III blue, IV black.
REGIME_COLORS = {
    "I": "#2ca02c",
    "II": "#d62728",
    "III": "#1f77b4",
    "IV": "#111111",
    "unknown": "#bbbbbb",
    "unclassified": "#bbbbbb",
    "n/a": "#eeeeee",
}
EFFECT_COLORS = {
    "beneficial": "#1a9850",
    "harmful": "#d73027",
    "mixed": "#fdae61",
    "no detectable effect": "#bdbdbd",
    "undecidable": "#ffffff",
    "collapsed": "#111111",
}
FORMATS = ("png", "pdf")
DPI = 150
DEFAULT_CONVERGENCE = ("1*2048", "18*18")  # the authors' `make-convergence-plots` targets


@dataclass
class Figure:
    """A written figure: its name, title, caption, files, and the data it drew."""

    name: str
    title: str
    caption: str
    files: list[Path] = field(default_factory=list)
    data: dict = field(default_factory=dict)

    @property
    def png(self) -> Path | None:
        """The PNG file (what the HTML page embeds)."""
        return next((f for f in self.files if f.suffix == ".png"), None)


def _save(fig: plt.Figure, out_dir: Path, name: str) -> list[Path]:
    """Write every format atomically (temp file + rename) and close the figure."""
    out_dir.mkdir(parents=True, exist_ok=True)
    files = []
    for ext in FORMATS:
        target = out_dir / f"{name}.{ext}"
        # metadata without a creation date keeps the PDFs byte-stable between runs
        meta = {"CreationDate": None} if ext == "pdf" else {}
        with atomic_path(target) as tmp:
            fig.savefig(tmp, format=ext, dpi=DPI, bbox_inches="tight", metadata=meta)
        files.append(target)
    plt.close(fig)
    return files


def _points(archs: Sequence[str]) -> tuple[list[str], list[str]]:
    """Architectures that can be drawn on the log-log design space, and those that cannot."""
    ok, skipped = [], []
    for a in archs:
        (ok if arch_shape(a) else skipped).append(a)
    return ok, skipped


def _design_axes(ax: plt.Axes, archs: Sequence[str], title: str) -> None:
    shapes = [arch_shape(a) for a in archs]
    hi = max([max(s) for s in shapes if s] + [10])
    lim = (0.7, 10 ** (math.log10(hi) + 0.15))
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(*lim)
    ax.set_ylim(*lim)
    ax.plot(lim, lim, ls="--", color="#888888", lw=1, zorder=0)
    ax.set_xlabel("depth (hidden layers)")
    ax.set_ylabel("width (neurons per hidden layer)")
    ax.set_title(title)
    ax.grid(True, which="major", ls=":", lw=0.5, color="#cccccc")
    ax.set_aspect("equal")


def _xy(archs: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    s = [arch_shape(a) for a in archs]
    return np.array([p[0] for p in s], dtype=float), np.array([p[1] for p in s], dtype=float)


def _crowded(a: str) -> bool:
    """On the square diagonal between 7 and 40 the points touch: they are named in the strip."""
    d, w = arch_shape(a)
    return d == w and 7 <= d <= 40


def _label_points(ax: plt.Axes, archs: Sequence[str], fontsize: float = 6.5) -> None:
    """Name every point the strip does not; labels along the crowded bottom rows (width <= 4,
    depth >= 8) are slanted so that neighbours do not overprint."""
    for a in archs:
        if _crowded(a):
            continue
        d, w = arch_shape(a)
        if w <= 4 and d >= 8:
            ax.annotate(a, (d, w), xytext=(2, 6), textcoords="offset points", fontsize=fontsize - 0.5,
                        color="#333333", rotation=50, ha="left", va="bottom")
        else:
            ax.annotate(a, (d, w), xytext=(5, 2), textcoords="offset points", fontsize=fontsize, color="#333333")


def _square_strip(ax: plt.Axes, archs: Sequence[str], face: Mapping[str, object], marker: Mapping[str, str]) -> list[str]:
    """The square nets (L*L) in a row, in size order: the diagonal of the map, readable."""
    squares = sorted((a for a in archs if arch_shape(a)[0] == arch_shape(a)[1]), key=lambda a: arch_shape(a)[0])
    ax.set_xlim(-0.6, max(len(squares), 1) - 0.4)
    ax.set_ylim(-0.6, 0.6)
    ax.set_yticks([])
    ax.set_xticks(range(len(squares)))
    ax.set_xticklabels([str(arch_shape(a)[0]) for a in squares], fontsize=7)
    for i, a in enumerate(squares):
        ax.scatter([i], [0], s=110, c=[face[a]], marker=marker.get(a, "s"), edgecolors="k", linewidths=0.5)
    ax.set_xlabel("square nets L*L, by L (the diagonal above, spread out)", fontsize=8)
    for side in ("top", "right", "left"):
        ax.spines[side].set_visible(False)
    return squares


def _map(archs: Sequence[str], face: Mapping[str, object], title: str, out_dir: Path, name: str,
         marker: Mapping[str, str] | None = None, size: Mapping[str, float] | None = None,
         handles: Sequence[Line2D] = (), legend_title: str | None = None,
         mappable: matplotlib.cm.ScalarMappable | None = None, cbar_label: str = "",
         extra_legend: Sequence[Line2D] = ()) -> tuple[list[Path], list[str], list[str]]:
    """Draw a design-space map: the log-log panel and, under it, the strip of square nets.
    Returns the files, the architectures drawn and those skipped (no hidden layer...)."""
    pts, skipped = _points([a for a in archs if a in face])
    skipped += [a for a in archs if a not in face and is_heterogeneous(a)]  # maps that drew only what they can
    marker = marker or {}
    fig = plt.figure(figsize=(8.8, 9.4))
    gs = fig.add_gridspec(2, 2, height_ratios=[1, 0.07], width_ratios=[1, 0.035], hspace=0.18, wspace=0.04)
    ax = fig.add_subplot(gs[0, 0])
    _design_axes(ax, pts, title)
    x, y = _xy(pts)
    for mk in sorted({marker.get(a, "s") for a in pts}):
        idx = [i for i, a in enumerate(pts) if marker.get(a, "s") == mk]
        ax.scatter(x[idx], y[idx], c=[face[pts[i]] for i in idx], marker=mk,
                   s=[(size or {}).get(pts[i], 70) for i in idx], edgecolors="k", linewidths=0.45, zorder=3)
    _label_points(ax, pts)
    if handles:
        leg = ax.legend(handles=list(handles), loc="upper right", fontsize=8, framealpha=0.92, title=legend_title,
                        title_fontsize=8)
        ax.add_artist(leg)
    if extra_legend:
        ax.legend(handles=list(extra_legend), loc="lower left", fontsize=7, framealpha=0.92, labelspacing=1.3)
    if mappable is not None:
        cax = fig.add_subplot(gs[0, 1])
        cb = fig.colorbar(mappable, cax=cax)
        cb.set_label(cbar_label)
    sax = fig.add_subplot(gs[1, 0])
    _square_strip(sax, pts, face, marker)
    het = [a for a in skipped if is_heterogeneous(a)]
    other = [a for a in skipped if a not in het]
    lines = ([f"not drawn (no hidden layer or unparsable): {', '.join(other)}"] if other else []) + (
        [f"not drawn: {len(het)} heterogeneous nets (layers of unequal widths; see accuracy against parameters)"]
        if het else [])
    if lines:
        fig.text(0.01, 0.005, "\n".join(lines), fontsize=7)
    return _save(fig, out_dir, name), pts, skipped


def _handle(color: object, label: str, marker: str = "s", size: float = 8) -> Line2D:
    return Line2D([], [], marker=marker, ls="", markerfacecolor=color, markeredgecolor="k", markersize=size,
                  label=label)


def _size(params: float) -> float:
    return 12 + 230 * max(math.log10(params) - 2.5, 0.1) / 4


def design_space(archs: Sequence[str], out_dir: Path, io: tuple[int, int] = (N_IN, N_OUT),
                 model: str = DEFAULT_MODEL) -> Figure:
    """Fig. 2/3: every architecture by depth and width (log-log), circles for parameter-matched
    and triangles for asymmetric nets, marker area growing with the parameter count (of `model`,
    for a data set of `io` = (inputs, classes), MNIST's by default; the matching is the
    SimpleMLP shape's)."""
    ok, _ = _points(archs)
    match = {a: matching_label(a) for a in ok}
    params = {a: arch_params(a, io, model) for a in ok}
    face = {a: "#1f77b4" if match[a] == "Matched" else "#d62728" for a in ok}
    marker = {a: "o" if match[a] == "Matched" else "^" for a in ok}
    n_m = sum(v == "Matched" for v in match.values())
    handles = [_handle("#1f77b4", f"parameter-matched ({n_m})", "o"),
               _handle("#d62728", f"asymmetric ({len(ok) - n_m})", "^")]
    sizes = [_handle("#bbbbbb", f"{p:,.0f} parameters", "o", math.sqrt(_size(p))) for p in (1e3, 1e4, 1e5, 1e6)]
    files, pts, skipped = _map(archs, face, "Architectural design space", out_dir, "design_space", marker,
                               {a: _size(params[a]) for a in ok}, handles, extra_legend=sizes)
    data = {"points": [{"arch": a, "depth": arch_shape(a)[0], "width": arch_shape(a)[1], "params": params[a],
                        "matching": match[a]} for a in pts], "skipped": skipped}
    return Figure("design_space", "Design space",
                  "Depth against width (log-log). Circles: parameter-matched; triangles: asymmetric; "
                  "area grows with the parameter count. Dashed: y = x. The strip below spreads out the square "
                  "nets of the diagonal.", files, data)


def _categorical_map(archs: Sequence[str], category: Mapping[str, str], colors: Mapping[str, str],
                     labels: Mapping[str, str], title: str, out_dir: Path, name: str,
                     markers: Mapping[str, str] | None = None) -> tuple[list[Path], dict]:
    cat = {a: category[a] for a in archs if a in category}
    face = {a: colors.get(c, "#ffffff") for a, c in cat.items()}
    marker = {a: (markers or {}).get(c, "s") for a, c in cat.items()}
    pts, _ = _points(list(cat))
    counts = {c: sum(cat[a] == c for a in pts) for c in colors}
    handles = [_handle(colors[c], f"{labels.get(c, c)} ({counts[c]})", (markers or {}).get(c, "s"))
               for c in colors if counts[c]]
    files, pts, skipped = _map(archs, face, title, out_dir, name, marker, handles=handles)
    return files, {"points": [{"arch": a, "depth": arch_shape(a)[0], "width": arch_shape(a)[1], "category": cat[a]}
                              for a in pts], "counts": {c: n for c, n in counts.items() if n}, "skipped": skipped}


def regime_map(archs: Sequence[str], regimes: Mapping[str, Regime], out_dir: Path, rules: str) -> Figure:
    """Fig. 5: the regime of every architecture on the design space."""
    labels = {k: f"{k}: {v}" if k in REGIMES else v for k, v in REGIME_NAMES.items()}
    cat = {a: r.regime for a, r in regimes.items()}
    rule_text = "published rules" if rules == "published" else "equations 6-8 as printed"
    files, data = _categorical_map(archs, cat, REGIME_COLORS, labels, f"Training regimes ({rule_text})", out_dir,
                                   "regime_map", markers={"unknown": "X", "unclassified": "X", "n/a": "X"})
    data["rules"] = rules
    return Figure("regime_map", "Regime map",
                  f"Regime of each architecture by the {rule_text}. I green, II red, III blue, IV black; "
                  f"crosses: no rule fired.", files, data)


def winning_strategy(archs: Sequence[str], best_winners: Mapping[str, Sequence[str]], out_dir: Path) -> Figure:
    """Fig. 6: the mode whose best trial is highest; ties (several modes share the best trial,
    e.g. every mode stuck at ZeroR) drawn in light grey."""
    cat = {}
    for a, w in best_winners.items():
        if not w:
            continue
        cat[a] = w[0] if len(w) == 1 else "tie"
    colors = {**MODE_COLORS, "tie": "#e0e0e0"}
    labels = {m: m for m in MODES} | {"tie": "tie: several modes share the best trial"}
    files, data = _categorical_map(archs, cat, colors, labels, "Winning strategy (best single trial)", out_dir,
                                   "winning_strategy")
    data["winners"] = {a: list(w) for a, w in best_winners.items()}
    return Figure("winning_strategy", "Winning strategy",
                  "Mode with the highest single trial (peak validation accuracy) per architecture; "
                  "grey: a tie between modes.", files, data)


def _value_map(archs: Sequence[str], values: Mapping[str, float], title: str, cbar: str, out_dir: Path, name: str,
               cmap: str, norm: mcolors.Normalize | None = None) -> tuple[list[Path], dict]:
    vals = {a: float(values[a]) for a in archs if a in values and not math.isnan(values[a])}
    if norm is None:
        norm = mcolors.Normalize(vmin=min(vals.values(), default=0.0), vmax=max(vals.values(), default=1.0))
    sm = matplotlib.cm.ScalarMappable(norm=norm, cmap=cmap)
    face = {a: sm.to_rgba(v) for a, v in vals.items()}
    files, pts, skipped = _map(archs, face, title, out_dir, name, mappable=sm, cbar_label=cbar)
    return files, {"points": [{"arch": a, "depth": arch_shape(a)[0], "width": arch_shape(a)[1], "value": vals[a]}
                              for a in pts], "skipped": skipped}


def instability(archs: Sequence[str], summ: Mapping[tuple[str, str], CellSummary], out_dir: Path) -> Figure:
    """Fig. 7: the largest std (population, over the trials) among the six modes."""
    vals = {}
    for a in archs:
        stds = [summ[(a, m)].std for m in MODES if (a, m) in summ]
        if stds:
            vals[a] = max(stds)
    files, data = _value_map(archs, vals, "Instability: largest std across modes", "max std of peak accuracy (points)",
                             out_dir, "instability", "inferno")
    return Figure("instability", "Instability",
                  "Largest standard deviation (ddof=0) of the peak accuracies among the six modes.", files, data)


def baseline_performance(archs: Sequence[str], summ: Mapping[tuple[str, str], CellSummary], zero_r: float,
                         out_dir: Path) -> Figure:
    """Fig. 8: how well the baselines train: the best of the three baseline means."""
    vals = {}
    for a in archs:
        ms = [summ[(a, m)].mean for m in BASELINE_MODES if (a, m) in summ]
        if ms:
            vals[a] = max(ms)
    norm = mcolors.Normalize(vmin=min([zero_r - 2] + list(vals.values())), vmax=100)
    files, data = _value_map(archs, vals, "Baseline performance: best baseline mean", "mean peak accuracy (%)",
                             out_dir, "baseline_performance", "viridis", norm)
    data["zero_r"] = zero_r
    return Figure("baseline_performance", "Baseline performance",
                  f"Best mean peak accuracy among none, decay and dropout. ZeroR = {zero_r:.2f}%.", files, data)


def ablation_effects_map(archs: Sequence[str], summ: Mapping[tuple[str, str], CellSummary], out_dir: Path) -> Figure:
    """Fig. 9: mean of the ablative means minus mean of the baseline means, diverging colours
    (green: ablation ahead) on a symmetric-log scale so that -0.3 and +20 both read."""
    vals = {}
    for a in archs:
        ab = [summ[(a, m)].mean for m in ABLATIVE_MODES if (a, m) in summ]
        ba = [summ[(a, m)].mean for m in BASELINE_MODES if (a, m) in summ]
        if ab and ba:
            vals[a] = float(np.mean(ab) - np.mean(ba))
    lim = max([abs(v) for v in vals.values()] + [1.0])
    norm = mcolors.SymLogNorm(linthresh=0.5, linscale=1.0, vmin=-lim, vmax=lim, base=10)
    files, data = _value_map(archs, vals, "Ablation effect: ablative minus baseline means",
                             "mean(ablative means) - mean(baseline means), points", out_dir, "ablation_effects",
                             "RdYlGn", norm)
    return Figure("ablation_effects", "Ablation effects (means)",
                  "Mean of the three ablative modes' means minus that of the three baselines (symmetric log "
                  "colour scale, linear within +-0.5).", files, data)


def ablation_significance(archs: Sequence[str], effects: Mapping[str, Mapping], alpha: float, out_dir: Path) -> Figure:
    """The ablation-effect map drawn from the paired tests instead of thresholds."""
    cat = {a: e["effect"] for a, e in effects.items()}
    labels = {
        "beneficial": "ablation significantly better",
        "harmful": "ablation significantly worse",
        "mixed": "both, depending on the modes",
        "no detectable effect": "no detectable difference",
        "undecidable": "10 trials cannot decide",
        "collapsed": "no trial learns (constant predictors)",
    }
    colors = {k: EFFECT_COLORS[k] for k in ABLATION_EFFECTS}
    files, data = _categorical_map(archs, cat, colors, labels,
                                   f"Ablation effect from paired tests (Holm, alpha = {alpha:g})", out_dir,
                                   "ablation_significance")
    return Figure("ablation_significance", "Ablation effects (significance)",
                  f"Per architecture, the 9 ablative-vs-baseline paired sign-flip tests, Holm-corrected at "
                  f"alpha = {alpha:g}. Black: no trial of any mode beats ZeroR by the escape margin, so the "
                  f"tests would only compare constant predictors.", files, data)


def parameter_matching(archs: Sequence[str], out_dir: Path, io: tuple[int, int] = (N_IN, N_OUT),
                       model: str = DEFAULT_MODEL) -> Figure:
    """Parameter-matching heatmap: colour = parameter count (log) of `model`, so that the
    matched families (1*W, 2*W', 4*W'' and the square with the same budget) share a colour."""
    ok, _ = _points(archs)
    params = {a: arch_params(a, io, model) for a in ok}
    match = {a: matching_label(a) for a in ok}
    vmin, vmax = min(params.values(), default=1), max(params.values(), default=10)
    sm = matplotlib.cm.ScalarMappable(norm=mcolors.LogNorm(vmin=vmin, vmax=max(vmax, vmin + 1)), cmap="plasma")
    face = {a: sm.to_rgba(p) for a, p in params.items()}
    marker = {a: "o" if match[a] == "Matched" else "^" for a in ok}
    handles = [_handle("#ffffff", "parameter-matched", "o"), _handle("#ffffff", "asymmetric", "^")]
    files, pts, skipped = _map(archs, face, "Parameter matching: parameters per architecture", out_dir,
                               "parameter_matching", marker, {a: 80 for a in ok}, handles, mappable=sm,
                               cbar_label="trainable parameters (equation 1)")
    data = {"points": [{"arch": a, "depth": arch_shape(a)[0], "width": arch_shape(a)[1], "params": params[a],
                        "matching": match[a]} for a in pts], "skipped": skipped}
    return Figure("parameter_matching", "Parameter matching",
                  "Parameter count of each architecture (colour, log scale); circles matched, triangles asymmetric.",
                  files, data)


def accuracy_vs_params(archs: Sequence[str], summ: Mapping[tuple[str, str], CellSummary], out_dir: Path,
                       io: tuple[int, int] = (N_IN, N_OUT)) -> Figure:
    """Where a depth x width map cannot place heterogeneous nets: mean peak accuracy against the
    parameter count (log), the best baseline mode on the left and the best ablative mode on
    the right; homogeneous nets grey circles, heterogeneous nets labelled red diamonds."""
    points = []
    for a in archs:
        p = arch_params(a, io)
        if p is None:
            continue
        best = {}
        for group, modes in (("baseline", BASELINE_MODES), ("ablative", ABLATIVE_MODES)):
            cells = [(summ[(a, m)].mean, m) for m in modes if (a, m) in summ]
            if cells:
                best[group] = max(cells)
        points.append({"arch": a, "params": p, "heterogeneous": is_heterogeneous(a),
                       **{f"{g}_mean": v[0] for g, v in best.items()}, **{f"{g}_mode": v[1] for g, v in best.items()}})
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.6), sharey=True)
    for ax, group in zip(axes, ("baseline", "ablative")):
        for het, style in ((False, dict(c="#9a9a9a", marker="o", s=22, zorder=2)),
                           (True, dict(c="#d62728", marker="D", s=40, zorder=3))):
            pts = [q for q in points if q["heterogeneous"] == het and f"{group}_mean" in q]
            if pts:
                ax.scatter([q["params"] for q in pts], [q[f"{group}_mean"] for q in pts], edgecolors="k",
                           linewidths=0.4, label="heterogeneous" if het else "one width", **style)
            if het:
                for q in pts:
                    ax.annotate(q["arch"], (q["params"], q[f"{group}_mean"]), fontsize=6.5, xytext=(3, 3),
                                textcoords="offset points")
        ax.set_xscale("log")
        ax.set_xlabel("trainable parameters (equation 1)")
        ax.set_title(f"best {group} mode", fontsize=10)
        ax.grid(alpha=0.3, lw=0.5)
    axes[0].set_ylabel("mean peak validation accuracy (%)")
    axes[0].legend(fontsize=8, loc="best")
    files = _save(fig, out_dir, "accuracy_vs_params")
    return Figure("accuracy_vs_params", "Accuracy against parameters",
                  "Mean peak validation accuracy of the best baseline mode (left) and the best ablative mode (right) "
                  "against the parameter count (log). Red diamonds: heterogeneous nets (layers of unequal widths), "
                  "which the depth x width maps cannot place; grey circles: nets of one width.",
                  files, {"points": points})


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


def convergence(archs: Sequence[str], curves: Mapping[tuple[str, str, int], Curve], trials: Sequence[Trial],
                zero_r: float, out_dir: Path, name: str = "convergence",
                reference: Mapping[tuple[str, str], Curve] | None = None, ref_label: str = "published") -> Figure:
    """Fig. 10: per-loop candidate validation accuracy of every trial, one panel per mode and a
    row per architecture; the best trial (highest bounty) drawn bold. With `reference`, the
    reference's curve for the cell is overlaid in black dashes."""
    peak = {(t.arch, t.mode, t.trial): t.peak for t in trials}
    rows = [a for a in archs if any(k[0] == a for k in curves) or (reference and any(k[0] == a for k in reference))]
    data: dict = {"cells": {}, "missing": [a for a in archs if a not in rows]}
    if not rows:
        fig, ax = plt.subplots(figsize=(6, 1.5))
        ax.axis("off")
        ax.text(0.5, 0.5, "no per-loop records for: " + ", ".join(archs), ha="center", va="center")
        files = _save(fig, out_dir, name)
        return Figure(name, "Convergence", "No per-loop data for the chosen architectures.", files, data)
    fig, axes = plt.subplots(len(rows), len(MODES), figsize=(3.0 * len(MODES), 2.6 * len(rows)), squeeze=False,
                             sharex=True)
    for i, a in enumerate(rows):
        # One y-range per row (architecture): the six modes compare at a glance, and a stable net
        # climbing from 92 to 98 is not flattened against a 10-100 scale.
        vals = [curves[k].candidate for k in curves if k[0] == a]
        vals += [c.candidate for k, c in (reference or {}).items() if k[0] == a]
        flat = np.concatenate(vals) if vals else np.array([zero_r])
        lo, hi = float(np.nanmin(flat)), float(np.nanmax(flat))
        pad = max(0.05 * (hi - lo), 0.2)
        for j, m in enumerate(MODES):
            ax = axes[i][j]
            ax.set_ylim(lo - pad, hi + pad)
            keys = sorted(k for k in curves if k[0] == a and k[1] == m)
            best = max(keys, key=lambda k: peak.get(k, np.nanmax(curves[k].candidate)), default=None)
            cell = {"trials": [k[2] for k in keys], "best_trial": None if best is None else best[2]}
            for k in keys:
                c = curves[k].candidate
                loops = np.arange(1, c.size + 1)
                if k == best:
                    continue
                ax.plot(loops, c, color=MODE_COLORS[m], lw=0.6, alpha=0.35)
            if best is not None:
                c = curves[best].candidate
                ax.plot(np.arange(1, c.size + 1), c, color=MODE_COLORS[m], lw=1.8, label=f"best (trial {best[2]})")
                cell["best_peak"] = float(np.nanmax(c))
            if reference and (a, m) in reference:
                rc = reference[(a, m)].candidate
                ax.plot(np.arange(1, rc.size + 1), rc, color="k", lw=1.0, ls="--", label=ref_label)
                cell["reference_peak"] = float(np.nanmax(rc))
            ax.axhline(zero_r, color="#999999", lw=0.6, ls=":")
            if i == 0:
                ax.set_title(m, color=MODE_COLORS[m])
            if j == 0:
                ax.set_ylabel(f"{a}\nval. accuracy (%)")
            if i == len(rows) - 1:
                ax.set_xlabel("meta-loop")
            if not keys and not (reference and (a, m) in reference):
                ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", va="center", color="#999999")
            elif keys or reference:
                ax.legend(fontsize=6, loc="lower right")
            ax.grid(True, ls=":", lw=0.4)
            data["cells"][f"{a}/{m}"] = cell
    fig.tight_layout()
    files = _save(fig, out_dir, name)
    what = "our trials (thin), our best trial (bold)" + (f", {ref_label} plotted trial (black dashes)" if reference else "")
    return Figure(name, "Convergence" if not reference else "Convergence against the reference",
                  f"Per-loop candidate validation accuracy for {', '.join(rows)}: {what}. Dotted: ZeroR.", files, data)


def late_breakthroughs(trials: Sequence[Trial], zero_r: float, margin: float, out_dir: Path,
                       meta_loops: int | None = None) -> Figure:
    """When did each trial reach its bounty? Distribution of the bounty loop per mode, over the
    trials that escaped ZeroR (a trial stuck at ZeroR 'reaches' it on loop 1, which says nothing)."""
    loops = {m: [t.bounty_loop for t in trials if t.mode == m and t.bounty_loop is not None
                 and t.peak > zero_r + margin] for m in MODES}
    n_max = meta_loops or max([max(v) for v in loops.values() if v] + [100])
    fig, axes = plt.subplots(2, 3, figsize=(12, 6.5), sharex=True)
    bins = np.linspace(0.5, n_max + 0.5, min(n_max, 20) + 1)
    data = {"bounty_loops": {}, "late_share": {}, "n": {}, "meta_loops": n_max}
    for ax, m in zip(axes.flat, MODES):
        v = np.array(loops[m], dtype=float)
        data["bounty_loops"][m] = [int(x) for x in v]
        data["n"][m] = int(v.size)
        if v.size:
            ax.hist(v, bins=bins, color=MODE_COLORS[m], alpha=0.85)
            late = float(np.mean(v > n_max / 2))
            data["late_share"][m] = late
            ax.axvline(float(np.median(v)), color="k", lw=1, ls="--")
            ax.set_title(f"{m}: n={v.size}, median loop {np.median(v):.0f}, {100 * late:.0f}% after loop {n_max // 2}",
                         fontsize=9, color=MODE_COLORS[m])
        else:
            ax.text(0.5, 0.5, "no bounty loops", transform=ax.transAxes, ha="center", va="center", color="#999999")
            ax.set_title(m, fontsize=9, color=MODE_COLORS[m])
        ax.grid(True, ls=":", lw=0.4)
    for ax in axes[1]:
        ax.set_xlabel("meta-loop of the bounty (peak validation accuracy)")
    for ax in axes[:, 0]:
        ax.set_ylabel("trials")
    fig.suptitle(f"Late breakthroughs: loop where each trial reached its bounty (trials above ZeroR + {margin:g})")
    fig.tight_layout()
    files = _save(fig, out_dir, "late_breakthroughs")
    return Figure("late_breakthroughs", "Late breakthroughs",
                  f"Histogram of the meta-loop at which each trial reached its peak, per mode, over trials that "
                  f"beat ZeroR by more than {margin:g} points; dashed: median.", files, data)


def compare_scatter(cells: Sequence[CellComparison], alpha: float, out_dir: Path, ref_label: str) -> Figure:
    """Our cell means against the reference's; cells the tests flag at `alpha` in red."""
    fig, ax = plt.subplots(figsize=(7, 7))
    ok = [c for c in cells if c.consistent(alpha)]
    bad = [c for c in cells if not c.consistent(alpha)]
    ax.plot([0, 100], [0, 100], ls="--", color="#888888", lw=1)
    ax.scatter([c.mean_ref for c in ok], [c.mean_ours for c in ok], s=14, c="#1f77b4", alpha=0.6,
               label=f"consistent at alpha = {alpha:g} ({len(ok)})")
    ax.scatter([c.mean_ref for c in bad], [c.mean_ours for c in bad], s=30, c="#d62728", marker="D",
               label=f"different ({len(bad)})")
    for c in sorted(bad, key=lambda c: c.p)[:10]:
        ax.annotate(f"{c.arch} {c.mode}", (c.mean_ref, c.mean_ours), fontsize=6, xytext=(3, 3),
                    textcoords="offset points")
    ax.set_xlabel(f"{ref_label} mean peak accuracy (%)")
    ax.set_ylabel("our mean peak accuracy (%)")
    ax.set_title("Cell means: ours against the reference")
    ax.legend(loc="upper left", fontsize=8)
    ax.grid(True, ls=":", lw=0.4)
    files = _save(fig, out_dir, "compare_means")
    data = {"cells": [{"arch": c.arch, "mode": c.mode, "ours": c.mean_ours, "ref": c.mean_ref, "p": c.p}
                      for c in cells], "n_consistent": len(ok), "n_different": len(bad)}
    return Figure("compare_means", "Means against the reference",
                  f"Each dot is a cell: {ref_label} mean (x) and ours (y); red diamonds differ at alpha = {alpha:g}.",
                  files, data)


def _cond_color(c: str) -> str:
    return MODE_COLORS.get(c, "#8c564b")


def bounty_progress(C: Convergence, out_dir: Path, zero_r: float) -> Figure:
    """Per mode, the median bounty curve with its bootstrap band: pooled over every architecture
    as progress (share of the trial's own rise, so nets of any size pool), then per chosen
    architecture in accuracy points."""
    archs = list(dict.fromkeys(a for a, _ in C.bounty))
    n = 1 + len(archs)
    fig, axes = plt.subplots(1, n, figsize=(5.2 * n, 4.2), squeeze=False)
    data: dict = {"loops": C.loops, "progress": {}, "progress_left_out": dict(C.progress_left_out), "bounty": {}}
    ax = axes[0][0]
    for c, band in C.progress.items():
        t = np.arange(1, band.median.size + 1)
        ax.fill_between(t, band.lo, band.hi, color=_cond_color(c), alpha=0.15, lw=0)
        ax.plot(t, band.median, color=_cond_color(c), lw=1.5, label=f"{c} (n={band.n})")
        data["progress"][c] = band.as_dict()
    ax.set_title("all architectures: progress to the final bounty", fontsize=9)
    ax.set_ylabel("(bounty - first) / (final - first)")
    ax.set_ylim(-0.02, 1.02)
    for j, a in enumerate(archs, start=1):
        ax = axes[0][j]
        for c in condition_order([cc for aa, cc in C.bounty if aa == a]):
            band = C.bounty[(a, c)]
            t = np.arange(1, band.median.size + 1)
            ax.fill_between(t, band.lo, band.hi, color=_cond_color(c), alpha=0.15, lw=0)
            ax.plot(t, band.median, color=_cond_color(c), lw=1.5, label=f"{c} (n={band.n})")
            data["bounty"][f"{a}/{c}"] = band.as_dict()
        ax.axhline(zero_r, color="#999999", lw=0.6, ls=":")
        ax.set_title(f"{a}: median bounty", fontsize=9)
        ax.set_ylabel("bounty (%)")
    for ax in axes[0]:
        ax.set_xlabel("meta-loop")
        ax.grid(True, ls=":", lw=0.4)
        if ax.lines:
            ax.legend(fontsize=7, loc="lower right")
        else:
            ax.text(0.5, 0.5, "no per-loop records", transform=ax.transAxes, ha="center", va="center",
                    color="#999999")
    fig.tight_layout()
    files = _save(fig, out_dir, "bounty_progress")
    return Figure("bounty_progress", "Bounty curves",
                  f"Median bounty curve per mode with a {BAND_LEVEL:.0%} bootstrap band (trials resampled). Left: "
                  "every architecture pooled, each trial's curve as the share of its own rise from its first to "
                  "its final bounty (trials that never rise left out); right: the chosen architectures in "
                  "accuracy points. Dotted: ZeroR.", files, data)


def harm_rate(harms: Sequence[ArchHarm], out_dir: Path, rules: str) -> Figure:
    """The harm rate (ablative modes against none) and the ablative discard fraction of every
    architecture against its parameter count, coloured by regime."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    data: dict = {"rules": rules, "points": []}
    for h in harms:
        data["points"].append({"arch": h.arch, "params": h.params, "regime": h.regime, "harm": h.harm,
                               "discard_ablative": h.discard_ablative})
    for ax, key, label in ((axes[0], "harm", "harm rate: mean ablative minus none (points)"),
                           (axes[1], "discard_ablative", "discard fraction, ablative modes")):
        for r, color in REGIME_COLORS.items():
            pts = [p for p in data["points"] if p["regime"] == r and p[key] is not None and p["params"]]
            if pts:
                ax.scatter([p["params"] for p in pts], [p[key] for p in pts], c=color, s=28, edgecolors="k",
                           linewidths=0.4, label=f"{r} ({len(pts)})", zorder=3)
        ax.set_xscale("log")
        ax.set_xlabel("parameters (equation 1)")
        ax.set_ylabel(label)
        ax.grid(True, ls=":", lw=0.4)
        if ax.collections:
            ax.legend(fontsize=7, title="regime", title_fontsize=7)
    axes[0].axhline(0, color="#888888", lw=0.8)
    if any(p["harm"] is not None and abs(p["harm"]) > 1 for p in data["points"]):
        axes[0].set_yscale("symlog", linthresh=1.0)
    fig.tight_layout()
    files = _save(fig, out_dir, "harm_rate")
    return Figure("harm_rate", "Harm rate against size",
                  "Per architecture: mean bounty of the ablative modes minus none's (left, symmetric log scale "
                  "beyond +-1 point) and the share of discarded candidates in the ablative modes (right), against "
                  f"the parameter count; colour: regime ({rules} rules).", files, data)
