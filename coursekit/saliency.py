"""Gradient and perturbation attribution: which input pixels does a class score depend on?

Lecture 3 ("where does the network look?"). Every method here explains one scalar per image,
the *target score* (a class logit, or any function of the output: see
:func:`coursekit.models.target_scores`), and returns detached tensors:

========================  ==============  =====================================================
method                    returns         idea
========================  ==============  =====================================================
:func:`input_gradient`    (N, C, H, W)    d score / d pixel, one forward + backward
:func:`vanilla_saliency`  (N, H, W)       max over channels of ``|gradient|`` (Simonyan 2014)
:func:`gradient_x_input`  (N, C, H, W)    gradient * input (Shrikumar et al. 2016)
:func:`smoothgrad`        (N, C, H, W)    gradient averaged over noisy copies (Smilkov 2017)
:func:`integrated_gradients` (N,C,H,W)    path integral from a baseline (Sundararajan 2017)
:func:`guided_backprop`   (N, C, H, W)    ReLU backward keeps positive gradients only
                                          (Springenberg et al. 2015)
:func:`deconvnet`         (N, C, H, W)    ReLU backward ignores the forward mask
                                          (Zeiler & Fergus 2014)
:func:`occlusion`         (N, H, W)       drop in probability when a patch is hidden
                                          (Zeiler & Fergus 2014)
========================  ==============  =====================================================

:func:`to_map` turns a ``(N, C, H, W)`` attribution into one ``(N, H, W)`` map per image.

``target`` may also be a hidden unit, :class:`Unit` ``(layer, channel, position=None)``: the gradient
methods (all but occlusion) then explain that unit's activation instead of a class score, as Zeiler &
Fergus (2014) and Springenberg et al. (2015) did for single units of hidden layers.

Contract shared by every function: ``model`` is any ``nn.Module`` that maps ``(N, C, H, W)``
images in [0, 1] to logits ``(N, K)`` (a :class:`~coursekit.models.CourseModel` or a plain
network). The model is left exactly as it was (mode, ``requires_grad``, ``inplace`` flags, no
hooks left behind), even when the call raises. No weight gradient is computed and no
parameter's ``.grad`` is touched: the parameters are frozen for the duration of the call and
gradients are taken with ``torch.autograd.grad`` w.r.t. a fresh copy of ``x`` only. A model in
train mode is evaluated in eval mode, with a warning, and put back (:mod:`coursekit.guard`).

Built on the shared plumbing: :mod:`coursekit.gradients` (the gradient path, SmoothGrad and
integrated gradients as wrappers of any method) and :mod:`coursekit.rules` (guided backprop and
DeconvNet are composites of the rules engine).

Devices: every function here computes on the model's device (:func:`coursekit.model_device`).
Images, labels and maps given on another device (a CPU image for a CUDA model) are moved there;
returned tensors live on the model's device, as in captum; numbers, numpy arrays and figures are on
the CPU. Seeded random numbers are drawn on the CPU and moved, so a seed gives the same draws on
every device.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ._reference import reference
from .batching import batches
from .gradients import broadcast_baseline, fast_layout, gradient, integrate, smooth
from .guard import guarded
from .inputs import Unit, check_images, check_model, positive_int, target_indices, target_scores
from .maps import REDUCTIONS, to_map  # re-exported: lecture 3 reaches them as coursekit.saliency.*
from .progress import progress_bar
from .rules import DECONVNET, GUIDED

__all__ = [
    "REDUCTIONS",
    "Unit",
    "deconvnet",
    "gradient_x_input",
    "guided_backprop",
    "input_gradient",
    "integrated_gradients",
    "occlusion",
    "smoothgrad",
    "to_map",
    "vanilla_saliency",
]


# ----------------------------------------------------------------------------------------------
# plain gradients


def input_gradient(model: nn.Module, x: torch.Tensor, target) -> torch.Tensor:
    """Gradient of the target score w.r.t. the input pixels, one forward + backward for the batch.

    Parameters
    ----------
    model : nn.Module
        Maps ``(N, C, H, W)`` images in [0, 1] to logits ``(N, K)``.
    x : Tensor (N, C, H, W)
        Images in [0, 1]. Not modified; the gradient is taken w.r.t. a fresh copy.
    target : int, sequence of int, Tensor (N,), or callable ``output -> (N,)``
        Which score to explain, as in :func:`coursekit.models.target_scores`.

    Returns
    -------
    Tensor (N, C, H, W)
        ``d score_n / d x_n``, detached.
    """
    return gradient(model, x, target, what="input_gradient")


@reference
def vanilla_saliency(model: nn.Module, x: torch.Tensor, target) -> torch.Tensor:
    """Image-specific class saliency map (Simonyan, Vedaldi & Zisserman 2014).

    ``M[n, i, j] = max_c | d score_n / d x[n, c, i, j] |``: how strongly a small change of pixel
    (i, j), in its most sensitive colour channel, changes the class score.

    Parameters
    ----------
    model, x, target
        As in :func:`input_gradient`.

    Returns
    -------
    Tensor (N, H, W), non-negative, detached.
    """
    return to_map(input_gradient(model, x, target), "max_abs")


def gradient_x_input(model: nn.Module, x: torch.Tensor, target) -> torch.Tensor:
    """Gradient times input (Shrikumar et al. 2016): ``x * d score / d x``.

    Note that the model takes pixels in [0, 1], so the "input" multiplied here is the pixel
    value, not the normalised network input: black pixels get zero attribution.

    Returns
    -------
    Tensor (N, C, H, W), detached, on the model's device.
    """
    g = input_gradient(model, x, target)
    return g * x.detach().to(g)  # x moved to the gradient's device and dtype


# ----------------------------------------------------------------------------------------------
# SmoothGrad


@reference
def smoothgrad(
    model: nn.Module,
    x: torch.Tensor,
    target,
    n_samples: int = 25,
    noise_level: float = 0.15,
    batch_size: int = 16,
    seed: int | None = None,
    magnitude: bool = False,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """SmoothGrad (Smilkov et al. 2017): the input gradient averaged over noisy copies of the image.

    ``SG(x) = 1/n sum_i g(x + eps_i)`` with ``eps_i ~ N(0, sigma^2)`` and
    ``sigma = noise_level * (x.max() - x.min())`` per image: the noise is scaled to the image's
    own range (the paper's recommendation of 10-20 %), not an absolute standard deviation.

    Parameters
    ----------
    model, x, target
        As in :func:`input_gradient`.
    n_samples : int
        Noisy copies per image (the paper finds 25-50 enough).
    noise_level : float
        Noise standard deviation as a fraction of each image's value range; 0 gives the plain gradient.
    batch_size : int
        Noisy copies per forward/backward pass (all images' copies are pooled into batches).
    seed : int, optional
        Seed of a private ``torch.Generator`` for the noise (the global RNG is used when None
        and is then advanced).
    magnitude : bool
        Average ``|gradient|`` instead of the signed gradient (what captum's
        ``NoiseTunnel(Saliency(model))`` does with its default ``abs=True``).
    noise : Tensor (N, n_samples, C, H, W), optional
        Explicit additive noise (already scaled); overrides ``n_samples``, ``noise_level`` and
        ``seed``. Sample ``k`` of image ``n`` is ``x[n] + noise[n, k]``, the order in which
        captum's ``NoiseTunnel`` draws ``torch.normal`` for ``x.repeat_interleave(n_samples, 0)``,
        so ``noise.reshape(N * n_samples, C, H, W)`` is that tensor.

    Returns
    -------
    Tensor (N, C, H, W), detached.
    """
    return smooth(input_gradient, n_samples=n_samples, noise_level=noise_level, batch_size=batch_size, seed=seed,
                  magnitude=magnitude, noise=noise)(model, x, target)


# ----------------------------------------------------------------------------------------------
# Integrated gradients


def integrated_gradients(
    model: nn.Module,
    x: torch.Tensor,
    target,
    baseline: torch.Tensor | float | None = None,
    steps: int = 32,
    batch_size: int = 32,
    method: str = "gausslegendre",
) -> torch.Tensor:
    """Integrated gradients (Sundararajan, Taly & Yan 2017).

    ``IG(x) = (x - b) * integral_0^1 d score / d x (b + a (x - b)) da``, the integral
    approximated by a quadrature rule over ``steps`` points of the straight path from the
    baseline ``b`` to ``x``. The attributions of an image sum (approximately) to
    ``score(x) - score(b)`` (completeness).

    Parameters
    ----------
    model, x, target
        As in :func:`input_gradient`.
    baseline : Tensor broadcastable to x, float, or None
        The "absence of signal" image; None means black (zeros) in pixel space.
    steps : int
        Points on the path.
    batch_size : int
        Path points per forward/backward pass (points of all images are pooled).
    method : str
        ``"gausslegendre"`` (default, as captum), ``"riemann_trapezoid"``, ``"riemann_left"``,
        ``"riemann_right"`` or ``"riemann_middle"``. The trapezoid rule here is the textbook one
        (points ``linspace(0, 1, steps)``, weights ``1/(steps-1)``, halved at the ends); captum's
        uses weights ``1/steps`` at the same points, i.e. ``(steps-1)/steps`` times this.

    Returns
    -------
    Tensor (N, C, H, W), detached.
    """
    return integrate(input_gradient, baseline=baseline, steps=steps, batch_size=batch_size, quadrature=method)(model, x, target)


# ----------------------------------------------------------------------------------------------
# Guided backprop and deconvnet: modified ReLU backward passes


@reference
def guided_backprop(model: nn.Module, x: torch.Tensor, target) -> torch.Tensor:
    """Guided backpropagation (Springenberg, Dosovitskiy, Brox & Riedmiller 2015).

    The input gradient, except that at every ReLU the backward pass keeps only positive
    gradients where the forward input was positive:
    ``grad_in = relu(grad_out) * [z > 0]``. For ``nn.ReLU6`` (timm's EfficientNet-Lite) the
    forward mask is ReLU6's own, ``[0 < z < 6]``: ``grad_in = relu(grad_out) * [0 < z < 6]``.
    (captum's ``GuidedBackprop`` only hooks ``nn.ReLU`` and silently leaves ReLU6 plain.)

    Only activations that are ``nn.ReLU`` / ``nn.ReLU6`` *modules* can be modified; calls to
    ``F.relu`` / ``torch.relu`` inside ``forward`` are invisible to hooks and keep their plain
    gradient. A model with no such module at all raises ``ValueError`` instead of silently
    returning plain gradients. In-place ReLUs are switched off during the call and restored after.

    Parameters
    ----------
    model, x, target
        As in :func:`input_gradient`.

    Returns
    -------
    Tensor (N, C, H, W), detached.
    """
    return gradient(model, x, target, composite=GUIDED, what="guided_backprop")


def deconvnet(model: nn.Module, x: torch.Tensor, target) -> torch.Tensor:
    """DeconvNet attribution (Zeiler & Fergus 2014), as a modified backward pass.

    At every ``nn.ReLU`` / ``nn.ReLU6`` module the backward pass applies the rectifier to the
    gradient and ignores the forward input: ``grad_in = relu(grad_out)``. Same module
    requirements as :func:`guided_backprop`.

    Returns
    -------
    Tensor (N, C, H, W), detached.
    """
    return gradient(model, x, target, composite=DECONVNET, what="deconvnet")


# ----------------------------------------------------------------------------------------------
# Occlusion


def _window_starts(size: int, patch: int, stride: int) -> list[int]:
    # ceil((size - patch) / stride) + 1 windows, the last one cropped at the border (captum's grid)
    count = math.ceil((size - patch) / stride) + 1
    return [k * stride for k in range(count)]


@reference
def occlusion(
    model: nn.Module,
    x: torch.Tensor,
    target,
    patch: int = 16,
    stride: int = 8,
    baseline: float | torch.Tensor = 0.0,
    batch_size: int = 4,
    progress: bool = True,
    score: str = "prob",
) -> torch.Tensor:
    """Occlusion sensitivity (Zeiler & Fergus 2014): how much does hiding a patch hurt the class?

    A ``patch x patch`` square slides over the image with step ``stride``; inside it the pixels
    are replaced by ``baseline``. For every window the drop ``s(x) - s(x_occluded)`` of the
    target's score is computed, and each pixel gets the mean drop over the windows that cover it.
    Windows start at ``0, stride, 2 stride, ...``; there are ``ceil((H - patch) / stride) + 1`` per
    axis and the last one is cropped at the border (the grid of captum's ``Occlusion``), so every
    pixel is covered when ``stride <= patch``. Positive values: hiding the region lowers the score.

    Parameters
    ----------
    model, x, target
        As in :func:`input_gradient`. With ``score="prob"`` a callable target receives the
        softmax probabilities instead of the logits.
    patch : int
        Side of the square patch in pixels.
    stride : int
        Step between windows in pixels.
    baseline : float or Tensor broadcastable to (C, H, W) / (N, C, H, W)
        What replaces the hidden pixels (0 = black; the image mean is a softer choice).
    batch_size : int
        Occluded images per forward pass. Chosen by measurement, not maximised: on a CPU a large
        batch costs more per image (EfficientNet-Lite0, 49 windows at 224 px, CPU time against 50
        batch-1 forward passes: 1.05 at batch 1, 0.94-0.96 at 2-4, 1.20 at 16, 1.85 at 64).
    progress : bool
        Show a tqdm progress bar over the batches.
    score : str
        ``"prob"`` (softmax probability, as in the paper; ``"probability"`` is the same, the
        spelling of :mod:`coursekit.faithfulness`) or ``"logit"``.

    Returns
    -------
    Tensor (N, H, W), detached.
    """
    check_model(model)
    x = check_images(x, model=model).detach()
    n_img, _, h, w = x.shape
    patch = positive_int(patch, "patch")
    stride = positive_int(stride, "stride")
    batch_size = positive_int(batch_size, "batch_size")
    if patch > h or patch > w:
        raise ValueError(f"patch={patch} is larger than the image ({h}x{w}); choose patch <= {min(h, w)}")
    if score not in ("prob", "probability", "logit"):
        raise ValueError(f"score must be 'prob' (or 'probability') or 'logit', got {score!r}")
    base = broadcast_baseline(baseline, x)  # (N, C, H, W)
    rows = torch.tensor(_window_starts(h, patch, stride), device=x.device)
    cols = torch.tensor(_window_starts(w, patch, stride), device=x.device)
    n_win = len(rows) * len(cols)  # window k sits at (rows[k // len(cols)], cols[k % len(cols)])
    ys, xs = torch.arange(h, device=x.device), torch.arange(w, device=x.device)
    row_in = ((ys >= rows[:, None]) & (ys < rows[:, None] + patch)).to(x.dtype)  # (n_rows, H)
    col_in = ((xs >= cols[:, None]) & (xs < cols[:, None] + patch)).to(x.dtype)  # (n_cols, W)
    coverage = row_in.sum(0)[:, None] * col_in.sum(0)[None, :]  # (H, W) windows covering each pixel

    def evaluate(batch: torch.Tensor, tgt) -> torch.Tensor:
        out = model(batch)
        if score != "logit":
            out = out.softmax(dim=1)
        return target_scores(out, tgt)

    targets = target_indices(target, n_img, n_win)
    totals = torch.zeros(n_img, h, w, dtype=x.dtype, device=x.device)
    total = n_img * n_win
    with guarded(model, what="occlusion"), torch.inference_mode():
        plain = evaluate(fast_layout(x), target_indices(target, n_img))  # (N,) unoccluded scores
        if plain.shape[0] != n_img:
            raise ValueError(f"the target must give one score per image, got shape {tuple(plain.shape)}")
        bar = progress_bar(total=total, progress=progress, desc="occlusion", unit="window", leave=False)
        try:
            for start, stop in batches(total, batch_size):
                idx = torch.arange(start, stop, device=x.device)
                owner, k = idx // n_win, idx % n_win
                m = (row_in[k // len(cols), :, None] * col_in[k % len(cols), None, :])[:, None]  # (B, 1, H, W)
                batch = fast_layout(x[owner] * (1 - m) + base[owner] * m)  # (B, C, H, W)
                drop = plain[owner] - evaluate(batch, targets[start:stop] if isinstance(targets, torch.Tensor) else targets)  # (B,)
                totals.index_add_(0, owner, drop.view(-1, 1, 1) * m[:, 0])
                bar.update(stop - start)
        finally:
            bar.close()
    return totals / coverage.clamp(min=1)
