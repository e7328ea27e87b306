"""coursekit.filters: filters as images, activation maps, the layer inspector.

Receptive fields (re-exported by coursekit.filters) are tested in test_receptive_fields.py.
"""

from __future__ import annotations

import copy
import math

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from torch import nn

import coursekit
from coursekit import filters as fl
from coursekit.guard import model_state

# ----------------------------------------------------------------------------------------------
# filters


def test_first_layer_filters_shapes(effnet, fashion_arch, vgg16, alexnet):
    assert fl.first_layer_filters(effnet).shape == (32, 3, 3, 3)
    assert fl.first_layer_filters(fashion_arch).shape == (32, 1, 3, 3)
    assert fl.first_layer_filters(vgg16).shape == (64, 3, 3, 3)
    assert fl.first_layer_filters(alexnet).shape == (64, 3, 11, 11)
    w = fl.first_layer_filters(fashion_arch, "features.5")
    assert w.shape == (64, 32, 3, 3)
    w.zero_()  # a copy: the model keeps its weights
    assert fashion_arch.features[5].weight.abs().sum() > 0


def test_first_layer_filters_errors(fashion_arch):
    with pytest.raises(TypeError, match="not an nn.Conv2d"):
        fl.first_layer_filters(fashion_arch, "features.1")
    with pytest.raises(ValueError, match="no nn.Conv2d"):
        fl.first_layer_filters(nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(TypeError):
        fl.first_layer_filters(torch.zeros(3))


def test_normalize_filters_is_symmetric_per_filter():
    w = torch.randn(5, 3, 4, 4) * torch.tensor([0.1, 1, 10, 0, 3]).view(-1, 1, 1, 1)
    out = fl.normalize_filters(w)
    assert out.shape == w.shape and out.min() >= 0 and out.max() <= 1
    assert torch.all(out[3] == 0.5)  # an all-zero filter stays grey
    for k in (0, 1, 2, 4):
        m = w[k].abs().max()
        assert torch.allclose(out[k], w[k] / (2 * m) + 0.5)
        assert torch.isclose((out[k] - 0.5).abs().max(), torch.tensor(0.5))
    with pytest.raises(ValueError, match="4-d"):
        fl.normalize_filters(torch.zeros(3, 3))


def test_show_filters_draws_every_filter(effnet, fashion_arch):
    fig = fl.show_filters(effnet)
    images = [ax.images[0].get_array() for ax in fig.axes if ax.images]
    assert len(images) == 32
    expected = fl.normalize_filters(fl.first_layer_filters(effnet))
    assert torch.allclose(torch.as_tensor(images[5]).float(), expected[5].permute(1, 2, 0), atol=1e-6)
    fig = fl.show_filters(fashion_arch, ncols=4)
    assert sum(1 for ax in fig.axes if ax.images) == 32
    fig = fl.show_filters(fashion_arch, "features.5", max_channels=4)  # deeper: filters x input channels
    assert sum(1 for ax in fig.axes if ax.images) == 16
    fig = fl.show_filters(torch.randn(6, 3, 5, 5), title="random")
    assert fig._suptitle.get_text() == "random"
    with pytest.raises(ValueError, match="layer= only applies"):
        fl.show_filters(torch.randn(6, 3, 5, 5), layer="features.0")
    with pytest.raises(TypeError):
        fl.show_filters([1, 2, 3])
    with pytest.raises(ValueError, match="ncols"):
        fl.show_filters(effnet, ncols=0)


# ----------------------------------------------------------------------------------------------
# activation maps and the explorer


def test_activation_maps_match_a_manual_forward(fashion_arch):
    x = torch.rand(2, 1, 28, 28)
    before = model_state(fashion_arch)
    maps = fl.activation_maps(fashion_arch, x, ["features.1", "features.6", fashion_arch.features[9]])
    assert list(maps) == ["features.1", "features.6", "features.9"]
    with torch.no_grad():
        h, expected = x, {}
        for i, m in enumerate(fashion_arch.features):
            h = m(h)
            expected[f"features.{i}"] = h
    for name, a in maps.items():
        assert torch.allclose(a, expected[name], atol=1e-6) and not a.requires_grad
    assert maps["features.9"].shape == (2, 64, 7, 7)
    assert before.differences(model_state(fashion_arch)) == []


def test_activation_maps_defaults_and_errors(effnet, fashion_arch):
    x = torch.rand(1, 3, 64, 64)
    maps = fl.activation_maps(effnet, x, None)
    assert list(maps) == [effnet.layers[k] for k in ("early", "middle", "late")]
    assert list(fl.activation_maps(fashion_arch, torch.rand(1, 1, 28, 28), None)) == ["features.0", "features.5", "features.7"]
    with pytest.raises(TypeError, match="torch.Tensor"):
        fl.activation_maps(fashion_arch, [[0.0]], None)
    with pytest.raises(ValueError, match="4-d"):
        fl.activation_maps(fashion_arch, torch.rand(1, 28, 28), None)
    with pytest.raises(coursekit.UnknownLayerError):
        fl.activation_maps(fashion_arch, torch.rand(1, 1, 28, 28), ["features.42"])
    with pytest.raises(ValueError, match="layers must be"):
        fl.activation_maps(fashion_arch, torch.rand(1, 1, 28, 28), [])


def test_show_activation_maps(fashion_arch):
    x = torch.rand(1, 1, 28, 28)
    fig = fl.show_activation_maps(fashion_arch, x, ["features.1", "features.8"], channels=4)
    assert sum(1 for ax in fig.axes if ax.images) == 2 * (1 + 4)
    maps = fl.activation_maps(fashion_arch, x, ["features.1"])["features.1"][0]
    top = maps.flatten(1).mean(1).argmax()
    assert torch.allclose(torch.as_tensor(fig.axes[1].images[0].get_array()), maps[top])
    with pytest.raises(ValueError, match=r"\(N, K, h, w\)"):
        fl.show_activation_maps(fashion_arch, x, ["classifier.1"])
    with pytest.raises(ValueError, match="image_index"):
        fl.show_activation_maps(fashion_arch, x, ["features.1"], image_index=3)


def test_explore_activations_static_fallback(fashion_arch):
    view = fl.explore_activations(fashion_arch, torch.rand(1, 1, 28, 28), ["features.1", "features.6"])  # no kernel here
    assert view.mode == "static" and isinstance(view.figure, plt.Figure)
    titles = [ax.get_title() for ax in view.figure.axes]
    assert sum("most active" in t for t in titles) == 2 * 3
    view = fl.explore_activations(fashion_arch, torch.rand(1, 1, 28, 28), ["features.1"], static=True, ranks=2)
    assert sum("most active" in ax.get_title() for ax in view.figure.axes) == 2
    with pytest.raises(ValueError, match=r"\(N, K, h, w\)"):
        fl.explore_activations(fashion_arch, torch.rand(1, 1, 28, 28), ["classifier.2"], static=True)


def test_explore_activations_widget(fashion_arch):
    pytest.importorskip("ipywidgets")
    view = fl.explore_activations(fashion_arch, torch.rand(1, 1, 28, 28), ["features.1", "features.6"], static=False)
    controls = view.widget.children[0].children
    assert [c.description for c in controls] == ["layer", "channel_rank"]
    assert controls[1].max == 32  # the narrower layer's width


# ----------------------------------------------------------------------------------------------
# the layer inspector


def test_inspector_matches_autograd_on_an_unfrozen_copy(fashion_arch):
    torch.manual_seed(1)
    x = torch.rand(2, 1, 28, 28)
    before = model_state(fashion_arch)
    records = fl.layer_inspector(fashion_arch, x, 3)
    assert before.differences(model_state(fashion_arch)) == []  # still frozen, no .grad, no hooks
    assert all(p.grad is None and not p.requires_grad for p in fashion_arch.parameters())

    ref = copy.deepcopy(fashion_arch).requires_grad_(True)
    xin = x.clone().requires_grad_(True)
    feats = {}
    h = xin
    for i, m in enumerate(ref.features):
        h = m(h)
        h.retain_grad()
        feats[f"features.{i}"] = h
    ref.classifier(h)[:, 3].sum().backward()
    by_name = {r.name: r for r in records}
    assert records[0].name == "input"
    assert torch.allclose(records[0].activation_grad, xin.grad, atol=1e-7)
    for name in ("features.0", "features.2", "features.5", "features.7"):
        r = by_name[name]
        module = ref.get_submodule(name)
        assert torch.allclose(r.weight_grad, module.weight.grad, rtol=1e-4, atol=1e-7)
        assert torch.equal(r.weight, module.weight.detach())
        assert r.params == module.weight.numel() + module.bias.numel()
        assert torch.allclose(r.activation, feats[name].detach(), atol=1e-6)
        assert torch.allclose(r.activation_grad, feats[name].grad, rtol=1e-4, atol=1e-8)
    assert torch.allclose(by_name["classifier.1"].weight_grad, ref.classifier[1].weight.grad, rtol=1e-4, atol=1e-8)
    assert by_name["features.1"].weight is None and by_name["features.1"].params == 0
    assert by_name["classifier.4"].shape == (10,)
    lo, hi = by_name["features.0"].ranges()["activation"]
    assert lo == float(feats["features.0"].detach().min()) and hi == float(feats["features.0"].detach().max())


def test_inspector_callable_target_and_layer_choice(effnet):
    x = torch.rand(1, 3, 64, 64)
    before = model_state(effnet)
    records = fl.layer_inspector(effnet, x, lambda out: out[:, 5] - out[:, 7], layers=["net.conv_stem", "net.bn1"],
                                 include_input=False)
    assert before.differences(model_state(effnet)) == []
    assert [r.name for r in records] == ["net.conv_stem", "net.bn1"]
    assert records[0].weight.shape == (32, 3, 3, 3) and records[0].params == 864
    assert records[1].weight_grad.shape == (32,)  # BatchNormAct2d: its scale gets a gradient
    assert records[0].activation_grad.abs().sum() > 0


def test_inspector_errors(effnet, fashion_arch):
    with pytest.raises(ValueError, match="choose a few"):
        fl.layer_inspector(effnet, torch.rand(1, 3, 64, 64), 0)
    with pytest.raises(ValueError, match="out of range"):
        fl.layer_inspector(fashion_arch, torch.rand(1, 1, 28, 28), 10)
    with pytest.raises(TypeError):
        fl.layer_inspector(fashion_arch, torch.rand(1, 1, 28, 28), "shirt")
    with pytest.raises(ValueError, match="4-d"):
        fl.layer_inspector(fashion_arch, torch.rand(28, 28), 0)
    assert all(not p.requires_grad and p.grad is None for p in fashion_arch.parameters())


def test_inspector_table_and_figures(fashion_arch, capsys):
    records = fl.layer_inspector(fashion_arch, torch.rand(1, 1, 28, 28), 0)
    table = fl.inspector_table(records, values=False)
    assert "9,248" in table  # 32 * 32 * 3 * 3 + 32
    assert f"{sum(p.numel() for p in fashion_arch.parameters()):,}" not in table  # per layer, not total
    figs = fl.show_layer_inspector(records, max_channels=4)
    assert len(figs) == len(records)
    assert "act max" in capsys.readouterr().out
    conv = figs[[r.name for r in records].index("features.0")]
    assert sum(1 for ax in conv.axes if ax.images) == 4 * 4  # activations, grads, weights, weight grads
    # a linear layer's panels say what their axes are: units, and for the weight matrix inputs and outputs
    names = [r.name for r in records]
    linear = [n for n, r in zip(names, records) if r.weight is not None and r.weight.dim() == 2]
    last = fl.show_layer_inspector([records[names.index(linear[-1])]], table=False, class_names=[str(i) for i in range(10)])[0]
    xlabels = [ax.get_xlabel() for ax in last.axes if ax.images]
    assert xlabels[2].startswith("input unit") and xlabels[3].startswith("input unit"), xlabels
    weights = [ax for ax in last.axes if ax.images][2]
    assert [t.get_text() for t in weights.get_yticklabels()] == [str(i) for i in range(10)]  # one row per class
    with pytest.raises(TypeError):
        fl.inspector_table([1, 2])
    with pytest.raises(ValueError, match="image_index"):
        fl.show_layer_inspector(records, image_index=2, table=False)


# ----------------------------------------------------------------------------------------------
# exercise references


@pytest.mark.parametrize("args", [(3, 16, 5, True, 1), (3, 16, 5, False, 1), (8, 8, (3, 1), True, 8), (12, 6, 3, True, 3)])
def test_conv_param_count_matches_pytorch(args):
    cin, cout, k, bias, groups = args
    conv = nn.Conv2d(cin, cout, k, bias=bias, groups=groups)
    assert fl.conv_param_count(*args) == sum(p.numel() for p in conv.parameters())


def test_conv_param_count_lecture_example_and_errors():
    assert fl.conv_param_count(3, 16, 5) == 1216  # LeNet layer 1 in the lecture: 16 x 5x5x3 + 16
    with pytest.raises(ValueError, match="divisible"):
        fl.conv_param_count(3, 16, 3, groups=2)
    with pytest.raises(TypeError, match="bias"):
        fl.conv_param_count(3, 16, 3, bias=1)


def test_references_are_blockable():
    for fn in (fl.conv_param_count, fl.normalize_filters, fl.activation_maps):
        assert fn.__reference_key__.startswith("coursekit.filters.")
    assert not math.isnan(fl.normalize_filters(torch.zeros(1, 1, 3, 3)).sum())


def test_train_mode_model_is_inspected_in_eval_mode_and_restored():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)).train()
    stats = net[1].running_mean.clone()
    before = model_state(net)
    x = torch.rand(2, 3, 8, 8)
    maps = fl.activation_maps(net, x, ["1"])
    records = fl.layer_inspector(net, x, 0, layers=["0", "1"])
    assert torch.equal(net[1].running_mean, stats)
    assert before.differences(model_state(net)) == [] and net.training
    assert all(p.requires_grad and p.grad is None for p in net.parameters())  # an unfrozen model stays unfrozen
    net.eval()
    with torch.no_grad():
        assert torch.allclose(maps["1"], net[1](net[0](x)), atol=1e-6)
        assert torch.allclose(records[2].activation, maps["1"], atol=1e-6)


def test_show_activation_maps_signed_layers_get_a_zero_centred_diverging_map(fashion_arch):
    x = torch.rand(1, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    fig = fl.show_activation_maps(fashion_arch, x, ["features.0", "features.1"], channels=3)
    rows = [[ax for ax in fig.axes if ax.images and ax.get_title().startswith("ch ")][i * 3:(i + 1) * 3] for i in range(2)]
    conv, relu = rows
    for ax in conv:  # a convolution's output is signed
        im = ax.images[0]
        assert im.get_cmap().name == "RdBu_r"
        lo, hi = im.get_clim()
        assert lo == -hi and lo < 0
    assert len({ax.images[0].get_clim() for ax in conv}) == 1  # one scale per row
    for ax in relu:
        assert ax.images[0].get_cmap().name == "magma" and ax.images[0].get_clim()[0] == 0
    assert len([ax for ax in fig.axes if ax.get_label() == "<colorbar>"]) == 2  # one colour bar per row


# ----------------------------------------------------------------------------------------------
# filters learnt from natural-image patches (ICA)


def test_natural_image_filters_unmix_their_own_basis():
    learnt = fl.natural_image_filters(["cat", "coffee"], patch_size=6, n_components=12, n_patches=3000, seed=0)
    assert learnt.filters.shape == learnt.basis.shape == (12, 1, 6, 6) and learnt.patches == 3000
    w, a = learnt.filters.flatten(1).double(), learnt.basis.flatten(1).double()
    assert torch.allclose(w @ a.T, torch.eye(12, dtype=torch.float64), atol=1e-3)  # unmixing x mixing = identity
    norms = a.norm(dim=1)
    assert torch.all(norms[:-1] >= norms[1:])  # largest variance first
    again = fl.natural_image_filters(["cat", "coffee"], patch_size=6, n_components=12, n_patches=3000, seed=0)
    assert torch.equal(again.filters, learnt.filters)  # seeded
    colour = fl.natural_image_filters(["cat"], patch_size=4, n_components=8, n_patches=1000, channels=3)
    assert colour.filters.shape == (8, 3, 4, 4)
    fig = fl.show_filters(colour.basis, ncols=4)
    assert sum(1 for ax in fig.axes if ax.images) == 8


def test_natural_image_filters_patches_have_no_mean():
    rng = np.random.default_rng(0)
    patches = fl._random_patches([torch.rand(1, 3, 20, 30)], 5, 7, 1, rng)
    assert patches.shape == (7, 25) and np.allclose(patches.mean(1), 0)


def test_natural_image_filters_errors():
    with pytest.raises(TypeError, match="list of images"):
        fl.natural_image_filters("cat")
    with pytest.raises(ValueError, match="channels"):
        fl.natural_image_filters(["cat"], channels=2)
    with pytest.raises(ValueError, match="n_components"):
        fl.natural_image_filters(["cat"], patch_size=4, n_components=16)
    with pytest.raises(ValueError, match="does not fit"):
        fl.natural_image_filters([torch.rand(1, 1, 8, 8)], patch_size=12, n_components=4, n_patches=10)
