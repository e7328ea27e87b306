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
together with the engines behind them). The margin's fixed rows include one whose other logits are
all negative (a mask of 0 instead of -inf shows); the sweep's case is drawn until every named
mistake changes the accuracies. A step along the raw gradient is recognised whatever the loss's
reduction. The train-mode parts compare with the student's own eval-mode answer, so that another
mistake (a missing clamp) does not cost that part too.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from .. import adversarial as _adv
from .. import attack_steps as _steps
from .. import gradients as _grad
from .. import optimize as _opt
from .. import robustness as _rob
from ..guard import model_state
from ..models import Normalize
from . import Mistake, Report, exercise

MEAN, STD = 0.4, 0.25  # the random models' own normalisation
K = 5  # classes
_ENGINES = [_adv.fgsm, _adv.pgd, _adv.mifgsm, _rob.eps_sweep, _grad.gradient, _opt.ascend, _opt.project,
            _opt.sign_step, _steps.input_gradient]


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
    logits[1] = torch.tensor([-1.0, -3.0, -0.5, -2.0, -4.0])  # every other logit < 0: a mask of 0 wins the max
    y[1] = 1
    logits[2] = torch.tensor([2.0, -1.0, 3.0, 0.5, 1.0])  # true class neither first nor second
    y[2] = 3
    expected = _adv.margin(logits, y)
    z_y = logits.gather(1, y[:, None])[:, 0]
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
            "the true class was masked with 0 before the max: logits can be negative, and then the 0 wins; mask with "
            "float('-inf')": logits.scatter(1, y[:, None], 0.0).max(1).values - z_y,
            "the second-largest logit was used as the largest other one: that holds only when the true class is the "
            "largest; mask the true class out and take the max": logits.topk(2, dim=1).values[:, 1] - z_y,
        })


# ----------------------------------------------------------------------------------------------
# adversarial.fgsm


def _raw_gradient_step(got, x, g):
    """``clamp(x + c * g, 0, 1)`` with the c > 0 that fits ``got`` best, or None.

    A step along the raw gradient has a scale that depends on the loss's reduction (sum, mean over the
    batch, a weight): fitting c on the pixels that were not clamped recognises all of them.
    """
    if not isinstance(got, torch.Tensor) or got.shape != x.shape:
        return None
    got = got.detach().to(x.dtype)
    free = (got > 1e-6) & (got < 1 - 1e-6)
    gg = float((g * g * free).sum())
    if gg == 0:
        return None
    c = float(((got - x) * g * free).sum()) / gg
    return (x + c * g).clamp(0, 1) if c > 0 else None


def _fgsm_variants(model, x, y, eps, got=None):
    g = _grad_of(model, x, _ce(y))
    s = g.sign()
    pred = model(x).argmax(1)
    xn = (x - MEAN) / STD
    gn = _grad_of(lambda v: model[1:](v), xn, _ce(y))  # the layers after the model's own Normalize
    train = _train_mode_copy(model)
    out = {
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
        "the loss used the model's predictions as labels; FGSM ascends the loss of the given labels":
            (x + eps * _grad_of(model, x, _ce(pred)).sign()).clamp(0, 1),
        "F.nll_loss on logits: it expects log-probabilities (it only picks -z_y); use F.cross_entropy, which "
        "applies log_softmax itself": (x + eps * _grad_of(model, x, lambda z: -z.gather(1, y[:, None])[:, 0]).sign()).clamp(0, 1),
        "you returned the perturbation eps * sign(grad); return the adversarial images x + eps * sign(grad)":
            (eps * s).clamp(0, 1),
    }
    raw = _raw_gradient_step(got, x, g)
    if raw is not None:  # whatever the reduction of the loss (sum, mean, ...)
        out["you used the gradient itself (scaled by the loss's reduction), not its sign: x + eps * grad.sign()"] = raw
    return out


def _expect_same_as_eval(report: Report, got, own, train_mode_answer) -> None:
    """``got`` (model given in train mode) must equal the student's own answer for the model in eval mode."""
    got = report.expect_tensor(got, shape=own.shape, what="your result for a model in train mode").detach()
    if torch.allclose(got.to(own.dtype), own, atol=1e-5):
        return
    if torch.allclose(got.to(own.dtype), train_mode_answer, atol=1e-5):
        raise Mistake("the gradient was taken with the model in train mode (batch statistics instead of the "
                      "running ones): call model.eval() inside, and put model.train() back at the end")
    raise Mistake("your result for a model that comes in train mode differs from your own result for the same model "
                  "in eval mode: evaluate in eval mode (model.eval() inside, model.train(was_training) at the end)")


def _train_mode_copy(model):
    def run(x, y, eps):
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
        report.expect_close(got, expected, atol=1e-5, mistakes=_fgsm_variants(model, x, y, eps, got))
    with report.part("a model that comes in train mode: evaluated in eval mode, left as it was", points=1):
        # judged against the student's own result for the same model in eval mode, so that another mistake
        # (a missing clamp, a wrong sign) does not fail this part as well
        seed = report.seed
        bn_eval = random_classifier(seed, batchnorm=True)
        own = report.expect_tensor(report.call(student, bn_eval, x.clone(), y.clone(), eps), shape=x.shape,
                                   what="your result for a model in eval mode").detach()
        bn = random_classifier(seed, batchnorm=True).train()
        before, x0 = model_state(bn), x.clone()
        got = report.call(student, bn, x, y.clone(), eps)
        _expect_same_as_eval(report, got, own, _train_mode_copy(bn_eval)(x0, y, eps))
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
            "the step started from the clean image x; it starts from the current point x_adv (x is only the "
            "centre of the ball)": _linf_step(x, grad, x, step, eps),
            "the result was clamped to [0, 1] but not projected after the step from x_adv (the projection was "
            "done before the step)": (x + (x_adv - x).clamp(-eps, eps) + step * grad.sign()).clamp(0, 1),
        })


# ----------------------------------------------------------------------------------------------
# adversarial.sweep


def _sweep(model, x, y, eps_values, scale=1.0, clamp=True, sign=True, reduction="none", attack_labels=None):
    """FGSM accuracies, optionally with a known mistake (scale, no clamp, raw gradient, other labels)."""
    out = []
    labels = y if attack_labels is None else attack_labels
    g = _grad_of(model, x, lambda z: F.cross_entropy(z, labels, reduction=reduction))
    g = g.sign() if sign else g
    with torch.no_grad():
        for e in eps_values:
            adv = x + e * scale * g
            out.append(float((model(adv.clamp(0, 1) if clamp else adv).argmax(1) == y).float().mean()))
    return out


def _sweep_mistakes(model, x, y, eps_values) -> dict:
    pred = model(x).argmax(1)
    return {
        "epsilon divided by 255: the values are already in [0, 1] pixel units": _sweep(model, x, y, eps_values, 1 / 255),
        "no clamp to [0, 1] before classifying the adversarial images": _sweep(model, x, y, eps_values, clamp=False),
        "the step used the gradient itself (of the summed loss), not its sign": _sweep(model, x, y, eps_values,
                                                                                       sign=False, reduction="sum"),
        "the step used the gradient itself (of the mean loss), not its sign": _sweep(model, x, y, eps_values,
                                                                                     sign=False, reduction="mean"),
        "the attack used the model's predictions as labels; attack (and score) with the given labels y":
            _sweep(model, x, y, eps_values, attack_labels=pred),
        "these are error rates (1 - accuracy); return the fraction classified correctly":
            [1.0 - a for a in _sweep(model, x, y, eps_values)],
    }


def _sweep_case(report: Report, eps_values, tries: int = 30):
    """A model, images (clean accuracy 0.75) and a batch-norm twin on which every named mistake changes the result.

    Cases are drawn until every mistake of :func:`_sweep_mistakes` gives other accuracies than the answer, and
    the batch-norm model's accuracies differ between train and eval mode: no mistake passes by luck.
    """
    for _ in range(tries):
        seed = report.seed
        model = random_classifier(seed)
        x, _ = random_batch(report, n=40)
        y = _adv.predict_labels(model, x)  # all correct at eps 0 ...
        y[:10] = (y[:10] + 1) % K  # ... except a quarter: the clean accuracy is 0.75
        expected = _sweep(model, x, y, eps_values)
        bn = random_classifier(seed, batchnorm=True)
        in_train = _sweep(copy.deepcopy(bn).train(), x, y, eps_values)
        deciding = all(wrong != expected for wrong in _sweep_mistakes(model, x, y, eps_values).values())
        if deciding and in_train != _sweep(bn, x, y, eps_values):
            break
    return model, bn, x, y


def _compare_accuracies(got, want, mistakes) -> None:
    if not isinstance(got, (list, tuple, torch.Tensor)) or len(got) != len(want):
        raise Mistake(f"return one accuracy per epsilon (a list of {len(want)} floats), got {got!r}")
    got = [float(v) for v in got]
    if all(abs(a - b) <= 1e-6 for a, b in zip(got, want)):
        return
    matches = [why for why, wrong in mistakes.items() if all(abs(a - b) <= 1e-6 for a, b in zip(got, wrong))]
    if len(matches) == 1:
        raise Mistake(f"your accuracies match a known mistake: {matches[0]}")
    if matches:  # e.g. epsilon / 255 and a raw gradient both leave the images almost unchanged
        raise Mistake("your accuracies match several known mistakes, which give the same accuracies here: "
                      + "; or ".join(matches))
    raise Mistake(f"accuracies {[round(v, 3) for v in got]}, expected {[round(v, 3) for v in want]}")


def _expect_clean_accuracy(got, n_eps: int) -> None:
    if not isinstance(got, (list, tuple, torch.Tensor)) or len(got) != n_eps:
        raise Mistake(f"return one accuracy per epsilon (a list of {n_eps} floats), got {got!r}")
    first = float(got[0])
    if abs(first - 0.75) > 1e-6:
        hint = (" (a percentage? return fractions in [0, 1])" if first > 1 else
                " (compared with the model's own predictions? compare with the labels y)" if first == 1.0 else
                " (the error rate? return the fraction classified correctly)" if abs(first - 0.25) < 1e-6 else "")
        raise Mistake(f"at eps = 0 the accuracy is the clean accuracy 0.750, got {first:.3f}{hint}")


@exercise("adversarial.sweep", forbid=_ENGINES)
def check_sweep(student, report: Report) -> None:
    eps_values = [0.0, 2 / 255, 8 / 255, 0.1, 0.3]
    model, bn, x, y = _sweep_case(report, eps_values)
    expected = _rob.eps_sweep(model, x, y, eps_values, batch_size=40, progress=False).accuracy
    with report.part("one accuracy per epsilon, the first the clean accuracy", points=1):
        got = report.call(student, model, x.clone(), y.clone(), eps_values)
        _expect_clean_accuracy(got, len(eps_values))
    with report.part("values: FGSM accuracy at every epsilon", points=1):
        got = report.call(student, model, x.clone(), y.clone(), eps_values)
        _compare_accuracies(got, expected, _sweep_mistakes(model, x, y, eps_values))
    with report.part("a model in train mode: accuracies in eval mode, mode put back", points=1):
        # judged against the student's own accuracies for the same model in eval mode, so that another
        # mistake (a missing clamp, epsilon / 255) does not fail this part as well
        own = report.call(student, copy.deepcopy(bn), x.clone(), y.clone(), eps_values)
        if not isinstance(own, (list, tuple, torch.Tensor)) or len(own) != len(eps_values):
            raise Mistake(f"return one accuracy per epsilon (a list of {len(eps_values)} floats), got {own!r}")
        own = [float(v) for v in own]
        trained = copy.deepcopy(bn).train()
        before, x0 = model_state(trained), x.clone()
        got = report.call(student, trained, x, y.clone(), eps_values)
        in_train = {"evaluated in train mode (batch statistics): call model.eval() first, and put model.train() back "
                    "at the end": _sweep(copy.deepcopy(bn).train(), x0, y, eps_values)}
        try:
            _compare_accuracies(got, own, in_train)
        except Mistake as m:
            if "known mistake" in str(m):
                raise
            raise Mistake("your accuracies for a model that comes in train mode differ from your own accuracies for "
                          "the same model in eval mode: evaluate in eval mode (model.eval() inside, "
                          "model.train(was_training) at the end)") from None
        _expect_unchanged(trained, before, x, x0)


# ----------------------------------------------------------------------------------------------
# adversarial.targeted


def _targeted(model, x, t, eps, step, steps, sign=-1.0, loss=None, clamp=True, project=True, use_sign=True):
    loss = loss or (lambda z: F.cross_entropy(z, t, reduction="none"))
    xa = x.clone()
    for _ in range(steps):
        g = _grad_of(model, xa, loss)
        xa = xa + sign * step * (g.sign() if use_sign else g)
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
            "the steps used the gradient itself (of the summed loss), not its sign": _targeted(
                model, x, t, eps, step, steps, use_sign=False),
            "the steps used the gradient itself (of the mean loss), not its sign": _targeted(
                model, x, t, eps, step, steps, use_sign=False, loss=lambda z: F.cross_entropy(z, t, reduction="none") / len(z)),
            "an untargeted attack (ascending the loss of the predicted class); a targeted attack descends "
            "CE(model(x), target)": _targeted(model, x, pred, eps, step, steps, sign=1.0),
        })
