"""Exercise release and grading with nbgrader.

* :mod:`coursekit.grading.release` -- ``make release``: ``solutions/`` -> ``exercises/``.
* :mod:`coursekit.grading.cli` -- ``coursekit-grade``: grade a folder of submissions, each in its own
  sandboxed worker (:mod:`.notebook`, :mod:`.pool`, :mod:`.runner`, :mod:`.sandbox`) with a judge
  process that computes the verdicts where no student code runs (:mod:`.judge`, :mod:`.wire`),
  results to CSV, offline HTML feedback and class analytics (:mod:`.results`, :mod:`.feedback`,
  :mod:`.analytics`), submissions untouched.
* :mod:`coursekit.grading.export` -- an nbgrader export plugin for those who run nbgrader themselves.

nbgrader is a dev dependency (``pip install -e '.[dev]'``); these modules import it lazily.
"""
