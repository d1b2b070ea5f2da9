# The two commands of the README:
#   make demo   provision + start the local stack (Kafka, Postgres, OPA, LLM server) and run the demo
#   make test   provision + start the stack and run the whole test suite (what .ci/run runs)
# Both install what they need on a fresh Debian 12 machine (apt, pip, mvn, go) and are fast when already set up.

SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PILOTHOUSE := $(VENV)/bin/pilothouse

.PHONY: setup stack demo test down status

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml infra/install-prereqs.sh
	bash infra/install-prereqs.sh
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else "pilothouse needs Python 3.11 (found %s): set PYTHON=python3.11" % sys.version.split()[0])'
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[dev]'
	touch $@

stack: setup
	$(PILOTHOUSE) stack up

demo: stack
	$(PILOTHOUSE) demo

test: stack
	bash infra/run-tests.sh

status:
	$(PILOTHOUSE) stack status

down:
	$(PILOTHOUSE) stack down
