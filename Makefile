# The README's commands. Everything the project needs is installed here, never by hand.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test lint bench clean

install: $(STAMP)

# torch first and pinned: an unpinned torch would pull a multi-GB CUDA build; 2.13.0 is a CPU build on disk.
$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

# The demo lives in examples/news_demo, outside the package; flags through DEMO_ARGS, e.g.
# `make demo DEMO_ARGS="--overwrite"` to replace an earlier run in runs/demo.
demo: install
	$(BIN)/python -m examples.news_demo $(DEMO_ARGS)

test: install
	$(BIN)/ruff check preftune tests bench examples
	$(BIN)/python -m pytest tests

lint: install
	$(BIN)/ruff check preftune tests bench examples

bench: install
	$(BIN)/pip install --quiet -e '.[bench]'
	$(BIN)/python bench/run.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
