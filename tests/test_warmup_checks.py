"""Checks of exercise set 00_warmup: right answers pass, typical mistakes are named, cheats earn nothing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import coursekit
from coursekit import hooks
from coursekit.checks import CheckFailed, check, run_check

# ---------------------------------------------------------------------------------------------
# reference-equivalent solutions (written independently of the solution notebook)


def to_input(image):
    return torch.from_numpy(image).permute(2, 0, 1).unsqueeze(0).float() / 255


def top_k(model, x, k):
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            probs = model(x).softmax(dim=1)[0]
    finally:
        model.train(was_training)
    values, indices = probs.topk(k)
    return values, indices


def top_k_argsort(model, x, k):
    """Another correct solution: no no_grad (allowed), argsort instead of topk, preserved() for the mode."""
    with coursekit.preserved(model):
        model.eval()
        probs = model(x).softmax(dim=-1)[0]
    order = probs.argsort(descending=True)[:k]
    return probs[order], order


def layer_activation(model, x, layer_name):
    layer = dict(model.named_modules())[layer_name]
    seen = {}
    handle = layer.register_forward_hook(lambda module, inputs, output: seen.update(out=output.detach()))
    try:
        model(x)
    finally:
        handle.remove()
    return seen["out"]


def _leaves(model):
    return [n for n, m in model.named_modules() if not list(m.children())]


def _hook_output_of(model, x, name, take=lambda inputs, output: output.detach()):
    seen = {}
    handle = model.get_submodule(name).register_forward_hook(lambda m, i, o: seen.update(out=take(i, o)))
    try:
        model(x)
    finally:
        handle.remove()
    return seen["out"]


# ---------------------------------------------------------------------------------------------
# right answers


@pytest.mark.parametrize(
    "name, fn",
    [
        ("warmup.to_input", to_input),
        ("warmup.top_k", top_k),
        ("warmup.top_k", top_k_argsort),
        ("warmup.layer_activation", layer_activation),
    ],
)
def test_right_answers_get_full_points(name, fn):
    report = run_check(name, fn)
    assert report.earned == report.points == 4, report.summary()
    assert not report.notes


def test_full_points_verdict_is_the_same_on_every_run(capsys):
    outputs = []
    for _ in range(2):  # fresh random cases each time
        assert check("warmup.layer_activation", layer_activation) == 4.0
        assert check("warmup.to_input", to_input) == 4.0
        outputs.append(capsys.readouterr())
    assert outputs[0].out == outputs[1].out
    assert outputs[0].err == outputs[1].err == ""


# ---------------------------------------------------------------------------------------------
# typical mistakes: a diagnosis, and fewer points

TO_INPUT_MISTAKES = [
    (lambda im: torch.from_numpy(im / 255).permute(2, 0, 1)[None], 3, "float64"),
    (lambda im: torch.from_numpy(im).permute(2, 0, 1)[None], 1, "integers"),
    (lambda im: torch.from_numpy(im).float()[None] / 255, 1, "channels are last"),
    (lambda im: torch.from_numpy(im).float() / 255, 1, "still (H, W, 3)"),
    (lambda im: torch.from_numpy(im).permute(2, 1, 0)[None].float() / 255, 1, "height and width are swapped"),
    (lambda im: torch.from_numpy(im).permute(2, 0, 1).float() / 255, 1, "batch dimension is missing"),
    (lambda im: torch.from_numpy(im).permute(2, 0, 1)[None].float(), 2, "forgot to divide by 255"),
    (lambda im: torch.from_numpy(im).reshape(1, 3, *im.shape[:2]).float() / 255, 2, "instead of permute"),
    (lambda im: (t := to_input(im), (t - t.min()) / (t.max() - t.min()))[1], 2, "minimum and maximum"),
    (lambda im: (to_input(im) - 0.5) / 0.5, 2, "mean 0.5 and std 0.5"),
    (lambda im: to_input(im[:, :, ::-1].copy()), 2, "BGR"),
    (lambda im: (to_input(im), im.fill(0))[0], 2, "changed the photo"),
    (lambda im: coursekit.load_image(im), 0, "load_image"),
]


@pytest.mark.parametrize("fn, points, diagnosis", TO_INPUT_MISTAKES)
def test_to_input_mistakes(fn, points, diagnosis):
    report = run_check("warmup.to_input", fn)
    assert report.earned == points, report.summary()
    assert diagnosis in report.summary()


def _logits(model, x):
    model.eval()
    return model(x)[0]


def _eval_restored(model, x, fn):
    with coursekit.preserved(model), torch.no_grad():
        model.eval()
        return fn(model(x)[0])


# a mistake in the probabilities costs part 2 only: the train-mode part compares with the student's own
# eval-mode answer (issue 18)
TOP_K_MISTAKES = [
    (lambda m, x, k: _eval_restored(m, x, lambda z: z.topk(k)), 2, "logits (raw scores)"),
    (lambda m, x, k: _eval_restored(m, x, lambda z: z.log_softmax(0).topk(k)), 2, "log-probabilities"),
    (lambda m, x, k: _eval_restored(m, x, lambda z: (z.softmax(0).sort().values[-k:], z.argsort()[-k:])), 2,
     "ascending order"),
    (lambda m, x, k: _eval_restored(m, x, lambda z: (z.softmax(0)[:k], torch.arange(k))), 2, "first k classes"),
    (lambda m, x, k: (p := top_k(m, x, k), (p[0], p[1].float()))[1], 3, "indices have dtype"),
    (lambda m, x, k: top_k(m, x, k)[0], 0, "should return two tensors"),
    (lambda m, x, k: tuple(t[None] for t in top_k(m, x, k)), 0, "extra batch dimension"),
    (lambda m, x, k: m(x).softmax(dim=1)[0].topk(k), 3, "training mode"),
    (lambda m, x, k: _logits(m, x).softmax(0).topk(k), 3, "left the model in eval mode"),
    (lambda m, x, k: coursekit.predict(m, x, k), 0, "predict"),
]  # fmt: skip


@pytest.mark.parametrize("fn, points, diagnosis", TOP_K_MISTAKES)
def test_top_k_mistakes(fn, points, diagnosis):
    report = run_check("warmup.top_k", fn)
    assert report.earned == points, report.summary()
    assert diagnosis in report.summary()


def test_top_k_names_every_mistake_a_case_cannot_tell_apart():
    # seed 17 draws an image the network gives class k-1 with p ~ 1: the first k probabilities then equal the
    # top k in ascending order, so both mistakes fit; the diagnosis names both (it once named only the first,
    # failing the first-k test 10 times in 400 seeds)
    first_k = TOP_K_MISTAKES[3][0]
    report = run_check("warmup.top_k", first_k, seed=17)
    assert report.earned == 2, report.summary()
    assert "first k classes" in report.summary() and "ascending order" in report.summary(), report.summary()


def test_top_k_softmax_over_the_batch_dimension():
    def dim0(m, x, k):
        with coursekit.preserved(m), torch.no_grad():
            m.eval()
            probs = m(x).softmax(dim=0)[0]
        return probs.topk(k)  # all ones: the order of the indices is arbitrary

    summary = run_check("warmup.top_k", dim0).summary()
    assert "softmax ran over the batch dimension (dim=0)" in summary


def _leaky(model, x, name):
    seen = {}
    model.get_submodule(name).register_forward_hook(lambda m, i, o: seen.update(out=o.detach()))
    model(x)
    return seen["out"]


def _neighbour(model, x, name, step):
    leaves = [n for n in _leaves(model) if not isinstance(model.get_submodule(n), torch.nn.Dropout)]
    return _hook_output_of(model, x, leaves[leaves.index(name) + step])


def _record(model, x, name):
    with coursekit.record(model, name) as rec:
        model(x)
    return rec.activations[name]


def _record_from_hooks_module(model, x, name):
    with hooks.record(model, [name]) as rec:
        model(x)
    return rec.activations[name]


LAYER_MISTAKES = [
    (_leaky, 3, "still registered on net."),
    (lambda m, x, n: _hook_output_of(m, x, n, take=lambda i, o: o), 3, "still attached to the autograd graph"),
    (lambda m, x, n: _hook_output_of(m, x, n, take=lambda i, o: i[0].detach()), 1, "this is the input of 'net."),
    (lambda m, x, n: _neighbour(m, x, n, +1), 1, "this is the output of layer 'net."),
    (lambda m, x, n: layer_activation(m, x, n)[0], 1, "first image only"),
    (lambda m, x, n: m(x).detach(), 1, "final output (the logits)"),
    (_record, 0, "record()"),
    (_record_from_hooks_module, 0, "record()"),
]


@pytest.mark.parametrize("fn, points, diagnosis", LAYER_MISTAKES)
def test_layer_activation_mistakes(fn, points, diagnosis):
    report = run_check("warmup.layer_activation", fn)
    assert report.earned == points, report.summary()
    assert diagnosis in report.summary()


def test_the_previous_layer_is_named_as_the_input():
    report = run_check("warmup.layer_activation", lambda m, x, n: _neighbour(m, x, n, -1) if n != "net.features.0" else
                       _hook_output_of(m, x, n, take=lambda i, o: i[0].detach()))
    assert report.earned == 1 and "this is the input of 'net." in report.parts[0].message


def test_record_works_again_after_the_check():
    run_check("warmup.layer_activation", _record)
    model = coursekit.load_model("fashion_cnn")
    with coursekit.record(model, "features.1") as rec:
        model(torch.rand(1, 1, 28, 28))
    assert rec.activations["features.1"].shape == (1, 32, 28, 28)


# ---------------------------------------------------------------------------------------------
# stubs and hard-coded answers


@pytest.mark.parametrize("name", ["warmup.to_input", "warmup.top_k", "warmup.layer_activation"])
def test_not_implemented_stub_fails_cleanly(name, capsys):
    def stub(*args):
        raise NotImplementedError()

    with pytest.raises(CheckFailed, match="0/4 points"):
        check(name, stub)
    out, err = capsys.readouterr()
    assert "not implemented yet" in out and err == ""


def test_answers_remembered_from_one_case_fail_on_another():
    """Cases are fresh: replaying the outputs of a seeded run does not pass a run with another seed."""
    recorded = {"to_input": [], "top_k": [], "layer_activation": []}

    def recording(fn, store):
        def wrapper(*args):
            out = fn(*args)
            store.append(out)
            return out

        return wrapper

    def replaying(store):
        it = iter(list(store))
        return lambda *args: next(it)

    for name, fn in [("to_input", to_input), ("top_k", top_k), ("layer_activation", layer_activation)]:
        assert run_check(f"warmup.{name}", recording(fn, recorded[name]), seed=1).earned == 4
        replay = run_check(f"warmup.{name}", replaying(recorded[name]), seed=2)
        assert replay.earned < 4, replay.summary()


def test_checks_do_not_touch_the_global_random_state():
    torch.manual_seed(123)
    a = torch.rand(3)
    torch.manual_seed(123)
    run_check("warmup.top_k", top_k)
    assert torch.equal(torch.rand(3), a)


def test_sizes_of_to_input_cases_vary():
    shapes = set()
    for seed in range(4):
        run_check("warmup.to_input", lambda im: (shapes.add(im.shape), to_input(im))[1], seed=seed)
    assert len(shapes) >= 4 and all(s[2] == 3 and s[0] != s[1] for s in shapes)
    assert np.all([3 not in s[:2] for s in shapes])


def _top_k_with(probs_of, keep_mode=False):
    """A top_k with a mistake in the probabilities (and, optionally, predicting in training mode)."""
    def top_k(model, x, k):
        was = model.training
        if not keep_mode:
            model.eval()
        with torch.no_grad():
            logits = model(x)[0]
        model.train(was)
        top = logits.topk(k)
        return probs_of(logits)[top.indices], top.indices
    return top_k


@pytest.mark.parametrize("probs_of", [lambda z: z, lambda z: z.log_softmax(0)], ids=["logits", "log-probabilities"])
def test_a_wrong_probability_does_not_also_fail_the_train_mode_part(probs_of):
    for seed in (0, 1, 2):
        r = run_check("warmup.top_k", _top_k_with(probs_of), seed=seed)
        assert r.parts[1].earned == 0 and r.parts[-1].earned == r.parts[-1].points, r.summary()


def test_predicting_in_training_mode_still_fails_the_train_mode_part():
    for seed in (0, 1, 2):
        r = run_check("warmup.top_k", _top_k_with(lambda z: z.softmax(0), keep_mode=True), seed=seed)
        assert r.parts[-1].earned == 0 and "training mode" in r.parts[-1].message, r.summary()
        assert r.parts[1].earned == r.parts[1].points, r.summary()
