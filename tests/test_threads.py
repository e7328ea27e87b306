"""The thread policy of coursekit.threads: environment override, available cores, torch applied."""

import os
import subprocess
import sys

import pytest
import torch

from coursekit import threads


@pytest.mark.parametrize("cores, expected", [(1, 1), (2, 1), (3, 2), (4, 3), (16, 15)])
def test_default_threads_leaves_one_core_above_two(cores, expected):
    assert threads.default_threads(cores) == expected


@pytest.mark.parametrize("bad, error", [(0, ValueError), (-3, ValueError), (2.0, TypeError),
                                        ("4", TypeError), (True, TypeError)])
def test_default_threads_rejects_bad_core_counts(bad, error):
    with pytest.raises(error, match="cores"):
        threads.default_threads(bad)


def test_env_var_overrides_the_policy():
    assert threads.choose_threads({"COURSEKIT_THREADS": "3"}, cores=2) == 3
    assert threads.choose_threads({"COURSEKIT_THREADS": " 1 "}, cores=16) == 1
    # the override wins over OMP_NUM_THREADS too
    assert threads.choose_threads({"COURSEKIT_THREADS": "2", "OMP_NUM_THREADS": "8"}, cores=16) == 2


@pytest.mark.parametrize("value", ["auto", "AUTO", ""])
def test_env_var_auto_or_empty_uses_the_cores(value):
    assert threads.choose_threads({"COURSEKIT_THREADS": value}, cores=8) == 7
    assert threads.choose_threads({"COURSEKIT_THREADS": value}, cores=2) == 1


@pytest.mark.parametrize("value", ["0", "-1", "two", "1.5"])
def test_bad_env_var_names_the_value_and_the_fix(value):
    with pytest.raises(ValueError, match=rf"COURSEKIT_THREADS='{value}'.*positive integer"):
        threads.choose_threads({"COURSEKIT_THREADS": value}, cores=4)


@pytest.mark.parametrize("var", ["OMP_NUM_THREADS", "MKL_NUM_THREADS"])
def test_user_set_omp_or_mkl_threads_are_left_alone(var):
    assert threads.choose_threads({var: "4"}, cores=16) is None
    assert threads.choose_threads({var: "4", "COURSEKIT_THREADS": "auto"}, cores=16) == 15


def test_available_cores_follows_affinity(monkeypatch):
    monkeypatch.setattr(threads, "cpu_quota", lambda: None)  # this test is about the CPU list
    if hasattr(os, "sched_getaffinity"):
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 3, 5})
        monkeypatch.setattr(os, "cpu_count", lambda: 64)
        assert threads.available_cores() == 3
        assert threads.choose_threads({}) == 2
    monkeypatch.delattr(os, "sched_getaffinity", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 6)
    assert threads.available_cores() == 6
    monkeypatch.setattr(os, "cpu_count", lambda: None)
    assert threads.available_cores() == 1


def test_apply_sets_torch_and_leaves_it_when_omp_is_set():
    before = torch.get_num_threads()
    try:
        assert threads.apply({"COURSEKIT_THREADS": "1"}) == 1 == torch.get_num_threads()
        torch.set_num_threads(2)
        assert threads.apply({"OMP_NUM_THREADS": "2"}) == 2  # untouched
        assert threads.apply({}, cores=3) == 2
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("env, applied", [
    ({}, True),
    ({"COURSEKIT_THREADS": "1"}, True),
    ({"OPENBLAS_NUM_THREADS": "4"}, False),                       # the user chose BLAS's count
    ({"OMP_NUM_THREADS": "4"}, False),                            # OpenBLAS follows OMP_NUM_THREADS itself
    ({"MKL_NUM_THREADS": "4"}, False),
    ({"OMP_NUM_THREADS": "4", "COURSEKIT_THREADS": "1"}, True),   # COURSEKIT_THREADS wins, as for torch
])
def test_blas_gets_the_policys_count_unless_the_user_chose_one(env, applied):
    before = dict(env)
    assert threads.limit_blas(1, env) is applied
    assert env == ({**before, "OPENBLAS_NUM_THREADS": "1"} if applied else before)


def test_library_threads_limits_every_pool_to_torchs_count_and_restores_it():
    from sklearn.cluster import KMeans  # noqa: F401  (loads scikit-learn's own OpenMP runtime)
    from threadpoolctl import threadpool_info

    def counts():
        return {(i["filepath"], i["num_threads"]) for i in threadpool_info()}

    before = counts()
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(3)  # unlike the pools outside the block (checked next)
    try:
        assert {c for _, c in counts()} != {3}  # scikit-learn's OpenMP and the BLAS differ from torch outside the block
        with threads.library_threads() as n:
            inside = {c for _, c in counts()}
        assert n == 3 and inside == {3}, inside
    finally:
        torch.set_num_threads(torch_threads)
    assert counts() == before


def test_passive_waiting_only_before_torch_and_only_if_unset(monkeypatch):
    env = {}
    monkeypatch.delitem(sys.modules, "torch")
    assert threads.prefer_passive_waiting(env) is True and env == {"OMP_WAIT_POLICY": "PASSIVE"}
    env = {"OMP_WAIT_POLICY": "ACTIVE"}
    assert threads.prefer_passive_waiting(env) is False and env["OMP_WAIT_POLICY"] == "ACTIVE"
    monkeypatch.setitem(sys.modules, "torch", torch)
    env = {}
    assert threads.prefer_passive_waiting(env) is False and env == {}


def _fresh(code, **env):
    environ = {k: v for k, v in os.environ.items()
               if k not in ("COURSEKIT_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY",
                            "OPENBLAS_NUM_THREADS")}
    environ.update(env)
    out = subprocess.run([sys.executable, "-c", code], env=environ, capture_output=True, text=True,
                         timeout=120)
    return out


def test_import_coursekit_applies_the_policy_in_a_fresh_process():
    # numpy's BLAS is loaded before coursekit (numpy comes first), scipy's after it: both get torch's count
    code = ("import numpy, os, coursekit, torch, scipy.linalg; from coursekit import threads; "
            "from threadpoolctl import threadpool_info; "
            "print(torch.get_num_threads(), threads.default_threads(threads.available_cores()), "
            "os.environ.get('OMP_WAIT_POLICY'), "
            "*sorted({i['num_threads'] for i in threadpool_info() if i['user_api'] == 'blas'}))")
    got, expected, policy, *blas = _fresh(code).stdout.split()
    assert got == expected and policy == "PASSIVE"  # coursekit came first: passive waiting set
    assert blas == [expected], blas  # one count for every BLAS loaded (here numpy's and scipy's OpenBLAS)
    if threads.available_cores() >= 2:  # (OpenBLAS caps a count read from the environment at the cores)
        out = _fresh(code, OPENBLAS_NUM_THREADS="2").stdout.split()
        assert out[3:] == ["2"], out  # a BLAS count the user chose stays
    out = _fresh("import torch, coursekit, os; print(torch.get_num_threads(), os.environ.get('OMP_WAIT_POLICY'))",
                 COURSEKIT_THREADS="2")
    assert out.stdout.split() == ["2", "None"]  # torch came first: too late for OMP_WAIT_POLICY
    out = _fresh("import coursekit", COURSEKIT_THREADS="many")
    assert out.returncode != 0 and "COURSEKIT_THREADS='many'" in out.stderr


def _cgroup(tmp_path, files):
    for name, text in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return str(tmp_path)


@pytest.mark.parametrize("files, expected", [
    ({"cpu.max": "200000 100000\n"}, 2.0),              # cgroup v2, --cpus=2 / a pod limit of 2
    ({"cpu.max": "150000 100000\n"}, 1.5),
    ({"cpu.max": "max 100000\n"}, None),                # v2, no limit
    ({"cpu/cpu.cfs_quota_us": "50000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 0.5),  # cgroup v1
    ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),    # v1, no limit
    ({}, None),                                          # no cgroup file system
])
def test_cpu_quota_reads_cgroup_v1_and_v2(tmp_path, files, expected):
    assert threads.cpu_quota(_cgroup(tmp_path, files)) == expected


def test_a_cpu_quota_lowers_the_cores_of_a_big_node(monkeypatch, tmp_path):
    """A JupyterHub pod limited to 2 CPUs on a 64-core node: affinity says 64, the quota 2 -> 1 thread."""
    if not hasattr(os, "sched_getaffinity"):
        pytest.skip("no CPU affinity on this platform")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)))
    root = _cgroup(tmp_path, {"cpu.max": "250000 100000\n"})  # 2.5 CPUs -> 3 cores -> 2 threads
    read_quota = threads.cpu_quota
    monkeypatch.setattr(threads, "cpu_quota", lambda: read_quota(root))
    assert threads.available_cores() == 3
    assert threads.choose_threads({}) == 2
    monkeypatch.setattr(threads, "cpu_quota", lambda: 0.5)  # half a CPU is still one core
    assert threads.available_cores() == 1


def test_thread_count_sets_and_puts_back():
    n = torch.get_num_threads()
    with threads.thread_count(None) as inside:
        assert inside == n
    with threads.thread_count(n + 1) as inside:
        assert inside == torch.get_num_threads() == n + 1
    assert torch.get_num_threads() == n
    with pytest.raises(RuntimeError), threads.thread_count(n + 1):
        raise RuntimeError("put back on error too")
    assert torch.get_num_threads() == n
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="threads"), threads.thread_count(bad):
            pass
