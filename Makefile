# Two entry points (see README): `make demo` and `make test`. Both build .venv on first use.
# `make test-floor`: the same suite on the lowest versions pyproject.toml allows, in .venv-floor (CI runs both).
PYTHON ?= python3
VENV ?= .venv
# Installed only when the venv has no torch yet. Our machines pin the local CPU build;
# on a GPU machine pass your own, e.g. `make demo TORCH="torch --index-url <your CUDA index>"`,
# or create $(VENV) with your torch first: an existing torch is always kept.
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
FLOOR_VENV ?= .venv-floor

.PHONY: demo test test-floor lint setup

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

demo: setup
	$(BIN)/ivl demo

test: setup
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check .
	$(BIN)/python tools/check_layers.py

# Every dependency and dev tool pinned to its floor (tools/floor_pins.py reads them from pyproject.toml) except torch,
# which is the same TORCH as the main venv's (the local CPU build here): torch's floor from PyPI pulls GB of CUDA wheels.
$(FLOOR_VENV)/.installed: pyproject.toml tools/floor_pins.py
	test -x $(FLOOR_VENV)/bin/python || $(PYTHON) -m venv $(FLOOR_VENV)
	$(FLOOR_VENV)/bin/python tools/floor_pins.py > $(FLOOR_VENV)/floor-pins.txt
	$(FLOOR_VENV)/bin/python -m pip install -q --upgrade pip
	$(FLOOR_VENV)/bin/python -c "import torch" 2>/dev/null || $(FLOOR_VENV)/bin/python -m pip install -q $(TORCH)
	$(FLOOR_VENV)/bin/python -m pip install -q -c $(FLOOR_VENV)/floor-pins.txt -e ".[dev]"
	touch $@

test-floor: $(FLOOR_VENV)/.installed
	$(FLOOR_VENV)/bin/python -m pytest -q
