# Everything runs inside .venv, created on first use. torch is pinned to the CPU wheel this
# machine class carries (an unpinned torch would pull a multi-GB CUDA build).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-fast gpu-check device-wheels lint clean

# `make setup GPU=1` (on a machine with an NVIDIA driver): CUDA builds of torch (from
# TORCH_INDEX) and of JAX (`jax[cuda12]`) instead of the CPU wheels.
GPU ?=
TORCH_INDEX ?= https://download.pytorch.org/whl/cu128

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
ifeq ($(GPU),1)
	$(BIN)/pip install -q torch==2.13.0 --index-url $(TORCH_INDEX)
	$(BIN)/pip install -q -e '.[test,gpu]'
else
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
endif
	touch $@

setup: $(STAMP)

# The main job on the embedded tiny checkpoint: build it, convert it, check the conversion, and
# verify the JAX port of the converted folder against the torch reference; the report lands in
# reports/mistral-tiny-jax-bfloat16-cpu/ (exit 1 on a parity failure).
demo: $(STAMP)
	rm -rf demo
	$(BIN)/mistral-tiny demo/mistral-tiny --weights trained-like
	$(BIN)/mistral-convert demo/mistral-tiny demo/mistral-tiny-jax
	$(BIN)/mistral-convert --check demo/mistral-tiny-jax
	$(BIN)/mistral-verify demo/mistral-tiny demo/mistral-tiny-jax --peer hf

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/pytest

# The quick loop while editing (under a minute on 2 cores): the unit tests; the tests marked
# slow (whole-model parity, verify runs, gate calibration, sharding, the docs' python blocks)
# are left out. CI runs `make test`, which runs everything.
test-fast: $(STAMP)
	$(BIN)/pytest -m "not slow"

# The prepared GPU check (benchmarks/gpu_check.py): tests, a 7B-shaped checkpoint built on the
# machine, convert, verify streamed and whole, decode vs the HBM roofline; results in OUT.
OUT ?= gpu-check
gpu-check: $(STAMP)
	$(BIN)/python benchmarks/gpu_check.py $(OUT)

# The lent GPU machine reaches no index: the packages it lacks (mistral-common and its pydantic
# and jsonschema needs, beartype) travel as pinned cp312 wheels in .whl/, carried by the device
# tool; benchmarks/device/run.sh installs them there offline (benchmarks/device/README.md).
device-wheels:
	$(PYTHON) benchmarks/device/wheels.py

lint: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf $(VENV) demo .pytest_cache .ruff_cache
