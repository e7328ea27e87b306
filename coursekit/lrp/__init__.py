"""Layer-wise relevance propagation (lecture 4), built on the shared rules engine.

* :mod:`.rules` — the LRP rules, each a parameter setting of one generic backward rule;
* :mod:`.composites` — which rule for which layer (zennit's composites and Montavon et al. 2019);
* :mod:`.canonizers` — batch-norm merging and explicit residual sums (timm EfficientNet; torchvision
  ResNet, VGG-BN, MobileNetV2), and the refusal of what no canonizer covers;
* :mod:`.analysis` — :func:`lrp`, conservation layer by layer, plots.

::

    import coursekit as ck
    from coursekit import lrp
    model = ck.load_model("efficientnet_lite0")
    R = lrp.lrp(model, x, target=967, composite="EpsilonGammaBox")   # (N, 3, 224, 224), sums to the logit

Devices: every function here computes on the model's device (:func:`coursekit.model_device`).
Images, labels and maps given on another device (a CPU image for a CUDA model) are moved there;
returned tensors live on the model's device, as in captum; numbers, numpy arrays and figures are on
the CPU. Seeded random numbers are drawn on the CPU and moved, so a seed gives the same draws on
every device.
"""

from .analysis import (
    Conservation,
    ConservationWarning,
    UncanonizedWarning,
    check_explainable,
    conservation,
    default_canonizers,
    lrp,
    plot_conservation,
    plot_relevance,
    relevance_limit,
)
from .canonizers import (
    RESIDUAL_BLOCKS,
    EfficientNetCanonizer,
    MergeBatchNorm,
    MobileNetV2Canonizer,
    Residual,
    ResNetCanonizer,
    Sum,
    VGGCanonizer,
    merge_batchnorm,
    unexplained,
)
from .composites import BASE_RULES, COMPOSITES, LRPComposite, make_composite
from .rules import RULES, WINNER_TAKE_ALL, Group, LRPRule, Term, stabilize

# Every registered LRP rule (``@RULES.register``) and composite (``@COMPOSITES.register``) under its
# Python name, so that a new one is declared in one place and still reads ``coursekit.lrp.Gamma``.
_REGISTERED = {method.__name__: method for registry in (RULES, COMPOSITES) for _, method in registry.items()}
globals().update(_REGISTERED)

__all__ = [
    "lrp", "conservation", "Conservation", "plot_conservation", "plot_relevance", "relevance_limit", "default_canonizers",
    "ConservationWarning", "UncanonizedWarning", "check_explainable",
    "EfficientNetCanonizer", "ResNetCanonizer", "VGGCanonizer", "MobileNetV2Canonizer", "MergeBatchNorm", "Residual",
    "Sum", "merge_batchnorm", "unexplained", "RESIDUAL_BLOCKS",
    "BASE_RULES", "COMPOSITES", "RULES", "LRPComposite", "make_composite",
    "LRPRule", "Term", "Group", "WINNER_TAKE_ALL", "stabilize",
    *_REGISTERED,
]
