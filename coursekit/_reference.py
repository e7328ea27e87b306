"""The marker that tags a coursekit function as the reference of an exercise (bottom floor).

An exercise check compares a student's function with coursekit's own; while the student's code
runs, the check *blocks* the references (and the engines behind them) so that "call coursekit and
rename the result" earns nothing. This module only keeps the set of blocked keys; it knows
nothing of exercises or grading, so every floor of the library can import it.

    @reference
    def vanilla_saliency(model, x, target): ...

    with blocked([vanilla_saliency]):      # what coursekit.checks does around a student's call
        vanilla_saliency(model, x, 3)      # raises ReferenceBlocked

Engines (the gradient path, the rules engine, the CAM base) are marked the same way, so a check
blocks them by passing the functions themselves, never by patching private names.

The wrapper is only the friendly first line (a clear error message). The marker also keeps the
code object of every reference (:func:`reference_code`), so that :mod:`coursekit.checks` can
notice the reference's code running however it was reached (the wrapper has no
``__wrapped__``; a closure cell, a copy taken before the check or an emptied ``_BLOCKED`` do not
help either).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Callable, Iterable, Iterator

__all__ = ["ReferenceBlocked", "reference", "reference_key", "blocked", "blocked_keys", "is_blocked"]


class ReferenceBlocked(RuntimeError):
    """A student function called the coursekit function it is meant to re-implement."""


_BLOCKED: set[str] = set()
_ORIGINALS: dict[str, tuple[object, str]] = {}  # key -> (code object, module name)


def reference(fn: Callable) -> Callable:
    """Mark ``fn`` (a function or method) as a reference that an exercise check may block."""
    key = f"{fn.__module__}.{fn.__qualname__}"

    def wrapper(*args, **kwargs):
        if _BLOCKED and key in _BLOCKED:
            raise ReferenceBlocked(
                f"your function called coursekit's {fn.__qualname__}(), the reference this exercise asks you to "
                "write yourself (or the engine behind it). Implement it with torch operations instead."
            )
        return fn(*args, **kwargs)

    functools.update_wrapper(wrapper, fn)
    del wrapper.__wrapped__  # no plain way back to the unguarded function
    try:
        wrapper.__signature__ = inspect.signature(fn)  # help() and signature() still show the real parameters
    except (TypeError, ValueError):
        pass  # a builtin without a signature: help() shows (*args, **kwargs)
    wrapper.__reference_key__ = key
    _ORIGINALS[key] = (fn.__code__, fn.__module__)
    return wrapper


def reference_key(fn) -> str:
    """The key of a function marked with :func:`reference`; a clear error for any other object."""
    key = getattr(fn, "__reference_key__", None)
    if key is None:
        raise TypeError(f"{fn!r} is not decorated with coursekit's @reference and cannot be blocked")
    return key


def is_blocked(fn) -> bool:
    """Whether the reference ``fn`` is blocked right now."""
    return reference_key(fn) in _BLOCKED


def reference_code(key: str):
    """The code object of the reference with this key (None for an unknown key)."""
    return _ORIGINALS.get(key, (None, ""))[0]


def reference_module(key: str) -> str:
    """The name of the module that defines the reference with this key ("" for an unknown key)."""
    return _ORIGINALS.get(key, (None, ""))[1]


def blocked_keys() -> frozenset[str]:
    """The keys of the references blocked right now (a copy: changing it blocks nothing)."""
    return frozenset(_BLOCKED)


@contextlib.contextmanager
def blocked(functions: Iterable) -> Iterator[None]:
    """Block the given references (functions or their keys) inside the block; restore on exit."""
    keys = {f if isinstance(f, str) else reference_key(f) for f in functions}
    saved = set(_BLOCKED)
    _BLOCKED.update(keys)
    try:
        yield
    finally:
        _BLOCKED.clear()
        _BLOCKED.update(saved)
