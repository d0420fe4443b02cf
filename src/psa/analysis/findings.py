"""Everything computed from one study, shared by the report's tables, figures and page."""

from __future__ import annotations

from dataclasses import dataclass, field

from psa.analysis.regimes import RULE_SETS, ClassifierConfig, Regime, classify_all
from psa.analysis.results import StudyData, missing_report
from psa.analysis.stats import (
    CellSummary,
    Comparison,
    StatsConfig,
    ablation_effects,
    paired_comparisons,
    summaries,
    variant_comparisons,
)


@dataclass
class Analysis:
    """A study with its summaries, both rule sets' regimes, the paired tests and what is missing."""

    data: StudyData
    zero_r: float
    zero_r_source: str
    archs: list[str]
    summ: dict[tuple[str, str], CellSummary]
    regimes: dict[str, dict[str, Regime]]  # rules -> {arch: Regime}
    comparisons: list[Comparison]
    effects: dict[str, dict]
    missing: list[str]
    variants: list[Comparison] = field(default_factory=list)  # engine variants against the paper's engine


def analyse(data: StudyData, zero_r: float, zero_r_source: str, alpha: float = 0.05, n_boot: int = 10_000,
            seed: int = 0, escape_margin: float = 0.5) -> Analysis:
    """Summaries, both rule sets' regimes, the paired tests and the ablation effects."""
    archs = data.archs
    summ = summaries(data.trials)
    cfg = ClassifierConfig(zero_r=zero_r)
    regimes = {r: classify_all(summ, archs, cfg, r, data.design.trials or None) for r in RULE_SETS}
    scfg = StatsConfig(alpha=alpha, n_boot=n_boot, seed=seed, zero_r=zero_r, escape_margin=escape_margin)
    comps = paired_comparisons(data.trials, archs, scfg)
    return Analysis(data, zero_r, zero_r_source, archs, summ, regimes, comps, ablation_effects(comps),
                    missing_report(data), variant_comparisons(data.trials, archs, data.design.modes, scfg))
