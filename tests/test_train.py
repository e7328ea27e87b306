"""The training script runs, is seeded, and writes weights that load_model's architecture accepts."""

import json
import shutil

import pytest
import torch

from coursekit import data, train
from coursekit.nets import FashionCNN


@pytest.fixture
def small_train_split(tmp_path, monkeypatch):
    """A stand-in training split (the shipped test files renamed), so the test needs no download."""
    src = data._candidate_dirs("test")[0]
    for kind in ("images-idx3", "labels-idx1"):
        shutil.copy(src / f"t10k-{kind}-ubyte.gz", tmp_path / f"train-{kind}-ubyte.gz")
    monkeypatch.setenv("FASHION_MNIST_DIR", str(tmp_path))
    return tmp_path


@pytest.mark.slow  # a whole (short) training run: in `make test`, not in `make test-quick`
def test_train_is_seeded_and_learns(small_train_split, tmp_path):
    name = "fashion_cnn"
    a = train.train(name, seed=1, out_dir=tmp_path / "a", epochs=1, limit=3072, eval_limit=1000)
    b = train.train(name, seed=1, out_dir=tmp_path / "b", epochs=1, limit=3072, eval_limit=1000)
    wa = torch.load(tmp_path / "a" / f"{name}.pt", weights_only=True)
    wb = torch.load(tmp_path / "b" / f"{name}.pt", weights_only=True)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)  # same seed, same weights
    FashionCNN().load_state_dict(wa)  # loads into the architecture load_model uses
    record = json.loads((tmp_path / "a" / f"{name}.json").read_text())
    assert record["seed"] == 1 and record["epochs"] == 1 and record["train_images"] == 3072 and record["test_images"] == 1000
    assert record["test_accuracy"] == a["test_accuracy"] == b["test_accuracy"]
    assert a["test_accuracy"] > 0.5  # 10 classes: chance is 0.1


@pytest.mark.slow  # a whole (short) training run: in `make test`, not in `make test-quick`
def test_adversarial_training_runs_and_learns(small_train_split, tmp_path):
    rec = train.train("fashion_cnn_robust", seed=0, out_dir=tmp_path, epochs=1, limit=3072, eval_limit=1000)
    assert rec["eps"] == 0.1 and rec["test_accuracy"] > 0.5
    FashionCNN().load_state_dict(torch.load(tmp_path / "fashion_cnn_robust.pt", weights_only=True))


def test_fgsm_random_start_stays_in_the_ball():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
    x = torch.rand(5, 1, 2, 2)
    adv = train.fgsm_random_start(model, x, torch.tensor([0, 1, 2, 0, 1]), eps=0.1)
    assert (adv - x).abs().max() <= 0.1 + 1e-6 and adv.min() >= 0 and adv.max() <= 1


def test_fgsm_random_start_is_wong_et_al_s_step():
    """Wong, Rice & Kolter (2020), their code: delta ~ U(-eps, eps) clamped so x + delta is in [0, 1],
    the gradient at x + delta, delta + 1.25 eps sign(grad) clamped to the ball, then to [0, 1]."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3))
    x = torch.rand(6, 1, 4, 4)
    x[:, :, 0] = 0.0  # black pixels: a random start below 0 is clamped back into the box
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    eps = 0.1
    torch.manual_seed(1)
    got = train.fgsm_random_start(model, x, y, eps)
    torch.manual_seed(1)
    delta = torch.empty_like(x).uniform_(-eps, eps)
    delta = ((x + delta).clamp(0, 1) - x).requires_grad_(True)
    (grad,) = torch.autograd.grad(torch.nn.functional.cross_entropy(model(x + delta), y), delta)
    want = (x + (delta + 1.25 * eps * grad.sign()).clamp(-eps, eps)).clamp(0, 1)
    assert torch.allclose(got, want, atol=1e-6)
    assert not torch.equal(got, x) and model[1].weight.grad is None  # it moved; no parameter gradient


def test_the_training_script_imports_no_lecture_module():
    """train.py is plumbing: importing it (and running its watermark path) loads no lecture module."""
    import subprocess
    import sys

    lectures = ["clever_hans", "adversarial", "robustness", "saliency", "lrp", "maximize", "dream", "style"]
    code = ("import sys, coursekit.train as t; t.watermark.watermark_choice(__import__('torch').tensor([2, 2]));"
            f"print([m for m in {lectures!r} if 'coursekit.' + m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out


def test_unknown_model_name():
    with pytest.raises(ValueError, match="fashion_cnn"):
        train.train("resnet")
