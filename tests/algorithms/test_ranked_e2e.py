"""HETLoRA and FlexLoRA complete a round through the real Flower simulation path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pf2lora_core.config.keys import METRICS_FILE, SUMMARY_FILE
from tests.helpers.flower_run import tiny_inprocess_run


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["hetlora", "flexlora"])
def test_one_round_through_flower(algorithm: str, tmp_path: Path) -> None:
    run_dir = tiny_inprocess_run(tmp_path, f"algorithm={algorithm} algorithm.client_ranks=[2,6] rounds=2 local_steps=1")
    summary = json.loads((run_dir / SUMMARY_FILE).read_text())
    assert summary["algorithm"] == algorithm and len(summary["clients"]) == 2
    records = [json.loads(line) for line in (run_dir / METRICS_FILE).read_text().splitlines()]
    assert [r["clients_trained"] for r in records] == [2, 2] and not any(r["rejected"] for r in records)
    if algorithm == "hetlora":  # each client trained at (at most) its own rank
        assert records[0]["train"]["0"]["rank"] <= 2 and records[0]["train"]["1"]["rank"] <= 6
