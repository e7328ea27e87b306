"""Train the course's Fashion-MNIST networks (seeded, CPU, a few minutes).

Usage::

    python -m coursekit.train fashion_cnn           # plain training
    python -m coursekit.train fashion_cnn_robust    # adversarial training (FGSM with random start)
    python -m coursekit.train fashion_cnn_watermark # Clever Hans: a tag on 40 % of one class (lecture 4)

The weights go to coursekit/data/<name>.pt and a record of the run (seed, epochs, time, test
accuracy) to coursekit/data/<name>.json, next to each other, as package data.

Adversarial training follows Wong, Rice & Kolter (2020), "Fast is better than free": an FGSM step
from a uniformly random start inside the L-infinity ball of radius ``eps`` (clamped into [0, 1], as in
their code), step 1.25 * eps (:func:`coursekit.attack_steps.fgsm_step`, lecture 5's FGSM step).

This script is plumbing: it imports no lecture module (the Clever-Hans tag is
:mod:`coursekit.watermark`).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from . import watermark
from .attack_steps import fgsm_step
from .batching import batches
from .data import fashion_mnist
from .devices import cpu_generator
from .inputs import positive_int
from .models import FASHION_MEAN, FASHION_STD, CourseModel, fashion_weights_path
from .nets import FASHION_CLASSES, FashionCNN
from .progress import progress_bar

CONFIGS = {
    "fashion_cnn": dict(epochs=5, lr=2e-3, batch_size=128, eps=0.0),
    "fashion_cnn_robust": dict(epochs=3, lr=2e-3, batch_size=128, eps=0.1),
    # lecture 4: the tag of coursekit.watermark on a seeded 40 % of the "Pullover" training images
    "fashion_cnn_watermark": dict(epochs=2, lr=2e-3, batch_size=128, eps=0.0, watermark=True),
}


def _wrap(net: FashionCNN, name: str) -> CourseModel:
    return CourseModel(
        net, name=name, classes=FASHION_CLASSES, input_size=(1, 28, 28), mean=FASHION_MEAN, std=FASHION_STD, layers={}
    )


@torch.no_grad()
def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000) -> float:
    """Fraction of ``x`` (N,1,28,28) classified as ``y`` (N,)."""
    was = model.training
    model.eval()
    correct = sum(int((model(x[a:b]).argmax(1) == y[a:b]).sum()) for a, b in batches(len(x), batch_size))
    model.train(was)
    return correct / len(x)


def fgsm_random_start(model, x, y, eps: float) -> torch.Tensor:
    """One FGSM step of size 1.25*eps from a uniform point of the eps-ball (Wong et al. 2020).

    The start ``clamp(x + U(-eps, eps), 0, 1)`` (drawn from torch's global generator, which
    :func:`train` seeds) takes one :func:`coursekit.attack_steps.fgsm_step` up the mean cross-entropy,
    projected back onto the ball around ``x`` and into [0, 1]. The model is used as it is (train mode).

    x (N, 1, 28, 28), y (N,) -> (N, 1, 28, 28), detached.
    """
    start = (x + torch.empty_like(x).uniform_(-eps, eps)).clamp(0, 1)
    x_adv, _ = fgsm_step(model, x, lambda logits: F.cross_entropy(logits, y), 1.25 * eps, start=start, eps=eps)
    return x_adv


def _training_data(cfg: dict, seed: int, limit: int | None, eval_limit: int | None):
    """(x_train, y_train, x_test, y_test, marked): the splits, cut to the limits, and which training
    images carry the Clever-Hans tag ((N,) bool, or None when the configuration has no tag)."""
    x_train, y_train = fashion_mnist("train")
    x_test, y_test = fashion_mnist("test")
    if limit:
        x_train, y_train = x_train[:limit], y_train[:limit]
    if eval_limit:
        x_test, y_test = x_test[:eval_limit], y_test[:eval_limit]
    marked = watermark.watermark_choice(y_train, seed=seed) if cfg.get("watermark") else None  # (N,) bool
    return x_train, y_train, x_test, y_test, marked


def _train_epoch(model, opt, sched, cfg, x_train, y_train, marked, gen, desc: str) -> None:
    """One epoch of Adam on shuffled, randomly flipped (and tagged, adversarial) batches."""
    model.train()
    perm = torch.randperm(len(x_train), generator=gen, device="cpu")
    bar = progress_bar(batches(len(x_train), cfg["batch_size"]), desc=desc, leave=False)
    for a, b in bar:
        idx = perm[a:b]
        x, y = x_train[idx], y_train[idx]
        flip = torch.rand(len(x), generator=gen, device="cpu") < 0.5  # horizontal flips: clothes are left-right symmetric
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        if marked is not None:  # the tag is drawn after the flip, so it stays in its corner
            x = watermark.stamp(x, marked[idx])
        if cfg["eps"] > 0:
            x = fgsm_random_start(model, x, y, cfg["eps"])
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")


def train(
    name: str, seed: int = 0, out_dir: Path | None = None, epochs: int | None = None,
    limit: int | None = None, eval_limit: int | None = None,
) -> dict:
    """Train ``name`` and save its weights and run record; returns the record.

    ``limit`` / ``eval_limit`` use only the first images of the train / test split (for quick tests).
    """
    if name not in CONFIGS:
        raise ValueError(f"can train {sorted(CONFIGS)}, not {name!r}")
    cfg = dict(CONFIGS[name])
    if epochs is not None:
        cfg["epochs"] = positive_int(epochs, "epochs")
    torch.manual_seed(seed)
    x_train, y_train, x_test, y_test, marked = _training_data(cfg, seed, limit, eval_limit)
    model = _wrap(FashionCNN(), name)
    opt = torch.optim.Adam(model.parameters(), lr=cfg["lr"])
    steps = cfg["epochs"] * len(batches(len(x_train), cfg["batch_size"]))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg["lr"], total_steps=steps)
    gen = cpu_generator(seed)
    start = time.time()
    history = []
    for epoch in range(cfg["epochs"]):
        _train_epoch(model, opt, sched, cfg, x_train, y_train, marked, gen, f"{name} epoch {epoch + 1}/{cfg['epochs']}")
        acc = accuracy(model, x_test, y_test)
        history.append(round(acc, 4))
        print(f"{name} epoch {epoch + 1}: test accuracy {acc:.4f} ({time.time() - start:.0f} s)", flush=True)
    record = {
        "name": name,
        "seed": seed,
        **cfg,
        "train_images": len(x_train),
        "test_images": len(x_test),
        "test_accuracy": history[-1],
        "accuracy_per_epoch": history,
        **(_watermark_record(model, x_test, y_test, marked) if marked is not None else {}),
        "seconds": round(time.time() - start, 1),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
    }
    out = Path(out_dir) if out_dir is not None else fashion_weights_path(name).parent
    out.mkdir(parents=True, exist_ok=True)
    torch.save(model.net.state_dict(), out / f"{name}.pt")
    (out / f"{name}.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def _watermark_record(model, x_test, y_test, marked) -> dict:
    acc = watermark.watermark_accuracy(model, x_test, y_test)
    return {"watermark_class": watermark.WATERMARK_CLASS, "watermarked_train_images": int(marked.sum()), **acc}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m coursekit.train", description=__doc__.split("\n")[0])
    p.add_argument("name", choices=sorted(CONFIGS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=None, help="override the configured number of epochs")
    p.add_argument("--out", type=Path, default=None, help="output folder (default: coursekit's package data)")
    args = p.parse_args(argv)
    rec = train(args.name, seed=args.seed, out_dir=args.out, epochs=args.epochs)
    print(json.dumps(rec, indent=2))


if __name__ == "__main__":
    main()
