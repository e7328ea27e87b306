"""Unit tests of coursekit.lrp: rules by hand, conservation, canonizers, the guard, bad input."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import coursekit
from coursekit import lrp as L
from coursekit.gradients import gradient, smooth
from coursekit.guard import TrainModeWarning, model_state
from coursekit.rules import UncoveredLayerError

pytestmark = pytest.mark.usefixtures("one_thread")


class Plain(nn.Module):
    """A bare network: no normalisation, so relevance at the input is the rule's output itself."""

    def __init__(self, *layers):
        super().__init__()
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


def linear(w, b=None):
    lin = nn.Linear(w.shape[1], w.shape[0], bias=b is not None)
    with torch.no_grad():
        lin.weight.copy_(w)
        if b is not None:
            lin.bias.copy_(b)
    return lin.requires_grad_(False)


# ----------------------------------------------------------------------------------------------
# the rules on a layer small enough to check by hand


W = torch.tensor([[1.0, -2.0, 3.0], [0.5, 1.0, -1.0]])  # (out=2, in=3)
B = torch.tensor([0.5, -0.25])
X = torch.tensor([[1.0, 2.0, 0.5]])  # z = [1 - 4 + 1.5 + 0.5, 0.5 + 2 - 0.5 - 0.25] = [-1.0, 1.75]


def rel_through(rule, x=X, w=W, b=B, r_out=None):
    """Relevance at the input of one linear layer for relevance r_out at its output (default: the output)."""
    lin = linear(w, b)
    xi = x.clone().requires_grad_(True)
    rule.attach(lin)  # hooks removed below
    try:
        z = lin(xi)
        r = z.detach() if r_out is None else r_out
        (g,) = torch.autograd.grad(z, xi, r)
    finally:
        lin._forward_hooks.clear()
    return g


def test_lrp0_by_hand():
    z = X @ W.T + B  # (1, 2)
    expected = (X[:, None, :] * W[None] / z[..., None] * z[..., None]).sum(1)  # R_i = sum_j x_i w_ji / z_j * R_j
    torch.testing.assert_close(rel_through(L.Epsilon(0.0)), expected)
    # sum_i R_i = sum_j (z_j - b_j): the bias takes its share
    torch.testing.assert_close(rel_through(L.Epsilon(0.0)).sum(), (z - B).sum())


def test_epsilon_by_hand_and_without_bias():
    eps = 0.5
    z = X @ W.T + B
    denom = z + eps * torch.where(z >= 0, 1.0, -1.0)
    expected = X * ((z / denom) @ W)
    torch.testing.assert_close(rel_through(L.Epsilon(eps)), expected)
    zb = X @ W.T
    r = torch.tensor([[2.0, 3.0]])
    got = rel_through(L.Epsilon(0.0, bias=False), r_out=r)
    torch.testing.assert_close(got.sum(), r.sum())  # bias left out: exactly conserved
    torch.testing.assert_close(got, X * ((r / zb) @ W))


def test_alpha_beta_by_hand():
    r = torch.tensor([[1.0, 2.0]])
    pos, neg = (X[:, None, :] * W[None]).clamp(min=0), (X[:, None, :] * W[None]).clamp(max=0)  # (1, 2, 3)
    zp, zn = pos.sum(-1) + B.clamp(min=0), neg.sum(-1) + B.clamp(max=0)
    expected = 2 * (pos / zp[..., None] * r[..., None]).sum(1) - (neg / zn[..., None] * r[..., None]).sum(1)
    torch.testing.assert_close(rel_through(L.AlphaBeta(2, 1), r_out=r), expected, atol=1e-5, rtol=1e-5)
    flipped = 2 * (neg / zn[..., None] * r[..., None]).sum(1) - (pos / zp[..., None] * r[..., None]).sum(1)
    assert not torch.allclose(rel_through(L.AlphaBeta(2, 1), r_out=r), flipped)


def test_gamma_limits():
    r = torch.tensor([[1.0, 2.0]])
    x = X.clamp(min=0)
    torch.testing.assert_close(rel_through(L.Gamma(0.0), x=x, r_out=r), rel_through(L.Epsilon(1e-6), x=x, r_out=r))
    # large gamma -> z+ for positive outputs
    big = rel_through(L.Gamma(1e6, bias=False), x=x, r_out=torch.tensor([[0.0, 2.0]]))
    zplus = rel_through(L.ZPlus(bias=False), x=x, r_out=torch.tensor([[0.0, 2.0]]))
    torch.testing.assert_close(big, zplus, atol=1e-4, rtol=1e-4)


def test_zbox_by_hand():
    low, high = -1.0, 2.0
    r = torch.tensor([[1.0, 2.0]])
    wp, wn = W.clamp(min=0), W.clamp(max=0)
    z = X @ W.T - low * wp.sum(1) - high * wn.sum(1)
    s = r / (z + 1e-6 * torch.where(z >= 0, 1.0, -1.0))
    expected = X * (s @ W) - low * (s @ wp) - high * (s @ wn)
    torch.testing.assert_close(rel_through(L.ZBox(low, high), r_out=r), expected)


_ZBOX_LAYERS = [
    lambda: nn.Conv2d(3, 8, 3, padding=1),
    lambda: nn.Conv2d(3, 8, 5, stride=2, padding=2, bias=False),
    lambda: nn.Conv2d(2, 4, 3, stride=(1, 2), padding=(0, 1), dilation=2),
    lambda: nn.Conv1d(3, 5, 4, stride=2, padding=1),
    lambda: nn.Conv3d(2, 3, 3, padding=1),
    lambda: nn.Linear(6, 4),
    lambda: nn.Conv2d(4, 4, 3, padding=1, groups=2),  # grouped: the generic path
]


@pytest.mark.parametrize("bounds", ["number", "per channel", "per pixel"])
@pytest.mark.parametrize("make", _ZBOX_LAYERS)
def test_fused_zbox_equals_the_generic_terms(make, bounds):
    """z^B's one forward on the stacked bounds and one stacked J^T s give the three terms' relevance."""
    torch.manual_seed(0)
    layer = make().requires_grad_(False)
    c = layer.weight.shape[1] * (getattr(layer, "groups", 1))
    spatial = {nn.Linear: (), nn.Conv1d: (9,), nn.Conv2d: (9, 10), nn.Conv3d: (5, 6, 7)}[type(layer)]
    x = torch.rand(3, c, *spatial) * 2 - 0.5
    low, high = {"number": (-0.5, 1.5), "per channel": (-0.5 - torch.rand(c), 1.5 + torch.rand(c)),
                 "per pixel": (-0.5 - torch.rand(1, c, *spatial), 1.5 + torch.rand(1, c, *spatial))}[bounds]
    rule = L.ZBox(low, high)
    generic = L.LRPRule(rule.groups, stabilizer=rule.stabilizer, bias=True)
    out = layer(x)
    r = torch.randn_like(out)
    (fused,) = rule.backward(layer, (x,), out, r)
    (expected,) = generic.backward(layer, (x,), out, r)
    torch.testing.assert_close(fused, expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(fused.sum(), expected.sum(), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("relu_behind", [True, False])
def test_gamma_by_hand_with_and_without_relevance_at_negative_outputs(relu_behind):
    """Behind a ReLU the negative outputs get no relevance and gamma's mirror group is skipped (exactly)."""
    torch.manual_seed(1)
    conv = nn.Conv2d(4, 6, 3, padding=1).requires_grad_(False)
    x = torch.rand(2, 4, 7, 7)
    out = conv(x)
    r = torch.rand_like(out) * (out > 0) if relu_behind else torch.randn_like(out)
    gamma, w, b = 0.25, conv.weight, conv.bias
    expected = torch.zeros_like(x)
    for part, mask in ((lambda t: t.clamp(min=0), out > 0), (lambda t: t.clamp(max=0), out < 0)):
        wg, bg = w + gamma * part(w), b + gamma * part(b)
        z = torch.nn.functional.conv2d(x, wg, bg, padding=1)
        s = r / (z + 1e-6 * torch.where(z >= 0, 1.0, -1.0)) * mask
        expected += x * torch.nn.grad.conv2d_input(x.shape, wg, s, padding=1)
    (got,) = L.Gamma(gamma).backward(conv, (x,), out, r)
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("inputs", ["signed", "non-positive", "zero"])
def test_gamma_by_hand_with_signed_and_zero_inputs(inputs):
    """Both sign parts of the input, each group's terms: the per-call sharing of x+, x- and the weights is exact."""
    torch.manual_seed(3)
    conv = nn.Conv2d(4, 6, 3, padding=1).requires_grad_(False)
    x = {"signed": torch.randn(2, 4, 7, 7), "non-positive": -torch.rand(2, 4, 7, 7),
         "zero": torch.zeros(2, 4, 7, 7)}[inputs]
    out = conv(x)
    r = torch.randn_like(out)
    gamma, w, b = 0.25, conv.weight, conv.bias
    up = lambda t: t + gamma * t.clamp(min=0)  # noqa: E731
    down = lambda t: t + gamma * t.clamp(max=0)  # noqa: E731
    xp, xn = x.clamp(min=0), x.clamp(max=0)
    expected = torch.zeros_like(x)
    for (wp, bp, wn), mask in (((up, up, down), out > 0), ((down, down, up), out < 0)):
        z = torch.nn.functional.conv2d(xp, wp(w), bp(b), padding=1) + torch.nn.functional.conv2d(xn, wn(w), padding=1)
        s = r / (z + 1e-6 * torch.where(z >= 0, 1.0, -1.0)) * mask
        expected += xp * torch.nn.grad.conv2d_input(x.shape, wp(w), s, padding=1)
        expected += xn * torch.nn.grad.conv2d_input(x.shape, wn(w), s, padding=1)
    (got,) = L.Gamma(gamma).backward(conv, (x,), out, r)
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("make", [lambda: nn.Conv2d(3, 8, 3, padding=1), lambda: nn.Conv2d(8, 8, 3, stride=2, groups=8),
                                  lambda: nn.Conv2d(8, 4, 1), lambda: nn.Conv2d(2, 4, 3, stride=(1, 2), dilation=2),
                                  lambda: nn.Conv1d(3, 5, 4, stride=2, padding=1), lambda: nn.Conv3d(2, 3, 3, padding=1)])
def test_product_keeps_the_input_layout(make):
    """``J^T s`` equals torch's conv*_input, and a channels-last input gives a channels-last product (no copies)."""
    from coursekit.lrp.rules import _vjp

    torch.manual_seed(4)
    conv = make().requires_grad_(False)
    spatial = {nn.Conv1d: (11,), nn.Conv2d: (9, 12), nn.Conv3d: (5, 6, 7)}[type(conv)]
    x = torch.randn(2, conv.in_channels, *spatial)
    s = torch.randn_like(conv(x))
    grad = {nn.Conv1d: torch.nn.grad.conv1d_input, nn.Conv2d: torch.nn.grad.conv2d_input,
            nn.Conv3d: torch.nn.grad.conv3d_input}[type(conv)]
    expected = grad(x.shape, conv.weight, s, conv.stride, conv.padding, conv.dilation, conv.groups)
    torch.testing.assert_close(_vjp(conv, x, conv.weight, s), expected)
    if x.dim() == 4:
        x_cl, s_cl = (t.contiguous(memory_format=torch.channels_last) for t in (x, s))
        got = _vjp(conv, x_cl, conv.weight, s_cl)
        torch.testing.assert_close(got, expected)
        assert got.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("size", [(9, 10), (16, 16), (7, 12)])
@pytest.mark.parametrize("groups", [1, 4])
def test_conv2d_same_product_equals_autograd(size, groups):
    """timm's Conv2dSame (TensorFlow "same" padding): the explicit padded product, cropped, is autograd's gradient."""
    from timm.layers import Conv2dSame

    from coursekit.lrp.rules import _vjp

    torch.manual_seed(2)
    conv = Conv2dSame(4, 8, 3, stride=2, groups=groups).requires_grad_(False)
    x = torch.randn(2, 4, *size, requires_grad=True)
    out = conv(x)
    s = torch.randn_like(out)
    (expected,) = torch.autograd.grad(out, x, s)
    torch.testing.assert_close(_vjp(conv, x.detach(), conv.weight, s), expected)


def test_flat_and_wsquare_by_hand():
    r = torch.tensor([[1.0, 2.0]])
    torch.testing.assert_close(rel_through(L.Flat(), r_out=r), (r / 3).sum(1, keepdim=True).expand(1, 3), atol=1e-5, rtol=1e-5)
    w2 = W**2
    torch.testing.assert_close(rel_through(L.WSquare(), r_out=r), (r / w2.sum(1)) @ w2, atol=1e-5, rtol=1e-5)


def test_proportional_pool_matches_a_loop():
    torch.manual_seed(0)
    x = torch.rand(1, 2, 4, 4)
    pool = nn.MaxPool2d(2)
    r = torch.rand(1, 2, 2, 2)
    xi = x.clone().requires_grad_(True)
    L.ProportionalPool().attach(pool)
    (got,) = torch.autograd.grad(pool(xi), xi, r)
    pool._forward_hooks.clear()
    expected = torch.zeros_like(x)
    for c in range(2):
        for i in range(2):
            for j in range(2):
                win = x[0, c, 2 * i:2 * i + 2, 2 * j:2 * j + 2]
                expected[0, c, 2 * i:2 * i + 2, 2 * j:2 * j + 2] = win / (win.sum() + 1e-6) * r[0, c, i, j]
    torch.testing.assert_close(got, expected)
    (wta,) = torch.autograd.grad(pool(xi), xi, r)  # plain gradient: all to the maximum
    assert (wta > 0).sum() == 8 and torch.allclose(wta.sum(), r.sum())


def test_sum_rule_splits_in_proportion():
    a, b = torch.tensor([[3.0, 1.0]]), torch.tensor([[1.0, -3.0]])
    s = L.Sum()
    L.Norm().attach(s)
    ai, bi = a.clone().requires_grad_(True), b.clone().requires_grad_(True)
    ra, rb = torch.autograd.grad(s(ai, bi), (ai, bi), torch.tensor([[8.0, 4.0]]))
    s._forward_hooks.clear()
    torch.testing.assert_close(ra, torch.tensor([[6.0, -2.0]]), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(rb, torch.tensor([[2.0, 6.0]]), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("bad", [
    lambda: L.AlphaBeta(1, 1), lambda: L.AlphaBeta(-1, -2), lambda: L.Gamma(-0.1), lambda: L.Epsilon(-1.0),
    lambda: L.ZBox(1.0, 0.0), lambda: L.LRPComposite({}, by_depth=[(2.0, L.Epsilon())]),
])
def test_bad_rule_parameters(bad):
    with pytest.raises(ValueError):
        bad()


def test_alpha_beta_message_names_the_constraint():
    with pytest.raises(ValueError, match="alpha - beta must be 1"):
        L.AlphaBeta(3, 1)


# ----------------------------------------------------------------------------------------------
# whole networks


def test_lrp0_is_gradient_times_input_in_normalised_space(fashion):
    """LRP-0 with biases on a ReLU network = gradient x (normalised) input (Ancona et al. 2018)."""
    x, _ = coursekit.fashion_mnist("test")
    x = x[:3].double()
    model = __import__("copy").deepcopy(fashion).double()
    t = torch.tensor([0, 1, 2])
    got = L.lrp(model, x, t, L.lrp_zero())  # relevance at the top = the logit
    grad = gradient(model, x, t)
    expected = (x - model.normalize.mean) * grad  # x_norm * d s / d x_norm
    torch.testing.assert_close(got, expected, atol=1e-9, rtol=1e-7)


@pytest.mark.parametrize("name", ["LRP-0", "EpsilonPlus", "EpsilonGammaBox", "Montavon2019"])
def test_fashion_cnn_conserves_exactly_without_biases(name, fashion, fashion_test):
    x, y = fashion_test
    comp = L.COMPOSITES[name](bias=False)
    if name == "Montavon2019":  # its epsilon is large on purpose: it absorbs relevance
        comp = L.montavon2019(epsilon=1e-9, bias=False)
    model, x = fashion, x[:8]
    if name == "LRP-0":  # pixel-layer denominators near 0 on normalised input: 1.5e-5 of float32 rounding
        model, x = __import__("copy").deepcopy(fashion).double(), x.double()
    cons = L.conservation(model, x, y[:8], comp)
    ratios = cons.ratios
    assert ratios.shape == (len(cons.layers), 8)
    assert cons.layers[0] == "net.classifier.4" and cons.layers[-1] == "pixels"
    assert abs(ratios - 1).max() < 1e-5, cons.table()
    with torch.no_grad():
        logits = model(x).gather(1, y[:8, None])[:, 0].float()
    torch.testing.assert_close(torch.as_tensor(cons.sums[0]), logits)
    pixels = L.lrp(model, x, y[:8], comp)
    torch.testing.assert_close(torch.as_tensor(cons.sums[-1]), pixels.flatten(1).sum(1).float())


def test_biases_leak_and_epsilon_absorbs(fashion, fashion_test):
    x, y = fashion_test
    with_bias = L.conservation(fashion, x[:4], y[:4], L.epsilon_plus()).ratios[-1]
    big_eps = L.conservation(fashion, x[:4], y[:4], L.lrp_epsilon(1.0)).ratios[-1]
    assert (abs(with_bias - 1) > 1e-3).any()
    assert (big_eps < with_bias).all()


def test_efficientnet_canonizer(effnet):
    x = coursekit.load_image("coffee", size=96)
    before = model_state(effnet)
    with torch.no_grad():
        ref = effnet(x)
    undo = L.EfficientNetCanonizer().apply(effnet)
    try:
        names = [type(m).__name__ for m in effnet.modules()]
        assert "BatchNormAct2d" not in names and names.count("Sum") == 9 and "Conv2dSame" in names
        with torch.no_grad():
            torch.testing.assert_close(effnet(x), ref, atol=1e-4, rtol=1e-4)
    finally:
        undo()
    assert before.differences(model_state(effnet)) == []
    # without canonizer relevance doubles at every skip; with it, it never grows along the main path
    t = int(ref.argmax())
    without = L.conservation(effnet, x, t, L.epsilon_plus_flat(bias=False), canonizers=None)
    with_c = L.conservation(effnet, x, t, L.epsilon_plus_flat(bias=False)).main_path()
    assert without.ratios[-1, 0] > 5
    assert with_c.ratios[:, 0].max() < 1 + 1e-4
    assert before.differences(model_state(effnet)) == []


def test_canonizer_undone_on_error(effnet):
    before = model_state(effnet)
    broken = L.LRPComposite({nn.Conv2d: L.ZPlus()})  # no rule for the Linear classifier
    with pytest.raises(UncoveredLayerError, match=r"net\.classifier.*Linear"):
        L.lrp(effnet, coursekit.load_image("coffee", size=64), 1, broken)
    assert before.differences(model_state(effnet)) == []


def test_merge_batchnorm_sequential():
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(4)
    bn.running_mean.uniform_(-1, 1)
    bn.running_var.uniform_(0.5, 2)
    bn.weight.data.uniform_(0.5, 1.5)
    bn.bias.data.uniform_(-1, 1)
    model = Plain(nn.Conv2d(3, 4, 3), bn, nn.ReLU(), nn.Flatten(), nn.LazyLinear(2)).eval()
    x = torch.rand(2, 3, 6, 6)
    model(x)
    model.requires_grad_(False)
    before = model_state(model)
    with torch.no_grad():
        ref = model(x)
    undo = L.MergeBatchNorm().apply(model)
    assert isinstance(model.net[1], nn.Identity)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref, atol=1e-5, rtol=1e-5)
    undo()
    assert before.differences(model_state(model)) == []
    with pytest.raises(TypeError, match="batch-norm"):
        L.merge_batchnorm(nn.Conv2d(1, 1, 1), nn.ReLU())


def test_model_left_alone_and_train_mode(fashion_arch):
    model = fashion_arch
    x = torch.rand(2, 1, 28, 28)
    model.train()
    before = model_state(model)
    try:
        with pytest.warns(TrainModeWarning):
            L.lrp(model, x, 3, "EpsilonPlus")
        assert before.differences(model_state(model)) == []
    finally:
        model.eval()


def test_smooth_of_lrp(fashion, fashion_test):
    x, y = fashion_test

    def method(m, xx, t):
        return L.lrp(m, xx, t, "EpsilonPlus")

    out = smooth(method, n_samples=3, noise_level=0.1, seed=0)(fashion, x[:2], y[:2])
    assert out.shape == (2, 1, 28, 28) and torch.isfinite(out).all()
    torch.testing.assert_close(smooth(method, n_samples=3, noise_level=0.0)(fashion, x[:2], y[:2]), method(fashion, x[:2], y[:2]))


def test_uncovered_layer_names_layer_type_and_fix():
    class Odd(nn.Module):
        def forward(self, x):
            return x * 2

    model = Plain(nn.Flatten(), nn.Linear(4, 3), Odd(), nn.Linear(3, 2)).eval()
    model.requires_grad_(False)
    with pytest.raises(UncoveredLayerError, match=r"'net\.2' \(Odd\).*with_rules"):
        L.lrp(model, torch.rand(1, 1, 2, 2), 0, "EpsilonPlus")
    fixed = L.epsilon_plus().with_rules({Odd: L.Relay()})
    assert L.lrp(model, torch.rand(1, 1, 2, 2), 0, fixed).shape == (1, 1, 2, 2)


@pytest.mark.parametrize("kwargs, err, match", [
    (dict(x="img"), TypeError, "torch.Tensor"),
    (dict(x=torch.full((1, 1, 28, 28), float("nan"))), ValueError, "NaN"),
    (dict(target=12), ValueError, "out of range"),
    (dict(target=1.5), TypeError, "integers"),
    (dict(composite="Epsilon+"), ValueError, "unknown LRP composite"),
    (dict(canonizers=["merge"]), TypeError, "Canonizer"),
    (dict(start="top"), ValueError, "start must be"),
])
def test_bad_input(fashion, kwargs, err, match):
    args = dict(x=torch.rand(1, 1, 28, 28), target=1, composite="EpsilonPlus", canonizers="auto")
    args.update(kwargs)
    start = args.pop("start", "logit")
    with pytest.raises(err, match=match):
        L.lrp(fashion, args["x"], args["target"], args["composite"], args["canonizers"], start=start)


def test_efficientnet_canonizer_refuses_other_models(fashion):
    with pytest.raises(ValueError, match="no timm EfficientNet"):
        L.lrp(fashion, torch.rand(1, 1, 28, 28), 0, "EpsilonPlus", canonizers=[L.EfficientNetCanonizer()])


def test_plots(fashion, fashion_test):
    import matplotlib.pyplot as plt

    x, y = fashion_test
    cons = {"a": L.conservation(fashion, x[:1], y[:1], L.epsilon_plus(bias=False)),
            "b": L.conservation(fashion, x[:1], y[:1], L.epsilon_plus())}
    ax = L.plot_conservation(cons)
    lines = ax.get_lines()
    assert len(lines) == 3 and ax.get_title()
    keep = [i for i, k in enumerate(cons["b"].kinds) if "Relay" not in k]
    assert list(lines[1].get_ydata()) == pytest.approx(list(cons["b"].ratios[keep, 0]))
    # lines that overlap (both 1.0 in the upper layers) differ in marker and line style, not only colour
    assert lines[0].get_marker() != lines[1].get_marker() and lines[0].get_linestyle() != lines[1].get_linestyle()
    legend = ax.get_legend()
    assert legend.get_bbox_to_anchor().x0 >= ax.get_window_extent().x1  # the legend sits right of the axes
    R = L.lrp(fashion, x[:1], y[:1], "EpsilonPlus")
    ax2 = L.plot_relevance(x[0], R[0], title="map")
    im = ax2.get_images()[0]
    lo, hi = im.get_clim()
    assert lo == -hi and im.get_cmap().name == "bwr"
    assert ax2.figure.axes[-1].get_ylabel() == "relevance"  # the colour bar
    plt.close("all")
    table = cons["a"].table().splitlines()
    assert "ratio" in table[0] and len(table) == len(cons["a"].layers) + 1
    assert len({len(row) for row in table}) == 1  # header and rows line up column by column


def test_relevance_limit_shares_one_scale(fashion, fashion_test):
    import matplotlib.pyplot as plt

    x, y = fashion_test
    R = L.lrp(fashion, x[:2], y[:2], "EpsilonPlus")  # (2, 1, 28, 28)
    a, b = torch.tensor([[1.0, -4.0], [2.0, 0.0]]), torch.tensor([[[0.5, 3.0], [-1.0, 0.0]]])  # (2, 2), (1, 2, 2)
    assert L.relevance_limit(a, b, percentile=100) == 4.0  # the largest |value| of both maps
    assert L.relevance_limit(a, percentile=50) == pytest.approx(1.5)  # median of |a| = (1, 4, 2, 0)
    assert L.relevance_limit(torch.zeros(3, 3)) == 1e-12
    lim = L.relevance_limit(R[0], R[1])
    assert lim == pytest.approx(float(torch.quantile(R[:, 0].abs().flatten(), 0.995)), rel=1e-5)
    ax = L.plot_relevance(None, R[0], limit=lim, colorbar=True)
    assert ax.get_images()[0].get_clim() == (-lim, lim)
    bar = ax.figure.axes[-1]
    assert bar.get_ylim()[1] == pytest.approx(lim)
    # a single map scaled by its own percentile, clipped pixels marked by the colour bar's pointed ends
    ax = L.plot_relevance(None, R[1], percentile=90)
    assert ax.get_images()[0].get_clim()[1] < float(R[1].abs().max())
    plt.close("all")


@pytest.mark.parametrize("kwargs, match", [
    ({"limit": 0.0}, "limit must be a positive number"),
    ({"limit": -1.0}, "limit must be a positive number"),
    ({"limit": "auto"}, "limit must be a positive number"),
])
def test_plot_relevance_bad_limit(kwargs, match):
    import matplotlib.pyplot as plt

    with pytest.raises(ValueError, match=match):
        L.plot_relevance(None, torch.randn(4, 4), **kwargs)
    with pytest.raises(ValueError, match="relevance must be"):
        L.plot_relevance(None, torch.randn(2, 1, 4, 4))
    plt.close("all")


def test_plot_conservation_aligns_results_by_layer_name():
    """Issue 20: with and without a canonizer the same layer sat at different x (position 0-1 over 53 vs
    35 layers). ``align=True`` gives every layer name one x, shared by every line, and names the axis."""
    import numpy as np

    def cons(names, values):
        sums = np.array(values, dtype=float)[:, None]
        return L.Conservation(names, ["Conv2d / rule"] * len(names), sums, [False] * len(names))

    results = {"without": cons(["top", "block1.conv", "block1.extra", "block2.conv", "pixels"], [2, 2, 4, 4, 8]),
               "with": cons(["top", "block1.conv", "block1.sum", "block2.conv", "pixels"], [2, 2, 2, 1, 1])}
    ax = L.plot_conservation(results, align=True)
    order = ["top", "block1.conv", "block1.sum", "block1.extra", "block2.conv", "pixels"]
    assert [t.get_text() for t in ax.get_xticklabels()] == order
    without, with_ = ax.get_lines()[:2]
    assert list(without.get_xdata()) == [0, 1, 3, 4, 5] and list(with_.get_xdata()) == [0, 1, 2, 4, 5]
    assert list(with_.get_ydata()) == [1.0, 1.0, 1.0, 0.5, 0.5]
    ax = L.plot_conservation(results, align=True, max_labels=3)  # every other name
    assert [t.get_text() for t in ax.get_xticklabels()] == order[::2] and "one name every 2 layers" in ax.get_xlabel()
    with pytest.raises(ValueError, match="not both"):
        L.plot_conservation(results, align=True, depth=True)


def test_relevance_limit_and_plot_conservation_bad_input():
    with pytest.raises(ValueError, match="at least one map"):
        L.relevance_limit()
    with pytest.raises(ValueError, match="percentile must be in"):
        L.relevance_limit(torch.ones(2, 2), percentile=0)
    with pytest.raises(ValueError, match=r"map 1 must be a tensor .* got \(2, 1, 2, 2\)"):
        L.relevance_limit(torch.ones(2, 2), torch.ones(2, 1, 2, 2))
    with pytest.raises(ValueError, match="non-empty dict"):
        L.plot_conservation({})
    with pytest.raises(TypeError, match=r"results\['a'\] must be a Conservation"):
        L.plot_conservation({"a": [1.0, 0.9]})
