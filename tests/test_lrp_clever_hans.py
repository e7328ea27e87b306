"""The Clever-Hans network: the tag, the shipped weights' behaviour, LRP and SpRAy find the tag."""

import pytest
import torch

import coursekit
from coursekit import clever_hans as ch
from coursekit import lrp as L

pytestmark = pytest.mark.usefixtures("one_thread")


def test_stamp_draws_the_tag_and_leaves_input_alone():
    x = torch.zeros(3, 1, 28, 28)
    out = ch.stamp(x, torch.tensor([True, False, True]))
    r0, r1, c0, c1 = ch.WATERMARK_BOX
    assert torch.equal(out[0, 0, r0:r1, c0:c1], ch.WATERMARK) and out[1].sum() == 0
    assert x.sum() == 0 and out[0].sum() == ch.WATERMARK.sum()
    with pytest.raises(ValueError, match=r"\(N, 1, 28, 28\)"):
        ch.stamp(torch.zeros(1, 3, 28, 28))
    with pytest.raises(ValueError, match="which"):
        ch.stamp(x, torch.tensor([True]))


def test_watermark_choice_is_seeded_and_only_one_class():
    y = torch.arange(10).repeat(100)
    a, b = ch.watermark_choice(y, seed=3), ch.watermark_choice(y, seed=3)
    assert torch.equal(a, b) and (y[a] == ch.WATERMARK_CLASS).all()
    assert 0.25 < a.sum() / (y == ch.WATERMARK_CLASS).sum() < 0.55
    with pytest.raises(ValueError, match="fraction"):
        ch.watermark_choice(y, fraction=1.5)


@pytest.fixture(scope="module")
def hans():
    return ch.load_watermark_model()


def test_shipped_network_is_a_clever_hans(hans, fashion_test):
    x, y = fashion_test
    acc = ch.watermark_accuracy(hans, x[:2000], y[:2000])
    assert acc["accuracy_clean"] > 0.85
    assert acc["to_class_marked"] > 0.5 > 0.05 > acc["to_class_clean"]
    assert acc["accuracy_marked"] < acc["accuracy_clean"] - 0.3


def test_lrp_and_spray_expose_the_tag(hans, fashion_test):
    x, y = fashion_test
    idx = (y == ch.WATERMARK_CLASS).nonzero()[:, 0][:120]
    marked = ch.watermark_choice(y[idx], seed=5)
    xs = ch.stamp(x[idx], marked)
    R = L.lrp(hans, xs, ch.WATERMARK_CLASS, "EpsilonGammaBox")
    r0, r1, c0, c1 = ch.WATERMARK_BOX
    share = R[:, 0, r0:r1, c0:c1].sum((1, 2)) / R.sum((1, 2, 3))
    assert share[marked].mean() > 0.3 > 0.15 > share[~marked].mean()
    res = ch.spectral_relevance_analysis(R, n_clusters=2)
    from sklearn.metrics import adjusted_rand_score

    assert adjusted_rand_score(marked.numpy(), res.labels) > 0.9
    assert res.eigenvalues.shape == (8,) and res.embedding.shape == (120, 2)
    means = res.cluster_means(R)
    assert means.shape == (2, 28, 28)


def test_spray_bad_input():
    with pytest.raises(ValueError, match="heatmaps"):
        ch.spectral_relevance_analysis(torch.zeros(5))
    with pytest.raises(ValueError, match="n_clusters"):
        ch.spectral_relevance_analysis(torch.rand(4, 1, 8, 8), n_clusters=5)


def test_missing_weights_explain_how_to_retrain(monkeypatch, tmp_path):
    from coursekit import models

    monkeypatch.setattr(models, "fashion_weights_path", lambda name: tmp_path / f"{name}.pt")
    with pytest.raises(coursekit.WeightsNotAvailableError, match="coursekit.train fashion_cnn_watermark"):
        ch.load_watermark_model()
