"""Maximal response: optimise an *input* until a chosen unit, channel or class answers strongly.

Lecture 2. The network is frozen; only a picture changes. One engine, :func:`maximize`, runs
gradient ascent on a parameterised image for any :class:`Objective`; everything else is a small,
composable piece:

==================  ==========================================================================
piece               examples
==================  ==========================================================================
objectives          ``channel("net.blocks.3", 5)``, ``neuron(...)``, ``class_logit(65)``,
                    ``layer_energy(...)``, ``feature_match(...)``; image priors
                    ``edge_energy_prior()``, ``l2_prior()``, ``total_variation()``.
                    They compose with ``+ - *`` and scalars, as in Lucent:
                    ``channel("net.blocks.3", 5) + 0.5 * class_logit(65)``
transforms          closures ``t(x, generator) -> x`` applied to the picture before every
                    forward pass (robustness): :func:`jitter`, :func:`random_scale`, :func:`pad`
regularisers        closures ``r(x, step) -> x`` applied to the picture after every step:
                    :func:`decay` (L2 decay), :func:`blur_every` (periodic blur), as in
                    Yosinski et al. 2015
parameterisations   :func:`pixel_image` (pixels, clamped to [0, 1]) and :func:`fourier_image`
                    (1/f-scaled Fourier spectrum, decorrelated colours, sigmoid), Olah et al. 2017
==================  ==========================================================================

The namespaces ``objectives``, ``transforms``, ``regularizers`` and ``params`` collect them::

    from coursekit.maximize import maximize, objectives, transforms, regularizers, params
    obj = objectives.class_logit(700) - 2e-3 * objectives.edge_energy_prior()
    result = maximize(model, obj, size=128, steps=48, transforms=[transforms.jitter(4)])
    result.image, result.history, result.probabilities

Also here: :func:`edge_energy`, Fleuret's multi-scale edge-energy penalty
``h(x) = sum_s ||delta^s(x) - g * delta^s(x)||^2``; :func:`high_frequency_energy`, the measure of
"noisiness" used to compare visualisations; :func:`ascent_step`, one normalised gradient-ascent
step as in the Keras notebook; :func:`gaussian_blur`.

References
----------
Erhan, Bengio, Courville & Vincent (2009), Visualizing higher-layer features of a deep network.
Simonyan, Vedaldi & Zisserman (2014), Deep inside convolutional networks.
Yosinski, Clune, Nguyen, Fuchs & Lipson (2015), Understanding neural networks through deep visualization.
Mahendran & Vedaldi (2015), Understanding deep image representations by inverting them.
Olah, Mordvintsev & Schubert (2017), Feature visualization. Distill.
Fleuret (2018), AMMI Introduction to Deep Learning, 8.4 "Optimizing inputs".
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ._reference import reference
from .gradients import gradient
from .guard import guarded
from .hooks import record
from .inputs import check_images, check_model, positive_int, target_indices, target_scores
from .optimize import Adam, NormalizedAscent, ascend

__all__ = [
    "Context",
    "FourierImage",
    "ImageParam",
    "MaximizationResult",
    "Objective",
    "PixelImage",
    "StackedImage",
    "ascent_step",
    "blur_every",
    "channel",
    "class_log_probability",
    "class_logit",
    "decay",
    "edge_energy",
    "edge_energy_prior",
    "feature_match",
    "fourier_image",
    "gaussian_blur",
    "high_frequency_energy",
    "jitter",
    "l2_prior",
    "layer_energy",
    "maximize",
    "neuron",
    "objectives",
    "only",
    "pad",
    "params",
    "per_image",
    "pixel_image",
    "random_scale",
    "regularizers",
    "relative_l2",
    "stack",
    "total_variation",
    "transforms",
]


# ==============================================================================================
# objectives


@dataclass
class Context:
    """What an objective sees at one step.

    Attributes
    ----------
    image : Tensor (N, C, H, W)
        The picture being optimised, in [0, 1] (before the random transforms).
    input : Tensor (N, C, H', W')
        What the model was given this step (the picture after the transforms).
    logits : Tensor (N, K)
        The model's output for ``input``.
    activations : dict[str, Tensor]
        Outputs of the layers the objective asked for, attached to the graph.
    """

    image: torch.Tensor
    input: torch.Tensor
    logits: torch.Tensor
    activations: dict


def _wrap(text: str) -> str:
    return f"({text})" if (" + " in text or " - " in text) else text


class Objective:
    """A differentiable score per image, ``Context -> Tensor (N,)``, to be *maximised*.

    Objectives compose like numbers: ``a + b``, ``a - b``, ``-a``, ``2 * a``, ``a * b``, ``a / 2``.
    Each remembers the layers it needs (``layers``) and the class targets it involves
    (``targets``, so :func:`maximize` can track the class probability).
    """

    def __init__(self, fn: Callable[[Context], torch.Tensor], layers: Sequence[str] = (), name: str = "objective", targets: Sequence = ()):
        if not callable(fn):
            raise TypeError(f"an Objective wraps a function Context -> (N,) tensor, got {type(fn).__name__}")
        self.fn = fn
        self.layers = tuple(dict.fromkeys(layers))
        self.name = name
        self.targets = tuple(targets)

    def __call__(self, ctx: Context) -> torch.Tensor:
        value = self.fn(ctx)
        n = ctx.image.shape[0]
        if value.dim() == 0:
            value = value.expand(n)
        if value.shape != (n,):
            raise ValueError(f"objective {self.name} returned shape {tuple(value.shape)}, expected ({n},): one score per image")
        return value

    def __repr__(self) -> str:
        return self.name

    # -- algebra -------------------------------------------------------------------------------
    def _combine(self, other, op, symbol):
        if isinstance(other, Objective):
            return Objective(
                lambda ctx: op(self(ctx), other(ctx)),
                self.layers + other.layers,
                f"{self.name} {symbol} {_wrap(other.name) if symbol != '+' else other.name}",
                self.targets + other.targets,
            )
        if isinstance(other, numbers.Real) and not isinstance(other, bool):
            value = float(other)
            return Objective(lambda ctx: op(self(ctx), value), self.layers, f"{self.name} {symbol} {value:g}", self.targets)
        return NotImplemented

    def __add__(self, other):
        return self._combine(other, lambda a, b: a + b, "+")

    def __radd__(self, other):
        if isinstance(other, numbers.Real) and not isinstance(other, bool) and other == 0:
            return self  # lets sum([...]) work
        return self._combine(other, lambda a, b: b + a, "+")

    def __sub__(self, other):
        return self._combine(other, lambda a, b: a - b, "-")

    def __rsub__(self, other):
        return (-self)._combine(other, lambda a, b: a + b, "+")

    def __neg__(self):
        return Objective(lambda ctx: -self(ctx), self.layers, f"-{_wrap(self.name)}", self.targets)

    def __mul__(self, other):
        if isinstance(other, Objective):
            return Objective(lambda ctx: self(ctx) * other(ctx), self.layers + other.layers,
                             f"{_wrap(self.name)} * {_wrap(other.name)}", self.targets + other.targets)
        if isinstance(other, numbers.Real) and not isinstance(other, bool):
            value = float(other)
            return Objective(lambda ctx: value * self(ctx), self.layers, f"{value:g} * {_wrap(self.name)}", self.targets)
        return NotImplemented

    __rmul__ = __mul__

    def __truediv__(self, other):
        if isinstance(other, numbers.Real) and not isinstance(other, bool):
            if other == 0:
                raise ZeroDivisionError("cannot divide an objective by 0")
            return self * (1.0 / float(other))
        return NotImplemented


def _check_layer(layer) -> str:
    if isinstance(layer, nn.Module):
        raise TypeError("objectives name layers by string (e.g. 'net.blocks.3'); use coursekit.list_layers(model) to find names")
    if not isinstance(layer, str) or not layer:
        raise TypeError(f"a layer is named by a non-empty string such as 'net.blocks.3', got {layer!r}")
    return layer


def _channel_indices(index, a: torch.Tensor, layer: str) -> torch.Tensor:
    """An int (same for every image) or one int per image -> LongTensor (N,) of valid channels of ``a``."""
    if callable(index):
        raise TypeError(f"a channel index is an int or one int per image, got {index!r}")
    idx = target_indices(index, a.shape[0], what="channel index").to(a.device)  # (N,)
    if (idx < 0).any() or (idx >= a.shape[1]).any():
        raise ValueError(f"channel index {index!r} out of range: layer {layer!r} has {a.shape[1]} channels")
    return idx


def _layer_output(ctx: Context, layer: str) -> torch.Tensor:
    if layer not in ctx.activations:
        raise KeyError(f"layer {layer!r} was not recorded; objectives list their layers in .layers")
    return ctx.activations[layer]


def channel(layer: str, index) -> Objective:
    """Mean activation of channel ``index`` of ``layer`` over all positions (Erhan et al. 2009).

    ``index`` is an int, or one int per image of the batch. For a layer with output ``(N, D)``
    (a fully connected layer) this is unit ``index``.
    """
    layer = _check_layer(layer)

    def fn(ctx):
        a = _layer_output(ctx, layer)  # (N, C, H, W) or (N, D)
        idx = _channel_indices(index, a, layer)  # (N,)
        sel = a.gather(1, idx.view(-1, *([1] * (a.dim() - 1))).expand(-1, 1, *a.shape[2:]))[:, 0]
        return sel.flatten(1).mean(1) if sel.dim() > 1 else sel

    return Objective(fn, [layer], f"channel({layer!r}, {index})")


def neuron(layer: str, index, y: int | None = None, x: int | None = None) -> Objective:
    """Activation of one unit: channel ``index`` of ``layer`` at position ``(y, x)`` (default: the centre)."""
    layer = _check_layer(layer)

    def fn(ctx):
        a = _layer_output(ctx, layer)
        if a.dim() != 4:
            raise ValueError(f"neuron() needs a convolutional layer (N, C, H, W); {layer!r} gives {tuple(a.shape)}: use channel()")
        h, w = a.shape[2:]
        yy = h // 2 if y is None else y
        xx = w // 2 if x is None else x
        if not (0 <= yy < h and 0 <= xx < w):
            raise ValueError(f"position (y={yy}, x={xx}) is outside layer {layer!r}'s {h}x{w} map")
        idx = _channel_indices(index, a, layer)  # (N,)
        return a[torch.arange(a.shape[0], device=a.device), idx, yy, xx]

    return Objective(fn, [layer], f"neuron({layer!r}, {index}, y={y}, x={x})")


def class_logit(target) -> Objective:
    """The logit of class ``target`` (an int, one int per image, or a callable ``logits -> (N,)``).

    Maximising the logit rather than the probability is the usual choice (Simonyan et al. 2014):
    the probability can also rise by pushing the other classes down.
    """
    return Objective(lambda ctx: target_scores(ctx.logits, target), (), f"class_logit({target!r})", [target])


def class_log_probability(target) -> Objective:
    """``log softmax(logits)[target]``: rises only when the class wins against the others."""
    return Objective(lambda ctx: target_scores(ctx.logits.log_softmax(1), target), (), f"class_log_probability({target!r})", [target])


def layer_energy(layer: str) -> Objective:
    """Mean squared activation of a whole layer (DeepDream's objective, Mordvintsev et al. 2015)."""
    layer = _check_layer(layer)
    return Objective(lambda ctx: _layer_output(ctx, layer).pow(2).flatten(1).mean(1), [layer], f"layer_energy({layer!r})")


def feature_match(layer: str, target: torch.Tensor) -> Objective:
    """``-||phi(x) - phi_0||^2 / ||phi_0||^2``, the data term of Mahendran & Vedaldi (2015).

    ``target`` is the layer's output for the image to reconstruct, shape ``(1, ...)`` or one per
    image of the batch. Maximising this makes the picture's features equal the target's.
    """
    layer = _check_layer(layer)
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"feature_match needs the target features as a tensor, got {type(target).__name__}")
    target = target.detach()
    norm = target.pow(2).flatten(1).sum(1).clamp_min(1e-12)  # (N_t,)

    def fn(ctx):
        a = _layer_output(ctx, layer)
        if a.shape[1:] != target.shape[1:]:
            raise ValueError(f"features of {layer!r} have shape {tuple(a.shape[1:])}, the target {tuple(target.shape[1:])}")
        return -(a - target).pow(2).flatten(1).sum(1) / norm

    return Objective(fn, [layer], f"feature_match({layer!r})")


def per_image(objectives: Sequence[Objective]) -> Objective:
    """Image ``i`` of the batch maximises ``objectives[i]``: several visualisations in one run."""
    objectives = list(objectives)
    if not objectives or not all(isinstance(o, Objective) for o in objectives):
        raise TypeError("per_image needs a non-empty list of Objective, one per image of the batch")

    def fn(ctx):
        n = ctx.image.shape[0]
        if n != len(objectives):
            raise ValueError(f"per_image has {len(objectives)} objectives for a batch of {n} images; use batch={len(objectives)}")
        values = torch.stack([o(ctx) for o in objectives])  # (n_objectives, N)
        return values.diagonal()

    layers = [layer for o in objectives for layer in o.layers]
    targets = [t for o in objectives for t in o.targets]
    return Objective(fn, layers, "per_image([" + ", ".join(o.name for o in objectives) + "])",
                     [targets] if len(targets) == len(objectives) else [])


def edge_energy_prior() -> Objective:
    """Fleuret's multi-scale edge energy :func:`edge_energy` of the picture, as an objective.

    It is a *penalty*: subtract it, ``class_logit(700) - 1e-3 * edge_energy_prior()``.
    """
    return Objective(lambda ctx: edge_energy(ctx.image), (), "edge_energy")


def l2_prior() -> Objective:
    """Sum over pixels of ``(x - 0.5)^2``: the L2 penalty (decay towards mid-grey) as an objective to subtract."""
    return Objective(lambda ctx: (ctx.image - 0.5).pow(2).flatten(1).sum(1), (), "l2")


def total_variation(beta: float = 2.0) -> Objective:
    """Sum of ``(dx^2 + dy^2)^(beta/2)`` over pixels, Mahendran & Vedaldi's TV^beta prior (to subtract)."""

    def fn(ctx):
        x = ctx.image
        dx = x[..., :-1, 1:] - x[..., :-1, :-1]
        dy = x[..., 1:, :-1] - x[..., :-1, :-1]
        return (dx.pow(2) + dy.pow(2) + 1e-8).pow(beta / 2).flatten(1).sum(1)

    return Objective(fn, (), f"tv{beta:g}")


# ==============================================================================================
# image operations used by the priors and the regularisers


def _gaussian_kernel1d(sigma: float, radius: int | None = None) -> torch.Tensor:
    radius = max(1, math.ceil(3 * sigma)) if radius is None else radius
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-(t**2) / (2 * sigma**2))
    return k / k.sum()


def gaussian_blur(x: torch.Tensor, sigma: float = 1.0) -> torch.Tensor:
    """Blur each channel of ``x`` (N, C, H, W) with a Gaussian of std ``sigma`` pixels (reflect padding)."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"gaussian_blur expects a (N, C, H, W) tensor, got {getattr(x, 'shape', type(x).__name__)}")
    if not sigma > 0:
        raise ValueError(f"sigma must be positive, got {sigma!r}")
    k = _gaussian_kernel1d(float(sigma)).to(x)
    r = k.numel() // 2
    n, c, h, w = x.shape
    u = x.reshape(n * c, 1, h, w)
    mode = "reflect" if min(h, w) > r else "replicate"
    u = F.conv2d(F.pad(u, (r, r, 0, 0), mode=mode), k.view(1, 1, 1, -1))
    u = F.conv2d(F.pad(u, (0, 0, r, r), mode=mode), k.view(1, 1, -1, 1))
    return u.reshape(n, c, h, w)


def _fleuret_kernel(device=None, dtype=torch.float32) -> torch.Tensor:
    t = torch.tensor([-2.0, -1.0, 0.0, 1.0, 2.0], dtype=dtype, device=device)
    k = torch.exp(-(t**2) / 2)  # Gaussian, std 1 pixel, on a 5x5 support
    k = torch.outer(k, k)
    return (k / k.sum()).view(1, 1, 5, 5)


@reference
def edge_energy(x: torch.Tensor) -> torch.Tensor:
    """Fleuret's multi-scale edge-energy penalty ``h(x) = sum_s ||delta^s(x) - g * delta^s(x)||^2``.

    Each channel is treated as a separate grey image. At every scale ``s`` the image minus its
    blur by ``g`` (a normalised 5x5 Gaussian of std 1, zero padding 2) is what a blur removes:
    edges and noise. Its squared norm is summed, then the image is downscaled by two
    (``delta``: 2x2 average pooling with padding 1) while both sides stay larger than 5 pixels.
    Large for noisy, high-frequency pictures; small for smooth ones.

    Parameters
    ----------
    x : Tensor (N, C, H, W)

    Returns
    -------
    Tensor (N,)
        The penalty per image, summed over channels and scales. Differentiable.

    References
    ----------
    Fleuret (2018), AMMI Introduction to Deep Learning, lecture 8.4 "Optimizing inputs", slides 6-7.
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"edge_energy expects a (N, C, H, W) tensor, got {getattr(x, 'shape', type(x).__name__)}")
    n, c, h, w = x.shape
    g = _fleuret_kernel(x.device, x.dtype)
    u = x.reshape(n * c, 1, h, w)  # channels as separate images
    total = x.new_zeros(n * c)
    while min(u.shape[2], u.shape[3]) > 5:
        blurry = F.conv2d(u, g, padding=2)
        total = total + (u - blurry).flatten(1).pow(2).sum(1)
        u = F.avg_pool2d(u, kernel_size=2, padding=1)  # delta: downscale by two
    return total.view(n, c).sum(1)


_LAPLACIAN = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]]).view(1, 1, 3, 3)


def high_frequency_energy(x: torch.Tensor, relative: bool = False) -> torch.Tensor:
    """Mean squared discrete Laplacian per image: how much fine, pixel-scale detail a picture has.

    ``mean over channels and pixels of (4 x[i,j] - x[i-1,j] - x[i+1,j] - x[i,j-1] - x[i,j+1])^2``
    (replicate padding), on images in [0, 1]. About 0 for a smooth picture, up to ~1 for
    pixel-level noise of full contrast; photos of natural scenes are ~0.001-0.01.

    Parameters
    ----------
    x : Tensor (N, C, H, W)
    relative : bool
        Divide by ``20 * variance`` of each image's pixels: the *share* of the picture's variation
        that sits at the highest frequencies, independent of its contrast. About 1 for white noise
        (whose Laplacian has variance 20 sigma^2), about 0 for a smooth picture.

    Returns
    -------
    Tensor (N,)
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"high_frequency_energy expects a (N, C, H, W) tensor, got {getattr(x, 'shape', type(x).__name__)}")
    n, c, h, w = x.shape
    u = F.pad(x.reshape(n * c, 1, h, w), (1, 1, 1, 1), mode="replicate")
    lap = F.conv2d(u, _LAPLACIAN.to(x))
    energy = lap.pow(2).reshape(n, -1).mean(1)
    if relative:
        energy = energy / (20 * x.reshape(n, -1).var(1)).clamp_min(1e-12)
    return energy


def relative_l2(x: torch.Tensor, reference_image: torch.Tensor) -> torch.Tensor:
    """``||x - reference|| / ||reference||`` per image: how much a picture changed. Shape (N,)."""
    if x.shape != reference_image.shape:
        raise ValueError(f"shapes differ: {tuple(x.shape)} vs {tuple(reference_image.shape)}")
    diff = (x - reference_image).flatten(1).norm(dim=1)
    return diff / reference_image.flatten(1).norm(dim=1).clamp_min(1e-12)


# ==============================================================================================
# transforms: random, differentiable, applied before each forward pass


def jitter(pixels: int) -> Callable:
    """Shift the picture by a random offset of up to ``pixels`` in each direction (reflect padding).

    Features that survive small shifts are real structure, not pixel-level noise (Mordvintsev
    et al. 2015; Olah et al. 2017).
    """
    if not isinstance(pixels, int) or isinstance(pixels, bool) or pixels < 0:
        raise ValueError(f"jitter needs a non-negative int number of pixels, got {pixels!r}")

    def t(x, generator=None):
        if pixels == 0:
            return x
        h, w = x.shape[-2:]
        dy, dx = torch.randint(0, 2 * pixels + 1, (2,), generator=generator).tolist()
        padded = F.pad(x, (pixels, pixels, pixels, pixels), mode="reflect" if min(h, w) > pixels else "replicate")
        return padded[..., dy : dy + h, dx : dx + w]

    t.__name__ = f"jitter({pixels})"
    return t


def random_scale(scales: Sequence[float] = (0.9, 0.95, 1.0, 1.05, 1.1)) -> Callable:
    """Resize the picture by a factor drawn from ``scales`` (bilinear)."""
    scales = [float(s) for s in scales]
    if not scales or min(scales) <= 0:
        raise ValueError(f"scales must be positive factors, got {scales!r}")

    def t(x, generator=None):
        s = scales[int(torch.randint(0, len(scales), (1,), generator=generator))]
        if s == 1.0:
            return x
        h, w = x.shape[-2:]
        return F.interpolate(x, size=(max(1, round(h * s)), max(1, round(w * s))), mode="bilinear", align_corners=False)

    t.__name__ = f"random_scale({scales})"
    return t


def pad(pixels: int, value: float = 0.5) -> Callable:
    """Pad the picture with a constant border (so that jitter does not always see the same edge)."""
    if not isinstance(pixels, int) or isinstance(pixels, bool) or pixels < 0:
        raise ValueError(f"pad needs a non-negative int number of pixels, got {pixels!r}")

    def t(x, generator=None):
        return F.pad(x, (pixels,) * 4, mode="constant", value=value)

    t.__name__ = f"pad({pixels})"
    return t


def only(images: Sequence[int], fn: Callable) -> Callable:
    """Apply a transform or regulariser ``fn`` to some images of the batch only.

    ``only([1, 2], decay(0.01))`` decays images 1 and 2 and leaves the others as they are: with
    :func:`per_image` objectives and :class:`StackedImage` this runs several recipes in one batch.
    ``fn`` must keep the picture's shape (not :func:`random_scale`).
    """
    if not callable(fn):
        raise TypeError(f"only() wraps a transform or regulariser, got {fn!r}")
    chosen = sorted({int(i) for i in images})
    if not chosen or chosen[0] < 0:
        raise ValueError(f"only() needs non-negative image indices, got {images!r}")

    def g(x, arg=None):
        y = fn(x, arg)
        if y.shape != x.shape:
            raise ValueError(f"only() needs a shape-preserving {getattr(fn, '__name__', fn)}; it turned {tuple(x.shape)} into {tuple(y.shape)}")
        if chosen[-1] >= x.shape[0]:
            raise ValueError(f"only({chosen}, ...) names image {chosen[-1]}, but the batch has {x.shape[0]} images")
        mask = torch.zeros(x.shape[0], 1, 1, 1, dtype=torch.bool, device=x.device)
        mask[chosen] = True
        return torch.where(mask, y, x)

    g.__name__ = f"only({chosen}, {getattr(fn, '__name__', 'fn')})"
    return g


# ==============================================================================================
# regularisers: applied to the picture after each optimisation step


def decay(rate: float = 0.01) -> Callable:
    """L2 decay: pull every pixel towards mid-grey, ``x <- 0.5 + (1 - rate) (x - 0.5)`` (Yosinski et al. 2015)."""
    if not 0 <= rate < 1:
        raise ValueError(f"decay rate must be in [0, 1), got {rate!r}")

    def r(x, step):
        return 0.5 + (1 - rate) * (x - 0.5)

    r.__name__ = f"decay({rate:g})"
    return r


def blur_every(every: int = 4, sigma: float = 0.5) -> Callable:
    """Periodic blur: every ``every`` steps, blur the picture with a Gaussian of std ``sigma`` (Yosinski et al. 2015)."""
    if not isinstance(every, int) or isinstance(every, bool) or every < 1:
        raise ValueError(f"every must be a positive int, got {every!r}")
    if not sigma > 0:
        raise ValueError(f"sigma must be positive, got {sigma!r}")

    def r(x, step):
        return gaussian_blur(x, sigma) if (step + 1) % every == 0 else x

    r.__name__ = f"blur_every({every}, {sigma:g})"
    return r


# ==============================================================================================
# parameterisations


class ImageParam:
    """A picture described by tensors the optimiser changes.

    ``image()`` -> (N, C, H, W) in [0, 1], differentiable w.r.t. ``parameters()``;
    ``set_image_(x)`` makes the parameters describe picture ``x`` (used by the regularisers and
    to start from a photo); ``project_()`` runs after every step.
    """

    shape: tuple[int, int, int, int]

    def parameters(self) -> list[torch.Tensor]:
        raise NotImplementedError

    def image(self) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def set_image_(self, x: torch.Tensor) -> None:
        raise NotImplementedError

    def project_(self) -> None:
        pass

    @torch.no_grad()
    def to_(self, device) -> ImageParam:
        """Move the parameters to ``device`` in place (before optimising); returns ``self``."""
        raise NotImplementedError


def _check_shape(shape) -> tuple[int, int, int, int]:
    if not (isinstance(shape, (tuple, list, torch.Size)) and len(shape) == 4 and all(isinstance(s, (int, np.integer)) and s > 0 for s in shape)):
        raise ValueError(f"an image shape is (N, C, H, W) of positive ints, got {shape!r}")
    return tuple(int(s) for s in shape)


def _check_init(init: torch.Tensor, shape) -> torch.Tensor:
    if not isinstance(init, torch.Tensor):
        raise TypeError(f"init must be an image tensor (N, C, H, W) in [0, 1], got {type(init).__name__}; use coursekit.load_image")
    init = init.detach().float()
    if init.dim() == 3:
        init = init[None]
    if init.shape[1:] != tuple(shape[1:]) or init.shape[0] not in (1, shape[0]):
        raise ValueError(f"init has shape {tuple(init.shape)}, the picture is {tuple(shape)}")
    if init.min() < -1e-6 or init.max() > 1 + 1e-6:
        raise ValueError(f"init must be in [0, 1], got values in [{float(init.min()):.3g}, {float(init.max()):.3g}]")
    return init.expand(shape).clamp(0, 1).clone()


class PixelImage(ImageParam):
    """Every pixel is a parameter; after each step pixels are clamped to [0, 1] (projected ascent)."""

    def __init__(self, shape, init: torch.Tensor | None = None, sd: float = 0.1, generator: torch.Generator | None = None):
        self.shape = _check_shape(shape)
        if init is None:
            x = (0.5 + sd * torch.randn(self.shape, generator=generator)).clamp(0, 1)
        else:
            x = _check_init(init, self.shape)
        self.x = x.requires_grad_(True)

    def parameters(self):
        return [self.x]

    def image(self):
        return self.x

    @torch.no_grad()
    def set_image_(self, x):
        self.x.copy_(x.clamp(0, 1))

    @torch.no_grad()
    def project_(self):
        self.x.clamp_(0, 1)

    @torch.no_grad()
    def to_(self, device):
        self.x = self.x.detach().to(device).requires_grad_(True)
        return self

    def __repr__(self):
        return f"PixelImage{self.shape}"


# Square root of the colour covariance of ImageNet photos (Olah et al. 2017, Lucid), columns
# normalised: decorrelated channels -> RGB.
_COLOR_SQRT = np.array([[0.26, 0.09, 0.02], [0.27, 0.00, -0.05], [0.27, -0.09, 0.03]], dtype=np.float32)
_COLOR_SQRT = torch.from_numpy(_COLOR_SQRT / np.max(np.linalg.norm(_COLOR_SQRT, axis=0)))


class FourierImage(ImageParam):
    """A picture described by its Fourier spectrum, scaled by 1/frequency, in decorrelated colours.

    ``image = sigmoid(M @ irfft2(scale * spectrum) / 4)`` where ``scale = 1 / max(f, 1/max(H, W))^decay_power``
    gives every frequency the energy it has in natural images, and ``M`` maps decorrelated
    colour channels to RGB. A gradient step then changes all frequencies about equally in
    *perceived* terms, so low frequencies (large structures) are no longer starved
    (Olah, Mordvintsev & Schubert 2017, "Feature Visualization", section "Preconditioning").
    """

    def __init__(self, shape, init: torch.Tensor | None = None, sd: float = 0.01, decay_power: float = 1.0,
                 decorrelate: bool = True, generator: torch.Generator | None = None):
        self.shape = _check_shape(shape)
        n, c, h, w = self.shape
        fy = torch.fft.fftfreq(h)[:, None]
        fx = torch.fft.rfftfreq(w)[None, :]
        freqs = torch.sqrt(fy**2 + fx**2)  # (H, W//2+1), cycles per pixel
        self.scale = 1.0 / freqs.clamp_min(1.0 / max(h, w)) ** decay_power  # (H, W//2+1)
        self.decorrelate = bool(decorrelate) and c == 3
        self.spectrum = (sd * torch.randn(n, c, h, w // 2 + 1, 2, generator=generator)).requires_grad_(True)
        if init is not None:
            self.set_image_(_check_init(init, self.shape))

    def parameters(self):
        return [self.spectrum]

    def image(self):
        _n, _c, h, w = self.shape
        spec = torch.view_as_complex(self.spectrum) * self.scale  # (N, C, H, W//2+1)
        lin = torch.fft.irfft2(spec, s=(h, w), norm="ortho") / 4.0  # (N, C, H, W)
        if self.decorrelate:
            lin = torch.einsum("ij,njhw->nihw", _COLOR_SQRT.to(lin), lin)
        return torch.sigmoid(lin)

    @torch.no_grad()
    def set_image_(self, x):
        lin = torch.logit(x.clamp(1e-4, 1 - 1e-4))
        if self.decorrelate:
            lin = torch.einsum("ij,njhw->nihw", torch.linalg.inv(_COLOR_SQRT).to(lin), lin)
        spec = torch.fft.rfft2(lin * 4.0, norm="ortho") / self.scale
        self.spectrum.copy_(torch.view_as_real(spec))

    @torch.no_grad()
    def to_(self, device):
        self.spectrum = self.spectrum.detach().to(device).requires_grad_(True)
        self.scale = self.scale.to(device)
        return self

    def __repr__(self):
        return f"FourierImage{self.shape}(decorrelate={self.decorrelate})"


class StackedImage(ImageParam):
    """Several parameterisations side by side in one batch (e.g. pixels for some images, Fourier for others)."""

    def __init__(self, parts: Sequence[ImageParam]):
        parts = list(parts)
        if not parts or not all(isinstance(p, ImageParam) for p in parts):
            raise TypeError("stack() needs a non-empty list of ImageParam (pixel_image(...), fourier_image(...))")
        if len({p.shape[1:] for p in parts}) != 1:
            raise ValueError(f"stacked pictures must share (C, H, W), got {[p.shape for p in parts]}")
        self.parts = parts
        self.sizes = [p.shape[0] for p in parts]
        self.shape = (sum(self.sizes),) + tuple(parts[0].shape[1:])

    def parameters(self):
        return [t for p in self.parts for t in p.parameters()]

    def image(self):
        return torch.cat([p.image() for p in self.parts])

    @torch.no_grad()
    def set_image_(self, x):
        for p, chunk in zip(self.parts, torch.split(x, self.sizes)):
            p.set_image_(chunk)

    @torch.no_grad()
    def project_(self):
        for p in self.parts:
            p.project_()

    @torch.no_grad()
    def to_(self, device):
        for p in self.parts:
            p.to_(device)
        return self

    def __repr__(self):
        return f"StackedImage({self.parts})"


def stack(parts: Sequence[ImageParam]) -> StackedImage:
    """One batch made of several parameterisations, in order (see :class:`StackedImage`)."""
    return StackedImage(parts)


def pixel_image(shape, init: torch.Tensor | None = None, sd: float = 0.1, seed: int = 0) -> PixelImage:
    """A pixel parameterisation of ``shape`` (N, C, H, W): grey plus noise of std ``sd``, or ``init``."""
    return PixelImage(shape, init=init, sd=sd, generator=torch.Generator().manual_seed(seed))


def fourier_image(shape, init: torch.Tensor | None = None, sd: float = 0.01, decay_power: float = 1.0,
                  decorrelate: bool = True, seed: int = 0) -> FourierImage:
    """A Fourier / decorrelated-colour parameterisation of ``shape`` (N, C, H, W), Olah et al. 2017."""
    return FourierImage(shape, init=init, sd=sd, decay_power=decay_power, decorrelate=decorrelate,
                        generator=torch.Generator().manual_seed(seed))


# ==============================================================================================
# the engine


@dataclass
class MaximizationResult:
    """What :func:`maximize` returns.

    Attributes
    ----------
    image : Tensor (N, C, H, W)
        The final picture in [0, 1], detached.
    history : Tensor (steps, N)
        The objective's value at every step (on the transformed picture the model saw).
    probabilities : Tensor (steps, N) or None
        Softmax probability of the tracked class at every step (``None`` without a class target).
    final_probabilities : Tensor (N,) or None
        Probability of the tracked class for the final, untransformed ``image``.
    target : the tracked class target, or None
    objective : str
        The objective, as text.
    """

    image: torch.Tensor
    history: torch.Tensor
    probabilities: torch.Tensor | None = None
    final_probabilities: torch.Tensor | None = None
    target: object = None
    objective: str = ""
    extras: dict = field(default_factory=dict)

    def plot_history(self, ax=None, labels: Sequence[str] | None = None):
        """Objective (and class probability, when tracked) against the step; returns the axes."""
        import matplotlib.pyplot as plt

        if ax is None:
            _, ax = plt.subplots(1, 2 if self.probabilities is not None else 1, figsize=(9 if self.probabilities is not None else 4.5, 3), squeeze=False)
            ax = list(ax.flat)
        ax = list(np.atleast_1d(ax))
        series = [(self.history, "objective")] + ([(self.probabilities, "probability of the target class")] if self.probabilities is not None else [])
        for a, (values, what) in zip(ax, series):
            for i in range(values.shape[1]):
                a.plot(values[:, i].numpy(), label=labels[i] if labels else None)
            a.set_xlabel("step")
            a.set_ylabel(what)
            a.set_title(what)
            if labels:
                a.legend(fontsize=7)
        ax[0].figure.tight_layout()
        return ax


_OPTIMIZERS = ("adam", "normalized_sgd")


@reference
def maximize(
    model: nn.Module,
    objective: Objective,
    *,
    param: ImageParam | None = None,
    size: int | tuple[int, int] | None = None,
    batch: int = 1,
    steps: int = 64,
    lr: float = 0.05,
    optimizer: str = "adam",
    transforms: Sequence[Callable] = (),
    regularizers: Sequence[Callable] = (),
    track=None,
    seed: int = 0,
    progress: bool = True,
) -> MaximizationResult:
    """Gradient ascent on a picture until ``objective`` is large: the one engine of this lecture.

    Every step: picture = ``param.image()``; apply each of ``transforms``; forward the model,
    recording the layers the objective needs; ascend the objective's gradient w.r.t. the
    picture's parameters (never the model's: it stays frozen, no weight gradient is computed);
    clamp / project; apply each of ``regularizers``.

    Parameters
    ----------
    model : nn.Module
        Maps (N, C, H, W) pictures in [0, 1] to logits, e.g. from :func:`coursekit.load_model`.
        It is run in eval mode and left exactly as it was.
    objective : Objective
        What to maximise, one value per image (see the ``objectives`` namespace).
    param : ImageParam, optional
        The parameterisation; default ``pixel_image((batch, C, size, size), seed=seed)``.
    size : int or (H, W), optional
        Picture size when ``param`` is not given (default: the model's input size).
    batch : int
        Number of pictures optimised together when ``param`` is not given.
    steps : int
        Number of ascent steps.
    lr : float
        Step size: Adam's learning rate, or for ``"normalized_sgd"`` the step taken along the
        gradient divided by its root-mean-square (per image), as in the Keras notebook.
    optimizer : {"adam", "normalized_sgd"}
    transforms : sequence of callables ``t(x, generator) -> x``
        Random differentiable transforms (:func:`jitter`, :func:`random_scale`, :func:`pad`).
    regularizers : sequence of callables ``r(x, step) -> x``
        Applied to the picture after every step (:func:`decay`, :func:`blur_every`).
    track : class target, optional
        Class whose probability is recorded; default: the objective's class target if it has one.
    seed : int
        Seeds the initial picture and the random transforms; same seed, same result.
    progress : bool
        Show a tqdm progress bar.

    Returns
    -------
    MaximizationResult
        ``image`` (N, C, H, W), ``history`` (steps, N), ``probabilities`` (steps, N) or None,
        ``final_probabilities`` (N,) or None.
    """
    check_model(model)
    if not isinstance(objective, Objective):
        raise TypeError(f"objective must be an Objective (see coursekit.maximize.objectives), got {type(objective).__name__}")
    if optimizer not in _OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {_OPTIMIZERS}, got {optimizer!r}")
    steps = positive_int(steps, "steps")
    if not lr > 0:
        raise ValueError(f"lr must be positive, got {lr!r}")
    for fn in list(transforms) + list(regularizers):
        if not callable(fn):
            raise TypeError(f"transforms and regularizers are callables, got {fn!r}")
    generator = torch.Generator().manual_seed(seed)
    if param is None:
        channels, h0, w0 = getattr(model, "input_size", (3, 224, 224))
        if size is None:
            size = (h0, w0)
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        batch = positive_int(batch, "batch")
        param = pixel_image((batch, channels, h, w), seed=seed)
    elif not isinstance(param, ImageParam):
        raise TypeError(f"param must be an ImageParam (pixel_image(...) or fourier_image(...)), got {type(param).__name__}")
    if track is None and objective.targets:
        distinct = {repr(t) for t in objective.targets}
        track = objective.targets[0] if len(distinct) == 1 else None
    device = next((t.device for t in model.parameters()), None) or next((b.device for b in model.buffers()), None)
    if device is not None and any(t.device != device for t in param.parameters()):
        param.to_(device)  # pictures live where the model does
    tensors = param.parameters()
    rule = Adam(lr) if optimizer == "adam" else NormalizedAscent(lr)
    probs: list[torch.Tensor] = []

    with guarded(model, what="maximize"):
        context = record(model, list(objective.layers)) if objective.layers else _no_record()
        with context as rec:
            last: dict[str, torch.Tensor] = {}

            def value_fn() -> torch.Tensor:  # (N,)
                x = param.image()
                inp = x
                for t in transforms:
                    inp = t(inp, generator)
                logits = model(inp)
                last["logits"] = logits.detach()
                ctx = Context(image=x, input=inp, logits=logits, activations=rec.outputs if rec else {})
                return objective(ctx)

            def after_step(step: int) -> None:
                param.project_()
                if regularizers:
                    pic = param.image()
                    for r in regularizers:
                        pic = r(pic, step)
                    param.set_image_(pic)

            def on_value(step: int, values: torch.Tensor) -> None:
                if track is not None:
                    probs.append(target_scores(last["logits"].softmax(1), track))

            history = ascend(value_fn, tensors, rule, steps, after_step=after_step, on_value=on_value,
                             progress=progress, desc=f"maximize {objective.name}")
        with torch.no_grad():
            image = param.image().detach().clone()
            final = target_scores(model(image).softmax(1), track) if track is not None else None
    return MaximizationResult(
        image=image,
        history=history,
        probabilities=torch.stack(probs) if probs else None,
        final_probabilities=final,
        target=track,
        objective=objective.name,
    )


class _no_record:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


# ==============================================================================================
# one step, written out (the Keras notebook's loop body); exercise maxresp.ascent_step


@reference
def ascent_step(model: nn.Module, x: torch.Tensor, target, lr: float = 1.0) -> torch.Tensor:
    """One normalised gradient-*ascent* step on the input, towards a larger score of ``target``.

    ``x_new = clamp(x + lr * g / rms(g), 0, 1)`` with ``g = d score / d x`` and ``rms(g)`` the
    root-mean-square of ``g`` over each image (so every image moves by ``lr`` per pixel on
    average, whatever the gradient's scale). ``+`` because we climb the score: a ``-`` would be
    gradient descent and make the class *less* likely.

    Parameters
    ----------
    model : nn.Module
        Frozen classifier on pictures in [0, 1].
    x : Tensor (N, C, H, W)
        Current pictures; not modified.
    target : int, per-image ints or callable
        The score to climb (see :func:`coursekit.models.target_scores`); typically a class logit.
    lr : float
        Step length per pixel (root-mean-square).

    Returns
    -------
    Tensor (N, C, H, W)
        The new pictures, in [0, 1], detached.
    """
    x = check_images(x, model=model)
    g = gradient(model, x, target, what="ascent_step")  # (N, C, H, W)
    rms = g.pow(2).flatten(1).mean(1).sqrt().clamp_min(1e-12).view(-1, *([1] * (g.dim() - 1)))
    return (x.detach() + lr * g / rms).clamp(0, 1)


# ==============================================================================================
# namespaces, so that a notebook can write objectives.channel(...), transforms.jitter(...)

objectives = SimpleNamespace(
    Objective=Objective,
    channel=channel,
    neuron=neuron,
    class_logit=class_logit,
    class_log_probability=class_log_probability,
    layer_energy=layer_energy,
    feature_match=feature_match,
    per_image=per_image,
    edge_energy_prior=edge_energy_prior,
    l2_prior=l2_prior,
    total_variation=total_variation,
)
transforms = SimpleNamespace(jitter=jitter, random_scale=random_scale, pad=pad, only=only)
regularizers = SimpleNamespace(decay=decay, blur_every=blur_every, only=only)
params = SimpleNamespace(pixel_image=pixel_image, fourier_image=fourier_image, stack=stack)
