"""Checks of exercise set 05_adversarial (lecture 5: adversarial examples).

Parts (exercise names ``adversarial.<part>``):

* ``adversarial.margin``     the Carlini-Wagner margin on logits                  2 points
* ``adversarial.fgsm``       FGSM in [0, 1] pixel space (Goodfellow et al. 2015)   4 points
* ``adversarial.pgd_step``   one L-inf PGD step with projection and clamp          3 points
* ``adversarial.sweep``      FGSM accuracy for a list of epsilons                  3 points
* ``adversarial.targeted``   targeted iterative attack towards a chosen class      3 points

Every case is a fresh small random CNN that holds its own normalisation (like coursekit's
models: it takes [0, 1] pixels) and fresh random images. The deterministic cases that expose each
diagnosed mistake come first: no clamp to [0, 1], the model left in train mode, epsilon in 0-255
units, normalising outside a model that already normalises, probabilities where logits are
expected, descending instead of ascending the loss, projecting onto the wrong ball.
Expected values come from coursekit's references (blocked while the student's function runs,
together with the engines behind them).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import adversarial as _adv
from .. import gradients as _grad
from .. import optimize as _opt
from .. import robustness as _rob
from ..guard import model_state
from ..models import Normalize
from . import Mistake, Report, exercise

MEAN, STD = 0.4, 0.25  # the random models' own normalisation
K = 5  # classes
_ENGINES = [_adv.fgsm, _adv.pgd, _rob.eps_sweep, _grad.gradient, _opt.ascend, _opt.project]


def random_classifier(seed: int, batchnorm: bool = False, size: int = 12) -> nn.Sequential:
    """A small frozen CNN on 1-channel [0, 1] images that normalises its input itself.

    With ``batchnorm=True`` it has a BatchNorm2d whose running statistics differ from any batch's,
    so that evaluating it in train mode gives visibly different logits.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        layers = [Normalize([MEAN], [STD]), nn.Conv2d(1, 6, 3, padding=1)]
        if batchnorm:
            bn = nn.BatchNorm2d(6)
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            layers.append(bn)
        layers += [nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(), nn.Flatten(),
                   nn.Linear(8 * (size // 2) ** 2, K)]
        net = nn.Sequential(*layers)
    return net.eval().requires_grad_(False)


def random_batch(report: Report, n: int = 6, size: int = 12):
    g = torch.Generator().manual_seed(report.seed)
    x = torch.rand(n, 1, size, size, generator=g)
    x[:, :, :2] = 0.0  # some black and white pixels: a missing clamp shows
    x[:, :, -2:] = 1.0
    y = torch.randint(0, K, (n,), generator=g)
    return x, y


def _grad_of(model, x, fn):
    """d sum(fn(logits)) / dx, evaluated as the model is (its mode untouched)."""
    xi = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        (g,) = torch.autograd.grad(fn(model(xi)).sum(), xi)
    return g


def _ce(y):
    return lambda z: F.cross_entropy(z, y, reduction="none")


def _ce_probs(y):  # the "probabilities where logits are expected" mistake
    return lambda z: F.cross_entropy(z.softmax(1), y, reduction="none")


def _expect_unchanged(model, before, x, x0) -> None:
    if not torch.equal(x, x0):
        raise Mistake("your function modified the caller's images in place: work on a copy (x.clone())")
    if x.requires_grad or x.grad is not None:
        raise Mistake("the caller's x now requires grad or has a .grad: use x_adv = x.clone().requires_grad_(True)")
    diff = before.differences(model_state(model))
    if diff:
        hint = " (evaluate with model.eval() and put model.train() back if it was training)" if any(
            "mode" in d for d in diff) else ""
        raise Mistake("your function left the model changed: " + "; ".join(diff) + hint)


def _in_box_and_ball(got, x, eps, what="your result") -> None:
    if got.min() < -1e-6 or got.max() > 1 + 1e-6:
        raise Mistake(f"{what} has pixels outside [0, 1] (min {float(got.min()):.3g}, max {float(got.max()):.3g}): "
                      "clamp to the valid pixel range with .clamp(0, 1) after the step")
    d = float((got - x).abs().max())
    if d > eps + 1e-5:
        raise Mistake(f"{what} moves a pixel by {d:.4g}, more than eps = {eps:.4g}")


# ----------------------------------------------------------------------------------------------
# adversarial.margin


@exercise("adversarial.margin", forbid=[_adv.fgsm, _adv.pgd])
def check_margin(student, report: Report) -> None:
    g = torch.Generator().manual_seed(report.seed)
    logits = torch.randn(8, K, generator=g) * 3
    y = torch.randint(0, K, (8,), generator=g)
    logits[0] = torch.tensor([4.0, 1.0, 0.5, -1.0, 0.0])  # true class is the max: margin < 0
    y[0] = 0
    expected = _adv.margin(logits, y)
    with report.part("returns one value per image, shape (N,)", points=1):
        got = report.call(student, logits.clone(), y.clone())
        report.expect_tensor(got, shape=(8,))
    with report.part("values: max over the other classes of z_j, minus z_y", points=1):
        got = report.call(student, logits.clone(), y.clone())
        p = logits.softmax(1)
        report.expect_close(got, expected, mistakes={
            "the maximum includes the true class (so the margin is never negative): mask z_y out first, e.g. "
            "z.scatter(1, y[:, None], float('-inf')).max(1).values": logits.max(1).values - logits.gather(1, y[:, None])[:, 0],
            "computed on probabilities; the margin is defined on logits (the raw outputs)": _adv.margin(p, y),
        })


# ----------------------------------------------------------------------------------------------
# adversarial.fgsm


def _fgsm_variants(model, x, y, eps):
    g = _grad_of(model, x, _ce(y))
    s = g.sign()
    xn = (x - MEAN) / STD
    gn = _grad_of(lambda v: model[1:](v), xn, _ce(y))  # the layers after the model's own Normalize
    train = _train_mode_copy(model)
    return {
        "no clamp: the result leaves [0, 1]; finish with .clamp(0, 1)": x + eps * s,
        "the sign is wrong: FGSM *ascends* the loss, x + eps * sign(grad)": (x - eps * s).clamp(0, 1),
        "epsilon was divided by 255; it is already in [0, 1] pixel units (8/255 means 8 grey levels)":
            (x + eps / 255 * s).clamp(0, 1),
        "epsilon was multiplied by 255; it is already in [0, 1] pixel units": (x + eps * 255 * s).clamp(0, 1),
        "you normalised the images before calling a model that normalises them itself: pass [0, 1] pixels":
            (xn + eps * gn.sign()).clamp(0, 1),
        "the loss was computed on softmax probabilities; F.cross_entropy expects logits (the model's raw output)":
            (x + eps * _grad_of(model, x, _ce_probs(y)).sign()).clamp(0, 1),
        "you used the gradient itself, not its sign": (x + eps * g).clamp(0, 1),
        "the gradient was taken with the model in train mode: call model.eval() first": train(x, y, eps),
    }


def _train_mode_copy(model):
    def run(x, y, eps):
        import copy

        m = copy.deepcopy(model).train()
        return (x + eps * _grad_of(m, x, _ce(y)).sign()).clamp(0, 1)

    return run


@exercise("adversarial.fgsm", forbid=_ENGINES)
def check_fgsm(student, report: Report) -> None:
    model = random_classifier(report.seed)
    x, y = random_batch(report)
    eps = float(report.rng.choice([4, 8, 12])) / 255
    expected = _adv.fgsm(model, x, y, eps)
    with report.part("returns images of the input's shape, in [0, 1], within eps", points=1):
        got = report.call(student, model, x.clone(), y.clone(), eps)
        got = report.expect_tensor(got, shape=x.shape).detach()
        if torch.allclose(got, x):
            raise Mistake("your result equals the input: add eps * sign(gradient)")
        _in_box_and_ball(got, x, eps)
    with report.part("values: clamp(x + eps * sign(grad_x CE(model(x), y)), 0, 1)", points=2):
        got = report.call(student, model, x.clone(), y.clone(), eps)
        report.expect_close(got, expected, atol=1e-5, mistakes=_fgsm_variants(model, x, y, eps))
    with report.part("a model that comes in train mode: evaluated in eval mode, left as it was", points=1):
        seed = report.seed
        bn = random_classifier(seed, batchnorm=True).train()
        before, x0 = model_state(bn), x.clone()
        got = report.call(student, bn, x, y.clone(), eps)
        bn_eval = random_classifier(seed, batchnorm=True)
        report.expect_close(got, _adv.fgsm(bn_eval, x, y, eps), atol=1e-5, mistakes={
            "the gradient was taken with the model in train mode (batch statistics instead of the running ones): "
            "call model.eval() inside, and put model.train() back at the end": _train_mode_copy(bn_eval)(x, y, eps)})
        _expect_unchanged(bn, before, x, x0)


# ----------------------------------------------------------------------------------------------
# adversarial.pgd_step


def _linf_step(x_adv, grad, x, step, eps):
    return (x + (x_adv + step * grad.sign() - x).clamp(-eps, eps)).clamp(0, 1)


@exercise("adversarial.pgd_step", forbid=_ENGINES)
def check_pgd_step(student, report: Report) -> None:
    g = torch.Generator().manual_seed(report.seed)
    x = torch.rand(4, 1, 10, 10, generator=g)
    x[:, :, 0] = 0.0
    x[:, :, -1] = 1.0
    eps = 8 / 255
    x_adv = (x + (torch.rand(x.shape, generator=g) * 2 - 1) * eps).clamp(0, 1)  # a point inside the ball
    grad = torch.randn(x.shape, generator=g)
    step = 10 / 255  # larger than eps: pixels leave the ball, and a clamp of the step alone shows
    expected = _linf_step(x_adv, grad, x, step, eps)
    d = x_adv + step * grad.sign()
    n = (d - x).flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    with report.part("returns a tensor of x's shape that does not require grad", points=1):
        got = report.call(student, x_adv.clone(), grad.clone(), x.clone(), step, eps)
        report.expect_tensor(got, shape=x.shape, detached=True)
    with report.part("values: sign step, projection onto the L-inf ball around x, clamp to [0, 1]", points=2):
        got = report.call(student, x_adv.clone(), grad.clone(), x.clone(), step, eps)
        report.expect_close(got, expected, atol=1e-6, mistakes={
            "no clamp to [0, 1] after the projection": x + (d - x).clamp(-eps, eps),
            "no projection: the result may leave the eps-ball around the clean image x": d.clamp(0, 1),
            "projected around x_adv (the current point) instead of the clean image x: clamp x_adv_new - x, "
            "not the step": (x_adv + (step * grad.sign()).clamp(-eps, eps)).clamp(0, 1),
            "projected onto the L2 ball (rescaling the whole perturbation); the L-inf ball clamps every pixel to "
            "[-eps, eps]": (x + (d - x) * (eps / n).clamp(max=1)).clamp(0, 1),
            "the step descends the loss: x_adv + step * sign(grad) ascends it": _linf_step(x_adv, -grad, x, step, eps),
            "the step uses the gradient itself, not its sign": (x + (x_adv + step * grad - x).clamp(-eps, eps)).clamp(0, 1),
        })


# ----------------------------------------------------------------------------------------------
# adversarial.sweep


def _sweep(model, x, y, eps_values, scale=1.0, clamp=True):
    out = []
    g = _grad_of(model, x, _ce(y)).sign()
    with torch.no_grad():
        for e in eps_values:
            adv = x + e * scale * g
            out.append(float((model(adv.clamp(0, 1) if clamp else adv).argmax(1) == y).float().mean()))
    return out


@exercise("adversarial.sweep", forbid=_ENGINES)
def check_sweep(student, report: Report) -> None:
    model = random_classifier(report.seed)
    x, y = random_batch(report, n=40)
    y = _adv.predict_labels(model, x)  # all correct at eps 0 ...
    y[:10] = (y[:10] + 1) % K  # ... except a quarter: the clean accuracy is 0.75
    eps_values = [0.0, 2 / 255, 8 / 255, 0.1, 0.3]
    expected = _rob.eps_sweep(model, x, y, eps_values, batch_size=40, progress=False).accuracy

    def compare(got, want, mistakes):
        if not isinstance(got, (list, tuple, torch.Tensor)) or len(got) != len(want):
            raise Mistake(f"return one accuracy per epsilon (a list of {len(want)} floats), got {got!r}")
        got = [float(v) for v in got]
        if all(abs(a - b) <= 1e-6 for a, b in zip(got, want)):
            return
        for why, wrong in mistakes.items():
            if all(abs(a - b) <= 1e-6 for a, b in zip(got, wrong)):
                raise Mistake(f"your accuracies match a known mistake: {why}")
        raise Mistake(f"accuracies {[round(v, 3) for v in got]}, expected {[round(v, 3) for v in want]}")

    with report.part("one accuracy per epsilon, the first the clean accuracy", points=1):
        got = report.call(student, model, x.clone(), y.clone(), eps_values)
        if not isinstance(got, (list, tuple, torch.Tensor)) or len(got) != len(eps_values):
            raise Mistake(f"return one accuracy per epsilon (a list of {len(eps_values)} floats), got {got!r}")
        if abs(float(got[0]) - 0.75) > 1e-6:
            raise Mistake(f"at eps = 0 the accuracy is the clean accuracy 0.750, got {float(got[0]):.3f}"
                          + (" (a percentage? return fractions in [0, 1])" if float(got[0]) > 1 else ""))
    with report.part("values: FGSM accuracy at every epsilon", points=1):
        got = report.call(student, model, x.clone(), y.clone(), eps_values)
        compare(got, expected, {
            "epsilon divided by 255: the values are already in [0, 1] pixel units": _sweep(model, x, y, eps_values, 1 / 255),
            "no clamp to [0, 1] before classifying the adversarial images": _sweep(model, x, y, eps_values, clamp=False),
        })
    with report.part("a model in train mode: accuracies in eval mode, mode put back", points=1):
        bn = random_classifier(report.seed, batchnorm=True)  # one seed: the same model throughout
        want = _rob.eps_sweep(bn, x, y, eps_values, batch_size=40, progress=False).accuracy
        bn.train()
        before, x0 = model_state(bn), x.clone()
        got = report.call(student, bn, x, y.clone(), eps_values)
        import copy

        m = copy.deepcopy(bn).train()
        compare(got, want, {"evaluated in train mode (batch statistics): call model.eval() first, and put "
                            "model.train() back at the end": _sweep(m, x, y, eps_values)})
        _expect_unchanged(bn, before, x, x0)


# ----------------------------------------------------------------------------------------------
# adversarial.targeted


def _targeted(model, x, t, eps, step, steps, sign=-1.0, loss=None, clamp=True, project=True):
    loss = loss or (lambda z: F.cross_entropy(z, t, reduction="none"))
    xa = x.clone()
    for _ in range(steps):
        xa = xa + sign * step * _grad_of(model, xa, loss).sign()
        if project:
            xa = x + (xa - x).clamp(-eps, eps)
        if clamp:
            xa = xa.clamp(0, 1)
    return xa


@exercise("adversarial.targeted", forbid=_ENGINES)
def check_targeted(student, report: Report) -> None:
    model = random_classifier(report.seed)
    x, _ = random_batch(report, n=4)
    pred = _adv.predict_labels(model, x)
    target = int((pred[0] + 1 + report.rng.integers(0, K - 1)) % K)
    t = torch.full((4,), target)
    eps, step, steps = 0.1, 0.02, 8
    expected = _targeted(model, x, t, eps, step, steps)
    with report.part("returns images of x's shape in [0, 1] within eps", points=1):
        got = report.call(student, model, x.clone(), target, eps, step, steps)
        got = report.expect_tensor(got, shape=x.shape).detach()
        _in_box_and_ball(got, x, eps)
    with report.part("values: iterated steps *down* the target's cross-entropy, projected and clamped", points=2):
        got = report.call(student, model, x.clone(), target, eps, step, steps)
        report.expect_close(got, expected, atol=1e-5, mistakes={
            "the steps ascend the target's loss, which pushes the images *away* from the target: a targeted "
            "attack descends CE(model(x), target)": _targeted(model, x, t, eps, step, steps, sign=1.0),
            "the loss was computed on softmax probabilities; F.cross_entropy expects logits":
                _targeted(model, x, t, eps, step, steps, loss=lambda z: F.cross_entropy(z.softmax(1), t, reduction="none")),
            "no clamp to [0, 1] after each step": _targeted(model, x, t, eps, step, steps, clamp=False),
            "no projection onto the eps-ball after each step": _targeted(model, x, t, eps, step, steps, project=False),
        })
