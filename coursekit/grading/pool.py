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

from .runner import Job, run_worker

__all__ = ["CellResult", "Outcome", "probe_sandbox", "run_all"]

GRACE = 10  # seconds after the cell limit before the parent kills a worker that ignores the interrupt
MAX_RESTARTS = 8


@dataclass
class CellResult:
    outputs: list = field(default_factory=list)
    check: dict | None = None
    lost: str | None = None  # "timeout" or "died"


@dataclass
class Outcome:
    cells: dict[int, CellResult] = field(default_factory=dict)
    attempts: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


class _Worker:
    def __init__(self, job: Job, start: int, skip: set[int], sandboxed: bool, outcome: Outcome):
        read, write = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:  # the worker
            os.close(read)
            run_worker(job, write, start, skip, sandboxed)
        os.close(write)
        self.fd, self.job, self.outcome, self.buffer = read, job, outcome, b""
        self.current: int | None = None
        self.last_done: int | None = None
        self.eof = False
        self.deadline = None
        self.ended = False
        self.crash: str | None = None

    def feed(self, data: bytes) -> None:
        self.buffer += data
        *lines, self.buffer = self.buffer.split(b"\n")
        for line in lines:
            try:
                record = json.loads(line)
            except ValueError:
                continue  # not a record of ours (a student's write to the pipe cannot be one either)
            self.handle(record)

    def handle(self, record: dict) -> None:
        event = record.get("event")
        if event == "start" and isinstance(record.get("i"), int):
            self.current = record["i"]
            self.deadline = time.monotonic() + self.job.timeout + GRACE
        elif event == "done" and record.get("i") == self.current:
            self.outcome.cells[self.current] = CellResult(record.get("outputs", []), record.get("check"))
            self.outcome.attempts = record.get("attempts", self.outcome.attempts)
            if record.get("outputs") and record["outputs"][-1].get("ename") == "CellTimeout":
                self.outcome.cells[self.current].lost = "timeout"
            self.last_done, self.current, self.deadline = self.current, None, None
        elif event == "end":
            self.outcome.attempts = record.get("attempts", self.outcome.attempts)
            self.ended = True
        elif event == "crash":
            self.crash = str(record.get("error", ""))[:300]

    def kill(self) -> None:
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
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


def run_all(jobs: list[Job], workers: int, sandboxed: bool, echo=None) -> dict[str, Outcome]:
    """Grade every job with at most ``workers`` processes at a time; ``{student: Outcome}``."""
    pending = list(jobs)
    state = {job.student: {"start": 0, "skip": set(), "restarts": 0} for job in jobs}
    outcomes = {job.student: Outcome() for job in jobs}
    running: dict[int, _Worker] = {}
    sel = selectors.DefaultSelector()
    done = 0
    while pending or running:
        while pending and len(running) < workers:
            job = pending.pop(0)
            st = state[job.student]
            w = _Worker(job, st["start"], st["skip"], sandboxed, outcomes[job.student])
            running[w.fd] = w
            sel.register(w.fd, selectors.EVENT_READ, w)
        now = time.monotonic()
        deadlines = [w.deadline for w in running.values() if w.deadline is not None]
        wait = max(0.0, min(deadlines) - now) if deadlines else 1.0
        for key, _ in sel.select(timeout=min(wait, 1.0)):
            w = key.data
            data = os.read(w.fd, 1 << 16)
            if data:
                w.feed(data)
            else:
                w.eof = True
        now = time.monotonic()
        for w in list(running.values()):
            overdue = w.deadline is not None and now > w.deadline
            if overdue:
                w.kill()
            if not (overdue or w.eof):
                continue
            sel.unregister(w.fd)
            os.close(w.fd)
            del running[w.fd]
            _, status = os.waitpid(w.pid, 0)
            if _finish(w, overdue, status, state[w.job.student], outcomes[w.job.student]):
                pending.insert(0, w.job)
            else:
                done += 1
                if echo is not None:
                    echo(done, len(jobs))
    sel.close()
    return outcomes


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
        return False
    lost = "timeout" if overdue or thread_left else "died"
    if w.current not in outcome.cells:
        outcome.cells[w.current] = CellResult(lost=lost)
    else:
        outcome.cells[w.current].lost = lost
    st["skip"].add(w.current)
    st["start"] = w.current + 1
    st["restarts"] += 1
    if st["restarts"] > MAX_RESTARTS:
        outcome.notes.append(f"gave up after {MAX_RESTARTS} lost cells; the remaining cells were not run")
        return False
    return st["start"] < len(w.job.cells)
