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
