# Two commands for a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv test test-fast lint demo bench clean

venv: $(STAMP)

# Reinstall when the package metadata or the pinned versions change.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	$(BIN)/python -m pytest

# Inner loop: only the tests that start no TensorFlow (no lint, no model). `--no-tf` is defined
# in tests/conftest.py: it deselects the tests marked `tf` (training, inference, export, ...)
# and makes importing TensorFlow an error. `make test` (the full suite) is what CI runs.
test-fast: $(STAMP)
	$(BIN)/python -m pytest --no-tf

demo: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" bash examples/quickstart.sh

bench: $(STAMP)
	$(BIN)/python benchmarks/run_all.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
