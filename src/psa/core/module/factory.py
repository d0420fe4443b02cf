"""The model of your own: a factory (a function that returns a fresh torch.nn.Module), named in a
study as `module:function` and built once per seed."""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable

import torch
from torch import nn

from psa.core.errors import ConfigError, one_line

MakeModel = Callable[[], nn.Module]


def resolve_factory(factory: str) -> MakeModel:
    """The function `module:function` names, imported with the current directory on sys.path.

    Any failure is one ConfigError line: the factory is named, never unpickled or serialised.
    """
    mod_name, sep, fn_name = factory.partition(":")
    if not sep or not mod_name or not fn_name:
        raise ConfigError(f"--model {factory!r}: give the factory as module:function (e.g. mypkg.models:make_cnn)")
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)
    try:
        mod = importlib.import_module(mod_name)
    except Exception as e:  # noqa: BLE001 - whatever the user's module raises is one line
        raise ConfigError(f"--model {factory}: cannot import {mod_name} ({type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''})") from None
    fn = mod
    for part in fn_name.split("."):
        fn = getattr(fn, part, None)
        if fn is None:
            raise ConfigError(f"--model {factory}: module {mod_name} has no {fn_name}")
    if not callable(fn):
        raise ConfigError(f"--model {factory}: {fn_name} is not callable")
    return fn  # type: ignore[return-value]


def factory_name(factory: MakeModel) -> str:
    """`module:qualname` of a factory: what studies and checkpoints record of it."""
    return f"{getattr(factory, '__module__', '?')}:{getattr(factory, '__qualname__', repr(factory))}"


def build(factory: MakeModel, seed: int) -> nn.Module:
    """The factory's module, its parameters drawn from `seed` on the CPU (the global RNG is
    forked, so callers are not disturbed): the same initialisation as psa's SimpleMLP."""
    name = factory_name(factory)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            module = factory()
        except Exception as e:  # noqa: BLE001
            raise ConfigError(f"model factory {name} failed: {one_line(e)}") from None
    if not isinstance(module, nn.Module):
        raise ConfigError(f"model factory {name} returned {type(module).__name__}, not a torch.nn.Module")
    lazy = [n for n, t in (*module.named_parameters(), *module.named_buffers()) if nn.parameter.is_lazy(t)]
    if lazy:
        # the members are stacked parameter by parameter, which needs every shape before training
        raise ConfigError(f"model factory {name} returned a module with uninitialised (lazy) parameters "
                          f"({', '.join(lazy[:3])}{' ...' if len(lazy) > 3 else ''}): give its layers their input "
                          f"sizes, or run it once on a batch inside the factory")
    return module

