"""Session fixtures of the report tests: the published report and comparison, built once."""

from __future__ import annotations

import contextlib
import io

import pytest


@pytest.fixture(scope="session")
def published_report(tmp_path_factory):
    """`psa report --reference published` run once for the whole session: (out dir, stdout)."""
    from psa.cli import main

    out = tmp_path_factory.mktemp("pub") / "report"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(["report", "--reference", "published", "--out", str(out)])
    assert rc == 0
    return out, buf.getvalue()


@pytest.fixture(scope="session")
def published_compare(tmp_path_factory):
    """`psa compare --published --reference seed` run once for the session: (out dir, stdout)."""
    from psa.cli import main

    out = tmp_path_factory.mktemp("cmp") / "compare"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(["compare", "--published", "--reference", "seed", "--out", str(out)])
    assert rc == 0
    return out, buf.getvalue()
