# mlcls developer tasks. `make demo` and `make test` work on a fresh machine
# with Python 3.11, pip and gcc: they create .venv and install what they need.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-fast lint demo-bundle bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first, pinned: these wheels come from this machine's local index;
	# an unpinned torch would download a multi-GB CUDA build.
	$(BIN)/python -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $(STAMP)

demo: setup
	$(BIN)/mlcls tag examples/images --out tags/
	$(BIN)/python -c "import polars as pl; print(pl.read_delta('tags/').select('uri', 'labels', 'error').sort('uri'))"

test: setup
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

lint: setup
	$(BIN)/ruff check .

demo-bundle: setup
	$(BIN)/python -m mlcls.demo

clean:
	rm -rf tags/ .pytest_cache .ruff_cache build dist *.egg-info
