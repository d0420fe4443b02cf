"""Shared fixtures: the real MNIST split (loaded once) and small slices of it for fast engine tests."""

from __future__ import annotations

import pytest
import torch

from psa import data as psa_data


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
