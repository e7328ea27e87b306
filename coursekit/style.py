"""Style transfer and texture synthesis with Gram matrices (lecture 6).

Gatys, Ecker & Bethge (2015), "Texture synthesis using convolutional neural networks", and (2016)
"Image style transfer using convolutional neural networks". A texture is described by the
correlations between a layer's channels, the **Gram matrix** ``G = F F^T`` of its features ``F``
(C x positions): where things are is averaged away, which things occur together stays. Texture
synthesis makes a noise picture's Gram matrices equal a texture's; style transfer does the same
while keeping a photo's features (its *content*) at a deeper layer.

The pieces, all functions of tensors (numbers you can check) and objectives that compose with the
lecture-2 engine (:class:`coursekit.maximize.Objective`, ``+ - *``):

=====================  =========================================================================
piece                  what
=====================  =========================================================================
:func:`gram_matrix`    ``F F^T / norm`` per image; ``normalize`` = ``"positions"`` (/ HW),
                       ``"elements"`` (/ CHW, Johnson et al. 2016) or ``"none"``
:func:`style_loss`     sum over layers of ``weight * mean((G - G_style)^2)``
:func:`content_loss`   ``mean((F - F_content)^2)`` at one layer
:func:`tv_loss`        total variation: mean ``|dx|^p`` + mean ``|dy|^p`` over neighbouring pixels
:func:`style`,         the same three as *penalties* (objectives whose value is the loss):
:func:`content`,       ``objective = -(content(...) + 100 * style(...) + 10 * smoothness())``
:func:`smoothness`
:func:`stylize`        Gatys style transfer with L-BFGS or Adam (:mod:`coursekit.optimize`)
:func:`synthesize`     texture synthesis (no content term), same engine
:class:`RandomTextureNet`  a one-layer network with random multi-scale filters
                       (Ustyuzhaninov, Brendel, Gatys & Bethge 2016): textures without training
=====================  =========================================================================

Only the layers the losses need are computed (:func:`coursekit.hooks.layer_outputs` stops the
forward pass after the deepest one), so style transfer on EfficientNet-Lite0's first four blocks
costs a fraction of a full forward pass.

References
----------
Gatys, Ecker & Bethge (2015), Texture synthesis using convolutional neural networks. NeurIPS.
Gatys, Ecker & Bethge (2016), Image style transfer using convolutional neural networks. CVPR.
Johnson, Alahi & Fei-Fei (2016), Perceptual losses for real-time style transfer and super-resolution.
Ustyuzhaninov, Brendel, Gatys & Bethge (2016/2017), What does it take to generate natural textures? ICLR 2017.

Devices: every function here computes on the model's device (:func:`coursekit.model_device`).
Images, labels and maps given on another device (a CPU image for a CUDA model) are moved there;
returned tensors live on the model's device, as in captum; numbers, numpy arrays and figures are on
the CPU. Seeded random numbers are drawn on the CPU and moved, so a seed gives the same draws on
every device.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import nn

from ._reference import reference
from .devices import cpu_generator
from .guard import guarded
from .hooks import check_layer_name, layer_outputs
from .image_params import jitter
from .inputs import check_images, check_model, non_negative_int, positive_int
from .objectives import Context, Objective
from .optimize import LBFGS, Adam, ascend
from .progress import finish, progress_bar

__all__ = [
    "DEFAULT_LAYERS",
    "NORMALIZATIONS",
    "RandomTextureNet",
    "StyleResult",
    "brush_strokes",
    "content",
    "content_loss",
    "default_layers",
    "gram_matrix",
    "gram_errors",
    "smoothness",
    "style",
    "style_loss",
    "stylize",
    "synthesize",
    "tv_loss",
]

NORMALIZATIONS = ("positions", "elements", "none")

# style layers (shallow to deep) and the content layer of each model
DEFAULT_LAYERS = {
    # EfficientNet-Lite0: the ReLU6 outputs after the stem and after the first depthwise convolution of
    # blocks 1-3 (strides 2, 4, 8, 16; 32, 96, 144, 240 channels). The blocks' own outputs are linear
    # projections (signed, no ReLU); with them L-BFGS matched the Gram matrices much less well
    # (relative errors 0.2-0.5 after 250 evaluations against 0.02-0.14).
    "efficientnet_lite0": {
        "style": ("net.bn1", "net.blocks.1.0.bn2", "net.blocks.2.0.bn2", "net.blocks.3.0.bn2"),
        "content": "net.blocks.2",
    },
    # Gatys et al.: conv1_1 ... conv5_1 (after their ReLUs) for style, conv4_2 for content
    "vgg19": {"style": ("net.features.1", "net.features.6", "net.features.11", "net.features.20", "net.features.29"),
              "content": "net.features.22"},
    "vgg16": {"style": ("net.features.1", "net.features.6", "net.features.11", "net.features.18", "net.features.25"),
              "content": "net.features.20"},
    "random_texture_net": {"style": ("relu",), "content": "relu"},
}


def default_layers(model: nn.Module) -> dict:
    """``{"style": (...), "content": "..."}`` for a course model (by its ``name``); a clear error otherwise."""
    name = getattr(model, "name", None)
    if name not in DEFAULT_LAYERS:
        raise ValueError(f"no default style/content layers for model {name!r} (known: {sorted(DEFAULT_LAYERS)}); "
                         "pass style_layers=[...] and content_layer='...' (see coursekit.list_layers(model))")
    return DEFAULT_LAYERS[name]


# ==============================================================================================
# the losses, on tensors


def _check_features(f, what="features") -> torch.Tensor:
    if not isinstance(f, torch.Tensor) or f.dim() != 4:
        raise ValueError(f"{what} must be a (N, C, H, W) tensor, got {getattr(f, 'shape', type(f).__name__)!r}")
    return f


class _OuterProducts(torch.autograd.Function):
    """``F F^T`` per image with a one-product backward: ``dL/dF = (dL/dG + dL/dG^T) F``.

    Autograd's backward of ``bmm(F, F^T)`` computes the gradient of each factor separately (two
    products of size C x C x P); since both factors are ``F`` one product of the symmetrised
    output gradient gives the same result: it halves the cost of the Gram matrices' backward pass
    (4 style layers at 256 px: 11 ms -> 5 ms on one thread). benchmarks/bench_style.py times it.
    """

    @staticmethod
    def forward(ctx, flat: torch.Tensor) -> torch.Tensor:  # (N, C, P) -> (N, C, C)
        ctx.save_for_backward(flat)
        return torch.bmm(flat, flat.transpose(1, 2))

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # (N, C, C) -> (N, C, P)
        (flat,) = ctx.saved_tensors
        sym = grad + grad.transpose(1, 2)  # (N, C, C)
        if flat.stride(1) == 1 and flat.shape[2] > 1:
            # channels-last features: compute the (N, P, C) product, so that the gradient has the
            # features' own layout (a channels-first gradient made the network's backward ~10 % slower)
            return torch.bmm(flat.transpose(1, 2), sym).transpose(1, 2)
        return torch.bmm(sym, flat)


@reference
def gram_matrix(features: torch.Tensor, normalize: str = "positions") -> torch.Tensor:
    """Gram matrices of feature maps: ``G[n, i, j] = sum_p F[n, i, p] F[n, j, p] / norm``.

    Parameters
    ----------
    features : Tensor (N, C, H, W)
    normalize : {"positions", "elements", "none"}
        ``"positions"``: divide by ``H*W`` (the mean over positions of ``f_p f_p^T``; Gatys et al.'s
        ``1 / (4 N^2 M^2)`` factor in the loss amounts to this plus a factor 1/4), ``"elements"``:
        divide by ``C*H*W`` (Johnson et al. 2016), ``"none"``: the raw sum (grows with the picture's size).

    Returns
    -------
    Tensor (N, C, C), symmetric.
    """
    features = _check_features(features)
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"normalize must be one of {NORMALIZATIONS}, got {normalize!r}")
    n, c, h, w = features.shape
    flat = features.reshape(n, c, h * w)  # (N, C, P)
    gram = _OuterProducts.apply(flat)  # (N, C, C)
    if normalize == "positions":
        gram = gram / (h * w)
    elif normalize == "elements":
        gram = gram / (c * h * w)
    return gram


def _as_list(x, what):
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (list, tuple)) and all(isinstance(t, torch.Tensor) for t in x):
        return list(x)
    raise TypeError(f"{what} must be a tensor or a list of tensors, got {type(x).__name__}")


@reference
def style_loss(features, target_grams, weights: Sequence[float] | None = None, normalize: str = "positions") -> torch.Tensor:
    """``sum_l weights[l] * mean_ij (G_l[i, j] - A_l[i, j])^2`` per image (Gatys et al. 2016, eq. 4-5).

    Parameters
    ----------
    features : Tensor (N, C_l, H_l, W_l) or a list of them (one per style layer)
    target_grams : Tensor (C_l, C_l) / (1 or N, C_l, C_l), or a list of them
        The style image's Gram matrices, same normalisation.
    weights : sequence of float, optional
        One weight per layer (default 1 each).
    normalize : see :func:`gram_matrix`

    Returns
    -------
    Tensor (N,)
    """
    feats = _as_list(features, "features")
    targets = _as_list(target_grams, "target_grams")
    if len(feats) != len(targets):
        raise ValueError(f"got {len(feats)} feature maps but {len(targets)} target Gram matrices: one per layer")
    weights = [1.0] * len(feats) if weights is None else [float(w) for w in weights]
    if len(weights) != len(feats):
        raise ValueError(f"got {len(weights)} weights for {len(feats)} layers")
    total = 0.0
    for f, a, w in zip(feats, targets, weights):
        g = gram_matrix(f, normalize)  # (N, C, C)
        a = a.to(g) if a.dim() == 3 else a.to(g)[None]
        if a.shape[-2:] != g.shape[-2:]:
            raise ValueError(f"a target Gram matrix is {tuple(a.shape[-2:])}, the features give {tuple(g.shape[-2:])}")
        total = total + w * (g - a).pow(2).flatten(1).mean(1)
    return total


@reference
def content_loss(features: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``mean((F - P)^2)`` per image: how far the features are from the content photo's (Gatys et al. 2016, eq. 1).

    Parameters
    ----------
    features : Tensor (N, C, H, W)
    target : Tensor (1 or N, C, H, W)

    Returns
    -------
    Tensor (N,)
    """
    features = _check_features(features)
    if target.shape[1:] != features.shape[1:]:
        raise ValueError(f"content target has shape {tuple(target.shape)}, the features {tuple(features.shape)}: "
                         "compute both at the same layer and picture size")
    return (features - target.to(features)).pow(2).flatten(1).mean(1)


@reference
def tv_loss(x: torch.Tensor, power: float = 2.0) -> torch.Tensor:
    """Total variation: ``mean |x[.., i, j+1] - x[.., i, j]|^p + mean |x[.., i+1, j] - x[.., i, j]|^p``.

    Horizontal neighbours (columns) and vertical neighbours (rows), each averaged over its own
    differences and the channels, per image. ``power=2`` is smooth (the usual choice for style
    transfer, Johnson et al. 2016); ``power=1`` is the anisotropic TV of image denoising (keeps edges).
    (:func:`coursekit.maximize.total_variation` is the isotropic TV^beta prior of lecture 2.)

    Parameters
    ----------
    x : Tensor (N, C, H, W)
    power : float > 0

    Returns
    -------
    Tensor (N,)
    """
    x = _check_features(x, "x")
    if not power > 0:
        raise ValueError(f"power must be positive (2: squared differences, 1: absolute), got {power!r}")
    dx = x[..., :, 1:] - x[..., :, :-1]  # (N, C, H, W-1)
    dy = x[..., 1:, :] - x[..., :-1, :]  # (N, C, H-1, W)
    if power == 2:  # |d|^2 = d * d, value and gradient bit for bit, without abs's two passes (forward, backward)
        return dx.square().flatten(1).mean(1) + dy.square().flatten(1).mean(1)
    return dx.abs().pow(power).flatten(1).mean(1) + dy.abs().pow(power).flatten(1).mean(1)


def gram_errors(features: dict, target_grams: dict, normalize: str = "positions") -> dict:
    """Relative Frobenius error ``||G - A|| / ||A||`` per layer and image: ``{layer: Tensor (N,)}``."""
    out = {}
    for layer, a in target_grams.items():
        g = gram_matrix(features[layer], normalize)
        a = a.to(g) if a.dim() == 3 else a.to(g)[None]
        out[layer] = (g - a).flatten(1).norm(dim=1) / a.flatten(1).norm(dim=1).clamp_min(1e-12)
    return out


# ==============================================================================================
# the same losses as objectives (penalties: subtract them)


def style(layers: Sequence[str], target_grams: dict, weights: Sequence[float] | None = None,
          normalize: str = "positions") -> Objective:
    """:func:`style_loss` on the recorded ``layers`` as an objective (a penalty: subtract it)."""
    layers = [check_layer_name(layer) for layer in layers]
    missing = [layer for layer in layers if layer not in target_grams]
    if missing:
        raise ValueError(f"no target Gram matrix for layers {missing}")
    targets = [target_grams[layer].detach() for layer in layers]

    def fn(ctx):
        return style_loss([ctx.activations[layer] for layer in layers], targets, weights, normalize)

    return Objective(fn, layers, f"style({len(layers)} layers, {normalize})")


def content(layer: str, target: torch.Tensor) -> Objective:
    """:func:`content_loss` at ``layer`` as an objective (a penalty: subtract it)."""
    layer = check_layer_name(layer)
    target = target.detach()
    return Objective(lambda ctx: content_loss(ctx.activations[layer], target), [layer], f"content({layer!r})")


def smoothness(power: float = 2.0) -> Objective:
    """:func:`tv_loss` of the picture as an objective (a penalty: subtract it)."""
    return Objective(lambda ctx: tv_loss(ctx.image, power), (), f"tv{power:g}")


# ==============================================================================================
# the engine: optimise a picture until a loss is small


@dataclass
class StyleResult:
    """What :func:`stylize` and :func:`synthesize` return.

    Attributes
    ----------
    image : Tensor (N, 3, H, W)
        The picture, clamped to [0, 1].
    losses : Tensor (evaluations, N)
        The total loss at every function evaluation (a forward + backward pass), in order,
        including L-BFGS's line-search evaluations.
    terms : dict[str, float]
        Final value of each weighted term (``"content"``, ``"style"``, ``"tv"``), mean over images.
    gram_errors : dict[str, Tensor (N,)]
        Final relative error of each style layer's Gram matrix.
    optimizer : str
    seconds : float
        Wall time of the optimisation.
    """

    image: torch.Tensor
    losses: torch.Tensor
    terms: dict = field(default_factory=dict)
    gram_errors: dict = field(default_factory=dict)
    optimizer: str = ""
    seconds: float = 0.0

    @property
    def evaluations(self) -> int:
        return int(self.losses.shape[0])

    def best_so_far(self) -> torch.Tensor:
        """Running minimum of the loss (mean over images): what the optimiser has reached after k evaluations."""
        return self.losses.mean(1).cummin(0).values


_OPTIMIZERS = ("lbfgs", "adam")


def _targets(extract, picture: torch.Tensor, layers, normalize):
    with torch.no_grad():
        feats = extract(picture)
    return {layer: gram_matrix(feats[layer], normalize)[0] for layer in layers}


def _optimise(model, extract, terms: dict, init: torch.Tensor, optimizer: str, max_evals: int, lr: float,
              progress: bool, desc: str, jitter_pixels: int = 0, seed: int = 0):
    """Minimise the sum of the weighted penalty ``terms`` over the picture's pixels; returns (x, losses)."""
    objective = -sum(terms.values())  # maximise minus the loss
    x = init.detach().clone().requires_grad_(True)
    losses: list[torch.Tensor] = []
    scale: list[torch.Tensor] = []
    shift, generator = jitter(jitter_pixels), cpu_generator(seed + 1)
    # the bar counts function evaluations (the budget), not optimiser steps: an L-BFGS step spends
    # one or more evaluations in its line search, so a bar of steps stopped at "50 % 149/300"
    bar = progress_bar(total=max_evals, progress=progress, desc=desc, unit="eval", leave=True)

    def value_fn():
        seen = shift(x, generator)  # a random shift of up to jitter_pixels (none when 0)
        # channels-last sends EfficientNet's depthwise convolutions to faster CPU kernels
        acts = extract(seen.contiguous(memory_format=torch.channels_last))
        value = objective(Context(image=x, input=seen, logits=None, activations=acts))  # (N,) minus the loss
        losses.append(-value.detach())
        if len(losses) <= max_evals:
            bar.update(1)
        return value * scale[0] if scale else value

    def on_value(step, values):
        if len(losses) >= max_evals:
            raise StopIteration

    if optimizer == "lbfgs":
        # L-BFGS's first step is -t * gradient with t = min(1, 1 / |g|_1): with a small loss (a small
        # style weight, a network with small features) that is a jump far outside the pixel range,
        # after which the curvature estimates are useless and the line search stalls. Scaling the
        # loss so that |g|_1 = 1 at the start makes the first step small and the line search grow
        # it; later steps are scale-free. (One evaluation, recorded like the others.)
        with torch.enable_grad():
            (g,) = torch.autograd.grad(value_fn().sum(), x)
        scale.append(1.0 / g.flatten(1).abs().sum(1).clamp_min(1e-30))  # (N,)
        # no absolute stopping tolerances: the budget of evaluations decides (torch's defaults stop at
        # once when every pixel gradient is below 1e-7, e.g. for a network with small features)
        rule = LBFGS(lr=lr, history_size=50, max_iter=1, tolerance_grad=0.0, tolerance_change=0.0)
    else:
        rule = Adam(lr)
    try:
        ascend(value_fn, [x], rule, max_evals, on_value=on_value, progress=False)
    except BaseException:
        bar.close()  # an error or an interrupt: the bar stays where it stopped (red in a notebook)
        raise
    finish(bar)  # the budget is spent: 100 %, green
    return x.detach(), torch.stack(losses[:max_evals])


def _check_common(model, optimizer, max_evals, normalize, lr, jitter_pixels=0):
    check_model(model)
    if optimizer not in _OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {_OPTIMIZERS}, got {optimizer!r}")
    if non_negative_int(jitter_pixels, "jitter_pixels") and optimizer == "lbfgs":
        raise ValueError(f"jitter_pixels={jitter_pixels} shifts the picture at random before every evaluation, so the "
                         "loss changes from one evaluation to the next; L-BFGS's line search and curvature estimates "
                         "assume a fixed loss. Use optimizer='adam' with random shifts, or jitter_pixels=0.")
    positive_int(max_evals, "max_evals (forward + backward passes)")
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"normalize must be one of {NORMALIZATIONS}, got {normalize!r}")
    if lr is not None and not lr > 0:
        raise ValueError(f"lr must be positive, got {lr!r}")


def _final(extract, x, terms, style_layers, grams, normalize):
    with torch.no_grad():
        acts = extract(x)
        ctx = Context(image=x, input=x, logits=None, activations=acts)
        values = {k: float(t(ctx).mean()) for k, t in terms.items()}
        errors = gram_errors(acts, {layer: grams[layer] for layer in style_layers}, normalize)
    return values, errors


def stylize(
    model: nn.Module,
    content_image: torch.Tensor,
    style_image: torch.Tensor,
    *,
    style_layers: Sequence[str] | None = None,
    content_layer: str | None = None,
    style_weight: float = 100.0,
    content_weight: float = 1.0,
    tv_weight: float = 0.0,
    layer_weights: Sequence[float] | None = None,
    normalize: str = "positions",
    optimizer: str = "lbfgs",
    max_evals: int = 300,
    lr: float | None = None,
    init: str | torch.Tensor = "content",
    seed: int = 0,
    jitter_pixels: int = 0,
    progress: bool = True,
) -> StyleResult:
    """Gatys style transfer: a picture with ``content_image``'s features and ``style_image``'s Gram matrices.

    Minimises ``content_weight * content_loss + style_weight * style_loss + tv_weight * tv_loss``
    over the pixels with L-BFGS (Gatys et al. 2016) or Adam, for ``max_evals`` function evaluations
    (forward + backward passes through the needed layers). Pixels are not clamped during the
    optimisation (L-BFGS needs an unconstrained problem); the result is clamped to [0, 1].

    Parameters
    ----------
    model : nn.Module
        A course model; left exactly as it was.
    content_image : Tensor (1, 3, H, W) in [0, 1]
    style_image : Tensor (1, 3, H', W') in [0, 1]
        Any size: the Gram matrices are normalised per position.
    style_layers, content_layer : layer names
        Default: :data:`DEFAULT_LAYERS` for the model.
    style_weight, content_weight, tv_weight : float
    layer_weights : one weight per style layer (default 1 each)
    normalize : {"positions", "elements", "none"}
        The Gram normalisation (:func:`gram_matrix`).
    optimizer : {"lbfgs", "adam"}
    max_evals : int
        Budget of function evaluations.
    lr : float, optional
        L-BFGS's step scale (default 1) or Adam's learning rate in pixel units (default 0.02).
    init : "content", "noise" or a tensor
        The starting picture.
    seed : int
        Seeds the noise start and the random shifts.
    jitter_pixels : int
        Before every evaluation, shift the picture by a random offset of up to this many pixels
        (reflect padding, :func:`coursekit.maximize.jitter`), Adam only. A strided first layer
        (EfficientNet's stride-2 stem) treats even and odd pixels differently, so the gradient of a
        fixed picture carries a 2-pixel grid that the optimiser paints in (the checkerboard of
        Odena, Dumoulin & Olah 2016); a new shift at every step averages it away. The content
        features are then compared up to that shift (1 pixel is 1/8 of a position of the default
        content layer).
    progress : bool

    Returns
    -------
    StyleResult
    """
    _check_common(model, optimizer, max_evals, normalize, lr, jitter_pixels)
    content_image = check_images(content_image, "content_image", model=model, pixel_range=True).detach()
    style_image = check_images(style_image, "style_image", model=model, pixel_range=True).detach()
    if content_image.shape[0] != 1 or style_image.shape[0] != 1:
        raise ValueError(f"give one content and one style image, got batches of {content_image.shape[0]} and {style_image.shape[0]}")
    defaults = default_layers(model) if style_layers is None or content_layer is None else {}
    style_layers = list(style_layers or defaults["style"])
    content_layer = content_layer or defaults["content"]
    start = _start(init, content_image, seed)
    lr = lr if lr is not None else (1.0 if optimizer == "lbfgs" else 0.02)
    layers = list(dict.fromkeys(style_layers + [content_layer]))
    t0 = time.perf_counter()
    with guarded(model, what="stylize"), layer_outputs(model, layers) as extract:
        grams = _targets(extract, style_image, style_layers, normalize)
        with torch.no_grad():
            content_target = extract(content_image)[content_layer]
        terms = {}
        if content_weight:
            terms["content"] = content_weight * content(content_layer, content_target)
        if style_weight:
            terms["style"] = style_weight * style(style_layers, grams, layer_weights, normalize)
        if tv_weight:
            terms["tv"] = tv_weight * smoothness()
        if not terms:
            raise ValueError("all weights are 0: nothing to optimise")
        x, losses = _optimise(model, extract, terms, start, optimizer, max_evals, lr, progress, f"stylize ({optimizer})",
                              jitter_pixels, seed)
        seconds = time.perf_counter() - t0
        values, errors = _final(extract, x, terms, style_layers, grams, normalize)
    return StyleResult(image=x.clamp(0, 1), losses=losses, terms=values, gram_errors=errors, optimizer=optimizer, seconds=seconds)


def _start(init, like: torch.Tensor, seed: int, size=None) -> torch.Tensor:
    shape = like.shape if size is None else (1, like.shape[1], *size)
    if isinstance(init, torch.Tensor):
        init = init.detach().float()
        if init.dim() == 3:
            init = init[None]
        if init.shape != shape:
            raise ValueError(f"init has shape {tuple(init.shape)}, the picture is {tuple(shape)}")
        return init.to(like.device)
    if init == "content":
        return like.clone()
    if init == "noise":
        g = cpu_generator(seed)
        return (0.5 + 0.1 * torch.randn(shape, generator=g, device="cpu")).clamp(0, 1).to(like.device)
    raise ValueError(f"init must be 'content', 'noise' or an image tensor, got {init!r}")


def synthesize(
    model: nn.Module,
    texture: torch.Tensor,
    *,
    size: int | tuple[int, int] | None = None,
    layers: Sequence[str] | None = None,
    layer_weights: Sequence[float] | None = None,
    normalize: str = "positions",
    optimizer: str = "lbfgs",
    max_evals: int = 200,
    lr: float | None = None,
    seed: int = 0,
    jitter_pixels: int = 0,
    progress: bool = True,
) -> StyleResult:
    """Texture synthesis (Gatys et al. 2015): from noise to a picture with ``texture``'s Gram matrices.

    Parameters
    ----------
    model : nn.Module
        A course model, a :class:`RandomTextureNet`, or any model with ``layers`` given.
    texture : Tensor (1, 3, H, W) in [0, 1]
    size : int or (H, W), optional
        Size of the synthesised picture (default: the texture's).
    layers : layer names, optional
        Default: the model's style layers (:data:`DEFAULT_LAYERS`).
    layer_weights, normalize, optimizer, max_evals, lr, progress : as in :func:`stylize`
    seed : int
        Seeds the starting noise (and the random shifts): another seed, another sample of the same texture.
    jitter_pixels : int
        Random shifts before every evaluation, Adam only (see :func:`stylize`).

    Returns
    -------
    StyleResult
        ``gram_errors`` says how close each layer's Gram matrix came to the texture's.
    """
    _check_common(model, optimizer, max_evals, normalize, lr, jitter_pixels)
    texture = check_images(texture, "texture", model=model, pixel_range=True).detach()
    if texture.shape[0] != 1:
        raise ValueError(f"give one texture image, got a batch of {texture.shape[0]}")
    layers = list(layers or default_layers(model)["style"])
    if size is None:
        size = tuple(texture.shape[-2:])
    elif isinstance(size, int):
        size = (size, size)
    start = _start("noise", texture, seed, size=tuple(size))
    lr = lr if lr is not None else (1.0 if optimizer == "lbfgs" else 0.02)
    t0 = time.perf_counter()
    with guarded(model, what="synthesize"), layer_outputs(model, layers) as extract:
        grams = _targets(extract, texture, layers, normalize)
        terms = {"style": style(layers, grams, layer_weights, normalize)}
        x, losses = _optimise(model, extract, terms, start, optimizer, max_evals, lr, progress, f"texture ({optimizer})",
                              jitter_pixels, seed)
        seconds = time.perf_counter() - t0
        values, errors = _final(extract, x, terms, layers, grams, normalize)
    return StyleResult(image=x.clamp(0, 1), losses=losses, terms=values, gram_errors=errors, optimizer=optimizer, seconds=seconds)


# ==============================================================================================
# textures without training


class RandomTextureNet(nn.Module):
    """One convolutional layer with random filters of several sizes, then ReLU (Ustyuzhaninov et al. 2016).

    The surprise of "What does it take to generate natural textures?": the Gram matrices of a
    *single* layer of *untrained* filters, if there are enough of them and at several scales,
    already synthesise convincing textures. Filters are drawn from a normal distribution, each
    made zero-mean and unit-norm; inputs are centred (``x - 0.5``). Its one recorded layer is
    ``"relu"`` (``DEFAULT_LAYERS["random_texture_net"]``).

    Parameters
    ----------
    sizes : sequence of odd int
        Filter sizes (one convolution per size, ``channels`` filters each, "same" padding).
    channels : int
        Filters per size.
    seed : int
    """

    def __init__(self, sizes: Sequence[int] = (3, 5, 7, 11), channels: int = 64, seed: int = 0):
        super().__init__()
        sizes = [int(s) for s in sizes]
        if not sizes or any(s < 1 or s % 2 == 0 for s in sizes):
            raise ValueError(f"filter sizes must be odd positive ints, got {sizes!r}")
        channels = positive_int(channels, "channels")
        g = cpu_generator(seed)
        self.sizes = tuple(sizes)
        self.convs = nn.ModuleList()
        for s in sizes:
            conv = nn.Conv2d(3, channels, s, padding=s // 2, bias=False)
            w = torch.randn(conv.weight.shape, generator=g, device="cpu")
            w = w - w.mean(dim=(1, 2, 3), keepdim=True)
            with torch.no_grad():  # copy_: the conv may have been made on another default device
                conv.weight.copy_(w / w.flatten(1).norm(dim=1).view(-1, 1, 1, 1))
            self.convs.append(conv)
        self.relu = nn.ReLU()
        self.name = "random_texture_net"
        self.input_size = (3, 224, 224)
        self.requires_grad_(False)
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, 3, H, W) in [0, 1] -> (N, sizes*channels, H, W)
        x = x - 0.5
        return self.relu(torch.cat([conv(x) for conv in self.convs], dim=1))

    def extra_repr(self) -> str:
        return f"sizes={self.sizes}, channels per size={self.convs[0].out_channels}"



# ==============================================================================================
# a style picture with brush strokes, drawn from a seed

# a night-sky palette of blues, a turquoise and yellows (sRGB): strong contrasts at the stroke scale
_PALETTE = ((22, 42, 96), (38, 74, 150), (70, 120, 190), (120, 170, 215), (36, 120, 130),
            (226, 196, 72), (240, 222, 140), (200, 130, 40), (250, 246, 220))


def _flow_angle(rng: np.random.Generator, size: int):
    """A smooth random field of stroke directions: a sum of a few sinusoids and two swirls."""
    freqs = rng.uniform(0.5, 2.5, (4, 2)) * 2 * np.pi / size
    phases, amps = rng.uniform(0, 2 * np.pi, 4), rng.uniform(0.4, 1.0, 4)
    centres = rng.uniform(0.2, 0.8, (2, 2)) * size

    def angle(x: float, y: float) -> float:
        a = sum(amp * np.sin(fx * x + fy * y + ph) for (fx, fy), ph, amp in zip(freqs, phases, amps))
        for cx, cy in centres:  # swirls: strokes go round these points
            a += 1.5 * np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (0.04 * size * size)) * (
                np.arctan2(y - cy, x - cx) + np.pi / 2 - a)
        return float(a)

    return angle


def _stroke_path(angle, x: float, y: float, length: float, step: float) -> np.ndarray:
    points = [(x, y)]
    for _ in range(max(2, int(length / step))):
        a = angle(x, y)
        x, y = x + step * np.cos(a), y + step * np.sin(a)
        points.append((x, y))
    return np.array(points)  # (P, 2)


def _draw_stroke(draw, rng: np.random.Generator, path: np.ndarray, colour, width: float, scale: int) -> None:
    """One stroke as a few parallel bristle lines of slightly different shades."""
    d = np.gradient(path, axis=0)
    normal = np.stack([-d[:, 1], d[:, 0]], 1) / np.linalg.norm(d, axis=1, keepdims=True).clip(1e-6)
    n_bristles = max(3, int(width / 1.2))
    line_width = max(1, round(1.4 * scale * width / n_bristles))  # neighbouring bristles overlap a little
    for offset in np.linspace(-width / 2, width / 2, n_bristles):
        shade = np.clip(np.array(colour) * rng.uniform(0.8, 1.15) + rng.normal(0, 8, 3), 0, 255).astype(int)
        points = (path + offset * normal) * scale
        draw.line([tuple(p) for p in points.tolist()], fill=tuple(shade.tolist()), width=line_width,
                  joint="curve")


def brush_strokes(size: int = 256, seed: int = 0, n_strokes: int | None = None) -> torch.Tensor:
    """A painting-like style picture drawn from a seed: curved, bristled brush strokes in a night-sky palette.

    The strokes follow a smooth random flow field (sinusoids and two swirls, in the manner of an
    impressionist sky), each stroke a few parallel bristle lines in slightly different shades, so
    the picture has what style transfer should copy: oriented strokes of a few pixels' width with
    sharp colour contrasts (Gatys et al. 2016 used paintings such as van Gogh's *The Starry
    Night*; this is a procedurally drawn stand-in with no licence question). Drawn at twice the size
    and downsampled (antialiasing). The same seed gives the same picture.

    Parameters
    ----------
    size : int
        Side of the square picture in pixels (>= 32).
    seed : int
    n_strokes : int, optional
        Default: enough strokes to cover the canvas several times (``size**2 / 40``).

    Returns
    -------
    Tensor (1, 3, size, size) in [0, 1], on the CPU.
    """
    size = positive_int(size, "size")
    if size < 32:
        raise ValueError(f"size must be at least 32 pixels, got {size}")
    n_strokes = positive_int(n_strokes if n_strokes is not None else max(1, size * size // 40), "n_strokes")
    rng = np.random.default_rng(int(seed))
    scale = 2
    canvas = Image.new("RGB", (size * scale, size * scale), _PALETTE[1])
    draw = ImageDraw.Draw(canvas)
    angle = _flow_angle(rng, size)
    region = _flow_angle(rng, size)  # a second smooth field picks the hue family by place
    for _ in range(n_strokes):
        x, y = rng.uniform(-8, size + 8, 2)
        warm = np.sin(region(x, y)) > 0.55  # yellow patches (stars, moon) inside a blue sky
        family = (5, 6, 7, 8) if warm else (0, 1, 2, 3, 4)
        colour = _PALETTE[family[int(rng.integers(len(family)))]]
        path = _stroke_path(angle, x, y, rng.uniform(8, 22), 2.0)
        _draw_stroke(draw, rng, path, colour, rng.uniform(3, 6), scale)
    picture = np.asarray(canvas.resize((size, size), Image.LANCZOS), dtype=np.float32) / 255.0
    return torch.from_numpy(picture.copy()).permute(2, 0, 1)[None].clamp(0, 1)
