# Two entry points: `make demo` (main job on the embedded SQLite source and a
# local Prefect server) and `make test` (the whole suite). Both create .venv.
VENV ?= .venv
BIN := $(VENV)/bin

$(BIN)/usage-pipeline: pyproject.toml
	python3 -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

.PHONY: demo test
demo: $(BIN)/usage-pipeline
	$(BIN)/usage-pipeline demo

test: $(BIN)/usage-pipeline
	$(BIN)/pytest
