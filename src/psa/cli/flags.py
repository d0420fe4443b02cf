"""Flag groups that several psa commands share (train and study)."""

from __future__ import annotations

import argparse

from psa.cli.argtypes import positive_int, real


def add_training_flags(p: argparse.ArgumentParser) -> None:
    """What a trial trains with and on: shared by train and study."""
    p.add_argument("--lr", type=real, help="AdamW learning rate (default 1e-4)")
    p.add_argument("--batch-size", type=positive_int, help="training batch size (default 256)")
    p.add_argument("--weight-decay", type=real, help="weight decay of `decay` mode (default 1e-4; 0 in other modes)")
    p.add_argument("--dropout", type=real, help="dropout rate of `dropout` mode (default 0.1; none in other modes)")
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N, mps")
    p.add_argument("--dataset", default="mnist", choices=["mnist"], help="data set (default mnist)")
    p.add_argument("--data-dir", help="directory with the four idx files (else $PSA_DATA_DIR, the shipped copy, ./dataset)")


def add_engine_flags(p: argparse.ArgumentParser, precision_default: str | None) -> None:
    """How the engine runs its arithmetic (not what it computes): shared by train and study."""
    from psa.core.engine import KERNEL_CHOICES
    from psa.core.precision import CHOICES

    p.add_argument("--precision", choices=CHOICES, default=precision_default,
                   help="matmul precision: fp32, tf32 (tensor cores; emulated off a GPU), bf16, or auto: tf32 on a "
                        "CUDA GPU, fp32 elsewhere" + ("" if precision_default else "; on resume, the run's own"))
    p.add_argument("--kernels", choices=KERNEL_CHOICES, default="auto",
                   help="auto: Triton kernels for narrow hidden stacks on a CUDA GPU when Triton is installed; "
                        "torch: never; triton: always (needs a GPU or TRITON_INTERPRET=1)")
    p.add_argument("--no-graphs", action="store_true",
                   help="on a GPU, run every training step eagerly instead of replaying a captured CUDA graph")
