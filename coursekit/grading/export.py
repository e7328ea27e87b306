"""An nbgrader export plugin: one CSV row per student, with the points of every exercise.

nbgrader's own CSV export has one total per student and assignment; instructors also want to see
which exercise cost the points. For instructors who run nbgrader's own ``autograde`` on a course
directory: ``nbgrader export --exporter=coursekit.grading.export.PerExerciseCsvExport``
(``coursekit-grade`` writes the same columns itself, plus ``flags``).

Columns: ``student_id, assignment, score, max_score``, then one column per check cell (its
``grade_id``, e.g. ``check_to_input``) in notebook order, then ``notes`` (from an optional JSON file
``{student_id: "text"}`` that the grading command writes: unreadable notebook, timeouts, restored
check cells, ...). Students named in the notes but absent from the gradebook (their notebook could
not be read) get a row with score 0.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from nbgrader.api import Gradebook, MissingEntry
from nbgrader.plugins import ExportPlugin
from traitlets import List, Unicode

__all__ = ["PerExerciseCsvExport"]


def _fmt(value) -> str:
    return f"{float(value or 0):g}"


class PerExerciseCsvExport(ExportPlugin):
    """CSV with ``score``, ``max_score`` and the points of each grade cell, one row per student."""

    notes_file = Unicode("", help="JSON file {student_id: note} whose notes fill the 'notes' column").tag(config=True)
    cell_order = List(
        Unicode(), [], help="grade_ids in notebook order (the database does not keep it); others follow by name"
    ).tag(config=True)

    def export(self, gradebook: Gradebook) -> None:
        dest = Path(self.to or "grades.csv")
        notes = json.loads(Path(self.notes_file).read_text()) if self.notes_file else {}
        wanted_assignments = [str(a) for a in self.assignment]
        wanted_students = [str(s) for s in self.student]
        assignments = [a for a in gradebook.assignments if not wanted_assignments or a.name in wanted_assignments]
        # students of the gradebook, plus those the notes name (e.g. an unreadable notebook never reached it)
        students = sorted(
            {s.id for s in gradebook.students} | set(notes),
        )
        students = [s for s in students if not wanted_students or s in wanted_students]

        order = {name: i for i, name in enumerate(self.cell_order)}
        cells: list[tuple[str, str, str]] = []  # (assignment, notebook, grade cell)
        for a in assignments:
            for nb in sorted(a.notebooks, key=lambda n: n.name):
                names = sorted((gc.name for gc in nb.grade_cells), key=lambda n: (order.get(n, len(order)), n))
                cells += [(a.name, nb.name, name) for name in names]
        several_notebooks = len({(a, n) for a, n, _ in cells}) > 1
        column = {c: (f"{c[1]}:{c[2]}" if several_notebooks else c[2]) for c in cells}

        header = ["student_id", "assignment", "score", "max_score"] + [column[c] for c in cells] + ["notes"]
        rows = []
        for a in assignments:
            for s in students:
                row = {"student_id": s, "assignment": a.name, "max_score": _fmt(a.max_score), "notes": notes.get(s, "")}
                points = {c: 0.0 for c in cells if c[0] == a.name}
                try:
                    sub = gradebook.find_submission(a.name, s)
                except MissingEntry:
                    row["score"] = _fmt(0)
                    row["notes"] = row["notes"] or "no submission"
                else:
                    row["score"] = _fmt(sub.score)
                    for snb in sub.notebooks:
                        for grade in snb.grades:
                            key = (a.name, snb.name, grade.name)
                            if key in points:
                                points[key] = grade.score or 0.0
                for c in cells:
                    row[column[c]] = _fmt(points[c]) if c in points else ""
                rows.append(row)

        dest.parent.mkdir(parents=True, exist_ok=True)
        with open(dest, "w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=header)
            writer.writeheader()
            writer.writerows(rows)
        self.log.info("Exported %d rows to %s", len(rows), dest)
