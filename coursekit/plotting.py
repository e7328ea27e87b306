"""Figures every lecture uses: titled image grids and heatmap overlays with a colour bar."""

from __future__ import annotations

import math
from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch

from .images import convert_channels, image_tensor, to_numpy_image
from .inputs import non_negative_int

__all__ = ["show_images", "overlay", "show_overlays", "heatmap_array", "notebook_figures", "figure_png", "curve_style", "legend_below"]


def _as_list(images) -> list:
    if isinstance(images, torch.Tensor) and images.dim() == 4:
        return list(images)
    if isinstance(images, np.ndarray) and images.ndim == 4:
        return list(images)
    if isinstance(images, (list, tuple)):
        return list(images)
    return [images]


def _display_array(im) -> np.ndarray:
    """Any single image -> (H, W) or (H, W, 3) float array in [0, 1]."""
    t = image_tensor(im)  # (1,C,H,W)
    if t.shape[0] != 1:
        raise ValueError(f"expected one image, got a batch of {t.shape[0]}")
    return to_numpy_image(convert_channels(t, 1 if t.shape[1] == 1 else 3))


def show_images(
    images,
    titles: Sequence[str] | None = None,
    ncols: int | None = None,
    suptitle: str | None = None,
    size: float = 2.2,
    cmap: str = "gray",
):
    """Show images in a grid; returns the figure.

    ``images``: a batch ``(N, C, H, W)`` or a list of images (tensors, arrays or PIL images).
    Single-channel images use ``cmap``.
    """
    imgs = [_display_array(im) for im in _as_list(images)]
    if titles is not None and len(titles) != len(imgs):
        raise ValueError(f"got {len(titles)} titles for {len(imgs)} images")
    n = len(imgs)
    ncols = ncols or min(n, 6)
    nrows = math.ceil(n / ncols)
    title_lines = max((str(t).count("\n") + 1 for t in titles), default=0) if titles is not None else 0
    row_height = size + 0.2 * title_lines  # room for multi-line titles
    fig, axes = plt.subplots(nrows, ncols, figsize=(size * ncols, row_height * nrows + (0.4 if suptitle else 0)), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i, (ax, im) in enumerate(zip(axes.flat, imgs)):
        ax.imshow(im, cmap=cmap if im.ndim == 2 else None, vmin=0, vmax=1)
        if titles is not None:
            ax.set_title(titles[i], fontsize=9)
    if suptitle:
        fig.suptitle(suptitle)
    fig.tight_layout()
    return fig


def heatmap_array(heatmap) -> np.ndarray:
    """A 2-d map scaled to [0, 1] (a constant map becomes all zeros, never NaN)."""
    h = heatmap.detach().cpu().float().numpy() if isinstance(heatmap, torch.Tensor) else np.asarray(heatmap, dtype=np.float32)
    while h.ndim > 2 and h.shape[0] == 1:  # (1, 1, H, W) -> (H, W)
        h = h[0]
    if h.ndim != 2:
        raise ValueError(f"a heatmap must be 2-d (H, W), got shape {h.shape}")
    lo, hi = float(h.min()), float(h.max())
    return np.zeros_like(h) if hi - lo < 1e-12 else (h - lo) / (hi - lo)


def overlay(image, heatmap, ax=None, alpha: float = 0.5, cmap: str = "jet", title: str | None = None, colorbar: bool = True, label: str = "relevance"):
    """Draw ``heatmap`` (H, W) over ``image`` with a colour bar; returns the axes.

    The heatmap is shown on its own scale (its min..max); it is resized to the image if needed.
    """
    img = to_numpy_image(image)
    h = heatmap.detach().cpu().float() if isinstance(heatmap, torch.Tensor) else torch.as_tensor(np.asarray(heatmap, dtype=np.float32))
    while h.dim() > 2 and h.shape[0] == 1:
        h = h[0]
    if h.dim() != 2:
        raise ValueError(f"a heatmap must be 2-d (H, W), got shape {tuple(heatmap.shape)}")
    if tuple(h.shape) != img.shape[:2]:
        h = torch.nn.functional.interpolate(h[None, None], size=img.shape[:2], mode="bilinear", align_corners=False)[0, 0]
    if ax is None:
        _, ax = plt.subplots(figsize=(4, 4))
    ax.imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=1)
    im = ax.imshow(h.numpy(), cmap=cmap, alpha=alpha)
    ax.axis("off")
    if title:
        ax.set_title(title, fontsize=9)
    if colorbar:
        cb = ax.figure.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
        cb.set_label(label, fontsize=8)
    return ax


def show_overlays(image, heatmaps: dict, ncols: int | None = None, suptitle: str | None = None, size: float = 3.0, **kwargs):
    """One overlay per entry of ``{title: heatmap}`` next to the image; returns the figure."""
    n = len(heatmaps) + 1
    ncols = ncols or min(n, 5)
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(size * ncols, size * nrows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    img = to_numpy_image(image)
    axes.flat[0].imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=1)
    axes.flat[0].set_title("input", fontsize=9)
    for ax, (title, h) in zip(list(axes.flat)[1:], heatmaps.items()):
        overlay(image, h, ax=ax, title=title, **kwargs)
    if suptitle:
        fig.suptitle(suptitle)
    fig.tight_layout()
    return fig


PALETTE_SAMPLE = 65536  # pixels a palette is chosen from (figure_png)


def figure_png(fig, colors: int | None = None, dither: bool = True) -> bytes:
    """Encode a matplotlib figure as PNG bytes, losslessly or with an adaptive palette.

    ``colors=None`` keeps every pixel (true-colour PNG). ``colors`` in [2, 256] stores at most that
    many colours (an 8-bit palette PNG, 4-5x smaller): a figure that already has no more colours is
    stored exactly; otherwise the palette is chosen to cover the figure's colours (PIL's
    max-coverage quantiser) and the figure is dithered against it (Floyd-Steinberg), so heatmaps
    keep their pixel-level detail, photos keep smooth gradients instead of posterised bands, and
    nothing shows JPEG's 8x8 blocks. Measured on a figure of two photos and four saliency maps
    (magma) with a colour bar, 256 colours: 93 kB against 417 kB true-colour PNG, mean error 3.9
    of 255 levels (JPEG quality 90: 90 kB, mean error 8.0, largest 126, blocks on the speckle).
    ``dither=False`` maps each pixel to its nearest palette colour instead: smaller files where a
    figure has many speckled maps (lecture 3's at 72 colours: 1.9 MB against 3.0 MB dithered), at
    the price of posterised bands on photos (83 kB on the figure above, largest error 14).

    The palette is chosen from a fixed random sample of ``PALETTE_SAMPLE`` pixels (256 per colour),
    then every pixel is mapped to it. Choosing it from all pixels made figures most of a notebook's
    time spent on figures (lecture 01: 11.5 of 50.8 s of CPU). Measured on a 1121 x 529 figure of two
    photos and eight magma maps, 256 colours, all pixels against the sample: 1.2-2.3 s against
    0.65-0.74 s of CPU per figure (0.47 s of it matplotlib's drawing), mean error 3.94 / 3.72 levels
    dithered and 3.47 / 3.44 undithered, largest 36 / 46 and 16 / 20, files within 1 % of each other.
    """
    import io

    from PIL import Image

    colors = _palette_size(colors)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight", facecolor="white")
    if colors is None:
        return buf.getvalue()
    image = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    rgb = np.asarray(image)  # (H, W, 3) uint8
    if image.getcolors(colors) is not None:  # few enough colours: an exact palette, nothing lost
        packed = (rgb[..., 0].astype(np.uint32) << 16) | (rgb[..., 1].astype(np.uint32) << 8) | rgb[..., 2]  # (H, W)
        codes, index = np.unique(packed.ravel(), return_inverse=True)
        palette = np.stack([codes >> 16, (codes >> 8) & 255, codes & 255], axis=1).astype(np.uint8)  # (n, 3)
        paletted = Image.fromarray(index.reshape(rgb.shape[:2]).astype(np.uint8), mode="P")
        paletted.putpalette(palette.ravel().tolist())
    else:  # a palette that covers the figure's colours, then each pixel mapped to it (dithered or nearest)
        pixels = rgb.reshape(-1, 3)  # (H*W, 3)
        if len(pixels) > PALETTE_SAMPLE:  # the palette from a fixed random sample of the pixels: see the docstring
            pixels = pixels[np.random.default_rng(0).choice(len(pixels), PALETTE_SAMPLE, replace=False)]
        palette = Image.fromarray(pixels[None]).quantize(colors=colors, method=Image.Quantize.MAXCOVERAGE,
                                                        dither=Image.Dither.NONE)
        paletted = image.quantize(palette=palette,
                                  dither=Image.Dither.FLOYDSTEINBERG if dither else Image.Dither.NONE)
    out = io.BytesIO()
    paletted.save(out, format="png", optimize=True)
    return out.getvalue()


def _palette_size(colors):
    if colors is not None and (not isinstance(colors, int) or isinstance(colors, bool) or not 2 <= colors <= 256):
        raise ValueError(f"colors must be None (true colour) or an int in [2, 256], got {colors!r}")
    return colors


def notebook_figures(dpi: int = 100, jpeg_quality: int | None = None, fontsize: float = 10.0,
                     png_colors: int | None = None, dither: bool = True) -> None:
    """Draw a notebook's inline figures at ``dpi`` with legible text, as PNG or JPEG.

    Call it once at the top of a notebook. ``dpi`` (>= 100 for the course) sets
    ``figure.dpi`` so a 2.6-inch panel is at least 256 pixels on screen; ``fontsize`` sets the
    base font size. The format: lossless PNG by default; ``png_colors`` (2-256) stores PNG with
    an adaptive palette (:func:`figure_png`), which keeps fine detail such as saliency speckle
    free of block artefacts at a fraction of the size; ``jpeg_quality`` (1-95) switches to JPEG,
    the smallest, for notebooks full of photos (it blurs fine detail into 8x8 blocks). ``dither``
    is passed to :func:`figure_png`.
    """
    if not isinstance(dpi, int) or isinstance(dpi, bool) or not 50 <= dpi <= 300:
        raise ValueError(f"dpi must be an int in [50, 300], got {dpi!r}")
    if jpeg_quality is not None and (not isinstance(jpeg_quality, int) or not 1 <= jpeg_quality <= 95):
        raise ValueError(f"jpeg_quality must be None (PNG) or an int in [1, 95], got {jpeg_quality!r}")
    if png_colors is not None and jpeg_quality is not None:
        raise ValueError("choose one format: png_colors (palette PNG) or jpeg_quality (JPEG), not both")
    png_colors = _palette_size(png_colors)
    plt.rcParams.update({"figure.dpi": dpi, "font.size": fontsize, "axes.titlesize": fontsize,
                         "axes.labelsize": fontsize, "legend.fontsize": fontsize - 1,
                         "xtick.labelsize": fontsize - 1, "ytick.labelsize": fontsize - 1})
    try:
        from IPython import get_ipython
        from matplotlib_inline.backend_inline import set_matplotlib_formats
    except ImportError:  # plain Python: nothing inline to configure
        return
    shell = get_ipython()
    if shell is None:
        return
    if jpeg_quality is not None:
        set_matplotlib_formats("jpeg", pil_kwargs={"quality": jpeg_quality})
        return
    set_matplotlib_formats("png")
    if png_colors is not None:  # replace the PNG encoder for figures, keep the rest of the inline set-up
        import base64

        from matplotlib.figure import Figure

        def encode(fig):
            if not fig.axes and not fig.lines and not fig.patches and not fig.texts and not fig.images:
                return None  # an empty figure is not drawn, as matplotlib_inline does
            return base64.b64encode(figure_png(fig, png_colors, dither=dither)).decode("ascii")

        shell.display_formatter.formatters["image/png"].for_type(Figure, encode)


# curves that must be told apart in print and by colour-blind readers: colour AND marker AND dash
CURVE_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
CURVE_DASHES = ("-", "--", "-.", ":")


def curve_style(i: int, n_points: int | None = None) -> dict:
    """Line keywords for the ``i``-th of several curves on one axes: its own marker and dash.

    ``n_points`` (the curve's length) thins the markers to about 12 so long curves stay readable.
    """
    i = non_negative_int(i, "i")
    style = {"marker": CURVE_MARKERS[i % len(CURVE_MARKERS)], "linestyle": CURVE_DASHES[i % len(CURVE_DASHES)],
             "markersize": 5}
    if n_points is not None and n_points > 12:
        style["markevery"] = max(1, n_points // 12)
    return style


def legend_below(ax, ncol: int = 2, fontsize: float = 9, pad: float = 0.16, **kwargs):
    """A legend under the axes (below its x label), so it never covers the curves."""
    return ax.legend(loc="upper center", bbox_to_anchor=(0.5, -pad), ncol=ncol, fontsize=fontsize, frameon=False,
                     **kwargs)


def draw_image(ax, x: torch.Tensor, title: str = "input") -> None:
    """Draw one image ``x`` (C, H, W) in [0, 1] on ``ax`` without axes (grey for one channel, else its first channel)."""
    img = to_numpy_image(x.detach().cpu().float().clamp(0, 1)) if x.shape[0] in (1, 3) else x[0].cpu().numpy()
    ax.imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=1)
    ax.set_title(title, fontsize=8)
    ax.axis("off")
