import pytest
import torch
from torch import nn

import coursekit
from coursekit.guard import model_state
from coursekit.hooks import UnknownLayerError, get_layer, list_layers, preserved, record


def tiny():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(4, 2, 3, padding=1), nn.ReLU(inplace=True),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2, 3),
    )


def test_get_layer_by_name_module_and_short_name(fashion):
    name, m = get_layer(fashion, "features.0")
    assert name == "net.features.0" and m is fashion.net.features[0]
    assert get_layer(fashion, "net.features.0") == (name, m)
    assert get_layer(fashion, m) == (name, m)


def test_unknown_layer_lists_close_matches(fashion):
    with pytest.raises(UnknownLayerError) as err:
        get_layer(fashion, "featurs.0")
    assert "features.0" in str(err.value) and "list_layers" in str(err.value)
    with pytest.raises(UnknownLayerError):
        get_layer(fashion, nn.ReLU())
    with pytest.raises(TypeError):
        get_layer(fashion, 3)


def test_list_layers_shapes(fashion):
    info = {layer.name: layer for layer in list_layers(fashion)}
    assert info["net.features.4"].output_shape == (1, 32, 14, 14)
    assert info["net.classifier.4"].output_shape == (1, 10)
    assert info["net.features.0"].params == 32 * 9 + 32


def test_record_activations_match_a_manual_forward():
    model = tiny().eval()
    before = model_state(model)
    x = torch.rand(2, 3, 8, 8)
    with record(model, ["0", "3"]) as rec:
        out = model(x)
    conv0 = model[0](x)
    assert torch.allclose(rec.activations["0"], conv0)  # pre-ReLU: in-place ReLU did not overwrite it
    assert torch.allclose(rec.activations["3"], torch.relu(model[2](torch.relu(conv0))))
    assert torch.allclose(out, model(x))
    assert before.differences(model_state(model)) == []
    assert model[1].inplace and model[3].inplace


def test_record_gradients_on_a_frozen_model(fashion, fashion_test):
    x = fashion_test[0][:2]
    before = model_state(fashion)
    with record(fashion, "features.8", gradients=True) as rec:
        out = fashion(x)
        out[:, 3].sum().backward()
    a, g = rec.activations["features.8"], rec.gradients["features.8"]
    assert a.shape == g.shape == (2, 64, 14, 14)
    # slow reference: unfrozen copy, gradient w.r.t. the same activation via autograd
    acts = fashion.net.features[:9](fashion.normalize(x)).requires_grad_(True)
    ref = torch.autograd.grad(fashion.net.classifier(fashion.net.features[9](acts))[:, 3].sum(), acts)[0]
    assert torch.allclose(g, ref, atol=1e-6)
    assert before.differences(model_state(fashion)) == []
    assert all(p.grad is None for p in fashion.parameters())


def test_record_gradients_when_the_input_requires_grad(fashion, fashion_test):
    x = fashion_test[0][:1].clone().requires_grad_(True)
    with record(fashion, "features.8", gradients=True) as rec:
        fashion(x)[0, 1].backward()
    assert x.grad is not None and rec.gradients["features.8"].abs().sum() > 0


def test_model_restored_when_the_body_raises():
    model = tiny().train()
    model[0].weight.requires_grad_(False)
    before = model_state(model)
    with pytest.raises(RuntimeError, match="boom"):
        with record(model, "0", gradients=True):
            model.eval()
            model.requires_grad_(True)
            raise RuntimeError("boom")
    assert before.differences(model_state(model)) == []


def test_preserved_restores_everything():
    model = tiny()
    before = model_state(model)
    with preserved(model):
        model.eval().requires_grad_(False)
        model[1].inplace = False
    assert before.differences(model_state(model)) == []


def test_record_needs_layers_and_a_model():
    with pytest.raises(ValueError):
        with record(tiny(), []):
            pass
    with pytest.raises(TypeError, match="layers must be a layer name"):
        with record(tiny(), None):
            pass
    with pytest.raises(TypeError, match="nn.Module"):
        with record(None, "0"):
            pass


def test_record_rejects_non_tensor_outputs():
    class Pair(nn.Module):
        def forward(self, x):
            return x, x

    model = nn.Sequential(Pair())
    with pytest.raises(TypeError, match="sub-layer"):
        with record(model, "0"):
            model(torch.zeros(1))
    assert not model[0]._forward_hooks


def test_record_works_on_torchvision_vgg_with_inplace_relus():
    import torchvision

    vgg = torchvision.models.vgg11(weights=None).eval().requires_grad_(False)
    x = torch.rand(1, 3, 64, 64)
    with record(vgg, ["features.0", "features.1"]) as rec:
        vgg(x)
    assert (rec.activations["features.0"] < 0).any()  # not overwritten by the in-place ReLU after it
    assert torch.equal(rec.activations["features.1"], rec.activations["features.0"].clamp(min=0))
    assert vgg.features[1].inplace


def test_coursekit_exports_hooks():
    assert coursekit.record is record and coursekit.get_layer is get_layer
