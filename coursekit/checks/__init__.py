"""Exercise checks: compare a student's function with coursekit's reference on fresh random cases.

In a notebook::

    from coursekit.checks import check
    check("warmup.to_input", to_input)

prints a verdict per part with its points and, for a wrong part, the most likely mistake
(wrong sign, missing abs, wrong shape, ...). It returns the points earned as a float, which
nbgrader reads as partial credit; with no point earned it raises :class:`CheckFailed`, which
nbgrader counts as zero. Nothing is written to stderr (nbgrader would zero the cell for it).

Authoring a check (one module per exercise set, ``coursekit/checks/<set>.py``)::

    @exercise("warmup.to_input", forbid=[images.load_image])
    def _(student, report):
        with report.part("shape (1, 3, 224, 224)", points=1):
            got = report.call(student, photo)         # reference functions blocked inside
            report.expect_tensor(got, shape=(1, 3, 224, 224))
        with report.part("values", points=2):
            report.expect_close(got, expected, mistakes={"forgot to divide by 255": expected * 255})

Cases are drawn from a fresh, unseeded generator on every call (a grader passes a seed of its
own), so knowing the test code does not help. Each check starts with the cases that expose the
mistakes it diagnoses, then draws random ones, so a known mistake never passes by luck.

The student's function runs in a thread of its own under a guard (:mod:`.student_call`): running a
blocked reference (however it was reached), an attribution library, or reading the check's frames
fails the part and is recorded in :attr:`Report.tampering`; anything the function patches in
torch or coursekit is put back and named (:mod:`.integrity`). A function that does nothing
(returns ``None``, a constant, or its own input, in every call) earns no points at all, whatever
the parts about shapes or side effects said.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import sys
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
import torch

from .._reference import ReferenceBlocked, blocked, blocked_keys, reference  # noqa: F401  (re-exported)
from .._reference import reference_key as _key
from . import integrity, student_call

__all__ = ["check", "exercise", "Points", "CallOutcome", "local_call", "reference", "Report", "Mistake", "CheckFailed", "ReferenceBlocked", "EXERCISES"]


class CheckFailed(Exception):
    """Raised by :func:`check` when no point was earned (nbgrader: zero for the cell)."""

    def _render_traceback_(self):  # IPython shows this instead of a long traceback
        return [f"CheckFailed: {self}"]


class Mistake(Exception):
    """Raised inside a part to explain what is wrong; the part earns no points."""


class StudentError(Exception):
    """The student's function raised; carries a readable explanation."""


# ----------------------------------------------------------------------------------------------
# the report a checker fills in


@dataclass
class PartResult:
    title: str
    points: float
    earned: float = 0.0
    message: str = ""


@dataclass
class Report:
    """What a checker fills in: parts with points, and an explanation for each wrong part."""

    name: str
    forbid: tuple[str, ...] = ()
    rng: np.random.Generator = field(default_factory=np.random.default_rng)
    parts: list[PartResult] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    tampering: list[str] = field(default_factory=list)  # for the instructor: what the guard caught
    calls: list[tuple] = field(default_factory=list)  # (result, args) of every call of the student's function
    caller: Callable | None = None  # where the student's function runs (None: here, see local_call)

    @property
    def seed(self) -> int:
        """A fresh integer seed for torch generators inside a case."""
        return int(self.rng.integers(0, 2**31 - 1))

    @contextlib.contextmanager
    def part(self, title: str, points: float):
        """A scored part: full points unless the body raises :class:`Mistake` or the student code fails."""
        res = PartResult(title, float(points))
        self.parts.append(res)
        try:
            yield res
        except Mistake as m:
            res.message = str(m)
        except StudentError as e:
            res.message = str(e)
        else:
            res.earned = res.points

    def call(self, fn: Callable, *args, **kwargs):
        """Call the student's function (in its own thread, references blocked, patches undone).

        Where the function runs is the report's ``caller``: by default here (:func:`local_call`);
        in the grader, in the student's sandbox, with only plain data coming back.
        """
        outcome = (self.caller or local_call)(fn, args, kwargs, self.forbid)
        if outcome.error == "violation":
            self.tampering += [t for t in outcome.message.split("; ") if t not in self.tampering]
        if outcome.error is not None:
            raise StudentError(outcome.message)
        if outcome.patched:
            text = f"your function replaced {', '.join(outcome.patched)} (put back; the check does not accept that)"
            self.tampering.append(text)
            raise StudentError(text)
        self.calls.append((outcome.value, args, kwargs))
        return outcome.value

    def did_nothing(self) -> bool:
        """Whether every call returned None, a constant, or one of its own inputs."""
        if not self.calls:
            return False
        scalars = [v for v, _, _ in self.calls if isinstance(v, (int, float)) and not isinstance(v, bool)]
        if len(scalars) == len(self.calls) and len(self.calls) > 2 and len(set(scalars)) == 1:
            return True
        return all(_trivial(v, (*a, *k.values())) for v, a, k in self.calls)

    # -- comparisons with diagnostics ------------------------------------------------------------

    def expect_tensor(self, got, shape: Iterable[int] | None = None, dtype: torch.dtype | None = None,
                      detached: bool | None = None, what: str = "your result") -> torch.Tensor:
        """Check type, shape, dtype and (optionally) that the result is detached from the graph."""
        if not isinstance(got, torch.Tensor):
            hint = " (a numpy array: wrap it with torch.from_numpy)" if isinstance(got, np.ndarray) else ""
            hint = " (did you forget to `return` it?)" if got is None else hint
            raise Mistake(f"{what} should be a torch.Tensor, got {type(got).__name__}{hint}")
        if shape is not None and tuple(got.shape) != tuple(shape):
            shape = tuple(shape)
            hint = ""
            if got.dim() == len(shape) + 1 and got.shape[0] == 1:
                hint = " An extra batch dimension? Drop it with [0] or .squeeze(0)."
            elif got.dim() + 1 == len(shape) and shape[0] == 1:
                hint = " Missing the batch dimension? Add it with [None] or .unsqueeze(0)."
            elif got.dim() == len(shape) and len(shape) >= 3 and got.shape[-1] == shape[-3]:
                hint = " Channels last? PyTorch wants (C, H, W): use .permute(2, 0, 1)."
            elif got.dim() == len(shape) + 1 and len(shape) >= 2:
                hint = " One dimension too many: did you forget to reduce over channels (e.g. a max over dim 1)?"
            raise Mistake(f"{what} has shape {tuple(got.shape)}, expected {shape}.{hint}")
        if dtype is not None and got.dtype != dtype:
            raise Mistake(f"{what} has dtype {got.dtype}, expected {dtype}")
        if detached and (got.requires_grad or got.grad_fn is not None):
            raise Mistake(f"{what} is still attached to the autograd graph: return it with .detach()")
        return got

    def expect_close(self, got: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-4, atol: float = 1e-5,
                     mistakes: dict[str, torch.Tensor] | None = None, what: str = "your result") -> None:
        """Compare values; on a mismatch, name the known mistake ``got`` matches, if any."""
        got = self.expect_tensor(got, shape=expected.shape, what=what).detach().to(expected.dtype)
        if torch.allclose(got, expected, rtol=rtol, atol=atol):
            return
        matched = [explanation for explanation, wrong in (mistakes or {}).items()
                   if wrong.shape == got.shape
                   and torch.allclose(got, wrong.detach().to(expected.dtype), rtol=max(rtol, 1e-3), atol=max(atol, 1e-4))]
        if matched:  # two mistakes can give the same numbers on one case: name each, do not guess
            raise Mistake(f"{what} matches a known mistake: " + "; or, equally possible on this case: ".join(matched))
        if torch.allclose(got, -expected, rtol=rtol, atol=atol):
            raise Mistake(f"{what} has the wrong sign (it equals minus the expected values)")
        err = (got - expected).abs()
        i = int(err.flatten().argmax())
        raise Mistake(
            f"{what} differs from the expected values: largest difference {float(err.max()):.3g} at flat index {i} "
            f"(got {float(got.flatten()[i]):.4g}, expected {float(expected.flatten()[i]):.4g}); "
            f"{int((err > atol + rtol * expected.abs()).sum())} of {err.numel()} values are off"
        )

    # -- output --------------------------------------------------------------------------------

    @property
    def earned(self) -> float:
        return sum(p.earned for p in self.parts)

    @property
    def points(self) -> float:
        return sum(p.points for p in self.parts)

    def summary(self) -> str:
        lines = [f"{self.name}: {self.earned:g}/{self.points:g} points"]
        for p in self.parts:
            mark = "ok  " if p.earned == p.points else "FAIL"
            lines.append(f"  [{mark}] {p.title} ({p.earned:g}/{p.points:g})")
            if p.message:
                lines.append(f"         {p.message}")
        return "\n".join(lines)


@dataclass
class CallOutcome:
    """How one call of the student's function went, as plain data.

    ``error`` is None or one of "not_callable", "not_implemented", "blocked", "violation",
    "raised", "too_large"; ``message`` the sentence for the student; ``patched`` what the function
    replaced in torch or coursekit (put back already).
    """

    value: object = None
    error: str | None = None
    message: str = ""
    patched: list[str] = field(default_factory=list)


def local_call(fn: Callable, args: tuple, kwargs: dict, forbid: tuple[str, ...]) -> CallOutcome:
    """Run the student's function in this process (a notebook's check cell) under :mod:`.student_call`'s guard."""
    if not callable(fn):
        return CallOutcome(error="not_callable", message=f"expected a function, got {type(fn).__name__}: {fn!r}")
    try:
        value = student_call.call(fn, args, kwargs, forbid)
    except NotImplementedError:
        integrity.restore()
        return CallOutcome(error="not_implemented",
                           message="not implemented yet: replace `raise NotImplementedError()` with your code")
    except ReferenceBlocked as e:
        integrity.restore()
        return CallOutcome(error="blocked", message=str(e))
    except student_call.Violation as e:
        integrity.restore()
        return CallOutcome(error="violation", message=str(e))
    except Exception as e:  # the student's bug, reported as a verdict, not a crash of the check
        integrity.restore()
        return CallOutcome(error="raised", message=raised_message(e))
    return CallOutcome(value=value, patched=integrity.restore())


def raised_message(e: BaseException) -> str:
    """"your function raised ValueError: ... (line 3 of f)" for the exception a student's function raised."""
    tb = e.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    where = f" (line {tb.tb_lineno} of {tb.tb_frame.f_code.co_name})" if tb is not None else ""
    return f"your function raised {type(e).__name__}: {e}{where}"


def _same(value, arg) -> bool:
    if value is arg:
        return True
    if isinstance(value, torch.Tensor) and isinstance(arg, (torch.Tensor, np.ndarray)):
        other = torch.as_tensor(arg)
        return value.shape == other.shape and bool((value.detach().cpu() == other.to(value.dtype)).all())
    return False


def _trivial(value, args: tuple) -> bool:
    """None, a constant tensor, an input handed back, or a container of those."""
    if value is None:
        return True
    if isinstance(value, (tuple, list)):
        return all(_trivial(v, args) for v in value)
    if isinstance(value, dict):
        return all(_trivial(v, args) for v in value.values())
    if any(_same(value, a) for a in args):
        return True
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return any(type(a) in (int, float) and a == value for a in args)
    if isinstance(value, torch.Tensor) and value.numel() > 1:
        flat = value.detach().flatten()
        return bool((flat == flat[0]).all())
    return False


# ----------------------------------------------------------------------------------------------
# registry and the entry point used by the notebooks


@dataclass
class Exercise:
    name: str
    checker: Callable[[Callable, Report], None]
    forbid: tuple[str, ...]


EXERCISES: dict[str, Exercise] = {}


def exercise(name: str, forbid: Iterable[Callable] = ()):
    """Register ``checker(student, report)`` as the check of exercise ``name`` (``"<set>.<part>"``)."""
    keys = tuple(_key(f) for f in forbid)

    def register(checker):
        if name in EXERCISES:
            raise ValueError(f"exercise {name!r} is registered twice")
        EXERCISES[name] = Exercise(name, checker, keys)
        return checker

    return register


def _lookup(name: str) -> Exercise:
    if not isinstance(name, str) or "." not in name:
        raise ValueError(f"exercise names look like '<set>.<part>', e.g. 'warmup.to_input'; got {name!r}")
    if name not in EXERCISES:
        module = name.split(".", 1)[0]
        try:
            importlib.import_module(f"{__name__}.{module}")
        except ModuleNotFoundError as err:
            if err.name != f"{__name__}.{module}":
                raise
    if name not in EXERCISES:
        import difflib

        close = difflib.get_close_matches(name, EXERCISES, n=3)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        raise ValueError(f"no exercise called {name!r}.{hint}")
    return EXERCISES[name]


def run_check(name: str, student: Callable, seed: int | None = None, caller: Callable | None = None) -> Report:
    """Run the check of exercise ``name`` on ``student`` and return the filled :class:`Report`.

    ``caller(fn, args, kwargs, forbid) -> CallOutcome`` runs the student's function (default:
    :func:`local_call`, in this process); the grader passes one that calls into the sandbox.
    """
    ex = _lookup(name)
    report = Report(name, ex.forbid, rng=np.random.default_rng(seed), caller=caller)
    patched = integrity.restore()  # a cell that patched torch or coursekit does not change the verdict
    if patched:
        report.tampering.append(f"{', '.join(patched)} had been replaced before the check (put back)")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        err = io.StringIO()
        saved_stderr = sys.stderr
        sys.stderr = err  # keep the student's noise out of the verdict; shown below it as notes
        np_state = np.random.get_state()
        try:
            # the notebook's own seeded cells give the same numbers whether or not a check ran before them
            with torch.random.fork_rng(devices=[]):
                # one CPU thread: the cases are small, and on a busy laptop (or a grading server running
                # many kernels) several threads make small convolutions many times slower
                threads = torch.get_num_threads()
                torch.set_num_threads(1)
                try:
                    ex.checker(student, report)
                finally:
                    torch.set_num_threads(threads)
        finally:
            np.random.set_state(np_state)
            sys.stderr = saved_stderr
    if report.did_nothing() and report.earned > 0:
        for p in report.parts:
            p.earned = 0.0
            p.message = p.message or "no points: see below"
        report.notes.insert(0, "your function returns None, a constant or its own input in every case: a function "
                               "that does nothing earns no points, whatever the parts above checked")
    noise = err.getvalue().strip()
    if caught or noise:
        report.notes += [f"warning: {w.category.__name__}: {w.message}" for w in caught] + ([noise] if noise else [])
    return report


class Points(float):
    """The points a check cell returns: a float for nbgrader (``text/plain`` is the number), shown in
    JupyterLab as a banner that says full or partial credit instead of a bare ``Out: 1.0``."""

    def __new__(cls, earned: float, of: float, name: str):
        value = super().__new__(cls, earned)
        value.of, value.name = float(of), name
        return value

    def _repr_html_(self) -> str:
        full = float(self) >= self.of
        colour, word = ("#1a7f37", "Full credit") if full else ("#9a6700", "Partial credit")
        advice = "" if full else ": the parts marked FAIL above say what is missing"
        return (f'<div style="border-left:6px solid {colour};background:#f6f8fa;padding:.4em .8em;font-weight:bold">'
                f"{word}: {float(self):g}/{self.of:g} points for {self.name}{advice}</div>")


def check(name: str, student: Callable) -> float:
    """Check a student's function for exercise ``name``; print the verdict; return the points earned.

    The points come back as :class:`Points` (a float; a partial-credit banner in JupyterLab).
    Raises :class:`CheckFailed` when no point is earned.
    """
    report = run_check(name, student)
    print(report.summary())
    for note in report.notes[:5]:
        print("  " + note)
    if report.earned <= 0:
        raise CheckFailed(f"0/{report.points:g} points for {name}; see the messages above")
    return Points(report.earned, report.points, name)


integrity.restore()  # records this module's own names, now that they exist
