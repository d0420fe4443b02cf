"""`psa study --backend ray` on a local Ray instance (2 CPUs): the same rows as the local backend,
even after a worker running a population is killed mid-study."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from psa.cli import main

from .conftest import env, integrity, leftover_checkpoints, progress, psa_cmd, rows, tiny_as

pytest.importorskip("ray")

RAY = tiny_as("viaray", "30", "4096")


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [root]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _population_workers(root: int) -> list[int]:
    """Ray workers (started by our driver) that are running a population task right now."""
    pids = []
    for pid in _descendants(root):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if cmd.startswith("ray::_population_task"):
            pids.append(pid)
    return pids


@pytest.mark.slow
def test_ray_backend_gives_the_local_rows_and_survives_a_lost_worker(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    # each Ray worker trains with --cpus-per-task (1) threads, and on some CPUs a GEMM's bits
    # depend on its thread count: the local reference trains with as many
    torch.set_num_threads(1)  # the autouse _fixed_threads fixture restores it
    assert main(["study", *RAY, "--db", "local.sqlite"]) == 0
    db = tmp_path / "ray.sqlite"
    proc = subprocess.Popen(psa_cmd("study", *RAY, "--db", db.name, "--backend", "ray", "--num-cpus", "2"),
                            cwd=tmp_path, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    killed = None
    try:
        deadline = time.monotonic() + 300
        while proc.poll() is None and time.monotonic() < deadline and killed is None:
            if progress(db) > 0:  # a population has recorded a loop: its worker is mid-task
                workers = _population_workers(proc.pid)
                if workers:
                    killed = workers[0]
                    os.kill(killed, signal.SIGKILL)
            time.sleep(0.05)
        _, err = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert killed is not None, "no Ray worker was caught running a population"
    assert proc.returncode == 0, err
    assert "worker lost" in err and "resubmitting from its checkpoint" in err
    assert integrity(db) == "ok"
    local, viaray = rows(tmp_path / "local.sqlite"), rows(db)
    assert viaray["trials"] == local["trials"]
    assert viaray["meta_loops"] == local["meta_loops"]
    assert viaray["studies"] == local["studies"]
    assert leftover_checkpoints(db) == []


def _worker_events(monkeypatch, checkpoint_every: float, dataset: str = "mnist",
                   data: tuple[str, str | None] = ("mnist", None), worker_cwd: Path | None = None) -> list:
    """The events of psa.study.backends.ray's population task run in this process (a stand-in `ray`
    module answers its one question: no GPU here)."""
    import sys
    import types

    from psa.study.design import StudyDesign
    from psa.study.plan import make_plan
    from psa.study.backends.ray import _population_task
    from psa.study.kinds import model_kind

    monkeypatch.setitem(sys.modules, "ray", types.SimpleNamespace(get_gpu_ids=lambda: []))
    subset = 512 if dataset == "mnist" else None
    design = StudyDesign.from_fields(architectures=("1*8",), modes=("none", "hidden"), trials=2, meta_loops=4,
                                     train_subset=subset, dataset=dataset)
    pp = make_plan(design, 4).populations[0]
    engine = {"precision": "fp32", "kernels": "auto", "graphs": True}
    if worker_cwd is not None:  # the plan is the driver's; the task runs where the worker is
        monkeypatch.chdir(worker_cwd)
    return list(_population_task(model_kind(design), pp, None, 0.0, data, 1, engine, checkpoint_every))


def test_a_ray_worker_reads_a_relative_npz_path_from_the_drivers_directory(tmp_path, monkeypatch) -> None:
    """Ray starts workers in its own directories: the driver hands them absolute paths."""
    from psa.study.events import LoopDone
    from psa.study.backends.ray import worker_data_paths

    from .test_datasets import write_npz

    (tmp_path / "driver").mkdir()
    (tmp_path / "worker").mkdir()
    write_npz(tmp_path / "driver" / "mine.npz")
    monkeypatch.chdir(tmp_path / "driver")
    paths = worker_data_paths("npz:mine.npz", "data")
    assert paths == (f"npz:{tmp_path / 'driver' / 'mine.npz'}", str(tmp_path / "driver" / "data"))
    assert worker_data_paths("fashion-mnist", None) == ("fashion-mnist", None)
    # the task runs where the relative path names no file
    events = _worker_events(monkeypatch, 0.0, "npz:mine.npz", paths, worker_cwd=tmp_path / "worker")
    loops = [ev for ev in events if isinstance(ev, LoopDone)]
    assert [ev.loop for ev in loops] == [1, 2, 3, 4] and all(len(ev.rows) > 0 for ev in loops)


def test_a_ray_worker_ships_its_population_only_when_a_checkpoint_is_due(monkeypatch) -> None:
    from psa.study.events import LoopDone

    rare = [ev for ev in _worker_events(monkeypatch, float("inf")) if isinstance(ev, LoopDone)]
    assert [ev.loop for ev in rare] == [1, 2, 3, 4]
    # the first loop's copy (as the local backend checkpoints its first loop), then rows only
    assert [ev.checkpoint for ev in rare] == [True, False, False, False]
    tensors, meta = rare[0].checkpoint_state()
    assert all(t.device.type == "cpu" for t in tensors.values()) and meta["loop"] == 1
    assert all(ev.state is None for ev in rare[1:])

    every = [ev for ev in _worker_events(monkeypatch, 0.0) if isinstance(ev, LoopDone)]
    assert [ev.checkpoint for ev in every] == [True] * 4
    assert [ev.checkpoint_state()[1]["loop"] for ev in every] == [1, 2, 3, 4]  # copies, not the live population
    assert [ev.rows for ev in every] == [ev.rows for ev in rare]


def test_a_ray_worker_trains_a_model_of_your_own_from_the_drivers_directory(tmp_path, monkeypatch) -> None:
    """A module study's population task, run where the worker runs (not the driver's directory):
    it imports the factory from the directory the study was started in, and its rows are those
    of the local backend's run of the same population."""
    import sys
    import types

    from psa.study.backends.ray import _population_task
    from psa.study.design import StudyDesign
    from psa.study.events import LoopDone
    from psa.study.kinds import model_kind
    from psa.study.plan import make_plan
    from psa.study.runner import design_data, population_events
    from psa.core.device import resolve_execution

    driver = tmp_path / "driver"
    driver.mkdir()
    (driver / "raymodels.py").write_text(
        "from torch import nn\n\n\ndef mlp():\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(784, 8), nn.ReLU(), nn.Linear(8, 10))\n")
    monkeypatch.chdir(driver)
    design = StudyDesign.from_fields(model="raymodels:mlp", modes=("none", "hidden"), trials=2, meta_loops=2,
                                     train_subset=256)
    kind = model_kind(design)
    data = design_data(kind, None, torch.device("cpu"))
    kind.check(data)
    kind.record(torch.device("cpu"), __import__("psa.study.options", fromlist=["RunOptions"]).RunOptions())
    pp = make_plan(design, 4).populations[0]
    local = [ev.rows for ev in population_events(kind, pp, data, None, resolve_execution("cpu"))
             if isinstance(ev, LoopDone)]
    # the worker: elsewhere, and without the factory's module imported yet
    worker = tmp_path / "worker"
    worker.mkdir()
    monkeypatch.chdir(worker)
    monkeypatch.delitem(sys.modules, "raymodels")
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in (str(driver), "")])
    from psa.study import modules

    monkeypatch.setattr(modules, "_FACTORIES", {})
    monkeypatch.setitem(sys.modules, "ray", types.SimpleNamespace(get_gpu_ids=lambda: []))
    execution = {"precision": "fp32", "kernels": "auto", "graphs": True}
    events = list(_population_task(kind, pp, None, 0.0, ("mnist", None), 1, execution, 0.0))
    assert [ev.rows for ev in events if isinstance(ev, LoopDone)] == local


@pytest.mark.slow
def test_a_module_study_on_ray_gives_the_local_rows(tmp_path: Path) -> None:
    """`psa study --model ... --backend ray` on a local Ray instance: the rows, design and plan
    of the local backend's run."""
    (tmp_path / "raymodels.py").write_text(
        "from torch import nn\n\n\ndef mlp():\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(784, 8), nn.ReLU(), nn.Dropout(), nn.Linear(8, 10))\n")
    argv = ["study", "--model", "raymodels:mlp", "--modes", "none,dropout,hidden", "--trials", "2",
            "--meta-loops", "3", "--train-subset", "512", "--name", "mod", "--quiet"]
    one_thread = dict(env(), OMP_NUM_THREADS="1")  # as each Ray worker trains (--cpus-per-task 1)
    for db, extra in (("local.sqlite", []), ("ray.sqlite", ["--backend", "ray", "--num-cpus", "2"])):
        done = subprocess.run(psa_cmd(*argv, "--db", db, *extra), cwd=tmp_path, env=one_thread, capture_output=True,
                              text=True, timeout=600)
        assert done.returncode == 0, done.stderr
    local, viaray = rows(tmp_path / "local.sqlite"), rows(tmp_path / "ray.sqlite")
    assert viaray["trials"] == local["trials"] and viaray["meta_loops"] == local["meta_loops"]
    assert viaray["studies"] == local["studies"]


@pytest.mark.parametrize("flags, message", [
    (["--address", "127.0.0.1:1"], "cannot reach Ray at 127.0.0.1:1: Connection refused"),
    (["--num-cpus", "1", "--cpus-per-task", "2"], "--cpus-per-task 2 exceeds the cluster's 1 CPUs"),
])
def test_a_ray_cluster_that_cannot_run_the_study_writes_nothing(tmp_path: Path, flags: list[str],
                                                                 message: str) -> None:
    """An address nothing listens at is one line at once (Ray itself retries it for minutes), and
    both refusals come before the study is created: no database is left behind."""
    done = subprocess.run(psa_cmd("study", *RAY, "--db", "x.sqlite", "--backend", "ray", *flags), cwd=tmp_path,
                          env=env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and message in done.stderr, done.stderr
    assert not (tmp_path / "x.sqlite").exists() and not list(tmp_path.glob("x.*"))
