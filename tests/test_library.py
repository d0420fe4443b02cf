"""psa.fit as a library: the device, the result's repr, table, records and DataFrame, save and
psa.load, the dry run's estimate, the progress display and warnings at the caller's line. The
records themselves are test_module.py's (against a one-model reference loop and psa's engine)."""

from __future__ import annotations

import dataclasses
import io
import json
import math
import subprocess
import sys
import types
import warnings
from pathlib import Path

import pytest
import torch
from rich.console import Console
from rich.table import Table
from safetensors.torch import load_file
from torch import nn

import psa
from psa.core import loop as psa_loop
from psa.core.checkpoint import CheckpointError
from psa.core.errors import ConfigError, MissingDependency, warn
from psa.core.hparams import HParams
from psa.estimate import FitEstimate
from psa.progress import FitProgress, best_text, duration
from psa.results import RECORD_COLUMNS, RECORDS_FILE, RESULT_FILE, FitResult

from .conftest import SRC, subset

VARIANTS = {"p1": {"patience": 1}, "dh": {"schedule": "dropout:1,hidden:1"}}


def tiny_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(784, 16), nn.ReLU(), nn.Dropout(), nn.Linear(16, 10))


def splits(mnist, n_train: int = 256, n_val: int = 200, n_test: int = 100):
    ds = subset(mnist, n_train, n_val, n_test)
    return (ds.train_x, ds.train_y), (ds.val_x, ds.val_y), (ds.test_x, ds.test_y)


@pytest.fixture(scope="module")
def result(mnist) -> FitResult:
    """2 trials x 2 meta-loops of none and hidden, with patience and a mode schedule beside them."""
    return psa.fit(tiny_mlp, *splits(mnist), modes=["none", "hidden"], trials=2, meta_loops=2, batch_size=64,
                   variants=VARIANTS)


# ------------------------------------------------------------------------------------------
# the package and the device


def test_config_error_is_exported_lazily():
    code = ("import sys, psa; assert 'torch' not in sys.modules; from psa.core.errors import ConfigError; "
            "assert psa.ConfigError is ConfigError; assert 'torch' not in sys.modules; "
            "assert {'fit', 'load', 'ConfigError', 'FitResult', 'FitEstimate'} <= set(dir(psa)); print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={"PYTHONPATH": SRC})
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
    assert issubclass(psa.ConfigError, ValueError)


def test_device_auto_is_the_default_and_a_missing_device_is_one_line(mnist, result):
    assert result.device == str(psa_device_auto())
    train, val, _ = splits(mnist, 64, 64, 1)
    bad = [("tpu", "unknown device 'tpu'"), (42, "device must be 'auto'"), ("meta", "psa.fit trains on cpu")]
    if not torch.cuda.is_available():
        built = torch.version.cuda is not None
        bad.append(("cuda", "device 'cuda' is not available: " + (
            "torch" if built else f"this torch ({torch.__version__}) was built without CUDA")))
        bad.append((torch.device("cuda", 1), "device 'cuda:1' is not available"))
    else:
        n = torch.cuda.device_count()
        bad.append((f"cuda:{n}", f"this machine has {n} CUDA device"))
    for device, message in bad:
        with pytest.raises(ConfigError) as e:
            psa.fit(tiny_mlp, train, val, trials=1, meta_loops=1, device=device)
        assert message in str(e.value) and "\n" not in str(e.value), (device, str(e.value))


def psa_device_auto() -> torch.device:
    from psa.core.device import resolve_device

    return resolve_device("auto")


# ------------------------------------------------------------------------------------------
# the result: repr, table, records, DataFrame


def test_repr_is_one_short_line(result):
    text = repr(result)
    assert len(text) < 300 and "\n" not in text
    assert text.startswith("FitResult(model='tests.test_library:tiny_mlp', conditions=5, trials=2, meta_loops=2, ")
    best = max(result.bounty[("hidden", k)] for k in (1, 2))
    assert f"'hidden': {best:.2f}" in text and f"seconds={result.seconds:.1f}" in text


def test_table_prints_as_text_and_renders_with_rich(result):
    t = result.table()
    text = str(t)
    assert repr(t) == text and text.splitlines()[0].strip().startswith("PSA on tests.test_library:tiny_mlp")
    for cond in result.conditions:
        assert f"│ {cond} " in text
    assert "±" in text and "\x1b" not in text  # plain text: no colour codes
    assert isinstance(t.rich, Table) and t.__rich__() is t.rich and t.rows == result.summary()
    console = Console(file=io.StringIO(), width=200, force_terminal=True)
    console.print(t)
    assert "hidden+p1" in console.file.getvalue()


def test_records_are_plain_dicts_in_the_exports_columns(result):
    recs = result.to_records()
    assert len(recs) == len(result.records) == 2 * 2 * len(result.conditions)
    assert all(tuple(r) == RECORD_COLUMNS for r in recs)
    json.dumps(recs)  # plain: JSON-able as they are
    by = {(r["condition"], r["trial"], r["loop"]): r for r in recs}
    # a schedule's rows say the mode each loop trained in; the condition keeps its name
    assert [by[("dropout+dh", 1, loop)]["mode"] for loop in (1, 2)] == ["dropout", "hidden"]
    assert by[("dropout+dh", 1, 2)]["variant"] == "dh" and by[("hidden", 2, 1)]["variant"] == ""
    hidden = by[("hidden", 1, 2)]
    assert hidden["ablated_layer"] == "0" and [hidden["ablated_layer"], hidden["ablated_unit"]] == hidden["ablations"][0]
    assert by[("none", 1, 1)]["ablated_layer"] is None and by[("none", 1, 1)]["forced"] is None
    assert by[("none+p1", 1, 2)]["forced"] in (True, False)
    rec = next(x for x in result.records if (x.mode, x.trial, x.loop) == ("hidden", 1, 2))
    assert (hidden["candidate_acc"], hidden["lkg_score"], hidden["promoted"]) == (rec.candidate_acc, rec.lkg_score,
                                                                                  rec.promoted)


def test_to_pandas_needs_pandas_and_says_how_to_get_it(result, monkeypatch):
    monkeypatch.setitem(sys.modules, "pandas", None)  # as if it were not installed
    with pytest.raises(ImportError) as e:
        result.to_pandas()
    assert isinstance(e.value, MissingDependency) and isinstance(e.value, psa.ConfigError)
    assert "pip install pandas" in str(e.value) and "\n" not in str(e.value)

    seen = {}

    class DataFrame:
        @classmethod
        def from_records(cls, records, columns):
            seen.update(records=records, columns=columns)
            return cls()

    fake = types.ModuleType("pandas")
    fake.DataFrame = DataFrame  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "pandas", fake)
    assert isinstance(result.to_pandas(), DataFrame)
    assert seen == {"records": result.to_records(), "columns": list(RECORD_COLUMNS)}


# ------------------------------------------------------------------------------------------
# save and load


def test_save_and_load_round_trip(result, tmp_path: Path):
    out = tmp_path / "run"
    paths = result.save(out)
    assert sorted(p.name for p in paths) == sorted(f"{c}-trial{k}.safetensors" for c in result.conditions
                                                   for k in (1, 2))
    assert sorted(p.name for p in out.iterdir()) == sorted([*(p.name for p in paths), RECORDS_FILE, RESULT_FILE])
    assert json.loads((out / RECORDS_FILE).read_text()) == json.loads(json.dumps(result.to_records()))
    run = json.loads((out / RESULT_FILE).read_text())
    assert run["format"] == "psa-fit-1" and run["model"] == result.model and len(run["summary"]) == 5
    back = psa.load(out)
    assert back == result and back.states_equal(result)  # records, bounties, tests, spec, hparams, variants
    assert back.summary() == result.summary() and repr(back) == repr(result)
    model = tiny_mlp()
    model.load_state_dict(load_file(str(out / "hidden-trial2.safetensors")))  # as the factory's module
    assert all(torch.equal(v, back.state_dict("hidden", 2)[k]) for k, v in model.state_dict().items())


class Diverges(nn.Module):
    """A model whose every training loss is NaN: under diverged="discard" no candidate scores."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(784, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.fc(x)
        return z * float("inf") if self.training else z


def test_a_result_with_nan_scores_round_trips_and_tests_nothing(mnist, tmp_path: Path):
    """NaN equals NaN in ==, so a loaded result equals the saved one; a paired test of NaN
    bounties has no p (it was 0.000, a significant difference out of nothing)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = psa.fit(Diverges, *splits(mnist, 128, 64, 64), modes=["none", "output"], trials=2, meta_loops=2,
                    hparams=HParams(diverged="discard"), progress=False)
    assert all(math.isnan(r.records[i].candidate_acc) for i in range(len(r.records)))
    # no model was kept: no test accuracy (it was the untrained weights')
    assert r.test_acc and all(math.isnan(v) for v in r.test_acc.values())
    r.save(tmp_path / "run")
    back = psa.load(tmp_path / "run")
    assert back == r and back.states_equal(r)
    assert back != dataclasses.replace(r, seconds=r.seconds + 1)  # == still compares every field
    tested = next(row for row in r.summary() if row["mode"] == "output")
    assert math.isnan(tested["p"]) and math.isnan(tested["p_holm"]) and tested["verdict"] == "cannot decide"


def test_save_refuses_a_directory_in_use_unless_told(result, tmp_path: Path):
    out = tmp_path / "run"
    result.save(out)
    with pytest.raises(FileExistsError) as e:
        result.save(out)
    assert "overwrite=True" in str(e.value) and "\n" not in str(e.value)
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="it is a file"):
        result.save(tmp_path / "file", overwrite=True)
    # overwrite replaces a saved result: its model files that the new one lacks go, other files stay
    run = json.loads((out / RESULT_FILE).read_text())
    run["results"].append({"file": "none-trial9.safetensors"})
    (out / RESULT_FILE).write_text(json.dumps(run))
    (out / "none-trial9.safetensors").write_bytes(b"old")
    (out / "notes.txt").write_text("mine")
    result.save(out, overwrite=True)
    assert not (out / "none-trial9.safetensors").exists() and (out / "notes.txt").read_text() == "mine"
    assert psa.load(out) == result


def test_load_says_what_is_wrong(result, tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="no psa.fit result"):
        psa.load(tmp_path / "nothing")
    out = tmp_path / "run"
    result.save(out)
    run = json.loads((out / RESULT_FILE).read_text())
    run["results"][0]["file"] = "../elsewhere.safetensors"
    (out / RESULT_FILE).write_text(json.dumps(run))
    with pytest.raises(CheckpointError, match="plain .safetensors names"):
        psa.load(out)
    (out / RESULT_FILE).write_text("{not json")
    with pytest.raises(CheckpointError, match="corrupt JSON"):
        psa.load(out)
    (out / RESULT_FILE).write_text(json.dumps({"format": "something else"}))
    with pytest.raises(CheckpointError, match="not a psa.fit result"):
        psa.load(out)


# ------------------------------------------------------------------------------------------
# progress and the dry run


def test_progress_is_quiet_without_a_terminal_and_a_line_a_loop_when_asked(mnist, capsys):
    train, val, _ = splits(mnist, 128, 64)
    kw = dict(modes=["none", "output"], trials=1, meta_loops=2, batch_size=64)
    psa.fit(tiny_mlp, train, val, **kw)  # stderr is pytest's capture, not a terminal: nothing
    assert capsys.readouterr() == ("", "")
    psa.fit(tiny_mlp, train, val, progress=True, **kw)
    out, err = capsys.readouterr()
    lines = err.splitlines()
    assert out == "" and len(lines) == 2 and all(line.startswith("psa.fit tiny_mlp: loop ") for line in lines)
    assert "loop 2/2  none " in lines[1] and " output " in lines[1] and "eta 0.0 s" in lines[1]
    with pytest.raises(ConfigError, match="progress must be True or False"):
        psa.fit(tiny_mlp, train, val, progress="yes", **kw)


def test_progress_bar_on_a_terminal():
    console = Console(file=io.StringIO(), width=160, force_terminal=True, color_system=None)
    with FitProgress(None, "psa.fit m", 3, console=console) as p:
        assert p.on and p.live
        p.loop_done(1, {"none": 91.5, "hidden": 92.25})
        p.loop_done(3, {"none": 93.0, "hidden": 92.25})
    text = console.file.getvalue()
    assert "psa.fit m" in text and "3/3" in text and "none 93.00  hidden 92.25" in text and "eta" in text
    assert not FitProgress(False, "t", 1, console=console).on
    assert best_text({f"c{i}": float(i) for i in range(6)}) == "best 5.00 (c5)"
    assert [duration(s) for s in (0.84, 42.4, 192, 7500)] == ["0.8 s", "42 s", "3 min 12 s", "2 h 05 min"]


def test_dry_run_estimates_without_training_the_run(mnist, capsys):
    train, val, test = splits(mnist, 256, 200, 100)
    calls = []
    est = psa.fit(tiny_mlp, train, val, test, modes=["none", "hidden"], trials=2, meta_loops=50, batch_size=64,
                  dry_run=True, on_loop=lambda loop, s: calls.append(loop))
    assert isinstance(est, FitEstimate) and calls == [] and capsys.readouterr() == ("", "")
    assert (est.members, est.trials, est.meta_loops, est.conditions, est.steps_per_loop) == (4, 2, 50,
                                                                                              ("none", "hidden"), 4)
    assert est.batched is True and est.batching.startswith("auto: ")  # an MLP's population, as the run takes
    assert est.seconds > est.setup_seconds > 0 and est.loop_seconds > 0 and 0.2 <= est.uncertainty
    assert est.low < est.seconds < est.high
    assert "4 members" in str(est) and "50 meta-loops" in str(est) and repr(est).startswith("FitEstimate(seconds=")
    est = psa.fit(tiny_mlp, train, val, trials=1, meta_loops=2, batch_size=64, dry_run=True, progress=True)
    assert "psa.fit tiny_mlp (dry run): about " in capsys.readouterr().err


# ------------------------------------------------------------------------------------------
# warnings at the caller's line


class TwoReaders(nn.Module):
    """A unit layer whose output two operations read: psa notes that it zeroes only the
    incoming side in hidden mode (a warning about the model)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.head = nn.Linear(784, 8), nn.Linear(8, 8), nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.a(x))
        return self.head(torch.relu(self.b(h)) + h)


def warns_itself() -> nn.Module:
    warnings.warn("the factory's own warning", UserWarning)
    return tiny_mlp()


def test_warnings_point_at_the_callers_line(mnist):
    train, val, _ = splits(mnist, 64, 32)
    psa_loop._NOTED.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        line = sys._getframe().f_lineno + 1
        psa.fit(TwoReaders, train, val, modes=["hidden"], trials=1, meta_loops=1)
    notes = [w for w in caught if str(w.message).startswith("psa: ")]
    assert any("used 2 times" in str(w.message) for w in notes)  # the model's note
    assert any("batched='auto' chose" in str(w.message) for w in notes)  # the path auto chose
    assert all((w.filename, w.lineno) == (__file__, line) for w in notes), [(w.filename, w.lineno) for w in notes]
    # warnings that are not psa's keep their own place
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        psa.fit(warns_itself, train, val, modes=["none"], trials=1, meta_loops=1)
    own = [w for w in caught if str(w.message) == "the factory's own warning"]
    assert own and own[0].lineno == warns_itself.__code__.co_firstlineno + 1


def test_warn_lands_outside_psa():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warn("psa: a note")
    assert caught[0].filename == __file__ and caught[0].category is RuntimeWarning
