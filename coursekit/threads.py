"""How many CPU threads torch uses in the course: a policy that survives a shared machine.

``import coursekit`` calls :func:`apply` once (and imports this module before anything imports torch). The rule, in order:

1. ``COURSEKIT_THREADS=<n>`` (a positive integer) sets torch's intra-op thread count to ``n``;
   ``COURSEKIT_THREADS=auto`` (or unset) uses the rule in 3.
2. Otherwise, when ``OMP_NUM_THREADS`` or ``MKL_NUM_THREADS`` is set, torch has already read it at
   import and coursekit leaves the count alone: you chose it.
3. Otherwise the count is :func:`default_threads` of the cores this process may run on
   (``os.sched_getaffinity(0)`` where it exists: a container's or ``taskset``'s limit, else
   ``os.cpu_count()``; lowered to the container's CPU quota, e.g. a JupyterHub pod limited to 2 CPUs
   on a 64-core node): **1 thread on one or two cores, one fewer than the cores above that.**

numpy's and scipy's BLAS get the same count (:func:`limit_blas`), and coursekit's calls into
scikit-learn run with all its thread pools at it (:func:`library_threads`).

Why. PyTorch's CPU kernels run on OpenMP threads that *spin* (busy-wait) between parallel
regions. When every core has a thread of ours and another process takes one core, the threads
that wait for the descheduled one burn the remaining cores, and a forward+backward pass becomes
several times slower instead of at most twice as slow. Measured for this module (EfficientNet-Lite0
forward+backward at 224 px, on a 2-core machine that other jobs already loaded to a load average of
5-9; see the README's "Speed" paragraph): 2 threads took 2064 ms per batch-1 step against 139 ms
for 1 thread, and 5071 ms against 1050 ms at batch 8. Leaving one core free costs at most the
parallel speed-up of that core when the machine is idle, and keeps the loss bounded when it is not:
notebook 03 run whole took 61 s with this policy and 104 s with one extra CPU-bound process (1.7x),
against 44 s and 323 s (7.3x) with 2 threads (same machine, load average 2.4-3.2 from other work).

Also, when ``import coursekit`` comes *before* ``import torch``, ``OMP_WAIT_POLICY=PASSIVE`` is set
(unless already set), so that waiting OpenMP threads sleep instead of spinning: with it, 2 threads
at batch 1 took 141 ms in the same run. The OpenMP runtime reads the variable only when torch loads
it, so setting it later has no effect; the lecture notebooks import torch first and rely on the
thread count alone.

References
----------
OpenMP Architecture Review Board, *OpenMP Application Programming Interface 4.5* (2015),
section 4.7, ``OMP_WAIT_POLICY``.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
from collections.abc import Iterator, Mapping

ENV_VAR = "COURSEKIT_THREADS"
# variables torch reads itself at import; when one is set, the user has chosen the count
RESPECTED_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def cpu_quota(root: str = "/sys/fs/cgroup") -> float | None:
    """The CPU time this process's cgroup may use, in cores, or None when it is not limited.

    Kubernetes (and so most JupyterHub deployments) and ``docker --cpus`` limit a container with a
    CFS quota, not with a CPU list: ``sched_getaffinity`` still reports every core of the node,
    and a thread per core would be throttled. Reads cgroup v2's ``cpu.max`` ("max 100000" or
    "200000 100000") or cgroup v1's ``cpu/cpu.cfs_quota_us`` / ``cpu.cfs_period_us``.

    Parameters
    ----------
    root : str
        Where the cgroup file system is mounted.
    """
    def read(*parts):
        try:
            with open(os.path.join(root, *parts)) as f:
                return f.read().split()
        except OSError:  # no such file: not this cgroup version, or no cgroups at all
            return None

    v2 = read("cpu.max")
    if v2 and len(v2) == 2 and v2[0] != "max":
        quota, period = float(v2[0]), float(v2[1])
    else:
        q, p = read("cpu", "cpu.cfs_quota_us"), read("cpu", "cpu.cfs_period_us")
        if not q or not p or float(q[0]) <= 0:
            return None
        quota, period = float(q[0]), float(p[0])
    return quota / period if period > 0 else None


def available_cores() -> int:
    """The number of CPU cores this process may run on.

    Returns
    -------
    int
        ``len(os.sched_getaffinity(0))`` where the platform has it (Linux: respects ``taskset``,
        cgroup cpusets, a container's CPU list), else ``os.cpu_count()``, and 1 if neither knows;
        lowered to :func:`cpu_quota` rounded up when the cgroup has a CPU quota.
    """
    if hasattr(os, "sched_getaffinity"):
        cores = max(1, len(os.sched_getaffinity(0)))
    else:
        cores = max(1, os.cpu_count() or 1)
    quota = cpu_quota()
    if quota is not None:
        cores = min(cores, max(1, math.ceil(quota)))
    return cores


def default_threads(cores: int) -> int:
    """The thread count for ``cores`` available cores: 1 up to two cores, ``cores - 1`` above.

    Parameters
    ----------
    cores : int
        Cores available to the process (>= 1).

    Returns
    -------
    int
        The intra-op thread count: one core is left to everything else on the machine.
    """
    if isinstance(cores, bool) or not isinstance(cores, int):
        raise TypeError(f"cores must be an int, got {cores!r} ({type(cores).__name__})")
    if cores < 1:
        raise ValueError(f"cores must be >= 1, got {cores}")
    return 1 if cores <= 2 else cores - 1


def choose_threads(environ: Mapping[str, str] | None = None, cores: int | None = None) -> int | None:
    """The thread count the policy picks, or None when it should leave torch's count alone.

    Parameters
    ----------
    environ : mapping, optional
        The environment to read (default ``os.environ``).
    cores : int, optional
        Available cores (default :func:`available_cores`).

    Returns
    -------
    int or None
        ``COURSEKIT_THREADS`` when it is a positive integer; None when ``OMP_NUM_THREADS`` or
        ``MKL_NUM_THREADS`` is set (and ``COURSEKIT_THREADS`` is not); else
        ``default_threads(cores)``.

    Raises
    ------
    ValueError
        If ``COURSEKIT_THREADS`` is neither a positive integer nor ``auto``.
    """
    environ = os.environ if environ is None else environ
    wanted = environ.get(ENV_VAR, "").strip()
    if wanted and wanted.lower() != "auto":
        try:
            n = int(wanted)
        except ValueError:
            n = 0
        if n < 1:
            raise ValueError(
                f"{ENV_VAR}={wanted!r} is not a thread count: set it to a positive integer "
                f"(e.g. {ENV_VAR}=1), to 'auto', or unset it"
            )
        return n
    if not wanted and any(environ.get(var, "").strip() for var in RESPECTED_VARS):
        return None
    return default_threads(available_cores() if cores is None else cores)


def prefer_passive_waiting(environ: dict | None = None) -> bool:
    """Set ``OMP_WAIT_POLICY=PASSIVE`` if torch is not imported yet and the variable is unset.

    Returns
    -------
    bool
        True if the variable was set here (it then takes effect when torch loads OpenMP).
    """
    environ = os.environ if environ is None else environ
    if "torch" in sys.modules or "OMP_WAIT_POLICY" in environ:
        return False
    environ["OMP_WAIT_POLICY"] = "PASSIVE"
    return True


def apply(environ: Mapping[str, str] | None = None, cores: int | None = None) -> int:
    """Apply the policy to torch, and to numpy's and scipy's BLAS (:func:`limit_blas`); called by ``import coursekit``.

    Parameters
    ----------
    environ, cores
        As in :func:`choose_threads`.

    Returns
    -------
    int
        torch's intra-op thread count afterwards.
    """
    import torch

    n = choose_threads(environ, cores)
    if n is not None and torch.get_num_threads() != n:
        torch.set_num_threads(n)
    if n is not None:
        limit_blas(n, environ)
    return torch.get_num_threads()


def limit_blas(n: int, environ: dict | None = None) -> bool:
    """Give numpy's and scipy's BLAS (OpenBLAS, MKL) the same ``n`` threads as torch, unless the user chose a count.

    scikit-learn (lecture 1's ICA, lecture 2's PCA and t-SNE, lecture 4's spectral clustering) computes
    with numpy's and scipy's BLAS, whose thread pools default to one thread per core and spin while
    they wait, as torch's OpenMP threads do. On 2 cores with two other busy processes, lecture 1's
    ICA (30 000 patches of 12x12, 64 components) took 36.9 s of wall clock and 35.9 s of CPU with
    numpy's default 2 threads, against 9.5 s and 7.6 s with 1; on an idle machine 7.5 s (11.7 s of
    CPU) against 7.8 s.

    Libraries already loaded are limited at once (threadpoolctl); ``OPENBLAS_NUM_THREADS`` is set
    for the ones loaded later (scipy's own OpenBLAS) and for child processes. Nothing is changed when
    ``OPENBLAS_NUM_THREADS`` is already set, or ``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS`` without
    ``COURSEKIT_THREADS``.

    Parameters
    ----------
    n : int
        The thread count (torch's, from :func:`choose_threads`).
    environ : dict, optional
        The environment to read and write (default ``os.environ``).

    Returns
    -------
    bool
        True if the limit was applied.
    """
    environ = os.environ if environ is None else environ
    if environ.get("OPENBLAS_NUM_THREADS", "").strip():
        return False
    if not environ.get(ENV_VAR, "").strip() and any(environ.get(var, "").strip() for var in RESPECTED_VARS):
        return False
    environ["OPENBLAS_NUM_THREADS"] = str(n)
    if environ is os.environ:
        from threadpoolctl import threadpool_limits

        threadpool_limits(limits=n, user_api="blas")  # numpy's BLAS, loaded with torch; persists (not a block)
    return True


@contextlib.contextmanager
def library_threads() -> Iterator[int]:
    """Run the block with scikit-learn's, numpy's and scipy's thread pools (BLAS, OpenMP) at torch's thread count.

    scikit-learn loads its own OpenMP runtime when one of its estimators is imported (KMeans,
    t-SNE), after ``import coursekit`` has set the policy, and would use a thread per core;
    coursekit's calls into scikit-learn run inside this block.

    Yields
    ------
    int
        The thread count inside the block.
    """
    import torch
    from threadpoolctl import threadpool_limits

    n = torch.get_num_threads()
    with threadpool_limits(limits=n):
        yield n


@contextlib.contextmanager
def thread_count(n: int | None) -> Iterator[int]:
    """Run the block with torch's intra-op thread count at ``n``, and put the previous count back.

    For a caller who asks a long computation to use more cores than the course's policy gives
    (e.g. ``eps_sweep(..., threads=2)`` on an otherwise idle two-core machine).

    Parameters
    ----------
    n : int or None
        A positive thread count; None leaves the count alone.

    Yields
    ------
    int
        The thread count inside the block.
    """
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise ValueError(f"threads must be a positive int or None, got {n!r}")
    import torch

    previous = torch.get_num_threads()
    if n is not None and n != previous:
        torch.set_num_threads(n)
    try:
        yield torch.get_num_threads()
    finally:
        if n is not None:  # also resets the count new threads start with (worker threads may have set theirs)
            torch.set_num_threads(previous)


# At import, before coursekit's other modules import torch (coursekit/__init__.py imports this first).
prefer_passive_waiting()
