"""Do a notebook's checked outputs depend on the CPU? Run them under several kernel sets and thread counts.

Usage (``make stability`` runs it on every notebook nbval checks)::

    .venv/bin/python tests/nbstability.py notebooks/05_adversarial.ipynb [more.ipynb ...]
        [--capabilities default,avx2,avx512] [--threads 1,2] [--configs default/1,avx2/2]
        [--all-outputs] [--jobs 2]

Each notebook is executed in a fresh kernel once per configuration: PyTorch's CPU kernel set
(``ATEN_CPU_CAPABILITY``: ``default`` is the portable, non-vectorised code; ``avx2`` and ``avx512``
are what other x86-64 CPUs pick; an ARM CPU picks its own) times coursekit's thread count
(``COURSEKIT_THREADS``). Capabilities this CPU lacks are left out (torch would silently fall back).
The outputs that nbval compares (every cell of a lecture not tagged ``nbval-ignore-output``, the cells of
other notebooks tagged ``nbval-check-output``; every cell with
``--all-outputs``) are normalised the way nbval sees them (streams joined, pictures and widget views
dropped) and compared with the committed outputs and across configurations. The report lists every
output that moves, with the configurations that printed each version; the exit status is 1 when one
does, so a notebook is safe to commit when this prints "no checked output moves".

Without ``--all-outputs`` a notebook runs only up to its last checked cell (later cells cannot change
what nbval compares). Progress bars are off and explorers static (``COURSEKIT_STATIC=1``), as when a
notebook is executed for commit.
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from nbcompare import _drop_lines, reconcile, tolerance

CHECK_TAG = "nbval-check-output"
SKIP_KEYS = {"image/png", "image/jpeg", "image/svg+xml", "application/vnd.jupyter.widget-view+json"}


def is_checked(cell, lecture: bool) -> bool:
    """Compared by nbval: tagged, or any lecture cell not tagged volatile (tests/conftest.py)."""
    if cell.get("cell_type") != "code":
        return False
    tags = set(cell.get("metadata", {}).get("tags", []))
    return CHECK_TAG in tags or (lecture and not tags & {"nbval-ignore-output", "nbval-skip", "raises-exception"})


def is_lecture(path: Path) -> bool:
    """Lecture notebooks have every cell compared (tests/conftest.py); solutions only their tagged cells."""
    return path.resolve().parent.name == "notebooks"


def normalise(outputs: list[dict]) -> str:
    """One string per cell, as nbval compares it: streams joined per name, pictures and widgets left out."""
    streams: dict[str, str] = {}
    parts: list[str] = []
    for out in outputs:
        kind = out.get("output_type")
        if kind == "stream":
            streams[out["name"]] = streams.get(out["name"], "") + out["text"]
        elif kind in ("execute_result", "display_data"):
            for key, value in sorted(out.get("data", {}).items()):
                if key not in SKIP_KEYS:
                    parts.append(f"[{key}]\n" + (value if isinstance(value, str) else "".join(value)))
        elif kind == "error":
            parts.append(f"[error] {out['ename']}: {out['evalue']}")
    return "".join(f"[{name}]\n{text}" for name, text in sorted(streams.items())) + "\n".join(parts)


def cpu_capabilities() -> list[str]:
    """The ATEN_CPU_CAPABILITY values this CPU can run, from the portable one up."""
    import platform

    if platform.machine().lower() not in ("x86_64", "amd64"):
        return ["default"]  # ARM: torch picks its own SVE/NEON kernels; 'default' is the portable set
    flags = Path("/proc/cpuinfo").read_text().split() if Path("/proc/cpuinfo").exists() else []
    caps = ["default"]
    if "avx2" in flags:
        caps.append("avx2")
    if "avx512f" in flags and "avx512bw" in flags and "avx512vl" in flags and "avx512dq" in flags:
        caps.append("avx512")
    return caps


def run_one(path: Path, checked_only: bool, timeout: int) -> dict:
    """Execute one notebook in this process's environment; return {cell index: normalised output}."""
    import nbformat
    import torch
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    cells = nb.cells
    if checked_only:
        last = max((i for i, c in enumerate(cells) if is_checked(c, is_lecture(path))), default=-1)
        nb.cells = cells[: last + 1]
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3", allow_errors=True,
                            resources={"metadata": {"path": str(path.parent)}})
    start = time.time()
    client.execute()
    return {
        "seconds": round(time.time() - start, 1),
        "capability": torch.backends.cpu.get_cpu_capability(),
        "outputs": {str(i): normalise(c.outputs) for i, c in enumerate(nb.cells) if c.cell_type == "code"},
    }


def run_config(path: Path, capability: str, threads: int, checked_only: bool, timeout: int) -> dict:
    """Run one notebook in a subprocess whose environment (inherited by the kernel) sets the configuration."""
    env = dict(os.environ, ATEN_CPU_CAPABILITY=capability, COURSEKIT_THREADS=str(threads),
               COURSEKIT_STATIC="1", TQDM_DISABLE="1", PYTHONHASHSEED="0")
    # OMP/MKL_NUM_THREADS would override COURSEKIT_THREADS; MPLBACKEND would replace the kernel's inline backend
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "MPLBACKEND"):
        env.pop(var, None)
    cmd = [sys.executable, __file__, "--run-one", str(path), "--timeout", str(timeout)]
    if checked_only:
        cmd.append("--checked-only")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{path} ({capability}, {threads} threads) failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    if capability != "default" and result["capability"].lower() != capability.lower():
        print(f"  note: asked for {capability}, torch ran {result['capability']}", file=sys.stderr)
    return result


def code_hash(path: Path) -> str:
    """A hash of the notebook's code cells: a saved run is reusable only while they are unchanged."""
    import hashlib

    import nbformat

    cells = nbformat.read(path, as_version=4).cells
    return hashlib.sha256("\0".join(c.source for c in cells if c.cell_type == "code").encode()).hexdigest()[:16]


def execute_or_reuse(path: Path, configs: list[tuple[str, int]], args) -> dict[str, dict]:
    """{config name: run}, executing the configurations that have no reusable saved run."""
    digest, mode = code_hash(path), "all" if args.all_outputs else "checked"
    runs, todo = {}, []
    for c, t in configs:
        saved = args.runs / f"{path.stem}__{c}_{t}t.json"
        run = json.loads(saved.read_text()) if args.reuse and saved.exists() else None
        if run and run.get("code") == digest and run.get("mode") in (mode, "all"):
            runs[f"{c}/{t}t"] = run
        else:
            todo.append((c, t, saved))
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        futures = {(c, t, saved): pool.submit(run_config, path, c, t, not args.all_outputs, args.timeout)
                   for c, t, saved in todo}
        for (c, t, saved), f in futures.items():
            run = dict(f.result(), code=digest, mode=mode)
            saved.parent.mkdir(parents=True, exist_ok=True)
            saved.write_text(json.dumps(run))
            runs[f"{c}/{t}t"] = run
    return {f"{c}/{t}t": runs[f"{c}/{t}t"] for c, t in configs}


def compare(path: Path, runs: dict[str, dict], all_outputs: bool) -> list[str]:
    """Lines of report for every compared output that moves (between runs or against the commit)."""
    import nbformat

    cells = nbformat.read(path, as_version=4).cells
    lines = []
    for i, cell in enumerate(cells):
        if cell.cell_type != "code" or not (all_outputs or is_checked(cell, is_lecture(path))):
            continue
        committed = normalise(cell.outputs)
        tol = tolerance(cell.metadata)
        versions: dict[str, list[str]] = {}
        within: list[str] = []
        for name, run in runs.items():
            if str(i) not in run["outputs"]:
                continue
            text = run["outputs"][str(i)]
            if tol is not None and text != committed and reconcile(text, committed, tol) == _drop_lines(committed, tol):
                within.append(name)  # moved, but no more than the cell declares
                continue
            versions.setdefault(text, []).append(name)
        if within:
            lines.append(f"  note: {path} cell {i} moves within its declared tolerance in {', '.join(within)}")
        if set(versions) <= {committed}:
            continue
        tag = "checked" if is_checked(cell, is_lecture(path)) else "unchecked"
        lines.append(f"{path} cell {i} ({tag}) moves: {len(versions)} version(s) in {len(runs)} runs")
        for text, names in versions.items():
            if text == committed:
                lines.append(f"  = committed: {', '.join(names)}")
                continue
            lines.append(f"  {', '.join(names)}:")
            diff = difflib.unified_diff(committed.splitlines(), text.splitlines(), "committed", "fresh", n=0, lineterm="")
            lines.extend("    " + d for d in list(diff)[2:40])
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="tests/nbstability.py", description=__doc__.split("\n\n")[0])
    p.add_argument("notebooks", nargs="+", type=Path)
    p.add_argument("--capabilities", default=None, help="comma-separated ATEN_CPU_CAPABILITY values (default: all this CPU has)")
    p.add_argument("--threads", default="1,2", help="comma-separated COURSEKIT_THREADS values")
    p.add_argument("--configs", default=None,
                   help="explicit pairs instead of the full grid, e.g. default/1,avx2/2 (capability/threads)")
    p.add_argument("--all-outputs", action="store_true", help="compare every output, not only nbval-checked ones")
    p.add_argument("--jobs", type=int, default=2, help="configurations run at once (each kernel keeps its thread count)")
    p.add_argument("--timeout", type=int, default=900, help="seconds per cell")
    p.add_argument("--runs", type=Path, default=Path("build/stability"),
                   help="folder where each run's outputs are saved (default build/stability)")
    p.add_argument("--reuse", action="store_true",
                   help="compare saved runs again instead of executing (after editing a cell's tolerance or prose); "
                        "a run whose notebook code changed since is executed anew")
    p.add_argument("--run-one", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--checked-only", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.run_one:
        print(json.dumps(run_one(args.notebooks[0], args.checked_only, args.timeout)))
        return 0
    if args.configs:
        configs = [(c, int(t)) for c, t in (pair.split("/") for pair in args.configs.split(","))]
    else:
        caps = args.capabilities.split(",") if args.capabilities else cpu_capabilities()
        configs = [(c, int(t)) for c in caps for t in args.threads.split(",")]
    print(f"configurations: {', '.join(f'{c}/{t} thread(s)' for c, t in configs)}")
    moving = 0
    for path in args.notebooks:
        runs = execute_or_reuse(path, configs, args)
        times = ", ".join(f"{name} {run['seconds']} s" for name, run in runs.items())
        report = compare(path, runs, args.all_outputs)
        moved = sum(1 for line in report if not line.startswith(" "))
        moving += moved
        print(f"{path}: {f'{moved} moving' if moved else 'ok'} ({times})")
        for line in report:
            print(line)
        sys.stdout.flush()
    what = "output" if args.all_outputs else "checked output"
    print(f"{moving} {what}(s) move" if moving else f"no {what} moves")
    return 1 if moving else 0


if __name__ == "__main__":
    sys.exit(main())
