"""Where a study's populations train: on this process's device (local) or as Ray tasks (ray).
Both yield the same events (psa.study.events); the driver records them."""
