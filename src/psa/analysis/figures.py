"""The report's figures drawn on axes of their own, and what every figure shares.

Convergence curves, late breakthroughs, bounty progress, the harm rate, accuracy against
parameters and the comparison scatter, with matplotlib (Agg backend: no display needed); and
for every figure, maps included (psa.analysis.maps): `Figure`, `save` and the colours. Every
figure function draws from plain inputs, writes PNG (for the page) and PDF (for a paper), and
returns a `Figure` whose `data` holds exactly what was drawn, so tests check data, not pixels.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # before pyplot: headless, and no GUI backend probing
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from psa.analysis.convergence import BAND_LEVEL, Convergence, condition_order  # noqa: E402
from psa.analysis.harm import ArchHarm  # noqa: E402
from psa.analysis.reference import CellComparison  # noqa: E402
from psa.analysis.results import Curve, Trial, arch_params, is_heterogeneous  # noqa: E402
from psa.analysis.stats import CellSummary  # noqa: E402
from psa.core.arch import N_IN, N_OUT  # noqa: E402
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


def save(fig: plt.Figure, out_dir: Path, name: str) -> list[Path]:
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
    files = save(fig, out_dir, "accuracy_vs_params")
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
        files = save(fig, out_dir, name)
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
    files = save(fig, out_dir, name)
    what = ("our trials (thin), our best trial (bold)"
            + (f", {ref_label} plotted trial (black dashes)" if reference else ""))
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
    files = save(fig, out_dir, "late_breakthroughs")
    return Figure("late_breakthroughs", "Late breakthroughs",
                  f"Histogram of the meta-loop at which each trial reached its peak, per mode, over trials that "
                  f"beat ZeroR by more than {margin:g} points; dashed: median.", files, data)


def compare_scatter(cells: Sequence[CellComparison], alpha: float, out_dir: Path, ref_label: str) -> Figure:
    """Our cell means against the reference's; cells the tests flag at `alpha` in red."""
    fig, ax = plt.subplots(figsize=(7, 7))
    ok = [c for c in cells if c.consistent(alpha)]
    bad = [c for c in cells if c.tested and not c.consistent(alpha)]
    untested = [c for c in cells if not c.tested]  # no p: neither consistent nor different
    ax.plot([0, 100], [0, 100], ls="--", color="#888888", lw=1)
    ax.scatter([c.mean_ref for c in ok], [c.mean_ours for c in ok], s=14, c="#1f77b4", alpha=0.6,
               label=f"consistent at alpha = {alpha:g} ({len(ok)})")
    ax.scatter([c.mean_ref for c in bad], [c.mean_ours for c in bad], s=30, c="#d62728", marker="D",
               label=f"different ({len(bad)})")
    if untested:
        ax.scatter([c.mean_ref for c in untested], [c.mean_ours for c in untested], s=14, c="#888888", marker="x",
                   label=f"untested ({len(untested)})")
    for c in sorted(bad, key=lambda c: c.p)[:10]:
        ax.annotate(f"{c.arch} {c.mode}", (c.mean_ref, c.mean_ours), fontsize=6, xytext=(3, 3),
                    textcoords="offset points")
    ax.set_xlabel(f"{ref_label} mean peak accuracy (%)")
    ax.set_ylabel("our mean peak accuracy (%)")
    ax.set_title("Cell means: ours against the reference")
    ax.legend(loc="upper left", fontsize=8)
    ax.grid(True, ls=":", lw=0.4)
    files = save(fig, out_dir, "compare_means")
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
    files = save(fig, out_dir, "bounty_progress")
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
    files = save(fig, out_dir, "harm_rate")
    return Figure("harm_rate", "Harm rate against size",
                  "Per architecture: mean bounty of the ablative modes minus none's (left, symmetric log scale "
                  "beyond +-1 point) and the share of discarded candidates in the ablative modes (right), against "
                  f"the parameter count; colour: regime ({rules} rules).", files, data)
