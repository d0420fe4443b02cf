"""Whether an ablation persists, shown where a user looks (docs/module.md#what-it-does-precisely,
"Where the verdicts appear"): psa.fit's result table (and its saved result.json), the start
lines of `psa study --model module:function`, and the report of a module study (read from the
study's stored plan). The zoo's mlp ablates for real (behind a ReLU); ln_mlp's hidden ablation
regrows (its LayerNorm mixes the units)."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
from pathlib import Path

import pytest

import psa
from psa.core import data as psa_data

from .conftest import env, psa_cmd, run_main, subset
from .zoo import BY_NAME

MLP, LN = "tests.zoo:mlp", "tests.zoo:ln_mlp"
STUDY = ["--model", MLP, "--model", LN, "--modes", "none,hidden", "--trials", "1", "--meta-loops", "1",
         "--train-subset", "128", "--name", "units"]
LN_HIDDEN = "1 (Linear, 32 units, hidden): regrows (2 (LayerNorm) normalises it with the other units)"


def _fit(mnist: psa_data.Dataset, name: str) -> psa.FitResult:
    s = subset(mnist, 128, 64, 32)
    z = BY_NAME[name]
    return psa.fit(z.factory, (s.train_x, s.train_y), (s.val_x, s.val_y), (s.test_x, s.test_y),
                   modes=["none", "hidden"], trials=1, meta_loops=1, device="cpu", progress=False)


def test_fit_result_says_where_an_ablation_persists(mnist: psa_data.Dataset, tmp_path: Path) -> None:
    ln = _fit(mnist, "ln_mlp")
    rows = ln.persistence()
    assert rows == ln.spec.summary_rows()
    assert [(r["layer"], r["full"], r["hidden"], r["output"]) for r in rows] == [
        ("1", "regrows", "regrows", ""), ("4", "regrows", "", "regrows")]
    assert "LayerNorm" in rows[0]["why"] and "normalises it with the other units" in rows[0]["why"]
    text = str(ln.table())
    assert text.splitlines()[0].strip().startswith("PSA on tests.zoo:ln_mlp")  # the bounty table comes first
    assert "Unit layers of tests.zoo:ln_mlp: does an ablation persist?" in text
    assert ln.table().rows == ln.summary()  # the summary's rows are unchanged
    unit_lines = [line for line in text.splitlines() if line.startswith("│ 1 ")]
    assert len(unit_lines) == 1 and "regrows" in unit_lines[0] and "LayerNorm" in unit_lines[0]
    mlp = _fit(mnist, "mlp")
    assert [(r["layer"], r["full"], r["hidden"]) for r in mlp.persistence()] == [
        ("1", "persists", "persists"), ("4", "persists", "persists"), ("7", "regrows", "")]
    assert mlp.persistence()[0]["why"].endswith("stops its gradient at 0")
    # saved and loaded: the verdicts come back from result.json, without the factory
    ln.save(tmp_path / "ln")
    run = json.loads((tmp_path / "ln" / "result.json").read_text())
    assert run["units"] == rows
    back = psa.load(tmp_path / "ln")
    assert back == ln and back.persistence() == rows and str(back.table()) == text


def _study(tmp_path: Path, *flags: str) -> tuple[str, str]:
    rc, out, err = run_main(["study", *STUDY, "--db", "s.sqlite", *flags], tmp_path)
    assert rc == 0, err
    return out, err


def test_a_module_study_prints_its_verdicts_once_and_the_report_tables_them(tmp_path: Path) -> None:
    out, err = _study(tmp_path)
    said = out + err
    assert said.count(f"{LN}: does an ablation persist?") == 1 and said.count(f"{MLP}: does an ablation persist?") == 1
    assert said.count(LN_HIDDEN) == 1
    assert "1 (Linear, 32 units, hidden): persists (2 (ReLU) stops its gradient at 0)" in said
    # the verdicts are stored with the study's plan: the report reads them without the factories
    con = sqlite3.connect(f"file:{tmp_path / 's.sqlite'}?mode=ro", uri=True)
    design = json.loads(con.execute("SELECT design FROM studies").fetchone()[0])
    con.close()
    stored = design["plan"]["modules"][LN]["units"]
    assert [(r["layer"], r["hidden"]) for r in stored] == [("1", "regrows"), ("4", "")]
    rc, out, err = run_main(["report", "--db", "s.sqlite", "--out", "rep"], tmp_path)
    assert rc == 0, err
    md = (tmp_path / "rep" / "tables" / "unit_layers.md").read_text()
    assert f"| {LN} | 1 | Linear | 32 | hidden | regrows | regrows |  |" in md
    assert f"| {MLP} | 1 | Linear | 32 | hidden | persists | persists |  |" in md
    assert f"| {MLP} | 7 | Linear | 10 | output | regrows |  | regrows |" in md
    page = (tmp_path / "rep" / "index.html").read_text()
    assert "Unit layers: does an ablation persist?" in page and 'id="table-unit_layers"' in page
    assert "unit_layers" in json.loads((tmp_path / "rep" / "manifest.json").read_text())["tables"]
    # an export carries no plan: its report says where the verdicts are, not that none were stored
    assert run_main(["export", "--db", "s.sqlite", "--out", "exp"], tmp_path)[0] == 0
    rc, out, err = run_main(["report", "--export", "exp", "--out", "rep2"], tmp_path)
    assert rc == 0, err
    notes = json.loads((tmp_path / "rep2" / "manifest.json").read_text())["notes"]
    assert any("an export does not carry the study's plan" in n for n in notes)
    assert not any("created before psa" in n for n in notes)


def test_quiet_studies_say_nothing_and_old_studies_report_without_verdicts(tmp_path: Path) -> None:
    out, err = _study(tmp_path, "--quiet")
    assert "does an ablation persist" not in out + err
    # a study created before psa stored the verdicts: the report says so in one line, and draws no rows
    db = tmp_path / "s.sqlite"
    con = sqlite3.connect(db)
    design = json.loads(con.execute("SELECT design FROM studies").fetchone()[0])
    for entry in design["plan"]["modules"].values():
        del entry["units"]
    con.execute("UPDATE studies SET design = ?", (json.dumps(design),))
    con.commit()
    con.close()
    rc, out, err = run_main(["report", "--db", str(db), "--out", "rep"], tmp_path)
    assert rc == 0, err
    notes = [n for n in json.loads((tmp_path / "rep" / "manifest.json").read_text())["notes"]
             if "persistence verdicts" in n]
    assert len(notes) == 1 and MLP in notes[0] and LN in notes[0]
    assert not (tmp_path / "rep" / "tables" / "unit_layers.md").exists()


@pytest.mark.parametrize("bad", [None, "not json", json.dumps({"plan": {"modules": {LN: {"units": [{"layer": 1}]}}}})])
def test_unreadable_stored_verdicts_are_a_note(bad: str | None) -> None:
    from psa.analysis.persistence import stored_unit_layers

    rows, notes = stored_unit_layers(bad, [LN])
    assert rows == {} and len(notes) == 1 and LN in notes[0]


def test_a_study_says_each_note_once_in_one_line(tmp_path: Path) -> None:
    # the command's own output, as a user sees it: a subprocess, whose warnings no pytest records
    e = env()
    # tests.zoo importable from tmp_path
    e["PYTHONPATH"] = f"{Path(__file__).resolve().parents[1]}{os.pathsep}{e['PYTHONPATH']}"
    study = ["study", "--model", LN, "--model", "tests.zoo:mha", "--modes", "none,hidden", "--trials", "1",
             "--meta-loops", "1", "--train-subset", "128"]
    heads = "tests.zoo:mha: the units of attn (MultiheadAttention) are its 2 heads"
    loud = subprocess.run(psa_cmd(*study, "--db", "loud.sqlite"), cwd=tmp_path, env=e, capture_output=True,
                          text=True, timeout=600)
    assert loud.returncode == 0, loud.stderr
    said = loud.stdout + loud.stderr
    (note,) = [line for line in said.splitlines() if heads in line]
    assert note.startswith(f"note: {heads}")
    assert said.count(LN_HIDDEN) == 1  # ln_mlp's regrowth: its line of the table, and no note besides
    assert "does not persist" not in said and "Warning" not in said
    quiet = subprocess.run(psa_cmd(*study, "--db", "quiet.sqlite", "--quiet"), cwd=tmp_path, env=e,
                           capture_output=True, text=True, timeout=600)
    assert quiet.returncode == 0, quiet.stderr
    # a quiet study still says what it found in the user's model: as warnings, each one line
    assert quiet.stdout == "" and quiet.stderr.splitlines() == [f"psa: {note.removeprefix('note: ')}"]
