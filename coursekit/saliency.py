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

Contract shared by every function: ``model`` is any ``nn.Module`` that maps ``(N, C, H, W)``
images in [0, 1] to logits ``(N, K)`` (a :class:`~coursekit.models.CourseModel` or a plain
network). The model is left exactly as it was (mode, ``requires_grad``, ``inplace`` flags, no
hooks left behind), even when the call raises. No weight gradient is computed and no
parameter's ``.grad`` is touched: the parameters are frozen for the duration of the call and
gradients are taken with ``torch.autograd.grad`` w.r.t. a fresh copy of ``x`` only. The model's
train/eval mode is *not* changed: pass a model in eval mode (``load_model`` does that), or
dropout / batch-norm make the explanations random and batch-dependent.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ._common import _check_batch as _check_x
from ._common import _check_model, _positive_int
from .checks import reference
from .models import target_scores

__all__ = [
    "REDUCTIONS",
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
# shared plumbing


def _per_sample_target(target, n_images: int, repeats: int):
    """``target`` for a batch in which every image is repeated ``repeats`` times (image-major)."""
    if callable(target) and not isinstance(target, torch.Tensor):
        return target
    if isinstance(target, bool) or target is None:
        raise TypeError(f"target must be a class index or a callable output -> score, got {target!r}")
    idx = torch.as_tensor(target)
    if idx.is_floating_point():
        raise TypeError(f"target class indices must be integers, got {target!r}")
    idx = idx.long().reshape(-1)
    if idx.numel() == 1:
        return idx
    if idx.numel() != n_images:
        raise ValueError(f"got {idx.numel()} targets for a batch of {n_images} images")
    return idx.repeat_interleave(repeats)


def _slice_target(target, start: int, stop: int):
    if isinstance(target, torch.Tensor) and target.numel() > 1:
        return target[start:stop]
    return target


def _fast_layout(x: torch.Tensor) -> torch.Tensor:
    """``x`` in channels-last memory layout on the CPU (same values, same shape).

    PyTorch's CPU convolutions then take their NHWC (oneDNN) paths; for depthwise convolutions
    (EfficientNet, MobileNet) that makes a forward + backward ~10 % faster, for plain CNNs it is
    neutral (measured with benchmarks/bench_saliency.py). Other devices keep their layout.
    """
    if x.device.type == "cpu" and x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    return x


def _scores_and_grad(model: nn.Module, x: torch.Tensor, target) -> torch.Tensor:
    """d target_scores / d x for a batch; the caller has frozen the parameters."""
    xi = _fast_layout(x.detach()).requires_grad_(True)  # fresh leaf, never written: x is untouched
    with torch.enable_grad():
        scores = target_scores(model(xi), target)  # (N,)
        (grad,) = torch.autograd.grad(scores.sum(), xi)  # images are independent: sum = per image
    return grad.detach().contiguous()  # back to the usual layout


@contextlib.contextmanager
def _frozen(model: nn.Module, inplace_off: bool = False) -> Iterator[nn.Module]:
    """Inside: no parameter requires grad (and, with ``inplace_off``, no module works in place).

    Restores exactly the flags it changed, in ``finally``. This is :func:`coursekit.hooks.preserved`
    narrowed to what these functions touch: they never change train/eval modes, and writing back
    every module's mode costs ~3 ms on EfficientNet-Lite0 (275 modules), 10 % of a forward pass.
    A frozen model (``load_model``) and a model without in-place modules need no change at all.
    """
    thawed: list[torch.Tensor] = []
    in_place: list[nn.Module] = []
    try:
        for m in model.modules():
            for p in m._parameters.values():
                if p is not None and p.requires_grad:
                    p.requires_grad_(False)
                    thawed.append(p)
            if inplace_off and getattr(m, "inplace", None) is True:
                m.inplace = False
                in_place.append(m)
        yield model
    finally:
        for p in thawed:
            p.requires_grad_(True)
        for m in in_place:
            m.inplace = True


# ----------------------------------------------------------------------------------------------
# maps from attributions

REDUCTIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "max_abs": lambda a: a.abs().amax(dim=1),  # Simonyan et al. 2014
    "abs_sum": lambda a: a.abs().sum(dim=1),
    "sum": lambda a: a.sum(dim=1),  # signed; the natural choice for gradient x input / IG
    "abs_of_sum": lambda a: a.sum(dim=1).abs(),
    "max": lambda a: a.amax(dim=1),
    "mean": lambda a: a.mean(dim=1),
    "l2": lambda a: a.pow(2).sum(dim=1).sqrt(),
}


def to_map(attribution: torch.Tensor, reduce: str = "max_abs") -> torch.Tensor:
    """Collapse the channels of an attribution ``(N, C, H, W)`` into one map ``(N, H, W)``.

    Parameters
    ----------
    attribution : Tensor (N, C, H, W)
    reduce : str
        ``"max_abs"`` (max over channels of the absolute value; Simonyan et al. 2014),
        ``"abs_sum"``, ``"sum"`` (signed), ``"abs_of_sum"``, ``"max"``, ``"mean"`` or ``"l2"``
        (Euclidean norm over channels).

    Returns
    -------
    Tensor (N, H, W), detached.
    """
    if not isinstance(attribution, torch.Tensor) or attribution.dim() != 4:
        shape = tuple(attribution.shape) if isinstance(attribution, torch.Tensor) else type(attribution).__name__
        raise ValueError(f"to_map expects an attribution of shape (N, C, H, W), got {shape}")
    if reduce not in REDUCTIONS:
        raise ValueError(f"unknown reduce={reduce!r}; choose one of {sorted(REDUCTIONS)}")
    return REDUCTIONS[reduce](attribution.detach())


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
    _check_model(model)
    x = _check_x(x)
    with _frozen(model):
        return _scores_and_grad(model, x, target)


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
    Tensor (N, C, H, W), detached.
    """
    return input_gradient(model, x, target) * x.detach()


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
    _check_model(model)
    x = _check_x(x)
    n_img = x.shape[0]
    batch_size = _positive_int(batch_size, "batch_size")
    if noise is not None:
        if not isinstance(noise, torch.Tensor) or noise.dim() != 5 or noise.shape[0] != n_img or noise.shape[2:] != x.shape[1:]:
            shape = tuple(noise.shape) if isinstance(noise, torch.Tensor) else type(noise).__name__
            raise ValueError(
                f"noise must have shape (N, n_samples, C, H, W) = ({n_img}, n_samples, {', '.join(map(str, x.shape[1:]))}), got {shape}"
            )
        n_samples = noise.shape[1]
    else:
        n_samples = _positive_int(n_samples, "n_samples")
        if not isinstance(noise_level, (int, float)) or isinstance(noise_level, bool) or noise_level < 0:
            raise ValueError(f"noise_level must be a non-negative number (a fraction of the value range), got {noise_level!r}")
    generator = None
    if noise is None and seed is not None:
        generator = torch.Generator(device=x.device).manual_seed(int(seed))
    x = x.detach()
    sigma = noise_level * (x.amax(dim=(1, 2, 3)) - x.amin(dim=(1, 2, 3))) if noise is None else None  # (N,)
    targets = _per_sample_target(target, n_img, n_samples)
    total = n_img * n_samples
    acc = torch.zeros_like(x)  # (N, C, H, W)
    with _frozen(model):
        for start in range(0, total, batch_size):
            stop = min(start + batch_size, total)
            owner = torch.arange(start, stop, device=x.device) // n_samples  # image of each sample
            if noise is not None:
                eps = noise.reshape(total, *x.shape[1:])[start:stop].to(x)
            else:
                eps = torch.randn((stop - start, *x.shape[1:]), generator=generator, device=x.device, dtype=x.dtype)
                eps = eps * sigma[owner].view(-1, 1, 1, 1)
            g = _scores_and_grad(model, x[owner] + eps, _slice_target(targets, start, stop))  # (B, C, H, W)
            if magnitude:
                g = g.abs()
            acc.index_add_(0, owner, g)
    return acc / n_samples


# ----------------------------------------------------------------------------------------------
# Integrated gradients


def _path_points(steps: int, method: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions ``alpha`` in [0, 1] along the path and the quadrature weights (sum 1)."""
    if method == "gausslegendre":
        nodes, weights = np.polynomial.legendre.leggauss(steps)  # on [-1, 1]
        alphas, w = (nodes + 1) / 2, weights / 2
    elif method == "riemann_trapezoid":
        if steps < 2:
            raise ValueError("the trapezoid rule needs steps >= 2")
        alphas = np.linspace(0, 1, steps)
        w = np.full(steps, 1 / (steps - 1))
        w[[0, -1]] /= 2
    elif method in ("riemann_left", "riemann_right", "riemann_middle"):
        shift = {"riemann_left": 0.0, "riemann_right": 1.0, "riemann_middle": 0.5}[method]
        alphas = (np.arange(steps) + shift) / steps
        w = np.full(steps, 1 / steps)
    else:
        raise ValueError(
            f"unknown method={method!r}; choose 'gausslegendre', 'riemann_trapezoid', 'riemann_left', "
            "'riemann_right' or 'riemann_middle'"
        )
    return torch.as_tensor(alphas, dtype=torch.float64), torch.as_tensor(w, dtype=torch.float64)


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
    _check_model(model)
    x = _check_x(x).detach()
    steps = _positive_int(steps, "steps")
    batch_size = _positive_int(batch_size, "batch_size")
    base = _broadcast_baseline(baseline, x)  # (N, C, H, W)
    alphas, weights = _path_points(steps, method)
    alphas, weights = alphas.to(x), weights.to(x)
    n_img = x.shape[0]
    total = n_img * steps
    targets = _per_sample_target(target, n_img, steps)
    acc = torch.zeros_like(x)
    with _frozen(model):
        for start in range(0, total, batch_size):
            stop = min(start + batch_size, total)
            idx = torch.arange(start, stop, device=x.device)
            owner, k = idx // steps, idx % steps  # image and path point of each row
            a = alphas[k].view(-1, 1, 1, 1)
            points = base[owner] + a * (x[owner] - base[owner])  # (B, C, H, W)
            g = _scores_and_grad(model, points, _slice_target(targets, start, stop))
            acc.index_add_(0, owner, g * weights[k].view(-1, 1, 1, 1))
    return (x - base) * acc


def _broadcast_baseline(baseline, x: torch.Tensor) -> torch.Tensor:
    if baseline is None:
        return torch.zeros_like(x)
    if isinstance(baseline, (int, float)) and not isinstance(baseline, bool):
        return torch.full_like(x, float(baseline))
    if isinstance(baseline, torch.Tensor):
        try:
            return torch.broadcast_to(baseline.detach().to(x), x.shape).contiguous()
        except RuntimeError:
            raise ValueError(
                f"baseline of shape {tuple(baseline.shape)} does not broadcast to x's shape {tuple(x.shape)}"
            ) from None
    raise TypeError(f"baseline must be None, a number or a tensor broadcastable to x, got {type(baseline).__name__}")


# ----------------------------------------------------------------------------------------------
# Guided backprop and deconvnet: modified ReLU backward passes


class _DeconvRule(torch.autograd.Function):
    """``clamp(z, 0, upper)`` forward; ``grad_in = relu(grad_out)`` backward, the forward mask is
    ignored (Zeiler & Fergus 2014), for ReLU (``upper=None``) and ReLU6 (``upper=6``) alike."""

    @staticmethod
    def forward(ctx, z, upper):
        return z.clamp(min=0) if upper is None else z.clamp(0, upper)

    @staticmethod
    def backward(ctx, grad_out):
        return grad_out.clamp(min=0), None


def _positive_part(grad: torch.Tensor) -> torch.Tensor:
    return grad.clamp(min=0)


def _guided_hook(module, inputs, output):
    # The module's own backward multiplies by its forward mask ([z > 0] for ReLU, [0 < z < 6] for
    # ReLU6); keeping only the positive part of the gradient arriving at its output before that
    # gives relu(grad_out) * mask: guided backpropagation, at the cost of one clamp per activation.
    if output.requires_grad:
        output.register_hook(_positive_part)


def _deconv_hook(module, inputs, output):
    # Replace the activation's backward: recompute the (cheap) clamp through _DeconvRule, whose
    # backward ignores the forward mask; the module's own output is discarded.
    return _DeconvRule.apply(inputs[0], 6.0 if type(module) is nn.ReLU6 else None)


def _rectifiers(model: nn.Module, rule: str = "guided") -> list[nn.Module]:
    """The nn.ReLU / nn.ReLU6 modules of ``model`` (exact types: a subclass may compute something else);
    ValueError when there are none."""
    found = [m for m in model.modules() if type(m) in (nn.ReLU, nn.ReLU6)]
    if not found:
        raise ValueError(
            f"{type(model).__name__} has no nn.ReLU or nn.ReLU6 modules, so the {rule} backward rule cannot be "
            "attached (activations called as functions, e.g. F.relu or torch.relu inside forward, are invisible "
            "to hooks). Rewrite the model with nn.ReLU modules, or use input_gradient for plain gradients."
        )
    return found


def _modified_relu_gradient(model: nn.Module, x: torch.Tensor, target, rule: str) -> torch.Tensor:
    _check_model(model)
    x = _check_x(x)
    rectifiers = _rectifiers(model, rule)
    hook = _guided_hook if rule == "guided" else _deconv_hook
    handles = []
    # in-place ReLUs are switched off inside (and restored after): the hooks need z and the output apart
    with _frozen(model, inplace_off=True):
        try:
            for m in rectifiers:
                handles.append(m.register_forward_hook(hook))
            return _scores_and_grad(model, x, target)
        finally:
            for h in handles:
                h.remove()


def _guided_backprop(model, x, target):
    return _modified_relu_gradient(model, x, target, "guided")


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
    return _guided_backprop(model, x, target)


def deconvnet(model: nn.Module, x: torch.Tensor, target) -> torch.Tensor:
    """DeconvNet attribution (Zeiler & Fergus 2014), as a modified backward pass.

    At every ``nn.ReLU`` / ``nn.ReLU6`` module the backward pass applies the rectifier to the
    gradient and ignores the forward input: ``grad_in = relu(grad_out)``. Same module
    requirements as :func:`guided_backprop`.

    Returns
    -------
    Tensor (N, C, H, W), detached.
    """
    return _modified_relu_gradient(model, x, target, "deconvnet")


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
    batch_size: int = 64,
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
        Occluded images per forward pass.
    progress : bool
        Show a tqdm progress bar over the batches.
    score : str
        ``"prob"`` (softmax probability, as in the paper) or ``"logit"``.

    Returns
    -------
    Tensor (N, H, W), detached.
    """
    _check_model(model)
    x = _check_x(x).detach()
    n_img, _, h, w = x.shape
    patch = _positive_int(patch, "patch")
    stride = _positive_int(stride, "stride")
    batch_size = _positive_int(batch_size, "batch_size")
    if patch > h or patch > w:
        raise ValueError(f"patch={patch} is larger than the image ({h}x{w}); choose patch <= {min(h, w)}")
    if score not in ("prob", "logit"):
        raise ValueError(f"score must be 'prob' or 'logit', got {score!r}")
    base = _broadcast_baseline(baseline, x)  # (N, C, H, W)
    rows = torch.tensor(_window_starts(h, patch, stride), device=x.device)
    cols = torch.tensor(_window_starts(w, patch, stride), device=x.device)
    n_win = len(rows) * len(cols)  # window k sits at (rows[k // len(cols)], cols[k % len(cols)])
    ys, xs = torch.arange(h, device=x.device), torch.arange(w, device=x.device)
    row_in = ((ys >= rows[:, None]) & (ys < rows[:, None] + patch)).to(x.dtype)  # (n_rows, H)
    col_in = ((xs >= cols[:, None]) & (xs < cols[:, None] + patch)).to(x.dtype)  # (n_cols, W)
    coverage = row_in.sum(0)[:, None] * col_in.sum(0)[None, :]  # (H, W) windows covering each pixel

    def evaluate(batch: torch.Tensor, tgt) -> torch.Tensor:
        out = model(batch)
        if score == "prob":
            out = out.softmax(dim=1)
        return target_scores(out, tgt)

    targets = _per_sample_target(target, n_img, n_win)
    totals = torch.zeros(n_img, h, w, dtype=x.dtype, device=x.device)
    total = n_img * n_win
    with _frozen(model), torch.inference_mode():
        plain = evaluate(_fast_layout(x), _per_sample_target(target, n_img, 1))  # (N,) unoccluded scores
        if plain.shape[0] != n_img:
            raise ValueError(f"the target must give one score per image, got shape {tuple(plain.shape)}")
        bar = tqdm(total=total, desc="occlusion", unit="window", disable=not progress, leave=False)
        try:
            for start in range(0, total, batch_size):
                stop = min(start + batch_size, total)
                idx = torch.arange(start, stop, device=x.device)
                owner, k = idx // n_win, idx % n_win
                m = (row_in[k // len(cols), :, None] * col_in[k % len(cols), None, :])[:, None]  # (B, 1, H, W)
                batch = _fast_layout(x[owner] * (1 - m) + base[owner] * m)  # (B, C, H, W)
                drop = plain[owner] - evaluate(batch, _slice_target(targets, start, stop))  # (B,)
                totals.index_add_(0, owner, drop.view(-1, 1, 1) * m[:, 0])
                bar.update(stop - start)
        finally:
            bar.close()
    return totals / coverage.clamp(min=1)
