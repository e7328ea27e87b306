"""Checks of exercise set 03_saliency (lecture 3: saliency, occlusion and Grad-CAM).

Parts (exercise names ``saliency.<part>``):

* ``saliency.vanilla``     vanilla gradient saliency (Simonyan et al. 2014)      4 points
* ``saliency.smoothgrad``  SmoothGrad with noise scaled to each image's range    3 points
* ``saliency.occlusion``   occlusion grid of probability drops (Zeiler & Fergus) 3 points
* ``saliency.gradcam``     Grad-CAM with hooks the student registers             4 points
* ``saliency.guided``      guided backpropagation with ReLU backward hooks       3 points

Every case is a fresh small random CNN (nn.ReLU modules, frozen, eval mode) and fresh random
images, so the checks run in well under a second each. Expected values come from coursekit's
references (blocked while the student's function runs, together with the engines that would do the
work for them: the gradient path, the CAM base and the rules engine, all marked with coursekit's
``@reference``) or, for the occlusion grid, from an obviously-correct loop.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import cam as _cam
from .. import gradients as _grad
from .. import hooks as _hooks
from .. import saliency as _sal
from ..guard import model_state
from ..rules import Composite
from . import Mistake, Report, exercise

# ----------------------------------------------------------------------------------------------
# random cases


def random_cnn(seed: int, channels: int = 3, size: int = 16, classes: int = 5) -> nn.Sequential:
    """A small frozen CNN with nn.ReLU modules and a spatially varying head (Flatten + Linear).

    Layer 6 (the last ReLU, ``(N, 16, size/2, size/2)``) is the Grad-CAM layer of the checks.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = nn.Sequential(
            nn.Conv2d(channels, 8, 3, padding=1),  # 0
            nn.ReLU(),  # 1
            nn.Conv2d(8, 8, 3, padding=1),  # 2
            nn.ReLU(),  # 3
            nn.MaxPool2d(2),  # 4   (N, 8, s/2, s/2)
            nn.Conv2d(8, 16, 3, padding=1),  # 5
            nn.ReLU(),  # 6   (N, 16, s/2, s/2)  Grad-CAM layer
            nn.Flatten(),  # 7
            nn.Linear(16 * (size // 2) ** 2, classes),  # 8
        )
        # a positive bias keeps enough ReLUs open for non-trivial maps
        for m in net.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.uniform_(m.bias, 0.0, 0.1)
    return net.eval().requires_grad_(False)


def random_images(report: Report, n: int = 3, channels: int = 3, size: int = 16, ranges=None) -> torch.Tensor:
    """Images ``(n, channels, size, size)``; image ``i`` spans ``ranges[i] = (lo, hi)`` (default [0, 1))."""
    g = torch.Generator().manual_seed(report.seed)
    x = torch.rand(n, channels, size, size, generator=g)
    if ranges is not None:
        lo = torch.tensor([r[0] for r in ranges]).view(-1, 1, 1, 1)
        hi = torch.tensor([r[1] for r in ranges]).view(-1, 1, 1, 1)
        x = lo + (hi - lo) * x
    return x


def _classes(report: Report, n: int, k: int = 5) -> list[int]:
    """``n`` different class indices (so that mixing up per-image targets shows)."""
    return [int(v) for v in report.rng.permutation(k)[:n]]


# ----------------------------------------------------------------------------------------------
# what the student must leave unchanged, and what they may not call


def _snapshot(model: nn.Module, x: torch.Tensor) -> dict:
    return {"model": model_state(model, values=False), "x": x.clone(), "x_requires_grad": x.requires_grad}


def _expect_unchanged(before: dict, model: nn.Module, x: torch.Tensor) -> None:
    was, now = before["model"], model_state(model, values=False)
    if now.hooks != was.hooks:
        left = sum(now.hooks) - sum(was.hooks)
        raise Mistake(
            f"{left} hook(s) are still registered on the model after your function returned: keep the handles "
            "that register_*_hook returns and call handle.remove() on each, in a `finally:` block"
        )
    if now.requires_grad != was.requires_grad:
        raise Mistake(
            "the model's parameters have a different requires_grad afterwards (the model came frozen): "
            "do not call model.requires_grad_(True); make the input require grad instead "
            "(x = x.clone().requires_grad_(True))"
        )
    if now.training != was.training:
        raise Mistake("the model's train/eval mode changed: leave model.train()/model.eval() alone")
    if x.requires_grad != before["x_requires_grad"] or x.grad is not None:
        raise Mistake(
            "your function changed the caller's x (it now requires grad or has a .grad): work on a copy, "
            "x = x.clone().requires_grad_(True)"
        )
    if not torch.equal(x, before["x"]):
        raise Mistake("your function modified the caller's image x in place: work on a copy")
    other = was.differences(now)
    if other:
        raise Mistake("your function left the model changed: " + "; ".join(other))


# The engines behind coursekit's attribution functions, all marked @reference: blocking them while
# the student's function runs keeps "call coursekit and rename the result" from passing.
_GRADIENT_ENGINE = [_grad.gradient]
_GUIDED_RULE = [Composite.applied]
_CAM_ENGINE = [_grad.layer_gradient, _cam.CAM.layer_maps, _hooks.record]


def _call(report: Report, student, *args, **kwargs):
    return report.call(student, *args, **kwargs)


def _gradient(model, x, target) -> torch.Tensor:
    return _sal.input_gradient(model, x, target)


# ----------------------------------------------------------------------------------------------
# saliency.vanilla


@exercise("saliency.vanilla", forbid=[_sal.vanilla_saliency, *_GRADIENT_ENGINE])
def check_vanilla(student, report: Report) -> None:
    seed = report.seed
    model = random_cnn(seed)
    x = random_images(report, n=3)
    target = int(report.rng.integers(0, 5))
    with report.part("returns a detached (N, H, W) tensor", points=1):
        got = _call(report, student, model, x, target)
        if isinstance(got, torch.Tensor) and got.shape == x.shape:
            raise Mistake(
                f"your result has shape {tuple(got.shape)}, the shape of the input (N, C, H, W): reduce the "
                "channels with the maximum of the absolute gradient over dim 1 to get (N, H, W)"
            )
        report.expect_tensor(got, shape=(3, 16, 16), detached=True)
    with report.part("values: max over channels of |d score / d x| (3-channel images, one target)", points=2):
        got = _call(report, student, model, x, target)
        g = _gradient(model, x, target)  # (N, C, H, W)
        expected = g.abs().amax(dim=1)
        probs_grad = _gradient(model, x, lambda out: out.softmax(1)[:, target])
        report.expect_close(
            got, expected, rtol=1e-4, atol=1e-6,
            mistakes={
                "no absolute value: take g.abs() before the maximum over channels (a strongly negative "
                "gradient is as salient as a positive one)": g.amax(dim=1),
                "mean over channels instead of the maximum of |g|": g.abs().mean(dim=1),
                "mean over channels of the signed gradient instead of the maximum of |g|": g.mean(dim=1),
                "sum over channels instead of the maximum of |g|": g.abs().sum(dim=1),
                "gradient of the softmax probability; differentiate the raw class score (the logit) instead":
                    probs_grad.abs().amax(dim=1),
                "gradient of the summed logits of all classes; select the target class's score only":
                    _gradient(model, x, lambda out: out.sum(1)).abs().amax(dim=1),
            },
        )
    with report.part("one target per image, model and input left as they were", points=1):
        model2 = random_cnn(report.seed)
        x2 = random_images(report, n=3)
        targets = _classes(report, 3)
        before = _snapshot(model2, x2)
        got = _call(report, student, model2, x2, targets)
        _expect_unchanged(before, model2, x2)
        _expect_per_image(report, got, _gradient(model2, x2, targets).abs().amax(dim=1),
                          _gradient(model2, x2, targets[0]).abs().amax(dim=1))


def _expect_per_image(report: Report, got, expected: torch.Tensor, first_target: torch.Tensor) -> None:
    """Per-image targets, judged on values only when the values part passed: one wrong formula does not
    cost a second point here (the values part already explained it)."""
    report.expect_tensor(got, shape=expected.shape, what="your result with per-image targets")
    if report.parts[1].earned == 0:
        return
    report.expect_close(got, expected, rtol=1e-4, atol=1e-6, what="your result with per-image targets", mistakes={
        "every image used the first image's target: use target[i] for image i "
        "(scores = model(x)[torch.arange(N), target])": first_target})


# ----------------------------------------------------------------------------------------------
# saliency.smoothgrad


@exercise("saliency.smoothgrad", forbid=[_sal.smoothgrad, *_GRADIENT_ENGINE])
def check_smoothgrad(student, report: Report) -> None:
    model = random_cnn(report.seed)
    # images with clearly different value ranges, so that range scaling matters
    # (per image 0.4 and 0.7, batch 0.7, never 1: each scaling mistake gives different noise)
    x = random_images(report, n=2, ranges=[(0.2, 0.6), (0.1, 0.8)])
    target = int(report.rng.integers(0, 5))
    n_samples = 6
    noise_level = float(report.rng.uniform(0.1, 0.3))
    g = torch.Generator().manual_seed(report.seed)
    noise = torch.randn(2, n_samples, *x.shape[1:], generator=g)  # (N, S, C, H, W) standard normal
    with report.part("returns a detached (N, C, H, W) tensor", points=1):
        got = _call(report, student, model, x, target, noise, noise_level)
        if isinstance(got, torch.Tensor) and tuple(got.shape) == (2, 16, 16):
            raise Mistake("your result is a map (N, H, W); return the averaged gradient (N, C, H, W) itself")
        report.expect_tensor(got, shape=x.shape, detached=True)
    with report.part("values: mean gradient over x + noise_level * (max - min) of each image * noise", points=2):
        got = _call(report, student, model, x, target, noise, noise_level)

        def sg(scale, magnitude=False):  # scale: (N,) standard deviation per image
            return _sal.smoothgrad(model, x, target, noise=noise * scale.view(-1, 1, 1, 1, 1), magnitude=magnitude)

        ranges = x.amax(dim=(1, 2, 3)) - x.amin(dim=(1, 2, 3))  # (N,)
        sigma = noise_level * ranges
        expected = sg(sigma)
        report.expect_close(
            got, expected, rtol=1e-4, atol=1e-6,
            mistakes={
                "the noise is not scaled to the image's value range: sigma = noise_level * (x.max() - x.min())":
                    sg(torch.full((2,), noise_level)),
                "sigma was computed from the whole batch's range; use each image's own max - min":
                    sg(torch.full((2,), noise_level * float(x.max() - x.min()))),
                "the noise was used without scaling (sigma = 1)": sg(torch.ones(2)),
                "sigma = noise_level * x.std(); the paper scales by the value range max - min":
                    sg(noise_level * x.flatten(1).std(dim=1)),
                "you summed the gradients instead of averaging them (divide by the number of samples)":
                    expected * n_samples,
                "you averaged |gradient|; SmoothGrad averages the signed gradients": sg(sigma, magnitude=True),
                "no noise was added: this is the plain gradient": _gradient(model, x, target),
            },
        )


# ----------------------------------------------------------------------------------------------
# saliency.occlusion


def occlusion_grid_slow(model, x, target, patch: int, stride: int, fill: float, score: str = "prob") -> torch.Tensor:
    """Obviously-correct reference: drop of the target's probability (or logit) for every window
    lying fully inside the image, ``grid[n, i, j]`` for the window at row ``i*stride``, column
    ``j*stride``. All occluded copies go through the model in one batch."""
    n, _, h, w = x.shape
    rows, cols = (h - patch) // stride + 1, (w - patch) // stride + 1
    copies = []
    for i in range(rows):
        for j in range(cols):
            xo = x.clone()
            xo[:, :, i * stride : i * stride + patch, j * stride : j * stride + patch] = fill
            copies.append(xo)
    batch = torch.cat([x] + copies)  # (N * (1 + rows*cols), C, H, W), window-major
    with torch.no_grad():
        out = model(batch)
    out = out.softmax(dim=1) if score == "prob" else out
    s = out[:, target].view(1 + rows * cols, n)  # (1 + windows, N)
    return (s[0] - s[1:]).T.reshape(n, rows, cols)


@exercise("saliency.occlusion", forbid=[_sal.occlusion])
def check_occlusion(student, report: Report) -> None:
    model = random_cnn(report.seed)
    x = random_images(report, n=2)
    target = int(report.rng.integers(0, 5))
    fill = round(float(report.rng.uniform(0.3, 0.7)), 2)
    # first the case that exposes an off-by-one window count ((16 - 4) % 3 == 0: the last window ends
    # exactly at the border, range(0, H - patch, stride) misses it), then a random one
    cases = [(4, 3), (int(report.rng.choice([5, 6])), int(report.rng.choice([2, 3])))]
    patch, stride = cases[0]
    with report.part("returns a detached (N, n_rows, n_cols) grid", points=1):
        for p_, s_ in cases:
            r_ = (16 - p_) // s_ + 1
            got = _call(report, student, model, x, target, p_, s_, fill)
            if isinstance(got, torch.Tensor) and got.dim() == 3 and got.shape[0] == 2 and got.shape[1:] != (r_, r_):
                raise Mistake(
                    f"your grid has shape {tuple(got.shape)}, expected (2, {r_}, {r_}) for patch={p_}, stride={s_} "
                    f"on 16x16 images: windows start at 0, stride, 2*stride, ... and must lie fully inside the image, "
                    f"so there are (H - patch) // stride + 1 = {r_} per axis (the last one may end exactly at the border)"
                )
            report.expect_tensor(got, shape=(2, r_, r_), detached=True)
    with report.part("values: p(target | x) - p(target | x with the window set to fill)", points=2):
        got = _call(report, student, model, x, target, patch, stride, fill)
        expected = occlusion_grid_slow(model, x, target, patch, stride, fill)
        plain = model(x).softmax(1)[:, target].view(-1, 1, 1)
        report.expect_close(
            got, expected, rtol=1e-4, atol=1e-6,
            mistakes={
                "this is the probability of the occluded image; the map shows the DROP, p(x) - p(occluded)":
                    plain - expected,
                "the drop of the logit; use the softmax probability (as Zeiler & Fergus)":
                    occlusion_grid_slow(model, x, target, patch, stride, fill, score="logit"),
                f"the window was filled with 0 instead of fill={fill}":
                    occlusion_grid_slow(model, x, target, patch, stride, 0.0),
                "rows and columns are swapped: grid[:, i, j] is the window at row i*stride, column j*stride":
                    expected.transpose(1, 2),
            },
        )


# ----------------------------------------------------------------------------------------------
# saliency.gradcam


def _gradcam_at_layer(model, x, target, layer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Activations, gradients and the Grad-CAM map (N, h, w) at the layer's resolution."""
    act, grad = _cam.GradCAM(model, layer).layer_maps(x, target)  # (N, K, h, w) each
    return act, grad, F.relu((grad.mean(dim=(2, 3), keepdim=True) * act).sum(dim=1))


def _mixed_sign_class(model, x, layer) -> int:
    """The class whose weighted sum sum_k alpha_k A_k is closest to half positive, half negative:
    on such a case a missing ReLU (or |.| instead of ReLU) cannot go unnoticed."""
    best, best_gap = 0, 2.0
    for k in range(model[-1].out_features):
        a, g = _cam.GradCAM(model, layer).layer_maps(x, k)
        raw = (g.mean(dim=(2, 3), keepdim=True) * a).sum(dim=1)
        gap = abs(float((raw > 0).float().mean()) - 0.5)
        if gap < best_gap:
            best, best_gap = k, gap
    return best


@exercise("saliency.gradcam", forbid=[_cam.gradcam, *_CAM_ENGINE])
def check_gradcam(student, report: Report) -> None:
    model = random_cnn(report.seed)
    layer = model[6]
    x = random_images(report, n=3)
    target = _mixed_sign_class(model, x, layer)
    with report.part("returns a detached (N, h, w) map at the layer's resolution", points=1):
        got = _call(report, student, model, x, target, layer)
        if isinstance(got, torch.Tensor) and tuple(got.shape) == (3, 16, 16):
            raise Mistake("your map is upsampled to the input size (16, 16); return it at the layer's resolution (8, 8)")
        report.expect_tensor(got, shape=(3, 8, 8), detached=True)
    with report.part("values: ReLU(sum_k alpha_k A_k), alpha_k = mean over positions of dS/dA_k", points=2):
        got = _call(report, student, model, x, target, layer)
        act, grad, expected = _gradcam_at_layer(model, x, target, layer)
        raw = (grad.mean(dim=(2, 3), keepdim=True) * act).sum(dim=1)
        _, _, from_probs = _gradcam_at_layer(model, x, lambda out: out.softmax(1)[:, target], layer)
        lo = expected.amin(dim=(1, 2), keepdim=True)
        span = (expected.amax(dim=(1, 2), keepdim=True) - lo).clamp(min=1e-12)
        report.expect_close(
            got, expected, rtol=1e-4, atol=1e-6,
            mistakes={
                "no ReLU on the weighted sum: Grad-CAM keeps only positive evidence, F.relu(...)": raw,
                "|sum| instead of ReLU(sum): negative evidence must become 0, not positive": raw.abs(),
                "alpha_k summed over positions instead of averaged (a factor h*w too large)": expected * 64,
                "gradients times activations without averaging the gradients (that is HiResCAM, not Grad-CAM)":
                    F.relu((grad * act).sum(dim=1)),
                "gradient of the softmax probability; Grad-CAM differentiates the class score (logit)": from_probs,
                "the map is normalised to [0, 1]; return the raw map (normalise only for display)":
                    (expected - lo) / span,
            },
        )
    with report.part("hooks removed, model and input left as they were, per-image targets", points=1):
        model2 = random_cnn(report.seed)
        x2 = random_images(report, n=3)
        targets = _classes(report, 3)
        before = _snapshot(model2, x2)
        got = _call(report, student, model2, x2, targets, model2[6])
        _expect_unchanged(before, model2, x2)
        _expect_per_image(report, got, _gradcam_at_layer(model2, x2, targets, model2[6])[2],
                          _gradcam_at_layer(model2, x2, targets[0], model2[6])[2])


# ----------------------------------------------------------------------------------------------
# saliency.guided


@exercise("saliency.guided", forbid=[_sal.guided_backprop, *_GRADIENT_ENGINE, *_GUIDED_RULE])
def check_guided(student, report: Report) -> None:
    model = random_cnn(report.seed)
    x = random_images(report, n=2)
    target = int(report.rng.integers(0, 5))
    with report.part("returns a detached (N, C, H, W) tensor", points=1):
        got = _call(report, student, model, x, target)
        if isinstance(got, torch.Tensor) and tuple(got.shape) == (2, 16, 16):
            raise Mistake("your result is a map (N, H, W); return the attribution (N, C, H, W) itself")
        report.expect_tensor(got, shape=x.shape, detached=True)
    with report.part("values: at every ReLU, grad_in = relu(grad_out) where the input was positive", points=1):
        got = _call(report, student, model, x, target)
        expected = _sal.guided_backprop(model, x, target)
        report.expect_close(
            got, expected, rtol=1e-4, atol=1e-6,
            mistakes={
                "this is the plain gradient: the backward hooks did not change anything (return a modified "
                "grad_input tuple from a full backward hook on each nn.ReLU)": _gradient(model, x, target),
                "this is DeconvNet: the forward mask (input > 0) was dropped; guided backprop keeps it "
                "(clamp the gradient that already went through the ReLU's own backward)":
                    _sal.deconvnet(model, x, target),
                "absolute value of the attribution; return the signed result": expected.abs(),
            },
        )
    with report.part("hooks removed, model and input left as they were", points=1):
        model2 = random_cnn(report.seed)
        x2 = random_images(report, n=2)
        before = _snapshot(model2, x2)
        got = _call(report, student, model2, x2, target)
        _expect_unchanged(before, model2, x2)
        report.expect_tensor(got, shape=x2.shape, what="your attribution")  # the values were judged above
