"""Notice and undo patches of what the checks rely on (``torch.allclose = ...``, ``Report.call = ...``).

When this module is imported (with :mod:`coursekit.checks`, before a student's code in a grader
and normally in a notebook too), it records the attributes of the modules and classes the checks
use: ``builtins``, ``torch``, ``torch.nn``, ``torch.nn.functional``, ``torch.autograd``,
``torch.Tensor``, ``torch.nn.Module``, ``numpy``, ``math``, and every ``coursekit`` module (with
the code, defaults and class attributes of its functions). :func:`restore` compares them with
what is there now, puts the originals back and returns what had changed, e.g.
``["torch.allclose"]``. Attributes added later (lazy imports) are not changes; ``coursekit``
modules imported later are recorded when first seen.
"""

from __future__ import annotations

import builtins
import math
import os
import sys
import types
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["restore", "watched_names"]

_MISSING = object()
_SKIP = {"__builtins__", "__loader__", "__spec__", "__cached__", "__file__", "__path__", "__warningregistry__",
         "__doc__", "__annotations__", "__dict__", "__weakref__", "__getattr__"}
_RECORD: dict[tuple[int, str], tuple[object, str, object]] = {}  # (id(owner), key) -> (owner, label, value)
_FUNCS: dict[int, tuple[types.FunctionType, str, tuple]] = {}


def _func_state(fn: types.FunctionType) -> tuple:
    return (fn.__code__, fn.__defaults__, fn.__kwdefaults__)


def _watch(owner, label: str, deep: bool) -> None:
    for key, value in list(vars(owner).items()):
        if key in _SKIP:
            continue
        _RECORD.setdefault((id(owner), key), (owner, f"{label}.{key}", value))
        if deep:
            target = value.__func__ if isinstance(value, (staticmethod, classmethod)) else value
            if isinstance(target, types.FunctionType):
                _FUNCS.setdefault(id(target), (target, f"{label}.{key}", _func_state(target)))
            elif isinstance(value, type) and value.__module__.startswith("coursekit") and id(value) != id(owner):
                _watch(value, f"{label}.{key}", deep=True)


def _watch_coursekit() -> None:
    """Record what is new in coursekit's modules (a module still being imported gains names later)."""
    for name, module in list(sys.modules.items()):
        if (name == "coursekit" or name.startswith("coursekit.")) and module is not None:
            _watch(module, name, deep=True)


for _owner, _label in ((builtins, "builtins"), (torch, "torch"), (nn, "torch.nn"), (F, "torch.nn.functional"),
                       (torch.autograd, "torch.autograd"), (torch.Tensor, "torch.Tensor"), (nn.Module, "torch.nn.Module"),
                       (np, "numpy"), (math, "math")):
    _watch(_owner, _label, deep=False)
_watch_coursekit()


_TORCH_DIR = str(Path(torch.__file__).resolve().parent) + os.sep


def _torch_wrapper(now, value) -> bool:
    """torch itself wraps some of its functions when torch._dynamo loads (``torch.manual_seed``)."""
    code = getattr(now, "__code__", None)
    return getattr(now, "__wrapped__", None) is value and code is not None and code.co_filename.startswith(_TORCH_DIR)


def watched_names() -> int:
    """How many attributes are watched (for tests)."""
    return len(_RECORD) + len(_FUNCS)


def restore() -> list[str]:
    """Put back every watched attribute that was replaced or deleted; return their names (sorted)."""
    _watch_coursekit()
    changed = []
    for (_, key), (owner, label, value) in _RECORD.items():
        now = vars(owner).get(key, _MISSING)
        if now is not value and _torch_wrapper(now, value):
            _RECORD[(id(owner), key)] = (owner, label, now)
        elif now is not value:
            changed.append(label)
            setattr(owner, key, value)
    for fn, label, state in _FUNCS.values():
        if any(a is not b for a, b in zip(_func_state(fn), state)):
            changed.append(f"{label} (its code)")
            fn.__code__, fn.__defaults__, fn.__kwdefaults__ = state
    return sorted(set(changed))
