"""MNIST files: look-up order, checksums, the authors' split and normalisation."""

from __future__ import annotations

import gzip
import shutil

import pytest
import torch

from psa.core import data as D

from .tolerance import assert_close, bound


def test_split_sizes_and_zero_r(mnist):
    assert mnist.train_x.shape == (50_000, 784) and mnist.val_x.shape == (10_000, 784)
    assert mnist.test_x.shape == (10_000, 784)
    assert torch.bincount(mnist.val_y, minlength=10).tolist() == [973, 1102, 1012, 1010, 984, 865, 1009, 1092, 981, 972]
    assert mnist.zero_r() == pytest.approx(11.02)
    assert [round(a, 2) for a in mnist.constant_predictor_accuracy()] == [
        9.73, 11.02, 10.12, 10.10, 9.84, 8.65, 10.09, 10.92, 9.81, 9.72]


def test_split_is_disjoint_and_covers_training_set():
    train, val = D.split_indices()
    both = torch.cat([train, val])
    assert torch.equal(torch.sort(both).values, torch.arange(60_000))


@pytest.mark.numeric
def test_normalisation(mnist):
    # (x/255 - 0.1307)/0.3081: pixel 0 maps to -0.4242, pixel 255 to 2.8215
    # against float64: float32 rounds x / 255, the subtraction, the division and the two
    # constants themselves (tests/tolerance.py, relative to each value)
    tol = bound(5, ops="/255, -mean, /std, mean and std in float32")
    for what, got, pixel in (("pixel 0", mnist.train_x.min(), 0.0), ("pixel 255", mnist.train_x.max(), 1.0)):
        assert_close(what, got, torch.tensor((pixel - 0.1307) / 0.3081, dtype=torch.float64), tol)
    assert mnist.train_x.dtype == torch.float32


def test_shipped_copy_is_found_first_without_overrides(monkeypatch, tmp_path):
    monkeypatch.delenv("PSA_DATA_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    assert D.locate("mnist") == D.shipped_dir("mnist")


def test_raw_uncompressed_files_and_env_dir(monkeypatch, tmp_path):
    for stem in D.FILES.values():
        (tmp_path / stem).write_bytes(gzip.decompress((D.shipped_dir() / (stem + ".gz")).read_bytes()))
    monkeypatch.setenv("PSA_DATA_DIR", str(tmp_path))
    ds = D.load()
    assert ds.source == str(tmp_path)
    assert ds.zero_r() == pytest.approx(11.02)


def test_checksum_mismatch_is_reported(tmp_path):
    for stem in D.FILES.values():
        shutil.copy(D.shipped_dir() / (stem + ".gz"), tmp_path / (stem + ".gz"))
    raw = bytearray(gzip.decompress((tmp_path / "t10k-labels-idx1-ubyte.gz").read_bytes()))
    raw[100] = (raw[100] + 1) % 10
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(bytes(raw)))
    with pytest.raises(D.DataError, match="SHA-256 mismatch"):
        D.load(data_dir=tmp_path)


def test_corrupt_gzip_and_missing_files(tmp_path):
    with pytest.raises(D.DataError, match="does not exist"):
        D.load(data_dir=tmp_path / "nope")
    with pytest.raises(D.DataError, match="lacks"):
        D.load(data_dir=tmp_path)
    for stem in D.FILES.values():
        shutil.copy(D.shipped_dir() / (stem + ".gz"), tmp_path / (stem + ".gz"))
    (tmp_path / "train-labels-idx1-ubyte.gz").write_bytes(b"\x1f\x8b\x08garbage")
    with pytest.raises(D.DataError, match="corrupt gzip"):
        D.load(data_dir=tmp_path)


def test_download_from_mirrors_verifies_and_falls_through(monkeypatch, tmp_path):
    """The real download code, served from file:// mirrors: a corrupt mirror is skipped."""
    corrupt = tmp_path / "corrupt-mirror"
    corrupt.mkdir()
    for stem in D.FILES.values():
        (corrupt / (stem + ".gz")).write_bytes(gzip.compress(b"not mnist"))
    good = D.shipped_dir()
    monkeypatch.setitem(D.MIRRORS, "mnist", [(tmp_path / "missing").as_uri() + "/", corrupt.as_uri() + "/", good.as_uri() + "/"])
    target = tmp_path / "dataset"
    D.download("mnist", target)
    assert sorted(p.name for p in target.iterdir()) == sorted(s + ".gz" for s in D.FILES.values())
    assert D.read_raw(target)["train_images"].shape == (60_000, 28, 28)
    monkeypatch.setitem(D.MIRRORS, "mnist", [corrupt.as_uri() + "/"])
    with pytest.raises(D.DataError, match="checksum mismatch"):
        D.download("mnist", tmp_path / "again")
    assert not any((tmp_path / "again").iterdir())
