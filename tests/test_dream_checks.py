"""Checks of exercise set 06_dream_and_style: correct solutions pass, each typical mistake is
diagnosed by name, calling coursekit's reference earns nothing, stubs and do-nothing answers earn 0."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from coursekit import dream, optimize, style
from coursekit.checks import CheckFailed, check, run_check

SEEDS = [0, 1, 2]

pytestmark = pytest.mark.usefixtures("one_thread")


# -- correct solutions, written as a student would ---------------------------------------------


def gram_ok(features):
    n, c, h, w = features.shape
    f = features.reshape(n, c, h * w)
    return torch.bmm(f, f.transpose(1, 2)) / (h * w)


def style_loss_ok(features, target_grams):
    total = 0
    for f, a in zip(features, target_grams):
        total = total + (gram_ok(f) - a).pow(2).flatten(1).mean(1)
    return total


def tv_ok(x, power=2.0):
    dx = (x[:, :, :, 1:] - x[:, :, :, :-1]).abs() ** power
    dy = (x[:, :, 1:, :] - x[:, :, :-1, :]).abs() ** power
    return dx.flatten(1).mean(1) + dy.flatten(1).mean(1)


def step_ok(features, x, shift, lr=0.02):
    x = x.detach().clone().requires_grad_(True)
    energy = features(torch.roll(x, shifts=shift, dims=(2, 3))).pow(2).flatten(1).mean(1)
    (g,) = torch.autograd.grad(energy.sum(), x)
    g = g / g.pow(2).flatten(1).mean(1).sqrt().view(-1, 1, 1, 1)
    return (x + lr * g).clamp(0, 1).detach()


def octaves_ok(step, x, n_octaves=3, scale=1.4):
    h, w = x.shape[-2:]
    sizes = [(round(h / scale**k), round(w / scale**k)) for k in range(n_octaves - 1, -1, -1)]
    detail = torch.zeros(x.shape[0], x.shape[1], *sizes[0], dtype=x.dtype)
    for size in sizes:
        base = x if size == (h, w) else F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        if detail.shape[-2:] != size:
            detail = F.interpolate(detail, size=size, mode="bilinear", align_corners=False)
        out = step(base + detail)
        detail = out - base
    return out


CORRECT = {"dream.gram": gram_ok, "dream.style_loss": style_loss_ok, "dream.tv": tv_ok, "dream.step": step_ok,
           "dream.octaves": octaves_ok}


@pytest.mark.parametrize("name", sorted(CORRECT))
@pytest.mark.parametrize("seed", SEEDS)
def test_correct_solutions_earn_full_points(name, seed):
    report = run_check(name, CORRECT[name], seed=seed)
    assert report.earned == report.points, report.summary()


def test_points_per_exercise():
    points = {name: run_check(name, CORRECT[name], seed=0).points for name in CORRECT}
    assert points == {"dream.gram": 3, "dream.style_loss": 3, "dream.tv": 3, "dream.step": 4, "dream.octaves": 3}


# -- mistakes are named -----------------------------------------------------------------------


def _diagnosed(name, fn, phrase, seed=0):
    report = run_check(name, fn, seed=seed)
    assert report.earned < report.points, report.summary()
    assert phrase in report.summary(), report.summary()
    return report


def _gram(divide):
    def fn(features):
        n, c, h, w = features.shape
        f = features.reshape(n, c, h * w)
        return torch.bmm(f, f.transpose(1, 2)) / divide(n, c, h, w)

    return fn


@pytest.mark.parametrize("fn, phrase", [
    (_gram(lambda n, c, h, w: 1), "not normalised"),
    (_gram(lambda n, c, h, w: c * h * w), "C*H*W"),
    (_gram(lambda n, c, h, w: c), "normalised by C,"),
    (_gram(lambda n, c, h, w: n * h * w), "whole batch"),
    (lambda f: torch.bmm(f.flatten(2).transpose(1, 2), f.flatten(2)) / (f.shape[2] * f.shape[3]), "F^T F"),
    (lambda f: gram_ok(f - f.mean(dim=(2, 3), keepdim=True)), "covariance"),
])
def test_gram_mistakes(fn, phrase):
    _diagnosed("dream.gram", fn, phrase)


@pytest.mark.parametrize("fn, phrase", [
    (lambda fs, ts: sum((gram_ok(f) - a).pow(2).flatten(1).sum(1) for f, a in zip(fs, ts)), "summed (G - A)^2"),
    (lambda fs, ts: sum((gram_ok(f) * f.shape[2] * f.shape[3] - a).pow(2).flatten(1).mean(1) for f, a in zip(fs, ts)),
     "not normalised"),
    (lambda fs, ts: sum((gram_ok(f) - a).abs().flatten(1).mean(1) for f, a in zip(fs, ts)), "no square"),
    (lambda fs, ts: sum((gram_ok(f) - a).flatten(1).norm(dim=1) for f, a in zip(fs, ts)), "Frobenius"),
    (lambda fs, ts: style_loss_ok(fs, ts) / len(fs), "averaged over the layers"),
    (lambda fs, ts: style_loss_ok(fs, ts).mean(), "single number"),
])
def test_style_loss_mistakes(fn, phrase):
    _diagnosed("dream.style_loss", fn, phrase)


def _tv(fn):
    return lambda x, power=2.0: fn(x, power)


@pytest.mark.parametrize("fn, phrase", [
    (_tv(lambda x, p: tv_ok(x, p) * 0 + ((x[..., :, 1:] - x[..., :, :-1]).abs() ** p).flatten(1).sum(1)
         + ((x[..., 1:, :] - x[..., :-1, :]).abs() ** p).flatten(1).sum(1)), "summed the differences"),
    (_tv(lambda x, p: ((x[..., :, 1:] - x[..., :, :-1]).abs() ** p).flatten(1).mean(1)), "only horizontal"),
    (_tv(lambda x, p: 2 * ((x[..., :, 1:] - x[..., :, :-1]).abs() ** p).flatten(1).mean(1)), "same direction twice"),
    (_tv(lambda x, p: ((torch.roll(x, -1, 3) - x).abs() ** p).flatten(1).mean(1)
         + ((torch.roll(x, -1, 2) - x).abs() ** p).flatten(1).mean(1)), "wraps around"),
    (_tv(lambda x, p: ((x[..., 1:, 1:] - x[..., :-1, :-1]).abs() ** p).flatten(1).mean(1)), "diagonal"),
    (_tv(lambda x, p: tv_ok(x, 2.0)), "squared differences where power=1"),
    (_tv(lambda x, p: tv_ok(x, 1.0)), "absolute differences where power=2"),
    (_tv(lambda x, p: ((x[..., :, 1:] - x[..., :, :-1]) ** p).flatten(1).mean(1)
         + ((x[..., 1:, :] - x[..., :-1, :]) ** p).flatten(1).mean(1)), "no absolute value"),
    (_tv(lambda x, p: torch.cat([((x[..., :, 1:] - x[..., :, :-1]).abs() ** p).flatten(1),
                                 ((x[..., 1:, :] - x[..., :-1, :]).abs() ** p).flatten(1)], 1).mean(1)), "one mean over both"),
])
def test_tv_mistakes(fn, phrase):
    _diagnosed("dream.tv", fn, phrase)


def _step(normalise=lambda g: g.pow(2).flatten(1).mean(1).sqrt().view(-1, 1, 1, 1), clamp=True, sign=1.0,
          roll_back=True, use_shift=True, square=True):
    def fn(features, x, shift, lr=0.02):
        x = x.detach().clone().requires_grad_(True)
        xs = torch.roll(x, shifts=shift, dims=(2, 3)) if use_shift else x
        if not roll_back:
            xs = xs.detach().requires_grad_(True)
        a = features(xs)
        energy = (a.pow(2) if square else a).flatten(1).mean(1)
        (g,) = torch.autograd.grad(energy.sum(), xs if not roll_back else x)
        base = xs if not roll_back else x
        out = base + sign * lr * g / normalise(g)
        return (out.clamp(0, 1) if clamp else out).detach()

    return fn


@pytest.mark.parametrize("fn, phrase", [
    (_step(normalise=lambda g: 1.0), "not normalised"),
    (_step(normalise=lambda g: g.abs().flatten(1).mean(1).view(-1, 1, 1, 1)), "mean absolute"),
    (_step(normalise=lambda g: g.abs().flatten(1).amax(1).view(-1, 1, 1, 1)), "largest |gradient|"),
    (_step(normalise=lambda g: g.pow(2).mean().sqrt()), "whole batch"),
    (_step(clamp=False), "not clamped"),
    (_step(sign=-1.0), "descent"),
    (_step(roll_back=False), "still rolled"),
    (_step(use_shift=False), "shift was ignored"),
    (_step(square=False), "squared"),
])
def test_step_mistakes(fn, phrase):
    _diagnosed("dream.step", fn, phrase)


def test_step_that_modifies_x_in_place_is_caught():
    def in_place(features, x, shift, lr=0.02):
        new = step_ok(features, x, shift, lr)
        x.copy_(new)
        return new

    _diagnosed("dream.step", in_place, "changed the caller's x")


def _resize(t, size):
    return F.interpolate(t, size=size, mode="bilinear", align_corners=False)


def octaves_no_detail(step, x, n_octaves=3, scale=1.4):
    h, w = x.shape[-2:]
    sizes = [(round(h / scale**k), round(w / scale**k)) for k in range(n_octaves - 1, -1, -1)]
    pic = _resize(x, sizes[0])
    for size in sizes:
        pic = step(pic if pic.shape[-2:] == size else _resize(pic, size))
    return pic


def octaves_reversed(step, x, n_octaves=3, scale=1.4):
    return octaves_ok(lambda p: step(p), x, n_octaves, 1 / scale) if False else _reversed(step, x, n_octaves, scale)


def _reversed(step, x, n_octaves, scale):
    h, w = x.shape[-2:]
    out = x
    for k in range(n_octaves):
        out = step(_resize(out, (round(h / scale**k), round(w / scale**k))))
    return out


@pytest.mark.parametrize("fn, phrase", [
    (octaves_no_detail, "the dream itself upsampled"),
    (lambda step, x, n_octaves=3, scale=1.4: step(x), "no pyramid"),
    (_reversed, "smallest octave's size"),
])
def test_octave_mistakes(fn, phrase):
    _diagnosed("dream.octaves", fn, phrase)


# -- references, stubs, doing nothing ------------------------------------------------------------


@pytest.mark.parametrize("name, fn", [
    ("dream.gram", lambda f: style.gram_matrix(f)),
    ("dream.style_loss", lambda fs, ts: style.style_loss(fs, ts)),
    ("dream.tv", lambda x, power=2.0: style.tv_loss(x, power)),
    ("dream.step", lambda features, x, shift, lr=0.02: dream.dream_step(features, x, shift, lr)),
    ("dream.octaves", lambda step, x, n_octaves=3, scale=1.4: optimize.octaves(x, lambda p, o: step(p), n_octaves, scale)),
])
def test_calling_coursekits_reference_earns_nothing(name, fn):
    report = run_check(name, fn, seed=0)
    assert report.earned == 0, report.summary()
    assert "coursekit" in report.summary()


@pytest.mark.parametrize("name, fn", [
    ("dream.gram", lambda f: f),
    ("dream.style_loss", lambda fs, ts: None),
    ("dream.tv", lambda x, power=2.0: torch.zeros(x.shape[0])),
    ("dream.step", lambda features, x, shift, lr=0.02: x),
    ("dream.octaves", lambda step, x, n_octaves=3, scale=1.4: x),
])
def test_doing_nothing_earns_nothing(name, fn):
    assert run_check(name, fn, seed=0).earned == 0


@pytest.mark.parametrize("name", sorted(CORRECT))
def test_stub_raises_check_failed(name, capsys):
    def stub(*args, **kwargs):
        raise NotImplementedError()

    with pytest.raises(CheckFailed):
        check(name, stub)
    assert "not implemented yet" in capsys.readouterr().out


# -- more mistakes with their own diagnosis (issue 18) ------------------------------------------


@pytest.mark.parametrize("fn, phrase", [
    (_gram(lambda n, c, h, w: n * c * h * w), "N*C*H*W"),
    (_gram(lambda n, c, h, w: h * w - 1), "H*W - 1"),
    (_gram(lambda n, c, h, w: (h * w) ** 2), "(H*W)^2"),
])
def test_more_gram_mistakes(fn, phrase):
    _diagnosed("dream.gram", fn, phrase)


@pytest.mark.parametrize("fn, phrase", [
    (lambda fs, ts: style_loss_ok(fs, ts) / 4, "factor 1/4"),
    (lambda fs, ts: sum((gram_ok(f) - a).pow(2).flatten(1).mean(1).sqrt() for f, a in zip(fs, ts)), "square root"),
])
def test_more_style_loss_mistakes(fn, phrase):
    _diagnosed("dream.style_loss", fn, phrase)


def _step_rolled(dims=(2, 3), negate=False):
    def fn(features, x, shift, lr=0.02):
        x = x.detach().clone().requires_grad_(True)
        s = tuple(-v for v in shift) if negate else tuple(shift)
        (g,) = torch.autograd.grad(features(torch.roll(x, shifts=s, dims=dims)).pow(2).flatten(1).mean(1).sum(), x)
        return (x + lr * g / g.pow(2).flatten(1).mean(1).sqrt().view(-1, 1, 1, 1)).clamp(0, 1).detach()

    return fn


@pytest.mark.parametrize("fn, phrase", [
    (_step(normalise=lambda g: g.flatten(1).std(1).view(-1, 1, 1, 1)), "standard deviation"),
    (_step(normalise=lambda g: g.flatten(1).norm(dim=1).view(-1, 1, 1, 1)), "L2 norm"),
    (_step_rolled(dims=(3, 2)), "wrong axes"),
    (_step_rolled(negate=True), "rolled by -shift"),
])
def test_more_step_mistakes(fn, phrase):
    _diagnosed("dream.step", fn, phrase)


@pytest.mark.parametrize("fn", [_step(normalise=lambda g: 1.0), _step(sign=-1.0), _step(use_shift=False)],
                         ids=["not normalised", "descent", "shift ignored"])
def test_a_wrong_step_does_not_also_fail_the_large_step_part(fn):
    for seed in SEEDS:
        report = run_check("dream.step", fn, seed=seed)
        large = report.parts[-1]
        assert large.earned == large.points, report.summary()
        assert report.earned < report.points


def test_a_missing_clamp_fails_the_large_step_part_by_name():
    report = run_check("dream.step", _step(clamp=False), seed=0)
    assert report.parts[-1].earned == 0 and "not clamped" in report.parts[-1].message, report.summary()


def _octaves_with(sizes_of=None, resize=_resize, extra=0):
    def fn(step, x, n_octaves=3, scale=1.4):
        h, w = x.shape[-2:]
        n = n_octaves + extra
        sizes = sizes_of(h, w, n, scale) if sizes_of else [(round(h / scale**k), round(w / scale**k))
                                                             for k in range(n - 1, -1, -1)]
        detail = torch.zeros(x.shape[0], x.shape[1], *sizes[0], dtype=x.dtype)
        for size in sizes:
            base = x if size == (h, w) else resize(x, size)
            detail = detail if detail.shape[-2:] == size else resize(detail, size)
            out = step(base + detail)
            detail = out - base
        return out

    return fn


def octaves_base_from_previous_base(step, x, n_octaves=3, scale=1.4):
    h, w = x.shape[-2:]
    sizes = [(round(h / scale**k), round(w / scale**k)) for k in range(n_octaves - 1, -1, -1)]
    base, detail = x, None
    for size in sizes:
        base = _resize(base, size)  # from the previous (smaller) base, not from x
        detail = torch.zeros_like(base) if detail is None else _resize(detail, size)
        out = step(base + detail)
        detail = out - base
    return out


@pytest.mark.parametrize("fn, phrase", [
    (_octaves_with(sizes_of=lambda h, w, n, s: [(int(h / s**k), int(w / s**k)) for k in range(n - 1, -1, -1)]),
     "truncated with int()"),
    (_octaves_with(resize=lambda t, size: F.interpolate(t, size=size, mode="bilinear", align_corners=True)),
     "align_corners=True"),
    (_octaves_with(resize=lambda t, size: F.interpolate(t, size=size, mode="nearest")), "mode='nearest'"),
    (_octaves_with(extra=1), "one octave too many"),
    (_octaves_with(extra=-1), "one octave too few"),
])
def test_more_octave_mistakes(fn, phrase):
    _diagnosed("dream.octaves", fn, phrase)


def test_a_base_resized_from_the_previous_base_is_not_called_an_upsampled_dream():
    for seed in SEEDS:
        report = _diagnosed("dream.octaves", octaves_base_from_previous_base, "each base resized from the previous",
                            seed=seed)
        assert "dreamed picture itself was upsampled" not in report.summary()
