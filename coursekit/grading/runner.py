"""Run one submission's cells in a forked, sandboxed worker and report each cell on a pipe.

The worker is a child of the grading process (``os.fork``), so torch, coursekit and the checks
are already imported and their caches warm. It keeps only its own pipes (:func:`keep_only`),
takes its limits (memory, processes, file size), enters the sandbox (:mod:`.sandbox`), runs the
cells in order in one namespace and writes one JSON line per cell to the grader: the outputs
(stdout, stderr, the value of the last expression, the error). These records carry no points.
At a check cell it serves the judge (:mod:`.judge`, :class:`_Server`): it calls the student's
function on the judge's cases and sends back plain data; the judge computes the verdict. Output
on stderr is shown in the feedback and never costs points.

A cell that runs past the time limit is interrupted (``CellTimeout``); a worker that does not
come back, or dies (``os._exit``, a crash), is killed by the grader, which starts a fresh worker
that replays the earlier non-check cells silently and carries on after the lost cell.
"""

from __future__ import annotations

import ast
import errno
import fcntl
import hashlib
import json
import os
import resource
import signal
import sys
import tempfile
import threading
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from . import sandbox, wire
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


class _Server:
    """The sandbox's side of a check: announce it to the judge, then run the calls it asks for.

    Nothing here decides points: the judge (:mod:`.judge`) draws the cases and computes the
    verdict; this only calls the student's function and sends back plain data (:mod:`.wire`).
    """

    def __init__(self, to_judge: int, from_judge: int):
        from coursekit.checks import integrity, local_call

        self.out, self.inp = to_judge, from_judge
        self.restore, self.local_call = integrity.restore, local_call

    def send(self, header: dict, value=None) -> None:
        wire.write_frame(self.out, wire.encode(header, value))

    def run(self, i: int, check: CheckCell, ns: dict) -> None:
        import cloudpickle

        patched = self.restore()
        self.send({"check": i, "defined": check.function in ns, "patched": [p[:100] for p in patched[:50]]})
        try:
            while True:
                message = cloudpickle.loads(wire.read_frame(self.inp, limit=None))  # from the judge: trusted
                if message.get("i") != i:
                    continue  # left over from a check that was stopped
                if message.get("op") == "end":
                    return
                if message.get("op") == "call":
                    self.answer(i, ns.get(message["name"]), message)
        except BaseException:
            self.send({"i": i, "abort": "the sandbox stopped this check"})
            raise

    def answer(self, i: int, fn, message: dict) -> None:
        args, kwargs = message["args"], message["kwargs"]
        objects = wire.leaves((args, kwargs))
        before = [_state_before(o) for o in objects]
        outcome = self.local_call(fn, args, kwargs, tuple(message["forbid"]))
        if outcome.error is not None:
            self.send({"i": i, "error": outcome.error, "message": outcome.message[:2000]})
            return
        try:
            states = [_state_after(o, b) for o, b in zip(objects, before)]
            payload = wire.encode({"i": i, "value": None, "patched": outcome.patched, "states": states}, outcome.value)
        except wire.WireError as err:
            self.send({"i": i, "error": "too_large", "message": f"your function's result could not be sent: {err}"})
            return
        wire.write_frame(self.out, payload)


def _state_before(obj):
    import torch

    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    return [t.detach().clone() for t in list(obj.parameters()) + list(obj.buffers())]


def _state_after(obj, before) -> dict:
    """What a call left of one argument: values that changed, requires_grad, grads, modes, hooks."""
    import torch

    from coursekit.guard import hook_dicts

    if isinstance(obj, torch.Tensor):
        state = {"kind": "tensor", "requires_grad": bool(obj.requires_grad),
                 "grad": obj.grad.detach() if obj.grad is not None else None}
        if obj.shape != before.shape or not torch.equal(obj.detach(), before):
            state["values"] = obj.detach()
        return state
    modules = [m for _, m in obj.named_modules()]
    params = list(obj.parameters())
    tensors = params + list(obj.buffers())
    return {"kind": "module", "training": [m.training for m in modules], "requires_grad": [p.requires_grad for p in params],
            "grads": {str(k): p.grad.detach() for k, p in enumerate(params) if p.grad is not None},
            "changed": {str(k): t.detach() for k, (t, b) in enumerate(zip(tensors, before))
                        if t.shape != b.shape or not torch.equal(t.detach(), b)},
            "inplace": [m.inplace for m in modules if isinstance(getattr(m, "inplace", None), bool)],
            "hooks": [sum(len(d) for d in hook_dicts(m)) for m in modules]}


def _alarm(signum, frame):
    raise CellTimeout()


CHANNEL = 3  # the sandbox's descriptors besides 0, 1, 2 (/dev/null): 3 to the grader, 4 to and 5 from the judge


def keep_only(fds: list[int]) -> list[int]:
    """Move ``fds`` to 3, 4, ... (in order) and close every other inherited descriptor above 2.

    The grader's epoll instance, the other workers' pipe ends, open files: none survives the fork.
    """
    limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    high = [fcntl.fcntl(fd, fcntl.F_DUPFD, limit // 2) for fd in fds]  # out of the way of the targets below
    for k, fd in enumerate(high):
        os.dup2(fd, CHANNEL + k)
    os.closerange(CHANNEL + len(fds), limit)
    return [CHANNEL + k for k in range(len(fds))]


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


def run_worker(job: Job, fds: tuple[int, int, int], start: int, skip: set[int], sandboxed: bool) -> None:
    """The body of a sandbox process: never returns (``os._exit``).

    ``fds``: the pipe to the grader, the pipe to the judge, the pipe from the judge.
    """
    code = 0
    fd = fds[0]
    try:
        os.setsid()  # its own process group: kill(0, ...) from the student's code reaches no one else
        fd, to_judge, from_judge = keep_only(list(fds))
        devnull = os.open(os.devnull, os.O_RDWR)
        os.dup2(devnull, 0)
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        os.close(devnull)
        checker = _Server(to_judge, from_judge)
        _forget_command_line()
        _set_limits(job)
        if sandboxed:
            work = sandbox.enter(f"{job.student}", job.hide, job.keep)
            writable = [work, Path("/tmp"), Path("/dev/shm")]
        else:
            job.private_tmp.mkdir(parents=True, exist_ok=True)  # a fresh folder for every attempt (restarts too)
            work = Path(tempfile.mkdtemp(prefix=f"{job.student}-", dir=job.private_tmp))
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


def _run_cells(job: Job, fd: int, start: int, skip: set[int], checker: _Server) -> None:
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
                checker.run(i, job.checks[gid], ns)
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
