"""Unit tests of coursekit.cam: the CAM engine, its variants, layer choice, bad input, model untouched."""

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from coursekit import cam as C
from coursekit import saliency as S
from coursekit.checks import ReferenceBlocked, blocked
from coursekit.hooks import UnknownLayerError
from coursekit.models import CourseModel
from coursekit.nets import FASHION_CLASSES, FashionCNN


@pytest.fixture(scope="module")
def xs(fashion_test):
    return fashion_test[0][:3].clone()


def snapshot(model):
    return (
        [m.training for m in model.modules()],
        [p.requires_grad for p in model.parameters()],
        [p.grad is None for p in model.parameters()],
        [getattr(m, "inplace", None) for m in model.modules()],
        [(len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks),
          len(getattr(m, "_backward_pre_hooks", {}))) for m in model.modules()],
    )


def slow_layer_maps(model, x, target, layer_name):
    """Reference: activations and gradients from a full backward to an input that requires grad."""
    store = {}
    module = dict(model.named_modules())[layer_name]
    h = module.register_forward_hook(lambda m, i, o: store.__setitem__("a", o))
    try:
        xi = x.clone().requires_grad_(True)
        out = model(xi)
        score = out[torch.arange(len(x)), torch.as_tensor(target).expand(len(x))].sum()
        g = torch.autograd.grad(score, store["a"])[0]
    finally:
        h.remove()
    return store["a"].detach(), g.detach()


CAMS = [C.CAMS[name] for name in C.CAMS]  # every registered CAM (coursekit.registry)


@pytest.mark.parametrize("cls", CAMS)
def test_cam_shapes_nonnegative_model_untouched(fashion, xs, cls):
    before = snapshot(fashion)
    x = xs.clone()
    cam = cls(fashion)
    assert cam.layer_name == "net.features.8"
    maps = cam(x, 2)
    assert maps.shape == (3, 28, 28) and maps.grad_fn is None and not maps.requires_grad
    assert (maps >= 0).all() and torch.isfinite(maps).all()
    norm = cam(x, 2, normalize=True)
    assert norm.min() >= 0 and norm.max() <= 1
    for n in range(3):
        if maps[n].max() > 0:
            assert norm[n].max().item() == pytest.approx(1.0) and norm[n].min().item() == pytest.approx(0.0, abs=1e-6)
    assert torch.equal(x, xs) and not x.requires_grad and x.grad is None
    assert snapshot(fashion) == before


def test_gradcam_matches_slow_reference(fashion, xs):
    a, g = slow_layer_maps(fashion, xs, 7, "net.features.8")  # (3, 64, 14, 14)
    expected = F.relu((g.mean(dim=(2, 3), keepdim=True) * a).sum(1))
    expected = F.interpolate(expected[:, None], size=(28, 28), mode="bilinear", align_corners=False)[:, 0]
    torch.testing.assert_close(C.GradCAM(fashion)(xs, 7), expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(C.gradcam(fashion, xs, 7), expected, atol=1e-6, rtol=1e-5)


def test_layer_maps_and_hirescam_match_slow_reference(fashion, xs):
    a, g = slow_layer_maps(fashion, xs, 4, "net.features.6")
    cam = C.HiResCAM(fashion, "features.6")  # net. prefix optional
    a2, g2 = cam.layer_maps(xs, 4)
    torch.testing.assert_close(a2, a, atol=0, rtol=0)
    torch.testing.assert_close(g2, g, atol=1e-7, rtol=1e-5)
    expected = F.interpolate(F.relu((g * a).sum(1))[:, None], size=(28, 28), mode="bilinear", align_corners=False)[:, 0]
    torch.testing.assert_close(cam(xs, 4), expected, atol=1e-6, rtol=1e-5)


def test_gradcam_plusplus_weights_by_hand():
    a = torch.tensor([[[[1.0, 2.0], [0.0, 1.0]]]])  # (1, 1, 2, 2), sum 4
    g = torch.tensor([[[[0.5, -1.0], [0.0, 2.0]]]])
    w = C.GradCAMPlusPlus.__new__(C.GradCAMPlusPlus).weights(a, g)
    # alpha = g^2 / (2 g^2 + 4 g^3); only positive gradients count
    alpha = lambda v: v**2 / (2 * v**2 + 4 * v**3)
    expected = alpha(0.5) * 0.5 + alpha(2.0) * 2.0
    assert w.shape == (1, 1, 1, 1) and w.item() == pytest.approx(expected, rel=1e-5)


def test_all_negative_cam_gives_zeros_not_nan():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 3, 3, padding=1)
            self.relu = nn.ReLU()
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(3, 2)
            with torch.no_grad():
                self.fc.weight.fill_(-1.0)  # every channel counts against every class

        def forward(self, x):
            return self.fc(self.pool(self.relu(self.conv(x))).flatten(1))

    torch.manual_seed(0)
    net, x = Net(), torch.rand(2, 1, 8, 8)
    for cls in [c for c in CAMS if c.uses_gradients]:  # Score-CAM: softmax weights, positive by construction
        for normalize in (False, True):
            maps = cls(net, "relu")(x, 0, normalize=normalize)
            assert torch.isfinite(maps).all() and maps.abs().max().item() == 0.0
    assert all(p.grad is None for p in net.parameters()) and all(p.requires_grad for p in net.parameters())


def test_guided_gradcam_on_efficientnet_handles_relu6(effnet):
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    got = C.guided_gradcam(effnet, x, 1)
    expected = S.guided_backprop(effnet, x, 1) * C.gradcam(effnet, x, 1)[:, None]
    torch.testing.assert_close(got, expected, atol=1e-7, rtol=1e-4)
    with pytest.raises(ValueError, match="no nn.ReLU"):
        C.guided_gradcam(nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2 * 4 * 4, 3)),
                         torch.rand(1, 1, 6, 6), 0, layer="0")


def test_unfrozen_model_gets_no_weight_gradients(xs):
    torch.manual_seed(0)
    net = FashionCNN().eval()  # trainable parameters
    before = snapshot(net)
    C.GradCAM(net, "features.8")(xs, 1)
    C.guided_gradcam(net, xs, 1, layer="features.8")
    assert snapshot(net) == before
    assert all(p.grad is None for p in net.parameters())


def test_bad_input_and_model_untouched_on_error(fashion, xs):
    before = snapshot(fashion)
    with pytest.raises(UnknownLayerError, match="features.88"):
        C.GradCAM(fashion, "features.88")
    with pytest.raises(UnknownLayerError):
        C.gradcam(fashion, xs, 1, layer="conv5")
    with pytest.raises(ValueError, match="out of range"):
        C.GradCAM(fashion)(xs, 10)
    with pytest.raises(ValueError, match="4-d"):
        C.GradCAM(fashion)(xs[0], 1)
    with pytest.raises(TypeError, match="Tensor"):
        C.GradCAM(fashion)(xs.numpy(), 1)
    with pytest.raises(ValueError, match="not a \\(N, K, h, w\\) feature map"):
        C.GradCAM(fashion, "classifier.2")(xs, 1)
    with pytest.raises(TypeError, match="nn.Module"):
        C.GradCAM("fashion_cnn")
    assert snapshot(fashion) == before


def test_frozen_model_input_without_grad_backward_stops_at_layer(fashion, xs):
    # the backward pass must not reach the first conv: count calls of a backward hook there
    calls = []
    h = fashion.net.features[0].register_full_backward_hook(lambda *a: calls.append(1))
    try:
        C.GradCAM(fashion)(xs, 1)
    finally:
        h.remove()
    assert calls == []


def test_targets_per_image_and_callable(fashion, xs):
    cam = C.GradCAM(fashion)
    per = cam(xs, [1, 2, 3])
    for i, t in enumerate([1, 2, 3]):
        torch.testing.assert_close(per[i : i + 1], cam(xs[i : i + 1], t), atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(cam(xs, lambda out: out[:, 2]), cam(xs, 2), atol=0, rtol=0)


def test_guided_gradcam_is_product(fashion, xs):
    got = C.guided_gradcam(fashion, xs, 5)
    expected = S.guided_backprop(fashion, xs, 5) * C.gradcam(fashion, xs, 5)[:, None]
    assert got.shape == xs.shape
    torch.testing.assert_close(got, expected, atol=1e-7, rtol=1e-5)  # one shared forward vs two calls
    assert got.abs().max() > 0


def test_custom_subclass_overrides_weights_only(fashion, xs):
    class MaxGradCAM(C.CAM):
        def weights(self, activations, gradients):
            return gradients.amax(dim=(2, 3), keepdim=True)

    a, g = slow_layer_maps(fashion, xs, 3, "net.features.8")
    expected = F.interpolate(F.relu((g.amax(dim=(2, 3), keepdim=True) * a).sum(1))[:, None], size=(28, 28),
                             mode="bilinear", align_corners=False)[:, 0]
    torch.testing.assert_close(MaxGradCAM(fashion)(xs, 3), expected, atol=1e-6, rtol=1e-5)
    with pytest.raises(NotImplementedError, match="override"):
        C.CAM(fashion)(xs, 3)


# -- choosing the layer ------------------------------------------------------------------------


def test_default_layer_for_course_and_plain_models(fashion, effnet):
    assert C.default_layer(fashion) == "net.features.8"
    assert C.default_layer(effnet) == "net.bn2"
    plain = FashionCNN()
    assert C.default_layer(plain, input_size=(1, 28, 28)) == "features.8"
    # without metadata the fallback must find the same layer on the course model's network
    bare = CourseModel(FashionCNN(), name="f", classes=FASHION_CLASSES, input_size=(1, 28, 28), mean=(0.5,),
                       std=(0.5,), layers={})
    assert C.default_layer(bare) == "net.features.8"
    assert C.default_layer(effnet.net) == "bn2"  # timm EfficientNet without course metadata


@pytest.mark.parametrize("name,expected", [("vgg16", "features.29"), ("alexnet", "features.11")])
def test_default_layer_torchvision(name, expected):
    with torch.device("meta"):  # architecture only: no weight init, no download; shapes still propagate
        net = getattr(torchvision.models, name)(weights=None).eval()
    assert C.default_layer(net) == expected
    with torch.device("meta"):
        wrapped = CourseModel(net, name=name, classes=[str(i) for i in range(1000)], input_size=(3, 224, 224),
                              mean=(0.5,) * 3, std=(0.5,) * 3, layers={})
    assert C.default_layer(wrapped) == "net." + expected


def test_candidate_layers(fashion):
    layers = C.candidate_layers(fashion)
    names = [n for n, _, _ in layers]
    assert names[:2] == ["net.features", "net.features.0"]  # the input normalisation is not a candidate
    assert "net.features.8" in names and "net.features.9" in names  # 7x7 after the last pool still spatial
    assert all(len(shape) == 4 and min(shape[2:]) > 1 for _, _, shape in layers)
    assert not any(n.startswith("net.classifier") for n in names)
    assert ("net.features.8", "ReLU", (1, 64, 14, 14)) in layers


def test_gradcam_reference_can_be_blocked(fashion, xs):
    key = C.gradcam.__reference_key__
    with blocked([key]):
        with pytest.raises(ReferenceBlocked):
            C.gradcam(fashion, xs, 1)
        C.guided_gradcam(fashion, xs, 1)  # uses the engine, not the blocked wrapper
