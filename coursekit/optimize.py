"""The input-optimisation engine: change a picture (not the model) until a value is large (bottom floor).

One loop serves every lecture that optimises an input:

* lecture 2 — class visualisation, feature inversion (:func:`coursekit.maximize.maximize`): Adam
  or normalised gradient ascent;
* lecture 5 — FGSM / BIM / PGD: a sign step (L-inf) or a normalised step (L2) followed by a
  projection onto the epsilon-ball and the [0, 1] box (:func:`sign_step`, :class:`SignStep`);
  MI-FGSM the same step along a momentum (:class:`MomentumSignStep`, an optimiser with state);
* lecture 6 — DeepDream (normalised ascent over :func:`octaves`, an image pyramid) and style
  transfer (L-BFGS).

The pieces::

    optimizer = SignStep(step_size=2/255, eps=8/255, origin=x)      # an optimiser (Adam, NormalizedAscent, LBFGS, ...)
    history = ascend(value_fn, [x_adv], optimizer, steps=10)          # value_fn() -> (N,) values to maximise

``ascend`` takes gradients w.r.t. the given tensors only (never the model's parameters: run it inside
:func:`coursekit.guard.guarded`), applies the optimizer, calls ``after_step`` (projection, regularisers),
and records the value at every step. An optimiser ascends; to minimise a loss, ascend its negative.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from ._reference import reference
from .inputs import number, positive_int
from .progress import progress_bar

__all__ = ["normalized", "Optimizer", "Adam", "NormalizedAscent", "SignStep", "MomentumSignStep", "LBFGS", "ascend",
           "octaves", "project", "sign_step"]


def _per_image(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.view(-1, *([1] * (like.dim() - 1)))  # (N,) -> (N, 1, 1, 1)


def normalized(g: torch.Tensor, length: float = 1.0) -> torch.Tensor:
    """``length * g / rms(g)`` per image (N, ...): a step of ``length`` per pixel on average, whatever the
    gradient's scale (the normalised ascent of DeepDream, Mordvintsev et al. 2015, and of the Keras
    notebook). Computed as ``(length * g) / rms`` (the order matters for the last bit of a dream)."""
    rms = g.pow(2).flatten(1).mean(1).sqrt().clamp_min(1e-12)  # (N,)
    return length * g / _per_image(rms, g)


@reference  # the exercises of set 05_adversarial block it while the student's attack runs
def project(x: torch.Tensor, origin: torch.Tensor, eps: float, norm: str = "linf", box=(0.0, 1.0)) -> torch.Tensor:
    """Project ``x`` onto the ``norm``-ball of radius ``eps`` around ``origin``, then into ``box``.

    For L-inf the two projections commute with clamping (both are per pixel), so the result is the
    exact projection onto their intersection; for L2 it is the usual approximation (ball, then box).
    """
    delta = x - origin
    if norm == "linf":
        delta = delta.clamp(-eps, eps)
    elif norm == "l2":
        n = delta.flatten(1).norm(dim=1).clamp_min(1e-12)  # (N,)
        delta = delta * _per_image((eps / n).clamp(max=1.0), delta)
    else:
        raise ValueError(f"norm must be 'linf' or 'l2', got {norm!r}")
    out = origin + delta
    return out.clamp(*box) if box is not None else out


class Optimizer:
    """One update of the optimised tensors, given the gradients of the value to *maximise*."""

    needs_closure = False

    def reset(self, tensors: Sequence[torch.Tensor]) -> None:
        """Called once before the first step."""

    def step(self, tensors: Sequence[torch.Tensor], grads: Sequence[torch.Tensor]) -> None:
        raise NotImplementedError

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_") and not torch.is_tensor(v))
        return f"{type(self).__name__}({args})"


class Adam(Optimizer):
    """Adam (Kingma & Ba 2015) on the negative value: the default for feature visualisation."""

    def __init__(self, lr: float = 0.05):
        self.lr = float(lr)

    def reset(self, tensors):
        self._opt = torch.optim.Adam(list(tensors), lr=self.lr)

    @torch.no_grad()
    def step(self, tensors, grads):
        for p, g in zip(tensors, grads):
            p.grad = -g  # Adam minimises: descend on minus the value
        self._opt.step()
        for p in tensors:
            p.grad = None


class NormalizedAscent(Optimizer):
    """``x += lr * g / rms(g)`` per image: every image moves by ``lr`` per pixel on average, whatever
    the gradient's scale (the Keras notebook's step; DeepDream's, Mordvintsev et al. 2015)."""

    def __init__(self, lr: float = 1.0):
        self.lr = float(lr)

    @torch.no_grad()
    def step(self, tensors, grads):
        for p, g in zip(tensors, grads):
            p.add_(normalized(g, self.lr))


@reference  # the exercises of set 05_adversarial block it while the student's attack runs
def sign_step(x: torch.Tensor, direction: torch.Tensor, step_size: float, *, norm: str = "linf",
              origin: torch.Tensor | None = None, eps: float | None = None, box=(0.0, 1.0)) -> torch.Tensor:
    """One steepest-ascent step for a norm ball, then the projection: the step of FGSM, BIM, PGD, MI-FGSM.

    ``norm="linf"``: ``x + step_size * sign(d)`` (Goodfellow et al. 2015; Madry et al. 2018).
    ``norm="l2"``: ``x + step_size * d / ||d||_2`` per image. Then :func:`project` onto the ball of
    radius ``eps`` around ``origin`` (when given) and into ``box`` (when not None). A pixel whose
    direction is exactly 0 does not move (``sign(0) = 0``).

    x, direction (N, C, H, W) -> a new tensor (N, C, H, W); ``x`` is not modified.
    """
    if norm == "linf":
        out = x + step_size * direction.sign()
    elif norm == "l2":
        n = direction.flatten(1).norm(dim=1).clamp_min(1e-12)  # (N,)
        out = x + step_size * direction / _per_image(n, direction)
    else:
        raise ValueError(f"norm must be 'linf' or 'l2', got {norm!r}")
    if origin is not None:
        return project(out, origin, eps, norm, box)
    return out.clamp(*box) if box is not None else out


class SignStep(Optimizer):
    """A steepest-ascent step for a norm ball, then the projection (FGSM / BIM / PGD): :func:`sign_step`.

    ``norm="linf"``: ``x += step_size * sign(g)`` (Goodfellow et al. 2015; Madry et al. 2018).
    ``norm="l2"``: ``x += step_size * g / ||g||_2`` per image. After the step, ``x`` is projected
    onto the ball of radius ``eps`` around ``origin`` (when given) and clamped to ``box``.

    Parameters
    ----------
    step_size : float
        Step length (pixel units in [0, 1]: 2/255, not 2).
    eps : float, optional
        Radius of the ball; no ball when None.
    origin : Tensor, optional
        Centre of the ball (the clean images).
    norm : {"linf", "l2"}
    box : (float, float) or None
        Valid pixel range, enforced after every step.
    """

    def __init__(self, step_size: float, eps: float | None = None, origin: torch.Tensor | None = None,
                 norm: str = "linf", box=(0.0, 1.0)):
        if norm not in ("linf", "l2"):
            raise ValueError(f"norm must be 'linf' or 'l2', got {norm!r}")
        if (eps is None) != (origin is None):
            raise ValueError("give both eps and origin (the ball's radius and centre), or neither")
        self.step_size, self.eps, self.norm, self.box = float(step_size), eps, norm, box
        self._origin = None if origin is None else origin.detach()

    @torch.no_grad()
    def step(self, tensors, grads):
        for p, g in zip(tensors, grads):
            p.copy_(sign_step(p, g, self.step_size, norm=self.norm, origin=self._origin, eps=self.eps, box=self.box))


class MomentumSignStep(SignStep):
    """MI-FGSM's step (Dong et al. 2018, "Boosting adversarial attacks with momentum"), an optimiser with state.

    ``m <- decay * m + g / ||g||_1`` per image (``m`` starts at 0), then :func:`sign_step` along
    ``m``: ``x + step_size * sign(m)`` (L-inf) or ``x + step_size * m / ||m||_2`` (L2), projected
    onto the ball and the box. ``decay = 0`` is :class:`SignStep`. Other parameters as in
    :class:`SignStep`. (foolbox's ``LinfMomentumIterativeFastGradientMethod`` accumulates
    ``sign(g)`` and its L2 version ``g / ||g||_2`` instead of the paper's ``g / ||g||_1``.)
    """

    def __init__(self, step_size: float, eps: float | None = None, origin: torch.Tensor | None = None,
                 norm: str = "linf", box=(0.0, 1.0), decay: float = 1.0):
        super().__init__(step_size, eps, origin, norm, box)
        self.decay = number(decay, "decay (Dong et al. use 1.0)", minimum=0.0)

    def reset(self, tensors):
        self._momentum = [torch.zeros_like(p) for p in tensors]  # one (N, C, H, W) buffer per tensor

    @torch.no_grad()
    def step(self, tensors, grads):
        for p, g, m in zip(tensors, grads, self._momentum):
            l1 = g.abs().flatten(1).sum(1).clamp_min(1e-12)  # (N,) per-image L1 norm of the gradient
            m.mul_(self.decay).add_(g / _per_image(l1, g))
            p.copy_(sign_step(p, m, self.step_size, norm=self.norm, origin=self._origin, eps=self.eps, box=self.box))


class LBFGS(Optimizer):
    """L-BFGS (Liu & Nocedal 1989) with a strong-Wolfe line search, as in Gatys et al.'s style
    transfer. One engine step is one L-BFGS iteration of up to ``max_eval`` function evaluations.

    ``tolerance_grad`` / ``tolerance_change`` are torch's *absolute* stopping tolerances (defaults
    1e-7 / 1e-9): a loss whose pixel gradients are all below 1e-7 (small features, a small weight)
    stops at once. Pass 0 for both to let the number of engine steps alone decide."""

    needs_closure = True

    def __init__(self, lr: float = 1.0, history_size: int = 50, max_iter: int = 1, max_eval: int | None = None,
                 tolerance_grad: float = 1e-7, tolerance_change: float = 1e-9):
        self.lr, self.history_size, self.max_iter, self.max_eval = float(lr), int(history_size), int(max_iter), max_eval
        self.tolerance_grad, self.tolerance_change = float(tolerance_grad), float(tolerance_change)

    def reset(self, tensors):
        self._opt = torch.optim.LBFGS(list(tensors), lr=self.lr, history_size=self.history_size,
                                      max_iter=self.max_iter, max_eval=self.max_eval, line_search_fn="strong_wolfe",
                                      tolerance_grad=self.tolerance_grad, tolerance_change=self.tolerance_change)

    def step(self, tensors, grads, closure=None):
        if closure is None:
            raise ValueError("LBFGS needs a closure (ascend passes one)")
        self._opt.step(closure)


@reference  # blocked by exercise checks that ask for the loop itself (05_adversarial)
def ascend(
    value_fn: Callable[[], torch.Tensor],
    tensors: Sequence[torch.Tensor],
    optimizer: Optimizer,
    steps: int,
    *,
    after_step: Callable[[int], None] | None = None,
    progress: bool = True,
    desc: str = "optimise",
    on_value: Callable[[int, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Maximise ``value_fn()`` (one value per image) by changing ``tensors`` for ``steps`` steps.

    Parameters
    ----------
    value_fn : callable () -> Tensor (N,)
        Recomputes the values from the current tensors (a forward pass).
    tensors : sequence of leaf tensors with ``requires_grad=True``
    optimizer : Optimizer
    steps : int
    after_step : callable(step), optional
        Called after every update, under ``torch.no_grad`` (projection, regularisers).
    progress : bool
        A tqdm bar with the mean value.
    desc : str
        The bar's label.
    on_value : callable(step, values), optional
        Sees the (detached) values of every step, e.g. to record predictions or stop early by
        raising :class:`StopIteration`.

    Returns
    -------
    Tensor (steps_done, N)
        The value at every step, before that step's update.
    """
    steps = positive_int(steps, "steps")
    if not isinstance(optimizer, Optimizer):
        raise TypeError(f"optimizer must be an Optimizer (Adam, NormalizedAscent, SignStep, LBFGS), got {type(optimizer).__name__}")
    tensors = list(tensors)
    optimizer.reset(tensors)
    history: list[torch.Tensor] = []
    bar = progress_bar(range(steps), progress=progress, desc=desc[:60], leave=False)
    with torch.enable_grad():
        for step in bar:
            if optimizer.needs_closure:
                seen: list[torch.Tensor] = []
                optimizer.step(tensors, None, closure=_closure(optimizer, value_fn, seen))
                values = seen[0]
            else:
                values = value_fn()
                grads = torch.autograd.grad(values.sum(), tensors)
                optimizer.step(tensors, grads)
                values = values.detach()
            if after_step is not None:
                with torch.no_grad():
                    after_step(step)
            history.append(values)
            if progress:
                bar.set_postfix(value=f"{float(values.mean()):.3g}")
            if on_value is not None:
                try:
                    on_value(step, values)
                except StopIteration:
                    break
    bar.close()
    return torch.stack(history)


def _closure(optimizer: Optimizer, value_fn: Callable[[], torch.Tensor], seen: list):
    """What L-BFGS re-evaluates: minus the summed values, gradients in ``.grad``; values kept in ``seen``."""

    def closure():
        optimizer._opt.zero_grad()
        values = value_fn()
        loss = -values.sum()
        loss.backward()
        seen.append(values.detach())
        return loss

    return closure


@reference  # the exercise dream.octaves (lecture 6) blocks it while the student's loop runs
def octaves(image: torch.Tensor, run: Callable[[torch.Tensor, int], torch.Tensor], n_octaves: int = 3,
            scale: float = 1.4, progress: bool = False) -> torch.Tensor:
    """An image pyramid (DeepDream, Mordvintsev et al. 2015): optimise small first, carry the detail up.

    The image is shrunk ``n_octaves - 1`` times by ``scale``. From the smallest octave up, the
    current picture is ``resize(image) + upsampled detail``; ``run(picture, octave)`` optimises it
    and returns the new picture; its difference from ``resize(image)`` is the detail carried up.

    Parameters
    ----------
    image : Tensor (N, C, H, W)
    run : callable (Tensor, int) -> Tensor
        Optimises one octave (octave 0 is the smallest).
    n_octaves : int
    scale : float
        Size ratio between neighbouring octaves (> 1).

    Returns
    -------
    Tensor (N, C, H, W) at the input size.
    """
    n_octaves = positive_int(n_octaves, "n_octaves")
    if not scale > 1:
        raise ValueError(f"scale must be > 1 (the size ratio between octaves), got {scale!r}")
    h, w = image.shape[-2:]
    sizes = [(max(1, round(h / scale**k)), max(1, round(w / scale**k))) for k in range(n_octaves)][::-1]
    base = image.detach()
    detail = torch.zeros_like(F.interpolate(base, size=sizes[0], mode="bilinear", align_corners=False))
    out = base
    for octave, size in enumerate(sizes):
        resized = F.interpolate(base, size=size, mode="bilinear", align_corners=False) if size != (h, w) else base
        if detail.shape[-2:] != size:
            detail = F.interpolate(detail, size=size, mode="bilinear", align_corners=False)
        out = run(resized + detail, octave)
        detail = out.detach() - resized
    return out
