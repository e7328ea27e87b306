"""The shared engines: guard, input check, gradient path, rules engine, input optimisation, reference marker."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from coursekit import _reference, cam, gradients, optimize, rules, saliency
from coursekit.guard import TrainModeWarning, guarded, model_state
from coursekit.inputs import check_images, target_indices, target_scores


@pytest.fixture
def xs(fashion_test):
    return fashion_test[0][:4]


def small_bn_net(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(inplace=True), nn.Dropout(0.5),
        nn.Flatten(), nn.Linear(4 * 8 * 8, 5),
    )


# ----------------------------------------------------------------------------------------------
# the guard


def test_guard_restores_everything_even_on_error():
    net = small_bn_net().train()
    net[0].weight.requires_grad_(True)
    user_hook = net[0].register_forward_hook(lambda *a: None)
    before = model_state(net)
    with pytest.raises(RuntimeError, match="boom"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with guarded(net, inplace_off=True, structure=True):
            assert not net.training and not net[2].inplace
            assert not any(p.requires_grad for p in net.parameters())
            net[1].register_forward_hook(lambda *a: None)      # left behind by a careless method
            net[5] = nn.Linear(256, 5)                         # a canonizer's rewrite
            with torch.no_grad():
                net[0].weight.mul_(2)                          # a value written in place
                net[1].running_mean.add_(1)
            raise RuntimeError("boom")
    assert before.differences(model_state(net)) == []
    assert len(net[0]._forward_hooks) == 1
    user_hook.remove()


def test_guard_warns_once_for_a_model_in_train_mode_and_keeps_batchnorm_statistics():
    net = small_bn_net().train()
    x = torch.rand(2, 3, 8, 8)
    stats = net[1].running_mean.clone()
    with pytest.warns(TrainModeWarning, match="train mode") as record:
        g_train = saliency.input_gradient(net, x, 1)
    assert len(record) == 1
    assert record[0].filename == __file__  # the warning points at the caller, not at coursekit
    assert net.training and all(m.training for m in net.modules())
    assert torch.equal(net[1].running_mean, stats)
    g_eval = saliency.input_gradient(net.eval(), x, 1)
    assert torch.equal(g_train, g_eval)


@pytest.mark.parametrize("method", [
    lambda m, x: saliency.vanilla_saliency(m, x, 1),
    lambda m, x: saliency.guided_backprop(m, x, 1),
    lambda m, x: saliency.deconvnet(m, x, 1),
    lambda m, x: saliency.smoothgrad(m, x, 1, n_samples=2, seed=0),
    lambda m, x: saliency.integrated_gradients(m, x, 1, steps=3),
    lambda m, x: saliency.occlusion(m, x, 1, patch=4, stride=4, progress=False),
    lambda m, x: cam.gradcam(m, x, 1, layer="0"),
    lambda m, x: cam.ScoreCAM(m, "0")(x, 1),
])
def test_every_method_keeps_a_train_mode_model_intact(method):
    net = small_bn_net().train()
    before = model_state(net)
    with pytest.warns(TrainModeWarning):
        method(net, torch.rand(2, 3, 8, 8))
    assert before.differences(model_state(net)) == []


def test_model_state_reports_what_changed():
    net = small_bn_net().eval()
    before = model_state(net)
    net.train()
    net[0].register_forward_hook(lambda *a: None)
    diffs = " ".join(before.differences(model_state(net)))
    assert "train/eval mode" in diffs and "hook" in diffs


# ----------------------------------------------------------------------------------------------
# the input check and the target normaliser


def test_float64_input_is_converted_not_crashing(fashion):
    x = torch.rand(2, 1, 28, 28, dtype=torch.float64)
    g = saliency.input_gradient(fashion, x, 3)
    assert g.dtype == torch.float32
    torch.testing.assert_close(g, saliency.input_gradient(fashion, x.float(), 3))
    assert fashion(x).dtype == torch.float32


@pytest.mark.parametrize("method", [
    saliency.vanilla_saliency, saliency.guided_backprop, saliency.deconvnet,
    lambda m, x, t: saliency.smoothgrad(m, x, t, n_samples=2),
    lambda m, x, t: cam.gradcam(m, x, t, normalize=True),
])
def test_a_nan_pixel_is_an_error_not_an_empty_map(fashion, method):
    x = torch.rand(1, 1, 28, 28)
    x[0, 0, 3, 4] = float("nan")
    with pytest.raises(ValueError, match=r"NaN or infinite value\(s\) \(first at index \(0, 0, 3, 4\)\)"):
        method(fashion, x, 3)


@pytest.mark.parametrize("bad, error, match", [
    (torch.rand(3, 8, 8), ValueError, "x.unsqueeze"),
    (torch.rand(0, 3, 8, 8), ValueError, "empty batch"),
    ((torch.rand(1, 3, 8, 8) * 255).byte(), TypeError, "/ 255"),
    ([[0.5]], TypeError, "torch.Tensor"),
])
def test_check_images_explains(bad, error, match):
    with pytest.raises(error, match=match):
        check_images(bad)


def test_check_images_pixel_range():
    with pytest.raises(ValueError, match="divide by 255"):
        check_images(torch.full((1, 3, 2, 2), 200.0), pixel_range=True)
    with pytest.raises(ValueError, match="normalises itself"):
        check_images(torch.full((1, 3, 2, 2), -1.5), pixel_range=True)


def test_predict_on_a_plain_model_checks_its_input():
    import coursekit as ck

    with pytest.raises(ValueError, match="4-d batch"):
        ck.predict(small_bn_net(), torch.rand(3, 8, 8), classes=list("abcde"))


def test_target_indices_and_scores():
    logits = torch.arange(12.0).view(3, 4)
    assert target_indices(2, 3).tolist() == [2, 2, 2]
    assert target_indices([1, 0, 3], 3, repeats=2).tolist() == [1, 1, 0, 0, 3, 3]
    assert target_scores(logits, [1, 0, 3]).tolist() == [1.0, 4.0, 11.0]
    assert target_scores(logits, lambda out: out.sum(1)).tolist() == [6.0, 22.0, 38.0]
    for bad, err in [(1.5, TypeError), (True, TypeError), ([1, 2], ValueError), (None, TypeError)]:
        with pytest.raises(err):
            target_indices(bad, 3)
    with pytest.raises(ValueError, match="out of range"):
        target_scores(logits, 4)


# ----------------------------------------------------------------------------------------------
# the gradient path


def test_layer_gradient_matches_a_hook_on_the_full_graph(fashion, xs):
    act, grad = gradients.layer_gradient(fashion, xs, 3, "features.3")
    assert act.shape == grad.shape and act.dim() == 4
    store = {}
    h = fashion.net.features[3].register_forward_hook(lambda m, i, o: store.__setitem__("A", o))
    try:
        xi = xs.clone().requires_grad_(True)
        out = fashion(xi)
        (g,) = torch.autograd.grad(out[:, 3].sum(), store["A"])
    finally:
        h.remove()
    torch.testing.assert_close(act, store["A"].detach())
    torch.testing.assert_close(grad, g)


def test_smooth_and_integrate_wrap_any_method(fashion, xs):
    noise = 0.1 * torch.randn(xs.shape[0], 3, *xs.shape[1:], generator=torch.Generator().manual_seed(0))
    sg_guided = gradients.smooth(saliency.guided_backprop, noise=noise, batch_size=4)(fashion, xs, 2)
    slow = torch.stack([
        torch.stack([saliency.guided_backprop(fashion, xs[i:i + 1] + noise[i, k], 2)[0] for k in range(3)]).mean(0)
        for i in range(xs.shape[0])
    ])
    torch.testing.assert_close(sg_guided, slow, rtol=1e-5, atol=1e-7)
    ig = gradients.integrate(saliency.input_gradient, steps=16)(fashion, xs, 2)
    torch.testing.assert_close(ig, saliency.integrated_gradients(fashion, xs, 2, steps=16))


def test_gradient_batches_give_the_same_result(fashion, xs):
    torch.testing.assert_close(gradients.gradient(fashion, xs, [1, 2, 3, 4][: xs.shape[0]], batch_size=1),
                               gradients.gradient(fashion, xs, [1, 2, 3, 4][: xs.shape[0]]))


# ----------------------------------------------------------------------------------------------
# the rules engine


def test_uncovered_layer_is_named():
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.GELU(), nn.Flatten(), nn.Linear(8, 2))
    with pytest.raises(rules.UncoveredLayerError, match=r"layer '2' \(GELU\) has no rule in the guided backprop"):
        saliency.guided_backprop(net, torch.rand(1, 1, 4, 4), 0)
    assert model_state(net, values=False).hooks == [0] * 6


def test_a_composite_extends_with_a_rule_per_type_or_name():
    torch.manual_seed(0)
    # the 1x1 convolution between GELU and ReLU mixes signs, so a rule at the GELU matters
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.GELU(), nn.Conv2d(4, 4, 1), nn.ReLU(), nn.Flatten(), nn.Linear(16, 2))
    x = torch.rand(1, 1, 4, 4)
    by_type = rules.GUIDED.with_rules({nn.GELU: rules.Pass()})
    by_name = rules.GUIDED.with_rules(names={"1": rules.Pass()})
    torch.testing.assert_close(gradients.gradient(net, x, 0, composite=by_name),
                               gradients.gradient(net, x, 0, composite=by_type))
    # a rule given by type acts on the GELU exactly as a hand-written clamp at its output would
    got = gradients.gradient(net, x, 0, composite=rules.GUIDED.with_rules({nn.GELU: rules.GuidedRelu()}))
    xi = x.clone().requires_grad_(True)
    h = xi
    for i, m in enumerate(net):
        h = m(h)
        if i in (1, 3):  # the GELU and the ReLU
            h.register_hook(lambda g: g.clamp(min=0))
    (expected,) = torch.autograd.grad(h[:, 0].sum(), xi)
    torch.testing.assert_close(got, expected)
    plain_gelu = gradients.gradient(net, x, 0, composite=by_type)
    assert not torch.allclose(got, plain_gelu)



class Doubling(rules.BackwardRule):
    """Passes twice the gradient: a BackwardRule with a result easy to predict."""

    def backward(self, module, inputs, output, grad_out):
        (x,) = inputs
        (g,) = torch.autograd.grad(module(x), x, grad_out)
        return (2 * g,)


def test_backward_rule_replaces_the_modules_backward(fashion, xs):
    comp = rules.Composite({nn.Linear: Doubling(), nn.ReLU: rules.Pass()}, name="doubling")
    n_linear = sum(isinstance(m, nn.Linear) for m in fashion.modules())
    g = gradients.gradient(fashion, xs, 1, composite=comp)
    torch.testing.assert_close(g, 2**n_linear * saliency.input_gradient(fashion, xs, 1))


class ScaleFirstConv(rules.Canonizer):
    def apply(self, model):
        conv = model.net.features[0]
        old = conv.weight.data.clone()
        conv.weight.data.mul_(3)

        def undo():
            conv.weight.data.copy_(old)

        return undo


def test_canonizer_is_reverted_even_on_error(fashion, xs):
    before = model_state(fashion)
    plain = gradients.gradient(fashion, xs, 1)
    scaled = gradients.gradient(fashion, xs, 1, canonizers=[ScaleFirstConv()])
    assert not torch.allclose(plain, scaled)
    with pytest.raises(ValueError):
        gradients.gradient(fashion, xs, 99, canonizers=[ScaleFirstConv()])
    assert before.differences(model_state(fashion)) == []


# ----------------------------------------------------------------------------------------------
# the input-optimisation engine


def _quadratic(target):
    x = torch.zeros_like(target, requires_grad=True)
    return x, lambda: -((x - target) ** 2).flatten(1).sum(1)


@pytest.mark.parametrize("rule, steps", [
    (optimize.Adam(0.1), 60), (optimize.NormalizedAscent(0.05), 40), (optimize.LBFGS(1.0), 5),
])
def test_every_step_rule_raises_the_value(rule, steps):
    target = torch.rand(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    x, value = _quadratic(target)
    hist = optimize.ascend(value, [x], rule, steps, progress=False)
    assert hist.shape == (steps, 2)
    assert (value().detach() > 0.5 * hist[0]).all()  # at least halved the distance (negative value)
    assert float(value().sum()) > float(hist[0].sum()) * 0.05


def test_sign_step_stays_in_the_ball_and_the_box():
    origin = torch.rand(2, 3, 5, 5, generator=torch.Generator().manual_seed(1))
    x = origin.clone().requires_grad_(True)
    rule = optimize.SignStep(step_size=0.03, eps=0.05, origin=origin)
    optimize.ascend(lambda: x.flatten(1).sum(1), [x], rule, 5, progress=False)
    assert float((x - origin).abs().max()) <= 0.05 + 1e-6
    assert float(x.min()) >= 0 and float(x.max()) <= 1
    # with a positive gradient everywhere every pixel moved up by eps, unless the box stopped it
    torch.testing.assert_close(x.detach(), (origin + 0.05).clamp(max=1))


def test_l2_projection():
    origin = torch.zeros(1, 1, 2, 2)
    out = optimize.project(torch.full((1, 1, 2, 2), 0.5), origin, eps=0.5, norm="l2", box=None)
    assert abs(float(out.norm()) - 0.5) < 1e-6


def test_octaves_runs_smallest_first_and_returns_input_size():
    sizes = []

    def run(img, octave):
        sizes.append(tuple(img.shape[-2:]))
        return img + 0.1

    out = optimize.octaves(torch.zeros(1, 3, 64, 48), run, n_octaves=3, scale=2.0)
    assert sizes == [(16, 12), (32, 24), (64, 48)]
    assert out.shape == (1, 3, 64, 48)
    torch.testing.assert_close(out, torch.full_like(out, 0.3))  # the detail of every octave carried up


def test_step_rules_reject_bad_arguments():
    with pytest.raises(ValueError, match="norm"):
        optimize.SignStep(0.1, norm="l1")
    with pytest.raises(ValueError, match="both eps and origin"):
        optimize.SignStep(0.1, eps=0.1)
    with pytest.raises(TypeError, match="Optimizer"):
        optimize.ascend(lambda: torch.zeros(1), [], "adam", 3)


# ----------------------------------------------------------------------------------------------
# the reference marker


def test_reference_blocking_is_scoped():
    @_reference.reference
    def f():
        return 1

    with _reference.blocked([f]):
        with pytest.raises(_reference.ReferenceBlocked):
            f()
    assert f() == 1


def test_progress_bars_obey_tqdm_disable(monkeypatch, capsys):
    """TQDM_DISABLE=1 hides coursekit's bars (headless notebook runs, grading); progress=False hides them
    whatever the environment; otherwise a bar is drawn."""
    from coursekit.progress import progress_bar

    monkeypatch.delenv("COURSEKIT_STATIC", raising=False)
    monkeypatch.setenv("TQDM_DISABLE", "1")
    assert progress_bar(range(3), progress=True).disable
    monkeypatch.delenv("TQDM_DISABLE")
    monkeypatch.setenv("COURSEKIT_STATIC", "1")  # headless runs that save or render the notebook
    assert progress_bar(range(3), progress=True).disable
    monkeypatch.delenv("COURSEKIT_STATIC")
    assert progress_bar(range(3), progress=False).disable
    bar = progress_bar(range(3), progress=True, desc="demo")
    assert not bar.disable
    bar.close()
    x = torch.zeros(1, 2, requires_grad=True)
    monkeypatch.setenv("TQDM_DISABLE", "1")
    capsys.readouterr()
    optimize.ascend(lambda: -(x - 1).pow(2).sum(1), [x], optimize.Adam(0.1), steps=3, progress=True)
    assert "it/s" not in capsys.readouterr().err
