"""One progress bar for every long loop of coursekit (tqdm.auto: a widget in Jupyter, text elsewhere).

``progress=False`` hides the bar. ``TQDM_DISABLE=1`` or ``COURSEKIT_STATIC=1`` in the environment
hides every bar of a run, read at each call: ``COURSEKIT_STATIC=1`` is how notebooks are executed
headless to be saved or rendered (``make course``), and a bar in a saved file is a stale
"0%| | 0/162" forever. tqdm reads its ``TQDM_*``
variables once, when it is imported, and only for arguments a call does not pass; every coursekit
loop passed ``disable=not progress``, so the variable had no effect.
"""

from __future__ import annotations

import os

__all__ = ["progress_bar"]


def progress_bar(iterable=None, *, progress: bool = True, **kwargs):
    """``tqdm.auto.tqdm(iterable, **kwargs)``, hidden when ``progress`` is false.

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

    if not progress or any(os.environ.get(var, "").strip().lower() in ("1", "true", "yes")
                           for var in ("TQDM_DISABLE", "COURSEKIT_STATIC")):
        kwargs["disable"] = True
    return tqdm(iterable, **kwargs)
