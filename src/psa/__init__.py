"""psa: Persistent Stochastic Ablation and the Frustration Engine, on batched populations of MLPs."""

__version__ = "0.1.0"
