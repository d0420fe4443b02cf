"""What a population's checkpoint costs the study's scheduler: written on its own thread (the
driver before the checkpoint writer), or copied to the host and handed to the writer's thread
(psa.study.checkpoints, the driver now).

For each architecture, a 60-member population's real checkpoint (psa.core.mlp.checkpoint), to a
temporary folder on this machine's disk, best of `--repeat`:
- bytes then file: safetensors serialised into bytes, then written and fsynced (save_tensors
  before 2026-12-07);
- save_file: safetensors written straight to the file, then fsynced (save_tensors now);
- the scheduler's share: the host copy and the hand-over, what the scheduler's thread waits for;
- in background: from the hand-over until the write is on disk;
- scheduler pace: how fast the scheduler's thread runs small torch operations (a stand-in for
  launching a loop's steps) while the writer writes, against the same thread with no write
  beside it (the writer's Python holds the GIL only between its C calls).

    python bench/checkpoint_writer.py [--arch 1*8 2*939 4*632] [--repeat 3]
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from pathlib import Path

import torch
from safetensors.torch import save as st_save

from psa.core.arch import parse_arch
from psa.core.checkpoint import atomic_write, save_tensors
from psa.core.hparams import HParams
from psa.core.member import MODES
from psa.core.mlp.checkpoint import population_checkpoint
from psa.core.mlp.population import Population
from psa.study.checkpoints import CheckpointWriter, host_copy


def population_state(arch: str, members: int) -> tuple[dict[str, torch.Tensor], dict]:
    """The checkpoint (tensors, metadata) of a fresh population of `arch` on the CPU."""
    hp = HParams()
    mems = [hp.member(MODES[j % len(MODES)], j // len(MODES)) for j in range(members)]
    pop = Population.create(parse_arch(arch), mems, torch.device("cpu"), n_val=10_000)
    return population_checkpoint(pop)


def ops_per_second(seconds: float, stop: threading.Event | None = None) -> float:
    """Small torch operations a second on this thread, for `seconds` or until `stop` is set."""
    a, b = torch.ones(64), torch.ones(64)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds and not (stop is not None and stop.is_set()):
        for _ in range(100):
            torch.add(a, b, out=a)
        n += 100
    return n / (time.perf_counter() - t0)


def measure(arch: str, members: int, folder: Path, repeat: int) -> dict[str, float]:
    """One architecture's row (seconds, best of `repeat`; the pace as a ratio)."""
    tensors, meta = population_state(arch, members)
    size = sum(t.numel() * t.element_size() for t in tensors.values())
    path = folder / f"{arch.replace('*', 'x')}.safetensors"
    row: dict[str, list[float]] = {"bytes then file": [], "save_file": [], "scheduler's share": [],
                                   "in background": [], "scheduler pace": []}
    for _ in range(repeat):
        t = time.perf_counter()
        atomic_write(path, st_save(tensors, metadata={"psa": "{}"}))
        row["bytes then file"].append(time.perf_counter() - t)
        t = time.perf_counter()
        save_tensors(path, tensors, meta)
        row["save_file"].append(time.perf_counter() - t)
        idle = ops_per_second(0.3)
        writer = CheckpointWriter()
        t = time.perf_counter()
        writer.submit("p", path, host_copy(tensors, live=True), meta)
        handed = time.perf_counter()
        row["scheduler's share"].append(handed - t)
        done = threading.Event()

        def written(w: CheckpointWriter = writer, flag: threading.Event = done) -> None:
            w.wait("p")
            flag.set()

        waiter = threading.Thread(target=written)
        waiter.start()
        busy = ops_per_second(60.0, stop=done)
        waiter.join()
        row["in background"].append(time.perf_counter() - handed)
        writer.close()
        row["scheduler pace"].append(busy / idle)
    out = {k: (max(v) if k == "scheduler pace" else min(v)) for k, v in row.items()}
    out["MB"] = size / 1e6
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", nargs="*", default=["1*8", "2*939", "4*632"])
    ap.add_argument("--members", type=int, default=60)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dir", default=None, help="where to write (default: a temporary folder)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        rows = {a: measure(a, args.members, Path(tmp), args.repeat) for a in args.arch}
    print(f"one checkpoint of a {args.members}-member population, cpu {torch.get_num_threads()} threads, "
          f"seconds (best of {args.repeat})")
    print("| population | MB | bytes then file | save_file | scheduler's share | in background | scheduler pace |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for a, r in rows.items():
        share = r["scheduler's share"]
        print(f"| {a} | {r['MB']:.1f} | {r['bytes then file']:.3f} | {r['save_file']:.3f} | {share:.3f} | "
              f"{r['in background']:.3f} | {r['scheduler pace']:.2f} |")


if __name__ == "__main__":
    main()
