"""What of a submitted notebook gets run: its own cells, with the check cells taken from the source.

A check cell is found by its nbgrader ``grade_id`` or, when a student's tool stripped the cell
metadata, by the call it makes (``check("saliency.vanilla", vanilla_saliency)``). Either way the
grader runs the *source's* check (never the submitted text); a check cell that is missing is put
back after the cell that defines the checked function. :func:`scan` reads the student's code for
constructs that only make sense as an attempt to beat the checks, for the instructor to review.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass, field

__all__ = ["CheckCell", "Plan", "prepare", "scan", "source_checks", "to_python"]

_CALL = re.compile(r"""check\(\s*["']([A-Za-z0-9_]+\.[A-Za-z0-9_]+)["']\s*,\s*([A-Za-z_][A-Za-z0-9_]*)\s*\)""")


@dataclass(frozen=True)
class CheckCell:
    """A check (nbgrader grade) cell of the source notebook."""

    grade_id: str
    points: float
    exercise: str  # e.g. "saliency.vanilla"
    function: str  # the name of the student's function it checks
    source: str
    title: str  # the heading of the exercise it belongs to, for the feedback


@dataclass
class Plan:
    """One submission as the grader runs it: ``layout`` is every cell, ``(kind, grade_id, source)``,
    with the check cells taken from the source; ``cells`` the code cells of it, in order."""

    layout: list[tuple[str, str | None, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def cells(self) -> list[tuple[str | None, str]]:
        return [(gid, source) for kind, gid, source in self.layout if kind == "code"]


def _heading(markdown: str) -> str | None:
    for line in markdown.splitlines():
        if line.startswith("#"):
            return line.lstrip("#").strip().replace("`", "")
    return None


def source_checks(source_nb) -> list[CheckCell]:
    """The check cells of the source notebook, in order, each with the heading of its exercise."""
    checks, title = [], ""
    for cell in source_nb.cells:
        if cell.cell_type == "markdown":
            title = _heading(cell.source) or title
        nbg = cell.get("metadata", {}).get("nbgrader", {})
        if cell.cell_type == "code" and nbg.get("grade") and not nbg.get("solution"):
            match = _CALL.search(cell.source)
            if match is None:
                raise ValueError(f"check cell {nbg.get('grade_id')!r} of the source does not call check(name, function)")
            checks.append(CheckCell(nbg["grade_id"], float(nbg.get("points", 0)), match.group(1), match.group(2),
                                    cell.source, title))
    return checks


def _defines(source: str, name: str) -> bool:
    return re.search(rf"^\s*(def\s+{re.escape(name)}\s*\(|{re.escape(name)}\s*=)", source, re.M) is not None


def prepare(nb, checks: list[CheckCell]) -> Plan:
    """Match the submission's cells with the source's checks; see the module docstring."""
    by_id = {c.grade_id: c for c in checks}
    by_exercise = {c.exercise: c for c in checks}
    plan, found, stripped = Plan(), set(), False
    for cell in nb.cells:
        kind, source = cell.get("cell_type"), cell.get("source", "")
        if kind != "code":
            if kind == "markdown":
                plan.layout.append(("markdown", None, source))
            continue
        nbg = cell.get("metadata", {}).get("nbgrader", {})
        gid = nbg.get("grade_id") if isinstance(nbg, dict) else None
        match = _CALL.search(source)
        check = by_id.get(gid)
        if check is None and not nbg and match and match.group(1) in by_exercise:
            check, stripped = by_exercise[match.group(1)], True  # metadata stripped: known by its call
        if check is not None and check.grade_id not in found:
            found.add(check.grade_id)
            if source.strip() != check.source.strip():
                plan.notes.append(f"{check.grade_id}: edited, restored from the source")
            plan.layout.append(("code", check.grade_id, check.source))
        else:
            plan.layout.append(("code", None, source))
    if stripped:
        plan.notes.append("nbgrader cell metadata missing, check cells recognised by their call")
    for check in checks:
        if check.grade_id in found:
            continue
        plan.notes.append(f"{check.grade_id}: missing, put back from the source")
        at = len(plan.layout)
        for j, (kind, gid, source) in enumerate(plan.layout):
            if kind == "code" and gid is None and _defines(source, check.function):
                at = j + 1
        plan.layout.insert(at, ("code", check.grade_id, check.source))
    return plan


def to_python(source: str) -> str:
    """IPython's own translation of a cell (magics, ``!shell``) into plain Python."""
    from IPython.core.inputtransformer2 import TransformerManager

    return TransformerManager().transform_cell(source)


# ----------------------------------------------------------------------------------------------
# static scan

_WATCHED_ROOTS = ("torch", "coursekit", "numpy", "builtins", "sys")
_FORBIDDEN_IMPORTS = {"captum": "an attribution library", "zennit": "an attribution library",
                      "pytorch_grad_cam": "an attribution library", "ctypes": "raw memory access",
                      "gc": "the garbage collector's object lists"}
_SUSPICIOUS_NAMES = {
    "__wrapped__": "unwraps a function", "__closure__": "reads a function's closure",
    "cell_contents": "reads a function's closure", "__code__": "reads or swaps a function's code",
    "_BLOCKED": "touches the checks' blocking", "_getframe": "inspects the call stack",
    "currentframe": "inspects the call stack", "stack": None, "f_back": "inspects the call stack",
    "f_locals": "reads another function's variables", "f_globals": "reads another function's variables",
    "tb_frame": "inspects the call stack", "_current_frames": "inspects the call stack",
    "getsource": "reads source code", "getsourcelines": "reads source code",
    "settrace": "installs a tracer", "setprofile": "installs a profiler",
    "run_check": "calls the checks' internals", "EXERCISES": "touches the checks' registry",
}


def _aliases(tree) -> dict[str, str]:
    """Local names bound to watched modules (``import torch.nn.functional as F`` -> F: torch...)."""
    names = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                names[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module:
            for a in node.names:
                names[a.asname or a.name] = f"{node.module}.{a.name}"
    return {k: v for k, v in names.items() if v.split(".")[0] in _WATCHED_ROOTS}


def _dotted(node) -> str | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        return ".".join([node.id, *reversed(parts)])
    return None


def scan(sources: list[tuple[int, str]]) -> list[str]:
    """Flags for the instructor: ``"cell N: <what> (<why>)"`` for each suspicious construct."""
    trees = []
    for n, source in sources:
        try:
            trees.append((n, ast.parse(to_python(source))))
        except SyntaxError:
            continue  # the run reports it
    aliases: dict[str, str] = {}
    for _, tree in trees:
        aliases.update(_aliases(tree))
    flags: list[str] = []

    def flag(n, text):
        if f"cell {n}: {text}" not in flags:
            flags.append(f"cell {n}: {text}")

    for n, tree in trees:
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                mods = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                for mod in mods:
                    root = mod.split(".")[0]
                    if root in _FORBIDDEN_IMPORTS:
                        flag(n, f"imports {root} ({_FORBIDDEN_IMPORTS[root]})")
            targets = []
            if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign, ast.Delete)):
                targets = node.targets if isinstance(node, (ast.Assign, ast.Delete)) else [node.target]
            for t in targets:
                name = _dotted(t) if isinstance(t, ast.Attribute) else None
                if name and name.split(".")[0] in aliases:
                    full = aliases[name.split(".")[0]] + name[len(name.split(".")[0]):]
                    flag(n, f"assigns {full} (patches a library the checks rely on)")
                if isinstance(t, ast.Name) and t.id == "check":
                    flag(n, "redefines check")
            if isinstance(node, ast.FunctionDef) and node.name == "check":
                flag(n, "redefines check")
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("setattr", "delattr"):
                first = _dotted(node.args[0]) if node.args else None
                if first and first.split(".")[0] in aliases:
                    flag(n, f"{node.func.id} on {aliases[first.split('.')[0]]} (patches a library the checks rely on)")
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                called = _dotted(node.func) or ""
                if called.split(".")[-1] in ("write", "fdopen", "dup2", "openpty") and called.split(".")[0] == "os":
                    flag(n, f"calls {called} (writes to a raw file descriptor, e.g. the grader's result pipe)")
            attr = node.attr if isinstance(node, ast.Attribute) else node.id if isinstance(node, ast.Name) else None
            if attr in _SUSPICIOUS_NAMES and _SUSPICIOUS_NAMES[attr]:
                flag(n, f"uses {attr} ({_SUSPICIOUS_NAMES[attr]})")
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and "/proc/" in node.value:
                flag(n, "reads /proc (process internals)")
    return flags
