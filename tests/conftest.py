"""Shared fixtures: models are loaded once per test session (they are frozen, so sharing is safe)."""

import functools
import os
from pathlib import Path

os.environ.setdefault("MPLBACKEND", "Agg")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs one worker per core: each worker, and every notebook kernel it starts (kernels
    # inherit this environment), keeps to one torch thread, so workers never fight over cores.
    # Set before torch is imported: OMP_WAIT_POLICY has no effect afterwards.
    os.environ.setdefault("COURSEKIT_THREADS", "1")
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import matplotlib  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

matplotlib.use("Agg")


@pytest.fixture(scope="session")
def effnet():
    import coursekit

    return coursekit.load_model("efficientnet_lite0")


@pytest.fixture(scope="session")
def fashion():
    import coursekit

    return coursekit.load_model("fashion_cnn")


@pytest.fixture(scope="session")
def fashion_test():
    import coursekit

    return coursekit.fashion_mnist("test")


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    import matplotlib.pyplot as plt

    plt.close("all")


@pytest.fixture
def model_state():
    """``model_state(model)`` -> a snapshot that compares with ``==`` (modes, flags, grads, hooks, modules).

    For tests that compare with ``==``; new tests use ``coursekit.guard.model_state(model)`` and
    ``before.differences(after)``, which also compares parameter and buffer values and says what changed.
    """
    from coursekit.guard import model_state as snapshot

    return functools.partial(snapshot, values=False)


@pytest.fixture(scope="session")
def fashion_arch():
    """FashionCNN's architecture with seeded random weights (no data needed)."""
    from coursekit.nets import FashionCNN

    torch.manual_seed(0)
    return FashionCNN().eval().requires_grad_(False)


@pytest.fixture(scope="session")
def vgg16():
    """torchvision's VGG16 with random weights: the architecture, with no download."""
    import torchvision

    torch.manual_seed(0)
    return torchvision.models.vgg16(weights=None).eval().requires_grad_(False)


@pytest.fixture(scope="session")
def alexnet():
    import torchvision

    torch.manual_seed(0)
    return torchvision.models.alexnet(weights=None).eval().requires_grad_(False)


@pytest.fixture
def one_thread():
    """Run a test on one torch thread (its inputs are small; see the test modules that use it)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- notebooks under nbval ------------------------------------------------------------------------
# Lecture notebooks are committed as a headless run prints them (COURSEKIT_STATIC=1: no progress bars,
# explorers as pictures; the kernel's own inline matplotlib backend, not the Agg set above for the
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
