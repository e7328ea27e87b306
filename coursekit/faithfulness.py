"""Does a saliency map point at what the model uses? Deletion and insertion curves.

Petsiuk, Das & Saenko (2018), "RISE: Randomized Input Sampling for Explanation of Black-box
Models" (BMVC), Section 4.1, measure an explanation by *acting* on it:

* **deletion**: remove the pixels the map ranks as most relevant first, a fixed fraction at a
  time, and follow the probability of the explained class. A faithful map makes it fall fast,
  so the area under the curve (AUC) is **small**.
* **insertion**: start from a canvas with the information removed and put the most relevant
  pixels back first. A faithful map makes the probability rise fast: the AUC is **large**.

The convention used everywhere in this module (and in the lecture):

1. A map ``(N, H, W)`` ranks the pixels, most relevant (largest value) first; ties keep the
   row-major pixel order. An attribution ``(N, C, H, W)`` is first reduced to ``(N, H, W)``
   by the maximum of its absolute value over channels (Simonyan et al. 2014). A map of another
   resolution (e.g. Grad-CAM's 7x7) is resized bilinearly to the image first.
2. Step ``k`` of ``steps`` changes the ``round(k / steps * H * W)`` top-ranked pixels (all
   channels of a pixel together), so the fractions are ``0, 1/steps, ..., 1``.
3. "Removed" means replaced by the same pixel of a **baseline** image: ``"blur"`` (a
   Gaussian-blurred copy, the default for both curves), ``"zeros"`` (black) or any tensor.
4. The score is the softmax **probability** of the target class (``score="probability"``, or
   ``"prob"`` as in :func:`coursekit.saliency.occlusion`; ``score="logit"`` for the raw logit).
   A callable target receives the softmax output (or the logits).
5. AUC: trapezoid rule over the fractions in [0, 1] (:func:`auc`).

Caveats the numbers carry: the perturbed images are out of the training distribution (a blurred
patch or a black hole is itself evidence for some classes), and the curves only use the
*ranking* of the pixels, never the magnitude or sign of the map.

Devices: every function here computes on the model's device (:func:`coursekit.model_device`).
Images, labels and maps given on another device (a CPU image for a CUDA model) are moved there;
returned tensors live on the model's device, as in captum; numbers, numpy arrays and figures are on
the CPU. Seeded random numbers are drawn on the CPU and moved, so a seed gives the same draws on
every device.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .batching import batches, cpu_twin, in_layout
from .devices import cpu_generator
from .gradients import broadcast_baseline
from .guard import guarded
from .images import gaussian_blur
from .inputs import check_images, check_model, positive_int, target_indices, target_scores
from .maps import to_map
from .plotting import curve_style, legend_below
from .progress import progress_bar

__all__ = [
    "FaithfulnessResult",
    "auc",
    "blurred",
    "compare_methods",
    "deletion_curve",
    "insertion_curve",
    "perturbation_masks",
    "pixel_ranking",
    "plot_curves",
]


# ----------------------------------------------------------------------------------------------
# maps, rankings, baselines

# score name -> what is scored; "prob" is the name saliency.occlusion uses
_SCORES = {"probability": "probability", "prob": "probability", "logit": "logit"}


def reduce_map(saliency_map, x: torch.Tensor) -> torch.Tensor:
    """Bring a map or an attribution to ``(N, H, W)`` at the resolution of ``x`` (see module doc).

    Parameters
    ----------
    saliency_map : Tensor or ndarray, (N, H, W), (N, C, H, W), or (H, W) for a single image
    x : Tensor (N, C, H, W)

    Returns
    -------
    Tensor (N, H, W), float32, detached, on ``x``'s device.
    """
    if isinstance(saliency_map, np.ndarray):
        saliency_map = torch.from_numpy(saliency_map)
    if not isinstance(saliency_map, torch.Tensor):
        raise TypeError(f"a saliency map must be a tensor (N, H, W) or (N, C, H, W), got {type(saliency_map).__name__}")
    m = saliency_map.detach().to(device=x.device, dtype=torch.float32)
    n, c, h, w = x.shape
    if m.dim() == 2 and n == 1:
        m = m[None]
    if m.dim() == 4:
        if m.shape[1] != c and m.shape[1] != 1:
            raise ValueError(f"an attribution (N, C, H, W) must have C = {c} (or 1) channels like x, got {tuple(m.shape)}")
        m = to_map(m, "max_abs")  # (N,C,H,W) -> (N,H,W): max |attribution| over channels
    if m.dim() != 3 or m.shape[0] != n:
        raise ValueError(
            f"a saliency map for {n} image(s) must have shape ({n}, H, W) or ({n}, C, H, W), got {tuple(saliency_map.shape)}"
        )
    if not torch.isfinite(m).all():
        raise ValueError("the saliency map contains NaN or infinite values; fix the method that produced it")
    if m.shape[-2:] != (h, w):
        m = F.interpolate(m[:, None], size=(h, w), mode="bilinear", align_corners=False)[:, 0]
    return m


def pixel_ranking(saliency_map: torch.Tensor) -> torch.Tensor:
    """Rank of every pixel, 0 = most relevant.

    Parameters
    ----------
    saliency_map : Tensor (N, H, W)

    Returns
    -------
    Tensor (N, H*W) of int64: ``rank[i, p]`` is the position of pixel ``p`` (row-major) when the
    pixels of image ``i`` are sorted by decreasing map value; ties keep the row-major order.
    """
    flat = saliency_map.reshape(saliency_map.shape[0], -1)  # (N, HW)
    order = torch.sort(flat, dim=1, descending=True, stable=True).indices  # (N, HW): pixel ids, best first
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(flat.shape[1], device=flat.device).expand_as(order).contiguous())
    return rank


def perturbation_masks(rank: torch.Tensor, steps: int) -> tuple[np.ndarray, torch.Tensor]:
    """The fractions ``k / steps`` and, for each, which pixels are changed.

    Parameters
    ----------
    rank : Tensor (H*W,)
        From :func:`pixel_ranking` (one image).
    steps : int

    Returns
    -------
    fractions : ndarray (steps + 1,)
    masks : Tensor (steps + 1, H*W) of bool; ``masks[k]`` marks the ``round(k / steps * H*W)``
        top-ranked pixels.
    """
    hw = rank.numel()
    fractions = np.arange(steps + 1) / steps
    counts = torch.tensor([round(f * hw) for f in fractions], device=rank.device)  # (S+1,)
    return fractions, rank[None, :] < counts[:, None]


def blurred(x: torch.Tensor, sigma: float | None = None) -> torch.Tensor:
    """A Gaussian-blurred copy of ``x`` (the "blur" baseline).

    Parameters
    ----------
    x : Tensor (N, C, H, W)
    sigma : float, optional
        Standard deviation in pixels; default ``max(H, W) / 20`` (11.2 px at 224, 1.4 px at 28).
        RISE used a fixed 11-pixel kernel with sigma 5 at 224 pixels.

    Returns
    -------
    Tensor (N, C, H, W), computed by :func:`coursekit.images.gaussian_blur`.
    """
    x = check_images(x)
    return gaussian_blur(x, max(x.shape[-2:]) / 20 if sigma is None else sigma)


def _baseline(x: torch.Tensor, baseline) -> torch.Tensor:
    if isinstance(baseline, str):
        if baseline == "blur":
            return blurred(x)
        if baseline == "zeros":
            return torch.zeros_like(x)
        raise ValueError(f"baseline must be 'blur', 'zeros' or a tensor, got {baseline!r}")
    if baseline is None:
        raise TypeError("baseline must be 'blur', 'zeros', a number or a tensor, got None")
    return broadcast_baseline(baseline, x)  # a number or a tensor broadcastable to x, shaped like x


def _check_score(score) -> str:
    if score not in _SCORES:
        raise ValueError(f"score must be 'probability' (or 'prob') or 'logit', got {score!r}")
    return _SCORES[score]


def _scores(model: nn.Module, batch: torch.Tensor, target, score: str) -> torch.Tensor:  # (B,C,H,W) -> (B,)
    out = model(batch)  # (B, K)
    if score == "probability":
        out = out.softmax(dim=1)
    return target_scores(out, target)


def _image_target(targets, i: int):
    """The target of image ``i`` (from :func:`coursekit.inputs.target_indices`): its class index or the callable."""
    return targets if callable(targets) else targets[i]


def _endpoint_scores(model, x, base, targets, score) -> np.ndarray:
    """(N, 2): the score of each unmodified image and of its baseline (the ends of both curves)."""
    out = np.zeros((x.shape[0], 2))
    for i in range(x.shape[0]):
        out[i] = _scores(model, torch.stack([x[i], base[i]]), _image_target(targets, i), score).cpu().double().numpy()
    return out


def _curve(model, x, target, saliency_map, *, kind: str, steps: int, baseline, batch_size: int,
           score: str, progress: bool, endpoints: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    check_model(model)
    x = check_images(x, model=model).detach()
    steps = positive_int(steps, "steps")
    batch_size = positive_int(batch_size, "batch_size")
    score = _check_score(score)
    n, _, h, w = x.shape
    maps = reduce_map(saliency_map, x)  # (N,H,W)
    base = _baseline(x, baseline)  # (N,C,H,W)
    ranks = pixel_ranking(maps)  # (N,HW)
    targets = target_indices(target, n)  # LongTensor (N,) or the callable

    probs = np.zeros((n, steps + 1))
    with guarded(model, what=f"{kind}_curve"), torch.no_grad():
        if endpoints is None:  # a curve of its own (compare_methods passes its twin and the endpoints of all methods)
            model, layout = cpu_twin(model, x)  # on the CPU, a channels-last copy: 1.31x on fashion_cnn
            x, base = in_layout(x, layout), in_layout(base, layout)
            endpoints = _endpoint_scores(model, x, base, targets, score)
        # fraction 0 and 1 are the unmodified image and the baseline, whatever the map:
        # only the steps in between need a forward pass
        first, last = (0, 1) if kind == "deletion" else (1, 0)
        probs[:, 0], probs[:, -1] = endpoints[:, first], endpoints[:, last]
        for i in progress_bar(range(n), progress=progress, desc=f"{kind} curves"):
            _, masks = perturbation_masks(ranks[i], steps)  # (S+1, HW)
            masks = masks.view(steps + 1, 1, h, w).to(x.dtype)[1:-1]  # (S-1,1,H,W), 1 = pixel changed
            start, end = (x[i], base[i]) if kind == "deletion" else (base[i], x[i])
            for j, stop in batches(steps - 1, batch_size):
                m = masks[j:stop]  # (B,1,H,W)
                batch = start[None] * (1 - m) + end[None] * m  # (B,C,H,W)
                scores = _scores(model, batch, _image_target(targets, i), score)  # (B,)
                probs[i, 1 + j : 1 + j + len(m)] = scores.cpu().double().numpy()
    return np.arange(steps + 1) / steps, probs


def deletion_curve(model: nn.Module, x: torch.Tensor, target, saliency_map, steps: int = 20,
                   baseline="blur", batch_size: int = 32, score: str = "probability",
                   progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Probability of the target while the most relevant pixels are removed first (RISE, Petsiuk et al. 2018).

    Parameters
    ----------
    model : nn.Module
        Classifier taking ``x`` and returning logits ``(N, K)``; left in its mode.
    x : Tensor (N, C, H, W)
        Images in [0, 1].
    target : int, sequence of int (one per image), or callable ``output -> (N,)``
        What is explained. A callable receives the softmax output (``score="probability"``).
    saliency_map : Tensor (N, H, W) or (N, C, H, W)
        Ranks the pixels (see the module docstring for the convention).
    steps : int
        Number of equal fractions; the curve has ``steps + 1`` points, fraction 0 to 1.
    baseline : "blur", "zeros", float or Tensor broadcastable to ``x``
        What a removed pixel becomes.
    batch_size : int
        Perturbed images per forward pass.
    score : "probability" (alias "prob") or "logit"
    progress : bool
        Show a progress bar over the images.

    Returns
    -------
    fractions : ndarray (steps + 1,)
        Fraction of pixels removed, ``0, 1/steps, ..., 1``.
    probs : ndarray (N, steps + 1)
        Score of the target for each image and fraction; ``probs[:, 0]`` is the score of the
        unmodified image. Lower area (:func:`auc`) = more faithful map.
    """
    return _curve(model, x, target, saliency_map, kind="deletion", steps=steps, baseline=baseline,
                  batch_size=batch_size, score=score, progress=progress)


def insertion_curve(model: nn.Module, x: torch.Tensor, target, saliency_map, steps: int = 20,
                    baseline="blur", batch_size: int = 32, score: str = "probability",
                    progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Probability of the target while the most relevant pixels are put back first into the baseline.

    Same parameters as :func:`deletion_curve`. ``probs[:, 0]`` is the score of the baseline
    image and ``probs[:, -1]`` the score of the unmodified image. Higher area (:func:`auc`) =
    more faithful map (Petsiuk et al. 2018).
    """
    return _curve(model, x, target, saliency_map, kind="insertion", steps=steps, baseline=baseline,
                  batch_size=batch_size, score=score, progress=progress)


def auc(fractions, probs):
    """Area under a deletion or insertion curve, by the trapezoid rule.

    Parameters
    ----------
    fractions : array-like (S,)
        Increasing x values (fractions of pixels changed).
    probs : array-like (S,) or (N, S)
        Curve values.

    Returns
    -------
    float for one curve, ndarray (N,) for a batch of curves.
    """
    f = np.asarray(fractions, dtype=np.float64)
    p = np.asarray(probs.detach().cpu() if isinstance(probs, torch.Tensor) else probs, dtype=np.float64)
    if f.ndim != 1 or f.size < 2:
        raise ValueError(f"fractions must be a 1-d array of at least 2 values, got shape {f.shape}")
    if np.any(np.diff(f) < 0):
        raise ValueError("fractions must be increasing")
    if p.shape[-1] != f.size:
        raise ValueError(f"probs must have {f.size} values along its last axis (one per fraction), got shape {p.shape}")
    area = ((p[..., 1:] + p[..., :-1]) * np.diff(f) / 2).sum(axis=-1)
    return float(area) if p.ndim == 1 else area


# ----------------------------------------------------------------------------------------------
# several methods on the same images


@dataclass
class FaithfulnessResult:
    """Deletion and insertion curves of several methods on the same images.

    Attributes
    ----------
    fractions : ndarray (S+1,)
    deletion, insertion : dict[str, ndarray (N, S+1)]
        One array of curves per method.
    baseline : str
        Description of the baseline used.
    """

    fractions: np.ndarray
    deletion: dict[str, np.ndarray] = field(default_factory=dict)
    insertion: dict[str, np.ndarray] = field(default_factory=dict)
    baseline: str = "blur"

    @property
    def methods(self) -> list[str]:
        return list(self.deletion or self.insertion)

    def aucs(self, kind: str = "deletion") -> dict[str, np.ndarray]:
        """``{method: (N,) AUC per image}`` for ``kind`` in ``"deletion"``, ``"insertion"``."""
        curves = self._curves(kind)
        return {m: np.atleast_1d(auc(self.fractions, c)) for m, c in curves.items()}

    def _curves(self, kind: str) -> dict[str, np.ndarray]:
        if kind not in ("deletion", "insertion"):
            raise ValueError(f"kind must be 'deletion' or 'insertion', got {kind!r}")
        return getattr(self, kind)

    def table(self, decimals: int = 2, image_names: Sequence[str] | None = None) -> str:
        """A text table: one row per method, deletion AUC (lower is better) and insertion AUC
        (higher is better) per image and their means."""
        dele, ins = self.aucs("deletion") if self.deletion else {}, self.aucs("insertion") if self.insertion else {}
        n = len(next(iter((dele or ins).values())))
        names = list(image_names) if image_names is not None else [f"img{i}" for i in range(n)]
        if len(names) != n:
            raise ValueError(f"got {len(names)} image names for {n} images")
        cols = []
        for kind, values in (("del", dele), ("ins", ins)):
            if values:
                cols += [(f"{kind} {nm}", kind, i) for i, nm in enumerate(names)] + ([(f"{kind} mean", kind, None)] if n > 1 else [])
        width = max(8, *(len(c[0]) for c in cols))
        mw = max(6, *(len(m) for m in self.methods))
        lines = [f"{'method':<{mw}}  " + "  ".join(f"{c[0]:>{width}}" for c in cols)]
        for m in self.methods:
            cells = []
            for _, kind, i in cols:
                v = (dele if kind == "del" else ins)[m]
                cells.append(f"{(v.mean() if i is None else v[i]):>{width}.{decimals}f}")
            lines.append(f"{m:<{mw}}  " + "  ".join(cells))
        return "\n".join(lines)


def compare_methods(model: nn.Module, x: torch.Tensor, target, maps: Mapping[str, torch.Tensor],
                    steps: int = 20, baseline="blur", batch_size: int = 32, kinds: Sequence[str] = ("deletion", "insertion"),
                    score: str = "probability", progress: bool = True) -> FaithfulnessResult:
    """Deletion and insertion curves for every map in ``maps``, all with one convention.

    Parameters
    ----------
    model, x, target, steps, baseline, batch_size, score
        As in :func:`deletion_curve`.
    maps : dict[str, Tensor (N, H, W) or (N, C, H, W)]
        One saliency map per method, computed beforehand on ``x`` for ``target``.
    kinds : sequence of "deletion", "insertion"
    progress : bool
        A progress bar over the methods.

    Returns
    -------
    FaithfulnessResult
    """
    if not isinstance(maps, Mapping) or not maps:
        raise ValueError("maps must be a non-empty dict {method name: saliency map}")
    bad = [k for k in kinds if k not in ("deletion", "insertion")]
    if bad or not kinds:
        raise ValueError(f"kinds must be a non-empty subset of ('deletion', 'insertion'), got {tuple(kinds)!r}")
    steps = positive_int(steps, "steps")

    check_model(model)
    x = check_images(x, model=model).detach()
    score = _check_score(score)
    base = _baseline(x, baseline)  # computed once for all methods
    result = FaithfulnessResult(np.arange(steps + 1) / steps, baseline=baseline if isinstance(baseline, str) else "tensor")
    with guarded(model, what="compare_methods"):  # one guard (and one train-mode warning) for all curves
        # on the CPU all curves run a channels-last copy (deletion curves on fashion_cnn: 13.9 s against 18.2 s of
        # CPU for 4 methods x 300 images, AUCs within 2.2e-7); the user's model is not touched
        runner, layout = cpu_twin(model, x)
        x_run, base_run = in_layout(x, layout), in_layout(base, layout)
        with torch.no_grad():
            endpoints = _endpoint_scores(runner, x_run, base_run, target_indices(target, x.shape[0]), score)
        for name, m in progress_bar(list(maps.items()), progress=progress, desc="deletion/insertion"):
            for kind in kinds:
                _, probs = _curve(runner, x_run, target, m, kind=kind, steps=steps, baseline=base_run,
                                  batch_size=batch_size, score=score, progress=False, endpoints=endpoints)
                getattr(result, kind)[name] = probs
    return result


def plot_curves(result: FaithfulnessResult, image: int | None = None, axes=None, title: str | None = None):
    """Deletion and insertion curves, one line per method, AUC in the legend.

    Parameters
    ----------
    result : FaithfulnessResult
    image : int, optional
        Plot the curves of one image; default: the mean curve over all images (the legend then
        shows the mean AUC).
    axes : sequence of matplotlib axes, optional
        One per kind present in ``result``.

    Returns
    -------
    matplotlib Figure
    """
    import matplotlib.pyplot as plt

    kinds = [k for k in ("deletion", "insertion") if getattr(result, k)]
    if axes is None:
        fig, axes = plt.subplots(1, len(kinds), figsize=(5.5 * len(kinds), 4), squeeze=False)
        axes = axes[0]
    else:
        axes = list(np.atleast_1d(axes))
        if len(axes) != len(kinds):
            raise ValueError(f"need {len(kinds)} axes (one per curve kind), got {len(axes)}")
    fig = axes[0].figure
    for ax, kind in zip(axes, kinds):
        aucs = result.aucs(kind)
        for i, (name, probs) in enumerate(result._curves(kind).items()):
            if image is not None and not 0 <= image < probs.shape[0]:
                raise ValueError(f"image must be in 0..{probs.shape[0] - 1}, got {image}")
            curve = probs.mean(axis=0) if image is None else probs[image]
            a = aucs[name].mean() if image is None else aucs[name][image]
            style = curve_style(i, len(curve))
            if name.lower().startswith("random"):
                style.update(color="gray", linestyle="--", marker=None)
            ax.plot(result.fractions, curve, label=f"{name} (AUC {a:.2f})", **style)
        better = "lower" if kind == "deletion" else "higher"
        ax.set_title(f"{kind} ({better} AUC = more faithful)", fontsize=10)
        verb = "removed" if kind == "deletion" else "inserted"
        ax.set_xlabel(f"fraction of pixels {verb} (most relevant first)")
        ax.set_ylabel("probability of the target class" + ("" if image is not None else " (mean over images)"))
        ax.set_xlim(0, 1)
        ax.set_ylim(bottom=0)
        legend_below(ax, pad=0.14)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def random_map(x: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """A uniformly random ``(N, H, W)`` map: the chance level of deletion/insertion curves."""
    x = check_images(x)
    g = cpu_generator(seed)
    return torch.rand(x.shape[0], *x.shape[-2:], generator=g, device="cpu").to(x.device)


__all__ += ["random_map", "reduce_map"]
