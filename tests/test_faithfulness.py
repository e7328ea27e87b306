"""Deletion / insertion curves (coursekit.faithfulness): the convention, a slow loop cross-check,
AUC against numpy, and that a map with real knowledge of the model beats a random one."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from coursekit import faithfulness as fa
from coursekit.guard import TrainModeWarning, model_state
from coursekit.images import gaussian_blur
from coursekit.saliency import occlusion

pytestmark = pytest.mark.usefixtures("one_thread")  # small inputs: one thread is as fast, and much faster on a busy machine


def tiny_model(seed=0, channels=3, classes=4):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(channels, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, classes)
    ).eval().requires_grad_(False)


def probs_of(model, x, target):
    with torch.no_grad():
        p = model(x).softmax(1)
    return p[torch.arange(len(p)), torch.as_tensor(target).expand(len(p))]


# -- the convention -----------------------------------------------------------------------------


def test_pixel_ranking_most_relevant_first_ties_row_major():
    m = torch.tensor([[[0.5, 2.0], [0.5, 1.0]]])  # pixels 0..3 row-major
    assert fa.pixel_ranking(m).tolist() == [[2, 0, 3, 1]]


def test_perturbation_masks_equal_fractions():
    rank = torch.randperm(10)
    fractions, masks = fa.perturbation_masks(rank, 4)
    np.testing.assert_allclose(fractions, [0, 0.25, 0.5, 0.75, 1])
    assert masks.sum(1).tolist() == [0, 2, 5, 8, 10]  # round(k/4 * 10), Python's round
    for k in range(5):  # the changed pixels are the top-ranked ones
        assert set(torch.nonzero(masks[k]).flatten().tolist()) == set(torch.nonzero(rank < masks[k].sum()).flatten().tolist())


def test_deletion_starts_at_unmodified_probability_and_ends_at_baseline():
    model = tiny_model()
    x = torch.rand(3, 3, 8, 8)
    maps = torch.rand(3, 8, 8)
    fractions, probs = fa.deletion_curve(model, x, 2, maps, steps=8, baseline="zeros")
    assert fractions.shape == (9,) and probs.shape == (3, 9)
    np.testing.assert_allclose(probs[:, 0], probs_of(model, x, 2), rtol=1e-5)
    np.testing.assert_allclose(probs[:, -1], probs_of(model, torch.zeros_like(x), 2), rtol=1e-5)


def test_insertion_goes_from_baseline_to_unmodified_probability():
    model = tiny_model()
    x = torch.rand(2, 3, 8, 8)
    _, probs = fa.insertion_curve(model, x, [0, 3], torch.rand(2, 8, 8), steps=5)
    np.testing.assert_allclose(probs[:, 0], probs_of(model, fa.blurred(x), [0, 3]), rtol=1e-5)
    np.testing.assert_allclose(probs[:, -1], probs_of(model, x, [0, 3]), rtol=1e-5)


def slow_deletion(model, x, target, m, steps, baseline):
    """Pixel by pixel, with numpy's stable argsort, one forward per step."""
    img, base = x[0].clone(), baseline[0]
    h, w = m.shape[-2:]
    order = np.argsort(-m[0].numpy().ravel(), kind="stable")
    out = []
    for k in range(steps + 1):
        cur = img.clone()
        for p in order[: round(k / steps * h * w)]:
            cur[:, p // w, p % w] = base[:, p // w, p % w]
        out.append(float(probs_of(model, cur[None], target)[0]))
    return np.array(out)


def test_deletion_matches_a_slow_pixel_loop():
    model = tiny_model(1)
    x = torch.rand(1, 3, 8, 8)
    m = torch.rand(1, 8, 8)
    m[0, 0, :4] = 0.5  # ties
    base = fa.blurred(x)
    _, probs = fa.deletion_curve(model, x, 1, m, steps=7, baseline="blur", batch_size=3)
    np.testing.assert_allclose(probs[0], slow_deletion(model, x, 1, m, 7, base), rtol=1e-5)


def test_batch_size_and_channel_attributions_and_low_resolution_maps():
    model = tiny_model(2)
    x = torch.rand(2, 3, 8, 8)
    attr = torch.randn(2, 3, 8, 8)
    _, a = fa.deletion_curve(model, x, 1, attr, steps=6, batch_size=1)
    _, b = fa.deletion_curve(model, x, 1, attr.abs().amax(dim=1), steps=6, batch_size=64)
    np.testing.assert_allclose(a, b, rtol=1e-5)
    coarse = torch.rand(2, 2, 2)  # e.g. a Grad-CAM map at layer resolution: upsampled bilinearly
    up = torch.nn.functional.interpolate(coarse[:, None], size=(8, 8), mode="bilinear", align_corners=False)[:, 0]
    np.testing.assert_allclose(fa.deletion_curve(model, x, 1, coarse, steps=4)[1], fa.deletion_curve(model, x, 1, up, steps=4)[1])


def test_callable_target_gets_probabilities_and_logit_score():
    model = tiny_model(3)
    x = torch.rand(2, 3, 8, 8)
    m = torch.rand(2, 8, 8)
    _, by_index = fa.deletion_curve(model, x, 3, m, steps=4)
    _, by_fn = fa.deletion_curve(model, x, lambda p: p[:, 3], m, steps=4)
    np.testing.assert_allclose(by_index, by_fn)
    _, logits = fa.deletion_curve(model, x, 3, m, steps=4, score="logit")
    with torch.no_grad():
        np.testing.assert_allclose(logits[:, 0], model(x)[:, 3], rtol=1e-5)


def test_tensor_and_number_baselines():
    model = tiny_model(4)
    x = torch.rand(1, 3, 8, 8)
    grey = torch.full((3, 1, 1), 0.5)
    _, a = fa.deletion_curve(model, x, 0, torch.rand(1, 8, 8), steps=2, baseline=grey)
    _, b = fa.deletion_curve(model, x, 0, torch.rand(1, 8, 8), steps=2, baseline=0.5)
    np.testing.assert_allclose(a[:, -1], b[:, -1])
    np.testing.assert_allclose(a[:, -1], probs_of(model, torch.full_like(x, 0.5), 0), rtol=1e-5)


def test_model_in_train_mode_is_evaluated_in_eval_mode_and_restored():
    model = tiny_model(5)
    x, m = torch.rand(2, 3, 8, 8), torch.rand(2, 8, 8)
    _, eval_probs = fa.deletion_curve(model, x, 0, m, steps=2)
    model.add_module("drop", nn.Dropout(0.9))  # dropout would scramble a train-mode curve
    model.train().requires_grad_(True)
    before = model_state(model)
    with pytest.warns(TrainModeWarning, match="deletion_curve"):
        _, probs = fa.deletion_curve(model, x, 0, m, steps=2)
    assert before.differences(model_state(model)) == []
    np.testing.assert_allclose(probs, eval_probs, rtol=1e-6)


def test_prob_is_an_alias_of_probability_and_float64_input_works():
    model = tiny_model(6)
    x, m = torch.rand(2, 3, 8, 8), torch.rand(2, 8, 8)
    _, a = fa.deletion_curve(model, x, 1, m, steps=3, score="probability")
    _, b = fa.insertion_curve(model, x, 1, m, steps=3, score="prob")
    _, c = fa.deletion_curve(model, x.double(), 1, m, steps=3, score="prob")
    np.testing.assert_allclose(b, fa.insertion_curve(model, x, 1, m, steps=3)[1])
    np.testing.assert_allclose(c, a, rtol=1e-6)
    res = fa.compare_methods(model, x, 1, {"m": m}, steps=3, score="prob", progress=False)
    np.testing.assert_allclose(res.deletion["m"], a)


def test_blur_keeps_constants_and_smooths():
    c = torch.full((1, 3, 28, 28), 0.3)
    torch.testing.assert_close(fa.blurred(c), c)
    x = torch.rand(1, 1, 28, 28)
    assert fa.blurred(x).std() < 0.5 * x.std()
    assert fa.blurred(x).shape == x.shape
    torch.testing.assert_close(fa.blurred(x), gaussian_blur(x, max(x.shape[-2:]) / 20))  # the one blur
    with pytest.raises(ValueError, match="sigma"):
        fa.blurred(x, sigma=0)


# -- AUC ----------------------------------------------------------------------------------------


def test_auc_agrees_with_numpy_trapezoid():
    rng = np.random.default_rng(0)
    f = np.sort(rng.random(11))
    p = rng.random((4, 11))
    np.testing.assert_allclose(fa.auc(f, p), np.trapezoid(p, f, axis=-1))
    assert fa.auc(f, p[0]) == pytest.approx(float(np.trapezoid(p[0], f)))
    assert isinstance(fa.auc(f, p[0]), float)
    assert fa.auc([0, 1], torch.tensor([1.0, 1.0])) == pytest.approx(1.0)


@pytest.mark.parametrize(
    "fractions, probs, match",
    [([0.0], [1.0], "at least 2"), ([0, 0.5, 0.2], [1, 1, 1], "increasing"), ([0, 1], [1, 2, 3], "2 values")],
)
def test_auc_bad_input(fractions, probs, match):
    with pytest.raises(ValueError, match=match):
        fa.auc(fractions, probs)


# -- bad input ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({"saliency_map": torch.rand(2, 8, 8)}, ValueError, "for 1 image"),
        ({"saliency_map": torch.rand(1, 2, 8, 8)}, ValueError, "C = 3"),
        ({"saliency_map": torch.full((1, 8, 8), float("nan"))}, ValueError, "NaN"),
        ({"saliency_map": [[0.0]]}, TypeError, "tensor"),
        ({"steps": 0}, ValueError, "steps"),
        ({"batch_size": 0}, ValueError, "batch_size"),
        ({"baseline": "black"}, ValueError, "'blur', 'zeros'"),
        ({"baseline": [0.0]}, TypeError, "baseline"),
        ({"baseline": torch.zeros(2, 3, 8, 8)}, ValueError, "broadcast"),
        ({"score": "probs"}, ValueError, "probability"),
        ({"target": [0, 1]}, ValueError, "2 targets"),
    ],
)
def test_deletion_bad_input(kwargs, exc, match):
    args = {"model": tiny_model(), "x": torch.rand(1, 3, 8, 8), "target": 0, "saliency_map": torch.rand(1, 8, 8)}
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        fa.deletion_curve(**args)


def test_images_must_be_a_batch():
    with pytest.raises(ValueError, match=r"x\[None\]"):
        fa.deletion_curve(tiny_model(), torch.rand(3, 8, 8), 0, torch.rand(1, 8, 8))
    with pytest.raises(TypeError, match="float"):
        fa.deletion_curve(tiny_model(), torch.zeros(1, 3, 8, 8, dtype=torch.uint8), 0, torch.rand(1, 8, 8))


# -- several methods, table and plot ------------------------------------------------------------


def test_compare_methods_table_and_plot():
    model = tiny_model(6)
    x = torch.rand(2, 3, 8, 8)
    maps = {"a": torch.rand(2, 8, 8), "random": fa.random_map(x, seed=1)}
    res = fa.compare_methods(model, x, 1, maps, steps=4, progress=False)
    assert res.methods == ["a", "random"]
    for kind in ("deletion", "insertion"):
        aucs = res.aucs(kind)
        assert set(aucs) == {"a", "random"} and aucs["a"].shape == (2,)
        _, single = getattr(fa, f"{kind}_curve")(model, x, 1, maps["a"], steps=4)
        np.testing.assert_allclose(getattr(res, kind)["a"], single)
    table = res.table(image_names=["one", "two"])
    lines = table.splitlines()
    assert "del one" in lines[0] and "ins mean" in lines[0] and len(lines) == 3
    assert f"{res.aucs('deletion')['a'][1]:.2f}" in lines[1]
    fig = fa.plot_curves(res)
    assert len(fig.axes) == 2
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert labels[0].startswith("a (AUC ") and labels[1].startswith("random (AUC ")
    assert fig.axes[0].get_title().startswith("deletion") and fig.axes[1].get_xlabel().startswith("fraction")
    fig.canvas.draw()
    for ax in fig.axes:  # the legend sits below the curves, not over them
        assert ax.get_legend().get_window_extent().y1 < ax.get_window_extent().y0
    method, random = fig.axes[0].get_lines()[:2]
    assert method.get_marker() not in (None, "None", "") and random.get_color() == "gray"
    with pytest.raises(ValueError, match="image"):
        fa.plot_curves(res, image=5)
    with pytest.raises(ValueError, match="maps"):
        fa.compare_methods(model, x, 1, {}, steps=4)
    with pytest.raises(ValueError, match="kinds"):
        fa.compare_methods(model, x, 1, maps, kinds=("both",))


def test_random_map_is_seeded():
    x = torch.rand(2, 1, 5, 6)
    assert fa.random_map(x, 3).shape == (2, 5, 6)
    torch.testing.assert_close(fa.random_map(x, 3), fa.random_map(x, 3))


# -- on a trained model: a map with knowledge of the model beats a random ranking ---------------


def test_occlusion_map_deletes_faster_than_random_on_fashion_cnn(fashion, fashion_test):
    x, y = fashion_test
    x, y = x[:6], y[:6]
    occ = occlusion(fashion, x, y, patch=4, stride=2, progress=False)  # (6, 28, 28): drop of the true class
    _, by_occlusion = fa.deletion_curve(fashion, x, y, occ, steps=14, baseline="zeros")
    _, by_chance = fa.deletion_curve(fashion, x, y, fa.random_map(x, seed=0), steps=14, baseline="zeros")
    better = fa.auc(np.linspace(0, 1, 15), by_occlusion) < fa.auc(np.linspace(0, 1, 15), by_chance)
    assert better.sum() >= 5, (fa.auc(np.linspace(0, 1, 15), by_occlusion), fa.auc(np.linspace(0, 1, 15), by_chance))
    # and insertion the other way round, on average
    _, ins_occ = fa.insertion_curve(fashion, x, y, occ, steps=14, baseline="zeros")
    _, ins_rand = fa.insertion_curve(fashion, x, y, fa.random_map(x, seed=0), steps=14, baseline="zeros")
    assert fa.auc(np.linspace(0, 1, 15), ins_occ).mean() > fa.auc(np.linspace(0, 1, 15), ins_rand).mean()


def test_curves_run_a_channels_last_copy_with_the_plain_models_answers(fashion, fashion_test, monkeypatch):
    """On the CPU the curves run a channels-last copy of the model (1.31x on fashion_cnn); the user's model keeps
    its layout, parameters and flags, and the curves are the plain model's up to float rounding."""
    x, y = fashion_test[0][:10], fashion_test[1][:10]
    maps = {"random": fa.random_map(x, seed=0), "bright pixels": x[:, 0]}
    seen, original = [], fa._endpoint_scores

    def spy(model, xs, *args):
        seen.append((model is fashion, xs.is_contiguous(memory_format=torch.channels_last)))
        return original(model, xs, *args)

    monkeypatch.setattr(fa, "_endpoint_scores", spy)
    before = model_state(fashion)
    strides = [p.stride() for p in fashion.parameters()]
    result = fa.compare_methods(fashion, x, y, maps, steps=5, progress=False)
    alone = fa.deletion_curve(fashion, x, y, maps["random"], steps=5)[1]
    assert seen == [(False, True), (False, True)]  # compare_methods once, deletion_curve once: the copy, channels-last
    assert not before.differences(model_state(fashion)) and [p.stride() for p in fashion.parameters()] == strides
    base = fa._baseline(x, "blur")
    for name, m in maps.items():
        for kind in ("deletion", "insertion"):
            plain = fa._curve(fashion, x, y, m, kind=kind, steps=5, baseline=base, batch_size=32, score="probability",
                              progress=False, endpoints=original(fashion, x, base, y, "probability"))[1]
            np.testing.assert_allclose(getattr(result, kind)[name], plain, rtol=0, atol=1e-6)
    np.testing.assert_allclose(alone, result.deletion["random"], rtol=0, atol=1e-6)
