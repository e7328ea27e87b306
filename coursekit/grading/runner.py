"""Run one submission's cells in a forked, sandboxed worker and report each cell on a pipe.

The worker is a child of the grading process (``os.fork``), so torch, coursekit and the checks
are already imported and their caches warm. It enters the sandbox (:mod:`.sandbox`), runs the
cells in order in one namespace and writes one JSON line per cell to the pipe: the outputs
(stdout, stderr, the value of the last expression, the error) and, for a check cell, the verdict.
Check cells never run the submitted text: the grader calls the check itself, with the
references it captured before any student code ran, after putting back anything a student
cell patched (:mod:`coursekit.checks._integrity`). Output on stderr is shown in the feedback and
never costs points.

A cell that runs past the time limit is interrupted (``CellTimeout``); a worker that does not
come back, or dies (``os._exit``, a crash), is killed by the parent, which starts a fresh worker
that replays the earlier non-check cells silently and carries on after the lost cell.
"""

from __future__ import annotations

import ast
import errno
import hashlib
import json
import os
import resource
import signal
import sys
import threading
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from . import sandbox
from .notebook import CheckCell, to_python

__all__ = ["Job", "CellTimeout", "run_worker", "check_seed"]


class CellTimeout(BaseException):  # noqa: N818 -- a BaseException, so `except Exception` in student code lets it through
    """A cell ran past the time limit."""


@dataclass
class Job:
    """Everything a worker needs; built by the parent before ``fork``."""

    student: str
    assignment: str
    cells: list[tuple[str | None, str]]
    checks: dict[str, CheckCell]
    seed: str
    timeout: int
    files: dict[str, bytes] = field(default_factory=dict)  # the set's other files, copied into the working folder
    hide: list[Path] = field(default_factory=list)
    private_tmp: Path | None = None  # the fallback working area, when there are no namespaces
    clean: list[tuple[str, str]] = field(default_factory=list)  # (prefix, replacement) for paths in messages
    keep: list[Path] = field(default_factory=list)  # folders the worker must read (Python, libraries, the course)
    memory_mb: int = 2048  # address space a worker may add to what it inherited (RLIMIT_AS)
    processes: int = 32  # processes and threads of one worker (a pids cgroup, else RLIMIT_NPROC)
    cgroup: Path | None = None  # the worker's own pids cgroup, created by the parent, when the machine allows


def check_seed(seed: str, exercise: str) -> int:
    """The seed of one check of one submission: the same submission always meets the same cases."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{exercise}".encode()).digest()[:4], "little")


MAX_OUTPUT = 1_000_000  # characters of printed output kept per cell; the rest is counted and dropped


class _Streams:
    """sys.stdout / sys.stderr of the worker: everything written goes to the current cell's outputs.

    At most :data:`MAX_OUTPUT` characters per cell are kept (``dropped`` counts the rest).
    """

    def __init__(self):
        self.outputs: list[dict] = []
        self.size = 0
        self.dropped = 0

    def reset(self) -> None:
        self.outputs, self.size, self.dropped = [], 0, 0

    def writer(self, name: str):
        streams = self

        class _Stream:
            encoding, errors = "utf-8", "replace"

            def write(self, text) -> int:
                text = str(text)
                n = len(text)
                room = MAX_OUTPUT - streams.size
                if n > room:
                    streams.dropped += n - max(room, 0)
                    text = text[:max(room, 0)]
                streams.size += len(text)
                out = streams.outputs
                if out and out[-1].get("output_type") == "stream" and out[-1]["name"] == name:
                    out[-1]["text"] += text
                elif text:
                    out.append({"output_type": "stream", "name": name, "text": text})
                return n

            def flush(self) -> None:
                pass

            def isatty(self) -> bool:
                return False

            def fileno(self) -> int:
                raise OSError("no file descriptor")

        return _Stream()


class _Shell:
    """Enough of ``get_ipython()`` for cells with magics: magics and shell commands are skipped."""

    def __init__(self, streams: _Streams):
        self.streams = streams

    def _skip(self, what: str):
        print(f"[grader] {what} is not run during grading", file=sys.stdout)

    def run_line_magic(self, name, line, *args, **kwargs):
        self._skip(f"%{name}")

    def run_cell_magic(self, name, line, cell, *args, **kwargs):
        self._skip(f"%%{name}")

    def system(self, cmd, *args, **kwargs):
        self._skip(f"!{cmd}")

    getoutput = system


def _clean(text: str, job: Job) -> str:
    for prefix, replacement in job.clean:
        text = text.replace(prefix, replacement)
    return text


def _limit(err: BaseException) -> str | None:
    """Which of the worker's limits an error comes from: "memory", "processes" or None."""
    text = str(err).lower()
    if isinstance(err, MemoryError) or "can't allocate memory" in text or "cannot allocate memory" in text:
        return "memory"
    if isinstance(err, BlockingIOError) or (isinstance(err, OSError) and err.errno == errno.EAGAIN):
        return "processes"
    if isinstance(err, RuntimeError) and "can't start new thread" in text:
        return "processes"
    return None


def _error(err: BaseException, job: Job, timeout: bool = False) -> dict:
    if timeout:
        return {"output_type": "error", "ename": "CellTimeout", "evalue": f"stopped after the {job.timeout} s time limit",
                "traceback": [f"CellTimeout: stopped after the {job.timeout} s time limit"]}
    frames = [f for f in traceback.extract_tb(err.__traceback__) if f.filename.startswith("<cell")
              or "coursekit/grading" not in f.filename.replace(os.sep, "/")]
    lines = traceback.format_list(frames) + traceback.format_exception_only(type(err), err)
    out = {"output_type": "error", "ename": type(err).__name__, "evalue": _clean(str(err), job),
           "traceback": [_clean(line.rstrip("\n"), job) for line in lines]}
    limit = _limit(err)
    return {**out, "limit": limit} if limit else out


def _quiet(python: str) -> bool:
    """IPython's rule: a cell whose last line ends in ``;`` shows no value (``torch.manual_seed(0);``)."""
    lines = [line for line in python.rstrip().splitlines() if line.strip()]
    return bool(lines) and lines[-1].split("#", 1)[0].rstrip().endswith(";")


def _run_code(source: str, name: str, ns: dict):
    python = to_python(source)
    tree = ast.parse(python, filename=name)
    last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
    if last is not None and _quiet(python):
        tree.body.append(last)
        last = None
    exec(compile(tree, name, "exec"), ns)  # noqa: S102 -- the student's cell, inside the sandbox
    if last is not None:
        value = eval(compile(ast.Expression(last.value), name, "eval"), ns)  # noqa: S307
        if value is not None:
            return {"output_type": "execute_result", "data": {"text/plain": repr(value)[:2000]}, "metadata": {}}
    return None


class _Checker:
    """The check entry points, captured before student code runs."""

    def __init__(self):
        from coursekit.checks import _integrity, run_check

        self.run_check, self.restore = run_check, _integrity.restore

    def run(self, job: Job, check: CheckCell, ns: dict, streams: _Streams) -> dict:
        patched = self.restore()
        notes = [f"{check.grade_id}: {p} had been replaced; put back before the check" for p in patched]
        fn = ns.get(check.function)
        if fn is None:
            print(f"{check.exercise}: 0/{check.points:g} points\n  `{check.function}` is not defined: "
                  "the cell that defines it did not run to the end (see the error above it)")
            return {"earned": 0.0, "points": check.points, "notes": notes, "flags": []}
        report = self.run_check(check.exercise, fn, seed=check_seed(job.seed, check.exercise))
        print(report.summary())
        for note in report.notes[:5]:
            print("  " + note)
        scale = check.points / report.points if report.points else 0.0
        patched_during = self.restore()
        flags = [f"{check.grade_id}: {p} was replaced while the check ran (put back)" for p in patched_during]
        return {"earned": round(report.earned * scale, 6), "points": check.points, "notes": notes + flags,
                "flags": list(report.tampering)}


def _alarm(signum, frame):
    raise CellTimeout()


CHANNEL = 3  # the worker's only descriptor besides 0, 1, 2 (/dev/null): its result pipe


def _only_channel(fd: int) -> None:
    """Move ``fd`` to :data:`CHANNEL` and close every other inherited descriptor above 2.

    The grader's epoll instance, the other workers' pipe ends, open files: none survives the fork.
    """
    high = os.dup(fd) if fd != CHANNEL else fd
    if high != CHANNEL:
        os.dup2(high, CHANNEL)
    os.closerange(CHANNEL + 1, resource.getrlimit(resource.RLIMIT_NOFILE)[0])


def _virtual_size() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


def _forget_command_line() -> None:
    """Blank this process's command line and environment as ``/proc/<pid>/cmdline|environ`` show them.

    A forked worker inherits the grader's argv and environment pages (the submissions and output
    paths, the instructor's variables); the student's code could read them from its own /proc entry.
    """
    import ctypes

    fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
    # fields[0] is the state (field 3 of proc(5)): arg_start..env_end are fields 48..51
    arg_start, arg_end, env_start, env_end = (int(f) for f in fields[45:49])
    for start, end in ((arg_start, arg_end), (env_start, env_end)):
        if 0 < start < end:
            ctypes.memset(start, 0, end - start)
    name = b"coursekit-worker"
    if arg_end - arg_start > len(name):
        ctypes.memmove(arg_start, name, len(name))


def _set_limits(job: Job) -> None:
    """Memory (address space on top of what was inherited), processes, file size, no core dumps."""
    if job.cgroup is not None:
        (job.cgroup / "cgroup.procs").write_text(str(os.getpid()))
    elif os.getuid() != 0:  # RLIMIT_NPROC counts every process of the user; root is exempt from it
        running = sum(1 for p in Path("/proc").iterdir() if p.name.isdigit() and p.stat().st_uid == os.getuid())
        resource.setrlimit(resource.RLIMIT_NPROC, (running + job.processes, running + job.processes))
    limit = _virtual_size() + job.memory_mb * 2**20
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    resource.setrlimit(resource.RLIMIT_FSIZE, (256 * 2**20, 256 * 2**20))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def run_worker(job: Job, fd: int, start: int, skip: set[int], sandboxed: bool) -> None:
    """The body of a worker process: never returns (``os._exit``)."""
    code = 0
    try:
        os.setsid()  # its own process group: kill(0, ...) from the student's code reaches no one else
        _only_channel(fd)
        fd = CHANNEL
        devnull = os.open(os.devnull, os.O_RDWR)
        os.dup2(devnull, 0)
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        os.close(devnull)
        checker = _Checker()
        _forget_command_line()
        _set_limits(job)
        if sandboxed:
            work = sandbox.enter(f"{job.student}", job.hide, job.keep)
            writable = [work, Path("/tmp"), Path("/dev/shm")]
        else:
            work = job.private_tmp / job.student
            work.mkdir(parents=True)
            writable = [work]
        sandbox.install_audit_hook(writable, [h for h in job.hide], lambda p: _clean(p, job))
        for rel, data in job.files.items():
            (work / rel).parent.mkdir(parents=True, exist_ok=True)
            (work / rel).write_bytes(data)
        os.chdir(work)
        os.environ.update(HOME=str(work), TMPDIR=str(work), MPLCONFIGDIR=str(work / ".matplotlib"), MPLBACKEND="Agg")
        _run_cells(job, fd, start, skip, checker)
    except BaseException as err:  # noqa: BLE001 -- a worker must always tell the parent why it stops
        os.write(fd, (json.dumps({"event": "crash", "error": f"{type(err).__name__}: {err}"}) + "\n").encode())
        code = 3
    os._exit(code)


def _run_cells(job: Job, fd: int, start: int, skip: set[int], checker: _Checker) -> None:
    import torch

    torch.set_num_threads(1)
    streams = _Streams()
    sys.stdout, sys.stderr = streams.writer("stdout"), streams.writer("stderr")
    shell = _Shell(streams)
    ns: dict = {"__name__": "__main__", "get_ipython": lambda: shell, "display": lambda *a, **k: print(*a)}
    signal.signal(signal.SIGALRM, _alarm)

    def send(record: dict) -> None:
        data = (json.dumps(record) + "\n").encode()
        while data:
            data = data[os.write(fd, data):]

    for i, (gid, source) in enumerate(job.cells):
        if i in skip or (i < start and gid is not None):
            continue
        replay = i < start
        if not replay:
            send({"event": "start", "i": i})
        streams.reset()
        result, record = None, {"event": "done", "i": i}
        signal.setitimer(signal.ITIMER_REAL, job.timeout)
        try:
            if gid is None:
                result = _run_code(source, f"<cell {i}>", ns)
            else:
                record["check"] = checker.run(job, job.checks[gid], ns, streams)
        except CellTimeout as err:
            record["error"] = _error(err, job, timeout=True)
        except BaseException as err:  # noqa: BLE001 -- a failing cell is reported like Jupyter does, then the run goes on
            record["error"] = _error(err, job)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        _close_figures()
        if replay:
            continue
        if streams.dropped:
            streams.outputs.append({"output_type": "stream", "name": "stderr",
                                    "text": f"\n[grader: {streams.dropped} more characters of output were not kept]\n"})
            record["limit"] = "output"
        record["outputs"] = streams.outputs + ([result] if result else []) + ([record["error"]] if "error" in record else [])
        record["attempts"] = list(sandbox.ATTEMPTS)
        send(record)
        if record.get("error", {}).get("ename") == "CellTimeout" and threading.active_count() > 1:
            os._exit(4)  # a thread of the check still runs the student's loop: the parent starts a fresh worker
    send({"event": "end", "attempts": list(sandbox.ATTEMPTS)})


def _close_figures() -> None:
    plt = sys.modules.get("matplotlib.pyplot")
    if plt is not None:
        plt.close("all")
