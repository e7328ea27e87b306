"""`make course`'s HTML reads offline: maths converted to MathML, no CDN script in the page."""

import re
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

from coursekit.offline_html import maths_to_mathml, notebook_maths_to_mathml, offline_html

NOTEBOOKS = sorted((Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))


def _maths(text):
    return re.findall(r'<math\b[^>]*\bdisplay="(\w+)"', text)


def test_inline_and_display_maths_become_mathml():
    out = maths_to_mathml("The logit $z_j = \\sum_i x_i w_{ij}$ and\n\n$$R_i = \\frac{a}{b}$$\n\nend, $A$.")
    assert _maths(out) == ["inline", "block", "inline"]
    assert "$" not in out
    assert "<mfrac>" in out and "<msub>" in out
    assert out.startswith("The logit <math") and out.endswith("</math>.")


def test_what_is_not_maths_is_left_alone():
    text = ("Costs $5 and $6 today; `x = $a$` in code; an escaped \\$ sign and another \\$;\n"
            "```python\nprint('$b$')\n```\n$ not maths $ either.")
    assert maths_to_mathml(text) == text


def test_inline_maths_may_wrap_but_not_cross_a_paragraph():
    assert _maths(maths_to_mathml("a $x +\ny$ b")) == ["inline"]
    text = "a $x\n\ny$ b"
    assert maths_to_mathml(text) == text


def test_notebook_conversion_counts_cells_and_names_a_failing_one():
    nb = new_notebook(cells=[new_markdown_cell("$a$"), new_code_cell("x = '$a$'"), new_markdown_cell("plain")])
    assert notebook_maths_to_mathml(nb) == 1
    assert nb.cells[1].source == "x = '$a$'"
    bad = new_notebook(cells=[new_markdown_cell("ok"), new_markdown_cell("$\\frac{1}{$")])
    with pytest.raises(ValueError, match="markdown cell 1"):
        notebook_maths_to_mathml(bad)


def test_page_has_mathml_and_no_remote_script():
    nb = new_notebook(cells=[new_markdown_cell("Energy $E = mc^2$."), new_code_cell("1 + 1")],
                      metadata={"kernelspec": {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"}})
    html = offline_html(nb)
    assert _maths(html) == ["inline"]
    assert nb.cells[0].source == "Energy $E = mc^2$."  # the caller's notebook is untouched
    assert not re.findall(r'<script[^>]*\ssrc="https?://', html)
    assert not re.findall(r'<link[^>]*\shref="https?://', html)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_every_formula_of_the_lectures_converts(path):
    nb = nbformat.read(path, as_version=4)
    notebook_maths_to_mathml(nb)
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            left = re.sub(r"`[^`]*`", "", cell.source.replace("\\$", ""))
            assert "$" not in left, f"{path.name}: unconverted maths in {cell.source[:120]!r}"
