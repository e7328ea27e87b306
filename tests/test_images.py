import numpy as np
import pytest
import torch
from PIL import Image

import coursekit
from coursekit import images


def _check(t, shape):
    assert isinstance(t, torch.Tensor) and t.dtype == torch.float32
    assert tuple(t.shape) == shape
    assert float(t.min()) >= 0 and float(t.max()) <= 1


@pytest.mark.parametrize("name", ["cat", "chelsea", "coffee", "astronaut", "rocket", "brick", "grass", "gravel", "hubble_deep_field"])
def test_sample_images(name):
    arr = coursekit.sample_image(name)
    assert arr.dtype == np.uint8 and arr.ndim == 3 and arr.shape[2] == 3
    t = coursekit.load_image(name)
    _check(t, (1, 3) + arr.shape[:2])
    assert torch.allclose(t[0].permute(1, 2, 0), torch.from_numpy(arr).float() / 255)


def test_every_kind_of_input_gives_the_same_tensor(tmp_path):
    arr = coursekit.sample_image("coffee")[:40, :60]
    path = tmp_path / "coffee.png"
    Image.fromarray(arr).save(path)
    ref = coursekit.load_image(arr)
    _check(ref, (1, 3, 40, 60))
    chw = torch.from_numpy(arr).permute(2, 0, 1)
    for src in (path, str(path), Image.fromarray(arr), chw, chw[None], chw.float() / 255, arr.astype(np.float32) / 255):
        assert torch.allclose(coursekit.load_image(src), ref, atol=1e-6), type(src)


def test_grayscale_and_rgba():
    gray = np.full((10, 12), 128, np.uint8)
    t = coursekit.load_image(gray)
    _check(t, (1, 3, 10, 12))
    assert torch.allclose(t, torch.full_like(t, 128 / 255))
    _check(coursekit.load_image(Image.fromarray(gray)), (1, 3, 10, 12))
    _check(coursekit.load_image(gray, channels=1), (1, 1, 10, 12))
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0] = 255
    rgba[:2, :, 3] = 255  # top half opaque red, bottom half transparent -> white
    t = coursekit.load_image(rgba)
    assert torch.allclose(t[0, :, 0, 0], torch.tensor([1.0, 0, 0])) and torch.allclose(t[0, :, 3, 0], torch.ones(3))
    luma = coursekit.load_image(np.array([[[255, 0, 0]]], np.uint8), channels=1)
    assert abs(float(luma) - 0.299) < 1e-6


def test_palette_png_is_converted(tmp_path):
    img = Image.fromarray(coursekit.sample_image("coffee")[:8, :8]).convert("P")
    _check(coursekit.load_image(img), (1, 3, 8, 8))


def test_resize_and_centre_crop():
    t = coursekit.load_image("coffee", size=224)  # coffee is 400 x 600
    _check(t, (1, 3, 224, 224))
    t = coursekit.load_image("coffee", size=(100, 50))
    _check(t, (1, 3, 100, 50))


@pytest.mark.parametrize(
    "src, err",
    [
        ("no_such_file.png", FileNotFoundError),
        (np.zeros((4, 4, 5), np.uint8), ValueError),
        (np.zeros((4, 4, 3), np.int32), TypeError),
        (np.full((4, 4, 3), 200.0, np.float32), ValueError),  # float in 0..255
        (torch.zeros(2, 2, 3, 4, 4), ValueError),
        (12, TypeError),
    ],
)
def test_bad_inputs(src, err):
    with pytest.raises(err):
        coursekit.load_image(src)


@pytest.mark.parametrize("size", [0, -3, (1, 2, 3), 1.5, "big"])
def test_bad_sizes(size):
    with pytest.raises(ValueError):
        coursekit.load_image("coffee", size=size)


def test_bad_channels():
    with pytest.raises(ValueError):
        coursekit.load_image("coffee", channels=2)


def test_round_trip_to_pil():
    arr = coursekit.sample_image("astronaut")[:32, :32]
    pil = coursekit.to_pil(coursekit.load_image(arr))
    assert pil.size == (32, 32) and np.array_equal(np.asarray(pil), arr)
    gray = coursekit.to_pil(torch.rand(1, 1, 5, 6))
    assert gray.mode == "L" and gray.size == (6, 5)
    with pytest.raises(ValueError):
        images.to_numpy_image(torch.rand(2, 3, 4, 4))
