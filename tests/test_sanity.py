"""Model-randomisation sanity checks (coursekit.sanity, Adebayo et al. 2018)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.stats
import torch
import torch.nn.functional as F
from torch import nn

from coursekit import sanity
from coursekit.guard import model_state
from coursekit.hooks import UnknownLayerError
from coursekit.nets import FashionCNN
from coursekit.saliency import vanilla_saliency

pytestmark = pytest.mark.usefixtures("one_thread")  # small inputs: one thread is as fast, and much faster on a busy machine


def edges(model, x, target):
    """A model-independent 'explanation': the gradient magnitude of the image itself."""
    gx = F.pad((x[..., :, 1:] - x[..., :, :-1]).abs(), (0, 1, 0, 0))
    gy = F.pad((x[..., 1:, :] - x[..., :-1, :]).abs(), (0, 0, 0, 1))
    return (gx + gy).sum(dim=1)  # (N, H, W)


def random_fashion(seed=0):
    torch.manual_seed(seed)
    return FashionCNN().eval().requires_grad_(False)


def state_dict_copy(model):  # weights by name, to see which layers a step re-initialised
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_randomization_steps_from_the_top(fashion):
    assert sanity.randomization_steps(fashion) == [
        "net.classifier.4", "net.classifier.1", "net.features.7", "net.features.5", "net.features.2", "net.features.0",
    ]
    assert sanity.randomization_steps(random_fashion()) == [
        "classifier.4", "classifier.1", "features.7", "features.5", "features.2", "features.0",
    ]


def test_user_model_is_untouched(fashion, fashion_test):
    x = fashion_test[0][:2]
    before = model_state(fashion)  # modes, flags, hooks, and every parameter and buffer value
    rng = torch.get_rng_state()
    sanity.cascading_randomization(fashion, x, 0, {"grad": vanilla_saliency}, progress=False)
    sanity.independent_randomization(fashion, x, 0, {"grad": vanilla_saliency}, layers=["features.0"], progress=False)
    assert before.differences(model_state(fashion)) == []
    assert torch.equal(torch.get_rng_state(), rng)  # the global random state is not consumed


def test_step_zero_is_one_and_gradients_lose_similarity_while_edges_keep_it(fashion, fashion_test):
    x, y = fashion_test
    x, y = x[:4], y[:4]
    res = sanity.cascading_randomization(
        fashion, x, y, {"gradient": vanilla_saliency, "edges": edges}, metrics=("spearman", "ssim"), progress=False
    )
    assert res.steps[0] == "original" and len(res.steps) == 7
    for metric in ("spearman", "ssim"):
        for method in ("gradient", "edges"):
            np.testing.assert_allclose(res.scores[metric][method][0], 1.0, atol=1e-9)
        np.testing.assert_allclose(res.scores[metric]["edges"], 1.0, atol=1e-9)  # independent of the model
    grad = res.scores["spearman"]["gradient"]
    assert grad.shape == (7, 4)
    assert grad[-1].mean() < 0.5, res.table()  # every layer randomised: little rank agreement left
    assert grad[1:].mean() < 0.9


def test_cascading_accumulates_and_independent_does_not():
    model = random_fashion(1)
    trained = state_dict_copy(model)
    seen = []

    def spy(m, x, target):
        state = m.state_dict()
        seen.append({k for k in trained if not torch.equal(state[k], trained[k])})
        return edges(m, x, target)

    x = torch.rand(1, 1, 28, 28)
    layers = ["classifier.4", "features.7", ["features.2", "features.0"]]
    res = sanity.cascading_randomization(model, x, 0, {"spy": spy}, layers=layers, progress=False)
    assert res.steps == ["original", "classifier.4", "features.7", "features.2+features.0"]
    changed = [sorted({k.rsplit(".", 1)[0] for k in s}) for s in seen]
    assert changed == [[], ["classifier.4"], ["classifier.4", "features.7"],
                       ["classifier.4", "features.0", "features.2", "features.7"]]
    seen.clear()
    sanity.independent_randomization(model, x, 0, {"spy": spy}, layers=layers, progress=False)
    changed = [sorted({k.rsplit(".", 1)[0] for k in s}) for s in seen]
    assert changed == [[], ["classifier.4"], ["features.7"], ["features.0", "features.2"]]


def test_seeded_and_modules_accepted():
    model = random_fashion(2)
    x = torch.rand(2, 1, 28, 28)
    a = sanity.cascading_randomization(model, x, 3, {"g": vanilla_saliency}, layers=[model.classifier[4]], seed=5, progress=False)
    b = sanity.cascading_randomization(model, x, 3, {"g": vanilla_saliency}, layers=["classifier.4"], seed=5, progress=False)
    c = sanity.cascading_randomization(model, x, 3, {"g": vanilla_saliency}, layers=["classifier.4"], seed=6, progress=False)
    np.testing.assert_array_equal(a.scores["spearman"]["g"], b.scores["spearman"]["g"])
    assert not np.array_equal(a.scores["spearman"]["g"], c.scores["spearman"]["g"])
    assert a.steps == ["original", "classifier.4"]


def test_attributions_are_reduced_by_max_abs_over_channels():
    model = random_fashion(3)
    x = torch.rand(2, 1, 28, 28)
    attr = lambda m, x, t: torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(0))
    res = sanity.cascading_randomization(model, x, 0, {"attr": attr}, layers=["classifier.4"], progress=False)
    expected = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(0)).abs().amax(1)
    torch.testing.assert_close(res.maps["attr"][0], expected)


def test_reinitialize_changes_weights_keeps_requires_grad():
    model = random_fashion(4)
    before = state_dict_copy(model)
    sanity.reinitialize(model.features, seed=0)
    after = model.state_dict()
    assert all(not torch.equal(before[k], after[k]) for k in before if k.startswith("features"))
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("classifier"))
    assert all(not p.requires_grad for p in model.parameters())
    bn = nn.BatchNorm2d(3)
    bn.running_mean.fill_(2.0)
    bn.weight.data.fill_(3.0)
    sanity.reinitialize(bn, seed=0)
    assert torch.equal(bn.running_mean, torch.zeros(3)) and torch.equal(bn.weight.data, torch.ones(3))


def test_rank_correlation_matches_scipy_and_constant_maps_give_zero():
    rng = np.random.default_rng(0)
    a, b = rng.random((3, 6, 7)), rng.random((3, 6, 7))
    b[0] = a[0] ** 2  # monotone: correlation 1
    a[1, :2] = 0.5  # ties
    expected = [scipy.stats.spearmanr(u.ravel(), v.ravel()).statistic for u, v in zip(a, b)]
    np.testing.assert_allclose(sanity.rank_correlation(a, b), expected)
    assert sanity.rank_correlation(a, b)[0] == pytest.approx(1.0)
    assert sanity.rank_correlation(np.ones((1, 4, 4)), a[:1, :4, :4])[0] == 0.0
    np.testing.assert_allclose(sanity.ssim(a, a), 1.0)
    with pytest.raises(ValueError, match="same shape"):
        sanity.rank_correlation(a, b[:2])


def test_table_and_plots(fashion, fashion_test):
    x = fashion_test[0][:2]
    res = sanity.cascading_randomization(fashion, x, 0, {"gradient": vanilla_saliency, "edges": edges},
                                         layers=["classifier.4", "features.7"], progress=False)
    lines = res.table().splitlines()
    assert lines[0].split() == ["randomised", "gradient", "edges"] and lines[1].split()[1:] == ["1.00", "1.00"]
    fig = sanity.plot_randomization(res)
    ax = fig.axes[0]
    assert len(ax.get_lines()) == 2 + 1  # two methods and the zero line
    a, b = ax.get_lines()[:2]  # told apart by marker and dash, not by colour alone
    assert a.get_marker() != b.get_marker() and a.get_linestyle() != b.get_linestyle()
    fig.canvas.draw()
    assert ax.get_legend().get_window_extent().x0 > ax.get_window_extent().x1  # beside the curves
    assert [t.get_text() for t in ax.get_xticklabels()] == ["original", "classifier.4", "features.7"]
    assert ax.get_title() and ax.get_xlabel() and ax.get_ylabel()
    assert all(len(maps) == len(res.steps) for maps in res.maps.values())  # one map per step
    assert not torch.equal(res.maps["gradient"][0], res.maps["gradient"][1])
    torch.testing.assert_close(res.maps["edges"][0], res.maps["edges"][2])
    fig = sanity.plot_randomization_maps(res, image=1)
    assert len(fig.axes) == 2 * 3 + 1  # the maps and one shared colour bar
    assert "99th percentile" in fig.axes[-1].get_ylabel()  # the bar says what the scale is
    with pytest.raises(ValueError, match="ssim"):
        sanity.plot_randomization(res, metric="ssim")


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({"methods": {}}, ValueError, "non-empty dict"),
        ({"methods": {"g": 3}}, TypeError, "callable"),
        ({"layers": []}, ValueError, "non-empty list"),
        ({"layers": "features.0"}, ValueError, "non-empty list"),
        ({"layers": ["features.1"]}, ValueError, "no parameters"),
        ({"layers": ["feature.0"]}, UnknownLayerError, "features.0"),
        ({"layers": [nn.Linear(2, 2)]}, ValueError, "not part of the model"),
        ({"metrics": ("pearson",)}, ValueError, "spearman"),
        ({"x": torch.rand(1, 28, 28)}, ValueError, "N, C, H, W"),
        ({"methods": {"bad": lambda m, x, t: torch.rand(4)}}, ValueError, "shape"),
        ({"methods": {"nan": lambda m, x, t: torch.full((1, 28, 28), float("nan"))}}, ValueError, "NaN"),
    ],
)
def test_bad_input(kwargs, exc, match):
    args = {"model": random_fashion(), "x": torch.rand(1, 1, 28, 28), "target": 0, "methods": {"g": vanilla_saliency},
            "layers": ["classifier.4"], "progress": False}
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        sanity.cascading_randomization(**args)
