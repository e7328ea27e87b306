"""Per-student HTML feedback that reads offline: maths drawn as inline SVG, no scripts, no grader paths.

The page starts with a table (one row per exercise: its title, points, and why, where the grade
differs from what the student's own notebook showed), then the notebook: markdown rendered with
nbconvert's markdown filter, maths rendered by matplotlib's ``mathtext`` (a TeX subset; what it
cannot draw stays visible as TeX source), code cells with the outputs of the graded run.
"""

from __future__ import annotations

import functools
import html
import io
import re

__all__ = ["render", "render_math"]

_DISPLAY = re.compile(r"\$\$(.+?)\$\$", re.S)
_INLINE = re.compile(r"(?<![\\$])\$(?!\$)([^$\n]+?)\$")
_TOKEN = "MATHTOKEN{}END"


@functools.lru_cache(maxsize=512)
def render_math(tex: str, display: bool = False) -> str:
    """Inline SVG for ``tex`` (without dollars); TeX source in a <code> when mathtext cannot draw it."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib import mathtext

    simple = " ".join(tex.split())
    simple = re.sub(r"\\(big|Big|bigg|Bigg)([lr]?)", "", simple).replace(r"\,", " ").replace(r"\;", " ")
    try:
        buf = io.BytesIO()
        mathtext.math_to_image(f"${simple}$", buf, format="svg", prop=None)
    except (ValueError, RuntimeError):
        return f"<code>{html.escape(tex)}</code>"
    svg = buf.getvalue().decode()
    svg = svg[svg.index("<svg"):]
    svg = re.sub(r"<metadata>.*?</metadata>", "", svg, flags=re.S)
    style = "display:block;margin:0.4em auto" if display else "vertical-align:middle"
    return f'<span class="math" title="{html.escape(tex)}" style="{style}">{svg}</span>'


def _markdown(text: str) -> str:
    from nbconvert.filters.markdown_mistune import markdown2html_mistune

    maths: list[str] = []

    def keep(display):
        def sub(m):
            maths.append(render_math(m.group(1).strip(), display))
            return _TOKEN.format(len(maths) - 1)

        return sub

    text = _INLINE.sub(keep(False), _DISPLAY.sub(keep(True), text))
    out = markdown2html_mistune(text)
    # mistune may also wrap the placeholder of a display formula in <p>: fine either way
    return re.sub(r"MATHTOKEN(\d+)END", lambda m: maths[int(m.group(1))], out)


def _outputs(outputs: list) -> str:
    parts = []
    for out in outputs:
        kind = out.get("output_type")
        if kind == "stream":
            cls = "stderr" if out.get("name") == "stderr" else "stdout"
            parts.append(f'<pre class="{cls}">{html.escape(out.get("text", ""))}</pre>')
        elif kind in ("execute_result", "display_data"):
            parts.append(f'<pre class="result">{html.escape(out.get("data", {}).get("text/plain", ""))}</pre>')
        elif kind == "error":
            parts.append(f'<pre class="error">{html.escape(chr(10).join(out.get("traceback", [])))}</pre>')
    return "".join(parts)


_CSS = """
body{font-family:system-ui,sans-serif;max-width:60em;margin:1em auto;padding:0 1em;line-height:1.45}
table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.3em .6em;vertical-align:top;text-align:left}
pre{background:#f6f6f6;padding:.5em;overflow-x:auto;white-space:pre-wrap}pre.stderr{background:#fff4e0}
pre.error{background:#fde8e8}.check{border-left:4px solid #36c;padding-left:.6em;margin:1em 0}
.score{font-weight:bold}.note{color:#a40}code{background:#f2f2f2;padding:0 .2em}
"""


def render(student: str, assignment: str, cells: list[dict], rows: list[dict], score: str, notes: list[str]) -> str:
    """The page for one student.

    ``cells``: ``{"type", "source", "outputs", "check": None or {"title", "grade_id", "points"}}``;
    ``rows``: ``{"title", "points", "why"}`` per exercise.
    """
    head = "".join(
        f"<tr><td>{html.escape(r['title'])}</td><td class='score'>{html.escape(r['points'])}</td>"
        f"<td>{html.escape(r['why'])}</td></tr>" for r in rows)
    body = [f"<h1>{html.escape(assignment)}: feedback for {html.escape(student)}</h1>",
            f"<p class='score'>Score: {html.escape(score)}</p>",
            f"<table><tr><th>exercise</th><th>points</th><th>notes</th></tr>{head}</table>"]
    if notes:
        body.append("<ul>" + "".join(f"<li class='note'>{html.escape(n)}</li>" for n in notes) + "</ul>")
    for cell in cells:
        if cell["type"] == "markdown":
            body.append(f"<div>{_markdown(cell['source'])}</div>")
            continue
        chk = cell.get("check")
        label = (f"<p class='score'>Check of “{html.escape(chk['title'])}” ({html.escape(chk['grade_id'])}): "
                 f"{html.escape(chk['points'])}</p>") if chk else ""
        block = f"<pre>{html.escape(cell['source'])}</pre>{_outputs(cell.get('outputs', []))}"
        body.append(f"<div class='check'>{label}{block}</div>" if chk else block)
    return ("<!DOCTYPE html><html><head><meta charset='utf-8'>"
            f"<title>{html.escape(assignment)}: {html.escape(student)}</title><style>{_CSS}</style></head>"
            f"<body>{''.join(body)}</body></html>\n")
