"""nbval for this course, loaded for every pytest run (pyproject: ``-p nbplugin``, ``pythonpath = tests``).

A plugin rather than tests/conftest.py: a conftest's per-item hooks (``pytest_runtest_setup``) only
reach items below its folder, and the notebooks live in notebooks/ and solutions/.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# --- notebooks under nbval ------------------------------------------------------------------------
# Lecture notebooks are committed as a headless run prints them (COURSEKIT_STATIC=1: no progress bars,
# explorers as pictures; the kernel's own inline matplotlib backend, not the Agg tests/conftest.py sets for the
# tests); nbval's kernels get the same environment, set only while a notebook's kernel starts so that
# other tests (widgets, the browser test) keep the live defaults.
# DEVICE = "auto" in a lecture resolves to the CPU here (COURSEKIT_DEVICE): its committed outputs are CPU outputs.
NOTEBOOK_ENV = {"COURSEKIT_STATIC": "1", "TQDM_DISABLE": "1", "MPLBACKEND": None, "COURSEKIT_DEVICE": "cpu"}
LECTURES = Path(__file__).resolve().parents[1] / "notebooks"
IGNORE_TAGS = {"nbval-ignore-output", "nbval-skip", "raises-exception"}


def _is_nbval_cell(item) -> bool:
    return type(item).__name__ == "IPyNbCell"


def pytest_collection_modifyitems(config, items):
    """Lectures: every cell's printed output is compared with the committed one, not only tagged cells.

    A lecture's prose quotes the numbers its cells print; `make test` re-executes each lecture and
    fails when a fresh run prints something else. Cells whose output is volatile by nature (a timing)
    carry nbval's ``nbval-ignore-output`` tag; pictures and widget views are never compared.
    """
    from nbcompare import tolerance

    for item in items:
        if not _is_nbval_cell(item):
            continue
        if Path(str(item.fspath)).parent == LECTURES and not IGNORE_TAGS & set(item.cell.metadata.get("tags", [])):
            item.options["check"] = True
        tol = tolerance(item.cell.metadata)
        if tol is not None:  # numbers that float rounding moves: compared within the cell's declared tolerance
            item.compare_outputs = _tolerant(item.compare_outputs, tol)


def _tolerant(compare, tol):
    from nbcompare import reconcile_outputs

    def compare_within_tolerance(test, ref, skip_compare=None):
        return compare(*reconcile_outputs(test, ref, tol), skip_compare)

    return compare_within_tolerance


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_setup(item):
    if not _is_nbval_cell(item):
        yield
        return
    saved = {k: os.environ.get(k) for k in NOTEBOOK_ENV}
    for k, v in NOTEBOOK_ENV.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    try:
        yield  # the notebook's kernel starts here, with its first cell
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def pytest_configure(config):
    """nbval executes cells with ``store_history=False``; IPython then judges a trailing ``;`` against the
    previous history entry, so ``fig = show(...);`` prints its value and every figure appears twice.
    Execute with history, as Jupyter and nbconvert do, so that the outputs compared are the ones committed."""
    from nbval.kernel import RunningKernel

    def execute_cell_input(self, cell_input, allow_stdin=None):
        return self.kc.execute(cell_input, store_history=True, allow_stdin=allow_stdin, stop_on_error=False)

    RunningKernel.execute_cell_input = execute_cell_input
