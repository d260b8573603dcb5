"""Typed run records: every summary.json and metrics.jsonl the project ever published reads back and
re-writes unchanged, and a malformed one fails with one RecordError naming the file and the field."""

from __future__ import annotations

import json
import math
import re
import tarfile
from pathlib import Path

import pytest

from pf2lora_core.config.keys import METRICS_FILE, SUMMARY_FILE
from pf2lora_core.run.records import RecordError, RoundRecord, Summary, read_metrics

ROOT = Path(__file__).resolve().parents[2]
PUBLISHED = ROOT / "results" / "tune_offline_compare" / "runs.tar.gz"  # 28 runs of the tuning study


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("published")
    with tarfile.open(PUBLISHED) as tar:
        tar.extractall(out, filter="data")
    return out


def test_every_published_summary_reads_and_rewrites_unchanged(published: Path) -> None:
    paths = sorted(published.rglob(SUMMARY_FILE))
    assert len(paths) >= 20
    for path in paths:
        raw = json.loads(path.read_text())
        summary = Summary.read(path)
        assert summary.to_json() == raw, path
        assert summary.metric == raw["personalized"]["metric"] and len(summary.clients) == raw["num_clients"]


def test_every_published_metrics_line_reads_and_rewrites_unchanged(published: Path) -> None:
    paths = sorted(published.rglob(METRICS_FILE))
    assert paths
    for path in paths:
        lines = [json.loads(line) for line in path.read_text().splitlines()]
        records = read_metrics(path)
        assert [r.to_json() for r in records] == lines, path
        assert any(r.evaluated for r in records) and all(r.round == i + 1 for i, r in enumerate(records))


def _summary() -> dict:
    client = {"client": 0, "num_train": 5, "num_test": 4, "personalized": {"accuracy": 0.5}, "global": {}}
    block = {"metric": "accuracy", "mean": 0.5, "weighted_mean": 0.5, "worst": 0.5}
    return {"algorithm": "pf2lora", "clients": [client], "personalized": block, "global": dict(block, mean=None)}


def test_null_is_nan_in_memory_and_null_again_on_disk() -> None:
    summary = Summary.from_json(_summary())
    assert math.isnan(summary.global_.mean) and summary.to_json()["global"]["mean"] is None
    assert math.isnan(summary.clients[0].value("global", "accuracy"))


@pytest.mark.parametrize(
    ("edit", "field"),
    [
        (lambda s: s["clients"][0].update(num_test="4"), "clients[0].num_test"),
        (lambda s: s.pop("personalized"), "missing field 'personalized'"),
        (lambda s: s["personalized"].update(mean=[1]), "personalized.mean"),
        (lambda s: s["clients"][0].update(rank={"effective": "high"}), "clients[0].rank.effective"),
        (lambda s: s["clients"][0].update(label_histogram={"train": 3}), "clients[0].label_histogram.train"),
        (lambda s: s["clients"][0]["personalized"].update(accuracy=True), "clients[0].personalized.accuracy"),
        (lambda s: s.update(clients={"0": {}}), "clients: expected a list"),
    ],
)
def test_a_malformed_summary_names_the_field(edit, field: str) -> None:
    data = _summary()
    edit(data)
    with pytest.raises(RecordError) as err:
        Summary.from_json(data)
    assert str(err.value).startswith(SUMMARY_FILE) and field in str(err.value)


def test_a_torn_summary_file_is_a_record_error(tmp_path: Path) -> None:
    path = tmp_path / SUMMARY_FILE
    path.write_text(json.dumps(_summary())[:40])
    with pytest.raises(RecordError, match="torn"):
        Summary.read(path)


def test_a_torn_last_metrics_line_is_skipped_a_torn_middle_line_is_not(tmp_path: Path) -> None:
    line = json.dumps({"round": 1, "train": {"0": {"train_loss": 0.5}}, "aggregated": True})
    path = tmp_path / METRICS_FILE
    path.write_text(line + "\n" + line.replace("1", "2")[:25])
    assert [r.round for r in read_metrics(path)] == [1]
    path.write_text(line[:25] + "\n" + line + "\n")
    with pytest.raises(RecordError, match=re.escape(f"{METRICS_FILE}:1")):
        read_metrics(path)
    with pytest.raises(RecordError, match="client key 'x'"):
        RoundRecord.from_json({"round": 1, "train": {"x": {}}})


def test_every_evaluated_metric_has_its_own_bound() -> None:
    """A metric added to the allow-list must say its range (records.METRIC_BOUNDS), or replies carrying
    it would only be held to ANY_NUMBER."""
    from pf2lora_core.config.keys import EVAL_METRIC_NAMES, TRAIN_LOSS
    from pf2lora_core.run.records import METRIC_BOUNDS, out_of_bounds

    assert EVAL_METRIC_NAMES | {TRAIN_LOSS} <= set(METRIC_BOUNDS)
    assert out_of_bounds("accuracy", 1.0 + 1e-12) is None  # a mean of per-example scores may round up
    assert "outside [0, 1]" in (out_of_bounds("accuracy", 1e300) or "")
    assert "finite" in (out_of_bounds("train_loss", math.inf) or "")
