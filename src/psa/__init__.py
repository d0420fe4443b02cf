"""psa: Persistent Stochastic Ablation and the Frustration Engine, on batched populations of MLPs
and, through psa.fit, on any torch.nn.Module."""

from __future__ import annotations

import time as _time
from typing import Any

__version__ = "0.1.0"
# when this process imported psa: `psa study --dry-run` counts a run's start-up from here
STARTED = _time.perf_counter()


def __getattr__(name: str) -> Any:
    # `import psa` stays light: psa.fit (and torch with it) loads on first use
    if name in ("fit", "FitResult"):
        from psa import library

        return getattr(library, name)
    raise AttributeError(f"module 'psa' has no attribute {name!r}")
