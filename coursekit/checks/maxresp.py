"""Checks of exercise set 02_maximal_response (lecture 2: maximal response).

Parts (exercise names ``maxresp.<part>``):

* ``maxresp.ascent_step``          one normalised gradient-ascent step on the input     4 points
* ``maxresp.edge_energy``          Fleuret's multi-scale edge-energy penalty             5 points
* ``maxresp.class_visualization``  a class visualisation loop reaching p >= 0.9          4 points
* ``maxresp.nearest_neighbours``   k nearest neighbours in feature space                 3 points

The step and the penalty are checked on fresh random small CNNs and random pictures, the
neighbours on random features with very different norms (so that Euclidean distance, dot
product and cosine disagree). The class visualisation runs the student's loop on the course's
ImageNet model, efficientnet_lite0, at 128 x 128 pixels for 30 steps (a few seconds on a laptop)
for a random class, drawn among the 964 classes the solution's loop makes at least 0.999 likely in those
30 steps (:data:`HARD_CLASSES` lists the other 36). Expected values come from coursekit's references, which
are blocked while the student's function runs.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from .. import maximize as _mx
from .. import representations as _rep
from . import Mistake, Report, StudentError, exercise

# ----------------------------------------------------------------------------------------------
# random cases


def random_cnn(seed: int, channels: int = 3, size: int = 16, classes: int = 5) -> nn.Sequential:
    """A small frozen ReLU CNN in eval mode: (N, channels, size, size) -> (N, classes)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = nn.Sequential(
            nn.Conv2d(channels, 8, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(16 * (size // 2) ** 2, classes),
        )
        for m in net.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.uniform_(m.bias, 0.0, 0.1)  # keeps enough ReLUs open
    return net.eval().requires_grad_(False)


def _snapshot(model: nn.Module) -> dict:
    return {
        "training": [m.training for m in model.modules()],
        "requires_grad": [p.requires_grad for p in model.parameters()],
        "grads": [p.grad is None for p in model.parameters()],
        "hooks": [len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules()],
    }


def _expect_model_unchanged(before: dict, model: nn.Module) -> None:
    after = _snapshot(model)
    if after["requires_grad"] != before["requires_grad"]:
        raise Mistake(
            "the model's parameters require grad after your function (the model came frozen): never call "
            "model.requires_grad_(True); only the picture is optimised, so only it needs requires_grad"
        )
    if after["grads"] != before["grads"]:
        raise Mistake(
            "the model's parameters got a .grad: gradients were computed for the weights. Keep the model frozen "
            "and differentiate w.r.t. the picture only (torch.autograd.grad(score, x) or an optimiser on [x])"
        )
    if after["training"] != before["training"]:
        raise Mistake("the model's train/eval mode changed: leave model.train()/model.eval() alone")
    if after["hooks"] != before["hooks"]:
        raise Mistake("hooks are still registered on the model after your function returned: remove them")


def _restore(model: nn.Module, before: dict) -> None:
    for p, g, none in zip(model.parameters(), before["requires_grad"], before["grads"]):
        p.requires_grad_(g)
        if none:
            p.grad = None
    for m, t in zip(model.modules(), before["training"]):
        m.training = t


def _input_gradient(model, x, score_fn) -> torch.Tensor:
    xg = x.detach().clone().requires_grad_(True)
    (g,) = torch.autograd.grad(score_fn(model(xg)).sum(), xg)
    return g


# ----------------------------------------------------------------------------------------------
# maxresp.ascent_step


@exercise("maxresp.ascent_step", forbid=[_mx.ascent_step, _mx.maximize])
def check_ascent_step(student, report: Report) -> None:
    model = random_cnn(report.seed)
    g_ = torch.Generator().manual_seed(report.seed)
    x = torch.rand(3, 3, 16, 16, generator=g_)
    target = int(report.rng.integers(0, 5))
    lr = float(report.rng.uniform(0.1, 0.3))  # large enough that some pixels leave [0, 1]
    x0 = x.clone()
    g = _input_gradient(model, x, lambda out: out[:, target])  # (N, C, H, W)
    rms = g.pow(2).mean((1, 2, 3), keepdim=True).sqrt()
    expected = (x + lr * g / rms).clamp(0, 1)

    with report.part("returns new pictures (N, C, H, W), detached; x and the model left unchanged", points=1):
        before = _snapshot(model)
        got = report.call(student, model, x, target, lr)
        report.expect_tensor(got, shape=x.shape, detached=True, what="your batch of new pictures")
        if not torch.equal(x, x0) or x.requires_grad or x.grad is not None:
            raise Mistake("your function changed the caller's x (in place, or made it require grad): work on a copy, "
                          "x = x.detach().clone().requires_grad_(True)")
        _expect_model_unchanged(before, model)

    with report.part("an ascent step: the picture moves along the gradient of the target's score", points=1):
        got = report.call(student, model, x.clone(), target, lr)
        report.expect_tensor(got, shape=x.shape, what="your batch of new pictures")
        along = ((got.detach() - x) * g).flatten(1).sum(1)  # (N,)
        if (along < 0).all():
            raise Mistake(
                "you stepped against the gradient: x - lr * g is gradient *descent*, it makes the class less likely. "
                "To maximise the score, add the gradient: x + lr * g / rms(g)"
            )
        if (along <= 0).any():
            raise Mistake("some pictures did not move up the gradient of the target's score: check the sign and the target index")

    with report.part("values: x + lr * g / rms(g), rms per image, clipped to [0, 1]", points=2):
        got = report.call(student, model, x.clone(), target, lr)
        probs_g = _input_gradient(model, x, lambda out: out.softmax(1)[:, target])
        l2 = g.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
        report.expect_close(
            got, expected, rtol=1e-4, atol=1e-5,
            mistakes={
                "gradient descent: x - lr * g / rms(g) makes the class less likely; add the gradient": (x - lr * g / rms).clamp(0, 1),
                "the gradient is not normalised: divide it by its root-mean-square sqrt(mean(g**2)) per image, "
                "so that every step has the same size whatever the gradient's scale": (x + lr * g).clamp(0, 1),
                "normalised by the L2 norm ||g|| instead of the root-mean-square sqrt(mean(g**2)): the step is "
                "sqrt(C*H*W) times too small": (x + lr * g / l2).clamp(0, 1),
                "normalised by one root-mean-square over the whole batch: compute it per image "
                "(mean over dims (1, 2, 3), keepdim=True)": (x + lr * g / g.pow(2).mean().sqrt()).clamp(0, 1),
                "the result is not clipped to [0, 1]: pixels must stay valid, use .clamp(0, 1)": x + lr * g / rms,
                "a step along sign(g) (that is FGSM, lecture 5); here step along the normalised gradient g / rms(g)":
                    (x + lr * g.sign()).clamp(0, 1),
                "gradient of the softmax probability; differentiate the class logit, model(x)[:, target]":
                    (x + lr * probs_g / probs_g.pow(2).mean((1, 2, 3), keepdim=True).sqrt().clamp_min(1e-30)).clamp(0, 1),
            },
            what="your batch of new pictures",
        )


# ----------------------------------------------------------------------------------------------
# maxresp.edge_energy


def _gauss5(std: float = 1.0, normalise: bool = True) -> torch.Tensor:
    t = torch.tensor([-2.0, -1.0, 0.0, 1.0, 2.0], dtype=torch.float64)
    k = torch.exp(-(t**2) / (2 * std**2))
    k = torch.outer(k, k)
    return (k / k.sum() if normalise else k).view(1, 1, 5, 5)


def _edge_energy_variant(x, *, std=1.0, normalise=True, padding="zeros", power=2, reduce="sum", pool="avg1",
                         stop=">", mix_channels=False, max_scales=None) -> torch.Tensor:
    """Fleuret's h(x) and its usual mistakes, in float64."""
    x = x.double()
    n, c, h, w = x.shape
    u = x.sum(1, keepdim=True) if mix_channels else x.reshape(n * c, 1, h, w)
    k = _gauss5(std, normalise)
    total = x.new_zeros(u.shape[0])
    scales = 0
    while (min(u.shape[2:]) > 5 if stop == ">" else min(u.shape[2:]) >= 5 if stop == ">=" else max(u.shape[2:]) > 5):
        if max_scales is not None and scales >= max_scales:
            break
        if padding == "zeros":
            blurry = F.conv2d(u, k, padding=2)
        else:
            blurry = F.conv2d(F.pad(u, (2, 2, 2, 2), mode=padding), k)
        diff = (u - blurry).flatten(1)
        part = diff.abs() if power == 1 else diff.pow(2)
        total = total + (part.sum(1) if reduce == "sum" else part.mean(1))
        if min(u.shape[2:]) < 2:
            break
        if pool == "avg1":
            u = F.avg_pool2d(u, 2, padding=1)
        elif pool == "avg0":
            u = F.avg_pool2d(u, 2)
        elif pool == "max1":
            u = F.max_pool2d(u, 2, padding=1)
        else:  # bilinear downscale by 2
            u = F.interpolate(u, scale_factor=0.5, mode="bilinear", align_corners=False)
        scales += 1
    return total if mix_channels else total.view(n, c).sum(1)


_EDGE_MISTAKES = {
    "the Gaussian kernel is not normalised: divide it by its sum, so that blurring keeps the mean": {"normalise": False},
    "the Gaussian has the wrong width: g = exp(-t**2 / 2) for t in -2..2 (std 1 pixel)": {"std": 1 / 2**0.5},
    "reflect padding for the blur; Fleuret pads with zeros: F.conv2d(u, g, padding=2)": {"padding": "reflect"},
    "replicate padding for the blur; Fleuret pads with zeros: F.conv2d(u, g, padding=2)": {"padding": "replicate"},
    "absolute values instead of squares: the penalty is a squared norm, .pow(2).sum()": {"power": 1},
    "mean instead of sum over pixels: the penalty is a squared norm, .pow(2).sum()": {"reduce": "mean"},
    "the channels were added together before blurring: treat each channel as its own grey image, "
    "x.reshape(N * C, 1, H, W), and add the channels' energies at the end": {"mix_channels": True},
}
_PYRAMID_MISTAKES = {
    "only the first scale: the sum runs over s = 0, 1, 2, ... (downscale by two and repeat)": {"max_scales": 1},
    "2x2 average pooling without padding; Fleuret's delta is F.avg_pool2d(u, kernel_size=2, padding=1)": {"pool": "avg0"},
    "max pooling; the downscale delta averages: F.avg_pool2d(u, kernel_size=2, padding=1)": {"pool": "max1"},
    "bilinear resizing; the downscale delta is F.avg_pool2d(u, kernel_size=2, padding=1)": {"pool": "bilinear"},
    "the loop also ran at a 5-pixel scale: continue only while min(height, width) > 5": {"stop": ">="},
    "the loop ran while the *larger* side was > 5: continue only while min(height, width) > 5": {"stop": "max"},
}


def _check_energy(report: Report, student, x: torch.Tensor, mistakes: dict, what: str) -> None:
    got = report.call(student, x.clone())
    expected = _edge_energy_variant(x)
    if isinstance(got, torch.Tensor) and got.dim() == 0:
        hint = " (it equals the sum of the expected values)" if torch.allclose(got.detach().double(), expected.sum(), rtol=1e-4) else ""
        raise Mistake(f"{what}: a single number{hint}; return one energy per image, shape (N,)")
    got = report.expect_tensor(got, shape=(x.shape[0],), what=what)
    wrong = {text: _edge_energy_variant(x, **kw) for text, kw in mistakes.items()}
    report.expect_close(got.detach().double(), expected, rtol=1e-4, atol=1e-6, mistakes=wrong, what=what)


@exercise("maxresp.edge_energy", forbid=[_mx.edge_energy])
def check_edge_energy(student, report: Report) -> None:
    g = torch.Generator().manual_seed(report.seed)

    with report.part("one value per image, shape (N,), differentiable", points=1):
        n = int(report.rng.integers(2, 4))
        x = torch.rand(n, 3, 12, 14, generator=g, requires_grad=True)
        got = report.call(student, x)
        if isinstance(got, torch.Tensor) and got.dim() == 0:
            raise Mistake("a single number: return one energy per image, shape (N,) (sum over channels and pixels, not over the batch)")
        if isinstance(got, torch.Tensor) and got.shape == (n, 3):
            raise Mistake("shape (N, C): add the channels' energies together, result.view(N, C).sum(1)")
        report.expect_tensor(got, shape=(n,), what="your tensor of energies")
        if not got.requires_grad:
            raise Mistake("the result is not differentiable w.r.t. x (it will be a penalty in gradient ascent): "
                          "use torch operations only, no .detach(), .item() or numpy")

    with report.part("one scale: ||u - g * u||^2 with the normalised 5x5 Gaussian, zero padding, per channel "
                     "(float32 pictures)", points=2):
        # 6..9 pixels: after one downscale the image is <= 5 pixels, so only the first scale counts
        h, w = (int(v) for v in report.rng.integers(6, 10, size=2))
        x = torch.rand(2, 3, h, w, generator=g)  # float32 pictures, as the instructions' kernel is float32
        _check_energy(report, student, x, {**_EDGE_MISTAKES, **_PYRAMID_MISTAKES}, f"your tensor of energies for {h}x{w} pictures")

    with report.part("the pyramid: repeat on F.avg_pool2d(u, 2, padding=1) while min(height, width) > 5", points=2):
        # 14..17 pixels -> 8 or 9 -> 5: two scales, and a third one at exactly 5 pixels for a wrong stopping rule
        h = int(report.rng.integers(14, 18))
        w = int(report.rng.integers(20, 41))
        x = torch.rand(2, 3, h, w, generator=g)  # float32 pictures, as the instructions' kernel is float32
        _check_energy(report, student, x, {**_PYRAMID_MISTAKES, **_EDGE_MISTAKES}, f"your tensor of energies for {h}x{w} pictures")


# ----------------------------------------------------------------------------------------------
# maxresp.class_visualization


# Classes the class-visualisation check never asks for: after 30 steps of the solution's loop (Adam on the class
# logit, lr 0.05, from grey plus noise, 128 px) p(class) stayed below 0.999 (tests/reachable_classes.py, 2026-12-07).
# The loop's trajectory is chaotic near the threshold: "macaque" (373) reached 0.981 in the sweep's batch but 0.856
# alone, and a correct submission graded on it lost 2 points; "dingo" (273) reached 0.000. On 30 of the other classes
# run alone, from grey plus noise and from plain grey, the smallest p was 0.99999.
HARD_CLASSES = (74, 146, 152, 162, 174, 175, 180, 188, 205, 217, 224, 236, 237, 248, 249, 266, 268, 270, 273, 274,
                278, 279, 335, 345, 352, 366, 373, 384, 416, 638, 657, 802, 810, 846, 876, 899)
_DRAWN_CLASSES = tuple(sorted(set(range(1000)) - set(HARD_CLASSES)))


@functools.lru_cache(maxsize=1)
def _imagenet_model():
    from ..models import load_model

    return load_model("efficientnet_lite0")


@exercise("maxresp.class_visualization", forbid=[_mx.maximize, _mx.ascent_step])
def check_class_visualization(student, report: Report) -> None:
    model = _imagenet_model()
    target = int(report.rng.choice(_DRAWN_CLASSES))  # a class the loop reaches with a wide margin: see HARD_CLASSES
    name = model.classes[target]
    image, error = _call_on_frozen_model(student, report, model, target, size=128)

    with report.part("the picture is classified as the target class with probability >= 0.9", points=2):
        if error is not None:
            raise error
        image = image.detach().float().clamp(0, 1)
        with torch.no_grad():
            logits = model(image)[0]  # (1000,)
        probs = logits.softmax(0)
        p = float(probs[target])
        if p >= 0.9:
            return
        top = int(probs.argmax())
        if abs(top - target) == 1 and float(probs[top]) >= 0.9:
            raise Mistake(
                f"the picture shows class {top} ({model.classes[top]!r}) with p = {float(probs[top]):.2f}, the class next to "
                f"{target} ({name!r}): an off-by-one index? Maximise model(x)[0, target]"
            )
        _expect_no_descent(model, image, logits, target, p)
        raise Mistake(
            f"p({name}) = {p:.3g} < 0.9 after your loop (the model sees {model.classes[top]!r}, p = {float(probs[top]):.2f}): "
            "climb the class *logit* (not the probability) with Adam (lr about 0.05) or normalised steps, for all the "
            "given steps, keep the picture in [0, 1], and check the class index"
        )


def _call_on_frozen_model(student, report: Report, model, target: int, size: int):
    """Run the student's visualisation (30 steps) and score its picture and the model it was given.

    Two parts: the picture's shape, range and detachment, and the model left frozen in eval mode
    (the model is restored afterwards in any case, it is shared by the class). Returns
    ``(image, error)``: the picture, or the :class:`StudentError` the call raised (``image`` None),
    which the caller's part raises too.
    """
    before = _snapshot(model)
    try:
        try:
            image = report.call(student, model, target, size=size, steps=30)
            error = None
        except StudentError as e:
            image, error = None, e
        changed = _snapshot(model) != before
        with report.part(f"returns one (1, 3, {size}, {size}) picture in [0, 1], detached", points=1):
            if error is not None:
                raise error
            report.expect_tensor(image, shape=(1, 3, size, size), detached=True, what="your picture")
            lo, hi = float(image.min()), float(image.max())
            if lo < -1e-6 or hi > 1 + 1e-6:
                raise Mistake(f"pixel values from {lo:.3g} to {hi:.3g}: keep the picture in [0, 1] "
                              "(x.data.clamp_(0, 1) after each step, or a sigmoid parameterisation)")
        with report.part("the model is left frozen and in eval mode", points=1):
            if error is not None:
                raise error
            if changed:
                _expect_model_unchanged(before, model)
    finally:
        _restore(model, before)
    return image, error


def _expect_no_descent(model, image: torch.Tensor, logits: torch.Tensor, target: int, p: float) -> None:
    """Raise the descent Mistake when the picture made the class *less* likely than a grey start.

    ``logits`` (1000,) are the model's for the picture and ``p`` the target's probability.
    Descent pushes the class's logit to the bottom of all 1000 (an ascent loop, even a far too
    short one, leaves it in the middle or higher) and well below where a loop usually starts
    (plain grey, or grey plus a little noise).
    """
    rank = int((logits > logits[target]).sum())  # 0 = the largest logit
    starts = torch.cat([torch.full_like(image, 0.5),
                        (0.5 + 0.1 * torch.randn(image.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)])
    with torch.no_grad():
        start_logit = float(model(starts)[:, target].min())  # starts: (2, 3, H, W)
    if rank >= 0.98 * logits.numel() or float(logits[target]) < start_logit - 3.0:
        name = model.classes[target]
        raise Mistake(
            f"p({name}) = {p:.3g}; its logit fell to {float(logits[target]):.2f} (from {start_logit:.2f} or more for a grey "
            f"start), rank {rank + 1} of {logits.numel()} classes: the loop made the class *less* likely. Did you descend "
            "instead of ascend? With an optimiser, minimise minus the logit: loss = -model(x)[0, target]"
        )


# ----------------------------------------------------------------------------------------------
# maxresp.nearest_neighbours


@exercise("maxresp.nearest_neighbours", forbid=[_rep.nearest_neighbours])
def check_nearest_neighbours(student, report: Report) -> None:
    g = torch.Generator().manual_seed(report.seed)
    q_n, m, d = int(report.rng.integers(4, 8)), int(report.rng.integers(40, 80)), int(report.rng.integers(6, 17))
    k = int(report.rng.integers(3, 7))
    # very different norms: the nearest point is often not the one with the largest dot product or cosine
    bank = torch.randn(m, d, generator=g) * (0.2 + 3 * torch.rand(m, 1, generator=g))
    queries = torch.randn(q_n, d, generator=g)
    dist = torch.cdist(queries.double(), bank.double())  # (Q, M)
    expected = torch.sort(dist, dim=1, stable=True).indices[:, :k]

    with report.part("returns (Q, k) integer indices into the bank", points=1):
        got = report.call(student, queries.clone(), bank.clone(), k)
        if isinstance(got, (tuple, list)) and len(got) == 2 and all(isinstance(t, torch.Tensor) for t in got):
            raise Mistake("your function returned two tensors (values and indices?): return only the indices, shape (Q, k)")
        if isinstance(got, torch.Tensor) and got.is_floating_point():
            raise Mistake("floating-point values: those look like distances. Return the *indices* of the neighbours "
                          "(torch.argsort(...)[:, :k] or .topk(k, largest=False).indices), a LongTensor")
        if isinstance(got, torch.Tensor) and tuple(got.shape) == (k, q_n) and k != q_n:
            raise Mistake(f"shape {tuple(got.shape)} is (k, Q): one row per query, (Q, k); sort along dim=1")
        if isinstance(got, torch.Tensor) and tuple(got.shape) == (q_n, m):
            raise Mistake(f"shape {tuple(got.shape)}: keep only the first k = {k} neighbours of each query")
        report.expect_tensor(got, shape=(q_n, k), what="your tensor of indices")
        if got.dtype not in (torch.int64, torch.int32):
            raise Mistake(f"dtype {got.dtype}: return integer indices (torch.long)")

    with report.part("nearest first, by Euclidean distance", points=2):
        got = report.call(student, queries.clone(), bank.clone(), k)
        got = report.expect_tensor(got, shape=(q_n, k), what="your tensor of indices").long()
        if torch.equal(got, expected):
            return
        dot = queries.double() @ bank.double().T
        cos = F.normalize(queries.double(), dim=1) @ F.normalize(bank.double(), dim=1).T
        l1 = torch.cdist(queries.double(), bank.double(), p=1)
        order = torch.sort(dist, dim=1, stable=True).indices
        mistakes = {
            "farthest first: sort the distances in ascending order (largest=False)": torch.sort(dist, dim=1, descending=True, stable=True).indices[:, :k],
            "largest dot product is not nearest when the vectors' lengths differ: use the Euclidean distance "
            "torch.cdist(queries, bank)": torch.sort(dot, dim=1, descending=True, stable=True).indices[:, :k],
            "largest cosine similarity ignores the lengths: use the Euclidean distance torch.cdist(queries, bank)":
                torch.sort(cos, dim=1, descending=True, stable=True).indices[:, :k],
            "L1 (Manhattan) distance: use the Euclidean distance, torch.cdist(queries, bank) (p=2)":
                torch.sort(l1, dim=1, stable=True).indices[:, :k],
            "the nearest point was skipped: dropping the first neighbour is only right when the query is in the bank":
                order[:, 1 : k + 1],
        }
        for text, wrong in mistakes.items():
            if wrong.shape == got.shape and torch.equal(got, wrong):
                raise Mistake(text)
        if all(set(a.tolist()) == set(b.tolist()) for a, b in zip(got, expected)):
            raise Mistake("the right neighbours in the wrong order: list them nearest first")
        wrong_rows = int((got != expected).any(1).sum())
        raise Mistake(f"{wrong_rows} of {q_n} queries got other neighbours than the {k} nearest by Euclidean distance")
