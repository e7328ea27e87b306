"""`make course` runs notebooks to HTML, prints times and fails when a cell raises."""

import nbformat
from nbformat.v4 import new_code_cell, new_notebook

from coursekit import course


def _write(path, source):
    nb = new_notebook(cells=[new_code_cell(source)], metadata={"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}})
    nbformat.write(nb, path)
    return path


def test_course_runs_notebooks_and_reports(tmp_path, capsys):
    good = _write(tmp_path / "good.ipynb", "print(6 * 7)")
    bad = _write(tmp_path / "bad.ipynb", "raise ValueError('broken cell')")
    out = tmp_path / "build"
    status = course.main([str(good), str(bad), "--out", str(out), "--timeout", "60"])
    text = capsys.readouterr().out
    assert status == 1
    assert "good.ipynb" in text and " s  ok" in text and "FAILED" in text and "broken cell" in text
    assert "42" in (out / "good.html").read_text()
    assert (out / "bad.html").exists()
    assert nbformat.read(good, as_version=4).cells[0].outputs == []  # the source notebook is untouched


def test_course_all_good(tmp_path):
    good = _write(tmp_path / "good.ipynb", "x = 1")
    assert course.main([str(good), "--out", str(tmp_path / "b")]) == 0


def test_missing_notebook(tmp_path):
    assert course.main([str(tmp_path / "nope.ipynb"), "--out", str(tmp_path / "b")]) == 1
