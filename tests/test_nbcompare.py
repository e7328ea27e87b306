"""The notebook comparison that `make test` applies to lectures: exact by default, declared tolerance where needed."""

from __future__ import annotations

import types
from pathlib import Path

import nbformat
import nbplugin
import pytest
from nbcompare import reconcile, reconcile_outputs, tolerance

TOL = {"abs": 0.02, "rel": 0.0, "ignore_lines": [], "mask": []}


def test_numbers_within_tolerance_give_the_committed_text():
    committed = "   0.100     25.5     0.105\n"
    assert reconcile("   0.100     25.5     0.108\n", committed, TOL) == committed


def test_a_number_beyond_tolerance_keeps_the_fresh_text():
    assert reconcile("accuracy 0.140\n", "accuracy 0.105\n", TOL) == "accuracy 0.140\n"


def test_relative_tolerance():
    tol = {"abs": 0.0, "rel": 0.1, "ignore_lines": [], "mask": []}
    assert reconcile("radius 5.34\n", "radius 5.09\n", tol) == "radius 5.09\n"
    assert reconcile("radius 5.70\n", "radius 5.09\n", tol) == "radius 5.70\n"


def test_words_must_still_match_but_column_widths_may_move():
    assert reconcile("tiger cat 0.50\n", "Egyptian cat 0.50\n", TOL) == "tiger cat 0.50\n"
    assert reconcile("count  9 of 300\n", "count 10 of 300\n", {"abs": 2, "rel": 0, "ignore_lines": [], "mask": []}) == "count 10 of 300\n"


def test_ignored_lines_are_dropped_from_both_sides():
    tol = tolerance({"coursekit": {"compare": {"ignore_lines": [r"^two FGSM sweeps"]}}})
    fresh, committed = reconcile_outputs(
        [{"output_type": "stream", "name": "stdout", "text": "two FGSM sweeps: 92 s\nacc 0.1\n"}],
        [{"output_type": "stream", "name": "stdout", "text": "two FGSM sweeps: 17 s\nacc 0.1\n"}], tol)
    assert fresh[0]["text"] == committed[0]["text"] == "acc 0.1\n"


def test_masked_timings_inside_a_line():
    tol = tolerance({"coursekit": {"compare": {"mask": [r"\d+\.\d s\b"]}}})
    assert reconcile("300 evaluations in 9.1 s; loss 66.2\n", "300 evaluations in 17.3 s; loss 66.2\n", tol) == \
        "300 evaluations in …; loss 66.2\n"
    assert reconcile("300 evaluations in 9.1 s; loss 70.0\n", "300 evaluations in 17.3 s; loss 66.2\n", tol) != \
        "300 evaluations in …; loss 66.2\n"


def test_no_metadata_means_exact_and_unknown_keys_are_refused():
    assert tolerance({}) is None
    with pytest.raises(ValueError, match="unknown keys"):
        tolerance({"coursekit": {"compare": {"atol": 0.1}}})


def test_outputs_are_copied_not_changed():
    fresh = [nbformat.v4.new_output("execute_result", data={"text/plain": "0.108"})]
    committed = [nbformat.v4.new_output("execute_result", data={"text/plain": "0.105"})]
    new, _ = reconcile_outputs(fresh, committed, TOL)
    assert new[0]["data"]["text/plain"] == "0.105" and fresh[0]["data"]["text/plain"] == "0.108"


class IPyNbCell(types.SimpleNamespace):
    """Stands in for nbval's cell item: the hook recognises it by class name."""


def _fake_item(folder: Path, metadata: dict):
    return IPyNbCell(fspath=folder / "x.ipynb", cell=nbformat.v4.new_code_cell(metadata=metadata),
                     options={"check": False}, compare_outputs=lambda test, ref, skip=None: test == ref)


def test_lecture_cells_are_all_compared_unless_tagged_volatile():
    plain = _fake_item(nbplugin.LECTURES, {})
    volatile = _fake_item(nbplugin.LECTURES, {"tags": ["nbval-ignore-output"]})
    solution = _fake_item(nbplugin.LECTURES.parent / "solutions", {})
    nbplugin.pytest_collection_modifyitems(None, [plain, volatile, solution])
    assert (plain.options["check"], volatile.options["check"], solution.options["check"]) == (True, False, False)


def test_a_declared_tolerance_reaches_nbval_s_comparison():
    item = _fake_item(nbplugin.LECTURES, {"coursekit": {"compare": {"abs": 0.01}}})
    nbplugin.pytest_collection_modifyitems(None, [item])
    out = lambda v: [{"output_type": "stream", "name": "stdout", "text": v}]  # noqa: E731
    assert item.compare_outputs(out("acc 0.108\n"), out("acc 0.105\n"))
    assert not item.compare_outputs(out("acc 0.130\n"), out("acc 0.105\n"))
