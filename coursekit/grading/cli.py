"""``coursekit-grade``: grade a plain folder of submissions with nbgrader, without touching it.

Usage::

    coursekit-grade 00_warmup path/to/submissions [--out grading/00_warmup] [--timeout 60]
    python -m coursekit.grading.cli 00_warmup path/to/submissions

``submissions/`` holds ``<student>.ipynb`` files and/or ``<student>/00_warmup.ipynb`` folders
(a folder with a single notebook of another name is accepted too). The command

1. builds a temporary nbgrader course directory: ``source/<set>`` = the course's
   ``solutions/<set>``, ``nbgrader generate_assignment`` with a gradebook (which records the
   check cells), and a *copy* of each readable submission in ``submitted/<student>/<set>/``;
2. runs ``nbgrader autograde``: every cell has ``--timeout`` seconds (then it is interrupted and
   scores 0), check cells a student edited or deleted are restored from the source
   (``OverwriteCells``), a crashing exercise costs only its own points;
3. runs ``nbgrader export`` (:class:`coursekit.grading.export.PerExerciseCsvExport`) into
   ``<out>/grades.csv`` and ``nbgrader generate_feedback`` into ``<out>/feedback/<student>.html``;
4. prints a summary table (also saved as ``<out>/summary.txt``).

A notebook that is not valid JSON / nbformat scores 0 for that student (noted in the CSV); the
run carries on. The submission files are hashed before and after: they are never modified.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import nbformat

from .release import find_root, list_sets, load_course_config

__all__ = ["GradingResult", "StudentResult", "collect_submissions", "grade", "main"]

_TIMEOUT_ERRORS = {"CellTimeoutError", "KeyboardInterrupt", "TimeoutError"}
_COURSE_ID = "coursekit"


@dataclass
class StudentResult:
    student: str
    submission: Path | None
    score: float = 0.0
    max_score: float = 0.0
    points: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    feedback: Path | None = None


@dataclass
class GradingResult:
    assignment: str
    out: Path
    csv: Path
    students: list[StudentResult]
    max_points: dict[str, float]
    seconds: float

    def table(self) -> str:
        cells = list(self.max_points)
        short = {c: c.removeprefix("check_") for c in cells}
        width = max([7] + [len(s.student) for s in self.students])
        head = f"{'student':{width}s}  {'score':>9s}  " + "  ".join(f"{short[c]:>{max(len(short[c]), 5)}s}" for c in cells)
        lines = [head + "  notes", "-" * (len(head) + 7)]
        for s in self.students:
            pts = "  ".join(
                f"{_num(s.points.get(c, 0)) + '/' + _num(self.max_points[c]):>{max(len(short[c]), 5)}s}" for c in cells
            )
            score = f"{_num(s.score)}/{_num(s.max_score)}"
            lines.append(f"{s.student:{width}s}  {score:>9s}  {pts}  {'; '.join(s.notes)}")
        return "\n".join(lines)


def _num(x: float) -> str:
    return f"{float(x):g}"


# ----------------------------------------------------------------------------------------------
# submissions


def _safe_id(name: str) -> str:
    sid = re.sub(r"[^A-Za-z0-9_.@+-]", "_", name).lstrip(".") or "student"
    return sid


def collect_submissions(folder: str | Path, assignment: str) -> dict[str, tuple[Path | None, list[str]]]:
    """``{student_id: (notebook path or None, notes)}`` for a folder of ``<student>.ipynb`` / ``<student>/`` entries."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"submissions folder {str(folder)!r} does not exist (or is not a folder)")
    found: dict[str, tuple[Path | None, list[str]]] = {}
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith(".") or entry.name == "__pycache__":
            continue
        notes: list[str] = []
        if entry.is_file() and entry.suffix == ".ipynb":
            name, notebook = entry.stem, entry
        elif entry.is_dir():
            name, notebook = entry.name, entry / f"{assignment}.ipynb"
            if not notebook.is_file():
                candidates = sorted(p for p in entry.glob("*.ipynb") if not p.name.startswith("."))
                if len(candidates) == 1:
                    notebook = candidates[0]
                    notes.append(f"graded {candidates[0].name} (expected {assignment}.ipynb)")
                else:
                    notebook = None
                    notes.append(
                        f"no {assignment}.ipynb in the folder"
                        + (f" (found {', '.join(p.name for p in candidates)})" if candidates else "")
                    )
        else:
            continue
        sid = _safe_id(name)
        if sid != name:
            notes.append(f"graded as {sid!r} (from {name!r})")
        base, n = sid, 2
        while sid in found:
            sid = f"{base}_{n}"
            n += 1
        found[sid] = (notebook, notes)
    return found


def _hashes(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _read_problem(path: Path) -> str | None:
    """Why a submitted file cannot be graded, or None when it is a readable notebook."""
    try:
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
    except Exception as err:  # noqa: BLE001 -- any unreadable file costs that student this set; reported
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        return f"unreadable notebook ({type(err).__name__}: {first[:120]})"
    return None


def _grade_cells(nb) -> dict[str, str]:
    """``{grade_id: source}`` of the check (grade, non-solution) cells."""
    out = {}
    for cell in nb.cells:
        nbg = cell.get("metadata", {}).get("nbgrader", {})
        if nbg.get("grade") and not nbg.get("solution"):
            out[nbg.get("grade_id", "")] = cell.source
    return out


# ----------------------------------------------------------------------------------------------
# nbgrader in a temporary course directory


def _config_text(root: Path, workdir: Path, assignment: str, timeout: int, csv_path: Path, notes: Path,
                 order: list[str]) -> str:
    settings: dict[str, dict] = {}
    for section, values in load_course_config(root).items():
        if section != "CourseDirectory":
            settings[section] = dict(values)
    settings["CourseDirectory"] = {
        "root": str(workdir),
        "course_id": _COURSE_ID,
        "source_directory": "source",
        "release_directory": "release",
        "submitted_directory": "submitted",
        "autograded_directory": "autograded",
        "feedback_directory": "feedback",
        "db_url": f"sqlite:///{workdir / 'gradebook.db'}",
    }
    settings.setdefault("Execute", {}).update(timeout=int(timeout), interrupt_on_timeout=True)
    settings.setdefault("ExecutePreprocessor", {}).update(timeout=int(timeout))
    settings.setdefault("OverwriteCells", {}).update(add_missing_cells=True)
    settings["ExportApp"] = {"plugin_class": "coursekit.grading.export.PerExerciseCsvExport"}
    settings["PerExerciseCsvExport"] = {
        "to": str(csv_path), "assignment": [assignment], "notes_file": str(notes), "cell_order": order,
    }
    lines = ["# written by coursekit-grade for one grading run", "c = get_config()  # noqa: F821"]
    for section, values in settings.items():
        for key, value in values.items():
            lines.append(f"c.{section}.{key} = {value!r}")
    return "\n".join(lines) + "\n"


def _nbgrader(args: list[str], workdir: Path, log) -> int:
    env = dict(os.environ)
    package_parent = str(Path(__file__).resolve().parents[2])  # so the subprocess and kernels import coursekit
    env["PYTHONPATH"] = package_parent + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    # nbgrader runs the `alembic` command of its environment to check the gradebook's schema
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    log.write(f"\n$ nbgrader {' '.join(args)}\n")
    log.flush()
    proc = subprocess.run(
        [sys.executable, "-m", "nbgrader", *args], cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT,
        check=False,  # the caller decides what a failure means (autograde reports per-student errors)
    )
    return proc.returncode


def _cell_notes(autograded: Path, timeout: int) -> list[str]:
    """Timeouts, crashes and stderr in check cells of an autograded notebook."""
    notes = []
    nb = nbformat.read(autograded, as_version=4)
    for cell in nb.cells:
        nbg = cell.metadata.get("nbgrader", {})
        if cell.cell_type != "code" or not nbg.get("grade"):
            continue
        gid = nbg.get("grade_id", "?")
        errors = [o for o in cell.get("outputs", []) if o.get("output_type") == "error"]
        enames = {o.get("ename") for o in errors}
        if enames & _TIMEOUT_ERRORS:
            notes.append(f"{gid}: stopped after the {timeout} s time limit")
        elif errors and not enames <= {"CheckFailed"}:
            notes.append(f"{gid}: the check crashed ({', '.join(sorted(map(str, enames)))})")
        elif any(o.get("output_type") == "stream" and o.get("name") == "stderr" for o in cell.get("outputs", [])):
            notes.append(f"{gid}: wrote to stderr (nbgrader scores that 0)")
    return notes


def grade(
    assignment: str,
    submissions: str | Path,
    out: str | Path,
    timeout: int = 60,
    root: str | Path | None = None,
    keep_workdir: bool = False,
    echo=print,
) -> GradingResult:
    """Grade every submission of ``assignment`` in ``submissions``; results under ``out``.

    Parameters
    ----------
    assignment : str
        An exercise set, i.e. a folder ``solutions/<assignment>/`` of the course.
    submissions : path
        Folder of ``<student>.ipynb`` files and/or ``<student>/<assignment>.ipynb`` folders. Never modified.
    out : path
        Where ``grades.csv``, ``feedback/<student>.html``, ``autograded/<student>.ipynb``,
        ``summary.txt`` and ``logs/nbgrader.log`` go. Must not be inside ``submissions``.
    timeout : int
        Seconds each cell may run before it is interrupted (and its exercise scores 0).
    root : path, optional
        The course root (with ``nbgrader_config.py`` and ``solutions/``); found from the cwd by default.
    keep_workdir : bool
        Keep the temporary nbgrader course directory (its path is printed) for inspection.
    """
    start = time.monotonic()
    root = find_root(root) if root is None else Path(root).resolve()
    if assignment not in list_sets(root):
        raise ValueError(f"unknown exercise set {assignment!r}: {root / 'solutions'} has {list_sets(root)}")
    if not isinstance(timeout, int) or isinstance(timeout, bool) or timeout < 1:
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
    submissions, out = Path(submissions).resolve(), Path(out).resolve()
    if out == submissions or submissions in out.parents:
        raise ValueError(f"--out {out} is inside the submissions folder {submissions}; choose a folder outside it")
    found = collect_submissions(submissions, assignment)
    before = _hashes(submissions)

    source_nb = nbformat.read(root / "solutions" / assignment / f"{assignment}.ipynb", as_version=4)
    source_checks = _grade_cells(source_nb)
    order = list(source_checks)

    out.mkdir(parents=True, exist_ok=True)
    for stale in ("feedback", "autograded"):  # results of an earlier run in the same folder
        if (out / stale).is_dir():
            shutil.rmtree(out / stale)
    (out / "logs").mkdir(exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="coursekit-grade-"))
    results: dict[str, StudentResult] = {}
    try:
        notes_file = workdir / "notes.json"
        csv_path = out / "grades.csv"
        (workdir / "nbgrader_config.py").write_text(
            _config_text(root, workdir, assignment, timeout, csv_path, notes_file, order)
        )
        shutil.copytree(
            root / "solutions" / assignment,
            workdir / "source" / assignment,
            ignore=shutil.ignore_patterns(".ipynb_checkpoints", "__pycache__", "*.pyc", ".*"),
        )
        with open(out / "logs" / "nbgrader.log", "w") as log:
            if _nbgrader(["generate_assignment", assignment, "--force"], workdir, log) != 0:
                raise RuntimeError(f"nbgrader generate_assignment failed; see {out / 'logs' / 'nbgrader.log'}")

            readable = []
            for sid, (path, notes) in found.items():
                results[sid] = StudentResult(sid, path, notes=list(notes))
                if path is None:
                    continue
                problem = _read_problem(path)
                if problem:
                    results[sid].notes.append(problem)
                    continue
                submitted = _grade_cells(nbformat.read(path, as_version=4))
                for gid, src in source_checks.items():
                    if gid not in submitted:
                        results[sid].notes.append(f"{gid}: missing, put back from the source")
                    elif submitted[gid].strip() != src.strip():
                        results[sid].notes.append(f"{gid}: edited, restored from the source")
                dest = workdir / "submitted" / sid / assignment
                dest.mkdir(parents=True)
                shutil.copyfile(path, dest / f"{assignment}.ipynb")  # a copy: the submission stays as it was
                readable.append(sid)

            if readable:
                echo(f"autograding {len(readable)} submission(s) of {assignment} (cell time limit {timeout} s) ...")
                code = _nbgrader(["autograde", assignment, "--force"], workdir, log)
                if code != 0:
                    echo(f"nbgrader autograde reported errors (exit {code}); see {out / 'logs' / 'nbgrader.log'}")
            for sid in readable:
                graded = workdir / "autograded" / sid / assignment / f"{assignment}.ipynb"
                if graded.is_file():
                    results[sid].notes += _cell_notes(graded, timeout)
                    (out / "autograded").mkdir(exist_ok=True)
                    shutil.copyfile(graded, out / "autograded" / f"{sid}.ipynb")
                else:
                    results[sid].notes.append("autograding failed (the notebook could not be run; see logs/nbgrader.log)")

            # every student gets a CSV row, also those whose notebook could not be graded (score 0)
            notes_file.write_text(json.dumps({sid: "; ".join(r.notes) for sid, r in results.items()}))
            if _nbgrader(["export"], workdir, log) != 0:
                raise RuntimeError(f"nbgrader export failed; see {out / 'logs' / 'nbgrader.log'}")
            if readable:
                _nbgrader(["generate_feedback", assignment, "--force"], workdir, log)
            feedback_dir = out / "feedback"
            for sid in readable:
                html = workdir / "feedback" / sid / assignment / f"{assignment}.html"
                if html.is_file():
                    feedback_dir.mkdir(exist_ok=True)
                    shutil.copyfile(html, feedback_dir / f"{sid}.html")
                    results[sid].feedback = feedback_dir / f"{sid}.html"
    finally:
        if keep_workdir:
            echo(f"nbgrader course directory kept at {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)

    after = _hashes(submissions)
    if after != before:
        changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
        raise RuntimeError(f"submission files changed during grading (this is a bug): {changed}")

    max_points: dict[str, float] = {}
    with open(csv_path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        cells = [c for c in reader.fieldnames or [] if c not in ("student_id", "assignment", "score", "max_score", "notes")]
        for row in reader:
            r = results.get(row["student_id"]) or results.setdefault(row["student_id"], StudentResult(row["student_id"], None))
            r.score, r.max_score = float(row["score"]), float(row["max_score"])
            r.points = {c: float(row[c] or 0) for c in cells}
    for cell in source_nb.cells:
        nbg = cell.metadata.get("nbgrader", {})
        if nbg.get("grade") and nbg.get("grade_id") in cells:
            max_points[nbg["grade_id"]] = float(nbg.get("points", 0))
    result = GradingResult(assignment, out, csv_path, [results[s] for s in sorted(results)], max_points,
                           time.monotonic() - start)
    summary = (
        f"{assignment}: {len(result.students)} student(s) graded in {result.seconds:.0f} s "
        f"(cell time limit {timeout} s)\n{result.table()}\n\n"
        f"grades:   {csv_path}\nfeedback: {out / 'feedback'}/<student>.html\n"
    )
    (out / "summary.txt").write_text(summary)
    echo(summary)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="coursekit-grade",
        description="Grade a folder of exercise notebooks with nbgrader (autograde, CSV export, HTML feedback). "
        "The submissions are never modified.",
    )
    parser.add_argument("assignment", help="exercise set, e.g. 00_warmup (a folder of solutions/)")
    parser.add_argument("submissions", help="folder with <student>.ipynb files or <student>/<set>.ipynb folders")
    parser.add_argument("--out", help="results folder (default: grading/<assignment>, ignored by git)")
    parser.add_argument("--timeout", type=int, default=60, help="seconds each cell may run (default: 60)")
    parser.add_argument("--root", help="course root with nbgrader_config.py and solutions/ (default: found from cwd)")
    parser.add_argument("--keep-workdir", action="store_true", help="keep the temporary nbgrader course directory")
    args = parser.parse_args(argv)
    try:
        out = args.out or str(Path("grading") / args.assignment)
        grade(args.assignment, args.submissions, out, timeout=args.timeout, root=args.root,
              keep_workdir=args.keep_workdir)
    except (ValueError, FileNotFoundError) as err:
        print(f"coursekit-grade: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
