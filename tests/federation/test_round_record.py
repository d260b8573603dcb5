"""The round record: hand-computed metrics.jsonl lines."""

from __future__ import annotations

import pytest

from pf2lora_core.config.keys import NUM_EXAMPLES, TRAIN_LOSS
from pf2lora_core.federation.rounds import RoundLog, trained_before
from pf2lora_core.run.records import RoundRecord


def test_train_loss_is_weighted_by_trusted_examples() -> None:
    cur = RoundLog(round=2)
    cur.train = {0: {TRAIN_LOSS: 1.0, NUM_EXAMPLES: 10.0}, 1: {TRAIN_LOSS: 4.0, NUM_EXAMPLES: 30.0}}
    line = cur.record(elapsed=5.0, metric="accuracy").to_json()  # as written to metrics.jsonl
    assert line[TRAIN_LOSS] == pytest.approx((10 * 1.0 + 30 * 4.0) / 40)
    assert line["round"] == 2 and line["clients_trained"] == 2 and line["elapsed"] == 5.0
    assert list(line["train"]) == ["0", "1"] and "personalized" not in line and "clients" not in line
    assert RoundLog(round=1).record(0.0, "accuracy").to_json()[TRAIN_LOSS] is None
    assert RoundRecord.from_json(line).to_json() == line  # read back unchanged, ints included


def test_rejections_are_truncated_and_phased() -> None:
    cur = RoundLog(round=1)
    cur.reject("client 1 (node 9)", "x" * 5000, phase="evaluation")
    assert len(cur.rejected[0]["reason"]) <= 300 and cur.rejected[0]["phase"] == "evaluation"


def test_trained_before_is_the_last_aggregated_round_with_the_client() -> None:
    history = [
        RoundRecord.from_json(line)
        for line in (
            {"round": 1, "aggregated": True, "train": {"0": {}}},
            {"round": 2, "aggregated": False, "train": {"0": {}, "1": {}}},
            {"round": 3, "aggregated": True, "train": {"1": {}}},
        )
    ]
    assert trained_before(history, 0) == 1 and trained_before(history, 1) == 3 and trained_before(history, 2) == 0
