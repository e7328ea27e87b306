"""Turning anything image-like into a model input, back into something to look at, and blurring it."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ._reference import reference
from .inputs import check_images, number

__all__ = ["SAMPLE_IMAGES", "sample_image", "load_image", "to_pil", "to_numpy_image", "gaussian_blur", "image_tensor",
           "convert_channels"]

# name -> skimage.data function; all ship with scikit-image, so they work offline.
SAMPLE_IMAGES = {
    "cat": "chelsea",
    "chelsea": "chelsea",
    "coffee": "coffee",
    "astronaut": "astronaut",
    "rocket": "rocket",
    # textures (style images for the last lecture)
    "brick": "brick",
    "grass": "grass",
    "gravel": "gravel",
    "hubble_deep_field": "hubble_deep_field",
}


def sample_image(name: str) -> np.ndarray:
    """A sample photo or texture from ``skimage.data`` as an ``(H, W, 3)`` uint8 array.

    Names: ``cat`` (= ``chelsea``), ``coffee``, ``astronaut``, ``rocket``, and the textures
    ``brick``, ``grass``, ``gravel``, ``hubble_deep_field``.
    """
    import skimage.data

    if name not in SAMPLE_IMAGES:
        raise ValueError(f"Unknown sample image {name!r}; choose from {sorted(SAMPLE_IMAGES)}")
    img = getattr(skimage.data, SAMPLE_IMAGES[name])()
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    return np.ascontiguousarray(img[:, :, :3])


def image_tensor(src) -> torch.Tensor:
    """Any image-like input -> float (N, C, H, W) in [0, 1], C in {1, 3, 4}."""
    if isinstance(src, (str, os.PathLike)):
        if isinstance(src, str) and src in SAMPLE_IMAGES and not os.path.exists(src):
            src = sample_image(src)
        else:
            path = Path(src)
            if not path.exists():
                raise FileNotFoundError(
                    f"No image file {str(path)!r}, and it is not a sample name ({', '.join(sorted(SAMPLE_IMAGES))})."
                )
            src = Image.open(path)
    if isinstance(src, Image.Image):
        if src.mode not in ("L", "RGB", "RGBA"):
            src = src.convert("RGBA" if "A" in src.mode else "RGB")
        src = np.asarray(src)
    if isinstance(src, np.ndarray):
        a = src
        if a.ndim == 2:
            a = a[:, :, None]
        if a.ndim != 3 or a.shape[2] not in (1, 3, 4):
            raise ValueError(f"an image array must be (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), got {src.shape}")
        if a.dtype == np.uint8:
            t = torch.from_numpy(a.astype(np.float32) / 255.0)
        elif a.dtype == bool:
            t = torch.from_numpy(a.astype(np.float32))
        elif np.issubdtype(a.dtype, np.floating):
            t = torch.from_numpy(a.astype(np.float32))
        else:
            raise TypeError(f"image arrays must be uint8 (0..255) or float (0..1), got dtype {a.dtype}")
        return t.permute(2, 0, 1)[None].contiguous()
    if isinstance(src, torch.Tensor):
        t = src.detach().cpu()
        if t.dim() == 2:
            t = t[None]
        if t.dim() == 3:
            t = t[None]
        if t.dim() != 4 or t.shape[1] not in (1, 3, 4):
            raise ValueError(f"an image tensor must be (H, W), (C, H, W) or (N, C, H, W) with C in 1, 3, 4; got {tuple(src.shape)}")
        if t.dtype == torch.uint8:
            return t.float() / 255.0
        if not t.is_floating_point():
            raise TypeError(f"image tensors must be uint8 or float, got {t.dtype}")
        return t.float()
    raise TypeError(
        f"cannot read an image from {type(src).__name__}; give a path, a sample name, a PIL image, "
        "an (H, W[, C]) numpy array or a (C, H, W) / (N, C, H, W) tensor"
    )


def convert_channels(t: torch.Tensor, channels: int) -> torch.Tensor:  # (N,C,H,W) -> (N,channels,H,W)
    """``t`` with ``channels`` channels: RGBA composited on white, grey repeated to RGB, RGB to grey by its ITU-R 601 luma."""
    c = t.shape[1]
    if c == 4:  # RGBA: composite on white, like a browser would show it
        rgb, alpha = t[:, :3], t[:, 3:4]
        t, c = rgb * alpha + (1 - alpha), 3
    if c == channels:
        return t
    if channels == 1:  # ITU-R 601 luma, as PIL's "L" conversion
        w = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
        return (t * w).sum(1, keepdim=True)
    return t.expand(-1, 3, -1, -1).contiguous()


@reference
def load_image(src, size=None, channels: int = 3) -> torch.Tensor:
    """Read any image-like input as a model input.

    Parameters
    ----------
    src : str, path, PIL.Image, ndarray or Tensor
        A file path, a sample name (see :data:`SAMPLE_IMAGES`), a PIL image, an ``(H, W[, C])``
        array (uint8 0..255 or float 0..1), or a ``(C, H, W)`` / ``(N, C, H, W)`` tensor.
        Grayscale is repeated to RGB, RGBA is composited on white.
    size : int or (int, int), optional
        ``int``: resize the shorter side to ``size`` and centre-crop a ``size x size`` square
        (the usual ImageNet evaluation). ``(H, W)``: resize to exactly that. ``None``: keep.
    channels : {3, 1}
        3 for ImageNet models, 1 for the Fashion-MNIST networks.

    Returns
    -------
    Tensor (N, channels, H, W)
        float32 in [0, 1]; N = 1 unless a batch was given.
    """
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels!r}")
    t = convert_channels(image_tensor(src), channels)
    if t.numel() and (t.min() < -1e-6 or t.max() > 1 + 1e-6):
        raise ValueError(
            f"float images must be in [0, 1], got values in [{float(t.min()):.3g}, {float(t.max()):.3g}]; "
            "divide uint8-range floats by 255 (or pass the uint8 array itself)"
        )
    if size is not None:
        t = _resize(t, size)
    return t.clamp(0, 1).contiguous()


def _resize(t: torch.Tensor, size) -> torch.Tensor:
    h, w = t.shape[-2:]
    if isinstance(size, (int, np.integer)) and not isinstance(size, bool):
        if size <= 0:
            raise ValueError(f"size must be positive, got {size}")
        scale = size / min(h, w)
        nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
        t = F.interpolate(t, size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
        top, left = (nh - size) // 2, (nw - size) // 2
        return t[..., top : top + size, left : left + size]
    if isinstance(size, (tuple, list)) and len(size) == 2 and all(isinstance(s, (int, np.integer)) and s > 0 for s in size):
        return F.interpolate(t, size=tuple(int(s) for s in size), mode="bilinear", antialias=True, align_corners=False)
    raise ValueError(f"size must be an int or a pair (H, W) of positive ints, got {size!r}")


def to_numpy_image(x) -> np.ndarray:
    """An image tensor ``(C, H, W)`` / ``(1, C, H, W)`` -> ``(H, W, 3)`` or ``(H, W)`` float array in [0, 1]."""
    t = x.detach().cpu().float() if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x)).float()
    if t.dim() == 4:
        if t.shape[0] != 1:
            raise ValueError(f"to display one image give (C, H, W) or (1, C, H, W), got a batch of {t.shape[0]}")
        t = t[0]
    if t.dim() == 3 and t.shape[0] in (1, 3):
        t = t.permute(1, 2, 0)
    if t.dim() == 3 and t.shape[2] == 1:
        t = t[:, :, 0]
    return t.clamp(0, 1).numpy()


def to_pil(x) -> Image.Image:
    """An image tensor (or array) in [0, 1] -> a PIL image for display or saving."""
    a = to_numpy_image(x)
    return Image.fromarray((a * 255 + 0.5).astype(np.uint8))


def gaussian_blur(x: torch.Tensor, sigma: float = 1.0) -> torch.Tensor:
    """Blur each channel of ``x`` with a Gaussian of standard deviation ``sigma`` pixels.

    The one blur of coursekit: the periodic blur that regularises maximal-response pictures
    (``coursekit.maximize.blur_every``, Yosinski et al. 2015) and the "blur" baseline of deletion
    and insertion curves (``coursekit.faithfulness.blurred``, Petsiuk et al. 2018). The kernel is
    truncated at ``max(1, ceil(3 sigma))`` pixels and normalised; borders are mirrored (reflect
    padding, scipy's ``mode="mirror"``), or repeated when the image is smaller than the kernel.

    Parameters
    ----------
    x : Tensor (N, C, H, W)
    sigma : float
        Standard deviation in pixels, > 0.

    Returns
    -------
    Tensor (N, C, H, W), differentiable with respect to ``x``.
    """
    x = check_images(x, finite=False)
    sigma = number(sigma, "sigma", minimum=0, strict=True, unit="pixels")
    radius = max(1, math.ceil(3 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    kernel = torch.exp(-(t**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()  # (K,), K = 2 radius + 1
    n, c, h, w = x.shape
    u = x.reshape(n * c, 1, h, w)  # every channel as its own grey image
    mode = "reflect" if min(h, w) > radius else "replicate"  # reflect padding needs radius < size
    u = F.conv2d(F.pad(u, (radius, radius, 0, 0), mode=mode), kernel.view(1, 1, 1, -1))  # along W
    u = F.conv2d(F.pad(u, (0, 0, radius, radius), mode=mode), kernel.view(1, 1, -1, 1))  # along H
    return u.reshape(n, c, h, w)
