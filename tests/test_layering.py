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


def _private_crossings() -> list[str]:
    """Every place a module reaches a private name (``_x``) of another coursekit module."""
    import ast

    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
        tree = ast.parse(path.read_text())
        aliases = {}  # local name -> coursekit module it stands for
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module != "__future__":
                base = package
                for _ in range(max(node.level - 1, 0)):
                    base = base.rsplit(".", 1)[0]
                source = (f"{base}.{node.module}" if node.module else base) if node.level else node.module or ""
                if not source.startswith("coursekit"):
                    continue
                for a in node.names:
                    if a.name.startswith("_") and not a.name.startswith("__"):
                        found.append(f"{module}: from {source} import {a.name}")
                    aliases[a.asname or a.name] = f"{source}.{a.name}"
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.startswith("coursekit"):
                        aliases[a.asname or a.name.split(".")[0]] = a.asname and a.name or "coursekit"
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases:
                if node.attr.startswith("_") and not node.attr.startswith("__"):
                    found.append(f"{module}: {node.value.id}.{node.attr}")
    return found


def test_no_private_name_crosses_a_module():
    """What modules share is public (no underscore) and documented; a private name stays in its module."""
    assert _private_crossings() == []


def _long_functions(limit: int = 60) -> list[str]:
    """Functions whose body (docstring excluded) is over ``limit`` lines and whose docstring gives no
    reason (a line "Long because: ...")."""
    import ast

    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            doc = ast.get_docstring(node) or ""
            body = node.body[1:] if ast.get_docstring(node) is not None else node.body
            if body and node.end_lineno - body[0].lineno + 1 > limit and "Long because:" not in doc:
                found.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({node.end_lineno - body[0].lineno + 1} lines)")
    return found


def test_no_function_body_is_over_60_lines_without_a_reason():
    assert _long_functions() == []
