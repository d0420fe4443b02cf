"""The paper's whole study (98 architectures x 6 modes x 10 trials x 100 meta-loops) on one lent
card, as complete slices of architectures, each its own `psa study --arch-file`, timed end to end.

A lent card comes for about ten minutes a call and starts bare: the SQLite file is lost with the
machine. So the 98 architectures are cut once into slices that each fit one call
(bench/results/paper-slices.json, committed: every session runs the same slices), a call runs
the next slices not yet exported, and each finished slice leaves its trials and meta-loops as
gzipped CSVs (psa export's columns plus `slice` and `precision`) and one JSON line of timings in
--out, the folder the device tool brings back. Committed under
bench/results/paper-study-<device>/, they are what `merge` turns into the comparison with the
published trials, `psa report`, and one record per device (bench/results/paper-study-<device>.json).
The total wall time is a sum of slices, not one command: `merge` says so in the record.

    python bench/paper_study.py slices [--slice-seconds 150] [--check]   # (re)cut paper-slices.json
    python bench/paper_study.py run --out DIR --budget SECONDS [--device cuda] [--precision auto|fp32]
                                    [--slice s01 ...] [--arch A ...] [--concurrency N]
    python bench/paper_study.py collect FILES_AT        # a device call's files into bench/results/
    python bench/paper_study.py merge [--device h100]   # compare, report, the record, the verdict table
    python bench/paper_study.py ray --out DIR           # --backend ray against local, 3 archs x 2 trials
    python bench/paper_study.py run --tiny --device cpu --out DIR --results TMP   # 2 tiny slices (tests)

Slices are cut from the per-architecture times that bench/gpu_study.py measured on an H200
(gpu_study-h200.json: 60 members, one population at a time, 100 meta-loops), not from
`psa study --dry-run`: the dry run probes every architecture on the device it runs on (minutes of
card time for all 98, and its numbers change with the machine), while the cut must be the same in
every session and be made where no card is. Those times are upper bounds for `psa study`, which
keeps several populations in flight. `run` predicts a slice's time from them, scaled by a device
factor learned from the slices already run on that device (their wall time over their estimate),
and starts a slice only if it is predicted to end within --budget. Just before each slice it
makes the slice's own dry run (recorded as dry_run_estimate_s, psa's estimate against the clock).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import gzip
import io
import json
import math
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SRC = ROOT / "src"
sys.path.insert(0, str(SRC))

RESULTS = HERE / "results"
SLICES_FILE = "paper-slices.json"
TIMINGS_FILE = "gpu_study-h200.json"
# Small slices pack a call (550 s of slices) well whatever the device's factor turns out to be:
# at 150 s, 13 slices (115*115 and 91*91 alone), three a call at the estimates' pace, more if
# concurrency beats them; at 300 s (7 slices) a call would fit one slice at that pace and idle
# for the rest. The price is 30 s of overhead a slice (2,033 s estimated in all against 1,853).
SLICE_SECONDS = 150.0
# a slice's cost beyond its populations' loops: the process's start, MNIST onto the card, the
# Triton kernels compiled, psa export and gzip
OVERHEAD_S = 30.0
# the slices' estimates are H200 times; a device with no slice run yet is scaled by its guess
# (an H100: same chip, slower memory), afterwards by what its own slices took
DEVICE_FACTOR = {"h200": 1.0, "h100": 1.1}
UNKNOWN_DEVICE_FACTOR = 1.5
FP32_FACTOR = 2.0  # fp32 against tf32 before any fp32 slice ran: wide nets lose the tensor cores
SAFETY = 1.1  # on a learned factor: the slices' spread
# the dry run's own time, before one was measured: on a card its probes (a guessed 3 s an
# architecture) and the shares of the card it measures (at most 5% of the slice: ~1 s an architecture)
DRY_RUN_S_PER_ARCH = {"cuda": 4.0, "cpu": 15.0}
# the tiny setting: 2 narrow architectures, 1 trial, 1 meta-loop on 256 images, one slice each
TINY_SLICES = (("1*8",), ("2*4",))
TINY_FLAGS = ("--trials", "1", "--meta-loops", "1", "--train-subset", "256")
TINY_SLICE_S = 30.0
# a call's meta-loops file up to this size is committed with its trials (see `ignore`)
LOOPS_COMMIT_BYTES = 1 << 20
SAFE_NAME = re.compile(r"^[A-Za-z0-9._-]+$")  # what the device tool brings back


# --------------------------------------------------------------------------------------------
# Slices


def arch_estimates(path: Path = RESULTS / TIMINGS_FILE) -> dict[str, float]:
    """Seconds for 100 meta-loops of each architecture's 60 members, one population at a time."""
    doc = json.loads(path.read_text())
    return {r["arch"]: float(r["est_100_loops_s"]) for r in doc["architectures"]}


def cut_slices(estimates: dict[str, float], archs: Sequence[str], slice_seconds: float,
               overhead: float = OVERHEAD_S) -> list[dict]:
    """Slices whose estimates (overhead + their architectures' times) fit `slice_seconds`, the
    fewest that do, balanced: longest first into the least loaded slice (ties: the lower index),
    so every slice mixes a few long nets with many short ones, which keeps populations in flight
    together. An architecture that alone exceeds `slice_seconds` (115*115) is a slice of its own,
    first: the cap is what packs the other slices several to a call, and one net cannot be split.
    Deterministic: a fixed order in, the same slices out."""
    order = sorted(archs, key=lambda a: (-estimates[a], archs.index(a)))
    alone = [a for a in order if overhead + estimates[a] > slice_seconds]
    rest = [a for a in order if a not in alone]
    bins: list[list[str]] = [[a] for a in alone]
    loads = [overhead + estimates[a] for a in alone]
    if rest:
        k = max(1, math.ceil(sum(estimates[a] for a in rest) / (slice_seconds - overhead)))
        while True:
            rl = [overhead] * k
            rb: list[list[str]] = [[] for _ in range(k)]
            for a in rest:
                i = min(range(k), key=lambda j: (rl[j], j))
                rl[i] += estimates[a]
                rb[i].append(a)
            if max(rl) <= slice_seconds:
                break
            k += 1
        bins, loads = bins + rb, loads + rl
    return [{"slice": f"s{i + 1:02d}", "archs": sorted(b, key=archs.index), "estimate_s": round(load, 1)}
            for i, (b, load) in enumerate(zip(bins, loads))]


def paper_slices(slice_seconds: float = SLICE_SECONDS) -> dict:
    """The slices of the paper's 98 architectures, as paper-slices.json holds them."""
    from psa.core.arch import study_architectures

    archs = [a.short for a in study_architectures()]
    est = arch_estimates()
    slices = cut_slices(est, archs, slice_seconds)
    return {"about": "the paper's 98 architectures cut into slices, each one `psa study --arch-file` that fits "
                     "one device call (bench/paper_study.py)",
            "timings": f"bench/results/{TIMINGS_FILE}", "slice_seconds": slice_seconds, "overhead_s": OVERHEAD_S,
            "estimate_s": round(sum(s["estimate_s"] for s in slices), 1), "slices": slices}


def load_slices(results: Path, tiny: bool) -> list[dict]:
    """The committed slices (or the tiny setting's two)."""
    if tiny:
        return [{"slice": f"s{i + 1:02d}", "archs": list(a), "estimate_s": TINY_SLICE_S}
                for i, a in enumerate(TINY_SLICES)]
    path = results / SLICES_FILE
    if not path.exists():
        path = RESULTS / SLICES_FILE
    return json.loads(path.read_text())["slices"]


def cmd_slices(args: argparse.Namespace) -> int:
    doc = paper_slices(args.slice_seconds)
    path = Path(args.results) / SLICES_FILE
    if args.check:
        same = path.exists() and json.loads(path.read_text()) == doc
        print(f"{path}: {'the same slices' if same else 'DIFFERS from a new cut'}")
        return 0 if same else 1
    write_atomic(path, json.dumps(doc, indent=1) + "\n")
    for s in doc["slices"]:
        print(f"{s['slice']}: {len(s['archs']):2d} architectures, estimate {s['estimate_s']:6.1f} s")
    print(f"wrote {path}: {len(doc['slices'])} slices, {doc['estimate_s']:.0f} s estimated in all")
    return 0


# --------------------------------------------------------------------------------------------
# The device and what ran on it


def short_device(name: str) -> str:
    """A card's short name from its full one ("NVIDIA H200" -> h200); "cpu" stays "cpu"."""
    words = [w for w in re.split(r"[^a-z0-9]+", name.lower()) if w and w not in ("nvidia", "tesla")]
    return words[0] if words else "cuda"


def device_info(device: str, tiny: bool) -> dict:
    """The device's short name (h100, h200, cpu; '-tiny' for the tiny setting) and versions."""
    import torch

    from psa.core.device import resolve_device

    dev = resolve_device(device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else dev.type
    short = short_device(name)
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {"device": short + ("-tiny" if tiny else ""), "device_name": name, "device_type": dev.type,
            "torch": torch.__version__, "cuda": torch.version.cuda, "triton": triton_version}


def resolved_precision(device: str, flag: str) -> str:
    """What --precision means on this device (auto: tf32 on a card, fp32 elsewhere)."""
    from psa.core.device import resolve_execution

    return resolve_execution(device, flag).precision


def device_dir(results: Path, device: str) -> Path:
    return results / f"paper-study-{device}"


def cache_dir(results: Path) -> Path:
    """Where `run` keeps a copy of its packs' trials and records (ignored by git): a device
    call's $OUT starts empty, while this folder lasts as long as the warm machine."""
    return results / ".paper-cache"


def read_records(dirs: Iterable[Path], device: str, flag: str | None = None) -> list[dict]:
    """The slice records (JSON lines) of `device` in `dirs`, of precision flag `flag` (all: None)."""
    out = []
    seen: set[str] = set()
    for d in dirs:
        if not d.is_dir():
            continue
        for f in sorted(d.glob(f"paper-{device}-*.slices.jsonl")):
            if f.name in seen:  # the same pack collected here and still in the call's cache
                continue
            seen.add(f.name)
            for line in f.read_text().splitlines():
                if line.strip():
                    r = json.loads(line)
                    if r.get("device") == device and (flag is None or r.get("precision_flag") == flag):
                        r["pack"] = f.name.removesuffix(".slices.jsonl")
                        out.append(r)
    return out


def device_factor(records: Sequence[dict], device: str, flag: str) -> tuple[float, str]:
    """Wall time over committed estimate for this device and precision: the worst of the slices
    run so far (times SAFETY), else a guess."""
    ratios = [r["wall_s"] / r["estimate_s"] for r in records if r.get("ok") and r.get("estimate_s")]
    if ratios:
        return max(ratios) * SAFETY, f"learned from {len(ratios)} slices (worst {max(ratios):.2f} x {SAFETY})"
    base = DEVICE_FACTOR.get(device.removesuffix("-tiny"), UNKNOWN_DEVICE_FACTOR)
    if flag == "fp32":
        base *= FP32_FACTOR
    return base, "guessed (no slice of this device and precision yet)"


def dry_run_rate(records: Sequence[dict], device_type: str) -> float:
    """Seconds of dry run per architecture: the slowest measured, else a guess."""
    rates = [r["dry_run_s"] / len(r["archs"]) for r in records if r.get("dry_run_s") and r.get("archs")]
    return max(rates) * SAFETY if rates else DRY_RUN_S_PER_ARCH.get(device_type, 15.0)


# --------------------------------------------------------------------------------------------
# Running slices


def psa_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(SRC) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def study_argv(arch_file: Path, name: str, db: Path, args: argparse.Namespace) -> list[str]:
    """`psa study` for one slice: the paper's design on these architectures."""
    argv = [sys.executable, "-m", "psa", "study", "--preset", "paper", "--arch-file", str(arch_file),
            "--name", name, "--db", str(db), "--device", args.device, "--quiet"]
    if args.precision != "auto":
        argv += ["--precision", args.precision]
    if args.concurrency:
        argv += ["--concurrency", str(args.concurrency)]
    if args.tiny:
        argv += list(TINY_FLAGS)
    return argv


def dry_run(argv: list[str]) -> tuple[dict | None, float]:
    """psa's own estimate of a slice, and how long the dry run took. The estimate: `seconds`
    (populations in flight, as the run keeps them), `sequential_seconds` (one at a time), the
    shares of the device it measured and each architecture's time alone, as the dry run's JSON
    gives them (None: the dry run failed)."""
    t0 = time.perf_counter()
    p = subprocess.run([*argv, "--dry-run", "--json"], env=psa_env(), capture_output=True, text=True)
    took = time.perf_counter() - t0
    if p.returncode != 0:
        print(f"  dry run failed (exit {p.returncode}): {p.stderr.strip()[-500:]}", flush=True)
        return None, took
    out = p.stdout
    doc = json.loads(out[out.index("{"):])
    return {"seconds": float(doc["seconds"]), "sequential_seconds": doc.get("sequential_seconds"),
            "in_flight": doc.get("in_flight"), "shares": doc.get("shares", {}),
            "alone_s": {r["arch"]: round(float(r["seconds"]), 2) for r in doc.get("architectures", [])}}, took


def finished_at(db: Path) -> float | None:
    """When the slice's study recorded its end (epoch seconds), from its database."""
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        try:
            row = con.execute("SELECT MAX(finished_at) FROM studies").fetchone()
        finally:
            con.close()
        return datetime.datetime.fromisoformat(row[0]).timestamp() if row and row[0] else None
    except (sqlite3.Error, ValueError):
        return None


def with_columns(path: Path, extra: dict[str, str]) -> tuple[list[str], list[list[str]]]:
    """A CSV of psa export with `extra` columns appended to every row."""
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    return rows[0] + list(extra), [r + list(extra.values()) for r in rows[1:]]


def write_atomic(path: Path, text: str) -> None:
    """Under a temporary name, then renamed: a run cut off leaves the previous file or none."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def write_gzip_csv(path: Path, header: Sequence[str], parts: Iterable[Sequence[Sequence[str]]]) -> None:
    """One gzipped CSV from several slices' rows, written under a temporary name and renamed
    (a call cut off while writing leaves the previous pack). mtime 0: the same rows give the same bytes."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as gz:
        text = io.TextIOWrapper(gz, newline="")
        w = csv.writer(text)
        w.writerow(header)
        for rows in parts:
            w.writerows(rows)
        text.flush()
        text.detach()
    tmp.replace(path)


class Pack:
    """The files one call brings back: every slice it finished in one trials CSV.gz, one
    meta-loops CSV.gz and one JSON-lines file, rewritten after each slice (the device tool
    brings back at most 8 files)."""

    def __init__(self, out: Path, device: str, flag: str, cache: Path | None = None) -> None:
        self.out, self.device, self.flag, self.cache = out, device, flag, cache
        self.slices: list[str] = []
        self.trials: list[list[list[str]]] = []
        self.loops: list[list[list[str]]] = []
        self.header: dict[str, list[str]] = {}
        self.records: list[dict] = []
        self.tag = ""

    def add(self, record: dict, trials: tuple[list[str], list[list[str]]] | None,
            loops: tuple[list[str], list[list[str]]] | None) -> None:
        self.records.append(record)
        if trials is not None and loops is not None:
            self.slices.append(record["slice"])
            self.header["trials"], rows_t = trials
            self.header["loops"], rows_l = loops
            self.trials.append(rows_t)
            self.loops.append(rows_l)
        self.write()

    def write(self) -> None:
        old = self.tag
        ids = "_".join(self.slices) or "none"
        self.tag = f"paper-{self.device}-{self.flag}-{ids}"
        assert SAFE_NAME.match(self.tag), self.tag  # else the device tool leaves the files behind
        for suffix in (".trials.csv.gz", ".meta_loops.csv.gz", ".slices.jsonl"):
            if old and old != self.tag:
                (self.out / f"{old}{suffix}").unlink(missing_ok=True)
        if self.slices:
            write_gzip_csv(self.out / f"{self.tag}.trials.csv.gz", self.header["trials"], self.trials)
            write_gzip_csv(self.out / f"{self.tag}.meta_loops.csv.gz", self.header["loops"], self.loops)
        tmp = self.out / f"{self.tag}.slices.jsonl.tmp"
        tmp.write_text("".join(json.dumps(r) + "\n" for r in self.records))
        tmp.replace(self.out / f"{self.tag}.slices.jsonl")
        if self.cache is not None:
            self.keep(old)

    def keep(self, old: str) -> None:
        """The pack's trials and records, also in the cache: the device tool empties $OUT for
        each call, and the next call on the same warm machine must see this call's slices (not
        to run them again, and for fp32 to rerun what they disagree on) before they are committed."""
        self.cache.mkdir(parents=True, exist_ok=True)
        for suffix in (".trials.csv.gz", ".slices.jsonl"):
            if old and old != self.tag:
                (self.cache / f"{old}{suffix}").unlink(missing_ok=True)
            src = self.out / f"{self.tag}{suffix}"
            if src.exists():
                tmp = self.cache / f"{self.tag}{suffix}.tmp"
                shutil.copyfile(src, tmp)
                tmp.replace(self.cache / f"{self.tag}{suffix}")


def run_slice(sl: dict, args: argparse.Namespace, info: dict, precision: str, work: Path) -> tuple[dict, tuple | None,
                                                                                                  tuple | None]:
    """One slice: its dry run, its study timed end to end, psa export of its rows."""
    sid = sl["slice"]
    name = f"paper-{args.precision}-{sid}" if not args.tiny else f"tiny-{args.precision}-{sid}"
    arch_file = work / f"{sid}.archs.txt"
    arch_file.write_text("\n".join(sl["archs"]) + "\n")
    db = work / f"{sid}.sqlite"
    argv = study_argv(arch_file, name, db, args)
    record = {"slice": sid, "archs": sl["archs"], "study": name, "device": info["device"],
              "device_name": info["device_name"], "torch": info["torch"], "cuda": info["cuda"],
              "triton": info["triton"], "precision": precision, "precision_flag": args.precision,
              "concurrency": args.concurrency, "estimate_s": sl["estimate_s"],
              "command": " ".join(["psa", *argv[3:]]).replace(str(work), "$WORK"), "date": datetime.date.today().isoformat()}
    if not args.no_dry_run:
        got, took = dry_run(argv)
        est = None if got is None else got["seconds"]
        record.update(dry_run_estimate_s=None if est is None else round(est, 1), dry_run_s=round(took, 2))
        if got is not None:
            seq = got["sequential_seconds"]
            record.update(dry_run_sequential_s=None if seq is None else round(float(seq), 1),
                          dry_run_in_flight=got["in_flight"],
                          dry_run_shares={a: round(float(v), 3) for a, v in got["shares"].items()},
                          dry_run_alone_s=got["alone_s"])
        print(f"  dry run: psa estimates {est if est is None else round(est)} s (took {took:.0f} s)", flush=True)
    start_epoch = time.time()
    t0 = time.perf_counter()
    p = subprocess.run(argv, env=psa_env())
    wall = time.perf_counter() - t0
    end = finished_at(db)
    record.update(returncode=p.returncode, wall_s=round(wall, 2),
                  to_last_row_s=None if end is None else round(end - start_epoch, 2))
    trials = loops = None
    if p.returncode == 0:
        exp = work / f"{sid}.export"
        e = subprocess.run([sys.executable, "-m", "psa", "export", "--db", str(db), "--out", str(exp),
                            "--format", "csv"], env=psa_env(), capture_output=True, text=True)
        if e.returncode != 0:
            print(f"  psa export failed: {e.stderr.strip()[-500:]}", flush=True)
            record["returncode"] = e.returncode
        else:
            extra = {"slice": sid, "precision": precision}
            trials = with_columns(exp / "trials.csv", extra)
            loops = with_columns(exp / "meta_loops.csv", extra)
            status = trials[0].index("status")
            record["trials"] = sum(r[status] == "done" for r in trials[1])
            record["trials_total"] = len(trials[1])
            record["meta_loop_rows"] = len(loops[1])
    record["ok"] = bool(p.returncode == 0 and trials is not None and record["trials"] == record["trials_total"])
    return record, trials, loops


def pending(slices: Sequence[dict], records: Sequence[dict], wanted: Sequence[str]) -> list[dict]:
    """The slices to run: those asked for (all by default) not yet exported on this device."""
    done = {r["slice"] for r in records if r.get("ok")}
    known = {s["slice"] for s in slices}
    unknown = [w for w in wanted if w not in known]
    if unknown:
        raise SystemExit(f"unknown slice {', '.join(unknown)} (slices: {', '.join(sorted(known))})")
    return [s for s in slices if (not wanted or s["slice"] in wanted) and s["slice"] not in done]


def arch_slices(archs: Sequence[str], records: Sequence[dict], estimates: dict[str, float], prefix: str,
                slice_seconds: float) -> list[dict]:
    """Slices of architectures given by name (fp32 reruns): those not yet run in this precision,
    in the given order, packed up to `slice_seconds`, named prefix + a number that goes on from the
    slices run before."""
    done = {a for r in records if r.get("ok") for a in r["archs"]}
    todo = [a for a in dict.fromkeys(archs) if a not in done]
    n = len({r["slice"] for r in records})
    out: list[dict] = []
    for a in todo:
        est = estimates.get(a, slice_seconds / 2)
        if out and out[-1]["estimate_s"] + est <= slice_seconds:
            out[-1]["archs"].append(a)
            out[-1]["estimate_s"] = round(out[-1]["estimate_s"] + est, 1)
        else:
            out.append({"slice": f"{prefix}{n + len(out) + 1:02d}", "archs": [a], "estimate_s": round(OVERHEAD_S + est, 1)})
    return out


def rerun_list(results: Path, out: Path, device: str, work: Path) -> list[str]:
    """The architectures to rerun in fp32: those with a cell or regime disagreeing with the
    published trials in this device's tf32 slices exported so far, committed and in `out`.
    Computed here, by `merge`'s comparison, rather than read from the committed record, so that a
    call can rerun what its own earlier steps or the session's earlier calls found without a
    merge in between (the card idles, on the session's time, while one runs)."""
    found: dict[str, Path] = {}
    for f in [*packs(results, device, "auto"), *packs(cache_dir(results), device, "auto", flat=True),
              *packs(out, device, "auto", flat=True)]:
        found.setdefault(f.name, f)  # a pack collected, cached and in $OUT is one pack
    files = list(found.values())
    if not files:
        raise SystemExit(f"no exported tf32 slice of {device} yet (in {device_dir(results, device)} or {out}): "
                         "nothing to rerun in fp32; name architectures with --arch")
    cells, regimes = disagreeing(compare(files, work / "compare-auto", 0.01), 0.01)
    return list(dict.fromkeys(cells + regimes))


def cmd_run(args: argparse.Namespace) -> int:
    t_start = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = Path(args.results)
    info = device_info(args.device, args.tiny)
    device, flag = info["device"], args.precision
    precision = resolved_precision(args.device, flag)
    records = read_records([device_dir(results, device), cache_dir(results), out], device, flag)
    work = Path(args.work or tempfile.mkdtemp(prefix="psa-paper-"))
    work.mkdir(parents=True, exist_ok=True)
    if args.arch or flag == "fp32":
        archs = args.arch or rerun_list(results, out, device, work)
        estimates = {a: TINY_SLICE_S for s in TINY_SLICES for a in s} if args.tiny else arch_estimates()
        todo = arch_slices(archs, records, estimates, "f" if flag == "fp32" else "a", args.slice_seconds)
    else:
        todo = pending(load_slices(results, args.tiny), records, args.slice or [])
    factor, why = device_factor(records, device, flag)
    per_arch = dry_run_rate(records, info["device_type"])
    print(f"device {device} ({info['device_name']}), torch {info['torch']}, triton {info['triton']}, "
          f"precision {precision} (--precision {flag}); {len(records)} slices of this device and precision "
          f"found; {len(todo)} to run; factor {factor:.2f}, {why}; budget {args.budget:.0f} s", flush=True)
    if not todo:
        print("nothing to run: every slice asked for is exported (see `merge`)")
        return 0
    pack = Pack(out, device, flag, cache_dir(results))
    failed = 0
    for sl in todo:
        left = args.budget - (time.perf_counter() - t_start)
        predicted = factor * sl["estimate_s"] + (0 if args.no_dry_run else per_arch * len(sl["archs"]))
        if predicted > left:
            print(f"{sl['slice']}: predicted {predicted:.0f} s > {left:.0f} s left of the budget: stopping here")
            break
        dry = "" if args.no_dry_run else "(+ dry run) "
        print(f"{sl['slice']}: {len(sl['archs'])} architectures, estimate {sl['estimate_s']:.0f} s x {factor:.2f} "
              f"{dry}= {predicted:.0f} s predicted, {left:.0f} s left", flush=True)
        record, trials, loops = run_slice(sl, args, info, precision, work)
        pack.add(record, trials, loops)
        failed += not record["ok"]
        print(f"{sl['slice']}: {'ok' if record['ok'] else 'FAILED'}, {record['wall_s']:.1f} s wall, "
              f"{record.get('trials', 0)}/{record.get('trials_total', '?')} trials -> {out / pack.tag}.*", flush=True)
        # the slices after this one: predicted from what this device just did
        records.append(record)
        factor, why = device_factor(records, device, flag)
        per_arch = dry_run_rate(records, info["device_type"])
    left = [s["slice"] for s in todo if s["slice"] not in {r["slice"] for r in pack.records}]
    print(f"done in {time.perf_counter() - t_start:.0f} s: {len(pack.slices)} slices exported"
          + (f", {failed} failed" if failed else "") + (f"; still to run: {', '.join(left)}" if left else ""))
    if not args.keep_work and not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failed else 0


# --------------------------------------------------------------------------------------------
# Collecting a call's files, merging a device's slices


def cmd_collect(args: argparse.Namespace) -> int:
    """Copy what a device call brought back into bench/results/ (slices by device)."""
    results = Path(args.results)
    n = 0
    for src in map(Path, args.paths):
        files = sorted(src.rglob("*")) if src.is_dir() else [src]
        tags: dict[str, str] = {}
        for f in files:
            if f.name.endswith(".slices.jsonl"):
                recs = [json.loads(x) for x in f.read_text().splitlines() if x.strip()]
                if recs:
                    tags[f.name.removesuffix(".slices.jsonl")] = recs[0]["device"]
        rays = [f for f in files if f.name.startswith("paper-ray-") and f.suffix == ".json"]
        profiles = [f for f in files if f.name in ("gpu-profile.json", "stack-sweep.json")]
        for f in files:
            if not f.is_file() or f.name.endswith(".tmp"):  # a write cut off by the call's end
                continue
            tag = next((t for t in tags if f.name.startswith(t + ".")), None)
            if tag is not None:
                dest = device_dir(results, tags[tag]) / f.name
            elif f.name.startswith("paper-ray-") and f.suffix == ".json":
                dest = results / f.name
            elif f.name in ("gpu-profile.json", "stack-sweep.json"):  # named here after their card
                dest = results / f"{f.stem}-{short_device(json.loads(f.read_text())['device'])}.json"
            elif f.suffix == ".log" and tags:
                first = sorted(tags)[0]
                dest = device_dir(results, tags[first]) / f"{first}.{f.name}"
            elif f.suffix == ".log" and rays:  # a call that only made the Ray check
                dest = results / f"{rays[0].stem}.{f.name}"
            elif f.suffix == ".log" and profiles:  # a call that only profiled or swept
                first = profiles[0]
                dest = results / f"{first.stem}-{short_device(json.loads(first.read_text())['device'])}.{f.name}"
            else:
                continue
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = dest.with_name(dest.name + ".tmp")
            shutil.copyfile(f, tmp)
            tmp.replace(dest)
            note = ""
            if f.name.endswith(".meta_loops.csv.gz") and f.stat().st_size > LOOPS_COMMIT_BYTES:
                ignore(dest)
                note = f" (ignored by git: {f.stat().st_size / 2**20:.1f} MiB)"
            print(f"{f} -> {dest}{note}")
            n += 1
    print(f"{n} files collected")
    return 0 if n else 1


def ignore(path: Path) -> None:
    """List `path` in its folder's .gitignore. The whole study's meta-loops, 5.9 million rows,
    are about 110 MB gzipped; committed, they would push the working tree past the 64 MiB that a
    device call carries. So only small meta-loops files are committed; the others stay beside
    their trials here, for merge's report and its curves, and out of git."""
    gi = path.parent / ".gitignore"
    lines = gi.read_text().splitlines() if gi.exists() else []
    if path.name not in lines:
        gi.write_text("\n".join([*lines, path.name]) + "\n")


def packs(results: Path, device: str, flag: str, flat: bool = False) -> list[Path]:
    """The trials files of a device's slices in one precision flag: in its folder under
    `results`, or (flat) in `results` itself, as a device call leaves them in $OUT."""
    where = results if flat else device_dir(results, device)
    return sorted(where.glob(f"paper-{device}-{flag}-*.trials.csv.gz"))


def psa_run(*argv: str) -> None:
    p = subprocess.run([sys.executable, "-m", "psa", *argv], env=psa_env(), capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"psa {argv[0]} failed (exit {p.returncode}): {p.stderr.strip()[-2000:]}")


def compare(files: Sequence[Path], out: Path, alpha: float) -> dict:
    """`psa compare --export FILES --reference published`: its summary, and its cells and regimes."""
    psa_run("compare", "--export", *map(str, files), "--reference", "published", "--alpha", repr(alpha),
            "--out", str(out))
    summary = json.loads((out / "manifest.json").read_text())
    with open(out / "tables" / "compare_cells.csv", newline="") as f:
        cells = list(csv.DictReader(f))
    with open(out / "tables" / "regime_agreement.csv", newline="") as f:
        regimes = list(csv.DictReader(f))
    return {"summary": summary, "cells": cells, "regimes": regimes}


def _p(cell: dict) -> float:
    return float(cell["p"]) if cell["p"] else math.nan  # no test (e.g. one trial): written empty


def _consistent(cell: dict, alpha: float) -> bool:
    # as psa compare counts: a cell with no p (no test: one trial) is not consistent, nor different
    p = _p(cell)
    return not math.isnan(p) and not p < alpha


def _different(cell: dict, alpha: float) -> bool:
    """The cell's test tells ours from the reference's at alpha."""
    return _p(cell) < alpha


def disagreeing(cmp: dict, alpha: float) -> tuple[list[str], list[str]]:
    """Architectures with a cell inconsistent at alpha, and those whose regime differs."""
    cells = list(dict.fromkeys(c["arch"] for c in cmp["cells"] if _different(c, alpha)))
    regimes = [r["arch"] for r in cmp["regimes"] if r["agree"] != "True"]
    return cells, regimes


def versions(records: Sequence[dict], key: str) -> str | None:
    vals = sorted({str(r.get(key)) for r in records if r.get(key) is not None})
    return " / ".join(vals) if vals else None


def verdict_markdown(doc: dict, cmp: dict, work: Path, fp32: dict | None) -> str:
    """The verdict table for bench/results/: the counts, psa compare's verdict, the regime
    confusion and agreement, and every cell."""
    tables = work / "compare" / "tables"
    lines = [f"# The paper's study on {doc['device_name']} ({doc['device']}), {doc['date']}", "",
             f"psa {doc['precision']} (`--precision {doc['precision_flag']}`), torch {doc['torch']}, "
             f"Triton {doc['triton']}. {len(doc['slices'])} slices, each its own `psa study --arch-file` timed end "
             f"to end; the wall time is their **sum**, {doc['wall_s']:.0f} s, not one command "
             f"(psa's dry runs of the slices estimated {doc['dry_run_estimate_s'] or 0:.0f} s in all). "
             + ("Every slice is in." if doc["complete"] else f"Slices still missing: {', '.join(doc['slices_missing'])}."),
             "", "| what | result | target |", "|---|---|---|",
             f"| trials done | {doc['trials_done']:,} | 58,800 |",
             f"| cells consistent at alpha = {doc['alpha']:g} | {doc['cells_consistent']}/{doc['cells_total']} | >= 95% |",
             f"| regimes agreeing | {doc['regimes_agree']}/{doc['regimes_total']} | >= 93 of 98 |"]
    if fp32:
        lines.append(f"| fp32 reruns: cells consistent | {fp32['cells_consistent']}/{fp32['cells_total']} "
                     f"({len(fp32['archs'])} architectures) | |")
        lines.append(f"| with the reruns' fp32 cells in place | {fp32['combined_cells_consistent']}/"
                     f"{doc['cells_total']} cells, {fp32['combined_regimes_agree']}/{doc['regimes_total']} regimes | |")
    lines += ["", "Slices:", "", "| slice | architectures | wall s | to last row s | dry-run estimate s | trials |",
              "|---|---|---|---|---|---|"]
    for s in doc["slices"]:
        lines.append(f"| {s['slice']} | {len(s['archs'])} | {s['wall_s']:.1f} | {s.get('to_last_row_s')} | "
                     f"{s.get('dry_run_estimate_s')} | {s.get('trials')} |")
    lines += ["", "## psa compare's verdict", "", "```", (work / "compare" / "verdict.txt").read_text().rstrip(), "```",
              "", f"Command: `{doc['compare_command']}`", ""]
    for name in ("regime_confusion", "regime_agreement", "compare_cells"):
        lines += [(tables / f"{name}.md").read_text().rstrip(), ""]
    if fp32:
        lines += ["## fp32 reruns", "", "```", (work / "compare-fp32" / "verdict.txt").read_text().rstrip(), "```", ""]
        lines += [(work / "compare-fp32" / "tables" / "compare_cells.md").read_text().rstrip(), ""]
    return "\n".join(lines) + "\n"


def cmd_merge(args: argparse.Namespace) -> int:
    results = Path(args.results)
    device = args.device or only_device(results)
    records = [r for r in read_records([device_dir(results, device)], device, "auto") if r.get("ok")]
    files = packs(results, device, "auto")
    if not records or not files:
        raise SystemExit(f"no exported slice of {device} under {device_dir(results, device)}")
    seen: dict[str, str] = {}
    for r in records:
        if r["slice"] in seen:
            raise SystemExit(f"slice {r['slice']} is in two packs ({seen[r['slice']]}, {r['pack']}): remove one")
        seen[r["slice"]] = r["pack"]
    work = Path(args.work or tempfile.mkdtemp(prefix="psa-paper-merge-"))
    work.mkdir(parents=True, exist_ok=True)
    alpha = args.alpha
    cmp = compare(files, work / "compare", alpha)
    s = cmp["summary"]
    cells_bad, regimes_bad = disagreeing(cmp, alpha)
    if not args.no_report:
        psa_run("report", "--export", *map(str, files), "--out", str(work / "report"))
    expected = [x["slice"] for x in load_slices(results, device.endswith("-tiny"))]
    missing = [x for x in expected if x not in seen]
    records.sort(key=lambda r: r["slice"])
    rel = [os.path.relpath(f, ROOT) if f.is_relative_to(ROOT) else str(f) for f in files]
    doc = {
        "device": device, "device_name": versions(records, "device_name"), "torch": versions(records, "torch"),
        "triton": versions(records, "triton"), "cuda": versions(records, "cuda"),
        "precision": versions(records, "precision"), "precision_flag": "auto",
        "concurrency": versions(records, "concurrency") or "psa's default",
        "slices": [{k: r.get(k) for k in ("slice", "archs", "wall_s", "to_last_row_s", "dry_run_estimate_s",
                                          "dry_run_s", "estimate_s", "trials", "date")} for r in records],
        "wall_s": round(sum(r["wall_s"] for r in records), 2),
        "wall_is_sum_of_slices": True,
        "wall_note": (f"a sum of {len(records)} slices, each its own psa study (--arch-file) timed from its "
                      "command's start to its end; not one command"),
        "trials_done": sum(r.get("trials", 0) for r in records),
        "dry_run_estimate_s": round(sum(r.get("dry_run_estimate_s") or 0 for r in records), 1) or None,
        "alpha": alpha, "reference": "published",
        "cells_consistent": s.get("consistent", 0), "cells_total": s.get("cells", 0),
        "regimes_agree": s.get("regimes_agree", 0), "regimes_total": s.get("regimes_compared", 0),
        "complete": not missing, "slices_missing": missing,
        "cells_inconsistent": [f"{c['arch']} {c['mode']}" for c in cmp["cells"] if _different(c, alpha)],
        "regimes_differ": regimes_bad,
        "rerun_fp32": list(dict.fromkeys(cells_bad + regimes_bad)),
        "compare_command": f"psa compare --export {' '.join(rel)} --reference published --alpha {alpha:g}",
        "report_command": None if args.no_report else f"psa report --export {' '.join(rel)}",
        "date": datetime.date.today().isoformat(),
    }
    fp32 = merge_fp32(results, device, work, alpha, cmp)
    if fp32:
        doc["fp32"] = fp32
    out_json = results / f"paper-study-{device}.json"
    out_md = results / f"paper-study-{device}-verdict.md"
    write_atomic(out_json, json.dumps(doc, indent=1) + "\n")
    write_atomic(out_md, verdict_markdown(doc, cmp, work, fp32))
    print((work / "compare" / "verdict.txt").read_text().rstrip())
    print(f"\ncells consistent {doc['cells_consistent']}/{doc['cells_total']}, regimes {doc['regimes_agree']}/"
          f"{doc['regimes_total']}, {doc['trials_done']} trials, wall {doc['wall_s']:.0f} s (a sum of "
          f"{len(records)} slices){'' if doc['complete'] else '; missing slices: ' + ', '.join(missing)}")
    print(f"to rerun in fp32: {' '.join(doc['rerun_fp32']) or 'none'}")
    print(f"wrote {out_json}, {out_md}; compare and report in {work}")
    return 0


def merge_fp32(results: Path, device: str, work: Path, alpha: float, main: dict) -> dict | None:
    """The fp32 reruns: their own comparison, and the main study's counts with their cells in place."""
    files = packs(results, device, "fp32")
    if not files:
        return None
    cmp = compare(files, work / "compare-fp32", alpha)
    archs = list(dict.fromkeys(c["arch"] for c in cmp["cells"]))
    ok = sum(_consistent(c, alpha) for c in cmp["cells"])
    fp32_cells = {(c["arch"], c["mode"]): c for c in cmp["cells"]}
    fp32_regimes = {r["arch"]: r for r in cmp["regimes"]}
    combined = [fp32_cells.get((c["arch"], c["mode"]), c) for c in main["cells"]]
    regimes = [fp32_regimes.get(r["arch"], r) for r in main["regimes"]]
    recs = [r for r in read_records([device_dir(results, device)], device, "fp32") if r.get("ok")]
    return {"archs": archs, "slices": sorted(r["slice"] for r in recs),
            "wall_s": round(sum(r["wall_s"] for r in recs), 2), "cells_consistent": ok, "cells_total": len(cmp["cells"]),
            "regimes_agree": sum(r["agree"] == "True" for r in cmp["regimes"]), "regimes_total": len(cmp["regimes"]),
            "combined_cells_consistent": sum(_consistent(c, alpha) for c in combined),
            "combined_regimes_agree": sum(r["agree"] == "True" for r in regimes),
            "cells": [{"arch": c["arch"], "mode": c["mode"], "p_fp32": None if math.isnan(_p(c)) else _p(c),
                       "consistent": _consistent(c, alpha)} for c in cmp["cells"]]}


def only_device(results: Path) -> str:
    found = sorted(p.name.removeprefix("paper-study-") for p in results.glob("paper-study-*") if p.is_dir())
    if len(found) != 1:
        raise SystemExit(f"name the device with --device (found: {', '.join(found) or 'none'})")
    return found[0]


# --------------------------------------------------------------------------------------------
# The Ray backend against the local one


RAY_ARCHS = ("1*2048", "18*18", "8*8")
RAY_TINY_ARCHS = ("1*8", "2*4", "4*2")

ROW_QUERIES = {
    "trials": "SELECT t.arch, t.mode, t.trial, t.seed, t.status, t.bounty, t.bounty_loop, t.test_acc, t.loops_done "
              "FROM trials t ORDER BY 1, 2, 3",
    "meta_loops": "SELECT t.arch, t.mode, t.trial, m.loop, m.candidate_acc, m.promoted, m.ablated_layer, "
                  "m.ablated_index, m.lkg_score, m.train_loss, m.diverged FROM meta_loops m "
                  "JOIN trials t ON t.id = m.trial_id ORDER BY 1, 2, 3, 4",
}


def db_rows(db: Path) -> dict[str, list[tuple]]:
    """Every result row without wall-clock columns or ids."""
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return {k: con.execute(q).fetchall() for k, q in ROW_QUERIES.items()}
    finally:
        con.close()


def cmd_ray(args: argparse.Namespace) -> int:
    """The same small study on the local backend and on a local Ray instance, both timed; their rows compared."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    info = device_info(args.device, args.tiny)
    work = Path(tempfile.mkdtemp(prefix="psa-paper-ray-"))
    archs = args.arch or (RAY_TINY_ARCHS if args.tiny else RAY_ARCHS)
    design = ["--trials", "2"] + (["--meta-loops", "2", "--train-subset", "256"] if args.tiny else [])
    doc: dict = {"device": info["device"], "device_name": info["device_name"], "torch": info["torch"],
                 "triton": info["triton"], "archs": list(archs), "trials": 2,
                 "precision": resolved_precision(args.device, "auto"), "date": datetime.date.today().isoformat()}
    try:
        import ray

        doc["ray"] = ray.__version__
    except ImportError as e:
        doc["ray"] = None
        doc["error"] = f"no Ray here: {e}"
        write_atomic(out / f"paper-ray-{info['device']}.json", json.dumps(doc, indent=1) + "\n")
        print(doc["error"])
        return 1
    rows = {}
    for backend in ("local", "ray"):
        argv = [sys.executable, "-m", "psa", "study", *[x for a in archs for x in ("--arch", a)], *design,
                "--name", "raycheck", "--db", str(work / f"{backend}.sqlite"), "--backend", backend, "--quiet"]
        if backend == "local":
            argv += ["--device", args.device]  # a Ray task takes the GPU it is given, else the CPU
        elif args.num_cpus:
            argv += ["--num-cpus", str(args.num_cpus)]
        run_env = psa_env()
        if backend == "local" and info["device_type"] == "cpu":
            # a Ray task trains on one thread, and a CPU GEMM's last bits can depend on the thread count
            run_env["OMP_NUM_THREADS"] = "1"
        t0 = time.perf_counter()
        p = subprocess.run(argv, env=run_env, capture_output=True, text=True)
        doc[f"{backend}_wall_s"] = round(time.perf_counter() - t0, 2)
        doc[f"{backend}_returncode"] = p.returncode
        print(f"{backend}: exit {p.returncode}, {doc[f'{backend}_wall_s']:.1f} s", flush=True)
        if p.returncode != 0:
            doc[f"{backend}_stderr"] = p.stderr[-2000:]
            print(p.stderr[-2000:])
            continue
        rows[backend] = db_rows(work / f"{backend}.sqlite")
    if len(rows) == 2:
        for k in ROW_QUERIES:
            a, b = rows["local"][k], rows["ray"][k]
            doc[f"{k}_rows"] = len(a)
            doc[f"{k}_equal"] = a == b
            doc[f"{k}_differing"] = sum(x != y for x, y in zip(a, b)) + abs(len(a) - len(b))
    doc["rows_equal"] = len(rows) == 2 and all(doc[f"{k}_equal"] for k in ROW_QUERIES)
    path = out / f"paper-ray-{info['device']}.json"
    write_atomic(path, json.dumps(doc, indent=1) + "\n")
    print(f"rows equal: {doc['rows_equal']}; wrote {path}")
    shutil.rmtree(work, ignore_errors=True)
    return 0 if doc["rows_equal"] else 1


# --------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--results", default=str(RESULTS), help="where slices and records live (default bench/results)")
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("slices", parents=[common], help="cut the 98 architectures into slices (paper-slices.json)")
    p.add_argument("--slice-seconds", type=float, default=SLICE_SECONDS)
    p.add_argument("--check", action="store_true", help="only check that the committed cut is this one")
    p.set_defaults(func=cmd_slices)

    def device_flags(p: argparse.ArgumentParser) -> None:
        p.add_argument("--out", required=True, help="what comes back from the device: $OUT")
        p.add_argument("--device", default=None, help="cuda if there is one, else cpu")
        p.add_argument("--tiny", action="store_true", help="tiny settings for a CPU (tests)")

    p = sub.add_parser("run", parents=[common], help="run the next slices within a budget, exporting each")
    device_flags(p)
    p.add_argument("--budget", type=float, required=True, help="seconds this call may spend")
    p.add_argument("--precision", choices=("auto", "fp32"), default="auto")
    p.add_argument("--slice", nargs="+", help="only these slices (e.g. s03)")
    p.add_argument("--arch", nargs="+", help="these architectures, as slices of their own making "
                                             "(default with --precision fp32: those disagreeing in the tf32 slices so far)")
    p.add_argument("--slice-seconds", type=float, default=SLICE_SECONDS, help="for --arch's slices")
    p.add_argument("--concurrency", type=int, help="populations in flight (psa study's default: 8 on a card)")
    p.add_argument("--no-dry-run", action="store_true", help="skip each slice's dry run")
    p.add_argument("--work", help="databases and exports while running (default: a temporary folder)")
    p.add_argument("--keep-work", action="store_true")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("collect", parents=[common], help="copy a device call's files into the results folder")
    p.add_argument("paths", nargs="+")
    p.set_defaults(func=cmd_collect)

    p = sub.add_parser("merge", parents=[common], help="compare and report a device's slices; write its record and verdict table")
    p.add_argument("--device", help="h100, h200, ... (default: the only one with slices)")
    p.add_argument("--alpha", type=float, default=0.01, help="per-cell level (psa compare's default, 0.01)")
    p.add_argument("--no-report", action="store_true", help="skip psa report")
    p.add_argument("--work", help="compare/ and report/ go here (default: a temporary folder)")
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("ray", parents=[common], help="--backend ray on a local Ray instance against the local backend")
    device_flags(p)
    p.add_argument("--arch", nargs="+", help=f"default {' '.join(RAY_ARCHS)}")
    p.add_argument("--num-cpus", type=int, help="CPUs of the local Ray instance")
    p.set_defaults(func=cmd_ray)

    args = ap.parse_args(argv)
    if args.cmd in ("run", "ray") and args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
