"""LRP cross-checked against zennit 0.5 (Anders et al. 2021), set up correctly.

zennit is applied to the network *behind* the course model's normalisation, on the normalised
input, with z^B's bounds given in normalised units; coursekit runs on the whole model with pixel
bounds. coursekit's normalisation layer passes relevance unchanged, so both maps must agree.
(zennit run on the whole model would multiply the map by 1/std: the last test shows that.)

The EfficientNet canonizer has no zennit counterpart: the reference there is zennit on an
independent, hand-written rewrite of the network (batch-norm folded by hand, residual additions
through zennit's own ``Sum`` layer).

Tolerance: max |difference| <= 1e-5 x max |map| (float64 models; float32 in the last tests: 1e-4).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from zennit import composites as zc
from zennit import core as zcore
from zennit import rules as zr
from zennit.layer import Sum as ZSum
from zennit.types import Activation, AvgPool, Convolution
from zennit.types import Linear as ZLinear

from coursekit import lrp as L
from coursekit.models import CourseModel

TOL = 1e-5

pytestmark = pytest.mark.usefixtures("one_thread")


def zennit_relevance(model: CourseModel, x: torch.Tensor, target: torch.Tensor, composite) -> torch.Tensor:
    """zennit on ``model.net`` with the normalised input; relevance at the top = the logit."""
    xn = model.normalize(x.to(model.normalize.mean.dtype)).detach().requires_grad_(True)
    with composite.context(model.net) as net:
        out = net(xn)
        start = torch.zeros_like(out)
        idx = torch.arange(len(x))
        start[idx, target] = out[idx, target].detach()
        (rel,) = torch.autograd.grad(out, xn, start)
    return rel.detach()


def bounds(model):
    mean, std = model.normalize.mean, model.normalize.std
    return (0 - mean) / std, (1 - mean) / std


def close(a, b, tol=TOL):
    scale = b.abs().max()
    err = (a - b).abs().max() / scale
    assert scale > 0 and torch.isfinite(a).all()
    assert err <= tol, f"max difference {err:.2e} of the map's max"


@pytest.fixture(scope="module")
def fashion64(request):
    import coursekit

    return copy.deepcopy(coursekit.load_model("fashion_cnn")).double()


@pytest.fixture(scope="module")
def vgg11():
    import torchvision
    from torchvision.models import VGG11_Weights

    torch.manual_seed(0)
    net = torchvision.models.vgg11(weights=None)
    # VGG's classifier as it is (Linear, ReLU, Dropout, Linear, ReLU, Dropout, Linear) but 256 wide instead of
    # 4096: its 120M float64 weights were read on every pass and took a fifth of each case's time
    net.classifier = nn.Sequential(nn.Linear(512 * 7 * 7, 256), nn.ReLU(True), nn.Dropout(),
                                   nn.Linear(256, 256), nn.ReLU(True), nn.Dropout(), nn.Linear(256, 1000))
    net = net.eval().requires_grad_(False)
    meta = VGG11_Weights.IMAGENET1K_V1.transforms()
    return CourseModel(net, name="vgg11-random", classes=[str(i) for i in range(1000)], input_size=(3, 64, 64),
                       mean=meta.mean, std=meta.std, layers={}).double().eval()


@pytest.fixture(scope="module")
def fashion_batch():
    import coursekit

    x, y = coursekit.fashion_mnist("test")
    return x[:4].double(), y[:4]


@pytest.fixture(scope="module")
def vgg_batch(vgg11):
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, 64, 64, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        y = vgg11(x).argmax(1)
    return x, y


def _first_layer_name(net):
    return next(n for n, m in net.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear)))


def pairs(model, dense: bool = True):
    """(coursekit composite, zennit composite) for every composite and rule of the course.

    ``dense=False``: the "everywhere" cases put their rule on convolutions only and LRP-epsilon on
    dense layers (the rules on dense layers are checked on fashion_cnn).
    """
    low, high = bounds(model)
    base = [(Activation, zr.Pass()), (AvgPool, zr.Norm())]
    ours_all = (nn.Conv2d, nn.Linear) if dense else nn.Conv2d
    theirs_all = ZLinear if dense else Convolution
    ours_rest = {} if dense else {nn.Linear: L.Epsilon()}
    theirs_rest = [] if dense else [(nn.Linear, zr.Epsilon())]
    convs = [n for n, m in model.net.named_modules() if isinstance(m, nn.Conv2d)][1:]
    half = [n for i, n in enumerate(convs) if (i + 1) / len(convs) <= 0.5]
    eps_rel = zcore.Stabilizer(0.25, norm_scale=True)
    montavon_names = [([_first_layer_name(model.net)], zr.ZBox(low, high))] + [(half, zr.Gamma(0.25))]
    return {
        "LRP-0 (bias)": (L.lrp_zero(), zc.LayerMapComposite(base + [(ZLinear, zr.Epsilon(0.0))])),
        "LRP-0 (no bias)": (L.lrp_zero(bias=False),
                            zc.LayerMapComposite(base + [(ZLinear, zr.Epsilon(0.0, zero_params="bias"))])),
        "LRP-epsilon relative": (L.lrp_epsilon(0.25), zc.LayerMapComposite(base + [(ZLinear, zr.Epsilon(eps_rel))])),
        "LRP-epsilon absolute": (L.lrp_epsilon(0.1, relative=False),
                                 zc.LayerMapComposite(base + [(ZLinear, zr.Epsilon(0.1))])),
        "EpsilonPlus": (L.epsilon_plus(), zc.EpsilonPlus()),
        "EpsilonPlus (no bias)": (L.epsilon_plus(bias=False), zc.EpsilonPlus(zero_params="bias")),
        "EpsilonPlusFlat": (L.epsilon_plus_flat(), zc.EpsilonPlusFlat()),
        "EpsilonAlpha2Beta1": (L.epsilon_alpha2_beta1(), zc.EpsilonAlpha2Beta1()),
        "EpsilonAlpha2Beta1Flat": (L.epsilon_alpha2_beta1_flat(), zc.EpsilonAlpha2Beta1Flat()),
        "EpsilonGammaBox": (L.epsilon_gamma_box(), zc.EpsilonGammaBox(low=low, high=high)),
        "EpsilonGammaBox gamma=1": (L.epsilon_gamma_box(gamma=1.0), zc.EpsilonGammaBox(low=low, high=high, gamma=1.0)),
        "Montavon2019": (L.montavon2019(), zc.NameLayerMapComposite(
            name_map=montavon_names,
            layer_map=base + [(Convolution, zr.Epsilon(eps_rel)), (nn.Linear, zr.Epsilon(0.0))])),
        "AlphaBeta(1,0) everywhere": (L.LRPComposite({ours_all: L.AlphaBeta(1, 0), **ours_rest}),
                                      zc.LayerMapComposite(base + [(theirs_all, zr.AlphaBeta(1, 0))] + theirs_rest)),
        "Gamma everywhere, WSquare first": (
            L.LRPComposite({ours_all: L.Gamma(0.5), **ours_rest}, first=L.WSquare()),
            zc.SpecialFirstLayerMapComposite(base + [(theirs_all, zr.Gamma(0.5))] + theirs_rest,
                                             first_map=[(ZLinear, zr.WSquare(zero_params="bias"))])),
        "Gamma (no bias), Flat first": (
            L.LRPComposite({ours_all: L.Gamma(0.25, bias=False), **ours_rest}, first=L.Flat()),
            zc.SpecialFirstLayerMapComposite(base + [(theirs_all, zr.Gamma(0.25, zero_params="bias"))] + theirs_rest,
                                             first_map=[(ZLinear, zr.Flat())])),
    }


CASES = ["LRP-0 (bias)", "LRP-0 (no bias)", "LRP-epsilon relative", "LRP-epsilon absolute", "EpsilonPlus",
         "EpsilonPlus (no bias)", "EpsilonPlusFlat", "EpsilonAlpha2Beta1", "EpsilonAlpha2Beta1Flat", "EpsilonGammaBox",
         "EpsilonGammaBox gamma=1", "Montavon2019", "AlphaBeta(1,0) everywhere", "Gamma everywhere, WSquare first",
         "Gamma (no bias), Flat first"]


@pytest.mark.parametrize("case", CASES)
def test_fashion_cnn_matches_zennit(case, fashion64, fashion_batch):
    x, y = fashion_batch
    ours, theirs = pairs(fashion64)[case]
    close(L.lrp(fashion64, x, y, ours), zennit_relevance(fashion64, x, y, theirs))


@pytest.mark.parametrize("case", CASES)
def test_random_vgg11_matches_zennit(case, vgg11, vgg_batch):
    x, y = vgg_batch
    ours, theirs = pairs(vgg11, dense=False)[case]
    close(L.lrp(vgg11, x, y, ours), zennit_relevance(vgg11, x, y, theirs))


def test_zennit_on_the_whole_model_divides_by_std(fashion64, fashion_batch):
    """The trap the issue names: zennit on model (normalisation included) = our map / std."""
    x, y = fashion_batch
    low, high = bounds(fashion64)
    xi = x.clone().requires_grad_(True)
    comp = zc.EpsilonPlus()
    with comp.context(fashion64) as model:
        out = model(xi)
        start = torch.zeros_like(out)
        start[torch.arange(len(x)), y] = out[torch.arange(len(x)), y].detach()
        (whole,) = torch.autograd.grad(out, xi, start)
    ours = L.lrp(fashion64, x, y, L.epsilon_plus())
    close(whole, ours / fashion64.normalize.std)


# ----------------------------------------------------------------------------------------------
# EfficientNet: our canonizer against zennit on an independent rewrite


def _fold(conv, bn):
    """conv followed by eval batch-norm, folded by hand (independent of coursekit.lrp.merge_batchnorm)."""
    std = torch.sqrt(bn.running_var + bn.eps)
    new = copy.deepcopy(conv)
    new.weight = nn.Parameter(conv.weight * (bn.weight / std)[:, None, None, None], requires_grad=False)
    new.bias = nn.Parameter(bn.bias - bn.running_mean * bn.weight / std, requires_grad=False)
    return new


class _Skip(nn.Module):
    def __init__(self, branch):
        super().__init__()
        self.branch, self.sum = branch, ZSum()

    def forward(self, x):
        return self.sum(torch.stack([self.branch(x), x], dim=-1))


def _rewrite(net):
    layers = [_fold(net.conv_stem, net.bn1), nn.ReLU6()]
    for stage in net.blocks:
        for b in stage:
            if type(b).__name__ == "DepthwiseSeparableConv":
                seq = nn.Sequential(_fold(b.conv_dw, b.bn1), nn.ReLU6(), _fold(b.conv_pw, b.bn2))
            else:
                seq = nn.Sequential(_fold(b.conv_pw, b.bn1), nn.ReLU6(), _fold(b.conv_dw, b.bn2), nn.ReLU6(),
                                    _fold(b.conv_pwl, b.bn3))
            layers.append(_Skip(seq) if b.has_skip else seq)
    layers += [_fold(net.conv_head, net.bn2), nn.ReLU6(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), net.classifier]
    return nn.Sequential(*layers).eval()


@pytest.fixture(scope="module")
def effnet_case():
    import coursekit

    model = coursekit.load_model("efficientnet_lite0")
    x = coursekit.load_image("coffee", size=128)
    with torch.no_grad():
        y = model(x).argmax(1)
    rewritten = _rewrite(model.net)
    return model, rewritten, x, y


def test_rewrite_is_the_same_function(effnet_case):
    model, rewritten, x, _ = effnet_case
    with torch.no_grad():
        torch.testing.assert_close(rewritten(model.normalize(x)), model(x), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("case", ["EpsilonPlusFlat", "EpsilonGammaBox", "EpsilonAlpha2Beta1"])
def test_efficientnet_canonizer_matches_zennit_on_a_hand_rewrite(case, effnet_case):
    model, rewritten, x, y = effnet_case
    low, high = bounds(model)
    theirs = {"EpsilonPlusFlat": zc.EpsilonPlusFlat(), "EpsilonGammaBox": zc.EpsilonGammaBox(low=low, high=high),
              "EpsilonAlpha2Beta1": zc.EpsilonAlpha2Beta1()}[case]
    ours = L.make_composite(case)
    wrapped = CourseModel(rewritten, name="rewrite", classes=model.classes, input_size=model.input_size,
                          mean=model.mean, std=model.std, layers={})
    expected = zennit_relevance(wrapped, x, y, theirs)
    got = L.lrp(model, x, y, ours, canonizers=[L.EfficientNetCanonizer()])
    close(got, expected, tol=1e-4)


def test_efficientnet_without_canonizer_matches_zennit_without(effnet_case):
    """Without canonizers both libraries double the relevance at every skip connection (~11x the logit)."""
    model, _, x, y = effnet_case
    expected = zennit_relevance(model, x, y, zc.EpsilonPlusFlat())
    with pytest.warns(L.UncanonizedWarning, match="BatchNormAct2d"), pytest.warns(L.ConservationWarning):
        got = L.lrp(model, x, y, L.epsilon_plus_flat(), canonizers=None)  # said so, twice
    close(got, expected, tol=1e-4)
    with torch.no_grad():
        logit = model(x)[0, y[0]]
    assert float(got.sum() / logit) > 5


# ----------------------------------------------------------------------------------------------
# torchvision ResNet, VGG-BN, MobileNetV2 (random weights): our canonizers against zennit's


def _random_batchnorm(net, seed=0):
    """Batch-norm statistics and affine parameters that are not the identity (as trained ones are not)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.running_mean.copy_(torch.randn(c, generator=gen) * 0.2)
                m.running_var.uniform_(0.5, 2.0, generator=gen)
                m.weight.uniform_(0.5, 1.5, generator=gen)
                m.bias.copy_(torch.randn(c, generator=gen) * 0.2)
                m.eps = 0.0  # zennit's merged batch-norm keeps dividing by sqrt(1 + eps): compare at eps = 0
    return net


def _torchvision(name):
    import torchvision

    from coursekit.models import imagenet_classes

    torch.manual_seed(0)
    net = getattr(torchvision.models, name)(weights=None)
    if name.startswith("vgg"):  # VGG's 120M-weight dense layers are not what the canonizer is about
        net.classifier = nn.Sequential(nn.Linear(512 * 7 * 7, 64), nn.ReLU(), nn.Dropout(), nn.Linear(64, 1000))
    net = _random_batchnorm(net.eval().requires_grad_(False))
    meta = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.transforms()
    return CourseModel(net, name=name, classes=imagenet_classes(), input_size=(3, 64, 64), mean=meta.mean,
                       std=meta.std, layers={}).double().eval()


@pytest.fixture(scope="module")
def tv_batch():
    return torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(3), dtype=torch.float64)


def _mobilenet_rewrite(net):
    """MobileNetV2 rewritten by hand: batch-norms folded, skips through zennit's Sum, pooling a layer."""
    from torchvision.models.mobilenetv2 import InvertedResidual

    def fold_all(seq):
        out, layers = [], list(seq)
        for i, layer in enumerate(layers):
            if isinstance(layer, nn.BatchNorm2d):
                continue
            if isinstance(layer, nn.Sequential):
                out += fold_all(layer)
            elif i + 1 < len(layers) and isinstance(layers[i + 1], nn.BatchNorm2d):
                out.append(_fold(layer, layers[i + 1]))
            else:
                out.append(nn.ReLU6() if isinstance(layer, nn.ReLU6) else layer)
        return out

    blocks = []
    for block in net.features:
        if isinstance(block, InvertedResidual):
            seq = nn.Sequential(*fold_all(block.conv))
            blocks.append(_Skip(seq) if block.use_res_connect else seq)
        else:
            blocks.append(nn.Sequential(*fold_all(block)))
    return nn.Sequential(*blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten(), net.classifier).eval()


def _zennit_composite(case, model, canonizers):
    low, high = bounds(model)
    comp = {"EpsilonGammaBox": lambda: zc.EpsilonGammaBox(low=low, high=high), "EpsilonPlusFlat": zc.EpsilonPlusFlat,
            "EpsilonAlpha2Beta1": zc.EpsilonAlpha2Beta1}[case]()
    comp.canonizers = canonizers
    return comp


TV_CASES = [("resnet18", "EpsilonGammaBox"), ("resnet18", "EpsilonPlusFlat"), ("resnet18", "EpsilonAlpha2Beta1"),
            ("resnet50", "EpsilonGammaBox"), ("vgg16_bn", "EpsilonGammaBox"), ("vgg11_bn", "EpsilonPlusFlat")]


@pytest.mark.parametrize("name, case", TV_CASES)
def test_torchvision_canonizers_match_zennit(name, case, tv_batch):
    """'auto' picks ResNetCanonizer / VGGCanonizer; zennit runs its ResNetCanonizer / VGGCanonizer."""
    from zennit import torchvision as ztv

    model = _torchvision(name)
    with torch.no_grad():
        target = model(tv_batch).argmax(1)
    theirs_canonizer = ztv.ResNetCanonizer() if name.startswith("resnet") else ztv.VGGCanonizer()
    expected = zennit_relevance(model, tv_batch, target, _zennit_composite(case, model, [theirs_canonizer]))
    got = L.lrp(model, tv_batch, target, case)
    close(got, expected)
    if case == "EpsilonPlusFlat":  # and the canonizers matter: without them zennit's map is another one
        uncanonized = zennit_relevance(model, tv_batch, target, _zennit_composite(case, model, []))
        assert (uncanonized - expected).abs().max() > 0.1 * expected.abs().max()


@pytest.mark.parametrize("case", ["EpsilonGammaBox", "EpsilonPlusFlat"])
def test_mobilenet_v2_canonizer_matches_zennit_on_a_hand_rewrite(case, tv_batch):
    model = _torchvision("mobilenet_v2")
    rewritten = _mobilenet_rewrite(model.net)
    with torch.no_grad():
        target = model(tv_batch).argmax(1)
        torch.testing.assert_close(rewritten(model.normalize(tv_batch)), model(tv_batch), atol=1e-10, rtol=1e-10)
    wrapped = CourseModel(rewritten, name="rewrite", classes=model.classes, input_size=model.input_size,
                          mean=model.mean, std=model.std, layers={}).double()
    expected = zennit_relevance(wrapped, tv_batch, target, _zennit_composite(case, model, []))
    got = L.lrp(model, tv_batch, target, case)
    close(got, expected)
