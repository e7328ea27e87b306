"""Time coursekit's PGD against foolbox and a hand-written loop, and the FGSM eps-sweep on the test set.

Run from the repository root::

    python benchmarks/bench_adversarial.py                     # efficientnet_lite0, 224 px, batch 8
    python benchmarks/bench_adversarial.py --threads 2 --repeats 3 --steps 10 --batch 8
    python benchmarks/bench_adversarial.py --clock cpu --threads 1 --skip-sweep   # process CPU time (busy machine)

Prints a markdown table. PGD (L-inf, eps 4/255, step 1/255, ``--steps`` steps, no random start so
that all three do the same arithmetic) runs on the ImageNet model three ways, alternately after one
warm-up each (the order reversed every other repeat), median of ``--repeats``:

* coursekit: ``adversarial.pgd`` (guard, input checks, the optimize engine's SignStep + projection);
* foolbox 3: ``LinfPGD(abs_stepsize, steps, random_start=False)`` on ``PyTorchModel(bounds=(0, 1))``;
* a hand loop: forward, cross-entropy, ``autograd.grad`` w.r.t. the input, sign step, clamp to the
  ball and the box; the lower bound of any PGD implementation.

Then one FGSM sweep of 7 epsilons over the 10 000 Fashion-MNIST test images (``fashion_cnn``)
with ``robustness.eps_sweep`` (one gradient per batch, one forward per epsilon), and the same
sweep done naively (``adversarial.fgsm`` once per epsilon: a gradient per epsilon).

``--full-sweeps`` then prints the tables that lecture 5 computes on a subset (notebooks/05_adversarial.ipynb,
2000 images for FGSM, 200 for PGD): FGSM and PGD (10 steps, step eps/4, random start, early stop) for
``fashion_cnn`` and ``fashion_cnn_robust`` on ``--n`` test images (default all 10 000), with the
seconds each took. ``--only-sweeps`` skips the PGD timing on the ImageNet model.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F


def hand_pgd(model, x, y, eps, step, steps):
    xa = x.clone()
    for _ in range(steps):
        xa.requires_grad_(True)
        (g,) = torch.autograd.grad(F.cross_entropy(model(xa), y, reduction="sum"), xa)
        with torch.no_grad():
            xa = (x + (xa + step * g.sign() - x).clamp(-eps, eps)).clamp(0, 1)
    return xa


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--skip-sweep", action="store_true")
    p.add_argument("--full-sweeps", action="store_true", help="FGSM + PGD tables for both Fashion networks")
    p.add_argument("--only-sweeps", action="store_true", help="only the --full-sweeps tables")
    p.add_argument("--pgd", action=argparse.BooleanOptionalAction, default=True,
                   help="include PGD in --full-sweeps (--no-pgd: FGSM only)")
    p.add_argument("--n", type=int, default=10_000, help="test images in --full-sweeps")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall", help="wall clock or process CPU time")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    import coursekit as ck
    from coursekit import adversarial as A

    print(f"torch {torch.__version__}, {args.threads} threads, {platform.machine()}, load average "
          f"{' '.join(f'{v:.1f}' for v in __import__('os').getloadavg())}")
    if args.only_sweeps:
        full_sweeps(ck, A, args.n, args.pgd)
        return 0
    import foolbox as fb

    model = ck.load_model("efficientnet_lite0")
    names = ["chelsea", "coffee", "astronaut", "rocket", "brick", "grass", "gravel", "hubble_deep_field"]
    x = torch.cat([ck.load_image(n, size=224) for n in (names * 8)[: args.batch]])
    y = A.predict_labels(model, x)
    eps, step, steps = 4 / 255, 1 / 255, args.steps
    fmodel = fb.PyTorchModel(model, bounds=(0, 1))
    attack = fb.attacks.LinfPGD(abs_stepsize=step, steps=steps, random_start=False)
    sides = {
        "coursekit": lambda: A.pgd(model, x, y, eps, steps=steps, step_size=step, random_start=False),
        "foolbox": lambda: attack(fmodel, x, y, epsilons=eps)[1],
        "hand loop": lambda: hand_pgd(model, x, y, eps, step, steps),
    }
    results = {k: [] for k in sides}
    outs = {k: fn() for k, fn in sides.items()}  # warm-up (and the agreement check below)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    for r in range(args.repeats):
        for k in list(sides) if r % 2 == 0 else list(sides)[::-1]:
            t0 = clock()
            sides[k]()
            results[k].append(clock() - t0)
    med = {k: statistics.median(v) for k, v in results.items()}
    agree = {k: float((outs[k] - outs["coursekit"]).abs().max()) for k in outs}
    print(f"\nPGD L-inf, efficientnet_lite0, batch {args.batch}, {steps} steps, median of {args.repeats}, "
          f"{args.clock} clock\n")
    print("| implementation | s | / foolbox | / hand loop | max abs diff to coursekit |")
    print("|---|---|---|---|---|")
    for k in sides:
        print(f"| {k} | {med[k]:.2f} | {med[k] / med['foolbox']:.2f} | {med[k] / med['hand loop']:.2f} | {agree[k]:.1e} |")

    if not args.skip_sweep:
        fashion = ck.load_model("fashion_cnn")
        xt, yt = ck.fashion_mnist("test")
        eps_values = [0.0, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3]
        t0 = time.perf_counter()
        sweep = ck.robustness.eps_sweep(fashion, xt, yt, eps_values, progress=False)
        t_sweep = time.perf_counter() - t0
        t0 = time.perf_counter()
        naive = [A.accuracy(fashion, A.fgsm(fashion, xt, yt, e, batch_size=500), yt) for e in eps_values]
        t_naive = time.perf_counter() - t0
        same = max(abs(a - b) for a, b in zip(sweep.accuracy, naive))
        print(f"\nFGSM sweep, fashion_cnn, 10 000 test images, {len(eps_values)} eps\n")
        print("| implementation | s | accuracies agree to |")
        print("|---|---|---|")
        print(f"| eps_sweep (one gradient per batch) | {t_sweep:.1f} | |")
        print(f"| fgsm per eps + accuracy | {t_naive:.1f} | {same:.1e} |")
    if args.full_sweeps:
        full_sweeps(ck, A, args.n, args.pgd)
    return 0


def full_sweeps(ck, A, n: int, with_pgd: bool = True) -> None:
    """The lecture's eps-sweep tables on ``n`` test images, both networks, FGSM and PGD."""
    xt, yt = ck.fashion_mnist("test")
    xt, yt = xt[:n], yt[:n]
    eps_values = [0.0, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3]
    sweeps = {}
    for name in ("fashion_cnn", "fashion_cnn_robust"):
        model = ck.load_model(name)
        sweeps[name, "FGSM"] = ck.robustness.eps_sweep(model, xt, yt, eps_values, progress=False)
        if with_pgd:
            sweeps[name, "PGD"] = ck.robustness.eps_sweep(model, xt, yt, eps_values, "pgd", steps=10, step_ratio=0.25,
                                              progress=False)
    print(f"\nAccuracy under attack, {len(xt)} Fashion-MNIST test images (PGD: 10 steps of eps/4, random start)\n")
    cols = list(sweeps)
    print("| eps | eps*255 | " + " | ".join(f"{m} {a}" for m, a in cols) + " |")
    print("|---|---|" + "---|" * len(cols))
    for i, e in enumerate(eps_values):
        print(f"| {e:.2f} | {e * 255:.1f} | " + " | ".join(f"{sweeps[c].accuracy[i]:.3f}" for c in cols) + " |")
    print("| seconds | | " + " | ".join(f"{sweeps[c].seconds:.0f}" for c in cols) + " |")


if __name__ == "__main__":
    sys.exit(main())
