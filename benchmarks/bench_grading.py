"""How long ``coursekit-grade`` takes for a class: N fabricated submissions of one set, --jobs 2.

    python benchmarks/bench_grading.py                       # 200 submissions of 03_saliency
    python benchmarks/bench_grading.py --set 00_warmup -n 50 --jobs 2

The class mixes honest (the solution), empty (the released notebook) and partly wrong students
(one exercise left as released), 1/3 each. Prints the wall time, the CPU seconds of the grader and
of its workers, and the load average before and after (other jobs on the machine slow it down).
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time
from pathlib import Path

import nbformat

from coursekit.grading import cli

ROOT = Path(__file__).resolve().parents[1]


def fabricate(assignment: str, folder: Path, n: int) -> None:
    """``n`` notebooks: the solution, the released notebook, and the solution with one exercise undone."""
    solution = nbformat.read(ROOT / "solutions" / assignment / f"{assignment}.ipynb", as_version=4)
    released = nbformat.read(ROOT / "exercises" / assignment / f"{assignment}.ipynb", as_version=4)
    stubs = {c.metadata["nbgrader"]["grade_id"]: c.source for c in released.cells
             if c.metadata.get("nbgrader", {}).get("solution")}
    for k in range(n):
        if k % 3 == 0:
            nb = solution
        elif k % 3 == 1:
            nb = released
        else:
            nb = nbformat.from_dict(solution)
            ids = sorted(stubs)
            undone = ids[k % len(ids)]
            for cell in nb.cells:
                if cell.metadata.get("nbgrader", {}).get("grade_id") == undone:
                    cell.source = stubs[undone]
        nbformat.write(nb, folder / f"student{k:03d}.ipynb")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", default="03_saliency")
    parser.add_argument("-n", type=int, default=200)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--timeout", type=int, default=60)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-grading-") as tmp:
        subs, out = Path(tmp) / "submissions", Path(tmp) / "out"
        subs.mkdir()
        fabricate(args.set, subs, args.n)
        load_before = os.getloadavg()
        start = time.monotonic()
        result = cli.grade(args.set, subs, out, timeout=args.timeout, root=ROOT, jobs=args.jobs,
                           echo=lambda line: print(line) if line.startswith(f"[{args.n}/") else None)
        wall = time.monotonic() - start
        own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        scores = [s.score for s in result.students]
        print(f"{args.n} submissions of {args.set}, --jobs {args.jobs}: {wall:.0f} s wall "
              f"({wall / args.n:.2f} s per student); CPU: grader {own.ru_utime + own.ru_stime:.0f} s, workers and "
              f"judges {kids.ru_utime + kids.ru_stime:.0f} s; load average {load_before[0]:.1f} before, "
              f"{os.getloadavg()[0]:.1f} after; scores: {min(scores):g}..{max(scores):g}, "
              f"{sum(1 for s in result.students if s.notes)} with notes")


if __name__ == "__main__":
    main()
