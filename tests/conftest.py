"""Shared fixtures: models are loaded once per test session (they are frozen, so sharing is safe)."""

import os

os.environ.setdefault("MPLBACKEND", "Agg")

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


def state_of(model: torch.nn.Module) -> dict:
    """Everything a coursekit function promises to leave unchanged on a model."""
    return {
        "training": [m.training for m in model.modules()],
        "requires_grad": [p.requires_grad for p in model.parameters()],
        "grads": [p.grad is None for p in model.parameters()],
        "inplace": [getattr(m, "inplace", None) for m in model.modules()],
        "hooks": [
            (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks), len(getattr(m, "_backward_pre_hooks", {})))
            for m in model.modules()
        ],
    }


@pytest.fixture
def model_state():
    """``model_state(model)`` -> a snapshot to compare before/after a call."""
    return state_of


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
