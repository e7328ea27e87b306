"""The floors of coursekit, checked on the import graph with import-linter.

The contracts live in pyproject.toml ([tool.importlinter]): exercises and grading above the lectures,
the lectures above the plumbing, and no lecture importing another lecture (the modules of one lecture
may share code). import-linter follows every import, lazy ones inside functions included.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "coursekit"


def _contracts() -> list[dict]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]


def _lint(root: Path) -> subprocess.CompletedProcess:
    """Run lint-imports on the package under ``root`` with the contracts of ``root``/pyproject.toml."""
    exe = Path(sys.executable).parent / "lint-imports"
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run([str(exe), "--no-cache"], cwd=root, env=env, capture_output=True, text=True, timeout=300)


def _layers() -> list[list[str]]:
    floors = next(c for c in _contracts() if c["id"] == "floors")
    return [[m.strip() for m in layer.replace("|", ":").split(":")] for layer in floors["layers"]]


def test_the_contracts_hold():
    result = _lint(ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "BROKEN" not in result.stdout


def test_every_module_is_on_a_floor_and_every_lecture_in_a_topic():
    """A new module cannot escape the contracts: it must be named on one floor, a lecture in one topic."""
    modules = {f"coursekit.{p.stem}" for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    modules |= {f"coursekit.{p.parent.name}" for p in PACKAGE.glob("*/__init__.py")}
    on_floors = [m for layer in _layers() for m in layer]
    assert sorted(modules - set(on_floors)) == [], "add the new module to a floor in pyproject.toml"
    assert len(on_floors) == len(set(on_floors)), "a module is named on two floors"
    lectures = set(_layers()[1])
    topics = [set(c["source_modules"]) for c in _contracts() if c["type"] == "forbidden"]
    in_topics = [m for t in topics for m in t]
    assert sorted(in_topics) == sorted(lectures), "every lecture module belongs to exactly one lecture's contract"
    for c in _contracts():
        if c["type"] == "forbidden":
            assert set(c["forbidden_modules"]) == lectures - set(c["source_modules"]), c["id"]


@pytest.fixture
def package_copy(tmp_path):
    """The package's Python files (no data) and the contracts, in a scratch folder to break."""
    shutil.copytree(PACKAGE, tmp_path / "coursekit", ignore=shutil.ignore_patterns("data", "__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


@pytest.mark.parametrize("module, bad_import, broken", [
    ("saliency.py", "from .adversarial import fgsm", "lecture 3"),  # a lecture imports another lecture
    ("hooks.py", "from .saliency import to_map", "floors"),  # plumbing imports a lecture
    ("models.py", "def _late():\n    from .checks import check\n", "floors"),  # a lazy import of the exercises
])
def test_the_contracts_catch_an_import_against_the_floors(package_copy, module, bad_import, broken):
    path = package_copy / "coursekit" / module
    path.write_text(path.read_text() + "\n\n" + bad_import + "\n")
    result = _lint(package_copy)
    assert result.returncode != 0, result.stdout[-2000:]
    name = next(c["name"] for c in _contracts() if c["id"] == broken or c["name"].startswith(broken))
    assert f"{name} BROKEN" in result.stdout


def test_the_package_lists_its_lectures_as_the_contract_does():
    import coursekit

    assert {f"coursekit.{m}" for m in coursekit._LECTURE_MODULES} == set(_layers()[1])
    assert {f"coursekit.{m}" for m in coursekit._EXERCISE_MODULES} <= set(_layers()[0])
