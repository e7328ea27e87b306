"""``coursekit-grade``: grade a folder of exercise notebooks, each submission in its own sandbox.

Usage::

    coursekit-grade 00_warmup path/to/submissions [--out grading/00_warmup] [--timeout 60] [--jobs N]
    python -m coursekit.grading.cli 00_warmup path/to/submissions

``submissions/`` holds ``<student>.ipynb`` files and/or ``<student>/00_warmup.ipynb`` folders
(a folder with a single notebook of another name is accepted too). The command

1. reads the source ``solutions/<set>/<set>.ipynb``: its check cells (nbgrader ``grade`` cells),
   their points and the exercise each one checks;
2. matches every submission's cells with them (:mod:`.notebook`): the check cells are always the
   source's (an edited, deleted or metadata-stripped check cell is restored and noted), and the
   student's code is scanned for tampering (flagged for review);
3. runs each submission in its own worker process (:mod:`.pool`, :mod:`.runner`), ``--jobs`` at a
   time, one torch thread each, inside a sandbox (:mod:`.sandbox`): read-only file system, private
   ``/tmp`` and homes, no network, the submissions, the output and the solutions hidden, limits on
   memory, processes and output. Every cell has ``--timeout`` seconds, enforced from outside; a
   cell that runs longer, or kills its process, costs only its own exercise. The verdicts come
   from a judge process next to each worker, where no student code runs (:mod:`.judge`);
4. writes ``<out>/grades.csv`` (points of every check cell, ``notes`` and ``flags``),
   ``<out>/feedback/<student>.html`` (readable offline), ``<out>/autograded/<student>.ipynb``,
   ``<out>/analytics.html`` (the class's mistakes per exercise) and ``<out>/summary.txt``, also
   for the students graded so far when the run is interrupted.

Cells after the last check cell earn no points and are not run. The cases a check draws are seeded
from the submission's content (and ``--seed``): grading the same class twice gives the same CSV.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import os
import re
import shutil
import site
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import nbformat

from . import analytics, pool, results, sandbox
from .notebook import prepare, scan, source_checks
from .release import find_root, list_sets
from .results import StudentResult
from .runner import Job

__all__ = ["GradingResult", "StudentResult", "collect_submissions", "grade", "main"]


@dataclass
class GradingResult:
    assignment: str
    out: Path
    csv: Path
    students: list[StudentResult]
    max_points: dict[str, float]
    seconds: float
    sandbox: str

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
            extra = s.notes + ([f"REVIEW: {len(s.flags)} flag(s)"] if s.flags else [])
            lines.append(f"{s.student:{width}s}  {score:>9s}  {pts}  {'; '.join(extra)}")
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


def _contents(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _read_problem(path: Path) -> str | None:
    """Why a submitted file cannot be graded, or None when it is a readable notebook."""
    try:
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
    except Exception as err:  # noqa: BLE001 -- any unreadable file costs that student this set; reported
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        return f"unreadable notebook ({type(err).__name__}: {first[:120]})"
    return None




def _warm_up(exercises: list[str]) -> None:
    """Import torch, coursekit and the checks once, before forking: every worker starts warm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot  # noqa: F401
    import torch

    torch.set_num_threads(1)
    from coursekit.checks import run_check

    from .notebook import to_python

    to_python("x = 1")

    def stub(*args, **kwargs):
        raise NotImplementedError

    for name in exercises:
        run_check(name, stub, seed=0)  # loads the checks' data and models into the parent's caches


def _cleaner(root: Path, submissions: Path, out: Path, work: Path) -> list[tuple[str, str]]:
    pairs = [(str(submissions), "<submissions>"), (str(out), "<grading output>"), (str(work), "<grader>"),
             (str(root), "<course>"), (sys.prefix, "<python>"), (tempfile.gettempdir(), "<tmp>")]
    pairs += [(p, "<site-packages>") for p in site.getsitepackages()]
    return sorted(pairs, key=lambda p: -len(p[0]))


def grade(
    assignment: str,
    submissions: str | Path,
    out: str | Path,
    timeout: int = 60,
    root: str | Path | None = None,
    jobs: int | None = None,
    seed: str = "",
    isolate: bool | None = None,
    echo=print,
    memory_mb: int = 2048,
    processes: int = 32,
) -> GradingResult:
    """Grade every submission of ``assignment`` in ``submissions``; results under ``out``.

    The steps are those of the module's docstring: check the settings, read the source notebook
    (:func:`_read_source`), prepare every submission (:func:`_plan_students`), run the workers
    (:func:`_run_workers`), then write the CSV, the analytics and the summary
    (:func:`_write_summary`).

    Parameters
    ----------
    assignment : str
        An exercise set, i.e. a folder ``solutions/<assignment>/`` of the course.
    submissions : path
        Folder of ``<student>.ipynb`` files and/or ``<student>/<assignment>.ipynb`` folders. Never modified.
    out : path
        Where ``grades.csv``, ``feedback/``, ``autograded/`` and ``summary.txt`` go; not inside ``submissions``.
    timeout : int
        Seconds each cell may run before it is interrupted (and its exercise scores 0).
    root : path, optional
        The course root (with ``nbgrader_config.py`` and ``solutions/``); found from the cwd by default.
    jobs : int, optional
        Submissions graded at the same time (default: the CPU cores this process may use).
    seed : str
        Mixed into every check's seed; change it to draw other cases for the whole class.
    isolate : bool, optional
        Use the namespace sandbox (default: when the machine allows it; ``True`` makes it
        required, ``False`` leaves only the separate processes and the audit hook).
    echo : callable
        Where progress and the summary go (``print``).
    memory_mb : int
        Memory (address space, MiB) each worker may allocate on top of the grader's own; an
        allocation beyond it fails inside the student's cell, noted "memory limit reached".
    processes : int
        Processes and threads of one worker (a pids cgroup where the machine allows, else RLIMIT_NPROC).

    Returns
    -------
    GradingResult
    """
    start = time.monotonic()
    root, jobs = _checked_settings(assignment, root, timeout, jobs, memory_mb, processes)
    submissions, out = Path(submissions).resolve(), Path(out).resolve()
    if out == submissions or submissions in out.parents:
        raise ValueError(f"--out {out} is inside the submissions folder {submissions}; choose a folder outside it")
    found = collect_submissions(submissions, assignment)
    before = _contents(submissions)
    checks, files = _read_source(root, assignment)
    sandboxed, sandbox_text = _choose_sandbox(isolate)
    _clear_earlier_results(out)
    _warm_up([c.exercise for c in checks])
    work = Path(tempfile.mkdtemp(prefix="coursekit-grade-"))
    hide = [submissions, out, root / "solutions", work]
    keep = sandbox.needed_paths([root]) if sandboxed else []
    _refuse_hidden_environment(keep, hide)
    new_job = functools.partial(Job, assignment=assignment, timeout=timeout, files=files, hide=hide,
                                private_tmp=work / "fallback", clean=_cleaner(root, submissions, out, work),
                                keep=keep, memory_mb=memory_mb, processes=processes)
    try:
        students, plans, job_list = _plan_students(found, before, submissions, checks, seed, new_job)
        if job_list:
            echo(f"grading {len(job_list)} submission(s) of {assignment} with {jobs} process(es), "
                 f"cell time limit {timeout} s; sandbox: {sandbox_text}")
        outcomes, plans, interrupted = _run_workers(job_list, jobs, sandboxed, plans, students, _progress(echo, start))
        for sid, (plan, nb) in plans.items():
            _record(students[sid], plan, nb, outcomes[sid], checks, out, assignment, timeout, echo)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    _ensure_untouched(submissions, before, echo)
    ordered = [students[s] for s in sorted(students)]
    csv_path = out / "grades.csv"
    results.write_csv(csv_path, assignment, ordered, checks)
    result = GradingResult(assignment, out, csv_path, ordered, {c.grade_id: c.points for c in checks},
                           time.monotonic() - start, sandbox_text)
    _write_summary(result, checks, jobs, timeout, interrupted, echo)
    if interrupted is not None:
        raise interrupted
    return result


def _checked_settings(assignment: str, root, timeout, jobs, memory_mb, processes) -> tuple[Path, int]:
    """The course root and the number of workers, after refusing a bad set name or limit (ValueError)."""
    root = find_root(root) if root is None else Path(root).resolve()
    if assignment not in list_sets(root):
        raise ValueError(f"unknown exercise set {assignment!r}: {root / 'solutions'} has {list_sets(root)}")
    if not isinstance(timeout, int) or isinstance(timeout, bool) or timeout < 1:
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
    jobs = len(os.sched_getaffinity(0)) if jobs is None else jobs
    if not isinstance(jobs, int) or isinstance(jobs, bool) or jobs < 1:
        raise ValueError(f"jobs must be a positive number of processes, got {jobs!r}")
    for name, value, least in (("memory_mb", memory_mb, 256), ("processes", processes, 8)):
        if not isinstance(value, int) or isinstance(value, bool) or value < least:
            raise ValueError(f"{name} must be an integer of at least {least}, got {value!r}")
    return root, jobs


def _read_source(root: Path, assignment: str) -> tuple[list, dict[str, bytes]]:
    """The source notebook's check cells, and the set's other files (copied into every worker's folder)."""
    source_dir = root / "solutions" / assignment
    checks = source_checks(nbformat.read(source_dir / f"{assignment}.ipynb", as_version=4))
    files = {str(p.relative_to(source_dir)): p.read_bytes() for p in sorted(source_dir.rglob("*"))
             if p.is_file() and p.name != f"{assignment}.ipynb" and ".ipynb_checkpoints" not in p.parts
             and not p.name.startswith(".")}
    return checks, files


def _choose_sandbox(isolate: bool | None) -> tuple[bool, str]:
    """Whether the workers get the namespace sandbox, and the words that say which protection they get."""
    available = pool.probe_sandbox()
    if isolate and not available:
        raise RuntimeError("the namespace sandbox is not available on this machine (unprivileged user namespaces "
                           "are off); run without --isolate to grade with separate processes and the audit hook only")
    sandboxed = available if isolate is None else isolate
    sandbox_text = ("namespaces (read-only file system, private /tmp, no network, own PID space) + audit hook"
                    if sandboxed else "separate processes + audit hook (no user namespaces on this machine)")
    return sandboxed, sandbox_text


def _clear_earlier_results(out: Path) -> None:
    """Create ``out`` and remove the results of an earlier run in it (feedback, notebooks, logs, CSV, summary)."""
    out.mkdir(parents=True, exist_ok=True)
    for stale in ("feedback", "autograded", "logs"):
        if (out / stale).is_dir():
            shutil.rmtree(out / stale)
    for stale in ("grades.csv", "summary.txt"):
        (out / stale).unlink(missing_ok=True)


def _plan_students(found: dict, before: dict[str, bytes], submissions: Path, checks: list, seed: str, new_job):
    """A result row for every student and, for each readable notebook, its matched cells and worker job.

    Returns ``(students, plans, jobs)``: ``{student: StudentResult}`` (notes and tampering flags
    filled in), ``{student: (plan, notebook)}`` and the list of :class:`~.runner.Job` made by
    ``new_job`` (the cells up to the last check cell, a seed drawn from the notebook's bytes).
    """
    students: dict[str, StudentResult] = {}
    plans, job_list = {}, []
    for sid, (path, notes) in found.items():
        students[sid] = StudentResult(sid, path, notes=list(notes), max_score=sum(c.points for c in checks))
        if path is None:
            continue
        problem = _read_problem(path)
        if problem:
            students[sid].notes.append(problem)
            continue
        data = before[str(path.relative_to(submissions))]
        nb = nbformat.reads(data.decode("utf-8"), as_version=4)
        plan = prepare(nb, checks)
        students[sid].notes += plan.notes
        students[sid].flags += scan([(i, src) for i, (gid, src) in enumerate(plan.cells) if gid is None])
        last = max(i for i, (gid, _) in enumerate(plan.cells) if gid is not None)
        plans[sid] = (plan, nb)
        job_list.append(new_job(sid, cells=plan.cells[: last + 1], checks={c.grade_id: c for c in checks},
                                seed=hashlib.sha256(data).hexdigest() + f":{sid}:{seed}"))
    return students, plans, job_list


def _run_workers(job_list: list[Job], jobs: int, sandboxed: bool, plans: dict, students: dict, progress):
    """Run every job in the pool; ``(outcomes, plans of the finished students, interruption or None)``.

    A Ctrl-C or a grader bug does not lose the students already graded: the others get a note
    that they were not graded, and the exception is returned for :func:`grade` to re-raise once
    the results are written.
    """
    outcomes: dict = {}
    try:
        pool.run_all(job_list, jobs, sandboxed, echo=progress, outcomes=outcomes)
    except BaseException as err:  # noqa: BLE001 -- Ctrl-C or a grader bug: keep what was graded, then re-raise
        finished = {sid for sid, o in outcomes.items() if o.finished}
        for sid in plans:
            if sid not in finished:
                students[sid].notes.append("not graded: the run was interrupted while this submission was "
                                           "waiting or being graded; grade it again")
        return outcomes, {sid: p for sid, p in plans.items() if sid in finished}, err
    return outcomes, plans, None


def _write_summary(result: GradingResult, checks: list, jobs: int, timeout: int,
                   interrupted: BaseException | None, echo) -> None:
    """Write ``analytics.html`` and ``summary.txt`` (headed INTERRUPTED for partial results) and echo the summary."""
    out, assignment, ordered = result.out, result.assignment, result.students
    summary = (
        f"{assignment}: {len(ordered)} student(s) graded in {result.seconds:.0f} s with {jobs} process(es) "
        f"(cell time limit {timeout} s; sandbox: {result.sandbox})\n{result.table()}\n\n"
        f"grades:   {result.csv}\nfeedback: {out / 'feedback'}/<student>.html\n"
    )
    if interrupted is not None:
        summary = f"INTERRUPTED ({type(interrupted).__name__}): partial results\n" + summary
    analytics.write_report(out / "analytics.html", assignment, ordered, checks)
    summary += f"analytics: {out / 'analytics.html'}\n"
    (out / "summary.txt").write_text(summary)
    echo(summary)


def _progress(echo, start: float):
    """One line per student as it finishes: count, name, points the judge gave, what happened."""
    def line(done: int, total: int, student: str, outcome) -> None:
        earned = sum(min(float(v.get("earned", 0)), float(v.get("points", 0))) for v in outcome.verdicts.values())
        lost = sum(1 for c in outcome.cells.values() if c.lost)
        extra = f", {lost} cell(s) lost" if lost else ""
        echo(f"[{done}/{total}] {student}: {earned:g} points{extra} ({time.monotonic() - start:.0f} s)")
    return line


def _record(r: StudentResult, plan, nb, outcome, checks, out: Path, assignment: str, timeout: int, echo) -> None:
    """Scores, notes and files of one student; a failure here is that student's note, never the class's crash."""
    try:
        results.assemble(r, plan, outcome, checks, results.shown_points(nb), timeout)
    except Exception as err:  # noqa: BLE001 -- reported in the student's notes and on the console
        r.points, r.score = {}, 0.0
        r.notes.append(f"the grader failed to score this submission ({type(err).__name__}: {err}); review it by hand")
        echo(f"warning: {r.student}: scoring failed: {type(err).__name__}: {err}")
    try:
        results.write_files(out, assignment, r, plan, outcome, checks)
    except Exception as err:  # noqa: BLE001 -- the scores stand; only the feedback files are missing
        r.notes.append(f"feedback files not written ({type(err).__name__}: {str(err)[:200]})")
        echo(f"warning: {r.student}: feedback not written: {type(err).__name__}: {err}")


def _refuse_hidden_environment(keep: list[Path], hide: list[Path]) -> None:
    """Refuse to grade when a folder the workers must read (Python, libraries, the course) would be hidden."""
    for needed in keep:
        for hidden in hide:
            hidden = hidden.resolve()
            if needed == hidden or hidden in needed.parents:
                raise ValueError(f"the worker must read {needed} (Python, its libraries or the course), but it lies in "
                                 f"{hidden}, which the sandbox hides from submissions (the submissions, the output, "
                                 "solutions/); move one of them")


def _ensure_untouched(submissions: Path, before: dict[str, bytes], echo) -> None:
    """Put back any submission file that changed (only possible without the namespace sandbox)."""
    after = _contents(submissions)
    changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
    for rel in changed:
        target = submissions / rel
        if rel in before:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(before[rel])
        else:
            target.unlink()
    if changed:
        echo(f"warning: {len(changed)} file(s) of the submissions folder changed during grading and were put back: "
             f"{changed[:5]}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="coursekit-grade",
        description="Grade a folder of exercise notebooks, each in its own sandbox (CSV, HTML feedback). "
        "The submissions are never modified.",
    )
    parser.add_argument("assignment", help="exercise set, e.g. 00_warmup (a folder of solutions/)")
    parser.add_argument("submissions", help="folder with <student>.ipynb files or <student>/<set>.ipynb folders")
    parser.add_argument("--out", help="results folder (default: grading/<assignment>, ignored by git)")
    parser.add_argument("--timeout", type=int, default=60, help="seconds each cell may run (default: 60)")
    parser.add_argument("--jobs", type=int, default=None,
                        help="submissions graded in parallel, one thread each (default: the cores available)")
    parser.add_argument("--memory", type=int, default=2048,
                        help="MiB of memory each worker may allocate beyond the grader's own (default: 2048)")
    parser.add_argument("--seed", default="", help="mixed into every check's random cases (default: none)")
    parser.add_argument("--root", help="course root with nbgrader_config.py and solutions/ (default: found from cwd)")
    parser.add_argument("--no-isolate", dest="isolate", action="store_false", default=None,
                        help="do not use the namespace sandbox even where the machine allows it")
    args = parser.parse_args(argv)
    try:
        out = args.out or str(Path("grading") / args.assignment)
        grade(args.assignment, args.submissions, out, timeout=args.timeout, root=args.root, jobs=args.jobs,
              seed=args.seed, isolate=args.isolate, memory_mb=args.memory)
    except (ValueError, FileNotFoundError) as err:
        print(f"coursekit-grade: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
