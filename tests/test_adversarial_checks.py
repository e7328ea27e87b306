"""The checks of exercise set 05_adversarial: correct answers earn full points, each known mistake is named."""

import pytest
import torch
import torch.nn.functional as F

from coursekit import adversarial as A
from coursekit import robustness as R
from coursekit.checks import run_check


def margin_ok(z, y):
    return z.scatter(1, y[:, None], float("-inf")).max(1).values - z.gather(1, y[:, None])[:, 0]


def fgsm_factory(sign=1.0, clamp=True, eps_scale=1.0, probs=False, normalize=False, keep_mode=False):
    def fgsm(model, x, labels, eps):
        was = model.training
        if not keep_mode:
            model.eval()
        xi = ((x - 0.4) / 0.25 if normalize else x).clone().requires_grad_(True)
        z = model[1:](xi) if normalize else model(xi)
        loss = F.cross_entropy(z.softmax(1) if probs else z, labels)
        (g,) = torch.autograd.grad(loss, xi)
        model.train(was)
        out = xi.detach() + sign * eps * eps_scale * g.sign()
        return out.clamp(0, 1) if clamp else out
    return fgsm


def step_factory(mistake=None):
    def pgd_step(x_adv, grad, x, step, eps):
        d = x_adv + (-1 if mistake == "descend" else 1) * step * grad.sign()
        if mistake == "around_x_adv":
            return (x_adv + (step * grad.sign()).clamp(-eps, eps)).clamp(0, 1)
        if mistake == "l2":
            n = (d - x).flatten(1).norm(dim=1).view(-1, 1, 1, 1)
            return (x + (d - x) * (eps / n).clamp(max=1)).clamp(0, 1)
        if mistake == "no_projection":
            return d.clamp(0, 1)
        out = x + (d - x).clamp(-eps, eps)
        return out if mistake == "no_clamp" else out.clamp(0, 1)
    return pgd_step


def sweep_factory(scale=1.0, clamp=True, keep_mode=False):
    def sweep(model, x, y, eps_values):
        was = model.training
        if not keep_mode:
            model.eval()
        xi = x.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(F.cross_entropy(model(xi), y), xi)
        out = []
        with torch.no_grad():
            for e in eps_values:
                adv = x + e * scale * g.sign()
                out.append((model(adv.clamp(0, 1) if clamp else adv).argmax(1) == y).float().mean().item())
        model.train(was)
        return out
    return sweep


def targeted_factory(sign=-1.0, probs=False, clamp=True, project=True):
    def attack(model, x, target, eps, step, steps):
        t = torch.full((len(x),), target)
        xa = x.clone()
        for _ in range(steps):
            xa.requires_grad_(True)
            z = model(xa)
            (g,) = torch.autograd.grad(F.cross_entropy(z.softmax(1) if probs else z, t), xa)
            with torch.no_grad():
                xa = xa + sign * step * g.sign()
                if project:
                    xa = x + (xa - x).clamp(-eps, eps)
                if clamp:
                    xa = xa.clamp(0, 1)
        return xa.detach()
    return attack


@pytest.mark.parametrize("name, fn", [
    ("adversarial.margin", margin_ok),
    ("adversarial.fgsm", fgsm_factory()),
    ("adversarial.pgd_step", step_factory()),
    ("adversarial.sweep", sweep_factory()),
    ("adversarial.targeted", targeted_factory()),
])
def test_correct_answers_earn_full_points(name, fn):
    for seed in (0, 1):
        r = run_check(name, fn, seed=seed)
        assert r.earned == r.points, r.summary()


@pytest.mark.parametrize("name, fn, phrase", [
    ("adversarial.margin", lambda z, y: z.max(1).values - z.gather(1, y[:, None])[:, 0], "includes the true class"),
    ("adversarial.margin", lambda z, y: margin_ok(z.softmax(1), y), "probabilities"),
    ("adversarial.margin", lambda z, y: -margin_ok(z, y), "wrong sign"),
    ("adversarial.fgsm", fgsm_factory(clamp=False), "clamp"),
    ("adversarial.fgsm", fgsm_factory(sign=-1.0), "sign is wrong"),
    ("adversarial.fgsm", fgsm_factory(eps_scale=1 / 255), "divided by 255"),
    ("adversarial.fgsm", fgsm_factory(probs=True), "softmax probabilities"),
    ("adversarial.fgsm", fgsm_factory(normalize=True), "normalised the images"),
    ("adversarial.fgsm", fgsm_factory(keep_mode=True), "train mode"),
    ("adversarial.pgd_step", step_factory("no_clamp"), "no clamp"),
    ("adversarial.pgd_step", step_factory("no_projection"), "no projection"),
    ("adversarial.pgd_step", step_factory("around_x_adv"), "around x_adv"),
    ("adversarial.pgd_step", step_factory("l2"), "L2 ball"),
    ("adversarial.pgd_step", step_factory("descend"), "descends"),
    ("adversarial.sweep", sweep_factory(scale=1 / 255), "divided by 255"),
    ("adversarial.sweep", sweep_factory(clamp=False), "no clamp"),
    ("adversarial.sweep", sweep_factory(keep_mode=True), "train mode"),
    ("adversarial.targeted", targeted_factory(sign=1.0), "away"),
    ("adversarial.targeted", targeted_factory(probs=True), "softmax probabilities"),
    ("adversarial.targeted", targeted_factory(clamp=False), "clamp"),
    ("adversarial.targeted", targeted_factory(project=False), "projection"),
])
def test_known_mistakes_are_named(name, fn, phrase):
    r = run_check(name, fn, seed=0)
    assert r.earned < r.points
    assert phrase in r.summary(), r.summary()


def test_calling_coursekit_earns_nothing():
    r = run_check("adversarial.fgsm", lambda m, x, y, e: A.fgsm(m, x, y, e))
    assert r.earned == 0 and "reference" in r.summary()
    r = run_check("adversarial.sweep", lambda m, x, y, es: R.eps_sweep(m, x, y, es, progress=False).accuracy)
    assert r.earned == 0


@pytest.mark.parametrize("name, fn", [
    ("adversarial.fgsm", lambda m, x, y, e: x),
    ("adversarial.pgd_step", lambda xa, g, x, s, e: xa),
    ("adversarial.targeted", lambda m, x, t, e, s, n: x),
    ("adversarial.margin", lambda z, y: None),
])
def test_doing_nothing_earns_nothing(name, fn):
    assert run_check(name, fn).earned == 0


# -- more mistakes with their own diagnosis (issue 18) ------------------------------------------


def margin_masked_with_zero(z, y):
    return z.scatter(1, y[:, None], 0.0).max(1).values - z.gather(1, y[:, None])[:, 0]


def margin_second_largest(z, y):
    return z.topk(2, dim=1).values[:, 1] - z.gather(1, y[:, None])[:, 0]


def fgsm_with(loss_of=None, use_sign=True, perturbation=False):
    """FGSM with a mistake: another loss (given logits and labels), the raw gradient, or the perturbation returned."""
    def fgsm(model, x, labels, eps):
        was = model.training
        model.eval()
        xi = x.clone().requires_grad_(True)
        z = model(xi)
        loss = loss_of(z, labels) if loss_of else F.cross_entropy(z, labels)
        (g,) = torch.autograd.grad(loss, xi)
        model.train(was)
        step = eps * (g.sign() if use_sign else g)
        return step.clamp(0, 1) if perturbation else (x + step).clamp(0, 1)
    return fgsm


def pgd_step_from_x(x_adv, grad, x, step, eps):
    return (x + (step * grad.sign()).clamp(-eps, eps)).clamp(0, 1)


def sweep_with(loss_of=None, use_sign=True, errors=False):
    def sweep(model, x, y, eps_values):
        was = model.training
        model.eval()
        xi = x.clone().requires_grad_(True)
        z = model(xi)
        (g,) = torch.autograd.grad(loss_of(z, y) if loss_of else F.cross_entropy(z, y), xi)
        d = g.sign() if use_sign else g
        with torch.no_grad():
            acc = [(model((x + e * d).clamp(0, 1)).argmax(1) == y).float().mean().item() for e in eps_values]
        model.train(was)
        return [1 - a for a in acc] if errors else acc
    return sweep


def targeted_with(use_sign=True, untargeted=False):
    def attack(model, x, target, eps, step, steps):
        with torch.no_grad():
            labels = model(x).argmax(1) if untargeted else torch.full((len(x),), target)
        xa = x.clone()
        for _ in range(steps):
            xa.requires_grad_(True)
            (g,) = torch.autograd.grad(F.cross_entropy(model(xa), labels), xa)  # the mean over the batch
            with torch.no_grad():
                d = g.sign() if use_sign else g
                xa = xa + step * d if untargeted else xa - step * d
                xa = (x + (xa - x).clamp(-eps, eps)).clamp(0, 1)
        return xa.detach()
    return attack


NEW_MISTAKES = [
    ("adversarial.margin", margin_masked_with_zero, "masked with 0"),
    ("adversarial.margin", margin_second_largest, "second-largest logit"),
    ("adversarial.fgsm", fgsm_with(use_sign=False), "gradient itself"),  # mean-reduced CE
    ("adversarial.fgsm", fgsm_with(lambda z, y: F.cross_entropy(z, y, reduction="sum"), use_sign=False),
     "gradient itself"),
    ("adversarial.fgsm", fgsm_with(lambda z, y: 0.5 * F.cross_entropy(z, y), use_sign=False), "gradient itself"),
    ("adversarial.fgsm", fgsm_with(lambda z, y: F.cross_entropy(z, z.argmax(1))), "predictions as labels"),
    ("adversarial.fgsm", fgsm_with(lambda z, y: F.nll_loss(z, y)), "nll_loss on logits"),
    ("adversarial.fgsm", fgsm_with(perturbation=True), "returned the perturbation"),
    ("adversarial.pgd_step", pgd_step_from_x, "started from the clean image x"),
    ("adversarial.sweep", sweep_with(use_sign=False), "gradient itself (of the mean loss)"),
    ("adversarial.sweep", sweep_with(lambda z, y: F.cross_entropy(z, y, reduction="sum"), use_sign=False),
     "gradient itself (of the summed loss)"),
    ("adversarial.sweep", sweep_with(lambda z, y: F.cross_entropy(z, z.argmax(1))), "predictions as labels"),
    ("adversarial.sweep", sweep_with(errors=True), "error rate"),
    ("adversarial.targeted", targeted_with(use_sign=False), "gradient itself (of the mean loss)"),
    ("adversarial.targeted", targeted_with(untargeted=True), "untargeted attack"),
]


@pytest.mark.parametrize("name, fn, phrase", NEW_MISTAKES, ids=[f"{m[0]}-{m[2][:24]}" for m in NEW_MISTAKES])
def test_more_mistakes_have_their_own_diagnosis(name, fn, phrase):
    for seed in (0, 1):
        r = run_check(name, fn, seed=seed)
        assert r.earned < r.points and phrase in r.summary(), r.summary()


@pytest.mark.parametrize("name, fn", [
    ("adversarial.fgsm", fgsm_factory(clamp=False)),
    ("adversarial.fgsm", fgsm_factory(sign=-1.0)),
    ("adversarial.fgsm", fgsm_factory(eps_scale=1 / 255)),
    ("adversarial.sweep", sweep_factory(clamp=False)),
    ("adversarial.sweep", sweep_factory(scale=1 / 255)),
], ids=["fgsm no clamp", "fgsm sign", "fgsm eps/255", "sweep no clamp", "sweep eps/255"])
def test_one_mistake_does_not_also_fail_the_train_mode_part(name, fn):
    for seed in (0, 1, 2):
        r = run_check(name, fn, seed=seed)
        assert r.earned < r.points
        train_mode = r.parts[-1]
        assert "train mode" in train_mode.title and train_mode.earned == train_mode.points, r.summary()


@pytest.mark.parametrize("name, fn", [
    ("adversarial.fgsm", fgsm_factory(keep_mode=True)),
    ("adversarial.fgsm", fgsm_factory(keep_mode=True, clamp=False)),
    ("adversarial.sweep", sweep_factory(keep_mode=True)),
], ids=["fgsm", "fgsm and no clamp", "sweep"])
def test_a_train_mode_mistake_still_fails_the_train_mode_part(name, fn):
    for seed in (0, 1, 2):
        r = run_check(name, fn, seed=seed)
        train_mode = r.parts[-1]
        assert train_mode.earned == 0 and "train mode" in train_mode.message, r.summary()
