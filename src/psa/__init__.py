"""psa: Persistent Stochastic Ablation and the Frustration Engine, on batched populations of MLPs."""

import time as _time

__version__ = "0.1.0"
# when this process imported psa: `psa study --dry-run` counts a run's start-up from here
STARTED = _time.perf_counter()
