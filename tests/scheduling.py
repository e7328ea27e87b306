"""The order pytest-xdist hands out the suite's modules: longest first (loaded for every run, pyproject ``-p``).

`make test` and `make test-quick` run ``--dist loadscope --no-loadscope-reorder``: each module (a notebook, a test
file) goes whole to one worker, in the order the items are collected. Left to itself xdist orders modules by their
number of tests, which puts a notebook of 40 cells after a file of 300 one-line tests and can leave one worker running
the last lecture alone while the others wait. Handing out the longest modules first (longest processing time first)
keeps every worker busy until the end: the last module to start is a short one.

``COST`` is what each module took, in seconds of a worker's time, in `make test` and `make test-quick` on this
project's 2-core machine (2026-12-07; 3 and 2 workers). Only the order matters: a module missing here (a new test
file) counts 0.05 s per test, and a stale figure costs some balance, never a result.
"""

from __future__ import annotations

COST = {
    "notebooks/05_adversarial.ipynb": 310, "notebooks/06_deepdream_and_style.ipynb": 300,
    "notebooks/03_saliency_and_gradcam.ipynb": 260, "notebooks/00b_train_and_transfer.ipynb": 220,
    "notebooks/01_filters.ipynb": 190, "notebooks/04_lrp.ipynb": 150, "notebooks/02_maximal_response.ipynb": 120,
    "tests/test_grading_sets.py": 117, "tests/test_crosscheck_adversarial.py": 113, "tests/test_crosscheck_lrp.py": 100,
    "tests/test_exercises_run.py": 96, "tests/test_repeat_checks.py": 83, "tests/test_grading_e2e.py": 83,
    "tests/test_train.py": 78, "tests/test_grading_isolation.py": 73, "tests/test_training_checks.py": 71,
    "tests/test_browser.py": 70, "tests/test_grading_judge.py": 54, "tests/test_models.py": 39,
    "tests/test_allocator.py": 37, "notebooks/00_welcome.ipynb": 35, "tests/test_threads.py": 30,
    "tests/test_maximize.py": 28, "tests/test_device.py": 26, "tests/test_lrp_torchvision.py": 25,
    "tests/test_adversarial.py": 22, "tests/test_lrp_checks.py": 21, "tests/test_filters.py": 21,
    "solutions/02_maximal_response/02_maximal_response.ipynb": 19, "tests/test_saliency_checks.py": 18,
    "tests/test_filters_checks.py": 18, "tests/test_adversarial_checks.py": 17,
}


def _module(item) -> str:
    return item.nodeid.split("::", 1)[0]


def _cost(module: str, count: int) -> float:
    return COST.get(module, 0.05 * count)


def pytest_collection_modifyitems(config, items):
    """Longest modules first; a module's own items keep their order (fixtures, notebooks' cells)."""
    counts: dict[str, int] = {}
    for item in items:
        counts[_module(item)] = counts.get(_module(item), 0) + 1
    rank = {m: i for i, m in enumerate(sorted(counts, key=lambda m: (-_cost(m, counts[m]), m)))}
    items.sort(key=lambda item: rank[_module(item)])  # stable: the order inside a module is kept
