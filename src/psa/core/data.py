"""MNIST-format data: find, verify, split and normalise the idx files, once, onto the device.

Look-up order: an explicit directory (`--data-dir` or `PSA_DATA_DIR`), the copy shipped inside
the package, `./dataset/`, then a download from the public mirrors into `./dataset/`.
Every file is verified by the SHA-256 of its decompressed bytes.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import struct
import urllib.request
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from psa.core.checkpoint import atomic_write

FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}

# SHA-256 of the decompressed idx files (NOTES.md); compression differs between mirrors.
SHA256 = {
    "mnist": {
        "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
        "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
        "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
        "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    },
}

MIRRORS = {
    "mnist": [
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        "https://storage.googleapis.com/cvdf-datasets/mnist/",
        "http://yann.lecun.com/exdb/mnist/",
    ],
}

MEAN, STD = 0.1307, 0.3081
SPLIT_SEED = 1337
N_TRAIN, N_VAL = 50_000, 10_000


class DataError(RuntimeError):
    """Missing, unreadable or corrupt data files."""


@dataclass(frozen=True)
class Dataset:
    """The three splits as device tensors: images (N, 784) float32 normalised, labels (N,) int64."""

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    source: str

    @property
    def device(self) -> torch.device:
        """Where the tensors live."""
        return self.train_x.device

    def zero_r(self) -> float:
        """Validation accuracy (%) of always predicting the most frequent validation label."""
        counts = torch.bincount(self.val_y, minlength=10)
        return 100.0 * counts.max().item() / self.val_y.numel()

    def constant_predictor_accuracy(self) -> list[float]:
        """Validation accuracy (%) of a model that always predicts digit d, for d = 0..9."""
        counts = torch.bincount(self.val_y, minlength=10)
        return [100.0 * c / self.val_y.numel() for c in counts.tolist()]


def _read_maybe_gzip(path: Path) -> bytes:
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            return gzip.decompress(raw)
        except (OSError, EOFError) as e:
            raise DataError(f"{path}: corrupt gzip ({e})") from None
    return raw


def _parse_idx(raw: bytes, path: Path) -> np.ndarray:
    if len(raw) < 8:
        raise DataError(f"{path}: too short to be an idx file")
    zero, dtype, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype != 0x08 or ndim not in (1, 3):
        raise DataError(f"{path}: not an idx file of unsigned bytes")
    dims = struct.unpack(">" + "I" * ndim, raw[4 : 4 + 4 * ndim])
    body = raw[4 + 4 * ndim :]
    if len(body) != int(np.prod(dims)):
        raise DataError(f"{path}: header says {dims} but holds {len(body)} bytes")
    return np.frombuffer(body, dtype=np.uint8).reshape(dims)


def _find_file(directory: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (directory / name).is_file():
            return directory / name
    return None


def _complete(directory: Path) -> bool:
    return all(_find_file(directory, stem) for stem in FILES.values())


def shipped_dir(name: str = "mnist") -> Path:
    """The copy of the data set that ships inside the package."""
    return Path(str(resources.files("psa").joinpath(f"datasets/{name}")))


def download(name: str, directory: Path) -> None:
    """Fetch the four idx files from the public mirrors into `directory`, verifying each."""
    directory.mkdir(parents=True, exist_ok=True)
    for stem in FILES.values():
        if _find_file(directory, stem):
            continue
        errors = []
        for mirror in MIRRORS[name]:
            try:
                with urllib.request.urlopen(mirror + stem + ".gz", timeout=30) as r:
                    payload = r.read()
                digest = hashlib.sha256(gzip.decompress(payload)).hexdigest()
                if digest != SHA256[name][stem]:
                    errors.append(f"{mirror}: checksum mismatch")
                    continue
                atomic_write(directory / (stem + ".gz"), payload)
                break
            except (OSError, EOFError) as e:
                errors.append(f"{mirror}: {e}")
        else:
            raise DataError(f"could not download {stem}: " + "; ".join(errors))


def locate(name: str = "mnist", data_dir: str | os.PathLike | None = None) -> Path:
    """Directory holding the four idx files, following the documented look-up order."""
    explicit = data_dir if data_dir is not None else os.environ.get("PSA_DATA_DIR")
    if explicit:
        d = Path(explicit)
        if not d.is_dir():
            raise DataError(f"data directory {d} does not exist")
        if not _complete(d):
            missing = [s for s in FILES.values() if not _find_file(d, s)]
            raise DataError(f"data directory {d} lacks {', '.join(missing)}")
        return d
    for d in (shipped_dir(name), Path("dataset") / name, Path("dataset")):
        if d.is_dir() and _complete(d):
            return d
    target = Path("dataset") / name
    try:
        download(name, target)
    except DataError as e:
        raise DataError(f"no local copy of {name} and the download failed ({e})") from None
    return target


def read_raw(directory: Path, name: str = "mnist") -> dict[str, np.ndarray]:
    """The four idx files of `directory` as uint8 arrays, each checked against its SHA-256."""
    out = {}
    for key, stem in FILES.items():
        path = _find_file(directory, stem)
        if path is None:
            raise DataError(f"{directory}: missing {stem}")
        raw = _read_maybe_gzip(path)
        expected = SHA256.get(name, {}).get(stem)
        if expected and hashlib.sha256(raw).hexdigest() != expected:
            raise DataError(f"{path}: SHA-256 mismatch (corrupt or not the {name} file)")
        out[key] = _parse_idx(raw, path)
    if out["train_images"].shape[0] != out["train_labels"].shape[0] or out["train_images"].shape[0] < N_TRAIN + N_VAL:
        raise DataError(f"{directory}: training images and labels do not match the expected 60,000")
    return out


def split_indices(n: int = N_TRAIN + N_VAL) -> tuple[torch.Tensor, torch.Tensor]:
    """The authors' 50,000/10,000 split: random_split with a generator seeded 1337."""
    train, val = torch.utils.data.random_split(
        range(n), [N_TRAIN, N_VAL], generator=torch.Generator().manual_seed(SPLIT_SEED)
    )
    return torch.tensor(train.indices, dtype=torch.int64), torch.tensor(val.indices, dtype=torch.int64)


def normalise(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, 28, 28) -> float32 (N, 784) as (x / 255 - 0.1307) / 0.3081."""
    x = torch.from_numpy(images.reshape(images.shape[0], -1).astype(np.float32))
    return (x / 255.0 - MEAN) / STD


def load(
    name: str = "mnist",
    data_dir: str | os.PathLike | None = None,
    device: torch.device | str = "cpu",
) -> Dataset:
    """Locate, verify, split and normalise a data set, and move it to `device` once."""
    directory = locate(name, data_dir)
    raw = read_raw(directory, name)
    train_idx, val_idx = split_indices()
    x = normalise(raw["train_images"])
    y = torch.from_numpy(raw["train_labels"].astype(np.int64))
    tx = normalise(raw["test_images"])
    ty = torch.from_numpy(raw["test_labels"].astype(np.int64))
    dev = torch.device(device)
    return Dataset(
        name=name,
        train_x=x[train_idx].to(dev),
        train_y=y[train_idx].to(dev),
        val_x=x[val_idx].to(dev),
        val_y=y[val_idx].to(dev),
        test_x=tx.to(dev),
        test_y=ty.to(dev),
        source=str(directory),
    )
