"""`psa status` and `psa export` of a finished study, and what they need."""

from __future__ import annotations

import json
from pathlib import Path

from psa.study.console import fmt_seconds

from .conftest import TINY_LOOP_ROWS, TINY_TRIALS, one_line_error, rows, run_main


def test_status_and_export_of_a_finished_study(reference: Path, tmp_path: Path) -> None:
    rc, out, err = run_main(["status", "--db", str(reference), "--json"], tmp_path)
    assert rc == 0
    (info,) = json.loads(out)["studies"]
    assert (info["study"], info["state"], info["done"], info["trials"]) == ("tiny", "finished", 24, 24)
    assert (info["loops_done"], info["loops_total"]) == (144, 144)
    assert [a["arch"] for a in info["architectures"]] == ["1*8", "2*8"]
    rc, out, err = run_main(["status", "--db", str(reference)], tmp_path)
    assert rc == 0 and "finished" in out and "24 done" in out and "1*8" in out

    rc, out, err = run_main(["export", "--db", str(reference), "--out", "exp"], tmp_path)
    assert rc == 0
    exp = tmp_path / "exp"
    assert sorted(p.name for p in exp.iterdir()) == ["meta_loops.csv", "meta_loops.parquet", "trials.csv",
                                                      "trials.parquet"]
    import csv

    import pyarrow.parquet as pq

    with open(exp / "meta_loops.csv") as f:
        loops_csv = list(csv.DictReader(f))
    with open(exp / "trials.csv") as f:
        trials_csv = list(csv.DictReader(f))
    assert len(loops_csv) == TINY_LOOP_ROWS and len(trials_csv) == TINY_TRIALS
    ml = pq.read_table(exp / "meta_loops.parquet").to_pylist()
    tr = pq.read_table(exp / "trials.parquet").to_pylist()
    assert len(ml) == TINY_LOOP_ROWS and len(tr) == TINY_TRIALS
    # exact values: CSV floats round-trip, Parquet is typed, both equal the database
    db_loops = {(x[1], x[2], x[3], x[4]): x for x in rows(reference)["meta_loops"]}
    for c, p in zip(loops_csv, ml):
        key = (c["arch"], c["mode"], int(c["trial"]), int(c["loop"]))
        assert key == (p["arch"], p["mode"], p["trial"], p["loop"])
        assert float(c["candidate_acc"]) == p["candidate_acc"] == db_loops[key][6]
        assert float(c["train_loss"]) == p["train_loss"] == db_loops[key][11]
        assert (c["ablated_layer"] == "") == (p["ablated_layer"] is None)
    assert {t["bounty"] for t in tr} == {float(t["bounty"]) for t in trials_csv}
    # again, CSV only, one study: files are replaced whole, no temporary files stay
    rc, out, err = run_main(["export", "--db", str(reference), "--out", "exp", "--format", "csv", "--study", "tiny"], tmp_path)
    assert rc == 0 and not list(exp.glob(".*"))
    rc, out, err = run_main(["export", "--db", str(reference), "--out", "e2", "--study", "nope"], tmp_path)
    assert rc == 2 and "no study named 'nope'" in one_line_error(err)


def test_export_parquet_without_pyarrow(reference: Path, tmp_path: Path, monkeypatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "pyarrow", None)
    rc, out, err = run_main(["export", "--db", str(reference), "--out", "x", "--format", "parquet"], tmp_path)
    assert rc == 2 and "needs pyarrow" in one_line_error(err)
    assert not (tmp_path / "x").exists()


def test_durations_for_people() -> None:
    """One formatter for the plan's estimates and, rough, for the ETA of `psa status`."""
    assert [fmt_seconds(s) for s in (45, 750, 7200, 200_000)] == ["45 s", "12.5 min", "2.0 h", "2.3 d"]
    assert ([fmt_seconds(s, rough=True) for s in (-3, 45, 750, 7200, 200_000)]
            == ["~0 s", "~45 s", "~12 min", "~2.0 h", "~55.6 h"])


def test_status_weights_read_the_stored_hyperparameters() -> None:
    """psa status weighs an architecture's trial-loops by the stored design, its batch size
    included (a quarter of the batch is four times the steps of an epoch), where the study
    stored no calibration (the analytic weights)."""
    from psa.cli.study import stored_study_costs
    from psa.study.design import StudyDesign

    def weights(**hp) -> dict:
        d = StudyDesign.from_fields(architectures=("1*8", "4*4"), trials=2, meta_loops=3, **hp)
        costs, _ = stored_study_costs({"design": json.dumps({**d.to_dict(), "plan": {"chunk": 12}})})
        assert not costs.measured
        return costs.trial_loop

    paper, small = weights(), weights(batch_size=64)
    assert set(paper) == set(small) == {"1*8", "4*4"}
    assert all(small[a] > 2 * paper[a] for a in paper)


def test_status_and_export_of_a_database_without_psa_tables(tmp_path: Path) -> None:
    # an empty file, or another program's SQLite: psa status and psa export read it as a
    # database with no study (as psa report does), one line and no traceback
    import sqlite3

    (tmp_path / "empty.sqlite").write_bytes(b"")
    con = sqlite3.connect(tmp_path / "other.sqlite")
    con.execute("CREATE TABLE notes (x)")
    con.commit()
    con.close()
    for db in ("empty.sqlite", "other.sqlite"):
        rc, out, err = run_main(["status", "--db", db], tmp_path)
        assert (rc, err) == (0, "") and "no study yet" in out
        rc, out, err = run_main(["status", "--db", db, "--study", "x"], tmp_path)
        assert rc == 2 and "no study named 'x'" in one_line_error(err)
        rc, out, err = run_main(["export", "--db", db, "--out", "exp"], tmp_path)
        assert rc == 2 and "holds no study yet" in one_line_error(err)
        assert not (tmp_path / "exp").exists()


def test_export_out_an_existing_file(tmp_path: Path) -> None:
    """--out naming a file: says so (not mkdir's bare "File exists"), and the file is kept."""
    from .report_helpers import make_db

    make_db(tmp_path / "s.sqlite", ["1*8"], trials=2, loops=2)
    (tmp_path / "afile").write_text("keep me")
    rc, out, err = run_main(["export", "--db", "s.sqlite", "--out", "afile", "--format", "csv"], tmp_path)
    assert rc == 2 and "--out afile exists and is not a directory" in one_line_error(err)
    assert (tmp_path / "afile").read_text() == "keep me"


def test_an_export_that_fails_half_way_leaves_the_previous_one_whole(tmp_path: Path, monkeypatch) -> None:
    """The meta-loops file fails to write (a full disk): the trials file written before it is not
    renamed over the previous export's, which would pair a new snapshot's trials with an older
    one's meta-loops; no temporary file stays."""
    import errno

    from psa.study import export as export_module

    from .report_helpers import make_db

    make_db(tmp_path / "s.sqlite", ["1*8"], trials=2, loops=2)
    (tmp_path / "exp").mkdir()
    for name in ("trials.csv", "meta_loops.csv"):
        (tmp_path / "exp" / name).write_text(f"the previous export's {name}\n")
    write_csv = export_module._write_csv

    def full_disk(path: Path, header, rows) -> int:
        if "meta_loops" in path.name:
            raise OSError(errno.ENOSPC, "No space left on device")
        return write_csv(path, header, rows)

    monkeypatch.setattr(export_module, "_write_csv", full_disk)
    rc, out, err = run_main(["export", "--db", "s.sqlite", "--out", "exp", "--format", "csv"], tmp_path)
    assert rc == 2 and "No space left on device" in one_line_error(err)
    assert sorted(p.name for p in (tmp_path / "exp").iterdir()) == ["meta_loops.csv", "trials.csv"]
    for name in ("trials.csv", "meta_loops.csv"):
        assert (tmp_path / "exp" / name).read_text() == f"the previous export's {name}\n"
    monkeypatch.setattr(export_module, "_write_csv", write_csv)
    rc, out, err = run_main(["export", "--db", "s.sqlite", "--out", "exp", "--format", "csv"], tmp_path)
    assert rc == 0 and (tmp_path / "exp" / "trials.csv").read_text().startswith("study,")
