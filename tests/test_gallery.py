"""coursekit.gallery: the shipped class/unit gallery is what the code makes, and the build works.

The long build (``python -m coursekit.gallery build``, minutes) is not run here: the shipped
assets' record is compared with the code's defaults and the code's hash, and the build itself runs
on a tiny setting (2 steps, 32 px).
"""

import dataclasses
import json
import shutil

import matplotlib.colors
import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image

from coursekit import gallery, image_params, objectives
from coursekit.maximize import maximize

MAX_SHIPPED_BYTES = 1.5e6
REBUILD = "rebuild the assets with `python -m coursekit.gallery build` (about 10 minutes on one thread)"


@pytest.fixture(scope="module")
def shipped():
    return gallery.load_gallery()


@pytest.fixture(scope="module")
def model():
    import coursekit as ck

    return ck.load_model("efficientnet_lite0")


# ----------------------------------------------------------------------------------------------
# the shipped assets


def test_shipped_record_matches_the_codes_defaults_and_hash(shipped):
    problems = gallery.stale_assets(shipped.record)
    assert not problems, f"the shipped gallery is stale ({'; '.join(problems)}): {REBUILD}"


def test_shipped_record_names_every_parameter(shipped, model):
    record = shipped.record
    assert record["model"] == gallery.MODEL
    assert record["classes"]["indices"] == gallery.class_indices(model, gallery.CLASSES)
    for part in ("classes", "units"):
        assert set(record[part]["recipe"]) == {"size", "steps", "lr", "seed", "pad", "jitter", "scales", "degrees",
                                               "fine_jitter", "decay_power", "decorrelate"}
        assert record[part]["recipe"]["steps"] >= 512
        assert len(record[part]["transforms"]) == 5
    assert record["classes"]["recipe"]["size"] == 224
    assert record["torch"] and record["build_seconds"] > 0 and record["threads"] >= 1


def test_shipped_pngs_open_with_the_recorded_size(shipped):
    total = 0
    for part, n in (("classes", len(gallery.CLASSES)), ("units", len(gallery.UNITS))):
        files = shipped.record[part]["files"]
        size = shipped.record[part]["recipe"]["size"]
        assert len(files) == n
        for name in files:
            path = gallery.GALLERY_DIR / name
            total += path.stat().st_size
            with Image.open(path) as im:
                assert im.format == "PNG" and im.mode == "RGB" and im.size == (size, size), name
    assert total <= MAX_SHIPPED_BYTES, f"the gallery's PNGs take {total / 1e6:.2f} MB, more than 1.5 MB"
    on_disk = {p.name for p in gallery.GALLERY_DIR.glob("*.png")}
    assert on_disk == set(shipped.record["classes"]["files"]) | set(shipped.record["units"]["files"]), "stray PNGs"


def test_shipped_stats_are_those_of_the_pngs(shipped):
    for part, images in (("classes", shipped.classes), ("units", shipped.units)):
        stats = gallery.image_stats(images)
        for key, values in shipped.record[part]["stats"].items():
            # recorded from the float pictures, measured here on 8-bit PNGs: within rounding
            np.testing.assert_allclose(stats[key].numpy(), values, atol=4e-3, err_msg=f"{part} {key}")


def test_check_command_reports_a_current_gallery(capsys):
    assert gallery.main(["check"]) == 0
    assert "current" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------
# the build, tiny


TINY = gallery.Recipe(size=32, steps=2)


def test_tiny_build_writes_lossless_pngs_and_a_record(tmp_path, model):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    units = [gallery.Unit("net.blocks.1", 3), gallery.Unit("net.blocks.3", 5, "neuron")]
    record = gallery.build(tmp_path, model=model, classes=gallery.CLASSES[:2], units=units,
                           class_recipe=TINY, unit_recipe=TINY, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["classes_00.png", "classes_01.png", "gallery.json",
                                                           "units_00.png", "units_01.png"]
    assert json.loads((tmp_path / "gallery.json").read_text()) == record
    assert record["classes"]["recipe"]["size"] == 32 and record["classes"]["recipe"]["steps"] == 2
    assert record["units"]["units"][1] == {"layer": "net.blocks.3", "channel": 5, "kind": "neuron"}
    assert record["code_hashes"] == gallery.code_hashes()
    loaded = gallery.load_gallery(tmp_path)
    assert loaded.classes.shape == (2, 3, 32, 32) and loaded.units.shape == (2, 3, 32, 32)
    assert loaded.unit_titles == ["blocks.1 channel 3", "blocks.3 neuron 5"]
    # the same code, run again, gives the same pictures; the PNG holds them to 8-bit rounding
    again = gallery.visualize_classes(model, gallery.CLASSES[:2], TINY, progress=False)
    assert (loaded.classes - again.image).abs().max() <= 0.5 / 255 + 1e-6
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items()), "the build changed the model"
    # a tiny build is not the shipped recipe: the staleness check says so
    problems = gallery.stale_assets(record)
    assert any("classes: recorded recipe" in p for p in problems) and any("units: recorded" in p for p in problems)


def test_a_new_build_replaces_the_old_pngs(tmp_path, model):
    (tmp_path / "classes_07.png").write_bytes(b"old")
    gallery.build(tmp_path, model=model, classes=gallery.CLASSES[:1], units=[gallery.Unit("net.blocks.1", 0)],
                  class_recipe=TINY, unit_recipe=TINY, progress=False)
    assert not (tmp_path / "classes_07.png").exists()


def test_live_recipe_is_the_class_recipe_shorter_and_smaller():
    live, full = dataclasses.asdict(gallery.LIVE_RECIPE), dataclasses.asdict(gallery.CLASS_RECIPE)
    assert {k for k in full if live[k] != full[k]} == {"size", "steps"}


def test_gallery_matches_a_direct_maximize_call(model):
    """visualize_classes is maximize with the recipe's parameterisation and transforms, nothing else."""
    recipe = gallery.Recipe(size=48, steps=3, seed=5)
    made = gallery.visualize_classes(model, ["geyser"], recipe, progress=False)
    direct = maximize(model, objectives.class_logit([model.class_index("geyser")]),
                      param=image_params.fourier_image((1, 3, 48, 48), seed=5), steps=3, lr=0.05,
                      transforms=[image_params.pad(12), image_params.jitter(8), image_params.random_scale(recipe.scales),
                                  image_params.random_rotate(recipe.degrees), image_params.jitter(4)],
                      seed=5, progress=False)
    torch.testing.assert_close(made.image, direct.image)


# ----------------------------------------------------------------------------------------------
# code hashes


def test_code_hash_changes_when_a_function_changes():
    def recipe_a(x):
        return x + 1

    def recipe_b(x):
        return x + 2

    a, b = gallery.code_hashes({"f": recipe_a}), gallery.code_hashes({"f": recipe_b})
    assert a["f"] != b["f"] and len(a["f"]) == 16


def test_a_changed_piece_makes_the_record_stale(shipped):
    record = json.loads(json.dumps(shipped.record))
    name = "coursekit.image_params.random_rotate"
    record["code_hashes"][name] = "0" * 16
    record["units"]["recipe"]["lr"] = 0.1
    problems = gallery.stale_assets(record)
    assert f"source of {name} changed" in problems
    assert any(p.startswith("units: recorded recipe") and "lr" in p for p in problems)


def test_the_hash_of_maximize_is_of_its_own_source_not_the_reference_wrapper():
    text = gallery._source(maximize)
    assert "def maximize(" in text and "ReferenceBlocked" not in text
    assert "coursekit.maximize.maximize" in gallery.code_hashes()


def test_check_command_fails_on_a_stale_copy(tmp_path, shipped, capsys):
    shutil.copytree(gallery.GALLERY_DIR, tmp_path / "g")
    record = json.loads((tmp_path / "g" / "gallery.json").read_text())
    record["classes"]["recipe"]["steps"] = 7
    (tmp_path / "g" / "gallery.json").write_text(json.dumps(record))
    assert gallery.main(["check", "--dir", str(tmp_path / "g")]) == 1
    assert "classes: recorded recipe" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------
# pieces: rotation, statistics, input checks


def _smooth_picture(h=33, w=33):
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    return torch.stack([yy, xx, (yy * xx) ** 0.5])[None]  # (1, 3, H, W), a different ramp per channel


def test_rotate_by_90_degrees_is_rot90_counter_clockwise():
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(image_params._rotate(x, 90.0), torch.rot90(x, 1, dims=(2, 3)), atol=1e-5, rtol=0)
    torch.testing.assert_close(image_params._rotate(x, -90.0), torch.rot90(x, -1, dims=(2, 3)), atol=1e-5, rtol=0)


def test_rotate_matches_torchvision_inside_the_frame():
    x = _smooth_picture()
    ours = image_params._rotate(x, 10.0)
    theirs = TF.rotate(x, 10.0, interpolation=TF.InterpolationMode.BILINEAR)  # counter-clockwise, zeros outside
    inner = (slice(None), slice(None), slice(6, -6), slice(6, -6))  # away from the corners they fill differently
    torch.testing.assert_close(ours[inner], theirs[inner], atol=2e-3, rtol=0)
    assert not torch.allclose(ours[inner], x[inner], atol=1e-2)


def test_random_rotate_draws_from_the_given_angles():
    x = _smooth_picture()
    g = torch.Generator().manual_seed(0)
    t = image_params.random_rotate([0])
    assert t(x, g) is x
    out = image_params.random_rotate([30])(x, g)
    torch.testing.assert_close(out, image_params._rotate(x, 30.0))
    assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1  # reflection: no values from outside


@pytest.mark.parametrize("bad", [[], [float("nan")], [1, float("inf")]])
def test_random_rotate_rejects_bad_angles(bad):
    with pytest.raises(ValueError, match="random_rotate"):
        image_params.random_rotate(bad)


def test_image_stats_against_matplotlib_hsv():
    x = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    x[0, :, 0, 0] = 0  # a black pixel: saturation 0
    stats = gallery.image_stats(x)
    hsv = matplotlib.colors.rgb_to_hsv(x.permute(0, 2, 3, 1).numpy())  # (N, H, W, 3)
    np.testing.assert_allclose(stats["saturation"].numpy(), hsv[..., 1].mean((1, 2)), atol=1e-6)
    np.testing.assert_allclose(stats["mean"].numpy(), x.flatten(1).mean(1).numpy(), atol=1e-6)
    np.testing.assert_allclose(stats["std"].numpy(), x.flatten(1).std(1).numpy(), atol=1e-6)
    assert float(gallery.image_stats(torch.full((1, 3, 4, 4), 0.3))["saturation"][0]) == 0.0


def test_image_stats_rejects_grey_pictures():
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        gallery.image_stats(torch.rand(1, 1, 8, 8))


def test_bad_units_and_classes_raise_clear_errors(model):
    with pytest.raises(ValueError, match="kind"):
        gallery.Unit("net.blocks.1", 3, "pixel")
    with pytest.raises(ValueError, match="channel"):
        gallery.Unit("net.blocks.1", -1)
    with pytest.raises(ValueError, match="Samoyed"):
        gallery.class_indices(model, ["samoyd"])
    with pytest.raises(TypeError, match="class names or indices"):
        gallery.class_indices(model, "geyser")
    with pytest.raises(TypeError, match="Recipe"):
        gallery.visualize_classes(model, ["geyser"], recipe={"size": 32}, progress=False)
    with pytest.raises(TypeError, match="Unit"):
        gallery.visualize_units(model, [("net.blocks.1", 3)], recipe=TINY, progress=False)
