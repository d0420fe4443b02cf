"""A report table: display rows and unrounded records, rendered as Markdown, CSV, LaTeX and
HTML, and the number formats the tables share."""

from __future__ import annotations

import csv
import html
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass, field


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
                w.writerow({k: csv_value(v) for k, v in r.items()})
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
        return (f"% {self.title}\n{notes}\\begin{{table}}[htbp]\n\\centering\n"
                f"\\caption{{{_tex(self.title)}}}\\label{{{label}}}\n"
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


# LaTeX's special characters, and what pdflatex's default input encoding has no glyph for (as
# math, or in ASCII); one character at a time, so no replacement is escaped again
_TEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
        "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "<": r"\textless{}",
        ">": r"\textgreater{}", "±": r"$\pm$", "≤": r"$\le$", "≥": r"$\ge$", "−": "-", "Δ": r"$\Delta$",
        "α": r"$\alpha$", "ρ": r"$\rho$", "×": r"$\times$", "→": r"$\to$", "…": r"\ldots{}"}


def _tex(s: object) -> str:
    """A cell or header as LaTeX text."""
    s = "".join(_TEX.get(c, c) for c in str(s))
    # after a row's \\, "[" would open its optional argument: "[2*16, 1*8]" as a length
    return "{}" + s if s.startswith("[") else s


def csv_value(v: object) -> object:
    """A CSV cell: NaN as an empty cell, anything else as it is."""
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
