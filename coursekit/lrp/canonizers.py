"""Canonizers for LRP: rewrite a model so that every layer is one the rules were written for.

Two things break LRP on modern networks (Kohlbrenner et al. 2020; Motzkus et al. 2022):

* **batch-norm** is an affine map *per channel*; LRP's rules are written for the convolution
  before it. Merging it into that convolution (``w' = w * g / s``, ``b' = (b - mu) * g / s + beta``,
  ``s = sqrt(var + eps)``) gives the same function with one layer fewer.
* **residual additions** ``y = f(x) + x`` are autograd's ``+``: its gradient copies the relevance
  of ``y`` into *both* branches, so every skip connection doubles it. Made explicit as a
  :class:`Sum` layer, the :class:`~coursekit.lrp.rules.Norm` rule splits ``R_y`` between the
  branches in proportion to their contributions.

:class:`EfficientNetCanonizer` does both for timm's EfficientNet (``tf_efficientnet_lite0``), whose
batch-norm is timm's ``BatchNormAct2d`` (batch-norm and ReLU6 in one module; zennit's
``SequentialMergeBatchNorm`` finds nothing to merge in it) and whose stride-2 convolutions are
``Conv2dSame`` (TensorFlow "same" padding computed from the input size; kept as they are, so the
rules see the padding exactly as the model does). ReLU6 stays a separate layer that relevance
passes unchanged. The input normalisation is handled by the LRP composite (relevance passes it
unchanged; z^B's pixel bounds are converted through it), so relevance ends in pixel space.

The torchvision canonizers do the same for the networks students bring: :class:`ResNetCanonizer`
(``BasicBlock`` / ``Bottleneck``, with the ``downsample`` shortcut merged too), :class:`VGGCanonizer`
(VGG-BN: batch-norm inside ``features``) and :class:`MobileNetV2Canonizer` (inverted residuals,
ReLU6, and the functional global average pooling made a layer so that it gets its rule).
:func:`~coursekit.lrp.analysis.default_canonizers` ("auto") picks them by the model's block types.

Every canonizer returns an undo function that puts back exactly the modules it replaced; the
user's modules and parameters are never written to (merged layers are new copies).
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn

from ..rules import Canonizer

__all__ = ["Sum", "Residual", "merge_batchnorm", "MergeBatchNorm", "EfficientNetCanonizer", "ResNetCanonizer",
           "VGGCanonizer", "MobileNetV2Canonizer"]


class Sum(nn.Module):
    """``a + b`` as a layer of its own, so that a rule can be attached to a residual addition."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:  # (N,C,H,W) x 2 -> (N,C,H,W)
        return a + b


class Residual(nn.Module):
    """``after(sum(branch(x), shortcut(x)))``: a residual block with its addition made explicit.

    Parameters
    ----------
    branch : nn.Module
    shortcut : nn.Module, optional
        The skip path (torchvision's ``downsample``); the identity when None.
    after : nn.Module, optional
        What follows the addition (ResNet's ReLU); nothing when None.
    """

    def __init__(self, branch: nn.Module, shortcut: nn.Module | None = None, after: nn.Module | None = None):
        super().__init__()
        self.branch = branch
        if shortcut is not None:
            self.shortcut = shortcut
        self.sum = Sum()
        if after is not None:
            self.after = after

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, C, H, W) -> (N, C', H', W')
        skip = self.shortcut(x) if "shortcut" in self._modules else x
        out = self.sum(self.branch(x), skip)
        return self.after(out) if "after" in self._modules else out


_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


@torch.no_grad()
def merge_batchnorm(layer: nn.Module, bn: nn.Module) -> nn.Module:
    """A copy of ``layer`` (Conv / Linear) with the eval-mode batch-norm ``bn`` that follows it folded in.

    Parameters
    ----------
    layer : nn.Conv1d/2d/3d or nn.Linear (any subclass, e.g. timm's Conv2dSame)
    bn : nn.BatchNorm1d/2d/3d (any subclass, e.g. timm's BatchNormAct2d: only its affine part is merged)

    Returns
    -------
    nn.Module: a new layer of ``layer``'s class computing ``bn(layer(x))`` (affine part); ``layer``
    is not modified.
    """
    if not isinstance(bn, _BN):
        raise TypeError(f"merge_batchnorm needs a batch-norm layer, got {type(bn).__name__}")
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError("batch-norm without running statistics (track_running_stats=False) cannot be merged")
    weight = getattr(layer, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.shape[0] != bn.num_features:
        raise ValueError(
            f"cannot merge {type(bn).__name__}({bn.num_features}) into {type(layer).__name__}: "
            f"its weight has shape {None if weight is None else tuple(weight.shape)}"
        )
    scale = bn.running_var.add(bn.eps).rsqrt()  # (C,)
    if bn.weight is not None:
        scale = scale * bn.weight
    shift = -bn.running_mean * scale + (bn.bias if bn.bias is not None else 0)
    old_bias = layer.bias if layer.bias is not None else torch.zeros_like(bn.running_mean)
    merged = _new_layer(layer)
    merged.weight = nn.Parameter(weight * scale.view(-1, *([1] * (weight.dim() - 1))), requires_grad=False)
    merged.bias = nn.Parameter(old_bias * scale + shift, requires_grad=False)
    merged._forward_hooks.clear()
    merged._forward_pre_hooks.clear()
    return merged


def _new_layer(layer: nn.Module) -> nn.Module:
    """A new module of ``layer``'s class with the same settings, for new parameters (``layer`` is not modified).

    A layer without submodules and buffers (a plain Conv / Linear) is copied shallowly: its attribute
    dictionaries are copied, its tensors not (both parameters are replaced next; a deep copy would clone them
    first, most of a canonizer's time). Anything else is deep-copied.
    """
    if layer._modules or layer._buffers:
        return copy.deepcopy(layer)
    merged = type(layer).__new__(type(layer))
    merged.__dict__.update({k: v.copy() if isinstance(v, (dict, set, list)) else v
                            for k, v in layer.__dict__.items()})
    return merged


def _after_norm(bn: nn.Module) -> nn.Module:
    """What is left of a batch-norm once merged: timm's BatchNormAct2d keeps its dropout + activation."""
    rest = [m for m in (getattr(bn, "drop", None), getattr(bn, "act", None)) if m is not None and not isinstance(m, nn.Identity)]
    if not rest:
        return nn.Identity()
    return rest[0] if len(rest) == 1 else nn.Sequential(*rest)


def _replace(parent: nn.Module, name: str, new: nn.Module, undo: list) -> None:
    undo.append((parent, name, parent._modules[name]))
    parent._modules[name] = new


def _undo(undo: list) -> Callable[[], None]:
    def restore():
        for parent, name, old in reversed(undo):
            parent._modules[name] = old
        undo.clear()

    return restore


class MergeBatchNorm(Canonizer):
    """Merge every batch-norm that directly follows a Conv / Linear inside an ``nn.Sequential``.

    The case of torchvision's VGG-BN and similar (zennit's ``SequentialMergeBatchNorm``).
    """

    writes_tensors = False  # swaps modules only (merged copies); the model's tensors are never written

    def apply(self, model):
        undo: list = []
        try:
            for parent in list(model.modules()):
                if not isinstance(parent, nn.Sequential):
                    continue
                names = list(parent._modules)
                for a, b in zip(names, names[1:]):
                    layer, bn = parent._modules[a], parent._modules[b]
                    if isinstance(layer, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)) and isinstance(bn, _BN):
                        _replace(parent, a, merge_batchnorm(layer, bn), undo)
                        _replace(parent, b, _after_norm(bn), undo)
        except Exception:
            _undo(undo)()
            raise
        return _undo(undo)


# layers of timm's EfficientNet blocks in the order their forward() runs them, and the
# (convolution, batch-norm) pairs to merge
_BLOCKS = {
    "DepthwiseSeparableConv": (("conv_dw", "bn1", "aa", "se", "conv_pw", "bn2", "drop_path"),
                               (("conv_dw", "bn1"), ("conv_pw", "bn2"))),
    "InvertedResidual": (("conv_pw", "bn1", "conv_dw", "bn2", "aa", "se", "conv_pwl", "bn3", "drop_path"),
                         (("conv_pw", "bn1"), ("conv_dw", "bn2"), ("conv_pwl", "bn3"))),
}


class EfficientNetCanonizer(Canonizer):
    """timm EfficientNet (Tan & Le 2019; ``tf_efficientnet_lite0``) made LRP-ready, reversibly.

    * ``conv_stem``+``bn1``, ``conv_head``+``bn2`` and the two or three (conv, BatchNormAct2d) pairs of
      every block are merged (:func:`merge_batchnorm`); each batch-norm is replaced by its ReLU6
      (or nothing, after the linear projection);
    * every block becomes an ``nn.Sequential`` of its layers in forward order, wrapped in
      :class:`Residual` (an explicit :class:`Sum`) when the block has a skip connection.

    Blocks with squeeze-excitation (multiplicative gating; EfficientNet-B*, not the Lite models) or
    space-to-depth stems are refused with a ValueError rather than explained wrongly.
    """

    writes_tensors = False  # swaps modules only (merged copies); the model's tensors are never written

    def apply(self, model):
        undo: list = []
        try:
            found = 0
            for net in list(model.modules()):
                if type(net).__name__ == "EfficientNet" and hasattr(net, "blocks"):
                    self._canonize(net, undo)
                    found += 1
            if not found:
                raise ValueError(
                    f"EfficientNetCanonizer found no timm EfficientNet inside {type(model).__name__}; "
                    "use it with coursekit.load_model('efficientnet_lite0') or a timm efficientnet"
                )
        except Exception:
            _undo(undo)()
            raise
        return _undo(undo)

    def _canonize(self, net: nn.Module, undo: list) -> None:
        for conv, bn in (("conv_stem", "bn1"), ("conv_head", "bn2")):
            if not isinstance(net._modules.get(bn), _BN):
                raise ValueError(f"EfficientNet.{bn} is {type(net._modules.get(bn)).__name__}, expected a batch-norm")
            merged, rest = merge_batchnorm(net._modules[conv], net._modules[bn]), _after_norm(net._modules[bn])
            _replace(net, conv, merged, undo)
            _replace(net, bn, rest, undo)
        for stage in net.blocks:
            for name in list(stage._modules):
                _replace(stage, name, self._block(stage._modules[name], f"blocks.{name}"), undo)

    @staticmethod
    def _block(block: nn.Module, where: str) -> nn.Module:
        kind = type(block).__name__
        if kind not in _BLOCKS:
            raise ValueError(f"EfficientNetCanonizer does not know {where} ({kind}); it handles {sorted(_BLOCKS)}")
        order, pairs = _BLOCKS[kind]
        if getattr(block, "conv_s2d", None) is not None:
            raise ValueError(f"{where} ({kind}) has a space-to-depth stem, which this canonizer does not handle")
        if not isinstance(block.se, nn.Identity):
            raise ValueError(
                f"{where} ({kind}) has squeeze-excitation ({type(block.se).__name__}): a multiplicative gate "
                "that no LRP rule here explains; EfficientNet-Lite models have none"
            )
        layers = dict(block._modules)
        for conv, bn in pairs:
            layers[conv], layers[bn] = merge_batchnorm(layers[conv], layers[bn]), _after_norm(layers[bn])
        branch = nn.Sequential()
        for name in order:
            if not isinstance(layers[name], nn.Identity):
                branch.add_module(name, layers[name])
        return Residual(branch) if block.has_skip else branch


# ----------------------------------------------------------------------------------------------
# torchvision: ResNet, VGG-BN, MobileNetV2


_LINEAR = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def _merged_sequential(seq: nn.Module, where: str) -> nn.Sequential:
    """A new ``nn.Sequential`` like ``seq`` (same names, nested ones too) with every Conv/Linear + batch-norm merged.

    ``seq`` itself is not modified; layers other than the merged pairs are shared with it.
    """
    if not isinstance(seq, nn.Sequential):
        raise ValueError(f"{where} is {type(seq).__name__}, expected an nn.Sequential of layers")
    out, items = nn.Sequential(), list(seq._modules.items())
    skip_next = False
    for i, (name, layer) in enumerate(items):
        if skip_next:
            skip_next = False
            continue
        follower = items[i + 1][1] if i + 1 < len(items) else None
        if isinstance(layer, _LINEAR) and isinstance(follower, _BN):
            out.add_module(name, merge_batchnorm(layer, follower))
            out.add_module(items[i + 1][0], _after_norm(follower))
            skip_next = True
        elif isinstance(layer, nn.Sequential):
            out.add_module(name, _merged_sequential(layer, f"{where}.{name}"))
        else:
            out.add_module(name, layer)
    return out


def _find(model: nn.Module, kind: type, canonizer: str, hint: str) -> list[nn.Module]:
    nets = [m for m in model.modules() if isinstance(m, kind)]
    if not nets:
        raise ValueError(f"{canonizer} found no torchvision {kind.__name__} inside {type(model).__name__}; {hint}")
    return nets


class ResNetCanonizer(Canonizer):
    """torchvision ResNet (He et al. 2016; ``resnet18`` ... ``resnet152``, ``resnext``, ``wide_resnet``), reversibly.

    * the stem ``conv1`` + ``bn1`` is merged (:func:`merge_batchnorm`), ``bn1`` becomes an identity;
    * every ``BasicBlock`` / ``Bottleneck`` becomes a :class:`Residual`: its convolutions with their
      batch-norms merged and a ReLU between them as the branch, the ``downsample`` (1x1 convolution
      + batch-norm, merged) as the shortcut, the explicit :class:`Sum` and the final ReLU after it.

    Blocks of other classes (a subclass with its own ``forward``) are refused with a ValueError.
    """

    writes_tensors = False  # swaps modules only (merged copies); the model's tensors are never written

    def apply(self, model):
        from torchvision.models.resnet import ResNet

        undo: list = []
        try:
            for net in _find(model, ResNet, "ResNetCanonizer", "use it with torchvision.models.resnet18() etc."):
                _replace(net, "conv1", merge_batchnorm(net.conv1, net.bn1), undo)
                _replace(net, "bn1", _after_norm(net.bn1), undo)
                for stage in ("layer1", "layer2", "layer3", "layer4"):
                    blocks = net._modules[stage]
                    for key in list(blocks._modules):
                        _replace(blocks, key, self._block(blocks._modules[key], f"{stage}.{key}"), undo)
        except Exception:
            _undo(undo)()
            raise
        return _undo(undo)

    @staticmethod
    def _block(block: nn.Module, where: str) -> Residual:
        from torchvision.models.resnet import BasicBlock, Bottleneck

        if type(block) not in (BasicBlock, Bottleneck):
            raise ValueError(f"ResNetCanonizer does not know {where} ({type(block).__name__}); it handles "
                             "torchvision's BasicBlock and Bottleneck")
        count = 2 if type(block) is BasicBlock else 3
        branch = nn.Sequential()
        for i in range(1, count + 1):
            branch.add_module(f"conv{i}", merge_batchnorm(block._modules[f"conv{i}"], block._modules[f"bn{i}"]))
            if i < count:
                branch.add_module(f"relu{i}", nn.ReLU())
        shortcut = None if block.downsample is None else _merged_sequential(block.downsample, f"{where}.downsample")
        return Residual(branch, shortcut, nn.ReLU())


class VGGCanonizer(MergeBatchNorm):
    """torchvision VGG-BN (``vgg11_bn`` ... ``vgg19_bn``): every batch-norm in ``features`` merged into its convolution."""

    def apply(self, model):
        from torchvision.models import VGG

        _find(model, VGG, "VGGCanonizer", "use it with torchvision.models.vgg16_bn() etc.")
        return super().apply(model)


class MobileNetV2Canonizer(Canonizer):
    """torchvision MobileNetV2 (Sandler et al. 2018), reversibly.

    ``features`` is replaced by a new ``nn.Sequential``: every Conv2dNormActivation with its
    batch-norm merged (ReLU6 kept, relevance passes it unchanged), every ``InvertedResidual`` as its
    merged layers, wrapped in :class:`Residual` when it has a skip connection (``use_res_connect``),
    and an ``nn.AdaptiveAvgPool2d(1)`` at the end: MobileNetV2 pools with a function call, which no
    rule could see; after this layer the function pools a 1x1 map, which changes nothing.
    """

    writes_tensors = False  # swaps modules only (merged copies); the model's tensors are never written

    def apply(self, model):
        from torchvision.models.mobilenetv2 import InvertedResidual, MobileNetV2

        undo: list = []
        try:
            for net in _find(model, MobileNetV2, "MobileNetV2Canonizer",
                              "use it with torchvision.models.mobilenet_v2()"):
                if type(net).forward is not MobileNetV2.forward or type(net)._forward_impl is not MobileNetV2._forward_impl:
                    raise ValueError(f"{type(net).__name__} has its own forward; MobileNetV2Canonizer handles "
                                     "torchvision's MobileNetV2 as it is")
                features = nn.Sequential()
                for key, block in net.features._modules.items():
                    where = f"features.{key}"
                    if isinstance(block, InvertedResidual):
                        branch = _merged_sequential(block.conv, f"{where}.conv")
                        features.add_module(key, Residual(branch) if block.use_res_connect else branch)
                    else:
                        features.add_module(key, _merged_sequential(block, where))
                features.add_module("pool", nn.AdaptiveAvgPool2d(1))
                _replace(net, "features", features, undo)
        except Exception:
            _undo(undo)()
            raise
        return _undo(undo)


# residual blocks (an addition inside forward) of torchvision and timm, by class name
RESIDUAL_BLOCKS = frozenset({
    "BasicBlock", "Bottleneck", "InvertedResidual", "MBConv", "FusedMBConv", "CNBlock", "ResBottleneckBlock",
    "DepthwiseSeparableConv", "EdgeResidual", "ConvNeXtBlock", "BottleneckBlock", "ResidualBlock",
})


def unexplained(model: nn.Module) -> list[str]:
    """``"name (Type)"`` of every module that LRP's rules would explain wrongly as it is.

    A batch-norm not merged into a layer (its relay rule ignores its scale and shift) and a
    residual block (its addition copies relevance into both paths) of a kind in
    :data:`RESIDUAL_BLOCKS` that still has its skip connection; layers inside a listed block are
    not listed again.
    """
    found: list[str] = []
    inside = None  # the prefix of the last listed module: named_modules lists its descendants right after it
    for name, m in model.named_modules():
        if inside is not None and name.startswith(inside):
            continue
        skip = type(m).__name__ in RESIDUAL_BLOCKS and getattr(m, "use_res_connect", True) is not False \
            and getattr(m, "has_skip", True) is not False
        if skip or isinstance(m, nn.modules.batchnorm._BatchNorm):  # SyncBatchNorm and lazy ones too
            found.append(f"{name or '(model)'} ({type(m).__name__})")
            inside = name + "."
    return found
