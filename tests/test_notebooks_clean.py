"""Committed notebooks are clean wherever they are opened (issue 12): no widget reprs, no stale
progress bars, no test markers or thread settings in student-facing cells, no "-0.00", a kernelspec
that JupyterLab does not rewrite on open, and lectures that end with what to remember and a pointer
to their exercise set."""

from __future__ import annotations

import re
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).parent.parent
LECTURES = sorted((ROOT / "notebooks").glob("*.ipynb"))
SETS = sorted((ROOT / "solutions").glob("*/*.ipynb")) + sorted((ROOT / "exercises").glob("*/*.ipynb"))
ALL = LECTURES + SETS
IDS = [str(p.relative_to(ROOT)) for p in ALL]

# What ipykernel's own kernelspec says; JupyterLab writes it into the file (and marks the notebook
# modified) when the saved one differs.
KERNELSPEC = {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"}
WIDGET_REPR = re.compile(r"\b(VBox|HBox|interactive)\(children=")
PROGRESS_BAR = re.compile(r"\d+%\|.*\|\s*\d+/\d+|\d+/\d+ \[\d+:\d+<")
NEGATIVE_ZERO = re.compile(r"(?<![\w.])-0\.0+(?![\d.])")


def _outputs(nb):
    for index, cell in enumerate(nb.cells):
        for output in cell.get("outputs", []):
            yield index, output


def _texts(output) -> list[str]:
    texts = [output.get("text", "")] if output.get("output_type") == "stream" else []
    data = output.get("data", {})
    texts += [data.get(mime, "") for mime in ("text/plain", "text/html", "text/markdown")]
    return [t if isinstance(t, str) else "".join(t) for t in texts]


@pytest.mark.parametrize("path", ALL, ids=IDS)
def test_outputs_are_clean(path):
    nb = nbformat.read(path, as_version=4)
    assert nb.metadata.get("kernelspec") == KERNELSPEC, f"{path.name}: kernelspec {nb.metadata.get('kernelspec')}"
    assert set(nb.metadata) <= {"kernelspec", "language_info"}, (
        f"{path.name}: notebook metadata {sorted(set(nb.metadata) - {'kernelspec', 'language_info'})} "
        "(e.g. saved widget state from a live run: delete it)")
    for index, output in _outputs(nb):
        where = f"{path.name} cell {index}"
        assert "application/vnd.jupyter.widget-view+json" not in output.get("data", {}), f"{where}: a live widget"
        assert not (output.get("output_type") == "stream" and output.get("name") == "stderr"), f"{where}: stderr output"
        for text in _texts(output):
            assert not WIDGET_REPR.search(text), f"{where}: a widget repr {WIDGET_REPR.search(text).group(0)}"
            assert not PROGRESS_BAR.search(text), f"{where}: a saved progress bar {PROGRESS_BAR.search(text).group(0)!r}"
            assert not NEGATIVE_ZERO.search(text), f"{where}: '-0.0' printed: {text[:200]!r}"


@pytest.mark.parametrize("path", ALL, ids=IDS)
def test_sources_carry_no_test_markers_or_thread_settings(path):
    nb = nbformat.read(path, as_version=4)
    for index, cell in enumerate(nb.cells):
        assert "NBVAL_" not in cell.source, f"{path.name} cell {index}: use nbval's cell tags, not comments"
        if cell.cell_type == "code":
            assert "set_num_threads" not in cell.source, f"{path.name} cell {index}: thread policy is coursekit's job"


@pytest.mark.parametrize("path", LECTURES, ids=[p.stem for p in LECTURES])
def test_lectures_end_with_what_to_remember_and_the_exercises(path):
    nb = nbformat.read(path, as_version=4)
    markdown = [c.source for c in nb.cells if c.cell_type == "markdown"]
    tail = "\n".join(markdown[-3:])
    assert "## What to remember" in tail, f"{path.name}: no 'What to remember' section at the end"
    sets = [p.name for p in (ROOT / "exercises").iterdir() if p.is_dir()]
    pointers = re.findall(r"exercises/([\w.]+)", tail)
    assert pointers and all(p.split("/")[0].removesuffix(".ipynb") in sets for p in pointers), \
        f"{path.name}: the end must point to an exercise set in exercises/ ({sets}), found {pointers}"
    assert "solutions/" not in tail, f"{path.name}: students belong in exercises/, not solutions/"
    code = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    dpi = re.findall(r"notebook_figures\(\s*dpi=(\d+)|rcParams\[\"figure\.dpi\"\]\s*=\s*(\d+)", code)
    assert dpi and all(int(a or b) >= 100 for a, b in dpi), \
        f"{path.name}: draw figures at >= 100 dpi (coursekit.plotting.notebook_figures), found {dpi}"


@pytest.mark.parametrize("path", LECTURES, ids=[p.stem for p in LECTURES])
def test_lectures_take_a_device_parameter(path):
    """Issue 16: every lecture runs on a GPU when there is one: DEVICE = "auto" in its parameters cell, resolved."""
    nb = nbformat.read(path, as_version=4)
    params = [c.source for c in nb.cells if c.cell_type == "code" and "parameters" in c.metadata.get("tags", [])]
    assert any(re.search(r'^DEVICE = "auto"', s, re.M) for s in params), \
        f'{path.name}: no DEVICE = "auto" in a cell tagged "parameters"'
    code = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    assert "resolve_device(DEVICE)" in code, f"{path.name}: DEVICE is never resolved (ck.resolve_device(DEVICE))"
