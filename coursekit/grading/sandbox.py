"""The sandbox one submission runs in: Linux namespaces where the kernel allows them, plus an audit hook.

:func:`enter` is called in a freshly forked, single-threaded child process before any student code
runs. With unprivileged user namespaces (most Linux desktops and CI runners) it

* moves the process into new user, mount, PID and network namespaces;
* makes every mount read-only (``mount_setattr`` with ``AT_RECURSIVE``), then mounts private
  ``tmpfs`` folders on ``/tmp`` (where the working folder lives) and ``/dev/shm``;
* hides the folders in ``hide`` (submissions, grading output, the course's solutions, the other
  workers' folders) behind empty read-only ``tmpfs`` mounts;
* forks once more: the student's code runs as PID 1 of the new PID namespace, with its own
  ``/proc``, so it cannot see or signal the grader or the other students' processes, and it dies
  with its parent (``PR_SET_PDEATHSIG``).

Independently of the namespaces, :func:`install_audit_hook` refuses (``PermissionError``) Python-level
writes, deletions and renames outside the working folder and reads of the hidden folders, and
records every refusal, so that the grader can note the attempt. This is the only protection where
namespaces are not available; it does not stop code that makes system calls through ``ctypes``
or a C extension (the static scan flags ``ctypes``).
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from pathlib import Path

__all__ = ["SandboxError", "enter", "install_audit_hook", "ATTEMPTS"]

_CLONE_NEWNS, _CLONE_NEWUSER, _CLONE_NEWPID, _CLONE_NEWNET = 0x20000, 0x10000000, 0x20000000, 0x40000000
_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_REC, _MS_PRIVATE = 1, 2, 4, 0x4000, 1 << 18
_AT_FDCWD, _AT_RECURSIVE, _MOUNT_ATTR_RDONLY = -100, 0x8000, 1
_SYS_MOUNT_SETATTR = 442  # the same number on x86_64 and aarch64 (a "new" syscall)
_PR_SET_PDEATHSIG = 1

ATTEMPTS: list[str] = []  # what the audit hook refused, in order (read by the runner)


class SandboxError(OSError):
    """The kernel refused a step of the namespace sandbox (the caller falls back to the audit hook)."""


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


def _libc():
    return ctypes.CDLL(None, use_errno=True)


def _ok(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise SandboxError(err, f"{what}: {os.strerror(err)}")


def _write(path: str, text: str) -> None:
    with open(path, "w") as fh:
        fh.write(text)


def enter(workdir_name: str, hide: list[Path]) -> Path:
    """Enter the namespace sandbox and return the (empty, writable) working folder.

    Must be called in a single-threaded process (a freshly forked child). The calling process
    becomes a supervisor that waits for a forked grandchild and exits with its status; only the
    grandchild returns from this function.

    Raises
    ------
    SandboxError
        When the kernel does not allow a step (no unprivileged user namespaces, no
        ``mount_setattr``); nothing has been changed in the process's view of the system then
        only if the first step failed, so the caller must not carry on in the same process.
    """
    if not sys.platform.startswith("linux"):
        raise SandboxError(0, "namespaces need Linux")
    libc = _libc()
    uid, gid = os.getuid(), os.getgid()
    _ok(libc.unshare(_CLONE_NEWUSER | _CLONE_NEWNS | _CLONE_NEWPID | _CLONE_NEWNET), "unshare")
    _write("/proc/self/setgroups", "deny")
    _write("/proc/self/uid_map", f"{uid} {uid} 1")
    _write("/proc/self/gid_map", f"{gid} {gid} 1")
    _ok(libc.mount(b"none", b"/", None, _MS_REC | _MS_PRIVATE, None), "private mounts")
    attr = _MountAttr(_MOUNT_ATTR_RDONLY, 0, 0, 0)
    _ok(libc.syscall(_SYS_MOUNT_SETATTR, _AT_FDCWD, b"/", _AT_RECURSIVE, ctypes.byref(attr), ctypes.sizeof(attr)),
        "read-only mounts")
    for folder in sorted({p.resolve() for p in hide}, key=lambda p: len(p.parts)):
        if folder.is_dir():
            _ok(libc.mount(b"tmpfs", str(folder).encode(), b"tmpfs", _MS_NOSUID | _MS_NODEV | _MS_RDONLY, b"size=4k"),
                "hide a folder")
    for tmp, size in (("/tmp", "512m"), ("/dev/shm", "256m")):
        if os.path.isdir(tmp):
            _ok(libc.mount(b"tmpfs", tmp.encode(), b"tmpfs", _MS_NOSUID | _MS_NODEV, f"size={size}".encode()),
                f"private {tmp}")
    child = os.fork()
    if child:  # the supervisor: wait for the student's process and pass its status on
        signal.signal(signal.SIGTERM, lambda *_: os.kill(child, signal.SIGKILL))
        _, status = os.waitpid(child, 0)
        os._exit(os.waitstatus_to_exitcode(status) & 0xFF if os.WIFEXITED(status) else 128 + os.WTERMSIG(status))
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    os.setsid()  # a process group of its own: kill(0, ...) cannot reach the supervisor
    _ok(libc.mount(b"proc", b"/proc", b"proc", _MS_NOSUID | _MS_NODEV, None), "private /proc")
    work = Path("/tmp") / workdir_name
    work.mkdir()
    return work


_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
_CHANGE_EVENTS = {"os.remove", "os.rename", "os.rmdir", "os.mkdir", "shutil.rmtree", "shutil.move", "os.chmod",
                  "os.chown", "os.truncate", "os.link", "os.symlink", "os.utime", "sqlite3.connect"}


def install_audit_hook(writable: list[Path], hidden: list[Path], show) -> None:
    """Refuse Python-level changes outside ``writable`` and any access inside ``hidden``; log each refusal.

    ``writable[0]`` is the worker's own folder, the only place inside ``hidden`` it may use.

    ``show(path)`` turns a path into the text recorded in :data:`ATTEMPTS` (the grader strips its
    own folders from it). Audit hooks cannot be removed once installed (PEP 578).
    """
    allowed = tuple(str(p) for p in writable) + ("/dev/null",)
    own = (str(writable[0]),)  # the worker's own folder (the fallback keeps it inside a hidden one)
    secret = tuple(str(p) for p in hidden)

    def inside(path: str, roots: tuple[str, ...]) -> bool:
        return any(path == r or path.startswith(r.rstrip("/") + "/") for r in roots)

    def refuse(what: str, path: str):
        ATTEMPTS.append(f"{what} {show(path)}")
        raise PermissionError(f"grading sandbox: {what} {show(path)} is not allowed")

    def hook(event: str, args: tuple) -> None:
        if event == "open":
            path, mode, flags = args
            if not isinstance(path, (str, bytes, os.PathLike)):
                return  # an open file descriptor
            path = os.path.abspath(os.fsdecode(path))
            writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                mode is None and isinstance(flags, int) and flags & _WRITE_FLAGS)
            hidden_path = inside(path, secret) and not inside(path, own)
            if writing and (hidden_path or not inside(path, allowed)):
                refuse("writing to", path)
            if hidden_path:
                refuse("reading", path)
        elif event in _CHANGE_EVENTS and args:
            target = args[0]
            if isinstance(target, (str, bytes, os.PathLike)):
                path = os.path.abspath(os.fsdecode(target))
                if not inside(path, allowed) or (inside(path, secret) and not inside(path, own)):
                    refuse(event, path)

    sys.addaudithook(hook)
