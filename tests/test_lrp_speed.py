"""The shortcuts of issue 20's third pass: each one checked against the slow way it replaces."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from coursekit import lrp as L
from coursekit.gradients import gradient
from coursekit.guard import guarded, model_state
from coursekit.rules import Canonizer

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("shape", [(32, 16, 28), (16, 96, 20), (96, 24, 14), (320, 64, 7)])
def test_pointwise_product_equals_the_convolution_kernel(shape):
    """A 1x1 convolution of one channels-last image: the matrix product is the convolution kernel's input gradient."""
    from coursekit.lrp.rules import _conv_input_grad, _fast_vjp, _pointwise

    c, o, h = shape
    torch.manual_seed(0)
    conv = nn.Conv2d(c, o, 1).requires_grad_(False)
    x = torch.randn(1, c, h, h).contiguous(memory_format=torch.channels_last)
    s = torch.randn(1, o, h, h).contiguous(memory_format=torch.channels_last)
    assert _pointwise(conv, x, s)
    got = _fast_vjp(conv, x, conv.weight, s)
    expected = _conv_input_grad(x, conv.weight, s, conv.stride, conv.padding, conv.dilation, conv.groups)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    assert got.is_contiguous(memory_format=torch.channels_last) and got.shape == x.shape
    # not for: two images, an NCHW input, a strided or padded 1x1 convolution, a 3x3 one
    assert not _pointwise(conv, torch.cat([x, x]), torch.cat([s, s]))
    assert not _pointwise(conv, x.contiguous(), s.contiguous())
    for other in (nn.Conv2d(c, o, 1, stride=2), nn.Conv2d(c, o, 1, padding=1), nn.Conv2d(c, o, 3, padding=1)):
        assert not _pointwise(other, x, s)


def test_merged_layer_is_a_new_layer_without_copied_tensors():
    """merge_batchnorm's shallow copy: the same settings and forward as a deep copy, the original untouched."""
    from timm.layers import Conv2dSame

    torch.manual_seed(1)
    for layer in (nn.Conv2d(3, 4, 3, stride=2, padding=1, groups=1), Conv2dSame(3, 4, 3, stride=2), nn.Linear(5, 4)):
        bn = nn.BatchNorm2d(4) if not isinstance(layer, nn.Linear) else nn.BatchNorm1d(4)
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.eval()
        handle = layer.register_forward_hook(lambda *a: None)
        before = {k: v.clone() for k, v in layer.state_dict().items()}
        weight = layer.weight
        merged = L.merge_batchnorm(layer, bn)
        assert type(merged) is type(layer) and merged is not layer
        assert layer.weight is weight and all(torch.equal(v, before[k]) for k, v in layer.state_dict().items())
        assert merged.weight is not weight and merged._parameters is not layer._parameters
        assert len(layer._forward_hooks) == 1 and len(merged._forward_hooks) == 0
        x = torch.randn(2, 3, 9, 9) if not isinstance(layer, nn.Linear) else torch.randn(2, 5)
        with torch.no_grad():
            torch.testing.assert_close(merged(x), bn(layer(x)), rtol=1e-5, atol=1e-5)
            reference = copy.deepcopy(layer)  # what merge_batchnorm did before: a deep copy, then new parameters
            reference.weight, reference.bias = merged.weight, merged.bias
            assert torch.equal(merged(x), reference(x))
        handle.remove()


class _WritesIntoWeights(Canonizer):
    """A canonizer that scales a weight in place (what the guard's value snapshot is there for)."""

    def apply(self, model):
        with torch.no_grad():
            model[0].weight.mul_(2)
        return lambda: None  # a wrong undo: only the guard puts the values back


def test_guard_copies_values_only_for_canonizers_that_write_tensors():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 4 * 4, 3)).eval()
    x = torch.rand(1, 1, 6, 6)
    before = model_state(model)
    gradient(model, x, 0, canonizers=[_WritesIntoWeights()])
    assert before.differences(model_state(model)) == []  # writes_tensors=True (default): values restored
    assert all(not c.writes_tensors for c in (L.MergeBatchNorm(), L.EfficientNetCanonizer(), L.ResNetCanonizer(),
                                              L.VGGCanonizer(), L.MobileNetV2Canonizer()))
    with guarded(model, structure=True, values=False):  # module swaps are still put back
        model._modules["0"] = nn.Identity()
    assert before.differences(model_state(model)) == []


@pytest.mark.parametrize("rule", [L.Gamma(0.25), L.AlphaBeta(2, 1), L.ZPlus(), L.Gamma(0.5, bias=False)],
                         ids=repr)
@pytest.mark.parametrize("layer", ["conv", "linear", "conv_cl"])
@pytest.mark.parametrize("case", ["signed", "nonneg_relevance_everywhere", "nonpositive", "behind_relu"])
def test_stacked_terms_equal_the_generic_terms(rule, layer, case, monkeypatch):
    """One forward and one product over the stacked sign parts and groups = the terms one by one."""
    from coursekit.lrp import rules as R

    torch.manual_seed(3)
    module = {"conv": nn.Conv2d(5, 7, 3, padding=1), "conv_cl": nn.Conv2d(6, 8, 1),
              "linear": nn.Linear(9, 4)}[layer.split("_")[0] if layer != "conv_cl" else layer].requires_grad_(False)
    shape = {"conv": (2, 5, 6, 6), "conv_cl": (1, 6, 5, 5), "linear": (3, 9)}[layer]
    x = torch.randn(shape)
    if case != "signed":
        x = x.abs() if case != "nonpositive" else -x.abs()
    if layer == "conv_cl":
        x = x.contiguous(memory_format=torch.channels_last)
    z = module(x)
    relevance = torch.randn_like(z)
    if case == "behind_relu":
        relevance = relevance * (z > 0)
    got = rule.backward(module, (x,), z, relevance)[0]
    monkeypatch.setattr(R, "_stacked_backward", lambda *a: None)
    expected = rule.backward(module, (x,), z, relevance)[0]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6 * float(expected.abs().max()))
    one_group = isinstance(rule, L.ZPlus) or isinstance(rule, L.Gamma) and case == "behind_relu"
    if one_group and case != "signed":
        assert torch.equal(got, expected)  # one (group, sign part) pair: the generic path itself
