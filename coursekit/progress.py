"""One progress bar for every long loop of coursekit (tqdm.auto: a widget in Jupyter, text elsewhere).

``progress=False`` hides the bar. ``TQDM_DISABLE=1`` in the environment hides every bar of a run
(executing notebooks headless, CI, a grading server), read at each call. tqdm reads its ``TQDM_*``
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
        False: no bar. True: a bar unless the environment says otherwise (``TQDM_DISABLE``).
    **kwargs
        Passed to tqdm (``desc``, ``total``, ``unit``, ``leave``...).
    """
    from tqdm.auto import tqdm

    if not progress or os.environ.get("TQDM_DISABLE", "").strip().lower() in ("1", "true", "yes"):
        kwargs["disable"] = True
    return tqdm(iterable, **kwargs)
