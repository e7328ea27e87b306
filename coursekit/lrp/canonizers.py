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

Every canonizer returns an undo function that puts back exactly the modules it replaced; the
user's modules and parameters are never written to (merged layers are new copies).
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn

from ..rules import Canonizer

__all__ = ["Sum", "Residual", "merge_batchnorm", "MergeBatchNorm", "EfficientNetCanonizer"]


class Sum(nn.Module):
    """``a + b`` as a layer of its own, so that a rule can be attached to a residual addition."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:  # (N,C,H,W) x 2 -> (N,C,H,W)
        return a + b


class Residual(nn.Module):
    """``sum(branch(x), x)``: a residual block with its addition made explicit."""

    def __init__(self, branch: nn.Module):
        super().__init__()
        self.branch = branch
        self.sum = Sum()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.sum(self.branch(x), x)


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
    merged = copy.deepcopy(layer)
    merged.weight = nn.Parameter(weight * scale.view(-1, *([1] * (weight.dim() - 1))), requires_grad=False)
    merged.bias = nn.Parameter(old_bias * scale + shift, requires_grad=False)
    merged._forward_hooks.clear()
    merged._forward_pre_hooks.clear()
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
