"""coursekit.representations: dataset examples, feature inversion, embeddings, neighbours.

The windows the dataset-example patches are cut with are tested in test_receptive_fields.py.
"""

import numpy as np
import pytest
import torch

from coursekit.guard import model_state
from coursekit.hooks import record
from coursekit.receptive_fields import unit_windows
from coursekit.representations import (
    DatasetExamples,
    InversionResult,
    embed,
    invert_features,
    layer_features,
    nearest_neighbours,
    plot_embedding,
    show_neighbours,
    top_activating,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # small inputs: one thread is as fast, and much faster on a busy machine


@pytest.fixture(scope="module")
def subset(fashion_test):
    x, y = fashion_test
    return x[:600], y[:600]


# ----------------------------------------------------------------------------------------------
# features


def test_layer_features_match_a_recorded_forward(fashion, subset):
    x, _ = subset
    before = model_state(fashion)
    calls = []
    handle = fashion.net.classifier[4].register_forward_hook(lambda *a: calls.append(1))
    try:
        f = layer_features(fashion, x[:100], "classifier.2", batch_size=30)
        maps = layer_features(fashion, x[:10], "net.features.8", flatten=False)
    finally:
        handle.remove()
    assert calls == []  # the forward pass stopped at the layer asked for
    assert before.differences(model_state(fashion)) == []
    with torch.no_grad(), record(fashion, ["net.classifier.2", "net.features.8"]) as rec:
        fashion(x[:100])
    torch.testing.assert_close(f, rec.activations["net.classifier.2"])
    torch.testing.assert_close(maps, rec.activations["net.features.8"][:10])
    assert f.shape == (100, 128) and maps.shape == (10, 64, 14, 14)
    with pytest.raises(ValueError, match="batch_size"):
        layer_features(fashion, x, "classifier.2", batch_size=0)
    with pytest.raises(ValueError, match="4-d batch"):
        layer_features(fashion, x[0], "classifier.2")
    with pytest.raises(ValueError, match="empty batch"):
        layer_features(fashion, x[:0], "classifier.2")
    with pytest.raises(ValueError, match="NaN"):
        layer_features(fashion, torch.full((1, 1, 28, 28), float("nan")), "classifier.2")
    # float64 (what torch.from_numpy gives) is computed in the model's dtype
    torch.testing.assert_close(layer_features(fashion, x[:3].double(), "classifier.2"), f[:3])


# ----------------------------------------------------------------------------------------------
# dataset examples


def _brute_force_top(model, x, layer, channel, k):
    scores = []
    for i in range(x.shape[0]):  # one image at a time, full forward, plain max
        with torch.no_grad(), record(model, layer) as rec:
            model(x[i : i + 1])
        scores.append(float(rec.activations[layer][0, channel].max()))
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))[:k]
    return order, [scores[i] for i in order]


@pytest.mark.parametrize("layer, channel", [("net.features.3", 11), ("net.features.8", 20), ("net.classifier.2", 5)])
def test_top_activating_agrees_with_brute_force(fashion, subset, layer, channel):
    x, _ = subset
    x = x[:200]
    before = model_state(fashion)
    ex = top_activating(fashion, x, layer, channel, k=8, batch_size=64)
    assert before.differences(model_state(fashion)) == []
    order, scores = _brute_force_top(fashion, x, layer, channel, 8)
    assert isinstance(ex, DatasetExamples)
    assert ex.indices.tolist() == order
    np.testing.assert_allclose(ex.scores.numpy(), scores, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ex.images, x[order])
    if layer == "net.classifier.2":
        assert ex.positions is None and torch.equal(ex.patches, ex.images)
    else:
        rf = ex.field
        assert rf == unit_windows(fashion, layer)
        with torch.no_grad(), record(fashion, layer) as rec:
            fashion(ex.images)
        maps = rec.activations[layer][:, channel]  # (k, h, w)
        for n, (i, j) in enumerate(ex.positions.tolist()):
            assert float(maps[n, i, j]) == pytest.approx(float(ex.scores[n]), rel=1e-5, abs=1e-6)
            torch.testing.assert_close(ex.patches[n], rf.crop(ex.images[n], i, j))
        assert ex.patches.shape == (8, 1) + rf.size


def test_top_activating_several_channels_and_errors(fashion, subset):
    x, y = subset
    many = top_activating(fashion, x[:150], "features.8", [3, 20], k=4)
    one = top_activating(fashion, x[:150], "features.8", 20, k=4)
    assert isinstance(many, list) and len(many) == 2
    assert torch.equal(many[1].indices, one.indices) and many[0].channel == 3
    fig = one.show(class_names=["c"] * 10, labels=y)
    assert len([ax for ax in fig.axes if ax.images]) == 8
    with pytest.raises(ValueError, match="64 channels"):
        top_activating(fashion, x[:10], "features.8", 64)
    with pytest.raises(ValueError, match="k must be"):
        top_activating(fashion, x[:10], "features.8", 0, k=11)
    with pytest.raises(TypeError, match="channel"):
        top_activating(fashion, x[:10], "features.8", 1.5)


def test_top_activating_on_a_branching_model_uses_measured_windows():
    class Residual(torch.nn.Module):  # not a plain chain: the analytic walk refuses it
        def __init__(self):
            super().__init__()
            self.stem = torch.nn.Conv2d(1, 2, 3, stride=2, padding=1)
            self.branch = torch.nn.Conv2d(2, 2, 3, padding=1)

        def forward(self, x):
            h = self.stem(x)
            return h + self.branch(h)

    torch.manual_seed(0)
    net, x = Residual().eval(), torch.rand(12, 1, 16, 16)
    ex = top_activating(net, x, "branch", 1, k=3)
    assert ex.field.layer == "branch" and ex.field.size == (7, 7) and ex.field.stride == (2, 2)
    for n, (i, j) in enumerate(ex.positions.tolist()):
        torch.testing.assert_close(ex.patches[n], ex.field.crop(ex.images[n], i, j))


# ----------------------------------------------------------------------------------------------
# feature inversion (Mahendran & Vedaldi 2015)


def test_inversion_from_an_early_layer_is_closer(fashion, subset):
    x, _ = subset
    before = model_state(fashion)
    inv = invert_features(fashion, x[:1], ["features.1", "classifier.2"], steps=120, lr=0.1, progress=False)
    assert before.differences(model_state(fashion)) == []
    assert isinstance(inv, InversionResult)
    assert inv.images.shape == (2, 1, 28, 28) and inv.layers == ["net.features.1", "net.classifier.2"]
    # the objective (minus the feature distance) rose for both layers
    assert (inv.run.history[-1] > inv.run.history[0]).all()
    assert float(inv.feature_error[0]) < 0.1
    # an early, wide, spatial layer keeps the picture; a late 128-d code keeps much less of it
    assert float(inv.pixel_error[0]) < 0.6 * float(inv.pixel_error[1]), inv.pixel_error
    with pytest.raises(ValueError, match="one picture"):
        invert_features(fashion, x[:2], "features.1")
    with pytest.raises(ValueError, match="parameterization"):
        invert_features(fashion, x[:1], "features.1", parameterization="wavelet")


# ----------------------------------------------------------------------------------------------
# embeddings and neighbours


def test_embed_pca_and_tsne():
    from sklearn.decomposition import PCA

    g = torch.Generator().manual_seed(0)
    f = torch.randn(80, 12, generator=g)
    f[:40] += 3.0  # two clusters
    pca = embed(f, "pca")
    np.testing.assert_allclose(np.abs(pca), np.abs(PCA(2).fit_transform(f.numpy())), rtol=1e-4, atol=1e-4)
    t1, t2 = embed(f, "tsne", perplexity=10, max_iter=250), embed(f, "tsne", perplexity=10, max_iter=250)
    assert t1.shape == (80, 2)
    np.testing.assert_allclose(t1, t2)  # seeded
    # the two clusters stay apart: nearest neighbours in the embedding share the cluster
    nn_idx = nearest_neighbours(torch.from_numpy(t1), torch.from_numpy(t1), k=2)[:, 1]
    assert ((nn_idx < 40) == (torch.arange(80) < 40)).float().mean() > 0.95
    with pytest.raises(ValueError, match="method"):
        embed(f, "umap")
    with pytest.raises(ValueError, match="N >= 3"):
        embed(f[:2], "pca")


def test_plot_embedding(subset):
    x, y = subset
    pts = np.random.default_rng(0).normal(size=(50, 2))
    ax = plot_embedding(pts, y[:50], class_names=[f"class {i}" for i in range(10)], images=x[:50], thumbnails=5, title="t")
    assert ax.get_title() == "t" and len(ax.artists) == 5
    assert len(ax.get_legend().get_texts()) == len(np.unique(y[:50].numpy()))
    with pytest.raises(ValueError):
        plot_embedding(pts, y[:10])


def test_nearest_neighbours_against_a_loop():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(6, 5, generator=g)
    bank = torch.randn(40, 5, generator=g) * torch.rand(40, 1, generator=g) * 3
    got = nearest_neighbours(q, bank, k=4)
    cos = nearest_neighbours(q, bank, k=4, metric="cosine")
    assert got.dtype == torch.long and got.shape == (6, 4)
    for i in range(6):
        d = [float(((q[i] - b) ** 2).sum()) for b in bank]
        assert got[i].tolist() == sorted(range(40), key=lambda j: d[j])[:4]
        c = [1 - float(q[i] @ b / (q[i].norm() * b.norm())) for b in bank]
        assert cos[i].tolist() == sorted(range(40), key=lambda j: c[j])[:4]
    # ties go to the lower index
    dup = torch.cat([bank[:1], bank[:1], bank])
    assert nearest_neighbours(bank[:1], dup, k=3).tolist() == [[0, 1, 2]]
    with pytest.raises(ValueError, match="k must be"):
        nearest_neighbours(q, bank, k=41)
    with pytest.raises(ValueError, match="same D"):
        nearest_neighbours(q, bank[:, :3], k=1)
    with pytest.raises(ValueError, match="metric"):
        nearest_neighbours(q, bank, metric="manhattan")
    with pytest.raises(TypeError):
        nearest_neighbours(q.numpy(), bank)


def test_feature_neighbours_share_the_class_more_than_pixel_neighbours(fashion, subset):
    x, y = subset
    feats = layer_features(fashion, x, "classifier.2")
    queries, bank = slice(0, 100), slice(100, 600)
    by_feature = nearest_neighbours(feats[queries], feats[bank], k=5)
    by_pixel = nearest_neighbours(x[queries].flatten(1), x[bank].flatten(1), k=5)
    same = lambda idx: (y[bank][idx] == y[queries, None]).float().mean()
    assert same(by_feature) > same(by_pixel) + 0.05
    fig = show_neighbours(x[:2], x[bank], {"feature space": by_feature[:2], "pixel space": by_pixel[:2]},
                          labels=y[:2], class_names=[str(i) for i in range(10)], bank_labels=y[bank])
    assert len(fig.axes) == 2 * (1 + 2 * 5)
    assert fig.axes[1].get_title().startswith("feature space 1")
    with pytest.raises(ValueError):
        show_neighbours(x[:2], x, {})
