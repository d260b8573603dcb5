"""HETLoRA and FlexLoRA complete a round through the real Flower simulation path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pf2lora_core.constants import METRICS_FILE, SUMMARY_FILE
from pf2lora_core.launch import flwr_run
from tests.tiny_bert import make_tiny_bert

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["hetlora", "flexlora"])
def test_one_round_through_flower(algorithm: str, tmp_path: Path) -> None:
    model = make_tiny_bert(tmp_path / "tiny-bert")
    run_dir = tmp_path / "run"
    overrides = (
        f"algorithm={algorithm} algorithm.client_ranks=[2,6] model.source=path model.name={model} "
        f"federation.num_clients=2 rounds=2 local_steps=1 task.max_examples=120 run_dir={run_dir} "
        f"federation.state_dir={tmp_path}/state"
    )
    proc = flwr_run(overrides, "num-supernodes=2 client-resources-num-cpus=1", tmp_path / "flwr_home", ROOT, 300,
                    {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})  # fmt: skip
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    summary = json.loads((run_dir / SUMMARY_FILE).read_text())
    assert summary["algorithm"] == algorithm and len(summary["clients"]) == 2
    records = [json.loads(line) for line in (run_dir / METRICS_FILE).read_text().splitlines()]
    assert [r["clients_trained"] for r in records] == [2, 2] and not any(r["rejected"] for r in records)
    if algorithm == "hetlora":  # each client trained at (at most) its own rank
        assert records[0]["train"]["0"]["rank"] <= 2 and records[0]["train"]["1"]["rank"] <= 6
