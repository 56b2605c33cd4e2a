# Kiln: `make demo` builds a real image locally; `make test` runs the whole suite.
# Both set up everything they need first (idempotent, cached).

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
KILN := $(VENV)/bin/kiln
STATE := .kiln
export KUBECONFIG := $(CURDIR)/$(STATE)/kubeconfig

.PHONY: setup system python images crds cluster-up cluster-down demo demo-down test \
	unit integration e2e lint

setup: system python images

system:
	@bash scripts/setup-system.sh

python: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	@$(VENV)/bin/pip install -q --disable-pip-version-check --upgrade pip
	@$(VENV)/bin/pip install -q --disable-pip-version-check -e '.[test]'
	@touch $@

images: system python
	@$(KILN) images ensure

crds: python
	@$(KILN) crds

cluster-up: system python
	@$(KILN) cluster up --state-dir $(STATE) --crds crds

cluster-down: python
	@$(KILN) demo stop --state-dir $(STATE) || true
	@$(KILN) cluster down --state-dir $(STATE)

demo: setup cluster-up
	@$(KILN) demo run --state-dir $(STATE) --examples examples

demo-down: cluster-down

test: setup
	@bash scripts/run-tests.sh

unit: python
	@bash scripts/run-tests.sh tests/unit

integration: system python
	@bash scripts/run-tests.sh -m integration

e2e: setup
	@bash scripts/run-tests.sh -m e2e

lint: python
	@$(VENV)/bin/ruff check operator tests
	@$(VENV)/bin/ruff format --check operator tests
