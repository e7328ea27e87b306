"""Time the FGSM eps-sweep (robustness.eps_sweep) against its floor and against the code before issue 17.

Run from the repository root::

    python benchmarks/bench_eps_sweep.py                  # 10 000 test images, 7 eps, 1 thread, batch 50
    python benchmarks/bench_eps_sweep.py --n 2000 --repeats 3 --clock wall

FGSM's direction ``sign(grad)`` does not depend on epsilon, so per batch one forward + backward
(whose logits also give the clean answers, eps 0) and one forward per epsilon > 0 is the floor of
any FGSM sweep. Three sides run on ``fashion_cnn`` over the same images, alternately (one warm-up
batch each first), median of ``--repeats``:

* floor: that plain loop, nothing else (no checks, no guard, no progress bar, no bookkeeping);
* before: eps_sweep's FGSM branch as it was before issue 17 (its own copy of the FGSM step),
  with the same checks and guard as the library;
* coursekit: ``robustness.eps_sweep(..., attack="fgsm")`` (the shared step,
  ``attack_steps.input_gradient`` + ``optimize.sign_step``).

Prints a markdown table with seconds, ratios to the floor and whether the per-image answers agree.
``--clock cpu`` (the default) times the process's CPU seconds (``time.process_time``): on a shared
machine the wall clock mostly measures the other jobs (one run with load average 4-5 put the
unchanged pre-issue code at 0.80x the floor).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

EPS = [0.0, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3]


def floor(model, x, y, eps_values, batch_size):
    """One forward + backward per batch, one forward per epsilon > 0: (len(eps), N) bool."""
    correct = torch.zeros(len(eps_values), len(x), dtype=torch.bool)
    for a in range(0, len(x), batch_size):
        xb, yb = x[a:a + batch_size], y[a:a + batch_size]
        xg = xb.clone().requires_grad_(True)
        logits = model(xg)
        (g,) = torch.autograd.grad(F.cross_entropy(logits, yb, reduction="sum"), xg)
        with torch.no_grad():
            direction = g.sign()
            for i, e in enumerate(eps_values):
                out = logits if e == 0 else model((xb + e * direction).clamp(0, 1))
                correct[i, a:a + batch_size] = out.argmax(1) == yb
    return correct


def before_issue_17(model, x, y, eps_values, batch_size):
    """eps_sweep's FGSM path before issue 17: checks, guard, progress bar, its own FGSM step."""
    from coursekit.adversarial import attack_objective, check_eps
    from coursekit.guard import guarded
    from coursekit.inputs import check_images, check_model, target_indices
    from coursekit.progress import progress_bar

    check_model(model)
    x = check_images(x, model=model, pixel_range=True)
    y = target_indices(y, x.shape[0], what="label")
    eps_values = [check_eps(e) for e in eps_values]
    correct = torch.zeros(len(eps_values), len(x), dtype=torch.bool, device="cpu")
    with guarded(model, what="eps_sweep"):
        chunks = [(a, min(a + batch_size, len(x))) for a in range(0, len(x), batch_size)]
        for a, b in progress_bar(chunks, desc="fgsm sweep", progress=False, leave=False):
            xb, yb = x[a:b], y[a:b].to(x.device)
            with torch.enable_grad():
                xg = xb.detach().clone().requires_grad_(True)
                logits = model(xg)
                (g,) = torch.autograd.grad(attack_objective(logits, yb, "ce").sum(), xg)
            clean = (logits.detach().argmax(1) == yb).cpu()
            direction = g.sign()
            with torch.no_grad():
                for i, e in enumerate(eps_values):
                    correct[i, a:b] = clean if e == 0 else (model((xb + e * direction).clamp(0, 1)).argmax(1) == yb).cpu()
    return correct


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--n", type=int, default=10_000, help="Fashion-MNIST test images")
    p.add_argument("--batch", type=int, default=50, help="eps_sweep's default batch size")
    p.add_argument("--clock", choices=("cpu", "wall"), default="cpu", help="process CPU time or wall clock")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    import coursekit as ck
    from coursekit import robustness as R

    torch.set_num_threads(args.threads)  # coursekit pins one thread on import; the argument wins
    model = ck.load_model("fashion_cnn")
    x, y = ck.fashion_mnist("test")
    x, y = x[:args.n], y[:args.n]
    sides = {
        "floor (1 fwd+bwd + 1 fwd per eps > 0)": lambda: floor(model, x, y, EPS, args.batch),
        "before issue 17": lambda: before_issue_17(model, x, y, EPS, args.batch),
        "coursekit eps_sweep": lambda: R.eps_sweep(model, x, y, EPS, batch_size=args.batch, progress=False).per_image,
    }
    for fn in (lambda: floor(model, x[:args.batch], y[:args.batch], EPS, args.batch),):
        fn()  # warm-up
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    times = {k: [] for k in sides}
    answers = {}
    for r in range(args.repeats):
        order = list(sides) if r % 2 == 0 else list(sides)[::-1]
        for k in order:
            t0 = clock()
            answers[k] = sides[k]()
            times[k].append(clock() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    ref = answers["floor (1 fwd+bwd + 1 fwd per eps > 0)"]
    load = " ".join(f"{v:.1f}" for v in os.getloadavg())
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {platform.machine()}, load average {load}")
    print(f"\nFGSM sweep, fashion_cnn, {len(x)} test images, {len(EPS)} eps {EPS}, batch {args.batch}, "
          f"{args.clock} clock, median of {args.repeats}\n")
    print("| implementation | s | / floor | per-image answers = floor's |")
    print("|---|---|---|---|")
    for k in sides:
        print(f"| {k} | {med[k]:.1f} | {med[k] / med[next(iter(sides))]:.3f} | {torch.equal(answers[k], ref)} |")
    acc = answers["coursekit eps_sweep"].float().mean(1).tolist()
    print("\naccuracy per eps: " + ", ".join(f"{e:g}: {a:.4f}" for e, a in zip(EPS, acc)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
