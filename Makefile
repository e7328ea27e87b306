# How CNNs see the world: course commands. Each target creates .venv on first use.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
NOTEBOOKS := $(sort $(wildcard notebooks/*.ipynb))

.PHONY: course lab test release lint clean help

help:
	@echo "make course   execute every lecture notebook offline, HTML to build/"
	@echo "make lab      open JupyterLab on the course"
	@echo "make test     run the whole test suite (unit, cross-checks, notebooks, grading)"
	@echo "make release  regenerate exercises/ from solutions/ with nbgrader"

# The runtime environment; re-installed when pyproject.toml changes.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e .
	touch $@

# The test environment: runtime + the dev extra (reference libraries, nbval, nbgrader).
$(VENV)/.installed-dev: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(VENV)/.installed $@

course: $(VENV)/.installed
	$(PY) -m coursekit.course $(NOTEBOOKS)

lab: $(VENV)/.installed
	$(VENV)/bin/jupyter lab notebooks/

test: $(VENV)/.installed-dev
	$(PY) -m pytest --nbval-lax --nbval-current-env --nbval-cell-timeout=900 tests notebooks solutions

release: $(VENV)/.installed-dev
	$(PY) -m coursekit.grading.release

lint: $(VENV)/.installed-dev
	$(VENV)/bin/ruff check coursekit tests benchmarks

clean:
	rm -rf build
