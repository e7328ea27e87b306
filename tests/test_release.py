"""exercises/ is generated from solutions/ by `make release`; this test fails when it is out of date."""

from __future__ import annotations

import filecmp
from pathlib import Path

import nbformat
import pytest

from coursekit.grading import release as rel

ROOT = Path(__file__).resolve().parents[1]
EXERCISES = ROOT / "exercises"
SETS = rel.list_sets(ROOT)
HINT = "exercises/ is out of date with solutions/: run `make release` (python -m coursekit.grading.release) and commit exercises/"


def _files(folder: Path) -> set[str]:
    skip = {".ipynb_checkpoints", "__pycache__"}
    return {
        str(p.relative_to(folder))
        for p in folder.rglob("*")
        if p.is_file() and not skip.intersection(p.relative_to(folder).parts) and not p.name.startswith(".")
    }


@pytest.fixture(scope="module")
def fresh(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("released")
    rel.release(root=ROOT, out_dir=out)
    return out


def test_there_is_at_least_the_warmup_set():
    assert "00_warmup" in SETS


def test_committed_exercises_match_a_fresh_release(fresh):
    committed, regenerated = _files(EXERCISES), _files(fresh)
    missing = sorted(regenerated - committed)
    extra = sorted(committed - regenerated)
    assert not missing, f"missing from exercises/: {missing}. {HINT}"
    assert not extra, f"in exercises/ but not produced from solutions/: {extra}. {HINT}"
    differ = [f for f in sorted(committed) if not filecmp.cmp(EXERCISES / f, fresh / f, shallow=False)]
    assert not differ, f"differ from a fresh release: {differ}. {HINT}"


def test_release_is_deterministic(fresh, tmp_path):
    rel.release_set("00_warmup", ROOT, tmp_path)
    a, b = fresh / "00_warmup" / "00_warmup.ipynb", tmp_path / "00_warmup" / "00_warmup.ipynb"
    assert a.read_bytes() == b.read_bytes()


@pytest.mark.parametrize("name", SETS)
def test_released_notebooks_are_clean_stubs(fresh, name):
    source = nbformat.read(ROOT / "solutions" / name / f"{name}.ipynb", as_version=4)
    nb = nbformat.read(fresh / name / f"{name}.ipynb", as_version=4)
    assert len(nb.cells) == len(source.cells)
    for cell in nb.cells:
        nbg = cell.metadata.get("nbgrader", {})
        assert "BEGIN SOLUTION" not in cell.source and "END SOLUTION" not in cell.source
        assert "BEGIN HIDDEN TESTS" not in cell.source
        assert "execution" not in cell.metadata
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None
        if nbg.get("solution") and cell.cell_type == "code":
            assert "raise NotImplementedError()" in cell.source
        is_check = nbg.get("grade") and not nbg.get("solution")
        assert ("raises-exception" in cell.metadata.get("tags", [])) == bool(is_check and cell.cell_type == "code")


def test_no_gradebook_or_log_is_left_in_the_repository(tmp_path):
    rel.release_set("00_warmup", ROOT, tmp_path)
    assert not (ROOT / "gradebook.db").exists()
    assert not (ROOT / ".nbgrader.log").exists()
    assert not (ROOT / "solutions" / "gradebook.db").exists()


def test_unknown_set_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="unknown exercise set"):
        rel.release(["no_such_set"], root=ROOT, out_dir=tmp_path)


def test_pruning_removes_sets_without_solutions(tmp_path):
    (tmp_path / "99_removed").mkdir()
    (tmp_path / "99_removed" / "99_removed.ipynb").write_text("{}")
    rel.release(["00_warmup"], root=ROOT, out_dir=tmp_path, prune=True)
    assert not (tmp_path / "99_removed").exists()
    assert (tmp_path / "00_warmup" / "00_warmup.ipynb").is_file()
