"""Interactive explorers: a few dropdowns and sliders driving one matplotlib drawing.

One helper, :func:`explorer`, serves every lecture. You write a function that draws one view
into a matplotlib axes, ``draw(ax, **values)``, and describe its controls::

    explorer(draw_overlay,
             {"image": ["cat", "coffee"], "method": ["Grad-CAM", "SmoothGrad"], "alpha": (0.0, 1.0, 0.1)},
             static={"method": ["Grad-CAM", "SmoothGrad"]})

In a live Jupyter kernel with ipywidgets this shows the controls and redraws on every change.
Otherwise (ipywidgets missing, plain Python or a terminal, or the environment variable
``COURSEKIT_STATIC=1``, e.g. when executing notebooks headless so that the saved file keeps a
picture) it draws a **static grid**: one panel per combination of the ``static`` values, the other
controls at their defaults. A saved notebook then still shows something meaningful.
"""

from __future__ import annotations

import base64
import io
import itertools
import math
import os
import string
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["Control", "explorer", "make_control", "widgets_available"]


def widgets_available() -> bool:
    """True when ipywidgets can be shown: importable, inside a Jupyter kernel, and not forced off
    with ``COURSEKIT_STATIC=1``."""
    if os.environ.get("COURSEKIT_STATIC", "").strip().lower() in ("1", "true", "yes"):
        return False
    try:
        import ipywidgets  # noqa: F401
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and type(shell).__name__ == "ZMQInteractiveShell"


class Control:
    """One control: its name, allowed values (for the static grid) and default.

    Built by :func:`make_control` from a short specification:

    * a list or tuple of values (strings, numbers, ...) -> dropdown; default: the first value;
    * a dict ``{label: value}`` -> dropdown showing the labels; default: the first value;
    * ``(min, max)``, ``(min, max, step)`` or ``(min, max, step, default)`` of numbers -> slider
      (int slider when all are ints); default: ``min`` unless given;
    * an ipywidgets widget -> used as is (its ``value`` is the default).
    """

    def __init__(self, name: str, kind: str, options: Any = None, default: Any = None, widget: Any = None):
        self.name, self.kind, self.options, self.default, self.widget = name, kind, options, default, widget

    def values(self) -> list:
        """The values a static grid may use (dropdown options; slider: its default)."""
        if self.kind == "dropdown":
            return [v for _, v in self.options]
        return [self.default]

    def build(self):
        """The ipywidgets widget for this control."""
        import ipywidgets as w

        if self.widget is not None:
            return self.widget
        if self.kind == "dropdown":
            return w.Dropdown(options=self.options, value=self.default, description=self.name)
        lo, hi, step = self.options
        cls = w.IntSlider if all(isinstance(v, int) for v in (lo, hi, step)) else w.FloatSlider
        return cls(min=lo, max=hi, step=step, value=self.default, description=self.name, continuous_update=False)

    def __repr__(self) -> str:
        return f"Control({self.name!r}, {self.kind}, default={self.default!r})"


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def make_control(name: str, spec) -> Control:
    """Turn a control specification (see :class:`Control`) into a :class:`Control`."""
    if isinstance(spec, Control):
        return spec
    if hasattr(spec, "value") and hasattr(spec, "observe"):  # an ipywidgets widget
        opts = getattr(spec, "options", None)
        if opts is not None:
            pairs = [o if isinstance(o, tuple) and len(o) == 2 else (str(o), o) for o in opts]
            return Control(name, "dropdown", pairs, spec.value, widget=spec)
        return Control(name, "widget", None, spec.value, widget=spec)
    if isinstance(spec, Mapping):
        if not spec:
            raise ValueError(f"control {name!r}: a dict of options must not be empty")
        pairs = [(str(k), v) for k, v in spec.items()]
        return Control(name, "dropdown", pairs, pairs[0][1])
    if isinstance(spec, tuple) and len(spec) in (2, 3, 4) and all(_is_number(v) for v in spec):
        lo, hi = spec[0], spec[1]
        step = spec[2] if len(spec) >= 3 else (1 if all(isinstance(v, int) for v in (lo, hi)) else (hi - lo) / 20)
        default = spec[3] if len(spec) == 4 else lo
        if not lo < hi or not step > 0 or not lo <= default <= hi:
            raise ValueError(f"control {name!r}: a slider needs min < max, step > 0 and min <= default <= max, got {spec!r}")
        return Control(name, "slider", (lo, hi, step), default)
    if isinstance(spec, (list, tuple, range)):
        values = list(spec)
        if not values:
            raise ValueError(f"control {name!r}: the list of options must not be empty")
        return Control(name, "dropdown", [(str(v), v) for v in values], values[0])
    raise TypeError(
        f"control {name!r}: give a list of values (dropdown), a dict {{label: value}}, a (min, max[, step]) "
        f"tuple of numbers (slider) or an ipywidgets widget; got {type(spec).__name__}: {spec!r}"
    )


def _static_grid(draw, controls: list[Control], static, ncols, size, title, max_panels):
    import matplotlib.pyplot as plt

    by_name = {c.name: c for c in controls}
    if static is None:  # vary the first dropdown, everything else at its default
        first = next((c for c in controls if c.kind == "dropdown"), None)
        static = {first.name: first.values()[:max_panels]} if first is not None else {}
    if not isinstance(static, Mapping):
        raise TypeError(f"static must be a dict {{control name: list of values}}, got {type(static).__name__}")
    for name, values in static.items():
        if name not in by_name:
            raise ValueError(f"static names the control {name!r}, which is not among {list(by_name)}")
        if not isinstance(values, (list, tuple)) or not values:
            raise ValueError(f"static[{name!r}] must be a non-empty list of values, got {values!r}")
    varied = list(static)
    combos = [dict(zip(varied, vals)) for vals in itertools.product(*(static[n] for n in varied))] or [{}]
    if len(combos) > max_panels:
        raise ValueError(f"the static grid would have {len(combos)} panels (max_panels={max_panels}); list fewer values")
    defaults = {c.name: c.default for c in controls}
    ncols = ncols or min(len(combos), 4)
    nrows = math.ceil(len(combos) / ncols)
    # constrained layout places titles (panel and suptitle) from their measured size after each
    # axes has taken its aspect ratio; tight_layout did not, and drew second-row titles over the
    # pictures of the first row.
    fig, axes = plt.subplots(nrows, ncols, figsize=(size * ncols, size * nrows + (0.5 if title else 0)),
                             squeeze=False, layout="constrained")
    for ax in axes.flat[len(combos):]:
        ax.axis("off")
    for ax, combo in zip(axes.flat, combos):
        draw(ax, **{**defaults, **combo})
        if combo and not ax.get_title():
            ax.set_title(", ".join(f"{k}={_short(v)}" for k, v in combo.items()), fontsize=8)
    if title:
        varied_named = [n for n in _title_fields(title) if n in varied and len(set(map(repr, static[n]))) > 1]
        if varied_named:
            raise ValueError(f"the title {title!r} names {varied_named}, which the static grid varies from panel "
                             "to panel; name only controls that are the same in every panel")
        fig.suptitle(_fill_title(title, controls, {**defaults, **combos[0]}))
    return fig


def _short(v) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def _shown(control: Control, value) -> str:
    """How a value reads in a title: a dropdown's label (what the reader picked), else the value."""
    if control.kind == "dropdown":
        for label, v in control.options:
            if v is value or (type(v) is type(value) and v == value):
                return label
    return _short(value)


def _title_fields(title: str | None) -> list[str]:
    """The control names a title template refers to (``"the {image} photo"`` -> ``["image"]``).

    Braces are doubled for a literal brace (``"{{"``), as in :meth:`str.format`.
    """
    if not title:
        return []
    try:
        return [name for _, name, _, _ in string.Formatter().parse(title) if name is not None]
    except ValueError as error:  # a single '{' or '}'
        raise ValueError(f"the title {title!r} is not a valid template ({error}); write '{{{{' and '}}}}' "
                         "for literal braces") from None


def _fill_title(title: str | None, controls: list[Control], values: Mapping[str, Any]) -> str | None:
    """A title template with the shown values of the controls it names filled in.

    Parameters
    ----------
    title : str or None
        Plain text, or a template naming controls in braces: ``"LRP on the {image} photo"``.
    controls : list of Control
    values : dict
        The value of each control in the view being drawn.

    Returns
    -------
    str or None

    Raises
    ------
    ValueError
        When the template names something that is not a control (or uses a format spec).
    """
    if not title:
        return title
    fields = _title_fields(title)
    by_name = {c.name: c for c in controls}
    unknown = [f for f in fields if f not in by_name]
    if unknown:
        raise ValueError(f"the title {title!r} names {unknown}, which are not controls; the controls are "
                         f"{list(by_name)} (write '{{{{' and '}}}}' for literal braces)")
    try:
        return title.format(**{name: _shown(by_name[name], values[name]) for name in fields})
    except (ValueError, IndexError) as error:  # a format spec that does not apply to a label
        raise ValueError(f"the title {title!r} cannot be filled in: {error}") from None


# The live view's box carries this class; the style below hides the saved picture next to it.
_LIVE_CLASS = "coursekit-explorer"
_STYLE_CLASS = "coursekit-explorer-style"
# JupyterLab renders one format of each output, and for a widget view that is the widget renderer, which
# says "Error displaying widget: model not found" when the notebook is reopened without the kernel's
# widgets (@jupyter-widgets/jupyterlab-manager 5: no fallback to another format of the bundle). So the
# picture is an output of its own, after this style (applied in a trusted notebook, as every notebook
# saved from JupyterLab is): while the live widget is in the output area, the picture is hidden; when
# it is not, the widget renderer's text-only node (the error, or "Loading widget...") is hidden.
_SNAPSHOT_STYLE = (
    f'<style class="{_STYLE_CLASS}">'
    f".jp-OutputArea-child:has(.{_STYLE_CLASS}) {{ display: none; }}\n"
    f".jp-OutputArea:has(.{_LIVE_CLASS}) > .jp-OutputArea-child:has(.{_STYLE_CLASS}) + .jp-OutputArea-child "
    "{ display: none; }\n"
    f".jp-OutputArea:has(.{_STYLE_CLASS}) > .jp-OutputArea-child > .jp-OutputArea-output.lm-Panel:not(:has(*)) "
    "{ display: none; }</style>"
)


class Explorer:
    """What :func:`explorer` returns: the live widget or the static figure, displayed once.

    Attributes
    ----------
    mode : "widget" or "static"
    widget : ipywidgets.VBox or None
        Controls above the live output (widget mode).
    figure : matplotlib Figure or None
        The grid of combinations (static mode); ``explorer.figure.savefig(...)`` saves it.
    picture : bytes or None
        Widget mode: a PNG of the first view (every control at its default), drawn when the
        explorer was built.

    As the last expression of a notebook cell it shows itself (``_ipython_display_``). The static
    figure is detached from pyplot, so the inline backend does not show it a second time. In
    widget mode it shows three outputs (:meth:`displays`): the live widget (with a one-line
    description instead of ``VBox(children=...)`` for a terminal), a style, and :attr:`picture`.
    A notebook saved after a live run (a student's copy, saved without widget state) then shows the
    explorer's first view when it is reopened: in JupyterLab, where the style hides the widget
    renderer's "model not found" error (and, while the widget is live, the picture), and on GitHub,
    nbviewer or nbconvert, which show the picture and ignore the style. The picture stays the
    first view: JupyterLab applies a display update only while the cell that made it is running.
    """

    def __init__(self, widget=None, figure=None, picture: bytes | None = None, description: str = "Explorer"):
        if (widget is None) == (figure is None):
            raise ValueError("an Explorer holds either a widget or a figure")
        self.widget, self.figure, self.picture, self.description = widget, figure, picture, description

    @property
    def mode(self) -> str:
        return "widget" if self.widget is not None else "static"

    def mimebundle(self) -> dict:
        """Widget mode: the live output's display data, the widget view and a plain-text line."""
        if self.widget is None:
            raise ValueError("a static Explorer is shown as its figure, it has no widget bundle")
        bundle = dict(self.widget._repr_mimebundle_())  # the widget-view JSON (and a VBox repr)
        bundle["text/plain"] = self.description
        return bundle

    def displays(self) -> list[dict]:
        """Widget mode: every output shown, in order: the widget, the style, the picture.

        The picture's output is an image, which every renderer shows, also in an untrusted
        notebook (PNG, or JPEG where that is less than half the size, as for a photo), and a plain
        line; the style (``text/html``) hides it next to the live widget and hides the widget's
        error in a reopened notebook (see the module's ``_SNAPSHOT_STYLE``). Without a picture,
        only the widget.
        """
        widget = self.mimebundle()
        if self.picture is None:
            return [widget]
        style = {"text/html": _SNAPSHOT_STYLE, "text/plain": ""}
        mime, data = _compact(self.picture)
        return [widget, style, {mime: base64.b64encode(data).decode("ascii"), "text/plain": self.description}]

    def _ipython_display_(self):
        from IPython.display import display

        if self.widget is None:
            display(self.figure)
        else:
            for bundle in self.displays():
                display(bundle, raw=True)

    def __repr__(self) -> str:
        if self.figure is not None:
            return f"Explorer(static, {len([a for a in self.figure.axes if a.has_data()])} panels)"
        return f"Explorer(widget, controls={[c.description for c in self.widget.children[0].children]})"


def explorer(draw: Callable[..., Any], controls: Mapping[str, Any], static: Mapping[str, list] | None = None,
             mode: str = "auto", ncols: int | None = None, size: float = 3.2, title: str | None = None,
             max_panels: int = 12):
    """An ipywidgets explorer around ``draw(ax, **values)``, with a static fallback.

    Parameters
    ----------
    draw : callable ``(ax, **values) -> None``
        Draws one view into the matplotlib axes ``ax`` (titles, colour bars: up to you). It gets
        one keyword argument per control.
    controls : dict[str, spec]
        Control name -> specification, see :class:`Control` (list -> dropdown, ``(min, max, step)``
        -> slider, dict -> labelled dropdown, or a ready widget).
    static : dict[str, list], optional
        For the static grid: the values to combine (Cartesian product), other controls at their
        defaults. Default: every option of the first dropdown.
    mode : "auto", "widget" or "static"
        ``"auto"``: widgets when :func:`widgets_available`, else the static grid.
    ncols, size, max_panels
        Layout of the static grid (columns, inches per panel, most panels allowed); ``size`` is
        also the figure size of the live view.
    title : str, optional
        The figure's title. It may name controls in braces, ``"LRP on the {image} photo"``: the live
        view fills in the values shown (a dropdown's label) at every redraw, so the title follows
        the controls; the static grid fills in the values of its panels, and refuses a title that
        names a control it varies from panel to panel.

    Returns
    -------
    Explorer
        Holding the ipywidgets box (controls above the live figure) in widget mode, or the
        matplotlib Figure of the grid in static mode; it displays itself in a notebook.
    """
    if not callable(draw):
        raise TypeError(f"draw must be a function draw(ax, **values), got {type(draw).__name__}")
    if not isinstance(controls, Mapping) or not controls:
        raise ValueError("controls must be a non-empty dict {name: spec}")
    if mode not in ("auto", "widget", "static"):
        raise ValueError(f"mode must be 'auto', 'widget' or 'static', got {mode!r}")
    ctrls = [make_control(name, spec) for name, spec in controls.items()]
    if title is not None and not isinstance(title, str):
        raise TypeError(f"title must be a string (a template may name controls: 'the {{image}} photo'), got {title!r}")
    _fill_title(title, ctrls, {c.name: c.default for c in ctrls})  # an unknown name fails here, before drawing
    if mode == "static" or (mode == "auto" and not widgets_available()):
        import matplotlib.pyplot as plt

        fig = _static_grid(draw, ctrls, static, ncols, size, title, max_panels)
        plt.close(fig)  # shown once, by Explorer._ipython_display_, not again by the inline backend
        return Explorer(figure=fig)

    return _live_explorer(draw, ctrls, size, title)


def _compact(png: bytes) -> tuple[str, bytes]:
    """``("image/png", png)``, or ``("image/jpeg", ...)`` (quality 90, on white) when that is less
    than half the size: a view of a photo or a heat map is about a quarter of its PNG as JPEG."""
    from PIL import Image

    image = Image.open(io.BytesIO(png)).convert("RGBA")
    flat = Image.new("RGBA", image.size, "white")
    flat.alpha_composite(image)
    buffer = io.BytesIO()
    flat.convert("RGB").save(buffer, format="JPEG", quality=90)
    jpeg = buffer.getvalue()
    return ("image/jpeg", jpeg) if 2 * len(jpeg) < len(png) else ("image/png", png)


def _live_explorer(draw, controls: list[Control], size: float, title: str | None) -> Explorer:
    """The widget mode of :func:`explorer`: controls above an output that redraws on every change."""
    import ipywidgets as w
    import matplotlib.pyplot as plt

    built = {c.name: c.build() for c in controls}
    first_view: list[bytes] = []

    def redraw(**values):
        fig, ax = plt.subplots(figsize=(size * 1.25, size))
        draw(ax, **values)
        if title:
            fig.suptitle(_fill_title(title, controls, values))  # a template follows the controls
        fig.tight_layout()
        if not first_view:  # the picture a saved notebook keeps (see Explorer)
            buffer = io.BytesIO()
            fig.savefig(buffer, format="png", bbox_inches="tight")
            first_view.append(buffer.getvalue())
        plt.show()

    out = w.interactive_output(redraw, built)  # draws the first view now
    shown = ", ".join(f"{c.name}={_short(c.default)}" for c in controls)
    first_title = _fill_title(title, controls, {c.name: c.default for c in controls})
    description = (f"Explorer{': ' + first_title if first_title else ''} (live controls need a running kernel; "
                   f"the picture shows {shown})")
    box = w.VBox([w.HBox(list(built.values())), out])
    box.add_class(_LIVE_CLASS)  # the saved picture's style recognises the live view by it
    return Explorer(widget=box, picture=first_view[0] if first_view else None, description=description)
