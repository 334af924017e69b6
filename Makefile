# Quick start: `make demo` runs the main job, `make test` runs the test suite.
# Both create .venv if absent. The demo installs only what it runs (torch, then the package with its
# runtime dependencies); the tests add the test extras (pytest, Lightning, transformers, ...). Each has
# its own stamp, so running one and then the other installs only the difference.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
BASE_STAMP := $(VENV)/.installed-base
TEST_STAMP := $(VENV)/.installed-test

.PHONY: setup setup-base demo test test-all bench clean

setup: $(TEST_STAMP)

setup-base: $(BASE_STAMP)

$(BASE_STAMP): pyproject.toml
	@echo "== setup 1/3: virtual environment $(VENV)"
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "== setup 2/3: torch (the CPU wheel pinned here; a bare requirement would pull a CUDA build)"
	@$(PY) -c "import torch" 2>/dev/null && echo "   torch already installed" || $(PIP) install torch==2.13.0
	@echo "== setup 3/3: training-diagnostics (editable) and its runtime dependencies"
	@$(PIP) install --progress-bar on -e .
	@$(PY) -c "import diagnostics, diagnostics.reports" && echo "== setup done"
	@touch $@

$(TEST_STAMP): $(BASE_STAMP) pyproject.toml
	@echo "== test setup: the test extras (pytest, Lightning, transformers, ...)"
	@$(PIP) install --progress-bar on -e ".[test]"
	@$(PY) -c "import pytest" && echo "== test setup done"
	@touch $@

demo: $(BASE_STAMP)
	$(VENV)/bin/tdiag demo

test: $(TEST_STAMP)
	$(PY) -m pytest -q -p no:cacheprovider

test-all: $(TEST_STAMP)
	$(PY) -m pytest -q -p no:cacheprovider -m ""

bench: $(TEST_STAMP)
	$(PIP) install -q -e ".[bench]"
	$(PY) benchmarks/curvature.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
