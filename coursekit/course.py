"""Execute the lecture notebooks and render them to HTML (``make course``).

Usage::

    python -m coursekit.course notebooks/*.ipynb [--out build] [--timeout 900]

Each notebook runs top to bottom in a fresh kernel of the current environment; the executed copy
is written to ``build/<name>.html`` (the notebook file itself is not modified). The HTML reads
offline: maths as MathML, no script from a CDN, explorers as their static pictures
(:mod:`coursekit.offline_html`). The run time of
every notebook is printed; the exit status is non-zero when any cell raised.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path


def run_notebook(path: Path, out_dir: Path, timeout: int = 900, kernel: str = "python3") -> tuple[bool, float, str]:
    """Execute one notebook and write its HTML rendering; returns (ok, seconds, error summary)."""
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    from .offline_html import offline_html

    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=timeout, kernel_name=kernel, resources={"metadata": {"path": str(path.parent)}})
    start = time.time()
    ok, error = True, ""
    try:
        client.execute()
    except CellExecutionError as err:  # keep going with the next notebook; report at the end
        ok = False
        error = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
    seconds = time.time() - start
    html = offline_html(nb)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / (path.stem + ".html")).write_text(html, encoding="utf-8")
    return ok, seconds, error


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m coursekit.course", description="Execute the lecture notebooks to HTML.")
    p.add_argument("notebooks", nargs="+", type=Path)
    p.add_argument("--out", type=Path, default=Path("build"))
    p.add_argument("--timeout", type=int, default=900, help="seconds per cell")
    args = p.parse_args(argv)
    os.environ.setdefault("MPLBACKEND", "Agg")
    os.environ.setdefault("COURSEKIT_STATIC", "1")  # HTML has no live kernel: explorers draw their static figure
    failures = 0
    total = time.time()
    for nb in args.notebooks:
        if not nb.is_file():
            print(f"{nb}: no such notebook", file=sys.stderr)
            failures += 1
            continue
        ok, seconds, error = run_notebook(nb, args.out, args.timeout)
        print(f"{nb.name:40s} {seconds:7.1f} s  {'ok' if ok else 'FAILED: ' + error}", flush=True)
        failures += not ok
    print(f"{len(args.notebooks)} notebooks in {time.time() - total:.1f} s, {failures} failed; HTML in {args.out}/")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
