"""One estimate of where a study's time goes: population costs from probes (stored with the study
as its calibration), and the ETA = the cost left x this run's pace, in the progress bar and in
`psa status`. The clock is a fake one here; bench/eta_check.py checks a real study."""

from __future__ import annotations

import datetime
import json
import sqlite3
from pathlib import Path
from types import SimpleNamespace

import pytest

from psa.study import store
from psa.study.calibration import (
    Probe,
    analytic_costs,
    calibration_record,
    fit_terms,
    plan_costs,
    population_seconds,
    probe_costs,
    record_probes,
    stored_costs,
)
from psa.study.design import StudyDesign
from psa.study.estimate import spread_order
from psa.study.eta import RunPace, eta_seconds, status_eta
from psa.study.events import LoopDone, PopulationDone, PopulationFailed, Started
from psa.study.kinds import model_kind
from psa.study.lock import StudyLock, checkpoint_root
from psa.study.plan import make_plan
from psa.study.progress import clock_text, eta_column
from psa.study.runner import PopulationProgress

from .conftest import TINY, rows, run_main


class Clock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def fake_study(loops: int = 4) -> tuple:
    """Two populations of one trial (6 members) each: 1*8 costs 40 s (10 s a loop), 2*8 20 s."""
    design = StudyDesign.from_fields(architectures=("1*8", "2*8"), trials=1, meta_loops=loops)
    plan = make_plan(design, 6, model_kind(design).loop_cost)
    by_net = {pp.net: pp for pp in plan.populations}
    a, b = by_net["1*8"], by_net["2*8"]
    costs = plan_costs(plan, {a: 40.0, b: 20.0}, measured=True)
    pops = {pp.key: PopulationProgress(pp, {}, False, 0) for pp in plan.populations}
    return design, plan, costs, pops, a, b


def loop(pp, n: int) -> LoopDone:
    return LoopDone(pp.key, n, [], None, 0.0)


def test_eta_is_the_cost_left_times_the_pace_since_the_first_recorded_loop() -> None:
    _, _, costs, pops, a, b = fake_study()
    assert (costs.total, costs.loop(a), costs.loop(b)) == (60.0, 10.0, 5.0)
    clock = Clock(100.0)
    pace = RunPace(costs, pops, clock)
    assert pace.work_at_start == 0.0
    clock.t = 103.0
    assert pace.eta() == pytest.approx(57.0)  # no pace yet: the costs as measured, counting down
    pace.event(Started(a.key, "cpu", 0))
    clock.t = 130.0  # 30 s of start-up and a first loop: not part of the pace
    assert pace.event(loop(a, 1)) == pytest.approx(10.0)  # the pace's start, for the runs row
    clock.t = 135.0
    assert pace.eta() == pytest.approx(50.0 - 5.0)
    clock.t = 150.0
    assert pace.event(loop(a, 2)) is None
    assert pace.eta() == pytest.approx(40.0 * 2.0)  # 10 s of cost in 20 s: pace 2
    clock.t = 160.0
    assert pace.eta() == pytest.approx(80.0 - 10.0)
    clock.t = 170.0
    pace.event(loop(a, 2))  # a loop recomputed after a crash is no new work
    assert pace.eta() == pytest.approx(40.0 * 4.0)
    clock.t = 1000.0
    assert pace.eta() == 0.0  # never negative


def test_loops_in_flight_count_half_and_failures_leave_their_work() -> None:
    _, _, costs, pops, a, b = fake_study()
    clock = Clock(0.0)
    pace = RunPace(costs, pops, clock)
    pace.event(Started(a.key, "cuda:0", 0))
    pace.event(Started(b.key, "cuda:0", 0))
    clock.t = 10.0
    assert pace.event(loop(b, 1)) == pytest.approx(5.0 + 10.0 / 2)  # a's loop is half done, on average
    clock.t = 12.0
    pace.event(loop(a, 1))
    assert pace.last[1] == pytest.approx(15.0 + 5.0 / 2)
    assert pace.eta() == pytest.approx((60.0 - 17.5) * 2.0 / 7.5)
    pace.event(PopulationFailed(b.key, "out of memory"))
    assert pace.eta() == pytest.approx((60.0 - 15.0 - 17.5) * 2.0 / 7.5)  # b's 3 loops are not left
    clock.t = 20.0
    pace.event(loop(a, 2))
    pace.event(PopulationDone(a.key, [], [], [], [], 0.0))
    assert pace.running == set() and pace.loops[a.key] == 4


def test_without_measured_costs_the_eta_waits_for_a_pace() -> None:
    _, plan, _, pops, a, _ = fake_study()
    kind = model_kind(plan.design)
    costs = analytic_costs(kind, plan)
    assert not costs.measured
    clock = Clock(0.0)
    pace = RunPace(costs, pops, clock)
    assert pace.eta() is None
    pace.event(Started(a.key, "cpu", 0))
    clock.t = 5.0
    pace.event(loop(a, 1))
    assert pace.eta() is None
    clock.t = 7.0
    pace.event(loop(a, 2))
    assert pace.eta() == pytest.approx((costs.total - 2 * costs.loop(a)) * 2.0 / costs.loop(a))
    assert eta_seconds(10.0, 0.0, 0.0, 3.0, measured=True) == 7.0
    assert eta_seconds(10.0, 0.0, 0.0, 3.0, measured=False) is None


def test_status_computes_the_same_eta_from_the_rows() -> None:
    """psa status's ETA, from per-net trial rows and the runs row, equals the bar's from events."""
    _, plan, costs, pops, a, b = fake_study()
    clock = Clock(100.0)
    pace = RunPace(costs, pops, clock)
    pace.event(Started(a.key, "cpu", 0))
    clock.t = 130.0
    pace.event(loop(a, 1))
    clock.t = 150.0
    pace.event(loop(a, 2))
    clock.t = 160.0
    t0 = datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc)

    def at(s: float) -> str:
        return (t0 + datetime.timedelta(seconds=s)).isoformat()

    archs = [{"arch": "1*8", "trials": 6, "running": 6, "failed": 0, "loops_done": 12, "loops_total": 24},
             {"arch": "2*8", "trials": 6, "running": 0, "failed": 0, "loops_done": 0, "loops_total": 24}]
    run = {"started_at": at(0), "heartbeat_at": at(50), "work_at_start": 0.0, "pace_at": at(30), "work_at_pace": 10.0}
    assert status_eta(costs, plan, archs, run, t0 + datetime.timedelta(seconds=60)) == pytest.approx(pace.eta())
    # a run from before the pace columns (or before its first loop) is paced from its start
    old = {k: v for k, v in run.items() if not k.endswith("pace") and k != "pace_at"}
    later = t0 + datetime.timedelta(seconds=60)
    assert status_eta(costs, plan, archs, old, later) == pytest.approx(40.0 * 50 / 20 - 10)
    # two populations in flight: the one not just recorded is half-way through its loop
    archs[1].update(running=6, loops_done=6)
    work = 25.0 + (10.0 + 5.0) / 2 / 2  # both running: (n - 1) / n of their loops, half done
    want = eta_seconds(60.0 - work, work - 10.0, 20.0, 10.0, True)
    assert status_eta(costs, plan, archs, run, t0 + datetime.timedelta(seconds=60)) == pytest.approx(want)


def test_the_bar_shows_the_pace_eta_on_the_study_line() -> None:
    _, _, costs, pops, a, _ = fake_study()
    clock = Clock(0.0)
    pace = RunPace(costs, pops, clock)
    column = eta_column(pace, [7])
    clock.t = 1.0
    assert column.render(SimpleNamespace(id=7, finished=False)).plain == clock_text(59.0) == "0:00:59"
    assert column.render(SimpleNamespace(id=7, finished=True)).plain == "0:00:00"
    assert clock_text(None) == "-:--:--" and clock_text(3725.4) == "1:02:05"


# ------------------------------------------------------------------------------------------
# costs from probes, and the stored record


def _probe(net: str, members: int, step_s: float) -> Probe:
    return Probe(net, members, setup_s=0.1, step_s=step_s, spread=0.0, warmup_s=0.2, eval_image_s=1e-6,
                 loop_extra_s=0.01, checkpoint_s=0.01, seconds=0.5)


def three_nets() -> tuple:
    design = StudyDesign.from_fields(architectures=("1*8", "16*2", "1*512"), trials=2, meta_loops=5,
                                     train_subset=2048)
    kind = model_kind(design)
    return design, kind, make_plan(design, 12, kind.loop_cost)


def test_prices_fit_the_probes_terms() -> None:
    """The unprobed shapes' prices: each term priced where the probes say how (a deep net's
    layer-steps, a wide net's FLOPs), the analytic cost scaled as a whole from one probe, and no
    negative price."""
    assert fit_terms([(1.0, 0.0), (0.0, 1.0), (1.0, 1.0)], [2.0, 3.0, 5.0]) == pytest.approx((2.0, 3.0))
    assert fit_terms([(1.0, 3.0)], [8.0]) == pytest.approx((2.0, 2.0))
    prices = fit_terms([(1.0, 1.0), (2.0, 1.0)], [1.0, 0.5])  # exactly: -0.5 and 1.5
    assert min(prices) >= 0


def test_probed_shapes_cost_their_population_seconds_and_the_rest_fit() -> None:
    design, kind, plan = three_nets()
    by_net = {pp.net: pp for pp in plan.populations}
    probes = {"16*2": _probe("16*2", 12, 2e-3), "1*512": _probe("1*512", 12, 0.05)}
    costs = probe_costs(kind, plan, probes, 10_000, 10_000)
    assert costs.measured
    for net in probes:
        pp = by_net[net]
        assert costs.seconds[pp.key] == pytest.approx(population_seconds(probes[net], design, pp.size, 10_000, 10_000))
    probed = [by_net[net] for net in probes]
    prices = fit_terms([kind.cost_terms(pp) for pp in probed], [costs.seconds[pp.key] / 5 for pp in probed])
    assert prices[0] > 0 and prices[1] > 0  # one wide net, one deep: both terms priced
    want = 5 * sum(c * t for c, t in zip(prices, kind.cost_terms(by_net["1*8"])))
    assert costs.seconds[by_net["1*8"].key] == pytest.approx(want)
    assert sum(kind.cost_terms(by_net["1*8"])) == kind.loop_cost(by_net["1*8"])
    assert not probe_costs(kind, plan, {}, 10_000, 10_000).measured
    assert costs.trial_loop["1*8"] * by_net["1*8"].size * 5 == pytest.approx(costs.seconds[by_net["1*8"].key])


def test_a_stored_calibration_round_trips_and_a_bad_one_falls_back() -> None:
    design, kind, plan = three_nets()
    probes = {"1*8": _probe("1*8", 12, 1e-3), "1*512": _probe("1*512", 12, 0.05)}
    record = json.loads(json.dumps(calibration_record(probes, "cpu (2 threads)", 10_000, 10_000, 0.0, 1.5)))
    assert record_probes(record) == probes
    assert stored_costs(kind, plan, record) == probe_costs(kind, plan, probes, 10_000, 10_000, 0.0)
    for bad in (None, {}, {**record, "version": 99}, {**record, "probes": [{"net": "1*8"}]},
                {**record, "n_val": None}):
        assert stored_costs(kind, plan, bad) == analytic_costs(kind, plan)


def test_spread_order_takes_the_ends_then_halves_the_gaps() -> None:
    assert spread_order(0) == [] and spread_order(1) == [0] and spread_order(2) == [0, 1]
    assert spread_order(5) == [0, 4, 2, 1, 3]
    for n in range(12):
        assert sorted(spread_order(n)) == list(range(n))


# ------------------------------------------------------------------------------------------
# the calibration a real study stores, and psa status reading it


def _design_doc(db: Path) -> dict:
    con = sqlite3.connect(db)
    try:
        return json.loads(con.execute("SELECT design FROM studies").fetchone()[0])
    finally:
        con.close()


def _running_copy(reference: Path, tmp_path: Path, calibrated: bool = True) -> tuple[Path, Path, float]:
    """The reference study with population 2*8 trial 2 at loop 3 of 6, as a run that started
    100 s ago (its first loop recorded 90 s ago, its latest 10 s ago) leaves it; and the time
    of its latest loop."""
    db = tmp_path / "running.sqlite"
    db.write_bytes(reference.read_bytes())
    con = sqlite3.connect(db)
    if not calibrated:
        doc = json.loads(con.execute("SELECT design FROM studies").fetchone()[0])
        doc["plan"].pop("calibration")
        con.execute("UPDATE studies SET design = ?", (json.dumps(doc),))
    con.execute("UPDATE trials SET status = 'running', loops_done = 3, bounty = NULL WHERE arch = '2*8' AND trial = 2")
    con.execute("UPDATE studies SET finished_at = NULL")
    now = datetime.datetime.now(datetime.timezone.utc)

    def ago(s: float) -> str:
        return (now - datetime.timedelta(seconds=s)).isoformat()

    con.execute("INSERT INTO runs (study_id, pid, host, backend, device, started_at, heartbeat_at, work_at_start, "
                "pace_at, work_at_pace) VALUES (1, 1, 'h', 'local', 'cpu', ?, ?, 0, ?, 0)",
                (ago(100), ago(10), ago(90) if calibrated else None))
    con.commit()
    con.close()
    return db, checkpoint_root(db) / "tiny", now.timestamp() - 10


def _status(db: Path, ckpt: Path, tmp_path: Path) -> tuple[dict, float, float]:
    """`psa status --json` while the study's lock is held, and the seconds since its latest loop
    before and after it ran."""
    lock = StudyLock(ckpt, "tiny", db)
    lock.acquire()
    try:
        before = datetime.datetime.now(datetime.timezone.utc)
        rc, out, err = run_main(["status", "--db", str(db), "--json"], tmp_path)
        after = datetime.datetime.now(datetime.timezone.utc)
    finally:
        lock.release()
    assert rc == 0, err
    (info,) = json.loads(out)["studies"]
    assert info["state"] == "running"
    return info, before.timestamp(), after.timestamp()


def test_a_new_study_stores_its_calibration_and_status_reads_it(reference: Path, tmp_path: Path) -> None:
    record = _design_doc(reference)["plan"]["calibration"]
    probes = record_probes(record)
    assert probes and set(probes) <= {"1*8", "2*8"} and record["n_val"] == 10_000
    assert all(p.step_s > 0 and p.members == 6 for p in probes.values())

    db, ckpt, beat = _running_copy(reference, tmp_path)
    design = StudyDesign.from_fields(architectures=("1*8", "2*8"), trials=2, meta_loops=6, train_subset=2048)
    kind = model_kind(design)
    costs = stored_costs(kind, make_plan(design, 6), record)
    assert costs.measured
    w = costs.trial_loop["2*8"]
    left = 6 * 3 * w  # the 6 trials of 2*8 trial 2 have 3 loops to go
    work = costs.total - left
    info, before, after = _status(db, ckpt, tmp_path)
    pace = 80.0 / work  # from the first recorded loop to the latest, over the work done
    # the seconds since the latest loop grow while status runs (ISO times keep microseconds)
    assert left * pace - (after - beat) - 1e-3 <= info["eta_seconds"] <= left * pace - (before - beat) + 1e-3


def test_a_study_without_calibration_still_has_an_eta_and_a_resume_calibrates_it(reference: Path,
                                                                                tmp_path: Path) -> None:
    db, ckpt, beat = _running_copy(reference, tmp_path, calibrated=False)
    design = StudyDesign.from_fields(architectures=("1*8", "2*8"), trials=2, meta_loops=6, train_subset=2048)
    costs = analytic_costs(model_kind(design), make_plan(design, 6))
    left = 6 * 3 * costs.trial_loop["2*8"]
    info, before, after = _status(db, ckpt, tmp_path)
    pace = 90.0 / (costs.total - left)  # paced from the run's start: no pace_at
    assert left * pace - (after - beat) - 1e-3 <= info["eta_seconds"] <= left * pace - (before - beat) + 1e-3

    # its first resume probes it and stores the calibration; nothing else changes
    con = sqlite3.connect(db)
    con.execute("UPDATE trials SET status = 'pending', loops_done = 0 WHERE arch = '2*8' AND trial = 2")
    con.execute("UPDATE runs SET finished_at = heartbeat_at, outcome = 'interrupted'")
    con.commit()
    con.close()
    rc, out, err = run_main(["study", *TINY, "--db", str(db)], tmp_path)
    assert rc == 0, err
    doc, ref = _design_doc(db), _design_doc(reference)
    assert record_probes(doc["plan"].pop("calibration")) and ref["plan"].pop("calibration")
    assert doc == ref
    assert rows(db) == rows(reference)
    con = store.connect(db, readonly=True)
    try:
        run = store.latest_run(con, 1)
        assert run["pace_at"] is not None and run["work_at_pace"] > 0
    finally:
        con.close()
