"""Checks of exercise set 06_dream_and_style (lecture 6: DeepDream, style transfer, textures).

Parts (exercise names ``dream.<part>``):

* ``dream.gram``        Gram matrix normalised by the number of positions        3 points
* ``dream.style_loss``  style loss over several layers, one value per image        3 points
* ``dream.tv``          total variation, squared and absolute                      3 points
* ``dream.step``        one DeepDream step: roll, gradient, normalise, clamp      4 points
* ``dream.octaves``     the octave loop (image pyramid, detail carried up)         3 points

Every case is fresh random features / images / a small random CNN; expected values come from
coursekit's references (:mod:`coursekit.style`, :mod:`coursekit.dream`,
:func:`coursekit.optimize.octaves`), which are blocked while the student's function runs. Each
check starts with the cases that expose the mistakes it names (not normalised or normalised by the
wrong size, features transposed, wrong neighbours, squared and absolute mixed up, gradient not
normalised, image not clamped, the roll not undone, the detail not carried up), then random ones.
The octave check's first picture (30 x 22, scale 1.5) has sizes that int() truncates differently
from round(). The large-step part of ``dream.step`` compares with the student's own small step, so
that a wrong normalisation does not cost that part too.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import dream as _dream
from .. import optimize as _opt
from .. import style as _style
from ..guard import model_state
from . import Mistake, Report, exercise

# ----------------------------------------------------------------------------------------------
# random cases


def _features(report: Report, n: int, c: int, h: int, w: int, positive: bool = True) -> torch.Tensor:
    g = torch.Generator().manual_seed(report.seed)
    f = torch.randn(n, c, h, w, generator=g, dtype=torch.float64)
    return f.relu() + 0.1 * f if positive else f  # mostly positive, like ReLU features, never exactly zero


def random_features_net(seed: int) -> nn.Sequential:
    """A small frozen ReLU CNN standing for "the network up to the dreamed layer": (N, 3, H, W) -> (N, 8, H/2, W/2)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, stride=2), nn.ReLU())
        for m in net.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.uniform_(m.bias, 0.0, 0.1)
    return net.eval().requires_grad_(False)


# ----------------------------------------------------------------------------------------------
# dream.gram


def _gram(f: torch.Tensor, divide) -> torch.Tensor:
    flat = f.flatten(2)  # (N, C, P)
    return flat @ flat.transpose(1, 2) / divide


@exercise("dream.gram", forbid=[_style.gram_matrix, _style.style_loss])
def check_gram(student, report: Report) -> None:
    # C, H, W all different, so that every wrong normalisation gives a different number
    n, c, h, w = 2, 3, 5, 4
    f = _features(report, n, c, h, w)
    with report.part("returns a (N, C, C) tensor", points=1):
        got = report.call(student, f.clone())
        if isinstance(got, torch.Tensor) and tuple(got.shape) == (n, h * w, h * w):
            raise Mistake(f"your result has shape {tuple(got.shape)}: (N, H*W, H*W), a Gram matrix of the positions. "
                          "Flatten the features to F of shape (N, C, H*W) and compute F @ F.transpose(1, 2), not F^T F")
        if isinstance(got, torch.Tensor) and tuple(got.shape) == (c, c):
            raise Mistake("your result has shape (C, C): keep one Gram matrix per image, (N, C, C) (torch.bmm or @ on 3-d tensors)")
        report.expect_tensor(got, shape=(n, c, c))
    with report.part("values: F F^T / (H*W) per image", points=2):
        for case in range(3):
            f = f if case == 0 else _features(report, int(report.rng.integers(1, 4)), int(report.rng.integers(2, 7)),
                                                int(report.rng.integers(2, 7)), int(report.rng.integers(2, 7)))
            nn_, cc, hh, ww = f.shape
            got = report.call(student, f.clone())
            expected = _style.gram_matrix(f, "positions")
            report.expect_close(got, expected, rtol=1e-5, atol=1e-8, mistakes={
                "not normalised: divide F F^T by the number of positions H*W": _gram(f, 1.0),
                "normalised by C*H*W (the number of elements; Johnson et al.'s choice); this exercise divides by H*W only":
                    _gram(f, cc * hh * ww),
                "normalised by C, the number of channels; divide by the number of positions H*W": _gram(f, cc),
                "normalised by H*W*N (the whole batch); each image's Gram matrix is divided by its own H*W": _gram(f, hh * ww * nn_),
                "the mean of the features was subtracted (a covariance); the Gram matrix uses the raw features":
                    _gram(f - f.mean(dim=(2, 3), keepdim=True), hh * ww),
                "normalised by N*C*H*W (every element of the batch); each image's Gram matrix is divided by its own H*W":
                    _gram(f, nn_ * cc * hh * ww),
                "normalised by H*W - 1 (like an unbiased covariance); divide by the number of positions H*W":
                    _gram(f, hh * ww - 1),
                "normalised by (H*W)^2; divide by the number of positions H*W once": _gram(f, (hh * ww) ** 2),
            })


# ----------------------------------------------------------------------------------------------
# dream.style_loss


@exercise("dream.style_loss", forbid=[_style.style_loss, _style.gram_matrix])
def check_style_loss(student, report: Report) -> None:
    n = 2
    shapes = [(3, 6, 5), (5, 3, 4)]  # two layers: (C, H, W)
    feats = [_features(report, n, *s) for s in shapes]
    targets = [_style.gram_matrix(_features(report, 1, c, h + 1, w + 2), "positions")[0] for c, h, w in shapes]  # (C, C)

    def wrong(fn):
        return sum(fn(f, a) for f, a in zip(feats, targets))

    with report.part("returns one value per image, shape (N,)", points=1):
        got = report.call(student, [f.clone() for f in feats], [a.clone() for a in targets])
        if isinstance(got, torch.Tensor) and got.dim() == 0:
            raise Mistake("your result is a single number: return one style loss per image, shape (N,) "
                          "(average over the C x C entries with .flatten(1).mean(1), not over the whole batch)")
        report.expect_tensor(got, shape=(n,))
    with report.part("values: sum over layers of mean((G - A)^2), G normalised by H*W", points=2):
        for case in range(3):
            if case:
                n = int(report.rng.integers(1, 4))
                shapes = [(int(report.rng.integers(2, 6)), int(report.rng.integers(2, 6)), int(report.rng.integers(2, 6)))
                          for _ in range(int(report.rng.integers(1, 4)))]
                feats = [_features(report, n, *s) for s in shapes]
                targets = [_style.gram_matrix(_features(report, 1, c, h, w), "positions")[0] for c, h, w in shapes]
            got = report.call(student, [f.clone() for f in feats], [a.clone() for a in targets])
            expected = _style.style_loss(feats, targets)
            grams = [_style.gram_matrix(f, "positions") for f in feats]
            report.expect_close(got, expected, rtol=1e-5, atol=1e-8, mistakes={
                "summed (G - A)^2 over the C x C entries; take their mean": wrong(
                    lambda f, a: (_style.gram_matrix(f, "positions") - a).pow(2).flatten(1).sum(1)),
                "the Gram matrices of the picture were not normalised by H*W": wrong(
                    lambda f, a: (_gram(f, 1.0) - a).pow(2).flatten(1).mean(1)),
                "the Gram matrices were normalised by C*H*W; use H*W (the same normalisation as the targets)": wrong(
                    lambda f, a: (_gram(f, f.shape[1] * f.shape[2] * f.shape[3]) - a).pow(2).flatten(1).mean(1)),
                "no square: the mean of |G - A|; the style loss is the mean of (G - A)^2": wrong(
                    lambda f, a: (_style.gram_matrix(f, "positions") - a).abs().flatten(1).mean(1)),
                "the Frobenius norm ||G - A|| instead of the mean squared difference": wrong(
                    lambda f, a: (_style.gram_matrix(f, "positions") - a).flatten(1).norm(dim=1)),
                "averaged over the layers; the style loss is their sum": expected / len(feats),
                "only the last layer counted: add every layer's term": (grams[-1] - targets[-1]).pow(2).flatten(1).mean(1),
                "an extra factor 1/4 (Gatys et al.'s 1 / (4 N^2 M^2) constant); this exercise uses the plain mean of "
                "(G - A)^2": expected / 4,
                "the square root of the mean squared difference (an RMS) per layer; the style loss is the mean of "
                "(G - A)^2 itself": wrong(lambda f, a: (_style.gram_matrix(f, "positions") - a).pow(2).flatten(1).mean(1).sqrt()),
            })


# ----------------------------------------------------------------------------------------------
# dream.tv


@exercise("dream.tv", forbid=[_style.tv_loss])
def check_tv(student, report: Report) -> None:
    n, c, h, w = 2, 3, 5, 7  # H != W: exposes mixed-up axes
    g = torch.Generator().manual_seed(report.seed)
    x = torch.rand(n, c, h, w, generator=g, dtype=torch.float64)

    def variants(x, power):
        dx = x[..., :, 1:] - x[..., :, :-1]
        dy = x[..., 1:, :] - x[..., :-1, :]
        p = lambda d, q=power: d.abs().pow(q).flatten(1)  # noqa: E731
        rolled_x = (torch.roll(x, -1, dims=3) - x).abs().pow(power).flatten(1).mean(1)
        rolled_y = (torch.roll(x, -1, dims=2) - x).abs().pow(power).flatten(1).mean(1)
        diag = (x[..., 1:, 1:] - x[..., :-1, :-1]).abs().pow(power).flatten(1).mean(1)
        return {
            "summed the differences instead of averaging each direction (mean over its own differences)":
                p(dx).sum(1) + p(dy).sum(1),
            "one mean over both directions together; average the horizontal and the vertical differences separately, then add":
                torch.cat([p(dx), p(dy)], 1).mean(1),
            "only horizontal neighbours (x[..., :, 1:] - x[..., :, :-1]); add the vertical ones (x[..., 1:, :] - x[..., :-1, :])":
                p(dx).mean(1),
            "only vertical neighbours; add the horizontal ones too": p(dy).mean(1),
            "the same direction twice: one term should use dim -1 (columns), the other dim -2 (rows)": 2 * p(dx).mean(1),
            "the same direction twice (rows): one term should use dim -1 (columns), the other dim -2 (rows)": 2 * p(dy).mean(1),
            "torch.roll wraps around: the last column/row was compared with the first; slice instead (x[..., 1:] - x[..., :-1])":
                rolled_x + rolled_y,
            "diagonal neighbours (x[..., 1:, 1:] - x[..., :-1, :-1]); use horizontal and vertical neighbours": diag,
            "squared differences where power=1 asks for absolute ones (|d|^power)" if power == 1 else
            "absolute differences where power=2 asks for squared ones (|d|^power)":
                _style.tv_loss(x, 2.0 if power == 1 else 1.0),
            "no absolute value: |d|^power needs d.abs() (a negative difference counts as much as a positive one)":
                dx.pow(power).flatten(1).mean(1) + dy.pow(power).flatten(1).mean(1),
        }

    with report.part("returns one value per image, shape (N,)", points=1):
        got = report.call(student, x.clone(), 2.0)
        if isinstance(got, torch.Tensor) and got.dim() == 0:
            raise Mistake("your result is a single number: return one value per image, shape (N,) (reduce with .flatten(1).mean(1))")
        report.expect_tensor(got, shape=(n,))
    with report.part("power=2: mean squared horizontal + mean squared vertical differences", points=1):
        for case in range(2):
            xx = x if case == 0 else torch.rand(int(report.rng.integers(1, 4)), 3, int(report.rng.integers(3, 9)),
                                                int(report.rng.integers(3, 9)), generator=g, dtype=torch.float64)
            got = report.call(student, xx.clone(), 2.0)
            report.expect_close(got, _style.tv_loss(xx, 2.0), rtol=1e-5, atol=1e-8, mistakes=variants(xx, 2.0))
    with report.part("power=1: mean absolute differences (and any other power)", points=1):
        for power in (1.0, float(report.rng.uniform(1.2, 1.8))):
            got = report.call(student, x.clone(), power)
            report.expect_close(got, _style.tv_loss(x, power), rtol=1e-5, atol=1e-8, mistakes=variants(x, power),
                                what=f"your result for power={power:g}")


# ----------------------------------------------------------------------------------------------
# dream.step


def _step_variants(features, x, shift, lr):
    """The reference step and its usual mistakes, all computed here (not by the student's code)."""
    xg = x.detach().clone().requires_grad_(True)
    xs = torch.roll(xg, shifts=tuple(shift), dims=(2, 3))
    a = features(xs)
    (g,) = torch.autograd.grad(a.pow(2).flatten(1).mean(1).sum(), xg)
    (g_plain,) = torch.autograd.grad(features(xg).pow(2).flatten(1).mean(1).sum(), xg)
    (g_lin,) = torch.autograd.grad(features(torch.roll(xg, shifts=tuple(shift), dims=(2, 3))).flatten(1).mean(1).sum(), xg)
    (g_swap,) = torch.autograd.grad(features(torch.roll(xg, shifts=tuple(shift), dims=(3, 2))).pow(2).flatten(1).mean(1).sum(), xg)
    back = tuple(-v for v in shift)
    (g_back,) = torch.autograd.grad(features(torch.roll(xg, shifts=back, dims=(2, 3))).pow(2).flatten(1).mean(1).sum(), xg)
    x = x.detach()

    def per_image(v):
        return v.view(-1, 1, 1, 1)

    def rms_step(grad):
        return (x + lr * grad / per_image(grad.pow(2).flatten(1).mean(1).sqrt())).clamp(0, 1)

    rms = per_image(g.pow(2).flatten(1).mean(1).sqrt())
    rolled_grad = torch.roll(g, shifts=tuple(shift), dims=(2, 3))  # the gradient w.r.t. the rolled picture
    return {
        "expected": (x + lr * g / rms).clamp(0, 1),
        "mistakes": {
            "the gradient was not normalised: divide it by its root-mean-square (per image) before the step":
                (x + lr * g).clamp(0, 1),
            "normalised by the mean absolute gradient; this exercise divides by the root-mean-square sqrt(mean(g^2))":
                (x + lr * g / per_image(g.abs().flatten(1).mean(1))).clamp(0, 1),
            "normalised by the largest |gradient|; divide by the root-mean-square sqrt(mean(g^2)) of each image":
                (x + lr * g / per_image(g.abs().flatten(1).amax(1))).clamp(0, 1),
            "normalised over the whole batch; compute the root-mean-square of each image's gradient separately":
                (x + lr * g / g.pow(2).mean().sqrt()).clamp(0, 1),
            "the image was not clamped to [0, 1] after the step": x + lr * g / rms,
            "a descent step (minus): DeepDream climbs the energy, x + lr * g / rms(g)": (x - lr * g / rms).clamp(0, 1),
            "the result is still rolled: take the gradient w.r.t. the unshifted x (the roll inside the graph undoes "
            "itself), or roll the picture back": (torch.roll(x, shifts=tuple(shift), dims=(2, 3)) + lr * rolled_grad / rms).clamp(0, 1),
            "the shift was ignored: roll the picture by `shift` before the forward pass":
                (x + lr * g_plain / per_image(g_plain.pow(2).flatten(1).mean(1).sqrt())).clamp(0, 1),
            "the mean activation was climbed; DeepDream's energy is the mean of the *squared* activations":
                rms_step(g_lin),
            "normalised by the standard deviation of the gradient (g.std()); divide by its root-mean-square "
            "sqrt(mean(g^2)), which does not subtract the mean":
                (x + lr * g / per_image(g.flatten(1).std(1))).clamp(0, 1),
            "normalised by the L2 norm of the gradient; the root-mean-square is that norm / sqrt(number of values)":
                (x + lr * g / per_image(g.flatten(1).norm(dim=1))).clamp(0, 1),
            "the shift went to the wrong axes: shift[0] rolls the rows (dim 2), shift[1] the columns (dim 3)":
                rms_step(g_swap),
            "rolled by -shift; roll by shift, torch.roll(x, shifts=shift, dims=(2, 3))": rms_step(g_back),
        },
    }


def _expect_large_step(report: Report, got, small: torch.Tensor, x: torch.Tensor) -> None:
    """lr = 0.5 must give the student's own lr = 0.02 step, 25 times longer, clamped to [0, 1]."""
    got = report.expect_tensor(got, shape=x.shape, what="your result with lr=0.5").detach().to(x.dtype)
    if got.min() < -1e-6 or got.max() > 1 + 1e-6:
        raise Mistake(f"your result with lr=0.5 has pixels outside [0, 1] (min {float(got.min()):.3g}, max "
                      f"{float(got.max()):.3g}): the image was not clamped to [0, 1] after the step")
    free = (small > 1e-6) & (small < 1 - 1e-6)  # pixels the small step did not clamp
    own = (x + 25 * (small - x)).clamp(0, 1)
    if not torch.allclose(got[free], own[free], rtol=1e-3, atol=1e-5):
        raise Mistake("with lr=0.5 your result is not your lr=0.02 step made 25 times longer and clamped to [0, 1]: "
                      "the step is x + lr * g / rms(g), then .clamp(0, 1)")


@exercise("dream.step", forbid=[_dream.dream_step, _dream.deepdream])
def check_step(student, report: Report) -> None:
    features = random_features_net(report.seed)
    g = torch.Generator().manual_seed(report.seed)
    x = 0.25 + 0.5 * torch.rand(2, 3, 12, 10, generator=g)  # inside (0.25, 0.75): a small step is never clamped
    x[1] = 0.5 + 0.3 * (x[1] - 0.5)  # a low-contrast second image: its gradient has another scale
    shift = (int(report.rng.integers(2, 5)), -int(report.rng.integers(2, 4)))
    with report.part("returns a detached (N, C, H, W) tensor", points=1):
        got = report.call(student, features, x.clone(), shift, 0.02)
        report.expect_tensor(got, shape=x.shape, detached=True)
    with report.part("values: roll, gradient of mean(a^2), x + lr * g / rms(g) per image", points=2):
        for case in range(3):
            if case:
                features = random_features_net(report.seed)
                x = torch.rand(int(report.rng.integers(1, 4)), 3, 8 + 2 * int(report.rng.integers(0, 4)), 10, generator=g) * 0.5 + 0.25
                shift = (int(report.rng.integers(-4, 5)), int(report.rng.integers(1, 5)))
            lr = 0.02
            v = _step_variants(features, x, shift, lr)
            got = report.call(student, features, x.clone(), shift, lr)
            report.expect_close(got, v["expected"], rtol=1e-4, atol=1e-6, mistakes=v["mistakes"])
    with report.part("a large step stays in [0, 1]; model and picture left as they were", points=1):
        # judged against the student's own small step on the same picture (x + 25 * (small - x), clamped), so
        # that another mistake (a wrong normalisation, the roll) does not fail this part as well
        features = random_features_net(report.seed)
        x = 0.25 + 0.5 * torch.rand(2, 3, 12, 12, generator=g)
        small = report.expect_tensor(report.call(student, features, x.clone(), (1, 1), 0.02), shape=x.shape,
                                     what="your result with lr=0.02").detach()
        before, x_before = model_state(features, values=False), x.clone()
        got = report.call(student, features, x, (1, 1), 0.5)
        if not torch.equal(x, x_before) or x.requires_grad or x.grad is not None:
            raise Mistake("your function changed the caller's x (in place, or it now requires grad): work on a copy, "
                          "x = x.detach().clone().requires_grad_(True)")
        other = before.differences(model_state(features, values=False))
        if other:
            raise Mistake("your function left the model changed: " + "; ".join(other))
        _expect_large_step(report, got, small, x)


# ----------------------------------------------------------------------------------------------
# dream.octaves


def _make_step(report: Report):
    """A deterministic stand-in for "optimise this octave": a size-dependent, non-linear change."""
    phase = float(report.rng.uniform(0, 3))

    def step(picture: torch.Tensor) -> torch.Tensor:
        h, w = picture.shape[-2:]
        yy = torch.linspace(0, 3, h, dtype=picture.dtype).view(-1, 1)
        xx = torch.linspace(0, 3, w, dtype=picture.dtype).view(1, -1)
        return (picture + 0.1 * torch.sin(4 * picture + yy + 2 * xx + phase)).clamp(0, 1)

    return step


def _resize(t, size):
    return F.interpolate(t, size=size, mode="bilinear", align_corners=False)


def _octave_sizes(h, w, n, scale, rounding=round):
    return [(max(1, int(rounding(h / scale**k))), max(1, int(rounding(w / scale**k)))) for k in range(n)][::-1]


def _octave_loop(step, x, sizes, resize=_resize):
    """The octave loop with the given sizes (smallest first) and resizing: the answer, or a variant of it."""
    h, w = x.shape[-2:]
    detail = torch.zeros_like(resize(x, sizes[0]))
    for size in sizes:
        base = resize(x, size) if size != (h, w) else x
        detail = resize(detail, size) if detail.shape[-2:] != size else detail
        res = step(base + detail)
        detail = res - base
    return res


def _octave_mistakes(step, x, n, scale):
    h, w = x.shape[-2:]
    sizes = _octave_sizes(h, w, n, scale)
    out = {}
    # 1. the dream itself carried up, not the detail. Resizing each octave's base from the previous base gives
    # exactly the same numbers (bilinear resizing is linear: resize(base) + resize(detail) = resize(dream)), so
    # one diagnosis names both
    pic = _resize(x, sizes[0])
    for size in sizes:
        pic = step(_resize(pic, size) if pic.shape[-2:] != size else pic)
    out["each octave started from the previous octave's result resized (the dream itself upsampled, or each base "
        "resized from the previous, smaller base; both give these numbers): resize the *original* picture to every "
        "octave's size and add only the detail (dream - that octave's resized original), upsampled"] = pic
    # 2. detail = change of the last octave only
    detail = torch.zeros_like(_resize(x, sizes[0]))
    for size in sizes:
        base = _resize(x, size) if size != (h, w) else x
        detail = _resize(detail, size) if detail.shape[-2:] != size else detail
        start = base + detail
        res = step(start)
        detail = res - start
    out["the detail kept only the last octave's change (dream - its start); it is dream - resized original, "
        "all octaves' changes together"] = res
    out["no pyramid: only the full-size octave was dreamed (the detail from the small octaves is lost)"] = step(x)
    out["the octave sizes were truncated with int(); round them, round(H / scale**k)"] = _octave_loop(
        step, x, _octave_sizes(h, w, n, scale, rounding=int))
    out["resized with align_corners=True; use F.interpolate(..., mode='bilinear', align_corners=False)"] = _octave_loop(
        step, x, sizes, lambda t, size: F.interpolate(t, size=size, mode="bilinear", align_corners=True))
    out["resized with mode='nearest'; use F.interpolate(..., mode='bilinear', align_corners=False)"] = _octave_loop(
        step, x, sizes, lambda t, size: F.interpolate(t, size=size, mode="nearest"))
    out[f"one octave too many ({n + 1}): the picture is shrunk n_octaves - 1 times, sizes H / scale**k for "
        f"k = n_octaves - 1, ..., 0"] = _octave_loop(step, x, _octave_sizes(h, w, n + 1, scale))
    if n > 1:
        out[f"one octave too few ({n - 1}): there are n_octaves sizes, H / scale**k for k = n_octaves - 1, ..., 0"] = \
            _octave_loop(step, x, _octave_sizes(h, w, n - 1, scale))
    return sizes, out


@exercise("dream.octaves", forbid=[_opt.octaves, _dream.deepdream])
def check_octaves(student, report: Report) -> None:
    step = _make_step(report)
    g = torch.Generator().manual_seed(report.seed)
    x = torch.rand(1, 3, 30, 22, generator=g, dtype=torch.float64)
    n, scale = 3, 1.5
    sizes, mistakes = _octave_mistakes(step, x, n, scale)
    with report.part("returns a picture of the input's size", points=1):
        got = report.call(student, step, x.clone(), n, scale)
        if isinstance(got, torch.Tensor) and tuple(got.shape[-2:]) == sizes[0]:
            raise Mistake(f"your result has the smallest octave's size {sizes[0]}: go from the smallest octave to the "
                          "largest (the original size last)")
        report.expect_tensor(got, shape=x.shape)
    with report.part("values: smallest octave first, the detail carried up and added to the resized original", points=2):
        for case in range(3):
            if case:
                x = torch.rand(int(report.rng.integers(1, 3)), 3, int(report.rng.integers(16, 33)), int(report.rng.integers(16, 33)),
                               generator=g, dtype=torch.float64)
                n, scale = int(report.rng.integers(2, 5)), float(report.rng.choice([1.3, 1.4, 1.6]))
                sizes, mistakes = _octave_mistakes(step, x, n, scale)
            expected = _opt.octaves(x, lambda picture, octave: step(picture), n_octaves=n, scale=scale)
            got = report.call(student, step, x.clone(), n, scale)
            report.expect_close(got, expected, rtol=1e-6, atol=1e-8, mistakes=mistakes,
                                what=f"your result ({n} octaves, scale {scale:g}, picture {tuple(x.shape[-2:])})")
