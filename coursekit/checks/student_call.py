"""Call a student's function where it cannot see the check, and notice what it should not do.

:func:`call` runs the function in a thread of its own, so the checker's frames (and the expected
values in them) are not on its call stack, under a profiler that records

* calls of the code of a blocked coursekit reference, however it was reached (``__wrapped__``,
  a closure cell, a function captured before the check, ``_BLOCKED`` emptied), and of a private
  helper of the same module called directly from the student's code;
* calls into attribution libraries (captum, zennit, pytorch-grad-cam);
* ``sys._current_frames`` and the ``gc`` object lists (the ways to reach another thread's frames).

The profiler only records (an exception raised by a profiler would switch it off); the check
turns each record into a verdict after the call. :func:`coursekit.checks.integrity.restore` runs
after every call, so a function that patches torch or coursekit is caught too.
"""

from __future__ import annotations

import ctypes
import gc
import importlib.util
import os
import sys
import sysconfig
import threading
from pathlib import Path

from .._reference import blocked, blocked_keys, reference_code, reference_module

__all__ = ["call", "Violation"]

_PACKAGE_DIR = str(Path(__file__).resolve().parents[1]) + os.sep
_LIBRARY_DIRS = tuple({sysconfig.get_paths()[k] for k in ("stdlib", "purelib", "platlib")})
_FRAME_FUNCTIONS = {sys._current_frames, gc.get_objects, gc.get_referrers, gc.get_referents}
_ATTRIBUTION_LIBRARIES = ("captum", "zennit", "pytorch_grad_cam")


class Violation(Exception):
    """What the student's function did that a check does not accept (a readable sentence)."""


def _library_dirs() -> tuple[str, ...]:
    dirs = []
    for name in _ATTRIBUTION_LIBRARIES:
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            spec = None
        if spec is not None and spec.submodule_search_locations:
            dirs += [str(Path(p).resolve()) + os.sep for p in spec.submodule_search_locations]
    return tuple(dirs)


_ATTRIBUTION_DIRS = _library_dirs()


def _students(filename: str) -> bool:
    return not (filename.startswith(_PACKAGE_DIR) or filename.startswith(_LIBRARY_DIRS) or filename.startswith("<frozen"))


def _fingerprint(code) -> tuple | None:
    """What a copy made from the source (``inspect.getsource`` + ``exec``) has in common with the original."""
    if len(code.co_code) < 40:
        return None  # a one-liner may well equal a reference by chance
    consts = tuple(c if not hasattr(c, "co_code") else c.co_code for c in code.co_consts)
    return code.co_code, code.co_names, code.co_varnames, consts


def _async_raise(thread: threading.Thread, exc: type[BaseException]) -> None:
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread.ident), ctypes.py_object(exc))


def call(fn, args: tuple, kwargs: dict, forbid: tuple[str, ...]):
    """``fn(*args, **kwargs)`` in its own thread under the guard; raises what ``fn`` raised, or Violation."""
    guard, found = _guard(forbid)
    box, still_blocked = _run_guarded(fn, args, kwargs, forbid, guard)
    if not box.get("intact", True):
        found.append("your function removed the check's profiler (sys.setprofile)")
    if not still_blocked:
        found.append("your function changed coursekit's list of blocked references")
    if found:
        raise Violation("; ".join(found))
    if "error" in box:
        raise box["error"]
    return box.get("value")


def _guard(forbid: tuple[str, ...]):
    """The profiler that records what the student's function should not do, and its list of records.

    Returns ``(guard, found)``: ``guard`` is a ``sys.setprofile`` function; ``found`` fills with
    one sentence per kind of violation (calls of a blocked reference or of a copy of its code, of
    a private helper of its module, of an attribution library, of the frame-reaching functions).
    The verdict of each code object is cached: the profiler sees every call, C calls included.
    """
    codes = {}
    for key in forbid:
        code = reference_code(key)
        if code is not None:
            codes[code] = key
    bytecodes = {_fingerprint(code): key for code, key in codes.items()}
    bytecodes.pop(None, None)
    module_files = {getattr(sys.modules.get(reference_module(k)), "__file__", None) for k in forbid} - {None}
    attribution = _ATTRIBUTION_DIRS
    seen: dict[int, str | None] = {}
    found: list[str] = []

    def verdict(frame) -> str | None:
        code = frame.f_code
        if code in codes:
            return f"your function ran coursekit's {codes[code].rsplit('.', 1)[-1]}(), which this exercise asks you to write"
        name = code.co_filename
        if attribution and name.startswith(attribution):
            lib = next(lib for lib in _ATTRIBUTION_LIBRARIES if f"{os.sep}{lib}{os.sep}" in name)
            return f"your function used {lib}, an attribution library; write the method with torch operations"
        copy = bytecodes.get(_fingerprint(code)) if _students(name) else None
        if copy is not None:
            return f"your function runs a copy of coursekit's {copy.rsplit('.', 1)[-1]}()"
        return None

    def guard(frame, event, arg):
        if event == "call":
            code = frame.f_code
            v = seen.get(id(code), "")
            if v == "":
                v = seen[id(code)] = verdict(frame)
            if v is None and code.co_filename in module_files and code.co_name.startswith("_") \
                    and frame.f_back is not None and _students(frame.f_back.f_code.co_filename):
                v = f"your function called coursekit's private helper {code.co_name}()"
            if v is not None and v not in found:
                found.append(v)
        elif event == "c_call" and arg in _FRAME_FUNCTIONS:
            text = "your function inspected the check's frames or objects (sys._current_frames / gc)"
            if text not in found:
                found.append(text)

    return guard, found


def _run_guarded(fn, args: tuple, kwargs: dict, forbid: tuple[str, ...], guard) -> tuple[dict, bool]:
    """Run ``fn`` in a thread of its own under ``guard`` while the ``forbid`` references are blocked.

    Returns ``(box, still_blocked)``: ``box`` holds ``"value"`` or ``"error"`` (what ``fn``
    returned or raised) and ``"intact"`` (whether ``guard`` was still the thread's profiler);
    ``still_blocked`` says whether the references were still blocked when ``fn`` returned. An
    interruption of the waiting thread (Jupyter's stop button, the grader's time limit) is passed
    on to the student's thread and re-raised.
    """
    box: dict = {}

    def target(fn=fn, args=args, kwargs=kwargs, box=box, guard=guard):
        sys.setprofile(guard)
        try:
            box["value"] = fn(*args, **kwargs)
        except BaseException as err:  # noqa: BLE001 -- handed over to the checking thread in call()
            box["error"] = err
        finally:
            box["intact"] = sys.getprofile() is guard
            sys.setprofile(None)

    thread = threading.Thread(target=target, name="student-function", daemon=True)
    with blocked(forbid):
        thread.start()
        try:
            while thread.is_alive():
                thread.join(0.05)
        except BaseException:
            _async_raise(thread, KeyboardInterrupt)  # interrupted (Jupyter's stop button, the grader's time limit)
            thread.join(1.0)
            raise
        still_blocked = set(forbid) <= blocked_keys()
    return box, still_blocked
