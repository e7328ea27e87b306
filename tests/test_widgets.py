"""The generic explorer (coursekit.widgets): controls, live widget mode, static fallback."""

from __future__ import annotations

import ipywidgets
import matplotlib.figure
import pytest

from coursekit import widgets
from coursekit.widgets import Control, explorer, make_control, widgets_available


class Recorder:
    """A draw callback that remembers what it was asked to draw."""

    def __init__(self):
        self.calls = []

    def __call__(self, ax, **values):
        self.calls.append(values)
        ax.plot([0, 1], [0, values.get("alpha", 1)])


CONTROLS = {"image": ["cat", "coffee"], "method": {"Grad-CAM": "gc", "SmoothGrad": "sg"}, "alpha": (0.0, 1.0, 0.1)}


def test_make_control_kinds():
    c = make_control("image", ["cat", "coffee"])
    assert (c.kind, c.default, c.values()) == ("dropdown", "cat", ["cat", "coffee"])
    c = make_control("method", {"Grad-CAM": "gc", "SmoothGrad": "sg"})
    assert (c.kind, c.default, c.values(), c.options[1]) == ("dropdown", "gc", ["gc", "sg"], ("SmoothGrad", "sg"))
    c = make_control("alpha", (0.0, 1.0, 0.1, 0.5))
    assert (c.kind, c.default, c.options) == ("slider", 0.5, (0.0, 1.0, 0.1))
    assert isinstance(c.build(), ipywidgets.FloatSlider)
    c = make_control("k", (1, 9))
    assert isinstance(c.build(), ipywidgets.IntSlider) and c.build().step == 1
    dd = ipywidgets.Dropdown(options=["a", "b"], value="b")
    c = make_control("x", dd)
    assert c.build() is dd and c.default == "b" and c.values() == ["a", "b"]
    assert make_control("y", c) is c


@pytest.mark.parametrize(
    "spec, exc, match",
    [
        ([], ValueError, "must not be empty"),
        ({}, ValueError, "must not be empty"),
        ((1.0, 0.0), ValueError, "min < max"),
        ((0.0, 1.0, 0.1, 2.0), ValueError, "default"),
        (3.5, TypeError, "list of values"),
        (None, TypeError, "list of values"),
    ],
)
def test_bad_control_specs(spec, exc, match):
    with pytest.raises(exc, match=match):
        make_control("c", spec)


def test_static_grid_combines_the_listed_values():
    draw = Recorder()
    view = explorer(draw, CONTROLS, static={"image": ["cat", "coffee"], "method": ["gc", "sg"]}, mode="static", title="demo")
    assert view.mode == "static" and view.widget is None and repr(view) == "Explorer(static, 4 panels)"
    fig = view.figure
    assert isinstance(fig, matplotlib.figure.Figure)
    assert draw.calls == [
        {"image": "cat", "method": "gc", "alpha": 0.0},
        {"image": "cat", "method": "sg", "alpha": 0.0},
        {"image": "coffee", "method": "gc", "alpha": 0.0},
        {"image": "coffee", "method": "sg", "alpha": 0.0},
    ]
    drawn = [ax for ax in fig.axes if ax.get_lines()]
    assert len(drawn) == 4
    assert drawn[1].get_title() == "image=cat, method=sg"
    assert fig._suptitle.get_text() == "demo"


def test_static_default_varies_the_first_dropdown_and_hides_spare_axes():
    draw = Recorder()
    fig = explorer(draw, {"alpha": (0.0, 1.0), "image": ["a", "b", "c"]}, mode="static", ncols=2).figure
    assert [c["image"] for c in draw.calls] == ["a", "b", "c"]
    assert len(fig.axes) == 4 and not fig.axes[3].axison


def test_static_errors():
    draw = Recorder()
    with pytest.raises(ValueError, match="'colour'"):
        explorer(draw, CONTROLS, static={"colour": ["red"]}, mode="static")
    with pytest.raises(ValueError, match="non-empty list"):
        explorer(draw, CONTROLS, static={"image": []}, mode="static")
    with pytest.raises(ValueError, match="max_panels"):
        explorer(draw, CONTROLS, static={"image": ["cat"] * 5, "method": ["gc"] * 3}, mode="static")
    with pytest.raises(TypeError, match="draw"):
        explorer("not a function", CONTROLS)
    with pytest.raises(ValueError, match="non-empty dict"):
        explorer(draw, {})
    with pytest.raises(ValueError, match="mode"):
        explorer(draw, CONTROLS, mode="live")


def test_widget_mode_builds_controls_and_redraws_on_change(monkeypatch):
    import matplotlib.pyplot as plt

    monkeypatch.setattr(plt, "show", lambda *a, **k: None)
    draw = Recorder()
    view = explorer(draw, CONTROLS, mode="widget")
    assert view.mode == "widget" and view.figure is None
    assert repr(view) == "Explorer(widget, controls=['image', 'method', 'alpha'])"
    box = view.widget
    assert isinstance(box, ipywidgets.VBox)
    controls = box.children[0].children
    assert [type(c).__name__ for c in controls] == ["Dropdown", "Dropdown", "FloatSlider"]
    assert [c.description for c in controls] == ["image", "method", "alpha"]
    assert draw.calls == [{"image": "cat", "method": "gc", "alpha": 0.0}]  # drawn once with the defaults
    controls[1].value = "sg"
    assert draw.calls[-1] == {"image": "cat", "method": "sg", "alpha": 0.0}


def _has_arguments(css: str) -> list[str]:
    """The argument of every ``:has(...)`` in ``css`` (balanced parentheses)."""
    found, start = [], css.find(":has(")
    while start >= 0:
        depth, i = 1, start + len(":has(")
        while depth:
            depth += {"(": 1, ")": -1}.get(css[i], 0)
            i += 1
        found.append(css[start + len(":has("):i - 1])
        start = css.find(":has(", start + 1)
    return found


def test_widget_mode_keeps_a_picture_for_static_renderers(monkeypatch):
    """Issue 20: a student's copy saved after a live run (no widget state) showed "Error displaying
    widget: model not found" in JupyterLab, which renders only the widget view of a bundle. The
    explorer now shows three outputs: the widget (view + a plain line, no picture: a static renderer
    would show it twice), a style, and a PNG of the first view."""
    import base64

    shown = []
    monkeypatch.setattr("IPython.display.display", lambda obj, raw=False: shown.append((obj, raw)))
    view = explorer(Recorder(), CONTROLS, mode="widget", title="demo")
    assert view.picture[:8] == b"\x89PNG\r\n\x1a\n"
    view._ipython_display_()
    assert [raw for _, raw in shown] == [True, True, True]
    (bundle, _), (style, _), (picture, _) = shown
    assert bundle["application/vnd.jupyter.widget-view+json"]["model_id"] == view.widget.model_id
    assert set(bundle) == {"application/vnd.jupyter.widget-view+json", "text/plain"}
    assert "VBox" not in bundle["text/plain"]
    assert "image=cat" in bundle["text/plain"] and "demo" in bundle["text/plain"]
    assert set(picture) == {"image/png", "text/plain"} and base64.b64decode(picture["image/png"]) == view.picture
    assert picture["text/plain"] == bundle["text/plain"]
    assert style["text/plain"] == "" and style["text/html"].startswith("<style")
    assert "coursekit-explorer" in view.widget._dom_classes  # what the style recognises the live view by
    assert [b for b, _ in shown] == view.displays()
    view.widget.children[0].children[0].value = "coffee"  # a later change does not replace the saved picture
    assert base64.b64decode(view.displays()[2]["image/png"]) == view.picture
    with pytest.raises(ValueError, match="static"):
        explorer(Recorder(), {"image": ["a"]}, mode="static").mimebundle()


def test_a_photo_is_saved_as_jpeg_a_plot_as_png():
    """The saved picture is small: a line plot stays PNG (smaller, sharp), a view of a photo-like image
    becomes JPEG when that is less than half the size (measured at 100 dpi: PNG 112 kB, JPEG 26 kB)."""
    import io

    from PIL import Image
    from skimage import data

    plot = explorer(Recorder(), CONTROLS, mode="widget")
    assert list(plot.displays()[2])[0] == "image/png"
    astronaut = data.astronaut()[::2, ::2]
    photo = explorer(lambda ax, k: ax.imshow(astronaut[::k, ::k]), {"k": [1, 2]}, mode="widget")
    mime, data = widgets._compact(photo.picture)
    assert mime == "image/jpeg" and 2 * len(data) < len(photo.picture)
    assert Image.open(io.BytesIO(data)).size == Image.open(io.BytesIO(photo.picture)).size
    assert list(photo.displays()[2])[0] == "image/jpeg"


def test_snapshot_style_rules():
    """The style's rules, as the browser reads them: a ``:has()`` inside another one makes a rule
    invalid and the browser drops it (that hid nothing: found in Chromium). Each rule is scoped to an
    output area that holds the style; the live view is recognised by the box's class."""
    css = widgets._SNAPSHOT_STYLE
    assert css.startswith('<style class="coursekit-explorer-style">') and css.endswith("</style>")
    arguments = _has_arguments(css)
    assert arguments and not [a for a in arguments if ":has(" in a]
    rules = [r.strip() for r in css[css.index(">") + 1:-len("</style>")].split("}") if r.strip()]
    assert len(rules) == 3 and all(r.endswith("{ display: none;") for r in rules)
    hide_style, hide_picture, hide_error = (r.split("{")[0].strip() for r in rules)
    assert hide_style == ".jp-OutputArea-child:has(.coursekit-explorer-style)"
    assert hide_picture.startswith(".jp-OutputArea:has(.coursekit-explorer) >")  # only next to the live widget
    assert hide_picture.endswith("+ .jp-OutputArea-child")  # the output right after the style: the picture
    assert hide_error.startswith(".jp-OutputArea:has(.coursekit-explorer-style) >")
    assert hide_error.endswith(".lm-Panel:not(:has(*))")  # the widget renderer's node with text only


def test_static_grid_titles_clear_the_pictures():
    """No panel title may overlap another panel (second-row titles were drawn over first-row images)."""
    import numpy as np

    def draw(ax, style, weight):
        ax.imshow(np.zeros((160, 160, 3)))
        ax.set_title(f"{style}, style weight {weight:g}", fontsize=10)
        ax.axis("off")

    view = explorer(draw, {"style": ["Hubble", "stain"], "weight": [10.0, 100.0, 1000.0]},
                    static={"style": ["Hubble", "stain"], "weight": [10.0, 100.0, 1000.0]}, ncols=3, size=3.6,
                    title="Style weight", mode="static")
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig = view.figure
    canvas = FigureCanvasAgg(fig)  # the figure is detached from pyplot
    canvas.draw()
    renderer = canvas.get_renderer()
    axes = [a for a in fig.axes if a.has_data()]
    assert len(axes) == 6
    for a in axes:
        title = a.title.get_window_extent(renderer)
        for b in axes:
            if b is not a:
                assert not title.overlaps(b.get_window_extent(renderer)), (a.get_title(), b.get_title())
    suptitle = fig._suptitle.get_window_extent(renderer)
    assert not any(suptitle.overlaps(a.get_window_extent(renderer)) for a in axes)


def test_auto_mode_is_static_outside_a_kernel(monkeypatch):
    assert not widgets_available()  # pytest is not a Jupyter kernel
    assert explorer(Recorder(), {"image": ["a"]}).mode == "static"


def test_environment_variable_forces_static(monkeypatch):
    class FakeKernel:  # what get_ipython() returns inside Jupyter
        pass

    FakeKernel.__name__ = "ZMQInteractiveShell"
    monkeypatch.setattr("IPython.get_ipython", lambda: FakeKernel())
    monkeypatch.delenv("COURSEKIT_STATIC", raising=False)
    assert widgets_available()
    monkeypatch.setenv("COURSEKIT_STATIC", "1")
    assert not widgets_available()
    assert explorer(Recorder(), {"image": ["a"]}).mode == "static"


def test_static_figure_is_displayed_once(monkeypatch):
    import matplotlib.pyplot as plt

    shown = []
    monkeypatch.setattr("IPython.display.display", lambda obj: shown.append(obj))
    view = explorer(Recorder(), {"image": ["a", "b"]}, mode="static")
    assert view.figure.number not in plt.get_fignums()  # not shown again by the inline backend
    view._ipython_display_()
    assert shown == [view.figure]
    with pytest.raises(ValueError, match="either"):
        widgets.Explorer()


def test_control_repr():
    assert "slider" in repr(Control("a", "slider", (0, 1, 1), 0))
    assert widgets.__all__


def test_a_title_template_follows_the_controls(monkeypatch):
    """Issue 20: a fixed title ('... of the cat photo') stayed over the espresso after the dropdown
    changed. A title naming controls in braces is filled in with the shown values at every redraw."""
    import matplotlib.pyplot as plt

    titles = []
    monkeypatch.setattr(plt, "show", lambda *a, **k: titles.append(plt.gcf()._suptitle.get_text()))
    controls = {"image": ["cat", "coffee"], "rank": {"top-1 class": 1, "top-2 class": 2}, "alpha": (0.0, 1.0, 0.1)}
    view = explorer(Recorder(), controls, mode="widget", title="{image}: LRP for its {rank}, alpha {alpha}")
    assert titles == ["cat: LRP for its top-1 class, alpha 0"]
    assert "cat: LRP for its top-1 class" in view.mimebundle()["text/plain"]
    image, rank, _ = view.widget.children[0].children
    image.value = "coffee"
    rank.value = 2
    assert titles[-2:] == ["coffee: LRP for its top-1 class, alpha 0", "coffee: LRP for its top-2 class, alpha 0"]
    plain = explorer(Recorder(), controls, mode="widget", title="no {{braces}} filled")
    assert titles[-1] == "no {braces} filled" and plain.mode == "widget"


def test_a_title_template_in_the_static_grid():
    fig = explorer(Recorder(), {"image": ["cat", "coffee"], "rank": [1, 2, 3]}, static={"image": ["coffee"], "rank": [1, 2, 3]},
                   mode="static", title="the {image} photo").figure
    assert fig._suptitle.get_text() == "the coffee photo"
    with pytest.raises(ValueError, match="varies"):  # one title over panels of two photos would be wrong
        explorer(Recorder(), {"image": ["cat", "coffee"]}, static={"image": ["cat", "coffee"]}, mode="static",
                 title="the {image} photo")
    with pytest.raises(ValueError, match=r"names \['photo'\].*controls are \['image'\]"):
        explorer(Recorder(), {"image": ["cat"]}, mode="static", title="the {photo}")
    with pytest.raises(ValueError, match="not a valid template"):
        explorer(Recorder(), {"image": ["cat"]}, mode="static", title="a { without its partner")
    with pytest.raises(TypeError, match="title must be a string"):
        explorer(Recorder(), {"image": ["cat"]}, mode="static", title=3)
