import numpy as np
import pytest
import torch

import coursekit
from coursekit.plotting import heatmap_array, overlay, show_images, show_overlays


def test_show_images_grid_and_titles():
    fig = show_images(torch.rand(5, 3, 8, 8), titles=list("abcde"), ncols=3, suptitle="five")
    axes = fig.axes
    assert len(axes) == 6  # 2 rows x 3 columns, last one blank
    assert [a.get_title() for a in axes[:5]] == list("abcde")
    assert fig._suptitle.get_text() == "five"
    shown = axes[0].images[0].get_array()
    assert shown.shape == (8, 8, 3)


def test_show_images_accepts_mixed_inputs():
    fig = show_images([coursekit.sample_image("coffee")[:10, :10], torch.rand(1, 28, 28), np.zeros((4, 4))])
    assert fig.axes[1].images[0].get_array().shape == (28, 28)
    with pytest.raises(ValueError):
        show_images(torch.rand(2, 3, 4, 4), titles=["one"])


def test_overlay_data_and_colorbar():
    img = torch.rand(1, 3, 16, 16)
    heat = torch.zeros(4, 4)
    heat[1, 2] = 1.0
    ax = overlay(img, heat, title="map")
    data = ax.images[1].get_array()
    assert data.shape == (16, 16)  # upsampled to the image
    assert np.unravel_index(np.argmax(data), data.shape)[1] in range(8, 12)
    assert len(ax.figure.axes) == 2 and ax.get_title() == "map"  # image axes + colour bar
    with pytest.raises(ValueError):
        overlay(img, torch.rand(2, 3, 4))


def test_heatmap_array_never_nan():
    assert np.all(heatmap_array(torch.full((3, 3), -2.0)) == 0)
    m = heatmap_array(np.array([[1.0, 3.0]]))
    assert m.min() == 0 and m.max() == 1


def test_show_overlays():
    fig = show_overlays(torch.rand(1, 3, 8, 8), {"a": torch.rand(8, 8), "b": torch.rand(8, 8)}, suptitle="s")
    titles = [a.get_title() for a in fig.axes]
    assert "input" in titles and "a" in titles and "b" in titles


def test_curve_styles_differ_and_legend_goes_below():
    import matplotlib.pyplot as plt

    from coursekit.plotting import curve_style, legend_below

    styles = [curve_style(i) for i in range(4)]
    assert len({(s["marker"], s["linestyle"]) for s in styles}) == 4
    assert curve_style(0, n_points=120)["markevery"] == 10 and "markevery" not in curve_style(0, n_points=8)
    with pytest.raises(ValueError, match="i must be"):
        curve_style(-1)
    fig, ax = plt.subplots()
    for i in range(3):
        ax.plot([0, 1], [i, i + 1], label=f"curve {i}", **curve_style(i))
    legend = legend_below(ax)
    fig.canvas.draw()
    assert legend.get_window_extent().y1 < ax.get_window_extent().y0
    plt.close(fig)


def _noise_figure(seed=0):
    import matplotlib.pyplot as plt

    rng = np.random.default_rng(seed)
    fig, axes = plt.subplots(1, 3, figsize=(6, 2), dpi=100)
    for ax, cmap in zip(axes, ["magma", "RdBu_r", "viridis"]):
        im = ax.imshow(np.abs(rng.standard_normal((64, 64))), cmap=cmap)
        fig.colorbar(im, ax=ax)
        ax.set_title(cmap)
    return fig


def _decode(png: bytes) -> np.ndarray:
    import io

    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)


def test_figure_png_palette_is_exact_when_few_colours_and_close_otherwise():
    import matplotlib.pyplot as plt

    from coursekit.plotting import figure_png

    fig = _noise_figure()
    full, pal = figure_png(fig), figure_png(fig, colors=256)
    exact, reduced = _decode(full), _decode(pal)
    assert reduced.shape == exact.shape
    assert len(np.unique(reduced.reshape(-1, 3), axis=0)) <= 256
    err = np.abs(reduced - exact).max(-1)
    assert 0 < err.mean() < 8 and err.max() < 64  # a palette, not lossless, but no gross errors
    assert len(pal) < len(full) / 2
    plt.close(fig)
    # a figure of 3 flat colours is stored exactly
    fig, ax = plt.subplots(figsize=(2, 2), dpi=50)
    ax.imshow(np.array([[0, 1], [2, 0]]), cmap="viridis", interpolation="nearest")
    ax.axis("off")
    np.testing.assert_array_equal(_decode(figure_png(fig, colors=16)), _decode(figure_png(fig)))
    plt.close(fig)


@pytest.mark.parametrize("bad", [1, 257, 2.5, True, "256"])
def test_figure_png_rejects_bad_palette_sizes(bad):
    import matplotlib.pyplot as plt

    from coursekit.plotting import figure_png, notebook_figures

    fig = _noise_figure()
    with pytest.raises(ValueError, match="colors"):
        figure_png(fig, colors=bad)
    with pytest.raises(ValueError, match="colors"):
        notebook_figures(png_colors=bad)
    plt.close(fig)


def test_notebook_figures_palette_png_reaches_the_inline_formatter():
    import base64

    import matplotlib
    import matplotlib.pyplot as plt
    from IPython.core.interactiveshell import InteractiveShell

    from coursekit.plotting import notebook_figures

    with matplotlib.rc_context():  # notebook_figures sets rcParams: keep them to this test
        shell = InteractiveShell.instance()
        try:
            with pytest.raises(ValueError, match="one format"):
                notebook_figures(jpeg_quality=80, png_colors=256)
            notebook_figures(dpi=100, png_colors=64)
            fig = _noise_figure()
            data, _ = shell.display_formatter.format(fig)
            png = base64.b64decode(data["image/png"])
            assert len(np.unique(_decode(png).reshape(-1, 3), axis=0)) <= 64
            assert "image/jpeg" not in data
            plt.close(fig)
        finally:
            InteractiveShell.clear_instance()


def test_figure_png_dithering_is_a_choice():
    import matplotlib.pyplot as plt

    from coursekit.plotting import figure_png

    fig = _noise_figure(1)
    exact = _decode(figure_png(fig))
    dithered, banded = _decode(figure_png(fig, colors=16)), _decode(figure_png(fig, colors=16, dither=False))
    for im in (dithered, banded):
        assert len(np.unique(im.reshape(-1, 3), axis=0)) <= 16
    assert not np.array_equal(dithered, banded)
    # dithering spreads the error: local means (8x8 blocks) stay closer to the figure's
    def blocks(a):
        h, w = (a.shape[0] // 8) * 8, (a.shape[1] // 8) * 8
        return a[:h, :w].reshape(h // 8, 8, w // 8, 8, 3).mean((1, 3))
    assert np.abs(blocks(dithered) - blocks(exact)).mean() < np.abs(blocks(banded) - blocks(exact)).mean()
    plt.close(fig)
