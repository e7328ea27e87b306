"""Time coursekit's LRP against zennit on the same composite, model and input, and against one forward+backward.

Run from the repository root::

    python benchmarks/bench_lrp.py                         # wall clock, 2 threads, batch 1 and 8
    python benchmarks/bench_lrp.py --clock cpu --repeats 5  # process CPU time (busy machine)
    python benchmarks/bench_lrp.py --floor --clock cpu --threads 1 --repeats 3  # the floor (issue 20)

Prints a markdown table: model, composite, batch, coursekit ms, zennit ms, coursekit / zennit, and
coursekit / (one forward + backward w.r.t. the input of the frozen model). Pairs run alternately
(ABBA, one warm-up each); the median of the repeats is reported.

Set-up, as in tests/test_crosscheck_lrp.py: zennit runs on the network behind the normalisation
with the normalised input (its ZBox bounds in normalised units), relevance at the top = the logit.
On efficientnet_lite0 coursekit runs with its EfficientNetCanonizer (batch-norm merged, explicit
sums, undone afterwards: that work is included in the time); zennit has no canonizer for timm's
blocks and runs on the model as it is, so that row compares different amounts of work.

``--floor`` (issue 20) times, instead of zennit, the work the rules cannot avoid with no Python engine
around it: the canonized model's forward keeping the activations, and per Conv / Linear layer the
modified forward(s) and vector-Jacobian product(s) its rule requires by definition (plus the rule's
element-wise division and product), as plain torch calls in a loop. The number of each is counted
per layer from the real activations of one LRP call (which input sign parts are non-zero, whether
relevance reaches negative outputs) and printed. Prints coursekit / floor (the engine's overhead) and
floor / (fwd+bwd) (what the maths costs against one forward + backward).
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


# ----------------------------------------------------------------------------------------------
# the floor: what each rule requires, as plain torch calls (--floor)


def _record_layers(model, x, t, composite):
    """One LRP call on the (already canonized) model; per Conv/Linear layer (module, rule, x, z, R at the output)."""
    from coursekit import lrp as L

    records = []
    original = L.LRPRule.__dict__["backward"]

    def recording(self, module, inputs, output, grad_out):
        if isinstance(getattr(module, "weight", None), torch.Tensor):
            records.append((module, self, inputs[0].detach(), output.detach(), grad_out.detach()))
        return original(self, module, inputs, output, grad_out)

    L.LRPRule.backward = recording
    try:
        L.lrp(model, x, t, composite, canonizers=None)
    finally:
        L.LRPRule.backward = original
    return records[::-1]  # bottom-up order of the backward pass reversed: the forward's order


def _same_pads(module, x):
    """timm Conv2dSame: the TensorFlow "same" padding (left, right, top, bottom) for input ``x``."""
    pads = [max((-(-n // s) - 1) * s + (k - 1) * d + 1 - n, 0)
            for n, k, s, d in zip(x.shape[-2:], module.kernel_size, module.stride, module.dilation)]
    return [pads[1] // 2, pads[1] - pads[1] // 2, pads[0] // 2, pads[0] - pads[0] // 2]


def _layer_maps(module, x):
    """``(pad, forward(v, w, b), product(like, w, s), crop)`` of a Conv/Linear layer as plain torch calls.

    timm's ``Conv2dSame`` pads its input by a size-dependent amount: ``pad`` does that once (on the stored
    activation and the bounds), the forward and product then run unpadded, ``crop`` cuts the product back.
    """
    import torch.nn.functional as F
    from torch import nn

    if isinstance(module, nn.Linear):
        return (lambda v: v), (lambda v, w, b: F.linear(v, w, b)), (lambda like, w, s: s @ w), (lambda g: g)
    same = type(module).__name__ == "Conv2dSame"
    pads = _same_pads(module, x) if same else [0, 0, 0, 0]
    padding = [0] * (x.dim() - 2) if same else module.padding
    padding = [padding] * (x.dim() - 2) if isinstance(padding, int) else list(padding)
    conv = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}[x.dim()]
    zeros = [0] * (x.dim() - 2)

    def pad(v):
        return F.pad(v, pads) if same else v

    def crop(g):
        return g[..., pads[2]:g.shape[-2] - pads[3], pads[0]:g.shape[-1] - pads[1]] if same else g

    def forward(v, w, b):
        return conv(v, w, b, module.stride, padding, module.dilation, module.groups)

    pointwise = (type(module) is nn.Conv2d and x.shape[0] == 1 and module.kernel_size == (1, 1) and module.groups == 1
                 and module.stride == (1, 1) and tuple(padding) == (0, 0) and module.dilation == (1, 1))

    def product(like, w, s):
        if pointwise and s.is_contiguous(memory_format=torch.channels_last) and not s.is_contiguous():
            n, o, h, wd = s.shape  # one image, 1x1: a matrix product of the (H W, out) view (faster than THNN)
            return (s.permute(0, 2, 3, 1).reshape(h * wd, o) @ w.reshape(o, -1)).view(1, h, wd, -1).permute(0, 3, 1, 2)
        return torch.ops.aten.convolution_backward(s, like, w, None, module.stride, padding, module.dilation, False,
                                                   zeros, module.groups, [True, False, False])[0]

    return pad, forward, product, crop


def _required(module, rule, x, z, r):
    """The terms a rule needs on this layer's real values: ``(kind, groups, (forwards, products))``.

    A group is ``(mask, scale, [(input part, weight, bias), ...], reuse)``; ``mask`` is +1 / -1 (outputs
    of that sign) or 0 (all), ``reuse``: the layer's stored output is the group's denominator (no forward).
    Sign parts of the input that are all zero, and a group no relevance reaches, need nothing.
    """
    from coursekit import lrp as L

    w = module.weight.detach()
    b = module.bias.detach() if module.bias is not None and getattr(rule, "bias", True) else None
    if isinstance(rule, L.ZBox):
        return "zbox", None, (2, 3)  # x w is the stored output; l w+ + h w-; products with w, w+, w-
    if isinstance(rule, L.Flat):
        return "terms", [(0, 1.0, [("ones", torch.ones_like(w))], None, False)], (1, 1)
    if type(rule) is L.Epsilon:
        return "terms", [(0, 1.0, [("x", w)], b, True)], (0, 1)
    parts = ([1] if bool(x.amax() > 0) else []) + ([-1] if bool(x.amin() < 0) else [])  # x+, x- not all zero
    wp, wn = w.clamp(min=0), w.clamp(max=0)
    bp, bn = (None, None) if b is None else (b.clamp(min=0), b.clamp(max=0))
    if isinstance(rule, L.Gamma):
        g = rule.gamma
        up, down = (w + g * wp, None if b is None else b + g * bp), (w + g * wn, None if b is None else b + g * bn)
        pairs = [(1, up, down)] + ([(-1, down, up)] if bool((r * (z < 0)).any()) else [])  # relevance at z < 0?
        groups = [(m, 1.0, [(p, (on_pos if p > 0 else on_neg)[0]) for p in parts], on_pos[1], False)
                  for m, on_pos, on_neg in pairs]
    elif isinstance(rule, L.AlphaBeta):
        groups = [(0, s, [(p, (on_pos if p > 0 else on_neg)[0]) for p in parts], on_pos[1], False)
                  for s, on_pos, on_neg in ((rule.alpha, (wp, bp), (wn, bn)), (-rule.beta, (wn, bn), (wp, bp))) if s]
    else:
        raise ValueError(f"no floor for rule {rule!r}")
    n = sum(len(terms) for _, _, terms, _, _ in groups)
    return "terms", groups, (n, n)


def _floor_layer(kind, groups, module, x, z, r, rule):
    """A function running one layer's required work on its stored input ``x`` and returning the relevance at ``x``.

    The modified weights depend on the weights only and are made once, outside the timed work; the sign
    parts of ``x`` are taken inside it. Several (group, sign part) pairs of a plain layer run stacked (one
    forward, one product, the same multiply-adds in fewer calls), as coursekit does.
    """
    from torch import nn

    pad, forward, product, crop = _layer_maps(module, x)
    eps = torch.tensor(getattr(rule, "stabilizer", 1e-6))

    def stab(v):
        return v + torch.copysign(eps, v + 0.0)

    if kind == "zbox":
        w = module.weight.detach()
        lo, hi = (pad(bound(x[:1])) for bound in (rule._lower, rule._upper))
        stacked_x, stacked_w = torch.cat([lo, hi], 1), torch.cat([w.clamp(min=0), w.clamp(max=0)], 1)
        b = module.bias.detach() if module.bias is not None else None
        bb = None if b is None else b.clamp(min=0) + b.clamp(max=0)
        xp = pad(x)
        like = xp.new_empty((x.shape[0], 3 * x.shape[1], *xp.shape[2:]))
        w3 = torch.cat([w, *stacked_w.split(w.shape[1], 1)], 1)

        def run_box():
            s = r / stab(z - forward(stacked_x, stacked_w, bb))
            gx, gl, gh = product(like, w3, s).split(x.shape[1], 1)
            return crop(xp * gx - lo * gl - hi * gh)

        return run_box
    signed = bool(x.amin() < 0)
    ones = pad(torch.ones_like(x))

    def part(p):
        if p == "ones":
            return ones
        return pad(x if p == "x" or p == 1 and not signed else x.clamp(min=0) if p == 1 else x.clamp(max=0))

    def mask(m):
        return r if m == 0 else r * (z.clamp(min=0) if m > 0 else z.clamp(max=0).neg()).sign()

    pairs = [p for _, _, terms, _, _ in groups for p, _ in terms]
    if len(pairs) > 1 and set(pairs) <= {1, -1} and getattr(module, "groups", 1) == 1 \
            and not (isinstance(module, nn.Linear) and x.dim() != 2):
        signs = [p for p, _ in groups[0][2]]
        w_st = torch.cat([torch.cat([wk for _, wk in terms], 1) for _, _, terms, _, _ in groups], 0)
        b_st = None if groups[0][3] is None else torch.cat([bk for *_, bk, _ in groups])
        c_out = module.weight.shape[0]

        def run_stacked():
            xs = torch.cat([part(p) for p in signs], 1) if len(signs) > 1 else part(signs[0])
            zs = forward(xs, w_st, b_st).split(c_out, 1)
            s = torch.cat([(mask(m) if scale == 1 else scale * mask(m)) / stab(zg)
                           for (m, scale, *_), zg in zip(groups, zs)], 1)
            out = xs * product(xs, w_st, s)
            if len(signs) == 1:
                return crop(out)
            pos, neg = out.split(x.shape[1], 1)
            return crop(pos + neg)

        return run_stacked

    def run():
        out = None
        for m, scale, terms, bias, reuse in groups:
            inputs = [part(p) for p, _ in terms]
            zg = z if reuse else None
            if zg is None:
                for i, (v, (_, wk)) in enumerate(zip(inputs, terms)):
                    zk = forward(v, wk, bias if i == 0 else None)
                    zg = zk if zg is None else zg + zk
            s = mask(m) / stab(zg)
            for v, (_, wk) in zip(inputs, terms):
                c = v * product(v, wk, s)
                c = c if scale == 1 else scale * c
                out = c if out is None else out + c
        return crop(out)

    return run


def _floor(model, x, t, composite):
    """The floor function for ``lrp(model, x, t, composite)`` and its counts, on a canonized copy of ``model``."""
    import copy

    from torch import nn

    from coursekit import lrp as L

    model = copy.deepcopy(model).eval()
    for c in L.default_canonizers(model):
        c.apply(model)  # the copy stays canonized (batch-norm merged, explicit sums)
    model.eval()  # the canonizers' new containers too
    records = _record_layers(model, x, t, composite)
    stored: list = []

    def keep(module, inputs, output):
        stored.append((inputs[0], output))

    for m in model.modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
            m.register_forward_hook(keep)
    counts, steps, error = [], [], 0.0
    for module, rule, xi, z, r in records:
        kind, groups, (nf, nprod) = _required(module, rule, xi, z, r)
        counts.append((type(module).__name__, repr(rule), nf, nprod))
        steps.append(_floor_layer(kind, groups, module, xi, z, r, rule))
        with torch.no_grad():  # the floor computes the rule's own relevance: compare with coursekit's
            ours = type(rule).backward(rule, module, (xi,), z, r)[0]
            error = max(error, float((steps[-1]() - ours).abs().max() / ours.abs().max().clamp(min=1e-30)))
    counts.append(("check", f"max |floor - rule| / max |rule| = {error:.1e}", 0, 0))

    def run(x, t):
        stored.clear()
        with torch.no_grad():
            model(x)  # the forward, activations kept
            for step in reversed(steps):
                step()

    return run, counts


def _count_line(counts) -> str:
    by_kind: dict = {}
    check = counts[-1][1]
    counts = counts[:-1]
    for _, rule, nf, npr in counts:
        k = by_kind.setdefault(rule, [0, 0, 0])
        k[0] += 1
        k[1] += nf
        k[2] += npr
    parts = "; ".join(f"{rule}: {n} layers, {nf} fwd, {npr} products" for rule, (n, nf, npr) in by_kind.items())
    nf, npr = sum(c[2] for c in counts), sum(c[3] for c in counts)
    return f"{len(counts)} layers: {nf} modified forwards + {npr} products (fwd+bwd: {len(counts)} + {len(counts)}); {parts}; {check}"


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
    p.add_argument("--floor", action="store_true",
                   help="time the rules' required work as plain torch calls instead of zennit (issue 20)")
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
                fns = {"coursekit": lambda x, t, ours=ours, model=model: L.lrp(model, x, t, ours)}
                if args.floor:
                    fns["floor"], counts = _floor(model, x, t, ours)
                else:
                    fns["zennit"] = _zennit(model, theirs)
                fns["fwd+bwd"] = _forward_backward(model)
                ms = _median(fns, x, t, args.repeats, clock)
                if args.floor:
                    rows.append((name, comp, batch, ms["coursekit"], ms["floor"], ms["fwd+bwd"],
                                 _count_line(counts)))
                else:
                    rows.append((name, comp, batch, ms["coursekit"], ms["zennit"], ms["coursekit"] / ms["zennit"],
                                 ms["coursekit"] / ms["fwd+bwd"]))
                print(f"{name} {comp} batch {batch}: {ms}", file=sys.stderr, flush=True)

    print(f"\n{args.clock} clock, {args.threads} threads, median of {args.repeats}, torch {torch.__version__}, "
          f"{platform.processor() or platform.machine()}\n")
    if args.floor:
        print("| model | composite | batch | coursekit ms | floor ms | fwd+bwd ms | coursekit / floor | floor / (fwd+bwd) "
              "| coursekit / (fwd+bwd) |")
        print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
        for r in rows:
            print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]:.1f} | {r[4]:.1f} | {r[5]:.1f} | {r[3] / r[4]:.2f} | "
                  f"{r[4] / r[5]:.2f} | {r[3] / r[5]:.2f} |")
        print("\nWork per call (from the activations of one LRP call):\n")
        for r in rows:
            print(f"- {r[0]}, {r[1]}, batch {r[2]}: {r[6]}")
        return
    print("| model | composite | batch | coursekit ms | zennit ms | coursekit / zennit | coursekit / (fwd+bwd) |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]:.1f} | {r[4]:.1f} | {r[5]:.2f} | {r[6]:.2f} |")


if __name__ == "__main__":
    main()
