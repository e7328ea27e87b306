"""Checks of exercise set 01_filters: correct solutions pass, each typical mistake is diagnosed,
calling coursekit's reference earns nothing, stubs raise CheckFailed."""

from __future__ import annotations

import math

import pytest

import coursekit
from coursekit import filters
from coursekit.checks import CheckFailed, check, run_check

SEEDS = [0, 1, 2]  # each check draws its own random cases from the seed


# -- correct solutions, written as a student would ---------------------------------------------


def activations_ok(model, x, layer_names):
    modules = dict(model.named_modules())
    acts, handles = {}, []

    def make_hook(name):
        def hook(module, inputs, output):
            acts[name] = output.detach()

        return hook

    try:
        for name in layer_names:
            handles.append(modules[name].register_forward_hook(make_hook(name)))
        model(x)
    finally:
        for h in handles:
            h.remove()
    return acts


def output_size_ok(size, kernel_size, stride=1, padding=0, dilation=1):
    return (size + 2 * padding - dilation * (kernel_size - 1) - 1) // stride + 1


def receptive_field_ok(layers):
    r, jump = 1, 1
    for k, s in layers:
        r += (k - 1) * jump
        jump *= s
    return r


def param_count_ok(in_channels, out_channels, kernel_size, bias=True, groups=1):
    kh, kw = (kernel_size, kernel_size) if isinstance(kernel_size, int) else kernel_size
    return out_channels * (in_channels // groups) * kh * kw + (out_channels if bias else 0)


def normalize_ok(weights):
    scale = weights.abs().amax(dim=(1, 2, 3), keepdim=True).clamp_min(1e-8)
    return weights / (2 * scale) + 0.5


CORRECT = {
    "filters.activations": activations_ok,
    "filters.output_size": output_size_ok,
    "filters.receptive_field": receptive_field_ok,
    "filters.param_count": param_count_ok,
    "filters.normalize": normalize_ok,
}
CHEATS = {
    "filters.activations": lambda model, x, names: filters.activation_maps(model, x, names),
    "filters.output_size": lambda *a: filters.conv_output_size(*a),
    "filters.receptive_field": lambda layers: filters.receptive_field_size(layers),
    "filters.param_count": lambda *a: filters.conv_param_count(*a),
    "filters.normalize": lambda w: filters.normalize_filters(w),
}


@pytest.mark.parametrize("name", sorted(CORRECT))
@pytest.mark.parametrize("seed", SEEDS)
def test_correct_solution_gets_full_points(name, seed):
    report = run_check(name, CORRECT[name], seed=seed)
    assert report.earned == report.points > 0, report.summary()
    assert not report.notes, report.notes


@pytest.mark.parametrize("name", sorted(CHEATS))
def test_calling_the_reference_earns_nothing(name):
    report = run_check(name, CHEATS[name], seed=0)
    assert report.earned == 0, report.summary()
    assert "reference this exercise asks you to write" in report.summary()


def test_using_coursekit_record_earns_nothing():
    def via_record(model, x, names):
        with coursekit.record(model, names) as rec:
            model(x)
        return dict(rec.activations)

    report = run_check("filters.activations", via_record, seed=0)
    assert report.earned == 0
    assert "record()" in report.summary()


@pytest.mark.parametrize("name", sorted(CORRECT))
def test_stub_raises_check_failed(name, capsys):
    def stub(*args):
        raise NotImplementedError()

    with pytest.raises(CheckFailed):
        check(name, stub)
    out = capsys.readouterr()
    assert "not implemented yet" in out.out
    assert out.err == ""


def test_check_prints_verdict_and_returns_points(capsys):
    points = check("filters.receptive_field", receptive_field_ok)
    out = capsys.readouterr()
    assert points == 4
    assert "filters.receptive_field: 4/4 points" in out.out
    assert out.err == ""


# -- typical mistakes ----------------------------------------------------------------------------


def _verdict(name, fn, seed=0):
    report = run_check(name, fn, seed=seed)
    return report, report.summary()


def activations_late_binding(model, x, layer_names):
    modules = dict(model.named_modules())
    acts, handles = {}, []
    try:
        for name in layer_names:
            handles.append(modules[name].register_forward_hook(lambda m, i, o: acts.__setitem__(name, o.detach())))  # noqa: B023 (the bug)
        model(x)
    finally:
        for h in handles:
            h.remove()
    return acts


def activations_inputs(model, x, layer_names):
    modules = dict(model.named_modules())
    acts, handles = {}, []
    try:
        for name in layer_names:
            handles.append(modules[name].register_forward_hook(lambda m, i, o, name=name: acts.__setitem__(name, i[0].detach())))
        model(x)
    finally:
        for h in handles:
            h.remove()
    return acts


def activations_not_detached(model, x, layer_names):
    modules = dict(model.named_modules())
    acts, handles = {}, []
    try:
        for name in layer_names:
            handles.append(modules[name].register_forward_hook(lambda m, i, o, name=name: acts.__setitem__(name, o)))
        model(x)
    finally:
        for h in handles:
            h.remove()
    return acts


def activations_hooks_kept(model, x, layer_names):
    modules = dict(model.named_modules())
    acts = {}
    for name in layer_names:
        modules[name].register_forward_hook(lambda m, i, o, name=name: acts.__setitem__(name, o.detach()))
    model(x)
    return acts


def activations_no_finally(model, x, layer_names):
    modules = dict(model.named_modules())
    acts, handles = {}, []
    for name in layer_names:
        handles.append(modules[name].register_forward_hook(lambda m, i, o, name=name: acts.__setitem__(name, o.detach())))
    model(x)
    for h in handles:
        h.remove()
    return acts


@pytest.mark.parametrize("seed", SEEDS)
def test_activation_mistakes(seed):
    report, text = _verdict("filters.activations", activations_late_binding, seed)
    assert report.parts[0].earned == 0 and "late binding" in text, text

    report, text = _verdict("filters.activations", activations_inputs, seed)
    assert report.parts[0].earned == 0 and "the input of layer" in text, text

    report, text = _verdict("filters.activations", activations_not_detached, seed)
    assert [p.earned for p in report.parts] == [2, 0, 1, 1], text
    assert ".detach()" in text

    report, text = _verdict("filters.activations", activations_hooks_kept, seed)
    assert [p.earned for p in report.parts] == [2, 1, 0, 0], text
    assert "handle.remove()" in text

    report, text = _verdict("filters.activations", activations_no_finally, seed)
    assert [p.earned for p in report.parts] == [2, 1, 1, 0], text
    assert "finally" in text


def test_activation_check_leaves_no_hooks_on_shared_modules():
    # the checker builds its own network; a leaking student must not leak into later checks
    run_check("filters.activations", activations_hooks_kept, seed=0)
    report = run_check("filters.activations", activations_ok, seed=0)
    assert report.earned == report.points


OUTPUT_MISTAKES = {
    "forgot the + 1": lambda n, k, s=1, p=0, d=1: (n + 2 * p - d * (k - 1) - 1) // s,
    "use 2 * padding": lambda n, k, s=1, p=0, d=1: (n + p - d * (k - 1) - 1) // s + 1,
    "not ceil": lambda n, k, s=1, p=0, d=1: math.ceil((n + 2 * p - d * (k - 1) - 1) / s) + 1,
    "ignored the padding": lambda n, k, s=1, p=0, d=1: (n - d * (k - 1) - 1) // s + 1,
    "ignored the dilation": lambda n, k, s=1, p=0, d=1: (n + 2 * p - (k - 1) - 1) // s + 1,
}


@pytest.mark.parametrize("diagnosis", sorted(OUTPUT_MISTAKES))
@pytest.mark.parametrize("seed", SEEDS)
def test_output_size_mistakes(diagnosis, seed):
    report, text = _verdict("filters.output_size", OUTPUT_MISTAKES[diagnosis], seed)
    assert 0 <= report.earned < report.points
    assert diagnosis in text, text


def test_output_size_float_is_explained():
    report, text = _verdict("filters.output_size", lambda n, k, s=1, p=0, d=1: (n + 2 * p - d * (k - 1) - 1) / s + 1)
    assert report.earned < report.points
    assert "return an int" in text


def _rf_no_jump(layers):
    return 1 + sum(k - 1 for k, _ in layers)


def _rf_from_zero(layers):
    return receptive_field_ok(layers) - 1


def _rf_jump_first(layers):
    r, jump = 1, 1
    for k, s in layers:
        jump *= s
        r += (k - 1) * jump
    return r


def _rf_plus_k(layers):
    r, jump = 1, 1
    for k, s in layers:
        r += k * jump
        jump *= s
    return r


@pytest.mark.parametrize(
    "fn, diagnosis, earned",
    [
        (_rf_no_jump, "strides are not accumulated", 2),  # single layers and stride-1 stacks still pass
        (_rf_from_zero, "start from r = 1", 0),
        (_rf_jump_first, "updated before it was used", 1),  # stride-1 stacks still pass,
        (_rf_plus_k, "adds k - 1 pixels", 0),
    ],
)
@pytest.mark.parametrize("seed", SEEDS)
def test_receptive_field_mistakes(fn, diagnosis, earned, seed):
    report, text = _verdict("filters.receptive_field", fn, seed)
    assert report.earned == earned, text
    assert diagnosis in text, text


@pytest.mark.parametrize(
    "fn, diagnosis",
    [
        (lambda ci, co, k, bias=True, groups=1: param_count_ok(ci, co, k, False, groups), "forgot the biases"),
        (lambda ci, co, k, bias=True, groups=1: param_count_ok(ci, co, k, True, groups), "with bias=False there are no biases"),
        (lambda ci, co, k, bias=True, groups=1: param_count_ok(ci, co, k, False, groups) + (ci if bias else 0), "not one per input channel"),
        (lambda ci, co, k, bias=True, groups=1: param_count_ok(ci, co, k, bias, 1), "with groups"),
    ],
)
@pytest.mark.parametrize("seed", SEEDS)
def test_param_count_mistakes(fn, diagnosis, seed):
    report, text = _verdict("filters.param_count", fn, seed)
    assert 0 < report.earned < report.points, text
    assert diagnosis in text, text


NORMALIZE_MISTAKES = {
    "from its min to its max": lambda w: (w - w.amin(dim=(1, 2, 3), keepdim=True))
    / (w.amax(dim=(1, 2, 3), keepdim=True) - w.amin(dim=(1, 2, 3), keepdim=True)),
    "one scale for the whole bank": lambda w: w / (2 * w.abs().max()) + 0.5,
    "not the largest absolute weight": lambda w: w / (2 * w.amax(dim=(1, 2, 3), keepdim=True)) + 0.5,
    "each input channel separately": lambda w: w / (2 * w.abs().amax(dim=(2, 3), keepdim=True)) + 0.5,
}


@pytest.mark.parametrize("diagnosis", sorted(NORMALIZE_MISTAKES))
@pytest.mark.parametrize("seed", SEEDS)
def test_normalize_mistakes(diagnosis, seed):
    report, text = _verdict("filters.normalize", NORMALIZE_MISTAKES[diagnosis], seed)
    assert report.parts[1].earned == 0, text
    assert diagnosis in text, text


def test_normalize_zero_filter_nan_is_diagnosed():
    report, text = _verdict("filters.normalize", lambda w: w / (2 * w.abs().amax(dim=(1, 2, 3), keepdim=True)) + 0.5)
    assert [p.earned for p in report.parts] == [1, 2, 0], text
    assert "clamp" in text


def test_normalize_without_shift():
    report, text = _verdict("filters.normalize", lambda w: w / w.abs().amax(dim=(1, 2, 3), keepdim=True).clamp_min(1e-8))
    assert report.parts[0].earned == 0 and "/ 2 + 0.5" in text, text
