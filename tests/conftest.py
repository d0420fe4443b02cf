"""Shared fixtures: the real MNIST split (loaded once), small slices of it for fast engine tests,
and the published report and comparison, each built once per session."""

from __future__ import annotations

import contextlib
import io
import os

import pytest
import torch

# Without a GPU, the Triton kernels run in Triton's interpreter. It is chosen when a kernel
# is decorated, so the variable must be set before psa.kernels is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from psa.core import data as psa_data
from psa.analysis.results import load_published
from psa.analysis.stats import summaries

from .report_helpers import make_db


@pytest.fixture(scope="session")
def mnist() -> psa_data.Dataset:
    """The real MNIST split on the CPU."""
    return psa_data.load("mnist", device="cpu")


def subset(ds: psa_data.Dataset, n_train: int, n_val: int = 2000, n_test: int = 1000) -> psa_data.Dataset:
    """The first rows of each split: same format, fewer images, for tests of engine semantics."""
    return psa_data.Dataset(
        name=ds.name,
        train_x=ds.train_x[:n_train].clone(),
        train_y=ds.train_y[:n_train].clone(),
        val_x=ds.val_x[:n_val].clone(),
        val_y=ds.val_y[:n_val].clone(),
        test_x=ds.test_x[:n_test].clone(),
        test_y=ds.test_y[:n_test].clone(),
        source=ds.source,
    )


@pytest.fixture(scope="session")
def small(mnist: psa_data.Dataset) -> psa_data.Dataset:
    """2,048 training images: 64 steps of 32 per epoch."""
    return subset(mnist, 2048)


@pytest.fixture(autouse=True)
def _fixed_threads():
    # kernels may pick different reduction orders for different thread counts
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


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


@pytest.fixture(scope="session")
def published_data():
    """The authors' published data and its cell summaries: (StudyData, {(arch, mode): CellSummary})."""
    data = load_published()
    return data, summaries(data.trials)


@pytest.fixture(scope="session")
def full_db(tmp_path_factory):
    """A complete study of five architectures holding their published peaks: (path, what was written)."""
    path = tmp_path_factory.mktemp("db") / "psa.sqlite"
    written = make_db(path, ["1*2048", "1*32", "4*4", "18*18", "21*21"], loops=20)
    return path, written
