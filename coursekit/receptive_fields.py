"""How far each unit of a CNN sees: receptive fields, computed, measured and drawn.

* :func:`receptive_fields` -- size, jump and start of every layer's field from the modules'
  kernel size, stride, padding and dilation, with the recursion of Araujo, Norris & Sim (2019);
* :func:`empirical_receptive_field` -- the same field measured with autograd on a linearised copy
  of the model, for any architecture (branches included);
* :func:`unit_windows` -- the input box each unit of one layer sees, as integer pixel windows to
  crop dataset-example patches with (:class:`UnitWindows`); analytic where the walk above
  applies, measured otherwise;
* :func:`effective_receptive_field` -- where the gradient of one unit of the *trained, nonlinear*
  network actually falls, averaged over images (Luo et al. 2016), with the theoretical box and the
  squares that hold a given share of it (:class:`EffectiveReceptiveField`);
* :func:`receptive_field_table`, :func:`plot_receptive_fields`, :func:`draw_receptive_fields`,
  :func:`show_effective_receptive_fields`;
* small formulas the exercise set ``01_filters`` asks students to write (marked ``@reference``):
  :func:`conv_output_size`, :func:`receptive_field_size`.

References
----------
A. Araujo, W. Norris, J. Sim (2019). Computing receptive fields of convolutional neural networks.
Distill, https://distill.pub/2019/computing-receptive-fields.
W. Luo, Y. Li, R. Urtasun, R. Zemel (2016). Understanding the effective receptive field in deep
convolutional neural networks. NeurIPS.
M. Zeiler, R. Fergus (2014). Visualizing and understanding convolutional networks. ECCV.

The computation lives in the plumbing package :mod:`coursekit.geometry` (the walk, the gradient
probe and :func:`unit_windows`, which lecture 2 uses too); this module re-exports it and holds the
tables, figures and formulas of lecture 1.

Devices: every function here computes on the model's device (:func:`coursekit.model_device`).
Images, labels and maps given on another device (a CPU image for a CUDA model) are moved there;
returned tensors live on the model's device, as in captum; numbers, numpy arrays and figures are on
the CPU (the measured receptive fields are computed on a CPU probe of the model's geometry). Seeded
random numbers are drawn on the CPU and moved, so a seed gives the same draws on every device.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import matplotlib.pyplot as plt
import numpy as np
import torch
from torch import nn

from ._reference import reference
from .batching import batches
from .geometry import (  # re-exported: lecture 1 reaches the receptive-field computations here
    EmpiricalReceptiveField,
    ReceptiveField,
    UnitWindows,
    UnsupportedLayerError,
    collapse_pair,
    empirical_receptive_field,
    input_hw,
    per_dimension,
    receptive_fields,
    unit_windows,
)
from .guard import guarded
from .hooks import get_layer, layer_outputs, resolve_layers
from .inputs import check_images, check_model, int_pair, number, positive_int
from .plotting import draw_image

__all__ = [
    "EffectiveReceptiveField",
    "EmpiricalReceptiveField",
    "ReceptiveField",
    "UnitWindows",
    "UnsupportedLayerError",
    "conv_output_size",
    "draw_receptive_fields",
    "effective_receptive_field",
    "empirical_receptive_field",
    "plot_receptive_fields",
    "receptive_field_size",
    "receptive_field_table",
    "receptive_fields",
    "show_effective_receptive_fields",
    "unit_windows",
]



# ----------------------------------------------------------------------------------------------
# tables and figures


def _spatial_names(model: nn.Module, layers) -> list[str]:
    if layers is not None:
        return resolve_layers(model, layers)
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
        k, s = int_pair(m.kernel_size, "k"), int_pair(m.stride if m.stride is not None else m.kernel_size, "s")
        dw = " dw" if isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels else ""
        return f"{collapse_pair(k)}x{collapse_pair(k)}/{collapse_pair(s)}{dw}" if k[0] == k[1] else f"{k}/{s}{dw}"
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
    last, last_at, below = None, None, False
    for i, (f, _) in enumerate(rows, start=1):
        if f.jump != last:
            # the curve rises to the right: a label above-left of its point, or below-right, stays off the line;
            # below-right at the left edge and where the previous label is close (the two then alternate)
            close = last_at is not None and i - last_at < 0.08 * len(rows)
            below = i == 1 or (close and not below)
            ax.annotate(f"j={f.jump}", (i, sizes[i - 1]), textcoords="offset points", fontsize=6,
                        xytext=(4, -9) if below else (-4, 3), ha="left" if below else "right")
            last, last_at = f.jump, i
    hw = input_hw(model, input_size)
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
    image = check_images(image, "image")
    size = tuple(image.shape[1:])
    names = resolve_layers(model, layers)
    fields = {f.layer: f for f in receptive_fields(model, size)}
    if unit != "center":
        raise ValueError(f"unit must be 'center', got {unit!r}")
    if ax is None:
        _, ax = plt.subplots(figsize=(4, 4))
    draw_image(ax, image[0], "receptive fields of the central unit")
    h, w = size[-2:]
    colours = plt.cm.plasma(np.linspace(0, 0.85, len(names)))
    for colour, n in zip(colours, names):
        if n not in fields:
            raise ValueError(f"no receptive field for {n!r}: it comes after the network pools globally")
        f = fields[n]
        r, j, s = (per_dimension(v) for v in (f.size, f.jump, f.start))
        # the unit whose centre (start + i * jump) is nearest the image centre
        units = [max(0, round((((h, w)[d] - 1) / 2 - s[d]) / j[d])) for d in range(2)]
        cy, cx = (s[d] + units[d] * j[d] for d in range(2))
        top, left = cy - r[0] / 2, cx - r[1] / 2
        if top <= -0.5 and left <= -0.5 and top + r[0] >= h - 0.5 and left + r[1] >= w - 0.5:
            # a field larger than the image has no edge inside it: a dashed frame along the border stands for it
            ax.add_patch(plt.Rectangle((0.5, 0.5), w - 2, h - 2, fill=False, ec=colour, lw=2, ls="--",
                                       label=f"{n}: {f.size} (all of the image, and beyond)"))
            continue
        ax.add_patch(plt.Rectangle((left, top), r[1], r[0], fill=False, ec=colour, lw=1.5, label=f"{n}: {f.size}"))
    ax.set_xlim(-0.5, w - 0.5)
    ax.set_ylim(h - 0.5, -0.5)
    ax.legend(fontsize=6, loc="lower left", framealpha=0.7)
    return ax


# ----------------------------------------------------------------------------------------------
# the effective receptive field (Luo et al. 2016): where the gradient of a unit really falls


class EffectiveReceptiveField(NamedTuple):
    """What :func:`effective_receptive_field` measured for one layer.

    ``map``: (H, W) on the CPU, the mean over images of ``|d unit / d x|`` (summed over colour
    channels, each image's map scaled to sum 1), so it sums to 1; ``unit``: (row, column) of the
    unit in the layer's output; ``images``: how many images were averaged; ``theoretical``: the
    analytic field as ``(top, left, height, width)`` in input pixels (it may reach outside the
    image), or None where the analytic walk cannot follow the model.
    """

    layer: str
    unit: tuple[int, int]
    map: torch.Tensor
    images: int
    theoretical: tuple[float, float, int, int] | None

    def centre(self) -> tuple[float, float]:
        """(row, column) of the map's centre of mass, in input pixels."""
        m = self.map.double()
        rows = torch.arange(m.shape[0], dtype=torch.float64, device=m.device)
        cols = torch.arange(m.shape[1], dtype=torch.float64, device=m.device)
        return float((m.sum(1) * rows).sum()), float((m.sum(0) * cols).sum())

    def square(self, fraction: float) -> int:
        """Side (pixels) of the smallest square around :meth:`centre` that holds ``fraction`` of the map."""
        fraction = number(fraction, "fraction", minimum=0.0, strict=True)
        if fraction > 1:
            raise ValueError(f"fraction must be in (0, 1], got {fraction}")
        cy, cx = self.centre()
        m = self.map.double()
        rows = torch.arange(m.shape[0], dtype=torch.float64, device=m.device)[:, None]
        cols = torch.arange(m.shape[1], dtype=torch.float64, device=m.device)[None, :]
        reach = torch.maximum((rows - cy).abs(), (cols - cx).abs()).flatten()  # Chebyshev distance
        order = reach.argsort()
        held = m.flatten()[order].cumsum(0)
        k = int(torch.searchsorted(held, torch.tensor(fraction * float(held[-1]), dtype=torch.float64, device=m.device)))
        return int(round(2 * float(reach[order][min(k, len(order) - 1)]) + 1))


def _theoretical_box(model: nn.Module, name: str, size: tuple[int, ...], unit: tuple[int, int]):
    try:
        fields = {f.layer: f for f in receptive_fields(model, size)}
    except UnsupportedLayerError:
        return None
    f = fields.get(name)
    if f is None:
        return None
    r, j, s = (per_dimension(v) for v in (f.size, f.jump, f.start))
    centre = [s[d] + unit[d] * j[d] for d in range(2)]
    return (centre[0] - (r[0] - 1) / 2, centre[1] - (r[1] - 1) / 2, r[0], r[1])


def effective_receptive_field(model: nn.Module, layer: str | nn.Module, images: torch.Tensor,
                              unit: tuple[int, int] | None = None, batch_size: int = 8) -> EffectiveReceptiveField:
    """The effective receptive field of one unit: its mean absolute input gradient over images.

    Luo et al. (2016) back-propagate from one central output position and find that the gradient
    of a trained network does not fill the theoretical field: it is roughly Gaussian and takes up
    a fraction of it. Here the unit's score is the layer's output at ``unit`` summed over channels,
    the model runs as it is (ReLUs, pooling, batch norm in eval mode: the real, nonlinear network),
    and each image's ``|gradient|`` (summed over colour channels) is scaled to sum 1 before the mean,
    so every image counts the same. The model is left exactly as it was.

    Parameters
    ----------
    model : nn.Module
    layer : str or nn.Module
        A layer whose output is a feature map ``(N, K, h, w)``.
    images : Tensor (N, C, H, W)
        The images to average over (pixels as the model takes them).
    unit : (row, col), optional
        Default the central unit ``(h // 2, w // 2)``.
    batch_size : int
        Images per forward/backward pass.

    Returns
    -------
    EffectiveReceptiveField
        ``.map`` (H, W) summing to 1, ``.square(0.9)`` the side of the square holding 90 % of it,
        ``.theoretical`` the analytic box (:func:`receptive_fields`) for comparison.

    References
    ----------
    W. Luo, Y. Li, R. Urtasun, R. Zemel (2016). Understanding the effective receptive field in
    deep convolutional neural networks. NeurIPS.
    """
    check_model(model)
    x = check_images(images, "images", model=model).detach()
    name, _ = get_layer(model, layer)
    batch_size = positive_int(batch_size, "batch_size")
    maps, where = [], None
    with guarded(model, what="effective_receptive_field"):
        for a, b in batches(x.shape[0], batch_size):
            xi = x[a:b].clone().requires_grad_(True)
            with layer_outputs(model, [name]) as run, torch.enable_grad():
                out = run(xi).get(name)  # the forward pass stops at the layer: nothing above it is needed
            if out is None or out.dim() != 4:
                raise ValueError(f"layer {name!r} does not output a feature map (N, K, h, w); choose a convolutional layer")
            h, w = out.shape[-2:]
            where = unit if unit is not None else (h // 2, w // 2)
            if not (0 <= where[0] < h and 0 <= where[1] < w):
                raise ValueError(f"unit {tuple(where)} is outside the {h}x{w} output of {name!r}")
            with torch.enable_grad():
                (g,) = torch.autograd.grad(out[:, :, where[0], where[1]].sum(), xi)
            m = g.detach().abs().sum(1).double()  # (n, H, W)
            maps.append(m / m.flatten(1).sum(1).clamp_min(1e-300)[:, None, None])
    erf = torch.cat(maps).mean(0).float().cpu()
    where = (int(where[0]), int(where[1]))
    return EffectiveReceptiveField(name, where, erf, x.shape[0], _theoretical_box(model, name, tuple(x.shape[1:]), where))


def show_effective_receptive_fields(fields: Sequence[EffectiveReceptiveField], fractions=(0.5, 0.9), size: float = 3.6,
                                    title: str | None = None):
    """One panel per :class:`EffectiveReceptiveField`: the map, the theoretical box, the mass squares.

    The map is a share of the gradient (non-negative), drawn from 0 (``magma``) with a colour bar;
    the solid cyan box is the theoretical field, the dashed squares hold ``fractions`` of the map
    around its centre of mass. A panel whose theoretical box lies inside the image is zoomed in on
    it (the axes count input pixels, and say so). Returns the figure.
    """
    if not fields or not all(isinstance(f, EffectiveReceptiveField) for f in fields):
        raise TypeError("show_effective_receptive_fields takes a list of effective_receptive_field(...) results")
    fig, axes = plt.subplots(1, len(fields), figsize=(size * len(fields) + 0.4, size + 0.6), squeeze=False, layout="constrained")
    dashes = [(0, (4, 2)), (0, (1, 1.5)), (0, (6, 2, 1, 2))]
    for ax, f in zip(axes[0], fields):
        m = f.map.numpy()
        im = ax.imshow(m, cmap="magma", vmin=0, vmax=float(m.max()) or 1.0)
        cb = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.03)
        cb.set_label("share of |gradient| per pixel", fontsize=8)
        cb.ax.tick_params(labelsize=7)
        view = (-0.5, m.shape[1] - 0.5, m.shape[0] - 0.5, -0.5)  # x from, x to, y from, y to
        if f.theoretical is not None:
            top, left, hh, ww = f.theoretical
            outside = top < 0 or left < 0 or top + hh > m.shape[0] or left + ww > m.shape[1]
            ax.add_patch(plt.Rectangle((left - 0.5, top - 0.5), ww, hh, fill=False, ec="cyan", lw=1.8,
                                       label=f"theoretical {hh}x{ww}" + (" (beyond the image)" if outside else "")))
            if not outside:  # zoom in on the box, with a margin
                pad = max(hh, ww) // 2 + 8
                view = (max(left - pad, 0) - 0.5, min(left + ww + pad, m.shape[1]) - 0.5,
                        min(top + hh + pad, m.shape[0]) - 0.5, max(top - pad, 0) - 0.5)
        cy, cx = f.centre()
        for k, frac in enumerate(fractions):
            s = f.square(frac)
            ax.add_patch(plt.Rectangle((cx - s / 2, cy - s / 2), s, s, fill=False, ec="white", lw=1.4,
                                       ls=dashes[k % len(dashes)], label=f"{frac:.0%} of the gradient: {s}x{s}"))
        ax.set_xlim(view[0], view[1])
        ax.set_ylim(view[2], view[3])
        ax.tick_params(labelsize=7)
        ax.set_xlabel("x (input pixels)", fontsize=8)
        ax.set_ylabel("y (input pixels)", fontsize=8)
        ax.set_title(f"{f.layer}, unit {f.unit}" + ("" if view[0] < 0 and view[1] > m.shape[1] - 1 else " (zoomed in)"),
                     fontsize=9)
        # on a dark frame: the white mass squares and the cyan box show in the legend as on the map
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.13), fontsize=7.5, ncols=1, frameon=True,
                  facecolor="0.15", edgecolor="0.15", framealpha=1.0, labelcolor="white")
    fig.suptitle(title or f"Effective receptive fields: mean |d unit / d image| over {fields[0].images} images", fontsize=10)
    return fig


# ----------------------------------------------------------------------------------------------
# exercise references (01_filters): small formulas students write themselves


@reference
def conv_output_size(size: int, kernel_size: int, stride: int = 1, padding: int = 0, dilation: int = 1) -> int:
    """Output length of a convolution (or pooling) along one dimension.

    ``floor((size + 2 padding - dilation (kernel_size - 1) - 1) / stride) + 1``, as in
    ``torch.nn.Conv2d``'s documentation.
    """
    size = positive_int(size, "size")
    kernel_size = positive_int(kernel_size, "kernel_size")
    stride = positive_int(stride, "stride")
    padding = positive_int(padding, "padding", minimum=0)
    dilation = positive_int(dilation, "dilation")
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
        k, s = positive_int(layer[0], f"kernel of layer {i}"), positive_int(layer[1], f"stride of layer {i}")
        r += (k - 1) * j
        j *= s
    return r
