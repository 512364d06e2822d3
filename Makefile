# Herald: `make run` and `make test` each do all their own set-up on a fresh machine.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: run test test-fast lint services browser screenshots bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

$(STAMP): requirements.txt | $(BIN)/python
	$(BIN)/pip install --disable-pip-version-check -q -r requirements.txt
	touch $(STAMP)

venv: $(STAMP)

# PostgreSQL and Redis for the tests: start them when they do not answer, install when missing.
services:
	@bash scripts/services.sh

browser:
	@bash scripts/browser.sh

run: $(STAMP)
	@bash scripts/run.sh

test: $(STAMP) services browser
	@bash scripts/test.sh $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python scripts/check_imports.py
	$(BIN)/python scripts/check_sizes.py

screenshots: $(STAMP) browser
	$(BIN)/python scripts/screenshots.py

clean:
	rm -rf $(VENV) instance/*.db* instance/huey.db*
