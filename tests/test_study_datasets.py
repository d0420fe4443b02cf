"""Studies on other data sets and with heterogeneous nets: the store records the data set and its
checksum, a resume on other data is refused, the report places heterogeneous nets beside the
homogeneous ones and counts parameters with the data set's sizes, and the comparison with the
published (MNIST) data refuses other data sets."""

from __future__ import annotations

import hashlib
import json
import sqlite3
import warnings

import pytest

from psa.analysis.results import load_db
from psa.core import data as D
from psa.core.arch import parse_arch
from psa.core.mlp.memory import stack_path_reason
from psa.core.member import MODES

from .conftest import engine, one_line_error, population, run_main
from .test_datasets import write_npz

ARCHS = ["1*8", "[1*8, 1*4]", "[1*6, 1*4, 1*2]"]


def copy_db(src, dst) -> None:
    """A consistent copy of a WAL database (its -wal file included)."""
    with sqlite3.connect(src) as a, sqlite3.connect(dst) as b:
        a.backup(b)


@pytest.fixture(scope="module")
def npz_study(tmp_path_factory):
    d = tmp_path_factory.mktemp("npz-study")
    path = write_npz(d / "mine.npz")
    argv = ["study", *(x for a in ARCHS for x in ("--arch", a)), "--dataset", f"npz:{path}", "--trials", "2",
            "--meta-loops", "3", "--name", "mine", "--db", str(d / "s.sqlite"), "--quiet"]
    rc, _, err = run_main(argv)
    assert rc == 0, err
    return d, path, argv


def test_the_study_records_its_data_set(npz_study):
    d, path, _ = npz_study
    con = sqlite3.connect(d / "s.sqlite")
    con.row_factory = sqlite3.Row
    row = dict(con.execute("SELECT * FROM study_datasets").fetchone())
    ds = D.load_dataset(f"npz:{path}")
    assert row["name"] == f"npz:{path}" and row["checksum"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert (row["n_in"], row["n_classes"], row["n_train"], row["n_val"], row["n_test"]) == (20, 3, 100, 20, 30)
    assert row["zero_r"] == ds.zero_r() and json.loads(row["constant_acc"]) == ds.constant_predictor_accuracy()
    assert {r[0] for r in con.execute("SELECT dataset FROM trials")} == {f"npz:{path}"}
    design = json.loads(con.execute("SELECT design FROM studies").fetchone()[0])
    assert design["dataset"] == f"npz:{path}"


def test_a_train_subset_beyond_the_data_sets_training_split_is_refused(npz_study, tmp_path):
    """The design checks MNIST's 50,000; an npz of 100 training examples is checked when it is
    loaded, before anything is written (its trials would have recorded 600 images)."""
    _, path, _ = npz_study
    for extra in ([], ["--dry-run"]):
        rc, _, err = run_main(["study", "--arch", "1*8", "--dataset", f"npz:{path}", "--train-subset", "600",
                               "--trials", "1", "--meta-loops", "1", "--quiet", "--db", str(tmp_path / "x.sqlite"),
                               *extra], tmp_path)
        assert rc == 2 and "train_subset 600 is more than the 100 training examples of" in one_line_error(err)
        assert not (tmp_path / "x.sqlite").exists()


def test_a_resume_on_other_data_is_refused(npz_study, tmp_path):
    d, path, argv = npz_study
    db = tmp_path / "copy.sqlite"
    copy_db(d / "s.sqlite", db)
    argv = [*argv[:-2], str(db), "--quiet"]
    original = path.read_bytes()
    try:
        write_npz(path, seed=7)  # same name, other contents
        rc, _, err = run_main(argv)
    finally:
        path.write_bytes(original)
    assert rc == 2
    line = one_line_error(err)
    assert "was created with data set" in line and "refusing to mix" in line
    rc, _, err = run_main(argv)  # the original data: nothing left to do
    assert rc == 0, err


def test_the_report_places_heterogeneous_nets_and_counts_with_the_data_sets_sizes(npz_study, tmp_path):
    d, path, _ = npz_study
    out = tmp_path / "report"
    rc, _, err = run_main(["report", "--db", str(d / "s.sqlite"), "--out", str(out), "--bootstrap", "200"])
    assert rc == 0, err
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["zero_r"] == D.load_dataset(f"npz:{path}").zero_r()
    assert "recorded with the study" in manifest["zero_r_source"]
    assert manifest["dataset_record"]["n_in"] == 20 and "heterogeneous" in manifest["tables"]
    # equation 1 with 20 inputs and 3 classes
    assert f"1*8,{8 * 21 + 3 * 9},".encode() in (out / "tables" / "table_iv.csv").read_bytes()
    het = (out / "tables" / "heterogeneous.csv").read_text().splitlines()
    assert len(het) == 3 and het[1].startswith('"[1*8, 1*4]"') and str(8 * 21 + 4 * 9 + 3 * 5) in het[1]
    fig = json.loads((out / "figures" / "accuracy_vs_params.json").read_text())
    points = {p["arch"]: p for p in fig["points"]}
    assert set(points) == set(ARCHS)
    assert [a for a, p in points.items() if p["heterogeneous"]] == ARCHS[1:]
    assert points["[1*6, 1*4, 1*2]"]["params"] == 6 * 21 + 4 * 7 + 2 * 5 + 3 * 3
    # the regime classifier runs on them, and the depth x width maps leave them out
    regimes = manifest["regimes"]
    assert set(regimes) == set(ARCHS) and all(r["published"]["regime"] for r in regimes.values())
    ds_map = json.loads((out / "figures" / "design_space.json").read_text())
    assert [p["arch"] for p in ds_map["points"]] == ["1*8"] and ds_map["skipped"] == ARCHS[1:]
    assert "Heterogeneous architectures" in (out / "index.html").read_text()


def test_compare_with_the_published_data_refuses_other_data_sets(npz_study, tmp_path):
    d, _, _ = npz_study
    for ref in ("published", "seed"):
        rc, _, err = run_main(["compare", "--db", str(d / "s.sqlite"), "--reference", ref, "--out", str(tmp_path / ref)])
        assert rc == 2
        assert "only MNIST studies can be compared" in one_line_error(err)
        assert not (tmp_path / ref).exists()


def test_a_database_from_before_data_sets_were_recorded_reads_as_mnist(reference, tmp_path):
    db = tmp_path / "old.sqlite"
    copy_db(reference, db)
    data = load_db(db)
    assert data.dataset_info is not None and data.dataset_info["checksum"] == D.load_dataset("mnist").checksum
    assert data.io == (784, 10)
    con = sqlite3.connect(db)
    con.execute("DROP TABLE study_datasets")
    con.commit()
    con.close()
    data = load_db(db)
    assert data.dataset_info is None and data.io == (784, 10)


def test_the_design_names_a_data_set(tmp_path):
    rc, _, err = run_main(["study", "--arch", "1*4", "--dataset", "svhn", "--dry-run"], cwd=tmp_path)
    assert rc == 2 and "unknown data set 'svhn'" in one_line_error(err)
    toml = tmp_path / "d.toml"
    toml.write_text('architectures = ["1*4"]\ndataset = "mnist-ish"\n')
    rc, _, err = run_main(["study", str(toml), "--dry-run"], cwd=tmp_path)
    assert rc == 2 and "unknown data set 'mnist-ish'" in one_line_error(err)


def test_heterogeneous_stacks_take_the_torch_path_with_the_reason_once(small):
    pytest.importorskip("triton")
    het, homo = parse_arch("[2*12, 1*8]"), parse_arch("[3*8]")
    specs = [(m, 1) for m in MODES]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        engines = [engine(population(het, small, specs), small, precision="fp32", graphs=False, kernels="triton")
                   for _ in range(2)]
        fused = engine(population(homo, small, specs), small, precision="fp32", graphs=False, kernels="triton")
    notes = [str(w.message) for w in caught if "plain torch path" in str(w.message)]
    assert notes == ["psa: [2*12, 1*8] trains its hidden stack on the plain torch path: hidden layers of unequal "
                     "widths (12, 8); the stack kernel runs stacks of one width"]
    assert not any(e.paths.triton_stack for e in engines) and fused.paths.triton_stack
    assert stack_path_reason(homo, fused.ex) == ""


def test_the_funnel_example_is_a_design_of_heterogeneous_nets():
    from pathlib import Path

    from psa.study.design import StudyDesign, read_design_file

    path = Path(__file__).resolve().parents[1] / "examples" / "funnel.toml"
    name, _, fields = read_design_file(path)
    design = StudyDesign.from_fields(**fields)
    assert name == "funnel" and design.dataset == "mnist"
    het = [a for a in design.nets if len(set(parse_arch(a).hidden)) > 1]
    assert len(het) >= 3
    # the parameter counts its comments quote
    import re
    quoted = re.findall(r'^\s+"([^"]+)",\s+#.*?([\d,]+)$', path.read_text(), re.M)
    assert {a for a, _ in quoted} == set(het)
    assert all(parse_arch(a).params == int(n.replace(",", "")) for a, n in quoted)


def test_an_engine_refuses_an_architecture_sized_for_other_data(small, tmp_path):
    from psa.core.errors import ConfigError

    ds = D.load_dataset(f"npz:{write_npz(tmp_path / 'd.npz')}")
    with pytest.raises(ConfigError, match="784 inputs and 10 outputs, data set npz:.* 20 and 3 classes"):
        engine(population(parse_arch("1*8"), ds, [("none", 0)]), ds)
    assert engine(population(ds.arch("1*8"), ds, [("none", 0)]), ds).population.arch.n_in == 20
