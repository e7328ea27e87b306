"""Adversarial examples (lecture 5): attacks in [0, 1] pixel space.

Every attack here changes the *input* of a model that holds its own normalisation
(:class:`coursekit.models.CourseModel` takes [0, 1] pixels) and leaves the model exactly as it was
(:func:`coursekit.guard.guarded`: eval mode, frozen parameters, restored even on error). The loop
is the shared input-optimisation engine, :func:`coursekit.optimize.ascend` with a
:class:`coursekit.optimize.SignStep` (or MI-FGSM's :class:`coursekit.optimize.MomentumSignStep`),
which projects onto the epsilon-ball and clamps to [0, 1] after every step; an :class:`AttackConfig`
says how. With ``early_stop=True`` the loop freezes every image at its first fooling iterate itself,
so an optimiser with state (momentum, Adam) cannot move it on. FGSM is one
:func:`coursekit.attack_steps.fgsm_step`, the step that :mod:`coursekit.robustness` and
:mod:`coursekit.train` take too.

* :func:`fgsm` — the fast gradient sign method (Goodfellow, Shlens & Szegedy 2015).
* :func:`pgd` — projected gradient descent under L-inf or L2 with random start and restarts
  (Madry et al. 2018); ``random_start=False`` is the basic iterative method, BIM
  (Kurakin, Goodfellow & Bengio 2017): :func:`bim`.
* :func:`mifgsm` — the momentum iterative FGSM, MI-FGSM (Dong et al. 2018): the same loop driven by
  an optimiser with state (:class:`coursekit.optimize.MomentumSignStep`).
* targeted versions (``target=``), cross-entropy or margin loss on logits (Carlini & Wagner 2017).
* :func:`random_sphere` — Szegedy et al. (2014): random points twice as far do not change the label.
* :func:`noise_attack` — a trainable noise layer with an L2 penalty and early stopping.
* :func:`evolve_fooling_images` — Nguyen, Yosinski & Clune (2015), direct encoding.
* :func:`plot_perturbation` — the signed change ``x_adv - x`` in grey levels on a zero-centred map.

Sweeps over epsilon, transfer between networks and adversarial training are in
:mod:`coursekit.robustness`.

Units: pixels, epsilons and step sizes are in [0, 1] units, ``8/255`` and not ``8``.

Devices: every function here computes on the model's device (:func:`coursekit.model_device`).
Images, labels and maps given on another device (a CPU image for a CUDA model) are moved there;
returned tensors live on the model's device, as in captum; numbers, numpy arrays and figures are on
the CPU (``SphereResult.labels`` too). Seeded random numbers are drawn on the CPU and moved, so a
seed gives the same draws on every device.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ._reference import reference
from .attack_steps import fgsm_step
from .batching import batches, rows
from .devices import cpu_generator, model_device
from .guard import guarded
from .inputs import (
    check_class_range,
    check_images,
    check_model,
    number,
    positive_int,
    target_indices,
)
from .optimize import Adam, MomentumSignStep, Optimizer, SignStep, ascend
from .progress import progress_bar
from .registry import Registry

__all__ = [  # + every registered attack
    "ATTACKS", "LogitsExpectedWarning", "check_eps", "check_loss", "check_kappa", "attack_objective", "margin",
    "AttackConfig",
    "predict_labels", "accuracy", "plot_perturbation", "random_sphere", "SphereResult", "NoiseLayer",
    "noise_attack", "NoiseAttackResult", "quantize_8bit", "evolve_fooling_images",
]
# One decorated function per gradient attack ``attack(model, x, labels=None, eps, ...)``: in __all__,
# the README's method table and the tests parametrised over ATTACKS.
ATTACKS = Registry("attack", exports=__all__)

LOSSES = ("ce", "margin")


class LogitsExpectedWarning(UserWarning):
    """The model's outputs look like probabilities; attack losses are defined on logits."""


# ----------------------------------------------------------------------------------------------
# argument checks


def check_eps(eps, norm: str = "linf", numel: int | None = None, what: str = "eps") -> float:
    """A radius in [0, 1] pixel units; a clear error for a negative one or one in 0-255 units.

    Under L-inf, ``eps`` bounds each pixel's change, so ``eps > 1`` is meaningless: ``eps=8`` almost
    always meant ``8/255``. Under L2, ``eps`` may exceed 1 but not the box's diagonal ``sqrt(numel)``.
    """
    if isinstance(eps, bool) or not isinstance(eps, (int, float, np.integer, np.floating)):
        if isinstance(eps, torch.Tensor) and eps.numel() == 1:
            eps = float(eps)
        else:
            raise TypeError(f"{what} must be a number (pixel units in [0, 1], e.g. 8/255), got {eps!r}")
    eps = float(eps)
    if not math.isfinite(eps) or eps < 0:
        raise ValueError(f"{what} must be >= 0 (a radius), got {eps!r}")
    if norm not in ("linf", "l2"):
        raise ValueError(f"norm must be 'linf' or 'l2', got {norm!r}")
    limit = 1.0 if norm == "linf" else (math.sqrt(numel) if numel else math.inf)
    if eps > limit:
        hint = f" It looks like 0-255 units: pass {eps:g}/255 = {eps / 255:.4g}." if 1 < eps <= 255 else ""
        where = "each pixel lies in [0, 1]" if norm == "linf" else f"the [0, 1] box has diagonal {limit:.3g}"
        raise ValueError(f"{what}={eps!r} is larger than any useful {norm} radius ({where}).{hint}")
    return eps


def check_loss(loss: str) -> str:
    """``loss`` when it is one of :data:`LOSSES` (both on logits), else a ValueError naming them."""
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES} (both on logits), got {loss!r}")
    return loss


def _warn_if_probabilities(logits: torch.Tensor) -> None:
    """Rows in [0, 1] that sum to 1 are probabilities: a softmax at the end of the model."""
    z = logits.detach()
    if z.shape[1] > 1 and z.min() >= 0 and z.max() <= 1 and torch.allclose(z.sum(1), torch.ones(len(z)), atol=1e-4):
        warnings.warn(
            "the model's outputs are in [0, 1] and sum to 1: they look like probabilities, not logits. "
            "Attack losses (cross-entropy, margin) expect logits; a softmax at the end flattens the gradient "
            "(the attack stalls). Remove the final softmax.", LogitsExpectedWarning, stacklevel=3)


def _labels(model, x, labels, batch_size) -> torch.Tensor:
    """True labels as a LongTensor (N,); the model's own predictions when ``labels`` is None."""
    if labels is None:
        return predict_labels(model, x, batch_size=batch_size)
    y = target_indices(labels, x.shape[0], what="label")
    if callable(y):
        raise TypeError("labels must be class indices (one int, or one per image), not a function")
    return y.to(x.device)


def _targets(target, y: torch.Tensor, explicit_labels: bool) -> torch.Tensor | None:
    if target is None:
        return None
    t = target_indices(target, y.shape[0], what="target")
    if callable(t):
        raise TypeError("target must be a class index or one per image for a targeted attack, not a function")
    t = t.to(y.device)
    same = t == y
    if explicit_labels and bool(same.any()):
        i = int(same.nonzero()[0])
        raise ValueError(
            f"targeted attack: target {int(t[i])} equals the true label of image {i}; there is nothing to fool. "
            "Choose another class, e.g. (labels + 1) % n_classes.")
    return t


# ----------------------------------------------------------------------------------------------
# losses on logits


def check_kappa(kappa, loss: str = "margin") -> float:
    """Carlini & Wagner's confidence ``kappa`` >= 0 (``inf``: no cap); only the margin loss has one."""
    if kappa is None:
        return math.inf
    kappa = number(kappa, "kappa", minimum=0.0, unit="a logit difference, Carlini & Wagner's confidence")
    if loss != "margin" and math.isfinite(kappa):
        raise ValueError(f"kappa={kappa!r} caps the margin loss only; pass loss='margin' (got loss={loss!r})")
    return kappa


def margin(logits: torch.Tensor, labels: torch.Tensor, kappa: float | None = None) -> torch.Tensor:
    """``min(max_{j != y} z_j - z_y, kappa)`` per image (Carlini & Wagner 2017): > 0 exactly when misclassified.

    The loss ``f_6`` of Carlini & Wagner (2017, "Towards evaluating the robustness of neural
    networks", sec. V.A), written as a value to ascend. With the cap ``kappa`` (their confidence), an
    image whose wrong class leads by ``kappa`` or more gets a zero gradient: the attack stops pushing it
    and spends its budget elsewhere. ``kappa=0`` stops at the decision boundary (their minimal
    examples), a larger ``kappa`` asks for confident mistakes (which transfer better); None: no cap.

    logits (N, K), labels (N,) -> (N,)
    """
    z_y = logits.gather(1, labels[:, None])[:, 0]  # (N,)
    others = logits.scatter(1, labels[:, None], float("-inf"))  # the true class masked out
    value = others.max(1).values - z_y
    kappa = check_kappa(kappa)
    return value if math.isinf(kappa) else value.clamp(max=kappa)


def attack_objective(logits: torch.Tensor, labels: torch.Tensor, loss: str = "ce",
                     target: torch.Tensor | None = None, kappa: float | None = None) -> torch.Tensor:
    """The value per image that an attack *ascends*.

    untargeted: ``CE(z, y)`` or ``margin(z, y)``; targeted at ``t``: ``-CE(z, t)`` or ``-margin(z, t)``
    (towards the target, i.e. ``z_t - max_{j != t} z_j``). ``kappa`` caps the margin value from above
    (Carlini & Wagner's confidence, :func:`margin`): ``min(value, kappa)``; only with ``loss="margin"``.

    logits (N, K), labels (N,), target (N,) or None -> (N,)
    """
    check_loss(loss)
    kappa = check_kappa(kappa, loss)
    if loss == "ce":
        return (F.cross_entropy(logits, labels, reduction="none") if target is None
                else -F.cross_entropy(logits, target, reduction="none"))
    value = margin(logits, labels) if target is None else -margin(logits, target)
    return value if math.isinf(kappa) else value.clamp(max=kappa)


def _fooled(logits: torch.Tensor, labels: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor:
    pred = logits.argmax(1)
    return pred != labels if target is None else pred == target


# ----------------------------------------------------------------------------------------------
# attacks


def _random_start(x: torch.Tensor, eps: float, norm: str, gen: torch.Generator) -> torch.Tensor:
    """A uniform point of the eps-ball around ``x``, clamped to [0, 1]."""
    if norm == "linf":
        delta = (torch.rand(x.shape, generator=gen, device="cpu") * 2 - 1) * eps
    else:  # uniform in the L2 ball: a Gaussian direction, radius eps * u^(1/d)
        d = x[0].numel()
        direction = torch.randn(x.shape, generator=gen, device="cpu")
        direction = direction / direction.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
        delta = direction * eps * torch.rand(x.shape[0], generator=gen, device="cpu").pow(1 / d).view(-1, 1, 1, 1)
    return (x + delta.to(x)).clamp(0, 1)


@dataclass(frozen=True)
class AttackConfig:
    """How an iterative attack steps: everything the attack loop needs besides the images and labels.

    :func:`pgd`, :func:`bim` and :func:`mifgsm` build one from their (checked) arguments and drive
    the same loop with it; the optimiser is the only difference between them.

    Attributes
    ----------
    eps : float
        Radius of the ball around the clean images ([0, 1] pixel units).
    steps : int
    step_size : float
    norm : {"linf", "l2"}
    loss : {"ce", "margin"}
        The objective on logits (:func:`attack_objective`).
    decay : float or None
        None: a plain :class:`coursekit.optimize.SignStep` (FGSM, BIM, PGD); a number: MI-FGSM's
        :class:`coursekit.optimize.MomentumSignStep` with this momentum decay (Dong et al. 2018).
    early_stop : bool
        Freeze every image at its first fooling iterate and drop it from the batch (see :func:`pgd`).
    kappa : float
        Cap of the margin loss (Carlini & Wagner's confidence, :func:`margin`); ``inf``: none.
    """

    eps: float
    steps: int
    step_size: float
    norm: str = "linf"
    loss: str = "ce"
    decay: float | None = None
    early_stop: bool = False
    kappa: float = math.inf

    def objective(self, logits: torch.Tensor, labels: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor:
        """:func:`attack_objective` with this configuration's loss and cap: logits (N, K) -> (N,)."""
        return attack_objective(logits, labels, self.loss, target, None if math.isinf(self.kappa) else self.kappa)

    def optimizer(self, origin: torch.Tensor) -> Optimizer:
        """A fresh optimiser (fresh state) for one run from the clean images ``origin`` (N, C, H, W)."""
        if self.decay is None:
            return SignStep(self.step_size, eps=self.eps, origin=origin, norm=self.norm, box=(0.0, 1.0))
        return MomentumSignStep(self.step_size, eps=self.eps, origin=origin, norm=self.norm, box=(0.0, 1.0),
                                decay=self.decay)


class _Frozen:
    """The images of one run that are done (early stop): their first fooling iterate, kept as it is.

    Whatever the optimiser does to a done image (a sign step on a zero gradient, a momentum step on
    its accumulated direction, Adam's running moments), :meth:`restore` puts the iterate back after
    every step, so no rule, with state or without, can move it again.
    """

    def __init__(self, x_adv: torch.Tensor):
        n = x_adv.shape[0]
        self.active = torch.ones(n, dtype=torch.bool, device=x_adv.device)  # (N,) still to attack
        self.value = torch.zeros(n, dtype=x_adv.dtype, device=x_adv.device)  # (N,) objective at the freeze
        self.iterate = torch.zeros_like(x_adv.detach())  # (N, C, H, W) the first fooling iterates

    def freeze(self, idx: torch.Tensor, fooled: torch.Tensor, objective: torch.Tensor, x_adv: torch.Tensor) -> None:
        """Images ``idx[fooled]`` fool the model at the current iterate: keep it and its objective."""
        done = idx[fooled]
        self.iterate[done] = x_adv.detach()[done]
        self.value[done] = objective.detach()[fooled]
        self.active[done] = False

    @torch.no_grad()
    def restore(self, x_adv: torch.Tensor) -> None:
        """Put every done image back to its frozen iterate (after the rule's step)."""
        done = (~self.active).nonzero()[:, 0]
        x_adv[done] = self.iterate[done]


def _run_attack(model, x, y, t, start, config: AttackConfig, final: bool = True):
    """One attack run on a batch from ``start``; returns (x_adv, fooled (N,), objective (N,)).

    ``final=False``: (x_adv, None, None), without the forward pass that scores the last iterate.

    x, start (N, C, H, W); y (N,); t (N,) or None. With ``config.early_stop``, an image that fools
    the model is frozen at that iterate (:class:`_Frozen`: explicitly, whatever the optimiser does) and
    leaves the batch, so later steps only pay for the images still classified correctly; the run
    ends when every image is fooled.
    """
    x_adv = start.clone().requires_grad_(True)
    frozen = _Frozen(x_adv) if config.early_stop else None
    first = []

    def value():
        idx = frozen.active.nonzero()[:, 0] if frozen is not None else None
        logits = model(x_adv if idx is None else x_adv[idx])  # (n_active, K)
        if not first:
            _warn_if_probabilities(logits)
            first.append(True)
        if idx is None:
            return config.objective(logits, y, t)
        ta = None if t is None else t[idx]
        obj = config.objective(logits, y[idx], ta)  # (n_active,)
        frozen.freeze(idx, _fooled(logits.detach(), y[idx], ta), obj, x_adv)
        return frozen.value.index_put((idx,), obj)  # (N,): only the active images carry a gradient

    def stop(step, values):
        if frozen is not None and not bool(frozen.active.any()):
            raise StopIteration

    ascend(value, [x_adv], config.optimizer(x), config.steps, progress=False, on_value=stop,
           after_step=None if frozen is None else lambda step: frozen.restore(x_adv))
    if not final and frozen is None:
        return x_adv.detach(), None, None
    return _final_state(model, x_adv.detach(), y, t, config, frozen)


@torch.no_grad()
def _final_state(model, x_adv, y, t, config: AttackConfig, frozen):
    """(x_adv, fooled (N,), objective (N,)) after the last step; done images keep their frozen values."""
    if frozen is None:
        logits = model(x_adv)
        return x_adv, _fooled(logits, y, t), config.objective(logits, y, t)
    fooled, obj = ~frozen.active, frozen.value.clone()
    idx = frozen.active.nonzero()[:, 0]
    if len(idx):  # the images still correct after the last step
        logits = model(x_adv[idx])
        ta = None if t is None else t[idx]
        fooled[idx] = _fooled(logits, y[idx], ta)
        obj[idx] = config.objective(logits, y[idx], ta)
    return x_adv, fooled, obj


def _labels_and_targets(model, x, labels, target, batch_size):
    """True labels (N,) (the predictions when None) and targets (N,) or None, range-checked; in guarded."""
    y = _labels(model, x, labels, batch_size)
    t = _targets(target, y, labels is not None)
    if t is not None or labels is not None:  # one image through the model: how many classes it has
        with torch.no_grad():
            classes = model(x[:1]).shape[1]
        check_class_range(y, classes, "label")
        if t is not None:
            check_class_range(t, classes)
    return y, t


def _attack_config(x, eps, norm, steps, step_size, default_step, loss, decay, early_stop,
                   kappa=None) -> AttackConfig:
    """The checked :class:`AttackConfig` of an iterative attack; ``default_step(eps, steps)`` when no step_size."""
    eps = check_eps(eps, norm, x[0].numel())
    steps = positive_int(steps, "steps")
    step_size = default_step(eps, steps) if step_size is None else check_eps(step_size, norm, x[0].numel(), "step_size")
    return AttackConfig(eps, steps, step_size, norm, check_loss(loss), decay, bool(early_stop),
                        check_kappa(kappa, loss))


def _attack(model, x, y, t, config: AttackConfig, *, start=None, restarts=1, batch_size=None, progress=False,
            desc="pgd") -> torch.Tensor:
    """Run ``config`` over ``x`` in batches and restarts; per image, keep the first fooling result
    (else the highest objective). ``start(xb) -> (n, C, H, W)`` draws a starting point (``x`` when None).
    A later restart only attacks the images that no earlier restart fooled."""
    out = x.clone()
    jobs = [(a, b, r) for a, b in batches(len(x), batch_size) for r in range(restarts)]
    best_fooled = torch.zeros(len(x), dtype=torch.bool, device=x.device)
    best_value = torch.full((len(x),), -math.inf, dtype=x.dtype, device=x.device)  # x has the model's dtype
    single = restarts == 1 and not config.early_stop  # one run: its last iterate is the answer, no scoring pass
    for a, b, r in progress_bar(jobs, desc=desc, progress=progress, leave=False):
        xb = x[a:b]
        begin = start(xb) if start is not None else xb
        todo = torch.arange(a, b, device=x.device)
        if r > 0:  # later restarts: only the images no earlier restart fooled
            keep = ~best_fooled[a:b]
            todo, xb, begin = todo[keep], xb[keep], begin[keep]
            if not len(todo):
                continue
        adv, fooled, value = _run_attack(model, xb, y[todo], None if t is None else t[todo], begin, config,
                                         final=not single)
        if single:
            out[todo] = adv
            continue
        # keep: fooled beats not fooled; among the not fooled, the higher objective
        better = (fooled & ~best_fooled[todo]) | ((fooled == best_fooled[todo]) & (value > best_value[todo]))
        out[todo[better]] = adv[better]
        best_fooled[todo] |= fooled
        best_value[todo] = torch.where(better, value, best_value[todo])
    return out


def _optional_batch_size(batch_size):
    return None if batch_size is None else positive_int(batch_size, "batch_size")


@ATTACKS.register
@reference
def pgd(model: nn.Module, x: torch.Tensor, labels=None, eps: float = 8 / 255, *, steps: int = 10,
        step_size: float | None = None, norm: str = "linf", random_start: bool = True, restarts: int = 1,
        loss: str = "ce", target=None, seed: int | None = 0, batch_size: int | None = None,
        early_stop: bool = False, progress: bool = False, kappa: float | None = None) -> torch.Tensor:
    """Projected gradient descent (Madry et al. 2018): sign (L-inf) or normalised (L2) steps on the
    loss, each followed by the projection onto the eps-ball around ``x`` and the [0, 1] box.

    Parameters
    ----------
    model : nn.Module
        Takes [0, 1] pixels, returns logits (N, K). Run in eval mode, frozen, left as it was.
    x : Tensor (N, C, H, W)
        Clean images in [0, 1].
    labels : int, sequence or Tensor (N,), optional
        True labels; the model's predictions on ``x`` when None.
    eps : float
        Radius of the ball in [0, 1] pixel units (8/255, not 8).
    steps : int
    step_size : float, optional
        Default ``2.5 * eps / steps`` (Madry et al.).
    norm : {"linf", "l2"}
    random_start : bool
        Start from a uniform point of the ball (PGD) or from ``x`` (BIM).
    restarts : int
        Independent random starts; per image, the first that fools the model is kept (else the one
        with the highest loss). A restart only attacks the images that no earlier restart fooled.
    loss : {"ce", "margin"}
        Cross-entropy or the Carlini-Wagner margin, both on logits.
    kappa : float, optional
        Only with ``loss="margin"``: Carlini & Wagner's confidence, the margin capped at ``kappa``
        (:func:`margin`); an image is no longer pushed once the wrong class leads by ``kappa``.
    target : int, sequence or Tensor (N,), optional
        Targeted attack: push every image towards this class (must differ from the true label).
    seed : int or None
        Seed of the random start (a private generator); None draws from the global one.
    batch_size : int, optional
        Images per forward/backward pass (all at once when None).
    early_stop : bool
        Freeze each image at the first iterate that fools the model and drop it from the batch (an
        evaluation shortcut: the question is only *whether* it can be fooled). Faster when most images
        fall early; the images returned are the smallest-step fooling iterates, not the strongest ones,
        so keep False for targeted pictures, confident fooling images and transfer.
    progress : bool
        A progress bar over batches and restarts.

    Returns
    -------
    Tensor (N, C, H, W), detached, in [0, 1], within ``eps`` of ``x``.
    """
    check_model(model)
    x = check_images(x, model=model, pixel_range=True).detach()
    config = _attack_config(x, eps, norm, steps, step_size, lambda e, n: 2.5 * e / n, loss, None, early_stop,
                            kappa)
    restarts = positive_int(restarts, "restarts")
    batch_size = _optional_batch_size(batch_size)
    gen = cpu_generator(seed if seed is not None else int(torch.randint(0, 2**62, (), device="cpu")))
    with guarded(model, what="pgd"):
        y, t = _labels_and_targets(model, x, labels, target, batch_size)
        start = (lambda xb: _random_start(xb, config.eps, norm, gen)) if random_start else None
        return _attack(model, x, y, t, config, start=start, restarts=restarts, batch_size=batch_size,
                       progress=progress, desc="pgd")


@ATTACKS.register
def bim(model, x, labels=None, eps: float = 8 / 255, *, steps: int = 10, step_size: float | None = None, **kw):
    """The basic iterative method (Kurakin et al. 2017): :func:`pgd` from ``x`` (no random start),
    step ``eps / steps`` by default (the ball's edge is just reachable), under the attack's ``norm``."""
    if step_size is None:
        step_size = check_eps(eps, kw.get("norm", "linf")) / positive_int(steps, "steps")
    return pgd(model, x, labels, eps, steps=steps, step_size=step_size, random_start=False, **kw)


@ATTACKS.register
@reference
def mifgsm(model: nn.Module, x: torch.Tensor, labels=None, eps: float = 8 / 255, *, steps: int = 10,
           step_size: float | None = None, decay: float = 1.0, norm: str = "linf", loss: str = "ce", target=None,
           batch_size: int | None = None, early_stop: bool = False, progress: bool = False,
           kappa: float | None = None) -> torch.Tensor:
    """The momentum iterative fast gradient sign method, MI-FGSM (Dong et al. 2018, "Boosting
    adversarial attacks with momentum").

    From ``x``, ``steps`` times: ``g <- decay * g + grad / ||grad||_1`` (per image, ``g`` starts at 0),
    ``x_adv <- x_adv + step_size * sign(g)`` (L2: ``g / ||g||_2``), projected onto the eps-ball and the
    [0, 1] box (:class:`coursekit.optimize.MomentumSignStep`). The momentum keeps the direction of
    earlier steps, which stabilises the update and makes the examples transfer better to other
    networks (Dong et al., section 3); ``decay=0`` is :func:`bim`.

    Parameters
    ----------
    model, x, labels, eps, steps, norm, loss, kappa, target, batch_size, progress
        As in :func:`pgd`.
    step_size : float, optional
        Default ``eps / steps`` (Dong et al.'s ``alpha = eps / T``).
    decay : float
        The momentum's decay ``mu`` >= 0 (Dong et al. use 1.0).
    early_stop : bool
        As in :func:`pgd`: each image is frozen at its first fooling iterate, although its momentum
        would still move it.

    Returns
    -------
    Tensor (N, C, H, W), detached, in [0, 1], within ``eps`` of ``x``.
    """
    check_model(model)
    x = check_images(x, model=model, pixel_range=True).detach()
    decay = number(decay, "decay", minimum=0.0, unit="Dong et al. use 1.0")
    config = _attack_config(x, eps, norm, steps, step_size, lambda e, n: e / n, loss, decay, early_stop, kappa)
    batch_size = _optional_batch_size(batch_size)
    with guarded(model, what="mifgsm"):
        y, t = _labels_and_targets(model, x, labels, target, batch_size)
        return _attack(model, x, y, t, config, batch_size=batch_size, progress=progress, desc="mifgsm")


@ATTACKS.register
@reference
def fgsm(model: nn.Module, x: torch.Tensor, labels=None, eps: float = 8 / 255, *, loss: str = "ce",
         target=None, batch_size: int | None = None, kappa: float | None = None) -> torch.Tensor:
    """The fast gradient sign method (Goodfellow et al. 2015): ``clamp(x + eps * sign(grad), 0, 1)``.

    One step of size ``eps`` from ``x`` (targeted: a step *down* the loss of the target class),
    :func:`coursekit.attack_steps.fgsm_step`, the step that :mod:`coursekit.robustness` and
    :mod:`coursekit.train` take too. Parameters as in :func:`pgd` (``kappa``: an image already
    misclassified by a margin of ``kappa`` or more has a zero gradient and does not move). Returns
    (N, C, H, W) in [0, 1].
    """
    check_model(model)
    x = check_images(x, model=model, pixel_range=True).detach()
    eps = check_eps(eps)
    check_loss(loss)
    kappa = check_kappa(kappa, loss)
    batch_size = _optional_batch_size(batch_size)
    with guarded(model, what="fgsm"):
        y, t = _labels_and_targets(model, x, labels, target, batch_size)
        out = []
        for a, b in batches(len(x), batch_size):
            objective = partial(attack_objective, labels=y[a:b], loss=loss, target=rows(t, a, b),
                                kappa=None if math.isinf(kappa) else kappa)
            adv, logits = fgsm_step(model, x[a:b], objective, eps, eps=eps)
            if not out:
                _warn_if_probabilities(logits)
            out.append(adv)
    return torch.cat(out)


# ----------------------------------------------------------------------------------------------
# evaluation: predictions, accuracy, sweeps


@torch.no_grad()
def predict_labels(model: nn.Module, x: torch.Tensor, batch_size: int | None = 1000) -> torch.Tensor:
    """Predicted classes (N,) in eval mode, batched; the model is left as it was."""
    check_model(model)
    x = check_images(x, model=model)
    with guarded(model, what="predict_labels"):
        return torch.cat([model(x[a:b]).argmax(1) for a, b in batches(len(x), batch_size)])


def accuracy(model: nn.Module, x: torch.Tensor, labels, batch_size: int | None = 1000) -> float:
    """Fraction of ``x`` (N, C, H, W) classified as ``labels`` (N,)."""
    y = target_indices(labels, x.shape[0], what="label")
    return float((predict_labels(model, x, batch_size).cpu() == y.cpu()).float().mean())


def plot_perturbation(ax, x_adv: torch.Tensor, x: torch.Tensor, *, vmax: float | None = None,
                      percentile: float = 100.0, colorbar: bool = True, title: str | None = None):
    """The signed change ``x_adv - x`` of one image, in grey levels, on a zero-centred diverging map.

    Colour images are averaged over their channels (a change of +e in red and -e in blue cancels).
    White is no change, red brighter, blue darker; the colour scale is symmetric, ``[-vmax, vmax]``.

    Parameters
    ----------
    ax : matplotlib Axes
    x_adv, x : Tensor (C, H, W) or (1, C, H, W)
        The adversarial and the clean image, in [0, 1].
    vmax : float, optional
        End of the colour scale in grey levels (x 255); by default the ``percentile`` of ``|x_adv - x|``.
    percentile : float
        100 (default) puts the largest change at the end of the scale; e.g. 99 keeps a few extreme
        pixels from washing out the rest (the colour bar then shows arrows: values beyond are clipped).
    colorbar : bool
        Adds a colour bar labelled in grey levels.

    Returns
    -------
    numpy array (H, W)
        The plotted change in grey levels.
    """
    if not isinstance(x_adv, torch.Tensor) or not isinstance(x, torch.Tensor):
        raise TypeError(f"x_adv and x must be tensors, got {type(x_adv).__name__} and {type(x).__name__}")
    a, b = x_adv.detach().cpu(), x.detach().cpu()
    a, b = (a[0] if a.dim() == 4 and a.shape[0] == 1 else a), (b[0] if b.dim() == 4 and b.shape[0] == 1 else b)
    if a.shape != b.shape or a.dim() != 3:
        raise ValueError(f"x_adv and x must be one image each, (C, H, W) or (1, C, H, W), of the same shape; "
                         f"got {tuple(x_adv.shape)} and {tuple(x.shape)}")
    if not 0 < percentile <= 100:
        raise ValueError(f"percentile must be in (0, 100], got {percentile!r}")
    delta = ((a - b).float().mean(0) * 255).numpy()  # (H, W), grey levels
    top = float(np.abs(delta).max())
    if vmax is None:
        vmax = float(np.percentile(np.abs(delta), percentile))
    else:
        vmax = number(vmax, "vmax", minimum=0.0, strict=True, unit="grey levels")
    vmax = float(vmax) if vmax > 0 else 1.0  # an all-zero change: any symmetric scale shows white
    im = ax.imshow(delta, cmap="RdBu_r", vmin=-vmax, vmax=vmax)
    if colorbar:
        ax.figure.colorbar(im, ax=ax, fraction=0.046, pad=0.03, extend="both" if top > vmax * (1 + 1e-6) else "neither",
                           label="change (grey levels, mean over channels)" if a.shape[0] > 1 else "change (grey levels)")
    if title is not None:
        ax.set_title(title)
    ax.axis("off")
    return delta


# ----------------------------------------------------------------------------------------------
# experiments of Szegedy et al. (2014), Fleuret (2018), Nguyen et al. (2015)


@dataclass
class SphereResult:
    """Labels of random points on a sphere around an image (what :func:`random_sphere` returns)."""

    radius: float
    label: int  # the model's label of the centre
    labels: torch.Tensor  # (n,) labels of the sphere points

    @property
    def changed(self) -> int:
        return int((self.labels != self.label).sum())


@torch.no_grad()
def random_sphere(model: nn.Module, x: torch.Tensor, radius: float, n: int = 1000, *, batch_size: int = 100,
                  seed: int = 0, clamp: bool = False, progress: bool = False) -> SphereResult:
    """Classify ``n`` points drawn uniformly on the L2 sphere of ``radius`` around one image.

    Szegedy et al. (2014) and Fleuret (2018, "8.4 Optimizing inputs"): at twice the distance of an
    adversarial example, random directions change nothing. ``clamp=True`` clamps the points to [0, 1]
    (they then leave the sphere); the centre must then lie in [0, 1] itself (a ValueError for 0-255
    pixels or a normalised image). ``progress=True`` shows a bar over the batches (hidden in headless
    runs, :func:`coursekit.progress.progress_bar`).

    x (1, C, H, W) -> SphereResult (labels (n,))
    """
    check_model(model)
    x = check_images(x, model=model, pixel_range=clamp)  # clamping to [0, 1] needs a centre inside it
    if x.shape[0] != 1:
        raise ValueError(f"random_sphere takes one image (1, C, H, W), got a batch of {x.shape[0]}")
    radius = number(radius, "radius", minimum=0.0, strict=True, unit="an L2 distance in [0, 1] pixel units")
    n, batch_size = positive_int(n, "n"), positive_int(batch_size, "batch_size")
    gen = cpu_generator(seed)
    with guarded(model, what="random_sphere"):
        label = int(model(x).argmax(1))
        labels = []
        for a, b in progress_bar(list(batches(n, batch_size)), desc="random sphere", progress=progress,
                                 unit="batch"):
            d = torch.randn((b - a, *x.shape[1:]), generator=gen, device="cpu").to(x)
            pts = x + float(radius) * d / d.flatten(1).norm(dim=1).view(-1, 1, 1, 1)  # (b-a, C, H, W)
            labels.append(model(pts.clamp(0, 1) if clamp else pts).argmax(1).cpu())
    return SphereResult(radius, label, torch.cat(labels))


class NoiseLayer(nn.Module):
    """A trainable additive noise in front of a frozen model: ``clamp(x + noise, 0, 1)``.

    The ``AddNoise`` layer of *Ceci n'est pas un chat* (School of AI Angers, undated; in Keras); the noise
    is the only parameter. Like any ``nn.Module`` it is made on ``device`` (default: torch's default device)
    and moves with ``.to``.
    """

    def __init__(self, shape: Sequence[int], device: str | torch.device | None = None,
                 dtype: torch.dtype | None = None):
        super().__init__()
        self.noise = nn.Parameter(torch.zeros(1, *shape, device=device, dtype=dtype))  # (1, C, H, W)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, C, H, W) -> (N, C, H, W)
        return (x + self.noise).clamp(0, 1)


@dataclass
class NoiseAttackResult:
    x_adv: torch.Tensor  # (1, C, H, W)
    noise: torch.Tensor  # (1, C, H, W), the best noise (restored as in Keras' restore_best_weights)
    steps: int  # steps run before early stopping
    loss: torch.Tensor  # (steps,) l2_weight * ||noise||^2 - log p_target
    prob_target: float  # p(target | x_adv)
    relative_change: float  # ||x_adv - x|| / ||x||


def noise_attack(model: nn.Module, x: torch.Tensor, target, *, l2_weight: float = 0.1, lr: float = 0.01,
                 max_steps: int = 300, patience: int = 10, min_delta: float = 1e-4,
                 progress: bool = False) -> NoiseAttackResult:
    """Train a :class:`NoiseLayer` so that ``model`` sees ``target`` (the dog-to-cat noise of
    *Ceci n'est pas un chat*, School of AI Angers, undated).

    Minimises ``l2_weight * ||noise||^2 - log p(target | clamp(x + noise))`` with Adam and stops
    early when the loss has not improved by ``min_delta`` for ``patience`` steps; the best noise is
    kept. ``l2_weight`` trades the size of the change against the probability of the target.
    """
    check_model(model)
    x = check_images(x, model=model, pixel_range=True)
    if x.shape[0] != 1:
        raise ValueError(f"noise_attack takes one image (1, C, H, W), got a batch of {x.shape[0]}")
    l2_weight = number(l2_weight, "l2_weight", minimum=0.0)
    t = target_indices(target, 1)
    if callable(t):
        raise TypeError("target must be a class index for noise_attack, not a function")
    t = int(t[0])
    max_steps, patience = positive_int(max_steps, "max_steps"), positive_int(patience, "patience")
    layer = NoiseLayer(x.shape[1:], device=x.device, dtype=x.dtype)
    noise = layer.noise
    best = {"loss": math.inf, "noise": noise.detach().clone(), "since": 0}

    def value():
        log_p = F.log_softmax(model(layer(x)), dim=1)[:, t]  # (1,)
        loss = l2_weight * noise.pow(2).sum() - log_p  # (1,)
        if float(loss.detach()) < best["loss"] - min_delta:
            best.update(loss=float(loss.detach()), noise=noise.detach().clone(), since=0)
        else:
            best["since"] += 1
        return -loss  # ascend the negative loss

    def stop(step, values):
        if best["since"] >= patience:
            raise StopIteration

    with guarded(model, what="noise_attack"):
        with torch.no_grad():
            check_class_range(torch.tensor([t], device="cpu"), model(x).shape[1])  # a CPU index: bookkeeping
        history = ascend(value, [noise], Adam(lr), max_steps, progress=progress, desc="noise layer", on_value=stop)
        with torch.no_grad():
            x_adv = (x + best["noise"]).clamp(0, 1)
            p = float(F.softmax(model(x_adv), 1)[0, t])
    rel = float((x_adv - x).norm() / x.norm())
    return NoiseAttackResult(x_adv, best["noise"], len(history), -history[:, 0], p, rel)


def quantize_8bit(x: torch.Tensor) -> torch.Tensor:
    """Round [0, 1] pixels to the 256 levels of an 8-bit image file: ``round(255 x) / 255``."""
    x = check_images(x, pixel_range=True)
    return (x * 255).round() / 255


@torch.no_grad()
def evolve_fooling_images(model: nn.Module, classes: Sequence[int], shape: Sequence[int], *, population: int = 32,
                          generations: int = 100, mutation_rate: float = 0.05, mutation_scale: float = 0.3,
                          seed: int = 0, progress: bool = False):
    """Fooling images by evolution from uniform noise, no gradient (Nguyen et al. 2015, direct encoding).

    For each class, a population of pixel images evolves: the best half survives (elitism), each
    survivor has one child in which every pixel mutates with probability ``mutation_rate`` by a
    Gaussian of std ``mutation_scale`` (clamped to [0, 1]). Fitness is the softmax probability of the
    class. Only forward passes: the model is a black box.

    Returns
    -------
    (Tensor (len(classes), C, H, W), Tensor (generations, len(classes)))
        The fittest image per class and the best probability per generation.
    """
    check_model(model)
    classes = [int(c) for c in classes]
    population, generations = positive_int(population, "population", 2), positive_int(generations, "generations")
    if number(mutation_rate, "mutation_rate", minimum=0.0, strict=True) > 1:
        raise ValueError(f"mutation_rate must be in (0, 1], got {mutation_rate!r}")
    gen, device = cpu_generator(seed), model_device(model)  # drawn on the CPU (same on every device), then moved
    k, p, keep = len(classes), population, population // 2
    pop = torch.rand((k, p, *shape), generator=gen, device="cpu").to(device)  # (K, P, C, H, W)
    idx = torch.tensor(classes, device=device)
    history = []

    with guarded(model, what="evolve_fooling_images"):
        for _ in progress_bar(range(generations), desc="evolve", progress=progress, leave=False):
            probs = F.softmax(model(pop.flatten(0, 1)), 1).view(k, p, -1)  # (K, P, classes)
            fit = probs.gather(2, idx.view(k, 1, 1).expand(k, p, 1))[..., 0]  # (K, P)
            order = fit.argsort(1, descending=True)
            history.append(fit.max(1).values)
            parents = pop.gather(1, order[:, :keep].view(k, keep, *[1] * len(shape)).expand(k, keep, *shape))
            mask = torch.rand(parents.shape, generator=gen, device="cpu").to(device) < mutation_rate
            noise = torch.randn(parents.shape, generator=gen, device="cpu").to(device)
            children = (parents + mask * noise * mutation_scale).clamp(0, 1)
            pop = torch.cat([parents, children[:, : p - keep]], 1)
        probs = F.softmax(model(pop.flatten(0, 1)), 1).view(k, p, -1)
        fit = probs.gather(2, idx.view(k, 1, 1).expand(k, p, 1))[..., 0]
    best = pop[torch.arange(k, device=device), fit.argmax(1)]
    return best, torch.stack(history)
