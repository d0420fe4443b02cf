"""Data sets: find, verify, split and normalise them, once, onto the device.

`load_dataset(spec, device, data_dir)` is the one entry point; `spec` is one of

- `mnist` (the paper's) and `fashion-mnist`: four idx files, shipped inside the package. Look-up
  order: an explicit directory (`--data-dir` or `PSA_DATA_DIR`), the shipped copy, `./dataset/`,
  then a download from the public mirrors into `./dataset/`. Every file is verified by the
  SHA-256 of its decompressed bytes;
- `cifar10`: the official binary release `cifar-10-binary.tar.gz` (never the pickled python
  one), looked up in the explicit directory, `./dataset/cifar10/` and `./dataset/`, checked
  against its published MD5 and read record by record (one label byte, 3,072 pixel bytes);
- `npz:PATH`: a user's own arrays `x_train`, `y_train`, `x_test`, `y_test` (read with
  allow_pickle=False).

Every data set's training part is split by one rule (`split_indices`): a sixth of it, drawn by
a permutation seeded 1337, is the validation split; for MNIST's 60,000 images this is exactly
the authors' 50,000/10,000 split.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import struct
import tarfile
import urllib.request
import zipfile
import zlib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from psa.core.arch import Arch, parse_arch
from psa.core.checkpoint import atomic_write
from psa.core.errors import ConfigError

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
    "fashion-mnist": {
        "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
        "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
        "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
        "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    },
}

MIRRORS = {
    "mnist": [
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        "https://storage.googleapis.com/cvdf-datasets/mnist/",
        "http://yann.lecun.com/exdb/mnist/",
    ],
    "fashion-mnist": ["http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"],
}

# Scalar normalisation (x / 255 - mean) / std. MNIST's are the authors' (NOTES.md);
# Fashion-MNIST's are the mean and standard deviation of the pixels of its 50,000-image
# training split, rounded as MNIST's are (tests/test_datasets.py recomputes them).
NORMALISATION = {"mnist": (0.1307, 0.3081), "fashion-mnist": (0.2863, 0.3532)}
MEAN, STD = NORMALISATION["mnist"]
SPLIT_SEED = 1337
VAL_FRACTION = 6  # one image in six is validation: 10,000 of MNIST's 60,000
N_TRAIN, N_VAL = 50_000, 10_000

IDX_SETS = ("mnist", "fashion-mnist")
NAMED = (*IDX_SETS, "cifar10")

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
CIFAR10_FILE = "cifar-10-binary.tar.gz"
CIFAR10_MD5 = "c32a1d4ab5d03f1284b67883e8d87530"  # published on https://www.cs.toronto.edu/~kriz/cifar.html
CIFAR10_TRAIN = tuple(f"cifar-10-batches-bin/data_batch_{i}.bin" for i in range(1, 6))
CIFAR10_TEST = "cifar-10-batches-bin/test_batch.bin"
CIFAR10_RECORD = 1 + 3 * 32 * 32  # one label byte, then 1,024 red, 1,024 green, 1,024 blue bytes

NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")


class DataError(ConfigError):
    """Missing, unreadable or corrupt data files, or a data set that cannot be named."""


@dataclass(frozen=True)
class Dataset:
    """The three splits as device tensors: inputs (N, n_in) float32 normalised, labels (N,) int64
    in 0..n_classes-1. `checksum` identifies the files it was read from (SHA-256 hex)."""

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    source: str
    checksum: str = ""
    n_classes: int = 10

    @property
    def device(self) -> torch.device:
        """Where the tensors live."""
        return self.train_x.device

    @property
    def n_in(self) -> int:
        """Inputs per example (784 for MNIST, 3,072 for CIFAR-10)."""
        return int(self.train_x.shape[1])

    def arch(self, text: str) -> Arch:
        """`text` ("[2*128, 4*64]") as an Arch with this data set's input size and class count."""
        return parse_arch(text, self.n_in, self.n_classes)

    def zero_r(self) -> float:
        """Validation accuracy (%) of always predicting the most frequent validation label."""
        counts = torch.bincount(self.val_y, minlength=self.n_classes)
        return 100.0 * counts.max().item() / self.val_y.numel()

    def constant_predictor_accuracy(self) -> list[float]:
        """Validation accuracy (%) of a model that always predicts class c, for c = 0..n_classes-1."""
        counts = torch.bincount(self.val_y, minlength=self.n_classes)
        return [100.0 * c / self.val_y.numel() for c in counts.tolist()]


def _read_maybe_gzip(path: Path) -> bytes:
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            return gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise DataError(f"{path}: corrupt gzip (or truncated: {e})") from None
    return raw


def _parse_idx(raw: bytes, path: Path) -> np.ndarray:
    if len(raw) < 8:
        raise DataError(f"{path}: too short to be an idx file")
    zero, dtype, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype != 0x08 or ndim not in (1, 3):
        raise DataError(f"{path}: not an idx file of unsigned bytes")
    if len(raw) < 4 + 4 * ndim:
        raise DataError(f"{path}: idx header cut short")
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
            raise DataError(f"data directory {d} {'is a file, not a directory' if d.exists() else 'does not exist'}")
        if not _complete(d):
            missing = [s for s in FILES.values() if not _find_file(d, s)]
            raise DataError(f"data directory {d} lacks {', '.join(missing)}")
        return d
    # ./dataset/ itself is where psa has always looked for MNIST; other sets have their own folder
    for d in (shipped_dir(name), Path("dataset") / name, *([Path("dataset")] if name == "mnist" else [])):
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


def split_sizes(n: int) -> tuple[int, int]:
    """(training, validation) sizes the split rule gives `n` training examples: n // 6 validation."""
    n_val = n // VAL_FRACTION
    if n_val < 1:
        raise DataError(f"{n} training examples are too few to split off a validation set (at least {VAL_FRACTION})")
    return n - n_val, n_val


def split_indices(n: int = N_TRAIN + N_VAL) -> tuple[torch.Tensor, torch.Tensor]:
    """The split rule: random_split into (n - n // 6, n // 6) with a generator seeded 1337. For
    MNIST's 60,000 images this is the authors' 50,000/10,000 split."""
    train, val = torch.utils.data.random_split(
        range(n), list(split_sizes(n)), generator=torch.Generator().manual_seed(SPLIT_SEED)
    )
    return torch.tensor(train.indices, dtype=torch.int64), torch.tensor(val.indices, dtype=torch.int64)


def normalise(images: np.ndarray, mean: float = MEAN, std: float = STD) -> torch.Tensor:
    """uint8 (N, ...) -> float32 (N, n_in) as (x / 255 - mean) / std (MNIST's by default)."""
    x = torch.from_numpy(images.reshape(images.shape[0], -1).astype(np.float32))
    return (x / 255.0 - mean) / std


def _standardise(x: np.ndarray, train_idx: torch.Tensor) -> tuple[torch.Tensor, float, float]:
    """float32 (N, n_in) standardised by the scalar mean and standard deviation of the training
    split's values (computed in float64); returns the tensor and the two constants."""
    t = x[train_idx.numpy()]
    mean, std = float(t.mean(dtype=np.float64)), float(t.std(dtype=np.float64))
    if not np.isfinite(mean) or not np.isfinite(std) or std == 0.0:
        raise DataError(f"the training inputs have mean {mean} and standard deviation {std}: cannot normalise")
    return (torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)) - mean) / std, mean, std


def _files_checksum(name: str) -> str:
    """One SHA-256 for an idx data set: of its files' SHA-256 lines, sorted by file name."""
    listing = "".join(f"{digest}  {stem}\n" for stem, digest in sorted(SHA256[name].items()))
    return hashlib.sha256(listing.encode()).hexdigest()


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _splits(name: str, x: torch.Tensor, y: torch.Tensor, tx: torch.Tensor, ty: torch.Tensor,
            train_idx: torch.Tensor, val_idx: torch.Tensor, source: str, checksum: str, n_classes: int,
            device: torch.device | str) -> Dataset:
    dev = torch.device(device)
    return Dataset(
        name=name,
        train_x=x[train_idx].to(dev),
        train_y=y[train_idx].to(dev),
        val_x=x[val_idx].to(dev),
        val_y=y[val_idx].to(dev),
        test_x=tx.to(dev),
        test_y=ty.to(dev),
        source=source,
        checksum=checksum,
        n_classes=n_classes,
    )


def load(
    name: str = "mnist",
    data_dir: str | os.PathLike | None = None,
    device: torch.device | str = "cpu",
) -> Dataset:
    """Locate, verify, split and normalise a data set, and move it to `device` once (the
    arguments of `load_dataset` in the order psa has always called this)."""
    return load_dataset(name, device, data_dir)


def check_spec(spec: str) -> str:
    """`spec` if it names a data set psa can load ("mnist", "fashion-mnist", "cifar10",
    "npz:PATH"), else DataError. Does not read any file."""
    if not isinstance(spec, str):
        raise DataError(f"a data set is named by a string, got {spec!r}")
    if spec in NAMED:
        return spec
    if spec.startswith("npz:"):
        if not spec[4:].strip():
            raise DataError("npz: needs a file, e.g. npz:data/mine.npz")
        return spec
    raise DataError(f"unknown data set {spec!r} (available: {', '.join(NAMED)}, npz:PATH)")


def load_dataset(
    spec: str,
    device: torch.device | str = "cpu",
    data_dir: str | os.PathLike | None = None,
) -> Dataset:
    """The data set `spec` names ("mnist", "fashion-mnist", "cifar10" or "npz:PATH"), verified,
    split by the split rule, normalised and on `device`. `data_dir` overrides where the named
    sets are looked for (else $PSA_DATA_DIR); npz:PATH names its file itself."""
    check_spec(spec)
    if spec in IDX_SETS:
        return _load_idx(spec, data_dir, device)
    if spec == "cifar10":
        return load_cifar10(locate_cifar10(data_dir), device)
    return load_npz(Path(spec[4:]), device, name=spec)


def _load_idx(name: str, data_dir: str | os.PathLike | None, device: torch.device | str) -> Dataset:
    directory = locate(name, data_dir)
    raw = read_raw(directory, name)
    train_idx, val_idx = split_indices()
    mean, std = NORMALISATION[name]
    x = normalise(raw["train_images"], mean, std)
    y = torch.from_numpy(raw["train_labels"].astype(np.int64))
    tx = normalise(raw["test_images"], mean, std)
    ty = torch.from_numpy(raw["test_labels"].astype(np.int64))
    return _splits(name, x, y, tx, ty, train_idx, val_idx, str(directory), _files_checksum(name), 10, device)


# ---------------------------------------------------------------------------------------------
# CIFAR-10, binary release


def locate_cifar10(data_dir: str | os.PathLike | None = None) -> Path:
    """The path of `cifar-10-binary.tar.gz`: in (or as) the explicit directory, else in
    ./dataset/cifar10/ or ./dataset/. Nothing is downloaded."""
    explicit = data_dir if data_dir is not None else os.environ.get("PSA_DATA_DIR")
    places = [Path(explicit)] if explicit else [Path("dataset") / "cifar10", Path("dataset")]
    for d in places:
        if d.is_file() and d.name.endswith(".tar.gz"):
            return d
        if (d / CIFAR10_FILE).is_file():
            return d / CIFAR10_FILE
    where = " or ".join(str(d / CIFAR10_FILE) for d in places)
    raise DataError(f"no CIFAR-10: download {CIFAR10_URL} (162 MB, MD5 {CIFAR10_MD5}) and put it at {where}"
                    + ("" if explicit else " (or pass --data-dir DIR)"))


def _cifar_records(raw: bytes, member: str, path: Path) -> tuple[np.ndarray, np.ndarray]:
    if not raw or len(raw) % CIFAR10_RECORD:
        raise DataError(f"{path}: {member} holds {len(raw)} bytes, not whole records of {CIFAR10_RECORD} "
                        "(truncated or not the binary release)")
    rec = np.frombuffer(raw, dtype=np.uint8).reshape(-1, CIFAR10_RECORD)
    labels = rec[:, 0].astype(np.int64)
    if labels.max() > 9:
        raise DataError(f"{path}: {member} has label {labels.max()}; CIFAR-10's are 0..9")
    return rec[:, 1:], labels


def read_cifar10(path: Path, md5: str | None = CIFAR10_MD5) -> dict[str, np.ndarray]:
    """The binary release's five training batches (concatenated, in order) and its test batch as
    uint8 pixels (N, 3072: red, green, blue planes) and int64 labels. The archive must have MD5
    `md5`: the published one unless a caller (the tests' small fixtures) names another."""
    try:
        payload = path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror}") from None
    if md5 is not None and hashlib.md5(payload).hexdigest() != md5:
        raise DataError(f"{path}: MD5 {hashlib.md5(payload).hexdigest()} is not the published {md5} "
                        f"(corrupt, truncated or not {CIFAR10_FILE})")
    parts: dict[str, bytes] = {}
    try:
        with tarfile.open(fileobj=io.BytesIO(payload), mode="r:gz") as tar:
            for member in (*CIFAR10_TRAIN, CIFAR10_TEST):
                try:
                    info = tar.getmember(member)
                except KeyError:
                    raise DataError(f"{path}: no {member} in the archive (not the binary release?)") from None
                f = tar.extractfile(info) if info.isfile() else None
                if f is None:
                    raise DataError(f"{path}: {member} is not a regular file")
                parts[member] = f.read()
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
        raise DataError(f"{path}: not a readable .tar.gz ({e})") from None
    train = [_cifar_records(parts[m], m, path) for m in CIFAR10_TRAIN]
    test_x, test_y = _cifar_records(parts[CIFAR10_TEST], CIFAR10_TEST, path)
    return {"train_images": np.concatenate([t[0] for t in train]),
            "train_labels": np.concatenate([t[1] for t in train]),
            "test_images": test_x, "test_labels": test_y}


def load_cifar10(path: Path, device: torch.device | str = "cpu", md5: str | None = CIFAR10_MD5) -> Dataset:
    """CIFAR-10 from its binary release at `path`: 3,072 inputs, 10 classes, split by the rule
    (41,667/8,333 of the 50,000), standardised by its training split's pixel mean and std."""
    raw = read_cifar10(path, md5)
    train_idx, val_idx = split_indices(raw["train_images"].shape[0])
    x, mean, std = _standardise(raw["train_images"].astype(np.float32) / 255.0, train_idx)
    tx = (torch.from_numpy(raw["test_images"].astype(np.float32) / 255.0) - mean) / std
    return _splits("cifar10", x, torch.from_numpy(raw["train_labels"]), tx, torch.from_numpy(raw["test_labels"]),
                   train_idx, val_idx, str(path), _sha256_file(path), 10, device)


# ---------------------------------------------------------------------------------------------
# A user's own arrays


def read_npz(path: Path) -> dict[str, np.ndarray]:
    """x_train, y_train, x_test, y_test from an .npz file, checked: inputs numeric and finite,
    flattened to (N, n_in) alike; labels integers in 0..C-1, one per input."""
    if path.is_file() and not zipfile.is_zipfile(path):
        # np.load would read it as a pickle and suggest allow_pickle, which psa never uses
        raise DataError(f"{path}: not a readable .npz file (no zip archive of arrays, as numpy.savez writes)")
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in NPZ_KEYS if k not in z.files]
            if missing:
                raise DataError(f"{path}: missing array {missing[0]} (an npz data set holds {', '.join(NPZ_KEYS)})")
            arrays = {k: z[k] for k in NPZ_KEYS}
    except FileNotFoundError:
        raise DataError(f"no npz file {path}") from None
    except ValueError as e:
        if "pickle" in str(e):  # an object array: loading it means unpickling
            raise DataError(f"{path}: holds object (pickled) arrays, which psa never loads; save plain numeric "
                            f"arrays") from None
        raise DataError(f"{path}: not a readable .npz of plain arrays ({str(e).splitlines()[0]})") from None
    except (OSError, EOFError, zipfile.BadZipFile, zlib.error) as e:
        raise DataError(f"{path}: not a readable .npz of plain arrays ({str(e).splitlines()[0]})") from None
    out = {}
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if x.dtype.kind not in "biuf":
            raise DataError(f"{path}: x_{split} has dtype {x.dtype}; inputs must be numbers")
        if y.dtype.kind not in "iu":
            raise DataError(f"{path}: y_{split} has dtype {y.dtype}; labels must be integers 0..C-1")
        if x.ndim < 2 or x.shape[0] == 0 or int(np.prod(x.shape[1:])) == 0:
            raise DataError(f"{path}: x_{split} has shape {x.shape}; expected (N, features...) with N >= 1")
        if y.ndim != 1 or y.shape[0] != x.shape[0]:
            raise DataError(f"{path}: y_{split} has shape {y.shape} for {x.shape[0]} inputs; expected ({x.shape[0]},)")
        x = x.reshape(x.shape[0], -1).astype(np.float32)
        if not np.isfinite(x).all():
            raise DataError(f"{path}: x_{split} holds NaN or infinite values")
        if y.min() < 0:
            raise DataError(f"{path}: y_{split} has label {y.min()}; labels must be 0..C-1")
        out[f"x_{split}"], out[f"y_{split}"] = x, y.astype(np.int64)
    if out["x_train"].shape[1] != out["x_test"].shape[1]:
        raise DataError(f"{path}: x_train has {out['x_train'].shape[1]} features per example, "
                        f"x_test {out['x_test'].shape[1]}")
    labels = np.union1d(out["y_train"], out["y_test"])
    if labels.size < 2:  # all 1s would make C = 2 with one class never seen: as useless as all 0s
        raise DataError(f"{path}: every label is {int(labels[0])}; a classifier needs at least two classes")
    return out


def load_npz(path: Path, device: torch.device | str = "cpu", name: str | None = None) -> Dataset:
    """A user's data set from an .npz file: the split rule on its training part, inputs
    standardised by the training split's scalar mean and std, C = the largest label + 1."""
    arrays = read_npz(path)
    train_idx, val_idx = split_indices(arrays["x_train"].shape[0])
    x, mean, std = _standardise(arrays["x_train"], train_idx)
    tx = (torch.from_numpy(arrays["x_test"]) - mean) / std
    n_classes = int(max(arrays["y_train"].max(), arrays["y_test"].max())) + 1
    return _splits(name or f"npz:{path}", x, torch.from_numpy(arrays["y_train"]), tx,
                   torch.from_numpy(arrays["y_test"]), train_idx, val_idx, str(path), _sha256_file(path),
                   n_classes, device)


def dataset_shape(spec: str, data_dir: str | os.PathLike | None = None) -> tuple[int, int]:
    """(inputs, classes) of a data set: known for the named ones, read from the file for npz."""
    check_spec(spec)
    if spec in IDX_SETS:
        return 784, 10
    if spec == "cifar10":
        return CIFAR10_RECORD - 1, 10
    d = load_npz(Path(spec[4:]), "cpu", spec)
    return d.n_in, d.n_classes
