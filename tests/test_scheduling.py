"""tests/scheduling.py: the longest modules are handed out first, a module's items keep their order."""

from __future__ import annotations

from types import SimpleNamespace

import scheduling


def _items(*nodeids):
    return [SimpleNamespace(nodeid=n) for n in nodeids]


def test_longest_modules_first_and_items_in_their_order():
    items = _items("tests/test_new.py::a", "notebooks/04_lrp.ipynb::Cell 0", "tests/test_new.py::b",
                   "notebooks/05_adversarial.ipynb::Cell 0", "notebooks/04_lrp.ipynb::Cell 1",
                   "notebooks/05_adversarial.ipynb::Cell 1")
    scheduling.pytest_collection_modifyitems(None, items)
    assert [i.nodeid for i in items] == [
        "notebooks/05_adversarial.ipynb::Cell 0", "notebooks/05_adversarial.ipynb::Cell 1",
        "notebooks/04_lrp.ipynb::Cell 0", "notebooks/04_lrp.ipynb::Cell 1",
        "tests/test_new.py::a", "tests/test_new.py::b"]


def test_a_module_without_a_measured_cost_counts_its_tests():
    many = [f"tests/test_many.py::t{i}" for i in range(400)]  # 400 x 0.05 s = 20 s: before a 17 s module
    items = _items("tests/test_adversarial_checks.py::x", *many)
    scheduling.pytest_collection_modifyitems(None, items)
    assert items[0].nodeid == "tests/test_many.py::t0" and items[-1].nodeid == "tests/test_adversarial_checks.py::x"


def test_the_suite_runs_in_this_order():
    """The Makefile asks xdist to keep the collected order (else it sorts modules by their number of tests)."""
    from pathlib import Path

    makefile = (Path(__file__).resolve().parents[1] / "Makefile").read_text()
    runs = [line for line in makefile.splitlines() if "-m pytest -n" in line]
    assert len(runs) == 2 and all("--no-loadscope-reorder" in line for line in runs), runs
