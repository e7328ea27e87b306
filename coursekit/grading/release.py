"""``make release``: regenerate ``exercises/`` from ``solutions/`` with nbgrader's generate_assignment.

Usage::

    python -m coursekit.grading.release              # every set in solutions/
    python -m coursekit.grading.release 00_warmup    # only these sets
    python -m coursekit.grading.release --out DIR    # write somewhere else (the tests do)

For each ``solutions/<set>/``, nbgrader's own ``GenerateAssignment`` converter (the code behind
``nbgrader generate_assignment``) runs with the settings of the repository's ``nbgrader_config.py``
in a temporary course directory, without a gradebook (the ``--no-db`` behaviour), so no
``gradebook.db`` or log lands in the repository. The released notebooks are then made
deterministic: outputs, execution counts and execution timings cleared, the tag
``raises-exception`` added to every check (grade) cell (a stub fails its check on purpose, and
``nbclient``/``nbval`` then carry on), and JSON written in nbformat's stable layout. Running the
release twice gives byte-identical files; ``tests/test_release.py`` fails when the committed
``exercises/`` differ from a fresh release.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import nbformat

__all__ = ["find_root", "list_sets", "load_course_config", "postprocess_notebook", "release", "release_set"]

RELEASE_TAG = "raises-exception"
_IGNORE = shutil.ignore_patterns(".ipynb_checkpoints", "__pycache__", "*.pyc", "feedback", ".*")


def find_root(start: str | Path | None = None) -> Path:
    """The course root: the first folder, from ``start`` (default: cwd) upwards, with ``nbgrader_config.py``
    and ``solutions/``; failing that, the checkout that contains this package."""
    here = Path(start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / "nbgrader_config.py").is_file() and (folder / "solutions").is_dir():
            return folder
    checkout = Path(__file__).resolve().parents[2]
    if (checkout / "nbgrader_config.py").is_file() and (checkout / "solutions").is_dir():
        return checkout
    raise FileNotFoundError(
        f"no course root found from {here}: expected a folder with nbgrader_config.py and solutions/. "
        "Run this from the course repository (or pass --root)."
    )


def list_sets(root: str | Path) -> list[str]:
    """Names of the exercise sets: folders ``solutions/<set>/`` that contain ``<set>.ipynb``."""
    solutions = Path(root) / "solutions"
    return sorted(p.name for p in solutions.iterdir() if p.is_dir() and (p / f"{p.name}.ipynb").is_file())


def load_course_config(root: str | Path):
    """The traitlets Config of ``<root>/nbgrader_config.py`` (empty if there is none)."""
    from traitlets.config import Config
    from traitlets.config.loader import PyFileConfigLoader

    path = Path(root) / "nbgrader_config.py"
    if not path.is_file():
        return Config()
    return PyFileConfigLoader(path.name, path=str(path.parent)).load_config()


def _is_check_cell(cell) -> bool:
    nbg = cell.get("metadata", {}).get("nbgrader", {})
    return bool(nbg.get("grade")) and not nbg.get("solution") and cell.get("cell_type") == "code"


def postprocess_notebook(nb):
    """Clear volatile fields and tag check cells so the released file is deterministic (in place)."""
    for cell in nb.cells:
        cell.metadata.pop("execution", None)  # nbclient's timestamps
        cell.metadata.pop("collapsed", None)
        cell.metadata.pop("scrolled", None)
        if cell.cell_type == "code":
            cell.outputs = []
            cell.execution_count = None
        if _is_check_cell(cell):
            tags = list(cell.metadata.get("tags", []))
            if RELEASE_TAG not in tags:
                tags.append(RELEASE_TAG)
            cell.metadata["tags"] = tags
    nbformat.validate(nb)
    return nb


def _write_stable(nb, path: Path) -> None:
    text = nbformat.writes(nb)
    if not text.endswith("\n"):
        text += "\n"
    path.write_bytes(text.encode("utf-8"))


def release_set(name: str, root: str | Path, out_dir: str | Path) -> Path:
    """Generate the student version of ``solutions/<name>/`` into ``<out_dir>/<name>/`` (replaced)."""
    from nbgrader.converters import GenerateAssignment
    from nbgrader.coursedir import CourseDirectory

    root, out_dir = Path(root).resolve(), Path(out_dir).resolve()
    source = root / "solutions" / name
    if not (source / f"{name}.ipynb").is_file():
        raise FileNotFoundError(f"no exercise set {name!r}: {source / (name + '.ipynb')} does not exist")
    with tempfile.TemporaryDirectory(prefix="coursekit-release-") as tmp:
        tmp = Path(tmp)
        shutil.copytree(source, tmp / "solutions" / name, ignore=_IGNORE)
        config = load_course_config(root)
        config.CourseDirectory.root = str(tmp)
        config.CourseDirectory.source_directory = "solutions"
        config.CourseDirectory.release_directory = "exercises"
        config.CourseDirectory.db_url = f"sqlite:///{tmp / 'gradebook.db'}"  # never the repository's
        config.GenerateAssignment.no_database = True  # nbgrader generate_assignment --no-db
        config.SaveCells.enabled = False
        config.BaseConverter.force = True
        coursedir = CourseDirectory(config=config)
        coursedir.assignment_id = name
        GenerateAssignment(coursedir=coursedir, config=config).start()

        released = tmp / "exercises" / name
        for path in sorted(released.rglob("*.ipynb")):
            nb = nbformat.read(path, as_version=4)
            _write_stable(postprocess_notebook(nb), path)
        target = out_dir / name
        if target.exists():
            shutil.rmtree(target)
        out_dir.mkdir(parents=True, exist_ok=True)
        shutil.copytree(released, target)
    return target


def release(sets: list[str] | None = None, root: str | Path | None = None, out_dir: str | Path | None = None,
            prune: bool | None = None) -> list[Path]:
    """Release ``sets`` (default: all) of the course at ``root`` into ``out_dir`` (default: ``<root>/exercises``).

    With ``prune`` (default: when releasing every set), folders of ``out_dir`` that no longer have a
    solutions counterpart are removed, so ``exercises/`` mirrors ``solutions/``.
    """
    root = find_root(root) if root is None else Path(root).resolve()
    out_dir = Path(out_dir) if out_dir is not None else root / "exercises"
    available = list_sets(root)
    if sets:
        unknown = [s for s in sets if s not in available]
        if unknown:
            raise ValueError(f"unknown exercise set(s) {unknown}; solutions/ has {available}")
    if prune is None:
        prune = not sets
    done = [release_set(name, root, out_dir) for name in (sets or available)]
    if prune and out_dir.is_dir():
        for stale in sorted(p for p in out_dir.iterdir() if p.is_dir() and p.name not in available):
            print(f"removing {stale} (no solutions/{stale.name} any more)")
            shutil.rmtree(stale)
    return done


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m coursekit.grading.release", description=__doc__.split("\n\n")[0])
    parser.add_argument("sets", nargs="*", help="exercise sets to release (default: every folder of solutions/)")
    parser.add_argument("--root", help="course root (default: found from the current folder)")
    parser.add_argument("--out", help="output folder (default: <root>/exercises)")
    args = parser.parse_args(argv)
    for path in release(args.sets or None, root=args.root, out_dir=args.out):
        print(f"released {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
