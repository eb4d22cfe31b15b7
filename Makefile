# The README's two commands are `make demo` and `make test`; both install what is missing.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=
DEMO_ARGS ?=

.PHONY: install test test-all demo clean bench lint format

install:
	@VENV=$(VENV) bash scripts/install.sh

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

# Style and layering: ruff (lint + format, line length 100) and the import-linter contracts
# of pyproject.toml (data <- models <- trainer; serve never imports torch, models or trainer).
lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	VENV=$(VENV) bash scripts/lint_imports.sh

format: install
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

# Everything, including the tests marked slow.
test-all: install
	$(PY) -m pytest -m "" $(PYTEST_ARGS)

demo: install
	$(VENV)/bin/recforge demo $(DEMO_ARGS)

bench: install
	$(PY) benchmarks/loader.py
	$(PY) benchmarks/prepare.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
