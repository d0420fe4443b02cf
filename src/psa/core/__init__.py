"""The engine's layer: architectures, data, models, populations and the batched Frustration Engine."""
