"""coursekit.maximize: objectives compose, the engine raises every objective, the priors do what they claim."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from coursekit.guard import model_state
from coursekit.hooks import record
from coursekit.maximize import (
    Context,
    FourierImage,
    MaximizationResult,
    Objective,
    PixelImage,
    ascent_step,
    blur_every,
    channel,
    class_log_probability,
    class_logit,
    decay,
    edge_energy,
    edge_energy_prior,
    feature_match,
    fourier_image,
    gaussian_blur,
    high_frequency_energy,
    jitter,
    l2_prior,
    layer_energy,
    maximize,
    neuron,
    objectives,
    only,
    pad,
    per_image,
    pixel_image,
    random_scale,
    relative_l2,
    stack,
    total_variation,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # small inputs: one thread is as fast, and much faster on a busy machine


def _context(model, x, layers):
    with record(model, layers) as rec:
        logits = model(x)
        return Context(image=x, input=x, logits=logits, activations=dict(rec.outputs))


# ----------------------------------------------------------------------------------------------
# objectives


def test_objectives_pick_the_right_values(fashion):
    x = torch.rand(3, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    ctx = _context(fashion, x, ["net.features.3", "net.classifier.2"])
    a = ctx.activations["net.features.3"]
    torch.testing.assert_close(channel("net.features.3", 5)(ctx), a[:, 5].mean((1, 2)))
    torch.testing.assert_close(channel("net.features.3", [1, 2, 3])(ctx), torch.stack([a[0, 1].mean(), a[1, 2].mean(), a[2, 3].mean()]))
    torch.testing.assert_close(neuron("net.features.3", 7)(ctx), a[:, 7, 14, 14])
    torch.testing.assert_close(neuron("net.features.3", 7, y=2, x=3)(ctx), a[:, 7, 2, 3])
    torch.testing.assert_close(channel("net.classifier.2", 4)(ctx), ctx.activations["net.classifier.2"][:, 4])
    torch.testing.assert_close(class_logit(6)(ctx), ctx.logits[:, 6])
    torch.testing.assert_close(class_logit([0, 1, 2])(ctx), ctx.logits.diagonal())
    torch.testing.assert_close(class_log_probability(6)(ctx), ctx.logits.log_softmax(1)[:, 6])
    torch.testing.assert_close(layer_energy("net.features.3")(ctx), a.pow(2).mean((1, 2, 3)))
    torch.testing.assert_close(l2_prior()(ctx), (x - 0.5).pow(2).sum((1, 2, 3)))
    torch.testing.assert_close(edge_energy_prior()(ctx), edge_energy(x))
    target = a[:1] * 0.5
    expected = -(a - target).pow(2).sum((1, 2, 3)) / target.pow(2).sum()
    torch.testing.assert_close(feature_match("net.features.3", target)(ctx), expected)
    tv = (x[..., :-1, 1:] - x[..., :-1, :-1]).pow(2) + (x[..., 1:, :-1] - x[..., :-1, :-1]).pow(2)
    torch.testing.assert_close(total_variation()(ctx), (tv + 1e-8).sum((1, 2, 3)))
    picked = per_image([class_logit(1), channel("net.features.3", 0), class_logit(9)])(ctx)
    torch.testing.assert_close(picked, torch.stack([ctx.logits[0, 1], a[1, 0].mean(), ctx.logits[2, 9]]))


def test_objectives_compose_like_numbers(fashion):
    x = torch.rand(2, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    ctx = _context(fashion, x, ["net.features.8"])
    a, b = channel("net.features.8", 3), class_logit(2)
    va, vb = a(ctx), b(ctx)
    cases = {
        "a + 0.5 * b": (a + 0.5 * b, va + 0.5 * vb),
        "a - b": (a - b, va - vb),
        "-a": (-a, -va),
        "a * b": (a * b, va * vb),
        "a / 4": (a / 4, va / 4),
        "2 - a": (2 - a, 2 - va),
        "a + 1": (a + 1, va + 1),
        "sum": (sum([a, b, a]), 2 * va + vb),
        "b * 3": (b * 3, 3 * vb),
    }
    for name, (obj, expected) in cases.items():
        assert isinstance(obj, Objective), name
        torch.testing.assert_close(obj(ctx), expected, msg=name)
    combo = objectives.channel("net.blocks.3", 5) + 0.5 * objectives.class_logit(65)
    assert repr(combo) == "channel('net.blocks.3', 5) + 0.5 * class_logit(65)"
    assert combo.layers == ("net.blocks.3",) and combo.targets == (65,)
    assert repr(a - (b + a)).endswith("- (class_logit(2) + channel('net.features.8', 3))")


def test_objective_bad_input():
    a = class_logit(1)
    with pytest.raises(TypeError):
        a * "two"
    with pytest.raises(TypeError):
        a + None
    with pytest.raises(ZeroDivisionError):
        a / 0
    with pytest.raises(TypeError, match="by string"):
        channel(torch.nn.ReLU(), 0)
    with pytest.raises(TypeError):
        Objective("not callable")
    with pytest.raises(TypeError):
        per_image([a, "b"])


def test_objective_errors_name_the_problem(fashion):
    x = torch.rand(2, 1, 28, 28)
    ctx = _context(fashion, x, ["net.features.3", "net.classifier.2"])
    with pytest.raises(ValueError, match="has 32 channels"):
        channel("net.features.3", 32)(ctx)
    with pytest.raises(ValueError, match="got 3 channel indexs for a batch of 2"):
        channel("net.features.3", [0, 1, 2])(ctx)
    with pytest.raises(ValueError, match="outside"):
        neuron("net.features.3", 0, y=40)(ctx)
    with pytest.raises(ValueError, match="use channel"):
        neuron("net.classifier.2", 0)(ctx)
    with pytest.raises(KeyError, match="not recorded"):
        channel("net.features.8", 0)(ctx)
    with pytest.raises(ValueError, match="batch of 2"):
        per_image([class_logit(1)] * 3)(ctx)


# ----------------------------------------------------------------------------------------------
# the engine raises every objective


@pytest.mark.parametrize(
    "objective",
    [
        channel("net.features.3", 4),
        channel("net.features.8", 10),
        channel("net.classifier.1", 7),  # a unit of the fully connected layer (before its ReLU)
        class_logit(8),
        layer_energy("net.features.6"),
        channel("net.features.8", 10) + 0.5 * class_logit(3) - 0.01 * edge_energy_prior(),
    ],
    ids=repr,
)
@pytest.mark.parametrize("optimizer", ["adam", "normalized_sgd"])
def test_every_objective_rises(fashion, objective, optimizer):
    lr = 0.05 if optimizer == "adam" else 0.02
    r = maximize(fashion, objective, batch=2, steps=25, lr=lr, optimizer=optimizer, seed=3, progress=False)
    h = r.history  # (steps, N)
    assert h.shape == (25, 2)
    start, end = h[0], h[-3:].mean(0)
    assert (end > start + 0.1 * start.abs() + 1e-3).all(), f"{objective}: {start.tolist()} -> {end.tolist()}"


def test_a_neuron_rises(fashion):
    # a unit that is switched off (ReLU at 0) for the starting picture has no gradient: pick a live one
    start = pixel_image((1, 1, 28, 28), seed=3).image().detach()
    with record(fashion, "net.features.8") as rec:
        fashion(start)
    c = int(rec.activations["net.features.8"][0, :, 7, 7].argmax())
    r = maximize(fashion, neuron("net.features.8", c), steps=20, lr=0.05, seed=3, progress=False)
    assert float(r.history[-1, 0]) > 2 * float(r.history[0, 0]) > 0


def test_result_and_class_probabilities(fashion):
    before = model_state(fashion)
    r = maximize(fashion, class_logit([2, 5]), batch=2, steps=15, seed=0, progress=False)
    assert before.differences(model_state(fashion)) == []
    assert all(p.grad is None and not p.requires_grad for p in fashion.parameters())
    assert isinstance(r, MaximizationResult)
    assert r.image.shape == (2, 1, 28, 28) and not r.image.requires_grad
    assert 0 <= float(r.image.min()) and float(r.image.max()) <= 1
    assert r.probabilities.shape == (15, 2) and r.final_probabilities.shape == (2,)
    with torch.no_grad():
        p = fashion(r.image).softmax(1)
    torch.testing.assert_close(r.final_probabilities, p[[0, 1], [2, 5]])
    assert (r.final_probabilities > 0.9).all()
    # a channel objective tracks no class, unless asked to
    r2 = maximize(fashion, channel("net.features.8", 1), steps=3, progress=False)
    assert r2.probabilities is None and r2.final_probabilities is None
    r3 = maximize(fashion, channel("net.features.8", 1), steps=3, track=4, progress=False)
    assert r3.probabilities.shape == (3, 1)
    r.plot_history(labels=["a", "b"])


def test_seeded_runs_repeat(fashion):
    kwargs = {"steps": 8, "transforms": [jitter(2)], "regularizers": [decay(0.02)], "progress": False}
    a = maximize(fashion, class_logit(3), seed=5, **kwargs)
    b = maximize(fashion, class_logit(3), seed=5, **kwargs)
    c = maximize(fashion, class_logit(3), seed=6, **kwargs)
    torch.testing.assert_close(a.image, b.image, rtol=0, atol=0)
    assert not torch.equal(a.image, c.image)


def test_normalized_sgd_moves_each_image_by_lr(fashion):
    # from mid-grey nothing is clamped in one step: the RMS change of every image is exactly lr
    param = pixel_image((3, 1, 28, 28), sd=0.0)
    maximize(fashion, class_logit([0, 4, 9]), param=param, steps=1, lr=0.01, optimizer="normalized_sgd", progress=False)
    change = (param.image().detach() - 0.5).pow(2).mean((1, 2, 3)).sqrt()
    torch.testing.assert_close(change, torch.full((3,), 0.01), rtol=1e-4, atol=1e-6)


def test_from_a_photo_small_change(fashion, fashion_test):
    x, y = fashion_test
    photo = x[y == 0][:1]  # a T-shirt
    r = maximize(fashion, class_logit(8), param=pixel_image(photo.shape, init=photo), steps=20, lr=0.01,
                 optimizer="normalized_sgd", progress=False)
    assert r.probabilities[0, 0] < 0.1 and float(r.final_probabilities) > 0.9  # now a "bag"
    assert float(relative_l2(r.image, photo)) < 0.5


def test_maximize_bad_input(fashion):
    with pytest.raises(TypeError, match="Objective"):
        maximize(fashion, lambda ctx: ctx.logits[:, 0])
    with pytest.raises(ValueError, match="optimizer"):
        maximize(fashion, class_logit(0), optimizer="sgd")
    with pytest.raises(ValueError, match="steps"):
        maximize(fashion, class_logit(0), steps=0)
    with pytest.raises(ValueError, match="lr"):
        maximize(fashion, class_logit(0), lr=-1.0)
    with pytest.raises(TypeError, match="ImageParam"):
        maximize(fashion, class_logit(0), param=torch.rand(1, 1, 28, 28))
    with pytest.raises(TypeError, match="callables"):
        maximize(fashion, class_logit(0), transforms=[3])
    with pytest.raises(TypeError, match="nn.Module"):
        maximize("fashion_cnn", class_logit(0))


# ----------------------------------------------------------------------------------------------
# ImageNet: the class visualisations of the lecture reach their class


def test_class_visualisations_on_efficientnet(effnet):
    """One batch, five recipes: sea snake naively from noise, paper towel without / with Fleuret's
    edge-energy prior, and two gallery classes with the full recipe (Fourier + jitter + prior)."""
    before = model_state(effnet)
    size, steps = 128, 24
    targets = [65, 700, 700, 121, 974]
    prior = edge_energy_prior()
    objective = per_image([
        class_logit(65),
        class_logit(700),
        class_logit(700) - 1.0 * prior,
        class_logit(121) - 1.0 * prior,
        class_logit(974) - 1.0 * prior,
    ])
    param = stack([pixel_image((3, 3, size, size), seed=0), fourier_image((2, 3, size, size), seed=0)])
    r = maximize(effnet, objective, param=param, steps=steps, lr=0.05, transforms=[only([1, 2, 3, 4], jitter(4))],
                 progress=False)
    assert before.differences(model_state(effnet)) == []
    assert r.probabilities.shape == (steps, 5)
    with torch.no_grad():
        p = effnet(r.image).softmax(1)[torch.arange(5), torch.tensor(targets)]
    torch.testing.assert_close(p, r.final_probabilities)
    assert (p >= 0.9).all(), p
    hf = high_frequency_energy(r.image)
    # same class, same steps and transforms: the prior removes most high-frequency energy
    assert hf[2] < 0.2 * hf[1], hf
    assert edge_energy(r.image[2:3]) < 0.2 * edge_energy(r.image[1:2])
    # naive ascent gives pixel noise; the Fourier parameterisation is smoother still than pixels + prior
    assert hf[0] > 10 * hf[2] and (hf[3:] < hf[2]).all(), hf


# ----------------------------------------------------------------------------------------------
# Fleuret's multi-scale edge energy


def _slow_edge_energy(x: np.ndarray) -> np.ndarray:
    """Obviously-correct loops: 5x5 Gaussian (std 1) with zero padding, 2x2 average pool with padding 1."""
    t = np.arange(-2, 3)
    g = np.exp(-(t[:, None] ** 2 + t[None, :] ** 2) / 2.0)
    g /= g.sum()
    n, c = x.shape[:2]
    out = np.zeros(n)
    for i in range(n):
        for ch in range(c):
            u = x[i, ch].astype(np.float64)
            while min(u.shape) > 5:
                h, w = u.shape
                padded = np.zeros((h + 4, w + 4))
                padded[2:-2, 2:-2] = u
                blur = np.zeros_like(u)
                for r in range(h):
                    for q in range(w):
                        blur[r, q] = (padded[r : r + 5, q : q + 5] * g).sum()
                out[i] += ((u - blur) ** 2).sum()
                padded = np.zeros((h + 2, w + 2))
                padded[1:-1, 1:-1] = u
                oh, ow = (h + 2 - 2) // 2 + 1, (w + 2 - 2) // 2 + 1
                u = np.array([[padded[2 * r : 2 * r + 2, 2 * q : 2 * q + 2].mean() for q in range(ow)] for r in range(oh)])
    return out


@pytest.mark.parametrize("shape", [(1, 1, 6, 6), (2, 3, 13, 11), (1, 2, 8, 21), (1, 1, 33, 40)])
def test_edge_energy_matches_a_slow_loop(shape):
    x = torch.rand(shape, generator=torch.Generator().manual_seed(sum(shape)), dtype=torch.float64)
    np.testing.assert_allclose(edge_energy(x).numpy(), _slow_edge_energy(x.numpy()), rtol=1e-10)


def test_edge_energy_properties():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 20, 20, generator=g, dtype=torch.float64)
    assert edge_energy(x).shape == (2,)
    assert float(edge_energy(torch.zeros(1, 3, 20, 20))) == 0
    assert float(edge_energy(torch.rand(1, 1, 5, 40))) == 0  # no scale with both sides > 5
    torch.testing.assert_close(edge_energy(2 * x), 4 * edge_energy(x))  # quadratic
    torch.testing.assert_close(edge_energy(x), sum(edge_energy(x[:, c : c + 1]) for c in range(3)))  # channels separately
    smooth = gaussian_blur(x, 2.0)
    assert (edge_energy(smooth) < 0.2 * edge_energy(x)).all()
    small = torch.rand(1, 2, 9, 10, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(edge_energy, (small,))
    with pytest.raises(ValueError):
        edge_energy(torch.rand(3, 20, 20))


def test_high_frequency_energy():
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    slow = np.zeros(2)
    a = np.pad(x.numpy(), ((0, 0), (0, 0), (1, 1), (1, 1)), mode="edge")
    for i in range(2):
        lap = a[i, :, :-2, 1:-1] + a[i, :, 2:, 1:-1] + a[i, :, 1:-1, :-2] + a[i, :, 1:-1, 2:] - 4 * a[i, :, 1:-1, 1:-1]
        slow[i] = (lap**2).mean()
    np.testing.assert_allclose(high_frequency_energy(x).numpy(), slow, rtol=1e-10)
    assert float(high_frequency_energy(torch.full((1, 3, 8, 8), 0.3))) == 0
    ramp = torch.linspace(0, 1, 16).view(1, 1, 1, 16).expand(1, 1, 16, 16)
    assert float(high_frequency_energy(ramp)) < 1e-3 < float(high_frequency_energy(x[:1, :1]))
    # relative: the share of the variation at the highest frequencies, independent of contrast
    noise = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    share = high_frequency_energy(noise, relative=True)
    assert ((share > 0.85) & (share < 1.05)).all(), share
    torch.testing.assert_close(high_frequency_energy(0.5 + 0.1 * (noise - 0.5), relative=True), share)
    assert float(high_frequency_energy(ramp, relative=True)) < 0.01
    with pytest.raises(ValueError):
        high_frequency_energy(torch.rand(16, 16))


def test_gaussian_blur_matches_scipy():
    from scipy.ndimage import gaussian_filter

    x = torch.rand(1, 2, 12, 15, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    got = gaussian_blur(x, 1.0).numpy()
    for c in range(2):
        np.testing.assert_allclose(got[0, c], gaussian_filter(x[0, c].numpy(), 1.0, mode="mirror", truncate=3.0), rtol=1e-6)
    with pytest.raises(ValueError):
        gaussian_blur(x, 0.0)


def test_one_blur_and_every_name_still_importable_from_maximize():
    import coursekit.image_params as ip
    import coursekit.images as images
    import coursekit.maximize as mx
    import coursekit.objectives as ob
    from coursekit.faithfulness import blurred

    assert gaussian_blur is images.gaussian_blur and ip.gaussian_blur is images.gaussian_blur
    x = torch.rand(1, 3, 40, 40, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(blurred(x), gaussian_blur(x, 2.0))  # default sigma max(H, W) / 20
    assert [n for n in mx.__all__ if not hasattr(mx, n)] == []  # the split modules are re-exported
    assert mx.edge_energy is ob.edge_energy and mx.PixelImage is ip.PixelImage
    assert mx.objectives.channel is ob.channel and mx.params.fourier_image is ip.fourier_image


def test_relative_l2():
    a = torch.ones(2, 1, 2, 2)
    torch.testing.assert_close(relative_l2(a * 1.1, a), torch.full((2,), 0.1))
    with pytest.raises(ValueError):
        relative_l2(a, a[:1])


# ----------------------------------------------------------------------------------------------
# transforms, regularisers, parameterisations


def test_transforms():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 10, 12, generator=g)
    assert torch.equal(jitter(0)(x, g), x)
    y = jitter(3)(x, torch.Generator().manual_seed(1))
    assert y.shape == x.shape
    torch.testing.assert_close(jitter(3)(x, torch.Generator().manual_seed(1)), y)
    # a shift: some row/column offset of the reflect-padded image
    padded = F.pad(x, (3, 3, 3, 3), mode="reflect")
    assert any(torch.equal(y, padded[..., dy : dy + 10, dx : dx + 12]) for dy in range(7) for dx in range(7))
    assert pad(2)(x).shape == (2, 3, 14, 16)
    sizes = {tuple(random_scale((0.5, 1.0, 2.0))(x, g).shape[-2:]) for _ in range(30)}
    assert sizes == {(5, 6), (10, 12), (20, 24)}
    z = only([1], decay(0.5))(x, 0)
    assert torch.equal(z[0], x[0]) and torch.allclose(z[1], 0.5 + 0.5 * (x[1] - 0.5))
    with pytest.raises(ValueError, match="shape-preserving"):
        only([0], random_scale((0.5,)))(x, g)
    with pytest.raises(ValueError, match="batch has 2"):
        only([5], decay(0.1))(x, 0)
    with pytest.raises(ValueError):
        jitter(-1)
    with pytest.raises(ValueError):
        random_scale((0.0,))


def test_regularizers():
    x = torch.rand(1, 3, 9, 9, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(decay(0.1)(x, 0), 0.5 + 0.9 * (x - 0.5))
    b = blur_every(3, 1.0)
    assert torch.equal(b(x, 0), x) and torch.equal(b(x, 1), x)
    torch.testing.assert_close(b(x, 2), gaussian_blur(x, 1.0))
    with pytest.raises(ValueError):
        decay(1.5)
    with pytest.raises(ValueError):
        blur_every(0)


def test_parameterisations():
    photo = torch.rand(1, 3, 16, 20, generator=torch.Generator().manual_seed(0)) * 0.9 + 0.05
    f = fourier_image((2, 3, 16, 20), seed=1)
    img = f.image()
    assert img.requires_grad
    img = img.detach()
    assert img.shape == (2, 3, 16, 20) and 0 < float(img.min()) and float(img.max()) < 1
    f.set_image_(photo.expand(2, -1, -1, -1))
    torch.testing.assert_close(f.image().detach(), photo.expand(2, -1, -1, -1), atol=1e-4, rtol=0)
    g = FourierImage((1, 1, 9, 9), init=torch.full((1, 1, 9, 9), 0.25))
    assert not g.decorrelate
    torch.testing.assert_close(g.image().detach(), torch.full((1, 1, 9, 9), 0.25), atol=1e-5, rtol=0)
    p = pixel_image((2, 3, 16, 20), init=photo)
    assert isinstance(p, PixelImage) and torch.equal(p.image().detach(), photo.expand(2, -1, -1, -1))
    with torch.no_grad():
        p.x.add_(2.0)
    p.project_()
    assert float(p.image().detach().max()) == 1.0
    s = stack([pixel_image((1, 3, 16, 20)), fourier_image((2, 3, 16, 20))])
    assert s.shape == (3, 3, 16, 20) and len(s.parameters()) == 2
    s.set_image_(photo.expand(3, -1, -1, -1))
    torch.testing.assert_close(s.image().detach(), photo.expand(3, -1, -1, -1), atol=1e-4, rtol=0)
    moved = s.to_("cpu")
    assert moved is s and all(t.requires_grad and t.is_leaf for t in s.parameters())
    with pytest.raises(ValueError, match="share"):
        stack([pixel_image((1, 3, 8, 8)), pixel_image((1, 1, 8, 8))])
    with pytest.raises(ValueError, match="shape"):
        pixel_image((1, 3, 8))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        pixel_image((1, 3, 8, 8), init=torch.full((1, 3, 8, 8), 2.0))
    with pytest.raises(ValueError, match="picture is"):
        pixel_image((1, 3, 8, 8), init=torch.rand(1, 3, 9, 9))


def test_fourier_spectrum_is_scaled_by_frequency():
    # Lucid/Lucent's preconditioning: equal random spectrum coefficients give a 1/f image
    f = fourier_image((1, 1, 32, 32), sd=1.0, decorrelate=False, seed=0)
    assert float(f.scale[0, 0]) == pytest.approx(32.0)  # DC: 1 / (1/32)
    assert float(f.scale[0, 1]) == pytest.approx(32.0)  # lowest frequency 1/32
    assert float(f.scale[16, 16]) == pytest.approx(1 / math.sqrt(0.5**2 + 0.5**2))


# ----------------------------------------------------------------------------------------------
# one ascent step (the reference of exercise maxresp.ascent_step)


def test_ascent_step(fashion):
    x = torch.rand(3, 1, 28, 28, generator=torch.Generator().manual_seed(0)) * 0.8 + 0.1
    before, x0 = model_state(fashion), x.clone()
    new = ascent_step(fashion, x, [1, 4, 7], lr=0.02)
    assert before.differences(model_state(fashion)) == [] and torch.equal(x, x0)
    assert new.shape == x.shape and not new.requires_grad
    xg = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(fashion(xg)[[0, 1, 2], [1, 4, 7]].sum(), xg)
    rms = g.pow(2).mean((1, 2, 3), keepdim=True).sqrt()
    torch.testing.assert_close(new, (x + 0.02 * g / rms).clamp(0, 1))
    with torch.no_grad():
        assert (fashion(new)[[0, 1, 2], [1, 4, 7]] > fashion(x)[[0, 1, 2], [1, 4, 7]]).all()
