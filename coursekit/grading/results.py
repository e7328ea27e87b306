"""From the workers' cell records to what the instructor gets: scores, notes, flags, CSV, files.

Notes say what happened to a submission (a restored check cell, a time limit, a lost kernel, a
refused write); flags list what the instructor should review (patched libraries, frame
inspection, attribution libraries, writes outside the working folder). Both are deterministic,
so grading the same class twice gives the same CSV.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass, field
from pathlib import Path

import nbformat

from . import feedback
from .notebook import CheckCell, Plan
from .pool import Outcome

__all__ = ["StudentResult", "assemble", "write_csv", "write_files"]

LIMITS = {"memory": "memory limit reached (an allocation failed)",
          "processes": "process limit reached (a fork or a new thread failed)",
          "output": "output limit reached (the rest of the printed output was not kept)"}
_SHOWN = re.compile(r"^([A-Za-z0-9_]+\.[A-Za-z0-9_]+): ([0-9.]+)/([0-9.]+) points", re.M)


@dataclass
class StudentResult:
    student: str
    submission: Path | None
    score: float = 0.0
    max_score: float = 0.0
    points: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    flags: list[str] = field(default_factory=list)
    why: dict[str, str] = field(default_factory=dict)  # grade_id -> explanation for the feedback table
    diagnoses: dict[str, list[str]] = field(default_factory=dict)  # grade_id -> the judge's messages of lost parts
    feedback: Path | None = None


def _num(x: float) -> str:
    return f"{float(x):g}"


def shown_points(nb) -> dict[str, float]:
    """What the submitted notebook's own check outputs showed: ``{exercise: points}``."""
    shown = {}
    for cell in nb.cells:
        for out in cell.get("outputs", []) if cell.get("cell_type") == "code" else []:
            text = out.get("text", "") if out.get("output_type") == "stream" else ""
            for m in _SHOWN.finditer(text if isinstance(text, str) else "".join(text)):
                shown[m.group(1)] = float(m.group(2))
    return shown


def assemble(result: StudentResult, plan: Plan, outcome: Outcome, checks: list[CheckCell], shown: dict[str, float],
             timeout: int) -> None:
    """Fill ``result`` (points, score, notes, flags, why) from one worker outcome."""
    index = {gid: i for i, (gid, _) in enumerate(plan.cells) if gid is not None}
    for check in checks:
        cell = outcome.cells.get(index[check.grade_id])
        earned, why = 0.0, ""
        if cell is None:
            why = "not run (an earlier cell stopped the notebook)"
        elif cell.lost == "timeout":
            why = f"stopped after the {timeout} s time limit"
        elif cell.lost == "died":
            why = f"the Python process died while this check ran ({cell.signal or 'os._exit or a crash'}); " \
                  "only this exercise scores 0"
        elif cell.lost == "output":
            why = "stopped by the grader: the cell sent more output than the grader accepts"
        elif cell.check is not None:
            earned = min(max(float(cell.check["earned"]), 0.0), check.points)  # never more than the exercise
            result.flags += [f for f in cell.check.get("flags", []) if f not in result.flags]
            result.notes += [n for n in cell.check.get("notes", []) if n not in result.notes]
            result.diagnoses[check.grade_id] = [str(d) for d in cell.check.get("diagnoses", [])]
            for line in _verdict(cell.outputs).splitlines():
                if "[FAIL]" in line:
                    why = why or line.strip().replace("[FAIL] ", "failed: ")
        if why and cell is not None and cell.lost:
            result.notes.append(f"{check.grade_id}: {why}")
            result.diagnoses[check.grade_id] = [{"timeout": "stopped at the time limit", "output": "too much output"}
                                                .get(cell.lost, "the process died in the check")]
        if check.exercise in shown and shown[check.exercise] != earned:
            why = (f"your notebook showed {_num(shown[check.exercise])}/{_num(check.points)}; graded "
                   f"{_num(earned)}/{_num(check.points)} on the grader's own random cases" + (f" ({why})" if why else ""))
        result.points[check.grade_id] = earned
        result.why[check.grade_id] = why
    for i, cell in sorted(outcome.cells.items()):
        gid = plan.cells[i][0] if i < len(plan.cells) else None
        if gid is None and cell.lost:
            what = {"timeout": f"stopped after the {timeout} s time limit",
                    "output": "stopped by the grader: more output than the grader accepts",
                    }.get(cell.lost, f"the Python process died here ({cell.signal or 'os._exit or a crash'}); "
                                     "the notebook went on in a fresh process")
            result.notes.append(f"cell {i}: {what}")
        if cell.limit:
            result.notes.append(f"cell {i}: {LIMITS[cell.limit]}")
            if cell.limit == "processes":
                result.flags.append(f"cell {i}: ran into the process limit (a fork bomb, or threads without end)")
    for attempt in dict.fromkeys(outcome.attempts):
        result.flags.append(f"refused: {attempt}")
    result.notes += outcome.notes
    result.score = sum(result.points.values())
    result.max_score = sum(c.points for c in checks)


def _verdict(outputs: list) -> str:
    return "".join(o["text"] for o in clean_outputs(outputs, 0) if o["output_type"] == "stream" and o["name"] == "stdout")


def write_csv(path: Path, assignment: str, results: list[StudentResult], checks: list[CheckCell]) -> None:
    header = ["student_id", "assignment", "score", "max_score", *[c.grade_id for c in checks], "notes", "flags"]
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(header)
        for r in results:
            writer.writerow([r.student, assignment, _num(r.score), _num(r.max_score),
                             *[_num(r.points.get(c.grade_id, 0)) for c in checks], "; ".join(r.notes), "; ".join(r.flags)])


MAX_TEXT = 100_000  # characters of one output kept in the feedback (the rest is cut, and says so)


def _text(value, limit: int = MAX_TEXT) -> str:
    text = value if isinstance(value, str) else "".join(v for v in value if isinstance(v, str)) \
        if isinstance(value, list) else str(value)
    return text if len(text) <= limit else text[:limit] + f"\n[... {len(text) - limit} more characters cut by the grader]"


def clean_outputs(outputs, count: int) -> list:
    """Valid nbformat outputs rebuilt from a worker's records (which student code may have shaped).

    Only the known fields of the known output types are kept, as strings, each at most
    :data:`MAX_TEXT` characters; ``execute_result`` gets the cell's ``execution_count``.
    """
    clean = []
    for out in outputs if isinstance(outputs, list) else []:
        kind = out.get("output_type") if isinstance(out, dict) else None
        if kind == "stream":
            name = "stderr" if out.get("name") == "stderr" else "stdout"
            clean.append(nbformat.v4.new_output("stream", name=name, text=_text(out.get("text", ""))))
        elif kind in ("execute_result", "display_data"):
            data = out.get("data") if isinstance(out.get("data"), dict) else {}
            clean.append(nbformat.v4.new_output("execute_result", data={"text/plain": _text(data.get("text/plain", ""))},
                                                execution_count=count))
        elif kind == "error":
            trace = out.get("traceback") if isinstance(out.get("traceback"), list) else []
            clean.append(nbformat.v4.new_output("error", ename=_text(out.get("ename", ""), 200),
                                                evalue=_text(out.get("evalue", ""), 2000),
                                                traceback=[_text(line, 2000) for line in trace[:200]]))
    return clean


def write_files(out: Path, assignment: str, result: StudentResult, plan: Plan, outcome: Outcome,
                checks: list[CheckCell]) -> None:
    """``autograded/<student>.ipynb`` and ``feedback/<student>.html``."""
    by_id = {c.grade_id: c for c in checks}
    nb = nbformat.v4.new_notebook()
    page_cells = []
    code_i = 0
    for kind, gid, source in plan.layout:
        if kind == "markdown":
            nb.cells.append(nbformat.v4.new_markdown_cell(source))
            page_cells.append({"type": "markdown", "source": source})
            continue
        cell = outcome.cells.get(code_i)
        outputs = clean_outputs(cell.outputs if cell else [], code_i + 1)
        if cell is not None and cell.lost and not any(o.get("output_type") == "error" for o in outputs):
            why = "stopped after the time limit" if cell.lost == "timeout" else "the Python process died in this cell"
            outputs.append(nbformat.v4.new_output("error", ename="Lost", evalue=why, traceback=[f"Lost: {why}"]))
        code = nbformat.v4.new_code_cell(source, outputs=outputs, execution_count=code_i + 1 if cell else None)
        chk = None
        if gid is not None:
            c = by_id[gid]
            code.metadata["nbgrader"] = {"grade": True, "grade_id": gid, "locked": True, "points": c.points,
                                         "solution": False, "schema_version": 3}
            chk = {"title": c.title, "grade_id": gid,
                   "points": f"{_num(result.points.get(gid, 0))}/{_num(c.points)}"}
        nb.cells.append(code)
        page_cells.append({"type": "code", "source": source, "outputs": code.outputs, "check": chk})
        code_i += 1
    (out / "autograded").mkdir(exist_ok=True)
    nbformat.write(nb, out / "autograded" / f"{result.student}.ipynb")
    rows = [{"title": f"{c.title} ({c.grade_id})", "points": f"{_num(result.points.get(c.grade_id, 0))}/{_num(c.points)}",
             "why": result.why.get(c.grade_id, "")} for c in checks]
    page = feedback.render(result.student, assignment, page_cells, rows,
                           f"{_num(result.score)}/{_num(result.max_score)}", result.notes)
    (out / "feedback").mkdir(exist_ok=True)
    result.feedback = out / "feedback" / f"{result.student}.html"
    result.feedback.write_text(page, encoding="utf-8")
