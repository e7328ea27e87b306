"""Checks of exercise set ``00_warmup``: a photo in, probabilities and activations out.

Three exercises, each with partial credit:

``warmup.to_input``
    ``(H, W, 3)`` uint8 photo -> ``(1, 3, H, W)`` float32 tensor in [0, 1]. Diagnoses: channels
    last (no permute), reshape instead of permute, missing batch dimension, float64, no division
    by 255, min-max stretching, BGR order. ``coursekit.load_image`` is blocked.
``warmup.top_k``
    ``(model, x, k)`` -> ``(probs (k,), indices (k,))`` of the softmax, most probable first, in eval
    mode, with the model's mode restored. Diagnoses: logits, log-softmax, ascending order, softmax
    over the batch dimension, the first k classes, prediction in training mode, mode not restored.
    ``coursekit.predict`` is blocked. Cases: a random Fashion-MNIST test image on ``fashion_cnn``
    and a small random network with batch-norm (so hard-coded answers cannot pass).
``warmup.layer_activation``
    ``(model, x, layer_name)`` -> the detached output of that layer, recorded with a forward hook
    that is removed afterwards. Diagnoses: a neighbouring layer's output or the layer's input
    (named), the logits, not detached, hook left on the model. ``coursekit.record`` is blocked.

Every case is drawn from the report's fresh random generator. Titles of parts contain no
random values, so a full-points verdict prints the same text on every run.
"""

from __future__ import annotations

import copy
import functools

import numpy as np
import torch
from torch import nn

from .. import hooks, images, models
from ..data import fashion_mnist
from . import Mistake, Report, StudentError, exercise

__all__: list[str] = []  # checks register themselves; nothing to import from here


class _Once:
    """Call the student's function once and let every part reuse the result (or its error)."""

    def __init__(self, report: Report, student, *args):
        self.report, self.student, self.args = report, student, args
        self.done = False
        self.value = None
        self.error: StudentError | None = None

    def __call__(self):
        if not self.done:
            self.done = True
            try:
                self.value = self.report.call(self.student, *self.args)
            except StudentError as err:
                self.error = err
        if self.error is not None:
            raise self.error
        return self.value


@functools.lru_cache(maxsize=1)
def _fashion_test_images() -> torch.Tensor:
    return fashion_mnist("test")[0]  # (10000, 1, 28, 28) float in [0, 1]


def _random_fashion_images(report: Report, n: int) -> torch.Tensor:  # (n, 1, 28, 28)
    pool = _fashion_test_images()
    idx = report.rng.choice(pool.shape[0], size=n, replace=False)
    return pool[torch.as_tensor(idx)].clone()


# ----------------------------------------------------------------------------------------------
# 1. to_input


def _random_photo(report: Report) -> np.ndarray:
    """(H, W, 3) uint8 with H != W, neither 3, and values that do not span 0..255."""
    h, w = (int(v) for v in report.rng.choice(np.arange(5, 40), size=2, replace=False))
    return report.rng.integers(10, 246, size=(h, w, 3), dtype=np.uint8)


def _shape_hint(got: torch.Tensor, h: int, w: int) -> str | None:
    shape = tuple(got.shape)
    if shape == (h, w, 3):
        return "it is still (H, W, 3): move the channels first with .permute(2, 0, 1) and add a batch dimension with .unsqueeze(0)"
    if shape == (1, h, w, 3):
        return "channels are last (1, H, W, 3): PyTorch wants (N, C, H, W); use .permute(2, 0, 1) before adding the batch dimension"
    if shape == (1, 3, w, h):
        return "height and width are swapped (1, 3, W, H): use .permute(2, 0, 1), not .permute(2, 1, 0)"
    if shape == (3, h, w):
        return "the batch dimension is missing: add it with .unsqueeze(0) (or [None])"
    return None


@exercise("warmup.to_input", forbid=[images.load_image])
def _check_to_input(student, report: Report) -> None:
    photos = [_random_photo(report) for _ in range(2)]  # two sizes, so hard-coded shapes fail
    calls = [_Once(report, student, p.copy()) for p in photos]
    expected = [torch.from_numpy(p).permute(2, 0, 1)[None].float() / 255 for p in photos]  # (1,3,H,W)

    with report.part("shape (1, 3, H, W)", points=1):
        for photo, call in zip(photos, calls):
            got = call()
            h, w = photo.shape[:2]
            if isinstance(got, torch.Tensor) and (hint := _shape_hint(got, h, w)):
                raise Mistake(f"for a photo of shape {photo.shape} your result has shape {tuple(got.shape)}; {hint}")
            report.expect_tensor(got, shape=(1, 3, h, w), what=f"to_input(photo of shape {photo.shape})")

    with report.part("dtype float32", points=1):
        for call in calls:
            got = report.expect_tensor(call(), what="to_input(photo)")
            if got.dtype == torch.float64:
                raise Mistake(
                    "the result is float64: numpy (and torch) division of a uint8 array gives float64; "
                    "models want float32, so convert with .float()"
                )
            if not got.is_floating_point():
                raise Mistake(f"the result has dtype {got.dtype}: convert the integers with .float() and divide by 255")
            report.expect_tensor(got, dtype=torch.float32, what="to_input(photo)")

    with report.part("values: pixel / 255, in [0, 1]", points=2):
        for photo, call, exp in zip(photos, calls, expected):
            got = call()
            h, w = photo.shape[:2]
            raw = torch.from_numpy(photo).float()  # (H, W, 3)
            scrambled = raw.reshape(1, 3, h, w)  # reshape keeps memory order: colour planes mixed up
            lo, hi = exp.min(), exp.max()
            report.expect_close(
                got,
                exp,
                what="to_input(photo)",
                mistakes={
                    "you forgot to divide by 255: the model expects values in [0, 1], not 0..255": exp * 255,
                    "you used reshape/view instead of permute: reshape keeps the memory order, so the colour "
                    "planes get scrambled; use .permute(2, 0, 1)": scrambled / 255,
                    "you used reshape/view instead of permute (which scrambles the pixels) and forgot to divide "
                    "by 255": scrambled,
                    "you divided by 256; the largest pixel value is 255, so divide by 255": exp * 255 / 256,
                    "you stretched the photo to [0, 1] with its own minimum and maximum; divide by 255 instead, "
                    "so that every photo is on the same scale": (exp - lo) / (hi - lo),
                    "you normalised to [-1, 1] with mean 0.5 and std 0.5; the course's models normalise inside, "
                    "give them plain [0, 1] pixels": (exp - 0.5) / 0.5,
                    "the colour channels are reversed (BGR); keep the photo's RGB order": exp.flip(1),
                },
            )
        for photo, call in zip(photos, calls):
            if not np.array_equal(call.args[0], photo):
                raise Mistake("your function changed the photo it was given; leave the input unchanged")


# ----------------------------------------------------------------------------------------------
# 2. top_k


def _tiny_batchnorm_net(report: Report, n_classes: int) -> nn.Module:
    """A small random net whose eval-mode output differs from its (deterministic) train-mode output."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(report.seed)
        net = nn.Sequential(
            nn.Conv2d(3, 6, 3),  # (1, 6, 7, 7) for a 9x9 input
            nn.BatchNorm2d(6),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),  # (1, 6, 1, 1)
            nn.Flatten(),  # (1, 6)
            nn.Linear(6, n_classes),  # (1, n_classes)
        )
        bn = net[1]
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        net[-1].weight.data.mul_(4)  # spread the logits so the top-k order is clear
    return net.train()


def _modes(model: nn.Module) -> list[bool]:
    return [m.training for m in model.modules()]


def _expect_pair(got, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(got, (tuple, list)) or len(got) != 2:
        what = f"a {type(got).__name__}" + (f" of length {len(got)}" if isinstance(got, (tuple, list)) else "")
        raise Mistake(f"top_k should return two tensors, `return probs, indices`; got {what}")
    a, b = got
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and not a.is_floating_point() \
            and b.is_floating_point():
        raise Mistake("the two results are swapped: return `probs, indices` (probabilities first), as .topk does")
    return a, b


def _top_k_mistakes(logits: torch.Tensor, k: int) -> dict[str, torch.Tensor]:
    """Wrong top-k probabilities a student may return, computed from the logits (K,) of one image."""
    probs = logits.softmax(0)
    return {
        "these are logits (raw scores), not probabilities: apply .softmax(dim=1) to the model's output":
            logits.topk(k).values,
        "these are log-probabilities (log_softmax); use softmax, whose values lie in [0, 1] and sum to 1":
            logits.log_softmax(0).topk(k).values,
        "the probabilities are in ascending order: the most probable class must come first (descending)":
            probs.topk(k).values.flip(0),
        "every probability is 1: softmax ran over the batch dimension (dim=0); use dim=1 (the classes)":
            torch.ones(k),
        "these are the probabilities of the first k classes, not of the k most probable ones": probs[:k],
    }  # fmt: skip


def _check_indices(indices: torch.Tensor, probs_all: torch.Tensor, top: torch.Tensor, k: int) -> None:
    """Indices are right when they pick the expected top-k probabilities in order (robust to ties)."""
    idx = indices.detach().long().cpu()
    if idx.min() < 0 or idx.max() >= probs_all.numel():
        raise Mistake(f"your indices {idx.tolist()} are not class indices 0..{probs_all.numel() - 1}")
    picked = probs_all[idx]
    if torch.allclose(picked, top, rtol=1e-4, atol=1e-6):
        return
    if torch.allclose(picked, top.flip(0), rtol=1e-4, atol=1e-6):
        raise Mistake("your indices are in ascending order of probability: the most probable class must come first")
    if torch.equal(idx, torch.arange(k)):
        raise Mistake("your indices are 0..k-1, the first k classes: return the indices of the k largest probabilities")
    raise Mistake(f"your indices {idx.tolist()} are not the classes of the {k} largest probabilities")


def _expect_eval_mode_prediction(report: Report, student, net: nn.Module, x2: torch.Tensor, k2: int,
                                 train_logits: torch.Tensor) -> None:
    """``net`` comes in training mode: the student's answer must equal its own answer for ``net`` in eval mode.

    Judged against the student's own eval-mode answer, not the reference, so that a mistake in the
    probabilities (logits, ascending order, ...) does not fail the mode part as well (part 2 explains it).
    """
    own_probs, own_indices = _expect_pair(report.call(student, copy.deepcopy(net).eval(), x2.clone(), k2), k2)
    own_probs = report.expect_tensor(own_probs, shape=(k2,), what="probs (the network in eval mode)").detach()
    probs, indices = _expect_pair(report.call(student, net, x2.clone(), k2), k2)
    probs = report.expect_tensor(probs, shape=(k2,), what="probs (the network in training mode)").detach()
    if torch.allclose(probs.float(), own_probs.float(), rtol=1e-4, atol=1e-6) and torch.equal(
            torch.as_tensor(indices).long(), torch.as_tensor(own_indices).long()):
        return
    if torch.allclose(probs.float(), train_logits.softmax(0).topk(k2).values, rtol=1e-4, atol=1e-6):
        raise Mistake("you predicted with the model in training mode (batch-norm then uses the statistics of "
                      "this one image): call model.eval() before predicting")
    raise Mistake("for a network given in training mode your result differs from your own result for the "
                  "same network in eval mode: call model.eval() before predicting")


@exercise("warmup.top_k", forbid=[models.predict])
def _check_top_k(student, report: Report) -> None:
    # case 1: the course's Fashion-MNIST network on a random test image
    model = models.load_model("fashion_cnn")
    x = _random_fashion_images(report, 1)  # (1, 1, 28, 28)
    k = int(report.rng.integers(3, 7))
    with torch.no_grad():
        logits = model(x)[0]  # (10,)
    probs_all = logits.softmax(0)
    top_p = probs_all.topk(k).values
    first = _Once(report, student, model, x.clone(), k)
    eval_modes = _modes(model)
    try:
        first()
    except StudentError:
        pass  # reported by each part below
    left_in_train = _modes(model) != eval_modes
    model.train(False)  # the course's model is shared by the checks: put it back in eval mode

    with report.part("returns (probs, indices), each of shape (k,)", points=1):
        probs, indices = _expect_pair(first(), k)
        report.expect_tensor(probs, shape=(k,), what=f"probs (k={k})")
        report.expect_tensor(indices, shape=(k,), what=f"indices (k={k})")
        if indices.is_floating_point() or indices.dtype == torch.bool:
            raise Mistake(f"indices have dtype {indices.dtype}; class indices are integers (torch.long, as .topk returns)")

    with report.part("softmax probabilities, most probable first", points=2):
        probs, indices = _expect_pair(first(), k)
        report.expect_close(
            probs,
            top_p,
            rtol=1e-4,
            atol=1e-6,
            what="probs",
            mistakes=_top_k_mistakes(logits, k),
        )
        _check_indices(indices, probs_all, top_p, k)

    # case 2: a small random network with batch-norm, handed over in training mode
    with report.part("any model: predicts in eval mode, leaves the model's mode as it was", points=1):
        n_classes, k2 = int(report.rng.integers(6, 15)), int(report.rng.integers(2, 5))
        net = _tiny_batchnorm_net(report, n_classes)
        x2 = torch.from_numpy(report.rng.random((1, 3, 9, 9), dtype=np.float32))
        with torch.no_grad():
            train_logits = copy.deepcopy(net).train()(x2)[0]  # what a prediction in training mode gives
        before = _modes(net)
        _expect_eval_mode_prediction(report, student, net, x2, k2, train_logits)
        if left_in_train:
            raise Mistake(
                "the course's model was given in eval mode and your function left it in training mode (an "
                "unconditional model.train() at the end?): remember `was_training = model.training` and call "
                "`model.train(was_training)` at the end"
            )
        if _modes(net) != before:
            raise Mistake(
                "your function left the model in eval mode, but it was given in training mode: remember "
                "`was_training = model.training` and call `model.train(was_training)` at the end (in a finally: block)"
            )


# ----------------------------------------------------------------------------------------------
# 3. layer_activation


def _all_outputs(model: nn.Module, x: torch.Tensor) -> tuple[dict, dict]:
    """Output and first input of every named module, from one forward pass without gradients."""
    outputs, inputs, handles = {}, {}, []

    def hook_for(name):
        def hook(module, args, output):
            if isinstance(output, torch.Tensor):
                outputs[name] = output.detach().clone()
            if args and isinstance(args[0], torch.Tensor):
                inputs[name] = args[0].detach().clone()

        return hook

    try:
        for name, module in model.named_modules():
            handles.append(module.register_forward_hook(hook_for(name)))
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return outputs, inputs


def _hook_ids(model: nn.Module) -> dict[str, set]:
    return {
        name: set(m._forward_hooks) | {("pre", i) for i in m._forward_pre_hooks}
        for name, m in model.named_modules()
    }


def _remove_new_hooks(model: nn.Module, before: dict[str, set]) -> list[str]:
    """Remove hooks that were not there before; return the names of the modules that had them."""
    leaked = []
    for name, m in model.named_modules():
        old = before.get(name, set())
        new = [i for i in m._forward_hooks if i not in old]
        new_pre = [i for i in m._forward_pre_hooks if ("pre", i) not in old]
        for i in new:
            del m._forward_hooks[i]
        for i in new_pre:
            del m._forward_pre_hooks[i]
        if new or new_pre:
            leaked.append(name or "the model itself")
    return leaked


_LAYER_CANDIDATES = (
    "net.features.0", "net.features.1", "net.features.2", "net.features.3", "net.features.4",
    "net.features.5", "net.features.6", "net.features.7", "net.features.8", "net.features.9",
    "net.classifier.1", "net.classifier.2",
)  # fmt: skip


def _describe(model: nn.Module, name: str) -> str:
    return f"'{name}' ({type(model.get_submodule(name)).__name__})" if name else "the whole model"


def _layer_mistakes(model, layer: str, outputs: dict, inputs: dict) -> dict[str, torch.Tensor]:
    mistakes = {}
    if layer in inputs:
        mistakes[
            f"this is the input of {_describe(model, layer)}, not its output: a forward hook is called as "
            "hook(module, inputs, output); keep `output`"
        ] = inputs[layer]
    mistakes["this is the model's final output (the logits), not the layer's output"] = outputs[""]
    leaves = {name for name, m in model.named_modules() if not list(m.children())}
    for name, out in outputs.items():
        if name == layer or name not in leaves:
            continue
        mistakes[f"this is the output of layer {_describe(model, name)}, not of '{layer}'"] = out
    return mistakes


def _expect_activation(report: Report, got, expected: torch.Tensor, mistakes: dict, what: str) -> None:
    """expect_close, but a result of another shape is also matched against the known mistakes."""
    if isinstance(got, torch.Tensor) and tuple(got.shape) != tuple(expected.shape):
        g = got.detach().cpu().float()
        if tuple(g.shape) == tuple(expected.shape[1:]) and torch.allclose(g, expected[0], rtol=1e-3, atol=1e-4):
            raise Mistake(f"{what} is the activation of the first image only: keep the batch dimension (N, ...)")
        for explanation, wrong in mistakes.items():
            if wrong.shape == g.shape and torch.allclose(g, wrong, rtol=1e-3, atol=1e-4):
                raise Mistake(f"{what} matches a known mistake: {explanation}")
    report.expect_close(got, expected, what=what, mistakes=mistakes)


def _exposing_layer(report: Report, model, outputs: dict, inputs: dict) -> str:
    """A random layer whose output differs from every mistake diagnosed for it (its input, a neighbour's
    output, the logits): a layer that passes its input through unchanged (dropout in eval mode,
    flatten) would let "return the input" pass by luck."""
    for name in report.rng.permutation(list(_LAYER_CANDIDATES)):
        name = str(name)
        wrong = _layer_mistakes(model, name, outputs, inputs).values()
        if all(w.shape != outputs[name].shape or not torch.allclose(w, outputs[name], rtol=1e-3, atol=1e-4)
               for w in wrong):
            return name
    raise RuntimeError("no layer of the model tells its output from the mistakes")  # a bug of the check


@exercise("warmup.layer_activation", forbid=[hooks.record])
def _check_layer_activation(student, report: Report) -> None:
    model = models.load_model("fashion_cnn")
    x = _random_fashion_images(report, 2)  # (2, 1, 28, 28): a batch, so dropping it shows
    outputs, inputs = _all_outputs(model, x)
    layer = _exposing_layer(report, model, outputs, inputs)
    before = _hook_ids(model)
    first = _Once(report, student, model, x.clone(), layer)
    try:
        first()
    except StudentError:
        pass  # reported by each part below
    leaked = _remove_new_hooks(model, before)

    with report.part("the output of the named layer", points=2):
        _expect_activation(
            report, first(), outputs[layer], _layer_mistakes(model, layer, outputs, inputs), f"the activation of '{layer}'"
        )

    with report.part("detached from the autograd graph", points=1):
        x2 = _random_fashion_images(report, 1).requires_grad_(True)  # so that the layer's output has a graph
        out2, in2 = _all_outputs(model, x2)
        layer2 = _exposing_layer(report, model, out2, in2)
        before2 = _hook_ids(model)
        try:
            got = report.call(student, model, x2, layer2)
        finally:
            leaked += _remove_new_hooks(model, before2)
        _expect_activation(
            report,
            got,
            out2[layer2],
            _layer_mistakes(model, layer2, out2, in2),
            f"the activation of '{layer2}' for an input that requires grad",
        )
        report.expect_tensor(got, detached=True, what=f"the activation of '{layer2}'")

    with report.part("the hook is removed afterwards", points=1):
        first()  # a function that raised has not shown that it cleans up
        if leaked:
            where = ", ".join(dict.fromkeys(leaked))
            raise Mistake(
                f"a hook was still registered on {where} after your function returned: keep the handle that "
                "register_forward_hook returns and call handle.remove() (in a finally: block, so that it also "
                "goes when the forward pass fails)"
            )
