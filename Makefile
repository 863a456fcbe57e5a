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

.PHONY: pipeline test install install-test lint bench clean-artifacts gpu-check gpu-wheels stack stack-down

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

# The team stack on this machine (infra/local/stack.py, README "Run it on your team's stack"): PostgreSQL, an S3 API
# (moto), MLflow (basic auth), Prefect (API auth) with its worker and the two deployments, Dask; 127.0.0.1 only, data
# in $(STACK_HOME). It installs nothing: a missing package is named with the command that installs it.
STACK_HOME ?= .stack
STACK_REPO ?= .

stack:
	@test -x $(PY) || { echo "error: $(VENV) is missing: make install-test" >&2; exit 1; }
	@$(PY) infra/local/stack.py up --home $(STACK_HOME) --repo $(STACK_REPO)

stack-down:
	@test -x $(PY) || { echo "error: $(VENV) is missing: nothing of the stack can be running" >&2; exit 1; }
	@$(PY) infra/local/stack.py down --home $(STACK_HOME)

# Everything the pipeline made in this checkout, dvc.lock included (this checkout's record of what ran here: not
# committed). Refused while a killed run's one-off overrides are still in params.yaml: .dvc/tmp holds your file.
RUN_PARAMS := .dvc/tmp/run-params
clean-artifacts:
	@test ! -e $(RUN_PARAMS)/params.applied.yaml || { echo "error: params.yaml still holds the one-off overrides \
	of a run that was killed; your own file is $(RUN_PARAMS)/params.user.yaml (the next clip-pipeline run puts it \
	back): nothing removed" >&2; exit 1; }
	rm -rf data models reports mlruns mlartifacts mlflow.db dvc.lock .dvc/cache .dvc/tmp

# The GPU check (benchmarks/gpu_check.py, issue 26). On the GPU machine (python3 there holds torch 2.11; no registry):
#   make gpu-check OUT=$OUT          (the device tool's run, carrying .whl)
# Here, first: `make gpu-wheels` (what that python3 lacks, for CPython 3.12 x86-64, versions from constraints.txt),
# then `make gpu-check DRY_RUN=1 OUT=DIR`: every step on tiny models on the CPU, in .venv-gpu-dry (Python 3.12,
# torch 2.11 + torchvision 0.26 from PyPI, the CUDA libraries torch links from this machine's index, and
# benchmarks/gpu_machine_packages.txt: what the GPU machine has), so that a missing wheel shows up here.
OUT ?= .gpu-check
DRY_RUN ?=
PYTHON312 ?= $(shell command -v python3.12 2>/dev/null || ls /root/.pyenv/versions/3.12*/bin/python3.12 2>/dev/null | head -1)
GPU_DRY_VENV := .venv-gpu-dry
GPU_WHEELS = $(shell grep -iE '^(pydantic|pydantic_core|annotated-types|typing-inspection|typing_extensions|open_clip_torch|ftfy|wcwidth)==' constraints.txt)
GPU_PLATFORMS := --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64

gpu-wheels:
	rm -rf .whl
	python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		$(GPU_PLATFORMS) -d .whl $(GPU_WHEELS)
	@du -ch .whl/*.whl | tail -1

$(GPU_DRY_VENV)/.installed: benchmarks/gpu_machine_packages.txt
	rm -rf $(GPU_DRY_VENV)
	$(PYTHON312) -m venv $(GPU_DRY_VENV)
	$(GPU_DRY_VENV)/bin/pip install $(PIP_FLAGS) --no-deps torch==2.11.0 torchvision==0.26.0
	grep -E '^nvidia-' constraints.txt | xargs $(GPU_DRY_VENV)/bin/pip install $(PIP_FLAGS) --no-deps
	$(GPU_DRY_VENV)/bin/pip install $(PIP_FLAGS) -r benchmarks/gpu_machine_packages.txt
	touch $@

ifeq ($(DRY_RUN),1)
gpu-check: $(GPU_DRY_VENV)/.installed
	PYTHONPATH=. $(GPU_DRY_VENV)/bin/python benchmarks/gpu_check.py --dry-run --out $(OUT)
else
gpu-check:
	PYTHONPATH=. python3 benchmarks/gpu_check.py --out $(OUT)
endif
