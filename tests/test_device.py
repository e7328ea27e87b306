"""Every coursekit method follows the model's device (issue 16, "A GPU when there is one").

The fake-device check runs on any CPU: inside :func:`default_device_meta`,
``torch.set_default_device("meta")`` sends every tensor made without naming a device to the meta
device (it has shapes but no data). A method given a CPU model and CPU inputs then fails at the
first operation that mixes such a tensor with the model's ("Tensor on device meta is not on the
expected device cpu"), exactly where it would fail with a CUDA model and a tensor made on the CPU.
:func:`test_fake_device_catches_a_tensor_made_without_a_device` shows that the trick can fail.

Two things the meta trick cannot see are checked another way: module-level constant tensors (made at
import, on the CPU; :func:`test_module_constants_are_moved_before_use` hands the methods constants
that refuse every operation but ``.to``), and moving a CPU input to a model on another device
(:func:`test_inputs_move_to_the_models_device`, a model on "meta"). The CUDA tests at the end compare
CPU and CUDA results of every method family; they skip on a machine without CUDA.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import importlib
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import coursekit
from coursekit import adversarial as A
from coursekit import (
    cam,
    clever_hans,
    dream,
    faithfulness,
    filters,
    fit,
    maximize,
    representations,
    robustness,
    sanity,
)
from coursekit import lrp as L
from coursekit import receptive_fields as rf
from coursekit import saliency as S
from coursekit import style as ST
from coursekit.devices import model_device, resolve_device

pytestmark = pytest.mark.usefixtures("one_thread")


@contextlib.contextmanager
def default_device_meta():
    """Tensors made without an explicit device land on "meta" inside the block."""
    previous = torch.get_default_device()
    torch.set_default_device("meta")
    try:
        yield
    finally:
        torch.set_default_device(previous)


# ----------------------------------------------------------------------------------------------
# resolve_device


def test_resolve_device_auto_and_explicit(monkeypatch):
    monkeypatch.delenv("COURSEKIT_DEVICE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(coursekit.devices, "_mps_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    monkeypatch.setattr(coursekit.devices, "_mps_available", lambda: True)
    monkeypatch.setattr(coursekit.devices, "_mps_works", lambda: True)
    assert resolve_device("auto") == torch.device("mps")
    monkeypatch.setattr(coursekit.devices, "_mps_works", lambda: False)  # MPS there but broken: the CPU
    assert resolve_device("auto") == torch.device("cpu")
    for explicit in ("cpu", "cuda", "cuda:1", "mps"):
        assert resolve_device(explicit) == torch.device(explicit)
    assert resolve_device(torch.device("cuda", 2)) == torch.device("cuda:2")


def test_coursekit_device_pins_auto(monkeypatch):
    """COURSEKIT_DEVICE=cpu keeps "auto" on the CPU on a GPU machine (make test's notebook kernels)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("COURSEKIT_DEVICE", "cpu")
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cuda") == torch.device("cuda")  # an explicit device is not overridden
    monkeypatch.setenv("COURSEKIT_DEVICE", "auto")
    assert resolve_device("auto") == torch.device("cuda")
    monkeypatch.setenv("COURSEKIT_DEVICE", "gpu")
    with pytest.raises(ValueError, match="'gpu'"):
        resolve_device("auto")


def test_resolve_device_rejects_a_misspelt_device():
    with pytest.raises(ValueError, match="'gpu'"):
        resolve_device("gpu")
    with pytest.raises(ValueError, match="'cuda:x'"):
        coursekit.load_model("fashion_cnn", device="cuda:x")
    with pytest.raises(TypeError, match="int"):
        resolve_device(0)


def test_load_model_auto_on_this_machine():
    model = coursekit.load_model("fashion_cnn", device="auto")
    assert model_device(model) == resolve_device("auto")
    with default_device_meta():  # built on the CPU whatever the default device says
        again = coursekit.load_model("fashion_cnn")
        hans = clever_hans.load_watermark_model()
    assert model_device(again) == model_device(hans) == torch.device("cpu")
    assert all(p.device.type == "cpu" for p in again.parameters())


# ----------------------------------------------------------------------------------------------
# the fixtures every method is called with (made on the CPU, outside the fake-device block)


class _Env:
    pass


def _tiny_rgb() -> nn.Module:
    """A small 3-channel ReLU CNN with max-pooling, wrapped like the course's models."""
    from coursekit.models import CourseModel

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 16, 3, padding=1),
                        nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5))
    return CourseModel(net, name="tiny", classes=list("abcde"), input_size=(3, 32, 32), mean=(0.5,) * 3,
                       std=(0.25,) * 3, layers={"first_conv": "net.0", "gradcam": "net.4", "penultimate": "net.6",
                                                "logits": "net.7", "early": "net.1", "middle": "net.3",
                                                "late": "net.4"}).eval().requires_grad_(False)


@pytest.fixture(scope="module")
def env(fashion, effnet, fashion_test):
    e = _Env()
    e.fashion, e.effnet, e.rgb = fashion, effnet, _tiny_rgb()
    x, y = fashion_test
    e.x, e.y = x[:4].clone(), y[:4].clone()  # (4, 1, 28, 28), (4,)
    e.x12, e.y12 = x[:12].clone(), y[:12].clone()
    g = torch.Generator().manual_seed(0)
    e.photo = torch.rand(1, 3, 64, 64, generator=g)  # (1, 3, 64, 64) for the ImageNet network
    e.small = torch.rand(2, 3, 32, 32, generator=g)  # for the tiny RGB network
    e.map = torch.rand(4, 28, 28, generator=g)  # a saliency map per image
    e.tag = lambda result: result  # see env_elsewhere
    return e


def _fresh_fashion_net():
    from coursekit.models import load_model

    return load_model("fashion_cnn").requires_grad_(True).train()


def _randomization_result(e):
    return sanity.cascading_randomization(e.fashion, e.x[:2], 0, {"grad": S.vanilla_saliency}, progress=False)


def _faithfulness_result(e):
    return faithfulness.compare_methods(e.fashion, e.x[:2], 0, {"random": e.map[:2]}, steps=4, progress=False)


# Each entry: name -> function(env) returning the zero-argument call to run under the fake device.
# Preparation (models, results to plot) happens outside the block, on the CPU.
CALLS = {
    # models, hooks, images, plotting (the package's top level)
    "models.predict": lambda e: lambda: coursekit.predict(e.fashion, e.x, k=3),
    "models.target_scores": lambda e: lambda: coursekit.target_scores(e.fashion(_on(e.fashion, e.x)), [1, 2, 3, 4]),
    "hooks.list_layers": lambda e: lambda: coursekit.list_layers(e.fashion),
    "hooks.record": lambda e: lambda: _record(e),
    "images.load_image": lambda e: lambda: coursekit.load_image(coursekit.sample_image("chelsea"), size=32),
    "images.to_pil": lambda e: lambda: coursekit.to_pil(e.x[0]),
    "images.to_numpy_image": lambda e: lambda: coursekit.to_numpy_image(e.x[0]),
    "images.gaussian_blur": lambda e: lambda: coursekit.images.gaussian_blur(e.x, 1.0),
    "plotting.show_images": lambda e: lambda: coursekit.show_images(e.x),
    "plotting.overlay": lambda e: lambda: coursekit.overlay(e.x[0], e.map[0]),
    "plotting.show_overlays": lambda e: lambda: coursekit.show_overlays(e.x[0], {"a": e.map[0]}),
    "plotting.heatmap_array": lambda e: lambda: coursekit.plotting.heatmap_array(e.map[0]),
    # lecture 1: filters and receptive fields
    "filters.activation_maps": lambda e: lambda: filters.activation_maps(e.fashion, e.x, ["net.features.1"]),
    "filters.draw_receptive_fields": lambda e: lambda: filters.draw_receptive_fields(e.fashion, e.x[:1], None),
    "filters.empirical_receptive_field": lambda e: lambda: filters.empirical_receptive_field(e.fashion, "net.features.6"),
    "filters.effective_receptive_field": lambda e: lambda: filters.effective_receptive_field(e.fashion, "net.features.7", e.x),
    "filters.show_effective_receptive_fields": lambda e: (lambda r: lambda: filters.show_effective_receptive_fields([r]))(
        filters.effective_receptive_field(e.fashion, "net.features.7", e.x)),
    "filters.natural_image_filters": lambda e: lambda: filters.natural_image_filters([e.x[0]], patch_size=4, n_components=4,
                                                                                    n_patches=200),
    "filters.explore_activations": lambda e: lambda: filters.explore_activations(e.fashion, e.x[:1], ["net.features.1"], static=True),
    "filters.first_layer_filters": lambda e: lambda: filters.first_layer_filters(e.effnet),
    "filters.inspector_table": lambda e: (lambda r: lambda: filters.inspector_table(r))(e.tag(filters.layer_inspector(e.fashion, e.x, 3))),
    "filters.layer_inspector": lambda e: lambda: filters.layer_inspector(e.fashion, e.x, 3),
    "filters.normalize_filters": lambda e: lambda: filters.normalize_filters(e.effnet.net.conv_stem.weight),
    "filters.plot_receptive_fields": lambda e: lambda: filters.plot_receptive_fields(e.fashion),
    "filters.receptive_field_table": lambda e: lambda: filters.receptive_field_table(e.fashion),
    "filters.receptive_fields": lambda e: lambda: filters.receptive_fields(e.effnet),
    "filters.show_activation_maps": lambda e: lambda: filters.show_activation_maps(e.fashion, e.x, ["net.features.1"]),
    "filters.show_filters": lambda e: lambda: filters.show_filters(e.fashion),
    "filters.show_layer_inspector": lambda e: (lambda r: lambda: filters.show_layer_inspector(r))(e.tag(filters.layer_inspector(e.fashion, e.x, 3))),
    "receptive_fields.unit_windows": lambda e: lambda: rf.unit_windows(e.fashion, "net.features.6"),
    # lecture 1: maximisation
    "maximize.maximize[pixel]": lambda e: lambda: maximize.maximize(e.fashion, maximize.channel("net.features.8", 1),
                                                                   steps=2, batch=2, progress=False,
                                                                   transforms=[maximize.jitter(2)],
                                                                   regularizers=[maximize.blur_every(1), maximize.decay()]),
    "maximize.maximize[fourier]": lambda e: lambda: maximize.maximize(
        e.rgb, maximize.class_log_probability(1) - 0.1 * maximize.total_variation() - 0.1 * maximize.l2_prior()
        - 0.1 * maximize.edge_energy_prior(), param=maximize.fourier_image((2, 3, 32, 32)), steps=2, progress=False,
        transforms=[maximize.pad(2), maximize.random_scale()]),
    "maximize.maximize[objectives]": lambda e: lambda: maximize.maximize(
        e.rgb, maximize.per_image([maximize.neuron("net.3", 1), maximize.layer_energy("net.1")])
        + maximize.class_logit([1, 2]) + maximize.feature_match("net.4", torch.zeros(1, 16, 16, 16, device="cpu")),
        param=maximize.stack([maximize.pixel_image((1, 3, 32, 32)), maximize.fourier_image((1, 3, 32, 32))]),
        steps=2, optimizer="normalized_sgd", transforms=[maximize.only([0], maximize.jitter(1))], progress=False),
    "maximize.MaximizationResult[plot_history]": lambda e: (lambda r: lambda: r.plot_history())(e.tag(
        maximize.maximize(e.fashion, maximize.class_logit([1, 2]), batch=2, steps=2, progress=False))),
    "representations.DatasetExamples[show]": lambda e: (lambda r: lambda: r.show())(e.tag(
        representations.top_activating(e.fashion, e.x12, "net.features.8", 3, k=2))),
    "clever_hans.SpectralAnalysis[cluster_means]": lambda e: (lambda r: lambda: r.cluster_means(e.map.repeat(3, 1, 1)))(
        clever_hans.spectral_relevance_analysis(torch.rand(12, 28, 28, device="cpu"), n_neighbors=3)),
    "style.StyleResult[best_so_far]": lambda e: (lambda r: lambda: r.best_so_far())(e.tag(ST.synthesize(
        e.rgb, e.small[:1], layers=["net.1"], size=16, max_evals=2, progress=False))),
    "maximize.ascent_step": lambda e: lambda: maximize.ascent_step(e.fashion, e.x, 2),
    "maximize.edge_energy": lambda e: lambda: maximize.edge_energy(e.small),
    "maximize.gaussian_blur": lambda e: lambda: maximize.gaussian_blur(e.small, 1.0),
    "maximize.high_frequency_energy": lambda e: lambda: maximize.high_frequency_energy(e.small, relative=True),
    "maximize.relative_l2": lambda e: lambda: maximize.relative_l2(e.small, e.small.flip(0)),
    "maximize.pixel_image": lambda e: lambda: maximize.pixel_image((1, 3, 8, 8)).image(),
    "maximize.fourier_image": lambda e: lambda: maximize.fourier_image((1, 3, 8, 8)).image(),
    # lecture 2: representations
    "representations.embed": lambda e: lambda: representations.embed(torch.rand(12, 6, device="cpu"), pca_dims=3),
    "representations.invert_features": lambda e: lambda: representations.invert_features(
        e.fashion, e.x[:1], ["net.features.1"], steps=2, progress=False),
    "representations.invert_features[pixel]": lambda e: lambda: representations.invert_features(
        e.fashion, e.x[:1], ["net.features.1"], steps=2, parameterization="pixel", progress=False),
    "representations.layer_features": lambda e: lambda: representations.layer_features(e.fashion, e.x, "net.features.8"),
    "representations.nearest_neighbours": lambda e: lambda: representations.nearest_neighbours(
        e.fashion(_on(e.fashion, e.x[:2])), e.fashion(_on(e.fashion, e.x)), k=2),
    "representations.plot_embedding": lambda e: lambda: representations.plot_embedding(
        np.random.default_rng(0).normal(size=(4, 2)), e.y, images=e.x, thumbnails=2),
    "representations.show_neighbours": lambda e: lambda: representations.show_neighbours(
        e.x[:1], e.x, {"layer": torch.tensor([[1, 2]], device="cpu")}),
    "representations.top_activating": lambda e: lambda: representations.top_activating(e.fashion, e.x12, "net.features.8", 3, k=2),
    # lecture 2: saliency, CAM, sanity, faithfulness
    "saliency.vanilla_saliency": lambda e: lambda: S.vanilla_saliency(e.fashion, e.x, 1),
    "saliency.input_gradient": lambda e: lambda: S.input_gradient(e.fashion, e.x, 1),
    "saliency.gradient_x_input": lambda e: lambda: S.gradient_x_input(e.fashion, e.x, 1),
    "saliency.guided_backprop": lambda e: lambda: S.guided_backprop(e.fashion, e.x, 1),
    "saliency.deconvnet": lambda e: lambda: S.deconvnet(e.fashion, e.x, 1),
    "saliency.integrated_gradients": lambda e: lambda: S.integrated_gradients(e.fashion, e.x, 1, steps=4),
    "saliency.integrated_gradients[baseline]": lambda e: lambda: S.integrated_gradients(
        e.fashion, e.x, 1, baseline=e.x.flip(0), steps=4, method="riemann_trapezoid"),
    "saliency.occlusion": lambda e: lambda: S.occlusion(e.fashion, e.x, 1, patch=8, stride=8, progress=False),
    "saliency.smoothgrad": lambda e: lambda: S.smoothgrad(e.fashion, e.x, 1, n_samples=3, seed=0),
    "saliency.smoothgrad[global]": lambda e: lambda: S.smoothgrad(e.fashion, e.x, 1, n_samples=3),
    "saliency.Unit": lambda e: lambda: S.guided_backprop(e.fashion, e.x, S.Unit("features.6", 3)),  # a hidden unit as target
    "saliency.Unit[neuron]": lambda e: lambda: S.input_gradient(e.fashion, e.x, S.Unit("features.6", 3, (5, 5))),
    "saliency.to_map": lambda e: lambda: S.to_map(e.small),
    "cam.GradCAM": lambda e: lambda: cam.GradCAM(e.fashion)(e.x, 1),
    "cam.GradCAMPlusPlus": lambda e: lambda: cam.GradCAMPlusPlus(e.fashion)(e.x, 1),
    "cam.HiResCAM": lambda e: lambda: cam.HiResCAM(e.fashion)(e.x, 1),
    "cam.XGradCAM": lambda e: lambda: cam.XGradCAM(e.fashion)(e.x, 1),
    "cam.ScoreCAM": lambda e: lambda: cam.ScoreCAM(e.fashion, batch_size=16)(e.x[:1], 1),
    "cam.candidate_layers": lambda e: lambda: cam.candidate_layers(e.fashion),
    "cam.default_layer": lambda e: lambda: cam.default_layer(e.fashion),
    "cam.gradcam": lambda e: lambda: cam.gradcam(e.fashion, e.x, 1, normalize=True),
    "cam.guided_gradcam": lambda e: lambda: cam.guided_gradcam(e.fashion, e.x, 1),
    "cam.rescale_maps": lambda e: lambda: cam.rescale_maps(e.map),
    "sanity.cascading_randomization": lambda e: lambda: sanity.cascading_randomization(
        e.fashion, e.x[:2], 0, {"grad": S.vanilla_saliency}, metrics=("spearman", "ssim"), progress=False),
    "sanity.independent_randomization": lambda e: lambda: sanity.independent_randomization(
        e.fashion, e.x[:2], 0, {"grad": S.vanilla_saliency}, progress=False),
    "sanity.plot_randomization": lambda e: (lambda r: lambda: sanity.plot_randomization(r))(e.tag(_randomization_result(e))),
    "sanity.plot_randomization_maps": lambda e: (lambda r: lambda: sanity.plot_randomization_maps(r))(e.tag(_randomization_result(e))),
    "sanity.randomization_steps": lambda e: lambda: sanity.randomization_steps(e.fashion),
    "sanity.rank_correlation": lambda e: lambda: sanity.rank_correlation(e.map, e.map.flip(0)),
    "sanity.reinitialize": lambda e: (lambda m: lambda: sanity.reinitialize(m, seed=1))(copy.deepcopy(e.fashion.net.features[0])),
    "sanity.ssim": lambda e: lambda: sanity.ssim(e.map, e.map.flip(0)),
    "faithfulness.auc": lambda e: lambda: faithfulness.auc(np.linspace(0, 1, 5), np.ones((2, 5))),
    "faithfulness.blurred": lambda e: lambda: faithfulness.blurred(e.x),
    "faithfulness.compare_methods": lambda e: lambda: faithfulness.compare_methods(
        e.fashion, e.x, 0, {"random": e.map, "grad": S.vanilla_saliency(e.fashion, e.x, 0)}, steps=4,
        progress=False),
    "faithfulness.deletion_curve": lambda e: lambda: faithfulness.deletion_curve(e.fashion, e.x, 0, e.map, steps=4),
    "faithfulness.insertion_curve": lambda e: lambda: faithfulness.insertion_curve(
        e.fashion, e.x, 0, e.map.cpu().numpy(), steps=4, baseline=0.0, score="logit"),
    "faithfulness.insertion_curve[tensor baseline]": lambda e: lambda: faithfulness.insertion_curve(
        e.fashion, e.x, 0, e.map, steps=4, baseline=e.x.flip(0)),
    "faithfulness.perturbation_masks": lambda e: lambda: faithfulness.perturbation_masks(faithfulness.pixel_ranking(e.map)[0], 4),
    "faithfulness.pixel_ranking": lambda e: lambda: faithfulness.pixel_ranking(e.map),
    "faithfulness.plot_curves": lambda e: (lambda r: lambda: faithfulness.plot_curves(r))(e.tag(_faithfulness_result(e))),
    "faithfulness.random_map": lambda e: lambda: faithfulness.random_map(e.x),
    "faithfulness.reduce_map": lambda e: lambda: faithfulness.reduce_map(e.x * 0.5 - 0.1, e.x),
    # lecture 3: LRP and Clever Hans
    "lrp.lrp[fashion]": lambda e: lambda: L.lrp(e.fashion, e.x, 1),
    "lrp.lrp[effnet]": lambda e: lambda: L.lrp(e.effnet, e.photo, 1),
    "lrp.lrp[composites]": lambda e: lambda: [L.lrp(e.fashion, e.x, 1, composite=c) for c in L.COMPOSITES],
    "lrp.lrp[zbox mean/std]": lambda e: lambda: L.lrp(e.fashion, e.x, 1, composite=L.LRPComposite(
        {nn.Conv2d: L.Epsilon(), nn.Linear: L.Epsilon()}, first=L.ZBox(0.0, 1.0, mean=torch.full((1, 1, 1, 1), 0.286, device="cpu"),
                                                         std=torch.full((1, 1, 1, 1), 0.353, device="cpu")))),
    "lrp.conservation": lambda e: lambda: L.conservation(e.effnet, e.photo, 1),
    "lrp.plot_conservation": lambda e: (lambda c: lambda: L.plot_conservation({"eps": c}))(e.tag(L.conservation(e.fashion, e.x, 1))),
    "lrp.plot_relevance": lambda e: lambda: L.plot_relevance(e.x[0], L.lrp(e.fashion, e.x[:1], 1)[0]),
    "lrp.relevance_limit": lambda e: lambda: L.relevance_limit(e.map, e.map * 2),
    "lrp.default_canonizers": lambda e: lambda: L.default_canonizers(e.effnet),
    "lrp.merge_batchnorm": lambda e: (lambda c, b: lambda: L.merge_batchnorm(c, b))(
        copy.deepcopy(e.effnet.net.conv_stem), copy.deepcopy(e.effnet.net.bn1)),
    "lrp.stabilize": lambda e: lambda: L.stabilize(e.map - 0.5, 0.1, relative=True),
    "clever_hans.stamp": lambda e: lambda: clever_hans.stamp(e.x),
    "clever_hans.stamp[which]": lambda e: lambda: clever_hans.stamp(e.x, [True, False, True, False]),
    "clever_hans.watermark_choice": lambda e: lambda: clever_hans.watermark_choice(e.y12, seed=1),
    "clever_hans.watermark_accuracy": lambda e: lambda: clever_hans.watermark_accuracy(e.fashion, e.x12, e.y12),
    "clever_hans.load_watermark_model": lambda e: lambda: clever_hans.load_watermark_model(),
    "clever_hans.spectral_relevance_analysis": lambda e: lambda: clever_hans.spectral_relevance_analysis(
        torch.rand(12, 28, 28, generator=torch.Generator().manual_seed(1), device="cpu"), n_neighbors=3),
    # lecture 4: adversarial examples and robustness
    "adversarial.attack_objective": lambda e: lambda: A.attack_objective(e.fashion(_on(e.fashion, e.x)), _on(e.fashion, e.y), loss="margin"),
    "adversarial.margin": lambda e: lambda: A.margin(e.fashion(_on(e.fashion, e.x)), _on(e.fashion, e.y)),
    "adversarial.fgsm": lambda e: lambda: A.fgsm(e.fashion, e.x, e.y, eps=0.05),
    "adversarial.fgsm[target]": lambda e: lambda: A.fgsm(e.fashion, e.x, eps=0.05, target=3),
    "adversarial.pgd": lambda e: lambda: A.pgd(e.fashion, e.x, e.y, eps=0.05, steps=2, restarts=2),
    "adversarial.pgd[l2]": lambda e: lambda: A.pgd(e.fashion, e.x, e.y, eps=1.0, steps=2, norm="l2", early_stop=True),
    "adversarial.pgd[unseeded]": lambda e: lambda: A.pgd(e.fashion, e.x, e.y, eps=0.05, steps=2, seed=None),
    "adversarial.bim": lambda e: lambda: A.bim(e.fashion, e.x, e.y, eps=0.05, steps=2),
    "adversarial.mifgsm": lambda e: lambda: A.mifgsm(e.fashion, e.x, e.y, eps=0.05, steps=2, early_stop=True),
    "adversarial.mifgsm[l2, target]": lambda e: lambda: A.mifgsm(e.fashion, e.x, eps=1.0, steps=2, norm="l2", target=3),
    "adversarial.predict_labels": lambda e: lambda: A.predict_labels(e.fashion, e.x),
    "adversarial.accuracy": lambda e: lambda: A.accuracy(e.fashion, e.x, e.y),
    "adversarial.plot_perturbation": lambda e: (lambda ax: lambda: A.plot_perturbation(ax, e.x[1:2], e.x[:1]))(_axes()),
    "adversarial.random_sphere": lambda e: lambda: A.random_sphere(e.fashion, e.x[:1], 1.0, n=8, batch_size=4),
    "adversarial.noise_attack": lambda e: lambda: A.noise_attack(e.fashion, e.x[:1], 3, max_steps=3),
    "lrp.ResNetCanonizer": lambda e: (lambda case: lambda: L.lrp(*case))(_torchvision_case("resnet18")),  # 'auto' picks it
    "lrp.VGGCanonizer": lambda e: (lambda case: lambda: L.lrp(*case))(_torchvision_case("vgg11_bn")),
    "lrp.MobileNetV2Canonizer": lambda e: (lambda case: lambda: L.lrp(*case))(_torchvision_case("mobilenet_v2")),
    "adversarial.NoiseLayer": lambda e: (lambda layer: lambda: layer(_on(layer, e.x)))(A.NoiseLayer((1, 28, 28), device="cpu")),
    "adversarial.quantize_8bit": lambda e: lambda: A.quantize_8bit(e.x),
    "adversarial.evolve_fooling_images": lambda e: lambda: A.evolve_fooling_images(e.fashion, [1, 2], (1, 28, 28),
                                                                                 population=4, generations=2),
    # fit (lecture 0b): training and transfer follow the model's device; data may stay on the CPU
    "fit.stratified_subset": lambda e: lambda: fit.stratified_subset(e.x12, e.y12, 4, seed=0),
    "fit.FlipShift": lambda e: lambda: fit.FlipShift(max_shift=2)(e.x, torch.Generator().manual_seed(0)),
    "fit.fit": lambda e: (lambda m: lambda: fit.fit(m, (e.x12, e.y12), (e.x, e.y), epochs=1, batch_size=4,
                                                     augment=fit.FlipShift(max_shift=1),
                                                     callbacks=[fit.EarlyStopping(patience=1)], progress=False))(
        _fresh_fashion_net()),
    "fit.train_epoch": lambda e: (lambda m: lambda: fit.train_epoch(
        m, torch.optim.SGD(m.parameters(), lr=0.01), e.x, e.y, 2, None, torch.Generator().manual_seed(0)))(
        _fresh_fashion_net()),
    "fit.evaluate": lambda e: lambda: fit.evaluate(e.fashion, e.x, e.y),
    "fit.confusion_matrix": lambda e: lambda: fit.confusion_matrix(e.fashion, e.x, e.y, 10),
    "fit.transfer_model": lambda e: lambda: (lambda m: m(_on(m, e.x)))(fit.transfer_model(e.effnet, hidden=8, size=32)),
    "fit.extract_features": lambda e: lambda: fit.extract_features(fit.transfer_model(e.effnet, size=32).features,
                                                                   e.x, batch_size=2, progress=False),
    "robustness.eps_sweep": lambda e: lambda: robustness.eps_sweep(e.fashion, e.x, e.y, [0.0, 0.05], progress=False),
    "robustness.eps_sweep[pgd]": lambda e: lambda: robustness.eps_sweep(e.fashion, e.x, e.y, [0.05], "pgd", steps=2,
                                                                        progress=False),
    "robustness.plot_sweeps": lambda e: (lambda s: lambda: robustness.plot_sweeps([s]))(
        e.tag(robustness.eps_sweep(e.fashion, e.x, e.y, [0.0, 0.05], progress=False))),
    "robustness.transfer_matrix": lambda e: lambda: robustness.transfer_matrix({"a": e.fashion, "b": e.fashion}, e.x, e.y),
    "robustness.adversarial_loss": lambda e: (lambda m: lambda: robustness.adversarial_loss(m, e.x, e.y, 0.05))(
        _fresh_fashion_net()),
    "robustness.train_classifier": lambda e: (lambda m: lambda: robustness.train_classifier(
        m, e.x12, e.y12, epochs=1, eps=0.05, batch_size=6, progress=False))(_fresh_fashion_net()),
    # lecture 5: DeepDream and style
    "dream.deepdream": lambda e: lambda: dream.deepdream(e.rgb, e.small[:1], "net.3", n_octaves=2, steps=2,
                                                       jitter_pixels=2, progress=False),
    "dream.deepdream[guide]": lambda e: lambda: dream.deepdream(
        e.rgb, e.small[:1], dream.guide("net.3", torch.rand(1, 16, 16, 16, device="cpu")), n_octaves=1, steps=2,
        progress=False),
    "dream.dream_step": lambda e: lambda: dream.dream_step(lambda x: e.rgb.net[:2](x), _on(e.rgb, e.small[:1]), (1, 2)),
    "dream.layer_outputs": lambda e: lambda: _layer_outputs(e),
    "style.stylize": lambda e: lambda: ST.stylize(e.rgb, e.small[:1], e.small[1:], style_layers=["net.1", "net.4"],
                                                 content_layer="net.4", tv_weight=1.0, max_evals=3, progress=False),
    "style.stylize[adam, noise init]": lambda e: lambda: ST.stylize(
        e.rgb, e.small[:1], e.small[1:], style_layers=["net.1"], content_layer="net.4", optimizer="adam",
        init="noise", max_evals=2, progress=False),
    "style.synthesize": lambda e: lambda: ST.synthesize(e.rgb, e.small[:1], layers=["net.1", "net.4"], size=24,
                                                       max_evals=3, progress=False),
    "style.RandomTextureNet": lambda e: (lambda net: lambda: net(_on(net, e.small)))(ST.RandomTextureNet(sizes=(3,), channels=4)),
    "style.content_loss": lambda e: lambda: ST.content_loss(e.small, e.small.flip(0)),
    "style.default_layers": lambda e: lambda: ST.default_layers(e.effnet),
    "style.gram_matrix": lambda e: lambda: [ST.gram_matrix(e.small, n) for n in ST.NORMALIZATIONS],
    "style.gram_errors": lambda e: lambda: ST.gram_errors({"a": e.small}, {"a": ST.gram_matrix(e.small.flip(0))}),
    "style.style_loss": lambda e: lambda: ST.style_loss([e.small], [ST.gram_matrix(e.small.flip(0))]),
    "style.tv_loss": lambda e: lambda: ST.tv_loss(e.small),
}


def _on(model, t):
    """What a notebook does before calling a model itself: ``t.to(DEVICE)``."""
    return t.to(model_device(model))


def _axes():
    import matplotlib.pyplot as plt

    return plt.subplots()[1]


def _layer_outputs(e):
    with dream.layer_outputs(e.rgb, ["net.1", "net.4"]) as features:
        return features(e.small)


def _record(e):
    with coursekit.record(e.fashion, ["net.features.1"], gradients=True) as rec:
        x = _on(e.fashion, e.x).clone().requires_grad_(True)
        e.fashion(x)[:, 0].sum().backward()
    return rec


# The public names that CALLS covers through other entries, or that make or take no tensor a device
# could matter for (constants, exceptions, result containers, pure-shape arithmetic); each with why.
COVERED_ELSEWHERE = {
    "maximize.maximize", "maximize.channel", "maximize.class_log_probability", "maximize.class_logit",
    "maximize.edge_energy_prior", "maximize.feature_match", "maximize.jitter", "maximize.l2_prior",
    "maximize.layer_energy", "maximize.neuron", "maximize.only", "maximize.pad", "maximize.per_image",
    "maximize.random_scale", "maximize.stack", "maximize.total_variation", "maximize.blur_every",
    "maximize.decay", "maximize.FourierImage", "maximize.PixelImage", "maximize.StackedImage",
    "lrp.lrp", "lrp.make_composite", "lrp.lrp_zero", "lrp.lrp_epsilon", "lrp.epsilon_plus",
    "lrp.epsilon_plus_flat", "lrp.epsilon_alpha2_beta1", "lrp.epsilon_alpha2_beta1_flat",
    "lrp.epsilon_gamma_box", "lrp.montavon2019", "lrp.LRPComposite", "lrp.EfficientNetCanonizer",
    "lrp.MergeBatchNorm", "lrp.Residual", "lrp.Sum", "lrp.LRPRule", "lrp.Epsilon", "lrp.Gamma",
    "lrp.AlphaBeta", "lrp.ZPlus", "lrp.ZBox", "lrp.Flat", "lrp.WSquare", "lrp.Norm", "lrp.ProportionalPool",
    "lrp.Relay", "lrp.GradientRule", "lrp.Term", "lrp.Group",  # every rule runs in lrp[composites]
    "dream.guide", "dream.SmoothedAscent",  # deepdream[guide], deepdream
    "style.content", "style.style", "style.smoothness",  # stylize's objectives
    "cam.CAM",  # the base class of the five CAMs called here
    "saliency.REDUCTIONS", "receptive_fields.draw_receptive_fields", "receptive_fields.empirical_receptive_field",
    "receptive_fields.plot_receptive_fields", "receptive_fields.receptive_field_table",
    "receptive_fields.receptive_fields", "receptive_fields.effective_receptive_field",
    "receptive_fields.show_effective_receptive_fields",  # the same functions as filters.*
    "hooks.preserved", "hooks.Recorder",  # record
    "hooks.layer_outputs",  # dream.layer_outputs
    "images.convert_channels", "images.image_tensor",  # load_image
    "maps.to_map", "maps.REDUCTIONS", "maps.rescale_maps",  # saliency.to_map, cam.rescale_maps
    "geometry.unit_windows", "geometry.receptive_fields", "geometry.empirical_receptive_field",  # receptive_fields.*
}


@functools.cache
def _torchvision_case(name: str):
    """(model, x, target) for a small torchvision network with random weights, built on the CPU."""
    import torchvision

    from coursekit.models import CourseModel

    with torch.device("cpu"):
        torch.manual_seed(0)
        net = getattr(torchvision.models, name)(weights=None, num_classes=10).eval()
    model = CourseModel(net, name=name, classes=[str(i) for i in range(10)], input_size=(3, 32, 32),
                        mean=[0.5] * 3, std=[0.5] * 3, layers={}).eval().requires_grad_(False)
    return model, torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)), 0


NO_TENSOR = {
    # constants, exceptions, result containers and shape arithmetic: nothing made, nothing moved
    "lrp.ConservationWarning", "lrp.UncanonizedWarning", "lrp.RESIDUAL_BLOCKS", "lrp.unexplained",
    "lrp.check_explainable",  # read the module tree: which batch-norms / skips no canonizer covers
    "models.MODEL_NAMES", "models.CourseModel", "models.WeightsNotAvailableError", "models.load_model",
    "models.fetch_weights", "models.imagenet_classes", "hooks.UnknownLayerError", "hooks.get_layer",
    "hooks.LayerInfo", "images.SAMPLE_IMAGES", "images.sample_image", "plotting.notebook_figures", "plotting.figure_png",
    "plotting.curve_style", "plotting.legend_below", "filters.EmpiricalReceptiveField", "filters.LayerRecord",
    "filters.EffectiveReceptiveField", "filters.LearntFilters", "receptive_fields.EffectiveReceptiveField",
    "filters.ReceptiveField", "filters.conv_output_size", "filters.conv_param_count", "filters.receptive_field_size",
    "receptive_fields.EmpiricalReceptiveField", "receptive_fields.ReceptiveField", "receptive_fields.UnitWindows",
    "receptive_fields.UnsupportedLayerError", "receptive_fields.conv_output_size",
    "receptive_fields.receptive_field_size", "maximize.Context", "maximize.ImageParam",
    "maximize.MaximizationResult", "maximize.Objective", "maximize.objectives", "maximize.params",
    "maximize.regularizers", "maximize.transforms", "representations.DatasetExamples",
    "representations.InversionResult", "cam.UnknownLayerError", "sanity.RandomizationResult",
    "faithfulness.FaithfulnessResult", "lrp.Conservation", "lrp.BASE_RULES", "lrp.COMPOSITES", "lrp.WINNER_TAKE_ALL",
    "clever_hans.WATERMARK", "clever_hans.WATERMARK_CLASS", "clever_hans.WATERMARK_FRACTION",
    "clever_hans.WATERMARK_BOX", "clever_hans.SpectralAnalysis", "adversarial.LogitsExpectedWarning",
    "cam.CAMS", "lrp.RULES", "adversarial.ATTACKS",  # registries: names to classes / rules
    "adversarial.check_eps", "adversarial.check_loss", "adversarial.check_kappa", "adversarial.AttackConfig", "adversarial.SphereResult", "adversarial.NoiseAttackResult", "robustness.Sweep",
    "robustness.TransferResult", "dream.DreamResult", "style.DEFAULT_LAYERS", "style.NORMALIZATIONS",
    "style.brush_strokes",  # draws a CPU picture from a seed, like load_image: no model, nothing to follow
    "style.StyleResult", "hooks.check_layer_name", "hooks.resolve_layers",
    "geometry.EmpiricalReceptiveField", "geometry.ReceptiveField", "geometry.UnitWindows",
    "geometry.UnsupportedLayerError", "geometry.analytic_fields", "geometry.input_hw", "geometry.per_dimension",
    "geometry.collapse_pair",  # module-geometry arithmetic: names and numbers, no tensor
    "fit.split_fashion_mnist",  # the dataset on the CPU, like fashion_mnist: the training loop moves each batch
    "fit.small_cnn",  # a new model on PyTorch's default device, as nn.Conv2d makes: the caller moves it
    "fit.History", "fit.Callback", "fit.EarlyStopping", "fit.LivePlot", "fit.Split",  # containers and callbacks:
    "fit.plot_history", "fit.plot_confusion",  # numbers and numpy arrays (EarlyStopping's weights: in fit.fit)
    "fit.FrozenFeatures", "fit.TransferNet",  # nn.Modules made by transfer_model (called there)
}
LECTURE_MODULES = ("models", "hooks", "images", "plotting", "maps", "geometry", "filters", "receptive_fields", "maximize",
                   "fit",
                   "representations", "saliency", "cam", "sanity", "faithfulness", "lrp", "clever_hans",
                   "adversarial", "robustness", "dream", "style")
# Not in LECTURE_MODULES: widgets (draws what its caller computes), checks (exercise checks on small
# CPU tensors), train (a command-line script; fit, its engine, is listed), offline_html (no tensors), and the plumbing (guard,
# inputs, gradients, rules, optimize, objectives, image_params, progress), which every entry above runs.


def test_the_list_of_methods_is_complete():
    public = {f"{m}.{n}" for m in LECTURE_MODULES for n in importlib.import_module(f"coursekit.{m}").__all__}
    called = {name.split("[")[0] for name in CALLS}
    missing = public - called - COVERED_ELSEWHERE - NO_TENSOR
    assert not missing, f"public names with no device check (add to CALLS or say why not): {sorted(missing)}"
    stale = (called | COVERED_ELSEWHERE | NO_TENSOR) - public
    assert not stale, f"names in this test that no module exports any more: {sorted(stale)}"


def test_fake_device_catches_a_tensor_made_without_a_device(env):
    """The check can fail: a method that makes one tensor without a device fails under it."""
    def careless(model, x):  # what a method must not do: torch.zeros(...) with no device
        return model(x) + torch.zeros(10)

    def careful(model, x):
        return model(x) + torch.zeros(10, device=x.device)

    with default_device_meta():
        with pytest.raises(RuntimeError, match="meta"):
            careless(env.fashion, env.x)
        assert careful(env.fashion, env.x).device.type == "cpu"


@pytest.mark.parametrize("name", sorted(CALLS))
def test_method_makes_every_tensor_on_the_models_device(name, env):
    """No tensor made without the model's (or the input's) device: fake-device check on every entry."""
    call = CALLS[name](env)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with default_device_meta():
            call()


# ----------------------------------------------------------------------------------------------
# inputs and constants on another device: the "Elsewhere" check


class Elsewhere(torch.Tensor):
    """A CPU tensor that stands for a tensor on *another* device than the model's.

    Operations on it give ``Elsewhere`` tensors (a result stays on its input's device), including
    when mixed with ordinary tensors (where a real second device would raise); only a move,
    ``.to(<a device>)``, ``.to(<ordinary tensor>)`` or ``.cpu()``, gives an ordinary tensor back.
    ``.numpy()`` raises, as it does for a CUDA tensor. So a method that forgets to move its input (or a
    module-level constant) to the model's device ends with an ``Elsewhere`` tensor reaching one of
    the model's layers, or in what it returns: :func:`_guard_layers` and :func:`_elsewhere_in` see it.
    """

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.numpy:
            raise TypeError("can't convert an Elsewhere (another device's) tensor to numpy; call .cpu() first")
        if func is torch.Tensor.__getitem__ and not isinstance(args[0], cls):
            with torch._C.DisableTorchFunctionSubclass():  # indices may live anywhere: the result is the tensor's
                return func(*args, **kwargs)
        if func in (torch.Tensor.cpu, torch.Tensor.to):
            with torch._C.DisableTorchFunctionSubclass():
                out = func(*args, **kwargs)
            moved = func is torch.Tensor.cpu or _names_a_device(args[1:], kwargs)
            if moved and isinstance(out, torch.Tensor):
                return out.as_subclass(torch.Tensor) if type(out) is cls else out
            return out if isinstance(out, cls) or not isinstance(out, torch.Tensor) else out.as_subclass(cls)
        return super().__torch_function__(func, types, args, kwargs)


def _names_a_device(args, kwargs) -> bool:
    """Whether ``Tensor.to(*args, **kwargs)`` names a device (or an ordinary tensor to follow)."""
    if "device" in kwargs or any(isinstance(a, (str, torch.device)) for a in args):
        return True
    if "other" in kwargs:
        return not isinstance(kwargs["other"], Elsewhere)
    return any(isinstance(a, torch.Tensor) and not isinstance(a, Elsewhere) for a in args)


def elsewhere(t: torch.Tensor) -> Elsewhere:
    return t.detach().clone().as_subclass(Elsewhere)


def _elsewhere_in(obj, depth: int = 0) -> list[str]:
    """Paths of the Elsewhere tensors inside a result (tensors, tuples, lists, dicts, dataclasses)."""
    import dataclasses

    if depth > 4:
        return []
    if isinstance(obj, Elsewhere):
        return ["result"]
    if isinstance(obj, (tuple, list)):
        return [f"[{i}]{p}" for i, v in enumerate(obj) for p in _elsewhere_in(v, depth + 1)]
    if isinstance(obj, dict):
        return [f"[{k!r}]{p}" for k, v in obj.items() for p in _elsewhere_in(v, depth + 1)]
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return [f".{f.name}{p}" for f in dataclasses.fields(obj) for p in _elsewhere_in(getattr(obj, f.name), depth + 1)]
    return []


class _DrawsElsewhere(torch.overrides.TorchFunctionMode):
    """Random numbers drawn on the CPU are Elsewhere: a method must move them to the model's device."""

    DRAWS = (torch.rand, torch.randn, torch.randint, torch.randperm, torch.rand_like, torch.randn_like)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in self.DRAWS and isinstance(out, torch.Tensor) and out.device.type == "cpu":
            return out.as_subclass(Elsewhere)
        return out


@contextlib.contextmanager
def _guard_layers():
    """Every layer of every model raises when an input from another device (Elsewhere) reaches it."""
    def check(module, inputs):
        for t in inputs:
            if isinstance(t, Elsewhere):
                raise RuntimeError(f"an input that was never moved to the model's device reached {type(module).__name__}")

    handle = torch.nn.modules.module.register_module_forward_pre_hook(check)
    try:
        yield
    finally:
        handle.remove()


# the entries whose call involves no model: they follow their input's device, so an Elsewhere result is right
FOLLOW_THE_INPUT = {
    "images.to_pil", "images.to_numpy_image", "images.gaussian_blur", "images.load_image", "plotting.show_images",
    "plotting.overlay", "plotting.show_overlays", "plotting.heatmap_array", "filters.normalize_filters",
    "maximize.edge_energy", "maximize.gaussian_blur", "maximize.high_frequency_energy", "maximize.relative_l2",
    "maximize.pixel_image", "maximize.fourier_image", "representations.embed", "representations.plot_embedding",
    "representations.show_neighbours", "saliency.to_map", "cam.rescale_maps", "sanity.rank_correlation",
    "sanity.ssim", "sanity.plot_randomization", "sanity.plot_randomization_maps", "sanity.reinitialize",
    "faithfulness.auc", "faithfulness.blurred", "faithfulness.perturbation_masks", "faithfulness.pixel_ranking",
    "faithfulness.random_map", "faithfulness.reduce_map", "faithfulness.plot_curves", "lrp.relevance_limit",
    "lrp.stabilize", "lrp.plot_conservation", "lrp.merge_batchnorm", "clever_hans.stamp", "clever_hans.stamp[which]",
    "clever_hans.watermark_choice", "clever_hans.spectral_relevance_analysis", "adversarial.plot_perturbation",
    "adversarial.quantize_8bit", "robustness.plot_sweeps", "dream.dream_step", "style.content_loss",
    "style.gram_matrix", "style.gram_errors", "style.style_loss", "style.tv_loss", "representations.nearest_neighbours",
    "adversarial.margin", "adversarial.attack_objective", "clever_hans.SpectralAnalysis[cluster_means]",
    "style.StyleResult[best_so_far]", "fit.stratified_subset", "fit.FlipShift",
}
# module-level tensors: each must be moved to the data's device where it is used
MODULE_CONSTANTS = {"clever_hans": ["WATERMARK"], "image_params": ["_COLOR_SQRT"], "objectives": ["_LAPLACIAN"]}


def test_module_constants_are_listed():
    """MODULE_CONSTANTS names every module-level tensor of coursekit (a new one must be added there)."""
    import pkgutil

    found = {}
    for info in pkgutil.walk_packages(coursekit.__path__, "coursekit."):
        if ".grading" in info.name or ".checks" in info.name:
            continue
        for value in vars(importlib.import_module(info.name)).values():
            if isinstance(value, torch.Tensor):
                found.setdefault(id(value), value)
    listed = {id(getattr(importlib.import_module(f"coursekit.{m}"), n)) for m, names in MODULE_CONSTANTS.items()
              for n in names}
    assert set(found) == listed, f"{len(found)} module-level tensors found, {len(listed)} listed in MODULE_CONSTANTS"


@pytest.fixture(scope="module")
def env_elsewhere(env):
    """``env`` with every data tensor (images, labels, maps) on "another device" (Elsewhere)."""
    e = _Env()
    e.__dict__.update(env.__dict__)
    for name in ("x", "y", "x12", "y12", "photo", "small", "map"):
        setattr(e, name, elsewhere(getattr(env, name)))
    e.tag = _elsewhere_deep  # results handed to plots: as if on a GPU (numpy only after .cpu())
    return e


def _elsewhere_deep(obj, depth: int = 0):
    """A copy of a result with every tensor in it (lists, dicts, dataclasses) made Elsewhere."""
    import dataclasses

    if isinstance(obj, torch.Tensor):
        return elsewhere(obj)
    if depth > 4:
        return obj
    if isinstance(obj, (tuple, list)):
        values = [_elsewhere_deep(v, depth + 1) for v in obj]
        return type(obj)(*values) if hasattr(obj, "_fields") else type(obj)(values)  # a namedtuple, or not
    if isinstance(obj, dict):
        return {k: _elsewhere_deep(v, depth + 1) for k, v in obj.items()}
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        out = copy.copy(obj)
        for f in dataclasses.fields(obj):
            object.__setattr__(out, f.name, _elsewhere_deep(getattr(obj, f.name), depth + 1))
        return out
    return obj


def test_elsewhere_catches_an_input_that_is_not_moved(env_elsewhere):
    """The check can fail: a method that runs the model on its input without moving it."""
    e = env_elsewhere
    with _guard_layers():
        with pytest.raises(RuntimeError, match="never moved"):
            e.fashion(e.x)  # what a method must not do
        assert not _elsewhere_in(e.fashion(e.x.to(model_device(e.fashion))))
    assert _elsewhere_in({"a": [e.x + torch.zeros(1, 1, 28, 28)]}) == ["['a'][0]result"]  # mixing keeps it
    plain = e.x.to(model_device(e.fashion))
    with _guard_layers(), _DrawsElsewhere():
        noise = torch.randn(plain.shape, generator=torch.Generator().manual_seed(0), device="cpu")
        with pytest.raises(RuntimeError, match="never moved"):
            e.fashion(plain + noise)  # a CPU draw used without .to(device)
        e.fashion(plain + noise.to(plain))
        assert type(plain[torch.randperm(4)]) is torch.Tensor  # CPU indices do not move the indexed tensor


@pytest.mark.parametrize("name", sorted(CALLS))
def test_method_moves_inputs_and_constants_to_the_models_device(name, env_elsewhere, monkeypatch):
    """Inputs and module constants on another device than the model: every method moves them."""
    for module, names in MODULE_CONSTANTS.items():
        for constant in names:
            mod = importlib.import_module(f"coursekit.{module}")
            monkeypatch.setattr(mod, constant, elsewhere(getattr(mod, constant)))
    e = env_elsewhere
    call = CALLS[name](e)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with _guard_layers(), _DrawsElsewhere():
            result = call()
    if name not in FOLLOW_THE_INPUT:
        assert not _elsewhere_in(result), f"{name} returned tensors that are not on the model's device"


def test_elsewhere_catches_a_constant_that_is_not_moved(env_elsewhere, monkeypatch):
    """The check can fail for module constants too: one used without ``.to(x)`` taints the result."""
    from coursekit import objectives

    monkeypatch.setattr(objectives, "_LAPLACIAN", elsewhere(objectives._LAPLACIAN))
    x = env_elsewhere.x.to("cpu")  # the data, on the model's device
    careless = torch.nn.functional.conv2d(x, objectives._LAPLACIAN)  # what a method must not do
    careful = torch.nn.functional.conv2d(x, objectives._LAPLACIAN.to(x))
    assert _elsewhere_in(careless) == ["result"] and not _elsewhere_in(careful)
    assert not _elsewhere_in(maximize.high_frequency_energy(x))  # the module's own use moves it


def test_inputs_move_to_the_models_device(env):
    """The one normaliser moves a CPU batch (and class indices) to the model's device: here "meta"."""
    from coursekit.inputs import check_images, target_indices

    meta_model = copy.deepcopy(env.fashion).to("meta")
    assert model_device(meta_model) == torch.device("meta")
    moved = check_images(env.x, model=meta_model)
    assert moved.device == torch.device("meta") and moved.shape == env.x.shape
    assert env.x.device == torch.device("cpu")  # the caller's tensor is left where it was
    double = check_images(env.x.double(), model=meta_model)
    assert double.device == torch.device("meta") and double.dtype == torch.float32
    assert check_images(env.x, model=env.fashion) is env.x  # nothing to do: no copy
    assert target_indices([1, 2, 3, 4], 4, device="meta").device == torch.device("meta")
    assert target_indices(3, 4).device == torch.device("cpu")
    out = meta_model(moved)  # the whole model runs there: (4, 10) of shapes only
    assert out.device == torch.device("meta") and out.shape == (4, 10)
    with pytest.raises(ValueError, match=r"on meta but its input is on cpu: move the input with x.to\('meta'\)"):
        meta_model(env.x)  # a direct call does not move its input (as in PyTorch), and says what to do


# ----------------------------------------------------------------------------------------------
# CPU and CUDA give the same results (skipped without CUDA)

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture
def no_tf32():
    """Full float32 on the GPU (TF32 convolutions and matmuls differ from the CPU by ~1e-3)."""
    conv, mm = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = conv, mm


def _tensors(result):
    """The tensors of a result, flattened to float CPU tensors, in a fixed order."""
    import dataclasses

    if isinstance(result, torch.Tensor):
        return [result.detach().float().cpu()]
    if isinstance(result, np.ndarray):
        return [torch.as_tensor(result, dtype=torch.float32, device="cpu")]
    if isinstance(result, (int, float)) and not isinstance(result, bool):
        return [torch.tensor([float(result)], device="cpu")]
    if isinstance(result, (tuple, list)):
        return [t for r in result for t in _tensors(r)]
    if isinstance(result, dict):
        return [t for k in sorted(result, key=str) for t in _tensors(result[k])]
    if dataclasses.is_dataclass(result):
        return [t for f in dataclasses.fields(result) for t in _tensors(getattr(result, f.name))]
    return []


# one call per method family: (model name, call(model, x, y)); inputs are CPU tensors, moved by the methods
CUDA_FAMILIES = {
    "saliency": ("fashion", lambda m, x, y: [S.vanilla_saliency(m, x, y), S.gradient_x_input(m, x, y),
                                             S.guided_backprop(m, x, y), S.integrated_gradients(m, x, y, steps=8)]),
    "smoothgrad (seeded noise)": ("fashion", lambda m, x, y: S.smoothgrad(m, x, y, n_samples=4, seed=3)),
    "occlusion": ("fashion", lambda m, x, y: S.occlusion(m, x, y, patch=7, stride=7, progress=False)),
    "cam": ("fashion", lambda m, x, y: [cam.gradcam(m, x, y), cam.GradCAMPlusPlus(m)(x, y),
                                        cam.ScoreCAM(m, batch_size=32)(x[:1], y[:1])]),
    "lrp": ("effnet", lambda m, x, y: L.lrp(m, x, 1)),
    "lrp (fashion)": ("fashion", lambda m, x, y: [L.lrp(m, x, y, composite=c) for c in ("EpsilonPlus", "EpsilonGammaBox")]),
    "faithfulness": ("fashion", lambda m, x, y: faithfulness.deletion_curve(m, x, y, faithfulness.random_map(x), steps=5)),
    "sanity": ("fashion", lambda m, x, y: sanity.cascading_randomization(m, x[:2], y[:2], {"grad": S.vanilla_saliency},
                                                                         keep_maps=False, progress=False).scores),
    "attacks": ("fashion", lambda m, x, y: [A.fgsm(m, x, y, eps=0.05), A.pgd(m, x, y, eps=0.05, steps=3, seed=1),
                                            A.mifgsm(m, x, y, eps=0.05, steps=3, early_stop=True)]),
    "random sphere": ("fashion", lambda m, x, y: A.random_sphere(m, x[:1], 2.0, n=16, batch_size=8).labels),
    "robustness (clean accuracy)": ("fashion", lambda m, x, y: robustness.eps_sweep(m, x, y, [0.0, 0.03], progress=False).accuracy[:1]),
    "maximize": ("fashion", lambda m, x, y: maximize.maximize(m, maximize.channel("net.features.8", 2), steps=5,
                                                              progress=False).image),
    "maximize (fourier)": ("effnet", lambda m, x, y: maximize.maximize(
        m, maximize.class_logit(1), param=maximize.fourier_image((1, 3, 64, 64)), steps=3,
        transforms=[maximize.jitter(2)], progress=False).image),
    "representations": ("fashion", lambda m, x, y: [representations.layer_features(m, x, "net.classifier.2"),
                                                    representations.invert_features(m, x[:1], ["net.features.1"], steps=3,
                                                                                    progress=False).images]),
    "dream": ("effnet", lambda m, x, y: dream.deepdream(m, x, "net.blocks.2", n_octaves=2, steps=2,
                                                       progress=False).image),
    "style": ("effnet", lambda m, x, y: ST.synthesize(m, x, layers=["net.blocks.1", "net.blocks.2"], size=48,
                                                      optimizer="adam", max_evals=3, progress=False).image),
    "clever hans": ("fashion", lambda m, x, y: clever_hans.watermark_accuracy(m, x, y)),
    "filters": ("fashion", lambda m, x, y: [t.activation for t in filters.layer_inspector(m, x, y)]),
}


@needs_cuda
@pytest.mark.usefixtures("no_tf32")
@pytest.mark.parametrize("family", sorted(CUDA_FAMILIES))
def test_cpu_and_cuda_agree(family, env):
    which, call = CUDA_FAMILIES[family]
    cpu_model = {"fashion": env.fashion, "effnet": env.effnet}[which]
    x, y = (env.x, env.y) if which == "fashion" else (env.photo, torch.tensor([1], device="cpu"))
    gpu_model = copy.deepcopy(cpu_model).to("cuda")
    on_cpu, on_gpu = _tensors(call(cpu_model, x, y)), _tensors(call(gpu_model, x, y))
    assert len(on_cpu) == len(on_gpu) > 0
    for a, b in zip(on_cpu, on_gpu):
        scale = float(a.abs().max()) or 1.0
        close = (a - b).abs() <= 1e-3 * scale + 1e-5
        # sign-based attacks may step differently where a gradient is ~0; allow 0.5 % of the values
        assert float(close.float().mean()) >= (0.995 if family in ("attacks", "random sphere") else 1.0), family


@needs_cuda
def test_load_model_auto_picks_cuda():
    model = coursekit.load_model("fashion_cnn", device="auto")
    assert model_device(model).type == "cuda"
    x = coursekit.fashion_mnist("test")[0][:2]  # CPU images: the methods move them
    assert S.vanilla_saliency(model, x, 0).device.type == "cuda"


@needs_cuda
def test_reinitialize_draws_the_same_weights_on_cuda(env):
    cpu_layer = copy.deepcopy(env.fashion.net.features[0])
    gpu_layer = copy.deepcopy(cpu_layer).to("cuda")
    cuda_state = torch.cuda.get_rng_state()
    sanity.reinitialize(cpu_layer, seed=5)
    sanity.reinitialize(gpu_layer, seed=5)
    assert torch.equal(torch.cuda.get_rng_state(), cuda_state)  # the global CUDA generator is not touched
    assert torch.equal(cpu_layer.weight, gpu_layer.weight.cpu()) and torch.equal(cpu_layer.bias, gpu_layer.bias.cpu())
