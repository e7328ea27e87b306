"""Which ImageNet classes the class-visualisation exercise can fairly ask for (coursekit.checks.maxresp).

The check ``maxresp.class_visualization`` runs a student's loop for 30 steps at 128 px on efficientnet_lite0 and
asks for p(target) >= 0.9. The solution's loop (Adam on the class logit, lr 0.05, from grey plus noise) gets there for
most classes but not all: on 2026-12-07 a fresh clone's grading test drew "macaque" (373) for one student and the
solution reached p = 0.856 there, and this sweep found classes the loop does not reach at all in 30 steps (p < 0.01).
The check therefore never draws a class in ``maxresp.HARD_CLASSES``: the classes where this loop stays below
``--margin`` (0.999) after 30 steps, so that the rounding of another CPU or a student's own start leaves a wide margin
above 0.9 on every class it does draw. This script recomputes that list (prints it as a Python tuple and a summary)::

    python tests/reachable_classes.py            # all 1000 classes, ~20 min on one core
    python tests/reachable_classes.py --classes 0 100   # a range, for a quick look

The loop is run on a batch of classes at once: batch norm is in eval mode and Adam is element-wise, so each picture
follows the trajectory it would follow alone up to float rounding, which this chaotic optimisation amplifies near the
threshold ("macaque": 0.981 here, 0.856 alone); hence the margin.
"""

from __future__ import annotations

import argparse
import time

import torch

from coursekit.models import load_model


def class_probabilities(model, targets: torch.Tensor, steps: int = 30, size: int = 128, lr: float = 0.05,
                        seed: int = 0) -> torch.Tensor:
    """p(target) after ``steps`` Adam steps on each target's logit, from the solution's start: (len(targets),)."""
    g = torch.Generator().manual_seed(seed)
    start = (0.5 + 0.1 * torch.randn(1, 3, size, size, generator=g)).clamp(0, 1)  # (1, 3, size, size)
    x = start.repeat(len(targets), 1, 1, 1).requires_grad_(True)  # (T, 3, size, size)
    optimizer = torch.optim.Adam([x], lr=lr)
    for _ in range(steps):
        optimizer.zero_grad()
        (-model(x).gather(1, targets[:, None]).sum()).backward()
        optimizer.step()
        with torch.no_grad():
            x.clamp_(0, 1)
    with torch.no_grad():
        return model(x).softmax(1).gather(1, targets[:, None])[:, 0]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--classes", type=int, nargs=2, default=(0, 1000), metavar=("FIRST", "END"))
    p.add_argument("--margin", type=float, default=0.999, help="a class is hard when p stays below this")
    p.add_argument("--batch", type=int, default=100)
    args = p.parse_args(argv)
    model = load_model("efficientnet_lite0").eval().requires_grad_(False)
    probs, t0 = {}, time.perf_counter()
    for first in range(args.classes[0], args.classes[1], args.batch):
        targets = torch.arange(first, min(first + args.batch, args.classes[1]))
        probs.update(zip(targets.tolist(), class_probabilities(model, targets).tolist()))
        print(f"# classes {first}-{int(targets[-1])} done, {time.perf_counter() - t0:.0f} s", flush=True)
    hard = sorted(t for t, v in probs.items() if v < args.margin)
    below = sum(v < 0.9 for v in probs.values())
    print(f"# {len(probs)} classes: {below} below 0.9, {len(hard)} below {args.margin} after 30 steps")
    for t in hard:
        print(f"#   {t:4d} {model.classes[t]!r}: p = {probs[t]:.3f}")
    print(f"HARD_CLASSES = {tuple(hard)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
