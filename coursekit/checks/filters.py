"""Checks of exercise set ``01_filters``: hooks, output sizes, receptive fields, parameters, filters.

Five exercises, each with partial credit, on cases drawn fresh on every call:

``filters.activations``
    ``(model, x, layer_names)`` -> ``{name: detached output}`` for several layers, read with forward
    hooks that are removed afterwards, also when the forward pass fails (``try``/``finally``).
    Diagnoses: layer inputs instead of outputs, the late-binding closure bug (every hook writes
    under the last name), not detached, hooks left on the model, hooks left after an error.
    ``coursekit.filters.activation_maps`` and ``coursekit.record`` are blocked.
``filters.output_size``
    ``conv_output_size(size, kernel_size, stride, padding, dilation)``; the expected value comes
    from running ``torch.nn.functional.conv1d``. Diagnoses: missing ``+ 1``, padding on one side
    only, rounding up, padding or dilation ignored, ``dilation * k`` instead of ``dilation * (k - 1)``.
``filters.receptive_field``
    ``receptive_field_size([(kernel, stride), ...])`` (Araujo et al. 2019). Diagnoses: strides not
    accumulated, off-by-one starts (``r = 0``, ``+ k`` instead of ``+ (k - 1)``), the jump updated
    before it is used, only the previous stride used, kernels multiplied.
``filters.param_count``
    ``conv_param_count(in_channels, out_channels, kernel_size, bias, groups)``; expected from
    ``nn.Conv2d`` itself. Diagnoses: bias forgotten or counted when ``bias=False``, one bias per
    input channel, input channels forgotten, kernel not squared, groups ignored.
``filters.normalize``
    ``normalize_filters(weights)``: per-filter symmetric scaling into [0, 1], zero -> 0.5.
    Diagnoses: min-max stretching, one scale for the whole bank, per-channel scales, max instead
    of max-abs, no shift into [0, 1], NaN for an all-zero filter.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .. import filters, hooks
from . import Mistake, Report, StudentError, exercise

__all__: list[str] = []  # checks register themselves


def _call(report: Report, student, *args):
    """The student's result, or the StudentError explaining why there is none."""
    try:
        return report.call(student, *args), None
    except StudentError as err:
        return None, err


# ----------------------------------------------------------------------------------------------
# 1. activations with forward hooks


def _random_net(report: Report) -> nn.Sequential:
    g = torch.Generator().manual_seed(report.seed)
    c0, c1, c2 = int(report.rng.integers(1, 4)), int(report.rng.integers(3, 9)), int(report.rng.integers(3, 9))
    net = nn.Sequential(
        nn.Conv2d(c0, c1, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(c2 * 4 * 4, 5),
    )  # fmt: skip
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return net.eval()


def _per_layer(net: nn.Sequential, x: torch.Tensor) -> tuple[dict, dict]:
    """Inputs and outputs of every layer, by running the children one by one (no hooks)."""
    ins, outs = {}, {}
    h = x.detach()
    with torch.no_grad():
        for name, m in net.named_children():
            ins[name] = h
            h = m(h)
            outs[name] = h
    return ins, outs


def _hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def _clear_hooks(model: nn.Module) -> None:
    for m in model.modules():  # the model is the checker's own, so it may be cleaned wholesale
        m._forward_hooks.clear()
        m._forward_pre_hooks.clear()


def _expect_close_any_shape(report: Report, got, expected: torch.Tensor, mistakes: dict, what: str) -> None:
    """Like report.expect_close, but a result of another shape is first matched against the mistakes."""
    if isinstance(got, torch.Tensor) and tuple(got.shape) != tuple(expected.shape):
        g = got.detach().float()
        for explanation, wrong in mistakes.items():
            if wrong.shape == g.shape and torch.allclose(g, wrong.float(), rtol=1e-3, atol=1e-4):
                raise Mistake(f"{what} matches a known mistake: {explanation}")
    report.expect_close(got, expected, mistakes=mistakes, what=what)


@exercise("filters.activations", forbid=[filters.activation_maps, hooks.record])
def _check_activations(student, report: Report) -> None:
    net = _random_net(report)
    c_in = net[0].in_channels
    x = torch.rand(2, c_in, 8, 8, generator=torch.Generator().manual_seed(report.seed))  # (2, C, 8, 8)
    names = sorted(report.rng.choice(["0", "1", "2", "3", "4"], size=3, replace=False).tolist(), key=int)
    ins, outs = _per_layer(net, x)
    got, err = _call(report, student, net, x.clone(), list(names))
    leaked = _hook_count(net)
    _clear_hooks(net)

    with report.part("the output of every named layer", points=2):
        if err is not None:
            raise err
        if not isinstance(got, dict):
            raise Mistake(f"return a dict {{layer name: activation}}, got {type(got).__name__}")
        if set(got) == {names[-1]} and len(names) > 1:
            raise Mistake(
                f"the dict has only the key {names[-1]!r}, the last name: your hook function looks up the loop "
                "variable when it runs, after the loop has finished (late binding). Bind the name when you "
                "create the hook, e.g. with a function make_hook(name) that returns the hook"
            )
        missing = [n for n in names if n not in got]
        if missing:
            raise Mistake(f"the dict has no entry for the layers {missing}; it has the keys {list(got)}")
        for n in names:
            wrong = {f"this is the input of layer {n} ({type(net[int(n)]).__name__}), not its output: a forward "
                     "hook is called as hook(module, inputs, output); keep `output`": ins[n]}
            wrong.update({f"this is the output of layer {o}, not of layer {n}": outs[o] for o in outs if o != n})
            _expect_close_any_shape(report, got[n], outs[n], wrong, f"the activation of layer {n}")

    with report.part("detached from the autograd graph", points=1):
        xg = x.clone().requires_grad_(True)
        got2, err2 = _call(report, student, net, xg, [names[0]])
        _clear_hooks(net)
        if err2 is not None:
            raise err2
        if not isinstance(got2, dict) or names[0] not in got2:
            raise Mistake(f"return a dict with the key {names[0]!r}")
        report.expect_tensor(got2[names[0]], detached=True, what=f"the activation of layer {names[0]}")

    with report.part("hooks removed afterwards", points=1):
        if err is not None:
            raise err
        if leaked:
            raise Mistake(
                f"{leaked} hook(s) were still registered on the model after your function returned; every later "
                "forward pass would run them. Keep the handles of register_forward_hook and call handle.remove()"
            )

    with report.part("hooks removed even when the forward pass fails", points=1):
        bad = torch.rand(1, c_in + 1, 8, 8)  # wrong number of channels: the first convolution raises
        _call(report, student, net, bad, list(names))  # an error from the model is expected
        leaked_on_error = _hook_count(net)
        _clear_hooks(net)
        if err is not None:  # an error is expected here, but only from the model: the normal call must work
            raise err
        if leaked_on_error:
            raise Mistake(
                f"when model(x) raised, {leaked_on_error} hook(s) stayed on the model: remove them in a "
                "`finally:` block (try: model(x) finally: for h in handles: h.remove())"
            )


# ----------------------------------------------------------------------------------------------
# 2. output size of a convolution


def _torch_output_size(n: int, k: int, s: int, p: int, d: int) -> int:
    return F.conv1d(torch.zeros(1, 1, n), torch.zeros(1, 1, k), stride=s, padding=p, dilation=d).shape[-1]


_OUTPUT_MISTAKES = {
    "you forgot the + 1: n + 2p - d(k-1) - 1 counts the steps between the first and last window; the number "
    "of windows is one more": lambda n, k, s, p, d: (n + 2 * p - d * (k - 1) - 1) // s,
    "padding is added on both sides: use 2 * padding": lambda n, k, s, p, d: (n + p - d * (k - 1) - 1) // s + 1,
    "the division rounds down (a last window that does not fit is dropped): use // (floor), not ceil": lambda n, k, s, p, d: math.ceil((n + 2 * p - d * (k - 1) - 1) / s) + 1,
    "you ignored the padding": lambda n, k, s, p, d: (n - d * (k - 1) - 1) // s + 1,
    "you ignored the dilation: a dilated kernel spans d * (k - 1) + 1 pixels": lambda n, k, s, p, d: (n + 2 * p - (k - 1) - 1) // s + 1,
    "a dilated kernel spans d * (k - 1) + 1 pixels, not d * k": lambda n, k, s, p, d: (n + 2 * p - d * k - 1) // s + 1,
    "you divided everything by the stride, the +1 included: the formula is floor((n + 2p - d(k-1) - 1) / s) + 1": lambda n, k, s, p, d: (n + 2 * p - d * (k - 1)) // s,
}  # fmt: skip


def _expect_ints(report: Report, student, cases: list[tuple], expected: list[int], mistakes: dict, label) -> None:
    """Compare integer answers case by case; name a mistake that explains every wrong answer."""
    got = []
    for case in cases:
        value = report.call(student, *case)
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if isinstance(value, float) and value.is_integer():
            raise Mistake(f"{label(case)} returned the float {value}; return an int (use // for floor division)")
        if isinstance(value, bool) or not isinstance(value, int):
            if hasattr(value, "__index__"):
                value = int(value)
            else:
                raise Mistake(f"{label(case)} returned {value!r} ({type(value).__name__}); return an int")
        got.append(value)
    if got == expected:
        return
    i = next(i for i, (g, e) in enumerate(zip(got, expected)) if g != e)
    matching = [explanation for explanation, wrong in mistakes.items() if got == wrong and wrong != expected]
    if len(matching) == 1:
        raise Mistake(f"{matching[0]}. (For example {label(cases[i])} returned {got[i]}, expected {expected[i]}.)")
    if matching:  # these cases cannot tell the mistakes apart: name each
        raise Mistake(f"{label(cases[i])} returned {got[i]}, expected {expected[i]}; on these cases that is one of: "
                      + " / ".join(matching))
    raise Mistake(f"{label(cases[i])} returned {got[i]}, expected {expected[i]}")


def _output_cases(report: Report, n_cases: int, strided: bool, dilated: bool) -> list[tuple]:
    cases = []
    while len(cases) < n_cases:
        k = int(report.rng.choice([1, 2, 3, 4, 5, 7]))
        s = int(report.rng.integers(2, 5)) if strided else 1
        p = int(report.rng.integers(1, 4)) if strided else 0
        d = int(report.rng.integers(2, 4)) if dilated else 1
        n = int(report.rng.integers(d * (k - 1) + 2, 64))
        if strided and (n + 2 * p - d * (k - 1) - 1) % s == 0:
            continue  # keep cases where floor and ceil differ
        cases.append((n, k, s, p, d))
    return cases


# the first case of each part; together they expose every mistake of _OUTPUT_MISTAKES (tested)
FIXED_OUTPUT_CASES = ((10, 3, 1, 0, 1), (12, 3, 3, 2, 1), (20, 3, 2, 1, 2))


@exercise("filters.output_size", forbid=[filters.conv_output_size])
def _check_output_size(student, report: Report) -> None:
    def label(case):
        n, k, s, p, d = case
        return f"conv_output_size({n}, kernel_size={k}, stride={s}, padding={p}, dilation={d})"

    for (title, strided, dilated), fixed in zip((("stride 1, no padding", False, False),
                                                 ("stride and padding", True, False),
                                                 ("dilation", True, True)), FIXED_OUTPUT_CASES):
        with report.part(title, points=1):
            cases = [fixed, *_output_cases(report, 3, strided, dilated)]  # the case that exposes each mistake first
            expected = [_torch_output_size(*c) for c in cases]
            wrong = {e: [f(*c) for c in cases] for e, f in _OUTPUT_MISTAKES.items()}
            _expect_ints(report, student, cases, expected, wrong, label)


# ----------------------------------------------------------------------------------------------
# 3. receptive field of a stack of (kernel, stride) layers


def _rf(layers, start: int = 1, add_kernel: bool = False, jump_after: bool = False, prev_stride_only: bool = False,
        accumulate: bool = True) -> int:
    r, j, prev = start, 1, 1
    for k, s in layers:
        step = (j * s if jump_after else (prev if prev_stride_only else j)) if accumulate else 1
        r += (k if add_kernel else k - 1) * step
        j *= s
        prev = s
    return r


_RF_MISTAKES = {
    "the strides are not accumulated: a layer widens the field by (k - 1) steps of the jump j, the product "
    "of the strides of all layers before it (r += (k - 1) * j; j *= s)": lambda L: _rf(L, accumulate=False),
    "off by one: a single pixel sees itself, so start from r = 1, not r = 0": lambda L: _rf(L, start=0),
    "off by one per layer: a kernel of size k adds k - 1 pixels to the field, not k": lambda L: _rf(L, add_kernel=True),
    "off by one per layer and at the start: start from r = 1 and add (k - 1) * jump per layer": lambda L: _rf(L, start=0, add_kernel=True),
    "the jump was updated before it was used: layer l's kernel steps over the jump of the layers *before* it, "
    "so do r += (k - 1) * j first, then j *= s": lambda L: _rf(L, jump_after=True),
    "only the previous layer's stride was used: the jump is the product of all earlier strides": lambda L: _rf(L, prev_stride_only=True),
    "the kernel sizes were multiplied: fields grow additively, r += (k - 1) * jump": lambda L: math.prod(k for k, _ in L),
}  # fmt: skip


def _stack(report: Report, n: int, strided: bool) -> list[tuple[int, int]]:
    while True:
        layers = [(int(report.rng.choice([1, 2, 3, 3, 5, 7])), int(report.rng.choice([1, 2, 2, 3])) if strided else 1)
                  for _ in range(n)]
        if strided and all(s == 1 for _, s in layers[:-1]):
            continue  # a stride must act on a later layer, or strides would not matter
        if any(k > 1 for k, _ in layers[1:]):
            return layers


@exercise("filters.receptive_field", forbid=[filters.receptive_field_size])
def _check_receptive_field(student, report: Report) -> None:
    def label(case):
        return f"receptive_field_size({case[0]})"

    parts = (("a single layer", 1, lambda: [(int(report.rng.choice([1, 3, 5, 7, 11])), int(report.rng.integers(1, 5)))]),
             ("stride-1 stacks", 1, lambda: _stack(report, int(report.rng.integers(2, 6)), strided=False)),
             ("stacks with strides", 2, lambda: _stack(report, int(report.rng.integers(3, 7)), strided=True)))
    for title, points, make in parts:
        with report.part(title, points=points):
            cases = [(make(),) for _ in range(4)]
            expected = [_rf(c[0]) for c in cases]
            wrong = {e: [f(c[0]) for c in cases] for e, f in _RF_MISTAKES.items()}
            _expect_ints(report, student, cases, expected, wrong, label)


# ----------------------------------------------------------------------------------------------
# 4. parameters of a convolution


def _torch_params(cin: int, cout: int, kernel, bias: bool, groups: int) -> int:
    conv = nn.Conv2d(cin, cout, kernel, bias=bias, groups=groups, device="meta")  # no memory, just shapes
    return sum(p.numel() for p in conv.parameters())


def _kk(kernel) -> int:
    return kernel * kernel if isinstance(kernel, int) else kernel[0] * kernel[1]


_PARAM_MISTAKES = {
    "you forgot the biases: one per output channel (out_channels more parameters)":
        lambda ci, co, k, b, g: co * ci // g * _kk(k),
    "with bias=False there are no biases: count only the weights":
        lambda ci, co, k, b, g: co * ci // g * _kk(k) + co,
    "there is one bias per output channel (filter), not one per input channel":
        lambda ci, co, k, b, g: co * ci // g * _kk(k) + (ci if b else 0),
    "each filter spans all in_channels: weights are out_channels * in_channels * kh * kw":
        lambda ci, co, k, b, g: co * _kk(k) + (co if b else 0),
    "the kernel has kh * kw weights per channel (k * k for a square kernel), not k":
        lambda ci, co, k, b, g: co * ci // g * k + (co if b else 0) if isinstance(k, int) else -1,
    "with groups, each filter sees only in_channels / groups channels":
        lambda ci, co, k, b, g: co * ci * _kk(k) + (co if b else 0),
}


# the first case of each part; together they expose every mistake of _PARAM_MISTAKES (tested)
FIXED_PARAM_CASES = ((3, 16, 3, True, 1), (5, 7, 3, False, 1), (4, 6, (3, 5), True, 1), (8, 16, 3, False, 4))


@exercise("filters.param_count", forbid=[filters.conv_param_count])
def _check_param_count(student, report: Report) -> None:
    def label(case):
        ci, co, k, b, g = case
        return f"conv_param_count({ci}, {co}, kernel_size={k}, bias={b}, groups={g})"

    def square(bias, i):
        return (int(report.rng.integers(2, 65)), int(report.rng.integers(2, 129)), int(report.rng.choice([2, 3, 5, 7, 11])), bias, 1)

    def rectangular(i):  # alternate bias=True / False, so both are always tested
        kh, kw = (int(v) for v in report.rng.choice([1, 2, 3, 5, 7], size=2, replace=False))
        return (int(report.rng.integers(2, 65)), int(report.rng.integers(2, 129)), (kh, kw), i % 2 == 0, 1)

    def grouped(i):
        g = int(report.rng.choice([2, 4, 8]))
        ci = g * int(report.rng.integers(1, 9))
        depthwise = bool(report.rng.integers(0, 2))
        co = ci if depthwise else g * int(report.rng.integers(1, 9))
        return (ci, co, int(report.rng.choice([3, 5])), i % 2 == 1, ci if depthwise else g)

    parts = (("with bias", lambda i: square(True, i)), ("without bias (bias=False)", lambda i: square(False, i)),
             ("rectangular kernels (kh, kw)", rectangular), ("grouped and depthwise convolutions", grouped))
    for (title, make), fixed in zip(parts, FIXED_PARAM_CASES):
        with report.part(title, points=1):
            cases = [fixed, *[make(i) for i in range(1, 4)]]  # the case that exposes each mistake first
            expected = [_torch_params(*c) for c in cases]
            wrong = {e: [f(*c) for c in cases] for e, f in _PARAM_MISTAKES.items()}
            _expect_ints(report, student, cases, expected, wrong, label)


# ----------------------------------------------------------------------------------------------
# 5. filters for display


def _random_bank(report: Report) -> torch.Tensor:
    g = torch.Generator().manual_seed(report.seed)
    k, c = int(report.rng.integers(4, 12)), 3  # RGB, so per-channel scaling differs from per-filter
    ks = int(report.rng.choice([3, 5, 7]))
    scale = torch.rand(k, 1, 1, 1, generator=g) * 3 + 0.1  # filters of very different norms
    shift = (torch.rand(k, 1, 1, 1, generator=g) - 0.5) * scale  # and not centred on zero
    return torch.randn(k, c, ks, ks, generator=g) * scale + shift  # (K, C, ks, ks)


def _normalize_mistakes(w: torch.Tensor) -> dict[str, torch.Tensor]:
    flat = w.flatten(1)
    lo, hi = flat.min(1).values.view(-1, 1, 1, 1), flat.max(1).values.view(-1, 1, 1, 1)
    per_filter = flat.abs().max(1).values.view(-1, 1, 1, 1)
    per_channel = w.abs().amax(dim=(2, 3), keepdim=True)
    return {
        "you stretched each filter from its min to its max: then zero is no longer grey, and the sign of a "
        "weight cannot be read; scale symmetrically, w / (2 max|w|) + 0.5": (w - lo) / (hi - lo),
        "you used one scale for the whole bank: each filter needs its own max|w| (filters differ in norm)":
            w / (2 * w.abs().max()) + 0.5,
        "you scaled each input channel separately: use one scale per filter, over all its channels, so that "
        "the colours of a filter keep their relative strength": w / (2 * per_channel) + 0.5,
        "you divided by the largest weight, not the largest absolute weight: use .abs() before the max":
            w / (2 * hi) + 0.5,
        "you forgot to shift and halve: w / max|w| is in [-1, 1]; map it to [0, 1] with / 2 + 0.5": w / per_filter,
        "you stretched the whole bank from its min to its max: scale each filter symmetrically":
            (w - w.min()) / (w.max() - w.min()),
    }


@exercise("filters.normalize", forbid=[filters.normalize_filters])
def _check_normalize(student, report: Report) -> None:
    w = _random_bank(report)
    expected = w / (2 * w.abs().flatten(1).max(1).values.view(-1, 1, 1, 1)) + 0.5
    got, err = _call(report, student, w.clone())

    with report.part("shape (K, C, kh, kw), values in [0, 1]", points=1):
        if err is not None:
            raise err
        got = report.expect_tensor(got, shape=w.shape, what="normalize_filters(weights)")
        if torch.isnan(got).any():
            raise Mistake("the result contains NaN")
        if got.min() < -1e-6 or got.max() > 1 + 1e-6:
            raise Mistake(f"values must be in [0, 1] for display, got [{float(got.min()):.3g}, {float(got.max()):.3g}]"
                          + (": map w / max|w| from [-1, 1] to [0, 1] with / 2 + 0.5" if got.min() < -0.5 else ""))

    with report.part("each filter scaled symmetrically: zero -> 0.5", points=2):
        if err is not None:
            raise err
        report.expect_close(got, expected, mistakes=_normalize_mistakes(w), what="normalize_filters(weights)")

    with report.part("an all-zero filter stays grey (0.5), no NaN", points=1):
        wz = _random_bank(report)
        wz[int(report.rng.integers(0, wz.shape[0]))] = 0
        gz, errz = _call(report, student, wz.clone())
        if errz is not None:
            raise errz
        gz = report.expect_tensor(gz, shape=wz.shape, what="normalize_filters(weights with a zero filter)")
        if torch.isnan(gz).any():
            raise Mistake("an all-zero filter gives NaN (0 / 0): clamp the scale, e.g. .clamp_min(1e-12), before dividing")
        scale = wz.abs().flatten(1).max(1).values.clamp_min(1e-12).view(-1, 1, 1, 1)
        report.expect_close(gz, wz / (2 * scale) + 0.5, what="normalize_filters(weights with a zero filter)")
