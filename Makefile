# `make demo` and `make test` set up .venv on first use (the next machine is bare).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench notebooks clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m models.vae

lint: $(STAMP)
	$(BIN)/ruff check .

test: lint
	$(BIN)/python -m pytest -q -n 2 tests

bench: $(STAMP)
	$(BIN)/python -m benchmarks.vae_step
	$(BIN)/python -m benchmarks.logreg_steps
	$(BIN)/python -m benchmarks.enum_scaling
	$(BIN)/python -m benchmarks.air_epoch
	$(BIN)/python -m benchmarks.exact_marginal
	$(BIN)/python -m benchmarks.scaling

notebooks: $(STAMP)
	$(BIN)/jupyter execute --inplace --timeout=1800 notebooks/*.ipynb

clean:
	rm -rf $(VENV)
