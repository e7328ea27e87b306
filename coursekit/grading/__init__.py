"""Exercise release and grading with nbgrader.

* :mod:`coursekit.grading.release` -- ``make release``: ``solutions/`` -> ``exercises/``.
* :mod:`coursekit.grading.cli` -- ``coursekit-grade``: grade a folder of submissions, each in its own
  sandboxed worker (:mod:`.notebook`, :mod:`.pool`, :mod:`.runner`, :mod:`.sandbox`), results to CSV
  and offline HTML feedback (:mod:`.results`, :mod:`.feedback`), submissions untouched.
* :mod:`coursekit.grading.export` -- an nbgrader export plugin for those who run nbgrader themselves.

nbgrader is a dev dependency (``pip install -e '.[dev]'``); these modules import it lazily.
"""
