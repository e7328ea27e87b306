"""DeepDream: change a photo so that a layer sees more of what it already sees (lecture 6).

Mordvintsev, Olah & Tyka (2015), "Inceptionism: going deeper into neural networks". Pick a layer,
and climb the gradient of its *energy* (the mean squared activation,
:func:`coursekit.maximize.layer_energy`) with respect to the pixels: whatever the layer faintly
detects gets amplified. The tricks that make the pictures good, each a separate piece here:

==================  ===========================================================================
trick               where
==================  ===========================================================================
octaves             :func:`coursekit.optimize.octaves`: dream on a small copy first, carry the
                    detail up an image pyramid (large structures, not only pixel-scale texture)
random shifts       :func:`coursekit.maximize.jitter` before every forward pass (no grid artefacts)
normalised steps    :class:`coursekit.optimize.NormalizedAscent`: every step moves the pixels by
                    ``lr`` on average, whatever the layer's gradient scale
gradient smoothing  :class:`SmoothedAscent`: blur the gradient before the step (fewer
                    high-frequency speckles)
==================  ===========================================================================

The objective is any :class:`coursekit.maximize.Objective` on the layers (``layer_energy``,
``channel``, their sums, or :func:`guide` for a guided dream towards another picture's features).
Only the layers the objective needs are computed: :func:`layer_outputs` stops the forward pass
after the deepest of them, so a dream on an early block costs a fraction of the whole network.

    from coursekit import dream
    result = dream.deepdream(model, photo, "net.blocks.3", n_octaves=3, steps=10)
    result.image                                  # (1, 3, H, W) in [0, 1]

:func:`dream_step` is one step written out (the exercise ``dream.step``).

Devices: every function here computes on the model's device (:func:`coursekit.model_device`).
Images, labels and maps given on another device (a CPU image for a CUDA model) are moved there;
returned tensors live on the model's device, as in captum; numbers, numpy arrays and figures are on
the CPU. Seeded random numbers are drawn on the CPU and moved, so a seed gives the same draws on
every device.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from ._reference import reference
from .devices import cpu_generator
from .guard import guarded
from .hooks import (  # layer_outputs re-exported: lecture 6 uses dream.layer_outputs
    check_layer_name,
    layer_outputs,
)
from .image_params import jitter
from .images import gaussian_blur
from .inputs import check_images, check_model, number, positive_int
from .objectives import Context, Objective, layer_energy
from .optimize import NormalizedAscent, ascend, normalized, octaves

__all__ = [
    "DreamResult",
    "SmoothedAscent",
    "deepdream",
    "dream_step",
    "guide",
    "layer_outputs",
]


# ==============================================================================================
# features of named layers, computed only as far as needed


# ==============================================================================================
# objectives and optimisers


def guide(layer: str, guide_features: torch.Tensor) -> Objective:
    """A guided dream (Mordvintsev et al. 2015): make every position look like its best match in a guide.

    For each position ``p`` of the picture's features ``a_p`` (a C-vector) take the guide position
    ``q`` with the largest dot product ``<a_p, g_q>``, and maximise the mean of those best matches
    over ``p``. The picture then grows the guide's features wherever it has something like them.

    Parameters
    ----------
    layer : str
    guide_features : Tensor (1, C, H', W')
        The layer's output for the guide picture (any size).
    """
    layer = check_layer_name(layer)
    if not isinstance(guide_features, torch.Tensor) or guide_features.dim() != 4 or guide_features.shape[0] != 1:
        raise ValueError(f"guide_features must be one image's feature map (1, C, H, W), got {getattr(guide_features, 'shape', guide_features)!r}")
    g = guide_features.detach().flatten(2)[0]  # (C, Q)

    def fn(ctx):
        a = ctx.activations[layer]  # (N, C, H, W)
        if a.shape[1] != g.shape[0]:
            raise ValueError(f"{layer!r} has {a.shape[1]} channels, the guide's features {g.shape[0]}")
        dots = torch.einsum("ncp,cq->npq", a.flatten(2), g.to(a))  # (N, P, Q)
        return dots.amax(2).mean(1)

    return Objective(fn, [layer], f"guide({layer!r})")


class SmoothedAscent(NormalizedAscent):
    """:class:`coursekit.optimize.NormalizedAscent` on a blurred gradient.

    The gradient of a deep layer's energy w.r.t. the pixels is full of pixel-scale speckle; blurring
    it with a Gaussian of std ``sigma`` pixels before the normalised step keeps the structure and
    drops the speckle (the "gradient smoothing" of most DeepDream implementations). ``sigma=0``
    is plain normalised ascent.
    """

    def __init__(self, lr: float = 0.02, sigma: float = 1.0):
        super().__init__(lr)
        self.sigma = number(sigma, "sigma", minimum=0, unit="pixels")

    def step(self, tensors, grads):
        if self.sigma > 0:
            grads = [gaussian_blur(g, self.sigma) for g in grads]
        super().step(tensors, grads)


# ==============================================================================================
# the dream


@dataclass
class DreamResult:
    """What :func:`deepdream` returns.

    Attributes
    ----------
    image : Tensor (N, C, H, W)
        The dream, in [0, 1].
    history : list of Tensor (steps, N)
        The objective at every step of each octave, smallest octave first.
    sizes : list of (H, W)
        The picture size of each octave.
    seconds : float
        Wall time of the whole dream.
    """

    image: torch.Tensor
    history: list = field(default_factory=list)
    sizes: list = field(default_factory=list)
    seconds: float = 0.0


def _objective(target) -> Objective:
    if isinstance(target, Objective):
        return target
    if isinstance(target, str):
        return layer_energy(target)
    if isinstance(target, (list, tuple)) and target and all(isinstance(t, str) for t in target):
        return sum(layer_energy(t) for t in target)
    raise TypeError(f"dream a layer name ('net.blocks.3'), a list of names, or an Objective; got {target!r}")


@reference
def deepdream(
    model: nn.Module,
    image: torch.Tensor,
    target="net.blocks.3",
    *,
    n_octaves: int = 3,
    octave_scale: float = 1.4,
    steps: int = 10,
    lr: float = 0.02,
    jitter_pixels: int = 8,
    smooth: float = 1.0,
    seed: int = 0,
    progress: bool = True,
) -> DreamResult:
    """DeepDream (Mordvintsev et al. 2015): amplify what ``target`` sees in ``image``.

    For each octave of :func:`coursekit.optimize.octaves` (smallest first): ``steps`` normalised
    ascent steps on the objective, each on a randomly shifted copy of the picture (``jitter``),
    with the gradient blurred by ``smooth`` pixels (:class:`SmoothedAscent`), pixels clamped to
    [0, 1] after every step.

    Parameters
    ----------
    model : nn.Module
        Takes (N, 3, H, W) pictures in [0, 1]; left exactly as it was.
    image : Tensor (N, 3, H, W)
        The photo (or noise) to dream on, in [0, 1].
    target : str, list of str, or Objective
        A layer name (its energy :func:`coursekit.maximize.layer_energy` is climbed), several
        names (the sum of their energies), or any objective on layers (``channel``, :func:`guide`).
    n_octaves, octave_scale : int, float
        The image pyramid: ``n_octaves`` sizes, each ``octave_scale`` times the previous.
    steps : int
        Ascent steps per octave.
    lr : float
        Mean step per pixel (root-mean-square of the change), in [0, 1] pixel units.
    jitter_pixels : int
        Largest random shift before each forward pass.
    smooth : float
        Std (pixels) of the Gaussian blur applied to the gradient; 0 switches smoothing off.
    seed : int
        Seeds the random shifts.
    progress : bool
        A tqdm bar per octave.

    Returns
    -------
    DreamResult
    """
    check_model(model)
    image = check_images(image, "image", model=model, pixel_range=True).detach()
    objective = _objective(target)
    if not objective.layers:
        raise ValueError(f"the objective {objective.name} uses no layer; DeepDream climbs a layer's activations")
    if objective.targets:
        raise ValueError(f"the objective {objective.name} involves class scores; DeepDream uses layer objectives only")
    steps = positive_int(steps, "steps")
    if not lr > 0:
        raise ValueError(f"lr must be positive, got {lr!r}")
    shift = jitter(jitter_pixels)
    generator = cpu_generator(seed)
    history, sizes = [], []
    start = time.perf_counter()
    with guarded(model, what="deepdream"), layer_outputs(model, objective.layers) as extract:

        def run(picture: torch.Tensor, octave: int) -> torch.Tensor:
            x = picture.detach().clamp(0, 1).requires_grad_(True)

            def value_fn():
                shifted = shift(x, generator)
                acts = extract(shifted)
                return objective(Context(image=x, input=shifted, logits=None, activations=acts))

            def after_step(step):
                x.clamp_(0, 1)

            history.append(ascend(value_fn, [x], SmoothedAscent(lr, smooth), steps, after_step=after_step,
                                  progress=progress, desc=f"dream octave {octave + 1}/{n_octaves}"))
            sizes.append(tuple(x.shape[-2:]))
            return x.detach()

        out = octaves(image, run, n_octaves=n_octaves, scale=octave_scale)
    return DreamResult(image=out.clamp(0, 1), history=history, sizes=sizes, seconds=time.perf_counter() - start)


# ==============================================================================================
# one step, written out (exercise dream.step)


@reference
def dream_step(features: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, shift: tuple[int, int],
               lr: float = 0.02) -> torch.Tensor:
    """One DeepDream step: roll, climb the layer's energy, roll back, normalised step, clamp.

    1. ``xs = torch.roll(x, shifts=shift, dims=(2, 3))`` (a random shift in practice);
    2. energy ``E = mean(features(xs) ** 2)`` per image, gradient ``g = dE/dx`` (the roll is undone
       by differentiating through it);
    3. ``x_new = clamp(x + lr * g / rms(g), 0, 1)``, ``rms`` per image: the root-mean-square of
       ``g`` over its channels and pixels.

    Parameters
    ----------
    features : callable (N, C, H, W) -> (N, K, h, w)
        The network up to the dreamed layer.
    x : Tensor (N, C, H, W)
        Pictures in [0, 1]; not modified.
    shift : (int, int)
        Rows and columns to roll by.
    lr : float
        Mean step per pixel.

    Returns
    -------
    Tensor (N, C, H, W), detached, in [0, 1].
    """
    x = x.detach().clone().requires_grad_(True)
    xs = torch.roll(x, shifts=tuple(shift), dims=(2, 3))
    energy = features(xs).pow(2).flatten(1).mean(1)  # (N,)
    (g,) = torch.autograd.grad(energy.sum(), x)
    return (x.detach() + normalized(g, lr)).clamp(0, 1)
