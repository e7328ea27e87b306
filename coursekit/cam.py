"""Class activation maps: where in the last feature map is the evidence for a class?

Grad-CAM (Selvaraju et al. 2017) and its variants share one engine, :class:`CAM`: record the
activations ``A`` (N, K, h, w) of one layer and the gradients ``dS/dA`` of the target score in a
single forward + partial backward pass, combine them into an (N, h, w) map, apply ReLU and
upsample bilinearly to the input size. A variant overrides only :meth:`CAM.weights` (one weight
per channel), :meth:`CAM.combine` (the whole map) or, without gradients, :meth:`CAM.raw_maps`:

==========================  ==============================================================
:class:`GradCAM`            ``alpha_k = mean_ij dS/dA_kij``; map = ReLU(sum_k alpha_k A_k)
:class:`GradCAMPlusPlus`    higher-order weights of positive gradients (Chattopadhay 2018)
:class:`HiResCAM`           map = ReLU(sum_k dS/dA_k * A_k), no averaging (Draelos & Carin 2020)
:class:`XGradCAM`           ``alpha_k = sum_ij A_kij / sum_ab A_kab * dS/dA_kij`` (Fu et al. 2020)
:class:`ScoreCAM`           gradient-free: weights from the scores of masked inputs (Wang 2020)
==========================  ==============================================================

:func:`gradcam` is the one-call form, :func:`guided_gradcam` multiplies Grad-CAM with guided
backprop, :func:`candidate_layers` / :func:`default_layer` help choose the layer.

The backward pass stops at the recorded layer: the parameters are frozen during the call and
the input does not require grad, so the layer's output is made a leaf (the technique of
:func:`coursekit.hooks.record`) and autograd never goes below it. Works on frozen models without
making the input require grad. The model is left as it was, even on error.

Devices: every function here computes on the model's device (:func:`coursekit.model_device`).
Images, labels and maps given on another device (a CPU image for a CUDA model) are moved there;
returned tensors live on the model's device, as in captum; numbers, numpy arrays and figures are on
the CPU. Seeded random numbers are drawn on the CPU and moved, so a seed gives the same draws on
every device.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._reference import reference
from .batching import batches
from .gradients import fast_layout, layer_gradient
from .guard import guarded
from .hooks import UnknownLayerError, get_layer, list_layers, record
from .inputs import check_images, check_model, positive_int, target_indices, target_scores
from .maps import rescale_maps
from .models import Normalize
from .progress import progress_bar
from .registry import Registry
from .rules import GUIDED, GuidedRelu

__all__ = [  # + every registered CAM
    "CAM",
    "CAMS",
    "UnknownLayerError",
    "candidate_layers",
    "default_layer",
    "gradcam",
    "guided_gradcam",
    "rescale_maps",
]

# One decorated subclass of CAM per method: in __all__, the README's method table and the tests
# parametrised over CAMS.
CAMS = Registry("CAM", exports=__all__)


# ----------------------------------------------------------------------------------------------
# choosing the layer

_POOLING = (
    nn.MaxPool2d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool2d,
    nn.LPPool2d,
)


def _guess_input_size(model: nn.Module, input_size):
    if input_size is not None:
        return tuple(input_size)
    size = getattr(model, "input_size", None)
    if size is not None:
        return tuple(size)
    first_conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if first_conv is None:
        raise ValueError(
            f"cannot guess the input size of {type(model).__name__} (no input_size attribute and no Conv2d); "
            "pass input_size=(C, H, W)"
        )
    return (first_conv.in_channels, 224, 224)


def candidate_layers(model: nn.Module, input_size: tuple[int, int, int] | None = None) -> list[tuple[str, str, tuple]]:
    """Layers whose output is a spatial feature map (4-d, ``h, w > 1``): the possible CAM layers.

    Parameters
    ----------
    model : nn.Module
    input_size : (C, H, W), optional
        Input size for the probing forward pass; default ``model.input_size``, else
        ``(in_channels of the first Conv2d, 224, 224)``.

    Returns
    -------
    list of (name, type name, output shape)
        In the order of ``model.named_modules()``; the output shape is for one image. Containers
        (e.g. ``net.features``) appear too, with the output of their last child; a CourseModel's
        input normalisation is left out.
    """
    check_model(model)
    size = _guess_input_size(model, input_size)
    modules = dict(model.named_modules())
    return [
        (info.name, info.kind, info.output_shape)
        for info in list_layers(model, size)
        if info.output_shape is not None
        and len(info.output_shape) == 4
        and min(info.output_shape[2:]) > 1
        and not isinstance(modules[info.name], Normalize)  # the input, just rescaled
    ]


def default_layer(model: nn.Module, input_size: tuple[int, int, int] | None = None) -> str:
    """A sensible Grad-CAM layer: ``model.layers["gradcam"]`` when the model names one, otherwise
    the last spatial feature map before the network pools it away.

    The fallback runs one forward pass and picks, in execution order, the last layer with a
    4-d output with ``h, w > 1`` that is not a pooling layer and does not merely pass a pooling
    layer's output on (a ``Sequential`` ending in max-pooling). For torchvision's VGG16 this is
    ``features.29`` (the last ReLU), for AlexNet ``features.11``, for FashionCNN ``features.8``,
    for timm's EfficientNet ``bn2`` (names get the ``net.`` prefix inside a CourseModel).

    Returns
    -------
    str
        A layer name accepted by :func:`coursekit.hooks.get_layer`.
    """
    check_model(model)
    named = getattr(model, "layers", None)
    if isinstance(named, dict) and named.get("gradcam"):
        return named["gradcam"]
    size = _guess_input_size(model, input_size)
    fired: list[tuple[str, torch.Tensor, bool]] = []  # (name, output, is pooling) in execution order
    # hooks by hand, not hooks.record: every module is watched, and modules that return tuples or
    # dicts are skipped here, where record would (rightly) refuse them
    handles = []

    def hook_for(name, module):
        def hook(mod, inputs, output):
            if isinstance(output, torch.Tensor):
                fired.append((name, output, isinstance(module, _POOLING)))

        return hook

    with guarded(model, freeze=False, what="default_layer"):
        try:
            for name, module in model.named_modules():
                if name:
                    handles.append(module.register_forward_hook(hook_for(name, module)))
            p = next(model.parameters(), None)
            with torch.no_grad():
                model(torch.zeros(1, *size, device=p.device if p is not None else "cpu"))
        finally:
            for h in handles:
                h.remove()
    pooled: list[torch.Tensor] = []
    best = None
    for name, out, is_pool in fired:
        if is_pool:
            pooled.append(out)
            continue
        if any(out is q for q in pooled):  # a container that just returns a pooling layer's output
            continue
        if out.dim() == 4 and min(out.shape[2:]) > 1:
            best = name
    if best is None:
        raise ValueError(f"{type(model).__name__} has no layer with a spatial (N, K, h, w) output; Grad-CAM needs one")
    return best


# ----------------------------------------------------------------------------------------------
# the engine


class CAM:
    """Base class of the class-activation-map family (one engine, one small override per method).

    Parameters
    ----------
    model : nn.Module
        Maps ``(N, C, H, W)`` images in [0, 1] to logits.
    layer : str or nn.Module, optional
        The feature map to explain; default :func:`default_layer` (``model.layers["gradcam"]``
        for a CourseModel).

    Calling the object, ``cam(x, target, normalize=False)``, returns ``(N, H, W)`` maps at the
    input resolution. Subclasses override :meth:`weights` ``(A, G) -> (N, K, 1, 1)`` or
    :meth:`combine` ``(A, G) -> (N, h, w)``. A gradient-free CAM sets ``uses_gradients = False``:
    the engine then records the activations in one forward pass without autograd and passes
    ``G = None`` (Score-CAM overrides :meth:`raw_maps` to score masked images; an Eigen-CAM would
    only override :meth:`combine`). The engine holds the model under :func:`coursekit.guard.guarded`
    for the whole call, so no subclass needs hook or guard code of its own.
    """

    uses_gradients: bool = True

    def __init__(self, model: nn.Module, layer: str | nn.Module | None = None):
        check_model(model)
        self.model = model
        self.layer_name, self.layer = get_layer(model, default_layer(model) if layer is None else layer)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(layer={self.layer_name!r})"

    # -- the two overridable steps -------------------------------------------------------------
    def weights(self, activations: torch.Tensor, gradients: torch.Tensor) -> torch.Tensor:
        """One weight per channel, (N, K, h, w) x 2 -> (N, K, 1, 1). Subclasses define it."""
        raise NotImplementedError(f"{type(self).__name__} must override weights() or combine()")

    def combine(self, activations: torch.Tensor, gradients: torch.Tensor) -> torch.Tensor:
        """The map before ReLU, (N, K, h, w) x 2 -> (N, h, w): sum_k weights_k * A_k."""
        return (self.weights(activations, gradients) * activations).sum(dim=1)

    # -- shared machinery ------------------------------------------------------------------------
    @reference
    def layer_maps(self, x: torch.Tensor, target) -> tuple[torch.Tensor, torch.Tensor]:
        """Activations and gradients of the layer, each (N, K, h, w), from one forward + partial backward
        (gradients None, one forward pass without autograd, when ``uses_gradients`` is False)."""
        if self.uses_gradients:
            act, grad = layer_gradient(self.model, x, target, self.layer, what=type(self).__name__)
        else:
            with torch.inference_mode(), record(self.model, [self.layer_name]) as rec:
                self.model(fast_layout(x))
            act, grad = rec.activations[self.layer_name], None
        if act.dim() != 4:
            raise ValueError(
                f"layer {self.layer_name!r} outputs shape {tuple(act.shape)}, not a (N, K, h, w) feature "
                "map; pick a convolutional layer (coursekit.cam.candidate_layers(model) lists them)"
            )
        return act, grad

    def raw_maps(self, x: torch.Tensor, target) -> torch.Tensor:
        """The map before ReLU and upsampling, (N, h, w). Gradient-free variants override this."""
        act, grad = self.layer_maps(x, target)
        return self.combine(act, grad)

    def _finish(self, raw, size, normalize: bool) -> torch.Tensor:
        cam = F.relu(raw)  # (N, h, w)
        cam = F.interpolate(cam[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
        cam = cam.clamp(min=0)  # bilinear weights are convex, but keep exact zeros non-negative
        return rescale_maps(cam) if normalize else cam

    def __call__(self, x: torch.Tensor, target, normalize: bool = False) -> torch.Tensor:
        """Class activation maps ``(N, H, W)`` at the input's resolution, ReLU applied.

        Parameters
        ----------
        x : Tensor (N, C, H, W)
            Images in [0, 1].
        target : int, sequence of int, Tensor (N,), or callable ``output -> (N,)``
            As in :func:`coursekit.models.target_scores`.
        normalize : bool
            Rescale each map to [0, 1] (after upsampling); an all-zero map stays zero.

        Returns
        -------
        Tensor (N, H, W), non-negative, detached.
        """
        x = check_images(x, model=self.model)
        with guarded(self.model, what=type(self).__name__):
            raw = self.raw_maps(x, target)  # (N, h, w)
        return self._finish(raw, x.shape[-2:], normalize)




@CAMS.register
class GradCAM(CAM):
    """Grad-CAM (Selvaraju et al. 2017): ``alpha_k = 1/(hw) sum_ij dS/dA_kij``,
    map = ReLU(sum_k alpha_k A_k), upsampled to the input size."""

    def weights(self, activations, gradients):
        return gradients.mean(dim=(2, 3), keepdim=True)  # (N, K, 1, 1)


@CAMS.register
class GradCAMPlusPlus(CAM):
    """Grad-CAM++ (Chattopadhay, Sarkar, Howlader & Balasubramanian 2018).

    Weights are a pixel-weighted sum of the positive gradients,
    ``w_k = sum_ij a_kij relu(g_kij)`` with ``g = dS/dA`` and
    ``a_kij = g^2 / (2 g^2 + sum_ab A_kab g^3)``, the closed form the paper derives for an
    exponential score. For ``g > 0`` this is ``1 / (2 + g sum_ab A_kab)``, computed in that form so
    that small gradients need no epsilon; positions with ``g <= 0`` contribute nothing.
    (pytorch-grad-cam adds ``1e-6`` to the denominator of the first form, which shrinks the
    weights of channels whose gradients are of order 1e-3 or smaller.)
    """

    def weights(self, activations, gradients):
        sum_a = activations.sum(dim=(2, 3), keepdim=True)  # (N, K, 1, 1)
        positive = gradients > 0
        denom = torch.where(positive, 2 + sum_a * gradients, torch.ones_like(gradients))
        alpha = torch.where(positive, 1 / denom, torch.zeros_like(gradients))  # (N, K, h, w)
        return (alpha * F.relu(gradients)).sum(dim=(2, 3), keepdim=True)  # (N, K, 1, 1)


@CAMS.register
class HiResCAM(CAM):
    """HiResCAM (Draelos & Carin 2020): ``map = ReLU(sum_k dS/dA_k * A_k)``, the element-wise
    product without spatial averaging, so the map shows exactly which positions raised the score.
    For a network whose head is global average pooling + a linear layer right after this layer,
    ``dS/dA_kij = w_k / (hw)`` is constant over positions and HiResCAM equals Grad-CAM; they differ
    for earlier layers and other heads."""

    def combine(self, activations, gradients):
        return (gradients * activations).sum(dim=1)  # (N, h, w)


@CAMS.register
class XGradCAM(CAM):
    """XGrad-CAM (Fu et al. 2020, "Axiom-based Grad-CAM"): gradients weighted by the normalised
    activations, ``alpha_k = sum_ij (A_kij / sum_ab A_kab) dS/dA_kij`` (``1e-7`` added to the
    denominator, as pytorch-grad-cam does, so an all-zero channel gets weight 0)."""

    def weights(self, activations, gradients):
        total = activations.sum(dim=(2, 3), keepdim=True)  # (N, K, 1, 1)
        return (gradients * activations / (total + 1e-7)).sum(dim=(2, 3), keepdim=True)  # (N, K, 1, 1)


@CAMS.register
class ScoreCAM(CAM):
    """Score-CAM (Wang et al. 2020): gradient-free; each channel's weight is the score of the image
    masked by that channel's (upsampled, min-max normalised) activation map.

    ``M_k = norm(up(A_k))``, ``s_k = score(x * M_k)``, ``w = softmax_k(s)``, map = ReLU(sum_k w_k A_k).
    One forward pass per channel, batched (``batch_size`` masked images per pass); the score is the
    target's logit and the weights a softmax over channels, as in pytorch-grad-cam. Upsampling is
    bilinear with aligned corners (``nn.UpsamplingBilinear2d``).

    Parameters
    ----------
    model, layer
        As in :class:`CAM`.
    batch_size : int
        Masked images per forward pass.
    progress : bool
        A progress bar over the batches.
    """

    def __init__(self, model: nn.Module, layer: str | nn.Module | None = None, batch_size: int = 32,
                 progress: bool = False):
        super().__init__(model, layer)
        self.batch_size = positive_int(batch_size, "batch_size")
        self.progress = bool(progress)

    uses_gradients = False

    def raw_maps(self, x, target):
        act, _ = self.layer_maps(x, target)  # (N, K, h, w): one forward pass, no gradients
        n, k = act.shape[:2]
        targets = target_indices(target, n)
        up = F.interpolate(act, size=x.shape[-2:], mode="bilinear", align_corners=True)  # (N, K, H, W)
        lo = up.amin(dim=(2, 3), keepdim=True)
        hi = up.amax(dim=(2, 3), keepdim=True)
        masks = (up - lo) / (hi - lo + 1e-8)  # (N, K, H, W)
        maps = []
        bar = progress_bar(total=n * k, progress=self.progress, desc="Score-CAM", unit="mask", leave=False)
        with torch.inference_mode():
            for i in range(n):
                tgt = targets if callable(targets) else targets[i : i + 1]
                scores = []
                for a, b in batches(k, self.batch_size):
                    m = masks[i, a:b, None]  # (B, 1, H, W)
                    batch = fast_layout(x[i : i + 1] * m)  # (B, C, H, W)
                    t = tgt if callable(tgt) else tgt.expand(batch.shape[0])
                    scores.append(target_scores(self.model(batch), t))
                    bar.update(m.shape[0])
                w = torch.cat(scores).softmax(dim=0)  # (K,)
                maps.append((w[:, None, None] * act[i]).sum(dim=0))  # (h, w)
        bar.close()
        return torch.stack(maps)


def _gradcam(model, x, target, layer=None, normalize=False):
    return GradCAM(model, layer)(x, target, normalize=normalize)


@reference
def gradcam(model: nn.Module, x: torch.Tensor, target, layer: str | nn.Module | None = None, normalize: bool = False) -> torch.Tensor:
    """Grad-CAM maps in one call: ``GradCAM(model, layer)(x, target, normalize)``.

    Returns
    -------
    Tensor (N, H, W), non-negative, at the input resolution, detached.
    """
    return _gradcam(model, x, target, layer, normalize)


def guided_gradcam(model: nn.Module, x: torch.Tensor, target, layer: str | nn.Module | None = None) -> torch.Tensor:
    """Guided Grad-CAM (Selvaraju et al. 2017): guided backprop times the upsampled Grad-CAM map.

    High-resolution (pixel-level) detail from guided backpropagation, restricted to the
    class-discriminative regions Grad-CAM finds. One forward pass serves both: a plain backward
    from the score to the layer (Grad-CAM), then a backward to the input with the guided rule of the
    rules engine switched on (see :func:`coursekit.saliency.guided_backprop` for the rule and its
    requirement of ``nn.ReLU`` / ``nn.ReLU6`` modules).

    Returns
    -------
    Tensor (N, C, H, W), detached.
    """
    engine = GradCAM(model, layer)
    x = check_images(x, model=model).detach()
    # One forward pass serves both maps: the guided rule is attached but switched on only for the
    # second backward pass (the first, from the score to the layer, must be the plain gradient).
    rule = _SwitchedGuidedRelu()
    composite = GUIDED.with_rules({(nn.ReLU, nn.ReLU6): rule}, name="guided backprop")
    with guarded(model, inplace_off=True, what="guided_gradcam"), composite.applied(model), \
            record(model, [engine.layer_name]) as rec:
        with torch.enable_grad():
            xi = fast_layout(x).requires_grad_(True)
            scores = target_scores(model(xi), target)  # (N,)
        act = rec.outputs.get(engine.layer_name)  # attached to the graph
        if not isinstance(act, torch.Tensor) or act.dim() != 4:
            raise ValueError(
                f"layer {engine.layer_name!r} gave no (N, K, h, w) feature map in the forward pass; choose one of "
                "coursekit.cam.candidate_layers(model)"
            )
        (grad,) = torch.autograd.grad(scores.sum(), act, retain_graph=True)  # (N, K, h, w)
        rule.on = True
        (guided,) = torch.autograd.grad(scores.sum(), xi)  # (N, C, H, W)
    cam = engine._finish(engine.combine(act.detach(), grad), x.shape[-2:], normalize=False)
    return guided.contiguous() * cam[:, None]


class _SwitchedGuidedRelu(GuidedRelu):
    """The guided rule, inactive until ``on`` is set (guided Grad-CAM's shared forward pass)."""

    def __init__(self):
        self.on = False

    def transform(self, grad_out):
        return grad_out.clamp(min=0) if self.on else grad_out
