"""Every benchmark's ``--smoke`` run (issue 26: no benchmark can rot unseen).

Each benchmark runs as its user runs it, ``python -m benchmarks.<name> --smoke``, in a subprocess:
tiny sizes, its own code path, then its own checks that its numbers mean something (the
``smoke_checks`` / ``smoke`` of each module); it must exit 0 with ``SMOKE <name>: ok`` as its last
line. ``make bench-smoke`` runs this file alone.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
slow = pytest.mark.slow
BENCHMARKS = [
    "step_cost",
    "round_cost",
    "update_norm",
    "pooling",
    "robustness",
    "scale",  # in-process only at smoke size (8 and 64 clients, tiny BERT): no flwr start-up
    pytest.param("results", marks=slow),  # 23 tiny federated runs
    "cross_device",  # 5 tiny runs of 8 clients, 2 a round
    pytest.param("gpu", marks=slow),  # its dry run: two models, two precisions
    pytest.param("round_overhead", marks=slow),  # a real flwr run (SuperLink and Ray start-up)
]


def test_every_benchmark_has_a_smoke_test() -> None:
    names = {p if isinstance(p, str) else p.values[0] for p in BENCHMARKS}
    modules = {p.stem for p in (ROOT / "benchmarks").glob("*.py")} - {"__init__", "federated", "smoke"}
    assert names == modules  # federated: the library of results and robustness; smoke: the helpers


@pytest.mark.parametrize("name", BENCHMARKS)
def test_smoke(name: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", f"benchmarks.{name}", "--smoke"],
        cwd=ROOT,
        env={**os.environ, **OFFLINE},
        capture_output=True,
        text=True,
        timeout=300,
    )
    log = (proc.stdout + proc.stderr)[-4000:]
    lines = proc.stdout.strip().splitlines()
    assert proc.returncode == 0, log
    assert lines and lines[-1].startswith(f"SMOKE {name}: ok"), log


@pytest.mark.parametrize("name", ["pf2lora", "homlora"])
def test_step_cost_benchmarks_the_shipped_configuration(name: str) -> None:
    from benchmarks.step_cost import shipped_params
    from pf2lora_core.config.experiment import load

    assert shipped_params(name, 7) == load([f"algorithm={name}", "local_steps=7"]).algorithm.params
