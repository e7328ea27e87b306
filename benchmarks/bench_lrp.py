"""Time coursekit's LRP against zennit on the same composite, model and input, and against one forward+backward.

Run from the repository root::

    python benchmarks/bench_lrp.py                         # wall clock, 2 threads, batch 1 and 8
    python benchmarks/bench_lrp.py --clock cpu --repeats 5  # process CPU time (busy machine)

Prints a markdown table: model, composite, batch, coursekit ms, zennit ms, coursekit / zennit, and
coursekit / (one forward + backward w.r.t. the input of the frozen model). Pairs run alternately
(ABBA, one warm-up each); the median of the repeats is reported.

Set-up, as in tests/test_crosscheck_lrp.py: zennit runs on the network behind the normalisation
with the normalised input (its ZBox bounds in normalised units), relevance at the top = the logit.
On efficientnet_lite0 coursekit runs with its EfficientNetCanonizer (batch-norm merged, explicit
sums, undone afterwards: that work is included in the time); zennit has no canonizer for timm's
blocks and runs on the model as it is, so that row compares different amounts of work.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time

import torch

CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def _zennit(model, composite):
    def run(x, t):
        xn = model.normalize(x).detach().requires_grad_(True)
        with composite.context(model.net) as net:
            out = net(xn)
            start = torch.zeros_like(out)
            idx = torch.arange(len(x))
            start[idx, t] = out[idx, t].detach()
            (r,) = torch.autograd.grad(out, xn, start)
        return r

    return run


def _forward_backward(model):
    def run(x, t):
        xi = x.detach().clone().requires_grad_(True)
        out = model(xi)
        (g,) = torch.autograd.grad(out[torch.arange(len(x)), t].sum(), xi)
        return g

    return run


def _median(fns, x, t, repeats, clock):
    times = {k: [] for k in fns}
    for f in fns.values():
        f(x, t)  # warm-up
    order = list(fns)
    for r in range(repeats):
        for k in order if r % 2 == 0 else reversed(order):
            t0 = clock()
            fns[k](x, t)
            times[k].append((clock() - t0) * 1000.0)
    return {k: statistics.median(v) for k, v in times.items()}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--clock", choices=sorted(CLOCKS), default="wall")
    p.add_argument("--models", nargs="+", default=["fashion_cnn", "vgg11-random", "efficientnet_lite0"])
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    import torchvision
    from zennit import composites as zc

    import coursekit as ck
    from coursekit import lrp as L
    from coursekit.models import CourseModel

    clock = CLOCKS[args.clock]
    rows = []
    for name in args.models:
        if name == "vgg11-random":
            torch.manual_seed(0)
            net = torchvision.models.vgg11(weights=None).eval().requires_grad_(False)
            model = CourseModel(net, name=name, classes=[str(i) for i in range(1000)], input_size=(3, 224, 224),
                                mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), layers={}).eval()
            image = torch.rand(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
        elif name == "fashion_cnn":
            model = ck.load_model(name)
            image = ck.fashion_mnist("test")[0][:1]
        else:
            model = ck.load_model(name)
            image = ck.load_image("coffee", size=224)
        mean, std = model.normalize.mean, model.normalize.std
        low, high = (0 - mean) / std, (1 - mean) / std
        pairs = {"EpsilonPlusFlat": zc.EpsilonPlusFlat(), "EpsilonGammaBox": zc.EpsilonGammaBox(low=low, high=high)}
        for batch in args.batches:
            x = image.repeat(batch, 1, 1, 1)
            with torch.no_grad():
                t = model(x).argmax(1)
            for comp, theirs in pairs.items():
                ours = L.make_composite(comp)
                fns = {
                    "coursekit": lambda x, t, ours=ours, model=model: L.lrp(model, x, t, ours),
                    "zennit": _zennit(model, theirs),
                    "fwd+bwd": _forward_backward(model),
                }
                ms = _median(fns, x, t, args.repeats, clock)
                rows.append((name, comp, batch, ms["coursekit"], ms["zennit"], ms["coursekit"] / ms["zennit"],
                             ms["coursekit"] / ms["fwd+bwd"]))
                print(f"{name} {comp} batch {batch}: {ms}", file=sys.stderr, flush=True)

    print(f"\n{args.clock} clock, {args.threads} threads, median of {args.repeats}, torch {torch.__version__}, "
          f"{platform.processor() or platform.machine()}\n")
    print("| model | composite | batch | coursekit ms | zennit ms | coursekit / zennit | coursekit / (fwd+bwd) |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]:.1f} | {r[4]:.1f} | {r[5]:.2f} | {r[6]:.2f} |")


if __name__ == "__main__":
    main()
