# The README's commands. Everything runs from a virtual environment at .venv, created on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
NPROC ?= 2
SPEC ?= specs/digits.yaml
# One thread per worker: on a laptop the workers share its cores (torchrun would set it and warn).
export OMP_NUM_THREADS ?= 1

.PHONY: setup demo train test test-fast clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

## demo: pretrain on the built-in digits with 2 torchrun workers on the CPU
demo: train

## train: any spec on this machine, e.g. make train SPEC=specs/cifar10.yaml NPROC=8
train: setup
	$(BIN)/torchrun --standalone --nproc-per-node $(NPROC) -m service train $(SPEC)

## test: the whole suite (unit, multi-process, end-to-end)
test: setup
	$(BIN)/python -m pytest

## test-fast: the unit tests only
test-fast: setup
	$(BIN)/python -m pytest -m "not slow"

clean:
	rm -rf $(VENV) runs .pytest_cache
