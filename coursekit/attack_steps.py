"""The one FGSM step (plumbing): the gradient of a value with respect to the input, and a sign step along it.

Lecture 5's :func:`coursekit.adversarial.fgsm`, :func:`coursekit.robustness.eps_sweep` and
:func:`coursekit.robustness.adversarial_loss`, and :mod:`coursekit.train`'s adversarial training
(FGSM from a random start, Wong, Rice & Kolter 2020) all take this step; the step itself is
:func:`coursekit.optimize.sign_step`, which the iterative attacks' :class:`coursekit.optimize.SignStep`
takes too. The value to ascend is the caller's (cross-entropy, the Carlini-Wagner margin, a targeted
loss): this module knows no lecture.

Nothing here puts the model in eval mode or freezes it: the attacks call it inside
:func:`coursekit.guard.guarded`, adversarial training on purpose in train mode. Only the input's
gradient is taken (``torch.autograd.grad``), so the parameters' ``.grad`` are never touched.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ._reference import reference
from .optimize import sign_step

__all__ = ["input_gradient", "fgsm_step"]


@reference  # blocked with the attacks while a student's FGSM runs (exercise set 05_adversarial)
def input_gradient(model: nn.Module, x: torch.Tensor, objective: Callable[[torch.Tensor], torch.Tensor], *,
                   retain_graph: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's output at ``x`` and ``d sum(objective(output)) / dx``: one forward, one backward.

    Parameters
    ----------
    model : nn.Module
        Run as it is (its mode untouched).
    x : Tensor (N, C, H, W)
        Not modified; the gradient is taken at a detached copy.
    objective : callable (logits (N, K)) -> Tensor (N,) or a scalar
        The value to ascend; a scalar (a mean loss) gives the same signs as the summed per-image values.
    retain_graph : bool
        Keep the graph so that the returned output can be back-propagated again (adversarial training
        trains on the clean loss with the same forward).

    Returns
    -------
    (Tensor (N, K), Tensor (N, C, H, W))
        The output (still attached to the graph when ``retain_graph``) and the input gradient.
    """
    xi = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        output = model(xi)  # (N, K)
        (grad,) = torch.autograd.grad(objective(output).sum(), xi, retain_graph=retain_graph)
    return output if retain_graph else output.detach(), grad


def fgsm_step(model: nn.Module, x: torch.Tensor, objective: Callable[[torch.Tensor], torch.Tensor],
              step_size: float, *, start: torch.Tensor | None = None, eps: float | None = None, norm: str = "linf",
              box=(0.0, 1.0), retain_graph: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """One fast-gradient step (Goodfellow, Shlens & Szegedy 2015) up ``objective``, from ``start``.

    ``start + step_size * sign(grad)`` (L-inf; ``grad / ||grad||_2`` under L2), the gradient taken at
    ``start`` (default ``x``), then projected onto the ``eps``-ball around ``x`` when ``eps`` is given
    and into ``box`` (:func:`coursekit.optimize.sign_step`). FGSM is ``start = x``, ``step_size = eps``;
    "fast is better than free" adversarial training (Wong et al. 2020) starts from a uniform point of
    the ball, clamped into the box, with ``step_size = 1.25 * eps``.

    Returns
    -------
    (Tensor (N, C, H, W), Tensor (N, K))
        The stepped images (detached) and the model's output at ``start`` (see :func:`input_gradient`).
    """
    start = x if start is None else start
    output, grad = input_gradient(model, start, objective, retain_graph=retain_graph)
    with torch.no_grad():
        x_new = sign_step(start.detach(), grad, step_size, norm=norm, origin=None if eps is None else x.detach(),
                          eps=eps, box=box)
    return x_new, output
