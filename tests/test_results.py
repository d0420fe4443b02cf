"""Loading a study in `psa.analysis.results`."""

from __future__ import annotations

import numpy as np

from psa.analysis.results import missing_report


def test_published_data_is_complete(published_data):
    data, summ = published_data
    assert len(data.trials) == 5880 and len(summ) == 588 and len(data.archs) == 98
    assert missing_report(data) == []



def test_diverged_share_reads_the_recorded_flags_not_missing_accuracies() -> None:
    """Under the default rule a diverged candidate has a real (constant-prediction) accuracy:
    the report's diverged share must come from the rows' flags, and from missing accuracies only
    where no flags exist (the published curves)."""
    from psa.analysis.results import Curve, _curves
    from psa.analysis.tables import _diverged_share

    rows = [(1, 1, 9.8, 9.8, 1, 1), (1, 2, 9.8, 9.8, 0, 1), (1, 3, 9.8, 9.8, 0, 1), (1, 4, 9.8, 9.8, 0, 1),
            (2, 1, 90.0, 90.0, 1, 0), (2, 2, 91.0, 91.0, 1, 0), (2, 3, 90.5, 91.0, 0, 0), (2, 4, 92.0, 92.0, 1, 0)]
    curves = _curves(rows, {1: ("1*8", "none", 1), 2: ("1*8", "none", 2)})
    assert list(curves[("1*8", "none", 1)].diverged) == [True] * 4
    assert _diverged_share(list(curves.values()), 4) == 0.5
    published = Curve(np.array([50.0, np.nan, 60.0, 61.0]), np.array([50.0, 50.0, 60.0, 61.0]),
                      np.array([True, False, True, True]))
    assert _diverged_share([published], 4) == 0.25
