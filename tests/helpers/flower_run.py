"""Tiny end-to-end runs (tiny BERT, packaged data, offline): through `flwr run .`, or the in-process engine."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

from pf2lora_core.config.keys import SUMMARY_FILE
from pf2lora_core.tools.launch import LAUNCH_MARK, flwr_run
from tests.helpers.tiny_bert import make_tiny_bert

ROOT = Path(__file__).resolve().parents[2]
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
# the end-to-end tests' shared run (tests/e2e/conftest.py): 3 clients, 2 rounds x 2 steps, audited, tracked
E2E_CLIENTS, E2E_ROUNDS, E2E_STEPS = 3, 2, 2
E2E_OVERRIDES = (
    f"rounds={E2E_ROUNDS} local_steps={E2E_STEPS} federation.audit_replies=true federation.min_train_clients=2 "
    "tracking=tensorboard"
)


def tiny_overrides(tmp_path: Path, model: Path, clients: int, overrides: str) -> str:
    return (
        f"model.source=path model.name={model} federation.num_clients={clients} task.max_examples={80 * clients} "
        f"run_dir={tmp_path / 'run'} federation.state_dir={tmp_path / 'state'} {overrides}"
    )


def tiny_demo_run(tmp_path: Path, overrides: str, clients: int = 2) -> tuple[Path, str, str]:
    """What `make demo OVERRIDES=...` runs (``python -m pf2lora_core.tools.launch demo``), in a subprocess.

    Returns (run directory, the console as the user sees it, the launch mark of its processes).
    """
    model = make_tiny_bert(tmp_path / "tiny-bert")
    mark = uuid.uuid4().hex
    env = {**os.environ, **OFFLINE, "FLWR_HOME": str(tmp_path / "flwr_home"), LAUNCH_MARK: mark}
    cmd = [
        sys.executable,
        "-m",
        "pf2lora_core.tools.launch",
        "demo",
        *tiny_overrides(tmp_path, model, clients, overrides).split(),
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    log = proc.stdout + proc.stderr
    run_dir = tmp_path / "run"
    assert proc.returncode == 0 and (run_dir / SUMMARY_FILE).exists(), log[-4000:]
    return run_dir, log, mark


def tiny_inprocess_run(tmp_path: Path, overrides: str, clients: int = 2, model: Path | None = None) -> Path:
    """The same run as ``tiny_flower_run`` through the in-process engine (``server_app.inprocess``): the
    real ServerApp, strategy and ClientApp, without a SuperLink or Ray start-up. Returns the run directory."""
    from server_app import inprocess

    model = model or make_tiny_bert(tmp_path / "tiny-bert")
    run_dir = inprocess.run(tiny_overrides(tmp_path, model, clients, overrides))
    assert run_dir == tmp_path / "run" and (run_dir / SUMMARY_FILE).exists()
    return run_dir


def tiny_flower_run(tmp_path: Path, overrides: str, clients: int = 2, model: Path | None = None) -> tuple[Path, str]:
    """Run the app on ``clients`` simulated SuperNodes; returns (run directory, log). Fails with the log's tail."""
    model = model or make_tiny_bert(tmp_path / "tiny-bert")
    run_dir = tmp_path / "run"
    full = tiny_overrides(tmp_path, model, clients, overrides)
    federation = f"num-supernodes={clients} client-resources-num-cpus=1"
    proc = flwr_run(full, federation, tmp_path / "flwr_home", ROOT, timeout=300, extra_env=OFFLINE)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0 and (run_dir / SUMMARY_FILE).exists(), log[-4000:]
    return run_dir, log
