"""Objectives for maximal response: what a picture should make the network do, and image priors.

Lecture 2. An :class:`Objective` maps one step's :class:`Context` (picture, model input, logits,
recorded layer outputs) to one differentiable score per image, to be *maximised* by
:func:`coursekit.maximize.maximize`. Objectives compose with ``+ - *`` and scalars, as in Lucent:
``channel("net.blocks.3", 5) + 0.5 * class_logit(65)``.

* units of the network: :func:`channel`, :func:`neuron`, :func:`layer_energy`, :func:`class_logit`,
  :func:`class_log_probability`, :func:`feature_match`; :func:`per_image` gives every image of the
  batch its own objective;
* image priors, to subtract: :func:`edge_energy_prior`, :func:`l2_prior`, :func:`total_variation`;
* measures of a picture: :func:`edge_energy` (Fleuret's multi-scale edge energy, an exercise
  reference), :func:`high_frequency_energy`, :func:`relative_l2`.

References
----------
Erhan, Bengio, Courville & Vincent (2009), Visualizing higher-layer features of a deep network.
Simonyan, Vedaldi & Zisserman (2014), Deep inside convolutional networks.
Mahendran & Vedaldi (2015), Understanding deep image representations by inverting them.
Olah, Mordvintsev & Schubert (2017), Feature visualization. Distill.
Fleuret (2018), AMMI Introduction to Deep Learning, 8.4 "Optimizing inputs".
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ._reference import reference
from .inputs import target_indices, target_scores
from .registry import Registry

__all__ = ["Context", "Objective", "OBJECTIVES", "edge_energy", "high_frequency_energy", "relative_l2"]  # + every objective
# One decorated factory per objective: in __all__ here and in coursekit.maximize (and its
# ``objectives`` namespace), in the README's method table and in the tests parametrised over OBJECTIVES.
OBJECTIVES = Registry("objective", exports=__all__)


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


@OBJECTIVES.register
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


@OBJECTIVES.register
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


@OBJECTIVES.register
def class_logit(target) -> Objective:
    """The logit of class ``target`` (an int, one int per image, or a callable ``logits -> (N,)``).

    Maximising the logit rather than the probability is the usual choice (Simonyan et al. 2014):
    the probability can also rise by pushing the other classes down.
    """
    return Objective(lambda ctx: target_scores(ctx.logits, target), (), f"class_logit({target!r})", [target])


@OBJECTIVES.register
def class_log_probability(target) -> Objective:
    """``log softmax(logits)[target]``: rises only when the class wins against the others."""
    return Objective(lambda ctx: target_scores(ctx.logits.log_softmax(1), target), (), f"class_log_probability({target!r})", [target])


@OBJECTIVES.register
def layer_energy(layer: str) -> Objective:
    """Mean squared activation of a whole layer (DeepDream's objective, Mordvintsev et al. 2015)."""
    layer = _check_layer(layer)
    return Objective(lambda ctx: _layer_output(ctx, layer).pow(2).flatten(1).mean(1), [layer], f"layer_energy({layer!r})")


@OBJECTIVES.register
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


@OBJECTIVES.register
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


@OBJECTIVES.register
def edge_energy_prior() -> Objective:
    """Fleuret's multi-scale edge energy :func:`edge_energy` of the picture, as an objective.

    It is a *penalty*: subtract it, ``class_logit(700) - 1e-3 * edge_energy_prior()``.
    """
    return Objective(lambda ctx: edge_energy(ctx.image), (), "edge_energy")


@OBJECTIVES.register
def l2_prior() -> Objective:
    """Sum over pixels of ``(x - 0.5)^2``: the L2 penalty (decay towards mid-grey) as an objective to subtract."""
    return Objective(lambda ctx: (ctx.image - 0.5).pow(2).flatten(1).sum(1), (), "l2")


@OBJECTIVES.register
def total_variation(beta: float = 2.0) -> Objective:
    """Sum of ``(dx^2 + dy^2)^(beta/2)`` over pixels, Mahendran & Vedaldi's TV^beta prior (to subtract)."""

    def fn(ctx):
        x = ctx.image
        dx = x[..., :-1, 1:] - x[..., :-1, :-1]
        dy = x[..., 1:, :-1] - x[..., :-1, :-1]
        return (dx.pow(2) + dy.pow(2) + 1e-8).pow(beta / 2).flatten(1).sum(1)

    return Objective(fn, (), f"tv{beta:g}")



# ==============================================================================================
# measures of a picture: the edge-energy prior, high-frequency energy, relative change


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
