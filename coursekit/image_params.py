"""The picture being optimised: parameterisations, random transforms and regularisers.

Lecture 2, the image side of :func:`coursekit.maximize.maximize`:

* parameterisations (:class:`ImageParam`): :func:`pixel_image` (pixels, clamped to [0, 1]),
  :func:`fourier_image` (1/f-scaled Fourier spectrum in decorrelated colours, sigmoid; Olah et
  al. 2017), :func:`stack` (several of them side by side in one batch);
* transforms ``t(x, generator) -> x``, random and differentiable, applied before every forward
  pass (robustness): :func:`jitter`, :func:`random_scale`, :func:`random_rotate`, :func:`pad`;
* regularisers ``r(x, step) -> x``, applied to the picture after every step: :func:`decay` (L2
  decay), :func:`blur_every` (periodic blur), as in Yosinski et al. 2015;
* :func:`only` restricts a transform or regulariser to some images of the batch.

References
----------
Mordvintsev, Olah & Tyka (2015), Inceptionism: going deeper into neural networks.
Yosinski, Clune, Nguyen, Fuchs & Lipson (2015), Understanding neural networks through deep visualization.
Olah, Mordvintsev & Schubert (2017), Feature visualization. Distill.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .devices import cpu_generator
from .images import gaussian_blur
from .inputs import non_negative_int, positive_int

__all__ = [
    "FourierImage",
    "ImageParam",
    "PixelImage",
    "StackedImage",
    "blur_every",
    "decay",
    "fourier_image",
    "jitter",
    "only",
    "pad",
    "pixel_image",
    "random_rotate",
    "random_scale",
    "stack",
]


# ==============================================================================================
# transforms: random, differentiable, applied before each forward pass


def jitter(pixels: int) -> Callable:
    """Shift the picture by a random offset of up to ``pixels`` in each direction (reflect padding).

    Features that survive small shifts are real structure, not pixel-level noise (Mordvintsev
    et al. 2015; Olah et al. 2017).
    """
    pixels = non_negative_int(pixels, "jitter's number of pixels")

    def t(x, generator=None):
        if pixels == 0:
            return x
        h, w = x.shape[-2:]
        dy, dx = torch.randint(0, 2 * pixels + 1, (2,), generator=generator, device="cpu").tolist()
        padded = F.pad(x, (pixels, pixels, pixels, pixels), mode="reflect" if min(h, w) > pixels else "replicate")
        return padded[..., dy : dy + h, dx : dx + w]

    t.__name__ = f"jitter({pixels})"
    return t


def random_scale(scales: Sequence[float] = (0.9, 0.95, 1.0, 1.05, 1.1)) -> Callable:
    """Resize the picture by a factor drawn from ``scales`` (bilinear)."""
    scales = [float(s) for s in scales]
    if not scales or min(scales) <= 0:
        raise ValueError(f"scales must be positive factors, got {scales!r}")

    def t(x, generator=None):
        s = scales[int(torch.randint(0, len(scales), (1,), generator=generator, device="cpu"))]
        if s == 1.0:
            return x
        h, w = x.shape[-2:]
        return F.interpolate(x, size=(max(1, round(h * s)), max(1, round(w * s))), mode="bilinear", align_corners=False)

    t.__name__ = f"random_scale({scales})"
    return t


def random_rotate(degrees: Sequence[float] = tuple(range(-10, 11)) + (0,) * 5) -> Callable:
    """Rotate the picture about its centre by an angle (in degrees) drawn from ``degrees``.

    Bilinear resampling; what comes in from outside the frame is the mirror image of the picture
    (``grid_sample``'s reflection padding), so no black corners appear. Small rotations are part
    of Lucid's standard transformation robustness (Olah, Mordvintsev & Schubert 2017): features
    that survive them are not tied to the pixel grid. The default, -10..10 degrees with 0 drawn
    five extra times, is Lucid's ``random_rotate(range(-10, 11) + 5 * [0])``.
    """
    angles = [float(a) for a in degrees]
    if not angles or not all(np.isfinite(angles)):
        raise ValueError(f"random_rotate needs a non-empty list of finite angles in degrees, got {degrees!r}")

    def t(x, generator=None):  # (N, C, H, W) -> (N, C, H, W)
        angle = angles[int(torch.randint(0, len(angles), (1,), generator=generator, device="cpu"))]
        if angle == 0.0:
            return x
        return _rotate(x, angle)

    t.__name__ = f"random_rotate({min(angles):g}..{max(angles):g} degrees)"
    return t


def _rotate(x: torch.Tensor, angle: float) -> torch.Tensor:
    """Rotate (N, C, H, W) pictures by ``angle`` degrees about the centre (counter-clockwise on screen)."""
    theta = np.deg2rad(angle)
    h, w = x.shape[-2:]
    cos, sin = float(np.cos(theta)), float(np.sin(theta))
    # affine_grid works in [-1, 1] coordinates per axis; undo the aspect ratio so a non-square
    # picture is rotated, not sheared
    matrix = torch.tensor([[cos, -sin * h / w, 0.0], [sin * w / h, cos, 0.0]], dtype=x.dtype, device=x.device)
    grid = F.affine_grid(matrix.expand(x.shape[0], 2, 3), list(x.shape), align_corners=False)  # (N, H, W, 2)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)



def pad(pixels: int, value: float = 0.5) -> Callable:
    """Pad the picture with a constant border (so that jitter does not always see the same edge)."""
    pixels = non_negative_int(pixels, "pad's number of pixels")

    def t(x, generator=None):
        return F.pad(x, (pixels,) * 4, mode="constant", value=value)

    t.__name__ = f"pad({pixels})"
    return t


def only(images: Sequence[int], fn: Callable) -> Callable:
    """Apply a transform or regulariser ``fn`` to some images of the batch only.

    ``only([1, 2], decay(0.01))`` decays images 1 and 2 and leaves the others as they are: with
    :func:`per_image` objectives and :class:`StackedImage` this runs several recipes in one batch.
    ``fn`` must keep the picture's shape (not :func:`random_scale`).
    """
    if not callable(fn):
        raise TypeError(f"only() wraps a transform or regulariser, got {fn!r}")
    chosen = sorted({int(i) for i in images})
    if not chosen or chosen[0] < 0:
        raise ValueError(f"only() needs non-negative image indices, got {images!r}")

    def g(x, arg=None):
        y = fn(x, arg)
        if y.shape != x.shape:
            raise ValueError(f"only() needs a shape-preserving {getattr(fn, '__name__', fn)}; it turned {tuple(x.shape)} into {tuple(y.shape)}")
        if chosen[-1] >= x.shape[0]:
            raise ValueError(f"only({chosen}, ...) names image {chosen[-1]}, but the batch has {x.shape[0]} images")
        mask = torch.zeros(x.shape[0], 1, 1, 1, dtype=torch.bool, device=x.device)
        mask[chosen] = True
        return torch.where(mask, y, x)

    g.__name__ = f"only({chosen}, {getattr(fn, '__name__', 'fn')})"
    return g


# ==============================================================================================
# regularisers: applied to the picture after each optimisation step


def decay(rate: float = 0.01) -> Callable:
    """L2 decay: pull every pixel towards mid-grey, ``x <- 0.5 + (1 - rate) (x - 0.5)`` (Yosinski et al. 2015)."""
    if not 0 <= rate < 1:
        raise ValueError(f"decay rate must be in [0, 1), got {rate!r}")

    def r(x, step):
        return 0.5 + (1 - rate) * (x - 0.5)

    r.__name__ = f"decay({rate:g})"
    return r


def blur_every(every: int = 4, sigma: float = 0.5) -> Callable:
    """Periodic blur: every ``every`` steps, blur the picture with a Gaussian of std ``sigma`` (Yosinski et al. 2015)."""
    every = positive_int(every, "every")
    if not sigma > 0:
        raise ValueError(f"sigma must be positive, got {sigma!r}")

    def r(x, step):
        return gaussian_blur(x, sigma) if (step + 1) % every == 0 else x

    r.__name__ = f"blur_every({every}, {sigma:g})"
    return r


# ==============================================================================================
# parameterisations


class ImageParam:
    """A picture described by tensors the optimiser changes.

    ``image()`` -> (N, C, H, W) in [0, 1], differentiable w.r.t. ``parameters()``;
    ``set_image_(x)`` makes the parameters describe picture ``x`` (used by the regularisers and
    to start from a photo); ``project_()`` runs after every step.
    """

    shape: tuple[int, int, int, int]

    def parameters(self) -> list[torch.Tensor]:
        raise NotImplementedError

    def image(self) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def set_image_(self, x: torch.Tensor) -> None:
        raise NotImplementedError

    def project_(self) -> None:
        pass

    @torch.no_grad()
    def to_(self, device) -> ImageParam:
        """Move the parameters to ``device`` in place (before optimising); returns ``self``.

        Pictures are made on the CPU (their seeded random start is drawn there, so it is the same on
        every device); :func:`coursekit.maximize.maximize` moves them to the model's device.
        """
        raise NotImplementedError


def _check_shape(shape) -> tuple[int, int, int, int]:
    if not (isinstance(shape, (tuple, list, torch.Size)) and len(shape) == 4 and all(isinstance(s, (int, np.integer)) and s > 0 for s in shape)):
        raise ValueError(f"an image shape is (N, C, H, W) of positive ints, got {shape!r}")
    return tuple(int(s) for s in shape)


def _check_init(init: torch.Tensor, shape) -> torch.Tensor:
    if not isinstance(init, torch.Tensor):
        raise TypeError(f"init must be an image tensor (N, C, H, W) in [0, 1], got {type(init).__name__}; use coursekit.load_image")
    init = init.detach().float()
    if init.dim() == 3:
        init = init[None]
    if init.shape[1:] != tuple(shape[1:]) or init.shape[0] not in (1, shape[0]):
        raise ValueError(f"init has shape {tuple(init.shape)}, the picture is {tuple(shape)}")
    if init.min() < -1e-6 or init.max() > 1 + 1e-6:
        raise ValueError(f"init must be in [0, 1], got values in [{float(init.min()):.3g}, {float(init.max()):.3g}]")
    return init.expand(shape).clamp(0, 1).clone()


class PixelImage(ImageParam):
    """Every pixel is a parameter; after each step pixels are clamped to [0, 1] (projected ascent)."""

    def __init__(self, shape, init: torch.Tensor | None = None, sd: float = 0.1, generator: torch.Generator | None = None):
        self.shape = _check_shape(shape)
        if init is None:
            x = (0.5 + sd * torch.randn(self.shape, generator=generator, device="cpu")).clamp(0, 1)
        else:
            x = _check_init(init, self.shape)
        self.x = x.requires_grad_(True)

    def parameters(self):
        return [self.x]

    def image(self):
        return self.x

    @torch.no_grad()
    def set_image_(self, x):
        self.x.copy_(x.clamp(0, 1))

    @torch.no_grad()
    def project_(self):
        self.x.clamp_(0, 1)

    @torch.no_grad()
    def to_(self, device):
        self.x = self.x.detach().to(device).requires_grad_(True)
        return self

    def __repr__(self):
        return f"PixelImage{self.shape}"


# Square root of the colour covariance of ImageNet photos (Olah et al. 2017, Lucid), columns
# normalised: decorrelated channels -> RGB.
_COLOR_SQRT = np.array([[0.26, 0.09, 0.02], [0.27, 0.00, -0.05], [0.27, -0.09, 0.03]], dtype=np.float32)
_COLOR_SQRT = torch.from_numpy(_COLOR_SQRT / np.max(np.linalg.norm(_COLOR_SQRT, axis=0)))


class FourierImage(ImageParam):
    """A picture described by its Fourier spectrum, scaled by 1/frequency, in decorrelated colours.

    ``image = sigmoid(M @ irfft2(scale * spectrum) / 4)`` where ``scale = 1 / max(f, 1/max(H, W))^decay_power``
    gives every frequency the energy it has in natural images, and ``M`` maps decorrelated
    colour channels to RGB. A gradient step then changes all frequencies about equally in
    *perceived* terms, so low frequencies (large structures) are no longer starved
    (Olah, Mordvintsev & Schubert 2017, "Feature Visualization", section "Preconditioning").
    """

    def __init__(self, shape, init: torch.Tensor | None = None, sd: float = 0.01, decay_power: float = 1.0,
                 decorrelate: bool = True, generator: torch.Generator | None = None):
        self.shape = _check_shape(shape)
        n, c, h, w = self.shape
        fy = torch.fft.fftfreq(h, device="cpu")[:, None]  # made on the CPU; to_(device) moves the picture
        fx = torch.fft.rfftfreq(w, device="cpu")[None, :]
        freqs = torch.sqrt(fy**2 + fx**2)  # (H, W//2+1), cycles per pixel
        self.scale = 1.0 / freqs.clamp_min(1.0 / max(h, w)) ** decay_power  # (H, W//2+1)
        self.decorrelate = bool(decorrelate) and c == 3
        self.spectrum = (sd * torch.randn(n, c, h, w // 2 + 1, 2, generator=generator, device="cpu")).requires_grad_(True)
        if init is not None:
            self.set_image_(_check_init(init, self.shape))

    def parameters(self):
        return [self.spectrum]

    def image(self):
        _n, _c, h, w = self.shape
        spec = torch.view_as_complex(self.spectrum) * self.scale  # (N, C, H, W//2+1)
        lin = torch.fft.irfft2(spec, s=(h, w), norm="ortho") / 4.0  # (N, C, H, W)
        if self.decorrelate:
            lin = torch.einsum("ij,njhw->nihw", _COLOR_SQRT.to(lin), lin)
        return torch.sigmoid(lin)

    @torch.no_grad()
    def set_image_(self, x):
        lin = torch.logit(x.clamp(1e-4, 1 - 1e-4))
        if self.decorrelate:
            lin = torch.einsum("ij,njhw->nihw", torch.linalg.inv(_COLOR_SQRT).to(lin), lin)
        spec = torch.fft.rfft2(lin * 4.0, norm="ortho") / self.scale
        self.spectrum.copy_(torch.view_as_real(spec))

    @torch.no_grad()
    def to_(self, device):
        self.spectrum = self.spectrum.detach().to(device).requires_grad_(True)
        self.scale = self.scale.to(device)
        return self

    def __repr__(self):
        return f"FourierImage{self.shape}(decorrelate={self.decorrelate})"


class StackedImage(ImageParam):
    """Several parameterisations side by side in one batch (e.g. pixels for some images, Fourier for others)."""

    def __init__(self, parts: Sequence[ImageParam]):
        parts = list(parts)
        if not parts or not all(isinstance(p, ImageParam) for p in parts):
            raise TypeError("stack() needs a non-empty list of ImageParam (pixel_image(...), fourier_image(...))")
        if len({p.shape[1:] for p in parts}) != 1:
            raise ValueError(f"stacked pictures must share (C, H, W), got {[p.shape for p in parts]}")
        self.parts = parts
        self.sizes = [p.shape[0] for p in parts]
        self.shape = (sum(self.sizes),) + tuple(parts[0].shape[1:])

    def parameters(self):
        return [t for p in self.parts for t in p.parameters()]

    def image(self):
        return torch.cat([p.image() for p in self.parts])

    @torch.no_grad()
    def set_image_(self, x):
        for p, chunk in zip(self.parts, torch.split(x, self.sizes)):
            p.set_image_(chunk)

    @torch.no_grad()
    def project_(self):
        for p in self.parts:
            p.project_()

    @torch.no_grad()
    def to_(self, device):
        for p in self.parts:
            p.to_(device)
        return self

    def __repr__(self):
        return f"StackedImage({self.parts})"


def stack(parts: Sequence[ImageParam]) -> StackedImage:
    """One batch made of several parameterisations, in order (see :class:`StackedImage`)."""
    return StackedImage(parts)


def pixel_image(shape, init: torch.Tensor | None = None, sd: float = 0.1, seed: int = 0) -> PixelImage:
    """A pixel parameterisation of ``shape`` (N, C, H, W): grey plus noise of std ``sd``, or ``init``."""
    return PixelImage(shape, init=init, sd=sd, generator=cpu_generator(seed))


def fourier_image(shape, init: torch.Tensor | None = None, sd: float = 0.01, decay_power: float = 1.0,
                  decorrelate: bool = True, seed: int = 0) -> FourierImage:
    """A Fourier / decorrelated-colour parameterisation of ``shape`` (N, C, H, W), Olah et al. 2017."""
    return FourierImage(shape, init=init, sd=sd, decay_power=decay_power, decorrelate=decorrelate,
                        generator=cpu_generator(seed))
