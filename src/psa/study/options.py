"""How a study is asked to run (not what: that is the design), and the error when it cannot."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

DEFAULT_DB = Path("results") / "psa.sqlite"


class StudyError(RuntimeError):
    """A study that cannot start or continue: locked, disk full, different design, failures."""


@dataclass(frozen=True)
class RunOptions:
    """How to run a study (not what: that is the design)."""

    db: Path = DEFAULT_DB  # the results database (SQLite, WAL); checkpoints live beside it
    device: str = "auto"  # local backend: auto (cuda, then mps, then cpu), cpu, cuda:N, mps
    population_size: int | None = None  # most members per population; None: the stored one, else fit the device
    backend: str = "local"  # local | ray
    address: str | None = None  # ray: an existing cluster; None starts a local instance
    num_cpus: int | None = None  # ray: CPUs of a local instance
    cpus_per_task: int = 1  # ray: CPUs per population where there is no GPU
    per_device: int = 1  # ray: populations sharing one GPU
    max_retries: int = 3  # ray: resubmissions of a population whose worker was lost
    data_dir: str | None = None  # the data set's files (else $PSA_DATA_DIR, the shipped copy)
    busy_timeout: float = 60.0  # seconds to wait for another writer's transaction
    quiet: bool = False  # no progress output
    precision: str = "auto"  # of the matmuls (psa.core.precision); fixed when the study is created
    kernels: str = "auto"  # auto | torch | triton (resolved by psa.core.device.resolve_execution)
    graphs: bool = True  # CUDA graphs on a GPU
    concurrency: int | None = None  # populations in flight on one GPU; None: 8 on a GPU, 1 elsewhere
    checkpoint_every: float = 60.0  # seconds between a population's checkpoints (0: every meta-loop)
    # a model given as module:function: its members trained together (yes), one at a time (no),
    # or by psa.core.module.engine.auto_batched's rule (auto); fixed when the study is created
    batched: str = "auto"
