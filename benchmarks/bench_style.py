"""Time lecture 6: one style-transfer step against one forward + backward of the same feature
blocks, a converged 256-px style transfer, and a 3-octave DeepDream at 320 px.

Run from the repository root::

    python benchmarks/bench_style.py                  # wall clock, coursekit's thread count (coursekit/threads.py)
    python benchmarks/bench_style.py --threads 2      # another intra-op thread count
    python benchmarks/bench_style.py --clock cpu      # process CPU time (use on a busy machine)
    python benchmarks/bench_style.py --clock cpu --step-only --repeats 41   # the step ratio alone

1. **step / (fwd+bwd)**: one evaluation of the style-transfer loss as ``style.stylize`` runs it by
   default and as lecture 6 runs it in all but one comparison (content + style terms, Gram matrices of
   the four style layers, ``tv_weight=0``), and the same step with the total-variation term added
   (``tv_weight > 0``, lecture 6's smoothing comparison), each with its gradient w.r.t. the picture, against one forward
   pass through the same layers of efficientnet_lite0 (stopped after the deepest) plus a backward pass
   of a dense gradient (fixed random tensors, one per layer output: what any real loss sends back).
   Also printed: the backward of the *sum* of the outputs (a stride-0 gradient of ones, the
   baseline of the first version of this script; it measured the same within noise). Same 256-px
   channels-last input, same extractor; run alternately after a warm-up, median of ``--repeats``.
   Target <= 1.2.
2. **converged style transfer**: ``style.stylize`` (L-BFGS) on astronaut x Hubble at 256 px for
   ``--evals`` evaluations; "converged" = the first evaluation whose best loss is within 1 % of the
   best after all of them; its time = total time x that fraction. Target <= 30 s.
3. **DeepDream**: ``dream.deepdream`` on the cat at 320 px, middle layer (blocks.3), 3 octaves x 10
   steps. Target <= 10 s.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch

import coursekit as ck
from coursekit import dream, style
from coursekit.guard import guarded
from coursekit.maximize import Context

CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def step_ratio(model, clock, repeats: int) -> tuple[float, float, float, float]:
    """Median ms of: forward + backward (dense gradient), the default step, the step with TV, fwd + bwd of the sum."""
    content_image = ck.load_image("astronaut", size=256)
    style_image = ck.load_image("hubble_deep_field", size=256)
    layers = style.default_layers(model)
    style_layers, content_layer = list(layers["style"]), layers["content"]
    all_layers = list(dict.fromkeys(style_layers + [content_layer]))
    with guarded(model), dream.layer_outputs(model, all_layers) as extract:
        with torch.no_grad():
            grams = {layer: style.gram_matrix(f)[0] for layer, f in extract(style_image).items() if layer in style_layers}
            target = extract(content_image)[content_layer]
        objective = -(style.content(content_layer, target) + 100.0 * style.style(style_layers, grams))  # stylize's default
        objective_tv = objective - 100.0 * style.smoothness()  # + tv_weight * tv_loss (lecture 6: tv_weight=100)
        x = content_image.clone().requires_grad_(True)
        with torch.no_grad():
            shapes = extract(x.contiguous(memory_format=torch.channels_last))
        generator = torch.Generator().manual_seed(0)
        dense = {layer: torch.randn(f.shape, generator=generator).contiguous(memory_format=torch.channels_last)
                 for layer, f in shapes.items()}

        def plain():  # forward through the same blocks + backward of a dense gradient at every output
            feats = extract(x.contiguous(memory_format=torch.channels_last))
            (g,) = torch.autograd.grad(list(feats.values()), x, grad_outputs=[dense[layer] for layer in feats])

        def summed():  # the same with the gradient of sum(outputs): stride-0 ones, a cheaper backward
            feats = extract(x.contiguous(memory_format=torch.channels_last))
            (g,) = torch.autograd.grad(sum(f.sum() for f in feats.values()), x)

        def step_of(loss):  # what the optimiser evaluates: the loss and its gradient
            def step():
                acts = extract(x.contiguous(memory_format=torch.channels_last))
                value = loss(Context(image=x, input=x, logits=None, activations=acts))
                (g,) = torch.autograd.grad(value.sum(), x)
            return step

        style_step, style_step_tv = step_of(objective), step_of(objective_tv)
        plain(), summed(), style_step(), style_step_tv()
        a, b, c, d = [], [], [], []
        runs = [(plain, a), (style_step, b), (style_step_tv, d), (summed, c)]
        for i in range(repeats):
            for fn, out in runs if i % 2 == 0 else runs[::-1]:
                t0 = clock()
                fn()
                out.append((clock() - t0) * 1000)
    return statistics.median(a), statistics.median(b), statistics.median(d), statistics.median(c)


def converged_transfer(model, evals: int) -> tuple[float, int, float, float]:
    content_image = ck.load_image("astronaut", size=256)
    style_image = ck.load_image("hubble_deep_field", size=256)
    r = style.stylize(model, content_image, style_image, max_evals=evals, progress=False)
    best = r.best_so_far()
    final = float(best[-1])
    k = int((best <= 1.01 * final).nonzero()[0]) + 1
    return r.seconds, k, r.seconds * k / r.evaluations, float(r.losses[0, 0]) / final


def deepdream_time(model) -> float:
    cat = ck.load_image("cat", size=320)
    return dream.deepdream(model, cat, model.layers["middle"], n_octaves=3, steps=10, progress=False).seconds


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (default: coursekit's policy, 1 on a 2-core machine)")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--evals", type=int, default=500)
    p.add_argument("--clock", choices=sorted(CLOCKS), default="wall")
    p.add_argument("--step-only", action="store_true", help="measure the step ratio only (no transfer, no DeepDream)")
    args = p.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    clock = CLOCKS[args.clock]
    model = ck.load_model("efficientnet_lite0")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"# {platform.machine()}, {os.cpu_count()} logical CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"clock={args.clock}, load average at start {load:.2f}")
    plain, step, step_tv, summed = step_ratio(model, clock, args.repeats)
    print("| measurement | value | target |\n|---|---:|---:|")
    print(f"| one forward + backward (dense gradient) of the style layers (256 px) | {plain:.1f} ms | |")
    print(f"| ... the same, backward of the sum of the outputs (stride-0 ones) | {summed:.1f} ms | |")
    print(f"| one style-transfer step (loss + gradient, 256 px; content + style, stylize's default) | {step:.1f} ms | |")
    print(f"| ... with the TV term (tv_weight > 0) | {step_tv:.1f} ms | |")
    print(f"| step / (fwd+bwd, dense gradient) | {step / plain:.3f} | <= 1.2 |")
    print(f"| step with TV / (fwd+bwd, dense gradient) | {step_tv / plain:.3f} | |")
    print(f"| step / (fwd+bwd of the sum) | {step / summed:.3f} | |")
    if args.step_only:
        print(f"# load average at the end {os.getloadavg()[0] if hasattr(os, 'getloadavg') else float('nan'):.2f}")
        return 0
    total, k, t_conv, drop = converged_transfer(model, args.evals)
    print(f"| style transfer 256 px, L-BFGS, {args.evals} evaluations (wall) | {total:.1f} s | |")
    print(f"| ... within 1 % of the final loss after (evaluations / wall s) | {k} / {t_conv:.1f} s | <= 30 s |")
    print(f"| ... loss reduction start / final | {drop:.0f}x | |")
    print(f"| DeepDream 320 px, 3 octaves x 10 steps, blocks.3 (wall) | {deepdream_time(model):.1f} s | <= 10 s |")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"# load average at the end {load:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
