# Two entry points (see README): `make demo` and `make test`. Both build .venv on first use.
PYTHON ?= python3
VENV ?= .venv
# Installed only when the venv has no torch yet. Our machines pin the local CPU build;
# on a GPU machine pass your own, e.g. `make demo TORCH="torch --index-url <your CUDA index>"`,
# or create $(VENV) with your torch first: an existing torch is always kept.
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: demo test lint setup

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
