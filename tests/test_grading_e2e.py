"""coursekit-grade end to end on fabricated 00_warmup submissions (nbgrader autograde/export/feedback).

Students: a correct one, one with one part wrong (partial credit), one whose function raises in one
exercise and loops forever in another, one who replaced a check cell by ``print("ok")``, and a
corrupt file.
"""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path

import nbformat
import pytest

from coursekit.checks import run_check
from coursekit.grading import cli

ROOT = Path(__file__).resolve().parents[1]
SET = "00_warmup"
STUB = ROOT / "exercises" / SET / f"{SET}.ipynb"
SOLUTION = ROOT / "solutions" / SET / f"{SET}.ipynb"
TIMEOUT = 20  # seconds per cell during this test (the default is 60)

WRONG_TO_INPUT = {
    # float64 instead of float32: one part (dtype) of to_input wrong
    "float64": "import torch\ndef to_input(image):\n    return torch.from_numpy(image / 255).permute(2, 0, 1)[None]\n",
    # forgot / 255
    "no_division": "import torch\ndef to_input(image):\n    return torch.from_numpy(image).permute(2, 0, 1)[None].float()\n",
}
RAISING_TOP_K = "def top_k(model, x, k):\n    raise ValueError('something went wrong')\n"
LOOPING_LAYER = "def layer_activation(model, x, layer_name):\n    while True:\n        pass\n"


def _cells_by_id(nb) -> dict:
    return {c.metadata["nbgrader"]["grade_id"]: c for c in nb.cells if "nbgrader" in c.metadata}


def _submission(replace: dict[str, str]) -> nbformat.NotebookNode:
    """The released stub with the solution cells filled from solutions/, then cells replaced by grade_id."""
    nb = nbformat.read(STUB, as_version=4)
    solved = _cells_by_id(nbformat.read(SOLUTION, as_version=4))
    cells = _cells_by_id(nb)
    for gid, cell in cells.items():
        if cell.metadata["nbgrader"].get("solution"):
            cell.source = solved[gid].source
    for gid, source in replace.items():
        cells[gid].source = source
    return nb


def _points(name: str, source: str) -> float:
    namespace: dict = {}
    exec(source, namespace)  # noqa: S102 -- the fabricated student's code
    return run_check(f"warmup.{name}", namespace[name]).earned


def _sha(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def graded(tmp_path_factory):
    subs = tmp_path_factory.mktemp("submissions")
    nbformat.write(_submission({}), subs / "alice.ipynb")
    nbformat.write(_submission({"to_input_solution": WRONG_TO_INPUT["float64"]}), subs / "bob.ipynb")
    (subs / "carol").mkdir()  # the folder layout: <student>/<set>.ipynb; one exercise raises, one hangs
    nbformat.write(
        _submission({"top_k_solution": RAISING_TOP_K, "layer_activation_solution": LOOPING_LAYER}),
        subs / "carol" / f"{SET}.ipynb",
    )
    nbformat.write(
        _submission({"to_input_solution": WRONG_TO_INPUT["no_division"], "check_to_input": 'print("ok")'}),
        subs / "erin.ipynb",
    )
    (subs / "frank.ipynb").write_text("this is not a notebook {", encoding="utf-8")
    before = _sha(subs)
    out = tmp_path_factory.mktemp("results")
    code = cli.main([SET, str(subs), "--out", str(out), "--timeout", str(TIMEOUT), "--root", str(ROOT)])
    with open(out / "grades.csv", newline="") as fh:
        rows = {r["student_id"]: r for r in csv.DictReader(fh)}
    return {"code": code, "out": out, "rows": rows, "before": before, "after": _sha(subs)}


@pytest.mark.slow
def test_grader_finishes_and_leaves_submissions_untouched(graded):
    assert graded["code"] == 0
    assert graded["after"] == graded["before"]
    assert set(graded["rows"]) == {"alice", "bob", "carol", "erin", "frank"}


@pytest.mark.slow
def test_scores_per_student(graded):
    rows = graded["rows"]
    full = {"check_to_input": 4.0, "check_top_k": 4.0, "check_layer_activation": 4.0}
    expected = {
        "alice": full,
        "bob": {**full, "check_to_input": _points("to_input", WRONG_TO_INPUT["float64"])},  # partial credit
        "carol": {**full, "check_top_k": 0.0, "check_layer_activation": 0.0},  # raising / hanging: those only
        "erin": {**full, "check_to_input": _points("to_input", WRONG_TO_INPUT["no_division"])},  # check restored
        "frank": {k: 0.0 for k in full},  # not a notebook
    }
    assert 0 < expected["bob"]["check_to_input"] < 4 and 0 < expected["erin"]["check_to_input"] < 4
    for student, points in expected.items():
        row = rows[student]
        got = {k: float(row[k]) for k in points}
        assert got == points, f"{student}: {row}"
        assert float(row["score"]) == sum(points.values()), f"{student}: {row}"
        assert float(row["max_score"]) == 12.0


@pytest.mark.slow
def test_notes_explain_what_happened(graded):
    rows = graded["rows"]
    assert rows["alice"]["notes"] == ""
    assert "unreadable notebook" in rows["frank"]["notes"]
    assert "check_layer_activation: stopped after the 20 s time limit" in rows["carol"]["notes"]
    assert "check_top_k" not in rows["carol"]["notes"]  # a clean CheckFailed is not worth a note
    assert "check_to_input: edited, restored from the source" in rows["erin"]["notes"]


@pytest.mark.slow
def test_feedback_and_summary(graded):
    out = graded["out"]
    for student in ["alice", "bob", "carol", "erin"]:
        html = (out / "feedback" / f"{student}.html").read_text(encoding="utf-8")
        assert "check_to_input" in html or "warmup.to_input" in html
        assert (out / "autograded" / f"{student}.ipynb").is_file()
    assert not (out / "feedback" / "frank.html").exists()
    summary = (out / "summary.txt").read_text()
    assert "alice" in summary and "12/12" in summary and "unreadable notebook" in summary
    erin = nbformat.read(out / "autograded" / "erin.ipynb", as_version=4)
    restored = _cells_by_id(erin)["check_to_input"]
    assert 'check("warmup.to_input", to_input)' in restored.source and 'print("ok")' not in restored.source


# ---------------------------------------------------------------------------------------------
# fast checks of the command's input handling


def test_collect_submissions_layouts(tmp_path):
    (tmp_path / "ann.ipynb").write_text("{}")
    (tmp_path / "ben").mkdir()
    (tmp_path / "ben" / f"{SET}.ipynb").write_text("{}")
    (tmp_path / "cy").mkdir()
    (tmp_path / "cy" / "my work.ipynb").write_text("{}")
    (tmp_path / "dee").mkdir()
    (tmp_path / "notes.txt").write_text("not a submission")
    (tmp_path / "e v@x.ipynb").write_text("{}")
    found = cli.collect_submissions(tmp_path, SET)
    assert set(found) == {"ann", "ben", "cy", "dee", "e_v@x"}
    assert found["ben"][0] == tmp_path / "ben" / f"{SET}.ipynb"
    assert found["cy"][0].name == "my work.ipynb" and "expected 00_warmup.ipynb" in found["cy"][1][0]
    assert found["dee"][0] is None and "no 00_warmup.ipynb" in found["dee"][1][0]
    assert "graded as 'e_v@x'" in found["e_v@x"][1][0]


def test_bad_arguments_are_clear_errors(tmp_path):
    (tmp_path / "subs").mkdir()
    with pytest.raises(ValueError, match="unknown exercise set 'nope'"):
        cli.grade("nope", tmp_path / "subs", tmp_path / "out", root=ROOT)
    with pytest.raises(ValueError, match="inside the submissions folder"):
        cli.grade(SET, tmp_path / "subs", tmp_path / "subs" / "out", root=ROOT)
    with pytest.raises(ValueError, match="timeout must be a positive"):
        cli.grade(SET, tmp_path / "subs", tmp_path / "out", timeout=0, root=ROOT)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        cli.grade(SET, tmp_path / "missing", tmp_path / "out", root=ROOT)
    assert cli.main([SET, str(tmp_path / "missing"), "--root", str(ROOT)]) == 2


def test_command_line_help(capsys):
    with pytest.raises(SystemExit) as stop:
        cli.main(["--help"])
    assert stop.value.code == 0
    out = capsys.readouterr().out
    assert "--timeout" in out and "never modified" in out
