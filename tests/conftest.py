"""Shared fixtures: models are loaded once per test session (they are frozen, so sharing is safe)."""

import functools
import os

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
