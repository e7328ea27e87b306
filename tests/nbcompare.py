"""Compare a fresh notebook output with the committed one: exactly, or within a cell's declared tolerance.

Most cells print what does not depend on the CPU (labels, counts, rounded figures) and are compared
exactly. A few print numbers that float rounding moves on another CPU or thread count however they
are rounded: an attack whose sign(gradient) flips where the gradient is zero up to rounding, a small
network trained from scratch. Such a cell declares, in its metadata, how far each printed number may
move (the prose quotes it no more precisely than that)::

    "coursekit": {"compare": {"abs": 0.02, "rel": 0.1, "ignore_lines": ["^two FGSM sweeps"],
                              "mask": ["\\d+\\.\\d s\\b"]}}

A number passes when it is within ``abs`` OR within ``rel`` (a fraction) of the committed one; the
words and layout around the numbers must still match (whitespace runs count as one space). Lines
matching an ``ignore_lines`` pattern are dropped from both sides; text matching a ``mask`` pattern
(a timing inside a line) is replaced by ``…`` on both sides. ``tests/conftest.py``
applies this to nbval's comparison, ``tests/nbstability.py`` to its report.
"""

from __future__ import annotations

import math
import re

NUMBER = re.compile(r"(?<![\w.])[-+−]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?")
METADATA_KEY = "coursekit"


def tolerance(cell_metadata) -> dict | None:
    """The cell's declared tolerance, or None (exact comparison)."""
    spec = (cell_metadata or {}).get(METADATA_KEY, {}).get("compare")
    if spec is None:
        return None
    unknown = set(spec) - {"abs", "rel", "ignore_lines", "mask"}
    if unknown:
        raise ValueError(f"unknown keys {sorted(unknown)} in the cell's coursekit.compare metadata: {spec}")
    return {"abs": float(spec.get("abs", 0.0)), "rel": float(spec.get("rel", 0.0)),
            "ignore_lines": [re.compile(p) for p in spec.get("ignore_lines", [])],
            "mask": [re.compile(p) for p in spec.get("mask", [])]}


def _drop_lines(text: str, tol: dict) -> str:
    """The text without the lines and parts the tolerance declares volatile."""
    kept = "".join(line for line in text.splitlines(keepends=True) if not any(p.search(line) for p in tol["ignore_lines"]))
    for pattern in tol.get("mask", []):
        kept = pattern.sub("…", kept)
    return kept


def _value(token: str) -> float:
    return float(token.replace("−", "-"))


def reconcile(fresh: str, committed: str, tol: dict) -> str:
    """``committed`` when ``fresh`` matches it within ``tol``, else ``fresh`` (with ignored lines dropped).

    Returning the committed text on a match lets the caller keep an exact comparison: anything that
    moved more than declared still shows up as a difference, with both versions printed.
    """
    fresh = _drop_lines(fresh, tol)
    committed = _drop_lines(committed, tol)
    words_f = [re.sub(r"\s+", " ", w) for w in NUMBER.split(fresh)]
    words_c = [re.sub(r"\s+", " ", w) for w in NUMBER.split(committed)]
    if words_f != words_c:
        return fresh
    for a, b in zip(NUMBER.findall(fresh), NUMBER.findall(committed)):
        x, y = _value(a), _value(b)
        if not (abs(x - y) <= tol["abs"] + 1e-12 or math.isclose(x, y, rel_tol=tol["rel"])):
            return fresh
    return committed


def reconcile_outputs(fresh: list, committed: list, tol: dict | None) -> tuple[list, list]:
    """nbval-style output lists, each text reconciled with the committed one at the same place.

    Returns (fresh, committed) with ignored lines dropped from both and, where a fresh text matches
    within tolerance, the committed text in its place.
    """
    if tol is None or len(fresh) != len(committed):
        return fresh, committed
    new_fresh, new_committed = [], []
    for new, old in zip(fresh, committed):
        new, old = _copy(new), _copy(old)
        if new.get("output_type") == "stream" and old.get("output_type") == "stream" and new.get("name") == old.get("name"):
            old["text"] = _drop_lines(_text(old["text"]), tol)
            new["text"] = reconcile(_text(new["text"]), old["text"], tol)
        elif "text/plain" in new.get("data", {}) and "text/plain" in old.get("data", {}):
            old["data"]["text/plain"] = _drop_lines(_text(old["data"]["text/plain"]), tol)
            new["data"]["text/plain"] = reconcile(_text(new["data"]["text/plain"]), old["data"]["text/plain"], tol)
        new_fresh.append(new)
        new_committed.append(old)
    return new_fresh, new_committed


def _text(value) -> str:
    return value if isinstance(value, str) else "".join(value)


def _copy(output):
    """A copy of one output (a dict or nbformat's NotebookNode) whose text fields can be replaced."""
    out = type(output)(output)
    if "data" in out:
        out["data"] = type(out["data"])(out["data"])
    return out
