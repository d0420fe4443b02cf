"""Reading a study: results, statistics, regimes, tables, figures, and the report and comparison.

Modules, lowest first: results (trials and curves from the store or the published data), stats
(ZeroR, summaries, paired tests), regimes (the classifier), reference (cells against a
reference), findings (everything computed for a report), tables, figures (`Figure` and the
curves), maps (the depth x width maps), outdir, page, and the two commands' builds: report
and compare.
"""

from psa.analysis.results import ReportError, StudyData, Trial, load_db, load_published

__all__ = ["ReportError", "StudyData", "Trial", "load_db", "load_published"]
