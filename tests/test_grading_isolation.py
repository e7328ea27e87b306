"""The worker's limits and isolation, one hostile submission each (00_warmup, the quickest set).

Each hostile student submits the solution plus one cell that attacks the grader: it must cost
that student at most that cell (every check still earns its points), say what happened in the
notes, and never hang the run or touch another student's result.
"""

from __future__ import annotations

import ast
import csv
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pytest

from coursekit.grading import cli, pool, sandbox

ROOT = Path(__file__).resolve().parents[1]
SET = "00_warmup"
SOLUTION = ROOT / "solutions" / SET / f"{SET}.ipynb"
FULL = {"check_to_input": 4.0, "check_top_k": 4.0, "check_layer_activation": 4.0}
TIMEOUT = 12

FDS = "import os\nprint('FDS', sorted(int(f) for f in os.listdir('/proc/self/fd')))\n"
# ignores the timer and never returns; it sleeps rather than spins (the grader must kill it either way), so the
# other tests keep the core for the TIMEOUT + GRACE seconds it takes
IGNORE_ALARM = "import signal, time\nsignal.signal(signal.SIGALRM, signal.SIG_IGN)\nwhile True:\n    time.sleep(0.05)\n"
MEMORY = "hog = bytearray(20 * 2**30)\n"
FORK_BOMB = ("import os, time\nkids = []\ntry:\n    for _ in range(200):\n        pid = os.fork()\n"
             "        if pid == 0:\n            time.sleep(0.5)\n            os._exit(0)\n        kids.append(pid)\n"
             "finally:\n    for pid in kids:\n        os.waitpid(pid, 0)\n    print('FORKED', len(kids))\n")
FLOOD = "print('x' * 300_000_000)\n"
PEEK = ("import os\nfor path in ('/proc/1/cmdline', '/proc/1/environ', '/etc/passwd'):\n    try:\n"
        "        print('READ', path, open(path, 'rb').read()[:200])\n    except OSError as err:\n"
        "        print('REFUSED', path, err)\nfor home in ('/root', '/home'):\n    try:\n"
        "        print('LIST', home, os.listdir(home))\n    except OSError as err:\n        print('REFUSED', home, err)\n")


def _with(extra: str):
    nb = nbformat.read(SOLUTION, as_version=4)
    nb.cells.insert(2, nbformat.v4.new_code_cell(extra))
    return nb


def _printed(out: Path, student: str) -> str:
    nb = nbformat.read(out / "autograded" / f"{student}.ipynb", as_version=4)
    return "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)


# graded a second time (their rows must not change): three limits met and an honest one; not "alarm", whose
# cell alone takes TIMEOUT + GRACE s (the time limit's repeatability is in test_grading_e2e.py: "erin")
AGAIN = ("flood", "forks", "honest", "memory")


@pytest.fixture(scope="module")
def graded(tmp_path_factory):
    base = tmp_path_factory.mktemp("hostile")
    subs, out = base / "submissions", base / "results"
    again_subs, again_out = base / "again" / "submissions", base / "again" / "results"
    subs.mkdir()
    again_subs.mkdir(parents=True)
    class_ = {"honest": "x = 1\n", "fds": FDS, "alarm": IGNORE_ALARM, "memory": MEMORY,
              "forks": FORK_BOMB, "flood": FLOOD, "peek": PEEK}
    for student, extra in class_.items():
        nbformat.write(_with(extra), subs / f"{student}.ipynb")
    for student in AGAIN:
        shutil.copyfile(subs / f"{student}.ipynb", again_subs / f"{student}.ipynb")
    start = time.monotonic()
    lines = []
    cli.grade(SET, subs, out, timeout=TIMEOUT, root=ROOT, jobs=2, echo=lines.append)
    # repeatability: part of the class again, into a folder that holds the first run's results
    shutil.copytree(out, again_out)
    cli.grade(SET, again_subs, again_out, timeout=TIMEOUT, root=ROOT, jobs=2, echo=lines.append)
    return {"rows": _rows(out / "grades.csv"), "again": _rows(again_out / "grades.csv"), "again_out": again_out,
            "out": out, "seconds": time.monotonic() - start, "lines": lines}


def _rows(path: Path) -> dict[str, dict[str, str]]:
    with open(path, newline="") as fh:
        return {r["student_id"]: r for r in csv.DictReader(fh)}


def _full(row) -> bool:
    return {k: float(row[k]) for k in FULL} == FULL


@pytest.mark.slow
def test_every_hostile_cell_costs_only_itself_and_is_named(graded):
    rows = graded["rows"]
    for student, row in rows.items():
        assert _full(row), (student, row)
    alarm = rows["alarm"]["notes"]
    assert f"stopped after the {TIMEOUT} s time limit" in alarm, alarm
    assert "memory limit reached" in rows["memory"]["notes"], rows["memory"]
    assert "output limit reached" in rows["flood"]["notes"], rows["flood"]
    assert rows["honest"]["notes"] == "" and rows["honest"]["flags"] == ""
    assert graded["again"] == {s: rows[s] for s in AGAIN}  # graded twice: the same rows
    again_feedback = sorted(p.name for p in (graded["again_out"] / "feedback").iterdir())
    assert again_feedback == [f"{s}.html" for s in AGAIN]  # the first run's other results were cleared
    assert graded["seconds"] < 2 * 6 * (TIMEOUT + pool.GRACE + 30)  # nothing hangs the run


@pytest.mark.slow
def test_a_fork_bomb_meets_the_process_limit(graded):
    row = graded["rows"]["forks"]
    assert "process limit reached" in row["notes"], row
    printed = _printed(graded["out"], "forks")
    assert "FORKED 200" not in printed
    limits = pool.ProcessLimit(32)
    if limits.root is not None:  # the workers' cgroups are gone once grading ends
        assert not list(limits.root.glob(f"coursekit-grade-{os.getpid()}-*"))


@pytest.mark.slow
def test_the_worker_holds_no_descriptor_but_its_own_channel(graded):
    printed = _printed(graded["out"], "fds")
    line = next(x for x in printed.splitlines() if x.startswith("FDS"))
    fds = set(ast.literal_eval(line[4:]))
    # stdin/out/err (/dev/null), the pipe to the grader, to and from the judge, the listing itself
    assert fds <= {0, 1, 2, 3, 4, 5, 6}, fds


@pytest.mark.slow
def test_the_worker_cannot_read_the_graders_command_line_or_homes(graded):
    if not pool.probe_sandbox():
        pytest.skip("no user namespaces on this machine: the README says what is not isolated then")
    printed = _printed(graded["out"], "peek")
    assert "root:x:0:0" not in printed and "pytest" not in printed and str(graded["out"]) not in printed
    needed = sandbox.needed_paths([ROOT])
    for home in ("/root", "/home"):
        listed = [x for x in printed.splitlines() if x.startswith(f"LIST {home} ")]
        if not listed:
            continue  # refused or absent
        visible = set(ast.literal_eval(listed[0][len(f"LIST {home} "):]))
        allowed = {p.relative_to(home).parts[0] for p in needed if Path(home) in p.parents}
        assert visible <= allowed, (home, visible - allowed)  # only the folders Python or the course live in
    ours = Path("/proc/self/cmdline").read_bytes().split(b"\0")[:2]  # the grader's (this test's) own command line
    cmdline = [x for x in printed.splitlines() if x.startswith("READ /proc/1/cmdline")]
    assert cmdline and all(repr(part)[2:-1] not in cmdline[0] for part in ours if part), (cmdline, ours)
    assert "HOME=" not in printed and "PATH=" not in printed  # nor its environment


@pytest.mark.slow
def test_a_course_and_python_under_tmp_stay_visible_to_the_worker(tmp_path):
    """The checkout under /tmp (as in CI): the worker still imports coursekit and reads its weights."""
    if not pool.probe_sandbox():
        pytest.skip("no namespaces: /tmp is not private then")
    course = tmp_path / "course"
    shutil.copytree(ROOT / "coursekit", course / "coursekit", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "solutions" / SET, course / "solutions" / SET)
    shutil.copy(ROOT / "nbgrader_config.py", course / "nbgrader_config.py")
    subs = tmp_path / "subs"
    subs.mkdir()
    shutil.copy(SOLUTION, subs / "honest.ipynb")
    env = {**os.environ, "PYTHONPATH": str(course)}
    done = subprocess.run([sys.executable, "-m", "coursekit.grading.cli", SET, str(subs), "--out", str(tmp_path / "out"),
                           "--root", str(course), "--jobs", "1"], cwd=course, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert str(course / "coursekit") in subprocess.run(
        [sys.executable, "-c", "import coursekit; print(coursekit.__file__)"], cwd=course, env=env,
        capture_output=True, text=True).stdout
    with open(tmp_path / "out" / "grades.csv", newline="") as fh:
        row = next(csv.DictReader(fh))
    assert float(row["score"]) == 12.0, row
