"""Every solutions/ notebook is a well-formed nbgrader source whose points match its checkers."""

from __future__ import annotations

import ast
from pathlib import Path

import nbformat
import pytest

from coursekit.checks import run_check

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted(p for p in (ROOT / "solutions").glob("*/*.ipynb") if p.stem == p.parent.name)


def _nbgrader(cell) -> dict:
    return cell.metadata.get("nbgrader", {})


def _check_calls(source: str) -> list[tuple[str, str]]:
    """``(exercise name, function name)`` of every ``check("<set>.<part>", fn)`` call in ``source``."""
    calls = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "check":
            name = node.args[0].value if node.args and isinstance(node.args[0], ast.Constant) else None
            fn = node.args[1].id if len(node.args) > 1 and isinstance(node.args[1], ast.Name) else None
            calls.append((name, fn))
    return calls


def _stub(*args, **kwargs):
    raise NotImplementedError()


def test_there_are_solution_notebooks():
    assert any(p.stem == "00_warmup" for p in NOTEBOOKS)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_grade_cells_carry_the_points_of_their_checker(path):
    nb = nbformat.read(path, as_version=4)
    grade_cells = [c for c in nb.cells if _nbgrader(c).get("grade") and not _nbgrader(c).get("solution")]
    assert grade_cells, f"{path.name} has no check cells"
    for cell in grade_cells:
        meta = _nbgrader(cell)
        calls = _check_calls(cell.source)
        assert len(calls) == 1, f"{meta.get('grade_id')}: a check cell holds exactly one check(...) call, got {calls}"
        name, fn = calls[0]
        assert name and fn, f"{meta.get('grade_id')}: write check(\"<set>.<part>\", function_name)"
        report = run_check(name, _stub)  # parts are registered even when the student's function raises
        assert report.points > 0
        assert report.earned == 0
        assert float(meta["points"]) == report.points, (
            f"{path.name}, cell {meta['grade_id']}: nbgrader points {meta['points']} but the checker "
            f"{name!r} awards {report.points:g}"
        )
        assert meta.get("locked") is True, f"{meta['grade_id']}: check cells must be locked"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_grade_ids_unique_and_metadata_complete(path):
    nb = nbformat.read(path, as_version=4)
    ids = [_nbgrader(c)["grade_id"] for c in nb.cells if _nbgrader(c)]
    assert len(ids) == len(set(ids)), f"duplicate grade_ids in {path.name}: {sorted(ids)}"
    for cell in nb.cells:
        meta = _nbgrader(cell)
        if meta:
            assert meta.get("schema_version") == 3, f"{meta.get('grade_id')}: nbgrader schema_version must be 3"
            assert {"grade", "solution", "locked", "grade_id"} <= set(meta), meta


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_solution_cells_have_markers_and_define_the_checked_function(path):
    nb = nbformat.read(path, as_version=4)
    defined = set()
    for cell in nb.cells:
        meta = _nbgrader(cell)
        if meta.get("solution") and cell.cell_type == "code":
            src = cell.source
            assert "### BEGIN SOLUTION" in src and "### END SOLUTION" in src, (
                f"{meta['grade_id']}: solution cells need ### BEGIN SOLUTION / ### END SOLUTION"
            )
            assert src.index("### BEGIN SOLUTION") < src.index("### END SOLUTION")
            defined |= {n.name for n in ast.walk(ast.parse(src)) if isinstance(n, ast.FunctionDef)}
        if meta.get("grade") and not meta.get("solution"):
            for _, fn in _check_calls(cell.source):
                assert fn in defined, f"{meta['grade_id']} checks {fn}, which no earlier solution cell defines"
