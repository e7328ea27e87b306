# How CNNs see the world: course commands. Each target creates .venv on first use.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
NOTEBOOKS := $(sort $(wildcard notebooks/*.ipynb))
# Test workers: one more than the available cores (nproc counts a container's or taskset's limit), at most 8,
# and no more than MemAvailable / 3 GiB (a worker peaks near 3 GB). The extra worker fills the time the others
# spend waiting (on a grading run's sleeping students, the browser, kernels starting): on 2 cores the suite kept
# the CPU 86 % busy with 2 workers and 93 % with 3. Each worker and each notebook kernel it starts keeps
# coursekit's 1-thread policy (tests/conftest.py), so the workers do not fight over cores with spinning threads.
JOBS ?= $(shell n=$$(( $$(nproc 2>/dev/null || echo 2) + 1 )); \
	m=$$(awk '/MemAvailable/ {print int($$2 / 3145728)}' /proc/meminfo 2>/dev/null); \
	[ -n "$$m" ] && [ "$$m" -lt "$$n" ] && n=$$m; [ "$$n" -lt 1 ] && n=1; [ "$$n" -gt 8 ] && n=8; echo $$n)
NBVAL := --nbval-lax --nbval-current-env --nbval-cell-timeout=900
# Whole modules (a notebook, a test file) go to one worker each (--dist loadscope), longest first: the order
# tests/scheduling.py sorts them in (--no-loadscope-reorder keeps it; xdist would sort by number of tests), so the
# lectures start at once and the short tests fill the gaps at the end.
TEST_PATHS := notebooks solutions tests

.PHONY: course lab test test-quick stability release lint clean help

help:
	@echo "make course   execute every lecture notebook offline, HTML to build/"
	@echo "make lab      open JupyterLab on the course"
	@echo "make test     run the whole test suite (unit, cross-checks, notebooks, grading, browser)"
	@echo "make test-quick  unit tests and cross-checks only (no notebooks, no grading runs, no browser)"
	@echo "make stability   run the notebooks' checked cells under several CPU kernel sets and thread counts"
	@echo "make release  regenerate exercises/ from solutions/ with nbgrader"

# Byte code: every command here caches compiled modules under the venv (.venv/pycache), even where the
# environment sets PYTHONDONTWRITEBYTECODE (this machine's CI does): without a cache, every Python process
# (test workers, notebook kernels, grading runs) compiled torch, matplotlib and Jupyter from source again, about
# 6 s of CPU each (an import of coursekit + torchvision + Jupyter's clients: 12.0 s without cached byte code,
# 5.8 s with). The source tree stays free of __pycache__ folders.
export PYTHONPYCACHEPREFIX := $(abspath $(VENV))/pycache
unexport PYTHONDONTWRITEBYTECODE

# The runtime environment; re-installed when pyproject.toml changes.
# --no-compile: pip would byte-compile every module of every package (torch alone has thousands) at install,
# 26 s of a 93 s install here; Python compiles the modules it imports on first use, cached as above.
PIP_INSTALL := $(PY) -m pip install --quiet --no-compile
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PIP_INSTALL) -e .
	touch $@

# The test environment: runtime + the dev extra (reference libraries, nbval, nbgrader).
$(VENV)/.installed-dev: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PIP_INSTALL) -e '.[dev]'
	touch $(VENV)/.installed $@

course: $(VENV)/.installed
	$(PY) -m coursekit.course $(NOTEBOOKS)

lab: $(VENV)/.installed
	$(VENV)/bin/jupyter lab notebooks/

# PYTEST_ARGS: extra pytest options, e.g. make test PYTEST_ARGS=--durations=0 (every test's and cell's time)
PYTEST_ARGS ?=
test: $(VENV)/.installed-dev
	$(PY) -m pytest -n $(JOBS) --dist loadscope --no-loadscope-reorder $(NBVAL) $(PYTEST_ARGS) $(TEST_PATHS)

# The quick loop has nothing that waits: one worker per core (a third on 2 cores made it 231 s against 179 s).
QUICK_JOBS ?= $(shell n=$$(nproc 2>/dev/null || echo 2); [ "$$n" -gt 8 ] && n=8; echo $$n)
test-quick: $(VENV)/.installed-dev
	$(PY) -m pytest -n $(QUICK_JOBS) --dist loadscope --no-loadscope-reorder -m "not slow" $(PYTEST_ARGS) tests

stability: $(VENV)/.installed-dev
	$(PY) tests/nbstability.py $(NOTEBOOKS) $(sort $(wildcard solutions/*/*.ipynb))

release: $(VENV)/.installed-dev
	$(PY) -m coursekit.grading.release

lint: $(VENV)/.installed-dev
	$(VENV)/bin/ruff check .  # the library, tests, benchmarks and the notebooks' code cells

clean:
	rm -rf build
