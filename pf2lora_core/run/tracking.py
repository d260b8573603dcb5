"""Experiment tracking (``tracking=none|tensorboard|mlflow``): config, per-round and per-client metrics, summary.

One small interface, one class per backend, chosen from ``TRACKERS`` by ``tracking.kind``. The
ServerApp feeds a tracker what it writes to the run directory anyway (config.yaml, each
metrics.jsonl record, summary.json), so the tracked values are the recorded ones. Each backend
writes under the run directory by default: TensorBoard event files in ``<run>/<tracking.dir>``,
an MLflow file store in ``<run>/<tracking.dir>`` (or ``tracking.uri``, e.g. a tracking server).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol

from omegaconf import OmegaConf

from pf2lora_core.config.keys import SUMMARY_FILE
from pf2lora_core.config.schema import TrackingConfig
from pf2lora_core.run.records import RoundRecord, Summary


class Tracker(Protocol):
    """What the ServerApp calls; every method may be called once (config, summary) or per round."""

    def log_config(self, yaml_text: str) -> None: ...

    def log_round(self, record: RoundRecord) -> None: ...

    def log_summary(self, summary: Summary) -> None: ...

    def close(self) -> None: ...


def scalars(record: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, float]]:
    """Every finite number in a nested record as ``("a/b/c", value)`` (lists, strings, None skipped).

    A metrics.jsonl record gives ``train_loss``, ``personalized/mean``, ``clients/3/personalized/accuracy``,
    ``train/3/train_loss`` and so on: the per-round and per-client metrics under stable names.
    """
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            yield from scalars(value, name + "/")
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            yield name, float(value)


class NoTracker:
    """``tracking=none``: the run directory is the only record."""

    def __init__(self, cfg: TrackingConfig, run_dir: Path, name: str) -> None:
        pass

    def log_config(self, yaml_text: str) -> None:
        pass

    def log_round(self, record: RoundRecord) -> None:
        pass

    def log_summary(self, summary: Summary) -> None:
        pass

    def close(self) -> None:
        pass


class TensorBoardTracker:
    """Scalars per round (step = round), the config and the summary as text, summary numbers at the last step."""

    def __init__(self, cfg: TrackingConfig, run_dir: Path, name: str) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run_dir / cfg.dir))
        self.step = 0

    def log_config(self, yaml_text: str) -> None:
        self.writer.add_text("config", f"```\n{yaml_text}\n```")

    def log_round(self, record: RoundRecord) -> None:
        self.step = record.round
        for name, value in scalars(record.to_json()):
            if name != "round":
                self.writer.add_scalar(name, value, self.step)
        self.writer.flush()

    def log_summary(self, summary: Summary) -> None:
        data = summary.to_json()
        self.writer.add_text("summary", f"```\n{json.dumps(data, indent=2, default=str)}\n```")
        for name, value in scalars(_summary_numbers(data), "summary/"):
            self.writer.add_scalar(name, value, self.step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class MLflowTracker:
    """One MLflow run per experiment run: params from the config, metrics per round, artifacts."""

    def __init__(self, cfg: TrackingConfig, run_dir: Path, name: str) -> None:
        # MLflow 3 refuses its file store unless asked; a local file store under the run directory
        # needs no server or database (tracking.uri selects any other store)
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow.tracking import MlflowClient

        uri = cfg.uri or (run_dir / cfg.dir).resolve().as_uri()
        self.client = MlflowClient(tracking_uri=uri)
        experiment = self.client.get_experiment_by_name(cfg.experiment)
        exp_id = experiment.experiment_id if experiment else self.client.create_experiment(cfg.experiment)
        self.run_id = self.client.create_run(exp_id, run_name=name).info.run_id
        self.status = "FAILED"  # until log_summary: a run that ends without a summary did not finish

    def log_config(self, yaml_text: str) -> None:
        flat = _flatten(OmegaConf.to_container(OmegaConf.create(yaml_text), resolve=True))
        params = {k: str(v)[:500] for k, v in flat.items()}  # MLflow's limit on a param value
        items = sorted(params.items())
        for start in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=[_param(k, v) for k, v in items[start : start + 100]])
        self.client.log_text(self.run_id, yaml_text, "config.yaml")

    def log_round(self, record: RoundRecord) -> None:
        step = record.round
        for name, value in scalars(record.to_json()):
            if name != "round":
                self.client.log_metric(self.run_id, name, value, step=step)

    def log_summary(self, summary: Summary) -> None:
        data = summary.to_json()
        for name, value in scalars(_summary_numbers(data), "summary/"):
            self.client.log_metric(self.run_id, name, value)
        self.client.log_dict(self.run_id, json.loads(json.dumps(data, default=str)), SUMMARY_FILE)
        self.status = "FINISHED"

    def close(self) -> None:
        self.client.set_terminated(self.run_id, status=self.status)


TRACKERS: dict[str, Callable[[TrackingConfig, Path, str], Tracker]] = {
    "none": NoTracker,
    "tensorboard": TensorBoardTracker,
    "mlflow": MLflowTracker,
}


def make_tracker(cfg: TrackingConfig, run_dir: Path, name: str) -> Tracker:
    """The tracker of ``tracking.kind`` for the run in ``run_dir`` (``name``: the run's name)."""
    if cfg.kind not in TRACKERS:
        raise ValueError(f"tracking.kind: choose one of {sorted(TRACKERS)}, got {cfg.kind!r}")
    return TRACKERS[cfg.kind](cfg, run_dir, name)


def _summary_numbers(summary: Mapping[str, Any]) -> dict[str, Any]:
    """The summary's headline blocks (per-client detail is already logged per round)."""
    return {k: v for k, v in summary.items() if k in ("personalized", "global", "communication", "cost")}


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, Mapping):
        out: dict[str, Any] = {}
        for key, value in obj.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): obj}


def _param(key: str, value: str) -> Any:
    from mlflow.entities import Param

    return Param(key, value)
