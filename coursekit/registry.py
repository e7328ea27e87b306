"""One place to declare a method (plumbing): a decorator that names it once for every reader.

A lecture keeps one :class:`Registry` per kind of method (CAMs, LRP rules and composites,
objectives, attacks). Decorating a definition registers it under its name; from that one line the
method is in the lecture's namespace (``__all__``, so ``from coursekit.cam import *`` and the
notebooks' tab completion see it), in the course's method table (:func:`method_table`, which the
README shows) and in the tests that are parametrised over the registry. zennit's
``@register_composite`` follows the same idea.

>>> CAMS = Registry("CAM", exports=__all__)            # doctest: +SKIP
>>> @CAMS.register
... class GradCAM(CAM): ...                             # doctest: +SKIP
>>> CAMS["GradCAM"], list(CAMS)                         # doctest: +SKIP
"""

from __future__ import annotations

import difflib
import importlib
import re
from collections.abc import Callable, Iterator

__all__ = ["Registry", "REGISTRIES", "method_table"]

# Every kind of method and where its registry lives (module, attribute). method_table() imports them
# by name when it runs, so this plumbing module imports no lecture.
REGISTRIES: dict[str, tuple[str, str]] = {
    "CAM": ("coursekit.cam", "CAMS"),
    "LRP rule": ("coursekit.lrp.rules", "RULES"),
    "LRP composite": ("coursekit.lrp.composites", "COMPOSITES"),
    "objective": ("coursekit.objectives", "OBJECTIVES"),
    "attack": ("coursekit.adversarial", "ATTACKS"),
}


class Registry:
    """Named methods of one kind, in the order they were defined.

    Parameters
    ----------
    kind : str
        What the methods are ("CAM", "LRP composite", ...), used in messages and the method table.
    exports : list of str, optional
        The defining module's ``__all__``: a registered name is appended to it.
    """

    def __init__(self, kind: str, exports: list[str] | None = None):
        if not isinstance(kind, str) or not kind:
            raise ValueError(f"a registry needs a kind such as 'CAM', got {kind!r}")
        self.kind = kind
        self._items: dict[str, Callable] = {}
        self._exports = exports

    def register(self, method: Callable | None = None, *, name: str | None = None):
        """Register ``method`` under ``name`` (default: its ``__name__``); usable as ``@reg.register``
        or ``@reg.register(name="...")``. Returns the method unchanged."""
        if method is None:
            return lambda m: self.register(m, name=name)
        key = name or getattr(method, "__name__", None)
        if not isinstance(key, str) or not key:
            raise ValueError(f"a {self.kind} is registered under a non-empty name, got {key!r}")
        if key in self._items and self._items[key] is not method:
            raise ValueError(f"a {self.kind} named {key!r} is registered already ({self._items[key]!r})")
        self._items[key] = method
        export = getattr(method, "__name__", key)  # the Python name the module binds
        if self._exports is not None and export not in self._exports:
            self._exports.append(export)
        return method

    def unregister(self, name: str) -> None:
        """Remove ``name`` (and its export); for tests that register a method for a moment."""
        method = self._items.pop(name)
        export = getattr(method, "__name__", name)
        if self._exports is not None and export in self._exports:
            self._exports.remove(export)

    def __getitem__(self, name: str) -> Callable:
        try:
            return self._items[name]
        except KeyError:
            close = difflib.get_close_matches(str(name), list(self._items), n=3)
            hint = f"; did you mean {' or '.join(map(repr, close))}?" if close else ""
            raise ValueError(f"unknown {self.kind} {name!r}{hint} Known: {', '.join(self._items)}") from None

    def __contains__(self, name) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._items))

    def __len__(self) -> int:
        return len(self._items)

    def items(self) -> list[tuple[str, Callable]]:
        return list(self._items.items())

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {', '.join(self._items)})"


def summary(method: Callable) -> str:
    """The first sentence of a method's docstring (the line a table shows)."""
    doc = (getattr(method, "__doc__", None) or "").strip()
    first = " ".join(doc.split("\n\n")[0].split())
    # a sentence ends at ". " before a capital letter, but not after "al." or "e.g."
    sentence = re.split(r"(?<!\bal)(?<!e\.g)\.\s+(?=[A-Z])", first)[0]
    return sentence.rstrip(".") + "." if sentence else ""


def method_table() -> str:
    """A Markdown table of every registered method: kind, name, where it lives, its first sentence."""
    rows = ["| kind | method | in | what it is |", "|---|---|---|---|"]
    for kind, (module, attribute) in REGISTRIES.items():
        registry = getattr(importlib.import_module(module), attribute)
        for name, method in registry.items():
            rows.append(f"| {kind} | `{name}` | `{module}` | {summary(method).replace('|', '/')} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    print(method_table(), end="")
