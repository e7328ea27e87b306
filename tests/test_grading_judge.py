"""Verdicts are computed where student code never ran (coursekit.grading.judge, .wire).

Graded end to end (00_warmup): forged result records, a replaced check in the registry, patched
Tensor methods of torch's C base class and an ignored SIGALRM change no verdict. Unit tests: what
the sandbox sends back is parsed as plain data only, within limits.
"""

from __future__ import annotations

import csv
import io
import json
import pickle
import struct
import time

import nbformat
import numpy as np
import pytest
import torch
from test_grading_isolation import FULL, ROOT, SET, SOLUTION

from coursekit.grading import cli, wire
from coursekit.grading.judge import apply_states

TIMEOUT = 12
ZERO = {k: 0.0 for k in FULL}

NONE = ("import torch\ndef to_input(image):\n    return torch.zeros(1, 3, *image.shape[:2])\n"
        "def top_k(model, x, k):\n    return torch.zeros(k), torch.zeros(k, dtype=torch.long)\n"
        "def layer_activation(model, x, layer_name):\n    return None\n")
FORGE = ("import os, json\nfor i in range(40):\n    for record in ({'event': 'start', 'i': i},\n"
         "                   {'event': 'done', 'i': i, 'outputs': [], 'check': {'earned': 100.0, 'points': 4}},\n"
         "                   {'event': 'verdict', 'i': i, 'earned': 100.0, 'points': 4}):\n"
         "        os.write(3, (json.dumps(record) + '\\n').encode())\n")
REGISTRY = ("import coursekit.checks as C\ndef full_marks(student, report):\n"
            "    with report.part('everything', points=4):\n        pass\n"
            "for name in ('warmup.to_input', 'warmup.top_k', 'warmup.layer_activation'):\n"
            "    C._lookup(name).checker = full_marks\n")
TENSOR_PATCH = ("import torch\nfor name in ('allclose', 'equal', '__eq__', '__sub__', 'abs', 'max', 'sum'):\n"
                "    try:\n        setattr(torch._C.TensorBase, name, lambda *a, **k: torch.tensor(0.0))\n"
                "    except (AttributeError, TypeError):\n        pass\n"
                "torch.allclose = lambda *a, **k: True\ntorch.equal = lambda *a, **k: True\n")
IGNORE_ALARM = "import signal\nsignal.signal(signal.SIGALRM, signal.SIG_IGN)\n"
# sleeps rather than spins: the time limit is a wall-clock timer, so this meets it the same way, and leaves the core free
LOOPS = "import time\ndef to_input(image):\n    while True:\n        time.sleep(0.05)\n"


def _with(extra_cells: list[str], replace_functions: str | None = None):
    nb = nbformat.read(SOLUTION, as_version=4)
    for k, source in enumerate(extra_cells):
        nb.cells.insert(2 + k, nbformat.v4.new_code_cell(source))
    if replace_functions is not None:
        nb.cells.append(nbformat.v4.new_code_cell("x = 0"))
        for cell in nb.cells:
            gid = cell.metadata.get("nbgrader", {}).get("grade_id", "")
            if gid.endswith("_solution"):
                cell.source = replace_functions
    return nb


@pytest.fixture(scope="module", params=[None, False], ids=["namespaces-if-available", "no-namespaces"])
def graded(request, tmp_path_factory):
    base = tmp_path_factory.mktemp("forgers")
    subs, out = base / "submissions", base / "results"
    subs.mkdir()
    class_ = {"forger_right": _with([FORGE]), "forger_wrong": _with([FORGE], NONE),
              "registry": _with([REGISTRY], NONE), "tensor": _with([TENSOR_PATCH], NONE)}
    alarm = _with([IGNORE_ALARM])
    cell = next(c for c in alarm.cells if c.metadata.get("nbgrader", {}).get("grade_id") == "to_input_solution")
    cell.source = LOOPS
    class_["alarm"] = alarm
    for student, nb in class_.items():
        nbformat.write(nb, subs / f"{student}.ipynb")
    result = cli.grade(SET, subs, out, timeout=TIMEOUT, root=ROOT, jobs=2, echo=lambda *a: None,
                       isolate=request.param)
    with open(result.csv, newline="") as fh:
        return {r["student_id"]: r for r in csv.DictReader(fh)}


def _points(row) -> dict:
    return {k: float(row[k]) for k in FULL}


@pytest.mark.slow
def test_forged_records_earn_nothing_and_scores_are_capped(graded):
    assert _points(graded["forger_right"]) == FULL and float(graded["forger_right"]["score"]) == 12.0
    assert _points(graded["forger_wrong"]) == ZERO and float(graded["forger_wrong"]["score"]) == 0.0


@pytest.mark.slow
def test_a_replaced_check_or_patched_tensor_methods_change_no_verdict(graded):
    assert _points(graded["registry"]) == ZERO, graded["registry"]
    assert _points(graded["tensor"]) == ZERO, graded["tensor"]
    assert "assigns" in graded["tensor"]["flags"] or "setattr" in graded["tensor"]["flags"]


@pytest.mark.slow
def test_ignoring_sigalrm_costs_only_the_exercise_that_loops(graded):
    row = graded["alarm"]
    assert _points(row) == {**FULL, "check_to_input": 0.0}, row
    assert f"check_to_input: stopped after the {TIMEOUT} s time limit" in row["notes"], row["notes"]


# ---------------------------------------------------------------------------------------------
# the wire: plain data only


def test_values_cross_as_plain_data_with_their_autograd_state():
    leaf = torch.rand(2, 3, requires_grad=True)
    value = {"a": (leaf * 2, torch.arange(4)), "b": [1, 2.5, None, "text", True], "c": np.ones(3), "d": object()}
    header, back, _ = wire.decode(wire.encode({"value": None}, value))
    attached, plain = back["a"]
    assert attached.requires_grad and attached.grad_fn is not None  # "still attached" survives the trip
    assert torch.equal(attached.detach(), (leaf * 2).detach()) and torch.equal(plain, torch.arange(4))
    assert back["b"] == [1, 2.5, None, "text", True] and np.array_equal(back["c"], np.ones(3))
    assert isinstance(back["d"], wire.Opaque) and type(back["d"]).__name__ == "object"
    detached = wire.decode(wire.encode({"value": None}, leaf.detach()))[1]
    assert not detached.requires_grad and detached.grad_fn is None


def _payload(header: dict, blobs: list[bytes] = ()) -> bytes:
    head = json.dumps({**header, "blobs": [len(b) for b in blobs]}).encode()
    return struct.pack(">I", len(head)) + head + b"".join(blobs)


class _Boom:
    def __reduce__(self):
        return (print, ("unpickled!",))


def test_nothing_from_the_sandbox_is_unpickled_or_unbounded():
    buf = io.BytesIO()
    np.save(buf, np.array([_Boom()], dtype=object), allow_pickle=True)
    with pytest.raises(wire.WireError, match="not a plain .npy"):
        wire.decode(_payload({"value": {"t": "ndarray", "b": 0}}, [buf.getvalue()]))
    with pytest.raises(wire.WireError):
        wire.decode(_payload({"value": {"t": "pickle", "v": pickle.dumps(1).hex()}}))
    with pytest.raises(wire.WireError):
        wire.decode(b"\x00\x00\x00\x05" + pickle.dumps(_Boom()))
    deep = {"t": "none", "v": None}
    for _ in range(wire.MAX_DEPTH + 2):
        deep = {"t": "list", "v": [deep]}
    with pytest.raises(wire.WireError, match="too large"):
        wire.decode(_payload({"value": deep}))
    with pytest.raises(wire.WireError, match="accepts"):
        wire.encode({"value": None}, torch.zeros(wire.MAX_MESSAGE // 4 + 1))


def test_the_call_s_effects_on_the_arguments_are_mirrored():
    net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU())
    x = torch.zeros(3)
    mirror_net, mirror_x = pickle.loads(pickle.dumps((net, x)))
    net.train(False)
    net[0].weight.requires_grad_(False)
    x += 1
    net.register_forward_hook(lambda *a: None)
    from coursekit.grading.runner import _state_after, _state_before

    before = [_state_before(o) for o in (mirror_net, mirror_x)]
    states = [_state_after(o, b) for o, b in zip((net, x), before)]
    _, _, reader = wire.decode(wire.encode({"value": None, "states": states}))
    apply_states(((mirror_net, mirror_x), {}), reader.header["states"], reader)
    assert not mirror_net.training and not mirror_net[0].weight.requires_grad
    assert torch.equal(mirror_x, torch.ones(3)) and len(mirror_net._forward_hooks) == 1


def test_the_sandbox_cannot_push_its_deadline_back():
    from coursekit.grading import pool
    from coursekit.grading.runner import Job

    w = object.__new__(pool._Worker)
    w.job = Job("s", SET, [(None, "x")] * 5, {}, seed="", timeout=10)
    w.outcome, w.current, w.last_done = pool.Outcome(), None, None
    w.hard_deadline = time.monotonic() + 15  # less than timeout + GRACE: the attempt's cap wins
    w.last_started, w.deadline = -1, 0.0
    w.handle({"event": "start", "i": 0})
    assert w.deadline == w.hard_deadline
    w.deadline = 5.0  # time passes: the cell is due
    w.handle({"event": "start", "i": 0})  # the same cell "starting" again
    w.handle({"event": "start", "i": -3})
    assert w.deadline == 5.0 and w.current == 0
