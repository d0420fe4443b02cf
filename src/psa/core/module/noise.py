"""The randomness of a member's forward pass, drawn from that member's own seeded streams: never
from torch's global generator, and never from another member's.

- nn.Dropout modules become MaskedDropout: the step's multipliers drawn as psa's engine draws
  its hidden layers' (psa.core.rng.dropout_noise: one draw per step over all of a model's
  dropout units), so that an MLP given as a plain nn.Module reproduces the engine.
- Functional dropout (F.dropout and F.dropout1d/2d/3d, in a model's own forward or in
  attention, psa.core.module.functional.Attention) is replaced while a member's forward runs
  (MemberRandomness, a TorchFunctionMode): its mask is a counter-based hash of the member's step
  key, the call's place in the forward, and the element's position. Integer arithmetic on
  tensors, so it runs under torch.func.vmap with a different key per member.
- Every dropout of the model is one of psa's dropout sites, as the paper's dropout after every
  hidden ReLU: it drops at the `dropout` mode's rate in that mode and not at all in the others
  (the rate a model's own code gives a functional dropout is not used).
- Anything else random (torch.rand in a forward, an RNN's dropout between layers) cannot be
  batched this way: under vmap it raises, and such a model trains one member at a time, each
  step under its own seeded generator (member_generator).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from psa.core.member import derive_seed
from psa.core.rng import MASK32, mul32

# per-element dropout and per-channel dropout (the mask covers the dimensions before these)
ELEMENT_DROPOUT = {F.dropout}
CHANNEL_DROPOUT = {F.dropout1d: 1, F.dropout2d: 2, F.dropout3d: 3}  # spatial dimensions after the channels
SITE_C = 0x9E3779B9  # odd: spreads the call index over the key's bits


class Noise:
    """The dropout multipliers of the current step, shared by every MaskedDropout of a model:
    (batch, units) for one member (vmap gives each its own), or None for no dropout. Setting
    them starts a forward: it counts the calls of each MaskedDropout anew."""

    def __init__(self) -> None:
        self._noise: torch.Tensor | None = None
        self._calls: dict[int, int] = {}

    @property
    def noise(self) -> torch.Tensor | None:
        return self._noise

    @noise.setter
    def noise(self, value: torch.Tensor | None) -> None:
        self._noise, self._calls = value, {}

    def call(self, module: nn.Module) -> int:
        """How many times `module` was called before in this forward."""
        k = self._calls.get(id(module), 0)
        self._calls[id(module)] = k + 1
        return k


class MaskedDropout(nn.Module):
    """nn.Dropout with given multipliers: its k-th call in a forward multiplies by units
    [offset, offset + units) of the step's noise, calls[k], shaped as that call's input (one
    nn.Dropout module reused at several places is a dropout site at each). Identity in eval()
    or when the step draws no noise."""

    def __init__(self, holder: Noise, calls: list[tuple[int, int]]) -> None:
        super().__init__()
        self.holder, self.calls = holder, calls

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x times its slice of the noise (training with noise), else x."""
        noise = self.holder.noise
        if not self.training or noise is None:
            return x
        offset, units = self.calls[self.holder.call(self) % len(self.calls)]
        return x * noise[:, offset : offset + units].reshape(x.shape)


def mix32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 (psa.core.rng's hash) in plain torch integer operations: vmap batches them."""
    x = x ^ (x >> 16)
    x = mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def step_key(keys: torch.Tensor, step: int) -> torch.Tensor:
    """(C,) the key of one training step of each member, from keys (C, 2) of
    psa.core.rng.loop_keys(seed, "functional-dropout", loop)."""
    return mix32(mix32((keys[:, 0] ^ step) & MASK32) ^ keys[:, 1])


@dataclass(frozen=True)
class StepDropout:
    """A member's functional dropout for one training step: its step key (step_key), and the
    threshold and scale of its rate (psa.core.rng.dropout_threshold; 1 / (1 - p) in float32).
    0-d tensors, batched ones under vmap."""

    key: torch.Tensor
    threshold: torch.Tensor
    scale: torch.Tensor


class MemberRandomness(TorchFunctionMode):
    """While a member's forward runs (member_forward), every F.dropout and channel dropout it
    calls in training is one of psa's dropout sites: with `step` None (no member of the slice
    drops in this loop) the identity, else the input times a mask drawn from step.key at the
    member's rate. Each call in the forward is a site of its own (its place in the call order),
    so two dropouts of one forward draw independent masks and a forward draws the same masks
    every time. Outside training the calls are F.dropout's own (the identity)."""

    def __init__(self) -> None:
        super().__init__()
        self.step: StepDropout | None = None
        self.site = 0
        self.sites = 0  # the most sites one forward called (what inspect counts)

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func in ELEMENT_DROPOUT or func in CHANNEL_DROPOUT:
            x, _, training = _dropout_args(args, kwargs)
            if training:
                self.site += 1
                self.sites = max(self.sites, self.site)
                if self.step is None:
                    return x
                return x * self.multiplier(x, CHANNEL_DROPOUT.get(func, 0))
        return func(*args, **kwargs)

    def multiplier(self, x: torch.Tensor, spatial: int) -> torch.Tensor:
        """0 or the member's scale, per element of x, or per channel where `spatial` trailing
        dimensions share a mask."""
        assert self.step is not None
        shape = tuple(x.shape[: x.dim() - spatial]) + (1,) * spatial
        n = 1
        for s in shape:
            n *= s
        pos = torch.arange(n, dtype=torch.int64, device=x.device).view(shape)
        site = mix32(self.step.key ^ ((self.site * SITE_C) & MASK32))
        keep = mix32(mix32(pos & MASK32) ^ site) >= self.step.threshold
        return keep.to(x.dtype) * self.step.scale.to(x.dtype)


def _dropout_args(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[torch.Tensor, float, bool]:
    """(input, p, training) of a call to F.dropout or a channel dropout, by position or keyword."""
    names = ("input", "p", "training")
    defaults: dict[str, Any] = {"p": 0.5, "training": True}
    values = dict(defaults)
    values.update(dict(zip(names, args)))
    values.update({k: v for k, v in kwargs.items() if k in names})
    return values["input"], float(values["p"]), bool(values["training"])


@contextlib.contextmanager
def member_forward(mode: MemberRandomness, step: StepDropout | None) -> Iterator[None]:
    """A member's forward under `mode`: its functional dropouts draw from `step` (None: they
    are the identity), each call a new site."""
    mode.step, mode.site = step, 0
    try:
        with mode:
            yield
    finally:
        mode.step = None


@contextlib.contextmanager
def member_generator(seed: int, loop: int, step: int, device: torch.device) -> Iterator[None]:
    """torch's generators seeded for one member's training step (restored after): what a
    model draws beyond psa's dropouts (an RNN's dropout between layers, torch.rand in its
    forward) comes from the member's seed, loop and step, not from the caller's generator."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(derive_seed(seed, "generator", loop, step))
        yield
