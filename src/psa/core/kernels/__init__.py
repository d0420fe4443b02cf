"""The hidden stack's fast backends: Triton programs for a GPU (triton_stack, programs) and the
fused CPU step (cpu_stack). psa.core.mlp chooses them; nothing here knows of populations."""
