"""Unit tests of coursekit.saliency: shapes, bad input, model left untouched, slow reference loops."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from coursekit import saliency as S
from coursekit.checks import ReferenceBlocked, blocked


@pytest.fixture(scope="module")
def xs(fashion_test):
    return fashion_test[0][:3].clone()  # (3, 1, 28, 28)


class TinyNet(nn.Module):
    """A small double-precision conv net with ReLU and ReLU6 modules, for slow reference loops."""

    def __init__(self, act=nn.ReLU, inplace=False, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.conv = nn.Conv2d(2, 4, 3, padding=1).double()
        self.act1 = act(inplace=inplace)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1).double()
        self.act2 = nn.ReLU6(inplace=inplace)
        self.fc = nn.Linear(4 * 6 * 6, 3).double()
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 1.5)

    def forward(self, x):
        z1 = self.act1(self.conv(x))
        z2 = self.act2(self.conv2(z1))
        return self.fc(z2.flatten(1))


def tiny_input(n=2, seed=1):
    return torch.rand(n, 2, 6, 6, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def snapshot(model):
    return {
        "training": [m.training for m in model.modules()],
        "requires_grad": [p.requires_grad for p in model.parameters()],
        "grads": [p.grad is None for p in model.parameters()],
        "inplace": [getattr(m, "inplace", None) for m in model.modules()],
        "hooks": [(len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks),
                   len(getattr(m, "_backward_pre_hooks", {}))) for m in model.modules()],
        "params": [p.detach().clone() for p in model.state_dict().values()],
    }


def same_state(a, b):
    return all(a[k] == b[k] for k in a if k != "params") and all(torch.equal(p, q) for p, q in zip(a["params"], b["params"]))


GRADIENT_METHODS = [
    (S.input_gradient, 4),
    (S.gradient_x_input, 4),
    (S.guided_backprop, 4),
    (S.deconvnet, 4),
    (lambda m, x, t: S.smoothgrad(m, x, t, n_samples=3, seed=0), 4),
    (lambda m, x, t: S.integrated_gradients(m, x, t, steps=4), 4),
    (S.vanilla_saliency, 3),
    (lambda m, x, t: S.occlusion(m, x, t, patch=14, stride=7, progress=False), 3),
]
IDS = ["input_gradient", "gradient_x_input", "guided_backprop", "deconvnet", "smoothgrad",
       "integrated_gradients", "vanilla_saliency", "occlusion"]


@pytest.mark.parametrize("method,dims", GRADIENT_METHODS, ids=IDS)
def test_shapes_detached_and_model_untouched(fashion, xs, method, dims):
    before = snapshot(fashion)
    x = xs.clone()
    out = method(fashion, x, 3)
    expected = tuple(xs.shape) if dims == 4 else (xs.shape[0], *xs.shape[2:])
    assert tuple(out.shape) == expected
    assert not out.requires_grad and out.grad_fn is None
    assert torch.isfinite(out).all()
    assert torch.equal(x, xs) and x.grad is None and not x.requires_grad  # input untouched
    assert same_state(before, snapshot(fashion))


@pytest.mark.parametrize("method,dims", GRADIENT_METHODS, ids=IDS)
def test_bad_input_raises_and_model_untouched(fashion, xs, method, dims):
    before = snapshot(fashion)
    with pytest.raises(ValueError, match="out of range"):
        method(fashion, xs, 10)  # fashion_cnn has classes 0..9
    with pytest.raises(ValueError, match="4-d"):
        method(fashion, xs[0], 3)
    with pytest.raises(TypeError, match="float"):
        method(fashion, (xs * 255).to(torch.uint8), 3)
    with pytest.raises(TypeError, match="Tensor"):
        method(fashion, xs.numpy(), 3)
    with pytest.raises(ValueError, match="targets for a batch"):
        method(fashion, xs, [1, 2])
    assert same_state(before, snapshot(fashion))


@pytest.mark.parametrize("method,dims", GRADIENT_METHODS[:6], ids=IDS[:6])
def test_unfrozen_model_gets_no_weight_gradients(method, dims):
    torch.manual_seed(0)
    net = TinyNet(inplace=True).train(False)  # trainable parameters, in-place ReLUs
    before = snapshot(net)
    method(net, tiny_input(), 1)
    assert all(p.grad is None for p in net.parameters())
    assert all(p.requires_grad for p in net.parameters())
    assert same_state(before, snapshot(net))


def test_targets_int_per_image_and_callable_agree(fashion, xs):
    per_image = S.input_gradient(fashion, xs, [3, 5, 7])
    for i, t in enumerate([3, 5, 7]):
        alone = S.input_gradient(fashion, xs[i : i + 1], t)
        torch.testing.assert_close(per_image[i : i + 1], alone, atol=1e-6, rtol=1e-4)
    by_fn = S.input_gradient(fashion, xs, lambda out: out[:, 3])
    torch.testing.assert_close(by_fn, S.input_gradient(fashion, xs, 3), atol=0, rtol=0)
    torch.testing.assert_close(S.input_gradient(fashion, xs, torch.tensor([3, 5, 7])), per_image, atol=0, rtol=0)


def test_input_gradient_matches_finite_differences():
    net, x = TinyNet(), tiny_input(1)
    g = S.input_gradient(net, x, 2)
    eps = 1e-6
    fd = torch.zeros_like(x)
    with torch.no_grad():
        for idx in range(x.numel()):
            d = torch.zeros_like(x).view(-1)
            d[idx] = eps
            d = d.view_as(x)
            fd.view(-1)[idx] = (net(x + d)[0, 2] - net(x - d)[0, 2]) / (2 * eps)
    torch.testing.assert_close(g, fd, atol=1e-6, rtol=1e-5)


def test_vanilla_saliency_and_gradient_x_input_definitions(fashion, xs):
    g = S.input_gradient(fashion, xs, 1)
    torch.testing.assert_close(S.vanilla_saliency(fashion, xs, 1), g.abs().amax(dim=1), atol=0, rtol=0)
    torch.testing.assert_close(S.gradient_x_input(fashion, xs, 1), g * xs, atol=0, rtol=0)


def test_to_map_reductions():
    a = torch.tensor([[[[1.0]], [[-3.0]], [[2.0]]]])  # (1, 3, 1, 1)
    expected = {"max_abs": 3.0, "abs_sum": 6.0, "sum": 0.0, "abs_of_sum": 0.0, "max": 2.0, "mean": 0.0,
                "l2": 14 ** 0.5}
    for reduce, value in expected.items():
        out = S.to_map(a, reduce)
        assert out.shape == (1, 1, 1)
        assert out.item() == pytest.approx(value)
    with pytest.raises(ValueError, match="unknown reduce"):
        S.to_map(a, "median")
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        S.to_map(a[0], "sum")


# -- SmoothGrad ----------------------------------------------------------------------------------


def test_smoothgrad_matches_slow_loop_and_noise_argument():
    net, x = TinyNet(), tiny_input(2)
    noise = torch.randn(2, 5, 2, 6, 6, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 0.1
    expected = torch.stack([
        sum(S.input_gradient(net, (x[n] + noise[n, k])[None], [1, 2][n])[0] for k in range(5)) / 5 for n in range(2)
    ])
    for bs in (1, 3, 16):  # batching must not change the result
        got = S.smoothgrad(net, x, [1, 2], noise=noise, batch_size=bs)
        torch.testing.assert_close(got, expected, atol=1e-10, rtol=1e-8)
    mag = S.smoothgrad(net, x, [1, 2], noise=noise, magnitude=True)
    expected_mag = torch.stack([
        sum(S.input_gradient(net, (x[n] + noise[n, k])[None], [1, 2][n])[0].abs() for k in range(5)) / 5 for n in range(2)
    ])
    torch.testing.assert_close(mag, expected_mag, atol=1e-10, rtol=1e-8)


def test_smoothgrad_zero_noise_is_gradient_and_seed_reproducible(fashion, xs):
    torch.testing.assert_close(S.smoothgrad(fashion, xs, 2, n_samples=2, noise_level=0.0), S.input_gradient(fashion, xs, 2),
                               atol=1e-6, rtol=1e-4)
    a = S.smoothgrad(fashion, xs, 2, n_samples=4, seed=7)
    b = S.smoothgrad(fashion, xs, 2, n_samples=4, seed=7)
    c = S.smoothgrad(fashion, xs, 2, n_samples=4, seed=8)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_smoothgrad_noise_scales_with_image_range(monkeypatch):
    # sigma = noise_level * (max - min) per image: record the perturbations the model sees
    seen = []

    class Probe(nn.Module):
        def forward(self, x):
            seen.append(x.detach().clone())
            return x.flatten(1)[:, :3] * 1.0

    x = torch.zeros(2, 1, 40, 40)
    x[0, 0, 0, 0], x[1, 0, 0, 0] = 1.0, 0.25  # ranges 1.0 and 0.25
    S.smoothgrad(Probe(), x, 0, n_samples=50, noise_level=0.2, batch_size=100, seed=0)
    batch = torch.cat(seen)  # (100, 1, 40, 40); samples 0..49 belong to image 0
    std0 = (batch[:50] - x[0]).std().item()
    std1 = (batch[50:] - x[1]).std().item()
    assert std0 == pytest.approx(0.2, rel=0.05) and std1 == pytest.approx(0.05, rel=0.05)


def test_smoothgrad_bad_arguments(fashion, xs):
    with pytest.raises(ValueError, match="n_samples"):
        S.smoothgrad(fashion, xs, 1, n_samples=0)
    with pytest.raises(ValueError, match="noise_level"):
        S.smoothgrad(fashion, xs, 1, noise_level=-0.1)
    with pytest.raises(ValueError, match="noise must have shape"):
        S.smoothgrad(fashion, xs, 1, noise=torch.zeros(3, 2, 1, 28))


# -- Integrated gradients --------------------------------------------------------------------


def test_integrated_gradients_exact_for_linear_model():
    lin = nn.Sequential(nn.Flatten(), nn.Linear(12, 4)).double()
    x = tiny_input(2)[:, :, :2, :3]  # (2, 2, 2, 3): 12 features
    base = torch.full_like(x, 0.3)
    w = lin[1].weight[2].detach().view(2, 2, 3)
    for method in ("gausslegendre", "riemann_trapezoid", "riemann_left"):
        ig = S.integrated_gradients(lin, x, 2, baseline=base, steps=3, method=method)
        torch.testing.assert_close(ig, (x - base) * w, atol=1e-12, rtol=1e-10)


def test_integrated_gradients_completeness(fashion, xs):
    ig = S.integrated_gradients(fashion, xs, [0, 1, 2], steps=64, batch_size=50)
    with torch.no_grad():
        out = fashion(xs)
        out0 = fashion(torch.zeros_like(xs))
    diff = out[[0, 1, 2], [0, 1, 2]] - out0[[0, 1, 2], [0, 1, 2]]
    # completeness holds up to the quadrature error: within 2% of |score(x) - score(0)| + 0.05
    assert torch.allclose(ig.sum(dim=(1, 2, 3)), diff, rtol=0.02, atol=0.05), (ig.sum(dim=(1, 2, 3)), diff)


def test_integrated_gradients_bad_arguments(fashion, xs):
    with pytest.raises(ValueError, match="unknown method"):
        S.integrated_gradients(fashion, xs, 1, method="simpson")
    with pytest.raises(ValueError, match="broadcast"):
        S.integrated_gradients(fashion, xs, 1, baseline=torch.zeros(5, 5))
    with pytest.raises(ValueError, match="steps"):
        S.integrated_gradients(fashion, xs, 1, steps=0)


# -- Guided backprop and deconvnet -------------------------------------------------------------


def _manual_modified_backward(net, x, target, rule):
    """Slow reference: backpropagate by hand through TinyNet's layers with the ReLU rules."""
    x = x.detach().clone().requires_grad_(True)
    z1 = net.conv(x)
    a1 = F.relu(z1) if isinstance(net.act1, nn.ReLU) else F.relu6(z1)
    z2 = net.conv2(a1)
    a2 = F.relu6(z2)
    out = net.fc(a2.flatten(1))
    upper1 = float("inf") if isinstance(net.act1, nn.ReLU) else 6.0
    g_a2 = torch.autograd.grad(out[:, target].sum(), a2, retain_graph=True)[0]
    if rule == "guided":
        g_z2 = g_a2.clamp(min=0) * ((z2 > 0) & (z2 < 6))
    else:
        g_z2 = g_a2.clamp(min=0)
    g_a1 = torch.autograd.grad(z2, a1, g_z2, retain_graph=True)[0]
    if rule == "guided":
        g_z1 = g_a1.clamp(min=0) * ((z1 > 0) & (z1 < upper1))
    else:
        g_z1 = g_a1.clamp(min=0)
    return torch.autograd.grad(z1, x, g_z1)[0]


@pytest.mark.parametrize("act", [nn.ReLU, nn.ReLU6])
@pytest.mark.parametrize("inplace", [False, True])
def test_guided_backprop_and_deconvnet_match_hand_rules(act, inplace):
    net, x = TinyNet(act=act, inplace=inplace), tiny_input(2)
    before = snapshot(net)
    for fn, rule in ((S.guided_backprop, "guided"), (S.deconvnet, "deconvnet")):
        got = fn(net, x, 1)
        torch.testing.assert_close(got, _manual_modified_backward(net, x, 1, rule), atol=1e-10, rtol=1e-8)
    assert same_state(before, snapshot(net))  # inplace flags back to their value
    # and they really differ from the plain gradient on this net
    assert not torch.allclose(S.guided_backprop(net, x, 1), S.input_gradient(net, x, 1))


def test_guided_backprop_rejects_functional_relus():
    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 3)
            self.fc = nn.Linear(2 * 4 * 4, 3)

        def forward(self, x):
            return self.fc(F.relu(self.conv(x)).flatten(1))

    net = Functional()
    with pytest.raises(ValueError, match="no nn.ReLU or nn.ReLU6 modules"):
        S.guided_backprop(net, torch.rand(1, 1, 6, 6), 0)
    with pytest.raises(ValueError, match="F.relu"):
        S.deconvnet(net, torch.rand(1, 1, 6, 6), 0)


def test_guided_backprop_hooks_removed_when_call_raises(fashion, xs):
    before = snapshot(fashion)
    with pytest.raises(ValueError, match="out of range"):
        S.guided_backprop(fashion, xs, 99)  # raises after the hooks are registered
    assert same_state(before, snapshot(fashion))
    # and a following call is not affected by leftovers
    torch.testing.assert_close(S.guided_backprop(fashion, xs, 1), S.guided_backprop(copy.deepcopy(fashion), xs, 1))


# -- Occlusion -------------------------------------------------------------------------------


def _slow_occlusion(model, x, target, patch, stride, baseline, score):
    n, _, h, w = x.shape
    total = torch.zeros(n, h, w, dtype=x.dtype)
    count = torch.zeros(n, h, w, dtype=x.dtype)

    def starts(size):  # slide until a window reaches the border; the last one may stick out (cropped)
        s = 0
        while True:
            yield s
            if s + patch >= size:
                return
            s += stride

    f = (lambda o: o.softmax(1)) if score == "prob" else (lambda o: o)
    with torch.no_grad():
        plain = f(model(x))[:, target]
        for i in starts(h):
            for j in starts(w):
                xo = x.clone()
                xo[:, :, i : i + patch, j : j + patch] = baseline
                drop = plain - f(model(xo))[:, target]
                total[:, i : i + patch, j : j + patch] += drop[:, None, None]
                count[:, i : i + patch, j : j + patch] += 1
    return total / count


@pytest.mark.parametrize("patch,stride,score", [(7, 7, "prob"), (8, 5, "logit"), (8, 6, "prob"), (10, 7, "logit")])
def test_occlusion_matches_slow_loop(fashion, xs, patch, stride, score):
    got = S.occlusion(fashion, xs, 4, patch=patch, stride=stride, baseline=0.5, batch_size=7, progress=False, score=score)
    expected = _slow_occlusion(fashion, xs, 4, patch, stride, 0.5, score)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_occlusion_tensor_baseline_and_bad_arguments(fashion, xs):
    a = S.occlusion(fashion, xs, 1, patch=14, stride=14, baseline=0.2, progress=False)
    b = S.occlusion(fashion, xs, 1, patch=14, stride=14, baseline=torch.full((1, 28, 28), 0.2), progress=False)
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    with pytest.raises(ValueError, match="larger than the image"):
        S.occlusion(fashion, xs, 1, patch=29, progress=False)
    with pytest.raises(ValueError, match="score"):
        S.occlusion(fashion, xs, 1, score="softmax", progress=False)
    with pytest.raises(ValueError, match="stride"):
        S.occlusion(fashion, xs, 1, stride=0, progress=False)


def test_occlusion_no_drop_when_baseline_equals_image(fashion, xs):
    same = xs[:1].expand(1, 1, 28, 28)
    out = S.occlusion(fashion, same, 2, patch=7, stride=7, baseline=same.clone(), progress=False)
    assert out.abs().max().item() < 1e-6  # zero up to batch-size-dependent rounding


# -- exercise references ---------------------------------------------------------------------


@pytest.mark.parametrize("fn", [S.vanilla_saliency, S.smoothgrad, S.occlusion, S.guided_backprop])
def test_exercise_references_can_be_blocked(fashion, xs, fn):
    key = fn.__reference_key__
    with blocked([key]):
        with pytest.raises(ReferenceBlocked):
            fn(fashion, xs, 1)


# ----------------------------------------------------------------------------------------------
# a hidden unit as the target (Unit: a channel of a layer, or one neuron of it)


def _manual_unit_backward(net, x, channel, position, rule):
    """Slow reference: the score is TinyNet's act2 output at ``channel`` (mean, or one position);
    backpropagate by hand with the ReLU rules (act2's own rule included: the unit is read after it)."""
    x = x.detach().clone().requires_grad_(True)
    z1 = net.conv(x)
    a1 = F.relu(z1) if isinstance(net.act1, nn.ReLU) else F.relu6(z1)
    z2 = net.conv2(a1)
    upper1 = float("inf") if isinstance(net.act1, nn.ReLU) else 6.0
    g_a2 = torch.zeros_like(z2)
    if position is None:
        g_a2[:, channel] = 1.0 / (z2.shape[2] * z2.shape[3])
    else:
        g_a2[:, channel, position[0], position[1]] = 1.0
    on2, on1 = (z2 > 0) & (z2 < 6), (z1 > 0) & (z1 < upper1)
    if rule == "plain":
        g_z2 = g_a2 * on2
    else:
        g_z2 = g_a2.clamp(min=0) * (on2 if rule == "guided" else 1)
    g_a1 = torch.autograd.grad(z2, a1, g_z2, retain_graph=True)[0]
    if rule == "plain":
        g_z1 = g_a1 * on1
    else:
        g_z1 = g_a1.clamp(min=0) * (on1 if rule == "guided" else 1)
    return torch.autograd.grad(z1, x, g_z1)[0]


@pytest.mark.parametrize("position", [None, (2, 3)])
def test_unit_target_matches_hand_backward(position):
    net, x = TinyNet(act=nn.ReLU6), tiny_input(2)
    before = snapshot(net)
    unit = S.Unit("act2", 1, position)
    for fn, rule in ((S.input_gradient, "plain"), (S.guided_backprop, "guided"), (S.deconvnet, "deconvnet")):
        torch.testing.assert_close(fn(net, x, unit), _manual_unit_backward(net, x, 1, position, rule),
                                   atol=1e-10, rtol=1e-8)
    assert same_state(before, snapshot(net))


def test_unit_target_stops_the_forward_pass_at_its_layer():
    net, x = TinyNet(), tiny_input(2)

    def boom(*args):
        raise AssertionError("the classifier ran")

    net.fc.forward = boom  # an instance attribute: the layers after the unit must not run
    assert S.guided_backprop(net, x, S.Unit("conv2", 0)).shape == x.shape
    del net.fc.forward


def test_unit_target_in_smoothgrad_and_integrated_gradients(fashion, xs):
    unit = S.Unit("features.6", 3)
    grad = S.input_gradient(fashion, xs, unit)
    assert grad.abs().sum() > 0
    torch.testing.assert_close(S.smoothgrad(fashion, xs, unit, noise_level=0.0, n_samples=2), grad)
    ig = S.integrated_gradients(fashion, xs, S.Unit("features.6", 3, (5, 5)), steps=64)
    with torch.no_grad():  # completeness for a unit: sum = unit(x) - unit(black)
        sub = nn.Sequential(fashion.normalize, *list(fashion.net.features)[:7])
        gap = sub(xs)[:, 3, 5, 5] - sub(torch.zeros_like(xs))[:, 3, 5, 5]
    torch.testing.assert_close(ig.sum(dim=(1, 2, 3)), gap, atol=2e-2, rtol=2e-2)


def test_unit_target_bad_input(fashion, xs):
    before = snapshot(fashion)
    with pytest.raises(ValueError, match="channel 64 out of range"):
        S.guided_backprop(fashion, xs, S.Unit("features.6", 64))
    with pytest.raises(ValueError, match="outside"):
        S.input_gradient(fashion, xs, S.Unit("features.6", 0, (14, 0)))
    with pytest.raises(ValueError, match="has no layer named"):
        S.deconvnet(fashion, xs, S.Unit("features.99", 0))
    with pytest.raises(ValueError, match="spatial"):
        S.input_gradient(fashion, xs, S.Unit("classifier.2", 0, (0, 0)))
    with pytest.raises(ValueError, match="channel index"):
        S.Unit("features.6", -1)
    with pytest.raises(ValueError, match="position"):
        S.Unit("features.6", 0, (1,))
    with pytest.raises(TypeError, match="layer name"):
        S.Unit(6, 0)
    with pytest.raises(TypeError, match="hidden unit"):
        S.occlusion(fashion, xs, S.Unit("features.6", 0), patch=8, stride=8, progress=False)
    assert same_state(before, snapshot(fashion))
