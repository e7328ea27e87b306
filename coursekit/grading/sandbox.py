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

__all__ = ["SandboxError", "enter", "install_audit_hook", "needed_paths", "ATTEMPTS"]

_CLONE_NEWNS, _CLONE_NEWUSER, _CLONE_NEWPID, _CLONE_NEWNET = 0x20000, 0x10000000, 0x20000000, 0x40000000
_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_BIND, _MS_REC, _MS_PRIVATE = 1, 2, 4, 0x1000, 0x4000, 1 << 18
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


def needed_paths(extra: list[Path] = ()) -> list[Path]:
    """The folders a worker must read: Python, its libraries, the course, torch's weights cache.

    ``sys.prefix``/``sys.base_prefix``, every existing ``sys.path`` entry, coursekit's package folder,
    ``torch.hub.get_dir()`` and ``extra`` (the course root), as resolved paths, innermost last.
    """
    import torch

    coursekit_dir = Path(__file__).resolve().parents[1]
    found = [Path(sys.prefix), Path(sys.base_prefix), coursekit_dir.parent, Path(torch.hub.get_dir()), *extra]
    found += [Path(p) for p in sys.path if p and os.path.isdir(p)]
    found += [Path(os.path.realpath(sys.executable)).parent]
    return sorted({p.resolve() for p in found if p.exists()}, key=lambda p: len(p.parts))


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def _mask(libc, folder: str, keep: list[Path], writable: bool, size: str) -> None:
    """Mount an empty tmpfs over ``folder`` and bind the ``keep`` folders inside it back, read-only."""
    inner = [p for p in keep if _inside(p, Path(folder))]
    inner = [p for p in inner if not any(q != p and _inside(p, q) for q in inner)]  # outermost only
    fds = [(p, os.open(p, os.O_PATH | os.O_DIRECTORY)) for p in inner]
    _ok(libc.mount(b"tmpfs", folder.encode(), b"tmpfs", _MS_NOSUID | _MS_NODEV, f"size={size},mode=1777".encode()), f"private {folder}")
    for path, fd in fds:
        path.mkdir(parents=True, exist_ok=True)
        _ok(libc.mount(f"/proc/self/fd/{fd}".encode(), str(path).encode(), None, _MS_BIND | _MS_REC, None),
            f"keep {path} visible")
        attr = _MountAttr(_MOUNT_ATTR_RDONLY, 0, 0, 0)
        _ok(libc.syscall(_SYS_MOUNT_SETATTR, _AT_FDCWD, str(path).encode(), _AT_RECURSIVE, ctypes.byref(attr),
                         ctypes.sizeof(attr)), f"read-only {path}")
        os.close(fd)
    if not writable:
        attr = _MountAttr(_MOUNT_ATTR_RDONLY, 0, 0, 0)
        _ok(libc.syscall(_SYS_MOUNT_SETATTR, _AT_FDCWD, folder.encode(), 0, ctypes.byref(attr), ctypes.sizeof(attr)),
            f"read-only {folder}")


def _private_homes() -> list[str]:
    homes = {str(Path.home()), "/root", "/home", os.environ.get("HOME", "/root")}
    return sorted(h for h in homes if h and os.path.isdir(h) and h != "/")


def enter(workdir_name: str, hide: list[Path], keep: list[Path] = ()) -> Path:
    """Enter the namespace sandbox and return the (empty, writable) working folder.

    Must be called in a single-threaded process (a freshly forked child). The calling process
    becomes a supervisor that waits for a forked grandchild and exits with its status; only the
    grandchild returns from this function. ``keep`` (see :func:`needed_paths`) stays readable even
    where it lies under a masked folder (``/tmp``, the home folders).

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
    keep = [Path(p).resolve() for p in keep]
    hidden = sorted({p.resolve() for p in hide}, key=lambda p: len(p.parts))
    for folder in hidden:
        if folder.is_dir():
            _ok(libc.mount(b"tmpfs", str(folder).encode(), b"tmpfs", _MS_NOSUID | _MS_NODEV | _MS_RDONLY, b"size=4k"),
                "hide a folder")
    for tmp, size in (("/tmp", "512m"), ("/dev/shm", "256m")):
        if os.path.isdir(tmp):
            _mask(libc, tmp, keep, writable=True, size=size)
    for home in _private_homes():  # the instructor's dotfiles and keys; Python or the course may live there
        if not any(_inside(Path(home), k) for k in keep):
            _mask(libc, home, keep, writable=False, size="64k")
    for secret in ("/etc/passwd", "/etc/shadow", "/etc/group", "/etc/gshadow"):
        if os.path.isfile(secret):
            _ok(libc.mount(b"/dev/null", secret.encode(), None, _MS_BIND, None), f"hide {secret}")
    attr = _MountAttr(_MOUNT_ATTR_RDONLY, 0, 0, 0)
    _ok(libc.syscall(_SYS_MOUNT_SETATTR, _AT_FDCWD, b"/", _AT_RECURSIVE, ctypes.byref(attr), ctypes.sizeof(attr)),
        "read-only mounts")
    for tmp in ("/tmp", "/dev/shm"):  # writable again, their bound folders stay read-only
        if os.path.isdir(tmp):
            clear = _MountAttr(0, _MOUNT_ATTR_RDONLY, 0, 0)
            _ok(libc.syscall(_SYS_MOUNT_SETATTR, _AT_FDCWD, tmp.encode(), 0, ctypes.byref(clear), ctypes.sizeof(clear)),
                f"writable {tmp}")
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
