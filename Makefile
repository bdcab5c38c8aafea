# The README's two commands: `make demo` and `make test`. Both set up .venv from the repository's own files.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# CPU torch first: an unpinned torch would pull a multi-GB CUDA build.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[test,quantization,bench]"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/slimvlm demo

test: setup
	$(PY) -m pytest -q

.PHONY: setup demo test
