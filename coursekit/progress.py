"""One progress bar for every long loop of coursekit (tqdm.auto: a widget in Jupyter, text elsewhere).

``progress=False`` hides the bar. ``TQDM_DISABLE=1`` or ``COURSEKIT_STATIC=1`` in the environment
hides every bar of a run, read at each call: ``COURSEKIT_STATIC=1`` is how notebooks are executed
headless to be saved or rendered (``make course``), and a bar in a saved file is a stale
"0%| | 0/162" forever. tqdm reads its ``TQDM_*``
variables once, when it is imported, and only for arguments a call does not pass; every coursekit
loop passed ``disable=not progress``, so the variable had no effect.

Two things tqdm's notebook bar does not do, and coursekit's does:

* **A finished run ends green at 100 %.** tqdm paints a bar red when it is closed before its
  total, which is also what happens when a loop stops on purpose before its nominal count (a
  budget of function evaluations reached, L-BFGS's line search spending several evaluations per
  step). :func:`finish` closes a bar as complete: its total becomes the count really done.
* **A saved notebook keeps a picture of the bar.** A live bar is an ipywidget; a notebook saved
  after a live run and opened again shows "Error displaying widget: model not found" where it was
  (JupyterLab does not fall back to another format of the same output). When a notebook bar
  closes, its output is replaced by its final line as text (green when complete, red when not;
  an empty output for a finished ``leave=False`` bar, which tqdm hides), so a saved copy shows the
  final state and no widget.
"""

from __future__ import annotations

import functools
import html
import os

__all__ = ["finish", "progress_bar", "static_bundle"]

_COLOURS = {"success": "#2e7d32", "danger": "#c62828"}


def _hidden(progress: bool) -> bool:
    return not progress or any(os.environ.get(var, "").strip().lower() in ("1", "true", "yes")
                               for var in ("TQDM_DISABLE", "COURSEKIT_STATIC"))


def progress_bar(iterable=None, *, progress: bool = True, **kwargs):
    """``tqdm.auto.tqdm(iterable, **kwargs)``, hidden when ``progress`` is false.

    In a Jupyter kernel the bar is tqdm's widget, and when it closes its output is replaced by
    :func:`static_bundle` (the final line as text), so that a saved notebook shows no widget.

    Parameters
    ----------
    iterable : iterable, optional
        What to loop over (or ``total=`` and ``bar.update(n)``).
    progress : bool
        False: no bar. True: a bar unless ``TQDM_DISABLE`` or ``COURSEKIT_STATIC`` is set.
    **kwargs
        Passed to tqdm (``desc``, ``total``, ``unit``, ``leave``...).
    """
    from tqdm.auto import tqdm

    if _hidden(progress):
        kwargs["disable"] = True
        return tqdm(iterable, **kwargs)
    from tqdm.notebook import tqdm as notebook_tqdm

    if tqdm is notebook_tqdm or issubclass(tqdm, notebook_tqdm):
        return _notebook_bar_class()(iterable, **kwargs)
    return tqdm(iterable, **kwargs)


def finish(bar) -> None:
    """Close ``bar`` as complete: a loop that stopped on purpose before its nominal total ends at 100 %.

    The total becomes the count reached (``bar.n``), so the bar reads e.g. "149/149", green in a
    notebook, instead of a red "50% 149/300". Use it where the loop's owner knows that the run
    ended normally (a budget reached, converged); an exception or an interrupt leaves the bar as
    it was, red. A disabled or already closed bar is left alone.
    """
    if getattr(bar, "disable", True):
        return
    if bar.total is None or bar.n < bar.total:
        bar.total = bar.n
        container = getattr(bar, "container", None)
        if container is not None:  # the notebook widget's bar has its own maximum
            container.children[1].max = max(bar.n, 1)
            container.children[1].value = max(bar.n, 1)
    bar.refresh()
    bar.close()


def static_bundle(bar, style: str) -> dict:
    """The final state of ``bar`` as display data: ``text/plain`` and a coloured ``text/html`` line.

    ``style`` is ``"success"`` (green) or ``"danger"`` (red).
    """
    line = bar.format_meter(**{**bar.format_dict, "ncols": 80})
    colour = _COLOURS.get(style, "inherit")
    return {"text/plain": line,
            "text/html": f'<pre style="margin:0;color:{colour}">{html.escape(line)}</pre>'}


@functools.lru_cache(maxsize=1)
def _notebook_bar_class():
    import IPython.display
    from tqdm.notebook import tqdm as notebook_tqdm

    class NotebookBar(notebook_tqdm):
        """tqdm's notebook bar, shown through a display handle and replaced by text when it closes."""

        def __init__(self, *args, **kwargs):
            self._handle = None
            super().__init__(*args, **{**kwargs, "display": False})
            if not self.disable:
                self._handle = IPython.display.display(self.container, display_id=True)
                self.displayed = True

        def close(self):
            handle, self._handle = getattr(self, "_handle", None), None
            if self.disable or handle is None:
                return super().close()
            super().close()
            complete = not (self.total and self.n < self.total)
            if complete and not self.leave:
                handle.update({"text/plain": ""}, raw=True)
            else:
                handle.update(static_bundle(self, "success" if complete else "danger"), raw=True)

    return NotebookBar
