"""Checks of exercise set ``00b_training`` (lecture 0b: train, overfit, transfer).

Five exercises, each with partial credit, on cases drawn fresh on every call:

``training.split``
    ``split_indices(n, n_val, n_test, seed)`` -> ``(train, val, test)`` index tensors. Diagnoses:
    test indices leaking into validation (or either into training), sizes, indices out of range,
    no shuffle (dataset files are often sorted, by class or by date),
    a split that ignores its seed.
``training.train_step``
    ``train_step(model, optimizer, x, y)`` -> the batch's loss as a float, after one update.
    Diagnoses: ``model.train()`` forgotten (BatchNorm used its running statistics, which did not
    move), ``optimizer.zero_grad()`` forgotten (a stale gradient was added), ``optimizer.step()``
    forgotten or called before ``backward()``, the loss on softmax probabilities, the loss
    returned as a tensor or measured after the step.
``training.evaluate``
    ``evaluate(model, x, y)`` -> ``(mean loss, accuracy)`` in eval mode. Diagnoses: evaluation in
    train mode (batch statistics; the running statistics overwritten), the mode not put back,
    gradients written, a summed loss, the accuracy as a count.
``training.early_stopping``
    ``early_stopping(val_losses, patience)`` -> ``(best_epoch, stop_epoch)``, 1-based. Diagnoses:
    the last epoch instead of the best (no restore), 0-based epochs, a tie counted as an
    improvement, patience off by one, a counter never reset, comparing with the previous epoch
    instead of the best.
``training.train_head``
    ``train_head(model, x, y, make_optimizer, steps)`` -> the list of losses: train the head of a model with a frozen
    backbone. Diagnoses: BatchNorm statistics still updating in the "frozen" backbone (train mode),
    the optimiser holding the backbone's (frozen) parameters, the backbone not frozen
    (``requires_grad``) or its weights moved, the head not trained like the reference.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from .. import fit
from . import Mistake, Report, exercise

__all__: list[str] = []  # checks register themselves


def _as_index(value, what: str) -> torch.Tensor:
    if isinstance(value, (list, tuple)):
        value = torch.as_tensor(list(value))
    if not isinstance(value, torch.Tensor):
        raise Mistake(f"{what} should be a tensor (or list) of integer indices, got {type(value).__name__}")
    if value.is_floating_point() or value.dim() != 1:
        raise Mistake(f"{what} should be a 1-D tensor of integer indices, got dtype {value.dtype}, shape {tuple(value.shape)}")
    return value.long()


# ----------------------------------------------------------------------------------------------
# 1. a split with no leak


def _split_parts(report, student, n, n_val, n_test, seed):
    got = report.call(student, n, n_val, n_test, seed)
    if not isinstance(got, (tuple, list)) or len(got) != 3:
        raise Mistake(f"return three index tensors (train, val, test), got {type(got).__name__}")
    return [_as_index(g, name) for g, name in zip(got, ("train", "val", "test"))]


@exercise("training.split")
def check_split(student, report: Report) -> None:
    # small cases: two independent draws for val and test overlap with probability > 99 % each
    cases = [(30, 10, 10), (40, 8, 12), (25, 5, 10)]
    cases.append((int(report.rng.integers(50, 200)), int(report.rng.integers(5, 20)), int(report.rng.integers(5, 20))))
    seeds = [report.seed for _ in cases]
    with report.part("three parts of sizes n - n_val - n_test, n_val, n_test", points=1):
        for (n, n_val, n_test), seed in zip(cases, seeds):
            sizes = [len(p) for p in _split_parts(report, student, n, n_val, n_test, seed)]
            if sizes != [n - n_val - n_test, n_val, n_test]:
                raise Mistake(f"for n={n}, n_val={n_val}, n_test={n_test} the parts have sizes {sizes}, expected "
                              f"{[n - n_val - n_test, n_val, n_test]} (train, val, test)")
    with report.part("no index in two parts; every index 0..n-1 in one", points=2):
        for (n, n_val, n_test), seed in zip(cases, seeds):
            train, val, test = (set(p.tolist()) for p in _split_parts(report, student, n, n_val, n_test, seed))
            for a, b, name_a, name_b in ((test, val, "test", "validation"), (test, train, "test", "training"),
                                         (val, train, "validation", "training")):
                if a & b:
                    raise Mistake(f"{len(a & b)} {name_a} indices are also in the {name_b} set (n={n}): data leak. "
                                  f"Draw ONE permutation and cut it into three slices; independent draws overlap")
            if not (train | val | test) <= set(range(n)):
                raise Mistake(f"indices outside 0..{n - 1}: {sorted((train | val | test) - set(range(n)))[:5]}")
            if len(train | val | test) != n:
                raise Mistake(f"{n - len(train | val | test)} of the {n} indices are in no part")
    with report.part("shuffled, and the same seed gives the same split", points=1):
        n, n_val, n_test = 60, 10, 20
        seed = report.seed
        first = _split_parts(report, student, n, n_val, n_test, seed)
        again = _split_parts(report, student, n, n_val, n_test, seed)
        if any(not torch.equal(a, b) for a, b in zip(first, again)):
            raise Mistake("two calls with the same seed gave different splits: use a generator seeded with `seed` "
                          "(torch.Generator().manual_seed(seed)) so the split can be reproduced")
        if all(torch.equal(torch.sort(p).values, torch.arange(int(p.min()), int(p.min()) + len(p))) for p in first):
            raise Mistake("every part is a run of consecutive indices: the data is not shuffled. Dataset files are "
                          "often sorted (by class, by date): permute before cutting")
        others = [_split_parts(report, student, n, n_val, n_test, seed + k) for k in (1, 2)]
        if all(torch.equal(o[2], first[2]) for o in others):
            raise Mistake("other seeds give the same test set: the seed is ignored")


# ----------------------------------------------------------------------------------------------
# 2. a training step


def _bn_net(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 4))


def _batch(report: Report, n: int = 8):
    g = torch.Generator().manual_seed(report.seed)
    return torch.randn(n, 1, 6, 6, generator=g), torch.randint(0, 4, (n,), generator=g)


def _flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def _reference_step(model, x, y, lr, stale, *, train=True, zero=True, step=True, probs=False, step_first=False):
    """One SGD step on a copy, with or without one of the known mistakes; returns (params, bn mean, loss)."""
    m = copy.deepcopy(model)
    for p, s in zip(m.parameters(), stale):
        p.grad = s.clone()
    opt = torch.optim.SGD(m.parameters(), lr=lr)
    m.train(train)
    if zero:
        opt.zero_grad()
    if step_first:
        opt.step()
    out = m(x)
    loss = F.cross_entropy(out.softmax(1) if probs else out, y)
    loss.backward()
    if step and not step_first:
        opt.step()
    return _flat(m), m[1].running_mean.clone(), float(loss.detach())


def _step_case(report: Report):
    """A BatchNorm network in eval mode, a batch, stale gradients, and the reference step with its mistakes."""
    seed = report.seed
    model = _bn_net(seed).eval()  # comes in eval mode: the student must switch to train mode
    x, y = _batch(report)
    g = torch.Generator().manual_seed(seed + 1)
    stale = [torch.randn(p.shape, generator=g) for p in model.parameters()]  # left over from an earlier batch
    lr = 0.1
    variants = {
        "model.train() was not called: the model stayed in eval mode, so BatchNorm used its running statistics "
        "(and did not update them)": _reference_step(model, x, y, lr, stale, train=False),
        "optimizer.zero_grad() is missing: the gradient left over from the previous batch was added to this one":
            _reference_step(model, x, y, lr, stale, zero=False),
        "optimizer.step() is missing: the weights did not change": _reference_step(model, x, y, lr, stale, step=False),
        "optimizer.step() was called before loss.backward(): it used the previous batch's gradient":
            _reference_step(model, x, y, lr, stale, step_first=True, zero=False),
        "the loss was computed on softmax probabilities; F.cross_entropy expects logits":
            _reference_step(model, x, y, lr, stale, probs=True),
    }
    return model, x, y, stale, lr, _reference_step(model, x, y, lr, stale), variants


def _run_step(report: Report, student, model, x, y, stale, lr):
    m = copy.deepcopy(model)
    for p, s in zip(m.parameters(), stale):
        p.grad = s.clone()
    opt = torch.optim.SGD(m.parameters(), lr=lr)
    out = report.call(student, m, opt, x.clone(), y.clone())
    return m, out


@exercise("training.train_step", forbid=[fit.fit, fit.train_epoch])
def check_train_step(student, report: Report) -> None:
    with report.part("returns the batch's loss (before the update) as a Python float", points=1):
        model, x, y, stale, lr, (_, _, loss), variants = _step_case(report)
        m, out = _run_step(report, student, model, x, y, stale, lr)
        if isinstance(out, torch.Tensor):
            raise Mistake("return loss.item(), a Python float: a tensor keeps the whole graph of the batch alive")
        if not isinstance(out, (int, float)):
            raise Mistake(f"return the loss as a float, got {type(out).__name__}"
                          + (" (did you forget to `return` it?)" if out is None else ""))
        if abs(float(out) - loss) > 1e-4 * max(1.0, abs(loss)):
            named = [k for k, v in variants.items() if abs(float(out) - v[2]) <= 1e-4 * max(1.0, abs(v[2]))
                     and abs(v[2] - loss) > 1e-4]
            if named:
                raise Mistake(f"your loss {float(out):.5g} matches a known mistake: {named[0]}")
            with torch.no_grad():
                after = float(F.cross_entropy(m.train()(x), y))
            if abs(float(out) - after) < 1e-4:
                raise Mistake("you returned the loss measured after the update: return the loss the gradient came from")
            raise Mistake(f"your loss is {float(out):.5g}, expected {loss:.5g} (cross-entropy of the logits, mean over the batch)")
    with report.part("the weights after one step: zero_grad, forward in train mode, backward, step", points=2):
        for _ in range(2):
            model, x, y, stale, lr, (expected, _, _), variants = _step_case(report)
            m, _ = _run_step(report, student, model, x, y, stale, lr)
            report.expect_close(_flat(m), expected, rtol=1e-4, atol=1e-5, what="the weights after your step",
                                mistakes={k: v[0] for k, v in variants.items()})
    with report.part("BatchNorm's running statistics updated (the step ran in train mode)", points=1):
        model, x, y, stale, lr, (_, bn_mean, _), _ = _step_case(report)
        m, _ = _run_step(report, student, model, x, y, stale, lr)
        if torch.equal(m[1].running_mean, model[1].running_mean):
            raise Mistake("BatchNorm's running mean did not move: the forward pass ran in eval mode. "
                          "Call model.train() at the start of a training step")
        report.expect_close(m[1].running_mean, bn_mean, what="BatchNorm's running mean")


# ----------------------------------------------------------------------------------------------
# 3. evaluation in eval mode


@exercise("training.evaluate", forbid=[fit.evaluate, fit.fit])
def check_evaluate(student, report: Report) -> None:
    model = _bn_net(report.seed)
    with torch.no_grad():  # running statistics far from the batch statistics: train mode gives other numbers
        model[1].running_mean.uniform_(-1, 1)
        model[1].running_var.uniform_(0.5, 2.0)
    model.train()  # comes in train mode, as after a training loop
    x, y = _batch(report, n=20)
    ref = copy.deepcopy(model).eval()
    with torch.no_grad():
        logits = ref(x)
        # a deciding case every run: one image right and one wrong, so a count (>= 1) is never the
        # fraction (< 1); random labels alone can leave no image right (count = fraction = 0)
        pred = logits.argmax(1)
        y = y.clone()
        y[0], y[1] = pred[0], (pred[1] + 1) % 4
        loss, acc = float(F.cross_entropy(logits, y)), float((logits.argmax(1) == y).float().mean())
        in_train = copy.deepcopy(model)(x)
    mistakes = {
        "evaluated in train mode: BatchNorm normalised with the batch's statistics (call model.eval() first)":
            (float(F.cross_entropy(in_train, y)), float((in_train.argmax(1) == y).float().mean())),
        "the loss is summed over the images, not averaged": (loss * len(y), acc),
        "the accuracy is a count of correct images, not a fraction": (loss, acc * len(y)),
    }
    with report.part("(mean cross-entropy, accuracy as a fraction) of the model in eval mode", points=2):
        m = copy.deepcopy(model)
        got = report.call(student, m, x.clone(), y.clone())
        if not isinstance(got, (tuple, list)) or len(got) != 2:
            raise Mistake(f"return a pair (loss, accuracy), got {type(got).__name__}")
        try:
            got = (float(got[0]), float(got[1]))
        except (TypeError, ValueError):
            raise Mistake(f"the loss and the accuracy should be numbers, got {got!r}") from None
        if not (abs(got[0] - loss) < 1e-4 * max(1, loss) and abs(got[1] - acc) < 1e-6):
            for text, (l2, a2) in mistakes.items():
                if abs(got[0] - l2) < 1e-4 * max(1, l2) and abs(got[1] - a2) < 1e-6:
                    raise Mistake(f"matches a known mistake: {text}")
            raise Mistake(f"got loss {got[0]:.5g} and accuracy {got[1]:.4g}, expected {loss:.5g} and {acc:.4g}")
    with report.part("the model left as it came: train mode, BatchNorm statistics untouched, no .grad", points=1):
        m = copy.deepcopy(model)
        report.call(student, m, x.clone(), y.clone())
        if not torch.equal(m[1].running_mean, model[1].running_mean):
            raise Mistake("BatchNorm's running statistics changed: the evaluation ran in train mode and overwrote "
                          "them. Call model.eval() before the forward pass")
        if not all(mod.training for mod in m.modules()):
            raise Mistake("the model came in train mode and left in eval mode: put it back with model.train(was_training)")
        if any(p.grad is not None for p in m.parameters()):
            raise Mistake("a parameter's .grad was written: evaluate under torch.no_grad()")


# ----------------------------------------------------------------------------------------------
# 4. early stopping's bookkeeping


def _stopping(losses, patience, *, tie_improves=False, reset=True, previous=False, late=0):
    """(best epoch, stop epoch), 1-based; the keyword arguments are the known mistakes."""
    best, best_epoch, wait, prev = float("inf"), 0, 0, float("inf")
    for epoch, loss in enumerate(losses, start=1):
        reference = prev if previous else best
        improved = loss <= reference if tie_improves else loss < reference
        if loss < best or (tie_improves and loss <= best):
            best, best_epoch = loss, epoch
        if improved:
            wait = 0 if reset else wait
        else:
            wait += 1
        prev = loss
        if wait >= patience + late:
            return best_epoch, epoch
    return best_epoch, len(losses)


def _stopping_cases(report: Report):
    fixed = [
        ([1.0, 0.8, 0.9, 0.8, 0.85, 0.9, 0.95, 0.6], 3),  # the tie at epoch 4 is no improvement: stop after 5
        ([0.9, 0.7, 0.75, 0.72, 0.69, 0.74, 0.8, 0.85, 0.9], 3),  # 0.72 < 0.75 but not < best: "previous" differs
        ([1.0, 0.9, 0.95, 0.85, 0.9, 0.88, 0.87, 0.86], 2),  # a counter that is never reset stops at 5
        ([0.5, 0.4, 0.3, 0.2], 2),  # always improving: never stops, the last epoch is the best
    ]
    rng = report.rng
    n = int(rng.integers(8, 15))
    walk = [round(float(v), 3) for v in 1.0 + rng.normal(0, 0.1, n).cumsum() * 0.5]
    fixed.append((walk, int(rng.integers(1, 4))))
    return fixed


@exercise("training.early_stopping", forbid=[fit.EarlyStopping.on_epoch_end])
def check_early_stopping(student, report: Report) -> None:
    cases = _stopping_cases(report)

    def each(index: int, label: str, points: float):
        with report.part(label, points=points):
            for losses, patience in cases:
                got = report.call(student, list(losses), patience)
                if not isinstance(got, (tuple, list)) or len(got) != 2:
                    raise Mistake(f"return a pair (best_epoch, stop_epoch), got {got!r}")
                try:
                    value = int(got[index])
                except (TypeError, ValueError):
                    raise Mistake(f"epochs are integers, got {got!r}") from None
                expected = _stopping(losses, patience)
                if value == expected[index]:
                    continue
                if index == 0 and value == expected[0] - 1:
                    raise Mistake("epochs count from 1 (the first epoch is epoch 1): your best epoch is one too small")
                if index == 0 and value == expected[1] and expected[0] != expected[1]:
                    raise Mistake(f"for {losses} you returned the last epoch ({value}) as the best: early stopping "
                                  f"restores the weights of the epoch with the lowest validation loss ({expected[0]})")
                named = {"a loss equal to the best so far is not an improvement (compare with <, not <=)":
                         _stopping(losses, patience, tie_improves=True),
                         "patience is off by one: stop after `patience` epochs without improvement, not one later":
                         _stopping(losses, patience, late=1),
                         "the counter of epochs without improvement is never reset to 0 after an improvement":
                         _stopping(losses, patience, reset=False),
                         "compared with the previous epoch's loss instead of the best so far":
                         _stopping(losses, patience, previous=True)}
                for text, wrong in named.items():
                    if wrong[index] == value and wrong[index] != expected[index]:
                        raise Mistake(f"for losses {losses} and patience {patience}: {text}")
                raise Mistake(f"for losses {losses} and patience {patience} you returned {tuple(got)}, "
                              f"expected {expected}")

    each(0, "the best epoch (1-based): the one whose weights are restored", 1)
    each(1, "the epoch after which training stops", 2)


# ----------------------------------------------------------------------------------------------
# 5. training the head of a frozen backbone


class _TransferNet(nn.Module):
    """A backbone with BatchNorm and a linear head; ``audit`` counts what the optimiser was given."""

    def __init__(self, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.backbone = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                                      nn.Flatten())
        self.head = nn.Linear(16, 3)
        with torch.no_grad():
            self.backbone[1].running_mean.uniform_(-0.5, 0.5)
            self.backbone[1].running_var.uniform_(0.5, 2.0)
        # [backbone parameters given to the optimiser, head parameters given to it]
        self.register_buffer("audit", torch.zeros(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, 1, H, W) -> (N, 3)
        return self.head(self.backbone(x))


def _optimizer_factory(model: _TransferNet, lr: float):
    def make_optimizer(parameters):
        """torch.optim.SGD(parameters, lr) for the exercise; give it the parameters to train."""
        params = list(parameters)
        backbone = {id(p) for p in model.backbone.parameters()}
        head = {id(p) for p in model.head.parameters()}
        with torch.no_grad():
            model.audit[0] += sum(id(p) in backbone for p in params)
            model.audit[1] += sum(id(p) in head for p in params)
        return torch.optim.SGD(params, lr=lr)

    return make_optimizer


def _reference_head(model: _TransferNet, x, y, lr, steps, backbone_train=False, probs=False):
    m = copy.deepcopy(model)
    m.backbone.requires_grad_(False)
    opt = torch.optim.SGD(m.head.parameters(), lr=lr)
    for _ in range(steps):
        m.train()
        m.backbone.train(backbone_train)
        opt.zero_grad()
        out = m(x)
        F.cross_entropy(out.softmax(1) if probs else out, y).backward()
        opt.step()
    return torch.cat([p.detach().flatten() for p in m.head.parameters()])


@exercise("training.train_head", forbid=[fit.fit, fit.train_epoch])
def check_train_head(student, report: Report) -> None:
    model = _TransferNet(report.seed).train()
    g = torch.Generator().manual_seed(report.seed)
    x, y = torch.randn(12, 1, 6, 6, generator=g), torch.randint(0, 3, (12,), generator=g)
    lr, steps = 0.2, 3
    expected = _reference_head(model, x, y, lr, steps)

    def run():
        m = copy.deepcopy(model)
        losses = report.call(student, m, x.clone(), y.clone(), _optimizer_factory(m, lr), steps)
        if not isinstance(losses, (list, tuple)) or len(losses) != steps:
            raise Mistake(f"return the list of the {steps} losses, one per step, got {type(losses).__name__}")
        return m

    with report.part("the backbone frozen: requires_grad off on its parameters, on for the head's", points=1):
        m = run()
        if any(p.requires_grad for p in m.backbone.parameters()):
            raise Mistake("the backbone's parameters still require grad: model.backbone.requires_grad_(False)")
        if not all(p.requires_grad for p in m.head.parameters()):
            raise Mistake("the head's parameters were frozen too: only the backbone is frozen")
    with report.part("the optimiser holds the head's parameters only", points=1):
        m = run()
        held_backbone, held_head = (int(v) for v in m.audit)
        if held_backbone:
            raise Mistake(f"the optimiser was given {held_backbone} parameters of the backbone: give it "
                          "model.head.parameters() only. Frozen parameters in an optimiser are trained as soon as "
                          "someone unfreezes them, and cost memory in optimisers that keep state (Adam)")
        if held_head != len(list(model.head.parameters())):
            raise Mistake("build the optimiser with make_optimizer(model.head.parameters()), once, before the loop"
                          if held_head == 0 else f"the optimiser was built {held_head // len(list(model.head.parameters()))} times: build it once")
    with report.part("the backbone untouched: weights and BatchNorm running statistics", points=1):
        m = run()
        if any(not torch.equal(a, b) for a, b in zip(m.backbone.parameters(), model.backbone.parameters())):
            raise Mistake("the backbone's weights changed: freeze them and give the optimiser the head's parameters only")
        if not torch.equal(m.backbone[1].running_mean, model.backbone[1].running_mean):
            raise Mistake("the backbone's BatchNorm running statistics moved although its weights are frozen: "
                          "the backbone ran in train mode. After model.train(), call model.backbone.eval()")
    with report.part("the head trained like the reference (steps of full-batch SGD on the cross-entropy)", points=2):
        m = run()
        got = torch.cat([p.detach().flatten() for p in m.head.parameters()])
        report.expect_close(got, expected, rtol=1e-4, atol=1e-5, what="the head's weights", mistakes={
            "the backbone ran in train mode: its features used the batch's BatchNorm statistics, not ImageNet's "
            "(here: the pretrained running statistics)": _reference_head(model, x, y, lr, steps, backbone_train=True),
            "the loss was computed on softmax probabilities; F.cross_entropy expects logits":
                _reference_head(model, x, y, lr, steps, probs=True),
            "only one step was taken": _reference_head(model, x, y, lr, 1),
            "the head did not change": expected * 0 + torch.cat([p.detach().flatten() for p in model.head.parameters()]),
        })

