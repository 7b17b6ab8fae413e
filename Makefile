# One entry point for setting up, testing and running cdul. Every target uses the
# virtual environment in .venv, which `make install` creates.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PY := $(BIN)/python
PACKAGES := proto server client export training
# The CPU machines this project is built on carry these wheels on disk; other versions of torch
# would be downloaded (several GB for a CUDA build).
TORCH_PINS := torch==2.14.1 torchvision==0.29.1

.PHONY: install test test-slow test-gpu lint format proto demo bench digits-clip clean help

help:  ## List the targets.
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | sed 's/:.*##/\t/'

$(BIN)/.installed: $(foreach p,$(PACKAGES),$(p)/pyproject.toml) requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip setuptools wheel
	$(PY) -m pip install --quiet $(TORCH_PINS)
	$(PY) -m pip install --quiet $(foreach p,$(PACKAGES),-e ./$(p)) -r requirements-dev.txt
	touch $@

install: $(BIN)/.installed  ## Create .venv and install the five distributions (editable) and the dev tools.

lint: install  ## ruff check, ruff format --check and mypy on server/ and client/.
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy server/src client/src

test: lint  ## Lint, type-check and run the test suite (no slow, gpu or trt tests).
	$(BIN)/pytest

test-slow: install  ## Run only the tests marked slow.
	$(BIN)/pytest -m slow

test-gpu: install  ## Run the gpu and trt tests; needs a CUDA GPU.
	$(BIN)/pytest -m "gpu or trt"

format: install  ## Format and auto-fix the code.
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

proto: install  ## Regenerate the Python code of the gRPC API.
	$(PY) proto/generate.py

demo: install  ## Run the main job end to end on the embedded default (about 20 minutes on 2 cores).
	$(PY) -m cdul_training.demo --out demo-output

digits-clip: install  ## Retrain digits-clip (seed 0, about 5 CPU minutes) and re-export the shipped copy.
	$(BIN)/cdul-train train-clip --out .work/digits-clip.pt --steps 1000 --seed 0 --threads 1 \
		--export server/src/cdul_server/models/digits-clip

bench: install  ## Run the benchmarks and write benchmarks/RESULTS.md.
	$(PY) benchmarks/run.py --out benchmarks/RESULTS.md

clean:  ## Remove the virtual environment and caches.
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
