"""Checks of exercise set 00b_training: independent correct answers earn full points every run; each
classic mistake, written as a student would, earns zero for the part that diagnoses it, with its own
diagnosis, every run; doing nothing earns nothing."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from coursekit.checks import CheckFailed, check, run_check

SEEDS = (*range(8), None)  # a correct answer: eight drawn cases and one unseeded run
MISTAKE_SEEDS = (0, 1, 2, 3, 321, None)  # deciding cases first in every check; 321 once let "accuracy as a count" through

# ---------------------------------------------------------------------------------------------
# correct solutions, written independently of the solution notebook


def split_indices(n, n_val, n_test, seed):
    g = torch.Generator().manual_seed(seed + 12345)  # another stream than the notebook's, still seeded
    order = torch.argsort(torch.rand(n, generator=g))
    return order[n_val + n_test:].tolist(), order[:n_val].tolist(), order[n_val:n_val + n_test].tolist()


def train_step(model, optimizer, x, y):
    model.train(True)
    for p in model.parameters():
        p.grad = None
    loss = F.nll_loss(F.log_softmax(model(x), dim=1), y)
    loss.backward()
    optimizer.step()
    return float(loss.detach())


def evaluate(model, x, y):
    modes = {m: m.training for m in model.modules()}
    model.eval()
    with torch.inference_mode():
        logits = torch.cat([model(x[i:i + 7]) for i in range(0, len(x), 7)])  # in batches
    for m, t in modes.items():
        m.training = t
    log_p = logits.log_softmax(1)
    return float(-log_p[torch.arange(len(y)), y].mean()), float((logits.argmax(1) == y).sum()) / len(y)


def early_stopping(val_losses, patience):
    best_epoch, since = 1, 0
    for i in range(1, len(val_losses)):
        if val_losses[i] < min(val_losses[:i]):
            best_epoch, since = i + 1, 0
        else:
            since += 1
        if since == patience:
            return best_epoch, i + 1
    return best_epoch, len(val_losses)


def train_head(model, x, y, make_optimizer, steps):
    for p in model.backbone.parameters():
        p.requires_grad = False
    opt = make_optimizer(list(model.head.parameters()))
    with torch.no_grad():  # the frozen features, computed once, in eval mode
        model.backbone.eval()
        features = model.backbone(x)
    model.head.train()
    out = []
    for _ in range(steps):
        opt.zero_grad()
        loss = F.cross_entropy(model.head(features), y)
        loss.backward()
        opt.step()
        out.append(loss.item())
    return out


CORRECT = {"training.split": split_indices, "training.train_step": train_step, "training.evaluate": evaluate,
           "training.early_stopping": early_stopping, "training.train_head": train_head}


@pytest.mark.parametrize("name", sorted(CORRECT))
@pytest.mark.usefixtures("one_thread")
def test_an_independent_correct_answer_earns_full_points_every_run(name):
    for seed in SEEDS:
        r = run_check(name, CORRECT[name], seed=seed)
        assert r.earned == r.points, r.summary()
        assert not r.tampering, r.tampering


def test_check_prints_and_returns_points(capsys):
    assert check("training.early_stopping", early_stopping) == 3.0
    assert "3/3 points" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# the classic mistakes


def split_leaky(n, n_val, n_test, seed):
    """Validation and test drawn from two independent permutations: they overlap."""
    g = torch.Generator().manual_seed(seed)
    test = torch.randperm(n, generator=g)[:n_test]
    val = torch.randperm(n, generator=g)[:n_val]
    rest = torch.tensor([i for i in range(n) if i not in set(test.tolist())])
    return rest[:n - n_val - n_test], val, test


def split_val_inside_train(n, n_val, n_test, seed):
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    test, rest = perm[:n_test], perm[n_test:]
    return rest[n_val:], rest[-n_val:], test  # val taken from the end of what train also holds


def split_unshuffled(n, n_val, n_test, seed):
    idx = torch.arange(n)
    return idx[:n - n_val - n_test], idx[n - n_val - n_test:n - n_test], idx[n - n_test:]


def split_unseeded(n, n_val, n_test, seed):
    perm = torch.randperm(n)
    return perm[n_val + n_test:], perm[:n_val], perm[n_val:n_val + n_test]


def step_no_train_mode(model, optimizer, x, y):
    optimizer.zero_grad()
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    optimizer.step()
    return loss.item()


def step_no_zero_grad(model, optimizer, x, y):
    model.train()
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    optimizer.step()
    return loss.item()


def step_softmax(model, optimizer, x, y):
    model.train()
    optimizer.zero_grad()
    loss = F.cross_entropy(model(x).softmax(1), y)
    loss.backward()
    optimizer.step()
    return loss.item()


def step_no_step(model, optimizer, x, y):
    model.train()
    optimizer.zero_grad()
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    return loss.item()


def step_returns_tensor(model, optimizer, x, y):
    model.train()
    optimizer.zero_grad()
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    optimizer.step()
    return loss


def evaluate_in_train_mode(model, x, y):
    with torch.no_grad():
        logits = model(x)
    return F.cross_entropy(logits, y).item(), (logits.argmax(1) == y).float().mean().item()


def evaluate_mode_not_restored(model, x, y):
    model.eval()
    with torch.no_grad():
        logits = model(x)
    return F.cross_entropy(logits, y).item(), (logits.argmax(1) == y).float().mean().item()


def evaluate_count(model, x, y):
    was = model.training
    model.eval()
    with torch.no_grad():
        logits = model(x)
    model.train(was)
    return F.cross_entropy(logits, y).item(), (logits.argmax(1) == y).sum().item()


def stopping_last_epoch(losses, patience):
    best, wait = float("inf"), 0
    for epoch, loss in enumerate(losses, 1):
        if loss < best:
            best, wait = loss, 0
        else:
            wait += 1
            if wait >= patience:
                return epoch, epoch  # "restores" the last epoch
    return len(losses), len(losses)


def stopping_tie_improves(losses, patience):
    best, best_epoch, wait = float("inf"), 0, 0
    for epoch, loss in enumerate(losses, 1):
        if loss <= best:
            best, best_epoch, wait = loss, epoch, 0
        else:
            wait += 1
            if wait >= patience:
                return best_epoch, epoch
    return best_epoch, len(losses)


def stopping_late(losses, patience):
    best, best_epoch, wait = float("inf"), 0, 0
    for epoch, loss in enumerate(losses, 1):
        if loss < best:
            best, best_epoch, wait = loss, epoch, 0
        else:
            wait += 1
            if wait > patience:
                return best_epoch, epoch
    return best_epoch, len(losses)


def stopping_no_reset(losses, patience):
    best, best_epoch, wait = float("inf"), 0, 0
    for epoch, loss in enumerate(losses, 1):
        if loss < best:
            best, best_epoch = loss, epoch
        else:
            wait += 1
            if wait >= patience:
                return best_epoch, epoch
    return best_epoch, len(losses)


def stopping_zero_based(losses, patience):
    best, stop = early_stopping(losses, patience)
    return best - 1, stop


def head_bn_updating(model, x, y, make_optimizer, steps):
    """requires_grad off and the right optimiser, but model.train() leaves the backbone in train mode."""
    model.backbone.requires_grad_(False)
    opt = make_optimizer(model.head.parameters())
    losses = []
    for _ in range(steps):
        model.train()
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def head_optimiser_holds_frozen(model, x, y, make_optimizer, steps):
    model.backbone.requires_grad_(False)
    opt = make_optimizer(model.parameters())  # the whole model: frozen parameters included
    losses = []
    for _ in range(steps):
        model.train()
        model.backbone.eval()
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def head_not_frozen(model, x, y, make_optimizer, steps):
    opt = make_optimizer(model.parameters())
    losses = []
    for _ in range(steps):
        model.train()
        model.backbone.eval()
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


# (exercise, fabricated student, title of the part that must earn zero, phrase of its diagnosis)
MISTAKES = [
    ("training.split", split_leaky, "no index in two parts", "data leak"),
    ("training.split", split_val_inside_train, "no index in two parts", "validation indices are also in the training"),
    ("training.split", split_unshuffled, "shuffled", "not shuffled"),
    ("training.split", split_unseeded, "shuffled", "same seed gave different splits"),
    ("training.train_step", step_no_train_mode, "the weights after one step", "model.train() was not called"),
    ("training.train_step", step_no_train_mode, "BatchNorm", "ran in eval mode"),
    ("training.train_step", step_no_zero_grad, "the weights after one step", "zero_grad() is missing"),
    ("training.train_step", step_softmax, "the weights after one step", "softmax probabilities"),
    ("training.train_step", step_no_step, "the weights after one step", "step() is missing"),
    ("training.train_step", step_returns_tensor, "returns the batch's loss", "loss.item()"),
    ("training.evaluate", evaluate_in_train_mode, "of the model in eval mode", "evaluated in train mode"),
    ("training.evaluate", evaluate_in_train_mode, "the model left as it came", "running statistics changed"),
    ("training.evaluate", evaluate_mode_not_restored, "the model left as it came", "left in eval mode"),
    ("training.evaluate", evaluate_count, "of the model in eval mode", "a count of correct images"),
    ("training.early_stopping", stopping_last_epoch, "the best epoch", "restores the weights of the epoch"),
    ("training.early_stopping", stopping_zero_based, "the best epoch", "epochs count from 1"),
    ("training.early_stopping", stopping_tie_improves, "the best epoch", "compare with <, not <="),
    ("training.early_stopping", stopping_late, "stops", "patience is off by one"),
    ("training.early_stopping", stopping_no_reset, "stops", "never reset"),
    ("training.train_head", head_bn_updating, "the backbone untouched", "BatchNorm running statistics moved"),
    ("training.train_head", head_bn_updating, "the head trained", "the backbone ran in train mode"),
    ("training.train_head", head_optimiser_holds_frozen, "holds the head's parameters only",
     "parameters of the backbone"),
    ("training.train_head", head_not_frozen, "the backbone frozen", "still require grad"),
    ("training.train_head", head_not_frozen, "the backbone untouched", "weights changed"),
]


@pytest.mark.parametrize("name, fn, part, phrase", MISTAKES, ids=[f"{m[0]}-{m[1].__name__}-{m[2][:12]}" for m in MISTAKES])
@pytest.mark.usefixtures("one_thread")
def test_each_mistake_scores_zero_on_its_part_with_its_diagnosis(name, fn, part, phrase):
    for seed in MISTAKE_SEEDS:
        r = run_check(name, fn, seed=seed)
        parts = [p for p in r.parts if part in p.title]
        assert len(parts) == 1, [p.title for p in r.parts]
        assert parts[0].earned == 0 and phrase in parts[0].message, r.summary()
        assert r.earned < r.points


@pytest.mark.usefixtures("one_thread")
def test_a_mistake_keeps_the_points_of_the_parts_it_does_not_touch():
    r = run_check("training.train_head", head_optimiser_holds_frozen, seed=0)
    assert r.earned == r.points - 1, r.summary()  # only "the optimiser holds the head's parameters only"
    r = run_check("training.evaluate", evaluate_mode_not_restored, seed=0)
    assert r.earned == 2, r.summary()


@pytest.mark.parametrize("name", sorted(CORRECT))
def test_doing_nothing_earns_nothing(name):
    def nothing(*args):
        raise NotImplementedError()

    with pytest.raises(CheckFailed):
        check(name, nothing)
    assert run_check(name, lambda *a: None).earned == 0


# ---------------------------------------------------------------------------------------------
# calling coursekit.fit instead earns nothing


def evaluate_with_coursekit(model, x, y):
    from coursekit import fit

    return fit.evaluate(model, x, y)


def early_stopping_with_coursekit(val_losses, patience):
    from torch import nn

    from coursekit import fit

    cb, h, model = fit.EarlyStopping(patience), fit.History(), nn.Linear(1, 1)
    cb.on_train_begin(model, h)
    for epoch, loss in enumerate(val_losses, 1):
        h.val_loss.append(loss)
        if cb.on_epoch_end(epoch, model, h):
            return cb.best_epoch, epoch
    return cb.best_epoch, len(val_losses)


def train_step_with_coursekit(model, optimizer, x, y):
    from coursekit import fit

    return fit.train_epoch(model, optimizer, x, y, len(y), None, torch.Generator().manual_seed(0))[0]


@pytest.mark.parametrize("name, fn", [("training.evaluate", evaluate_with_coursekit),
                                      ("training.early_stopping", early_stopping_with_coursekit),
                                      ("training.train_step", train_step_with_coursekit)])
def test_calling_coursekit_fit_earns_nothing(name, fn):
    r = run_check(name, fn, seed=0)
    assert r.earned == 0 and "your function called coursekit's" in r.summary(), r.summary()
