"""Sanity checks for saliency maps: does the map change when the model is destroyed?

Adebayo, Gilmer, Muelly, Goodfellow, Hardt & Kim (2018), "Sanity Checks for Saliency Maps"
(NeurIPS). An explanation of a *model's* decision must depend on the model. The **cascading
model-parameter randomisation test** re-initialises the weights layer by layer, from the
logits down to the input, and after each step compares the new map with the original one:

* a method that explains the model loses its similarity quickly (vanilla gradients, Grad-CAM);
* a method whose map stays the same while the network is turned into random noise behaves like
  an edge detector of the input, whatever it claims (guided backpropagation is the classic case:
  its maps survive randomising almost every layer).

The similarity is the Spearman rank correlation of the **absolute** maps (as in the paper's main
figures), optionally SSIM of the maps scaled to [0, 1]. The user's model is never touched: the
test runs on a deep copy.

:func:`independent_randomization` re-initialises one layer (group) at a time instead, the rest
keeping its trained weights.

Devices: every function here computes on the model's device (:func:`coursekit.model_device`).
Images, labels and maps given on another device (a CPU image for a CUDA model) are moved there;
returned tensors live on the model's device, as in captum; numbers, numpy arrays and figures are on
the CPU (the kept maps too: ``RandomizationResult.maps`` are CPU tensors). Seeded random numbers are
drawn on the CPU and moved, so a seed gives the same draws on every device.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from .hooks import get_layer
from .inputs import check_images, check_model
from .maps import to_map
from .plotting import curve_style
from .progress import progress_bar

__all__ = [
    "RandomizationResult",
    "cascading_randomization",
    "independent_randomization",
    "plot_randomization",
    "plot_randomization_maps",
    "randomization_steps",
    "rank_correlation",
    "reinitialize",
    "ssim",
]

_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def _has_params(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())


def randomization_steps(model: nn.Module) -> list[str]:
    """Names of the model's parametrised units, from the top (logits) down to the input.

    A unit is a module with parameters that is not a plain container: ``nn.Sequential``,
    ``nn.ModuleList`` and ``nn.ModuleDict`` are opened up (recursively), anything else (a conv,
    a linear layer, a residual block) is one unit. Order = definition order, reversed, which for
    the course's models is the order of the forward pass, reversed.

    Examples
    --------
    ``fashion_cnn``: ``classifier.4, classifier.1, features.7, features.5, features.2, features.0``
    (with the ``net.`` prefix).
    """
    units: list[str] = []

    def visit(prefix: str, module: nn.Module) -> None:
        for name, child in module.named_children():
            full = f"{prefix}.{name}" if prefix else name
            if not _has_params(child):
                continue
            if isinstance(child, _CONTAINERS) or (prefix == "" and _is_wrapper(child)):
                visit(full, child)
            else:
                units.append(full)

    visit("", model)
    return units[::-1]


def _is_wrapper(child: nn.Module) -> bool:
    # a top-level module holding the whole network (CourseModel.net): open it up
    return any(isinstance(c, _CONTAINERS) or _has_params(c) for c in child.children()) and not any(
        True for _ in child.parameters(recurse=False)
    )


def reinitialize(module: nn.Module, seed: int) -> None:
    """Re-initialise every parameter (and batch-norm statistics) inside ``module``, in place.

    Modules with ``reset_parameters`` (conv, linear, batch-norm, ...) use it, i.e. PyTorch's
    default initialisation (Adebayo et al. re-initialise from the layer's initialiser too);
    batch-norm running statistics are reset to mean 0, variance 1. Other parameters are drawn from
    a normal distribution with the standard deviation of the tensor they replace. Seeded, and
    the global random state is left as it was. ``requires_grad`` is not changed. The new values are
    drawn on the CPU and copied to the module's device, so a seed gives the same weights everywhere.
    """
    tensors = list(module.parameters()) + list(module.buffers())
    if any(t.device.type != "cpu" for t in tensors):
        twin = copy.deepcopy(module).to("cpu")
        reinitialize(twin, seed)
        with torch.no_grad():
            for t, new in zip(tensors, list(twin.parameters()) + list(twin.buffers())):
                t.copy_(new)
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        done: set[int] = set()
        for m in module.modules():
            own = list(m.parameters(recurse=False))
            if hasattr(m, "reset_parameters") and callable(m.reset_parameters):
                with torch.no_grad():
                    m.reset_parameters()
                done.update(id(p) for p in own)
            elif hasattr(m, "reset_running_stats"):
                m.reset_running_stats()
            with torch.no_grad():
                for p in own:
                    if id(p) not in done:
                        std = float(p.std()) if p.numel() > 1 else 0.0
                        p.normal_(0.0, std if std > 0 else 0.02)
                        done.add(id(p))


def _abs_map(m: torch.Tensor, method: str) -> torch.Tensor:
    """(N,H,W) or (N,C,H,W) -> |map| (N,H,W), float64 on the CPU."""
    if not isinstance(m, torch.Tensor):
        raise TypeError(f"method {method!r} must return a tensor, got {type(m).__name__}")
    m = m.detach().double().cpu()
    if m.dim() == 4:
        m = to_map(m, "max_abs")  # max |attribution| over channels
    if m.dim() != 3:
        raise ValueError(f"method {method!r} must return (N, H, W) or (N, C, H, W), got shape {tuple(m.shape)}")
    if not torch.isfinite(m).all():
        raise ValueError(f"method {method!r} returned NaN or infinite values")
    return m.abs()


def rank_correlation(a, b) -> np.ndarray:
    """Spearman rank correlation between maps, image by image.

    Parameters
    ----------
    a, b : Tensor or ndarray (N, H, W)

    Returns
    -------
    ndarray (N,)
        Correlation per image; ties get their average rank. A constant map has no ranking, so
        its correlation with anything is defined as 0 (instead of NaN).
    """
    from scipy.stats import rankdata

    a = np.asarray(a.detach().cpu() if isinstance(a, torch.Tensor) else a, dtype=np.float64)
    b = np.asarray(b.detach().cpu() if isinstance(b, torch.Tensor) else b, dtype=np.float64)
    if a.shape != b.shape or a.ndim < 2:
        raise ValueError(f"maps to compare must have the same shape (N, H, W), got {a.shape} and {b.shape}")
    a, b = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
    ra, rb = rankdata(a, axis=1), rankdata(b, axis=1)
    ra -= ra.mean(axis=1, keepdims=True)
    rb -= rb.mean(axis=1, keepdims=True)
    den = np.sqrt((ra**2).sum(axis=1) * (rb**2).sum(axis=1))
    num = (ra * rb).sum(axis=1)
    return np.where(den > 0, num / np.where(den > 0, den, 1.0), 0.0)


def ssim(a, b) -> np.ndarray:
    """Structural similarity (scikit-image) of maps scaled to [0, 1], image by image (N,)."""
    from skimage.metrics import structural_similarity

    a = np.asarray(a.detach().cpu() if isinstance(a, torch.Tensor) else a, dtype=np.float64)
    b = np.asarray(b.detach().cpu() if isinstance(b, torch.Tensor) else b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 3:
        raise ValueError(f"maps to compare must have the same shape (N, H, W), got {a.shape} and {b.shape}")

    def scaled(m):
        lo, hi = m.min(), m.max()
        return np.zeros_like(m) if hi - lo < 1e-12 else (m - lo) / (hi - lo)

    win = min(7, *(s if s % 2 else s - 1 for s in a.shape[1:]))
    return np.array([structural_similarity(scaled(x), scaled(y), data_range=1.0, win_size=win) for x, y in zip(a, b)])


_METRICS: dict[str, Callable] = {"spearman": rank_correlation, "ssim": ssim}


@dataclass
class RandomizationResult:
    """Similarity of each method's map with its original map after each randomisation step.

    Attributes
    ----------
    steps : list[str]
        Labels: ``"original"`` then one per step (the layer(s) randomised at that step).
    scores : dict[str, dict[str, ndarray (len(steps), N)]]
        ``scores[metric][method][k, i]``: similarity for image ``i`` after step ``k``.
    maps : dict[str, list[Tensor (N, H, W)]]
        The absolute maps of every step (when ``keep_maps``), for :func:`plot_randomization_maps`.
    cascading : bool
        True for the cascading test, False for independent randomisation.
    """

    steps: list[str]
    scores: dict[str, dict[str, np.ndarray]]
    maps: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    cascading: bool = True

    @property
    def methods(self) -> list[str]:
        return list(next(iter(self.scores.values())))

    def table(self, metric: str = "spearman", decimals: int = 2) -> str:
        """Mean similarity over images: one row per step, one column per method."""
        s = self.scores[metric]
        sw = max(len(x) for x in self.steps)
        cw = max(8, *(len(m) for m in s))
        lines = [f"{'randomised':<{sw}}  " + "  ".join(f"{m:>{cw}}" for m in s)]
        for k, step in enumerate(self.steps):
            # + 0.0 turns a rounded -0.0 into 0.0, so the table never shows "-0.00"
            cells = (round(float(v[k].mean()), decimals) + 0.0 for v in s.values())
            lines.append(f"{step:<{sw}}  " + "  ".join(f"{c:>{cw}.{decimals}f}" for c in cells))
        return "\n".join(lines)


def _label(step) -> str:
    items = step if isinstance(step, (list, tuple)) else [step]
    names = []
    for it in items:
        n = it if isinstance(it, str) else type(it).__name__
        names.append(n.removeprefix("net."))
    return names[0] if len(names) == 1 else f"{names[0]}..{names[-1]}" if len(names) > 2 else "+".join(names)


def _resolve_steps(model_copy: nn.Module, original: nn.Module, layers) -> list[tuple[str, list[nn.Module]]]:
    """Each step -> (label, modules of the copy)."""
    if layers is None:
        layers = randomization_steps(original)
    if isinstance(layers, (str, nn.Module)) or not isinstance(layers, Sequence) or len(layers) == 0:
        raise ValueError(
            "layers must be a non-empty list of steps; each step a layer name, a module of the model, "
            f"or a list of them randomised together; got {layers!r}"
        )
    names_of_original = {id(m): n for n, m in original.named_modules()}
    steps = []
    for step in layers:
        items = list(step) if isinstance(step, (list, tuple)) else [step]
        if not items:
            raise ValueError("a randomisation step must name at least one layer")
        modules = []
        for it in items:
            if isinstance(it, nn.Module):  # a module of the user's model: find its twin in the copy
                if id(it) not in names_of_original:
                    raise ValueError(f"the module {type(it).__name__} given in layers is not part of the model")
                it = names_of_original[id(it)]
            name, module = get_layer(model_copy, it)
            if not _has_params(module):
                raise ValueError(f"layer {name!r} has no parameters to randomise; pick a conv, linear or norm layer or a block")
            modules.append(module)
        labels = [get_layer(original, it)[0] if isinstance(it, str) else names_of_original[id(it)] for it in items]
        steps.append((_label(labels), modules))
    return steps


def _run(model, x, target, methods, layers, seed, metrics, keep_maps, cascading, progress) -> RandomizationResult:
    check_model(model)
    x = check_images(x, model=model)
    if not isinstance(methods, Mapping) or not methods:
        raise ValueError("methods must be a non-empty dict {name: callable(model, x, target) -> map}")
    for name, fn in methods.items():
        if not callable(fn):
            raise TypeError(f"method {name!r} must be callable(model, x, target), got {type(fn).__name__}")
    if isinstance(metrics, str):
        metrics = (metrics,)
    unknown = [m for m in metrics if m not in _METRICS]
    if unknown or not metrics:
        raise ValueError(f"metrics must be chosen from {sorted(_METRICS)}, got {tuple(metrics)!r}")

    twin = copy.deepcopy(model).eval()  # the user's model is never modified: no guard needed
    steps = _resolve_steps(twin, model, layers)
    trained = {k: v.clone() for k, v in twin.state_dict().items()} if not cascading else None
    x = x.detach()

    def maps_now() -> dict[str, torch.Tensor]:
        return {name: _abs_map(fn(twin, x, target), name) for name, fn in methods.items()}

    original = maps_now()
    labels = ["original"] + [label for label, _ in steps]
    scores = {metric: {name: np.zeros((len(labels), x.shape[0])) for name in methods} for metric in metrics}
    kept: dict[str, list[torch.Tensor]] = {name: [] for name in methods} if keep_maps else {}  # float32 copies

    def score(k: int, current: dict[str, torch.Tensor]) -> None:
        for name, m in current.items():
            if m.shape != original[name].shape:
                raise ValueError(f"method {name!r} changed its output shape from {tuple(original[name].shape)} to {tuple(m.shape)}")
            for metric in metrics:
                scores[metric][name][k] = _METRICS[metric](original[name], m)
            if keep_maps:
                kept[name].append(m.float())

    score(0, original)
    for k, (_label, modules) in enumerate(progress_bar(steps, progress=progress, desc="randomising layers"), start=1):
        if not cascading:
            twin.load_state_dict(trained)
        for j, module in enumerate(modules):
            reinitialize(module, seed=seed * 1000 + 10 * k + j)
        score(k, maps_now())
    return RandomizationResult(labels, scores, kept, cascading)


def cascading_randomization(model: nn.Module, x: torch.Tensor, target, methods: Mapping[str, Callable],
                            layers=None, seed: int = 0, metrics: Sequence[str] = ("spearman",),
                            keep_maps: bool = True, progress: bool = True) -> RandomizationResult:
    """Cascading model-parameter randomisation test (Adebayo et al. 2018, Section 3.1).

    Parameters
    ----------
    model : nn.Module
        The trained model; it is deep-copied and left untouched.
    x : Tensor (N, C, H, W)
        Images in [0, 1].
    target : int, sequence of int or callable
        Passed unchanged to every method.
    methods : dict[str, callable(model, x, target) -> Tensor (N, H, W) or (N, C, H, W)]
        The saliency methods to test; each is called on the (randomised) copy. An attribution
        ``(N, C, H, W)`` is reduced by max |.| over channels.
    layers : list, optional
        The steps, from the top of the network down. Each step is a layer name, a module of
        ``model``, or a list of them randomised together in one step (e.g. a whole stage of an
        EfficientNet). Steps accumulate: step ``k`` leaves steps ``1..k`` randomised. Default:
        every parametrised unit, :func:`randomization_steps`.
    seed : int
        Seeds the re-initialisation; the global random state is not changed.
    metrics : sequence of "spearman", "ssim"
        Similarities to the original map; "spearman" is the rank correlation of absolute maps.
    keep_maps : bool
        Keep every step's maps in the result (for :func:`plot_randomization_maps`).
    progress : bool
        Progress bar over the steps.

    Returns
    -------
    RandomizationResult
        ``scores[metric][method]`` has shape ``(1 + len(layers), N)``; row 0 compares the
        original map with itself (1 for Spearman).
    """
    return _run(model, x, target, methods, layers, seed, metrics, keep_maps, True, progress)


def independent_randomization(model: nn.Module, x: torch.Tensor, target, methods: Mapping[str, Callable],
                              layers=None, seed: int = 0, metrics: Sequence[str] = ("spearman",),
                              keep_maps: bool = True, progress: bool = True) -> RandomizationResult:
    """Independent randomisation (Adebayo et al. 2018): re-initialise one step at a time, the
    rest of the network keeping its trained weights. Parameters as in :func:`cascading_randomization`."""
    return _run(model, x, target, methods, layers, seed, metrics, keep_maps, False, progress)


def plot_randomization(result: RandomizationResult, metric: str = "spearman", ax=None, title: str | None = None):
    """Similarity with the original map against the layers randomised so far, one line per method.

    Lines show the mean over images, the shaded band the range (min to max) over images.
    Returns the matplotlib Figure.
    """
    import matplotlib.pyplot as plt

    if metric not in result.scores:
        raise ValueError(f"metric {metric!r} was not computed; available: {sorted(result.scores)}")
    if ax is None:
        _, ax = plt.subplots(figsize=(max(6.0, 0.6 * len(result.steps) + 2), 4))
    k = np.arange(len(result.steps))
    for i, (name, s) in enumerate(result.scores[metric].items()):
        (line,) = ax.plot(k, s.mean(axis=1), label=name, **curve_style(i))
        if s.shape[1] > 1:
            ax.fill_between(k, s.min(axis=1), s.max(axis=1), color=line.get_color(), alpha=0.15)
    ax.set_xticks(k)
    ax.set_xticklabels(result.steps, rotation=45, ha="right", fontsize=9)
    ax.axhline(0, color="black", linewidth=0.5)
    what = "layers randomised cumulatively, from the top" if result.cascading else "the single layer randomised"
    ax.set_xlabel(what)
    ax.set_ylabel("Spearman rank corr. of |map| with original" if metric == "spearman" else f"{metric} with original map")
    ax.set_ylim(-0.2 if metric == "spearman" else None, 1.05)
    ax.set_title(title or ("Cascading" if result.cascading else "Independent") + " randomisation (Adebayo et al. 2018)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=9, frameon=False)  # beside the curves
    ax.grid(alpha=0.3)
    ax.figure.tight_layout()
    return ax.figure


def plot_randomization_maps(result: RandomizationResult, image: int = 0, steps: Sequence[int] | None = None,
                            size: float = 1.6):
    """The absolute maps of each method (rows) after each randomisation step (columns).

    Each map is shown on its own scale, from 0 to its 99th percentile (so that a few extreme pixels
    do not turn the rest black), with one colour bar for that shared 0-1 scale. ``steps`` picks
    columns (indices into ``result.steps``). Returns the matplotlib Figure.
    """
    import matplotlib.pyplot as plt

    if not result.maps:
        raise ValueError("the result has no maps: run the test with keep_maps=True")
    cols = list(range(len(result.steps))) if steps is None else list(steps)
    methods = list(result.maps)
    fig, axes = plt.subplots(len(methods), len(cols), figsize=(size * len(cols) + 0.8, size * len(methods) + 0.5), squeeze=False,
                             layout="constrained")
    for r, name in enumerate(methods):
        for c, k in enumerate(cols):
            m = result.maps[name][k][image].cpu().numpy()  # (H, W), non-negative
            top = np.quantile(m, 0.99)
            top = top if top > 0 else m.max()
            im = axes[r, c].imshow(np.clip(m / top, 0, 1) if top > 0 else np.zeros_like(m), cmap="gray", vmin=0, vmax=1)
            axes[r, c].set_xticks([])
            axes[r, c].set_yticks([])
            if r == 0:
                axes[r, c].set_title(result.steps[k], fontsize=7, rotation=30)
            if c == 0:
                axes[r, c].set_ylabel(name, fontsize=8)
    bar = fig.colorbar(im, ax=axes, shrink=0.5, aspect=30, pad=0.02)  # every panel shares the scale 0 .. 1
    bar.set_label("|map| / its 99th percentile, per map", fontsize=8)
    bar.ax.tick_params(labelsize=7)
    fig.suptitle("|map| after randomising the layers above each column (left: trained model)", fontsize=10)
    return fig
