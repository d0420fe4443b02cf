"""The study layer: designs, plans, the runner and its backends, the results store."""
