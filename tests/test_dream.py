"""coursekit.dream: one step against a hand computation, DeepDream raises the layer's activation, guided dreams."""

import pytest
import torch
from torch import nn

from coursekit.dream import DreamResult, SmoothedAscent, deepdream, dream_step, guide, layer_outputs
from coursekit.guard import guarded, model_state
from coursekit.hooks import UnknownLayerError
from coursekit.maximize import Context, class_logit, gaussian_blur, layer_energy
from coursekit.optimize import NormalizedAscent

pytestmark = pytest.mark.usefixtures("one_thread")


def small_cnn(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1, stride=2), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4),
    )
    return net.eval().requires_grad_(False)


def _energy(features, x):
    return features(x).pow(2).flatten(1).mean(1)


# ----------------------------------------------------------------------------------------------
# dream_step, written out


def test_dream_step_matches_a_hand_computation():
    net = small_cnn()
    features = net[:4]
    x = torch.rand(2, 3, 12, 10, generator=torch.Generator().manual_seed(0))
    shift = (3, -2)
    got = dream_step(features, x, shift, lr=0.05)
    # gradient at the rolled picture, rolled back by hand
    xs = torch.roll(x, shifts=shift, dims=(2, 3)).requires_grad_(True)
    (g_rolled,) = torch.autograd.grad(_energy(features, xs).sum(), xs)
    g = torch.roll(g_rolled, shifts=(-shift[0], -shift[1]), dims=(2, 3))
    for n in range(2):
        rms = (g[n] ** 2).mean().sqrt()
        expected = (x[n] + 0.05 * g[n] / rms).clamp(0, 1)
        torch.testing.assert_close(got[n], expected)
    assert not got.requires_grad and got.min() >= 0 and got.max() <= 1


def test_dream_step_raises_the_energy_and_leaves_x_alone():
    net = small_cnn(1)
    features = net[:4]
    x = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 0.6 + 0.2
    copy = x.clone()
    new = dream_step(features, x, (0, 0), lr=0.01)
    assert torch.equal(x, copy)
    assert torch.all(_energy(features, new) > _energy(features, x))
    # each image moves by lr on average (root-mean-square), none clamped here
    torch.testing.assert_close((new - x).pow(2).flatten(1).mean(1).sqrt(), torch.full((3,), 0.01), rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# the smoothed step rule


def test_smoothed_ascent_blurs_the_gradient_before_the_normalised_step():
    g = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    a, b, c = torch.zeros(2, 3, 16, 16), torch.zeros(2, 3, 16, 16), torch.zeros(2, 3, 16, 16)
    SmoothedAscent(0.1, sigma=0).step([a], [g])
    NormalizedAscent(0.1).step([b], [g])
    torch.testing.assert_close(a, b)
    SmoothedAscent(0.1, sigma=1.5).step([c], [g])
    NormalizedAscent(0.1).step([b.zero_()], [gaussian_blur(g, 1.5)])
    torch.testing.assert_close(c, b)
    with pytest.raises(ValueError, match="sigma"):
        SmoothedAscent(0.1, sigma=-1)


# ----------------------------------------------------------------------------------------------
# guided dream objective


def test_guide_objective_matches_a_loop():
    a = torch.randn(2, 4, 3, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    g = torch.randn(1, 4, 2, 2, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    ctx = Context(image=torch.zeros(2, 3, 6, 4), input=None, logits=None, activations={"l": a})
    expected = []
    for n in range(2):
        best = [max(float((a[n, :, i, j] * g[0, :, p, q]).sum()) for p in range(2) for q in range(2))
                for i in range(3) for j in range(2)]
        expected.append(sum(best) / len(best))
    torch.testing.assert_close(guide("l", g)(ctx), torch.tensor(expected, dtype=torch.float64))
    with pytest.raises(ValueError, match="one image's feature map"):
        guide("l", torch.zeros(2, 4, 2, 2))


# ----------------------------------------------------------------------------------------------
# the dream on the real network


def test_deepdream_raises_the_layers_activation_and_leaves_the_model_alone(effnet):
    import coursekit as ck

    photo = ck.load_image("cat", size=96)
    before = model_state(effnet)
    result = deepdream(effnet, photo, "net.blocks.2", n_octaves=2, steps=4, lr=0.03, progress=False)
    assert not before.differences(model_state(effnet))
    assert isinstance(result, DreamResult)
    assert result.image.shape == photo.shape and result.image.min() >= 0 and result.image.max() <= 1
    assert len(result.history) == 2 and result.history[0].shape == (4, 1)
    assert result.sizes[-1] == (96, 96) and result.sizes[0] < result.sizes[1]
    with guarded(effnet), layer_outputs(effnet, ["net.blocks.2"]) as extract:
        e0 = extract(photo)["net.blocks.2"].pow(2).mean()
        e1 = extract(result.image)["net.blocks.2"].pow(2).mean()
    assert e1 > 1.5 * e0, (float(e0), float(e1))
    again = deepdream(effnet, photo, "net.blocks.2", n_octaves=2, steps=4, lr=0.03, progress=False)
    assert torch.equal(again.image, result.image)  # seeded shifts: same dream


def test_guided_dream_moves_towards_the_guide(effnet):
    import coursekit as ck

    photo, guide_image = ck.load_image("coffee", size=64), ck.load_image("brick", size=64)
    with guarded(effnet), layer_outputs(effnet, ["net.blocks.2"]) as extract:
        guide_features = extract(guide_image)["net.blocks.2"]
    objective = guide("net.blocks.2", guide_features)
    result = deepdream(effnet, photo, objective, n_octaves=1, steps=5, progress=False)
    assert float(result.history[0][-1, 0]) > float(result.history[0][0, 0])


def test_deepdream_on_several_layers_and_from_noise():
    net = small_cnn(2)
    noise = (0.5 + 0.1 * torch.randn(1, 3, 24, 24, generator=torch.Generator().manual_seed(5))).clamp(0, 1)
    result = deepdream(net, noise, ["1", "3"], n_octaves=2, steps=5, jitter_pixels=2, progress=False)
    ctx = lambda x: Context(image=x, input=x, logits=None, activations={"1": net[:2](x), "3": net[:4](x)})  # noqa: E731
    objective = layer_energy("1") + layer_energy("3")
    assert objective(ctx(result.image)) > objective(ctx(noise))


def test_bad_arguments_are_clear_errors():
    net = small_cnn()
    x = torch.rand(1, 3, 16, 16)
    before = model_state(net)
    with pytest.raises(ValueError, match="class scores"):
        deepdream(net, x, layer_energy("1") + class_logit(0), progress=False)
    with pytest.raises(ValueError, match="uses no layer"):
        deepdream(net, x, class_logit(0), progress=False)
    with pytest.raises(TypeError, match="layer name"):
        deepdream(net, x, 3, progress=False)
    with pytest.raises(ValueError, match="steps"):
        deepdream(net, x, "1", steps=0, progress=False)
    with pytest.raises(ValueError, match="lr"):
        deepdream(net, x, "1", lr=0, progress=False)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        deepdream(net, x * 2, "1", progress=False)
    with pytest.raises(ValueError, match="n_octaves"):
        deepdream(net, x, "1", n_octaves=0, progress=False)
    with pytest.raises(UnknownLayerError):
        deepdream(net, x, "no.such.layer", progress=False)
    assert not before.differences(model_state(net))
