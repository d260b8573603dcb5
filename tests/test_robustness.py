"""benchmarks/robustness.py: its data, its protocol (validation chooses, test reports), its log."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from benchmarks import robustness


def test_rt3_csv_has_three_labels_without_duplicates(tmp_path: Path) -> None:
    path = robustness.rt3_csv(tmp_path)
    with path.open(encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    labels = {r["label"] for r in rows}
    assert labels == {"fresh", "rotten", "plot"}
    texts = [r["text"] for r in rows]
    assert len(texts) == len(set(texts)) > 12000  # 12.7k fresh/rotten + ~1.1k plot, deduplicated
    assert robustness.rt3_csv(tmp_path) == path  # built once


def _fake(val: float, test: float) -> dict:
    return {
        "seconds": 0.0,
        "metric": "accuracy",
        "validation": {"personalized": val, "global": val},
        "test": {"personalized": test, "global": test},
    }


def test_setting_line_chooses_on_validation_and_reports_test(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # PF2LoRA: default, x1/3, x3; HOMLoRA: x1, x1/2, x2 (robustness.grids)
    results = {
        ("pf2lora", 0): _fake(0.70, 0.60),
        ("pf2lora", 1): _fake(0.80, 0.55),  # best on validation, worse on test: still the tuned one
        ("pf2lora", 2): _fake(0.60, 0.90),  # best on test: never chosen
        ("homlora", 0): _fake(0.50, 0.50),
        ("homlora", 1): _fake(0.65, 0.62),
        ("homlora", 2): _fake(0.40, 0.99),
    }
    grid = robustness.grids("rt2_s0.5")
    index = {tuple(o): (arm, i) for arm, configs in grid.items() for i, o in enumerate(configs)}
    monkeypatch.setattr(
        robustness, "run_config", lambda s, o, sizes, log, cache: {**results[index[tuple(o)]], "overrides": o}
    )
    line = robustness.setting_line("rt2_s0.5", robustness.QUICK, robustness.Log(tmp_path / "log.jsonl"), tmp_path)
    assert line["pf2lora_tuned"]["config"] == " ".join(grid["pf2lora"][1])
    assert line["homlora_tuned"]["config"] == " ".join(grid["homlora"][1])
    assert line["gap_to_tuned"] == pytest.approx(-5.0)  # 55 - 60 points
    assert line["gap_to_homlora"] == pytest.approx(2.0)  # 62 - 60: more than 1 point below HOMLoRA
    assert line["meets_targets"] is False
    json.dumps(line)  # one JSON line


def test_log_reuses_finished_runs(tmp_path: Path) -> None:
    path = tmp_path / "runs.jsonl"
    calls = []
    first = robustness.Log(path).get("k", lambda: calls.append(1) or _fake(0.5, 0.5))
    again = robustness.Log(path).get("k", lambda: calls.append(1) or _fake(0.9, 0.9))
    assert first == again and calls == [1]


def test_unknown_setting_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="unknown setting"):
        robustness.setting_overrides("rt4_s0.5", tmp_path)
