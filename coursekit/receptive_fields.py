"""How far each unit of a CNN sees: receptive fields, computed, measured and drawn.

* :func:`receptive_fields` -- size, jump and start of every layer's field from the modules'
  kernel size, stride, padding and dilation, with the recursion of Araujo, Norris & Sim (2019);
* :func:`empirical_receptive_field` -- the same field measured with autograd on a linearised copy
  of the model, for any architecture (branches included);
* :func:`unit_windows` -- the input box each unit of one layer sees, as integer pixel windows to
  crop dataset-example patches with (:class:`UnitWindows`); analytic where the walk above
  applies, measured otherwise;
* :func:`receptive_field_table`, :func:`plot_receptive_fields`, :func:`draw_receptive_fields`;
* small formulas the exercise set ``01_filters`` asks students to write (marked ``@reference``):
  :func:`conv_output_size`, :func:`receptive_field_size`.

References
----------
A. Araujo, W. Norris, J. Sim (2019). Computing receptive fields of convolutional neural networks.
Distill, https://distill.pub/2019/computing-receptive-fields.
W. Luo, Y. Li, R. Urtasun, R. Zemel (2016). Understanding the effective receptive field in deep
convolutional neural networks. NeurIPS.
M. Zeiler, R. Fergus (2014). Visualizing and understanding convolutional networks. ECCV.
"""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Sequence
from typing import NamedTuple

import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ._common import _pair, _resolve_layers, _show_image
from ._reference import reference
from .hooks import get_layer
from .inputs import check_images, check_model, positive_int
from .models import Normalize

__all__ = [
    "EmpiricalReceptiveField",
    "ReceptiveField",
    "UnitWindows",
    "UnsupportedLayerError",
    "conv_output_size",
    "draw_receptive_fields",
    "empirical_receptive_field",
    "plot_receptive_fields",
    "receptive_field_size",
    "receptive_field_table",
    "receptive_fields",
    "unit_windows",
]


# ----------------------------------------------------------------------------------------------
# receptive fields, analytically (Araujo et al. 2019)


class UnsupportedLayerError(ValueError):
    """:func:`receptive_fields` met a module it cannot reason about (a branch, attention, ...)."""


class UnitWindows(NamedTuple):
    """The box of input pixels each unit of one layer sees, in integer pixel coordinates.

    Unit ``(i, j)`` of the layer's map sees input rows ``top .. top + size[0] - 1`` with
    ``top = offset[0] + i * stride[0]``, likewise columns with index 1. A window may reach
    outside the input, into the padding. Made by :func:`unit_windows` or
    :meth:`ReceptiveField.windows`; used to cut out dataset-example patches (Zeiler & Fergus 2014).

    Attributes
    ----------
    layer : str
    size : (height, width)
        Of every window (the receptive field size).
    stride : (height, width)
        Distance between the windows of neighbouring units (the field's jump).
    offset : (top, left)
        Of unit (0, 0)'s window; negative where it reaches into the padding.
    clipped : bool
        True only for a *measured* field that the image border cut off even on an enlarged
        input: ``size`` is then a lower bound. An analytic field is never clipped.
    """

    layer: str
    size: tuple[int, int]
    stride: tuple[int, int]
    offset: tuple[int, int]
    clipped: bool = False

    def box(self, i: int, j: int) -> tuple[int, int, int, int]:
        """``(top, left, height, width)`` of unit ``(i, j)``'s window (may extend outside the input)."""
        i, j = int(i), int(j)
        return (self.offset[0] + i * self.stride[0], self.offset[1] + j * self.stride[1], self.size[0], self.size[1])

    def crop(self, image: torch.Tensor, i: int, j: int, fill: float = 0.0) -> torch.Tensor:
        """The patch ``(C, h, w)`` of ``image`` ``(C, H, W)`` that unit ``(i, j)`` sees; outside the image: ``fill``."""
        if not isinstance(image, torch.Tensor) or image.dim() != 3:
            raise ValueError(f"image must be one picture (C, H, W), got {getattr(image, 'shape', type(image).__name__)}; "
                             "index the batch, e.g. images[0]")
        top, left, h, w = self.box(i, j)
        c, H, W = image.shape
        patch = image.new_full((c, h, w), fill)
        t0, l0 = max(top, 0), max(left, 0)
        t1, l1 = min(top + h, H), min(left + w, W)
        if t1 > t0 and l1 > l0:
            patch[:, t0 - top : t1 - top, l0 - left : l1 - left] = image[:, t0:t1, l0:l1]
        return patch


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

    def windows(self) -> UnitWindows:
        """The integer pixel window of every unit, as :class:`UnitWindows`.

        Unit 0's window starts at ``start - (size - 1) / 2``, which is minus the sum over layers of
        left padding times jump so far: a whole number of pixels.
        """
        size, jump, start = _pair_f(self.size), _pair_f(self.jump), _pair_f(self.start)
        offset = tuple(round(start[d] - (size[d] - 1) / 2) for d in range(2))
        return UnitWindows(self.layer, (int(size[0]), int(size[1])), (int(jump[0]), int(jump[1])), offset)


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


def _walk(name: str, m: nn.Module, g: _Geometry, out: list, until: str | None = None) -> tuple[_Geometry, bool]:
    """Advance the geometry through module ``m``; append records; return (geometry, stopped).

    The walk stops after the layer named ``until`` (if given) or where the network pools globally.
    """
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
            g, stopped = _walk(f"{name}.{child_name}" if name else child_name, child, g, out, until)
            if stopped:
                return g, True
    else:
        raise UnsupportedLayerError(
            f"receptive_fields cannot reason about layer {name!r} ({type(m).__name__}): it only follows plain chains "
            "of convolutions, pooling and pointwise layers, and this module may branch, attend or pool globally. "
            "Rather than guess, it stops; measure the field with empirical_receptive_field(model, layer, input_size), "
            "or pass a sub-model that is a plain chain."
        )
    if name:
        out.append(ReceptiveField(name, _same(g.size), _same(g.jump), _same(g.start)))
    return g, name == until


def _input_hw(model: nn.Module, input_size) -> tuple[int, int] | None:
    size = input_size if input_size is not None else getattr(model, "input_size", None)
    if size is None:
        return None
    if not isinstance(size, (tuple, list)) or len(size) not in (2, 3):
        raise ValueError(f"input_size must be (C, H, W) or (H, W), got {size!r}")
    return positive_int(size[-2], "input height"), positive_int(size[-1], "input width")


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
    UnsupportedLayerError (a ValueError)
        For a module it cannot reason about (branches, attention, squeeze-excitation,
        unknown layer types): it does not guess; use :func:`empirical_receptive_field`.
    """
    return _analytic_fields(model, input_size)


def _analytic_fields(model: nn.Module, input_size, until: str | None = None) -> list[ReceptiveField]:
    check_model(model)
    n = _input_hw(model, input_size)
    out: list[ReceptiveField] = []
    _walk("", model, _Geometry((1, 1), (1, 1), (0.0, 0.0), n), out, until)
    return out


# ----------------------------------------------------------------------------------------------
# receptive fields, measured with autograd on a linearised copy


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
            f"measuring a receptive field passes only through convolutions, pooling and pointwise layers; "
            f"{self.name!r} ({self.kind}) runs before the chosen layer: choose a convolutional layer before it"
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
    check_model(model)
    name, _ = get_layer(model, layer)
    hw = _required_hw(model, input_size)
    probe = _support_probe(model)
    x, out = _run_probe(probe, name, _input_channels(model, input_size), hw)
    h, w = out.shape[-2:]
    i, j = unit if unit is not None else (h // 2, w // 2)
    if not (0 <= i < h and 0 <= j < w):
        raise ValueError(f"unit {(i, j)} is outside the {h}x{w} output of {name!r}")
    r0, r1, c0, c1 = _support_box(x, out, (i, j))
    border = r0 == 0 or c0 == 0 or r1 == hw[0] - 1 or c1 == hw[1] - 1
    return EmpiricalReceptiveField(name, (int(i), int(j)), (r0, r1), (c0, c1), (r1 - r0 + 1, c1 - c0 + 1), border)


def _required_hw(model: nn.Module, input_size) -> tuple[int, int]:
    hw = _input_hw(model, input_size)
    if hw is None:
        raise ValueError("give input_size=(C, H, W): the model has no input_size attribute")
    return hw


def _input_channels(model: nn.Module, input_size) -> int:
    if input_size is not None and len(input_size) == 3:
        return positive_int(input_size[0], "input channels")
    return getattr(model, "input_size", (1,))[0]


def _run_probe(probe: nn.Module, name: str, channels: int, hw: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the probe on an all-ones input ``(1, C, H, W)`` up to layer ``name``; return (input, its output)."""
    captured = {}

    def stop(module, inputs, output):
        captured["out"] = output
        raise _Stop

    handle = probe.get_submodule(name).register_forward_hook(stop)
    x = torch.ones(1, channels, *hw, dtype=torch.float64, requires_grad=True)  # (1, C, H, W)
    try:
        with torch.enable_grad():  # also when called under torch.no_grad(), e.g. from top_activating
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
    return x, out


def _support_box(x: torch.Tensor, out: torch.Tensor, unit: tuple[int, int]) -> tuple[int, int, int, int]:
    """First and last input row, first and last column (inclusive) where unit's gradient is non-zero."""
    with torch.enable_grad():
        (grad,) = torch.autograd.grad(out[0, :, unit[0], unit[1]].sum(), x, retain_graph=True)
    support = grad[0].abs().sum(0) > 0  # (H, W)
    rows = support.any(1).nonzero()[:, 0]
    cols = support.any(0).nonzero()[:, 0]
    return int(rows[0]), int(rows[-1]), int(cols[0]), int(cols[-1])


# ----------------------------------------------------------------------------------------------
# the window of every unit of one layer, for cropping patches


def unit_windows(model: nn.Module, layer: str | nn.Module, input_size: tuple[int, ...] | None = None) -> UnitWindows:
    """The box of input pixels each unit of ``layer`` sees, e.g. to cut out dataset-example patches.

    Computed with :func:`receptive_fields` (exact; a window may reach outside the input) when the
    analytic walk can follow the model up to ``layer``. Where it cannot (branching networks such as
    GoogLeNet or ResNets, unknown modules, layers after global pooling) the windows are measured
    with the gradient probe of :func:`empirical_receptive_field` instead (see the notes).

    Parameters
    ----------
    model : nn.Module
    layer : str or nn.Module
        A layer whose output is a feature map ``(N, K, h, w)``.
    input_size : (C, H, W), optional
        Default ``model.input_size``.

    Returns
    -------
    UnitWindows
        ``.box(i, j)`` -> ``(top, left, height, width)`` of unit ``(i, j)``, ``.crop(image, i, j)``.

    Raises
    ------
    ValueError
        Without an input size, or when ``layer`` does not output a feature map.

    Notes
    -----
    The measurement takes size and stride from the central unit and its diagonal neighbour on an
    input enlarged (up to 8 times) until neither window touches the border, and places the windows
    by the bottom / right edge of unit (0, 0)'s window at the real input size (on the enlarged
    input where that window covers the whole image). When even 8 times the input cuts the field
    off, ``clipped`` is True and ``size`` is a lower bound.
    """
    check_model(model)
    name, _ = get_layer(model, layer)
    hw = _required_hw(model, input_size)
    try:
        fields = _analytic_fields(model, hw, until=name)
    except UnsupportedLayerError:
        fields = []  # a branch or an unknown module before the layer: measure instead
    field = next((f for f in fields if f.layer == name), None)
    if field is not None:
        return field.windows()
    return _measured_windows(model, name, _input_channels(model, input_size), hw)


def _measured_windows(model: nn.Module, name: str, channels: int, hw: tuple[int, int]) -> UnitWindows:
    """:func:`unit_windows` for a model the analytic walk refuses (see its notes)."""
    probe = _support_probe(model)
    x, out = _run_probe(probe, name, channels, hw)
    n_real = tuple(out.shape[-2:])
    corner = _support_box(x, out, (0, 0))  # unit (0, 0) at the real input size
    for scale in (1, 2, 4, 8):
        big = (hw[0] * scale, hw[1] * scale)
        if scale > 1:
            x, out = _run_probe(probe, name, channels, big)
        n = tuple(out.shape[-2:])
        centre = (n[0] // 2, n[1] // 2)
        step = tuple(0 if n[d] == 1 else (1 if centre[d] + 1 < n[d] else -1) for d in range(2))
        boxes = [_support_box(x, out, centre), _support_box(x, out, (centre[0] + step[0], centre[1] + step[1]))]
        inside = all(b[0] > 0 and b[2] > 0 and b[1] < big[0] - 1 and b[3] < big[1] - 1 for b in boxes)
        if inside:
            break
    size, stride, offset = [], [], []
    big_corner = None
    for d in range(2):
        lo, hi = boxes[0][2 * d], boxes[0][2 * d + 1]
        size.append(hi - lo + 1)
        if inside and step[d] != 0:
            stride.append((boxes[1][2 * d] - lo) * step[d])
        else:  # one unit only, or no clean measurement: input size / map size
            stride.append(max(1, round(big[d] / n[d])))
        hi0 = corner[2 * d + 1]  # last row / column unit 0 sees (its first is often cut off by the border)
        if hi0 < hw[d] - 1:  # unit 0's window ends inside the image
            offset.append(hi0 - size[d] + 1)
            continue
        # Unit 0 sees the whole axis: read its edge on the enlarged input instead (the same offset
        # unless the padding depends on the input size, as timm's "SAME" padding does).
        big_corner = big_corner if big_corner is not None else _support_box(x, out, (0, 0))
        if scale > 1 and big_corner[2 * d + 1] < big[d] - 1:
            offset.append(big_corner[2 * d + 1] - size[d] + 1)
        else:  # no edge anywhere: centre the middle unit's window on the image
            offset.append((hw[d] - size[d]) // 2 - (n_real[d] // 2) * stride[d])
    return UnitWindows(name, tuple(size), tuple(stride), tuple(offset), clipped=not inside)


# ----------------------------------------------------------------------------------------------
# tables and figures


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
    image = check_images(image, "image")
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

