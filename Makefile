# Everything runs inside .venv, created on first use. torch is pinned to the CPU wheel this
# machine class carries (an unpinned torch would pull a multi-GB CUDA build).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	touch $@

setup: $(STAMP)

# The main job on the embedded tiny checkpoint: build it, convert it, check the conversion, and
# check the JAX port of the converted folder against the torch reference (exit 1 on failure).
demo: $(STAMP)
	rm -rf demo
	$(BIN)/mistral-tiny demo/official
	$(BIN)/mistral-convert demo/official demo/converted
	$(BIN)/mistral-convert --check demo/converted
	$(BIN)/mistral-verify --reference demo/official --converted demo/converted

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/pytest

lint: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf $(VENV) demo .pytest_cache .ruff_cache
