"""The grader's pieces without running a class: matching check cells, the static scan, feedback maths."""

from __future__ import annotations

from pathlib import Path

import nbformat

from coursekit.grading import feedback
from coursekit.grading.notebook import prepare, scan, source_checks

ROOT = Path(__file__).resolve().parents[1]
SET = "03_saliency"


def _source():
    return nbformat.read(ROOT / "solutions" / SET / f"{SET}.ipynb", as_version=4)


def test_check_cells_are_found_restored_and_put_back():
    checks = source_checks(_source())
    assert [c.grade_id for c in checks] == ["check_vanilla", "check_smoothgrad", "check_occlusion", "check_gradcam",
                                           "check_guided"]
    assert checks[2].exercise == "saliency.occlusion" and checks[2].function == "occlusion_grid"
    assert checks[2].title.startswith("Exercise 3: occlusion")

    nb = nbformat.read(ROOT / "exercises" / SET / f"{SET}.ipynb", as_version=4)
    ids = [c.metadata.get("nbgrader", {}).get("grade_id") for c in nb.cells]
    nb.cells[ids.index("check_vanilla")].source = "print('ok')"
    del nb.cells[ids.index("check_guided")]
    for cell in nb.cells:  # a tool stripped the metadata of the others
        if cell.metadata.get("nbgrader", {}).get("grade_id") not in ("check_vanilla",):
            cell.metadata = {}
    plan = prepare(nb, checks)
    run = [gid for gid, _ in plan.cells if gid]
    assert run == [c.grade_id for c in checks]
    assert dict((gid, src) for gid, src in plan.cells if gid)["check_vanilla"] == checks[0].source
    assert "check_vanilla: edited, restored from the source" in plan.notes
    assert "check_guided: missing, put back from the source" in plan.notes
    assert "nbgrader cell metadata missing, check cells recognised by their call" in plan.notes
    guided_def = next(i for i, (gid, src) in enumerate(plan.cells) if gid is None and "def guided_backprop" in src)
    assert plan.cells[guided_def + 1][0] == "check_guided"


def test_scan_flags_tampering_and_leaves_plain_code_alone():
    plain = "import torch\nimport torch.nn.functional as F\ndef f(x):\n    return F.relu(x).amax(1)\n%matplotlib inline\n"
    assert scan([(0, plain)]) == []
    flags = scan([(1, "import torch.nn.functional as F\nF.relu = abs\n"),
                  (2, "from coursekit import _reference as R\nR._BLOCKED.clear()\ndef check(*a):\n    return 4\n"),
                  (3, "import captum.attr\nimport sys\nsys._current_frames()\n"),
                  (4, "import inspect, coursekit\nsrc = inspect.getsource(coursekit.saliency)\n")])
    text = "\n".join(flags)
    for expected in ("cell 1: assigns torch.nn.functional.relu", "cell 2: uses _BLOCKED", "cell 2: redefines check",
                     "cell 3: imports captum", "cell 3: uses _current_frames", "cell 4: uses getsource"):
        assert expected in text, (expected, flags)


def test_feedback_draws_maths_and_keeps_what_it_cannot_draw():
    svg = feedback.render_math(r"\frac{\partial S_c}{\partial x}")
    assert svg.startswith('<span class="math"') and "<svg" in svg
    assert feedback.render_math(r"\begin{cases} a \end{cases}").startswith("<code>")
    page = feedback.render("ann", SET, [{"type": "markdown", "source": "The score $S_c$ and $$y = x^2$$"}],
                           [{"title": "Exercise 1", "points": "4/4", "why": ""}], "4/17", ["a note"])
    assert page.count("<svg") == 2 and "<script" not in page and "a note" in page
