"""Cross-checks of coursekit.adversarial against foolbox 3 and captum.robust on the same images.

Set-up notes (the traps the lecture warns about, avoided here on purpose):

* foolbox wraps the model with ``bounds=(0, 1)``: our models take [0, 1] pixels and normalise
  inside, so no ``preprocessing`` is passed (normalising twice is the classic mistake).
* captum.robust's default loss is ``-log(output[target])``; on logits that is not the
  cross-entropy (the log of a negative logit is NaN, and a targeted attack goes the wrong way).
  We pass ``loss_func = cross-entropy on logits`` and ``lower_bound=0, upper_bound=1`` (it does not
  clamp unless told).
* captum.robust leaves a pixel unchanged where ``|gradient| <= zero_thresh`` (1e-6). The
  cross-entropy gradient of a confidently classified image is often smaller than that (12 % of the
  pixels of 200 test images), so captum's FGSM then moves fewer pixels than Goodfellow's formula;
  we set ``zero_thresh = 0`` to compare the methods themselves, and show the difference below.

Deterministic attacks (FGSM, BIM = PGD without random start) must give the same adversarial
images up to float round-off (|difference| <= 1e-5 on >= 99.9 % of pixels: a gradient entry at
exactly 0 may get a different sign after a 1e-7 round-off) and the same adversarial accuracy
(<= 1 image in 200 different). L2 PGD's normalised steps amplify round-off: >= 98 % of the images
within 1e-4 of foolbox's, same accuracy within 1/200. With random starts the generators differ: the adversarial
accuracies must agree within 0.05 on 200 images.
"""

import captum.robust as cr
import foolbox as fb
import pytest
import torch
import torch.nn.functional as F

from coursekit import adversarial as A

N = 200


@pytest.fixture(scope="module")
def data(fashion_test):
    x, y = fashion_test
    return x[:N].clone(), y[:N].clone()


def _ce(out, target):
    return F.cross_entropy(out, target, reduction="none")


def _captum(cls, model):
    attack = cls(model, loss_func=_ce, lower_bound=0.0, upper_bound=1.0)
    attack.zero_thresh = 0.0
    if hasattr(attack, "fgsm"):  # captum's PGD steps with an inner FGSM
        attack.fgsm.zero_thresh = 0.0
    return attack


def _agree(ours, ref, what):
    diff = (ours - ref).abs()
    frac = float((diff <= 1e-5).float().mean())
    print(f"CROSSCHECK {what}: {frac:.5f} of pixels within 1e-5")
    assert frac >= 0.999, f"{what}: only {frac:.4f} of the pixels agree within 1e-5"


def _acc_close(model, ours, ref, y, tol, what):
    a, b = A.accuracy(model, ours, y), A.accuracy(model, ref, y)
    print(f"CROSSCHECK {what}: coursekit {a:.3f}, reference {b:.3f}")
    assert abs(a - b) <= tol, f"{what}: adversarial accuracy {a:.3f} (coursekit) vs {b:.3f} (reference)"


@pytest.mark.parametrize("eps", [0.05, 0.15])
def test_fgsm_vs_foolbox(fashion, data, eps):
    x, y = data
    fmodel = fb.PyTorchModel(fashion, bounds=(0, 1))
    _, ref, _ = fb.attacks.FGSM()(fmodel, x, y, epsilons=eps)
    ours = A.fgsm(fashion, x, y, eps)
    _agree(ours, ref, f"FGSM eps={eps} vs foolbox")
    _acc_close(fashion, ours, ref, y, 1 / N, f"FGSM eps={eps} vs foolbox")


def test_fgsm_vs_captum(fashion, data):
    x, y = data
    ref = _captum(cr.FGSM, fashion).perturb(x, 0.1, y)
    ours = A.fgsm(fashion, x, y, 0.1)
    _agree(ours, ref, "FGSM vs captum")
    _acc_close(fashion, ours, ref, y, 1 / N, "FGSM vs captum")


def test_captum_default_loss_is_the_trap_we_avoid(fashion, data):
    """captum's default loss on logits: -log(z_y) is NaN for negative logits -> a different, wrong attack."""
    x, y = data
    default = cr.FGSM(fashion, lower_bound=0.0, upper_bound=1.0).perturb(x, 0.1, y)
    assert not torch.allclose(default, A.fgsm(fashion, x, y, 0.1))
    unclamped = cr.FGSM(fashion, loss_func=_ce).perturb(x, 0.1, y)
    assert unclamped.min() < 0 or unclamped.max() > 1  # no box unless told; ours always clamps
    assert A.fgsm(fashion, x, y, 0.1).min() >= 0
    thresholded = cr.FGSM(fashion, loss_func=_ce, lower_bound=0.0, upper_bound=1.0).perturb(x, 0.1, y)
    moved = float(((thresholded - x).abs() > 0).float().mean())
    print(f"CROSSCHECK captum zero_thresh=1e-6 moves {moved:.3f} of the pixels, coursekit "
          f"{float(((A.fgsm(fashion, x, y, 0.1) - x).abs() > 0).float().mean()):.3f}")


def test_targeted_fgsm_vs_captum_and_foolbox(fashion, data):
    x, y = data
    t = (y + 1) % 10
    ref = _captum(cr.FGSM, fashion).perturb(x, 0.1, t, targeted=True)
    ours = A.fgsm(fashion, x, y, 0.1, target=t)
    _agree(ours, ref, "targeted FGSM vs captum")
    crit = fb.criteria.TargetedMisclassification(t)
    # foolbox's FGSM accepts no targeted criterion; its LinfPGD with one step of size eps is FGSM
    one_step = fb.attacks.LinfPGD(abs_stepsize=0.1, steps=1, random_start=False)
    _, ref_fb, _ = one_step(fb.PyTorchModel(fashion, bounds=(0, 1)), x, crit, epsilons=0.1)
    _agree(ours, ref_fb, "targeted FGSM vs foolbox")


def test_bim_vs_foolbox_and_captum(fashion, data):
    x, y = data
    eps, steps, step = 0.05, 10, 0.01
    attack = fb.attacks.LinfPGD(abs_stepsize=step, steps=steps, random_start=False)
    _, ref_fb, _ = attack(fb.PyTorchModel(fashion, bounds=(0, 1)), x, y, epsilons=eps)
    ref_cr = _captum(cr.PGD, fashion).perturb(x, radius=eps, step_size=step, step_num=steps, target=y)
    ours = A.pgd(fashion, x, y, eps, steps=steps, step_size=step, random_start=False)
    _agree(ours, ref_fb, "BIM vs foolbox LinfPGD(random_start=False)")
    _agree(ours, ref_cr, "BIM vs captum PGD")
    _acc_close(fashion, ours, ref_fb, y, 1 / N, "BIM vs foolbox")
    _acc_close(fashion, ours, ref_cr, y, 1 / N, "BIM vs captum")


def test_l2_pgd_without_random_start_vs_foolbox(fashion, data):
    x, y = data
    eps, steps, step = 1.0, 10, 0.2
    attack = fb.attacks.L2PGD(abs_stepsize=step, steps=steps, random_start=False)
    _, ref, _ = attack(fb.PyTorchModel(fashion, bounds=(0, 1)), x, y, epsilons=eps)
    ours = A.pgd(fashion, x, y, eps, norm="l2", steps=steps, step_size=step, random_start=False)
    # normalised L2 steps amplify round-off over 10 steps: compare image by image
    same = (ours - ref).flatten(1).abs().max(1).values <= 1e-4
    print(f"CROSSCHECK L2 PGD: {int(same.sum())}/{N} images within 1e-4")
    assert int(same.sum()) >= 0.98 * N  # measured: 197/200
    _acc_close(fashion, ours, ref, y, 1 / N, "L2 PGD vs foolbox")


def test_pgd_with_random_start_vs_foolbox_and_captum(fashion, data):
    x, y = data
    eps, steps, step = 0.05, 10, 0.0125
    torch.manual_seed(0)
    _, ref_fb, _ = fb.attacks.LinfPGD(abs_stepsize=step, steps=steps, random_start=True)(
        fb.PyTorchModel(fashion, bounds=(0, 1)), x, y, epsilons=eps)
    ref_cr = _captum(cr.PGD, fashion).perturb(x, radius=eps, step_size=step, step_num=steps, target=y,
                                              random_start=True)
    ours = A.pgd(fashion, x, y, eps, steps=steps, step_size=step, seed=0)
    assert (ours - x).abs().max() <= eps + 1e-6
    _acc_close(fashion, ours, ref_fb, y, 0.05, "PGD random start vs foolbox")
    _acc_close(fashion, ours, ref_cr, y, 0.05, "PGD random start vs captum")
