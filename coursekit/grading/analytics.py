"""Class analytics: per exercise, how many students made each diagnosed mistake (``analytics.html``).

The judge records, for every part a student lost, the check's own explanation. Here they are
grouped per exercise (a known mistake by its name, any other message with its numbers blanked),
counted once per student, and drawn as one horizontal bar chart per exercise: inline SVG, no
scripts, readable offline, next to ``grades.csv``. Use it to see what the next lecture should
address.
"""

from __future__ import annotations

import html
import re
from collections import Counter
from pathlib import Path

__all__ = ["diagnosis_key", "mistake_counts", "write_report"]

_KNOWN = re.compile(r"matches a known mistake: (.+)$", re.S)
_NUMBER = re.compile(r"-?\d+(\.\d+)?(e-?\d+)?")


def diagnosis_key(text: str) -> str:
    """The name under which a failed part is counted: the known mistake, or the message without its numbers."""
    text = " ".join(str(text).split())
    known = _KNOWN.search(text)
    if known:
        return known.group(1)[:160]
    return _NUMBER.sub("#", text)[:160]


def mistake_counts(students, checks) -> dict[str, Counter]:
    """``{grade_id: Counter({diagnosis: number of students})}``, each student counted once per diagnosis."""
    counts = {c.grade_id: Counter() for c in checks}
    for s in students:
        for gid, texts in s.diagnoses.items():
            if gid in counts:
                counts[gid].update({diagnosis_key(t) for t in texts})
    return counts


def _chart(counter: Counter, total: int) -> str:
    rows = counter.most_common(12)
    if not rows:
        return "<p>No diagnosed mistake: every student either earned the points or was not graded.</p>"
    bar_h, label_w, bar_w = 22, 520, 260
    height = bar_h * len(rows) + 8
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{label_w + bar_w + 60}" height="{height}" '
             f'role="img" aria-label="students per mistake">']
    for k, (label, n) in enumerate(rows):
        y = 4 + k * bar_h
        w = max(2, round(bar_w * n / max(total, 1)))
        short = label if len(label) <= 80 else label[:77] + "..."
        parts.append(f'<text x="{label_w - 6}" y="{y + 15}" text-anchor="end" font-size="12">{html.escape(short)}'
                     f"<title>{html.escape(label)}</title></text>")
        parts.append(f'<rect x="{label_w}" y="{y + 3}" width="{w}" height="{bar_h - 6}" fill="#36c"/>')
        parts.append(f'<text x="{label_w + w + 4}" y="{y + 15}" font-size="12">{n}</text>')
    parts.append("</svg>")
    return "".join(parts)


def write_report(path: Path, assignment: str, students, checks) -> Path:
    """``analytics.html``: per exercise, students who lost points and a bar chart of their mistakes."""
    counts = mistake_counts(students, checks)
    graded = [s for s in students if s.points]
    body = [f"<h1>{html.escape(assignment)}: what the class got wrong</h1>",
            f"<p>{len(students)} student(s), {len(graded)} graded. Bars: students whose check named the "
            "mistake (a student can appear under several).</p>"]
    for c in checks:
        lost = sum(1 for s in graded if s.points.get(c.grade_id, 0) < c.points)
        body.append(f"<h2>{html.escape(c.title)} ({html.escape(c.grade_id)})</h2>"
                    f"<p>{lost} of {len(graded)} lost points on it.</p>{_chart(counts[c.grade_id], len(graded))}")
    page = ("<!DOCTYPE html><html><head><meta charset='utf-8'><title>"
            f"{html.escape(assignment)}: class analytics</title><style>body{{font-family:system-ui,sans-serif;"
            "max-width:64em;margin:1em auto;padding:0 1em}</style></head><body>" + "".join(body) + "</body></html>\n")
    path.write_text(page, encoding="utf-8")
    return path
