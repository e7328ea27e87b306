"""coursekit: the helper library of the course "How CNNs see the world".

The lecture notebooks call it; the exercise checks compare students' code with it.
"""

# threads first: it may set OMP_WAIT_POLICY before torch loads (see threads.py)
from . import threads as _threads
from .allocator import keep_freed_memory as _keep_freed_memory
from .data import FASHION_CLASSES, fashion_mnist
from .devices import model_device, resolve_device
from .hooks import UnknownLayerError, get_layer, list_layers, preserved, record
from .images import SAMPLE_IMAGES, load_image, sample_image, to_numpy_image, to_pil
from .models import (
    MODEL_NAMES,
    CourseModel,
    WeightsNotAvailableError,
    fetch_weights,
    imagenet_classes,
    load_model,
    predict,
    target_scores,
)
from .plotting import overlay, show_images, show_overlays

__version__ = "0.1.0"

_threads.apply()  # torch's thread count for a shared machine; COURSEKIT_THREADS overrides it
_keep_freed_memory()  # freed tensors reused, not handed back to the kernel each step; COURSEKIT_MALLOC=system opts out

__all__ = [
    "FASHION_CLASSES",
    "fashion_mnist",
    "resolve_device",
    "model_device",
    "UnknownLayerError",
    "get_layer",
    "list_layers",
    "preserved",
    "record",
    "SAMPLE_IMAGES",
    "load_image",
    "sample_image",
    "to_numpy_image",
    "to_pil",
    "MODEL_NAMES",
    "CourseModel",
    "WeightsNotAvailableError",
    "fetch_weights",
    "imagenet_classes",
    "load_model",
    "predict",
    "target_scores",
    "overlay",
    "show_images",
    "show_overlays",
]

# Modules load on first use (`ck.saliency.vanilla_saliency(...)`), so `import coursekit` stays quick and
# does not pull in scikit-learn or scipy until a lecture needs them. Grouped by floor (README, "Where a
# new method goes"; the floors are checked by tests/test_layering.py).
_LECTURE_MODULES = (
    "filters", "receptive_fields", "maximize", "gallery", "representations", "saliency", "cam", "sanity",
    "faithfulness", "fit", "lrp", "clever_hans", "adversarial", "robustness", "dream", "style",
)
_EXERCISE_MODULES = ("checks",)
_PLUMBING_MODULES = (
    "guard", "devices", "inputs", "batching", "gradients", "rules", "optimize", "objectives", "image_params",
    "geometry", "maps", "registry", "attack_steps", "watermark", "progress", "widgets", "train", "offline_html",
)
_LAZY_MODULES = _LECTURE_MODULES + _EXERCISE_MODULES + _PLUMBING_MODULES


def __getattr__(name):
    if name in _LAZY_MODULES:
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module 'coursekit' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_LAZY_MODULES))
