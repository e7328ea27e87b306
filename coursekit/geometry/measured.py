"""Receptive fields measured with autograd on a linearised copy of the model.

The gradient of one output unit with respect to the input is non-zero exactly on the pixels the
unit depends on, once ReLUs and max pooling are linearised (with them the gradient reaches only
the *effective* receptive field of Luo et al. 2016). This works for any architecture, branches
included: :func:`empirical_receptive_field` measures one unit, and :func:`measured_windows`
gives :func:`coursekit.geometry.unit_windows` the windows of every unit where the
analytic walk of :mod:`coursekit.geometry.analytic` cannot follow the model.

References
----------
W. Luo, Y. Li, R. Urtasun, R. Zemel (2016). Understanding the effective receptive field in deep
convolutional neural networks. NeurIPS.
"""

from __future__ import annotations

import copy
import itertools
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..hooks import get_layer
from ..inputs import check_model, int_pair, positive_int
from .analytic import POINTWISE, UnitWindows, dynamic_same_padding, input_hw

__all__ = ["EmpiricalReceptiveField", "empirical_receptive_field"]


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
        self.kernel = int_pair(m.kernel_size, "kernel_size")
        self.stride = int_pair(m.stride if m.stride is not None else m.kernel_size, "stride")
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
    # Deep-copy the module tree but not the (possibly huge) weights: they are replaced anyway. The
    # probe measures geometry only, so it lives on the CPU whatever device the model is on.
    tensors = itertools.chain(model.parameters(), model.buffers())
    memo = {id(t): (nn.Parameter(torch.empty(0, device="cpu"), requires_grad=False) if isinstance(t, nn.Parameter)
                    else torch.empty(0, device="cpu"))
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
            m.weight = nn.Parameter(torch.ones(1, 1, *m.kernel_size, dtype=torch.float64, device="cpu"),
                                    requires_grad=False)
            m.bias = None
            m.groups, m.in_channels, m.out_channels = 1, 1, 1
            m.register_forward_pre_hook(_sum_channels)
        elif isinstance(m, (nn.MaxPool2d, nn.AvgPool2d)):
            if int_pair(getattr(m, "dilation", 1), f"{name}.dilation") != (1, 1):
                raise ValueError(f"{name}: dilated pooling is not supported by empirical_receptive_field")
            setattr(parent, child, _SupportPool(m, dynamic_same_padding(m)))
        elif isinstance(m, POINTWISE):
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
    hw = required_hw(model, input_size)
    probe = _support_probe(model)
    x, out = _run_probe(probe, name, input_channels(model, input_size), hw)
    h, w = out.shape[-2:]
    i, j = unit if unit is not None else (h // 2, w // 2)
    if not (0 <= i < h and 0 <= j < w):
        raise ValueError(f"unit {(i, j)} is outside the {h}x{w} output of {name!r}")
    r0, r1, c0, c1 = _support_box(x, out, (i, j))
    border = r0 == 0 or c0 == 0 or r1 == hw[0] - 1 or c1 == hw[1] - 1
    return EmpiricalReceptiveField(name, (int(i), int(j)), (r0, r1), (c0, c1), (r1 - r0 + 1, c1 - c0 + 1), border)


def required_hw(model: nn.Module, input_size) -> tuple[int, int]:
    hw = input_hw(model, input_size)
    if hw is None:
        raise ValueError("give input_size=(C, H, W): the model has no input_size attribute")
    return hw


def input_channels(model: nn.Module, input_size) -> int:
    if input_size is not None and len(input_size) == 3:
        return positive_int(input_size[0], "input channels")
    return getattr(model, "input_size", (1,))[0]


def _run_probe(probe: nn.Module, name: str, channels: int, hw: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the probe on an all-ones input ``(1, C, H, W)`` up to layer ``name``; return (input, its output)."""
    captured = {}

    def stop(module, inputs, output):
        captured["out"] = output
        raise _Stop

    # a hook by hand, not hooks.record: this is the module's own linearised copy, never the user's model
    handle = probe.get_submodule(name).register_forward_hook(stop)
    x = torch.ones(1, channels, *hw, dtype=torch.float64, device="cpu", requires_grad=True)  # (1, C, H, W), as the probe
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



def measured_windows(model: nn.Module, name: str, channels: int, hw: tuple[int, int]) -> UnitWindows:
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
