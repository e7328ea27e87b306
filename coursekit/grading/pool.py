"""The parent side of grading: fork up to ``jobs`` workers, watch their pipes, enforce the time limits.

Each submission gets its own worker process (:func:`coursekit.grading.runner.run_worker`). The
parent reads the worker's JSON lines; a cell that has not reported ``timeout + GRACE`` seconds
after it started is lost (the worker is killed), and so is a cell during which the worker died.
A lost cell scores 0 (for a check cell: that exercise only) and a fresh worker replays the earlier
cells and continues after it. Results come only from the pipe of the submission's own worker.
"""

from __future__ import annotations

import json
import os
import selectors
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

from .judge import run_judge
from .runner import Job, keep_only, run_worker

__all__ = ["CellResult", "Outcome", "ProcessLimit", "probe_sandbox", "run_all"]

GRACE = 10  # seconds after the cell limit before the parent kills a worker that ignores the interrupt
MAX_RESTARTS = 8
MAX_LINE = 16 * 2**20  # bytes of one record; a worker that sends more without a newline is killed


@dataclass
class CellResult:
    outputs: list = field(default_factory=list)
    check: dict | None = None
    lost: str | None = None  # "timeout", "died" or "output"
    limit: str | None = None  # "memory", "processes" or "output": a limit of the worker the cell ran into
    signal: str | None = None  # how the process died, when it did (e.g. "SIGSEGV")


@dataclass
class Outcome:
    cells: dict[int, CellResult] = field(default_factory=dict)
    attempts: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    verdicts: dict[int, dict] = field(default_factory=dict)  # check cell -> the judge's verdict
    finished: bool = False  # every cell was run or given up (False: the run was interrupted first)


class _Worker:
    """One attempt at a job: a judge process and a sandbox process, forked from the grader.

    Pipes: sandbox -> grader (cell records, untrusted), judge -> grader (verdicts), judge <->
    sandbox (calls and their results). Each child keeps only its own ends (:func:`runner.keep_only`).
    """

    def __init__(self, job: Job, start: int, skip: set[int], sandboxed: bool, outcome: Outcome):
        read, write = os.pipe()  # sandbox -> grader
        vread, vwrite = os.pipe()  # judge -> grader
        q_read, q_write = os.pipe()  # judge -> sandbox
        r_read, r_write = os.pipe()  # sandbox -> judge
        self.judge_pid = os.fork()
        if self.judge_pid == 0:
            try:
                to_sandbox, from_sandbox, to_grader = keep_only([q_write, r_read, vwrite])
                run_judge(job, to_sandbox, from_sandbox, to_grader)
            finally:
                os._exit(3)
        self.pid = os.fork()
        if self.pid == 0:  # the sandbox
            run_worker(job, (write, r_write, q_read), start, skip, sandboxed)
        for fd in (write, vwrite, q_read, q_write, r_read, r_write):
            os.close(fd)
        self.fd, self.vfd, self.job, self.outcome, self.buffer, self.vbuffer = read, vread, job, outcome, b"", b""
        self.current: int | None = None
        self.last_done: int | None = None
        self.eof = self.veof = False
        replayed = sum(1 for i, (gid, _) in enumerate(job.cells[:start]) if gid is None and i not in skip)
        self.deadline = time.monotonic() + job.timeout * (replayed + 1) + GRACE  # always one: never wait unbounded
        # and for the whole attempt: every cell at its limit, whatever the sandbox reports
        self.hard_deadline = time.monotonic() + (job.timeout + GRACE) * (len(job.cells) + 1)
        self.last_started = start - 1
        self.ended = False
        self.crash: str | None = None
        self.overflow = False

    def feed(self, data: bytes) -> None:
        self.buffer += data
        *lines, self.buffer = self.buffer.split(b"\n")
        if len(self.buffer) > MAX_LINE:
            self.overflow, self.buffer = True, b""
        for line in lines:
            try:
                record = json.loads(line)
            except ValueError:
                continue  # not a record of ours (a student's write to the pipe cannot be one either)
            self.handle(record)

    def feed_verdict(self, data: bytes) -> None:
        """The judge's records: the only source of points."""
        self.vbuffer += data
        *lines, self.vbuffer = self.vbuffer.split(b"\n")
        for line in lines:
            record = json.loads(line)
            if record.get("event") == "verdict":
                self.outcome.verdicts[record["i"]] = record
            elif record.get("event") == "judge_crash":
                self.outcome.notes.append(f"the grader's judge failed ({record.get('error')}); review by hand")

    def handle(self, record: dict) -> None:
        if not isinstance(record, dict):
            return
        event = record.get("event")
        if event == "start" and isinstance(record.get("i"), int) and record["i"] > self.last_started:
            # each cell index starts once, in order: a sandbox cannot push its deadline back by repeating it
            self.current = self.last_started = record["i"]
            self.deadline = min(time.monotonic() + self.job.timeout + GRACE, self.hard_deadline)
        elif event == "done" and record.get("i") == self.current:
            outputs = record.get("outputs") if isinstance(record.get("outputs"), list) else []
            cell = CellResult(outputs)
            last = outputs[-1] if outputs and isinstance(outputs[-1], dict) else {}
            if last.get("ename") == "CellTimeout":
                cell.lost = "timeout"
            limit = last.get("limit") if last.get("output_type") == "error" else record.get("limit")
            cell.limit = limit if limit in ("memory", "processes", "output") else None
            self.outcome.cells[self.current] = cell
            self.outcome.attempts = record.get("attempts", self.outcome.attempts)
            self.last_done, self.current = self.current, None
            self.deadline = min(time.monotonic() + self.job.timeout + GRACE, self.hard_deadline)
        elif event == "end":
            self.outcome.attempts = record.get("attempts", self.outcome.attempts)
            self.ended = True
        elif event == "crash":
            self.crash = str(record.get("error", ""))[:300]

    def kill(self) -> None:
        """SIGKILL the sandbox's process group (without namespaces, what it forked), the sandbox and the judge."""
        for kill, target in ((os.killpg, self.pid), (os.kill, self.pid), (os.kill, self.judge_pid)):
            try:
                kill(target, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


def _fork_probe() -> bool:
    from . import sandbox

    pid = os.fork()
    if pid == 0:
        try:
            devnull = os.open(os.devnull, os.O_RDWR)
            os.dup2(devnull, 1)
            os.dup2(devnull, 2)
            sandbox.enter("probe", [])
        except BaseException:  # noqa: BLE001 -- any failure means: no namespaces on this machine
            os._exit(1)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    return os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0


def probe_sandbox() -> bool:
    """Whether this machine lets an unprivileged process build the namespace sandbox."""
    return _fork_probe()


class ProcessLimit:
    """A pids cgroup per worker where this process may create one (root, or a delegated cgroup v2 tree)."""

    def __init__(self, processes: int):
        self.processes, self.root, self.made = processes, self._find_root(), []

    @staticmethod
    def _find_root() -> Path | None:
        for base in (Path("/sys/fs/cgroup/pids"), Path("/sys/fs/cgroup")):
            if (base / "cgroup.procs").exists() and os.access(base, os.W_OK) and \
                    ((base / "pids.max").exists() or base.name == "pids" or (base / "cgroup.subtree_control").exists()):
                return base
        return None

    def make(self, name: str) -> Path | None:
        """A fresh cgroup for one worker with ``pids.max`` set, or None when the machine does not allow it."""
        if self.root is None:
            return None
        folder = self.root / f"coursekit-grade-{os.getpid()}-{len(self.made)}-{name}"[:200]
        try:
            folder.mkdir()
            (folder / "pids.max").write_text(str(self.processes))
        except OSError:
            self.root = None  # e.g. cgroup v2 without the pids controller delegated: RLIMIT_NPROC instead
            return None
        self.made.append(folder)
        return folder

    def release(self, folder: Path | None) -> None:
        if folder is not None:
            try:
                folder.rmdir()
            except OSError:
                pass  # still busy for a moment; removed in close()

    def close(self) -> None:
        """Remove every cgroup made; a killed worker's last process may take a moment to leave."""
        for folder in self.made:
            for _ in range(20):
                try:
                    folder.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.05)  # still busy: a process of it is exiting


def run_all(jobs: list[Job], workers: int, sandboxed: bool, echo=None,
            outcomes: dict[str, Outcome] | None = None) -> dict[str, Outcome]:
    """Grade every job with at most ``workers`` processes at a time; ``{student: Outcome}``.

    ``echo(done, total, student, outcome)`` is called as each student finishes. Pass ``outcomes``
    (a dict, filled in place) to keep the finished students' results (``Outcome.finished``) when
    the run is interrupted.
    """
    pending = list(jobs)
    state = {job.student: {"start": 0, "skip": set(), "restarts": 0} for job in jobs}
    outcomes = {} if outcomes is None else outcomes
    outcomes.update({job.student: Outcome() for job in jobs})
    running: dict[int, _Worker] = {}
    limits = ProcessLimit(jobs[0].processes if jobs else 32)
    sel = selectors.DefaultSelector()
    done = 0
    try:
        while pending or running:
            while pending and len(running) < workers:
                job = pending.pop(0)
                _start_worker(job, state[job.student], limits, sandboxed, outcomes[job.student], running, sel)
            _read_ready(sel, running)
            now = time.monotonic()
            for w in list(running.values()):
                overdue = now > w.deadline
                if overdue or w.overflow:
                    w.kill()
                if not (overdue or w.overflow or (w.eof and w.veof)):
                    continue
                status = _reap(w, running, sel, limits)
                outcome = outcomes[w.job.student]
                if _finish(w, overdue, status, state[w.job.student], outcome):
                    pending.insert(0, w.job)
                else:
                    _attach_verdicts(outcome)
                    outcome.finished = True
                    done += 1
                    if echo is not None:
                        echo(done, len(jobs), w.job.student, outcome)
    finally:
        for w in running.values():
            w.kill()
            os.waitpid(w.pid, 0)
            os.waitpid(w.judge_pid, 0)
        sel.close()
        limits.close()
    return outcomes


def _start_worker(job: Job, st: dict, limits: ProcessLimit, sandboxed: bool, outcome: Outcome,
                  running: dict[int, _Worker], sel: selectors.BaseSelector) -> None:
    """Fork a worker (judge and sandbox) for ``job`` from where its last attempt stopped, and watch its two pipes."""
    job.cgroup = limits.make(job.student)
    w = _Worker(job, st["start"], st["skip"], sandboxed, outcome)
    running[w.fd] = w
    sel.register(w.fd, selectors.EVENT_READ, (w, "sandbox"))
    sel.register(w.vfd, selectors.EVENT_READ, (w, "judge"))


def _read_ready(sel: selectors.BaseSelector, running: dict[int, _Worker]) -> None:
    """Feed what the pipes hold to their workers, waiting at most a second (or until the next deadline)."""
    wait = max(0.0, min(w.deadline for w in running.values()) - time.monotonic()) if running else 0.0
    for key, _ in sel.select(timeout=min(wait, 1.0)):
        w, side = key.data
        data = os.read(key.fd, 1 << 16)
        if data:
            (w.feed_verdict if side == "judge" else w.feed)(data)
            continue
        sel.unregister(key.fd)
        if side == "judge":
            w.veof = True
        else:
            w.eof = True


def _reap(w: _Worker, running: dict[int, _Worker], sel: selectors.BaseSelector, limits: ProcessLimit) -> int:
    """Close an ended worker's pipes, kill what it left behind, wait for its processes; its wait status."""
    for fd, ended in ((w.fd, w.eof), (w.vfd, w.veof)):
        if not ended:
            sel.unregister(fd)
        os.close(fd)
    del running[w.fd]
    w.kill()  # whatever the worker left behind in its process group
    _, status = os.waitpid(w.pid, 0)
    os.waitpid(w.judge_pid, 0)
    limits.release(w.job.cgroup)
    return status


def _attach_verdicts(outcome: Outcome) -> None:
    """Put each judge verdict on its check cell, with its text after what the student's code printed."""
    for i, verdict in outcome.verdicts.items():
        cell = outcome.cells.setdefault(i, CellResult())
        cell.check, cell.lost, cell.limit = verdict, None, None
        cell.outputs = [o for o in cell.outputs if not (isinstance(o, dict) and o.get("output_type") == "error")]
        cell.outputs.append({"output_type": "stream", "name": "stdout", "text": str(verdict.get("summary", "")) + "\n"})


def _finish(w: _Worker, overdue: bool, status: int, st: dict, outcome: Outcome) -> bool:
    """Record how a worker ended; True when a fresh worker must continue the job."""
    if w.ended:
        return False
    thread_left = os.WIFEXITED(status) and os.WEXITSTATUS(status) == 4  # timed out, the student's thread still ran
    if w.current is None and thread_left and w.last_done is not None:
        w.current = w.last_done
    if w.current is None:
        if w.crash:
            outcome.notes.append(f"the grader could not run this notebook ({w.crash})")
        elif overdue:
            outcome.notes.append("stopped by the grader: no cell started within the time limit")
        else:
            outcome.notes.append(f"the worker ended between cells ({_how(status)}); the remaining cells were not run")
        return False
    lost = "output" if w.overflow else "timeout" if overdue or thread_left else "died"
    cell = outcome.cells.setdefault(w.current, CellResult())
    cell.lost = lost
    if lost == "died":
        cell.signal = _how(status)
    st["skip"].add(w.current)
    st["start"] = w.current + 1
    st["restarts"] += 1
    if st["restarts"] > MAX_RESTARTS:
        outcome.notes.append(f"gave up after {MAX_RESTARTS} lost cells; the remaining cells were not run")
        return False
    return st["start"] < len(w.job.cells)


def _how(status: int) -> str:
    """A worker's end in words: "exit status 3", "signal SIGSEGV"."""
    if os.WIFSIGNALED(status):
        try:
            return f"signal {signal.Signals(os.WTERMSIG(status)).name}"
        except ValueError:
            return f"signal {os.WTERMSIG(status)}"
    code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else status
    if code > 128:  # the sandbox's supervisor passes a signal on as 128 + its number
        try:
            return f"signal {signal.Signals(code - 128).name}"
        except ValueError:
            pass
    return f"exit status {code}"
