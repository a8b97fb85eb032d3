# Two commands for a new machine: `make demo` and `make test`. Both create .venv when missing and
# install the project into it (torch + torchvision together: the registry's CUDA builds also run on CPUs).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.imat-installed
TORCH := torch==2.14.1 torchvision==0.29.1
PYTEST_ARGS ?=

.PHONY: install demo test lint bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# Re-install only when the project's dependencies change; pip's download cache makes re-runs quick.
$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install $(TORCH)
	$(PY) -m pip install -e ".[dev]" $(TORCH)
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(VENV)/bin/imat demo

test: install
	$(PY) -m ruff check .
	$(PY) -m pytest -q $(PYTEST_ARGS)

lint: install
	$(PY) -m ruff check . && $(PY) -m ruff format --check .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
