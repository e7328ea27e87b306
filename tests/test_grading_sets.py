"""Every exercise set graded end to end: an honest, a wrong and a hostile student per set.

One test per set (``-n 2`` spreads them over pytest-xdist workers). The honest student submits the
solution; the wrong one the released notebook untouched (every exercise raises
NotImplementedError); the hostile one the solution with cells that used to crash the whole run
(a cell ending in an expression whose value has no ``execution_count``, a renamed check cell).
A forger submits the solution with forged result records for every cell and a patched
``torch.allclose``: it earns exactly the set's points, and the wrong student, who carries the same
forgeries, earns none.
"""

from __future__ import annotations

import csv
from pathlib import Path

import nbformat
import pytest

from coursekit.grading import cli
from coursekit.grading.notebook import source_checks
from coursekit.grading.release import list_sets

ROOT = Path(__file__).resolve().parents[1]
SETS = list_sets(ROOT)
TIMEOUT = 60


def _checks(assignment: str):
    return source_checks(nbformat.read(ROOT / "solutions" / assignment / f"{assignment}.ipynb", as_version=4))


FORGE = ("import os, json\nimport torch\ntorch.allclose = lambda *a, **k: True\nfor i in range(60):\n"
         "    for record in ({'event': 'start', 'i': i}, {'event': 'done', 'i': i, 'check': {'earned': 100.0}},\n"
         "                   {'event': 'verdict', 'i': i, 'earned': 100.0, 'points': 100.0}):\n"
         "        os.write(3, (json.dumps(record) + '\\n').encode())\n")


def _forging(nb):
    nb.cells.insert(1, nbformat.v4.new_code_cell(FORGE))
    return nb


def _hostile(assignment: str):
    """The solution, plus cells ending in bare expressions, and its first check cell's grade_id renamed."""
    nb = nbformat.read(ROOT / "solutions" / assignment / f"{assignment}.ipynb", as_version=4)
    nb.cells.insert(1, nbformat.v4.new_code_cell("import torch\ntorch.manual_seed(0)"))  # a Generator, shown
    nb.cells.insert(2, nbformat.v4.new_code_cell("x_ = 3\nx_ * 2  # a plain value"))
    first = next(c for c in nb.cells if c.metadata.get("nbgrader", {}).get("grade"))
    first.metadata["nbgrader"]["grade_id"] = "renamed_by_student"
    return nb, first.source


@pytest.fixture(scope="module", params=SETS)
def graded(request, tmp_path_factory):
    assignment = request.param
    base = tmp_path_factory.mktemp(assignment)
    subs, out = base / "submissions", base / "results"
    subs.mkdir()
    nbformat.write(nbformat.read(ROOT / "solutions" / assignment / f"{assignment}.ipynb", as_version=4),
                   subs / "honest.ipynb")
    nbformat.write(_forging(nbformat.read(ROOT / "exercises" / assignment / f"{assignment}.ipynb", as_version=4)),
                   subs / "wrong.ipynb")
    nbformat.write(_hostile(assignment)[0], subs / "hostile.ipynb")
    nbformat.write(_forging(nbformat.read(ROOT / "solutions" / assignment / f"{assignment}.ipynb", as_version=4)),
                   subs / "forger.ipynb")
    result = cli.grade(assignment, subs, out, timeout=TIMEOUT, root=ROOT, jobs=2, echo=lambda *a: None)
    with open(result.csv, newline="") as fh:
        rows = {r["student_id"]: r for r in csv.DictReader(fh)}
    return assignment, rows, out


@pytest.mark.slow
def test_every_set_grades_honest_wrong_and_hostile(graded):
    assignment, rows, out = graded
    checks = _checks(assignment)
    total = sum(c.points for c in checks)
    assert set(rows) == {"honest", "wrong", "hostile", "forger"}
    for student in ("honest", "hostile", "forger"):
        row = rows[student]
        assert {c.grade_id: float(row[c.grade_id]) for c in checks} == {c.grade_id: c.points for c in checks}, row
        assert float(row["score"]) == total, row
    assert float(rows["wrong"]["score"]) == 0.0 and all(float(rows["wrong"][c.grade_id]) == 0 for c in checks)
    assert f"{checks[0].grade_id}: missing, put back from the source" in rows["hostile"]["notes"]
    assert rows["honest"]["notes"] == "" and rows["honest"]["flags"] == ""
    for student in rows:  # every feedback notebook is valid nbformat
        nb = nbformat.read(out / "autograded" / f"{student}.ipynb", as_version=4)
        nbformat.validate(nb)
        assert (out / "feedback" / f"{student}.html").is_file()
    shown = nbformat.read(out / "autograded" / "hostile.ipynb", as_version=4)
    assert "calls os.write" in rows["forger"]["flags"] and "calls os.write" in rows["wrong"]["flags"]
    values = [o for c in shown.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "execute_result"]
    assert any(o.data["text/plain"] == "6" and o.execution_count for o in values), values
