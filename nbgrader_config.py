"""nbgrader configuration of the course: ``solutions/`` is the source, ``exercises/`` the release.

``make release`` (``python -m coursekit.grading.release``) reads this file; so does ``nbgrader``
run by hand in this folder. Grading a folder of submissions is ``coursekit-grade``
(``python -m coursekit.grading.cli``), which builds its own temporary course directory with these
settings, so the repository never holds a gradebook or student files.
"""

import os

c = get_config()  # noqa: F821 -- provided by nbgrader/traitlets when it loads this file

# ---- course layout: {root}/solutions/<set>/<set>.ipynb -> {root}/exercises/<set>/<set>.ipynb
c.CourseDirectory.root = os.path.dirname(os.path.abspath(__file__))
c.CourseDirectory.source_directory = "solutions"
c.CourseDirectory.release_directory = "exercises"

# ---- what students get in place of a solution
c.ClearSolutions.begin_solution_delimeter = "BEGIN SOLUTION"  # (sic: nbgrader's spelling)
c.ClearSolutions.end_solution_delimeter = "END SOLUTION"
c.ClearSolutions.code_stub = {"python": "# YOUR CODE HERE\nraise NotImplementedError()"}
c.ClearSolutions.text_stub = "YOUR ANSWER HERE"
c.ClearSolutions.enforce_metadata = True  # solution regions only in cells marked as solutions

# ---- autograding: every cell gets at most this many seconds; a cell that runs longer is
# interrupted (the student's infinite loop costs that exercise, not the rest of the notebook)
c.ExecutePreprocessor.timeout = 60
c.Execute.timeout = 60
c.Execute.interrupt_on_timeout = True
# (nbgrader's Execute always continues after an error: a crashing cell costs its own points only)
# a check cell a student deleted is put back (and graded) instead of silently missing
c.OverwriteCells.add_missing_cells = True
