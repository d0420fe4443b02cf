"""psa: Persistent Stochastic Ablation and the Frustration Engine, on batched populations of MLPs
and, through psa.fit, on any torch.nn.Module.

    psa.fit(make_model, train, val, test, ...)   PSA on your own model: a FitResult
    psa.load(directory)                          a FitResult that FitResult.save wrote
    psa.ConfigError                              what bad input raises: one line saying what is wrong
"""

from __future__ import annotations

import time as _time
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
# when this process imported psa: `psa study --dry-run` counts a run's start-up from here
STARTED = _time.perf_counter()

# `import psa` stays light: each name loads its module (and torch with it) on first use
_LAZY = {"fit": "psa.library", "load": "psa.results", "FitResult": "psa.results", "LoopRecord": "psa.results",
         "FitEstimate": "psa.estimate", "ConfigError": "psa.core.errors"}
__all__ = ["ConfigError", "FitEstimate", "FitResult", "LoopRecord", "fit", "load"]

if TYPE_CHECKING:
    from psa.core.errors import ConfigError
    from psa.estimate import FitEstimate
    from psa.library import fit
    from psa.results import FitResult, LoopRecord, load


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'psa' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
