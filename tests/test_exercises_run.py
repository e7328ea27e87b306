"""Every released exercise notebook runs: each check cell fails cleanly (CheckFailed), nothing else errors."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
EXERCISES = ROOT / "exercises"
NOTEBOOKS = sorted(p for p in EXERCISES.glob("*/*.ipynb") if p.stem == p.parent.name)
CELL_TIMEOUT = 300  # seconds per cell


def _is_check(cell) -> bool:
    meta = cell.metadata.get("nbgrader", {})
    return cell.cell_type == "code" and bool(meta.get("grade")) and not meta.get("solution")


def test_there_are_exercise_notebooks():
    assert any(p.stem == "00_warmup" for p in NOTEBOOKS), "exercises/00_warmup is missing: run `make release`"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_stub_notebook_fails_its_checks_cleanly(path):
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(
        nb,
        kernel_name="python3",
        timeout=CELL_TIMEOUT,
        allow_errors=True,  # look at every cell, then report
        record_timing=False,
        resources={"metadata": {"path": str(path.parent)}},
    )
    client.execute()
    checks = 0
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        errors = [o for o in cell.outputs if o.output_type == "error"]
        stderr = "".join(o.text for o in cell.outputs if o.output_type == "stream" and o.name == "stderr")
        where = f"{path.name}, cell {i} ({cell.metadata.get('nbgrader', {}).get('grade_id', cell.source[:60])!r})"
        if _is_check(cell):
            checks += 1
            assert "raises-exception" in cell.metadata.get("tags", []), f"{where}: check cell not tagged raises-exception"
            assert [e.ename for e in errors] == ["CheckFailed"], (
                f"{where}: a stub must fail its check with CheckFailed, got "
                f"{[(e.ename, e.evalue) for e in errors] or 'no error'}"
            )
            assert not stderr, f"{where}: check cells must not write to stderr (nbgrader would zero them): {stderr!r}"
        else:
            assert not errors, f"{where} raised {errors[0].ename}: {errors[0].evalue}"
    assert checks > 0, f"{path.name} has no check cells"
