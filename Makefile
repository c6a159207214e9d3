# The README's commands. Everything the project needs is installed here, never by hand.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test lint bench mutate clean

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

# Two pytest workers (pytest-xdist): on this project's 2-core machines the suite took 104-130 s in fresh clones instead of 163 s serially;
# a single file or test runs alone with `.venv/bin/python -m pytest tests/FILE`.
test: install
	$(BIN)/ruff check preftune tests bench examples tools
	$(BIN)/python -m pytest tests -n 2

lint: install
	$(BIN)/ruff check preftune tests bench examples tools

bench: install
	$(BIN)/pip install --quiet -e '.[bench]'
	$(BIN)/python bench/run.py

# Mutation testing of the core modules (mutmut, config in pyproject.toml), one module at a time so a slow one
# cannot starve the rest, each run capped at MUTATE_TIMEOUT seconds. Every mutant of a recipe or log-prob function
# costs training runs, so those two are sampled (every MUTATE_EVERY-th mutant, a fixed sample; 1 = all).
# Writes mutation-report.md (score per module, the mutants not killed); tools/MUTATION.md explains the
# survivors. Too slow for CI.
MUTATE_MODULES ?= preftune.losses preftune.data.collate preftune.data.tokenize preftune.objectives \
	preftune.modeling.reference preftune.outputs.checkpoint
MUTATE_SAMPLED ?= preftune/logprobs.py preftune/recipe.py
MUTATE_EVERY ?= 4
MUTATE_JOBS ?= 2
MUTATE_TIMEOUT ?= 3600

mutate: install
	$(BIN)/pip install --quiet -e '.[mutate]'
	for m in $(MUTATE_MODULES); do \
		OMP_NUM_THREADS=1 timeout $(MUTATE_TIMEOUT) $(BIN)/mutmut run --max-children $(MUTATE_JOBS) "$$m.*" \
			|| echo "mutmut run $$m stopped (exit $$?)"; \
	done
	OMP_NUM_THREADS=1 timeout $(MUTATE_TIMEOUT) $(BIN)/mutmut run --max-children $(MUTATE_JOBS) \
		$$($(BIN)/python tools/mutation_sample.py $(MUTATE_EVERY) $(MUTATE_SAMPLED)) || echo "sampled run stopped"
	$(BIN)/mutmut results --all true | $(BIN)/python tools/mutation_report.py > mutation-report.md
	cat mutation-report.md

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache mutants mutation-report.md
