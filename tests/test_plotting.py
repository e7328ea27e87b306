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
