# The README's two commands: `make pipeline` and `make test`. Both create .venv when missing and install into it
# with the exact versions of constraints.txt; an install is skipped while pyproject.toml and constraints.txt are
# unchanged (stamp files keyed on their hash), so the edit-test loop stays fast.

SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
PYPROJECT_HASH := $(shell cat pyproject.toml constraints.txt | sha256sum | cut -c1-16)
RUNTIME_STAMP := $(VENV)/.installed-runtime-$(PYPROJECT_HASH)
TEST_STAMP := $(VENV)/.installed-test-$(PYPROJECT_HASH)
PIP_FLAGS := -q --disable-pip-version-check
CONSTRAINTS := -c constraints.txt
export NO_ALBUMENTATIONS_UPDATE := 1
export MLFLOW_ENABLE_TELEMETRY := false
export DO_NOT_TRACK := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS := 120

.PHONY: pipeline test install install-test lint bench clean-artifacts

# The whole job: the Prefect flow over the DVC stages (flows/pipeline.py); a rerun skips what did not change.
pipeline: $(RUNTIME_STAMP)
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) -m flows.pipeline

test: $(TEST_STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/pytest

install: $(RUNTIME_STAMP)
install-test: $(TEST_STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install $(PIP_FLAGS) --upgrade pip setuptools wheel

$(RUNTIME_STAMP): pyproject.toml constraints.txt | $(PY)
	$(PY) -m pip install $(PIP_FLAGS) $(CONSTRAINTS) -e .
	rm -f $(VENV)/.installed-runtime-*
	touch $@

$(TEST_STAMP): pyproject.toml constraints.txt | $(PY)
	$(PY) -m pip install $(PIP_FLAGS) $(CONSTRAINTS) -e '.[test]'
	rm -f $(VENV)/.installed-test-* $(VENV)/.installed-runtime-*
	touch $(RUNTIME_STAMP) $@

lint: $(TEST_STAMP)
	$(VENV)/bin/ruff check .

clean-artifacts:
	rm -rf data models reports mlruns mlartifacts mlflow.db dvc.lock .dvc/cache .dvc/tmp
