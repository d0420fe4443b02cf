"""batched="auto": a fixed rule of the model and the device picks the population (vmap) or one
member at a time (psa.core.module.engine.auto_batched); its records are the chosen path's, it is said
once, and a study stores the choice so that a resume trains on the same path."""

from __future__ import annotations

import json
import sqlite3
import warnings
from pathlib import Path

import pytest
import torch

import psa
from psa.core import data as psa_data
from psa.core import loop as psa_loop
from psa.core.errors import ConfigError
from psa.core.module.engine import ModuleEngine, auto_batched, choose_batching, convolutions
from psa.core.module.population import ModulePopulation
from psa.core.hparams import HParams

from . import factories
from .conftest import on_each_loop, one_line_error, run_main

CNN, MLP = "tests.factories:small_cnn", "tests.factories:small_mlp"


def test_the_rule_picks_one_at_a_time_for_convolutions_on_a_cpu_only() -> None:
    cnn, mlp = convolutions(factories.small_cnn()), convolutions(factories.small_mlp())
    assert cnn == ("0", "2") and mlp == ()
    assert auto_batched(cnn, "cpu")[0] is False and "2 convolutions" in auto_batched(cnn, "cpu")[1]
    assert auto_batched(mlp, "cpu") == (True, "it has no convolution, and on a CPU its population (vmap) is faster")
    for device in ("cuda", "cuda:1", "mps"):  # named only: the rule reads the device's type
        assert auto_batched(cnn, torch.device(device))[0] is True and auto_batched(mlp, device)[0] is True
    conv1d = torch.nn.Sequential(torch.nn.Conv1d(1, 2, 3), torch.nn.Flatten(), torch.nn.Linear(2 * 782, 10))
    assert convolutions(conv1d) == ("0",) and auto_batched(convolutions(conv1d), "cpu")[0] is False


def _split(mnist: psa_data.Dataset, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    return mnist.train_x[:n].view(-1, 1, 28, 28), mnist.train_y[:n]


@pytest.mark.parametrize("make, chosen", [(factories.small_cnn, False), (factories.small_mlp, True)])
def test_auto_gives_the_chosen_paths_records_and_says_so_once(mnist: psa_data.Dataset, make, chosen: bool) -> None:
    train, val = _split(mnist, 256), (mnist.val_x[:500].view(-1, 1, 28, 28), mnist.val_y[:500])
    kw = dict(modes=("none", "dropout", "hidden"), trials=2, meta_loops=3, variants={"p1": {"patience": 1}})
    psa_loop._NOTED.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        auto = psa.fit(make, train, val, **kw)
        again = psa.fit(make, train, val, **kw)
    said = [str(w.message) for w in caught if "batched='auto'" in str(w.message)]
    path = "the population (vmap)" if chosen else "one member at a time"
    assert len(said) == 1 and f"chose {path}: " in said[0] and said[0].startswith("psa: tests.factories:")
    explicit = psa.fit(make, train, val, batched=chosen, **kw)
    assert auto.batched is chosen and auto.batching.startswith("auto: ")
    assert explicit.batched is chosen and explicit.batching.startswith(f"batched={chosen}")
    assert auto.records == explicit.records == again.records  # bit for bit: the same path
    assert auto.bounty == explicit.bounty
    for key in auto._states:
        assert all(torch.equal(a, b) for a, b in zip(auto.state_dict(*key).values(),
                                                     explicit.state_dict(*key).values()))


def test_a_bad_batched_argument_is_a_config_error(mnist: psa_data.Dataset) -> None:
    ds = psa_data.Dataset("m", *_split(mnist, 64), *_split(mnist, 32), *_split(mnist, 8), "given")
    pop = ModulePopulation.create(factories.small_mlp, [HParams().member("none", 1)], ds)
    for bad in ("yes", 1, None):
        with pytest.raises(ConfigError, match="batched must be True, False or 'auto'"):
            choose_batching(bad, (), "cpu")  # type: ignore[arg-type]
        with pytest.raises(ConfigError, match="batched must be True or False here"):
            ModuleEngine(pop, ds, HParams(), batched=bad)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="choose_batching resolves 'auto'"):
        ModuleEngine(pop, ds, HParams(), batched="auto")  # type: ignore[arg-type]


STUDY = ["study", "--model", CNN, "--model", MLP, "--modes", "none,hidden", "--trials", "2", "--meta-loops", "2",
         "--train-subset", "256", "--name", "b", "--quiet", "--db", "b.sqlite"]


def _stored(db: Path) -> dict:
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return json.loads(con.execute("SELECT design FROM studies").fetchone()[0])["plan"]["modules"]
    finally:
        con.close()


def test_a_study_stores_its_choice_shows_it_and_resumes_on_it(tmp_path: Path, monkeypatch) -> None:
    """Created with --batched yes, interrupted, resumed without the flag (auto would train the
    CNN one at a time here): the resume trains it through vmap, as stored; status shows it; a
    resume that asks for the other path is refused in one line."""
    rc, out, err = run_main([*STUDY[:-5], "--dry-run", "--json"], tmp_path)
    assert rc == 0, err
    rows = {r["arch"]: r for r in json.loads(out)["architectures"]}
    assert (rows[CNN]["batched"], rows[MLP]["batched"]) == (False, True)
    assert f"{CNN}: one member at a time (auto: it has 2 convolutions" in err
    def interrupt(study, ev):
        raise KeyboardInterrupt

    with on_each_loop(interrupt):
        rc, _, err = run_main([*STUDY, "--batched", "yes", "--checkpoint-every", "0"], tmp_path)
    assert rc == 130
    stored = _stored(tmp_path / "b.sqlite")
    assert {s: (m["batched"], m["batching"]) for s, m in stored.items()} == {
        CNN: (True, "--batched yes"), MLP: (True, "--batched yes")}
    rc, _, err = run_main([*STUDY, "--batched", "no"], tmp_path)
    assert rc == 2 and f"trains {CNN} with --batched yes" in one_line_error(err)
    paths: list[bool] = []
    train_batched, train_single = ModuleEngine._train_batched, ModuleEngine._train_single
    monkeypatch.setattr(ModuleEngine, "_train_batched", lambda self, *a: paths.append(True) or train_batched(self, *a))
    monkeypatch.setattr(ModuleEngine, "_train_single", lambda self, *a: paths.append(False) or train_single(self, *a))
    rc, _, err = run_main([a for a in STUDY if a != "--quiet"], tmp_path)
    assert rc == 0, err
    assert "1 populations continue from their checkpoints" in err
    assert f"{CNN}: the members together (vmap) (--batched yes)" in err
    assert paths and all(paths)  # 1 loop of the CNN's population resumed, 2 of the MLP's: all through vmap
    rc, out, _ = run_main(["status", "--db", "b.sqlite", "--json"], tmp_path)
    (info,) = json.loads(out)["studies"]
    assert info["models"] == {CNN: {"batched": True, "batching": "--batched yes"},
                              MLP: {"batched": True, "batching": "--batched yes"}}
    rc, out, _ = run_main(["status", "--db", "b.sqlite"], tmp_path)
    assert f"{MLP}: the members together (vmap) (--batched yes)" in out


def test_a_new_study_stores_what_auto_chose(tmp_path: Path) -> None:
    rc, _, err = run_main(STUDY, tmp_path)
    assert rc == 0, err
    stored = _stored(tmp_path / "b.sqlite")
    assert (stored[CNN]["batched"], stored[MLP]["batched"]) == (False, True)
    assert stored[CNN]["batching"].startswith("auto: it has 2 convolutions")


def test_a_study_from_before_auto_resumes_through_vmap(tmp_path: Path) -> None:
    """A stored plan without the choice (psa before batched="auto" trained every module model
    through vmap) keeps that path."""
    rc, _, err = run_main(STUDY, tmp_path)
    assert rc == 0, err
    con = sqlite3.connect(tmp_path / "b.sqlite")
    doc = json.loads(con.execute("SELECT design FROM studies").fetchone()[0])
    for m in doc["plan"]["modules"].values():
        del m["batched"], m["batching"]
    con.execute("UPDATE studies SET design = ?", (json.dumps(doc),))
    con.commit()
    con.close()
    rc, _, err = run_main([a for a in STUDY if a != "--quiet"], tmp_path)
    assert rc == 0 and f"{CNN}: the members together (vmap) (created before batched='auto'" in err
    rc, _, err = run_main([*STUDY, "--batched", "no"], tmp_path)
    assert rc == 2 and "resume it with the same" in one_line_error(err)


def test_batched_applies_to_module_models_only(tmp_path: Path) -> None:
    rc, _, err = run_main(["study", "--arch", "1*8", "--trials", "1", "--meta-loops", "1", "--train-subset", "256",
                           "--db", "x.sqlite", "--batched", "no", "--quiet"], tmp_path)
    assert rc == 2 and "--batched applies to a model given as module:function" in one_line_error(err)
    assert list(tmp_path.iterdir()) == []
