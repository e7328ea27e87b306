"""Lecture 1, filters: what a CNN's weights and activations look like.

* First-layer filters shown as images (Krizhevsky et al. 2012, fig. 3; Zeiler & Fergus 2014, fig. 2):
  :func:`first_layer_filters`, :func:`show_filters`.
* Where Gabor-like first-layer filters come from: independent components of natural-image patches
  (Bell & Sejnowski 1997; the sparse-coding result of Olshausen & Field 1996):
  :func:`natural_image_filters`.
* Activation maps of one image at several depths: :func:`activation_maps`,
  :func:`show_activation_maps`, and an interactive :func:`explore_activations`.
* A per-layer inspector in the spirit of Karpathy's ConvNetJS demo: activations, d target /
  d activation, weights and weight gradients with their ranges and parameter counts:
  :func:`layer_inspector`, :func:`show_layer_inspector`, :func:`inspector_table`.
* Small functions the exercise set ``01_filters`` asks students to write (marked ``@reference``):
  :func:`conv_param_count`, :func:`normalize_filters`, :func:`activation_maps`.

How far each unit sees (receptive fields, Araujo et al. 2019) lives in
:mod:`coursekit.receptive_fields`; its functions are re-exported here, so the lecture's
``fl.receptive_fields(...)``, ``fl.receptive_field_table(...)`` and the exercise references
``fl.conv_output_size`` / ``fl.receptive_field_size`` keep working.

References
----------
A. Krizhevsky, I. Sutskever, G. Hinton (2012). ImageNet classification with deep convolutional
neural networks. NeurIPS.
M. Zeiler, R. Fergus (2014). Visualizing and understanding convolutional networks. ECCV.
B. Olshausen, D. Field (1996). Emergence of simple-cell receptive field properties by learning a
sparse code for natural images. Nature 381, 607-609.
A. Bell, T. Sejnowski (1997). The "independent components" of natural scenes are edge filters.
Vision Research 37(23), 3327-3338.

Devices: every function here computes on the model's device (:func:`coursekit.model_device`).
Images, labels and maps given on another device (a CPU image for a CUDA model) are moved there;
returned tensors live on the model's device, as in captum; numbers, numpy arrays and figures are on
the CPU. Seeded random numbers are drawn on the CPU and moved, so a seed gives the same draws on
every device.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import matplotlib.pyplot as plt
import numpy as np
import torch
from torch import nn

from ._reference import reference
from .guard import guarded
from .hooks import get_layer, record, resolve_layers
from .images import convert_channels, image_tensor
from .inputs import check_images, check_model, int_pair, positive_int, target_scores
from .models import Normalize
from .plotting import draw_image
from .receptive_fields import (  # re-exported: lecture 1 reaches them as coursekit.filters.*
    EffectiveReceptiveField,
    EmpiricalReceptiveField,
    ReceptiveField,
    conv_output_size,
    draw_receptive_fields,
    effective_receptive_field,
    empirical_receptive_field,
    plot_receptive_fields,
    receptive_field_size,
    receptive_field_table,
    receptive_fields,
    show_effective_receptive_fields,
)
from .threads import library_threads

__all__ = [
    "EffectiveReceptiveField",
    "EmpiricalReceptiveField",
    "LayerRecord",
    "LearntFilters",
    "ReceptiveField",
    "activation_maps",
    "conv_output_size",
    "conv_param_count",
    "draw_receptive_fields",
    "effective_receptive_field",
    "empirical_receptive_field",
    "explore_activations",
    "first_layer_filters",
    "inspector_table",
    "layer_inspector",
    "natural_image_filters",
    "normalize_filters",
    "plot_receptive_fields",
    "receptive_field_size",
    "receptive_field_table",
    "receptive_fields",
    "show_activation_maps",
    "show_effective_receptive_fields",
    "show_filters",
    "show_layer_inspector",
]


def _first_conv_name(model: nn.Module) -> str:
    layers = getattr(model, "layers", None)
    if isinstance(layers, dict) and "first_conv" in layers:
        return layers["first_conv"]
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            return name
    raise ValueError(f"{type(model).__name__} has no nn.Conv2d layer; pass layer=... explicitly")


# ----------------------------------------------------------------------------------------------
# filters as images


def first_layer_filters(model: nn.Module, layer: str | nn.Module | None = None) -> torch.Tensor:
    """The weights of a convolution layer, by default the model's first one.

    Parameters
    ----------
    model : nn.Module
        Any network; for a coursekit model ``model.layers["first_conv"]`` is used.
    layer : str or nn.Module, optional
        A ``nn.Conv2d`` of the model (name or module). Default: the first convolution.

    Returns
    -------
    Tensor (K, C, kh, kw)
        A detached copy of the filter bank: K filters over C input channels. For the first layer
        C is the number of image channels, so each filter can be drawn as a small image
        (Krizhevsky et al. 2012, fig. 3; Zeiler & Fergus 2014, fig. 2).
    """
    check_model(model)
    name, module = get_layer(model, layer if layer is not None else _first_conv_name(model))
    if not isinstance(module, nn.Conv2d):
        raise TypeError(f"layer {name!r} is a {type(module).__name__}, not an nn.Conv2d: it has no filters to show")
    return module.weight.detach().clone()  # (K, C, kh, kw)


def _normalize_filters(w: torch.Tensor) -> torch.Tensor:
    # Symmetric per-filter scaling: zero weight -> 0.5 (grey), the filter's largest |weight| -> 0 or 1.
    # Keeping 0 at grey shows the sign pattern (excitatory vs inhibitory parts) of each filter.
    scale = w.abs().flatten(1).amax(dim=1).clamp_min(1e-12).view(-1, *([1] * (w.dim() - 1)))  # (K,1,1,1)
    return (w / (2 * scale) + 0.5).clamp(0, 1)


@reference
def normalize_filters(weights: torch.Tensor) -> torch.Tensor:
    """Scale each filter of a bank into [0, 1] for display, symmetrically around zero.

    ``out[k] = weights[k] / (2 max|weights[k]|) + 0.5``: a zero weight becomes 0.5 (grey), the
    largest weight of filter ``k`` in absolute value becomes 0 or 1. Each filter gets its own
    scale (filters differ a lot in norm); an all-zero filter stays grey (no division by zero).

    Parameters
    ----------
    weights : Tensor (K, C, kh, kw)

    Returns
    -------
    Tensor (K, C, kh, kw) in [0, 1]
    """
    if not isinstance(weights, torch.Tensor) or weights.dim() != 4:
        got = tuple(weights.shape) if isinstance(weights, torch.Tensor) else type(weights).__name__
        raise ValueError(f"weights must be a 4-d tensor (K, C, kh, kw), got {got}")
    return _normalize_filters(weights.detach().float())


def show_filters(
    model_or_weights,
    layer: str | nn.Module | None = None,
    ncols: int = 8,
    title: str | None = None,
    max_filters: int = 64,
    max_channels: int = 8,
    size: float = 0.9,
):
    """Draw a filter bank as small images; returns the figure.

    Parameters
    ----------
    model_or_weights : nn.Module or Tensor (K, C, kh, kw)
        A model (its ``layer``, default the first convolution) or the weights themselves.
    layer : str or nn.Module, optional
        Which convolution of the model.
    ncols : int
        Filters per row when C is 1 or 3.
    title : str, optional
        Figure title; by default the layer and the bank's shape.
    max_filters : int
        Show at most this many filters (the first ones).
    max_channels : int
        For C not in (1, 3) (deeper layers), each row is one filter and each column one of its
        first ``max_channels`` input channels, drawn in grey (at most ``max_channels`` rows).
    size : float
        Inches per tile.

    Notes
    -----
    Each filter is scaled on its own, symmetrically (see :func:`normalize_filters`): grey is
    zero, bright is positive, dark is negative; for RGB filters a colour means "this filter
    responds to that colour". Following Krizhevsky et al. (2012) and Zeiler & Fergus (2014),
    only the first layer is readable this way: deeper filters see C abstract feature channels,
    not colours, and are usually only 3x3.
    """
    if isinstance(model_or_weights, nn.Module):
        w = first_layer_filters(model_or_weights, layer)
        name = get_layer(model_or_weights, layer if layer is not None else _first_conv_name(model_or_weights))[0]
    elif isinstance(model_or_weights, torch.Tensor):
        if layer is not None:
            raise ValueError("layer= only applies when a model is given, not a weight tensor")
        w, name = model_or_weights.detach(), "weights"
    else:
        raise TypeError(f"give a model or a weight tensor (K, C, kh, kw), got {type(model_or_weights).__name__}")
    if w.dim() != 4:
        raise ValueError(f"a filter bank has shape (K, C, kh, kw), got {tuple(w.shape)}")
    ncols = positive_int(ncols, "ncols")
    max_filters = positive_int(max_filters, "max_filters")
    max_channels = positive_int(max_channels, "max_channels")
    k_all, c, kh, kw = w.shape
    if c not in (1, 3):  # one row per filter: keep the figure readable
        max_filters = min(max_filters, max_channels)
    shown = _normalize_filters(w.float().cpu()[:max_filters])  # (K', C, kh, kw) in [0, 1]
    k = shown.shape[0]
    title = title or f"{name}: {k_all} filters of {c}x{kh}x{kw}" + (f" (first {k})" if k < k_all else "")
    if c in (1, 3):
        nrows = math.ceil(k / ncols)
        ncols = min(ncols, k)
        fig, axes = plt.subplots(nrows, ncols, figsize=(size * ncols, size * nrows + 0.6), squeeze=False)
        for ax in axes.flat:
            ax.axis("off")
        for i, ax in enumerate(axes.flat[:k]):
            img = shown[i].permute(1, 2, 0).numpy()  # (kh, kw, C)
            ax.imshow(img[:, :, 0] if c == 1 else img, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            ax.set_title(str(i), fontsize=9)
    else:
        nch = min(c, max_channels)
        fig, axes = plt.subplots(k, nch, figsize=(size * nch + 0.6, size * k + 0.6), squeeze=False)
        for i in range(k):
            for j in range(nch):
                ax = axes[i, j]
                ax.imshow(shown[i, j].numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
                ax.set_xticks([])
                ax.set_yticks([])
                if i == 0:
                    ax.set_title(f"in {j}", fontsize=9)
                if j == 0:
                    ax.set_ylabel(f"filter {i}", fontsize=9)
        title += f"\nrows: filters, columns: first {nch} of {c} input channels"
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------------------------
# filters learnt from natural images (where Gabor-like first layers come from)


class LearntFilters(NamedTuple):
    """What :func:`natural_image_filters` learnt.

    ``filters`` (K, C, p, p): the rows of the unmixing matrix, to correlate with an image like a
    first-layer convolution (each gives one independent component); ``basis`` (K, C, p, p): the
    columns of the mixing matrix, the patterns the patches are sums of; both ordered by the
    variance each component explains, largest first. ``patches``: how many patches were used.
    """

    filters: torch.Tensor
    basis: torch.Tensor
    patches: int


def _random_patches(images, size: int, n: int, channels: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` patches ``(n, channels * size * size)`` drawn evenly from ``images``, each minus its own mean."""
    pictures = [convert_channels(image_tensor(im), channels)[0].double().numpy() for im in images]  # (C, H, W)
    small = [p.shape for p in pictures if min(p.shape[1:]) < size]
    if small:
        raise ValueError(f"patch_size {size} does not fit in images of shape {small}")
    out = []
    for k, pic in enumerate(pictures):
        m = n // len(pictures) + (k < n % len(pictures))
        rows = rng.integers(0, pic.shape[1] - size + 1, m)
        cols = rng.integers(0, pic.shape[2] - size + 1, m)
        out += [pic[:, r:r + size, c:c + size].ravel() for r, c in zip(rows, cols)]
    patches = np.stack(out)
    return patches - patches.mean(1, keepdims=True)  # the DC component carries no structure


def natural_image_filters(images, patch_size: int = 12, n_components: int = 64, n_patches: int = 30000,
                          channels: int = 1, seed: int = 0, max_iter: int = 500) -> LearntFilters:
    """Filters learnt from random patches of natural images by independent component analysis.

    Olshausen & Field (1996) found that a sparse code for natural-image patches consists of
    localised, oriented, band-pass patterns, like the simple cells of the visual cortex and the
    Gabor-like first layers of CNNs; Bell & Sejnowski (1997) found the same with ICA, which is what
    runs here (scikit-learn's FastICA after PCA whitening to ``n_components`` dimensions). A CNN's
    first layer learns such filters when its kernels are large enough to hold them (AlexNet's
    11x11); nothing here uses a network.

    Parameters
    ----------
    images : sequence of images
        Sample names, paths, arrays or tensors (anything :func:`coursekit.load_image` reads), at
        their own sizes; pixels in [0, 1].
    patch_size : int
        Side of the square patches (and filters).
    n_components : int
        Number of filters; at most ``channels * patch_size ** 2``.
    n_patches : int
        Patches drawn at random positions, evenly from the images; each has its mean removed.
    channels : int
        1 (grey) or 3 (colour: then colour-opponent filters appear too).
    seed, max_iter : int
        Seed of the patch positions and of FastICA; FastICA's iteration limit.

    Returns
    -------
    LearntFilters
        ``filters`` and ``basis``, each (K, C, p, p) float32 on the CPU, and the patch count.
    """
    from sklearn.decomposition import FastICA

    if isinstance(images, (str, torch.Tensor, np.ndarray)) or not isinstance(images, Sequence) or not images:
        raise TypeError("images must be a non-empty list of images (sample names, paths, arrays or tensors)")
    size = positive_int(patch_size, "patch_size", minimum=2)
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 (grey) or 3 (colour), got {channels!r}")
    k = positive_int(n_components, "n_components")
    if k > channels * size * size - 1:
        raise ValueError(f"n_components must be below {channels * size * size} (the patch dimension minus its mean), got {k}")
    n = positive_int(n_patches, "n_patches", minimum=k)
    rng = np.random.default_rng(positive_int(seed, "seed", minimum=0))
    patches = _random_patches(images, size, n, channels, rng)  # (n, C * p * p)
    ica = FastICA(n_components=k, whiten="unit-variance", random_state=seed,
                  max_iter=positive_int(max_iter, "max_iter"), tol=1e-4)
    with library_threads():  # BLAS at torch's thread count: spinning threads cost 4x on a busy machine
        ica.fit(patches)
    basis = ica.mixing_.T  # (K, D): patch ~ sum of sources * basis (sources have unit variance)
    order = np.argsort(-np.linalg.norm(basis, axis=1), kind="stable")

    def as_bank(a):
        return torch.from_numpy(np.ascontiguousarray(a[order])).float().reshape(k, channels, size, size)

    return LearntFilters(as_bank(ica.components_), as_bank(basis), int(patches.shape[0]))


# ----------------------------------------------------------------------------------------------
# activation maps


def _activation_maps(model: nn.Module, x: torch.Tensor, layers) -> dict[str, torch.Tensor]:
    check_model(model)
    x = check_images(x, model=model)
    names = resolve_layers(model, layers)
    # eval mode (restored by the guard): in training mode batch norm would update its statistics
    with torch.no_grad(), guarded(model, what="activation_maps"), record(model, names) as rec:
        model(x)
    missing = [n for n in names if n not in rec.activations]
    if missing:
        raise ValueError(f"layers {missing} did not run during the forward pass (is their output used?)")
    return {n: rec.activations[n] for n in names}


@reference
def activation_maps(model: nn.Module, x: torch.Tensor, layers) -> dict[str, torch.Tensor]:
    """The outputs of ``layers`` for the images ``x``, read with forward hooks.

    Parameters
    ----------
    model : nn.Module
    x : Tensor (N, C, H, W)
        Model input (pixel space in [0, 1] for coursekit models).
    layers : str, module, or list of them
        E.g. ``[model.layers["early"], model.layers["middle"], model.layers["late"]]``.
        ``None``: those three for a coursekit model, else a first, middle and last convolution.

    Returns
    -------
    dict[str, Tensor]
        Full layer name -> detached output, ``(N, K, h, w)`` for convolutional layers, computed
        in eval mode. The hooks are removed and the model is left as it was. Zeiler & Fergus (2014) look at such maps to
        see which parts of an image drive which channel.
    """
    return _activation_maps(model, x, layers)


def _top_channels(a: torch.Tensor, n: int) -> list[int]:  # a: (K, h, w)
    return a.flatten(1).mean(1).argsort(descending=True)[:n].tolist()


def _map_style(maps: torch.Tensor) -> dict:
    """``imshow`` colour keywords for activation maps: zero-centred ``RdBu_r`` when any value is negative.

    Signed maps (a block output before any ReLU, a pre-activation) get a diverging map centred on
    zero, ``vmin = -vmax``, so white is 0, red positive and blue negative; non-negative maps (after
    a ReLU) get ``magma`` from 0 to their maximum. Either way one scale for all of ``maps``.
    """
    lo, hi = float(maps.min()), float(maps.max())
    if lo < 0:
        lim = max(-lo, hi) or 1.0
        return {"cmap": "RdBu_r", "vmin": -lim, "vmax": lim}
    return {"cmap": "magma", "vmin": 0.0, "vmax": hi or 1.0}


def show_activation_maps(
    model: nn.Module,
    x: torch.Tensor,
    layers=None,
    channels: int = 6,
    image_index: int = 0,
    size: float = 2.0,
    title: str | None = None,
):
    """One row per layer: the image, then the ``channels`` most active maps of that layer.

    Channels are ranked by their mean activation on the image. The maps of one row share one
    scale and one colour bar (see ``_map_style``): a zero-centred diverging map (``RdBu_r``) when
    the layer's output is signed, as EfficientNet's block outputs are (no ReLU at the end of a
    block), ``magma`` from 0 when it is not. Returns the figure.
    """
    channels = positive_int(channels, "channels")
    acts = _activation_maps(model, x, layers)
    if not 0 <= image_index < x.shape[0]:
        raise ValueError(f"image_index {image_index} out of range for a batch of {x.shape[0]}")
    flat = [n for n, a in acts.items() if a.dim() != 4]
    if flat:
        raise ValueError(f"layers {flat} do not output (N, K, h, w) maps; choose convolutional layers")
    fig, axes = plt.subplots(len(acts), channels + 1, figsize=(size * (channels + 1) + 0.8, size * len(acts) + 0.5),
                             squeeze=False, layout="constrained")
    for row, (name, a) in zip(axes, acts.items()):
        a = a[image_index].float()  # (K, h, w)
        draw_image(row[0], x[image_index], "input")
        for ax in row[1:]:
            ax.axis("off")
        top = _top_channels(a, channels)
        style = _map_style(a[top])
        im = None
        for ax, ch in zip(row[1:], top):
            im = ax.imshow(a[ch].cpu().numpy(), **style)
            ax.set_title(f"ch {ch}", fontsize=9)
        row[0].set_title(f"{name}\n{tuple(a.shape)}", fontsize=9)
        cb = fig.colorbar(im, ax=list(row[1:]), shrink=0.9, pad=0.01, aspect=12)
        cb.set_label("activation" + (" (0 = white)" if style["cmap"] == "RdBu_r" else ""), fontsize=8)
        cb.ax.tick_params(labelsize=8)
    fig.suptitle(title or "activation maps (most active channels; one scale and colour bar per layer)", fontsize=11)
    return fig


def explore_activations(model: nn.Module, x: torch.Tensor, layers=None, static: bool | None = None, ranks: int = 3):
    """Pick a layer and a channel, see its activation map next to the image.

    Built on :func:`coursekit.widgets.explorer`: a layer dropdown and a channel slider. The
    slider counts channels by how strongly they respond to this image (rank 1 = the channel with
    the largest mean activation), so the same slider works for layers of any width; the panel
    title names the channel's index in the layer.

    Parameters
    ----------
    model : nn.Module
    x : Tensor (1, C, H, W)
        One image (the first of a batch is used).
    layers : list of str or modules, optional
        Layers to choose from (default as in :func:`activation_maps`).
    static : bool, optional
        ``None``: the ipywidgets explorer in a live Jupyter kernel, else the static grid (also
        when ipywidgets is missing or ``COURSEKIT_STATIC=1``). ``True``: always the static grid,
        ``False``: always widgets.
    ranks : int
        Channels per layer in the static grid (the ``ranks`` most active ones).

    Returns
    -------
    coursekit.widgets.Explorer
        ``.widget`` (ipywidgets box) in widget mode, ``.figure`` (the static grid) otherwise; as
        the last expression of a cell it displays itself.
    """
    from .widgets import explorer

    x = check_images(x)
    ranks = positive_int(ranks, "ranks")
    acts = _activation_maps(model, x[:1], layers)
    flat = [n for n, a in acts.items() if a.dim() != 4]
    if flat:
        raise ValueError(f"layers {flat} do not output (N, K, h, w) maps; choose convolutional layers")
    maps = {n: a[0].float() for n, a in acts.items()}  # name -> (K, h, w)
    order = {n: _top_channels(a, a.shape[0]) for n, a in maps.items()}  # channels, most active first
    widest = min(a.shape[0] for a in maps.values())

    def draw(ax, layer, channel_rank):
        a = maps[layer]
        ch = order[layer][channel_rank - 1]
        m = a[ch].cpu()  # (h, w)
        up = torch.nn.functional.interpolate(m[None, None], size=tuple(x.shape[-2:]), mode="bilinear", align_corners=False)[0, 0]
        ax.axis("off")
        left, right = ax.inset_axes([0.0, 0.0, 0.45, 0.86]), ax.inset_axes([0.49, 0.0, 0.45, 0.86])
        cax = ax.inset_axes([0.955, 0.08, 0.025, 0.7])
        style = _map_style(m)  # signed maps on a zero-centred diverging scale
        draw_image(left, x[0], "where it fires, on the image")
        left.imshow(up.numpy(), alpha=0.6, **style)
        im = right.imshow(m.numpy(), **style)
        right.set_title(f"its {a.shape[1]}x{a.shape[2]} map", fontsize=9)
        right.axis("off")
        cb = ax.figure.colorbar(im, cax=cax)
        cb.set_label("activation", fontsize=8)
        cb.ax.tick_params(labelsize=8)
        ax.set_title(f"{layer}: channel {ch} of {a.shape[0]} (#{channel_rank} most active)", fontsize=10)

    names = list(maps)
    mode = "auto" if static is None else ("static" if static else "widget")
    view = explorer(
        draw,
        {"layer": names, "channel_rank": (1, widest, 1, 1)},
        static={"layer": names, "channel_rank": list(range(1, min(ranks, widest) + 1))},
        mode=mode,
        ncols=min(ranks, widest),
        size=4.4,
        title="activation explorer: layer and channel (ranked by mean activation on this image)",
        max_panels=max(12, len(names) * ranks),
    )
    if view.figure is not None:  # static grid: its panels are square, each of ours is two images wide
        w, h = view.figure.get_size_inches()
        view.figure.set_size_inches(w, 0.6 * h + 0.3)  # its constrained layout re-flows when drawn
    return view


# ----------------------------------------------------------------------------------------------
# the per-layer inspector (ConvNetJS style)


@dataclass
class LayerRecord:
    """What :func:`layer_inspector` found at one layer.

    ``activation`` and ``activation_grad`` have the layer's output shape ``(N, ...)``;
    ``weight`` / ``weight_grad`` are the layer's own ``weight`` and d target / d weight
    (``None`` for layers without weights); ``params`` counts all its parameters (bias included).
    """

    name: str
    kind: str
    activation: torch.Tensor
    activation_grad: torch.Tensor
    weight: torch.Tensor | None
    weight_grad: torch.Tensor | None
    params: int

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.activation.shape[1:])

    def ranges(self) -> dict[str, tuple[float, float] | None]:
        """(min, max) of activation, activation gradient, weight and weight gradient."""

        def mm(t):
            return None if t is None else (float(t.min()), float(t.max()))

        return {"activation": mm(self.activation), "activation_grad": mm(self.activation_grad),
                "weight": mm(self.weight), "weight_grad": mm(self.weight_grad)}


_SKIP_IN_INSPECTOR = (nn.Identity, nn.Dropout, nn.Dropout2d, nn.Flatten, Normalize)


def _default_inspector_layers(model: nn.Module) -> list[str]:
    names = [n for n, m in model.named_modules()
             if n and not list(m.children()) and not isinstance(m, _SKIP_IN_INSPECTOR)]
    if len(names) > 40:
        named = getattr(model, "layers", {})
        hint = f" e.g. {[named[k] for k in ('first_conv', 'early', 'middle', 'late') if k in named]}" if named else ""
        raise ValueError(
            f"{type(model).__name__} has {len(names)} layers; the inspector draws every layer it is given, so "
            f"choose a few with layers=[...]{hint}"
        )
    return names


def layer_inspector(model: nn.Module, x: torch.Tensor, target, layers=None, include_input: bool = True) -> list[LayerRecord]:
    """Activations, activation gradients, weights and weight gradients of every chosen layer.

    The view of Karpathy's ConvNetJS demo (and the IN5400 lecture on it): for one forward and one
    backward pass of ``target``, each layer's output, d target / d output, its weights and
    d target / d weights, with their ranges and parameter counts.

    Parameters
    ----------
    model : nn.Module
    x : Tensor (N, C, H, W)
    target : int or callable
        Class index, one per image, or ``output -> score`` (see :func:`coursekit.target_scores`);
        the scores of the batch are summed.
    layers : list of str or modules, optional
        Default: every leaf layer except identity, dropout, flatten and normalisation (an error
        asks you to choose when there are more than 40).
    include_input : bool
        Start with an ``"input"`` record: the image and d target / d image.

    Returns
    -------
    list of LayerRecord
        In forward order, computed in eval mode. The model is left exactly as it was: still
        frozen, in its own mode, no ``.grad`` set.
    """
    check_model(model)
    x = check_images(x, model=model)
    names = _default_inspector_layers(model) if layers is None else resolve_layers(model, layers)
    modules = dict(model.named_modules())
    weights = {n: modules[n].weight for n in names if isinstance(getattr(modules[n], "weight", None), nn.Parameter)}
    # Weight gradients need requires_grad=True on those weights, but coursekit models are frozen on
    # purpose (input-gradient methods must not pay for weight gradients). So we switch it on only for
    # the inspected layers' weights, inside the guard (eval mode, all other weights frozen), which
    # restores every flag on exit, even on error; and we use torch.autograd.grad, not .backward(),
    # so no .grad is ever stored on the model.
    with guarded(model, what="layer_inspector"):
        for w in weights.values():
            w.requires_grad_(True)
        xin = x.detach().clone().requires_grad_(include_input)
        with record(model, names, gradients=True) as rec:
            out = model(xin)
        score = target_scores(out, target).sum()
        missing = [n for n in names if n not in rec.outputs]
        if missing:
            raise ValueError(f"layers {missing} did not run during the forward pass")
        wanted = [rec.outputs[n] for n in names] + list(weights.values()) + ([xin] if include_input else [])
        grads = torch.autograd.grad(score, wanted, allow_unused=True)
    grads = [torch.zeros_like(t) if g is None else g.detach() for t, g in zip(wanted, grads)]
    act_grads = dict(zip(names, grads[: len(names)]))
    w_grads = dict(zip(weights, grads[len(names): len(names) + len(weights)]))
    records = []
    if include_input:
        records.append(LayerRecord("input", "input", x.detach().clone(), grads[-1], None, None, 0))
    for n in names:
        m = modules[n]
        w = weights.get(n)
        records.append(LayerRecord(
            n, type(m).__name__, rec.activations[n], act_grads[n],
            None if w is None else w.detach().clone(), w_grads.get(n),
            sum(p.numel() for p in m.parameters()),
        ))
    return records


def inspector_table(records: Sequence[LayerRecord], values: bool = True) -> str:
    """A text table of the inspector: layer, type, output shape, #params and (``values``) the ranges.

    With ``values=False`` only the structure (shapes and parameter counts) is listed.
    """
    if not records or not all(isinstance(r, LayerRecord) for r in records):
        raise TypeError("inspector_table takes the list returned by layer_inspector(...)")
    head = f"{'layer':22s} {'type':10s} {'output shape':16s} {'#params':>9s}"
    if values:
        head += f" {'act min':>9s} {'act max':>9s} {'grad min':>9s} {'grad max':>9s} {'dW min':>9s} {'dW max':>9s}"
    lines = [head, "-" * len(head)]
    for r in records:
        line = f"{r.name:22s} {r.kind[:10]:10s} {r.shape!s:16s} {r.params:>9,d}"
        if values:
            rg = r.ranges()
            cells = [*rg["activation"], *rg["activation_grad"], *(rg["weight_grad"] or ("", ""))]
            line += "".join(f" {c:>9.3g}" if c != "" else f" {'-':>9s}" for c in cells)
        lines.append(line)
    return "\n".join(lines)


def _row_axes(fig, gs, row: int, n: int):
    return [fig.add_subplot(gs[row, j]) for j in range(n)]


def _inspector_style(t: torch.Tensor, signed: bool) -> dict:
    """``imshow`` colours of an inspector row: zero-centred ``RdBu_r`` when ``signed`` or any value is
    negative (a convolution's output, the logits), else grey from the row's minimum to its maximum."""
    if signed or float(t.min()) < 0:
        lim = float(t.abs().max()) or 1.0
        return {"cmap": "RdBu_r", "vmin": -lim, "vmax": lim}
    return {"cmap": "gray", "vmin": float(t.min()), "vmax": float(t.max())}


def _draw_maps(axes, maps: torch.Tensor, signed: bool, label: str):  # maps (K, h, w)
    """One row of maps on a shared scale (signed: zero-centred ``RdBu_r``) with a colour bar.

    Values below zero make the row signed whatever ``signed`` says (a convolution's output).
    """
    style = _inspector_style(maps, signed)
    im = None
    for k, ax in enumerate(axes):
        ax.set_xticks([])
        ax.set_yticks([])
        if k < maps.shape[0]:
            im = ax.imshow(maps[k].cpu().numpy(), interpolation="nearest", **style)
        else:
            ax.axis("off")
    axes[0].set_ylabel(label, fontsize=9)
    if im is not None:
        cb = axes[0].figure.colorbar(im, ax=list(axes), shrink=0.9, pad=0.01, aspect=8)
        cb.set_label(label, fontsize=8)
        cb.ax.tick_params(labelsize=8)
    return im


def _draw_wide(ax, t: torch.Tensor, signed: bool, label: str, class_names=None) -> None:  # t (K,) or (out, in)
    t = t.detach().cpu().float()
    matrix = t.dim() == 2  # a linear layer's weights (out, in); else one value per unit
    t = t[None] if t.dim() == 1 else t.flatten(1)
    im = ax.imshow(t.numpy(), aspect="auto", interpolation="nearest", **_inspector_style(t, signed))  # e.g. the logits
    ax.set_yticks([])
    ax.set_ylabel(label, fontsize=9)
    ax.tick_params(labelsize=8)
    if class_names is not None and t.shape[0] == 1 and t.shape[1] == len(class_names):
        ax.set_xticks(range(len(class_names)), [str(c) for c in class_names], rotation=30, ha="right", fontsize=8)
    elif matrix:
        ax.set_xlabel(f"input unit (0-{t.shape[1] - 1})", fontsize=8)
        if class_names is not None and t.shape[0] == len(class_names):  # the last layer: one row per class
            ax.set_yticks(range(t.shape[0]), [str(c) for c in class_names], fontsize=7)
        else:
            ax.set_ylabel(f"{label}\n(row: output unit, {t.shape[0]})", fontsize=9)
    else:
        ax.set_xlabel(f"unit (0-{t.shape[1] - 1})", fontsize=8)
    cb = ax.figure.colorbar(im, ax=ax, pad=0.01, aspect=8)
    cb.set_label(label, fontsize=8)
    cb.ax.tick_params(labelsize=8)


def _filter_slices(w: torch.Tensor, n: int) -> torch.Tensor:  # (K, C, kh, kw) -> (n, kh, kw), input channel 0
    return w[:n, 0]


def show_layer_inspector(records: Sequence[LayerRecord], image_index: int = 0, max_channels: int = 8,
                         table: bool = True, size: float = 1.45, class_names: Sequence[str] | None = None) -> list:
    """Draw the inspector: one figure per layer, and print :func:`inspector_table`.

    Rows of each figure: activations (grey from their minimum to their maximum when they are
    non-negative, zero-centred ``RdBu_r`` when any is negative), activation gradients (zero-centred
    ``RdBu_r``: red positive, blue negative), and for layers with weights the filters (input
    channel 0 of each, or the weight matrix of a linear layer) and their gradients; every row has
    its colour bar. The input is drawn large, next to the gradient of the target with respect to
    it. ``class_names`` labels a 1-d output (the logits) by class. Returns the list of figures.
    """
    if not records or not all(isinstance(r, LayerRecord) for r in records):
        raise TypeError("show_layer_inspector takes the list returned by layer_inspector(...)")
    max_channels = positive_int(max_channels, "max_channels")
    if table:
        print(inspector_table(records))
    figs = []
    for r in records:
        if not 0 <= image_index < r.activation.shape[0]:
            raise ValueError(f"image_index {image_index} out of range for a batch of {r.activation.shape[0]}")
        a, g = r.activation[image_index].float(), r.activation_grad[image_index].float()
        if r.kind == "input" and a.shape[0] in (1, 3):
            fig = plt.figure(figsize=(2.6 * (1 + g.shape[0]) + 0.8, 3.2), layout="constrained")
            gs = fig.add_gridspec(1, 1 + g.shape[0])
            ax = fig.add_subplot(gs[0, 0])
            draw_image(ax, a, "")
            ax.axis("on")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_ylabel("image", fontsize=9)
            _draw_maps([fig.add_subplot(gs[0, j]) for j in range(1, 1 + g.shape[0])], g, True, "d target / d x")
        else:
            rows = 2 if r.weight is None else 4
            fig = plt.figure(figsize=(size * max_channels + 1.2, size * rows + 0.8), layout="constrained")
            gs = fig.add_gridspec(rows, max_channels)
            if a.dim() == 3:
                _draw_maps(_row_axes(fig, gs, 0, max_channels), a[:max_channels], False, "activations")
                _draw_maps(_row_axes(fig, gs, 1, max_channels), g[:max_channels], True, "act. grads")
            else:
                _draw_wide(fig.add_subplot(gs[0, :]), a, False, "activations", class_names)
                _draw_wide(fig.add_subplot(gs[1, :]), g, True, "act. grads", class_names)
            if r.weight is not None:
                if r.weight.dim() == 4:
                    _draw_maps(_row_axes(fig, gs, 2, max_channels), _filter_slices(r.weight.float(), max_channels), True, "weights")
                    _draw_maps(_row_axes(fig, gs, 3, max_channels), _filter_slices(r.weight_grad.float(), max_channels), True, "weight grads")
                else:
                    _draw_wide(fig.add_subplot(gs[2, :]), r.weight, True, "weights", class_names)
                    _draw_wide(fig.add_subplot(gs[3, :]), r.weight_grad, True, "weight grads", class_names)
        rg = r.ranges()
        text = (f"{r.name} ({r.kind}), output {r.shape}, {r.params:,} parameters\n"
                f"activation [{rg['activation'][0]:.3g}, {rg['activation'][1]:.3g}], "
                f"gradient [{rg['activation_grad'][0]:.3g}, {rg['activation_grad'][1]:.3g}]")
        if r.weight is not None and r.weight.dim() == 4:
            text += f"; filters {tuple(r.weight.shape[1:])}, channel 0 shown"
        fig.suptitle(text, fontsize=10)
        figs.append(fig)
    return figs


# ----------------------------------------------------------------------------------------------
# exercise reference (01_filters): a small formula students write themselves


@reference
def conv_param_count(in_channels: int, out_channels: int, kernel_size, bias: bool = True, groups: int = 1) -> int:
    """Number of parameters of ``nn.Conv2d(in_channels, out_channels, kernel_size, bias=bias, groups=groups)``.

    Weights: ``out_channels * (in_channels / groups) * kh * kw``; biases: ``out_channels``. The
    lecture's LeNet example: 16 filters of 5x5x3 -> 16*5*5*3 + 16 = 1216.
    """
    cin, cout = positive_int(in_channels, "in_channels"), positive_int(out_channels, "out_channels")
    groups = positive_int(groups, "groups")
    kh, kw = int_pair(kernel_size, "kernel_size")
    if cin % groups or cout % groups:
        raise ValueError(f"in_channels ({cin}) and out_channels ({cout}) must both be divisible by groups ({groups})")
    if not isinstance(bias, bool):
        raise TypeError(f"bias must be True or False, got {bias!r}")
    return cout * (cin // groups) * kh * kw + (cout if bias else 0)
