"""The study's checkpoint writer (psa.study.checkpoints): writes in order on its own thread,
copies that later training cannot touch, one write queued per population, a failure that stops
the writer and is raised once on the caller's thread; and in a study, the scheduler going on
while a checkpoint is still being written."""

from __future__ import annotations

import errno
import threading
from pathlib import Path

import pytest
import torch

from psa.core.checkpoint import load_tensors
from psa.study import checkpoints
from psa.study.checkpoints import CheckpointWriter, host_copy
from psa.study.events import LoopDone
from psa.study.options import StudyError

from .conftest import TINY, leftover_checkpoints, on_each_loop, rows, run_main

WAIT = 30.0  # seconds a test waits for the writer's thread before it calls the wait lost


def _state(value: float, n: int = 16) -> dict[str, torch.Tensor]:
    return {"lkg": torch.full((n,), value), "lkg_correct": torch.tensor([int(value)])}


def _blocking_saves(monkeypatch: pytest.MonkeyPatch) -> tuple[list[str], threading.Event]:
    """save_tensors that logs each path it writes and waits for `go` before writing it."""
    written: list[str] = []
    go = threading.Event()
    real = checkpoints.save_tensors

    def save(path, tensors, meta):
        assert go.wait(WAIT), "the test never let the write go"
        written.append(Path(path).name)
        real(path, tensors, meta)

    monkeypatch.setattr(checkpoints, "save_tensors", save)
    return written, go


def test_host_copy_of_a_live_state_is_the_state_at_the_copy(tmp_path: Path) -> None:
    state = _state(1.0)
    live = host_copy(state, live=True)
    shipped = host_copy(state, live=False)
    state["lkg"].add_(1.0)  # the trainer's next loop
    assert torch.equal(live["lkg"], torch.full((16,), 1.0))
    assert torch.equal(shipped["lkg"], state["lkg"])  # not live: the caller's own tensors, not copied again
    w = CheckpointWriter()
    w.submit("a", tmp_path / "a.safetensors", live, {"format": "psa-checkpoint-1", "loop": 1})
    state["lkg"].add_(1.0)
    w.close()
    tensors, meta = load_tensors(tmp_path / "a.safetensors")
    assert torch.equal(tensors["lkg"], torch.full((16,), 1.0)) and meta["loop"] == 1


def test_writes_land_in_order_and_the_last_one_stays(tmp_path: Path) -> None:
    w = CheckpointWriter()
    for loop in range(1, 6):
        for key in ("a", "b"):
            w.submit(key, tmp_path / f"{key}.safetensors", _state(float(loop)),
                     {"format": "psa-checkpoint-1", "loop": loop})
    w.wait()
    for key in ("a", "b"):
        tensors, meta = load_tensors(tmp_path / f"{key}.safetensors")
        assert meta["loop"] == 5 and float(tensors["lkg"][0]) == 5.0
    w.close()
    assert not list(tmp_path.glob(".*.tmp"))


def test_submit_returns_before_the_write_and_queues_one_per_population(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    written, go = _blocking_saves(monkeypatch)
    w = CheckpointWriter()
    w.submit("a", tmp_path / "a.safetensors", _state(1.0), {"format": "psa-checkpoint-1", "loop": 1})
    w.submit("b", tmp_path / "b.safetensors", _state(1.0), {"format": "psa-checkpoint-1", "loop": 1})
    assert written == []  # both queued, neither written: the caller went on
    # a's next checkpoint waits for a's first: started on another thread, it is still waiting
    second = threading.Thread(target=w.submit, args=("a", tmp_path / "a.safetensors", _state(2.0),
                                                      {"format": "psa-checkpoint-1", "loop": 2}))
    second.start()
    second.join(0.5)
    assert second.is_alive() and written == []
    go.set()
    second.join(WAIT)
    assert not second.is_alive()
    w.close()
    assert written == ["a.safetensors", "b.safetensors", "a.safetensors"]
    assert load_tensors(tmp_path / "a.safetensors")[1]["loop"] == 2


def test_queued_copies_are_held_to_the_byte_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    written, go = _blocking_saves(monkeypatch)
    one = 16 * 4 + 8  # _state's bytes
    w = CheckpointWriter(max_pending_bytes=2 * one)
    meta = {"format": "psa-checkpoint-1", "loop": 1}
    w.submit("a", tmp_path / "a.safetensors", _state(1.0), meta)
    w.submit("b", tmp_path / "b.safetensors", _state(1.0), meta)
    third = threading.Thread(target=w.submit, args=("c", tmp_path / "c.safetensors", _state(1.0), meta))
    third.start()
    third.join(0.5)
    assert third.is_alive()  # a third copy would pass the limit: it waits for the oldest
    go.set()
    third.join(WAIT)
    assert not third.is_alive()
    w.close()
    assert written == ["a.safetensors", "b.safetensors", "c.safetensors"]
    # one copy larger than the limit still goes (alone)
    w = CheckpointWriter(max_pending_bytes=1)
    w.submit("d", tmp_path / "d.safetensors", _state(1.0), meta)
    w.close()
    assert (tmp_path / "d.safetensors").is_file()


def test_a_failed_write_stops_the_writer_and_is_raised_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = checkpoints.save_tensors
    go = threading.Event()

    def save(path, tensors, meta):
        if Path(path).name == "a.safetensors":
            assert go.wait(WAIT)
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, tensors, meta)

    monkeypatch.setattr(checkpoints, "save_tensors", save)
    w = CheckpointWriter()
    meta = {"format": "psa-checkpoint-1", "loop": 1}
    w.submit("a", tmp_path / "a.safetensors", _state(1.0), meta)
    w.submit("b", tmp_path / "b.safetensors", _state(1.0), meta)  # queued behind a, which then fails
    go.set()
    with pytest.raises(StudyError, match="no space left on device writing .*a.safetensors.*rerun the same command"):
        w.wait()
    assert not (tmp_path / "b.safetensors").exists()  # nothing after the failure, as after a kill
    w.check()  # said once: a study that stopped on it does not hear it again
    w.submit("c", tmp_path / "c.safetensors", _state(1.0), meta)
    w.close()
    assert not (tmp_path / "c.safetensors").exists()


def test_the_study_goes_on_while_a_checkpoint_is_written(reference: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The first population's loop 2 is recorded while its loop-1 checkpoint is still held
    back; in the end every checkpoint was written, the rows are the reference's and no
    checkpoint is left behind."""
    written, go = _blocking_saves(monkeypatch)
    seen: list[tuple[str, int, int]] = []

    def after(study, ev: LoopDone) -> None:
        seen.append((ev.key, ev.loop, len(written)))
        if ev.loop == 2:
            go.set()

    db = tmp_path / "bg.sqlite"
    with on_each_loop(after, written=False):
        rc, out, err = run_main(["study", *TINY, "--db", str(db), "--checkpoint-every", "3600"], tmp_path)
    assert rc == 0, err
    assert seen[1] == (seen[0][0], 2, 0)  # loop 2 handled, loop 1's checkpoint not written yet
    assert len(written) == 4  # each population's first loop
    assert rows(db) == rows(reference)
    assert leftover_checkpoints(db) == []
