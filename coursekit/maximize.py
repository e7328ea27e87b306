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

The pieces live in :mod:`coursekit.objectives` (objectives, priors, edge energy) and
:mod:`coursekit.image_params` (parameterisations, transforms, regularisers); this module holds
the engine and re-exports every piece, so ``coursekit.maximize.<name>`` keeps working. The
namespaces ``objectives``, ``transforms``, ``regularizers`` and ``params`` collect them::

    from coursekit.maximize import maximize, objectives, transforms, regularizers, params
    obj = objectives.class_logit(700) - 2e-3 * objectives.edge_energy_prior()
    result = maximize(model, obj, size=128, steps=48, transforms=[transforms.jitter(4)])
    result.image, result.history, result.probabilities

Also here: :func:`edge_energy`, Fleuret's multi-scale edge-energy penalty
``h(x) = sum_s ||delta^s(x) - g * delta^s(x)||^2``; :func:`high_frequency_energy`, the measure of
"noisiness" used to compare visualisations; :func:`ascent_step`, one normalised gradient-ascent
step as in the Keras notebook; :func:`gaussian_blur` (from :mod:`coursekit.images`).

References
----------
Erhan, Bengio, Courville & Vincent (2009), Visualizing higher-layer features of a deep network.
Simonyan, Vedaldi & Zisserman (2014), Deep inside convolutional networks.
Yosinski, Clune, Nguyen, Fuchs & Lipson (2015), Understanding neural networks through deep visualization.
Mahendran & Vedaldi (2015), Understanding deep image representations by inverting them.
Olah, Mordvintsev & Schubert (2017), Feature visualization. Distill.
Fleuret (2018), AMMI Introduction to Deep Learning, 8.4 "Optimizing inputs".

Devices: every function here computes on the model's device (:func:`coursekit.model_device`).
Images, labels and maps given on another device (a CPU image for a CUDA model) are moved there;
returned tensors live on the model's device, as in captum; numbers, numpy arrays and figures are on
the CPU. Seeded random numbers are drawn on the CPU and moved, so a seed gives the same draws on
every device.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import SimpleNamespace

import numpy as np
import torch
from torch import nn

from . import objectives  # the module itself: objectives.channel(...) in a notebook
from ._reference import reference
from .devices import cpu_generator, model_device
from .gradients import gradient
from .guard import guarded
from .hooks import record
from .image_params import (  # re-exported: coursekit.maximize.* keeps every name of lecture 2
    FourierImage,
    ImageParam,
    PixelImage,
    StackedImage,
    blur_every,
    decay,
    fourier_image,
    jitter,
    only,
    pad,
    pixel_image,
    random_scale,
    stack,
)
from .images import gaussian_blur
from .inputs import check_images, check_model, positive_int, target_scores
from .objectives import (  # re-exported
    OBJECTIVES,
    Context,
    Objective,
    edge_energy,
    high_frequency_energy,
    relative_l2,
)
from .optimize import Adam, NormalizedAscent, ascend, normalized

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
    "decay",
    "edge_energy",
    "fourier_image",
    "gaussian_blur",
    "high_frequency_energy",
    "jitter",
    "maximize",
    "objectives",
    "only",
    "pad",
    "params",
    "pixel_image",
    "random_scale",
    "regularizers",
    "relative_l2",
    "stack",
    "transforms",
    *(method.__name__ for _, method in OBJECTIVES.items()),  # every registered objective
]
# every registered objective, so a notebook can write maximize.channel(...) as before
globals().update({method.__name__: method for _, method in OBJECTIVES.items()})


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
                a.plot(values[:, i].cpu().numpy(), label=labels[i] if labels else None)
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
    _check_maximize_arguments(model, objective, optimizer, steps, lr, transforms, regularizers)
    generator = cpu_generator(seed)
    param = _default_param(model, param, size, batch, seed)
    if track is None and objective.targets:
        distinct = {repr(t) for t in objective.targets}
        track = objective.targets[0] if len(distinct) == 1 else None
    param.to_(model_device(model))  # pictures live where the model does (made on the CPU, seeded there)
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


def _check_maximize_arguments(model, objective, optimizer, steps, lr, transforms, regularizers) -> None:
    """The argument checks of :func:`maximize`: a clear error naming the bad value."""
    check_model(model)
    if not isinstance(objective, Objective):
        raise TypeError(f"objective must be an Objective (see coursekit.maximize.objectives), got {type(objective).__name__}")
    if optimizer not in _OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {_OPTIMIZERS}, got {optimizer!r}")
    positive_int(steps, "steps")
    if not lr > 0:
        raise ValueError(f"lr must be positive, got {lr!r}")
    for fn in list(transforms) + list(regularizers):
        if not callable(fn):
            raise TypeError(f"transforms and regularizers are callables, got {fn!r}")


def _default_param(model, param, size, batch: int, seed: int) -> ImageParam:
    """``param`` itself, or pixels of the model's input size (or ``size``) for ``batch`` pictures."""
    if param is None:
        channels, h0, w0 = getattr(model, "input_size", (3, 224, 224))
        if size is None:
            size = (h0, w0)
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        return pixel_image((positive_int(batch, "batch"), channels, h, w), seed=seed)
    if not isinstance(param, ImageParam):
        raise TypeError(f"param must be an ImageParam (pixel_image(...) or fourier_image(...)), got {type(param).__name__}")
    return param


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
    return (x.detach() + lr * normalized(g)).clamp(0, 1)


# ==============================================================================================
# namespaces, so that a notebook can write objectives.channel(...), transforms.jitter(...);
# `objectives` is the module coursekit.objectives itself (one name, one thing)

transforms = SimpleNamespace(jitter=jitter, random_scale=random_scale, pad=pad, only=only)
regularizers = SimpleNamespace(decay=decay, blur_every=blur_every, only=only)
params = SimpleNamespace(pixel_image=pixel_image, fourier_image=fourier_image, stack=stack)
