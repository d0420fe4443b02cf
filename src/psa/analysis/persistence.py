"""Whether an ablation persists, in a report of a study of your own models: the verdicts a
module study stored with its plan (psa.study.modules: `plan.modules[<factory>].units`, the rows
of psa.core.module.units.ModelSpec.summary_rows), read from the database without importing the
factories, and drawn as one table of unit layers.

A reader needs it to tell which results were real ablations: where an ablation regrows,
training brings the zeroed weights back within the epoch, so a `hidden` (or `full`) result on
that layer measures a brief perturbation, not a removed unit.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from psa.analysis.table import Table

# the columns a stored row must have; a study from another psa version may store more
ROW_KEYS = ("layer", "kind", "units", "role", "full", "hidden", "output", "why")
VERDICT_MODES = ("full", "hidden", "output")
TABLE_NOTES = [
    "persists: the ablated unit's zeroed weights get exactly zero gradient and stay zero under AdamW, "
    "so the unit stays removed;",
    "regrows: training sends them a gradient (no ReLU between the unit and a reader, a skip sum, a norm "
    "over several units, the logits) and they come back: an ablation there is a brief perturbation; where the "
    "why says that only the shift of the unit's norm regrows, the unit comes back as a constant, not as a feature;",
    "cannot tell: psa could not follow the model's graph there (torch.fx); an empty cell: the mode never "
    "ablates that layer.",
]


def stored_unit_layers(design_text: str | None, models: Sequence[str]) -> tuple[dict[str, list[dict[str, Any]]],
                                                                               list[str]]:
    """The persistence rows each factory of `models` stored in the study's design JSON (its
    plan), and one note naming the factories that stored none (studies created before psa
    recorded the verdicts) or whose rows are not readable; `design_text` None: exported rows,
    which carry no plan."""
    try:
        d = json.loads(design_text) if design_text else {}
    except ValueError:
        d = {}
    plan = d.get("plan") if isinstance(d, dict) else None
    built = plan.get("modules") if isinstance(plan, dict) else None
    out: dict[str, list[dict[str, Any]]] = {}
    lacking = []
    for m in models:
        entry = built.get(m) if isinstance(built, dict) else None
        rows = entry.get("units") if isinstance(entry, dict) else None
        if isinstance(rows, list) and rows and all(isinstance(r, dict) and set(ROW_KEYS) <= set(r) for r in rows):
            out[m] = [{k: r[k] for k in ROW_KEYS} for r in rows]
        else:
            lacking.append(m)
    notes = []
    if lacking and design_text is None:  # exported rows: the plan stayed in the database
        notes.append(f"an export does not carry the study's plan, where the persistence verdicts of "
                     f"{', '.join(lacking)} are: report from the database for its unit_layers table")
    elif lacking:
        # re-importing the factories would run code from the report: say what is missing instead
        notes.append(f"the study stored no persistence verdicts for {', '.join(lacking)} (created before psa "
                     f"recorded them): whether its ablations persist is not in this report; `psa study` on that "
                     f"factory prints them")
    return out, notes


def table_unit_layers(units: dict[str, list[dict[str, Any]]], models: Sequence[str]) -> Table:
    """One row per unit layer of each model: its kind and units, and whether an ablation there
    persists in each ablative mode, and why."""
    rows, raw = [], []
    for m in models:
        for r in units.get(m, []):
            rows.append([m, str(r["layer"]), str(r["kind"]), str(r["units"]), str(r["role"]),
                         *(str(r[k]) for k in VERDICT_MODES), str(r["why"])])
            raw.append({"model": m, **r})
    return Table("unit_layers", "Unit layers: does an ablation persist?",
                 ["Model", "Layer", "Kind", "Units", "Role", "full", "hidden", "output", "Why"], rows,
                 notes=list(TABLE_NOTES), raw=raw)
