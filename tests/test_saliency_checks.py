"""Checks of exercise set 03_saliency: correct solutions pass, each typical mistake is diagnosed,
calling coursekit's reference earns nothing, stubs raise CheckFailed."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import coursekit.saliency as sal
from coursekit import cam
from coursekit.checks import CheckFailed, check, run_check
from coursekit.checks import saliency as sc

SEEDS = [0, 1, 2]  # each check draws its own random cases from these seeds


pytestmark = pytest.mark.usefixtures("one_thread")  # small inputs: one thread is as fast, and much faster on a busy machine


def _targets(target, n):
    return torch.as_tensor(target).reshape(-1).expand(n)


def _grad(model, x, target, score=lambda out: out):
    x = x.detach().clone().requires_grad_(True)
    s = score(model(x))[torch.arange(x.shape[0]), _targets(target, x.shape[0])]
    (g,) = torch.autograd.grad(s.sum(), x)
    return g


# -- correct solutions, written as a student would ---------------------------------------------


def vanilla_ok(model, x, target):
    return _grad(model, x, target).abs().amax(dim=1).detach()


def smoothgrad_ok(model, x, target, noise, noise_level=0.15):
    sigma = noise_level * (x.amax(dim=(1, 2, 3)) - x.amin(dim=(1, 2, 3)))
    total = sum(_grad(model, x + sigma.view(-1, 1, 1, 1) * noise[:, k], target) for k in range(noise.shape[1]))
    return (total / noise.shape[1]).detach()


def occlusion_ok(model, x, target, patch, stride, fill=0.0, score="prob", transpose=False):
    return _occlusion(model, x, target, patch, stride, fill, score, transpose)


def _occlusion(model, x, target, patch, stride, fill=0.0, score="prob", transpose=False, count=None, raw=False):
    n, _, h, _ = x.shape
    rows = count or (h - patch) // stride + 1
    t = _targets(target, n)

    def p(batch):
        out = model(batch)
        return (out.softmax(1) if score == "prob" else out)[torch.arange(n), t]

    with torch.no_grad():
        plain = p(x)
        grid = torch.zeros(n, rows, rows)
        for i in range(rows):
            for j in range(rows):
                xo = x.clone()
                xo[:, :, i * stride : i * stride + patch, j * stride : j * stride + patch] = fill
                grid[:, i, j] = p(xo) if raw else plain - p(xo)
    return grid.transpose(1, 2) if transpose else grid


def gradcam_hooks(model, x, target, layer, *, relu=True, reduce="mean", remove=True, keep_frozen=True,
                  upsample=False, score=lambda out: out):
    store = {}
    handle = layer.register_forward_hook(lambda m, i, o: store.__setitem__("A", o))
    try:
        if not keep_frozen:
            model.requires_grad_(True)
        xx = x.detach().clone().requires_grad_(True)
        s = score(model(xx))[torch.arange(x.shape[0]), _targets(target, x.shape[0])]
    finally:
        if remove:
            handle.remove()
    a = store["A"]
    (g,) = torch.autograd.grad(s.sum(), a)
    if reduce == "mean":
        m = (g.mean(dim=(2, 3), keepdim=True) * a).sum(1)
    elif reduce == "sum":
        m = (g.sum(dim=(2, 3), keepdim=True) * a).sum(1)
    else:  # HiResCAM
        m = (g * a).sum(1)
    m = F.relu(m) if relu else m
    if upsample:
        m = F.interpolate(m[:, None], size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    return m.detach()


def guided_hooks(model, x, target, *, rule="guided", remove=True):
    def guide(module, grad_input, grad_output):
        if rule == "guided":
            return (grad_input[0].clamp(min=0),)
        if rule == "deconvnet":
            return (grad_output[0].clamp(min=0),)
        return None

    handles = [m.register_full_backward_hook(guide) for m in model.modules() if isinstance(m, nn.ReLU)]
    try:
        g = _grad(model, x, target)
    finally:
        if remove:
            for h in handles:
                h.remove()
    return g.detach()


# -- helpers ------------------------------------------------------------------------------------


def verdict(name, fn, seed):
    report = run_check(name, fn, seed=seed)
    return report, [p.message for p in report.parts]


def assert_full(name, fn):
    for seed in SEEDS:
        report, _ = verdict(name, fn, seed)
        assert report.earned == report.points, (seed, report.summary())


def assert_diagnosed(name, fn, needle, part=None):
    """The mistake costs points and the message names it, for every seed."""
    for seed in SEEDS:
        report, messages = verdict(name, fn, seed)
        assert report.earned < report.points, (seed, report.summary())
        hit = [m for m in messages if needle in m]
        assert hit, (seed, needle, report.summary())
        if part is not None:
            assert needle in messages[part], (seed, report.summary())


# -- points are as the notebook says ------------------------------------------------------------


@pytest.mark.parametrize("name, points", [("vanilla", 4), ("smoothgrad", 3), ("occlusion", 3), ("gradcam", 4), ("guided", 3)])
def test_points_per_exercise(name, points):
    report = run_check(f"saliency.{name}", lambda *a, **k: None, seed=0)
    assert report.points == points


@pytest.mark.parametrize(
    "name, fn",
    [("vanilla", vanilla_ok), ("smoothgrad", smoothgrad_ok), ("occlusion", occlusion_ok),
     ("gradcam", gradcam_hooks), ("guided", guided_hooks)],
)
def test_correct_solutions_get_full_points(name, fn):
    assert_full(f"saliency.{name}", fn)


def test_check_prints_and_returns_points(capsys):
    assert check("saliency.vanilla", vanilla_ok) == 4.0
    out = capsys.readouterr()
    assert "saliency.vanilla: 4/4 points" in out.out and out.err == ""


# -- stubs and reference calls ------------------------------------------------------------------


def _stub(*args, **kwargs):
    raise NotImplementedError()


@pytest.mark.parametrize("name", ["vanilla", "smoothgrad", "occlusion", "gradcam", "guided"])
def test_stub_raises_checkfailed(name, capsys):
    with pytest.raises(CheckFailed):
        check(f"saliency.{name}", _stub)
    out = capsys.readouterr()
    assert "not implemented yet" in out.out and out.err == ""


@pytest.mark.parametrize(
    "name, fn",
    [
        ("vanilla", lambda m, x, t: sal.vanilla_saliency(m, x, t)),
        ("vanilla", lambda m, x, t: sal.to_map(sal.input_gradient(m, x, t))),  # the private engine is blocked too
        ("smoothgrad", lambda m, x, t, noise, nl=0.15: sal.smoothgrad(
            m, x, t, noise=noise * (nl * (x.amax(dim=(1, 2, 3)) - x.amin(dim=(1, 2, 3)))).view(-1, 1, 1, 1, 1))),
        ("occlusion", lambda m, x, t, patch, stride, fill=0.0: sal.occlusion(
            m, x, t, patch=patch, stride=stride, baseline=fill, progress=False)[:, ::stride, ::stride]),
        ("gradcam", lambda m, x, t, layer: cam.gradcam(m, x, t, layer)),
        ("gradcam", lambda m, x, t, layer: cam.GradCAM(m, layer)(x, t)),
        ("guided", lambda m, x, t: sal.guided_backprop(m, x, t)),
        ("guided", lambda m, x, t: sal.deconvnet(m, x, t)),
        ("guided", lambda m, x, t: cam.guided_gradcam(m, x, t, m[6]) / cam.gradcam(m, x, t, m[6])[:, None]),
        ("smoothgrad", lambda m, x, t, noise, nl=0.15: sal.integrated_gradients(m, x, t)),
    ],
)
def test_calling_the_reference_earns_nothing(name, fn, capsys):
    report = run_check(f"saliency.{name}", fn, seed=0)
    assert report.earned == 0, report.summary()
    assert "coursekit" in report.parts[0].message
    with pytest.raises(CheckFailed):
        check(f"saliency.{name}", fn)
    assert capsys.readouterr().err == ""


def test_gradcam_with_coursekit_record_is_blocked():
    from coursekit.hooks import record

    def via_record(model, x, target, layer):
        with record(model, layer, gradients=True) as rec:
            model(x)[:, target].sum().backward()
        return rec.gradients

    report = run_check("saliency.gradcam", via_record, seed=0)
    assert report.earned == 0 and "record()" in report.parts[0].message


def test_blocking_is_undone_after_the_check():
    run_check("saliency.gradcam", lambda *a: cam.gradcam(*a), seed=0)
    run_check("saliency.guided", lambda *a: sal.guided_backprop(*a), seed=0)
    model = sc.random_cnn(0)
    x = torch.rand(1, 3, 16, 16)
    assert cam.gradcam(model, x, 1, model[6]).shape == (1, 16, 16)
    assert sal.guided_backprop(model, x, 1).shape == x.shape
    assert sal.vanilla_saliency(model, x, 1).shape == (1, 16, 16)


# -- vanilla saliency mistakes ------------------------------------------------------------------


def test_vanilla_missing_abs():
    assert_diagnosed("saliency.vanilla", lambda m, x, t: _grad(m, x, t).amax(dim=1), "no absolute value", part=1)


def test_vanilla_no_channel_reduction():
    assert_diagnosed("saliency.vanilla", lambda m, x, t: _grad(m, x, t).abs(), "maximum of the absolute gradient", part=0)


def test_vanilla_mean_instead_of_max():
    assert_diagnosed("saliency.vanilla", lambda m, x, t: _grad(m, x, t).abs().mean(dim=1), "mean over channels instead", part=1)


def test_vanilla_not_detached():
    def attached(m, x, t):
        x = x.detach().clone().requires_grad_(True)
        s = m(x)[torch.arange(x.shape[0]), _targets(t, x.shape[0])]
        (g,) = torch.autograd.grad(s.sum(), x, create_graph=True)
        return g.abs().amax(dim=1)

    assert_diagnosed("saliency.vanilla", attached, ".detach()", part=0)


def test_vanilla_softmax_gradient():
    assert_diagnosed(
        "saliency.vanilla", lambda m, x, t: _grad(m, x, t, score=lambda o: o.softmax(1)).abs().amax(dim=1),
        "softmax probability", part=1,
    )


def test_vanilla_first_target_only():
    def first(m, x, t):
        t0 = int(torch.as_tensor(t).reshape(-1)[0])
        return _grad(m, x, t0).abs().amax(dim=1)

    assert_diagnosed("saliency.vanilla", first, "first image's target", part=2)


def test_vanilla_modifies_callers_x():
    def inplace(m, x, t):
        x.requires_grad_(True)
        s = m(x)[torch.arange(x.shape[0]), _targets(t, x.shape[0])]
        s.sum().backward()
        return x.grad.abs().amax(dim=1).detach()

    assert_diagnosed("saliency.vanilla", inplace, "changed the caller's x", part=2)


def test_vanilla_unfreezes_model():
    def unfreeze(m, x, t):
        m.requires_grad_(True)
        return vanilla_ok(m, x, t)

    assert_diagnosed("saliency.vanilla", unfreeze, "requires_grad", part=2)


# -- SmoothGrad mistakes ------------------------------------------------------------------------


def test_smoothgrad_unscaled_noise():
    def unscaled(m, x, t, noise, noise_level=0.15):
        total = sum(_grad(m, x + noise_level * noise[:, k], t) for k in range(noise.shape[1]))
        return total / noise.shape[1]

    assert_diagnosed("saliency.smoothgrad", unscaled, "not scaled to the image's value range", part=1)


def test_smoothgrad_batch_range():
    def batch_range(m, x, t, noise, noise_level=0.15):
        sigma = noise_level * (x.max() - x.min())
        total = sum(_grad(m, x + sigma * noise[:, k], t) for k in range(noise.shape[1]))
        return total / noise.shape[1]

    assert_diagnosed("saliency.smoothgrad", batch_range, "whole batch's range", part=1)


def test_smoothgrad_sum_and_magnitude_and_no_noise():
    assert_diagnosed("saliency.smoothgrad", lambda *a: smoothgrad_ok(*a) * a[3].shape[1], "summed the gradients")

    def magnitude(m, x, t, noise, noise_level=0.15):
        sigma = noise_level * (x.amax(dim=(1, 2, 3)) - x.amin(dim=(1, 2, 3)))
        total = sum(_grad(m, x + sigma.view(-1, 1, 1, 1) * noise[:, k], t).abs() for k in range(noise.shape[1]))
        return total / noise.shape[1]

    assert_diagnosed("saliency.smoothgrad", magnitude, "averaged |gradient|")
    assert_diagnosed("saliency.smoothgrad", lambda m, x, t, noise, nl=0.15: _grad(m, x, t), "no noise was added")


def test_smoothgrad_returns_map():
    assert_diagnosed("saliency.smoothgrad", lambda *a: smoothgrad_ok(*a).abs().amax(dim=1), "return the averaged gradient", part=0)


# -- occlusion mistakes -------------------------------------------------------------------------


def test_occlusion_mistakes():
    name = "saliency.occlusion"
    assert_diagnosed(name, lambda *a: _occlusion(*a, raw=True), "the DROP", part=1)
    assert_diagnosed(name, lambda *a: occlusion_ok(*a, score="logit"), "drop of the logit", part=1)
    assert_diagnosed(name, lambda m, x, t, patch, stride, fill=0.0: occlusion_ok(m, x, t, patch, stride, 0.0),
                     "filled with 0", part=1)
    assert_diagnosed(name, lambda *a: occlusion_ok(*a, transpose=True), "swapped", part=1)
    assert_diagnosed(name, lambda *a: -occlusion_ok(*a), "wrong sign", part=1)


def test_occlusion_window_count():
    def ceil_count(m, x, t, patch, stride, fill=0.0):
        return _occlusion(m, x, t, patch, stride, fill, count=(16 - patch) // stride + 2)

    assert_diagnosed("saliency.occlusion", ceil_count, "(H - patch) // stride + 1", part=0)


# -- Grad-CAM mistakes --------------------------------------------------------------------------


def test_gradcam_value_mistakes():
    name = "saliency.gradcam"
    assert_diagnosed(name, lambda *a: gradcam_hooks(*a, relu=False), "no ReLU", part=1)
    assert_diagnosed(name, lambda *a: gradcam_hooks(*a, reduce="sum"), "summed over positions", part=1)
    assert_diagnosed(name, lambda *a: gradcam_hooks(*a, reduce="none"), "HiResCAM", part=1)
    assert_diagnosed(name, lambda *a: gradcam_hooks(*a, score=lambda o: o.softmax(1)), "softmax probability", part=1)


def test_gradcam_upsampled_and_normalised():
    name = "saliency.gradcam"
    assert_diagnosed(name, lambda *a: gradcam_hooks(*a, upsample=True), "layer's resolution", part=0)

    def normalised(*a):
        m = gradcam_hooks(*a)
        lo, hi = m.amin(dim=(1, 2), keepdim=True), m.amax(dim=(1, 2), keepdim=True)
        return (m - lo) / (hi - lo)

    assert_diagnosed(name, normalised, "normalised to [0, 1]", part=1)


def test_gradcam_hooks_left_behind():
    assert_diagnosed("saliency.gradcam", lambda *a: gradcam_hooks(*a, remove=False), "hook(s) are still registered", part=2)


def test_gradcam_unfrozen_model():
    assert_diagnosed("saliency.gradcam", lambda *a: gradcam_hooks(*a, keep_frozen=False), "requires_grad", part=2)


# -- guided backprop mistakes -------------------------------------------------------------------


def test_guided_mistakes():
    name = "saliency.guided"
    assert_diagnosed(name, lambda *a: guided_hooks(*a, rule="plain"), "plain gradient", part=1)
    assert_diagnosed(name, lambda *a: guided_hooks(*a, rule="deconvnet"), "DeconvNet", part=1)
    assert_diagnosed(name, lambda *a: guided_hooks(*a).abs(), "absolute value", part=1)
    assert_diagnosed(name, lambda *a: guided_hooks(*a).abs().amax(dim=1), "return the attribution", part=0)
    assert_diagnosed(name, lambda *a: guided_hooks(*a, remove=False), "hook(s) are still registered", part=2)


def test_student_exception_is_reported_not_raised():
    def broken(m, x, t):
        raise IndexError("index 7 is out of bounds")

    report = run_check("saliency.vanilla", broken, seed=0)
    assert report.earned == 0 and "IndexError" in report.parts[0].message


def test_random_cases_give_informative_maps():
    """The Grad-CAM case's class has positive and negative evidence (so a missing ReLU shows)."""
    for seed in range(5):
        model = sc.random_cnn(seed)
        x = torch.rand(3, 3, 16, 16)
        act, grad, _ = sc._gradcam_at_layer(model, x, sc._mixed_sign_class(model, x, model[6]), model[6])
        raw = (grad.mean(dim=(2, 3), keepdim=True) * act).sum(1)
        assert (raw > 0).any() and (raw < 0).any()
        assert not torch.allclose(sal.guided_backprop(model, x, 1), sal.deconvnet(model, x, 1))
