"""The checks of exercise set 04_lrp: correct answers earn full points, each known mistake is named and
earns the same points on every run, a stub or a function that does nothing earns 0, calling coursekit earns 0."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from coursekit import lrp as L
from coursekit.checks import run_check

RUNS = 5


# ----------------------------------------------------------------------------------------------
# students' answers, written independently of the check's helpers


def _sign(z):
    return torch.where(z >= 0, 1.0, -1.0)


def epsilon_factory(mistake=None):
    def lrp_epsilon(a, W, b, R_out, eps):
        z = a @ W.T + (0 if mistake == "no_bias" else b)
        if mistake == "no_eps":
            zs = z
        elif mistake == "minus":
            zs = z - eps * _sign(z)
        elif mistake == "plain":
            zs = z + eps
        else:
            zs = z + eps * _sign(z)
        c = (R_out / zs) @ W
        return c if mistake == "no_a" else a * c
    return lrp_epsilon


def _conv(conv, x, w, b=None):
    return F.conv2d(x, w, b, conv.stride, conv.padding, conv.dilation, conv.groups)


def alpha_beta_factory(mistake=None):
    def lrp_alpha_beta(x, conv, R_out, alpha, beta):
        eps = 0.0 if mistake == "no_eps" else 1e-6
        w, b = conv.weight, conv.bias
        if mistake == "inplace":  # the positive part taken in place: the caller's layer is changed
            w = conv.weight.clone()
            conv.weight.data.clamp_(min=0)
        xp, xn, wp, wn = x.clamp(min=0), x.clamp(max=0), w.clamp(min=0), w.clamp(max=0)
        pos = [(xp, wp)] if mistake == "xpos_only" else [(xp, wp), (xn, wn)]
        neg = [(xp, wn)] if mistake == "xpos_only" else [(xp, wn), (xn, wp)]
        use_bias = mistake != "no_bias"

        def part(pairs, bias):
            leaves = [t.detach().clone().requires_grad_(True) for t, _ in pairs]
            with torch.enable_grad():
                z = sum(_conv(conv, t, v) for t, (_, v) in zip(leaves, pairs))
                if use_bias:
                    z = z + bias.view(1, -1, 1, 1)
                return leaves, z

        lp, zp = part(pos, b.clamp(min=0))
        ln, zn = part(neg, b.clamp(max=0))
        dp, dn = zp.detach(), zn.detach()
        if mistake == "shared":
            dp = dn = dp + dn
        sp = R_out / (dp + eps * _sign(dp)) if eps else R_out / dp
        sn = R_out / (dn + eps * _sign(dn)) if eps else R_out / dn
        gp = torch.autograd.grad(zp, lp, sp)
        gn = torch.autograd.grad(zn, ln, sn)
        rp = sum(t.detach() * g for t, g in zip(lp, gp))
        rn = sum(t.detach() * g for t, g in zip(ln, gn))
        if mistake == "beta_plus":
            return alpha * rp + beta * rn
        if mistake == "no_beta":
            return alpha * rp
        if mistake == "swapped":
            return beta * rp - alpha * rn
        return alpha * rp - beta * rn
    return lrp_alpha_beta


def maxpool_factory(mistake=None):
    def lrp_maxpool(a, R_out, k):
        up = R_out.repeat_interleave(k, 2).repeat_interleave(k, 3)
        if mistake == "copy":
            return up
        if mistake == "even":
            return up / k**2
        if mistake == "proportional":
            total = F.avg_pool2d(a, k) * k * k
            return a * (R_out / total).repeat_interleave(k, 2).repeat_interleave(k, 3)
        mx = F.max_pool2d(a, k).repeat_interleave(k, 2).repeat_interleave(k, 3)
        return (a == mx).to(a) * up  # no ties in the checks
    return lrp_maxpool


def zbox_factory(mistake=None):
    def lrp_zbox(pixels, conv, R_out, mean, std, low=0.0, high=1.0):
        m, s = mean.view(1, -1, 1, 1), std.view(1, -1, 1, 1)
        x = pixels if mistake == "no_norm" else (pixels - m) / s
        if mistake in ("normalised_bounds", "no_norm"):
            lo, hi = torch.full_like(x, low), torch.full_like(x, high)
        else:
            lo, hi = ((low - m) / s).expand_as(x), ((high - m) / s).expand_as(x)
        w = conv.weight
        wl, wh = w.clamp(min=0), w.clamp(max=0)
        if mistake == "swap":
            wl, wh = wh, wl
        sg = 1.0 if mistake == "plus" else -1.0
        z = _conv(conv, x, w) + sg * (_conv(conv, lo, wl) + _conv(conv, hi, wh))
        q = R_out / (z + 1e-6 * _sign(z))

        def back(t, v):
            return torch.nn.grad.conv2d_input(t.shape, v, q, conv.stride, conv.padding)

        r = x * back(x, w) + sg * (lo * back(lo, wl) + hi * back(hi, wh))
        return r / s if mistake == "div_std" else r
    return lrp_zbox


def dense_factory(mistake=None):
    def lrp_dense(model, x, target, eps):
        inputs, a = [], x
        with torch.no_grad():
            for layer in model:
                if isinstance(layer, nn.Linear):
                    inputs.append(a)
                a = layer(a)
        if mistake == "start_one":
            R = torch.zeros_like(a)
            R[:, target] = 1.0
        elif mistake == "all_logits":
            R = a.clone()
        else:
            R = torch.zeros_like(a)
            R[:, target] = a[:, target]
        sums = [R.sum(1)]
        linears = [m for m in model if isinstance(m, nn.Linear)]
        for i, (layer, a_in) in enumerate(zip(reversed(linears), reversed(inputs))):
            b = layer.bias if layer.bias is not None else torch.zeros(layer.out_features)
            if mistake == "leak":  # eps hard-coded, the argument ignored: with eps = 0 relevance is absorbed
                eps = 0.25
            R = epsilon_factory()(a_in, layer.weight, b, R, eps)
            if mistake == "relu_clamp" and i < len(linears) - 1:
                R = R.clamp(min=0)
            sums.append(R.sum(1))
        return R, torch.stack(sums)
    return lrp_dense


CORRECT = {
    "lrp.epsilon": epsilon_factory(),
    "lrp.alpha_beta": alpha_beta_factory(),
    "lrp.maxpool": maxpool_factory(),
    "lrp.zbox": zbox_factory(),
    "lrp.conservation": dense_factory(),
}


@pytest.mark.parametrize("name", sorted(CORRECT))
def test_correct_answers_earn_full_points(name):
    for seed in (0, 1, None):
        r = run_check(name, CORRECT[name], seed=seed)
        assert r.earned == r.points, r.summary()
        assert not r.tampering and not r.notes, (r.tampering, r.notes)


MISTAKES = [
    ("lrp.epsilon", epsilon_factory("no_eps"), "stabiliser is missing", 1),
    ("lrp.epsilon", epsilon_factory("minus"), "stabiliser has the wrong sign", 1),
    ("lrp.epsilon", epsilon_factory("plain"), "without the sign of z", 1),
    ("lrp.epsilon", epsilon_factory("no_bias"), "bias is missing", 1),
    ("lrp.epsilon", epsilon_factory("no_a"), "without the factor a", 1),
    ("lrp.alpha_beta", alpha_beta_factory("beta_plus"), "beta term has the wrong sign", 1),
    ("lrp.alpha_beta", alpha_beta_factory("no_beta"), "beta term is missing", 1),
    ("lrp.alpha_beta", alpha_beta_factory("swapped"), "alpha and beta are swapped", 1),
    ("lrp.alpha_beta", alpha_beta_factory("xpos_only"), "negative input times a negative weight", 2),
    ("lrp.alpha_beta", alpha_beta_factory("shared"), "share the full z", 1),
    ("lrp.alpha_beta", alpha_beta_factory("no_bias"), "bias is missing", 1),
    ("lrp.alpha_beta", alpha_beta_factory("no_eps"), "NaN", 2),
    ("lrp.alpha_beta", alpha_beta_factory("inplace"), "in place", 3),
    ("lrp.maxpool", maxpool_factory("copy"), "not conserved", 1),
    ("lrp.maxpool", maxpool_factory("even"), "spread evenly", 1),
    ("lrp.maxpool", maxpool_factory("proportional"), "in proportion", 1),
    ("lrp.zbox", zbox_factory("normalised_bounds"), "normalised units", 1),
    ("lrp.zbox", zbox_factory("no_norm"), "not normalised at all", 1),
    ("lrp.zbox", zbox_factory("div_std"), "divided by std", 1),
    ("lrp.zbox", zbox_factory("swap"), "swapped", 1),
    ("lrp.zbox", zbox_factory("plus"), "subtracts them", 1),
    ("lrp.conservation", dense_factory("start_one"), "is 1, not the logit", 1),
    ("lrp.conservation", dense_factory("all_logits"), "holds every logit", 1),
    ("lrp.conservation", dense_factory("relu_clamp"), "ReLU was applied to the relevance", 1),
    ("lrp.conservation", dense_factory("leak"), "not conserved", 1),
]


@pytest.mark.parametrize("name, fn, phrase, points", MISTAKES, ids=[f"{m[0]}-{m[2][:24]}" for m in MISTAKES])
def test_known_mistakes_are_named_and_score_the_same_every_run(name, fn, phrase, points):
    earned = []
    for _ in range(RUNS):  # fresh, unseeded random cases each time
        r = run_check(name, fn)
        earned.append(r.earned)
        assert phrase in r.summary(), r.summary()
    assert earned == [points] * RUNS, earned


def _stub(*args, **kwargs):
    raise NotImplementedError()


@pytest.mark.parametrize("name", sorted(CORRECT))
def test_a_stub_earns_nothing(name):
    r = run_check(name, _stub)
    assert r.earned == 0 and "not implemented" in r.summary()


@pytest.mark.parametrize("name, fn", [
    ("lrp.epsilon", lambda a, W, b, R, eps: a),
    ("lrp.epsilon", lambda a, W, b, R, eps: torch.zeros_like(a)),
    ("lrp.alpha_beta", lambda x, conv, R, al, be: x),
    ("lrp.alpha_beta", lambda x, conv, R, al, be: torch.zeros_like(x)),
    ("lrp.maxpool", lambda a, R, k: a),
    ("lrp.zbox", lambda p, conv, R, m, s, lo=0.0, hi=1.0: p),
    ("lrp.zbox", lambda p, conv, R, m, s, lo=0.0, hi=1.0: torch.zeros_like(p)),
    ("lrp.conservation", lambda model, x, t, eps: (x, None)),
    ("lrp.conservation", lambda model, x, t, eps: None),
])
def test_doing_nothing_earns_nothing(name, fn):
    r = run_check(name, fn)
    assert r.earned == 0, r.summary()


def _one(rule, module, x, R):
    """A student who attaches coursekit's rule to the layer and backpropagates."""
    xi = x.detach().clone().requires_grad_(True)
    handles = rule.attach(module)
    try:
        with torch.enable_grad():
            (g,) = torch.autograd.grad(module(xi), xi, R)
    finally:
        for h in handles:
            h.remove()
    return g


def _linear(W, b):
    layer = nn.Linear(W.shape[1], W.shape[0])
    with torch.no_grad():
        layer.weight.copy_(W)
        layer.bias.copy_(b)
    return layer.requires_grad_(False)


@pytest.mark.parametrize("name, fn", [
    ("lrp.epsilon", lambda a, W, b, R, eps: _one(L.Epsilon(eps), _linear(W, b), a, R)),
    ("lrp.epsilon", lambda a, W, b, R, eps: a * ((R / L.stabilize(a @ W.T + b, eps)) @ W)),
    ("lrp.alpha_beta", lambda x, conv, R, al, be: _one(L.AlphaBeta(al, be), conv, x, R)),
    ("lrp.alpha_beta", lambda x, conv, R, al, be: L.AlphaBeta(al, be).backward(conv, (x,), conv(x), R)[0]),
    ("lrp.zbox", lambda p, conv, R, m, s, lo=0.0, hi=1.0: L.ZBox(lo, hi, mean=m, std=s).backward(
        conv, ((p - m.view(1, -1, 1, 1)) / s.view(1, -1, 1, 1),), None, R)[0]),
    ("lrp.conservation", lambda model, x, t, eps: (L.lrp(model, x[:, None, :, None], t,
                                                         L.LRPComposite({nn.Linear: L.Epsilon(eps)}),
                                                         canonizers=None)[:, 0, :, 0], None)),
])
def test_calling_coursekit_earns_nothing(name, fn):
    r = run_check(name, fn)
    assert r.earned == 0, r.summary()
    assert "reference" in r.summary() or "coursekit" in r.summary(), r.summary()


# -- more mistakes with their own diagnosis (issue 18) ------------------------------------------


def epsilon_torch_sign(a, W, b, R_out, eps):
    z = a @ W.T + b
    return a * ((R_out / (z + eps * torch.sign(z))) @ W)  # torch.sign(0) = 0: z = 0 stays 0


def alpha_beta_by(backward, detach_s=True, split_bias=True):
    """alpha-beta with J^T s computed by ``backward(s, w, conv, x)``."""
    def lrp_alpha_beta(x, conv, R_out, alpha, beta):
        w, b = conv.weight, conv.bias
        xp, xn, wp, wn = x.clamp(min=0), x.clamp(max=0), w.clamp(min=0), w.clamp(max=0)
        bp, bn = (b.clamp(min=0), b.clamp(max=0)) if split_bias else (b, b)

        def part(pairs, bias):
            z = sum(F.conv2d(t, v, None, conv.stride, conv.padding) for t, v in pairs) + bias.view(1, -1, 1, 1)
            s = R_out / (z + 1e-6 * _sign(z))
            if not detach_s:  # the gradient trick with s still attached: d/dx sum(z * R / z)
                leaves = [t.detach().clone().requires_grad_(True) for t, _ in pairs]
                with torch.enable_grad():
                    z = sum(F.conv2d(t, v, None, conv.stride, conv.padding) for t, (_, v) in zip(leaves, pairs))
                    z = z + bias.view(1, -1, 1, 1)
                    grads = torch.autograd.grad((z * (R_out / (z + 1e-6 * _sign(z)))).sum(), leaves)
                return sum(t.detach() * g for t, g in zip(leaves, grads))
            return sum(t * backward(s, v, conv, t) for t, v in pairs)

        rp = part([(xp, wp), (xn, wn)], bp)
        rn = part([(xp, wn), (xn, wp)], bn)
        return (alpha * rp - beta * rn).detach()
    return lrp_alpha_beta


def _transposed_no_output_padding(s, w, conv, x):
    return F.conv_transpose2d(s, w, None, conv.stride, conv.padding)


def _transposed(s, w, conv, x):
    """The transposed convolution with the output_padding that gives back x's size (the independent answer)."""
    k, p, st = w.shape[-1], conv.padding[0], conv.stride[0]
    op = (x.shape[-1] + 2 * p - k) % st
    return F.conv_transpose2d(s, w, None, st, p, output_padding=op)


def alpha_beta_no_padding(x, conv, R_out, alpha, beta):
    w = conv.weight
    xp, wp, wn = x.clamp(min=0), w.clamp(min=0), w.clamp(max=0)
    zp = F.conv2d(xp, wp) + conv.bias.clamp(min=0).view(1, -1, 1, 1)  # stride and padding forgotten
    zn = F.conv2d(xp, wn) + conv.bias.clamp(max=0).view(1, -1, 1, 1)
    return alpha * xp * F.conv_transpose2d(R_out / zp, wp) - beta * xp * F.conv_transpose2d(R_out / zn, wn)


def maxpool_top_left(a, R_out, k):
    out = torch.zeros_like(a)
    out[:, :, ::k, ::k] = R_out
    return out


def zbox_with_stats(mean_of, std_of):
    def lrp_zbox(pixels, conv, R_out, mean, std, low=0.0, high=1.0):
        return zbox_factory()(pixels, conv, R_out, mean_of(mean, std), std_of(mean, std), low, high)
    return lrp_zbox


def dense_variant(post=None, start=None, bias=True):
    def lrp_dense(model, x, target, eps):
        inputs, a = [], x
        with torch.no_grad():
            for layer in model:
                if isinstance(layer, nn.Linear):
                    inputs.append(a)
                a = layer(a)
        R = torch.zeros_like(a)
        R[:, target] = (start(a) if start else a)[:, target]
        sums = [R.sum(1)]
        for layer, a_in in zip(reversed([m for m in model if isinstance(m, nn.Linear)]), reversed(inputs)):
            b = layer.bias if (layer.bias is not None and bias) else torch.zeros(layer.out_features)
            R = epsilon_factory()(a_in, layer.weight, b, R, eps)
            sums.append(R.sum(1))
        sums = torch.stack(sums)
        return R, (post(sums) if post else sums)
    return lrp_dense


NEW_MISTAKES = [
    ("lrp.epsilon", epsilon_torch_sign, "torch.sign(0) is 0"),
    ("lrp.alpha_beta", alpha_beta_by(_transposed_no_output_padding), "output_padding"),
    ("lrp.alpha_beta", alpha_beta_no_padding, "without the layer's stride and padding"),
    ("lrp.alpha_beta", alpha_beta_by(_transposed, detach_s=False), "detached before the backward pass"),
    ("lrp.alpha_beta", alpha_beta_by(_transposed, split_bias=False), "whole bias went into both z+ and z-"),
    ("lrp.maxpool", maxpool_top_left, "top-left pixel of every window"),
    ("lrp.zbox", zbox_with_stats(lambda m, s: m.mean().expand(3), lambda m, s: s.mean().expand(3)),
     "normalised with an averaged mean.mean() / std.mean()"),
    ("lrp.zbox", zbox_with_stats(lambda m, s: s, lambda m, s: m), "mean and std were swapped"),
    ("lrp.conservation", dense_variant(post=lambda s: s.flip(0)), "reverse order"),
    ("lrp.conservation", dense_variant(start=lambda z: z.softmax(1)), "softmax probability"),
    ("lrp.conservation", dense_variant(bias=False), "bias is missing from the denominators"),
]


@pytest.mark.parametrize("name, fn, phrase", NEW_MISTAKES, ids=[f"{m[0]}-{m[2][:24]}" for m in NEW_MISTAKES])
def test_more_mistakes_have_their_own_diagnosis(name, fn, phrase):
    for seed in (0, 1):
        r = run_check(name, fn, seed=seed)
        assert r.earned < r.points and phrase in r.summary(), r.summary()


def test_averaged_mean_and_std_are_not_called_unnormalised_pixels():
    r = run_check("lrp.zbox", zbox_with_stats(lambda m, s: m.mean().expand(3), lambda m, s: s.mean().expand(3)), seed=0)
    assert "the pixels were fed to the layer without normalising them" not in r.summary(), r.summary()


def test_a_generic_mismatch_of_the_sums_is_grammatical():
    r = run_check("lrp.conservation", dense_variant(post=lambda s: s * 1.5), seed=0)
    assert r.earned < r.points
    assert "your sums differs" not in r.summary() and "your tensor of sums differs" in r.summary(), r.summary()


def test_a_transposed_convolution_with_output_padding_earns_full_points():
    for seed in (0, 1, 2):
        r = run_check("lrp.alpha_beta", alpha_beta_by(_transposed), seed=seed)
        assert r.earned == r.points, r.summary()
