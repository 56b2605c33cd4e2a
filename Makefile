# Kiln: `make demo` builds a real image locally; `make test` runs the whole suite.
# Both set up everything they need first (idempotent, cached).

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
KILN := $(VENV)/bin/kiln
# The control plane and demo tooling live beside the operator package, not in it (devtools/).
DEVTOOLS := PYTHONPATH=devtools $(VENV)/bin/python -m kiln_devtools
STATE := .kiln
export KUBECONFIG := $(CURDIR)/$(STATE)/kubeconfig

.PHONY: setup system python images crds cluster-up cluster-down demo demo-down test \
	unit integration e2e e2e-slow chaos windows lint bench bench-quick bench-setup

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
	@$(DEVTOOLS) cluster up --state-dir $(STATE) --crds crds

cluster-down: python
	@$(DEVTOOLS) demo stop --state-dir $(STATE) || true
	@$(DEVTOOLS) cluster down --state-dir $(STATE)

demo: setup cluster-up
	@$(DEVTOOLS) demo run --state-dir $(STATE) --examples examples

demo-down: cluster-down

test: setup
	@bash scripts/run-tests.sh

unit: python
	@bash scripts/run-tests.sh tests/unit

integration: system python
	@bash scripts/run-tests.sh -m integration

e2e: setup
	@bash scripts/run-tests.sh -m "e2e and not slow and not chaos"

e2e-slow: setup
	@bash scripts/run-tests.sh -m slow

# The full chaos suite (tests/chaos.py): 20 local and 10 azure builds with the operator
# killed, VMs frozen and cloud faults; about an hour, not part of `make test`.
# CHAOS_SEED=N picks another seed; the figures also go to .kiln/chaos-report.txt.
chaos: setup
	@mkdir -p $(STATE) && CHAOS_REPORT=$(CURDIR)/$(STATE)/chaos-report.txt bash scripts/run-tests.sh -m chaos tests/e2e/test_chaos.py

windows: setup
	@bash scripts/run-tests.sh -m windows

lint: python
	@$(VENV)/bin/ruff check operator devtools tests bench
	@$(VENV)/bin/ruff format --check operator devtools tests bench

# Benchmarks (bench/README.md): side-by-side figures, not part of `make test`.
# BENCH_ARGS passes options, e.g. BENCH_ARGS="--only capture --vm-lock /tmp/kiln-vm.lock".
BENCH_ARGS ?=

bench-setup: setup
	@bash scripts/setup-bench.sh

bench: bench-setup
	@PYTHONPATH=devtools $(VENV)/bin/python -m bench --size full $(BENCH_ARGS)

bench-quick: bench-setup
	@PYTHONPATH=devtools $(VENV)/bin/python -m bench --size quick --json bench/results-quick.json $(BENCH_ARGS)
