"""Class activation maps: where in the last feature map is the evidence for a class?

Grad-CAM (Selvaraju et al. 2017) and its variants share one engine, :class:`CAM`: record the
activations ``A`` (N, K, h, w) of one layer and the gradients ``dS/dA`` of the target score in a
single forward + partial backward pass, combine them into an (N, h, w) map, apply ReLU and
upsample bilinearly to the input size. A variant overrides only :meth:`CAM.weights` (one weight
per channel) or :meth:`CAM.combine` (the whole map):

==========================  ==============================================================
:class:`GradCAM`            ``alpha_k = mean_ij dS/dA_kij``; map = ReLU(sum_k alpha_k A_k)
:class:`GradCAMPlusPlus`    higher-order weights of positive gradients (Chattopadhay 2018)
:class:`HiResCAM`           map = ReLU(sum_k dS/dA_k * A_k), no averaging (Draelos & Carin 2020)
==========================  ==============================================================

:func:`gradcam` is the one-call form, :func:`guided_gradcam` multiplies Grad-CAM with guided
backprop, :func:`candidate_layers` / :func:`default_layer` help choose the layer.

The backward pass stops at the recorded layer: the parameters are frozen during the call and
the input does not require grad, so the layer's output is made a leaf (the technique of
:func:`coursekit.hooks.record`) and autograd never goes below it. Works on frozen models without
making the input require grad. The model is left as it was, even on error.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .checks import reference
from .hooks import UnknownLayerError, get_layer, list_layers, preserved
from .models import Normalize, target_scores
from .saliency import _check_model, _check_x, _fast_layout, _frozen, _rectifiers

__all__ = [
    "CAM",
    "GradCAM",
    "GradCAMPlusPlus",
    "HiResCAM",
    "UnknownLayerError",
    "candidate_layers",
    "default_layer",
    "gradcam",
    "guided_gradcam",
    "normalize_maps",
]


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
    _check_model(model)
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
    _check_model(model)
    named = getattr(model, "layers", None)
    if isinstance(named, dict) and named.get("gradcam"):
        return named["gradcam"]
    size = _guess_input_size(model, input_size)
    fired: list[tuple[str, torch.Tensor, bool]] = []  # (name, output, is pooling) in execution order
    handles = []

    def hook_for(name, module):
        def hook(mod, inputs, output):
            if isinstance(output, torch.Tensor):
                fired.append((name, output, isinstance(module, _POOLING)))

        return hook

    with preserved(model):
        try:
            for name, module in model.named_modules():
                if name:
                    handles.append(module.register_forward_hook(hook_for(name, module)))
            model.eval()
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
    :meth:`combine` ``(A, G) -> (N, h, w)``.
    """

    def __init__(self, model: nn.Module, layer: str | nn.Module | None = None):
        _check_model(model)
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
    def layer_maps(self, x: torch.Tensor, target) -> tuple[torch.Tensor, torch.Tensor]:
        """Activations and gradients of the layer, each (N, K, h, w), from one forward + partial backward."""
        act, grad, _ = self._run(x, target, guided=False)
        return act, grad

    def _run(self, x: torch.Tensor, target, guided: bool):
        """One forward pass; the layer's activations and dS/dA; with ``guided``, also the guided-backprop
        input gradient from a second backward pass through the same graph."""
        x = _check_x(x).detach()
        tapped: dict[str, torch.Tensor] = {}
        rectify = {"on": False}  # guided rule switched on only for the second backward pass

        def tap(module, inputs, output):
            if not isinstance(output, torch.Tensor):
                raise TypeError(
                    f"layer {self.layer_name!r} returns {type(output).__name__}, not a tensor; choose one of "
                    "coursekit.cam.candidate_layers(model)"
                )
            if not output.requires_grad:
                # nothing upstream needs gradients (frozen parameters, x without grad): the output
                # becomes a leaf and the backward pass stops here (the trick of hooks.record)
                output = output.detach().requires_grad_(True)
                tapped["A"] = output
                return output
            tapped["A"] = output
            return None

        def positive_part(grad):
            return grad.clamp(min=0) if rectify["on"] else None

        def guided_hook(module, inputs, output):  # see coursekit.saliency._guided_hook
            if output.requires_grad:
                output.register_hook(positive_part)

        rectifiers = _rectifiers(self.model) if guided else []
        # Same technique as coursekit.hooks.record, with saliency._frozen's narrow guard instead of
        # hooks.preserved (which rewrites every module's flags: ~3 ms per call on EfficientNet).
        with _frozen(self.model, inplace_off=True):
            handles = [self.layer.register_forward_hook(tap)]
            try:
                handles += [m.register_forward_hook(guided_hook) for m in rectifiers]
                with torch.enable_grad():
                    xi = _fast_layout(x)  # a fresh detached tensor (see saliency._fast_layout)
                    xi = xi.requires_grad_(True) if guided else xi
                    scores = target_scores(self.model(xi), target)  # (N,)
                    if "A" not in tapped:
                        raise RuntimeError(
                            f"layer {self.layer_name!r} was not used in the forward pass; choose another "
                            "(coursekit.cam.candidate_layers(model) lists the spatial ones)"
                        )
                    act = tapped["A"]
                    if act.dim() != 4:
                        raise ValueError(
                            f"layer {self.layer_name!r} outputs shape {tuple(act.shape)}, not a (N, K, h, w) feature "
                            "map; pick a convolutional layer (coursekit.cam.candidate_layers(model) lists them)"
                        )
                    if not scores.requires_grad:
                        raise ValueError(f"the target score does not depend on layer {self.layer_name!r}")
                    # images are independent: the gradient of the sum is the per-image gradient
                    (grad,) = torch.autograd.grad(scores.sum(), act, retain_graph=guided)
                    input_grad = None
                    if guided:
                        rectify["on"] = True
                        (input_grad,) = torch.autograd.grad(scores.sum(), xi)
            finally:
                for h in handles:
                    h.remove()
        return act.detach(), grad.detach(), None if input_grad is None else input_grad.detach().contiguous()

    def _finish(self, act, grad, size, normalize: bool) -> torch.Tensor:
        cam = F.relu(self.combine(act, grad))  # (N, h, w)
        cam = F.interpolate(cam[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
        cam = cam.clamp(min=0)  # bilinear weights are convex, but keep exact zeros non-negative
        return normalize_maps(cam) if normalize else cam

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
        x = _check_x(x)
        act, grad = self.layer_maps(x, target)
        return self._finish(act, grad, x.shape[-2:], normalize)


def normalize_maps(maps: torch.Tensor) -> torch.Tensor:
    """Min-max rescale every map of (N, H, W) to [0, 1]; a constant map becomes zeros (never NaN)."""
    lo = maps.amin(dim=(1, 2), keepdim=True)
    span = maps.amax(dim=(1, 2), keepdim=True) - lo
    return torch.where(span > 0, (maps - lo) / span.clamp(min=torch.finfo(maps.dtype).tiny), torch.zeros_like(maps))


class GradCAM(CAM):
    """Grad-CAM (Selvaraju et al. 2017): ``alpha_k = 1/(hw) sum_ij dS/dA_kij``,
    map = ReLU(sum_k alpha_k A_k), upsampled to the input size."""

    def weights(self, activations, gradients):
        return gradients.mean(dim=(2, 3), keepdim=True)  # (N, K, 1, 1)


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


class HiResCAM(CAM):
    """HiResCAM (Draelos & Carin 2020): ``map = ReLU(sum_k dS/dA_k * A_k)``, the element-wise
    product without spatial averaging, so the map shows exactly which positions raised the score
    For a network whose head is global average pooling + a linear layer right after this layer,
    ``dS/dA_kij = w_k / (hw)`` is constant over positions and HiResCAM equals Grad-CAM; they differ
    for earlier layers and other heads."""

    def combine(self, activations, gradients):
        return (gradients * activations).sum(dim=1)  # (N, h, w)


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
    from the score to the layer (Grad-CAM), then a backward to the input with the guided ReLU
    rule switched on (see :func:`coursekit.saliency.guided_backprop` for the rule and its
    requirement of ``nn.ReLU`` / ``nn.ReLU6`` modules).

    Returns
    -------
    Tensor (N, C, H, W), detached.
    """
    engine = GradCAM(model, layer)
    x = _check_x(x)
    act, grad, guided = engine._run(x, target, guided=True)
    return guided * engine._finish(act, grad, x.shape[-2:], normalize=False)[:, None]
