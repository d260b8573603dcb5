#!/usr/bin/env bash
# The prepared device check (issue 17), for the project's lent GPU machine (its own torch, no network).
#
#   bash benchmarks/gpu_device.sh fetch   # here, once: wheels the device image lacks, into .whl/ (in .gitignore)
#   bash benchmarks/gpu_device.sh run     # there (device tool: carry [".whl"], timeout_s 600): one JSON line
#
# The device image has torch, transformers, peft, pyarrow, pandas, matplotlib, seaborn and tqdm, but
# not these pure-Python packages that pf2lora_core imports (about 2 MB together). The flwr part needs
# flwr, Ray (a wheel larger than one transfer), the demo's data and its 80 MB model package: it is
# skipped there, and benchmarks.gpu says so in its JSON.
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=(omegaconf==2.3.0 datasets==4.8.5 dill==0.4.1 multiprocess==0.70.19 flwr-datasets==0.6.1 peft==0.21.2)
case "${1:-}" in
  fetch)
    "${PYTHON:-python3}" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      -d .whl "${WHEELS[@]}"
    "${PYTHON:-python3}" -m pip download -q --no-deps --no-binary=:all: -d .whl antlr4-python3-runtime==4.9.3  # sdist only
    ls -la .whl ;;
  run)
    # --no-build-isolation: antlr4's sdist builds with the image's own setuptools (no index there)
    python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --no-cache-dir \
      --target /tmp/site .whl/*
    export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
    nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv || true
    out="${OUT:-/tmp}"
    # SIGTERM at the limit: the check stops what it started and still writes its JSON line (exit 1)
    rc=0; timeout 560 python3 -m benchmarks.gpu > "$out/gpu.json" 2> "$out/gpu.log" || rc=$?
    tail -40 "$out/gpu.log"; cat "$out/gpu.json"; exit "$rc" ;;
  *) echo "usage: bash benchmarks/gpu_device.sh fetch|run" >&2; exit 2 ;;
esac
