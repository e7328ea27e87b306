"""LRP on the networks students bring: torchvision ResNet, VGG-BN, MobileNetV2 (random weights), and
the refusals and warnings for what no canonizer covers (issue 22).

The maps themselves are cross-checked against zennit in ``tests/test_crosscheck_lrp.py``; here:
each canonizer computes the same function, is undone exactly (also on error), "auto" picks it,
relevance is conserved layer by layer, and LRP refuses or warns where it cannot be right.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.resnet import BasicBlock

from coursekit import lrp as L
from coursekit.guard import model_state
from coursekit.models import CourseModel
from coursekit.rules import UncoveredLayerError

pytestmark = pytest.mark.usefixtures("one_thread")


@torch.no_grad()
def _calibrated(net: nn.Module, zero_shift: bool = False, seed: int = 0) -> nn.Module:
    """Batch-norm statistics from noise images, random affine parameters; ``zero_shift``: merged biases 0."""
    gen = torch.Generator().manual_seed(seed)
    bns = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # the plain average over the calibration batch
        bn.weight.uniform_(0.5, 1.5, generator=gen)
        bn.bias.uniform_(-0.2, 0.2, generator=gen)
    net.train()
    net(torch.rand(4, 3, 64, 64, generator=gen))
    net.eval()
    if zero_shift:  # beta = mu * gamma / s: the merged layers have no bias, so bias-free rules conserve exactly
        for bn in bns:
            bn.bias.copy_(bn.running_mean * bn.weight / (bn.running_var + bn.eps).sqrt())
    return net.requires_grad_(False)


def _model(name: str, zero_shift: bool = False) -> CourseModel:
    torch.manual_seed(0)
    net = getattr(torchvision.models, name)(weights=None)
    if name.startswith("vgg"):  # small dense layers: VGG's 120M dense weights are not what this is about
        net.classifier = nn.Sequential(nn.Linear(512 * 7 * 7, 64), nn.ReLU(), nn.Dropout(), nn.Linear(64, 10))
    net = _calibrated(net, zero_shift)
    return CourseModel(net, name=name, classes=[str(i) for i in range(1000)], input_size=(3, 64, 64),
                       mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225], layers={}).double().eval()


@pytest.fixture(scope="module")
def x64():
    return torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


# (model, canonizer, Sum layers it adds: one per skip connection)
NETS = [("resnet18", L.ResNetCanonizer, 8), ("resnet50", L.ResNetCanonizer, 16), ("vgg16_bn", L.VGGCanonizer, 0),
        ("mobilenet_v2", L.MobileNetV2Canonizer, 10)]


def _unexplained_slowly(model: nn.Module) -> list[str]:
    """The reference for L.unexplained: every listed module's name checked against every module's."""
    found, listed = [], []
    for name, m in model.named_modules():
        if any(name.startswith(p + ".") for p in listed):
            continue
        residual = type(m).__name__ in L.RESIDUAL_BLOCKS and getattr(m, "use_res_connect", True) is not False \
            and getattr(m, "has_skip", True) is not False
        if residual or isinstance(m, nn.modules.batchnorm._BatchNorm):
            found.append(f"{name or '(model)'} ({type(m).__name__})")
            listed.append(name)
    return found


@pytest.mark.parametrize("name, kind, sums", NETS)
def test_canonizer_is_the_same_function_picked_by_auto_and_undone(name, kind, sums, x64):
    model = _model(name)
    before = model_state(model)
    with torch.no_grad():
        reference = model(x64)
    chosen = L.default_canonizers(model)
    assert [type(c) for c in chosen] == [kind]
    assert L.unexplained(model)  # batch-norms (and residual blocks) before
    assert L.unexplained(model) == _unexplained_slowly(model)
    with chosen[0].applied(model):
        assert L.unexplained(model) == []
        assert sum(isinstance(m, L.Sum) for m in model.modules()) == sums
        assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
        with torch.no_grad():
            torch.testing.assert_close(model(x64), reference, rtol=1e-10, atol=1e-10)
    assert before.differences(model_state(model)) == []
    L.lrp(model, x64, 0, "EpsilonPlusFlat")
    assert before.differences(model_state(model)) == []
    with pytest.raises(UncoveredLayerError, match="Linear"):  # an error after the canonizer ran: undone too
        L.lrp(model, x64, 0, L.LRPComposite({nn.Conv2d: L.ZPlus()}))
    assert before.differences(model_state(model)) == []


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "vgg16_bn", "mobilenet_v2"])
def test_relevance_is_conserved_layer_by_layer(name, x64):
    """Without biases (merged biases zero, rules with bias=False), every layer passes its relevance on.

    The ratio to the logit stays 1 at every layer of the main path; without the canonizers it does not.
    """
    model = _model(name, zero_shift=True)
    with torch.no_grad():
        target = int(model(x64).argmax())
    for composite in (L.epsilon_plus_flat(bias=False), L.lrp_epsilon(1e-9, bias=False, relative=False)):
        ratios = L.conservation(model, x64, target, composite).main_path().ratios[:, 0]
        assert len(ratios) > 10
        assert abs(ratios - 1).max() < 1e-4, (composite, ratios.min(), ratios.max())
    if not name.startswith("vgg"):  # a skip connection left to autograd's + copies relevance into both paths
        with pytest.warns(L.UncanonizedWarning), pytest.warns(L.ConservationWarning):
            plain = L.lrp(model, x64, target, L.epsilon_plus_flat(bias=False), canonizers=[L.MergeBatchNorm()])
        with torch.no_grad():
            assert float(plain.sum() / model(x64)[0, target]) > 2


def test_bottleneck_with_stride_and_downsample_is_merged(x64):
    model = _model("resnet50")
    with L.ResNetCanonizer().applied(model):
        block = model.net.layer2[0]
        assert isinstance(block, L.Residual) and isinstance(block.shortcut[0], nn.Conv2d)
        assert isinstance(block.shortcut[1], nn.Identity) and block.shortcut[0].bias is not None
        assert [n for n, _ in block.branch.named_children()] == ["conv1", "relu1", "conv2", "relu2", "conv3"]
        assert block.branch.conv2.stride == (2, 2)


class _OwnBlock(BasicBlock):
    """A student's block: the same layers, its own forward (the canonizer cannot know what it does)."""

    def forward(self, x):
        return super().forward(x) * 1.0


def test_resnet_canonizer_refuses_an_unknown_block_and_undoes_what_it_did(x64):
    model = _model("resnet18")
    old = model.net.layer3[1]
    own = _OwnBlock(256, 256).eval().double().requires_grad_(False)
    own.load_state_dict(old.state_dict())
    model.net.layer3[1] = own
    before = model_state(model)
    with pytest.raises(ValueError, match=r"layer3\.1 \(_OwnBlock\)"):
        L.ResNetCanonizer().apply(model)  # layer1, layer2, layer3.0 were rewritten first
    assert before.differences(model_state(model)) == []
    assert isinstance(model.net.layer1[0], BasicBlock) and isinstance(model.net.bn1, nn.BatchNorm2d)
    with pytest.raises(ValueError, match="_OwnBlock"):
        L.lrp(model, x64, 0)
    assert before.differences(model_state(model)) == []


def test_canonizers_refuse_other_models(fashion):
    for canonizer, match in ((L.ResNetCanonizer(), "no torchvision ResNet"), (L.VGGCanonizer(), "no torchvision VGG"),
                             (L.MobileNetV2Canonizer(), "no torchvision MobileNetV2")):
        with pytest.raises(ValueError, match=match):
            L.lrp(fashion, torch.rand(1, 1, 28, 28), 0, "EpsilonPlus", canonizers=[canonizer])


class _Blocks(nn.Module):
    """torchvision residual blocks inside a network that is not a torchvision ResNet."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.blocks = nn.Sequential(BasicBlock(8, 8), BasicBlock(8, 8))
        self.pool, self.head = nn.AdaptiveAvgPool2d(1), nn.Linear(8, 4)

    def forward(self, x):
        return self.head(self.pool(self.blocks(self.stem(x))).flatten(1))


def test_auto_refuses_what_no_canonizer_covers_and_names_it():
    model = _calibrated(_Blocks())
    x = torch.rand(1, 3, 16, 16)
    before = model_state(model)
    with pytest.raises(ValueError, match=r"blocks\.0 \(BasicBlock\), blocks\.1 \(BasicBlock\).*canonizers=None"):
        L.lrp(model, x, 0)
    with pytest.raises(ValueError, match="BasicBlock"):
        L.conservation(model, x, 0)
    assert before.differences(model_state(model)) == []
    # a batch-norm in front of its convolution cannot be merged: named too
    odd = nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(2))
    odd(torch.rand(2, 3, 6, 6))
    odd = odd.eval().requires_grad_(False)
    assert [type(c) for c in L.default_canonizers(odd)] == [L.MergeBatchNorm]
    with pytest.raises(ValueError, match=r"0 \(BatchNorm2d\)"):
        L.lrp(odd, torch.rand(1, 3, 6, 6), 0)
    # asked for explicitly, the uncanonized map comes with a warning
    with pytest.warns(L.UncanonizedWarning, match="BasicBlock"), pytest.warns(L.ConservationWarning):
        L.lrp(model, x, 0, canonizers=None)


def test_conservation_warning_finds_a_hidden_addition_and_spares_correct_maps(fashion, fashion_test):
    class Skip(nn.Module):  # a residual block of no known kind: the + is invisible to every rule
        def __init__(self):
            super().__init__()
            self.conv, self.relu = nn.Conv2d(4, 4, 3, padding=1), nn.ReLU()

        def forward(self, x):
            return self.relu(x + self.conv(x))

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), Skip(), Skip(), nn.AdaptiveAvgPool2d(1),
                        nn.Flatten(), nn.Linear(4, 5)).eval().requires_grad_(False)
    x = torch.rand(2, 3, 8, 8)
    assert L.unexplained(net) == []  # nothing the structural check can see
    with pytest.warns(L.ConservationWarning, match=r"image 0: map sum [\d.]+ x the logit, \+[\d.]+ from outside the rules"):
        hidden = L.lrp(net, x, 1, L.epsilon_plus(bias=False))
    with torch.no_grad():
        assert (hidden.flatten(1).sum(1) / net(x)[:, 1] > 3).all()  # doubled at each of the two additions
    # a correct map may sum to more than 1.05 x the logit (biases pushing against the class): no warning
    xs, ys = fashion_test
    with warnings.catch_warnings():
        warnings.simplefilter("error", L.ConservationWarning)
        maps = L.lrp(fashion, xs[:16], ys[:16], "LRP-0")
    with torch.no_grad():
        logits = fashion(xs[:16]).gather(1, ys[:16, None])[:, 0]
    assert float((maps.flatten(1).sum(1) / logits).max()) > 1.05


@pytest.mark.parametrize("composite", ["EpsilonGammaBox", "Montavon2019"])
def test_zbox_refuses_input_outside_its_bounds(fashion, fashion_test, composite):
    x = fashion_test[0][:2]
    before = model_state(fashion)
    with pytest.raises(ValueError, match="0-255 pixels: divide by 255"):
        L.lrp(fashion, x * 255, 0, composite)
    normalised = fashion.normalize(x)
    with pytest.raises(ValueError, match="normalised: pass \\[0, 1\\] pixels"):
        L.lrp(fashion, normalised, 0, composite)
    with pytest.raises(ValueError, match="z\\^B"):
        L.conservation(fashion, x * 255, 0, composite)
    assert before.differences(model_state(fashion)) == []
    # bounds given for the input's own units are accepted, and so is every composite without z^B
    L.lrp(fashion, x * 255, 0, L.epsilon_gamma_box(low=0, high=255))
    L.lrp(fashion, x * 255, 0, "EpsilonPlusFlat")
