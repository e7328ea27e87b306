"""Cross-checks of coursekit.saliency / coursekit.cam against captum and pytorch-grad-cam.

Every comparison runs both implementations on the SAME model and input; tolerances are given in
each assert (relative to the largest magnitude of the reference map where the scale varies).
efficientnet_lite0 at 224 px is used for saliency, guided backprop and Grad-CAM (the ReLU6 and
frozen-model traps live there); fashion_cnn (28 px) for the rest, to keep the runtime low.
"""

import importlib.util
from pathlib import Path

# the reference libraries are in the dev extra: a missing one must fail the run, not skip it
import captum.attr as captum_attr
import pytest
import pytorch_grad_cam
import torch
import torch.nn.functional as F
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn

from coursekit import cam as C
from coursekit import saliency as S
from coursekit.images import load_image

pytestmark = pytest.mark.filterwarnings(
    "ignore:Input Tensor 0 did not already require gradients", "ignore:Setting backward hooks"
)


@pytest.fixture(scope="module")
def xs(fashion_test):
    return fashion_test[0][:4].clone()  # (4, 1, 28, 28)


@pytest.fixture(scope="module")
def coffee(effnet):
    x = load_image("coffee", size=224)  # (1, 3, 224, 224)
    return x, effnet.class_index("espresso")


def close(got, ref, rel, what=""):
    """|got - ref| <= rel * max|ref| everywhere."""
    scale = ref.abs().max().item()
    err = (got - ref).abs().max().item()
    print(f"CROSSCHECK {what}: {err / scale:.2e} (tol {rel})")
    assert err <= rel * scale, f"{what}: max |difference| {err:.3g} > {rel} * max|reference| {scale:.3g}"


# -- plain gradients --------------------------------------------------------------------------


def test_saliency_vs_captum_on_efficientnet(effnet, coffee):
    x, t = coffee
    ref = captum_attr.Saliency(effnet).attribute(x.clone(), target=t, abs=True).amax(dim=1)  # (1, 224, 224)
    close(S.vanilla_saliency(effnet, x, t), ref, 1e-5, "vanilla saliency")


def test_integrated_gradients_vs_captum(fashion, xs):
    ig = captum_attr.IntegratedGradients(fashion)
    targets = [0, 3, 5, 9]
    ref = ig.attribute(xs, baselines=0.0, target=targets, n_steps=32, method="gausslegendre")
    got = S.integrated_gradients(fashion, xs, targets, steps=32, batch_size=40, method="gausslegendre")
    close(got, ref, 1e-4, "integrated gradients (gausslegendre)")
    # captum's trapezoid puts the points at linspace(0, 1, n) but uses step 1/n (weights sum to
    # (n-1)/n); coursekit uses the textbook step 1/(n-1). Same points, so they differ by n/(n-1).
    ref = ig.attribute(xs, baselines=0.0, target=targets, n_steps=32, method="riemann_trapezoid")
    got = S.integrated_gradients(fashion, xs, targets, steps=32, batch_size=40, method="riemann_trapezoid")
    close(got, ref * 32 / 31, 1e-4, "integrated gradients (riemann_trapezoid)")


def test_gradient_x_input_vs_captum(fashion, xs):
    ref = captum_attr.InputXGradient(fashion).attribute(xs.clone(), target=2)
    close(S.gradient_x_input(fashion, xs, 2), ref, 1e-5, "gradient x input")


# -- SmoothGrad: same noise for both -------------------------------------------------------------


@pytest.mark.parametrize("magnitude", [True, False])
def test_smoothgrad_vs_captum_noise_tunnel(fashion, xs, magnitude):
    """captum's NoiseTunnel draws ``torch.normal(0, sigma)`` of shape (N * n, C, H, W) from the global
    RNG for ``x.repeat_interleave(n, 0)``. We seed the global RNG, let captum run, then re-seed and
    draw the same tensor ourselves and pass it to coursekit as ``noise`` (reshaped to (N, n, C, H, W))."""
    n, sigma = 6, 0.15  # captum takes an absolute sigma: images are in [0, 1]
    nt = captum_attr.NoiseTunnel(captum_attr.Saliency(fashion))
    torch.manual_seed(1234)
    ref = nt.attribute(xs.clone(), nt_type="smoothgrad", nt_samples=n, stdevs=sigma, target=7, abs=magnitude)
    torch.manual_seed(1234)
    noise = torch.normal(0, torch.tensor(sigma).repeat((xs.shape[0] * n, *xs.shape[1:])))
    got = S.smoothgrad(fashion, xs, 7, noise=noise.view(xs.shape[0], n, *xs.shape[1:]), batch_size=10, magnitude=magnitude)
    close(got, ref, 1e-5, "smoothgrad")


# -- Guided backprop and deconvnet --------------------------------------------------------------


def test_guided_backprop_and_deconvnet_vs_captum_on_fashion(fashion, xs):
    # fashion_cnn uses only nn.ReLU modules: captum hooks all of them
    close(S.guided_backprop(fashion, xs, 4), captum_attr.GuidedBackprop(fashion).attribute(xs.clone(), target=4), 1e-5,
          "guided backprop")
    close(S.deconvnet(fashion, xs, 4), captum_attr.Deconvolution(fashion).attribute(xs.clone(), target=4), 1e-5, "deconvnet")


def _relu6_as_relu(model):
    """A twin whose ReLU6 modules captum sees as nn.ReLU: the helper the saliency benchmark times with."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_saliency.py"
    spec = importlib.util.spec_from_file_location("bench_saliency", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench.relu6_as_relu(model)


def test_guided_backprop_handles_relu6_where_captum_skips_it(effnet, coffee):
    x, t = coffee
    assert any(type(m) is nn.ReLU6 for m in effnet.modules())
    assert not any(type(m) is nn.ReLU for m in effnet.modules())
    ours = S.guided_backprop(effnet, x, t)
    # 1) the trap: captum leaves ReLU6 alone, so its "guided backprop" is the plain gradient here
    captum_plain = captum_attr.GuidedBackprop(effnet).attribute(x.clone(), target=t)
    close(captum_plain, S.input_gradient(effnet, x, t), 1e-5, "captum on ReLU6 = plain gradient")
    assert (ours - captum_plain).abs().max() > 0.1 * captum_plain.abs().max(), "coursekit must modify ReLU6"
    # 2) captum on a twin whose ReLU6 modules are nn.ReLU subclasses computing ReLU6: same rule as ours
    #    (captum returns relu(grad_input) = relu(grad_out) * [0 < z < 6])
    twin = _relu6_as_relu(effnet)
    close(ours, captum_attr.GuidedBackprop(twin).attribute(x.clone(), target=t), 1e-4, "guided backprop, ReLU6")
    close(S.deconvnet(effnet, x, t), captum_attr.Deconvolution(twin).attribute(x.clone(), target=t), 1e-4,
          "deconvnet, ReLU6")


# -- Occlusion --------------------------------------------------------------------------------


@pytest.mark.parametrize("patch,stride,score", [(7, 7, "prob"), (8, 6, "prob"), (6, 4, "logit")])
def test_occlusion_vs_captum(fashion, xs, patch, stride, score):
    """captum's Occlusion divides the summed score drops by the number of windows covering each
    pixel (the same convention as coursekit) and uses the same window grid, last window cropped."""
    forward = (lambda x: fashion(x).softmax(dim=1)) if score == "prob" else fashion
    ref = captum_attr.Occlusion(forward).attribute(
        xs, sliding_window_shapes=(1, patch, patch), strides=(1, stride, stride), baselines=0.0, target=6,
        perturbations_per_eval=32,
    )[:, 0]  # (N, H, W)
    got = S.occlusion(fashion, xs, 6, patch=patch, stride=stride, baseline=0.0, batch_size=50, progress=False, score=score)
    close(got, ref, 1e-4, "occlusion")


# -- Grad-CAM ---------------------------------------------------------------------------------


def test_gradcam_vs_captum_layer_gradcam(effnet, coffee):
    x, t = coffee
    layer = effnet.net.bn2
    low = captum_attr.LayerGradCam(effnet, layer).attribute(x.clone(), target=t, relu_attributions=True)  # (1,1,7,7)
    ref = captum_attr.LayerAttribution.interpolate(low, (224, 224), interpolate_mode="bilinear")[:, 0]
    got = C.GradCAM(effnet)(x, t)  # default layer: net.bn2
    close(got, ref, 1e-5, "Grad-CAM vs captum LayerGradCam")


def test_gradcam_vs_pytorch_grad_cam(effnet, coffee, fashion, xs):
    """pytorch-grad-cam min-max scales each map (at 7x7, then again after cv2.resize); min-max scaling
    commutes with bilinear resizing (an affine map per pixel), so compare with normalize=True.
    It backpropagates from the score and needs the input to require grad on a frozen model."""
    x, t = coffee
    with pytorch_grad_cam.GradCAM(model=effnet, target_layers=[effnet.net.bn2]) as ref_cam:
        ref = ref_cam(input_tensor=x.clone().requires_grad_(True), targets=[ClassifierOutputTarget(t)])
    got = C.GradCAM(effnet)(x, t, normalize=True)
    # 1e-5: cv2's float bilinear resize vs torch's, plus pytorch-grad-cam's 1e-7 in the scaling
    close(got, torch.from_numpy(ref), 1e-5, "Grad-CAM vs pytorch-grad-cam (efficientnet_lite0)")

    layer = fashion.net.features[8]
    with pytorch_grad_cam.GradCAM(model=fashion, target_layers=[layer]) as ref_cam:
        ref = ref_cam(input_tensor=xs.clone().requires_grad_(True), targets=[ClassifierOutputTarget(1)] * len(xs))
    close(C.GradCAM(fashion)(xs, 1, normalize=True), torch.from_numpy(ref), 1e-5, "Grad-CAM vs pytorch-grad-cam (fashion)")


class GradCAMPlusPlusWithEps(C.GradCAMPlusPlus):
    """Grad-CAM++ with pytorch-grad-cam's form of alpha: g^2 / (2 g^2 + g^3 sum A + 1e-6)."""

    def weights(self, activations, gradients):
        g2, g3 = gradients.pow(2), gradients.pow(3)
        alpha = g2 / (2 * g2 + activations.sum(dim=(2, 3), keepdim=True) * g3 + 1e-6)
        alpha = torch.where(gradients != 0, alpha, torch.zeros_like(alpha))
        return (alpha * F.relu(gradients)).sum(dim=(2, 3), keepdim=True)


def test_gradcam_plusplus_and_hirescam_vs_pytorch_grad_cam(fashion, xs):
    layer = fashion.net.features[8]
    targets = [ClassifierOutputTarget(1)] * len(xs)
    with pytorch_grad_cam.HiResCAM(model=fashion, target_layers=[layer]) as ref_cam:
        ref = ref_cam(input_tensor=xs.clone().requires_grad_(True), targets=targets)
    close(C.HiResCAM(fashion)(xs, 1, normalize=True), torch.from_numpy(ref), 1e-5, "HiResCAM")
    with pytorch_grad_cam.GradCAMPlusPlus(model=fashion, target_layers=[layer]) as ref_cam:
        ref = torch.from_numpy(ref_cam(input_tensor=xs.clone().requires_grad_(True), targets=targets))
    # the engine with pytorch-grad-cam's epsilon reproduces it exactly ...
    close(GradCAMPlusPlusWithEps(fashion)(xs, 1, normalize=True), ref, 1e-5, "Grad-CAM++ (with 1e-6 as pytorch-grad-cam)")
    # ... and coursekit's exact 1 / (2 + g sum A) differs only through that epsilon (3e-2 of the max)
    close(C.GradCAMPlusPlus(fashion)(xs, 1, normalize=True), ref, 3e-2, "Grad-CAM++ (exact alpha)")
