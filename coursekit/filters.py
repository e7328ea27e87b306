"""Lecture 1, filters: what a CNN's weights and activations look like, and how far each unit sees.

* First-layer filters shown as images (Krizhevsky et al. 2012, fig. 3; Zeiler & Fergus 2014, fig. 2):
  :func:`first_layer_filters`, :func:`show_filters`.
* Activation maps of one image at several depths: :func:`activation_maps`,
  :func:`show_activation_maps`, and an interactive :func:`explore_activations`.
* A per-layer inspector in the spirit of Karpathy's ConvNetJS demo: activations, d target /
  d activation, weights and weight gradients with their ranges and parameter counts:
  :func:`layer_inspector`, :func:`show_layer_inspector`, :func:`inspector_table`.
* Receptive fields computed from the modules' kernel size, stride, padding and dilation with the
  recursion of Araujo, Norris & Sim (2019), "Computing receptive fields of convolutional neural
  networks", Distill: :func:`receptive_fields`, checked by a gradient measurement
  :func:`empirical_receptive_field`, and drawn by :func:`plot_receptive_fields`.
* Small functions the exercise set ``01_filters`` asks students to write (marked ``@reference``):
  :func:`conv_output_size`, :func:`receptive_field_size`, :func:`conv_param_count`,
  :func:`normalize_filters`, :func:`activation_maps`.

References
----------
A. Krizhevsky, I. Sutskever, G. Hinton (2012). ImageNet classification with deep convolutional
neural networks. NeurIPS.
M. Zeiler, R. Fergus (2014). Visualizing and understanding convolutional networks. ECCV.
A. Araujo, W. Norris, J. Sim (2019). Computing receptive fields of convolutional neural networks.
Distill, https://distill.pub/2019/computing-receptive-fields.
"""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .checks import reference
from .hooks import get_layer, preserved, record
from .images import to_numpy_image
from .models import Normalize, target_scores

__all__ = [
    "EmpiricalReceptiveField",
    "LayerRecord",
    "ReceptiveField",
    "activation_maps",
    "conv_output_size",
    "conv_param_count",
    "draw_receptive_fields",
    "empirical_receptive_field",
    "explore_activations",
    "first_layer_filters",
    "inspector_table",
    "layer_inspector",
    "normalize_filters",
    "plot_receptive_fields",
    "receptive_field_size",
    "receptive_field_table",
    "receptive_fields",
    "show_activation_maps",
    "show_filters",
    "show_layer_inspector",
]


# ----------------------------------------------------------------------------------------------
# small validators shared below


def _check_model(model) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected a torch.nn.Module (e.g. coursekit.load_model('fashion_cnn')), got {type(model).__name__}")


def _check_batch(x, what: str = "x") -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor (N, C, H, W); use coursekit.load_image(...), got {type(x).__name__}")
    if x.dim() != 4:
        hint = " Add a batch dimension with x[None]." if x.dim() == 3 else ""
        raise ValueError(f"{what} must be a 4-d batch (N, C, H, W), got shape {tuple(x.shape)}.{hint}")
    return x


def _positive_int(value, what: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{what} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _pair(value, what: str, minimum: int = 1) -> tuple[int, int]:
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ValueError(f"{what} must be an int or a pair (h, w), got {value!r}")
        return _positive_int(value[0], what, minimum), _positive_int(value[1], what, minimum)
    v = _positive_int(value, what, minimum)
    return v, v


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
    _check_model(model)
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
    ncols = _positive_int(ncols, "ncols")
    max_filters = _positive_int(max_filters, "max_filters")
    max_channels = _positive_int(max_channels, "max_channels")
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
            ax.set_title(str(i), fontsize=7)
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
                    ax.set_title(f"in {j}", fontsize=7)
                if j == 0:
                    ax.set_ylabel(f"filter {i}", fontsize=7)
        title += f"\nrows: filters, columns: first {nch} of {c} input channels"
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------------------------
# activation maps


def _resolve_layers(model: nn.Module, layers) -> list[str]:
    if layers is None:
        named = getattr(model, "layers", None)
        if isinstance(named, dict) and all(k in named for k in ("early", "middle", "late")):
            return [named["early"], named["middle"], named["late"]]
        convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
        if not convs:
            raise ValueError(f"{type(model).__name__} has no nn.Conv2d layer; pass layers=[...] explicitly")
        picks = sorted({0, len(convs) // 2, len(convs) - 1})
        return [convs[i] for i in picks]
    if isinstance(layers, (str, nn.Module)):
        layers = [layers]
    if not isinstance(layers, (list, tuple)) or not layers:
        raise ValueError(f"layers must be a layer name, a module, or a non-empty list of them; got {layers!r}")
    return [get_layer(model, layer)[0] for layer in layers]


def _activation_maps(model: nn.Module, x: torch.Tensor, layers) -> dict[str, torch.Tensor]:
    _check_model(model)
    _check_batch(x)
    names = _resolve_layers(model, layers)
    # eval mode (restored by `preserved`): in training mode batch norm would update its statistics
    with torch.no_grad(), preserved(model), record(model, names) as rec:
        model.eval()
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


def _show_image(ax, x: torch.Tensor, title: str = "input") -> None:  # x: (C, H, W)
    img = to_numpy_image(x.detach().cpu().float().clamp(0, 1)) if x.shape[0] in (1, 3) else x[0].cpu().numpy()
    ax.imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=1)
    ax.set_title(title, fontsize=8)
    ax.axis("off")


def show_activation_maps(
    model: nn.Module,
    x: torch.Tensor,
    layers=None,
    channels: int = 6,
    image_index: int = 0,
    size: float = 1.6,
    title: str | None = None,
):
    """One row per layer: the image, then the ``channels`` most active maps of that layer.

    Channels are ranked by their mean activation on the image; each map is drawn on its own
    scale (its min..max, ``viridis``). Early layers keep the image's layout (edges, colour
    blobs); deeper maps are coarser and respond to parts and textures (Zeiler & Fergus 2014).
    Returns the figure.
    """
    channels = _positive_int(channels, "channels")
    acts = _activation_maps(model, x, layers)
    if not 0 <= image_index < x.shape[0]:
        raise ValueError(f"image_index {image_index} out of range for a batch of {x.shape[0]}")
    flat = [n for n, a in acts.items() if a.dim() != 4]
    if flat:
        raise ValueError(f"layers {flat} do not output (N, K, h, w) maps; choose convolutional layers")
    fig, axes = plt.subplots(len(acts), channels + 1, figsize=(size * (channels + 1), size * len(acts) + 0.5), squeeze=False)
    for row, (name, a) in zip(axes, acts.items()):
        a = a[image_index].float()  # (K, h, w)
        _show_image(row[0], x[image_index], "input")
        for ax in row[1:]:
            ax.axis("off")
        for ax, ch in zip(row[1:], _top_channels(a, channels)):
            ax.imshow(a[ch].cpu().numpy(), cmap="viridis")
            ax.set_title(f"ch {ch}", fontsize=7)
        row[1].text(-0.08, 0.5, f"{name}\n{tuple(a.shape)}", transform=row[1].transAxes, fontsize=7, ha="right", va="center")
    fig.suptitle(title or "activation maps (most active channels, each on its own scale)", fontsize=9)
    fig.tight_layout()
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
    ipywidgets.VBox or matplotlib Figure
    """
    from .widgets import explorer

    _check_batch(x)
    ranks = _positive_int(ranks, "ranks")
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
        ax.axis("off")
        left, right = ax.inset_axes([0.0, 0.0, 0.47, 0.8]), ax.inset_axes([0.53, 0.0, 0.47, 0.8])
        left.set_anchor("N")
        right.set_anchor("N")
        _show_image(left, x[0], "input")
        right.imshow(a[ch].cpu().numpy(), cmap="viridis")
        right.set_title(f"channel {ch} of {a.shape[0]} ({a.shape[1]}x{a.shape[2]})", fontsize=7)
        right.axis("off")
        ax.set_title(f"{layer}, #{channel_rank} most active", fontsize=8)

    names = list(maps)
    mode = "auto" if static is None else ("static" if static else "widget")
    view = explorer(
        draw,
        {"layer": names, "channel_rank": (1, widest, 1, 1)},
        static={"layer": names, "channel_rank": list(range(1, min(ranks, widest) + 1))},
        mode=mode,
        ncols=min(ranks, widest),
        size=2.6,
        title="activation explorer: layer and channel (ranked by mean activation on this image)",
        max_panels=max(12, len(names) * ranks),
    )
    if isinstance(view, plt.Figure):  # static grid: its panels are square, each of ours is two images wide
        w, h = view.get_size_inches()
        view.set_size_inches(w, 0.6 * h + 0.3)
        view.tight_layout()
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
    _check_model(model)
    _check_batch(x)
    names = _default_inspector_layers(model) if layers is None else _resolve_layers(model, layers)
    modules = dict(model.named_modules())
    weights = {n: modules[n].weight for n in names if isinstance(getattr(modules[n], "weight", None), nn.Parameter)}
    # Weight gradients need requires_grad=True on those weights, but coursekit models are frozen on
    # purpose (input-gradient methods must not pay for weight gradients). So we switch it on only for
    # the inspected layers' weights, inside `preserved`, which restores every flag on exit, even on
    # error; and we use torch.autograd.grad, not .backward(), so no .grad is ever stored on the model.
    with preserved(model):
        model.eval()  # as in the lectures; training-mode batch norm would also change its statistics
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


def _draw_maps(axes, maps: torch.Tensor, signed: bool, label: str) -> None:  # maps (K, h, w)
    lim = float(maps.abs().max()) or 1.0
    lo, hi = (-lim, lim) if signed else (float(maps.min()), float(maps.max()))
    for k, ax in enumerate(axes):
        ax.set_xticks([])
        ax.set_yticks([])
        if k < maps.shape[0]:
            ax.imshow(maps[k].cpu().numpy(), cmap="bwr" if signed else "gray", vmin=lo, vmax=hi, interpolation="nearest")
        else:
            ax.axis("off")
    axes[0].set_ylabel(label, fontsize=7)


def _draw_wide(ax, t: torch.Tensor, signed: bool, label: str) -> None:  # t (K,) or (out, in)
    t = t.detach().cpu().float()
    t = t[None] if t.dim() == 1 else t.flatten(1)
    lim = float(t.abs().max()) or 1.0
    lo, hi = (-lim, lim) if signed else (float(t.min()), float(t.max()))
    ax.imshow(t.numpy(), cmap="bwr" if signed else "gray", vmin=lo, vmax=hi, aspect="auto", interpolation="nearest")
    ax.set_yticks([])
    ax.set_ylabel(label, fontsize=7)
    ax.tick_params(labelsize=6)


def _filter_slices(w: torch.Tensor, n: int) -> torch.Tensor:  # (K, C, kh, kw) -> (n, kh, kw), input channel 0
    return w[:n, 0]


def show_layer_inspector(records: Sequence[LayerRecord], image_index: int = 0, max_channels: int = 8,
                         table: bool = True, size: float = 0.95) -> list:
    """Draw the inspector: one figure per layer, and print :func:`inspector_table`.

    Rows of each figure: activations (grey, shared scale), activation gradients (red positive,
    blue negative), and for layers with weights the filters (input channel 0 of each, or the
    weight matrix of a linear layer) and their gradients. Returns the list of figures.
    """
    if not records or not all(isinstance(r, LayerRecord) for r in records):
        raise TypeError("show_layer_inspector takes the list returned by layer_inspector(...)")
    max_channels = _positive_int(max_channels, "max_channels")
    if table:
        print(inspector_table(records))
    figs = []
    for r in records:
        if not 0 <= image_index < r.activation.shape[0]:
            raise ValueError(f"image_index {image_index} out of range for a batch of {r.activation.shape[0]}")
        a, g = r.activation[image_index].float(), r.activation_grad[image_index].float()
        rows = 2 if r.weight is None else 4
        fig = plt.figure(figsize=(size * max_channels + 0.8, size * rows + 0.7))
        gs = fig.add_gridspec(rows, max_channels)
        if r.kind == "input" and a.shape[0] in (1, 3):
            ax = fig.add_subplot(gs[0, 0])
            _show_image(ax, a, "")
            ax.axis("on")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_ylabel("image", fontsize=7)
            _draw_maps(_row_axes(fig, gs, 1, max_channels), g, True, "d target/d x")
        elif a.dim() == 3:
            _draw_maps(_row_axes(fig, gs, 0, max_channels), a[:max_channels], False, "activations")
            _draw_maps(_row_axes(fig, gs, 1, max_channels), g[:max_channels], True, "act. grads")
        else:
            _draw_wide(fig.add_subplot(gs[0, :]), a, False, "activations")
            _draw_wide(fig.add_subplot(gs[1, :]), g, True, "act. grads")
        if r.weight is not None:
            if r.weight.dim() == 4:
                _draw_maps(_row_axes(fig, gs, 2, max_channels), _filter_slices(r.weight.float(), max_channels), True, "weights")
                _draw_maps(_row_axes(fig, gs, 3, max_channels), _filter_slices(r.weight_grad.float(), max_channels), True, "weight grads")
            else:
                _draw_wide(fig.add_subplot(gs[2, :]), r.weight, True, "weights")
                _draw_wide(fig.add_subplot(gs[3, :]), r.weight_grad, True, "weight grads")
        rg = r.ranges()
        text = (f"{r.name} ({r.kind}), output {r.shape}, {r.params:,} parameters\n"
                f"activation [{rg['activation'][0]:.3g}, {rg['activation'][1]:.3g}], "
                f"gradient [{rg['activation_grad'][0]:.3g}, {rg['activation_grad'][1]:.3g}]")
        if r.weight is not None and r.weight.dim() == 4:
            text += f"; filters {tuple(r.weight.shape[1:])}, channel 0 shown"
        fig.suptitle(text, fontsize=8)
        fig.tight_layout()
        figs.append(fig)
    return figs


# ----------------------------------------------------------------------------------------------
# receptive fields, analytically (Araujo et al. 2019)


class ReceptiveField(NamedTuple):
    """Receptive field of the units of one layer's output, in input pixels.

    ``size``: side of the input region one unit sees; ``jump``: distance in input pixels between
    neighbouring units (the product of the strides so far); ``start``: centre of the region of
    unit (0, 0), in input pixel coordinates (pixel centres at 0, 1, ...; negative when it reaches
    into the padding). Unit ``i`` is centred at ``start + i * jump``. Each is an int/float when
    height and width agree, else a pair (height, width).
    """

    layer: str
    size: int | tuple[int, int]
    jump: int | tuple[int, int]
    start: float | tuple[float, float]


class _Geometry(NamedTuple):  # per spatial dimension (height, width)
    size: tuple[int, int]
    jump: tuple[int, int]
    start: tuple[float, float]
    n: tuple[int, int] | None  # spatial size of the feature map, when the input size is known


def _same(v):
    return v[0] if v[0] == v[1] else tuple(v)


# Pointwise layers: every output position depends only on the same input position.
_POINTWISE = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Sigmoid, nn.Tanh, nn.Softplus,
    nn.modules.batchnorm._BatchNorm,  # eval mode: a per-channel affine map (timm's BatchNormAct2d too)
    nn.LocalResponseNorm,  # mixes channels, not positions
    nn.Identity, nn.Dropout, nn.Dropout2d, nn.AlphaDropout, Normalize,
)
# Containers whose forward runs their children one after another, in registration order (plus, for
# the timm blocks, an identity skip connection: its receptive field is the input position itself,
# which the main branch's field already contains, centred on the same point, so it changes nothing).
_CHAINS = {
    "coursekit.models.CourseModel",
    "coursekit.nets.FashionCNN",
    "torchvision.models.vgg.VGG",
    "torchvision.models.alexnet.AlexNet",
    "timm.models.efficientnet.EfficientNet",
    "timm.models._efficientnet_blocks.DepthwiseSeparableConv",
    "timm.models._efficientnet_blocks.InvertedResidual",
}
_GLOBAL = (nn.Flatten, nn.Linear)


def _qualname(m: nn.Module) -> str:
    return f"{type(m).__module__}.{type(m).__qualname__}"


def _is_chain(m: nn.Module) -> bool:
    if isinstance(m, nn.Sequential) and type(m).forward is nn.Sequential.forward:
        return True
    return _qualname(m) in _CHAINS


def _dynamic_same(m: nn.Module) -> bool:
    # timm's Conv2dSame / MaxPool2dSame / AvgPool2dSame pad like TensorFlow's "SAME" at run time,
    # asymmetrically (the extra pixel goes right/bottom) and depending on the input size.
    return type(m).__name__ in ("Conv2dSame", "Conv2dSameExport", "MaxPool2dSame", "AvgPool2dSame")


def _spatial_args(name: str, m: nn.Module, n):
    """Per dimension: kernel, stride, dilation, left padding, right padding (None: unknown), output size."""
    kernel = _pair(m.kernel_size, f"{name}.kernel_size")
    stride = _pair(m.stride if m.stride is not None else m.kernel_size, f"{name}.stride")
    dilation = _pair(getattr(m, "dilation", 1), f"{name}.dilation")
    ceil_mode = bool(getattr(m, "ceil_mode", False))
    if getattr(m, "padding_mode", "zeros") == "circular":
        raise ValueError(f"{name}: circular padding wraps around the image; receptive_fields does not model it")
    out = []
    for d in range(2):
        k, s, dil = kernel[d], stride[d], dilation[d]
        if _dynamic_same(m):
            if n is None:
                raise ValueError(
                    f"{name} ({type(m).__name__}) pads depending on its input size, so receptive_fields needs "
                    "input_size=(C, H, W)"
                )
            total = max((math.ceil(n[d] / s) - 1) * s + (k - 1) * dil + 1 - n[d], 0)
            left, right = total // 2, total - total // 2
        elif isinstance(m.padding, str):
            if m.padding == "valid":
                left = right = 0
            else:  # "same" (stride 1): PyTorch puts the odd pixel on the right/bottom
                total = dil * (k - 1)
                left, right = total // 2, total - total // 2
        else:
            left = right = _pair(m.padding, f"{name}.padding", minimum=0)[d]
        size = None
        if n is not None:
            span = n[d] + left + right - dil * (k - 1) - 1
            size = (math.ceil(span / s) if ceil_mode else span // s) + 1
            if ceil_mode and (size - 1) * s >= n[d] + left:  # PyTorch: the last window must start inside
                size -= 1
            if span < 0 or size < 1:
                raise ValueError(f"the input is too small: {name} gets {n[d]} pixels and would output none")
        out.append((k, s, dil, left, size))
    return out


def _walk(name: str, m: nn.Module, g: _Geometry, out: list) -> tuple[_Geometry, bool]:
    """Advance the geometry through module ``m``; append records; return (geometry, stopped)."""
    if isinstance(m, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)):
        args = _spatial_args(name, m, g.n)
        size, jump, start, n = [], [], [], []
        for d, (k, s, dil, left, nd) in enumerate(args):
            # Araujo et al. (2019), eqs. for r_l, S_l and the centre of unit 0:
            size.append(g.size[d] + (k - 1) * dil * g.jump[d])
            start.append(g.start[d] + ((k - 1) * dil / 2 - left) * g.jump[d])
            jump.append(g.jump[d] * s)
            n.append(nd)
        g = _Geometry(tuple(size), tuple(jump), tuple(start), None if g.n is None else tuple(n))
    elif isinstance(m, _POINTWISE):
        pass
    elif isinstance(m, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)):
        target = m.output_size if isinstance(m.output_size, tuple) else (m.output_size, m.output_size)
        if g.n is None or tuple(t if t is not None else g.n[i] for i, t in enumerate(target)) != tuple(g.n):
            return g, True  # pools over the whole map (or an unknown part of it): from here on, global
    elif isinstance(m, _GLOBAL) or type(m).__name__ == "SelectAdaptivePool2d":
        return g, True
    elif _is_chain(m):
        for child_name, child in m.named_children():
            g, stopped = _walk(f"{name}.{child_name}" if name else child_name, child, g, out)
            if stopped:
                return g, True
    else:
        raise ValueError(
            f"receptive_fields cannot reason about layer {name!r} ({type(m).__name__}): it only follows plain chains "
            "of convolutions, pooling and pointwise layers, and this module may branch, attend or pool globally. "
            "Rather than guess, it stops; measure the field with empirical_receptive_field(model, layer, input_size), "
            "or pass a sub-model that is a plain chain."
        )
    if name:
        out.append(ReceptiveField(name, _same(g.size), _same(g.jump), _same(g.start)))
    return g, False


def _input_hw(model: nn.Module, input_size) -> tuple[int, int] | None:
    size = input_size if input_size is not None else getattr(model, "input_size", None)
    if size is None:
        return None
    if not isinstance(size, (tuple, list)) or len(size) not in (2, 3):
        raise ValueError(f"input_size must be (C, H, W) or (H, W), got {size!r}")
    return _positive_int(size[-2], "input height"), _positive_int(size[-1], "input width")


def receptive_fields(model: nn.Module, input_size: tuple[int, ...] | None = None) -> list[ReceptiveField]:
    """Receptive field size, jump and start of every layer, computed from the modules.

    Walks the modules in registration order (which is the forward order for sequential
    networks such as VGG, AlexNet, FashionCNN and timm's EfficientNet) and applies, per
    spatial dimension, the recursion of Araujo et al. (2019)::

        r_l = r_{l-1} + (k_l - 1) d_l j_{l-1}          (size)
        j_l = j_{l-1} s_l                              (jump: product of strides)
        c_l = c_{l-1} + ((k_l - 1) d_l / 2 - p_l) j_{l-1}   (centre of unit 0)

    starting from ``r_0 = 1, j_0 = 1, c_0 = 0`` at the input, for ``nn.Conv2d`` (depthwise and
    grouped ones included: groups mix channels, not positions), ``nn.MaxPool2d`` and
    ``nn.AvgPool2d`` with kernel ``k``, stride ``s``, dilation ``d`` and left padding ``p``.
    timm's ``Conv2dSame`` pads asymmetrically depending on the input size, so that size is needed.
    Activations, batch norm, dropout and identity do not change the field.

    Parameters
    ----------
    model : nn.Module
    input_size : (C, H, W) or (H, W), optional
        Default ``model.input_size``. Needed for "SAME" padding and to see whether an adaptive
        pooling is the identity.

    Returns
    -------
    list of ReceptiveField
        One per module whose output is a feature map (containers after their last child), in
        forward order. The list ends at the first layer that mixes all positions (flatten,
        linear, global pooling): from there on every unit sees the whole input.

    Raises
    ------
    ValueError
        For a module it cannot reason about (branches, attention, squeeze-excitation,
        unknown layer types): it does not guess; use :func:`empirical_receptive_field`.
    """
    _check_model(model)
    n = _input_hw(model, input_size)
    out: list[ReceptiveField] = []
    _walk("", model, _Geometry((1, 1), (1, 1), (0.0, 0.0), n), out)
    return out


class EmpiricalReceptiveField(NamedTuple):
    """The input region where the gradient of one output unit is non-zero.

    ``unit``: (row, column) of the unit in the layer's output; ``rows`` / ``cols``: first and
    last input row / column of the region (inclusive); ``size``: (height, width) of the region;
    ``touches_border``: True when it reaches an image border (then it may be cut off).
    """

    layer: str
    unit: tuple[int, int]
    rows: tuple[int, int]
    cols: tuple[int, int]
    size: tuple[int, int]
    touches_border: bool


class _Stop(Exception):
    pass


class _SupportPool(nn.Module):
    """A pooling layer that passes gradient to every position of its window (an average pool)."""

    def __init__(self, m: nn.Module, dynamic_same: bool):
        super().__init__()
        self.kernel = _pair(m.kernel_size, "kernel_size")
        self.stride = _pair(m.stride if m.stride is not None else m.kernel_size, "stride")
        self.padding = m.padding
        self.ceil_mode = bool(getattr(m, "ceil_mode", False))
        self.dynamic_same = dynamic_same

    def forward(self, x):
        padding = self.padding
        if self.dynamic_same:
            pads = []
            for d in (1, 0):  # F.pad wants (left, right, top, bottom)
                n, k, s = x.shape[2 + d], self.kernel[d], self.stride[d]
                total = max((math.ceil(n / s) - 1) * s + k - n, 0)
                pads += [total // 2, total - total // 2]
            x, padding = F.pad(x, pads), 0
        return F.avg_pool2d(x, self.kernel, self.stride, padding, self.ceil_mode, count_include_pad=True)


class _Unsupported(nn.Module):
    def __init__(self, name: str, kind: str):
        super().__init__()
        self.name, self.kind = name, kind

    def forward(self, *args, **kwargs):
        raise ValueError(
            f"empirical_receptive_field passes only through convolutions, pooling and pointwise layers; "
            f"{self.name!r} ({self.kind}) runs before the chosen layer"
        )


def _sum_channels(module, inputs):  # forward pre-hook: (N, C, H, W) -> (N, 1, H, W)
    return (inputs[0].sum(1, keepdim=True),) + tuple(inputs[1:])


def _support_probe(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose gradient is non-zero exactly on each unit's receptive field.

    ReLU and max pooling route the gradient through only part of a unit's field (what Luo et al.
    2016 call the effective receptive field), so they are linearised: pointwise layers become
    the identity, max pooling becomes average pooling, and every convolution becomes one
    single-channel all-ones kernel of the same size, stride, padding and dilation (its input
    channels summed first). All values are then positive, nothing cancels, and the support of
    the input gradient is the full geometric field. The forward code of every container and
    convolution (e.g. timm's dynamic "SAME" padding) is the model's own.
    """
    # Deep-copy the module tree but not the (possibly huge) weights: they are replaced anyway.
    tensors = itertools.chain(model.parameters(), model.buffers())
    memo = {id(t): (nn.Parameter(torch.empty(0), requires_grad=False) if isinstance(t, nn.Parameter) else torch.empty(0))
            for t in tensors}
    probe = copy.deepcopy(model, memo)
    for m in probe.modules():  # the user's hooks must not run on the probe
        m._forward_hooks.clear()
        m._forward_pre_hooks.clear()
        m._backward_hooks.clear()
    for name, m in list(probe.named_modules()):
        if not name:
            continue
        parent_name, _, child = name.rpartition(".")
        parent = probe.get_submodule(parent_name) if parent_name else probe
        if isinstance(m, nn.Conv2d):
            m.weight = nn.Parameter(torch.ones(1, 1, *m.kernel_size, dtype=torch.float64), requires_grad=False)
            m.bias = None
            m.groups, m.in_channels, m.out_channels = 1, 1, 1
            m.register_forward_pre_hook(_sum_channels)
        elif isinstance(m, (nn.MaxPool2d, nn.AvgPool2d)):
            if _pair(getattr(m, "dilation", 1), f"{name}.dilation") != (1, 1):
                raise ValueError(f"{name}: dilated pooling is not supported by empirical_receptive_field")
            setattr(parent, child, _SupportPool(m, _dynamic_same(m)))
        elif isinstance(m, _POINTWISE):
            setattr(parent, child, nn.Identity())
        elif not list(m.children()) and any(True for _ in m.parameters(recurse=False)):
            setattr(parent, child, _Unsupported(name, type(m).__name__))
    return probe


def empirical_receptive_field(model: nn.Module, layer: str | nn.Module, input_size: tuple[int, ...] | None = None,
                              unit: tuple[int, int] | None = None) -> EmpiricalReceptiveField:
    """Measure the receptive field of one unit of ``layer`` with autograd.

    The gradient of the unit (summed over channels) with respect to the input is non-zero
    exactly on the input pixels the unit depends on. Nonlinearities and max pooling are
    linearised on a copy (see the notes), so the measured region is the full geometric field
    that :func:`receptive_fields` computes, cut off at the image border. The model is not changed.

    Parameters
    ----------
    model : nn.Module
    layer : str or nn.Module
        A layer whose output is a feature map ``(N, K, h, w)``.
    input_size : (C, H, W), optional
        Default ``model.input_size``. Choose it large enough that the field of the unit fits.
    unit : (row, col), optional
        Default the central unit ``(h // 2, w // 2)``.

    Notes
    -----
    With ReLUs and max pooling left in, the gradient reaches only part of the field: the
    *effective* receptive field (Luo et al. 2016), which depends on the image. Here every
    convolution is replaced by a positive all-ones kernel of the same geometry, pointwise layers
    by the identity and max pooling by average pooling, in float64 on a single channel, so the
    measurement is cheap even for VGG16 and nothing cancels.
    """
    _check_model(model)
    name, _ = get_layer(model, layer)
    hw = _input_hw(model, input_size)
    if hw is None:
        raise ValueError("give input_size=(C, H, W): the model has no input_size attribute")
    channels = input_size[0] if input_size is not None and len(input_size) == 3 else getattr(model, "input_size", (1,))[0]
    probe = _support_probe(model)
    captured = {}

    def stop(module, inputs, output):
        captured["out"] = output
        raise _Stop

    handle = probe.get_submodule(name).register_forward_hook(stop)
    x = torch.ones(1, channels, *hw, dtype=torch.float64, requires_grad=True)  # (1, C, H, W)
    try:
        probe(x)
    except _Stop:
        pass
    finally:
        handle.remove()
    out = captured.get("out")
    if out is None:
        raise ValueError(f"layer {name!r} did not run during the forward pass")
    if not isinstance(out, torch.Tensor) or out.dim() != 4:
        raise ValueError(f"layer {name!r} does not output a feature map (N, K, h, w); choose a convolutional layer")
    h, w = out.shape[-2:]
    i, j = unit if unit is not None else (h // 2, w // 2)
    if not (0 <= i < h and 0 <= j < w):
        raise ValueError(f"unit {(i, j)} is outside the {h}x{w} output of {name!r}")
    (grad,) = torch.autograd.grad(out[0, :, i, j].sum(), x)
    support = grad[0].abs().sum(0) > 0  # (H, W)
    rows = support.any(1).nonzero()[:, 0]
    cols = support.any(0).nonzero()[:, 0]
    r0, r1, c0, c1 = int(rows[0]), int(rows[-1]), int(cols[0]), int(cols[-1])
    border = r0 == 0 or c0 == 0 or r1 == hw[0] - 1 or c1 == hw[1] - 1
    return EmpiricalReceptiveField(name, (int(i), int(j)), (r0, r1), (c0, c1), (r1 - r0 + 1, c1 - c0 + 1), border)


def _spatial_names(model: nn.Module, layers) -> list[str]:
    if layers is not None:
        return _resolve_layers(model, layers)
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d))]


def _selected_fields(model, input_size, layers) -> list[tuple[ReceptiveField, nn.Module]]:
    fields = {f.layer: f for f in receptive_fields(model, input_size)}
    modules = dict(model.named_modules())
    names = _spatial_names(model, layers)
    unknown = [n for n in names if n not in fields]
    if unknown and layers is not None:
        raise ValueError(f"no receptive field for {unknown}: they come after the network pools globally")
    return [(fields[n], modules[n]) for n in names if n in fields]


def _describe(m: nn.Module) -> str:
    if isinstance(m, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)):
        k, s = _pair(m.kernel_size, "k"), _pair(m.stride if m.stride is not None else m.kernel_size, "s")
        dw = " dw" if isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels else ""
        return f"{_same(k)}x{_same(k)}/{_same(s)}{dw}" if k[0] == k[1] else f"{k}/{s}{dw}"
    return ""


def receptive_field_table(model: nn.Module, input_size: tuple[int, ...] | None = None, layers=None) -> str:
    """A text table: layer, type, kernel/stride, receptive field size, jump and start.

    ``layers``: names to list (containers allowed); default every convolution and pooling layer.
    """
    rows = _selected_fields(model, input_size, layers)
    head = f"{'layer':26s} {'type':12s} {'k/s':9s} {'RF size':>8s} {'jump':>5s} {'start':>7s}"
    lines = [head, "-" * len(head)]
    for f, m in rows:
        start = f.start if isinstance(f.start, tuple) else f"{f.start:.1f}"
        lines.append(f"{f.layer:26s} {type(m).__name__[:12]:12s} {_describe(m):9s} {f.size!s:>8s} {f.jump!s:>5s} {start!s:>7s}")
    return "\n".join(lines)


def plot_receptive_fields(model: nn.Module, input_size: tuple[int, ...] | None = None, layers=None, ax=None,
                          label: str | None = None):
    """Receptive field size against depth (the index of each conv/pool layer); returns the axes.

    The dashed line is the input size: a unit whose field reaches it can in principle use the
    whole image. The jump (product of strides) is written next to each point where it changes.
    """
    rows = _selected_fields(model, input_size, layers)
    if not rows:
        raise ValueError("no convolution or pooling layer to plot")
    sizes = [f.size if isinstance(f.size, int) else max(f.size) for f, _ in rows]
    own_figure = ax is None
    if own_figure:
        _, ax = plt.subplots(figsize=(6, 3.5))
    name = label or getattr(model, "name", type(model).__name__)
    ax.plot(range(1, len(rows) + 1), sizes, marker="o", ms=3, label=name)
    last = None
    for i, (f, _) in enumerate(rows, start=1):
        if f.jump != last:
            ax.annotate(f"j={f.jump}", (i, sizes[i - 1]), textcoords="offset points", xytext=(2, 5), fontsize=6)
            last = f.jump
    hw = _input_hw(model, input_size)
    if hw is not None:
        ax.axhline(max(hw), ls="--", color="gray", lw=1)
        ax.text(1, max(hw), f" input {hw[0]}x{hw[1]}", va="bottom", fontsize=7, color="gray")
    ax.set_xlabel("depth (conv / pooling layer number)")
    ax.set_ylabel("receptive field size (pixels)")
    ax.set_title(f"Receptive field grows with depth: {name}", fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    if own_figure:
        ax.figure.tight_layout()
    return ax


def draw_receptive_fields(model: nn.Module, image: torch.Tensor, layers, ax=None, unit: str = "center"):
    """Draw, on the image, the receptive field of the central unit of each layer; returns the axes."""
    _check_batch(image, "image")
    size = tuple(image.shape[1:])
    names = _resolve_layers(model, layers)
    fields = {f.layer: f for f in receptive_fields(model, size)}
    if unit != "center":
        raise ValueError(f"unit must be 'center', got {unit!r}")
    if ax is None:
        _, ax = plt.subplots(figsize=(4, 4))
    _show_image(ax, image[0], "receptive fields of the central unit")
    h, w = size[-2:]
    colours = plt.cm.plasma(np.linspace(0, 0.85, len(names)))
    for colour, n in zip(colours, names):
        if n not in fields:
            raise ValueError(f"no receptive field for {n!r}: it comes after the network pools globally")
        f = fields[n]
        r, j, s = (_pair_f(v) for v in (f.size, f.jump, f.start))
        # the unit whose centre (start + i * jump) is nearest the image centre
        units = [max(0, round((((h, w)[d] - 1) / 2 - s[d]) / j[d])) for d in range(2)]
        cy, cx = (s[d] + units[d] * j[d] for d in range(2))
        ax.add_patch(plt.Rectangle((cx - r[1] / 2, cy - r[0] / 2), r[1], r[0], fill=False, ec=colour, lw=1.5, label=f"{n}: {f.size}"))
    ax.set_xlim(-0.5, w - 0.5)
    ax.set_ylim(h - 0.5, -0.5)
    ax.legend(fontsize=6, loc="lower left", framealpha=0.7)
    return ax


def _pair_f(v):
    return tuple(v) if isinstance(v, tuple) else (v, v)


# ----------------------------------------------------------------------------------------------
# exercise references (01_filters): small formulas students write themselves


@reference
def conv_output_size(size: int, kernel_size: int, stride: int = 1, padding: int = 0, dilation: int = 1) -> int:
    """Output length of a convolution (or pooling) along one dimension.

    ``floor((size + 2 padding - dilation (kernel_size - 1) - 1) / stride) + 1``, as in
    ``torch.nn.Conv2d``'s documentation.
    """
    size = _positive_int(size, "size")
    kernel_size = _positive_int(kernel_size, "kernel_size")
    stride = _positive_int(stride, "stride")
    padding = _positive_int(padding, "padding", minimum=0)
    dilation = _positive_int(dilation, "dilation")
    out = (size + 2 * padding - dilation * (kernel_size - 1) - 1) // stride + 1
    if out < 1:
        raise ValueError(f"a kernel of {kernel_size} (dilation {dilation}) does not fit in {size} pixels + 2x{padding} padding")
    return out


@reference
def receptive_field_size(layers: Sequence[tuple[int, int]]) -> int:
    """Receptive field size of the last layer of a stack of ``(kernel, stride)`` layers.

    Araujo et al. (2019): ``r = 1 + sum_l (k_l - 1) * prod_{i<l} s_i``; each layer widens the
    field by ``k - 1`` steps of the *previous* layers' accumulated stride (the jump).
    """
    if not isinstance(layers, (list, tuple)):
        raise TypeError(f"layers must be a list of (kernel, stride) pairs, got {type(layers).__name__}")
    r, j = 1, 1
    for i, layer in enumerate(layers):
        if not isinstance(layer, (tuple, list)) or len(layer) != 2:
            raise ValueError(f"layer {i} must be a pair (kernel, stride), got {layer!r}")
        k, s = _positive_int(layer[0], f"kernel of layer {i}"), _positive_int(layer[1], f"stride of layer {i}")
        r += (k - 1) * j
        j *= s
    return r


@reference
def conv_param_count(in_channels: int, out_channels: int, kernel_size, bias: bool = True, groups: int = 1) -> int:
    """Number of parameters of ``nn.Conv2d(in_channels, out_channels, kernel_size, bias=bias, groups=groups)``.

    Weights: ``out_channels * (in_channels / groups) * kh * kw``; biases: ``out_channels``. The
    lecture's LeNet example: 16 filters of 5x5x3 -> 16*5*5*3 + 16 = 1216.
    """
    cin, cout = _positive_int(in_channels, "in_channels"), _positive_int(out_channels, "out_channels")
    groups = _positive_int(groups, "groups")
    kh, kw = _pair(kernel_size, "kernel_size")
    if cin % groups or cout % groups:
        raise ValueError(f"in_channels ({cin}) and out_channels ({cout}) must both be divisible by groups ({groups})")
    if not isinstance(bias, bool):
        raise TypeError(f"bias must be True or False, got {bias!r}")
    return cout * (cin // groups) * kh * kw + (cout if bias else 0)
