"""The exercise check engine (coursekit.checks): parts, diagnostics, blocking, output discipline."""

from __future__ import annotations

import contextlib
import sys
import warnings

import pytest
import torch

from coursekit import checks
from coursekit.checks import CheckFailed, Mistake, check, exercise, reference, run_check


@reference
def _double(x):
    """A stand-in for a coursekit reference function."""
    return 2 * x


@pytest.fixture
def register():
    """Register checkers under throw-away names and remove them afterwards."""
    names = []

    def _register(name, forbid=()):
        def deco(checker):
            exercise(name, forbid=forbid)(checker)
            names.append(name)
            return checker

        return deco

    yield _register
    for name in names:
        checks.EXERCISES.pop(name, None)


@pytest.fixture
def doubling(register):
    """An exercise 'enginetest.double': re-implement _double; parts worth 1 and 2 points."""

    @register("enginetest.double", forbid=[_double])
    def _(student, report):
        x = torch.from_numpy(report.rng.random(5)).float()
        with report.part("shape", points=1):
            got = report.call(student, x)
            report.expect_tensor(got, shape=(5,))
        with report.part("values", points=2):
            got = report.call(student, x)
            report.expect_close(got, 2 * x, mistakes={"you added instead of multiplying": x + 2})

    return "enginetest.double"


def test_full_points_returns_float_and_prints_summary(doubling, capsys):
    earned = check(doubling, lambda x: x * 2)
    assert isinstance(earned, float) and earned == 3.0
    out = capsys.readouterr().out
    assert "enginetest.double: 3/3 points" in out
    assert "[ok  ] shape (1/1)" in out and "[ok  ] values (2/2)" in out


def test_partial_credit_names_the_mistake(doubling, capsys):
    report = run_check(doubling, lambda x: x + 2)
    assert (report.earned, report.points) == (1.0, 3.0)
    assert [p.earned for p in report.parts] == [1.0, 0.0]
    assert "you added instead of multiplying" in report.parts[1].message
    assert check(doubling, lambda x: x + 2) == 1.0
    assert "[FAIL] values (0/2)" in capsys.readouterr().out


def test_wrong_sign_and_unknown_difference_are_explained(doubling):
    assert "wrong sign" in run_check(doubling, lambda x: -2 * x).parts[1].message
    msg = run_check(doubling, lambda x: 2 * x + torch.arange(5.0)).parts[1].message
    assert "largest difference 4" in msg and "of 5 values are off" in msg


def test_shape_mistakes_get_hints(doubling):
    report = run_check(doubling, lambda x: (2 * x)[None])
    assert report.earned == 0
    assert "extra batch dimension" in report.parts[0].message.lower()
    report = run_check(doubling, lambda x: (2 * x).numpy())
    assert "numpy array" in report.parts[0].message
    report = run_check(doubling, lambda x: None)
    assert "forget to `return`" in report.parts[0].message


def test_zero_points_raise_check_failed(doubling, capsys):
    with pytest.raises(CheckFailed, match=r"0/3 points for enginetest.double"):
        check(doubling, lambda x: x[:2])
    assert "enginetest.double: 0/3 points" in capsys.readouterr().out


def test_student_exception_becomes_a_verdict(doubling):
    def broken(x):
        return x / 0 + {}["missing"]

    report = run_check(doubling, broken)
    assert report.earned == 0
    msg = report.parts[0].message
    assert msg.startswith("your function raised KeyError") and "line" in msg and "broken" in msg
    with pytest.raises(CheckFailed):
        check(doubling, broken)


def test_not_implemented_stub_says_so(doubling):
    def stub(x):
        raise NotImplementedError()

    report = run_check(doubling, stub)
    assert report.earned == 0 and report.points == 3
    assert all("not implemented yet" in p.message for p in report.parts)


def test_non_callable_student(doubling):
    assert "expected a function" in run_check(doubling, 42).parts[0].message


def test_calling_the_blocked_reference_earns_nothing(doubling, capsys):
    cheat = lambda x: _double(x)
    report = run_check(doubling, cheat)
    assert report.earned == 0
    assert all("called coursekit's _double" in p.message for p in report.parts)
    with pytest.raises(CheckFailed):
        check(doubling, cheat)
    assert "write yourself" in capsys.readouterr().out
    # outside a check (and after one, even one that failed) the reference works normally
    assert _double(3) == 6


def test_blocking_is_lifted_after_a_student_error(doubling):
    def cheat_then_crash(x):
        _double(x)

    run_check(doubling, cheat_then_crash)
    assert not checks.blocked_keys()
    assert _double(torch.ones(2)).tolist() == [2.0, 2.0]


def test_reference_cannot_be_forbidden_unless_decorated():
    with pytest.raises(TypeError, match="not decorated"):
        exercise("enginetest.never", forbid=[lambda x: x])


def test_reference_decorator_works_on_a_context_manager(register):
    """@reference on a @contextmanager function blocks `with f(...)` (how hooks.record could be blocked)."""

    @reference
    @contextlib.contextmanager
    def managed(value):
        yield value

    @register("enginetest.managed", forbid=[managed])
    def _(student, report):
        with report.part("uses no reference", points=1):
            report.call(student)

    def uses_it():
        with managed(1) as v:
            return v

    assert uses_it() == 1
    assert "called coursekit's" in run_check("enginetest.managed", uses_it).parts[0].message
    assert run_check("enginetest.managed", lambda: 1).earned == 1


def test_nothing_reaches_stderr_even_when_the_student_warns(doubling, capfd):
    def noisy(x):
        print("debug output", file=sys.stderr)
        warnings.warn("student warning", stacklevel=1)
        return 2 * x

    assert check(doubling, noisy) == 3.0
    out, err = capfd.readouterr()
    assert err == ""
    assert "student warning" in out and "debug output" in out


def test_stderr_is_restored_after_a_check(doubling):
    saved = sys.stderr
    run_check(doubling, lambda x: 2 * x)
    assert sys.stderr is saved


def test_custom_mistake_and_detached_check(register):
    @register("enginetest.custom")
    def _(student, report):
        with report.part("custom", points=1):
            if report.call(student) != "right":
                raise Mistake("a custom diagnosis")
        with report.part("detached", points=1):
            w = torch.ones(2, requires_grad=True)
            report.expect_tensor(report.call(student) and w * 2, detached=True)

    report = run_check("enginetest.custom", lambda: "wrong")
    assert report.parts[0].message == "a custom diagnosis"
    assert "still attached to the autograd graph" in report.parts[1].message


def test_unknown_exercise_names_are_errors(doubling):
    with pytest.raises(ValueError, match=r"Did you mean 'enginetest.double'"):
        check("enginetest.doubel", lambda x: x)
    with pytest.raises(ValueError, match="look like '<set>.<part>'"):
        check("double", lambda x: x)
    with pytest.raises(ValueError, match="no exercise called 'nosuchset.part'"):
        run_check("nosuchset.part", lambda x: x)


def test_registering_a_name_twice_is_an_error(doubling):
    with pytest.raises(ValueError, match="registered twice"):
        exercise(doubling)(lambda student, report: None)


def test_cases_are_fresh_unless_seeded(register):
    seen = []

    @register("enginetest.seeds")
    def _(student, report):
        seen.append(report.seed)
        with report.part("anything", points=1):
            pass

    run_check("enginetest.seeds", None)
    run_check("enginetest.seeds", None)
    run_check("enginetest.seeds", None, seed=7)
    run_check("enginetest.seeds", None, seed=7)
    assert seen[0] != seen[1] and seen[2] == seen[3]


def test_a_check_leaves_the_global_random_state_alone(register):
    import numpy as np

    @register("enginetest.rng")
    def _(student, report):
        torch.rand(5)
        np.random.rand(5)
        with report.part("anything", points=1):
            report.call(student)

    torch.manual_seed(0)
    np.random.seed(0)
    expected = (torch.rand(2), np.random.rand(2))
    torch.manual_seed(0)
    np.random.seed(0)
    run_check("enginetest.rng", lambda: torch.rand(3))  # the student's draws do not count either
    assert torch.equal(torch.rand(2), expected[0]) and np.array_equal(np.random.rand(2), expected[1])


def test_partial_credit_shows_a_banner_and_stays_a_float_for_nbgrader(doubling, capsys):
    partial = check(doubling, lambda x: x + 2)  # right shape (1 point), wrong values (0 of 2)
    assert isinstance(partial, float) and float(partial) == 1.0 and repr(partial) == "1.0"
    assert "Partial credit: 1/3 points for enginetest.double" in partial._repr_html_()
    full = check(doubling, lambda x: x * 2)
    assert "Full credit: 3/3 points" in full._repr_html_()
