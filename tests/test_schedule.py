"""Populations in flight: the schedule the dry run simulates (psa.study.schedule), the share of
the device a population fills alone (psa.study.estimate.concurrent_share, on fake trainers whose
loops overlap or take turns), and the local backend's choice of the next finished loop."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from psa.study.backends.local import first_ready, slots_for
from psa.study.estimate import Estimate, concurrent_share
from psa.study.schedule import Job, admits, in_flight_seconds, interpolate_share

from .conftest import TINY, run_main


def test_one_slot_is_the_sum_of_the_populations() -> None:
    jobs = [Job(3.0, share=0.1), Job(2.5, share=1.0), Job(0.5, share=0.3)]
    assert in_flight_seconds(jobs, 1) == pytest.approx(6.0)
    assert in_flight_seconds([], 8) == 0.0


def test_populations_that_overlap_take_as_long_as_the_longest() -> None:
    # eight small nets, each an eighth of the device: together no slower than alone
    assert in_flight_seconds([Job(s, share=0.125) for s in (1, 2, 3, 4, 5, 6, 7, 8)], 8) == pytest.approx(8.0)
    # more of them than slots: the ninth starts when the first finishes
    assert in_flight_seconds([Job(1.0, share=0.125)] * 9, 8) == pytest.approx(2.0)


def test_populations_that_fill_the_device_share_it() -> None:
    # each fills the device: in flight or not, the sum
    assert in_flight_seconds([Job(4.0), Job(4.0), Job(4.0)], 8) == pytest.approx(12.0)
    # a big net (share 1, 10 s) beside a small one (share 0.1, 1 s): 1.1 of a device, so each
    # runs at 1/1.1 of its speed until the small one has done its 1 s of work at 1.1 s; the big
    # one then has 9 s left alone
    assert in_flight_seconds([Job(10.0, share=1.0), Job(1.0, share=0.1)], 2) == pytest.approx(10.1)
    # three of 0.5: 1.5 of a device while all three run
    assert in_flight_seconds([Job(3.0, share=0.5)] * 3, 3) == pytest.approx(4.5)


def test_memory_admits_populations_as_the_backend_does() -> None:
    assert admits(0, 100, 10.0, any_in_flight=False)  # the first always runs
    assert admits(4, 6, 10.0, True) and not admits(5, 6, 10.0, True) and admits(10**12, 1, None, True)
    # two populations of 6 bytes in 10: one after another though they would overlap
    assert in_flight_seconds([Job(2.0, 6, 0.1), Job(3.0, 6, 0.1)], 8, budget=10) == pytest.approx(5.0)
    assert in_flight_seconds([Job(2.0, 6, 0.1), Job(3.0, 6, 0.1)], 8, budget=12) == pytest.approx(3.0)
    # in plan order: the one that does not fit waits for memory, the others do not pass it
    jobs = [Job(4.0, 6, 0.1), Job(1.0, 6, 0.1), Job(1.0, 1, 0.1)]
    assert in_flight_seconds(jobs, 8, budget=10) == pytest.approx(5.0)


def test_shares_are_interpolated_by_step_time() -> None:
    measured = [(1e-3, 0.2), (1e-1, 1.0)]
    assert interpolate_share(1e-2, measured) == pytest.approx(0.6)  # half-way in log(step)
    assert interpolate_share(1e-4, measured) == 0.2 and interpolate_share(1.0, measured) == 1.0
    assert interpolate_share(1e-3, measured) == pytest.approx(0.2)
    assert interpolate_share(5e-3, []) == 1.0


class _Pending:
    def __init__(self, checks_until_ready: int) -> None:
        self.left = checks_until_ready

    def ready(self) -> bool:
        self.left -= 1
        return self.left < 0


def test_the_backend_takes_the_first_loop_to_finish_not_the_oldest() -> None:
    waits: list[int] = []
    pending = [_Pending(5), _Pending(2), _Pending(3)]
    assert first_ready(pending, wait=lambda: waits.append(1)) == 1 and len(waits) == 2
    assert first_ready([_Pending(4), None], wait=lambda: None) == 1  # a loop already collected counts as done
    assert first_ready([_Pending(0), _Pending(0)], wait=lambda: pytest.fail("waited")) == 0
    assert slots_for(torch.device("cpu"), None) == 1 and slots_for(torch.device("cuda"), None) == 8
    assert slots_for(torch.device("cpu"), 3) == 3
    # a card's streams, one per population besides the side stream
    assert slots_for(torch.device("cuda"), 100) == 31 and slots_for(torch.device("cpu"), 100) == 100


class _Broken:
    def ready(self) -> bool:
        raise RuntimeError("CUDA error: an illegal memory access was encountered")


def test_first_ready_neither_polls_one_loop_nor_waits_on_none_nor_raises_a_loops_error() -> None:
    """One loop in flight: taken at once (its result() waits), not polled every 0.2 ms; no loop:
    an error, not a wait forever; a loop whose ready() raises counts as finished, so that the
    backend's handling of its result() records that population's failure."""
    alone = _Pending(10**9)
    assert first_ready([alone], wait=lambda: pytest.fail("polled one loop")) == 0 and alone.left == 10**9
    with pytest.raises(ValueError):
        first_ready([], wait=lambda: pytest.fail("waited on no loop"))
    assert first_ready([_Pending(3), _Broken(), _Pending(0)], wait=lambda: pytest.fail("waited")) == 1


@dataclasses.dataclass
class _Data:
    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor


class _Loop:
    def __init__(self, ends: float) -> None:
        self.ends = ends

    def ready(self) -> bool:
        return time.perf_counter() >= self.ends

    def result(self) -> None:
        time.sleep(max(0.0, self.ends - time.perf_counter()))


class _Trainer:
    """A loop of `seconds`: queued on a device of its own (`overlap`: launch returns at once and
    the loops of several trainers run side by side) or computed in launch (they take turns)."""

    def __init__(self, seconds: float, overlap: bool) -> None:
        self.seconds, self.overlap = seconds, overlap

    def launch(self, on_step: object = None) -> _Loop:
        if not self.overlap:
            time.sleep(self.seconds)
            return _Loop(0.0)
        return _Loop(time.perf_counter() + self.seconds)


def _kind(overlap: bool, made: list) -> SimpleNamespace:
    def new_trainer(pp: object, data: _Data, ex: object, start: object, stream: object) -> _Trainer:
        made.append((data.train_x.shape[0], start))
        return _Trainer(0.04, overlap)

    design = SimpleNamespace(n_train=1000, hparams=SimpleNamespace(batch_size=100))
    return SimpleNamespace(design=design, new_trainer=new_trainer)


def test_a_population_that_overlaps_its_copies_fills_a_part_of_the_device() -> None:
    """Four copies whose loops run side by side take about one loop: a quarter of the device
    each (the measurement's floor); four that take turns take four loops: all of it."""
    data = _Data(torch.zeros(1000, 2), torch.zeros(1000), torch.zeros(10, 2), torch.zeros(10))
    ex = SimpleNamespace(device=torch.device("cpu"))
    made: list = []
    side_by_side = concurrent_share(_kind(True, made), ex, data, SimpleNamespace(), steps=3, copies=4)
    assert 0.25 <= side_by_side < 0.5
    # the copies train on the first `steps` batches, from scratch
    assert made == [(300, None)] * 4
    in_turn = concurrent_share(_kind(False, []), ex, data, SimpleNamespace(), steps=3, copies=4)
    assert 0.8 < in_turn <= 1.0


def test_the_estimate_of_a_study_partly_done_simulates_what_is_left() -> None:
    est = Estimate("test", 2.0, {"a": 10.0, "b": 4.0}, (), 0.2, 0.0, slots=2,
                   jobs=(Job(10.0, share=0.5, net="a", key="a1"), Job(4.0, share=0.5, net="b", key="b1")))
    assert est.sequential == pytest.approx(16.0) and est.total == pytest.approx(12.0)
    assert est.populations_s({"a1": 0.0}) == pytest.approx(4.0)
    assert est.populations_s({"a1": 0.0, "b1": 0.25}) == pytest.approx(1.0)
    alone = dataclasses.replace(est, slots=1)
    assert alone.total == pytest.approx(16.0) and alone.populations_s({"a1": 0.0}) == pytest.approx(4.0)
    assert dataclasses.replace(est, jobs=()).total == pytest.approx(16.0)


def test_what_is_left_of_a_net_is_some_of_its_populations_whole() -> None:
    """Four populations of one net, each an eighth of the device, two of them done: the two
    left take as long as all four did (they overlap), not half of it (four halves)."""
    from psa.study.design import StudyDesign
    from psa.study.dry_run import populations_left
    from psa.study.plan import make_plan

    jobs = tuple(Job(10.0, share=0.125, net="a", key=f"a{i}") for i in range(4))
    est = Estimate("test", 0.0, {"a": 40.0}, (), 0.2, 0.0, slots=8, jobs=jobs)
    assert est.total == pytest.approx(10.0)
    assert est.populations_s({"a0": 0.0, "a1": 0.0}) == pytest.approx(10.0)
    assert dataclasses.replace(est, slots=1).populations_s({"a0": 0.0, "a1": 0.0}) == pytest.approx(20.0)
    # the dry run's part left, population by population, from the trials' status
    plan = make_plan(StudyDesign(nets=("1*8", "2*8"), modes=("hidden", "none"), trials=4), 4)
    first = plan.populations[0]
    status = {(first.net, m, v, k): "done" for k in first.trials for m, v, _ in first.conditions()}
    left = populations_left(plan, status)
    assert left[first.key] == 0.0 and all(left[pp.key] == 1.0 for pp in plan.populations[1:])
    status[(first.net, first.modes[0], "", first.first)] = "failed"
    assert 0.0 < populations_left(plan, status)[first.key] < 1.0


def test_dry_run_with_populations_in_flight_on_a_cpu(tmp_path: Path) -> None:
    """On a CPU, populations in flight take turns (a launch computes its loop): the estimate
    is the sum, said so, and nothing is measured as shared."""
    rc, out, err = run_main(["study", *TINY, "--db", "c.sqlite", "--dry-run", "--json", "--concurrency", "2"],
                            tmp_path)
    assert rc == 0, err
    plan = json.loads(out)
    assert plan["in_flight"] == 2 and plan["shares"] == {}
    assert plan["seconds"] == pytest.approx(plan["sequential_seconds"])
    assert "2 populations in flight take turns" in err and "time alone" in err


def test_shares_are_measured_for_shapes_spread_over_the_step_times(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a card (streams faked here): the quickest step first, then the slowest, then between,
    as many copies as the slots and the memory allow, none for a shape of which one copy fits,
    and no more once the time budget is spent (two shapes at least)."""
    from psa.study import estimate
    from psa.study.calibration import Probe

    monkeypatch.setattr(estimate, "synchronize", lambda device: None)
    monkeypatch.setattr(estimate, "StreamSlots", lambda device, n: SimpleNamespace(slots=n, take=lambda: None))
    copies: dict[str, int] = {}

    def share(kind: object, ex: object, data: object, pp: SimpleNamespace, steps: int, k: int) -> float:
        copies[pp.net] = k
        if pp.net == "b" and k < 8:
            raise torch.cuda.OutOfMemoryError("the memory estimate was short")
        return 0.5

    monkeypatch.setattr(estimate, "concurrent_share", share)
    step = {"a": 1e-3, "b": 4e-3, "c": 1e-2, "d": 3e-2, "e": 1e-1}
    probes = {n: Probe(n, 6, 0, s, 0, 0, 0, 0, 0, 0) for n, s in step.items()}
    shapes = [SimpleNamespace(net=n, size=6) for n in ("e", "c", "a", "d", "b")]
    kind = SimpleNamespace(design=SimpleNamespace(n_train=1000, hparams=SimpleNamespace(batch_size=100)),
                           bytes_per_member=lambda net, data, ex: 100 if net == "e" else 10)
    ex = SimpleNamespace(device=torch.device("cuda"))
    got = estimate.measure_shares(kind, ex, None, shapes, probes, slots=8, memory_budget=300, budget_s=60)
    # e: 600 bytes a copy in 300: not measured; a..d: 60 bytes, 5 copies fit; b ran out of memory
    assert list(got) == ["a", "c", "d"] and copies == {"a": 5, "c": 5, "b": 5, "d": 5}
    assert estimate.measure_shares(kind, ex, None, shapes, probes, 8, None, budget_s=0) == {"a": 0.5, "e": 0.5}
    assert copies["e"] == 8  # memory unknown: every slot
    assert estimate.measure_shares(kind, SimpleNamespace(device=torch.device("cpu")), None, shapes, probes, 8,
                                   None) == {}


def test_a_probe_on_a_busy_machine_never_prices_scoring_at_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """When the loop that scores the validation set takes no longer than the one that does not
    (every timing equal here, as a busy machine's noise can make them), an image's scoring is
    priced by the scoring loop's time over the images it passed forward, not at 0."""
    from psa.core.device import resolve_execution
    from psa.study import estimate
    from psa.study.design import StudyDesign
    from psa.study.kinds import model_kind
    from psa.study.plan import make_plan
    from psa.study.runner import cached_data, design_data_view

    design = StudyDesign(nets=("1*8",), modes=("none",), trials=1, train_subset=512)
    kind = model_kind(design)
    device = torch.device("cpu")
    data = design_data_view(kind, cached_data(design.dataset, None, device))
    monkeypatch.setattr(estimate, "_timed", lambda fn, device: (fn(), 0.01)[1])
    p = estimate.probe(kind, resolve_execution(device, "fp32"), data, make_plan(design, 1).populations[0], 0.05)
    n_val = int(data.val_y.numel())
    assert 0.01 / (n_val + 3 * 512) <= p.eval_image_s < 0.01 / n_val
