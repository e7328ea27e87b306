"""coursekit-grade end to end: a fabricated class of 03_saliency (four of them graded twice), each student's score and note.

The class covers what was found when the grader was tried as students would: correct work with
stderr and logging, a dying process, an endless loop, stripped metadata, a replaced ``check``,
patched ``torch.allclose`` and ``run_check``, the reference reached through its closure and an
emptied ``_BLOCKED``, captum, frame inspection, ``getsource`` + ``exec``, a vandal who tries to
delete a classmate's notebook and overwrite the results, a process-group kill, a known mistake,
an edited check cell, doing nothing, and a corrupt file.
"""

from __future__ import annotations

import csv
import hashlib
import shutil
from pathlib import Path

import nbformat
import pytest

from coursekit.grading import cli, pool

ROOT = Path(__file__).resolve().parents[1]
SET = "03_saliency"
STUB = ROOT / "exercises" / SET / f"{SET}.ipynb"
SOLUTION = ROOT / "solutions" / SET / f"{SET}.ipynb"
TIMEOUT = 20  # generous: on a loaded 2-core machine a cold import (captum) can take several seconds
FULL = {"check_vanilla": 4.0, "check_smoothgrad": 3.0, "check_occlusion": 3.0, "check_gradcam": 4.0, "check_guided": 3.0}
ZERO = {k: 0.0 for k in FULL}


def _cells(nb) -> dict:
    return {c.metadata["nbgrader"]["grade_id"]: c for c in nb.cells if "nbgrader" in c.metadata}


def _submission(replace: dict[str, str] | None = None, extra: list[tuple[int, str]] = (), strip: bool = False):
    """The released notebook with the solutions filled in, cells replaced by grade_id, cells inserted."""
    nb = nbformat.read(STUB, as_version=4)
    solved = _cells(nbformat.read(SOLUTION, as_version=4))
    for gid, cell in _cells(nb).items():
        if cell.metadata["nbgrader"].get("solution"):
            cell.source = solved[gid].source
    for gid, source in (replace or {}).items():
        _cells(nb)[gid].source = source
    for at, source in extra:
        nb.cells.insert(at, nbformat.v4.new_code_cell(source))
    if strip:
        for cell in nb.cells:
            cell.metadata = {}
    return nb


NONE_FUNCTIONS = {f"{k}_solution": f"def {f}(*args, **kwargs):\n    return None\n" for k, f in (
    ("vanilla", "vanilla_saliency"), ("smoothgrad", "smoothgrad"), ("occlusion", "occlusion_grid"),
    ("gradcam", "gradcam"), ("guided", "guided_backprop"))}
ZERO_FUNCTIONS = {k: v.replace("return None", "import torch\n    return torch.zeros(3, 16, 16)") for k, v in NONE_FUNCTIONS.items()}
NOISY = ("import logging, sys\n_vanilla = vanilla_saliency\n"
         "def vanilla_saliency(model, x, target):\n    print('computing', file=sys.stderr)\n"
         "    logging.getLogger('carol').warning('saliency for %s', target)\n    return _vanilla(model, x, target)\n")
DIES = "import os\ndef occlusion_grid(model, x, target, patch, stride, fill=0.0):\n    os._exit(3)\n"
# an endless loop that sleeps: the limit is a wall-clock timer (ITIMER_REAL), met the same way as by a busy loop,
# without burning a core for TIMEOUT seconds twice while the rest of the suite waits for it
LOOPS = "import time\ndef gradcam(model, x, target, layer):\n    while True:\n        time.sleep(0.05)\n"
OFF_BY_ONE = ("import torch\ndef occlusion_grid(model, x, target, patch, stride, fill=0.0):\n"
              "    n, _, h, w = x.shape\n    target = torch.as_tensor(target).reshape(-1).expand(n)\n"
              "    rows = torch.arange(n)\n    starts_r, starts_c = range(0, h - patch, stride), range(0, w - patch, stride)\n"
              "    with torch.no_grad():\n        p = model(x).softmax(1)[rows, target]\n"
              "        grid = torch.zeros(n, len(starts_r), len(starts_c))\n"
              "        for i, r in enumerate(starts_r):\n            for j, c in enumerate(starts_c):\n"
              "                hid = x.clone()\n                hid[:, :, r:r + patch, c:c + patch] = fill\n"
              "                grid[:, i, j] = p - model(hid).softmax(1)[rows, target]\n    return grid\n")
CLOSURE = ("import coursekit.saliency\ndef vanilla_saliency(model, x, target):\n"
           "    return coursekit.saliency.vanilla_saliency.__closure__[0].cell_contents(model, x, target)\n")
CLEAR = ("import coursekit.saliency, coursekit._reference\n"
         "def smoothgrad(model, x, target, noise, noise_level=0.15):\n    coursekit._reference._BLOCKED.clear()\n"
           "    sigma = noise_level * (x.amax((1, 2, 3)) - x.amin((1, 2, 3)))\n"
           "    return coursekit.saliency.smoothgrad(model, x, target, noise=noise * sigma.view(-1, 1, 1, 1, 1))\n")
CAPTUM = ("from captum.attr import Saliency\n"
          "def vanilla_saliency(model, x, target):\n"
          "    return Saliency(model).attribute(x.clone(), target=target, abs=True).amax(1).detach()\n")
FRAMES = ("import sys\ndef vanilla_saliency(model, x, target):\n    for frame in sys._current_frames().values():\n"
          "        while frame is not None:\n            if 'expected' in frame.f_locals:\n"
          "                return frame.f_locals['expected']\n            frame = frame.f_back\n    return None\n")
GETSOURCE = ("import inspect, coursekit.saliency as S\nns = {'__name__': 'coursekit.copy', '__package__': 'coursekit'}\n"
             "exec(inspect.getsource(S), ns)\nsmoothgrad_copy = ns['smoothgrad']\n"
             "def smoothgrad(model, x, target, noise, noise_level=0.15):\n"
             "    sigma = noise_level * (x.amax((1, 2, 3)) - x.amin((1, 2, 3)))\n"
             "    return smoothgrad_copy(model, x, target, noise=noise * sigma.view(-1, 1, 1, 1, 1))\n")
PATCH_TORCH = "import torch\ntorch.allclose = lambda *a, **k: True\ntorch.Tensor.allclose = lambda *a, **k: True\n"
PATCH_CHECKS = ("import coursekit.checks as C\nclass _R:\n    earned = points = 17.0\n    notes = tampering = []\n"
                "    def summary(self):\n        return 'saliency: 17/17 points'\nC.run_check = lambda *a, **k: _R()\n")
REDEFINE_CHECK = "def check(name, fn):\n    print(name + ': 4/4 points')\n    return 4.0\n"
KILL_GROUP = "import os, signal\nos.kill(0, signal.SIGKILL)\n"


def _vandal(subs: Path, out: Path, outside: Path) -> str:
    return (f"import os, shutil\nfor act in (lambda: os.remove({str(subs / 'alice.ipynb')!r}),\n"
            f"            lambda: open({str(out / 'grades.csv')!r}, 'w').write('hacked'),\n"
            f"            lambda: open({str(outside / 'owned.txt')!r}, 'w').write('owned')):\n"
            "    try:\n        act()\n    except OSError as err:\n        print('refused:', err)\n")


AGAIN = ("alice", "dave", "erin", "jack")  # graded a second time: honest, a dying process, an endless loop, a cheat


@pytest.fixture(scope="module")
def graded(tmp_path_factory):
    base = tmp_path_factory.mktemp("class")
    subs, out, outside = base / "submissions", base / "results", base / "outside"
    for folder in (subs, out, outside):
        folder.mkdir()
    (outside / "keep.txt").write_text("instructor's file")
    write = lambda nb, name: nbformat.write(nb, subs / name)  # noqa: E731
    write(_submission(), "alice.ipynb")
    write(nbformat.read(STUB, as_version=4), "bob.ipynb")
    write(_submission(extra=[(5, NOISY)]), "carol.ipynb")
    write(_submission({"occlusion_solution": DIES}), "dave.ipynb")
    write(_submission({"gradcam_solution": LOOPS}), "erin.ipynb")
    write(_submission(strip=True), "frank.ipynb")
    write(_submission(NONE_FUNCTIONS, extra=[(2, REDEFINE_CHECK)]), "gina.ipynb")
    write(_submission(ZERO_FUNCTIONS, extra=[(2, PATCH_TORCH)]), "hank.ipynb")
    write(_submission(NONE_FUNCTIONS, extra=[(2, PATCH_CHECKS)]), "ivy.ipynb")
    write(_submission({"vanilla_solution": CLOSURE, "smoothgrad_solution": CLEAR}), "jack.ipynb")
    write(_submission({"vanilla_solution": CAPTUM}), "kate.ipynb")
    write(_submission(extra=[(2, _vandal(subs, out, outside))]), "leo.ipynb")
    (subs / "mia.ipynb").write_text("this is not a notebook {", encoding="utf-8")
    write(_submission({"occlusion_solution": OFF_BY_ONE}), "nick.ipynb")
    write(_submission({"vanilla_solution": FRAMES}), "olive.ipynb")
    write(_submission({"smoothgrad_solution": GETSOURCE}), "pete.ipynb")
    (subs / "quinn").mkdir()
    write(_submission({"check_guided": 'print("ok")'}), f"quinn/{SET}.ipynb")
    write(_submission(extra=[(2, KILL_GROUP)]), "rose.ipynb")
    again_subs, again_out = base / "again" / "submissions", base / "again" / "results"
    again_subs.mkdir(parents=True)
    for student in AGAIN:
        (again_subs / f"{student}.ipynb").write_bytes((subs / f"{student}.ipynb").read_bytes())
    before = _tree(subs), _tree(outside), _tree(ROOT / "solutions"), _tree(ROOT / "exercises")
    codes = [cli.main([SET, str(subs), "--out", str(out), "--timeout", str(TIMEOUT), "--root", str(ROOT), "--jobs", "2"])]
    # repeatability: part of the class again, into a folder that holds the first run's results
    shutil.copytree(out, again_out)
    codes.append(cli.main([SET, str(again_subs), "--out", str(again_out), "--timeout", str(TIMEOUT), "--root", str(ROOT),
                           "--jobs", "2"]))
    after = _tree(subs), _tree(outside), _tree(ROOT / "solutions"), _tree(ROOT / "exercises")
    return {"codes": codes, "rows": _rows(out / "grades.csv"), "again": _rows(again_out / "grades.csv"),
            "again_out": again_out, "before": before, "after": after, "out": out, "outside": outside}


def _rows(path: Path) -> dict[str, dict[str, str]]:
    with open(path, newline="") as fh:
        return {r["student_id"]: r for r in csv.DictReader(fh)}


def _tree(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and "__pycache__" not in p.parts}


EXPECTED = {  # student: (points per check, text in notes, text in flags)
    "alice": (FULL, "", ""),
    "bob": (ZERO, "", ""),
    "carol": (FULL, "", ""),
    "dave": ({**FULL, "check_occlusion": 0.0}, "check_occlusion: the Python process died", ""),
    "erin": ({**FULL, "check_gradcam": 0.0}, f"check_gradcam: stopped after the {TIMEOUT} s time limit", ""),
    "frank": (FULL, "nbgrader cell metadata missing", ""),
    "gina": (ZERO, "", "redefines check"),
    "hank": (ZERO, "torch.allclose had been replaced", "assigns torch.allclose"),
    "ivy": (ZERO, "coursekit.checks.run_check had been replaced", "assigns coursekit.checks.run_check"),
    "jack": ({**FULL, "check_vanilla": 0.0, "check_smoothgrad": 0.0}, "", "ran coursekit's vanilla_saliency()"),
    "kate": ({**FULL, "check_vanilla": 0.0}, "", "imports captum"),
    "leo": (FULL, "", "refused: os.remove <submissions>/alice.ipynb"),
    "mia": (ZERO, "unreadable notebook", ""),
    "nick": ({**FULL, "check_occlusion": 0.0}, "", ""),
    "olive": ({**FULL, "check_vanilla": 0.0}, "", "sys._current_frames"),
    "pete": ({**FULL, "check_smoothgrad": 0.0}, "", "uses getsource"),
    "quinn": (FULL, "check_guided: edited, restored from the source", ""),
    "rose": (FULL, "", ""),
}


@pytest.mark.slow
def test_every_student_gets_the_expected_score_and_note(graded):
    rows = graded["rows"]
    assert set(rows) == set(EXPECTED)
    expected = dict(EXPECTED)
    if not pool.probe_sandbox():  # without a PID namespace, kill(0) ends the worker: that cell is lost, nothing else
        expected["rose"] = (FULL, "the Python process died here", "")
    for student, (points, note, flag) in expected.items():
        row = rows[student]
        assert {k: float(row[k]) for k in FULL} == points, f"{student}: {row}"
        assert float(row["score"]) == sum(points.values()) and float(row["max_score"]) == 17.0
        assert note in row["notes"], f"{student}: {row['notes']!r}"
        assert flag in row["flags"], f"{student}: {row['flags']!r}"
        if student == "jack":
            assert "uses __closure__" in row["flags"] and "ran coursekit's smoothgrad()" in row["flags"]
        if not note:
            assert row["notes"] == "" or student in ("leo", "jack", "kate", "olive", "pete", "hank", "rose"), student
    for student in ("alice", "bob", "carol", "frank", "nick", "quinn", "rose", "dave", "erin"):
        assert rows[student]["flags"] == "", f"{student}: {rows[student]['flags']}"


@pytest.mark.slow
def test_nothing_outside_the_output_changed_and_grading_is_repeatable(graded):
    assert graded["codes"] == [0, 0]
    first = {s: graded["rows"][s] for s in AGAIN}
    assert graded["again"] == first, [(a, b) for a, b in zip(first.values(), graded["again"].values()) if a != b]
    again_feedback = sorted(p.name for p in (graded["again_out"] / "feedback").iterdir())
    assert again_feedback == [f"{s}.html" for s in AGAIN]  # the first run's other results were cleared
    assert graded["after"] == graded["before"]
    assert not (graded["outside"] / "owned.txt").exists()


@pytest.mark.slow
def test_feedback_reads_offline_and_shows_no_grader_paths(graded):
    out = graded["out"]
    for student in ("alice", "erin", "nick"):
        page = (out / "feedback" / f"{student}.html").read_text(encoding="utf-8")
        assert "<script" not in page and "mathjax" not in page.lower()
        assert "<svg" in page  # the formulas, drawn
        assert "Exercise 3: occlusion" in page and "check_occlusion" in page
        for path in (str(ROOT), str(out), "/tmp/"):
            assert path not in page, (student, path)
        assert (out / "autograded" / f"{student}.ipynb").is_file()
    assert "stopped after the" in (out / "feedback" / "erin.html").read_text(encoding="utf-8")
    summary = (out / "summary.txt").read_text()
    assert "alice" in summary and "17/17" in summary and "unreadable notebook" in summary


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
    assert found["cy"][0].name == "my work.ipynb" and f"expected {SET}.ipynb" in found["cy"][1][0]
    assert found["dee"][0] is None and f"no {SET}.ipynb" in found["dee"][1][0]
    assert "graded as 'e_v@x'" in found["e_v@x"][1][0]


def test_bad_arguments_are_clear_errors(tmp_path):
    (tmp_path / "subs").mkdir()
    with pytest.raises(ValueError, match="unknown exercise set 'nope'"):
        cli.grade("nope", tmp_path / "subs", tmp_path / "out", root=ROOT)
    with pytest.raises(ValueError, match="inside the submissions folder"):
        cli.grade(SET, tmp_path / "subs", tmp_path / "subs" / "out", root=ROOT)
    with pytest.raises(ValueError, match="timeout must be a positive"):
        cli.grade(SET, tmp_path / "subs", tmp_path / "out", timeout=0, root=ROOT)
    with pytest.raises(ValueError, match="jobs must be a positive"):
        cli.grade(SET, tmp_path / "subs", tmp_path / "out", jobs=0, root=ROOT)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        cli.grade(SET, tmp_path / "missing", tmp_path / "out", root=ROOT)
    assert cli.main([SET, str(tmp_path / "missing"), "--root", str(ROOT)]) == 2


def test_command_line_help(capsys):
    with pytest.raises(SystemExit) as stop:
        cli.main(["--help"])
    assert stop.value.code == 0
    out = capsys.readouterr().out
    assert "--timeout" in out and "--jobs" in out and "never modified" in out
