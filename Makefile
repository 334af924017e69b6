# Quick start: `make demo` runs the main job, `make test` runs the test suite.
# Both create .venv if absent and install the package into it first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-all bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first: the CPU wheel pinned here is on local disk; a bare requirement would pull a CUDA build
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

demo: setup
	$(VENV)/bin/tdiag demo

test: setup
	$(PY) -m pytest -q -p no:cacheprovider

test-all: setup
	$(PY) -m pytest -q -p no:cacheprovider -m ""

bench: setup
	$(PY) -m pip install -q -e ".[bench]"
	$(PY) benchmarks/curvature.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
