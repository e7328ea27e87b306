"""The gradient path: score -> gradient w.r.t. the input or a layer, batched (bottom floor).

Every gradient-based method of the course goes through :func:`gradient`:

* saliency, gradient x input, guided backprop, DeconvNet, LRP (lectures 3-4): the input gradient,
  plain or with a :class:`coursekit.rules.Composite` of modified backward rules;
* Grad-CAM and its family: the gradient w.r.t. a layer's output (``layer=...``);
* attacks and input optimisation (lectures 2, 5, 6) use the same guard and input check.

An *attribution method* is any function ``method(model, x, target) -> (N, C, H, W)``.
:func:`smooth` (SmoothGrad, Smilkov et al. 2017) and :func:`integrate` (integrated gradients,
Sundararajan et al. 2017) wrap any of them, as captum's ``NoiseTunnel`` and zennit's ``SmoothGrad``
do: ``smooth(lrp_epsilon)`` is "SmoothGrad of LRP" with no new code.

Devices: every function here computes on the model's device (:func:`coursekit.model_device`).
Images, labels and maps given on another device (a CPU image for a CUDA model) are moved there;
returned tensors live on the model's device, as in captum; numbers, numpy arrays and figures are on
the CPU. Seeded random numbers are drawn on the CPU and moved, so a seed gives the same draws on
every device.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn

from ._reference import reference
from .batching import batches, rows
from .devices import cpu_generator
from .guard import guarded
from .hooks import get_layer, layer_outputs, record
from .inputs import (
    Unit,
    check_images,
    check_model,
    number,
    positive_int,
    target_indices,
    target_scores,
)
from .rules import Canonizer, Composite

__all__ = ["gradient", "layer_gradient", "smooth", "integrate", "path_points", "broadcast_baseline",
           "fast_layout"]


def fast_layout(x: torch.Tensor) -> torch.Tensor:
    """``x`` in channels-last memory layout on the CPU (same values, same shape).

    PyTorch's CPU convolutions then take their NHWC (oneDNN) paths; for depthwise convolutions
    (EfficientNet, MobileNet) that makes a forward + backward ~10 % faster, for plain CNNs it is
    neutral (measured with benchmarks/bench_saliency.py). Other devices keep their layout.
    """
    if x.device.type == "cpu" and x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    return x


@reference
def gradient(
    model: nn.Module,
    x: torch.Tensor,
    target,
    *,
    composite: Composite | None = None,
    canonizers: Sequence[Canonizer] = (),
    batch_size: int | None = None,
    what: str = "the gradient",
) -> torch.Tensor:
    """``d score / d x`` for a batch, plain or through modified backward rules.

    Parameters
    ----------
    model : nn.Module
        Maps ``(N, C, H, W)`` pixels to logits ``(N, K)``. Run in eval mode with frozen parameters
        and left exactly as it was (see :func:`coursekit.guard.guarded`).
    x : Tensor (N, C, H, W)
        Images; not modified (the gradient is taken w.r.t. a fresh copy). float64 is converted.
    target : int, sequence of int, Tensor (N,), callable ``output -> (N,)``, or Unit
        The score per image (:func:`coursekit.inputs.target_scores`), or a hidden unit
        (:class:`coursekit.inputs.Unit`: a channel of a layer, or one neuron); for a unit the forward
        pass stops at its layer.
    composite : Composite, optional
        Modified backward rules (guided backprop, DeconvNet, LRP); plain gradient when None.
    canonizers : sequence of Canonizer
        Reversible rewrites applied before the rules (and undone after, even on error).
    batch_size : int, optional
        Images per forward/backward pass (all at once when None).
    what : str
        The method's name, for warnings.

    Returns
    -------
    Tensor (N, C, H, W), detached.
    """
    check_model(model)
    x = check_images(x, model=model).detach()
    targets = target_indices(target, x.shape[0])
    if batch_size is not None:
        batch_size = positive_int(batch_size, "batch_size")
    structural = bool(canonizers)
    values = any(getattr(c, "writes_tensors", True) for c in canonizers)  # swapping modules only: no value copies
    with guarded(model, inplace_off=composite is not None, structure=structural, values=values, what=what):
        undo = []
        try:
            for c in canonizers:
                undo.append(c.apply(model))
            if composite is None:
                return _batched_grad(model, x, targets, batch_size)
            with composite.applied(model):
                return _batched_grad(model, x, targets, batch_size)
        finally:
            for u in reversed(undo):
                u()


def _batched_grad(model, x, targets, batch_size) -> torch.Tensor:
    if batch_size is None or batch_size >= x.shape[0]:
        return _scores_and_grad(model, x, targets)
    return torch.cat([_scores_and_grad(model, x[a:b], rows(targets, a, b)) for a, b in batches(x.shape[0], batch_size)])


def _scores_and_grad(model: nn.Module, x: torch.Tensor, target) -> torch.Tensor:
    """d target_scores / d x; the caller has frozen the parameters."""
    xi = fast_layout(x.detach()).requires_grad_(True)  # fresh leaf, never written: x is untouched
    with torch.enable_grad():
        if isinstance(target, Unit):  # a hidden unit: run the model only as far as its layer
            with layer_outputs(model, [target.layer]) as run:
                scores = target.scores(run(xi)[target.layer])  # (N,)
        else:
            scores = target_scores(model(xi), target)  # (N,)
        if not scores.requires_grad:
            raise ValueError("the target score does not depend on the input (is the target a constant?)")
        (grad,) = torch.autograd.grad(scores.sum(), xi)  # images are independent: sum = per image
    return grad.detach().contiguous()  # back to the usual layout


@reference
def layer_gradient(model: nn.Module, x: torch.Tensor, target, layer, *, what: str = "the layer gradient"):
    """A layer's output ``A`` and ``d score / d A`` from one forward and a partial backward pass.

    The backward pass stops at the layer: with frozen parameters and an input that does not
    require grad, nothing before the layer needs a gradient, so its output becomes a leaf.

    Parameters
    ----------
    model, x, target
        As in :func:`gradient`.
    layer : str or nn.Module
        A layer of ``model`` (:func:`coursekit.hooks.get_layer`).

    Returns
    -------
    (Tensor, Tensor)
        Activations and gradients, each of the layer's output shape, detached.
    """
    check_model(model)
    x = check_images(x, model=model).detach()
    name, _ = get_layer(model, layer)
    with guarded(model, inplace_off=True, what=what), record(model, [name], gradients=True) as rec:
        # the guard freezes the parameters and x needs no gradient, so record makes the layer's
        # output a leaf: the backward pass stops there
        with torch.enable_grad():
            scores = target_scores(model(fast_layout(x)), target)  # (N,)
        if name not in rec.outputs:
            raise RuntimeError(f"layer {name!r} was not used in the forward pass; choose another layer")
        if not scores.requires_grad:
            raise ValueError(f"the target score does not depend on layer {name!r}")
        (grad,) = torch.autograd.grad(scores.sum(), rec.outputs[name])
    return rec.activations[name], grad.detach()


# ----------------------------------------------------------------------------------------------
# wrappers that turn any attribution method into its smoothed / path-integrated version


def smooth(method: Callable, n_samples: int = 25, noise_level: float = 0.15, batch_size: int = 16,
           seed: int | None = None, magnitude: bool = False, noise: torch.Tensor | None = None) -> Callable:
    """SmoothGrad of any attribution method (Smilkov et al. 2017): its average over noisy copies.

    ``S(x) = 1/n sum_i method(x + eps_i)``, ``eps_i ~ N(0, sigma^2)``,
    ``sigma = noise_level * (x.max() - x.min())`` per image (the noise scaled to each image's range).

    Parameters
    ----------
    method : callable ``(model, x, target) -> (N, C, H, W)``
    n_samples : int
        Noisy copies per image.
    noise_level : float
        Noise std as a fraction of each image's value range; 0 gives ``method`` itself.
    batch_size : int
        Noisy copies per call of ``method`` (the copies of all images are pooled).
    seed : int, optional
        Seed of a private CPU generator (the global CPU RNG is used and advanced when None); the noise
        is drawn on the CPU and moved to the model's device, so a seed gives the same noise everywhere.
    magnitude : bool
        Average ``|method(...)|`` (captum's ``NoiseTunnel`` default ``abs=True`` for saliency).
    noise : Tensor (N, n_samples, C, H, W), optional
        Explicit, already scaled noise; sample ``k`` of image ``n`` is ``x[n] + noise[n, k]``
        (the order of captum's ``NoiseTunnel``). Overrides ``n_samples``, ``noise_level``, ``seed``.

    Returns
    -------
    callable ``(model, x, target) -> (N, C, H, W)``
    """
    batch_size = positive_int(batch_size, "batch_size")
    if noise is None:
        n_samples = positive_int(n_samples, "n_samples")
        noise_level = number(noise_level, "noise_level", minimum=0, unit="a fraction of the value range")

    @functools.wraps(method)
    def smoothed(model, x, target):
        check_model(model)
        x = check_images(x, model=model).detach()
        n_img = x.shape[0]
        samples = n_samples
        if noise is not None:
            if not isinstance(noise, torch.Tensor) or noise.dim() != 5 or noise.shape[0] != n_img or noise.shape[2:] != x.shape[1:]:
                shape = tuple(noise.shape) if isinstance(noise, torch.Tensor) else type(noise).__name__
                raise ValueError(
                    f"noise must have shape (N, n_samples, C, H, W) = ({n_img}, n_samples, "
                    f"{', '.join(map(str, x.shape[1:]))}), got {shape}"
                )
            samples = noise.shape[1]
        # the noise is drawn on the CPU (seeded: the same noise on every device), then moved to x's device
        generator = cpu_generator(seed) if noise is None and seed is not None else None
        sigma = noise_level * (x.amax(dim=(1, 2, 3)) - x.amin(dim=(1, 2, 3))) if noise is None else None  # (N,)
        targets = target_indices(target, n_img, samples)
        total = n_img * samples
        acc = torch.zeros_like(x)  # (N, C, H, W)
        for start, stop in batches(total, batch_size):
            owner = torch.arange(start, stop, device=x.device) // samples  # image of each sample
            if noise is not None:
                eps = noise.reshape(total, *x.shape[1:])[start:stop].to(x)
            else:
                eps = torch.randn((stop - start, *x.shape[1:]), generator=generator, device="cpu", dtype=x.dtype).to(x.device)
                eps = eps * sigma[owner].view(-1, 1, 1, 1)
            a = method(model, x[owner] + eps, rows(targets, start, stop))  # (B, C, H, W)
            acc.index_add_(0, owner, a.abs() if magnitude else a)
        return acc / samples

    smoothed.__name__ = f"smooth({getattr(method, '__name__', 'method')})"
    return smoothed


def path_points(steps: int, method: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions ``alpha`` in [0, 1] along the path and the quadrature weights (sum 1)."""
    if method == "gausslegendre":
        nodes, weights = np.polynomial.legendre.leggauss(steps)  # on [-1, 1]
        alphas, w = (nodes + 1) / 2, weights / 2
    elif method == "riemann_trapezoid":
        if steps < 2:
            raise ValueError("the trapezoid quadrature needs steps >= 2")
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
    return torch.as_tensor(alphas, dtype=torch.float64, device="cpu"), torch.as_tensor(w, dtype=torch.float64, device="cpu")


def broadcast_baseline(baseline, x: torch.Tensor) -> torch.Tensor:
    """``None`` (black), a number, or a tensor broadcastable to ``x`` -> a tensor shaped like ``x``."""
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


def integrate(method: Callable, baseline=None, steps: int = 32, batch_size: int = 32,
              quadrature: str = "gausslegendre") -> Callable:
    """Integrated version of any attribution method (Sundararajan et al. 2017 for the gradient).

    ``I(x) = (x - b) * sum_k w_k method(b + a_k (x - b))`` over ``steps`` quadrature points of the
    straight path from the baseline ``b`` to ``x``. With ``method`` = the input gradient this is
    integrated gradients, whose attributions sum to ``score(x) - score(b)`` (completeness).

    Parameters
    ----------
    method : callable ``(model, x, target) -> (N, C, H, W)``
    baseline : None, float or Tensor
        None is black (zeros) in pixel space.
    steps : int
    batch_size : int
        Path points per call of ``method`` (the points of all images are pooled).
    quadrature : str
        How the path integral is summed (``"gausslegendre"``, ``"riemann_trapezoid"``, ...), see
        :func:`path_points`. (Called a quadrature *rule* in numerics; named ``quadrature`` here, as
        "rule" means an LRP backward rule in this course.)
    """
    steps = positive_int(steps, "steps")
    batch_size = positive_int(batch_size, "batch_size")
    path_points(steps, quadrature)  # validate now

    @functools.wraps(method)
    def integrated(model, x, target):
        check_model(model)
        x = check_images(x, model=model).detach()
        base = broadcast_baseline(baseline, x)  # (N, C, H, W)
        alphas, weights = path_points(steps, quadrature)
        alphas, weights = alphas.to(x), weights.to(x)
        n_img = x.shape[0]
        targets = target_indices(target, n_img, steps)
        acc = torch.zeros_like(x)
        for start, stop in batches(n_img * steps, batch_size):
            idx = torch.arange(start, stop, device=x.device)
            owner, k = idx // steps, idx % steps  # image and path point of each row
            a = alphas[k].view(-1, 1, 1, 1)
            points = base[owner] + a * (x[owner] - base[owner])  # (B, C, H, W)
            g = method(model, points, rows(targets, start, stop))
            acc.index_add_(0, owner, g * weights[k].view(-1, 1, 1, 1))
        return (x - base) * acc

    integrated.__name__ = f"integrate({getattr(method, '__name__', 'method')})"
    return integrated
