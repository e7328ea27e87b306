"""Checks of exercise set 04_lrp (lecture 4: layer-wise relevance propagation).

Parts (exercise names ``lrp.<part>``):

* ``lrp.epsilon``       the epsilon rule for a dense layer in matrix form (Bach et al. 2015)    3 points
* ``lrp.alpha_beta``    the alpha-beta rule for a convolution, by the gradient trick           4 points
* ``lrp.maxpool``       relevance through max pooling, winner-take-all                         2 points
* ``lrp.zbox``          z^B at the pixel layer, bounds in pixel units (Montavon et al. 2017)   3 points
* ``lrp.conservation``  LRP through a dense ReLU network, relevance sums layer by layer       3 points

Expected values come from coursekit's rules (:mod:`coursekit.lrp.rules`), applied to one layer
with the engine's own backward; the engine (``LRPRule.backward``, ``stabilize``), the gradient path
and ``Composite.applied`` are blocked while the student's function runs. Each check first runs
fixed cases that expose every mistake it names (the stabiliser missing or with the wrong sign, the
beta term with the wrong sign, a zero denominator, relevance copied or spread evenly in a pooling
window, z^B bounds in normalised instead of pixel units, relevance not conserved, ...), then fresh
random ones. The deciding cases are fixed, not drawn: ``lrp.epsilon`` has a unit with z = 0 exactly
(``torch.sign(0) = 0`` leaves it unstabilised), ``lrp.alpha_beta`` always runs a stride-2
convolution on a 6 x 6 input (a transposed convolution then needs ``output_padding``).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from .. import gradients as _grad
from ..lrp import rules as _rules
from ..rules import Composite
from . import Mistake, Report, StudentError, exercise

_ENGINES = [_rules.LRPRule.backward, _rules.stabilize, _grad.gradient, Composite.applied]
EPS_AB = 1e-6  # the stabiliser of alpha-beta and z^B in the exercises (coursekit's default)


def _one_layer(rule, module: nn.Module, x: torch.Tensor, relevance: torch.Tensor) -> torch.Tensor:
    """Relevance at the input of ``module`` by coursekit's ``rule`` (its backward, called directly)."""
    with torch.no_grad():
        out = module(x)
    (r,) = rule.backward(module, (x,), out, relevance)
    return r.detach()


def _signed(z: torch.Tensor, eps: float) -> torch.Tensor:
    return z + eps * (2 * (z >= 0).to(z) - 1)  # sign(0) = +1


def _no_nan(got, expected, what="your result") -> None:
    if isinstance(got, torch.Tensor) and got.shape == expected.shape and not torch.isfinite(got).all() \
            and torch.isfinite(expected).all():
        raise Mistake(f"{what} contains NaN or inf: a denominator was zero. Stabilise every denominator with "
                      "its sign, z + eps * sign(z) (sign(0) = +1); a unit with no negative contribution has "
                      "z- = 0 exactly, and 0 / 0 is NaN")


def _frozen(module: nn.Module) -> nn.Module:
    return module.eval().requires_grad_(False)


def _expect_layer_unchanged(module: nn.Module, saved: dict) -> None:
    for k, v in saved.items():
        if not torch.equal(getattr(module, k), v):
            raise Mistake(f"your function changed the layer's {k} in place (e.g. weight.data.clamp_): build the "
                          "positive and negative parts as new tensors, w.clamp(min=0) and w.clamp(max=0)")


def _params(module: nn.Module) -> dict:
    return {k: getattr(module, k).detach().clone() for k in ("weight", "bias") if getattr(module, k, None) is not None}


# ----------------------------------------------------------------------------------------------
# lrp.epsilon


def _epsilon_variant(a, W, b, R, eps, stab="signed", bias=True, times_a=True):
    z = a @ W.T + (b if bias else 0)  # (N, out)
    if stab == "signed":
        z = _signed(z, eps)
    elif stab == "minus":
        z = _signed(z, -eps)
    elif stab == "plain":
        z = z + eps
    c = (R / z) @ W  # (N, in)
    return a * c if times_a else c


def _linear(W, b) -> nn.Linear:
    layer = nn.Linear(W.shape[1], W.shape[0])
    with torch.no_grad():
        layer.weight.copy_(W)
        layer.bias.copy_(b)
    return _frozen(layer)


def _zero_z_layer():
    """A layer whose second unit has z = 0 exactly in both rows, with relevance on it: (a, W, b, R)."""
    a = torch.tensor([[1.0, 1.0, 0.5], [2.0, 2.0, 1.0]])  # (2, 3)
    W = torch.tensor([[1.0, -1.0, 2.0], [1.0, -1.0, 0.0], [0.5, 0.5, -1.0]])  # (3, 3): unit 1 computes a0 - a1
    b = torch.tensor([0.25, 0.0, -0.5])
    R = torch.tensor([[1.0, 2.0, -0.5], [0.5, -1.0, 1.5]])  # (2, 3): relevance on the z = 0 unit
    return a, W, b, R


def _expect_sign_of_zero(got, a, W, b) -> None:
    """The z = 0 case: torch.sign(0) = 0 leaves the unit unstabilised (R / 0)."""
    z = a @ W.T + b
    if isinstance(got, torch.Tensor) and not torch.isfinite(got).all() and bool((z == 0).any()):
        raise Mistake("your result contains NaN or inf on a layer with a unit whose z is exactly 0: torch.sign(0) "
                      "is 0, so z + eps * torch.sign(z) leaves that denominator at 0. Use a sign with sign(0) = +1, "
                      "torch.where(z >= 0, 1.0, -1.0)")


def _epsilon_mistakes(a, W, b, R, eps) -> dict:
    return {
        "the stabiliser is missing: divide by z + eps * sign(z), not by z": _epsilon_variant(a, W, b, R, eps, "none"),
        "the stabiliser has the wrong sign: z + eps * sign(z) moves z *away* from zero; z - eps * sign(z) moves it "
        "towards zero and makes small denominators worse": _epsilon_variant(a, W, b, R, eps, "minus"),
        "eps was added without the sign of z (z + eps): for a negative z that moves it towards zero; use "
        "z + eps * sign(z)": _epsilon_variant(a, W, b, R, eps, "plain"),
        "the bias is missing from z: the denominator is the layer's output z = a W^T + b":
            _epsilon_variant(a, W, b, R, eps, bias=False),
        "this is W^T s without the factor a: multiply by the inputs, R_in = a * ((R_out / z_stab) @ W)":
            _epsilon_variant(a, W, b, R, eps, times_a=False),
    }


@exercise("lrp.epsilon", forbid=_ENGINES)
def check_epsilon(student, report: Report) -> None:
    # the lecture's hand example (z = -1 and 1.75 for the first row): every named mistake differs here
    a = torch.tensor([[1.0, 2.0, 0.5], [0.5, -1.0, 2.0]])  # (2, 3)
    W = torch.tensor([[1.0, -2.0, 3.0], [0.5, 1.0, -1.0]])  # (2, 3): output j, input i
    b = torch.tensor([0.5, -0.25])
    R = torch.tensor([[1.0, 2.0], [-0.5, 1.5]])
    eps = 0.5
    expected = _one_layer(_rules.Epsilon(eps), _linear(W, b), a, R)
    with report.part("returns the input relevance, shape (N, in) = (2, 3)", points=1):
        got = report.call(student, a.clone(), W.clone(), b.clone(), R.clone(), eps)
        report.expect_tensor(got, shape=(2, 3))
    # the title is printed in the solution notebook's committed output: the z = 0 layer is named in `what`
    with report.part("values on the hand-checkable layer (eps = 0.5, z = -1 and 1.75 in the first row)", points=1):
        got = report.call(student, a.clone(), W.clone(), b.clone(), R.clone(), eps)
        _no_nan(got, expected)
        report.expect_close(got, expected, mistakes=_epsilon_mistakes(a, W, b, R, eps))
        a0, W0, b0, R0 = _zero_z_layer()  # the stabiliser's sign at z = 0 is +1 (torch.sign gives 0 there)
        expected = _one_layer(_rules.Epsilon(eps), _linear(W0, b0), a0, R0)
        got = report.call(student, a0.clone(), W0.clone(), b0.clone(), R0.clone(), eps)
        _expect_sign_of_zero(got, a0, W0, b0)
        _no_nan(got, expected)
        report.expect_close(got, expected, what="your result (a unit with z = 0)",
                            mistakes=_epsilon_mistakes(a0, W0, b0, R0, eps))
    with report.part("values on random layers (batch 4, 7 inputs, 5 outputs)", points=1):
        for _ in range(2):
            g = torch.Generator().manual_seed(report.seed)
            a = torch.randn(4, 7, generator=g).clamp(min=0) + 0.1 * torch.rand(4, 7, generator=g)
            W, b = torch.randn(5, 7, generator=g), torch.randn(5, generator=g) * 0.5
            R = torch.randn(4, 5, generator=g)
            eps = float(report.rng.choice([0.01, 0.1, 1.0]))
            expected = _one_layer(_rules.Epsilon(eps), _linear(W, b), a, R)
            got = report.call(student, a.clone(), W.clone(), b.clone(), R.clone(), eps)
            _no_nan(got, expected)
            report.expect_close(got, expected, what=f"your result (eps = {eps:g})",
                                mistakes=_epsilon_mistakes(a, W, b, R, eps))


# ----------------------------------------------------------------------------------------------
# lrp.alpha_beta


def _conv_map(conv, x, w, b=None):
    return F.conv2d(x, w, b, conv.stride, conv.padding, conv.dilation, conv.groups)


def _conv_vjp(conv, x, w, s):
    return torch.nn.grad.conv2d_input(x.shape, w, s, conv.stride, conv.padding, conv.dilation, conv.groups)


def _alpha_beta_variant(x, conv, R, alpha, beta, *, eps=EPS_AB, beta_sign=-1.0, both_signs=True, shared=False,
                        bias=True, split_bias=True):
    w = conv.weight
    b = conv.bias if bias else None
    xp, xn, wp, wn = x.clamp(min=0), x.clamp(max=0), w.clamp(min=0), w.clamp(max=0)
    pos = [(xp, wp)] + ([(xn, wn)] if both_signs else [])  # contributions x_i w_ij > 0
    neg = [(xp, wn)] + ([(xn, wp)] if both_signs else [])  # contributions x_i w_ij < 0
    if b is None:
        bp = bn = torch.zeros(w.shape[0])
    else:
        bp, bn = (b.clamp(min=0), b.clamp(max=0)) if split_bias else (b, b)
    zp = sum(_conv_map(conv, t, v) for t, v in pos) + bp.view(1, -1, 1, 1)
    zn = sum(_conv_map(conv, t, v) for t, v in neg) + bn.view(1, -1, 1, 1)
    if shared:
        zp = zn = zp + zn
    sp, sn = R / _signed(zp, eps), R / _signed(zn, eps)
    rp = sum(t * _conv_vjp(conv, t, v, sp) for t, v in pos)
    rn = sum(t * _conv_vjp(conv, t, v, sn) for t, v in neg)
    return alpha * rp + beta_sign * beta * rn


def _alpha_beta_mistakes(x, conv, R, alpha, beta) -> dict:
    out = {
        "the beta term has the wrong sign: R = alpha R+ - beta R- (relevance of negative contributions is "
        "*subtracted*)": _alpha_beta_variant(x, conv, R, alpha, beta, beta_sign=1.0),
        "the beta term is missing: R = alpha R+ - beta R-": _alpha_beta_variant(x, conv, R, alpha, 0.0),
        "alpha and beta are swapped: alpha multiplies the positive part R+": _alpha_beta_variant(x, conv, R, beta, alpha),
        "only x+ w+ (and x+ w-) were used: a negative input times a negative weight is a *positive* contribution; "
        "z+ = conv(x+, w+) + conv(x-, w-) + b+ (and z- likewise)":
            _alpha_beta_variant(x, conv, R, alpha, beta, both_signs=False),
        "both parts share the full z as denominator; R+ is divided by z+ (positive contributions only) and R- by "
        "z- (negative ones only)": _alpha_beta_variant(x, conv, R, alpha, beta, shared=True),
        "the bias is missing: its positive part belongs in z+, its negative part in z-":
            _alpha_beta_variant(x, conv, R, alpha, beta, bias=False),
        "the whole bias went into both z+ and z-: split it, b.clamp(min=0) in z+ and b.clamp(max=0) in z-":
            _alpha_beta_variant(x, conv, R, alpha, beta, split_bias=False),
    }
    if alpha == 1.0 and beta == 0.0:  # with beta = 0 some of these coincide with the answer
        out = {k: v for k, v in out.items() if "wrong sign" not in k and "missing: R" not in k}
    return out


_TRANSPOSED_HINT = (
    "with stride 2 the transposed convolution of a 6 x 6 input's output has 5 x 5 pixels, not 6: "
    "F.conv_transpose2d needs output_padding = (H + 2 * padding - kernel_size) % stride (or let autograd "
    "or torch.nn.grad.conv2d_input(x.shape, ...) compute J^T s, which knows the input's size)")
_PADDING_HINT = ("the convolution was applied without the layer's stride and padding: pass conv.stride, "
                 "conv.padding (and conv.dilation, conv.groups) to F.conv2d")


def _call_conv(report: Report, student, x: torch.Tensor, conv: nn.Conv2d, *args):
    """Call the student on (a copy of x, ``conv``, *args); a size mismatch is explained (stride 2, or no padding)."""
    try:
        got = report.call(student, x.clone(), conv, *args)
    except StudentError as e:
        if "size of tensor" in str(e) or "must match the size" in str(e) or "Sizes of tensors" in str(e):
            hint = _TRANSPOSED_HINT if conv.stride[0] > 1 else _PADDING_HINT
            raise Mistake(f"{e}. Most likely {hint}") from None
        raise
    if isinstance(got, torch.Tensor) and got.dim() == 4 and got.shape[:2] == x.shape[:2] and got.shape != x.shape:
        hint = _TRANSPOSED_HINT if conv.stride[0] > 1 and got.shape[2] == x.shape[2] - 1 else _PADDING_HINT
        raise Mistake(f"your result has shape {tuple(got.shape)}, expected {tuple(x.shape)} (like x): {hint}")
    return got


def _not_vanishing(got, expected, what="your result") -> None:
    """Relevance close to 0 everywhere: s = R / z was not detached, so the gradient went through z / z = 1."""
    if isinstance(got, torch.Tensor) and got.shape == expected.shape and torch.isfinite(got).all() \
            and float(got.abs().max()) < 1e-3 * float(expected.abs().max()):
        raise Mistake(f"{what} is almost 0 everywhere (largest {float(got.abs().max()):.2g}): was s = R / z "
                      "detached before the backward pass? Backpropagating z * (R / z) differentiates R * z / z, "
                      "a constant; the gradient trick needs s as a constant, (z * s.detach()).sum()")


def _random_conv(g: torch.Generator, cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    conv = nn.Conv2d(cin, cout, 3, stride=stride, padding=1)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * 0.5)
        conv.bias.copy_(torch.randn(cout, generator=g) * 0.2)
    return _frozen(conv)


@exercise("lrp.alpha_beta", forbid=_ENGINES)
def check_alpha_beta(student, report: Report) -> None:
    # fixed case 1: mixed-sign inputs (a normalised image) and a mixed-sign bias, alpha = 2, beta = 1
    g = torch.Generator().manual_seed(40)
    conv = _random_conv(g, 2, 3)
    x = torch.randn(2, 2, 5, 5, generator=g)
    R = torch.randn(2, 3, 5, 5, generator=g)
    with torch.no_grad():
        conv.bias.copy_(torch.tensor([0.3, -0.4, 0.1]))
    # fixed case 2: inputs after a ReLU (>= 0, many zeros) and a channel whose weights and bias are all
    # positive: its z- is exactly 0, so an unstabilised denominator gives 0 / 0
    conv2 = _random_conv(g, 2, 3)
    with torch.no_grad():
        conv2.weight[0].abs_()
        conv2.bias[0] = 0.2
    x2 = torch.randn(2, 2, 5, 5, generator=g).clamp(min=0)
    R2 = torch.rand(2, 3, 5, 5, generator=g)
    with report.part("returns (N, C, H, W) like x and leaves the layer as it was", points=1):
        given = copy.deepcopy(conv)
        got = _call_conv(report, student, x, given, R.clone(), 2.0, 1.0)
        report.expect_tensor(got, shape=x.shape)
        _expect_layer_unchanged(given, _params(conv))
    with report.part("values, alpha = 2, beta = 1, inputs of both signs", points=1):
        got = _call_conv(report, student, x, copy.deepcopy(conv), R.clone(), 2.0, 1.0)
        expected = _one_layer(_rules.AlphaBeta(2, 1), conv, x, R)
        _no_nan(got, expected)
        _not_vanishing(got, expected)
        report.expect_close(got, expected, mistakes=_alpha_beta_mistakes(x, conv, R, 2.0, 1.0))
    with report.part("a unit with no negative contribution (z- = 0): stabilised, no NaN", points=1):
        got = _call_conv(report, student, x2, copy.deepcopy(conv2), R2.clone(), 2.0, 1.0)
        expected = _one_layer(_rules.AlphaBeta(2, 1), conv2, x2, R2)
        _no_nan(got, expected)
        report.expect_close(got, expected, mistakes=_alpha_beta_mistakes(x2, conv2, R2, 2.0, 1.0))
    with report.part("random convolutions (stride 1 or 2): alpha1-beta0 on inputs of both signs, alpha2-beta1 after a ReLU",
                     points=1):
        for alpha, beta in ((1.0, 0.0), (2.0, 1.0)):
            g = torch.Generator().manual_seed(report.seed)
            # stride 2 on an even size always comes first: a transposed convolution then needs output_padding
            stride = 2 if beta == 0.0 else int(report.rng.choice([1, 2]))
            cin, cout = int(report.rng.integers(1, 4)), int(report.rng.integers(2, 5))
            conv = _random_conv(g, cin, cout, stride)
            x = torch.randn(3, cin, 6, 6, generator=g)
            if beta:  # as in fixed case 2: inputs after a ReLU and an all-positive channel (its z- is 0)
                x = x.clamp(min=0)
                with torch.no_grad():
                    conv.weight[0].abs_()
                    conv.bias[0].abs_()
            with torch.no_grad():
                R = torch.randn(conv(x).shape, generator=g)
            expected = _one_layer(_rules.AlphaBeta(alpha, beta), conv, x, R)
            got = _call_conv(report, student, x, copy.deepcopy(conv), R.clone(), alpha, beta)
            _no_nan(got, expected)
            report.expect_close(got, expected, what=f"your result (alpha = {alpha:g}, beta = {beta:g}, stride {stride})",
                                mistakes=_alpha_beta_mistakes(x, conv, R, alpha, beta))


# ----------------------------------------------------------------------------------------------
# lrp.maxpool


def _winner_take_all(a, R, k):
    ai = a.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        (g,) = torch.autograd.grad(F.max_pool2d(ai, k), ai, R)
    return g


def _maxpool_mistakes(a, R, k) -> dict:
    up = R.repeat_interleave(k, 2).repeat_interleave(k, 3)  # (N, C, H, W): each window's R on all its pixels
    share = a / F.avg_pool2d(a, k).mul(k * k).repeat_interleave(k, 2).repeat_interleave(k, 3)
    corner = torch.zeros_like(up)
    corner[:, :, ::k, ::k] = R  # what a stride-k transposed convolution with a one-hot kernel gives
    return {
        "the relevance went to the top-left pixel of every window, not to its maximum (zero-insertion "
        "upsampling): find each window's maximum, e.g. with F.max_pool2d(..., return_indices=True) and "
        "F.max_unpool2d, or the gradient of the max pooling": corner,
        "the relevance was copied to every pixel of the window: relevance is not conserved (the sum grew "
        f"{k * k}-fold); the whole R of a window goes to its maximum only": up,
        "the relevance was spread evenly over the window (R / k^2 each, like average pooling); winner-take-all "
        "gives all of it to the maximum": up / (k * k),
        "the relevance was shared in proportion to the inputs (the 'proportional' rule); this exercise asks for "
        "winner-take-all": share * up,
    }


@exercise("lrp.maxpool", forbid=_ENGINES)
def check_maxpool(student, report: Report) -> None:
    # fixed case: activations after a ReLU (zeros included), one clear maximum per window, signed relevance
    a = torch.tensor([[[[0.0, 3.0, 1.0, 0.0],
                        [2.0, 1.0, 0.0, 5.0],
                        [0.5, 0.0, 0.0, 0.0],
                        [0.0, 0.25, 4.0, 2.0]]]])  # (1, 1, 4, 4)
    R = torch.tensor([[[[1.0, -2.0], [0.5, 3.0]]]])  # (1, 1, 2, 2)
    with report.part("returns (N, C, H, W) like the activations", points=1):
        got = report.call(student, a.clone(), R.clone(), 2)
        report.expect_tensor(got, shape=a.shape)
    with report.part("values: each window's relevance goes to its maximum (fixed case, then random ones)", points=1):
        got = report.call(student, a.clone(), R.clone(), 2)
        report.expect_close(got, _winner_take_all(a, R, 2), mistakes=_maxpool_mistakes(a, R, 2))
        for _ in range(2):
            g = torch.Generator().manual_seed(report.seed)
            k = int(report.rng.choice([2, 3]))
            a = torch.rand(2, 3, 6, 6, generator=g) + 0.01  # distinct values: no ties
            R = torch.randn(2, 3, 6 // k, 6 // k, generator=g)
            got = report.call(student, a.clone(), R.clone(), k)
            report.expect_close(got, _winner_take_all(a, R, k), what=f"your result (kernel_size = {k})",
                                mistakes=_maxpool_mistakes(a, R, k))


# ----------------------------------------------------------------------------------------------
# lrp.zbox


def _zbox_variant(xn, low, high, conv, R, *, swap=False, sign=-1.0):
    """z^B with normalised input ``xn`` and bounds ``low``/``high`` already in the layer's units (1, C, 1, 1)."""
    w = conv.weight
    wl, wh = (w.clamp(max=0), w.clamp(min=0)) if swap else (w.clamp(min=0), w.clamp(max=0))
    lo, hi = low.expand_as(xn), high.expand_as(xn)
    z = _conv_map(conv, xn, w) + sign * (_conv_map(conv, lo, wl) + _conv_map(conv, hi, wh))
    s = R / _signed(z, EPS_AB)
    return xn * _conv_vjp(conv, xn, w, s) + sign * (lo * _conv_vjp(conv, lo, wl, s) + hi * _conv_vjp(conv, hi, wh, s))


def _zbox_swapped_stats(pixels, conv, R, mean, std, low, high):
    m, s = std.view(1, -1, 1, 1), mean.view(1, -1, 1, 1)
    lo, hi = (torch.full_like(m, low) - m) / s, (torch.full_like(m, high) - m) / s
    return _zbox_variant((pixels - m) / s, lo, hi, conv, R)


def _zbox_case(pixels, conv, R, mean, std, low, high):
    m, s = mean.view(1, -1, 1, 1), std.view(1, -1, 1, 1)
    xn = (pixels - m) / s
    expected = _one_layer(_rules.ZBox(low, high, mean=mean, std=std), conv, xn, R)
    lo, hi = (torch.full_like(m, low) - m) / s, (torch.full_like(m, high) - m) / s
    raw_lo, raw_hi = torch.full_like(m, low), torch.full_like(m, high)
    mistakes = {
        "the bounds were used in normalised units: low and high are pixel values; the layer sees "
        "(x - mean) / std, so convert them the same way, l = (low - mean) / std, h = (high - mean) / std":
            _zbox_variant(xn, raw_lo, raw_hi, conv, R),
        "your result is what z^B gives when every channel shares one mean and one std (the pixels not normalised "
        "at all, or normalised with an averaged mean.mean() / std.mean() or scalars: with one common std the two "
        "give the same relevance): normalise each channel with its own mean and std, "
        "(pixels - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1), and the bounds the same way":
            _zbox_variant(pixels, raw_lo, raw_hi, conv, R),
        "mean and std were swapped: the layer sees (x - mean) / std": _zbox_swapped_stats(pixels, conv, R, mean, std,
                                                                                           low, high),
        "the relevance was divided by std (the chain rule through the normalisation): relevance passes the "
        "normalisation unchanged, R_pixel = R_normalised": expected / s,
        "w+ and w- are swapped: the lower bound l goes with w+ and the upper bound h with w-":
            _zbox_variant(xn, lo, hi, conv, R, swap=True),
        "the bound terms were added; z^B = x w - l w+ - h w- subtracts them": _zbox_variant(xn, lo, hi, conv, R, sign=1.0),
    }
    return expected, mistakes


@exercise("lrp.zbox", forbid=_ENGINES)
def check_zbox(student, report: Report) -> None:
    # fixed case: three channels with the ImageNet normalisation, black and white pixels included
    g = torch.Generator().manual_seed(41)
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    conv = _random_conv(g, 3, 4)
    pixels = torch.rand(2, 3, 6, 6, generator=g)
    pixels[:, :, 0] = 0.0
    pixels[:, :, -1] = 1.0
    R = torch.rand(2, 4, 6, 6, generator=g)
    expected, mistakes = _zbox_case(pixels, conv, R, mean, std, 0.0, 1.0)
    with report.part("returns pixel relevance (N, C, H, W) like the pixels", points=1):
        got = report.call(student, pixels.clone(), copy.deepcopy(conv), R.clone(), mean.clone(), std.clone())
        report.expect_tensor(got, shape=pixels.shape)
    with report.part("values with ImageNet's mean and std, bounds [0, 1] in pixel units", points=1):
        got = report.call(student, pixels.clone(), copy.deepcopy(conv), R.clone(), mean.clone(), std.clone())
        _no_nan(got, expected)
        report.expect_close(got, expected, mistakes=mistakes)
    with report.part("random layers, normalisations (3 channels) and pixel bounds", points=1):
        for _ in range(2):
            g = torch.Generator().manual_seed(report.seed)
            # three channels with clearly different stds: with one channel (or one common std) z^B does not
            # change when input and bounds are both left in pixel units, so that mistake would pass by luck
            c = 3
            mean = 0.2 + 0.4 * torch.rand(c, generator=g)
            std = (0.12 + 0.06 * torch.rand(1, generator=g)) * torch.tensor([1.0, 1.6, 2.5])[torch.randperm(3, generator=g)]
            low, high = float(report.rng.choice([0.0, 0.1])), float(report.rng.choice([0.9, 1.0]))
            conv = _random_conv(g, c, 3)
            pixels = low + (high - low) * torch.rand(2, c, 5, 5, generator=g)
            R = torch.rand(2, 3, 5, 5, generator=g)
            expected, mistakes = _zbox_case(pixels, conv, R, mean, std, low, high)
            got = report.call(student, pixels.clone(), copy.deepcopy(conv), R.clone(), mean.clone(), std.clone(), low, high)
            _no_nan(got, expected)
            report.expect_close(got, expected, what=f"your result (bounds [{low:g}, {high:g}])", mistakes=mistakes)


# ----------------------------------------------------------------------------------------------
# lrp.conservation


def dense_network(seed: int, sizes=(10, 8, 6, 4), bias: bool = True) -> nn.Sequential:
    """Linear-ReLU-...-Linear with the given widths (inputs first, classes last), frozen."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        layers: list[nn.Module] = []
        for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
            layers.append(nn.Linear(n_in, n_out, bias=bias))
            if i < len(sizes) - 2:
                layers.append(nn.ReLU())
        net = nn.Sequential(*layers)
    return _frozen(net)


def _dense_lrp(model, x, target, eps, start="logit", relu_clamp=False, one_hot=True, bias=True):
    """Obviously-correct loop: (R at the input (N, D), sums (L + 1, N)) with coursekit's epsilon rule per layer."""
    inputs, a = [], x
    with torch.no_grad():
        for layer in model:
            if isinstance(layer, nn.Linear):
                inputs.append(a)
            a = layer(a)
    logits = a  # (N, K)
    mask = F.one_hot(torch.full((len(x),), target), logits.shape[1]).to(logits) if one_hot else torch.ones_like(logits)
    top = {"logit": logits, "one": torch.ones_like(logits), "prob": logits.softmax(1)}[start]
    R = top * mask
    sums = [R.sum(1)]
    linears = [m for m in model if isinstance(m, nn.Linear)]
    for layer, a_in in zip(reversed(linears), reversed(inputs)):
        rule = _rules.Epsilon(eps, bias=bias and layer.bias is not None)
        R = _one_layer(rule, layer, a_in, R)
        if relu_clamp and layer is not linears[0]:
            R = R.clamp(min=0)
        sums.append(R.sum(1))
    return R, torch.stack(sums)


def _conservation_mistakes(model, x, target, eps) -> dict:
    sums = _dense_lrp(model, x, target, eps)[1]  # (L + 1, N)
    return {
        "the rows of sums are in reverse order: the first row is the logit (the top), the last the input layer":
            sums.flip(0),
        "the relevance at the top is the softmax probability; start with the logit of the target class":
            _dense_lrp(model, x, target, eps, start="prob")[1],
        "the bias is missing from the denominators: each layer's z = a W^T + b includes its bias":
            _dense_lrp(model, x, target, eps, bias=False)[1],
        "the relevance at the top is 1, not the logit: start with R = logit of the target class (zeros elsewhere)":
            _dense_lrp(model, x, target, eps, start="one")[1],
        "the relevance at the top holds every logit: keep only the target's (zeros for the other classes)":
            _dense_lrp(model, x, target, eps, one_hot=False)[1],
        "a ReLU was applied to the relevance: relevance can be negative, and a ReLU layer passes it on unchanged":
            _dense_lrp(model, x, target, eps, relu_clamp=True)[1],
    }


def _expect_pair(report: Report, got, n_rows: int, n: int, d: int):
    if not isinstance(got, (tuple, list)) or len(got) != 2:
        raise Mistake(f"return two things, (R, sums): the input relevance and the sums per layer; got {type(got).__name__}")
    R = report.expect_tensor(got[0], shape=(n, d), what="R (relevance at the input)")
    sums = got[1]
    if isinstance(sums, (list, tuple)) and all(isinstance(s, torch.Tensor) for s in sums):
        sums = torch.stack([s.reshape(-1) for s in sums])
    sums = report.expect_tensor(sums, shape=(n_rows, n), what="the tensor of sums (one row per layer, logit first)")
    return R.detach(), sums.detach()


@exercise("lrp.conservation", forbid=_ENGINES)
def check_conservation(student, report: Report) -> None:
    # fixed case: no biases and eps = 0, so every layer must hand on exactly what it received
    model = dense_network(7, bias=False)
    g = torch.Generator().manual_seed(42)
    x = torch.rand(3, 10, generator=g)
    target = 2
    R_exp, sums_exp = _dense_lrp(model, x, target, 0.0)
    with report.part("returns (R of shape (N, D), sums of shape (layers + 1, N))", points=1):
        got = report.call(student, model, x.clone(), target, 0.0)
        _expect_pair(report, got, 4, 3, 10)
    with report.part("no biases, eps = 0: relevance conserved, every sum equals the logit", points=1):
        got = report.call(student, model, x.clone(), target, 0.0)
        R, sums = _expect_pair(report, got, 4, 3, 10)
        if not torch.allclose(sums, sums_exp, rtol=1e-4, atol=1e-5):
            for why, wrong in _conservation_mistakes(model, x, target, 0.0).items():
                if torch.allclose(sums, wrong, rtol=1e-3, atol=1e-4):
                    raise Mistake(f"your sums match a known mistake: {why}")
            ratio = sums / sums[:1]
            if not torch.allclose(ratio, torch.ones_like(ratio), atol=1e-5):
                rows = ", ".join(f"{float(v):.4g}" for v in ratio[:, 0])
                raise Mistake(f"relevance is not conserved: sum / logit per layer = [{rows}] for image 0; without "
                              "biases and with eps = 0 every layer hands on exactly what it received (is a bias or "
                              "a stabiliser in your denominator?)")
            report.expect_close(sums, sums_exp, what="your tensor of sums")
        report.expect_close(R, R_exp, what="R (relevance at the input)")
    with report.part("random networks with biases and eps > 0: sums and R match", points=1):
        for _ in range(2):
            model = dense_network(report.seed, bias=True)
            g = torch.Generator().manual_seed(report.seed)
            x = torch.rand(4, 10, generator=g)
            target = int(report.rng.integers(0, 4))
            eps = float(report.rng.choice([0.01, 0.1, 0.5]))
            R_exp, sums_exp = _dense_lrp(model, x, target, eps)
            got = report.call(student, model, x.clone(), target, eps)
            R, sums = _expect_pair(report, got, 4, 4, 10)
            report.expect_close(sums, sums_exp, what=f"your tensor of sums (eps = {eps:g}, with biases)",
                                mistakes=_conservation_mistakes(model, x, target, eps))
            report.expect_close(R, R_exp, what=f"R (eps = {eps:g}, with biases)")
