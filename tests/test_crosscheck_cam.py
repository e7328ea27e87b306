"""XGrad-CAM and Score-CAM, the two CAM variants added as one-class overrides of coursekit.cam.CAM,
cross-checked against pytorch-grad-cam on the same model, layer and input.

pytorch-grad-cam min-max scales each map (at the layer's resolution, then again after cv2's
resize); min-max scaling commutes with bilinear resizing, so coursekit is compared with
``normalize=True``. Tolerance: 1e-5 of the map's range (cv2's float resize vs torch's).
"""

import pytest
import pytorch_grad_cam
import torch
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from coursekit import cam as C
from coursekit.guard import model_state

pytestmark = pytest.mark.filterwarnings(
    "ignore:Input Tensor 0 did not already require gradients", "ignore:Setting backward hooks"
)


@pytest.fixture(scope="module")
def xs(fashion_test):
    return fashion_test[0][10:16].clone()  # (6, 1, 28, 28), images nobody tuned for


def close(got, ref, tol, what):
    err = float((got - ref).abs().max())
    assert err <= tol, f"{what}: max abs difference {err:.3g} > {tol:g}"


@pytest.mark.parametrize("layer", ["features.3", "features.8"])
def test_xgradcam_vs_pytorch_grad_cam(fashion, xs, layer):
    module = C.get_layer(fashion, layer)[1]
    targets = [3, 1, 4, 1, 5, 9]
    with pytorch_grad_cam.XGradCAM(model=fashion, target_layers=[module]) as ref_cam:
        ref = ref_cam(input_tensor=xs.clone().requires_grad_(True), targets=[ClassifierOutputTarget(t) for t in targets])
    got = C.XGradCAM(fashion, layer)(xs, targets, normalize=True)
    close(got, torch.from_numpy(ref), 1e-5, f"XGrad-CAM at {layer}")


def test_xgradcam_differs_from_gradcam_where_activations_are_uneven(fashion, xs):
    a = C.XGradCAM(fashion, "features.3")(xs, 1, normalize=True)
    b = C.GradCAM(fashion, "features.3")(xs, 1, normalize=True)
    assert float((a - b).abs().max()) > 0.05


@pytest.mark.parametrize("layer", ["features.3", "features.8"])
def test_scorecam_vs_pytorch_grad_cam(fashion, xs, layer):
    module = C.get_layer(fashion, layer)[1]
    targets = [0, 2, 7, 7, 8, 6]
    with pytorch_grad_cam.ScoreCAM(model=fashion, target_layers=[module]) as ref_cam:
        ref_cam.batch_size = 64
        ref = ref_cam(input_tensor=xs.clone(), targets=[ClassifierOutputTarget(t) for t in targets])
    before = model_state(fashion)
    got = C.ScoreCAM(fashion, layer, batch_size=48)(xs, targets, normalize=True)
    assert before.differences(model_state(fashion)) == []
    close(got, torch.from_numpy(ref), 1e-5, f"Score-CAM at {layer}")


def test_scorecam_batch_size_does_not_change_the_map(fashion, xs):
    a = C.ScoreCAM(fashion, "features.8", batch_size=7)(xs[:2], 1)
    b = C.ScoreCAM(fashion, "features.8", batch_size=128)(xs[:2], 1)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
