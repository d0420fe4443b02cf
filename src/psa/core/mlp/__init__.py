"""psa's own nets (SimpleMLP, ResMLP) as batched populations: one flat buffer of every member's
weights, a hand-written forward and backward, and the Frustration Engine over them."""
