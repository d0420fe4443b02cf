"""argparse value types shared by every psa command: one checker, one message style."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

from psa.core.member import MAX_SEED


def number(
    kind: type, low: float | None = None, high: float | None = None, *,
    low_open: bool = False, high_open: bool = False, noun: str | None = None,
) -> Callable[[str], float]:
    """A parser of one int or float within [low, high] (open ends where asked); bounded floats
    must be finite. Errors read "expected a number in (0, 1), got 2.0"."""
    noun = noun or ("an integer" if kind is int else "a number")
    fmt = (lambda x: f"{x:,}") if kind is int else (lambda x: f"{x:g}")
    if low is not None and high is not None:
        span = f" in {'(' if low_open else '['}{fmt(low)}, {fmt(high)}{')' if high_open else ']'}"
    elif low is not None:
        span = f" {'>' if low_open else '>='} {fmt(low)}"
    elif high is not None:
        span = f" {'<' if high_open else '<='} {fmt(high)}"
    else:
        span = ""

    def parse(text: str) -> float:
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {noun}{span}, got {text!r}") from None
        bounded = low is not None or high is not None
        too_low = low is not None and (v < low or (low_open and v == low))
        too_high = high is not None and (v > high or (high_open and v == high))
        if too_low or too_high or (bounded and not math.isfinite(v)):
            raise argparse.ArgumentTypeError(f"expected {noun}{span}, got {v}")
        return v

    parse.__name__ = noun.split()[-1]
    return parse


positive_int = number(int, 1)
nonneg_int = number(int, 0)
real = number(float)
nonneg_real = number(float, 0)
probability = number(float, 0, 1, low_open=True, high_open=True)
percentage = number(float, 0, 100, low_open=True, noun="a percentage")
seconds = number(float, 0, noun="seconds")
seed_int = number(int, 0, MAX_SEED, noun="a seed")


def dataset_spec(text: str) -> str:
    """A data set name: mnist, fashion-mnist, cifar10 or npz:PATH (the file is read later)."""
    from psa.core.data import DataError, check_spec

    try:
        return check_spec(text)
    except DataError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
