"""What the instructor sees: progress lines, partial results after an interruption, notes that say
what happened, the student's own output in the feedback, class analytics (00_warmup)."""

from __future__ import annotations

import csv

import nbformat
import pytest
from test_grading_isolation import FULL, ROOT, SET, SOLUTION

from coursekit.grading import analytics, cli

STUB = ROOT / "exercises" / SET / f"{SET}.ipynb"
SEGFAULT = "import ctypes\nctypes.string_at(0)\n"
PRINTS = "print('hello from the student')\n"


def _with(extra: str):
    nb = nbformat.read(SOLUTION, as_version=4)
    nb.cells.insert(2, nbformat.v4.new_code_cell(extra))
    return nb


@pytest.fixture(scope="module")
def classroom(tmp_path_factory):
    subs = tmp_path_factory.mktemp("report") / "submissions"
    subs.mkdir()
    nbformat.write(_with(PRINTS), subs / "ann.ipynb")
    nbformat.write(_with(SEGFAULT), subs / "ben.ipynb")
    nbformat.write(nbformat.read(STUB, as_version=4), subs / "cy.ipynb")
    nbformat.write(nbformat.read(STUB, as_version=4), subs / "dee.ipynb")
    return subs


def _rows(path):
    with open(path, newline="") as fh:
        return {r["student_id"]: r for r in csv.DictReader(fh)}


@pytest.fixture(scope="module")
def graded(classroom, tmp_path_factory):
    out = tmp_path_factory.mktemp("report_out")
    lines: list[str] = []
    cli.grade(SET, classroom, out, timeout=30, root=ROOT, jobs=2, echo=lines.append)
    return out, lines


@pytest.mark.slow
def test_a_progress_line_per_student_and_notes_that_say_what_happened(graded):
    out, lines = graded
    progress = [x for x in lines if x.startswith("[")]
    assert len(progress) == 4 and progress[-1].startswith("[4/4] ")
    assert any("ann: 12 points" in x for x in progress), progress
    rows = _rows(out / "grades.csv")
    assert {k: float(rows["ben"][k]) for k in FULL} == FULL
    assert "signal SIGSEGV" in rows["ben"]["notes"], rows["ben"]["notes"]
    assert rows["ann"]["notes"] == ""


@pytest.mark.slow
def test_feedback_shows_what_the_students_own_cells_printed(graded):
    out, _ = graded
    assert "hello from the student" in (out / "feedback" / "ann.html").read_text(encoding="utf-8")


@pytest.mark.slow
def test_class_analytics_counts_each_diagnosed_mistake(graded):
    out, _ = graded
    page = (out / "analytics.html").read_text(encoding="utf-8")
    assert page.count("<svg") == len(FULL) and "<script" not in page
    assert "2 of 4 lost points" in page
    label = analytics.diagnosis_key("not implemented yet: replace `raise NotImplementedError()` with your code")
    assert page.count(f"<title>{label}</title>") == len(FULL)  # once per exercise: the two stubs counted together
    assert page.count(">2</text>") == len(FULL)


@pytest.mark.slow
def test_an_interrupted_run_keeps_partial_results_and_names_who_was_not_graded(classroom, tmp_path):
    out = tmp_path / "out"

    def echo(line: str) -> None:
        if line.startswith("[1/"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        cli.grade(SET, classroom, out, timeout=30, root=ROOT, jobs=1, echo=echo)
    rows = _rows(out / "grades.csv")
    assert set(rows) == {"ann", "ben", "cy", "dee"}
    assert float(rows["ann"]["score"]) == 12.0  # finished before the interruption: kept
    for student in ("ben", "cy", "dee"):
        assert "not graded: the run was interrupted" in rows[student]["notes"], rows[student]
    assert (out / "summary.txt").read_text().startswith("INTERRUPTED")


def test_diagnosis_keys_group_known_mistakes_and_blank_numbers():
    assert analytics.diagnosis_key("values: your result matches a known mistake: forgot to divide by 255") == \
        "forgot to divide by 255"
    assert analytics.diagnosis_key("values: largest difference 0.31 at flat index 7") == \
        analytics.diagnosis_key("values: largest difference 2.5e-3 at flat index 12")
