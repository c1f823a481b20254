# Two entry points: `make demo` (main job on the embedded SQLite source and a
# local Prefect server) and `make test` (lint, then the whole suite). Both create .venv.
VENV ?= .venv
BIN := $(VENV)/bin

$(BIN)/usage-pipeline: pyproject.toml
	python3 -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

.PHONY: demo test browser
demo: $(BIN)/usage-pipeline
	$(BIN)/usage-pipeline demo

test: $(BIN)/usage-pipeline browser
	$(BIN)/ruff check .
	$(BIN)/pytest

# tests/test_ui.py drives headless Chromium: install Debian's packages where they are missing (as root).
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver)
