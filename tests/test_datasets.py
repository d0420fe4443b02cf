"""Data sets beyond MNIST: Fashion-MNIST (shipped), CIFAR-10's binary release (written fixtures),
a user's npz; the split rule; input size and class count flowing into the nets; and every
broken file as one line and exit status 2."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from psa.core import data as D
from psa.core.mlp.engine import Engine

from . import oracle
from .conftest import ENGINE_HP, fresh_seed, one_line_error, population, run_main
from .tolerance import assert_close, bound, epoch_steps, training_bound

# ---- the split rule -------------------------------------------------------------------------


def test_split_rule_gives_mnist_the_authors_split_and_others_a_sixth():
    assert D.split_sizes(60_000) == (50_000, 10_000)
    assert D.split_sizes(50_000) == (41_667, 8_333)
    assert D.split_sizes(6) == (5, 1)
    with pytest.raises(D.DataError, match="too few"):
        D.split_sizes(5)
    # the rule is torch's random_split seeded 1337, the authors' call for MNIST
    g = torch.Generator().manual_seed(1337)
    perm = torch.randperm(60_000, generator=g)
    train, val = D.split_indices(60_000)
    assert torch.equal(train, perm[:50_000]) and torch.equal(val, perm[50_000:])
    train, val = D.split_indices(120)
    assert (len(train), len(val)) == (100, 20)
    assert torch.equal(torch.sort(torch.cat([train, val])).values, torch.arange(120))


# ---- Fashion-MNIST, shipped -----------------------------------------------------------------


def test_fashion_mnist_ships_verified_and_splits_like_mnist():
    shipped = D.shipped_dir("fashion-mnist")
    sums = dict(line.split()[::-1] for line in (shipped / "SHA256SUMS.raw").read_text().splitlines())
    for stem, digest in sums.items():
        assert hashlib.sha256(gzip.decompress((shipped / (stem + ".gz")).read_bytes())).hexdigest() == digest
        assert D.SHA256["fashion-mnist"][stem] == digest
    ds = D.load_dataset("fashion-mnist")
    assert (ds.n_in, ds.n_classes) == (784, 10)
    assert ds.train_x.shape == (50_000, 784) and ds.val_x.shape == (10_000, 784) and ds.test_x.shape == (10_000, 784)
    assert ds.source == str(shipped)
    # its validation ZeroR (docs/datasets.md): class 1 (trouser), 1,031 of 10,000
    assert torch.bincount(ds.val_y, minlength=10).tolist() == [996, 1031, 1002, 1008, 990, 1009, 1019, 983, 988, 974]
    assert ds.zero_r() == pytest.approx(10.31)
    assert ds.checksum != D.load_dataset("mnist").checksum


def test_fashion_mnist_normalisation_constants_are_its_training_splits():
    raw = D.read_raw(D.shipped_dir("fashion-mnist"), "fashion-mnist")
    train, _ = D.split_indices()
    pixels = raw["train_images"].reshape(60_000, -1)[train.numpy()].astype(np.float64) / 255.0
    assert D.NORMALISATION["fashion-mnist"] == (round(pixels.mean(), 4), round(pixels.std(), 4))


def test_fashion_mnist_files_are_checked_against_its_own_sums(tmp_path):
    for stem in D.FILES.values():
        shutil.copy(D.shipped_dir("mnist") / (stem + ".gz"), tmp_path / (stem + ".gz"))
    with pytest.raises(D.DataError, match="SHA-256 mismatch .*fashion-mnist"):
        D.load_dataset("fashion-mnist", data_dir=tmp_path)


# ---- idx files: every way to be broken -------------------------------------------------------


def _idx_copy(tmp_path: Path) -> Path:
    d = tmp_path / "idx"
    d.mkdir()
    for stem in D.FILES.values():
        shutil.copy(D.shipped_dir("mnist") / (stem + ".gz"), d / (stem + ".gz"))
    return d


@pytest.mark.parametrize("stem, damage, message", [
    ("t10k-labels-idx1-ubyte", lambda raw: raw[: len(raw) // 2], "corrupt gzip"),  # a gz cut short
    ("t10k-labels-idx1-ubyte", lambda raw: gzip.compress(gzip.decompress(raw)[:-7]), "header says"),  # idx cut short
    ("t10k-labels-idx1-ubyte", lambda raw: gzip.compress(b"\x00\x00\x09\x01" + gzip.decompress(raw)[4:]),
     "not an idx file"),  # wrong magic
    ("t10k-labels-idx1-ubyte", lambda raw: gzip.compress(gzip.decompress(raw)[:6]), "too short"),
    ("t10k-images-idx3-ubyte", lambda raw: gzip.compress(gzip.decompress(raw)[:10]), "header cut short"),
])
def test_broken_idx_files_are_one_line_and_exit_2(tmp_path, stem, damage, message):
    d = _idx_copy(tmp_path)
    path = d / (stem + ".gz")
    path.write_bytes(damage(path.read_bytes()))
    if message in ("header says", "not an idx file", "too short", "header cut short"):
        # the contents changed, so the checksum catches them first; the parser on its own:
        with pytest.raises(D.DataError, match=message):
            D._parse_idx(D._read_maybe_gzip(path), path)
        message = "SHA-256 mismatch"
    rc, _, err = run_main(["train", "--arch", "1*4", "--meta-loops", "1", "--data-dir", str(d),
                           "--out", str(tmp_path / "run")])
    assert rc == 2
    assert message in one_line_error(err)


# ---- CIFAR-10, binary release: written fixtures -------------------------------------------------


def write_cifar(path: Path, per_batch: int = 12, n_test: int = 6, seed: int = 0,
                cut: dict[str, int] | None = None, leave_out: str | None = None, label: int | None = None) -> bytes:
    """A small cifar-10-binary.tar.gz in the official layout: records of one label byte and
    3,072 pixel bytes; `cut` removes bytes from the end of a member. Returns the pixels and
    labels of the first training record, for checks."""
    r = np.random.default_rng(seed)
    members = {f"cifar-10-batches-bin/data_batch_{i}.bin": per_batch for i in range(1, 6)}
    members["cifar-10-batches-bin/test_batch.bin"] = n_test
    buf = io.BytesIO()
    first = b""
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, n in members.items():
            if name == leave_out:
                continue
            rec = r.integers(0, 256, (n, D.CIFAR10_RECORD), dtype=np.uint8)
            rec[:, 0] = r.integers(0, 10, n)
            if label is not None:
                rec[0, 0] = label
            raw = rec.tobytes()
            if not first:
                first = raw[: D.CIFAR10_RECORD]
            raw = raw[: len(raw) - (cut or {}).get(name, 0)]
            info = tarfile.TarInfo(name)
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
        meta = b"airplane\nautomobile\nbird\ncat\ndeer\ndog\nfrog\nhorse\nship\ntruck\n"
        info = tarfile.TarInfo("cifar-10-batches-bin/batches.meta.txt")
        info.size = len(meta)
        tar.addfile(info, io.BytesIO(meta))
    path.write_bytes(buf.getvalue())
    return first


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.mark.numeric
def test_cifar10_reads_the_binary_records(tmp_path):
    path = tmp_path / D.CIFAR10_FILE
    first = write_cifar(path, seed=fresh_seed())
    ds = D.load_cifar10(path, md5=md5(path))
    assert (ds.n_in, ds.n_classes, ds.name) == (3072, 10, "cifar10")
    assert ds.train_x.shape == (50, 3072) and ds.val_x.shape == (10, 3072) and ds.test_x.shape == (6, 3072)
    assert ds.checksum == hashlib.sha256(path.read_bytes()).hexdigest()
    raw = D.read_cifar10(path, md5=md5(path))
    assert raw["train_labels"][0] == first[0] and bytes(raw["train_images"][0]) == first[1:]
    # normalised by the training split's scalar mean and std (float64), split by the rule
    train_idx, val_idx = D.split_indices(60)
    pixels = raw["train_images"].astype(np.float64) / 255.0
    mean, std = pixels[train_idx.numpy()].mean(), pixels[train_idx.numpy()].std()
    # float32 roundings per value: x / 255, minus the mean, over the std; and the mean itself,
    # taken from the rounded x
    assert_close("normalised pixels", ds.train_x, torch.from_numpy((pixels[train_idx.numpy()] - mean) / std),
                 bound(4, ops="/255, -mean, /std, the mean"))
    assert torch.equal(ds.val_y, torch.from_numpy(raw["train_labels"][val_idx.numpy()]))


def test_cifar10_is_checked_against_the_published_md5(tmp_path):
    write_cifar(tmp_path / D.CIFAR10_FILE)
    with pytest.raises(D.DataError, match=f"not the published {D.CIFAR10_MD5}"):
        D.load_dataset("cifar10", data_dir=tmp_path)
    rc, _, err = run_main(["train", "--arch", "1*4", "--dataset", "cifar10", "--data-dir", str(tmp_path),
                           "--out", str(tmp_path / "run")])
    assert rc == 2 and "MD5" in one_line_error(err)


def test_absent_cifar10_says_where_to_get_it_and_where_to_put_it(tmp_path, monkeypatch):
    monkeypatch.delenv("PSA_DATA_DIR", raising=False)
    rc, _, err = run_main(["train", "--arch", "1*4", "--dataset", "cifar10"], cwd=tmp_path)
    assert rc == 2
    line = one_line_error(err)
    assert D.CIFAR10_URL in line and "dataset/cifar10/cifar-10-binary.tar.gz" in line and D.CIFAR10_MD5 in line


@pytest.mark.parametrize("kind, message", [
    ("record", "not whole records"),
    ("member", "no cifar-10-batches-bin/data_batch_3.bin"),
    ("archive", "not a readable .tar.gz"),
    ("label", "label 10"),
])
def test_broken_cifar10_files(tmp_path, kind, message):
    path = tmp_path / D.CIFAR10_FILE
    if kind == "record":
        write_cifar(path, cut={"cifar-10-batches-bin/data_batch_2.bin": 100})
    elif kind == "member":
        write_cifar(path, leave_out="cifar-10-batches-bin/data_batch_3.bin")
    elif kind == "label":
        write_cifar(path, label=10)
    else:
        write_cifar(path)
        path.write_bytes(path.read_bytes()[:-200])
    with pytest.raises(D.DataError, match=message):
        D.read_cifar10(path, md5=md5(path))


# ---- npz: a user's arrays ------------------------------------------------------------------------


def write_npz(path: Path, n_train: int = 120, n_test: int = 30, shape: tuple[int, ...] = (4, 5),
              classes: int = 3, seed: int = 0, **override: object) -> Path:
    r = np.random.default_rng(seed)
    arrays = {"x_train": r.normal(2.0, 3.0, (n_train, *shape)).astype(np.float32),
              "y_train": r.integers(0, classes, n_train), "x_test": r.normal(2.0, 3.0, (n_test, *shape)),
              "y_test": r.integers(0, classes, n_test)}
    arrays["y_train"][:classes] = np.arange(classes)  # every class present
    arrays.update(override)
    arrays = {k: v for k, v in arrays.items() if v is not None}
    np.savez(path, **arrays)
    return path


@pytest.mark.numeric
def test_npz_data_set(tmp_path):
    path = write_npz(tmp_path / "mine.npz", seed=fresh_seed())
    ds = D.load_dataset(f"npz:{path}")
    assert ds.name == f"npz:{path}" and (ds.n_in, ds.n_classes) == (20, 3)
    assert ds.train_x.shape == (100, 20) and ds.val_x.shape == (20, 20) and ds.test_x.shape == (30, 20)
    assert ds.checksum == hashlib.sha256(path.read_bytes()).hexdigest()
    # standardised by the training split's scalar mean and std: 0 and 1 but for the float32
    # roundings of each value (minus the mean, over the std), on the scale of the std
    x = ds.train_x.double()
    tol = bound(2, ops="-mean, /std")
    assert_close("mean", x.mean(), torch.tensor(0.0, dtype=torch.float64), tol, scale=1.0)
    assert_close("standard deviation", x.std(unbiased=False), torch.tensor(1.0, dtype=torch.float64), tol, scale=1.0)
    z = np.load(path)
    train, val = D.split_indices(120)
    assert torch.equal(ds.val_y, torch.from_numpy(z["y_train"][val.numpy()]).long())
    assert ds.zero_r() == pytest.approx(100.0 * np.bincount(z["y_train"][val.numpy()], minlength=3).max() / 20)
    assert len(ds.constant_predictor_accuracy()) == 3
    assert ds.arch("[1*8, 1*4]").params == 8 * 21 + 4 * 9 + 3 * 5


@pytest.mark.parametrize("override, message", [
    ({"y_test": None}, "missing array y_test"),
    ({"y_train": np.full(120, -1)}, "label -1"),
    ({"y_train": np.zeros(119, dtype=np.int64)}, "shape"),
    ({"y_train": np.zeros(120)}, "labels must be integers"),
    ({"x_test": np.zeros((30, 7))}, "features per example"),
    ({"x_train": np.full((120, 20), np.nan)}, "NaN"),
    ({"x_train": np.array([["a"] * 20] * 120)}, "inputs must be numbers"),
    ({"x_train": np.array([object()] * 120, dtype=object)}, "holds object \\(pickled\\) arrays, which psa never loads"),
    ({"y_train": np.zeros(120, dtype=np.int64), "y_test": np.zeros(30, dtype=np.int64)}, "two classes"),
    ({"y_train": np.ones(120, dtype=np.int64), "y_test": np.ones(30, dtype=np.int64)},
     "every label is 1; a classifier needs at least two classes"),
])
def test_broken_npz_is_one_clear_error(tmp_path, override, message):
    path = write_npz(tmp_path / "bad.npz", **override)
    with pytest.raises(D.DataError, match=message):
        D.load_dataset(f"npz:{path}")


def test_truncated_or_absent_npz_is_one_line_and_exit_2(tmp_path):
    path = write_npz(tmp_path / "cut.npz")
    path.write_bytes(path.read_bytes()[:300])
    for spec, message in ((f"npz:{path}", "not a readable .npz"), (f"npz:{tmp_path / 'none.npz'}", "no npz file")):
        rc, _, err = run_main(["train", "--arch", "1*4", "--dataset", spec, "--out", str(tmp_path / "run")])
        assert rc == 2 and message in one_line_error(err)
    text = tmp_path / "text.npz"
    text.write_text("not numbers\n")  # numpy would take it for a pickle and suggest allow_pickle
    rc, _, err = run_main(["train", "--arch", "1*4", "--dataset", f"npz:{text}", "--out", str(tmp_path / "run")])
    assert rc == 2 and "not a readable .npz file (no zip archive of arrays" in one_line_error(err)
    assert "pickle" not in err
    rc, _, err = run_main(["train", "--arch", "1*4", "--dataset", "imagenet"])
    assert rc == 2 and "unknown data set 'imagenet'" in one_line_error(err)


# ---- sizes flow into the nets --------------------------------------------------------------------


def test_psa_arch_takes_the_data_sets_sizes(tmp_path):
    rc, out, _ = run_main(["arch", "[1*128]", "--dataset", "cifar10", "--json"])
    doc = json.loads(out)
    assert rc == 0 and (doc["n_in"], doc["n_out"]) == (3072, 10) and doc["params"] == 128 * 3073 + 10 * 129
    rc, out, _ = run_main(["arch", "[1*128]", "--json"])
    assert json.loads(out)["params"] == 101_770  # MNIST's, as the paper's Table IV
    path = write_npz(tmp_path / "d.npz")
    rc, out, _ = run_main(["arch", "[2*8]", "--match", "1", "--dataset", f"npz:{path}", "--json"])
    doc = json.loads(out)
    assert (doc["n_in"], doc["n_out"], doc["params"]) == (20, 3, 8 * 21 + 8 * 9 + 3 * 9)
    assert doc["matched"] == [{"arch": "[1*11]", "params": 11 * 21 + 3 * 12}]  # 267 = 2*8's


def test_a_heterogeneous_funnel_on_other_sizes_matches_the_oracle(tmp_path):
    """[1*24, 1*12, 1*6] on 20 inputs and 3 classes: every mode against the oracle, with the
    last partial batch (100 training examples in batches of 32: the last holds 4)."""
    ds = D.load_dataset(f"npz:{write_npz(tmp_path / 'f.npz', seed=fresh_seed())}")
    arch = ds.arch("[1*24, 1*12, 1*6]")
    assert ds.train_x.shape[0] % ENGINE_HP.batch_size == 4
    pop = population(arch, ds, [(m, s) for s in (5, 6) for m in ("none", "decay", "dropout", "full", "hidden",
                                                                 "output")])
    eng = Engine(pop, ds, ENGINE_HP)
    results = [eng.meta_loop() for _ in range(3)]
    tol = training_bound(3 * epoch_steps(100, ENGINE_HP.batch_size), arch.widths, ENGINE_HP.batch_size)
    for j, mem in enumerate(pop.members):
        ref = oracle.run(arch, ds, mem.seed, mem.mode, 3, ENGINE_HP)
        assert_close(f"{mem.mode} {mem.seed} LKG", pop.member_state_dict(j), ref.lkg, tol)
        assert [r.promoted[j] for r in results] == ref.promoted
        for r in results:
            if r.ablated[j] is not None and mem.mode == "output":
                assert r.ablated[j][0] == 3 and r.ablated[j][1] < 3


def test_train_and_resume_on_an_npz_keep_their_data_set(tmp_path):
    path = write_npz(tmp_path / "d.npz")
    run = tmp_path / "run"
    rc, out, err = run_main(["train", "--arch", "[1*6, 1*4]", "--dataset", f"npz:{path}", "--meta-loops", "2",
                             "--mode", "output", "--out", str(run), "--json"])
    assert rc == 0, err
    doc = json.loads((run / "run.json").read_text())
    assert doc["dataset"] == f"npz:{path}" and doc["dataset_checksum"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert doc["params"] == 6 * 21 + 4 * 7 + 3 * 5
    rc, _, err = run_main(["train", "--resume", str(run), "--meta-loops", "1", "--json"])
    assert rc == 0, err
    assert json.loads((run / "run.json").read_text())["loop"] == 3
    rc, _, err = run_main(["train", "--resume", str(run), "--meta-loops", "1", "--dataset", "mnist"])
    assert rc == 2 and "not mnist" in one_line_error(err)
    write_npz(path, seed=1)  # other contents under the same name
    rc, _, err = run_main(["train", "--resume", str(run), "--meta-loops", "1"])
    assert rc == 2 and "not the same data" in one_line_error(err)
