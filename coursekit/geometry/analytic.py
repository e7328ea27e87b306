"""Receptive fields computed from the modules' geometry (Araujo, Norris & Sim 2019).

The recursion of Araujo et al. walks the model's modules in order and carries, per spatial
dimension, the field's size, the jump (input pixels between neighbouring units) and the start
(centre of unit 0's field): :func:`receptive_fields`. It follows chains of modules (``nn.Sequential``
and the containers of torchvision / timm models) through convolutions, pooling and pointwise
layers; a branch or an unknown module raises :class:`UnsupportedLayerError`, and
:mod:`coursekit.geometry.measured` measures the field instead. :class:`UnitWindows`
turns a field into the integer input box of every unit. Lecture 1 reaches all of this through
:mod:`coursekit.receptive_fields`.

References
----------
A. Araujo, W. Norris, J. Sim (2019). Computing receptive fields of convolutional neural networks.
Distill, https://distill.pub/2019/computing-receptive-fields.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn

from ..inputs import check_model, int_pair, positive_int
from ..models import Normalize

__all__ = ["ReceptiveField", "UnitWindows", "UnsupportedLayerError", "receptive_fields"]


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
        size, jump, start = per_dimension(self.size), per_dimension(self.jump), per_dimension(self.start)
        offset = tuple(round(start[d] - (size[d] - 1) / 2) for d in range(2))
        return UnitWindows(self.layer, (int(size[0]), int(size[1])), (int(jump[0]), int(jump[1])), offset)


class _Geometry(NamedTuple):  # per spatial dimension (height, width)
    size: tuple[int, int]
    jump: tuple[int, int]
    start: tuple[float, float]
    n: tuple[int, int] | None  # spatial size of the feature map, when the input size is known


def per_dimension(v):  # a size that may differ per dimension -> (height, width)
    return tuple(v) if isinstance(v, tuple) else (v, v)


def collapse_pair(v):
    return v[0] if v[0] == v[1] else tuple(v)


# Pointwise layers: every output position depends only on the same input position.
POINTWISE = (
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


def dynamic_same_padding(m: nn.Module) -> bool:
    # timm's Conv2dSame / MaxPool2dSame / AvgPool2dSame pad like TensorFlow's "SAME" at run time,
    # asymmetrically (the extra pixel goes right/bottom) and depending on the input size.
    return type(m).__name__ in ("Conv2dSame", "Conv2dSameExport", "MaxPool2dSame", "AvgPool2dSame")


def _spatial_args(name: str, m: nn.Module, n):
    """Per dimension: kernel, stride, dilation, left padding, right padding (None: unknown), output size."""
    kernel = int_pair(m.kernel_size, f"{name}.kernel_size")
    stride = int_pair(m.stride if m.stride is not None else m.kernel_size, f"{name}.stride")
    dilation = int_pair(getattr(m, "dilation", 1), f"{name}.dilation")
    ceil_mode = bool(getattr(m, "ceil_mode", False))
    if getattr(m, "padding_mode", "zeros") == "circular":
        raise ValueError(f"{name}: circular padding wraps around the image; receptive_fields does not model it")
    out = []
    for d in range(2):
        k, s, dil = kernel[d], stride[d], dilation[d]
        if dynamic_same_padding(m):
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
            left = right = int_pair(m.padding, f"{name}.padding", minimum=0)[d]
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
    elif isinstance(m, POINTWISE):
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
        out.append(ReceptiveField(name, collapse_pair(g.size), collapse_pair(g.jump), collapse_pair(g.start)))
    return g, name == until


def input_hw(model: nn.Module, input_size) -> tuple[int, int] | None:
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
    return analytic_fields(model, input_size)


def analytic_fields(model: nn.Module, input_size, until: str | None = None) -> list[ReceptiveField]:
    check_model(model)
    n = input_hw(model, input_size)
    out: list[ReceptiveField] = []
    _walk("", model, _Geometry((1, 1), (1, 1), (0.0, 0.0), n), out, until)
    return out
