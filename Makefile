# Quick start: `make demo` runs the example DAG end to end against the local sandbox;
# `make test` runs lint, format check, types and the tests; `make docs` builds the docs site
# (warnings are errors) into docs/_build/html. Each builds what it needs.
SHELL := /bin/bash
# The interpreter the venv is made with (3.11+), e.g. PYTHON=python3.12.
PYTHON ?= python3
VENV ?= .venv
# Extra requirement given to the installer, e.g. AIRFLOW_SPEC='apache-airflow==2.11.*'.
AIRFLOW_SPEC ?= apache-airflow>=2.11.0
# uv's resolution strategy: `lowest-direct` installs the oldest version every declared floor allows.
RESOLUTION ?= highest
# A constraints file for the install (uv -c), as Airflow's own are used, e.g.
# CONSTRAINTS=constraints/airflow-3.0.6.txt AIRFLOW_SPEC='apache-airflow==3.0.6' (constraints/).
CONSTRAINTS ?=
# What pytest runs (default: the whole suite), e.g. TESTS='tests/test_hook.py tests/test_provider.py'.
TESTS ?=
BIN := $(VENV)/bin
# One Airflow home per venv (.venv: .airflow, .venv-af30: .airflow-af30): a metadata database migrated
# by one Airflow version is not one another can run on.
AIRFLOW_HOME ?= $(CURDIR)/.airflow$(patsubst .venv%,%,$(notdir $(VENV)))
export AIRFLOW_HOME

.PHONY: install test lint demo bench docs clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml $(CONSTRAINTS)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(BIN)/python -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { \
		echo "$(VENV) runs $$($(BIN)/python -V 2>&1); the package needs Python 3.11+." \
			"Remove it (make clean) and run again with PYTHON=python3.11 (or a newer one)."; exit 1; }
	$(BIN)/python -m pip install --quiet --disable-pip-version-check uv
	$(BIN)/uv pip install --quiet --python $(BIN)/python --resolution $(RESOLUTION) \
		$(if $(CONSTRAINTS),-c '$(CONSTRAINTS)') -e '.[dev]' '$(AIRFLOW_SPEC)'
	touch $@

# Caches per venv: mypy's results depend on the Airflow installed, and CI runs venvs side by side.
lint: install
	$(BIN)/ruff check --cache-dir $(VENV)/.ruff_cache .
	$(BIN)/ruff format --check --cache-dir $(VENV)/.ruff_cache .
	$(BIN)/mypy --cache-dir $(VENV)/.mypy_cache

test: lint
	$(BIN)/python -m pytest -o cache_dir=$(VENV)/.pytest_cache $(TESTS)

demo: install
	$(BIN)/python -m airflow_provider_lsq.example_dags.demo

bench: install
	$(BIN)/python bench/run.py

$(VENV)/.docs-installed: $(VENV)/.installed
	$(BIN)/uv pip install --quiet --python $(BIN)/python $(if $(CONSTRAINTS),-c '$(CONSTRAINTS)') \
		-e '.[dev,docs]' '$(AIRFLOW_SPEC)'
	touch $@

docs: $(VENV)/.docs-installed
	$(BIN)/python -m sphinx -W --keep-going -n -b html -d docs/_build/doctrees docs docs/_build/html

clean:
	rm -rf $(VENV) .airflow .airflow-test .pytest_cache .mypy_cache .ruff_cache docs/_build
