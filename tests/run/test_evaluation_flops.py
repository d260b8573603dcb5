"""summary.json counts evaluation FLOPs beside training's (issue 29: a round's cost is both)."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

from pf2lora_core.config.keys import (
    FLOPS_PER_CLIENT_EVALUATION,
    FLOPS_PER_CLIENT_ROUND,
    FLOPS_PER_EVALUATED_ROUND,
    METRICS_FILE,
    SUMMARY_FILE,
)
from pf2lora_core.run.records import read_metrics
from tests.helpers.flower_run import tiny_inprocess_run


def test_evaluations_of_the_counted_rounds_report_their_flops(tmp_path: Path) -> None:
    overrides = "algorithm=pf2lora rounds=2 local_steps=1 eval_every=1 flops_rounds=1"
    with contextlib.redirect_stdout(io.StringIO()):
        run_dir = tiny_inprocess_run(tmp_path, overrides, clients=2)
    records = read_metrics(run_dir / METRICS_FILE)
    counted = [c.get(FLOPS_PER_CLIENT_EVALUATION) for c in records[0].clients.values()]
    assert all(isinstance(f, float) and f > 0 for f in counted), counted  # round 1: counted, every client
    assert all(FLOPS_PER_CLIENT_EVALUATION not in c for c in records[1].clients.values())  # round 2: not
    cost = json.loads((run_dir / SUMMARY_FILE).read_text())["cost"]
    assert cost[FLOPS_PER_CLIENT_EVALUATION] == sum(counted) / len(counted)
    assert cost[FLOPS_PER_EVALUATED_ROUND] == cost[FLOPS_PER_CLIENT_ROUND] + cost[FLOPS_PER_CLIENT_EVALUATION]
