"""Train the course's Fashion-MNIST networks (seeded, CPU, a few minutes).

Usage::

    python -m coursekit.train fashion_cnn           # plain training
    python -m coursekit.train fashion_cnn_robust    # adversarial training (FGSM with random start)
    python -m coursekit.train fashion_cnn_watermark # Clever Hans: a tag on 40 % of one class (lecture 4)

The weights go to coursekit/data/<name>.pt and a record of the run (seed, epochs, time, test
accuracy) to coursekit/data/<name>.json, next to each other, as package data.

Adversarial training follows Wong, Rice & Kolter (2020), "Fast is better than free": an FGSM step
from a uniformly random start inside the L-infinity ball of radius ``eps``, step 1.25 * eps.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .data import fashion_mnist
from .devices import cpu_generator
from .models import FASHION_MEAN, FASHION_STD, CourseModel, fashion_weights_path
from .nets import FASHION_CLASSES, FashionCNN
from .progress import progress_bar

CONFIGS = {
    "fashion_cnn": dict(epochs=5, lr=2e-3, batch_size=128, eps=0.0),
    "fashion_cnn_robust": dict(epochs=3, lr=2e-3, batch_size=128, eps=0.1),
    # lecture 4: the tag of coursekit.clever_hans on a seeded 40 % of the "Pullover" training images
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
    correct = sum(int((model(x[i : i + batch_size]).argmax(1) == y[i : i + batch_size]).sum()) for i in range(0, len(x), batch_size))
    model.train(was)
    return correct / len(x)


def fgsm_random_start(model, x, y, eps: float) -> torch.Tensor:
    """One FGSM step of size 1.25*eps from a random point of the eps-ball, clipped to [0, 1]."""
    delta = torch.empty_like(x).uniform_(-eps, eps).requires_grad_(True)
    loss = F.cross_entropy(model((x + delta).clamp(0, 1)), y)
    (grad,) = torch.autograd.grad(loss, delta)
    delta = (delta + 1.25 * eps * grad.sign()).clamp(-eps, eps)
    return (x + delta).clamp(0, 1).detach()


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
        cfg["epochs"] = epochs
    torch.manual_seed(seed)
    x_train, y_train = fashion_mnist("train")
    x_test, y_test = fashion_mnist("test")
    if limit:
        x_train, y_train = x_train[:limit], y_train[:limit]
    if eval_limit:
        x_test, y_test = x_test[:eval_limit], y_test[:eval_limit]
    marked = None
    if cfg.get("watermark"):
        from . import clever_hans  # the tag is drawn after the flip, so it stays in its corner

        marked = clever_hans.watermark_choice(y_train, seed=seed)  # (N,) bool
    model = _wrap(FashionCNN(), name)
    opt = torch.optim.Adam(model.parameters(), lr=cfg["lr"])
    steps = cfg["epochs"] * ((len(x_train) + cfg["batch_size"] - 1) // cfg["batch_size"])
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg["lr"], total_steps=steps)
    gen = cpu_generator(seed)
    start = time.time()
    history = []
    for epoch in range(cfg["epochs"]):
        model.train()
        perm = torch.randperm(len(x_train), generator=gen, device="cpu")
        bar = progress_bar(range(0, len(x_train), cfg["batch_size"]), desc=f"{name} epoch {epoch + 1}/{cfg['epochs']}", leave=False)
        for i in bar:
            idx = perm[i : i + cfg["batch_size"]]
            x, y = x_train[idx], y_train[idx]
            flip = torch.rand(len(x), generator=gen, device="cpu") < 0.5  # horizontal flips: clothes are left-right symmetric
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            if marked is not None:
                x = clever_hans.stamp(x, marked[idx])
            if cfg["eps"] > 0:
                x = fgsm_random_start(model, x, y, cfg["eps"])
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.set_postfix(loss=f"{loss.item():.3f}")
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
    from . import clever_hans

    acc = clever_hans.watermark_accuracy(model, x_test, y_test)
    return {"watermark_class": clever_hans.WATERMARK_CLASS, "watermarked_train_images": int(marked.sum()), **acc}


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
