"""Tracking backends: what the ServerApp logs is read back from the written event file / MLflow store."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pf2lora_core.config.experiment import load
from pf2lora_core.config.schema import TrackingConfig
from pf2lora_core.run.records import RoundRecord, Summary
from pf2lora_core.run.tracking import TRACKERS, make_tracker, scalars

CONFIG = "name: demo\nseed: 3\nfederation:\n  num_clients: 2\n"
ROUNDS = [
    {
        "round": r,
        "train_loss": 1.0 / r,
        "rejected": [],
        "personalized": {"metric": "accuracy", "mean": 0.5 + r / 10, "worst": 0.4},
        "clients": {
            "0": {"personalized": {"accuracy": 0.6, "eval_loss": 0.9}, "rank": None},
            "1": {"personalized": {"accuracy": 0.7 + r / 100, "eval_loss": 0.8}, "rank": 3.5},
        },
    }
    for r in (1, 2)
]
SUMMARY = {
    "algorithm": "pf2lora",
    "personalized": {"metric": "accuracy", "mean": 0.66},
    "global": {"metric": "accuracy", "mean": 0.6},
    "cost": {"seconds_total": 9.0},
}


def _track(kind: str, run_dir: Path, **options: str) -> None:
    cfg = TrackingConfig(kind=kind, dir=options.get("dir", kind), uri="", experiment="pf2lora-test")
    tracker = make_tracker(cfg, run_dir, "run-1")
    tracker.log_config(CONFIG)
    for record in ROUNDS:
        tracker.log_round(RoundRecord.from_json(record))
    tracker.log_summary(Summary.from_json(SUMMARY))
    tracker.close()


def test_scalars_flatten_per_round_and_per_client_numbers() -> None:
    flat = dict(scalars(ROUNDS[1]))
    assert flat["personalized/mean"] == pytest.approx(0.7)
    assert flat["clients/1/personalized/accuracy"] == pytest.approx(0.72)
    assert flat["clients/1/rank"] == 3.5 and "clients/0/rank" not in flat  # None is skipped
    assert "personalized/metric" not in flat and "rejected" not in flat


def test_mlflow_file_store_holds_params_metrics_and_summary(tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    _track("mlflow", tmp_path, dir="mlruns")
    client = MlflowClient(tracking_uri=(tmp_path / "mlruns").as_uri())
    (run,) = client.search_runs([client.get_experiment_by_name("pf2lora-test").experiment_id])
    assert run.info.run_name == "run-1" and run.info.status == "FINISHED"
    assert run.data.params["seed"] == "3" and run.data.params["federation.num_clients"] == "2"
    history = client.get_metric_history(run.info.run_id, "clients/1/personalized/accuracy")
    assert [(m.step, m.value) for m in history] == [(1, pytest.approx(0.71)), (2, pytest.approx(0.72))]
    assert [m.value for m in client.get_metric_history(run.info.run_id, "train_loss")] == [1.0, 0.5]
    assert run.data.metrics["summary/personalized/mean"] == pytest.approx(0.66)
    local = Path(client.download_artifacts(run.info.run_id, "summary.json", str(tmp_path)))
    assert json.loads(local.read_text())["algorithm"] == "pf2lora"


def test_tensorboard_event_file_holds_rounds_clients_and_summary(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _track("tensorboard", tmp_path)
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train_loss")] == [(1, 1.0), (2, 0.5)]
    assert [e.value for e in events.Scalars("clients/1/personalized/accuracy")] == pytest.approx([0.71, 0.72])
    assert events.Scalars("summary/personalized/mean")[0].value == pytest.approx(0.66)
    assert {"config/text_summary", "summary/text_summary"} <= set(events.Tags()["tensors"])


def test_none_writes_nothing_and_every_kind_is_a_config_choice(tmp_path: Path) -> None:
    _track("none", tmp_path)
    assert list(tmp_path.iterdir()) == []
    for kind in TRACKERS:
        assert load([f"tracking={kind}"]).cfg.tracking.kind == kind
    with pytest.raises(ValueError, match=r"tracking\.kind"):
        make_tracker(TrackingConfig(kind="wandb", dir="", uri="", experiment=""), tmp_path, "x")
