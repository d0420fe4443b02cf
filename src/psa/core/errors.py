"""The error every core module raises for a configuration that cannot run, and psa's warnings
at the line of the caller's code that called into psa."""

from __future__ import annotations

import contextlib
import os
import sys
import warnings
from collections.abc import Iterator
from types import FrameType
from typing import Any

# psa's own files: a frame there is psa's, not its caller's
_PSA_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep
_COMMAND = (os.path.join(_PSA_DIR, "cli") + os.sep, os.path.join(_PSA_DIR, "__main__.py"))


class ConfigError(ValueError):
    """A population or training configuration that cannot run."""


class MissingDependency(ConfigError, ImportError):
    """An optional package that a call needs is not installed (caught as ImportError too)."""


def one_line(e: BaseException, limit: int = 200) -> str:
    """`Type: first line of the message` (at most `limit` characters of it): how a user's model
    or a library failing inside psa is said in psa's one line."""
    text = str(e)
    return f"{type(e).__name__}: {text.splitlines()[0][:limit] if text else ''}"


def _in_psa(frame: FrameType) -> bool:
    return os.path.abspath(frame.f_code.co_filename).startswith(_PSA_DIR)


def caller_stacklevel(frame: FrameType | None = None) -> int:
    """The `stacklevel` (counted from `frame`, default the caller's frame, as level 1) of the
    frame that called into psa: the one just outside psa's outermost frame on the stack. The
    outermost, not the innermost, since torch calls back into psa (vmap, autograd) and a
    warning from there would otherwise land on a line of torch's."""
    frame = frame or sys._getframe(1)
    frames: list[FrameType] = []
    f: FrameType | None = frame
    while f is not None:
        frames.append(f)
        f = f.f_back
    outermost = max((i for i, fr in enumerate(frames) if _in_psa(fr)), default=-1)
    if outermost >= 0 and os.path.abspath(frames[outermost].f_code.co_filename).startswith(_COMMAND):
        return 2  # psa run as a command: no caller's code to point at, so psa's line that warned
    return outermost + 2


def warn(message: str | Warning, category: type[Warning] = RuntimeWarning) -> None:
    """warnings.warn at the line of the caller's code that called into psa (psa.fit's caller),
    so that a note about the caller's model or data points at the caller's code, and the
    caller's warning filters (by module, by line) apply to it."""
    warnings.warn(message, category, stacklevel=caller_stacklevel(sys._getframe(0)))


@contextlib.contextmanager
def warnings_at_caller() -> Iterator[None]:
    """Inside the block, a warning raised from psa's own lines is raised again at the caller's
    line (`warn`); every other warning (torch's, the caller's own) passes through unchanged.
    Filters still decide first at psa's line: a warning ignored there stays ignored."""
    with warnings.catch_warnings():
        shown = warnings.showwarning  # whatever is in place: the default, pytest's, IPython's

        def show(message: Any, category: type[Warning], filename: str, lineno: int, file: Any = None,
                 line: str | None = None) -> None:
            if os.path.abspath(filename).startswith(_PSA_DIR):
                warn(message, category)  # lands on the caller's file: passes through here next
            else:
                shown(message, category, filename, lineno, file, line)

        warnings.showwarning = show
        yield
