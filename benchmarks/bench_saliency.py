"""Time coursekit's attribution methods against captum / pytorch-grad-cam on the same model and input.

Run from the repository root::

    python benchmarks/bench_saliency.py                 # efficientnet_lite0, 224 px, batch 1 and 8
    python benchmarks/bench_saliency.py --threads 2 --repeats 5 --batches 1 8

Prints a markdown table: method, batch, coursekit ms, reference ms, coursekit / reference, and
coursekit / (one forward + backward w.r.t. the input of the frozen model). The two
implementations of a pair are run alternately (after one warm-up each) and the median of the
repeats is reported, so slow drifts of the machine's load hit both sides alike.

captum's GuidedBackprop / Deconvolution / GuidedGradCam only hook ``nn.ReLU``; on
efficientnet_lite0 (ReLU6) they would silently compute plain gradients, which is cheaper and
wrong. They are timed on a twin of the model whose ReLU6 modules are ``nn.ReLU`` subclasses
computing ReLU6, so both sides do the same work (the cross-check tests show the results agree).
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import time
import warnings

import torch
import torch.nn.functional as F
from torch import nn

warnings.filterwarnings("ignore", message="Input Tensor 0 did not already require gradients")
warnings.filterwarnings("ignore", message="Setting backward hooks")


class ReLU6SeenAsReLU(nn.ReLU):
    """ReLU6 as an nn.ReLU subclass, so captum attaches its modified backward rule to it."""

    def forward(self, x):
        return F.hardtanh(x, 0.0, 6.0)


def relu6_as_relu(model: nn.Module) -> nn.Module:
    twin = copy.deepcopy(model)
    for parent in twin.modules():
        for name, child in parent.named_children():
            if type(child) is nn.ReLU6:
                setattr(parent, name, ReLU6SeenAsReLU())
    return twin


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def timed(fn, clock) -> float:
    t0 = clock()
    fn()
    return (clock() - t0) * 1000.0


def compare(ours, ref, repeats: int, clock=time.perf_counter) -> tuple[float, float]:
    """Median ms of ``ours`` and ``ref``, run alternately (ABBA order) after one warm-up each."""
    ours(), ref()
    a, b = [], []
    for i in range(repeats):
        pair = [(ours, a), (ref, b)]
        for fn, out in pair if i % 2 == 0 else pair[::-1]:
            out.append(timed(fn, clock))
    return statistics.median(a), statistics.median(b)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per method and side (median)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                        help="wall (default) or cpu: process CPU time, less sensitive to other processes' load")
    parser.add_argument("--only", nargs="*", default=None, help="run only methods whose name contains one of these")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    clock = CLOCKS[args.clock]
    torch.manual_seed(0)

    from captum import attr as ca
    from pytorch_grad_cam import GradCAM as PGC_GradCAM
    from pytorch_grad_cam import GradCAMPlusPlus as PGC_GradCAMPlusPlus
    from pytorch_grad_cam import HiResCAM as PGC_HiResCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    import coursekit
    from coursekit import cam as C
    from coursekit import saliency as S

    model = coursekit.load_model("efficientnet_lite0")
    twin = relu6_as_relu(model)
    layer = model.net.bn2
    image = coursekit.load_image("coffee", size=224)  # (1, 3, 224, 224)
    target = model.class_index("espresso")

    # settings of the multi-pass methods, identical on both sides
    SG_N, IG_STEPS, OCC_PATCH, OCC_STRIDE = 8, 8, 56, 28

    def pgc(cls, x, t):
        with cls(model=model, target_layers=[layer]) as cam:  # needs input.requires_grad on a frozen model
            return cam(input_tensor=x.clone().requires_grad_(True), targets=[ClassifierOutputTarget(t)] * len(x))

    def methods(x, t):
        n = len(x)
        return [
            ("vanilla saliency", "captum Saliency",
             lambda: S.vanilla_saliency(model, x, t),
             lambda: ca.Saliency(model).attribute(x, target=t, abs=True).amax(1)),
            ("gradient x input", "captum InputXGradient",
             lambda: S.gradient_x_input(model, x, t),
             lambda: ca.InputXGradient(model).attribute(x, target=t)),
            ("guided backprop", "captum GuidedBackprop*",
             lambda: S.guided_backprop(model, x, t),
             lambda: ca.GuidedBackprop(twin).attribute(x, target=t)),
            ("deconvnet", "captum Deconvolution*",
             lambda: S.deconvnet(model, x, t),
             lambda: ca.Deconvolution(twin).attribute(x, target=t)),
            ("Grad-CAM", "pytorch-grad-cam GradCAM",
             lambda: C.GradCAM(model)(x, t, normalize=True),
             lambda: pgc(PGC_GradCAM, x, t)),
            ("Grad-CAM (raw)", "captum LayerGradCam + upsample",
             lambda: C.GradCAM(model)(x, t),
             lambda: ca.LayerAttribution.interpolate(
                 ca.LayerGradCam(model, layer).attribute(x, target=t, relu_attributions=True), (224, 224), "bilinear")),
            ("Grad-CAM++", "pytorch-grad-cam GradCAMPlusPlus",
             lambda: C.GradCAMPlusPlus(model)(x, t, normalize=True),
             lambda: pgc(PGC_GradCAMPlusPlus, x, t)),
            ("HiResCAM", "pytorch-grad-cam HiResCAM",
             lambda: C.HiResCAM(model)(x, t, normalize=True),
             lambda: pgc(PGC_HiResCAM, x, t)),
            ("guided Grad-CAM", "captum GuidedGradCam*",
             lambda: C.guided_gradcam(model, x, t),
             lambda: ca.GuidedGradCam(twin, twin.net.bn2).attribute(x, target=t)),
            (f"SmoothGrad (n={SG_N})", "captum NoiseTunnel(Saliency)",
             lambda: S.smoothgrad(model, x, t, n_samples=SG_N, batch_size=SG_N, magnitude=True),
             lambda: ca.NoiseTunnel(ca.Saliency(model)).attribute(
                 x, nt_type="smoothgrad", nt_samples=SG_N, nt_samples_batch_size=max(1, SG_N // n), stdevs=0.15,
                 target=t)),
            (f"integrated gradients ({IG_STEPS} steps)", "captum IntegratedGradients",
             lambda: S.integrated_gradients(model, x, t, steps=IG_STEPS, batch_size=IG_STEPS),
             lambda: ca.IntegratedGradients(model).attribute(x, target=t, n_steps=IG_STEPS,
                                                             internal_batch_size=IG_STEPS)),
            (f"occlusion ({OCC_PATCH}/{OCC_STRIDE} px, 49 windows)", "captum Occlusion",
             lambda: S.occlusion(model, x, t, patch=OCC_PATCH, stride=OCC_STRIDE, batch_size=64, progress=False),
             lambda: ca.Occlusion(lambda z: model(z).softmax(1)).attribute(
                 x, sliding_window_shapes=(3, OCC_PATCH, OCC_PATCH), strides=(3, OCC_STRIDE, OCC_STRIDE),
                 baselines=0.0, target=t, perturbations_per_eval=64)),
        ]

    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    print(f"# bench_saliency: efficientnet_lite0, 224 px, torch {torch.__version__}, threads {args.threads}, "
          f"{args.clock} clock, median of {args.repeats} after 1 warm-up")
    print(f"# machine: {platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs; "
          f"load average at start {tuple(round(v, 1) for v in load) if load else 'n/a'}")
    print()
    print("| method | batch | coursekit ms | reference | reference ms | coursekit / reference | coursekit / (fwd+bwd) |")
    print("|---|---:|---:|---|---:|---:|---:|")
    for batch in args.batches:
        x = image.expand(batch, -1, -1, -1).contiguous()
        x = (x + 0.02 * torch.randn(x.shape, generator=torch.Generator().manual_seed(batch))).clamp(0, 1)

        def forward_backward(x=x):
            xi = x.detach().requires_grad_(True)
            torch.autograd.grad(model(xi)[:, target].sum(), xi)

        fb, _ = compare(forward_backward, forward_backward, args.repeats, clock)
        print(f"| one forward + backward (input grad) | {batch} | {fb:.1f} | | | | 1.00 |")
        for name, ref_name, ours, ref in methods(x, target):
            if args.only and not any(s.lower() in name.lower() for s in args.only):
                continue
            a, b = compare(ours, ref, args.repeats, clock)
            print(f"| {name} | {batch} | {a:.1f} | {ref_name} | {b:.1f} | {a / b:.2f} | {a / fb:.2f} |", flush=True)
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    print()
    print(f"# load average at end {tuple(round(v, 1) for v in load) if load else 'n/a'}")
    print("# * captum's ReLU rules run on a twin whose ReLU6 modules are nn.ReLU subclasses (captum skips ReLU6)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
