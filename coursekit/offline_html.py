"""Notebooks to HTML that reads offline: maths as MathML, no script fetched from a CDN.

nbconvert's HTML leaves ``$...$`` in the page for MathJax, which it loads from cdnjs (and
require.js with it). Without a network the maths stays raw TeX. Here every formula in a markdown
cell is converted to MathML (with ``latex2mathml``) before export, which every current browser
draws natively (Chromium since 109, Firefox, Safari), and the page is written with a template
(``lab`` minus the MathJax and require.js script tags). Notebooks executed with
``COURSEKIT_STATIC=1`` hold pictures, not widgets, so nothing else needs a script.

The maths syntax is Jupyter's/pandoc's: ``$$...$$`` for display maths, ``$...$`` inline where the
opening ``$`` is not followed by a space and the closing one not preceded by a space nor followed
by a digit (so "costs $5 and $6" stays text); ``\\$`` is a dollar; code spans and fenced code are
left alone.
"""

from __future__ import annotations

import re
from pathlib import Path

__all__ = ["maths_to_mathml", "notebook_maths_to_mathml", "offline_html"]

# code first (left alone), then display maths, then inline maths
_TOKENS = re.compile(
    r"(?P<fence>^(?P<ticks>```|~~~).*?^(?P=ticks)[^\n]*$)"
    r"|(?P<code>(?P<bt>`+).+?(?P=bt))"
    r"|(?P<display>(?<!\\)\$\$(?P<dbody>.+?)(?<!\\)\$\$)"
    r"|(?P<inline>(?<![\\$])\$(?![\s$])(?P<ibody>(?:[^$\n]|\n(?![ \t]*\n))*?[^\s\\$])\$(?!\d))",
    re.S | re.M,
)


def _mathml(tex: str, display: bool) -> str:
    from latex2mathml.converter import convert

    try:
        return convert(tex.strip(), display="block" if display else "inline")
    except Exception as err:  # an unsupported command: show the TeX, say why, keep the page
        raise ValueError(f"cannot convert the formula {tex.strip()!r} to MathML: {err}") from err


def maths_to_mathml(markdown: str) -> str:
    """Replace the TeX formulas of one markdown text by MathML elements.

    Parameters
    ----------
    markdown : str
        A markdown cell's source.

    Returns
    -------
    str
        The same text with each ``$...$`` / ``$$...$$`` replaced by a ``<math>`` element (display
        maths on a line of its own, so markdown keeps it out of the paragraph around it).

    Raises
    ------
    ValueError
        When a formula uses a command ``latex2mathml`` cannot convert (the message names it).
    """
    def replace(m: re.Match) -> str:
        if m.group("fence") or m.group("code"):
            return m.group(0)
        if m.group("display"):
            return "\n\n" + _mathml(m.group("dbody"), display=True) + "\n\n"
        return _mathml(m.group("ibody"), display=False)

    return _TOKENS.sub(replace, markdown)


def notebook_maths_to_mathml(nb) -> int:
    """Convert the maths of every markdown cell of a notebook node in place; returns the number of
    cells changed. The cell that fails is named in the error."""
    changed = 0
    for index, cell in enumerate(nb.cells):
        if cell.cell_type != "markdown":
            continue
        try:
            new = maths_to_mathml(cell.source)
        except ValueError as err:
            raise ValueError(f"markdown cell {index}: {err}") from err
        if new != cell.source:
            cell.source, changed = new, changed + 1
    return changed


_TEMPLATE_DIR = Path(__file__).parent / "data" / "html_templates"


def offline_html(nb) -> str:
    """HTML of an (executed) notebook node that needs no network: MathML maths, JupyterLab's
    styles inlined, no CDN script. The notebook node is not modified."""
    import copy

    from nbconvert import HTMLExporter

    nb = copy.deepcopy(nb)
    notebook_maths_to_mathml(nb)
    exporter = HTMLExporter(template_name="offline", extra_template_basedirs=[str(_TEMPLATE_DIR)])
    html, _ = exporter.from_notebook_node(nb)
    return html
