"""coursekit.receptive_fields: analytic fields, gradient measurement, unit windows, exercise formulas.

Fields are computed analytically from the modules and checked against a gradient measurement on
fashion_cnn's architecture, torchvision's VGG16 and AlexNet (built with weights=None, no download)
and efficientnet_lite0 (timm's dynamic "SAME" padding). The unit windows used to crop dataset
examples are checked against the same measurement, and the measured fallback for branching
networks against the analytic windows and a hand computation.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

import coursekit
from coursekit import filters as fl
from coursekit import geometry
from coursekit import receptive_fields as rf
from coursekit.guard import model_state
from coursekit.receptive_fields import UnitWindows, unit_windows

pytestmark = pytest.mark.usefixtures("one_thread")  # small inputs: one thread is as fast, and much faster on a busy machine


# ----------------------------------------------------------------------------------------------
# receptive fields: analytic vs gradient measurement


def _analytic_box(field: rf.ReceptiveField, unit, hw):
    """Rows and columns (inclusive) of the field of ``unit``, cut off at the image border."""
    box = []
    for d in range(2):
        size = field.size if isinstance(field.size, int) else field.size[d]
        jump = field.jump if isinstance(field.jump, int) else field.jump[d]
        start = field.start if not isinstance(field.start, tuple) else field.start[d]
        centre = start + unit[d] * jump
        lo, hi = centre - (size - 1) / 2, centre + (size - 1) / 2
        assert lo == int(lo) and hi == int(hi), "an odd-sized field is centred on a pixel"
        box.append((max(0, int(lo)), min(hw[d] - 1, int(hi))))
    return box


def _agree(model, input_size, layers):
    fields = {f.layer: f for f in rf.receptive_fields(model, input_size)}
    for layer in layers:
        emp = rf.empirical_receptive_field(model, layer, input_size)
        rows, cols = _analytic_box(fields[emp.layer], emp.unit, input_size[-2:])
        assert (emp.rows, emp.cols) == (rows, cols), (layer, fields[emp.layer], emp)


def test_fashion_cnn_fields_match_gradients(fashion_arch):
    layers = [n for n, m in fashion_arch.features.named_modules(prefix="features") if isinstance(m, (nn.Conv2d, nn.MaxPool2d, nn.ReLU))]
    _agree(fashion_arch, (1, 28, 28), layers)
    # one unit near the corner too, where the field reaches into the padding
    emp = rf.empirical_receptive_field(fashion_arch, "features.7", (1, 28, 28), unit=(0, 1))
    field = {f.layer: f for f in rf.receptive_fields(fashion_arch, (1, 28, 28))}["features.7"]
    assert [emp.rows, emp.cols] == _analytic_box(field, (0, 1), (28, 28))
    assert emp.touches_border


def test_vgg16_fields_match_gradients(vgg16):
    _agree(vgg16, (3, 224, 224), ["features.2", "features.4", "features.9", "features.16", "features.23", "features.30"])


def test_alexnet_fields_match_gradients(alexnet):
    _agree(alexnet, (3, 224, 224), ["features.0", "features.2", "features.5", "features.8"])
    _agree(alexnet, (3, 320, 320), ["features.12"])  # 195 pixels: needs room around the central unit


def test_published_sizes(vgg16, alexnet):
    # Araujo et al. (2019), table 1: VGG-16 212, AlexNet 195 (at the last pooling layer)
    assert {f.layer: f.size for f in rf.receptive_fields(vgg16, (3, 224, 224))}["features.30"] == 212
    assert {f.layer: f.size for f in rf.receptive_fields(alexnet, (3, 224, 224))}["features.12"] == 195


@pytest.mark.parametrize("size", [224, 225])
def test_efficientnet_same_padding_matches_gradients(effnet, size):
    # timm's Conv2dSame pads (0, 1) for 224 but (1, 1) for 225: the start of the field moves
    _agree(effnet, (3, size, size), ["net.conv_stem", "net.blocks.0", "net.blocks.1", "net.blocks.2.0.conv_dw", "net.blocks.3"])


def test_same_padding_depends_on_input_size(effnet):
    a = {f.layer: f for f in rf.receptive_fields(effnet, (3, 224, 224))}["net.conv_stem"]
    b = {f.layer: f for f in rf.receptive_fields(effnet, (3, 225, 225))}["net.conv_stem"]
    assert (a.size, a.jump) == (b.size, b.jump) == (3, 2)
    assert b.start == a.start - 1


def test_fields_grow_with_depth_and_jump_is_product_of_strides(vgg16):
    fields = rf.receptive_fields(vgg16)  # no input size needed for VGG
    convs = [f for f in fields if isinstance(vgg16.get_submodule(f.layer), (nn.Conv2d, nn.MaxPool2d))]
    assert all(a.size <= b.size for a, b in itertools.pairwise(convs))
    strides = 1
    for f in convs:
        m = vgg16.get_submodule(f.layer)
        strides *= m.stride if isinstance(m.stride, int) else m.stride[0]
        assert f.jump == strides


def test_list_ends_where_the_network_pools_globally(vgg16, effnet):
    names = [f.layer for f in rf.receptive_fields(vgg16, (3, 224, 224))]
    assert "avgpool" in names  # adaptive pooling of a 7x7 map to 7x7 is the identity
    assert not any(n.startswith("classifier") for n in names)
    assert "avgpool" not in [f.layer for f in rf.receptive_fields(vgg16, (3, 256, 256))]  # 8x8 -> 7x7 mixes
    names = [f.layer for f in rf.receptive_fields(effnet)]
    assert names[-1] == "net.bn2" and "net.global_pool" not in names


def test_reference_formula_agrees_with_model_walk():
    gen = torch.Generator().manual_seed(3)
    for _ in range(5):
        spec = [(int(torch.randint(1, 6, (1,), generator=gen)), int(torch.randint(1, 4, (1,), generator=gen))) for _ in range(5)]
        net = nn.Sequential(*[nn.Conv2d(1, 1, k, s) for k, s in spec])
        assert rf.receptive_fields(net)[-1].size == rf.receptive_field_size(spec)


def test_rectangular_kernels_give_pairs():
    net = nn.Sequential(nn.Conv2d(1, 2, (3, 5), stride=(1, 2), padding=(1, 2)), nn.Conv2d(2, 2, 3))
    f = rf.receptive_fields(net, (1, 20, 30))[-1]
    assert f.size == (5, 9) and f.jump == (1, 2)
    emp = rf.empirical_receptive_field(net, "1", (1, 20, 30))
    assert emp.size == (5, 9)


def test_dilation_and_string_padding():
    net = nn.Sequential(nn.Conv2d(1, 1, 3, dilation=2, padding="same"), nn.MaxPool2d(2), nn.Conv2d(1, 1, 3, padding="valid"))
    _agree(net, (1, 24, 24), ["0", "1", "2"])
    assert rf.receptive_fields(net)[0].size == 5


def test_empirical_handles_branches():
    class TwoBranch(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(1, 2, 3, padding=1)
            self.b = nn.Conv2d(1, 2, 5, padding=2)
            self.c = nn.Conv2d(4, 1, 3, padding=1)

        def forward(self, x):
            return self.c(torch.cat([self.a(x), self.b(x)], 1))

    net = TwoBranch()
    assert rf.empirical_receptive_field(net, "c", (1, 16, 16)).size == (7, 7)
    with pytest.raises(ValueError, match="cannot reason about .*TwoBranch.*empirical_receptive_field"):
        rf.receptive_fields(net, (1, 16, 16))


def test_unsupported_modules_raise_clear_errors():
    squeeze = nn.Sequential(nn.Conv2d(1, 4, 3), nn.MultiheadAttention(4, 1))
    with pytest.raises(ValueError, match="MultiheadAttention"):
        rf.receptive_fields(squeeze)
    with pytest.raises(ValueError, match="circular"):
        rf.receptive_fields(nn.Sequential(nn.Conv2d(1, 1, 3, padding=1, padding_mode="circular")))
    with pytest.raises(ValueError, match="too small"):
        rf.receptive_fields(nn.Sequential(nn.Conv2d(1, 1, 5)), (1, 3, 3))
    with pytest.raises(ValueError, match="input_size"):
        rf.receptive_fields(nn.Sequential(type("Conv2dSame", (nn.Conv2d,), {})(1, 1, 3, stride=2)))
    with pytest.raises(ValueError, match="input_size"):
        rf.receptive_fields(nn.Sequential(nn.Conv2d(1, 1, 3)), (1, 2, 3, 4))
    with pytest.raises(TypeError):
        rf.receptive_fields("vgg16")


def test_empirical_errors(fashion_arch):
    with pytest.raises(ValueError, match="input_size"):
        rf.empirical_receptive_field(nn.Sequential(nn.Conv2d(1, 1, 3)), "0")
    with pytest.raises(ValueError, match="feature map"):
        rf.empirical_receptive_field(fashion_arch, "classifier.0", (1, 28, 28))
    with pytest.raises(ValueError, match="outside"):
        rf.empirical_receptive_field(fashion_arch, "features.9", (1, 28, 28), unit=(7, 0))
    with pytest.raises(coursekit.UnknownLayerError):
        rf.empirical_receptive_field(fashion_arch, "features.99", (1, 28, 28))


def test_empirical_leaves_model_untouched(fashion_arch):
    fashion_arch.features[0].register_forward_hook(lambda *a: (_ for _ in ()).throw(AssertionError("user hook ran")))
    try:
        before = model_state(fashion_arch)
        weights = [p.clone() for p in fashion_arch.parameters()]
        rf.empirical_receptive_field(fashion_arch, "features.7", (1, 28, 28))
        assert before.differences(model_state(fashion_arch)) == []
        assert all(torch.equal(a, b) for a, b in zip(weights, fashion_arch.parameters()))
    finally:
        fashion_arch.features[0]._forward_hooks.clear()


def test_table_and_plots(fashion_arch, effnet):
    table = rf.receptive_field_table(fashion_arch, (1, 28, 28))
    for name in ("features.0", "features.4", "features.9"):
        assert name in table
    ax = rf.plot_receptive_fields(fashion_arch, (1, 28, 28))
    expected = [f.size for f in rf.receptive_fields(fashion_arch, (1, 28, 28))
                if isinstance(fashion_arch.get_submodule(f.layer), (nn.Conv2d, nn.MaxPool2d))]
    assert list(ax.lines[0].get_ydata()) == expected
    layers = ["net.blocks.1", "net.blocks.3"]
    ax = rf.draw_receptive_fields(effnet, torch.rand(1, 3, 224, 224), layers)
    sizes = [p.get_width() for p in ax.patches]
    assert sizes == [{f.layer: f.size for f in rf.receptive_fields(effnet)}[n] for n in layers]
    # a field larger than the image (blocks.5: 787 px) is drawn as a dashed frame inside it, and the legend says so
    ax = rf.draw_receptive_fields(effnet, torch.rand(1, 3, 224, 224), ["net.blocks.5"])
    (frame,) = ax.patches
    assert frame.get_linestyle() == "--" and 0 <= frame.get_x() and frame.get_x() + frame.get_width() <= 223
    assert "all of the image" in frame.get_label() and "787" in frame.get_label()
    with pytest.raises(ValueError, match="pools globally"):
        rf.receptive_field_table(effnet, layers=["net.classifier"])


# ----------------------------------------------------------------------------------------------
# unit windows: the input box of every unit, for dataset-example patches


class Branches(nn.Module):
    """A strided stem, two parallel convolutions added (a residual-like branch), a max pool."""

    def __init__(self, small: int = 3, large: int = 5):
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, stride=2, padding=1)
        self.a = nn.Conv2d(4, 4, small, padding=small // 2)
        self.b = nn.Conv2d(4, 4, large, padding=large // 2)
        self.pool = nn.MaxPool2d(2)

    def forward(self, x):
        h = self.stem(x)
        return self.pool(torch.relu(self.a(h)) + self.b(h))


def _clipped_box(windows: UnitWindows, unit, hw):
    top, left, h, w = windows.box(*unit)
    return (max(top, 0), min(top + h - 1, hw[0] - 1)), (max(left, 0), min(left + w - 1, hw[1] - 1))


@pytest.mark.parametrize(
    "layer, size, stride, offset",
    [
        # conv3 -> 3; conv3 -> 5; pool2 -> 6, stride 2; conv3 -> 10; conv3 -> 14; pool2 -> 16, stride 4
        ("features.1", 3, 1, -1),
        ("features.3", 5, 1, -2),
        ("features.4", 6, 2, -2),
        ("features.6", 10, 2, -4),
        ("features.8", 14, 2, -6),
        ("features.9", 16, 4, -6),
    ],
)
def test_unit_windows_match_the_arithmetic(fashion, layer, size, stride, offset):
    windows = unit_windows(fashion, layer)  # input size from the model: (1, 28, 28)
    assert windows == UnitWindows(f"net.{layer}", (size, size), (stride, stride), (offset, offset), clipped=False)


def test_unit_windows_crop_and_errors(fashion):
    windows = unit_windows(fashion, "features.8")
    image = torch.arange(28 * 28, dtype=torch.float32).view(1, 28, 28) / 784
    assert windows.box(7, 3) == (8, 0, 14, 14)
    torch.testing.assert_close(windows.crop(image, 7, 3), image[:, 8:22, 0:14])
    corner = windows.crop(image, 0, 0, fill=-1.0)  # window rows/cols -6..7: half outside the picture
    assert corner.shape == (1, 14, 14)
    assert (corner[:, :6] == -1).all() and (corner[:, :, :6] == -1).all()
    torch.testing.assert_close(corner[:, 6:, 6:], image[:, :8, :8])
    with pytest.raises(ValueError, match="one picture"):
        windows.crop(image[None], 0, 0)
    with pytest.raises(ValueError, match="feature map"):
        unit_windows(fashion, "classifier.0")  # Flatten
    with pytest.raises(ValueError, match=r"'net.classifier.1' \(Linear\) runs before"):
        unit_windows(fashion, "classifier.2")
    with pytest.raises(ValueError, match="input_size"):
        unit_windows(nn.Sequential(nn.Conv2d(1, 1, 3)), "0")
    with pytest.raises(coursekit.UnknownLayerError):
        unit_windows(fashion, "features.99")


@pytest.mark.parametrize(
    "model_name, input_size, layer", [("fashion_arch", (1, 28, 28), "features.7"), ("fashion_arch", (1, 28, 28), "features.9"),
                                      ("effnet", (3, 225, 225), "net.blocks.1")]
)
def test_every_unit_window_matches_its_gradient(request, model_name, input_size, layer):
    model = request.getfixturevalue(model_name)
    windows = {f.layer: f for f in rf.receptive_fields(model, input_size)}[layer].windows()
    assert windows == unit_windows(model, layer, input_size)
    ci, cj = rf.empirical_receptive_field(model, layer, input_size).unit  # (h // 2, w // 2)
    for unit in [(0, 0), (0, cj), (ci, 1), (ci, cj), (2 * ci - 1, 2 * cj - 1)]:  # corners reach into the padding
        emp = rf.empirical_receptive_field(model, layer, input_size, unit=unit)
        assert _clipped_box(windows, unit, input_size[1:]) == (emp.rows, emp.cols), (layer, unit, windows, emp)


@pytest.mark.parametrize(
    "model_name, input_size, layer",
    [("vgg16", (3, 224, 224), "features.30"),  # 212 pixels: measured on an enlarged input
     ("effnet", (3, 225, 225), "net.blocks.3"),  # "SAME" padding that depends on the input size
     ("effnet", (3, 224, 224), "net.blocks.5")],  # 787 pixels: every unit sees the whole image
)
def test_measured_windows_agree_with_the_analytic_ones(request, model_name, input_size, layer):
    model = request.getfixturevalue(model_name)
    measured = geometry.measured_windows(model, layer, input_size[0], input_size[1:])  # the fallback, forced
    assert measured == unit_windows(model, layer, input_size)


def test_unit_windows_measure_branching_models():
    torch.manual_seed(0)
    net = Branches().eval()
    with pytest.raises(rf.UnsupportedLayerError):
        rf.receptive_fields(net, (1, 32, 32))
    # by hand: stem 3, jump 2, offset -1; the 5x5 branch adds 4 * 2 -> 11, offset -5; pool: 13, jump 4
    before = model_state(net)
    assert unit_windows(net, "stem", (1, 32, 32)) == UnitWindows("stem", (3, 3), (2, 2), (-1, -1))
    assert unit_windows(net, "pool", (1, 32, 32)) == UnitWindows("pool", (13, 13), (4, 4), (-5, -5))
    assert before.differences(model_state(net)) == []
    windows = unit_windows(net, "pool", (1, 20, 28))
    for unit in [(0, 0), (2, 6), (4, 3)]:
        emp = rf.empirical_receptive_field(net, "pool", (1, 20, 28), unit=unit)
        assert _clipped_box(windows, unit, (20, 28)) == (emp.rows, emp.cols)
    # a field larger than 8 times the input cannot be measured whole: flagged, size a lower bound
    wide = unit_windows(Branches(large=31), "pool", (1, 4, 4))
    assert wide.clipped and wide.size[0] < 3 + 30 * 2 + 2


def test_unit_windows_walk_stops_at_the_layer(monkeypatch):
    net = nn.Sequential(nn.Conv2d(1, 4, 5, padding=2), Branches())  # the walk could not pass Branches
    monkeypatch.setattr(geometry, "measured_windows", lambda *a: pytest.fail("measured although the walk reaches the layer"))
    assert unit_windows(net, "0", (1, 16, 16)) == UnitWindows("0", (5, 5), (1, 1), (-2, -2))


def test_filters_reexports_the_receptive_field_functions():
    for name in ("receptive_fields", "empirical_receptive_field", "receptive_field_table", "plot_receptive_fields",
                 "draw_receptive_fields", "ReceptiveField", "EmpiricalReceptiveField", "conv_output_size",
                 "receptive_field_size"):
        assert getattr(fl, name) is getattr(rf, name)
        assert name in fl.__all__


def test_references_are_blockable():
    for fn in (rf.conv_output_size, rf.receptive_field_size):
        assert fn.__reference_key__ == f"coursekit.receptive_fields.{fn.__name__}"


# ----------------------------------------------------------------------------------------------
# exercise references


def test_conv_output_size_matches_pytorch():
    gen = torch.Generator().manual_seed(0)
    for _ in range(30):
        k, s, p, d = (int(torch.randint(lo, hi, (1,), generator=gen)) for lo, hi in ((1, 8), (1, 4), (0, 4), (1, 3)))
        n = int(torch.randint(d * (k - 1) + 1, 50, (1,), generator=gen))
        out = nn.Conv2d(1, 1, k, s, p, d)(torch.zeros(1, 1, n, n)).shape[-1]
        assert rf.conv_output_size(n, k, s, p, d) == out
    with pytest.raises(ValueError, match="does not fit"):
        rf.conv_output_size(3, 5)
    with pytest.raises(ValueError, match="stride"):
        rf.conv_output_size(10, 3, stride=0)
    with pytest.raises(ValueError, match="size"):
        rf.conv_output_size(10.0, 3)


def test_receptive_field_size_cases():
    assert rf.receptive_field_size([]) == 1
    assert rf.receptive_field_size([(3, 1)] * 2) == 5  # two 3x3 convolutions see 5x5 (Simonyan & Zisserman 2015)
    assert rf.receptive_field_size([(3, 1), (2, 2), (3, 1)]) == 1 + 2 + 1 + 2 * 2
    with pytest.raises(ValueError, match="pair"):
        rf.receptive_field_size([(3, 1, 1)])
    with pytest.raises(TypeError):
        rf.receptive_field_size("3x3")


# ----------------------------------------------------------------------------------------------
# the effective receptive field (Luo et al. 2016) of the nonlinear network


def _erf_reference(model, layer, images, unit):
    """Slow and obvious: one image at a time, the unit summed over channels, |grad| scaled to sum 1."""
    maps, out = [], {}
    for x in images:
        xi = x[None].clone().requires_grad_(True)
        handle = dict(model.named_modules())[layer].register_forward_hook(lambda m, i, o: out.__setitem__("a", o))
        try:
            with torch.enable_grad():
                model(xi)
                (g,) = torch.autograd.grad(out["a"][0, :, unit[0], unit[1]].sum(), xi)
        finally:
            handle.remove()
        m = g[0].abs().sum(0).double()
        maps.append(m / m.sum())
    return torch.stack(maps).mean(0).float()


def test_effective_receptive_field_matches_a_slow_reference_and_leaves_the_model(fashion_arch):
    images = torch.rand(5, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    before = model_state(fashion_arch)
    erf = rf.effective_receptive_field(fashion_arch, "features.7", images, batch_size=2)
    assert before.differences(model_state(fashion_arch)) == []
    assert erf.layer == "features.7" and erf.unit == (7, 7) and erf.images == 5 and erf.map.shape == (28, 28)
    assert torch.allclose(erf.map, _erf_reference(fashion_arch, "features.7", images, (7, 7)), atol=1e-6)
    assert abs(float(erf.map.sum()) - 1) < 1e-5
    assert fl.effective_receptive_field is rf.effective_receptive_field


def test_effective_receptive_field_lies_inside_the_theoretical_box(fashion_arch):
    images = torch.rand(3, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    for layer in ("features.2", "features.7", "features.9"):
        erf = rf.effective_receptive_field(fashion_arch, layer, images)
        top, left, h, w = erf.theoretical
        rows, cols = erf.map.sum(1).nonzero()[:, 0], erf.map.sum(0).nonzero()[:, 0]
        assert top <= rows.min() and rows.max() <= top + h - 1, layer
        assert left <= cols.min() and cols.max() <= left + w - 1, layer
        assert erf.square(1.0) <= max(h, w) + 1
    erf = rf.effective_receptive_field(fashion_arch, "features.7", images)
    assert (erf.theoretical[2], erf.theoretical[3]) == (14, 14)  # the analytic table's 14


def test_effective_receptive_field_square_on_known_maps():
    box = torch.zeros(21, 21)
    box[5:16, 5:16] = 1 / 121  # uniform on an 11x11 box centred at (10, 10)
    erf = rf.EffectiveReceptiveField("x", (0, 0), box, 1, None)
    assert erf.centre() == pytest.approx((10.0, 10.0))
    assert erf.square(1.0) == 11
    assert erf.square(9 / 121) == 3  # the central 3x3 holds 9 of the 121 pixels
    with pytest.raises(ValueError, match="fraction"):
        erf.square(1.5)
    with pytest.raises(ValueError, match="fraction"):
        erf.square(0)


def test_effective_receptive_field_errors_and_figure(fashion_arch):
    images = torch.rand(2, 1, 28, 28)
    with pytest.raises(ValueError, match="outside"):
        rf.effective_receptive_field(fashion_arch, "features.9", images, unit=(7, 0))
    with pytest.raises(ValueError, match=r"\(N, K, h, w\)"):
        rf.effective_receptive_field(fashion_arch, "classifier.1", images)
    with pytest.raises(ValueError, match="batch_size"):
        rf.effective_receptive_field(fashion_arch, "features.7", images, batch_size=0)
    fields = [rf.effective_receptive_field(fashion_arch, n, images) for n in ("features.2", "features.9")]
    fig = rf.show_effective_receptive_fields(fields)
    assert sum(1 for ax in fig.axes if ax.images) == 2
    assert all("pixels" in ax.get_xlabel() and "pixels" in ax.get_ylabel() for ax in fig.axes if ax.images)
    assert all("theoretical" in " ".join(t.get_text() for t in ax.get_legend().get_texts()) for ax in fig.axes if ax.images)
    with pytest.raises(TypeError):
        rf.show_effective_receptive_fields([])
