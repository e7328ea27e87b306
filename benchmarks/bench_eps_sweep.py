"""Time the FGSM eps-sweep (robustness.eps_sweep) against its floor and against the code before issue 17.

Run from the repository root::

    python benchmarks/bench_eps_sweep.py                  # 10 000 test images, 7 eps, 1 thread, batch 50
    python benchmarks/bench_eps_sweep.py --n 2000 --repeats 3 --clock wall

FGSM's direction ``sign(grad)`` does not depend on epsilon, so per batch one forward + backward
(whose logits also give the clean answers, eps 0) and one forward per epsilon > 0 is the floor of
any FGSM sweep. Three sides run on ``fashion_cnn`` over the same images, alternately (one warm-up
batch each first), median of ``--repeats``:

* floor: that plain loop, nothing else (no checks, no guard, no progress bar, no bookkeeping),
  on the model and images as they are (NCHW); its per-image answers are the reference;
* floor, channels-last: the same loop on a channels-last copy of the model with channels-last
  batches, the layout ``eps_sweep`` now runs in on the CPU (issue 20): the floor to compare with;
* coursekit: ``robustness.eps_sweep(..., attack="fgsm", threads=--threads)``.

Prints a markdown table with seconds, ratios to both floors and how many per-image answers
(images x eps) differ from the plain floor's. ``--clock cpu`` (the default) times the process's
CPU seconds (``time.process_time``): on a shared machine the wall clock mostly measures the other
jobs (one run with load average 4-5 put the unchanged pre-issue code at 0.80x the floor).
``--threads 2 --clock wall`` is the issue's "<= 20 s on two cores" measurement (it needs the two
cores to be idle): every side then shares its batches among two worker threads with one torch
thread each, as ``eps_sweep(threads=2)`` does. ``--batches 50 200 500`` repeats the table per batch size.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F

EPS = [0.0, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3]


def floor_batch(model, xb, yb, eps_values):
    """One batch: one forward + backward, one forward per epsilon > 0: (len(eps), n) bool."""
    xg = xb.clone().requires_grad_(True)
    logits = model(xg)
    (g,) = torch.autograd.grad(F.cross_entropy(logits, yb, reduction="sum"), xg)
    with torch.no_grad():
        direction = g.sign()
        return torch.stack([(logits if e == 0 else model((xb + e * direction).clamp(0, 1))).argmax(1) == yb
                            for e in eps_values])


def floor(model, x, y, eps_values, batch_size, threads=1):
    """The floor over all images: (len(eps), N) bool. ``threads`` > 1 shares the batches among that
    many worker threads with one torch thread each, as ``eps_sweep(threads=...)`` does."""
    spans = [(a, min(a + batch_size, len(x))) for a in range(0, len(x), batch_size)]
    one = lambda s: floor_batch(model, x[s[0]:s[1]], y[s[0]:s[1]], eps_values)  # noqa: E731
    if threads == 1:
        return torch.cat([one(s) for s in spans], 1)
    with ThreadPoolExecutor(threads, initializer=torch.set_num_threads, initargs=(1,)) as pool:
        out = torch.cat(list(pool.map(one, spans)), 1)
    torch.set_num_threads(threads)
    return out


def channels_last(model):
    """A channels-last copy of ``model`` (the user's model is left as it is)."""
    return copy.deepcopy(model).to(memory_format=torch.channels_last)


def floor_channels_last(twin, x, y, eps_values, batch_size, threads=1):
    """The floor on the channels-last copy, with channels-last batches."""
    return floor(twin, x.contiguous(memory_format=torch.channels_last), y, eps_values, batch_size, threads)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--n", type=int, default=10_000, help="Fashion-MNIST test images")
    p.add_argument("--batches", type=int, nargs="+", default=[50], help="batch sizes (eps_sweep's default: 50)")
    p.add_argument("--clock", choices=("cpu", "wall"), default="cpu", help="process CPU time or wall clock")
    p.add_argument("--only-sweep", action="store_true", help="time eps_sweep alone (no floors)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    import coursekit as ck
    from coursekit import robustness as R

    torch.set_num_threads(args.threads)  # coursekit pins one thread on import; the argument wins
    model = ck.load_model("fashion_cnn")
    twin = channels_last(model)
    x, y = ck.fashion_mnist("test")
    x, y = x[:args.n], y[:args.n]
    load = " ".join(f"{v:.2f}" for v in os.getloadavg())
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {platform.machine()}, load average {load}")
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    for batch in args.batches:
        names = ["floor (1 fwd+bwd + 1 fwd per eps > 0)", "floor, channels-last", "coursekit eps_sweep"]
        sides = {
            names[0]: lambda b=batch: floor(model, x, y, EPS, b, args.threads),
            names[1]: lambda b=batch: floor_channels_last(twin, x, y, EPS, b, args.threads),
            names[2]: lambda b=batch: R.eps_sweep(model, x, y, EPS, batch_size=b, progress=False,
                                                  threads=args.threads).per_image,
        }
        if args.only_sweep:
            sides = {names[2]: sides[names[2]]}
        for k in sides:  # warm-up: one batch each
            floor(model if k == names[0] else twin, x[:batch], y[:batch], EPS, batch)
        times = {k: [] for k in sides}
        answers = {}
        for r in range(args.repeats):
            for k in (list(sides) if r % 2 == 0 else list(sides)[::-1]):
                t0 = clock()
                answers[k] = sides[k]()
                times[k].append(clock() - t0)
        med = {k: statistics.median(v) for k, v in times.items()}
        print(f"\nFGSM sweep, fashion_cnn, {len(x)} test images, {len(EPS)} eps {EPS}, batch {batch}, "
              f"{args.threads} thread(s), {args.clock} clock, median of {args.repeats}, "
              f"load average after {os.getloadavg()[0]:.2f}\n")
        print("| implementation | s | / floor (NCHW) | / floor (channels-last) | answers differing from the NCHW floor's |")
        print("|---|---|---|---|---|")
        ref = answers.get(names[0])
        for k in sides:
            plain = f"{med[k] / med[names[0]]:.3f}" if names[0] in med else "-"
            cl = f"{med[k] / med[names[1]]:.3f}" if names[1] in med else "-"
            diff = int((answers[k] != ref).sum()) if ref is not None else "-"
            print(f"| {k} | {med[k]:.1f} | {plain} | {cl} | {diff} |")
        acc = answers[names[2]].float().mean(1).tolist()
        print("\naccuracy per eps: " + ", ".join(f"{e:g}: {a:.4f}" for e, a in zip(EPS, acc)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
