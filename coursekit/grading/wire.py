"""What crosses between the judge (trusted) and the sandbox (student code): framing and plain data.

Judge -> sandbox: the cases of a call (tensors, models, the check's own helper functions),
pickled with cloudpickle. Unpickling happens in the sandbox, which only harms the sandbox.

Sandbox -> judge: :func:`encode` / :func:`decode`, never pickle. A message is a JSON header
(numbers, strings, lists, the tree of the value) plus numpy ``.npy`` blobs read with
``allow_pickle=False``; the whole message is at most :data:`MAX_MESSAGE` bytes, the tree at most
:data:`MAX_NODES` nodes and :data:`MAX_DEPTH` levels deep. Anything else a student's function
returns arrives as an :class:`Opaque` object that only knows its type's name.
"""

from __future__ import annotations

import io
import json
import os
import struct

import numpy as np
import torch

__all__ = ["MAX_MESSAGE", "Opaque", "WireError", "decode", "encode", "leaves", "read_frame", "write_frame"]

MAX_MESSAGE = 64 * 2**20
MAX_NODES = 10_000
MAX_DEPTH = 16
MAX_TEXT = 10_000
_DTYPES = {str(d): d for d in (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.uint8, torch.int8,
                               torch.int16, torch.int32, torch.int64, torch.bool, torch.complex64, torch.complex128)}


class WireError(ValueError):
    """A message from the sandbox that is too large or not of the agreed form."""


class Opaque:
    """Stands for a value of a type that does not cross (a module, a generator, ...): only its type name."""

    def __init__(self, type_name: str, text: str = ""):
        self.type_name, self.text = type_name[:100], text[:200]

    def __repr__(self) -> str:
        return self.text or f"<{self.type_name}>"


def _opaque_class(name: str) -> type:
    """A class named like the student's value's type, so that messages say "got Foo"."""
    safe = "".join(c for c in name if c.isalnum() or c == "_")[:60] or "object"
    return type(safe, (Opaque,), {})


def leaves(args) -> list:
    """Tensors and modules in ``args``, depth first through lists, tuples and dict values.

    The judge and the sandbox walk their own copies of a call's arguments in this same order, so
    that the sandbox's list of "what the call changed" lines up with the judge's objects.
    """
    from torch import nn

    found: list = []

    def walk(value, depth):
        if depth > 6 or len(found) > 1000:
            return
        if isinstance(value, (torch.Tensor, nn.Module)):
            found.append(value)
        elif isinstance(value, (list, tuple)):
            for v in value:
                walk(v, depth + 1)
        elif isinstance(value, dict):
            for v in value.values():
                walk(v, depth + 1)

    walk(args, 0)
    return found


# ----------------------------------------------------------------------------------------------
# framing: 8-byte length, then the payload


def write_frame(fd: int, payload: bytes) -> None:
    data = struct.pack(">Q", len(payload)) + payload
    while data:
        data = data[os.write(fd, data):]


def _read_exactly(fd: int, n: int) -> bytes:
    parts, left = [], n
    while left:
        chunk = os.read(fd, min(left, 1 << 20))
        if not chunk:
            raise EOFError("the other side closed the channel")
        parts.append(chunk)
        left -= len(chunk)
    return b"".join(parts)


def read_frame(fd: int, limit: int | None = MAX_MESSAGE) -> bytes:
    """One payload; a declared length over ``limit`` is skipped (read and dropped) and raises WireError."""
    (n,) = struct.unpack(">Q", _read_exactly(fd, 8))
    if limit is not None and n > limit:
        left = n
        while left:
            left -= len(_read_exactly(fd, min(left, 1 << 20)))
        raise WireError(f"a message of {n / 2**20:.1f} MiB (the grader accepts {limit / 2**20:.0f} MiB)")
    return _read_exactly(fd, n)


# ----------------------------------------------------------------------------------------------
# the sandbox side: a value as a JSON tree plus npy blobs


def _tensor_node(t: torch.Tensor, blobs: list) -> dict:
    data = t.detach().cpu()
    kind = str(data.dtype)
    if data.dtype == torch.bfloat16:
        data = data.float()
    buf = io.BytesIO()
    np.save(buf, data.resolve_conj().resolve_neg().contiguous().numpy(), allow_pickle=False)
    blobs.append(buf.getvalue())
    return {"t": "tensor", "b": len(blobs) - 1, "dtype": kind, "rg": bool(t.requires_grad),
            "gf": t.grad_fn is not None}


def _node(value, blobs: list, depth: int, count: list) -> dict:
    count[0] += 1
    if count[0] > MAX_NODES or depth > MAX_DEPTH:
        raise WireError("the result is nested too deeply or has too many parts")
    if value is None or isinstance(value, (bool, int, float, str)):
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) > 2**63:
            return {"t": "float", "v": float(value)}
        kind = {type(None): "none", bool: "bool", int: "int", float: "float", str: "str"}.get(type(value))
        if kind is None:  # a subclass of int/float/str: its plain value
            kind = "bool" if isinstance(value, bool) else "int" if isinstance(value, int) else \
                "float" if isinstance(value, float) else "str"
            value = {"bool": bool, "int": int, "float": float, "str": str}[kind](value)
        return {"t": kind, "v": value[:MAX_TEXT] if isinstance(value, str) else value}
    if isinstance(value, torch.Tensor):
        return _tensor_node(value, blobs)
    if isinstance(value, np.ndarray) and value.dtype != object:
        buf = io.BytesIO()
        np.save(buf, np.ascontiguousarray(value), allow_pickle=False)
        blobs.append(buf.getvalue())
        return {"t": "ndarray", "b": len(blobs) - 1}
    if isinstance(value, np.generic) and not isinstance(value, np.object_):
        return _node(value.item(), blobs, depth, count)
    if isinstance(value, (list, tuple)) and type(value) in (list, tuple, torch.Size):
        return {"t": "list" if type(value) is list else "tuple", "v": [_node(v, blobs, depth + 1, count) for v in value]}
    if type(value) is dict:
        return {"t": "dict", "k": [_node(k, blobs, depth + 1, count) for k in value],
                "v": [_node(v, blobs, depth + 1, count) for v in value.values()]}
    return {"t": "opaque", "name": type(value).__name__, "text": f"<{type(value).__name__} object>"}


def encode(header: dict, value=None) -> bytes:
    """``header`` (JSON-able) with ``value``'s tree as ``header["value"]``, then the blobs."""
    blobs: list[bytes] = []
    header = dict(header)
    if "value" in header or value is not None:
        header["value"] = _node(value, blobs, 0, [0])
    for state in header.get("states", []):
        for key in ("values", "grad"):
            if isinstance(state.get(key), torch.Tensor):
                state[key] = _tensor_node(state[key], blobs)
        for key in ("grads", "changed"):
            if isinstance(state.get(key), dict):
                state[key] = {k: _tensor_node(v, blobs) for k, v in state[key].items()}
    header["blobs"] = [len(b) for b in blobs]
    head = json.dumps(header, allow_nan=True).encode()
    payload = struct.pack(">I", len(head)) + head + b"".join(blobs)
    if len(payload) > MAX_MESSAGE:
        raise WireError(f"the result is {len(payload) / 2**20:.1f} MiB; the grader accepts {MAX_MESSAGE / 2**20:.0f} MiB")
    return payload


# ----------------------------------------------------------------------------------------------
# the judge side: parse, never execute


class _Reader:
    def __init__(self, payload: bytes):
        if len(payload) < 4:
            raise WireError("a message shorter than its header")
        (n,) = struct.unpack(">I", payload[:4])
        try:
            self.header = json.loads(payload[4:4 + n])
        except ValueError as err:
            raise WireError(f"a header that is not JSON ({err})") from None
        if not isinstance(self.header, dict):
            raise WireError("a header that is not a JSON object")
        sizes = self.header.get("blobs", [])
        if not isinstance(sizes, list) or not all(isinstance(s, int) and s >= 0 for s in sizes):
            raise WireError("a malformed list of blobs")
        self.blobs, at = [], 4 + n
        for s in sizes:
            self.blobs.append(payload[at:at + s])
            at += s
        if at != len(payload):
            raise WireError("blobs that do not add up to the message")
        self.count = 0

    def tensor(self, node: dict) -> torch.Tensor:
        array = self.array(node)
        kind = node.get("dtype")
        if kind not in _DTYPES:
            raise WireError(f"an unknown dtype {str(kind)[:40]!r}")
        t = torch.from_numpy(array.copy()).to(_DTYPES[kind])
        if node.get("rg") and (t.is_floating_point() or t.is_complex()):
            t.requires_grad_(True)
            if node.get("gf"):
                t = t.view_as(t)  # has a grad_fn, as the student's attached result had
        return t

    def array(self, node: dict) -> np.ndarray:
        b = node.get("b")
        if not isinstance(b, int) or not 0 <= b < len(self.blobs):
            raise WireError("a reference to a missing blob")
        try:
            array = np.load(io.BytesIO(self.blobs[b]), allow_pickle=False)
        except (ValueError, OSError, EOFError) as err:
            raise WireError(f"a blob that is not a plain .npy array ({err})") from None
        if array.dtype == object:
            raise WireError("an object array")
        return array

    def value(self, node, depth: int = 0):
        self.count += 1
        if self.count > MAX_NODES or depth > MAX_DEPTH or not isinstance(node, dict):
            raise WireError("a malformed or too large value")
        t = node.get("t")
        if t in ("none", "bool", "int", "float", "str"):
            v = node.get("v")
            ok = {"none": v is None, "bool": isinstance(v, bool), "int": isinstance(v, int) and not isinstance(v, bool),
                  "float": isinstance(v, (int, float)) and not isinstance(v, bool), "str": isinstance(v, str)}[t]
            if not ok:
                raise WireError(f"a {t} node holding {type(v).__name__}")
            return float(v) if t == "float" else v
        if t == "tensor":
            return self.tensor(node)
        if t == "ndarray":
            return self.array(node)
        if t in ("list", "tuple"):
            items = node.get("v")
            if not isinstance(items, list):
                raise WireError("a malformed list")
            values = [self.value(v, depth + 1) for v in items]
            return values if t == "list" else tuple(values)
        if t == "dict":
            keys, values = node.get("k"), node.get("v")
            if not isinstance(keys, list) or not isinstance(values, list) or len(keys) != len(values):
                raise WireError("a malformed dict")
            out = {}
            for k, v in zip(keys, values):
                key = self.value(k, depth + 1)
                if not isinstance(key, (str, int, float, bool, tuple, type(None))):
                    raise WireError("a dict key that is not a plain value")
                out[key] = self.value(v, depth + 1)
            return out
        if t == "opaque":
            name = node.get("name") if isinstance(node.get("name"), str) else "object"
            text = node.get("text") if isinstance(node.get("text"), str) else ""
            return _opaque_class(name)(name, text)
        raise WireError(f"an unknown node type {str(t)[:40]!r}")


def decode(payload: bytes) -> tuple[dict, object, _Reader]:
    """``(header, value, reader)``; raises :class:`WireError` for anything not of the agreed form."""
    reader = _Reader(payload)
    value = reader.value(reader.header["value"]) if "value" in reader.header else None
    return reader.header, value, reader
