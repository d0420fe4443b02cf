"""Loading a study in `psa.analysis.results`."""

from __future__ import annotations

from psa.analysis.results import missing_report


def test_published_data_is_complete(published_data):
    data, summ = published_data
    assert len(data.trials) == 5880 and len(summ) == 588 and len(data.archs) == 98
    assert missing_report(data) == []

