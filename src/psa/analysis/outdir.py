"""The report's output directory: built in a temporary sibling and swapped in whole.

A crash or Ctrl-C leaves either the previous report or none, never half of one. A directory
that holds something other than a psa report is never overwritten.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from psa.analysis.results import ReportError
from psa.analysis.table import Table, csv_value

# its presence marks a directory as a psa report, which a new report may replace
MANIFEST = "manifest.json"
# what a report or comparison writes: a new one replaces a directory holding only these, so
# that nothing else kept there (an export, a database, notes) goes with the old report
REPORT_FILES = (MANIFEST, "index.html", "verdict.txt")
REPORT_DIRS = {"tables": (".md", ".csv", ".tex"), "figures": (".json", ".png", ".pdf")}


def foreign_entries(report: Path) -> list[str]:
    """What in the directory of an earlier report no report wrote, as paths relative to it."""
    found = []
    for entry in sorted(report.iterdir()):
        if entry.name in REPORT_FILES and entry.is_file():
            continue
        if entry.name in REPORT_DIRS and entry.is_dir():
            found += [f"{entry.name}/{f.name}" for f in sorted(entry.iterdir())
                      if not (f.is_file() and f.suffix in REPORT_DIRS[entry.name])]
            continue
        found.append(entry.name + ("/" if entry.is_dir() else ""))
    return found


class OutputDir:
    """A temporary directory beside `target`, swapped in by `commit()`."""

    def __init__(self, target: str | Path):
        where = Path(os.path.abspath(target))
        if where == Path.cwd() or where in Path.cwd().parents:
            # swapping it would pull the directory out from under this process and its shell
            raise ReportError(f"--out {str(target) or '(empty)'} is the current directory or one above it; give the "
                              "report a directory of its own, e.g. --out report/")
        # ".." and "x/.." have no name to build the temporary sibling's from: spelled out
        self.target = where if Path(target).name in ("", "..") else Path(target)
        if self.target.exists():
            if not self.target.is_dir():
                raise ReportError(f"{self.target} exists and is not a directory")
            if any(self.target.iterdir()) and not (self.target / MANIFEST).is_file():
                raise ReportError(f"{self.target} exists and is not a psa report (no {MANIFEST}); "
                                  "choose another --out or remove it")
            foreign = foreign_entries(self.target) if self.target.is_dir() else []
            if foreign:  # the old report is replaced whole: these would be deleted with it
                more = f" and {len(foreign) - 3} more" if len(foreign) > 3 else ""
                raise ReportError(f"{self.target} holds a psa report and files no report writes "
                                  f"({', '.join(foreign[:3])}{more}), which replacing the report would delete; "
                                  "move them or choose another --out")
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
        w.writerow({k: csv_value(v) if v is not None else "" for k, v in r.items()})
    out.write(rel, buf.getvalue())



def write_figure_data(out: OutputDir, name: str, data: dict) -> None:
    """What a figure drew, as figures/NAME.json: to re-plot it elsewhere, and what the tests check."""
    out.write(f"figures/{name}.json", json.dumps(data, indent=1, default=_json_default))


def _json_default(o: object) -> object:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
