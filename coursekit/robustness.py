"""Robustness (lecture 5, second half): accuracy against epsilon, transfer, adversarial training.

The attacks themselves are in :mod:`coursekit.adversarial`; this module measures what they do to
a network over a whole test set and trains networks that resist them.

* :func:`eps_sweep` — accuracy against epsilon on a whole test set, batched (FGSM's direction is
  computed once per batch; PGD stops per image at its first fooling iterate), a :class:`Sweep`.
* :func:`plot_sweeps` — several sweeps on one axes: colour per curve, marker per network, line
  style per attack, legend below the data.
* :func:`transfer_matrix` — attacks crafted on one network, tested on the others (Szegedy et al.
  2014; Papernot, McDaniel & Goodfellow 2016).
* :func:`train_classifier` — plain or adversarial training with Goodfellow, Shlens & Szegedy's
  (2015) loss ``alpha J(x) + (1 - alpha) J(x + eps sign grad J)`` (:func:`adversarial_loss`).

Units: epsilons in [0, 1] pixel units, ``8/255`` and not ``8``.

Devices: every function here computes on the model's device (:func:`coursekit.model_device`).
Images, labels and maps given on another device (a CPU image for a CUDA model) are moved there;
returned tensors live on the model's device, as in captum; numbers, numpy arrays and figures are on
the CPU (``Sweep.per_image`` and ``TransferResult.accuracy`` too). Seeded random numbers are drawn
on the CPU and moved, so a seed gives the same draws on every device.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from ._reference import reference
from .adversarial import accuracy, attack_objective, check_eps, check_loss, pgd
from .attack_steps import fgsm_step, input_gradient
from .batching import batches, cpu_twin, in_layout
from .devices import cpu_generator, model_device
from .guard import guarded
from .inputs import check_images, check_model, number, positive_int, target_indices
from .optimize import sign_step
from .progress import progress_bar
from .threads import thread_count

__all__ = ["Sweep", "eps_sweep", "plot_sweeps", "transfer_matrix", "TransferResult", "adversarial_loss",
           "train_classifier"]


@dataclass
class Sweep:
    """Accuracy against epsilon (what :func:`eps_sweep` returns)."""

    attack: str
    eps: list[float]
    accuracy: list[float]
    n_images: int
    model: str = "model"
    seconds: float = 0.0
    per_image: torch.Tensor | None = field(default=None, repr=False)  # (len(eps), N) bool: still correct

    def table(self, digits: int = 3) -> str:
        """The PyTorch FGSM tutorial's table: one row per epsilon."""
        rows = [f"{self.model} — {self.attack}, {self.n_images} images", f"{'eps':>8} {'eps*255':>8} {'accuracy':>9}"]
        rows += [f"{e:8.3f} {e * 255:8.1f} {a:9.{digits}f}" for e, a in zip(self.eps, self.accuracy)]
        return "\n".join(rows)

    def plot(self, ax=None, **kw):
        """Accuracy against epsilon on ``ax`` (a new figure when None); returns the axes.

        ``kw`` go to ``ax.plot`` (``color``, ``marker``, ``linestyle``, ``label``...); by default
        FGSM is drawn with circles and a solid line, PGD with squares and a dashed line. To tell
        several sweeps apart by colour *and* marker/line style, use :func:`plot_sweeps`.
        """
        import matplotlib.pyplot as plt

        ax = ax if ax is not None else plt.subplots(figsize=(5, 3.5), dpi=100)[1]
        kw.setdefault("marker", "s" if self.attack == "PGD" else "o")
        if "ls" not in kw:
            kw.setdefault("linestyle", "--" if self.attack == "PGD" else "-")
        ax.plot(self.eps, self.accuracy, label=kw.pop("label", f"{self.model} {self.attack}"), **kw)
        ax.set(xlabel="epsilon (L-inf radius, [0, 1] pixel units)", ylabel="accuracy (fraction correct)",
               ylim=(-0.02, 1.02), title=f"Accuracy under attack ({self.n_images} test images)")
        ax.grid(alpha=0.3)
        return ax


SWEEP_MARKERS = ("o", "^", "s", "D", "v", "P", "X")
SWEEP_LINESTYLES = ("-", "--", ":", "-.")


def plot_sweeps(sweeps: Sequence[Sweep], ax=None, *, mark_eps: float | None = None, mark_label: str | None = None,
                title: str = "Accuracy under attack", legend_cols: int = 2):
    """Several :class:`Sweep` curves that can be told apart in colour *and* in shape.

    Every curve gets its own colour; the network (``Sweep.model``) sets the marker and the attack
    (``Sweep.attack``) the line style, so two curves of the same network differ in line style and two
    of the same attack differ in marker (also in print and for colour-blind readers). The legend goes
    below the axes, off the data; a top axis gives epsilon in grey levels (x 255).

    Parameters
    ----------
    sweeps : list or tuple of Sweep
    ax : matplotlib Axes, optional
        A new 7 x 5.4 inch figure when None.
    mark_eps : float, optional
        Draws a dotted vertical line at this epsilon (e.g. the radius a network was trained for).
    mark_label : str, optional
        The line's legend entry.

    Returns
    -------
    matplotlib Axes
    """
    import matplotlib.pyplot as plt

    original = sweeps
    sweeps = list(sweeps) if isinstance(sweeps, (list, tuple)) else []
    if not sweeps or not all(isinstance(s, Sweep) for s in sweeps):
        raise TypeError(f"sweeps must be a non-empty list of Sweep (what eps_sweep returns), got {original!r}")
    if ax is None:
        ax = plt.subplots(figsize=(7, 5.4), dpi=100, layout="constrained")[1]
    models = list(dict.fromkeys(s.model for s in sweeps))
    attacks = list(dict.fromkeys(s.attack for s in sweeps))
    colours = plt.rcParams["axes.prop_cycle"].by_key().get("color", ["C0"])
    for i, s in enumerate(sweeps):
        s.plot(ax, color=colours[i % len(colours)], marker=SWEEP_MARKERS[models.index(s.model) % len(SWEEP_MARKERS)],
               linestyle=SWEEP_LINESTYLES[attacks.index(s.attack) % len(SWEEP_LINESTYLES)], markersize=6,
               label=f"{s.model}, {s.attack} ({s.n_images} images)")
    if mark_eps is not None:
        ax.axvline(check_eps(mark_eps, what="mark_eps"), color="0.4", lw=1, ls=":", label=mark_label)
    ax.set_title(title)
    top = ax.secondary_xaxis("top", functions=(lambda e: e * 255, lambda g: g / 255))
    top.set_xlabel("epsilon x 255 (grey levels)")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), ncols=legend_cols, frameon=False)
    return ax


@reference
def eps_sweep(model: nn.Module, x: torch.Tensor, labels, eps_values: Sequence[float], attack: str = "fgsm", *,
              batch_size: int = 50, progress: bool = True, name: str | None = None, threads: int | None = None,
              **attack_kw) -> Sweep:
    """Accuracy under ``attack`` for every epsilon, on a whole test set, batched.

    FGSM's direction ``sign(grad)`` does not depend on epsilon, so it is computed once per batch
    (one forward + backward, whose logits also give the clean accuracy) and every other epsilon
    costs one forward pass. PGD runs per epsilon (``attack_kw`` go to :func:`pgd`: ``steps``,
    ``step_size`` as a fraction via ``step_ratio`` = step / eps, ``restarts``, ``early_stop``, which
    is True here: an image leaves the batch at its first fooling iterate, so the steps are paid
    only for the images that still resist). Epsilon 0 is the clean accuracy.
    ``batch_size`` 50: on one CPU thread, small batches of small images run faster per image
    than large ones (measured: FGSM sweep of 2000 Fashion-MNIST images, 8.4 s at 50, 14.8 s at 500).

    On the CPU the sweep runs on a channels-last copy of the model (oneDNN's NHWC convolutions,
    ~1.3x faster for ``fashion_cnn`` on one thread, PGD ~1.15x); ``model`` itself is not touched (same
    parameters, memory layout, mode and ``requires_grad`` afterwards). A model that cannot run in that
    layout (e.g. a ``.view`` on a convolution's output) or cannot be copied is run as it is. The answers
    are the plain layout's up to float rounding (FGSM: none differed on the 10 000 Fashion-MNIST test
    images; PGD, 10 steps, 7 eps: none on 200 images of fashion_cnn and of fashion_cnn_robust).

    ``threads``: how many CPU threads the sweep may use; None keeps the course's count
    (:mod:`coursekit.threads`: one thread on a two-core machine). FGSM on the CPU shares its batches
    among that many worker threads, each running torch on one thread (fashion_cnn, 2000 images, two
    idle cores: 3.9 s against 4.5 s for two intra-op threads at their best batch size); PGD, and
    FGSM on other devices, set torch's intra-op thread count. The count is put back afterwards, and
    the answers do not depend on it.

    Returns
    -------
    Sweep
        ``.accuracy[i]`` for ``.eps[i]``; ``.table()``, ``.plot()``.
    """
    check_model(model)
    x = check_images(x, model=model, pixel_range=True)
    y = target_indices(labels, x.shape[0], what="label")
    if callable(y):
        raise TypeError("labels must be class indices, not a function")
    eps_values = [check_eps(e) for e in eps_values]
    if not eps_values:
        raise ValueError("eps_values is empty; give e.g. [0, 0.05, 0.1, 0.2]")
    if attack not in ("fgsm", "pgd"):
        raise ValueError(f"attack must be 'fgsm' or 'pgd', got {attack!r}")
    batch_size = positive_int(batch_size, "batch_size")
    threads = None if threads is None else positive_int(threads, "threads")
    loss = check_loss(attack_kw.pop("loss", "ce"))
    step_ratio = attack_kw.pop("step_ratio", None)
    attack_kw.setdefault("early_stop", True)

    start = time.perf_counter()
    correct = torch.zeros(len(eps_values), len(x), dtype=torch.bool, device="cpu")  # results, gathered on the CPU
    spans = batches(len(x), batch_size)
    with thread_count(threads if attack == "pgd" else None), guarded(model, what="eps_sweep"):
        if attack == "fgsm":
            rows = _fgsm_rows(model, x, y, eps_values, loss, spans, threads)
        else:  # PGD's steps run in the attack engine, on the same channels-last copy as FGSM's
            runner, layout = cpu_twin(model, x)
            rows = ((a, b, _pgd_correct(runner, in_layout(x[a:b], layout), y[a:b].to(x.device), eps_values, loss,
                                        step_ratio, attack_kw))
                    for a, b in spans)
        for a, b, rows_ab in progress_bar(rows, total=len(spans), desc=f"{attack} sweep", progress=progress, leave=False):
            correct[:, a:b] = rows_ab
    acc = correct.float().mean(1).tolist()
    return Sweep(attack.upper(), eps_values, acc, len(x), name or getattr(model, "name", type(model).__name__),
                 time.perf_counter() - start, correct)


def _fgsm_rows(model, x, y, eps_values, loss, spans, threads) -> Iterator[tuple[int, int, torch.Tensor]]:
    """``(a, b, still correct (len(eps_values), b - a))`` for every batch ``(a, b)`` of ``spans``, in order.

    On the CPU the batches run through :func:`coursekit.batching.cpu_twin`; with ``threads`` > 1 they are shared among
    that many worker threads (torch releases the GIL inside its kernels), each with one intra-op thread.
    """
    runner, layout = cpu_twin(model, x)

    def one(span):
        a, b = span
        return a, b, _fgsm_correct(runner, in_layout(x[a:b], layout), y[a:b].to(x.device), eps_values, loss)

    if threads is None or threads == 1 or x.device.type != "cpu" or len(spans) == 1:
        with thread_count(threads):
            yield from map(one, spans)
        return
    with thread_count(threads), ThreadPoolExecutor(threads, initializer=torch.set_num_threads, initargs=(1,)) as pool:
        yield from pool.map(one, spans)


def _fgsm_correct(model, xb, yb, eps_values, loss) -> torch.Tensor:
    """Still correct under FGSM at every epsilon: (len(eps_values), n) bool, on the CPU.

    FGSM's direction does not depend on epsilon: one forward + backward (whose output also gives
    the clean predictions, epsilon 0) and one forward per epsilon > 0, the floor of any FGSM sweep.
    """
    logits, grad = input_gradient(model, xb, partial(attack_objective, labels=yb, loss=loss))  # (n, K), (n, C, H, W)
    clean = logits.argmax(1) == yb
    with torch.no_grad():
        # the step from xb stays in the eps-ball by construction: clamp to [0, 1] only (no projection)
        rows = [clean if e == 0 else model(sign_step(xb, grad, e)).argmax(1) == yb for e in eps_values]
    return torch.stack(rows).cpu()


def _pgd_correct(model, xb, yb, eps_values, loss, step_ratio, attack_kw) -> torch.Tensor:
    """Still correct under :func:`coursekit.adversarial.pgd` at every epsilon: (len(eps_values), n) bool, CPU."""
    with torch.no_grad():
        clean = model(xb).argmax(1) == yb
    rows = []
    for e in eps_values:
        if e == 0:
            rows.append(clean)
            continue
        kw = dict(attack_kw)
        if step_ratio is not None:
            kw["step_size"] = step_ratio * e
        adv = pgd(model, xb, yb, e, loss=loss, **kw)
        with torch.no_grad():
            rows.append(model(adv).argmax(1) == yb)
    return torch.stack(rows).cpu()


# ----------------------------------------------------------------------------------------------
# transfer and adversarial training


@dataclass
class TransferResult:
    """Accuracy of every model (columns) on attacks crafted on every model (rows)."""

    names: list[str]
    accuracy: torch.Tensor  # (S, T)
    clean: list[float]

    def table(self) -> str:
        w = max(12, *(len(n) + 2 for n in self.names))
        corner = "crafted on \\ tested on"
        head = f"{corner:<{w + 4}}" + "".join(f"{n:>{w}}" for n in self.names)
        rows = [head, f"{'(clean)':<{w + 4}}" + "".join(f"{a:>{w}.3f}" for a in self.clean)]
        for i, n in enumerate(self.names):
            rows.append(f"{n:<{w + 4}}" + "".join(f"{float(a):>{w}.3f}" for a in self.accuracy[i]))
        return "\n".join(rows)


def transfer_matrix(models: Mapping[str, nn.Module], x: torch.Tensor, labels,
                    attack: Callable | None = None, batch_size: int = 1000) -> TransferResult:
    """Craft adversarial examples on each model and test them on all (Szegedy et al. 2014; Papernot 2016).

    ``attack(model, x, labels) -> x_adv`` (default: :func:`pgd` with eps 0.1, 10 steps).
    """
    if not isinstance(models, Mapping) or len(models) < 1:
        raise ValueError("models must be a dict {name: model} with at least one model")
    attack = attack or (lambda m, xx, yy: pgd(m, xx, yy, 0.1, steps=10, batch_size=batch_size))
    names = list(models)
    x = check_images(x, pixel_range=True)
    clean = [accuracy(models[n], x, labels, batch_size) for n in names]
    acc = torch.zeros(len(names), len(names), device="cpu")  # (S, T) numbers, on the CPU
    for i, src in enumerate(names):
        adv = attack(models[src], x, labels)
        for j, dst in enumerate(names):
            acc[i, j] = accuracy(models[dst], adv, labels, batch_size)
    return TransferResult(names, acc, clean)


# ----------------------------------------------------------------------------------------------
# adversarial training (Goodfellow, Shlens & Szegedy 2015)


def adversarial_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, alpha: float = 0.5) -> torch.Tensor:
    """``alpha J(x, y) + (1 - alpha) J(x + eps sign(grad_x J), y)`` (Goodfellow et al. 2015, eq. 6).

    For *training*: the model stays in its current mode and its parameters keep their gradients;
    the FGSM copy is detached (no gradient through the attack). ``x`` and ``y`` are moved to the
    model's device; the loss (a scalar) lives there.
    """
    eps = check_eps(eps)
    if number(alpha, "alpha", minimum=0.0) > 1:
        raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
    device = model_device(model)
    x, y = x.to(device), y.to(device)
    if eps == 0 or alpha == 1:
        return F.cross_entropy(model(x), y)
    # the FGSM step along the mean loss's gradient; the clean loss keeps its graph for training
    x_adv, logits = fgsm_step(model, x, lambda z: F.cross_entropy(z, y), eps, retain_graph=True)
    return alpha * F.cross_entropy(logits, y) + (1 - alpha) * F.cross_entropy(model(x_adv), y)


def train_classifier(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, epochs: int = 2, eps: float = 0.0,
                     alpha: float = 0.5, lr: float = 2e-3, batch_size: int = 128, seed: int = 0,
                     progress: bool = True) -> list[float]:
    """Train ``model`` **in place** with Adam on ``(x, y)``, plainly (``eps=0``) or adversarially.

    Returns the mean loss of every epoch. The model is left in eval mode with frozen parameters
    (as :func:`coursekit.load_model` returns its models).
    """
    check_model(model)
    x = check_images(x, model=model, pixel_range=True)
    y = torch.as_tensor(y, device=y.device if isinstance(y, torch.Tensor) else "cpu").to(x.device)
    epochs, batch_size = positive_int(epochs, "epochs"), positive_int(batch_size, "batch_size")

    gen = cpu_generator(seed)
    model.requires_grad_(True).train()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    try:
        for epoch in range(epochs):
            perm = torch.randperm(len(x), generator=gen, device="cpu")
            total = 0.0
            for a, b in progress_bar(batches(len(x), batch_size), progress=progress, desc=f"epoch {epoch + 1}/{epochs}",
                             leave=False):
                idx = perm[a:b]
                loss = adversarial_loss(model, x[idx], y[idx], eps, alpha)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += float(loss.detach()) * (b - a)
            losses.append(total / len(x))
    finally:
        model.eval().requires_grad_(False)
        for p in model.parameters():
            p.grad = None
    return losses
