# megatron-lst: `make test` and `make demo` set up .venv on first use, then run.
#
# TORCH pins the torch build pip installs before everything else. The default matches the CPU
# wheel this project's CI machines carry on disk; on a GPU machine pass your own, e.g.
#   make test TORCH="torch==2.11.0 --index-url <your CUDA wheel index>"
# A requirement that torch already satisfies never pulls a second (multi-GB) build.

PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: test test-fast demo demo-downstream lint compat-megatron-core clean-venv

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): setup.py | $(PY)
	$(PIP) install $(TORCH)
	$(PIP) install -e ".[dev,data,audio]"
	touch $(STAMP)

## Run the whole test suite (unit, distributed on gloo, kernels under the Triton interpreter).
test: $(STAMP)
	$(PY) -m pytest tests $(PYTEST_ARGS)

## Unit tests only (skips the multi-process and interpreter tests).
test-fast: $(STAMP)
	$(PY) -m pytest tests -m "not distributed and not slow" $(PYTEST_ARGS)

## The main job: build the demo corpus, train LST and the baseline at equal compute, evaluate.
demo: $(STAMP)
	$(PY) examples/demo/run_demo.py

## After the demo: fine-tune its two checkpoints on ASR and TTS, evaluate on held-out utterances.
demo-downstream: $(STAMP)
	$(PY) examples/demo/run_downstream.py

lint: $(STAMP)
	$(PY) -m ruff check megatron_lst kernels tools tests examples pretrain_lst.py

## megatron-core forward compatibility: the tests against the newest release (or MEGATRON_CORE=X),
## downloaded as its Python 3.12 wheel and unpacked under .cache/ (tools/megatron_core_compat.py).
compat-megatron-core: $(STAMP)
	$(PY) tools/megatron_core_compat.py $(if $(MEGATRON_CORE),--version $(MEGATRON_CORE))

clean-venv:
	rm -rf $(VENV)
