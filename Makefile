# Two commands for a new machine: `make demo` and `make test`. Both create .venv when missing and
# install the project into it (torch + torchvision together: the registry's CUDA builds also run on CPUs),
# every package at the version constraints.txt pins (the tested environment). `make lock` regenerates it.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.imat-installed
TORCH := torch==2.14.1 torchvision==0.29.1
CONSTRAINTS := constraints.txt
PYTEST_ARGS ?=

.PHONY: install install-gpu demo test lint bench clean lock

$(PY):
	$(PYTHON) -m venv $(VENV)

# Re-install only when the project's dependencies change; pip's download cache makes re-runs quick.
$(STAMP): pyproject.toml $(CONSTRAINTS) | $(PY)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -c $(CONSTRAINTS) $(TORCH)
	$(PY) -m pip install -c $(CONSTRAINTS) -e ".[dev]" $(TORCH)
	touch $(STAMP)

install: $(STAMP)

# A GPU box: also the TensorRT libraries matching the pinned onnxruntime-gpu (NVIDIA's index hosts the
# wheels); `imat doctor` then says which providers start and why not.
install-gpu: install
	$(PY) -m pip install --extra-index-url https://pypi.nvidia.com -c $(CONSTRAINTS) -e ".[tensorrt]" $(TORCH)
	$(VENV)/bin/imat doctor

demo: install
	$(VENV)/bin/imat demo

test: install
	$(PY) -m ruff check .
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -q $(PYTEST_ARGS)

lint: install
	$(PY) -m ruff check . && $(PY) -m ruff format --check .

# Resolve pyproject.toml afresh (newest versions its floors allow) in a scratch venv and pin the result;
# the TensorRT pin (the [tensorrt] extra, GPU boxes only) is carried over: it must match onnxruntime-gpu.
lock:
	rm -rf .lock-venv && $(PYTHON) -m venv .lock-venv
	.lock-venv/bin/python -m pip install --upgrade pip
	.lock-venv/bin/python -m pip install $(TORCH) -e ".[dev]"
	{ sed -n '/^#/p' $(CONSTRAINTS); .lock-venv/bin/python -m pip freeze --exclude-editable; \
	  grep '^tensorrt-cu' $(CONSTRAINTS); } > $(CONSTRAINTS).new
	mv $(CONSTRAINTS).new $(CONSTRAINTS) && rm -rf .lock-venv

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .lock-venv
