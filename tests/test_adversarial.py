"""Unit tests of coursekit.adversarial (lecture 5): attacks, bad input, sweeps, the seeds' experiments."""

import contextlib
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from coursekit import adversarial as A
from coursekit import robustness as R
from coursekit.guard import TrainModeWarning, model_state


@pytest.fixture(scope="module")
def batch(fashion_test):
    x, y = fashion_test
    return x[:16].clone(), y[:16].clone()


def _grad_ce(model, x, y):
    xi = x.clone().requires_grad_(True)
    loss = F.cross_entropy(model(xi), y, reduction="sum")
    (g,) = torch.autograd.grad(loss, xi)
    return g


def _unchanged(model, fn):
    before = model_state(model)
    out = fn()
    assert not before.differences(model_state(model))
    return out


# -- argument checks ----------------------------------------------------------------------------


@pytest.mark.parametrize("eps", [-0.1, -1, float("nan"), float("inf")])
def test_negative_or_nonfinite_eps_is_an_error(fashion, batch, eps):
    with pytest.raises(ValueError, match="eps"):
        A.fgsm(fashion, batch[0], batch[1], eps)


def test_eps_in_0_255_units_names_the_fix(fashion, batch):
    with pytest.raises(ValueError, match=r"0-255 units: pass 8/255 = 0\.03137"):
        A.pgd(fashion, batch[0], batch[1], 8)
    with pytest.raises(ValueError, match="larger than any useful linf radius"):
        A.fgsm(fashion, batch[0], batch[1], 1.5)


def test_eps_type_and_norm_checks():
    with pytest.raises(TypeError, match="must be a number"):
        A.check_eps("0.1")
    with pytest.raises(TypeError):
        A.check_eps(True)
    with pytest.raises(ValueError, match="norm"):
        A.check_eps(0.1, norm="l1")
    assert A.check_eps(torch.tensor(0.25)) == 0.25
    assert A.check_eps(3.0, norm="l2", numel=784) == 3.0  # an L2 radius may exceed 1 ...
    with pytest.raises(ValueError, match="diagonal 28"):  # ... but not the box's diagonal
        A.check_eps(29.0, norm="l2", numel=784)
    assert A.check_eps(1.0) == 1.0 and A.check_eps(0) == 0.0


def test_images_outside_the_unit_box_are_an_error(fashion, batch):
    x, y = batch
    with pytest.raises(ValueError, match="divide by 255"):
        A.fgsm(fashion, x * 255, y, 0.1)
    with pytest.raises(ValueError, match="looks normalised"):
        A.pgd(fashion, (x - 0.5) / 0.5, y, 0.1)
    with pytest.raises(TypeError, match="torch.Tensor"):
        A.fgsm(fashion, x.numpy(), y, 0.1)


def test_targeted_attack_with_target_equal_to_label_is_an_error(fashion, batch):
    x, y = batch
    with pytest.raises(ValueError, match="equals the true label of image 0"):
        A.pgd(fashion, x, y, 0.1, target=y)
    with pytest.raises(ValueError, match="equals the true label"):
        A.fgsm(fashion, x[:1], int(y[0]), 0.1, target=int(y[0]))


def test_bad_options(fashion, batch):
    x, y = batch
    with pytest.raises(ValueError, match="loss must be one of"):
        A.pgd(fashion, x, y, 0.1, loss="nll")
    with pytest.raises(ValueError, match="steps"):
        A.pgd(fashion, x, y, 0.1, steps=0)
    with pytest.raises(ValueError, match="restarts"):
        A.pgd(fashion, x, y, 0.1, restarts=0)
    with pytest.raises(ValueError, match="norm"):
        A.pgd(fashion, x, y, 0.1, norm="l1")
    with pytest.raises(ValueError, match="got 3 labels for a batch of 16"):
        A.fgsm(fashion, x, [1, 2, 3], 0.1)
    with pytest.raises(TypeError, match="nn.Module"):
        A.fgsm(lambda z: z, x, y, 0.1)


def test_train_mode_is_warned_and_restored(batch):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Dropout(0.5),
                        nn.Linear(4 * 26 * 26, 10))
    net[1].running_mean.uniform_(-0.5, 0.5)
    net.train()
    x, y = batch
    before = model_state(net)
    with pytest.warns(TrainModeWarning, match="train mode"):
        a = A.fgsm(net, x, y, 0.1)
    assert not before.differences(model_state(net))  # running statistics untouched, train mode back
    net.eval()
    b = A.fgsm(net, x, y, 0.1)
    assert torch.equal(a, b)  # computed in eval mode both times (no dropout, no batch statistics)


def test_probability_outputs_are_warned(fashion, batch):
    soft = nn.Sequential(fashion, nn.Softmax(dim=1)).eval()
    with pytest.warns(A.LogitsExpectedWarning, match="look like probabilities"):
        A.fgsm(soft, batch[0], batch[1], 0.05)


# -- losses --------------------------------------------------------------------------------------


def test_margin_and_objectives():
    z = torch.tensor([[2.0, 1.0, -1.0], [0.0, 3.0, 1.0]])
    y = torch.tensor([0, 2])
    assert torch.allclose(A.margin(z, y), torch.tensor([1.0 - 2.0, 3.0 - 1.0]))
    ce = F.cross_entropy(z, y, reduction="none")
    assert torch.allclose(A.attack_objective(z, y, "ce"), ce)
    t = torch.tensor([1, 0])
    assert torch.allclose(A.attack_objective(z, y, "ce", t), -F.cross_entropy(z, t, reduction="none"))
    assert torch.allclose(A.attack_objective(z, y, "margin", t), -A.margin(z, t))


def test_margin_kappa_caps_the_value_and_zeroes_the_gradient():
    z = torch.tensor([[2.0, 1.0, -1.0], [0.0, 3.0, 1.0], [0.0, 0.5, 1.0]], requires_grad=True)
    y = torch.tensor([0, 2, 2])
    plain = A.margin(z, y)  # -1, 2, -0.5
    capped = A.margin(z, y, kappa=0.5)
    assert torch.allclose(capped, torch.tensor([-1.0, 0.5, -0.5]))
    assert torch.equal(A.margin(z, y, kappa=None), plain)
    (g,) = torch.autograd.grad(capped.sum(), z)
    assert torch.equal(g[1], torch.zeros(3))  # beyond the cap: no push (Carlini & Wagner's confidence)
    assert torch.equal(g[0], torch.tensor([-1.0, 1.0, 0.0]))  # below it: the plain margin's gradient
    t = torch.tensor([1, 0, 0])
    want = (-A.margin(z, t)).clamp(max=0.25)  # targeted: z_t - max_{j != t} z_j, capped
    assert torch.allclose(A.attack_objective(z, y, "margin", t, kappa=0.25), want)
    assert torch.allclose(A.attack_objective(z, y, "margin", kappa=0.5), capped)


def test_kappa_is_checked():
    z, y = torch.zeros(2, 3), torch.tensor([0, 1])
    with pytest.raises(ValueError, match="kappa"):
        A.margin(z, y, kappa=-1)
    with pytest.raises(ValueError, match="loss='margin'"):
        A.attack_objective(z, y, "ce", kappa=1.0)
    with pytest.raises(ValueError, match="kappa must be a finite number"):
        A.margin(z, y, kappa="1")


def test_pgd_with_kappa_matches_a_hand_loop(fashion, batch):
    """The slow reference: BIM on ``min(margin, kappa)`` written out; kappa=0 stops every image at the boundary."""
    x, y = batch
    eps, steps, alpha, kappa = 0.1, 6, 0.03, 0.0
    xa = x.clone()
    for _ in range(steps):
        xi = xa.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(A.margin(fashion(xi), y).clamp(max=kappa).sum(), xi)
        xa = (x + (xa + alpha * g.sign() - x).clamp(-eps, eps)).clamp(0, 1)
    got = _unchanged(fashion, lambda: A.pgd(fashion, x, y, eps, steps=steps, step_size=alpha, loss="margin",
                                            kappa=kappa, random_start=False))
    assert torch.allclose(got, xa, atol=1e-6)
    uncapped = A.pgd(fashion, x, y, eps, steps=steps, step_size=alpha, loss="margin", random_start=False)
    m_capped, m_free = A.margin(fashion(got), y), A.margin(fashion(uncapped), y)
    assert (m_capped <= m_free + 1e-5).all() and (m_capped < m_free - 1e-3).any()  # the cap stops the push
    with pytest.raises(ValueError, match="loss='margin'"):
        A.pgd(fashion, x, y, eps, kappa=1.0)


def test_fgsm_with_kappa_leaves_confident_mistakes_alone(fashion, batch):
    x, y = batch
    wrong = (y + 1) % 10  # labels the network disagrees with: most margins are already large
    m = A.margin(fashion(x), wrong)
    kappa = float(m.median())
    got = A.fgsm(fashion, x, wrong, 0.05, loss="margin", kappa=kappa)
    beyond = m > kappa
    assert beyond.any() and torch.equal(got[beyond], x[beyond])  # zero gradient: sign 0, no step
    free = A.fgsm(fashion, x, wrong, 0.05, loss="margin")
    below = m < kappa  # (at the cap itself the clamp lets the gradient through)
    assert torch.equal(got[below], free[below])


# -- FGSM ----------------------------------------------------------------------------------------


def test_fgsm_is_the_sign_step_clamped(fashion, batch):
    x, y = batch
    eps = 0.07
    got = _unchanged(fashion, lambda: A.fgsm(fashion, x, y, eps))
    want = (x + eps * _grad_ce(fashion, x, y).sign()).clamp(0, 1)
    assert torch.allclose(got, want, atol=1e-6)
    assert got.min() >= 0 and got.max() <= 1
    assert (got - x).abs().max() <= eps + 1e-6
    assert not got.requires_grad


def test_fgsm_does_not_touch_the_input(fashion, batch):
    x, y = batch
    x0 = x.clone()
    A.fgsm(fashion, x, y, 0.1)
    assert torch.equal(x, x0) and not x.requires_grad and x.grad is None


def test_fgsm_default_labels_are_the_predictions(fashion, batch):
    x, _ = batch
    pred = A.predict_labels(fashion, x)
    assert torch.equal(A.fgsm(fashion, x, None, 0.05), A.fgsm(fashion, x, pred, 0.05))


def test_fgsm_margin_loss_and_float64(fashion, batch):
    x, y = batch
    g = torch.zeros_like(x).requires_grad_(True)
    xi = x + g
    (grad,) = torch.autograd.grad(A.margin(fashion(xi), y).sum(), g)
    got = A.fgsm(fashion, x.double(), y, 0.05, loss="margin")
    assert got.dtype == torch.float32
    assert torch.allclose(got, (x + 0.05 * grad.sign()).clamp(0, 1), atol=1e-6)


def test_targeted_fgsm_steps_down_the_target_loss(fashion, batch):
    x, y = batch
    t = (y + 1) % 10
    got = A.fgsm(fashion, x, y, 0.03, target=t)
    want = (x - 0.03 * _grad_ce(fashion, x, t).sign()).clamp(0, 1)
    assert torch.allclose(got, want, atol=1e-6)
    before = F.cross_entropy(fashion(x), t)
    assert F.cross_entropy(fashion(got), t) < before


def test_eps_zero_returns_the_image(fashion, batch):
    x, y = batch
    assert torch.equal(A.fgsm(fashion, x, y, 0.0), x)


# -- PGD / BIM -----------------------------------------------------------------------------------


def test_pgd_linf_stays_in_ball_and_box_and_beats_fgsm(fashion, batch):
    x, y = batch
    eps = 0.05
    adv = _unchanged(fashion, lambda: A.pgd(fashion, x, y, eps, steps=10))
    assert (adv - x).abs().max() <= eps + 1e-6 and adv.min() >= 0 and adv.max() <= 1
    acc_pgd = A.accuracy(fashion, adv, y)
    acc_fgsm = A.accuracy(fashion, A.fgsm(fashion, x, y, eps), y)
    assert acc_pgd <= acc_fgsm
    assert acc_pgd < A.accuracy(fashion, x, y)


def test_bim_matches_a_hand_loop(fashion, batch):
    x, y = batch
    eps, steps, alpha = 0.04, 5, 0.01
    xa = x.clone()
    for _ in range(steps):
        xa = xa + alpha * _grad_ce(fashion, xa, y).sign()
        xa = (x + (xa - x).clamp(-eps, eps)).clamp(0, 1)
    got = A.bim(fashion, x, y, eps, steps=steps, step_size=alpha)
    assert torch.allclose(got, xa, atol=1e-6)
    default = A.bim(fashion, x, y, eps, steps=steps)  # step eps/steps
    assert (default - x).abs().max() <= eps + 1e-6


def test_pgd_l2_stays_in_the_ball(fashion, batch):
    x, y = batch
    eps = 1.5
    adv = A.pgd(fashion, x, y, eps, norm="l2", steps=8)
    norms = (adv - x).flatten(1).norm(dim=1)
    assert norms.max() <= eps + 1e-4
    assert adv.min() >= 0 and adv.max() <= 1
    assert A.accuracy(fashion, adv, y) < A.accuracy(fashion, x, y)


def test_pgd_seed_and_batching(fashion, batch):
    x, y = batch
    a = A.pgd(fashion, x, y, 0.05, steps=3, seed=1)
    b = A.pgd(fashion, x, y, 0.05, steps=3, seed=1)
    c = A.pgd(fashion, x, y, 0.05, steps=3, seed=2)
    assert torch.equal(a, b) and not torch.equal(a, c)
    no_rand = A.pgd(fashion, x, y, 0.05, steps=3, random_start=False)
    assert torch.allclose(no_rand, A.pgd(fashion, x, y, 0.05, steps=3, random_start=False, batch_size=5), atol=1e-6)


def test_restarts_keep_the_best_per_image(fashion, batch):
    x, y = batch
    eps = 0.02
    single = A.pgd(fashion, x, y, eps, steps=3, seed=0)
    multi = A.pgd(fashion, x, y, eps, steps=3, seed=0, restarts=4)
    fooled_single = A.predict_labels(fashion, single) != y
    fooled_multi = A.predict_labels(fashion, multi) != y
    # restart 0 of the multi run is the single run: anything it fooled stays fooled
    assert bool((fooled_multi | ~fooled_single).all())
    assert (multi - x).abs().max() <= eps + 1e-6


class _CountingModel(nn.Module):
    """Wraps a model and counts the images it sees in forward passes."""

    def __init__(self, model):
        super().__init__()
        self.model, self.seen = model, 0

    def forward(self, x):
        self.seen += x.shape[0]
        return self.model(x)


def test_early_stop_keeps_the_first_fooling_iterate_and_skips_fooled_images(fashion, batch):
    x, y = batch
    counting = _CountingModel(fashion).eval()
    plain = A.pgd(counting, x, y, 0.1, steps=10, seed=0)
    seen_plain, counting.seen = counting.seen, 0
    early = A.pgd(counting, x, y, 0.1, steps=10, seed=0, early_stop=True)
    assert counting.seen < seen_plain  # fooled images left the batch
    fooled_plain = A.predict_labels(fashion, plain) != y
    fooled_early = A.predict_labels(fashion, early) != y
    assert bool((fooled_early | ~fooled_plain).all())  # every image the full run fools is fooled
    assert (early - x).abs().max() <= 0.1 + 1e-6 and early.min() >= 0 and early.max() <= 1
    # a fooled image stops where it first fools: its perturbation is no larger than the full run's
    both = fooled_early & fooled_plain
    assert bool(((early - x)[both].flatten(1).norm(dim=1) <= (plain - x)[both].flatten(1).norm(dim=1) + 1e-5).all())
    # targeted: stops at the first iterate classified as the target
    t = (y + 3) % 10
    adv = A.pgd(fashion, x, y, 0.3, steps=20, target=t, loss="margin", early_stop=True)
    assert float((A.predict_labels(fashion, adv) == t).float().mean()) >= 0.9


def test_restarts_attack_only_the_images_not_yet_fooled(fashion, batch):
    x, y = batch
    counting = _CountingModel(fashion).eval()
    A.pgd(counting, x, y, 0.1, steps=3, seed=0)
    one = counting.seen
    counting.seen = 0
    adv = A.pgd(counting, x, y, 0.1, steps=3, seed=0, restarts=3)
    fooled = int((A.predict_labels(fashion, adv) != y).sum())
    assert fooled > 0 and counting.seen < 3 * one


def test_targeted_pgd_reaches_the_target(fashion, batch):
    x, y = batch
    t = (y + 3) % 10
    adv = A.pgd(fashion, x, y, 0.2, steps=20, target=t, loss="margin")
    assert float((A.predict_labels(fashion, adv) == t).float().mean()) >= 0.9


def test_unbounded_attack_reaches_zero_accuracy(fashion, batch):
    x, y = batch
    adv = A.pgd(fashion, x, y, 1.0, steps=20, step_size=0.05)
    assert A.accuracy(fashion, adv, y) == 0.0


# -- MI-FGSM and the attack loop with a stateful step rule ------------------------------------------


def test_mifgsm_without_momentum_is_bim(fashion, batch):
    x, y = batch
    got = _unchanged(fashion, lambda: A.mifgsm(fashion, x, y, 0.05, steps=4, decay=0.0))
    assert torch.equal(got, A.bim(fashion, x, y, 0.05, steps=4))
    with_momentum = A.mifgsm(fashion, x, y, 0.05, steps=4)
    assert not torch.equal(with_momentum, got)  # the momentum changes the path
    assert (with_momentum - x).abs().max() <= 0.05 + 1e-6 and with_momentum.min() >= 0 and with_momentum.max() <= 1


def test_mifgsm_contract(fashion, batch):
    """Labels default to the predictions, batching changes nothing, targets are reached, bad options named."""
    x, y = batch
    pred = A.predict_labels(fashion, x)
    assert torch.equal(A.mifgsm(fashion, x, None, 0.05, steps=3), A.mifgsm(fashion, x, pred, 0.05, steps=3))
    assert torch.allclose(A.mifgsm(fashion, x, y, 0.05, steps=3, batch_size=5),
                          A.mifgsm(fashion, x, y, 0.05, steps=3), atol=1e-6)
    t = (y + 3) % 10
    adv = A.mifgsm(fashion, x, y, 0.3, steps=20, target=t, loss="margin")
    assert float((A.predict_labels(fashion, adv) == t).float().mean()) >= 0.9
    l2 = A.mifgsm(fashion, x, y, 1.5, steps=5, norm="l2")
    assert (l2 - x).flatten(1).norm(dim=1).max() <= 1.5 + 1e-4
    for bad, match in ((dict(decay=-1.0), "decay"), (dict(decay=True), "decay"), (dict(steps=0), "steps"),
                       (dict(loss="hinge"), "loss"), (dict(norm="l1"), "norm"), (dict(batch_size=0), "batch_size")):
        with pytest.raises((ValueError, TypeError), match=match):
            A.mifgsm(fashion, x, y, 0.05, **bad)


def test_early_stop_freezes_done_images_under_a_stateful_rule(fashion, batch):
    """With momentum, a fooled image's step is not zero; early stop must still return, for every
    image, the first iterate that fools the model. MI-FGSM is deterministic, so its trajectory is
    ``mifgsm(steps=k)`` for k = 1..K: the reference needs no hand loop."""
    x, y = batch
    eps, steps = 0.06, 6
    trajectory = [x] + [A.mifgsm(fashion, x, y, eps, steps=k, step_size=eps / steps) for k in range(1, steps + 1)]
    fooled = torch.stack([A.predict_labels(fashion, it) != y for it in trajectory])  # (K + 1, N)
    counting = _CountingModel(fashion).eval()
    early = A.mifgsm(counting, x, y, eps, steps=steps, step_size=eps / steps, early_stop=True)
    assert 0 < int(fooled[-1].sum()) < len(x) or bool(fooled.any(0).all())
    for i in range(len(x)):
        k = int(fooled[:, i].float().argmax()) if bool(fooled[:, i].any()) else steps
        assert torch.allclose(early[i], trajectory[k][i], atol=1e-6), f"image {i}: not its first fooling iterate {k}"
    assert counting.seen < (steps + 2) * len(x)  # fooled images left the batch


def test_the_attack_loop_takes_a_config(fashion, batch):
    x, y = batch
    config = A.AttackConfig(eps=0.05, steps=3, step_size=0.02, decay=1.0)
    assert type(config.optimizer(x)).__name__ == "MomentumSignStep"
    assert type(A.AttackConfig(0.05, 3, 0.02).optimizer(x)).__name__ == "SignStep"
    with pytest.raises(AttributeError):
        config.eps = 0.1  # frozen: one run cannot change another's settings
    adv, fooled, value = A._run_attack(fashion, x, y, None, x, config)
    assert torch.equal(adv, A.mifgsm(fashion, x, y, 0.05, steps=3, step_size=0.02))
    assert torch.equal(fooled, A.predict_labels(fashion, adv) != y) and value.shape == (len(x),)


def test_one_sign_step_for_every_rule():
    """SignStep and MomentumSignStep take optimize.sign_step; decay 0 is the plain sign step."""
    from coursekit import optimize as O

    g = torch.Generator().manual_seed(0)
    origin = torch.rand(3, 1, 4, 4, generator=g)
    grads = [torch.randn(3, 1, 4, 4, generator=g) for _ in range(3)]
    for norm in ("linf", "l2"):
        a, b = origin.clone(), origin.clone()
        plain, momentum = O.SignStep(0.03, 0.05, origin, norm), O.MomentumSignStep(0.03, 0.05, origin, norm, decay=0.0)
        momentum.reset([b])
        for grad in grads:
            want = O.sign_step(a, grad, 0.03, norm=norm, origin=origin, eps=0.05)
            plain.step([a], [grad])
            momentum.step([b], [grad])
            assert torch.equal(a, want) and torch.equal(b, want)
    ones = torch.ones(1, 1, 2, 2)
    assert torch.equal(O.sign_step(ones * 0.5, torch.tensor([[[[1.0, -1.0], [0.0, 2.0]]]]), 0.6),
                       torch.tensor([[[[1.0, 0.0], [0.5, 1.0]]]]))  # sign(0) = 0, clamped to [0, 1]
    m = O.MomentumSignStep(0.1, decay=0.5)
    p = torch.zeros(1, 1, 1, 2)
    m.reset([p])
    m.step([p], [torch.tensor([[[[3.0, -1.0]]]])])  # m = (0.75, -0.25): sign (+, -); p = (0.1, -0.1) -> box (0.1, 0)
    m.step([p], [torch.tensor([[[[-1.0, 3.0]]]])])  # m = 0.5 m + (-0.25, 0.75) = (0.125, 0.625): (+, +)
    assert torch.allclose(p, torch.tensor([[[[0.2, 0.1]]]]))  # a plain sign step would give (0, 0.1)
    with pytest.raises(ValueError, match="decay"):
        O.MomentumSignStep(0.1, decay=-0.5)


# -- sweeps --------------------------------------------------------------------------------------


def test_fgsm_sweep_matches_fgsm_per_eps(fashion, fashion_test):
    x, y = fashion_test[0][:60], fashion_test[1][:60]
    eps = [0.0, 0.05, 0.2]
    sweep = R.eps_sweep(fashion, x, y, eps, batch_size=25, progress=False)
    assert sweep.eps == eps and sweep.n_images == 60 and sweep.per_image.shape == (3, 60)
    assert sweep.accuracy[0] == pytest.approx(A.accuracy(fashion, x, y))
    for e, acc in zip(eps, sweep.accuracy):
        assert acc == pytest.approx(A.accuracy(fashion, A.fgsm(fashion, x, y, e), y))
    assert "0.050" in sweep.table() and "12.8" in sweep.table()
    ax = sweep.plot()
    assert ax.get_xlabel().startswith("epsilon")


def _sweep_before_issue_17(model, x, y, eps_values, batch_size, loss):
    """eps_sweep's FGSM branch as it was written before the FGSM step was shared (its own copy)."""
    correct = torch.zeros(len(eps_values), len(x), dtype=torch.bool)
    for a in range(0, len(x), batch_size):
        xb, yb = x[a:a + batch_size], y[a:a + batch_size]
        xg = xb.detach().clone().requires_grad_(True)
        logits = model(xg)
        (g,) = torch.autograd.grad(A.attack_objective(logits, yb, loss).sum(), xg)
        clean = logits.detach().argmax(1) == yb
        direction = g.sign()
        with torch.no_grad():
            for i, e in enumerate(eps_values):
                correct[i, a:a + batch_size] = clean if e == 0 else model((xb + e * direction).clamp(0, 1)).argmax(1) == yb
    return correct


@pytest.mark.parametrize("loss", ["ce", "margin"])
def test_fgsm_sweep_gives_the_same_answers_as_before(fashion, fashion_test, loss):
    """The sweep now takes the shared step (attack_steps.input_gradient + optimize.sign_step): the
    same per-image answers as its own copy had, on 300 images and 7 epsilons."""
    x, y = fashion_test[0][:300], fashion_test[1][:300]
    eps = [0.0, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3]
    sweep = R.eps_sweep(fashion, x, y, eps, batch_size=50, progress=False, loss=loss)
    before = _sweep_before_issue_17(fashion, x, y, eps, 50, loss)
    assert torch.equal(sweep.per_image, before)
    assert 0 < before[1:].sum() < before[0].sum() * len(eps)  # the attack changes some answers, not all


class _ViewNet(nn.Module):
    """A student's network: ``.view`` on the convolutions' output, which needs NCHW memory."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 28 * 28, 10)

    def forward(self, x):
        h = torch.relu(self.conv(x))
        return self.fc(h.view(h.shape[0], -1))


@contextlib.contextmanager
def _batches_seen(name: str):
    """Spy on robustness's per-batch function ``name``: yields a list of (model, batch is channels-last) per call."""
    seen, original = [], getattr(R, name)

    def spy(model, xb, *args):
        seen.append((model, xb.is_contiguous(memory_format=torch.channels_last)))
        return original(model, xb, *args)

    mp = pytest.MonkeyPatch()
    mp.setattr(R, name, spy)
    try:
        yield seen
    finally:
        mp.undo()


def test_fgsm_sweep_runs_a_channels_last_copy_and_leaves_the_model_alone(fashion, fashion_test):
    """Issue 20: on the CPU the sweep runs a channels-last copy; the user's model keeps its layout,
    parameters, mode and requires_grad, and the answers are the plain (NCHW) loop's."""
    x, y = fashion_test[0][:120], fashion_test[1][:120]
    eps = [0.0, 0.05, 0.1, 0.3]
    strides = [p.stride() for p in fashion.parameters()]
    flags = [p.requires_grad for p in fashion.parameters()]
    with _batches_seen("_fgsm_correct") as twins:
        sweep = _unchanged(fashion, lambda: R.eps_sweep(fashion, x, y, eps, batch_size=40, progress=False))
    assert all(m is not fashion and cl for m, cl in twins) and len(twins) == 3
    assert [p.stride() for p in fashion.parameters()] == strides and [p.requires_grad for p in fashion.parameters()] == flags
    assert torch.equal(sweep.per_image, _sweep_before_issue_17(fashion, x, y, eps, 40, "ce"))
    # a model that needs NCHW memory (.view) runs as it is, and still outside the sweep
    net = _ViewNet().eval()
    before = [p.detach().clone() for p in net.parameters()]
    sweep = R.eps_sweep(net, x, y, eps, batch_size=40, progress=False)
    assert torch.equal(sweep.per_image, _sweep_before_issue_17(net, x, y, eps, 40, "ce"))
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters())) and net(x[:2]).shape == (2, 10)
    assert all(p.requires_grad for p in net.parameters()) and not net.training


def test_pgd_sweep_runs_the_same_channels_last_copy(fashion, fashion_test):
    """PGD's steps run on the channels-last copy too; the answers are the plain model's, image by image."""
    x, y = fashion_test[0][:60], fashion_test[1][:60]
    eps, kw = [0.0, 0.05, 0.1], dict(steps=5, step_ratio=0.25, seed=0, progress=False)
    with _batches_seen("_pgd_correct") as seen:
        sweep = _unchanged(fashion, lambda: R.eps_sweep(fashion, x, y, eps, "pgd", batch_size=30, **kw))
    assert len(seen) == 2 and all(m is not fashion and cl for m, cl in seen)
    for k, e in enumerate(eps[1:], start=1):  # per batch, as the sweep attacks them
        for a in (0, 30):
            adv = A.pgd(fashion, x[a:a + 30], y[a:a + 30], e, steps=5, step_size=0.25 * e, seed=0, early_stop=True)
            assert torch.equal(sweep.per_image[k, a:a + 30], fashion(adv).argmax(1) == y[a:a + 30]), (e, a)


def test_sweep_threads_give_the_same_answers_and_are_put_back(fashion, fashion_test):
    """threads=2: FGSM's batches shared by two worker threads (PGD: two intra-op threads)."""
    x, y = fashion_test[0][:90], fashion_test[1][:90]
    n = torch.get_num_threads()
    one = R.eps_sweep(fashion, x, y, [0.0, 0.05, 0.1], batch_size=20, progress=False)
    two = R.eps_sweep(fashion, x, y, [0.0, 0.05, 0.1], batch_size=20, progress=False, threads=2)
    assert torch.get_num_threads() == n and torch.equal(one.per_image, two.per_image)
    pgd = R.eps_sweep(fashion, x[:10], y[:10], [0.05], "pgd", steps=2, seed=0, progress=False, threads=2)
    assert torch.get_num_threads() == n and pgd.per_image.shape == (1, 10)
    with pytest.raises(ValueError, match="threads"):
        R.eps_sweep(fashion, x, y, [0.1], threads=0)


def test_pgd_sweep_matches_pgd_per_eps(fashion, fashion_test):
    x, y = fashion_test[0][:30], fashion_test[1][:30]
    sweep = R.eps_sweep(fashion, x, y, [0.0, 0.05], "pgd", steps=3, step_ratio=0.5, seed=3, progress=False)
    adv = A.pgd(fashion, x, y, 0.05, steps=3, step_size=0.025, seed=3, early_stop=True)
    assert sweep.accuracy[1] == pytest.approx(A.accuracy(fashion, adv, y))
    full = R.eps_sweep(fashion, x, y, [0.0, 0.05], "pgd", steps=3, step_ratio=0.5, seed=3, early_stop=False,
                       progress=False)
    adv = A.pgd(fashion, x, y, 0.05, steps=3, step_size=0.025, seed=3)
    assert full.accuracy[1] == pytest.approx(A.accuracy(fashion, adv, y))
    assert sweep.accuracy[1] <= full.accuracy[1] + 1e-9  # early stop catches every fooling iterate
    with pytest.raises(ValueError, match="attack must be"):
        R.eps_sweep(fashion, x, y, [0.1], "cw")
    with pytest.raises(ValueError, match="0-255"):
        R.eps_sweep(fashion, x, y, [0, 8])


# -- the seeds' experiments ----------------------------------------------------------------------


def test_random_sphere_points_lie_on_the_sphere(batch):
    seen = []

    class Recorder(nn.Module):
        def forward(self, x):
            seen.append(x.clone())
            return x.flatten(1)[:, :3]

    x = batch[0][:1]
    res = A.random_sphere(Recorder().eval(), x, 0.5, n=70, batch_size=32)
    pts = torch.cat(seen[1:])  # seen[0] is the centre
    assert pts.shape == (70, 1, 28, 28) and res.labels.shape == (70,)
    assert torch.allclose((pts - x).flatten(1).norm(dim=1), torch.full((70,), 0.5), atol=1e-5)
    assert res.changed == int((res.labels != res.label).sum())
    seen.clear()
    shown = A.random_sphere(Recorder().eval(), x, 0.5, n=70, batch_size=32, progress=True)  # same draws, with a bar
    assert torch.equal(shown.labels, res.labels)
    with pytest.raises(ValueError, match="one image"):
        A.random_sphere(Recorder().eval(), batch[0][:2], 0.5)
    with pytest.raises(ValueError, match="radius"):
        A.random_sphere(Recorder().eval(), x, -1)


def test_random_sphere_is_batch_independent(fashion, batch):
    x = batch[0][:1]
    a = A.random_sphere(fashion, x, 3.0, n=50, batch_size=50, seed=4)
    b = A.random_sphere(fashion, x, 3.0, n=50, batch_size=50, seed=4)
    assert torch.equal(a.labels, b.labels)


def test_noise_attack_trades_size_against_fooling(fashion, batch):
    x, y = batch[0][:1], int(batch[1][0])
    target = (y + 1) % 10
    weak = _unchanged(fashion, lambda: A.noise_attack(fashion, x, target, l2_weight=0.0, lr=0.02, max_steps=60))
    strong = A.noise_attack(fashion, x, target, l2_weight=10.0, lr=0.02, max_steps=60)
    assert weak.prob_target > strong.prob_target
    assert weak.noise.norm() > strong.noise.norm()
    assert weak.x_adv.min() >= 0 and weak.x_adv.max() <= 1
    assert weak.loss.shape == (weak.steps,)
    assert weak.relative_change == pytest.approx(float((weak.x_adv - x).norm() / x.norm()))


def test_noise_attack_stops_early(fashion, batch):
    x = batch[0][:1]
    res = A.noise_attack(fashion, x, 3, l2_weight=1.0, lr=1e-6, max_steps=200, patience=5, min_delta=1.0)
    assert res.steps <= 7
    with pytest.raises(ValueError, match="l2_weight"):
        A.noise_attack(fashion, x, 3, l2_weight=-1)


def test_quantize_8bit():
    x = torch.tensor([0.0, 0.5, 1 / 255 + 1e-4, 1.0]).view(1, 1, 2, 2)
    q = A.quantize_8bit(x)
    assert torch.allclose(q * 255, (q * 255).round())
    assert torch.allclose(q.flatten(), torch.tensor([0.0, 128 / 255, 1 / 255, 1.0]))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        A.quantize_8bit(x * 2)


def test_evolution_never_loses_its_best(fashion):
    best, history = A.evolve_fooling_images(fashion, [0, 7], (1, 28, 28), population=8, generations=15)
    assert best.shape == (2, 1, 28, 28) and history.shape == (15, 2)
    assert bool((history[1:] >= history[:-1] - 1e-6).all())  # elitism: the best survives
    assert history[-1].min() > history[0].min()
    with pytest.raises(ValueError, match="mutation_rate"):
        A.evolve_fooling_images(fashion, [0], (1, 28, 28), mutation_rate=0)


def test_transfer_matrix(fashion, fashion_arch, batch):
    x, y = batch
    res = R.transfer_matrix({"a": fashion, "b": fashion_arch}, x, y,
                            attack=lambda m, xx, yy: A.fgsm(m, xx, yy, 0.1))
    assert res.accuracy.shape == (2, 2)
    assert float(res.accuracy[0, 0]) == pytest.approx(A.accuracy(fashion, A.fgsm(fashion, x, y, 0.1), y))
    assert "crafted on" in res.table()
    with pytest.raises(ValueError, match="dict"):
        R.transfer_matrix({}, x, y)


def test_adversarial_loss_and_training(batch):
    x, y = batch
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))
    assert torch.allclose(R.adversarial_loss(net, x, y, 0.1, alpha=1.0), F.cross_entropy(net(x), y))
    adv_x = (x + 0.1 * _grad_ce(net, x, y).sign()).clamp(0, 1)
    want = 0.3 * F.cross_entropy(net(x), y) + 0.7 * F.cross_entropy(net(adv_x), y)
    assert torch.allclose(R.adversarial_loss(net, x, y, 0.1, alpha=0.3), want, atol=1e-6)
    with pytest.raises(ValueError, match="alpha"):
        R.adversarial_loss(net, x, y, 0.1, alpha=2)
    losses = R.train_classifier(net, x, y, epochs=5, eps=0.05, batch_size=8, progress=False)
    assert len(losses) == 5 and losses[-1] < losses[0]
    assert not net.training and not any(p.requires_grad for p in net.parameters())
    assert all(p.grad is None for p in net.parameters())
    assert math.isfinite(losses[-1])


# -- figures -------------------------------------------------------------------------------------


def _sweep(model, attack, acc):
    return R.Sweep(attack, [0.0, 0.1, 0.2], acc, 10, model)


def test_sweep_plot_default_style_per_attack_and_overrides_without_warnings():
    import warnings

    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a marker given both in fmt and kw would warn
        _sweep("net", "FGSM", [0.9, 0.5, 0.2]).plot(ax)
        _sweep("net", "PGD", [0.9, 0.3, 0.0]).plot(ax)
        _sweep("net", "PGD", [0.9, 0.3, 0.0]).plot(ax, marker="^", linestyle=":", color="k")
    lines = ax.get_lines()
    assert [(ln.get_marker(), ln.get_linestyle()) for ln in lines] == [("o", "-"), ("s", "--"), ("^", ":")]
    assert list(lines[1].get_ydata()) == [0.9, 0.3, 0.0]
    assert ax.get_ylim()[0] < 0 < 1 < ax.get_ylim()[1]  # points at 0 and 1 are not cut by the frame
    plt.close(fig)


def test_plot_sweeps_tells_curves_apart_by_colour_and_shape():
    import matplotlib.pyplot as plt
    from matplotlib.colors import to_hex

    sweeps = [_sweep("plain", "FGSM", [0.9, 0.1, 0.1]), _sweep("plain", "PGD", [0.9, 0.0, 0.0]),
              _sweep("robust", "FGSM", [0.8, 0.7, 0.2]), _sweep("robust", "PGD", [0.8, 0.6, 0.0])]
    ax = R.plot_sweeps(sweeps, mark_eps=0.1, mark_label="trained eps")
    curves = [ln for ln in ax.get_lines() if len(ln.get_xdata()) == 3]
    assert len(curves) == 4
    assert len({to_hex(ln.get_color()) for ln in curves}) == 4  # every curve its own colour
    shapes = [(ln.get_marker(), ln.get_linestyle()) for ln in curves]
    assert len(set(shapes)) == 4  # and its own marker / line-style pair
    assert shapes[0][0] == shapes[1][0] != shapes[2][0] == shapes[3][0]  # marker: the network
    assert shapes[0][1] == shapes[2][1] != shapes[1][1] == shapes[3][1]  # line style: the attack
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels[:2] == ["plain, FGSM (10 images)", "plain, PGD (10 images)"] and "trained eps" in labels
    ax.figure.canvas.draw()
    legend_box = ax.get_legend().get_window_extent()
    assert legend_box.y1 <= ax.get_window_extent().y0  # the legend is below the axes, off the data
    assert ax.get_xlabel().startswith("epsilon") and "grey levels" in ax.child_axes[0].get_xlabel()
    plt.close(ax.figure)


@pytest.mark.parametrize("bad", [[], [1, 2], None])
def test_plot_sweeps_rejects_what_is_not_a_sweep(bad):
    with pytest.raises(TypeError, match="Sweep"):
        R.plot_sweeps(bad)


def test_plot_perturbation_is_signed_zero_centred_with_a_colour_bar():
    import matplotlib.pyplot as plt

    x = torch.full((1, 3, 4, 4), 0.5)
    x_adv = x.clone()
    x_adv[0, :, 0, 0] += 4 / 255  # +4 grey levels in every channel
    x_adv[0, 0, 1, 1] -= 3 / 255  # -3 in red only: -1 on average
    fig, ax = plt.subplots()
    delta = A.plot_perturbation(ax, x_adv, x, title="change")
    assert delta.shape == (4, 4)
    assert delta[0, 0] == pytest.approx(4, abs=1e-4) and delta[1, 1] == pytest.approx(-1, abs=1e-4)
    assert delta[2, 2] == 0
    im = ax.get_images()[0]
    assert im.get_cmap().name == "RdBu_r" and im.get_clim() == pytest.approx((-4, 4), abs=1e-4)
    assert len(fig.axes) == 2 and "grey levels" in fig.axes[1].get_ylabel()  # the colour bar
    assert ax.get_title() == "change"
    plt.close(fig)


def test_plot_perturbation_percentile_clips_and_says_so():
    import matplotlib.pyplot as plt

    gen = torch.Generator().manual_seed(0)
    x = torch.rand(1, 1, 20, 20, generator=gen) * 0.5 + 0.25
    x_adv = x + (torch.rand(x.shape, generator=gen) - 0.5) * 0.02
    x_adv[0, 0, 0, 0] = x[0, 0, 0, 0] + 0.2  # one extreme pixel
    fig, axes = plt.subplots(1, 3)
    A.plot_perturbation(axes[0], x_adv[0], x[0], percentile=99)
    lo, hi = axes[0].get_images()[0].get_clim()
    assert lo == -hi and hi < 0.2 * 255 / 2  # the extreme pixel does not set the scale
    assert fig.axes[-1].get_ylabel() == "change (grey levels)"  # one channel: no mean over channels
    A.plot_perturbation(axes[1], x_adv, x, vmax=10, colorbar=False)
    assert axes[1].get_images()[0].get_clim() == (-10, 10)
    A.plot_perturbation(axes[2], x, x)  # no change at all: a symmetric scale all the same
    assert axes[2].get_images()[0].get_clim() == (-1, 1)
    plt.close(fig)


def test_plot_perturbation_bad_input():
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    x = torch.zeros(1, 3, 4, 4)
    with pytest.raises(TypeError, match="tensors"):
        A.plot_perturbation(ax, x.numpy(), x)
    with pytest.raises(ValueError, match="same shape"):
        A.plot_perturbation(ax, x, torch.zeros(1, 3, 4, 5))
    with pytest.raises(ValueError, match="one image"):
        A.plot_perturbation(ax, torch.zeros(2, 3, 4, 4), torch.zeros(2, 3, 4, 4))
    with pytest.raises(ValueError, match="percentile"):
        A.plot_perturbation(ax, x, x, percentile=0)
    with pytest.raises(ValueError, match="vmax"):
        A.plot_perturbation(ax, x, x, vmax=-1)
    plt.close(fig)


# -- issue 22: float64 models, bim under L2, class ranges, random_sphere's clamp -----------------


def test_pgd_family_on_a_float64_model(fashion, batch):
    import copy

    model = copy.deepcopy(fashion).double()
    x, y = batch[0][:6].double(), batch[1][:6]
    eps, steps, alpha = 0.04, 4, 0.015
    xa = x.clone()  # BIM by hand, in float64
    for _ in range(steps):
        xa = xa + alpha * _grad_ce(model, xa, y).sign()
        xa = (x + (xa - x).clamp(-eps, eps)).clamp(0, 1)
    got = _unchanged(model, lambda: A.bim(model, x, y, eps, steps=steps, step_size=alpha))
    assert got.dtype == torch.float64 and torch.allclose(got, xa, atol=1e-12)
    for adv in (A.pgd(model, x, y, eps, steps=3, restarts=2), A.pgd(model, x, y, eps, steps=3, early_stop=True),
                A.pgd(model, x, y, 1.0, steps=3, norm="l2", target=(y + 1) % 10), A.fgsm(model, x, y, eps)):
        assert adv.dtype == torch.float64 and adv.min() >= 0 and adv.max() <= 1
    sweep = R.eps_sweep(model, x, y, [0.0, 0.05], attack="pgd", steps=3)
    assert sweep.accuracy[1] <= sweep.accuracy[0]


def test_bim_l2_default_step_is_eps_over_steps(fashion, batch):
    x, y = batch
    got = A.bim(fashion, x, y, 1.5, norm="l2", steps=5)
    want = A.pgd(fashion, x, y, 1.5, norm="l2", steps=5, step_size=0.3, random_start=False)
    assert torch.equal(got, want)
    assert (got - x).flatten(1).norm(dim=1).max() <= 1.5 + 1e-4
    with pytest.raises(ValueError, match="larger than any useful linf radius"):
        A.bim(fashion, x, y, 1.5)


@pytest.mark.parametrize("attack", [
    lambda m, x, y: A.pgd(m, x, y, 0.05, steps=2, target=10),
    lambda m, x, y: A.bim(m, x, y, 0.05, steps=2, target=[10] * len(x)),
    lambda m, x, y: A.fgsm(m, x, y, 0.05, target=-1),
    lambda m, x, y: A.pgd(m, x, None, 0.05, steps=2, target=10),
    lambda m, x, y: A.pgd(m, x, 10, 0.05, steps=2),
    lambda m, x, y: A.noise_attack(m, x[:1], 10, max_steps=2),
])
def test_class_indices_out_of_range_are_named(fashion, batch, attack):
    x, y = batch
    before = model_state(fashion)
    with pytest.raises(ValueError, match=r"class index -?1?0? ?out of range: the model has 10 classes \(0\.\.9\)"):
        attack(fashion, x, y)
    assert not before.differences(model_state(fashion))


def test_random_sphere_clamp_needs_a_centre_in_the_box(fashion, batch):
    x = batch[0][:1]
    with pytest.raises(ValueError, match="0-255 pixels: divide by 255"):
        A.random_sphere(fashion, x * 255, 1.0, n=4, clamp=True)
    with pytest.raises(ValueError, match="normalised"):
        A.random_sphere(fashion, fashion.normalize(x), 1.0, n=4, clamp=True)
    assert A.random_sphere(fashion, x * 255, 1.0, n=4).labels.shape == (4,)  # unclamped: any centre
