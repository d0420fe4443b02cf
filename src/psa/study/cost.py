"""What a population of psa's own nets costs: FLOPs, device memory and a rough time model. The
time model orders a plan (largest work first) and stands in for the shapes a study's
calibration did not probe; the dry run, the progress bar and `psa status` weigh populations by
their probes (psa.study.calibration)."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from psa.core.arch import Arch, parse_arch
from psa.core.data import N_TRAIN, N_VAL, dataset_shape
from psa.core.device import total_memory
from psa.core.mlp.memory import working_bytes
from psa.core.model import DEFAULT_MODEL, flops_per_sample, linear_shapes, param_count
from psa.study.design import StudyDesign


@functools.lru_cache(maxsize=8)
def _dataset_io(dataset: str) -> tuple[int, int]:
    return dataset_shape(dataset)


def design_arch(design: StudyDesign, arch: str) -> Arch:
    """An architecture of `design` with its data set's input size and class count."""
    return parse_arch(arch, *_dataset_io(design.dataset))


def _arch(arch: str | Arch) -> Arch:
    return arch if isinstance(arch, Arch) else parse_arch(arch)  # a string: MNIST's sizes


def arch_flops(arch: str | Arch, meta_loops: int, n_train: int = N_TRAIN, n_val: int = N_VAL,
               model: str = DEFAULT_MODEL) -> float:
    """FLOPs of one trial of `model`: per loop forward+backward (3x forward) over the training
    set and a forward over the validation set, plus the final test forward (10,000 images)."""
    f = flops_per_sample(_arch(arch), model)
    return meta_loops * (3 * f * n_train + f * n_val) + f * 10_000


@dataclass(frozen=True)
class Calibration:
    """Seconds per loop of a population ~ seconds_per_flop * FLOPs + seconds_per_layer_step *
    (Linear layers x training steps): compute plus per-kernel overhead. Only the ratios between
    populations matter here (the order of a plan, the shapes a calibration left unprobed)."""

    seconds_per_flop: float
    seconds_per_layer_step: float
    device: str
    method: str

    def loop_terms(self, arch: str | Arch, members: int, batch_size: int = 256, n_train: int = N_TRAIN,
                   model: str = DEFAULT_MODEL) -> tuple[float, float]:
        """loop_seconds' two terms: (compute, per-kernel overhead)."""
        a = _arch(arch)
        steps = -(-n_train // batch_size)
        flops = members * flops_per_sample(a, model) * (3 * n_train + N_VAL)
        return self.seconds_per_flop * flops, self.seconds_per_layer_step * len(linear_shapes(a, model)) * steps

    def loop_seconds(self, arch: str | Arch, members: int, batch_size: int = 256, n_train: int = N_TRAIN,
                     model: str = DEFAULT_MODEL) -> float:
        """Estimated wall seconds of one meta-loop of a population of `members` of `model` for `arch`."""
        compute, overhead = self.loop_terms(arch, members, batch_size, n_train, model)
        return compute + overhead


# Uncalibrated weights: roughly a mid-range GPU (they only need the right ratios between
# populations; on a CPU they misjudge deep narrow nets, which the probes correct).
DEFAULT_CALIBRATION = Calibration(1.0 / 5e12, 60e-6, "default", "fixed guess")


def bytes_per_member(arch: str | Arch, batch_size: int = 256, triton_stack: bool = False, precision: str = "fp32",
                     graphs: bool = False, model: str = DEFAULT_MODEL) -> int:
    """Device memory one member needs: what it trains with (memory.working_bytes: candidate,
    gradient, AdamW's moments, a step's activations, and with `triton_stack` and `graphs` the
    Triton backward's partials and the graph's pool) plus its LKG and as much again as slack."""
    a = _arch(arch)
    return working_bytes(a, batch_size, triton_stack, precision, graphs, model) + param_count(a, model) * 4 * 2


def device_budget(device: torch.device) -> int:
    """Bytes a study may plan to use on `device`: a fixed fraction of the device's total memory
    (not its free memory, so that the same device always yields the same plan)."""
    total = total_memory(device)
    if device.type == "cuda":
        return int(total * 0.6)
    return int(min(total * 0.25, 16 << 30))


def auto_population_size(design: StudyDesign, budget: int) -> int:
    """Members per population that fit `budget` for the design's largest architecture, capped at
    a whole architecture (all modes x all trials): the default population size."""
    worst = max(bytes_per_member(design_arch(design, a), design.hparams.batch_size, model=design.model)
                for a in design.nets)
    fit = max(1, budget // worst)
    cap = len(design.conditions()) * design.trials
    return int(min(cap, fit))
