# The README's two commands: `make demo` and `make test`. Both set up .venv from the repository's own files.
# `make test` runs the suite on the newest transformers that pyproject.toml allows (what a fresh install gets);
# `make test-oldest` on the oldest tested one (.venv-oldest); CI (.ci/run) runs both.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
OLDEST_VENV := .venv-oldest
# Keep in step with the lower bound in pyproject.toml and slimvlm/compat.py (TESTED_TRANSFORMERS_MIN).
OLDEST_TRANSFORMERS := 5.23.0
# `slimvlm eval`: lmms-eval without its own requirements (they pull torchvision, timm, wandb, ...); what its core
# imports is the [eval] extra. Keep in step with slimvlm/eval/__init__.py (LMMS_EVAL_VERSION).
LMMS_EVAL := lmms-eval==0.7.3

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# CPU torch first: an unpinned torch would pull a multi-GB CUDA build.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet --upgrade -e ".[test,quantization,bench,eval,train]"
	$(PY) -m pip install --quiet --no-deps "$(LMMS_EVAL)"
	touch $@

$(OLDEST_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(OLDEST_VENV)
	$(OLDEST_VENV)/bin/python -m pip install --quiet torch==2.13.0
	$(OLDEST_VENV)/bin/python -m pip install --quiet -e ".[test,quantization,bench,eval,train]" "transformers==$(OLDEST_TRANSFORMERS)"
	$(OLDEST_VENV)/bin/python -m pip install --quiet --no-deps "$(LMMS_EVAL)"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/slimvlm demo

test: setup
	$(PY) -m pytest -q

test-oldest: $(OLDEST_VENV)/.installed
	$(OLDEST_VENV)/bin/python -m pytest -q

test-all: test test-oldest

.PHONY: setup demo test test-oldest test-all
