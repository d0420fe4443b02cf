"""The design-space maps: every architecture placed by its depth and width, coloured by what is mapped.

The maps follow the paper (Figs. 2/3 and 5-9, and our parameter matching): depth on x, width
on y, both logarithmic, the dashed y = x line separating shallow-and-wide from deep-and-narrow
nets, and under each map the square nets of the diagonal spread out in a strip. Like every
figure (psa.analysis.figures) a map writes PNG and PDF and returns a `Figure` whose `data`
holds exactly the points drawn; nets a depth x width map cannot place are listed as skipped.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # before pyplot: headless, and no GUI backend probing
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib import colors as mcolors  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

from psa.analysis.figures import MODE_COLORS, REGIME_COLORS, Figure, save  # noqa: E402
from psa.analysis.regimes import REGIME_NAMES, REGIMES, Regime  # noqa: E402
from psa.analysis.results import arch_params, arch_shape, is_heterogeneous, matching_label  # noqa: E402
from psa.analysis.stats import ABLATION_EFFECTS, CellSummary  # noqa: E402
from psa.core.arch import N_IN, N_OUT  # noqa: E402
from psa.core.model import DEFAULT_MODEL  # noqa: E402
from psa.core.member import ABLATIVE_MODES, BASELINE_MODES, MODES  # noqa: E402

EFFECT_COLORS = {
    "beneficial": "#1a9850",
    "harmful": "#d73027",
    "mixed": "#fdae61",
    "no detectable effect": "#bdbdbd",
    "undecidable": "#ffffff",
    "collapsed": "#111111",
}


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


def _square_strip(ax: plt.Axes, archs: Sequence[str], face: Mapping[str, object],
                  marker: Mapping[str, str]) -> list[str]:
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
    return save(fig, out_dir, name), pts, skipped


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
