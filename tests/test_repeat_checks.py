"""Known mistakes get the same points on every run (no pass by luck), with an accurate diagnosis."""

from __future__ import annotations

import pytest
import torch

from coursekit.checks import run_check

RUNS = 8


def _off_by_one_occlusion(model, x, target, patch, stride, fill=0.0):
    n, _, h, w = x.shape
    target = torch.as_tensor(target).reshape(-1).expand(n)
    rows = torch.arange(n)
    starts = range(0, h - patch, stride)  # misses the window that ends exactly at the border
    with torch.no_grad():
        p = model(x).softmax(1)[rows, target]
        grid = torch.zeros(n, len(starts), len(starts))
        for i, r in enumerate(starts):
            for j, c in enumerate(starts):
                hidden = x.clone()
                hidden[:, :, r : r + patch, c : c + patch] = fill
                grid[:, i, j] = p - model(hidden).softmax(1)[rows, target]
    return grid


def _top_k_always_train(model, x, k):
    model.eval()
    with torch.no_grad():
        probs = model(x).softmax(dim=1)[0]
    model.train()  # unconditional: wrong when the model came in eval mode
    top = probs.topk(k)
    return top.values, top.indices


def _top_k_swapped(model, x, k):
    was = model.training
    model.eval()
    with torch.no_grad():
        top = model(x).softmax(dim=1)[0].topk(k)
    model.train(was)
    return top.indices, top.values


def _output_size_dk(n, kernel_size, stride=1, padding=0, dilation=1):
    return (n + 2 * padding - dilation * kernel_size - 1) // stride + 1


def _points(name, fn):
    return [run_check(name, fn).earned for _ in range(RUNS)]


@pytest.mark.usefixtures("one_thread")
def test_off_by_one_occlusion_never_passes_the_shape():
    points = _points("saliency.occlusion", _off_by_one_occlusion)
    assert points == [0.0] * RUNS
    report = run_check("saliency.occlusion", _off_by_one_occlusion)
    assert "(H - patch) // stride + 1 = 5" in report.parts[0].message


@pytest.mark.usefixtures("one_thread")
def test_unconditional_train_and_swapped_results_in_top_k():
    assert _points("warmup.top_k", _top_k_always_train) == [3.0] * RUNS
    report = run_check("warmup.top_k", _top_k_always_train)
    assert "unconditional model.train()" in report.parts[-1].message
    swapped = run_check("warmup.top_k", _top_k_swapped)
    assert "swapped" in swapped.parts[0].message and "dtype" not in swapped.parts[0].message


def test_dilation_times_k_is_not_called_a_missing_plus_one():
    points = _points("filters.output_size", _output_size_dk)
    assert len(set(points)) == 1 and points[0] < 3
    messages = [p.message for p in run_check("filters.output_size", _output_size_dk).parts if p.message]
    assert any("d * k" in m for m in messages), messages
    assert not any(m.startswith("you forgot the + 1") for m in messages)


@pytest.mark.parametrize("doing_nothing", [
    lambda model, x, target, *a, **k: None,
    lambda model, x, target, *a, **k: x,
    lambda model, x, target, *a, **k: torch.zeros(x.shape[0], *x.shape[2:]),
])
@pytest.mark.usefixtures("one_thread")
def test_doing_nothing_earns_nothing(doing_nothing):
    for name in ("saliency.vanilla", "saliency.guided", "saliency.gradcam"):
        assert run_check(name, doing_nothing).earned == 0.0, name


@pytest.mark.usefixtures("one_thread")
def test_edge_energy_written_as_instructed_in_float32_gets_full_points():
    import torch.nn.functional as F

    def edge_energy(x):
        n, c, h, w = x.shape
        u = x.reshape(n * c, 1, h, w)
        t = torch.tensor([-2.0, -1.0, 0.0, 1.0, 2.0])  # float32, as the instructions write it
        k = torch.exp(-(t**2) / 2)
        g = torch.outer(k, k)
        g = (g / g.sum()).view(1, 1, 5, 5)
        total = 0
        while min(u.shape[2:]) > 5:
            total = total + (u - F.conv2d(u, g, padding=2)).pow(2).flatten(1).sum(1)
            u = F.avg_pool2d(u, 2, padding=1)
        return total.view(n, c).sum(1)

    assert _points("maxresp.edge_energy", edge_energy)[:3] == [5.0] * 3


def test_the_fixed_first_cases_expose_every_diagnosed_mistake():
    from coursekit.checks import filters as checks_filters

    for text, wrong in checks_filters._OUTPUT_MISTAKES.items():
        assert any(wrong(*c) != checks_filters._torch_output_size(*c) for c in checks_filters.FIXED_OUTPUT_CASES), text
    for text, wrong in checks_filters._PARAM_MISTAKES.items():
        assert any(wrong(*c) != checks_filters._torch_params(*c) for c in checks_filters.FIXED_PARAM_CASES), text


# ----------------------------------------------------------------------------------------------
# issue 18: every listed mistake loses points in every one of 20 runs (grader seeds 0..19), with its
# own diagnosis each time; one mistake does not fail an unrelated part; an independent correct
# answer (not the solution notebook's code) earns full points in every run

import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

SEEDS_20 = range(20)


def _eps_torch_sign(a, W, b, R_out, eps):
    z = a @ W.T + b  # (N, out)
    return a * ((R_out / (z + eps * torch.sign(z))) @ W)  # torch.sign(0) = 0: a z = 0 unit divides by 0


def _alpha_beta_transposed(output_padding: bool):
    """alpha-beta with J^T s by F.conv_transpose2d, with or without the output_padding stride 2 needs."""
    def lrp_alpha_beta(x, conv, R_out, alpha, beta):
        w, b, st, p = conv.weight, conv.bias, conv.stride, conv.padding
        pad = tuple((x.shape[d] + 2 * p[i] - w.shape[d]) % st[i] for i, d in enumerate((2, 3))) if output_padding else 0
        xp, xn, wp, wn = x.clamp(min=0), x.clamp(max=0), w.clamp(min=0), w.clamp(max=0)

        def relevance(pairs, bias):
            z = sum(F.conv2d(t, v, None, st, p) for t, v in pairs) + bias.view(1, -1, 1, 1)  # (N, K, h, w)
            s = R_out / torch.where(z < 0, z - 1e-6, z + 1e-6)
            return sum(t * F.conv_transpose2d(s, v, None, st, p, output_padding=pad) for t, v in pairs)

        r_pos = relevance([(xp, wp), (xn, wn)], b.clamp(min=0))
        r_neg = relevance([(xp, wn), (xn, wp)], b.clamp(max=0))
        return alpha * r_pos - beta * r_neg
    return lrp_alpha_beta


def _margin_masked_with_zero(z, y):
    z_y = z.gather(1, y[:, None])[:, 0]
    return z.scatter(1, y[:, None], 0.0).max(1).values - z_y


def _sweep_no_clamp(model, x, y, eps_values):
    was = model.training
    model.eval()
    xg = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(F.cross_entropy(model(xg), y), xg)
    with torch.no_grad():
        out = [float((model(x + e * g.sign()).argmax(1) == y).float().mean()) for e in eps_values]
    model.train(was)
    return out


def _octaves_int_sizes(step, x, n_octaves=3, scale=1.4):
    h, w = x.shape[-2:]
    sizes = [(int(h / scale**k), int(w / scale**k)) for k in reversed(range(n_octaves))]  # int() truncates
    detail = torch.zeros(*x.shape[:2], *sizes[0], dtype=x.dtype)
    for size in sizes:
        base = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        detail = F.interpolate(detail, size=size, mode="bilinear", align_corners=False)
        out = step(base + detail)
        detail = out - base
    return out


def _octaves_base_from_base(step, x, n_octaves=3, scale=1.4):
    h, w = x.shape[-2:]
    base, detail = x, None
    for k in reversed(range(n_octaves)):
        size = (round(h / scale**k), round(w / scale**k))
        base = F.interpolate(base, size=size, mode="bilinear", align_corners=False)  # from the previous base
        detail = torch.zeros_like(base) if detail is None else F.interpolate(detail, size=size, mode="bilinear",
                                                                               align_corners=False)
        out = step(base + detail)
        detail = out - base
    return out


def _dream_step_swapped_axes(features, x, shift, lr=0.02):
    x = x.detach().clone().requires_grad_(True)
    energy = features(torch.roll(x, shifts=tuple(shift), dims=(3, 2))).pow(2).flatten(1).mean(1)
    (g,) = torch.autograd.grad(energy.sum(), x)
    return (x + lr * g / g.pow(2).flatten(1).mean(1).sqrt().view(-1, 1, 1, 1)).clamp(0, 1).detach()


def _gram_unbiased(features):
    n, c, h, w = features.shape
    f = features.flatten(2)
    return f @ f.transpose(1, 2) / (h * w - 1)


LISTED = [
    ("lrp.alpha_beta", _alpha_beta_transposed(output_padding=False), "output_padding"),
    ("lrp.epsilon", _eps_torch_sign, "torch.sign(0) is 0"),
    ("adversarial.margin", _margin_masked_with_zero, "masked with 0"),
    ("adversarial.sweep", _sweep_no_clamp, "no clamp to [0, 1]"),
    ("dream.octaves", _octaves_int_sizes, "truncated with int()"),
    ("dream.octaves", _octaves_base_from_base, "each base resized from the previous"),
    ("dream.step", _dream_step_swapped_axes, "wrong axes"),
    ("dream.gram", _gram_unbiased, "H*W - 1"),
]


@pytest.mark.parametrize("name, fn, phrase", LISTED, ids=[f"{m[0]}-{m[2][:20]}" for m in LISTED])
@pytest.mark.usefixtures("one_thread")
def test_each_listed_mistake_loses_points_in_all_20_runs(name, fn, phrase):
    lost = [run_check(name, fn, seed=seed) for seed in SEEDS_20]
    assert [r.earned < r.points for r in lost] == [True] * 20, [r.earned for r in lost]
    assert [phrase in r.summary() for r in lost] == [True] * 20, next(r.summary() for r in lost if phrase not in r.summary())


@pytest.mark.usefixtures("one_thread")
def test_a_missing_clamp_in_fgsm_does_not_fail_the_train_mode_part():
    def fgsm_no_clamp(model, x, labels, eps):
        was = model.training
        model.eval()
        xg = x.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(F.cross_entropy(model(xg), labels), xg)
        model.train(was)
        return x + eps * g.sign()

    for seed in range(5):
        r = run_check("adversarial.fgsm", fgsm_no_clamp, seed=seed)
        assert r.earned == 1.0, r.summary()  # parts 1 and 2 lost to the clamp, the train-mode part kept
        assert "train mode" in r.parts[-1].title and r.parts[-1].earned == 1.0, r.summary()
        assert "clamp" in r.parts[1].message, r.summary()


# -- independent correct answers (written differently from solutions/) ----------------------------


def _ind_epsilon(a, W, b, R_out, eps):
    z = torch.einsum("ni,ji->nj", a, W) + b  # (N, out)
    z_stab = z + torch.where(z < 0, -eps, eps)  # sign(0) = +1
    return torch.einsum("ni,ji,nj->ni", a, W, R_out / z_stab)  # sum_j a_i w_ji R_j / z_j


def _ind_maxpool(a, R_out, k):
    _, idx = F.max_pool2d(a, k, return_indices=True)
    return F.max_unpool2d(R_out, idx, k, output_size=a.shape[-2:])


def _ind_zbox(pixels, conv, R_out, mean, std, low=0.0, high=1.0):
    m, s = mean[None, :, None, None], std[None, :, None, None]
    x = (pixels - m) / s
    lo, hi = ((low - m) / s).expand_as(x), ((high - m) / s).expand_as(x)
    w, st, p = conv.weight, conv.stride, conv.padding
    wp, wn = torch.relu(w), -torch.relu(-w)
    z = F.conv2d(x, w, None, st, p) - F.conv2d(lo, wp, None, st, p) - F.conv2d(hi, wn, None, st, p)
    q = R_out / torch.where(z < 0, z - 1e-6, z + 1e-6)
    pad = tuple((x.shape[d] + 2 * p[i] - w.shape[d]) % st[i] for i, d in enumerate((2, 3)))

    def back(v):
        return F.conv_transpose2d(q, v, None, st, p, output_padding=pad)

    return x * back(w) - lo * back(wp) - hi * back(wn)


def _ind_dense(model, x, target, eps):
    acts = [x]
    with torch.no_grad():
        for layer in model:
            acts.append(layer(acts[-1]))
    logits = acts[-1]
    R = logits * F.one_hot(torch.tensor(target), logits.shape[1]).to(logits)  # (N, K)
    sums = [R.sum(1)]
    for i in reversed(range(len(model))):
        if isinstance(model[i], nn.Linear):  # a ReLU hands R on unchanged
            b = model[i].bias if model[i].bias is not None else torch.zeros(model[i].out_features)
            R = _ind_epsilon(acts[i], model[i].weight, b, R, eps)
            sums.append(R.sum(1))
    return R, sums  # a list of (N,) tensors, logit first


def _ind_margin(z, y):
    top = z.topk(2, dim=1)
    best_other = torch.where(top.indices[:, 0] == y, top.values[:, 1], top.values[:, 0])
    return best_other - z[torch.arange(len(y)), y]


def _in_eval_mode(fn):
    def wrapped(model, *args):
        modes = {m: m.training for m in model.modules()}
        model.eval()
        try:
            return fn(model, *args)
        finally:
            for m, mode in modes.items():
                m.training = mode
    return wrapped


@_in_eval_mode
def _ind_fgsm(model, x, labels, eps):
    xg = x.detach().clone().requires_grad_(True)
    F.cross_entropy(model(xg), labels, reduction="sum").backward()
    return torch.clamp(x + eps * torch.sign(xg.grad), min=0.0, max=1.0)


def _ind_pgd_step(x_adv, grad, x, step, eps):
    moved = x_adv + step * torch.sign(grad)
    moved = torch.max(torch.min(moved, x + eps), x - eps)
    return torch.clamp(moved, 0.0, 1.0).detach()


@_in_eval_mode
def _ind_sweep(model, x, labels, eps_values):
    xg = x.detach().clone().requires_grad_(True)
    F.cross_entropy(model(xg), labels).backward()
    d = torch.sign(xg.grad)
    correct = []
    with torch.no_grad():
        for e in eps_values:
            correct.append(sum(int((model(torch.clamp(x[i:i + 16] + e * d[i:i + 16], 0, 1)).argmax(1)
                                    == labels[i:i + 16]).sum()) for i in range(0, len(x), 16)) / len(x))
    return correct


def _ind_targeted(model, x, target, eps, step, steps):
    wanted = torch.full((len(x),), target, dtype=torch.long)
    adv = x.detach().clone()
    for _ in range(steps):
        adv.requires_grad_(True)
        (g,) = torch.autograd.grad(-F.cross_entropy(model(adv), wanted), adv)  # ascend minus the target's loss
        adv = (adv.detach() + step * g.sign())
        adv = torch.max(torch.min(adv, x + eps), x - eps).clamp(0, 1)
    return adv


def _ind_gram(features):
    h, w = features.shape[-2:]
    return torch.einsum("nchw,ndhw->ncd", features, features) / (h * w)


def _ind_style(features, target_grams):
    per_layer = [F.mse_loss(_ind_gram(f), a.expand(len(f), -1, -1), reduction="none").mean(dim=(1, 2))
                 for f, a in zip(features, target_grams)]
    return torch.stack(per_layer).sum(0)


def _ind_tv(x, power=2.0):
    return sum(torch.diff(x, dim=d).abs().pow(power).mean(dim=(1, 2, 3)) for d in (-1, -2))


def _ind_step(features, x, shift, lr=0.02):
    rolled = torch.roll(x.detach(), shifts=tuple(shift), dims=(2, 3)).requires_grad_(True)
    (g_rolled,) = torch.autograd.grad(features(rolled).pow(2).mean(dim=(1, 2, 3)).sum(), rolled)
    g = torch.roll(g_rolled, shifts=tuple(-s for s in shift), dims=(2, 3))  # back into x's frame
    rms = torch.sqrt(torch.mean(g * g, dim=(1, 2, 3), keepdim=True))
    return torch.clamp(x.detach() + lr * g / rms, 0, 1)


def _ind_octaves(step, x, n_octaves=3, scale=1.4):
    h, w = x.shape[-2:]
    picture, previous = None, None
    for k in range(n_octaves - 1, -1, -1):
        size = (round(h / scale**k), round(w / scale**k))
        base = F.interpolate(x, size=size, mode="bilinear", align_corners=False) if k else x
        carried = 0 if previous is None else F.interpolate(previous, size=size, mode="bilinear", align_corners=False)
        picture = step(base + carried)
        previous = picture - base  # all the detail added so far, at this octave's size
    return picture


INDEPENDENT = {
    "lrp.epsilon": _ind_epsilon,
    "lrp.alpha_beta": _alpha_beta_transposed(output_padding=True),
    "lrp.maxpool": _ind_maxpool,
    "lrp.zbox": _ind_zbox,
    "lrp.conservation": _ind_dense,
    "adversarial.margin": _ind_margin,
    "adversarial.fgsm": _ind_fgsm,
    "adversarial.pgd_step": _ind_pgd_step,
    "adversarial.sweep": _ind_sweep,
    "adversarial.targeted": _ind_targeted,
    "dream.gram": _ind_gram,
    "dream.style_loss": _ind_style,
    "dream.tv": _ind_tv,
    "dream.step": _ind_step,
    "dream.octaves": _ind_octaves,
}


@pytest.mark.parametrize("name", sorted(INDEPENDENT))
@pytest.mark.usefixtures("one_thread")
def test_an_independent_correct_answer_earns_full_points_every_run(name):
    for seed in (*range(5), None):
        r = run_check(name, INDEPENDENT[name], seed=seed)
        assert r.earned == r.points, r.summary()
        assert not r.tampering, r.tampering


# -- never a wrong diagnosis: on the deciding cases no two named mistakes give the same numbers ----


def _coinciding(mistakes: dict, rtol: float, atol: float) -> list:
    items = [(k, v.double()) for k, v in mistakes.items()]
    return [(k1[:50], k2[:50]) for i, (k1, v1) in enumerate(items) for k2, v2 in items[i + 1:]
            if v1.shape == v2.shape and torch.allclose(v1, v2, rtol=rtol, atol=atol)]


def test_no_two_named_mistakes_coincide_on_the_deciding_cases():
    """expect_close names the first mistake that matches: two that coincide would name one of them wrongly."""
    import numpy as np

    from coursekit.checks import Report
    from coursekit.checks import adversarial as ca
    from coursekit.checks import dream as cd
    from coursekit.checks import lrp as cl

    a = torch.tensor([[1.0, 2.0, 0.5], [0.5, -1.0, 2.0]])
    W, b = torch.tensor([[1.0, -2.0, 3.0], [0.5, 1.0, -1.0]]), torch.tensor([0.5, -0.25])
    assert _coinciding(cl._epsilon_mistakes(a, W, b, torch.tensor([[1.0, 2.0], [-0.5, 1.5]]), 0.5), 1e-3, 1e-4) == []
    g = torch.Generator().manual_seed(40)
    conv, x, R = cl._random_conv(g, 2, 3), torch.randn(2, 2, 5, 5, generator=g), torch.randn(2, 3, 5, 5, generator=g)
    with torch.no_grad():
        conv.bias.copy_(torch.tensor([0.3, -0.4, 0.1]))
    assert _coinciding(cl._alpha_beta_mistakes(x, conv, R, 2.0, 1.0), 1e-3, 1e-4) == []
    g = torch.Generator().manual_seed(41)
    conv, pixels = cl._random_conv(g, 3, 4), torch.rand(2, 3, 6, 6, generator=g)
    pixels[:, :, 0], pixels[:, :, -1] = 0.0, 1.0
    _, zbox = cl._zbox_case(pixels, conv, torch.rand(2, 4, 6, 6, generator=g), torch.tensor([0.485, 0.456, 0.406]),
                            torch.tensor([0.229, 0.224, 0.225]), 0.0, 1.0)
    assert _coinciding(zbox, 1e-3, 1e-4) == []
    for seed in range(3):
        report = Report("x", rng=np.random.default_rng(seed))
        model = cl.dense_network(report.seed)
        x = torch.rand(4, 10, generator=torch.Generator().manual_seed(report.seed))
        assert _coinciding(cl._conservation_mistakes(model, x, 1, 0.1), 1e-3, 1e-4) == []
        model = ca.random_classifier(report.seed)
        x, y = ca.random_batch(report)
        assert _coinciding(ca._fgsm_variants(model, x, y, 8 / 255), 1e-3, 1e-5) == []
        features = cd.random_features_net(report.seed)
        x = 0.25 + 0.5 * torch.rand(2, 3, 12, 10, generator=torch.Generator().manual_seed(report.seed))
        assert _coinciding(cd._step_variants(features, x, (3, -2), 0.02)["mistakes"], 1e-4, 1e-6) == []
        x = torch.rand(1, 3, 30, 22, generator=torch.Generator().manual_seed(report.seed), dtype=torch.float64)
        assert _coinciding(cd._octave_mistakes(cd._make_step(report), x, 3, 1.5)[1], 1e-6, 1e-8) == []
