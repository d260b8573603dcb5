"""``resume=<run dir>``: continue a run that was killed after some round from its last checkpoint.

The resumed run is the same experiment: its config is the one the checkpoint recorded (the
resolved config the run started with), its run directory is the same (so the clients find their
private adapters under the same run key), and ``metrics.jsonl`` is cut back to the rounds the
checkpoint covers (a round that finished after the last checkpoint is run again).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from pf2lora_core.config.experiment import Experiment, from_yaml
from pf2lora_core.config.keys import METRICS_FILE
from pf2lora_core.federation.checkpoint import SERVER_STATE_DIR, ServerCheckpoint, load_latest
from pf2lora_core.run.run_dir import RunDir, atomic_write_bytes

log = logging.getLogger("pf2lora.server")


def recorded_experiment(run_dir: Path) -> tuple[Experiment, ServerCheckpoint]:
    """The experiment and newest loadable checkpoint of ``run_dir``; FileNotFoundError / ValueError if unusable.

    Checkpoints are tried newest first: a torn newest one is skipped (with a warning naming it and
    why) and the run continues from the one before.
    """
    if not run_dir.is_dir():
        raise FileNotFoundError(f"no run directory at {run_dir}")
    ckpt, skipped = load_latest(run_dir / SERVER_STATE_DIR)
    for reason in skipped:
        log.warning("resume: skipping checkpoint: %s", reason)
    if ckpt is None and skipped:
        raise ValueError(f"no server checkpoint in {run_dir / SERVER_STATE_DIR} loads: {'; '.join(skipped)}")
    if ckpt is None:
        raise FileNotFoundError(
            f"{run_dir / SERVER_STATE_DIR} holds no server checkpoint (round_XXXX.safetensors): "
            "the run stopped before its first round finished; start it afresh"
        )
    return from_yaml(ckpt.config_yaml), ckpt


def load_resume(run_dir: Path) -> tuple[Experiment, RunDir, ServerCheckpoint]:
    """Experiment, run directory (metrics cut back to the checkpoint) and latest checkpoint."""
    exp, ckpt = recorded_experiment(run_dir)
    truncate_metrics(run_dir / METRICS_FILE, ckpt.round)
    return exp, RunDir(run_dir), ckpt


def truncate_metrics(path: Path, last_round: int) -> None:
    """Keep the metrics.jsonl lines of rounds <= ``last_round`` (atomically); no file: nothing."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a half-written last line of the killed run
        if int(record.get("round", 0)) <= last_round:
            keep.append(line)
    atomic_write_bytes(path, ("".join(f"{line}\n" for line in keep)).encode())
