"""Exercise release and grading with nbgrader.

* :mod:`coursekit.grading.release` -- ``make release``: ``solutions/`` -> ``exercises/``.
* :mod:`coursekit.grading.cli` -- ``coursekit-grade``: grade a folder of submissions, results to CSV
  and per-student HTML feedback, submissions untouched.

nbgrader is a dev dependency (``pip install -e '.[dev]'``); these modules import it lazily.
"""
