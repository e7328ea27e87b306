"""One place to declare a method: a decorated definition reaches the namespace, the table and the tests."""

from __future__ import annotations

import functools
import re
from pathlib import Path

import pytest
import torch

from coursekit import adversarial, maximize, objectives
from coursekit import cam as C
from coursekit import lrp as L
from coursekit.registry import REGISTRIES, Registry, method_table

ROOT = Path(__file__).resolve().parents[1]


def test_a_new_cam_appears_everywhere_from_one_definition(fashion, fashion_test):
    """Decorating one subclass is all it takes: __all__, the registry, the method table, the CAM
    tests' parametrisation (tests/test_cam.py builds it from C.CAMS) and a working method."""

    @C.CAMS.register
    class MaxGradCAM(C.CAM):
        """Max-Grad-CAM, a test method: each channel weighted by its largest gradient."""

        def weights(self, activations, gradients):
            return gradients.amax(dim=(2, 3), keepdim=True)  # (N, K, 1, 1)

    try:
        assert "MaxGradCAM" in C.__all__ and C.CAMS["MaxGradCAM"] is MaxGradCAM
        assert "| CAM | `MaxGradCAM` | `coursekit.cam` | Max-Grad-CAM, a test method: each channel weighted" in method_table()
        assert MaxGradCAM in [C.CAMS[name] for name in C.CAMS]  # what tests/test_cam.py parametrises over
        maps = MaxGradCAM(fashion)(fashion_test[0][:2], 1)
        assert maps.shape == (2, 28, 28) and (maps >= 0).all()
    finally:
        C.CAMS.unregister("MaxGradCAM")
    assert "MaxGradCAM" not in C.__all__ and "MaxGradCAM" not in C.CAMS


def test_registry_errors_name_the_problem():
    exports: list[str] = []
    reg = Registry("widget", exports=exports)

    @reg.register(name="Fancy")
    def fancy():
        """A fancy widget."""

    assert exports == ["fancy"] and list(reg) == ["Fancy"] and reg["Fancy"] is fancy
    with pytest.raises(ValueError, match=r"unknown widget 'Fancyy'; did you mean 'Fancy'"):
        reg["Fancyy"]
    with pytest.raises(ValueError, match="registered already"):
        reg.register(lambda: None, name="Fancy")
    with pytest.raises(ValueError, match="non-empty name"):
        reg.register(functools.partial(print))  # no __name__ and no name given
    with pytest.raises(ValueError, match="needs a kind"):
        Registry("")


def test_the_readme_shows_the_method_table_of_the_code():
    """README.md carries `python -m coursekit.registry`'s table; a new or renamed method must reach it."""
    readme = (ROOT / "README.md").read_text()
    table = method_table()
    assert table in readme, "regenerate the table in README.md with: python -m coursekit.registry"
    for kind in REGISTRIES:
        assert f"| {kind} |" in table


@pytest.mark.parametrize("name", list(L.COMPOSITES))
def test_every_composite_explains_the_fashion_cnn(name, fashion, fashion_test):
    x, y = fashion_test[0][:2], fashion_test[1][:2]
    relevance = L.lrp(fashion, x, y, composite=name)  # by its registered name
    assert relevance.shape == x.shape and torch.isfinite(relevance).all()
    assert relevance.abs().sum() > 0


@pytest.mark.parametrize("name", list(L.RULES))
def test_every_lrp_rule_is_in_the_rule_table(name):
    """The rules module's docstring table (what a student reads) lists every registered rule."""
    doc = L.rules.__doc__
    assert re.search(rf"``{name}\(", doc), f"add {name} to the table in coursekit/lrp/rules.py's docstring"


# One example call per objective: a new objective fails here until it has one.
OBJECTIVE_EXAMPLES = {
    "channel": ("net.features.3", 2), "neuron": ("net.features.3", 2), "class_logit": (1,),
    "class_log_probability": (1,), "layer_energy": ("net.features.3",),
    "feature_match": ("net.features.3", torch.zeros(1, 32, 28, 28)),
    "per_image": ([], ), "edge_energy_prior": (), "l2_prior": (), "total_variation": (),
}


@pytest.mark.parametrize("name", list(objectives.OBJECTIVES))
def test_every_objective_is_in_maximize_and_scores_a_batch(name, fashion):
    fn = objectives.OBJECTIVES[name]
    assert getattr(maximize, name) is fn and getattr(maximize.objectives, name) is fn and name in maximize.__all__
    assert name in OBJECTIVE_EXAMPLES, f"give {name} an example call in OBJECTIVE_EXAMPLES"
    args = OBJECTIVE_EXAMPLES[name]
    if name == "per_image":
        args = ([objectives.class_logit(1), objectives.class_logit(2)],)
    obj = fn(*args)
    assert isinstance(obj, objectives.Objective)
    x = torch.rand(2, 1, 28, 28, requires_grad=True)
    with torch.enable_grad():
        from coursekit.hooks import record

        with record(fashion, ["net.features.3"]) as rec:
            logits = fashion(x)
        value = obj(objectives.Context(image=x, input=x, logits=logits, activations=rec.outputs))
    assert value.shape == (2,) and torch.isfinite(value).all()


@pytest.mark.parametrize("name", list(adversarial.ATTACKS))
def test_every_attack_stays_in_its_ball_and_box(name, fashion, fashion_test):
    x, y = fashion_test[0][:4], fashion_test[1][:4]
    attack = adversarial.ATTACKS[name]
    x_adv = attack(fashion, x, y, eps=0.1)
    assert x_adv.shape == x.shape and not x_adv.requires_grad
    assert (x_adv - x).abs().max() <= 0.1 + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    assert adversarial.accuracy(fashion, x_adv, y) <= adversarial.accuracy(fashion, x, y)
