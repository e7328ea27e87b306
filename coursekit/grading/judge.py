"""The judge: the trusted side of a check, in a process where no student code ever ran.

Each worker comes as a pair forked from the grader (:mod:`.pool`): the *sandbox* runs the
student's cells (:mod:`.runner`), the *judge* runs the check bodies. When the sandbox reaches a
check cell it says so; the judge draws the cases, and every ``report.call(student, *args)`` of the
check body becomes a request to the sandbox, which calls the student's function there and sends
back its result and what the call changed in its arguments as plain data (:mod:`.wire`). The
references, the comparisons and the points are computed here, and the verdict goes to the grader
on the judge's own pipe, which the sandbox never holds. A patched ``torch``, a replaced check in
the registry or a forged record inside the sandbox can change only the outputs it sends back.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import sys

import cloudpickle
import torch
from torch import nn

from . import wire
from .notebook import CheckCell
from .runner import Job, check_seed
from .wire import leaves

__all__ = ["Abort", "run_judge", "apply_states", "leaves"]


class Abort(BaseException):  # noqa: N818 -- a BaseException: a check body's `except Exception` lets it through
    """The sandbox ended the current check."""


def _noop_hook(*args):
    return None


@torch.no_grad()
def _apply_tensor(t: torch.Tensor, state: dict, reader) -> None:
    if "values" in state:
        new = reader.tensor(state["values"]).detach()
        if new.shape == t.shape and not torch.equal(new.to(t.dtype), t.detach()):
            t.detach().copy_(new.to(t.dtype))
    rg = state.get("requires_grad")
    if isinstance(rg, bool) and t.is_leaf and rg != t.requires_grad and (t.is_floating_point() or not rg):
        t.requires_grad_(rg)
    if "grad" in state:
        t.grad = reader.tensor(state["grad"]).detach().to(t.dtype) if state["grad"] is not None else None


def _apply_module(m: nn.Module, state: dict, reader) -> None:
    modules = [mod for _, mod in m.named_modules()]
    params = list(m.parameters())
    training, rg = state.get("training"), state.get("requires_grad")
    if isinstance(training, list) and len(training) == len(modules):
        for mod, flag in zip(modules, training):
            mod.training = bool(flag)
    if isinstance(rg, list) and len(rg) == len(params):
        for p, flag in zip(params, rg):
            p.requires_grad_(bool(flag))
    grads = state.get("grads") if isinstance(state.get("grads"), dict) else {}
    with torch.no_grad():
        for i, p in enumerate(params):
            node = grads.get(str(i))
            p.grad = reader.tensor(node).detach().to(p.dtype) if node is not None else None
        tensors = params + list(m.buffers())
        changed = state.get("changed") if isinstance(state.get("changed"), dict) else {}
        for key, node in changed.items():
            if key.isdigit() and int(key) < len(tensors):
                new = reader.tensor(node)
                if new.shape == tensors[int(key)].shape:
                    tensors[int(key)].copy_(new.to(tensors[int(key)].dtype))
    inplace = state.get("inplace")
    flagged = [mod for mod in modules if isinstance(getattr(mod, "inplace", None), bool)]
    if isinstance(inplace, list) and len(inplace) == len(flagged):
        for mod, flag in zip(flagged, inplace):
            mod.inplace = bool(flag)
    hooks = state.get("hooks")
    if isinstance(hooks, list) and len(hooks) == len(modules):
        from ..guard import hook_dicts

        for mod, count in zip(modules, hooks):
            have = sum(len(d) for d in hook_dicts(mod))
            while isinstance(count, int) and have < count <= have + 100:
                mod._forward_hooks[-(have + 1)] = _noop_hook  # stands for a hook the student left registered
                have += 1


def apply_states(args, states, reader) -> None:
    """Make the judge's arguments what the student's call left of the sandbox's copies."""
    if not isinstance(states, list):
        return
    for obj, state in zip(leaves(args), states):
        if not isinstance(state, dict):
            continue
        if isinstance(obj, torch.Tensor) and state.get("kind") == "tensor":
            _apply_tensor(obj, state, reader)
        elif isinstance(obj, nn.Module) and state.get("kind") == "module":
            _apply_module(obj, state, reader)


class _Remote:
    """Stands for the student's function in the judge: calling it is an error (use report.call)."""

    def __init__(self, name: str):
        self.__name__ = self.name = name

    def __call__(self, *args, **kwargs):
        raise RuntimeError("a check called the student's function directly; use report.call(student, ...)")


class _Channel:
    def __init__(self, job: Job, to_sandbox: int, from_sandbox: int):
        self.job, self.out, self.inp = job, to_sandbox, from_sandbox
        self.check_index = -1
        self.pending: dict | None = None

    def send(self, message: dict) -> None:
        wire.write_frame(self.out, cloudpickle.dumps({**message, "i": self.check_index}))

    def receive(self):
        """``(header, value, reader)`` of the sandbox's next answer for the current check."""
        from ..checks import CallOutcome

        try:
            header, value, reader = wire.decode(wire.read_frame(self.inp))
        except wire.WireError as err:
            return {"error": "too_large"}, CallOutcome(error="too_large", message=f"your function's result could not "
                                                       f"be read by the grader: {err}"), None
        if "check" in header:  # the sandbox moved on to another check cell without a word: keep it for the loop
            self.pending = header
            raise Abort("out of step")
        if header.get("abort") or header.get("i") != self.check_index:
            raise Abort(str(header.get("abort", "out of step")))
        return header, value, reader

    def caller(self, fn, args, kwargs, forbid):
        """The ``caller`` of :class:`coursekit.checks.Report`: one call in the sandbox, plain data back."""
        from ..checks import CallOutcome

        self.send({"op": "call", "name": getattr(fn, "name", ""), "args": args, "kwargs": kwargs, "forbid": forbid})
        header, value, reader = self.receive()
        if isinstance(value, CallOutcome):
            return value
        error = header.get("error")
        if error is not None:
            kinds = ("not_callable", "not_implemented", "blocked", "violation", "raised", "too_large")
            return CallOutcome(error=error if error in kinds else "raised", message=str(header.get("message", ""))[:2000])
        patched = header.get("patched") if isinstance(header.get("patched"), list) else []
        apply_states((args, kwargs), header.get("states"), reader)
        return CallOutcome(value=value, patched=[str(p)[:200] for p in patched][:20])


def _verdict(job: Job, check: CheckCell, channel: _Channel, announced: dict) -> dict:
    from ..checks import run_check

    notes = [f"{check.grade_id}: {str(p)[:100]} had been replaced; put back before the check"
             for p in announced.get("patched", [])[:10] if isinstance(p, str)]
    if not announced.get("defined"):
        summary = (f"{check.exercise}: 0/{check.points:g} points\n  `{check.function}` is not defined: "
                   "the cell that defines it did not run to the end (see the error above it)")
        return {"earned": 0.0, "points": check.points, "summary": summary, "notes": notes, "flags": []}
    report = run_check(check.exercise, _Remote(check.function), seed=check_seed(job.seed, check.exercise),
                       caller=channel.caller)
    summary = "\n".join([report.summary(), *("  " + n for n in report.notes[:5])])
    scale = check.points / report.points if report.points else 0.0
    earned = min(max(report.earned * scale, 0.0), check.points)  # never more than the exercise is worth
    diagnoses = [p.message for p in report.parts if p.earned < p.points and p.message]
    return {"earned": round(earned, 6), "points": check.points, "summary": summary, "notes": notes,
            "flags": list(report.tampering), "diagnoses": [d[:300] for d in diagnoses]}


def run_judge(job: Job, to_sandbox: int, from_sandbox: int, to_grader: int) -> None:
    """The body of a judge process: answer the sandbox's check cells until it closes; never returns."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if sys.platform.startswith("linux"):  # dies with the grader (e.g. killed from outside)
        ctypes.CDLL(None).prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    torch.set_num_threads(1)
    channel = _Channel(job, to_sandbox, from_sandbox)
    judged: set[int] = set()
    code = 0
    try:
        while True:
            header, channel.pending = channel.pending, None
            try:
                if header is None:
                    header, _, _ = wire.decode(wire.read_frame(from_sandbox, limit=1 << 16))
            except wire.WireError:
                continue
            except (EOFError, OSError):
                break
            i = header.get("check")
            gid = job.cells[i][0] if isinstance(i, int) and 0 <= i < len(job.cells) else None
            if gid is None or i in judged:  # not a check cell, or one already judged: nothing to do
                if isinstance(i, int):
                    channel.check_index = i
                    channel.send({"op": "end"})  # the sandbox waits for a word before it moves on
                continue
            judged.add(i)
            channel.check_index = i
            try:
                record = _verdict(job, job.checks[gid], channel, header)
            except Abort:
                continue  # the sandbox stopped this check (its time limit): the grader knows
            channel.send({"op": "end"})
            data = (json.dumps({"event": "verdict", "i": i, **record}) + "\n").encode()
            while data:
                data = data[os.write(to_grader, data):]
    except (BrokenPipeError, EOFError):
        code = 0  # the sandbox is gone (killed for its time limit, or it ended): nothing left to judge
    except BaseException as err:  # noqa: BLE001 -- the grader must learn why the judge stopped
        os.write(to_grader, (json.dumps({"event": "judge_crash", "error": f"{type(err).__name__}: {err}"[:300]})
                             + "\n").encode())
        code = 3
    os._exit(code)
