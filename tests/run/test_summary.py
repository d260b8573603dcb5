"""summary.json: majority-label baselines (hand-computed), validation blocks, balanced accuracy, budgets."""

from __future__ import annotations

import pytest
import torch

from pf2lora_core.config.experiment import load
from pf2lora_core.config.keys import (
    ACCURACY,
    BALANCED_ACCURACY,
    BASELINES,
    BATCHES_SEEN,
    EVAL_LOSS,
    EXAMPLES_SEEN,
    GLOBAL,
    GRADIENT_PASSES,
    NUM_EXAMPLES,
    NUM_VALIDATION,
    PERSONALIZED,
    VALIDATION,
    VALIDATION_GLOBAL,
)
from pf2lora_core.run.records import RoundRecord, Summary
from pf2lora_core.run.summary import (
    CLIENT_MAJORITY,
    GLOBAL_MAJORITY,
    build_summary,
    format_client_table,
    majority_baselines,
)
from pf2lora_core.training.tasks import balanced_accuracy

# Three clients' label histograms over two labels. Pooled train = [10, 9]: the global majority is label 0.
HISTS = [
    {"train": [6, 2], "validation": [1, 1], "test": [3, 1]},  # own majority 0
    {"train": [1, 5], "validation": [0, 1], "test": [0, 4]},  # own majority 1; test holds label 1 only
    {"train": [3, 2], "validation": [1, 0], "test": [1, 3]},  # own majority 0 (train decides, not test)
]


def test_majority_baselines_by_hand() -> None:
    got = majority_baselines(HISTS)
    assert [g[CLIENT_MAJORITY][ACCURACY] for g in got] == [3 / 4, 4 / 4, 1 / 4]
    assert [g[GLOBAL_MAJORITY][ACCURACY] for g in got] == [3 / 4, 0 / 4, 1 / 4]
    # a constant predictor's balanced accuracy: 1 / (labels present in test) if its label is present, else 0
    assert [g[CLIENT_MAJORITY][BALANCED_ACCURACY] for g in got] == [0.5, 1.0, 0.5]
    assert [g[GLOBAL_MAJORITY][BALANCED_ACCURACY] for g in got] == [0.5, 0.0, 0.5]


def test_baselines_with_histograms_missing_from_sites_that_did_not_opt_in() -> None:
    """Deployment: a site without share-data-stats sends no histogram; the pooled majority is then unknown."""
    got = majority_baselines([HISTS[0], None, HISTS[2]])
    assert got[1] is None
    assert [got[k][CLIENT_MAJORITY][ACCURACY] for k in (0, 2)] == [3 / 4, 1 / 4]
    assert got[0][GLOBAL_MAJORITY] is None and got[2][GLOBAL_MAJORITY] is None
    exp = load(["federation.num_clients=3"])
    latest = {c: {NUM_EXAMPLES: 4, PERSONALIZED: _results(0.5), GLOBAL: _results(0.5), "rank": {}} for c in range(3)}
    summary = build_summary(exp, [], latest, [HISTS[0], None, HISTS[2]], {"common": 7}, seconds_total=1.0)
    written = summary.to_json()
    assert written["clients"][1]["baselines"] is None
    assert written["baselines"]["client_majority"]["mean"] == pytest.approx((3 / 4 + 1 / 4) / 2)
    assert "client_majority accuracy: mean 0.5000" in format_client_table(summary)  # the missing site skipped


def test_balanced_accuracy_by_hand() -> None:
    labels = torch.tensor([0, 0, 0, 1])
    assert balanced_accuracy(torch.tensor([0, 0, 0, 0]), labels) == 0.5  # the prior: 0.75 accuracy
    assert balanced_accuracy(torch.tensor([0, 1, 0, 1]), labels) == pytest.approx((2 / 3 + 1) / 2)


def _results(acc: float) -> dict[str, float]:
    return {ACCURACY: acc, BALANCED_ACCURACY: acc / 2, EVAL_LOSS: 1 - acc}


def _summary() -> Summary:
    exp = load(["federation.num_clients=3"])
    history = [
        {"round": 1, "bytes_up": 10, "bytes_down": 20, "rejected": [],
         "train": {str(c): {NUM_EXAMPLES: 5, EXAMPLES_SEEN: 80, BATCHES_SEEN: 5, GRADIENT_PASSES: 15}
                   for c in range(3)}},
        {"round": 2, "bytes_up": 10, "bytes_down": 20, "rejected": [],
         "train": {"0": {NUM_EXAMPLES: 5, EXAMPLES_SEEN: 80, BATCHES_SEEN: 5, GRADIENT_PASSES: 15}}},
    ]  # fmt: skip
    history = [RoundRecord.from_json(h) for h in history]
    latest = {
        c: {NUM_EXAMPLES: 4, NUM_VALIDATION: 1 + c, PERSONALIZED: _results(0.5 + 0.1 * c), GLOBAL: _results(0.5),
            VALIDATION: _results(0.6 + 0.1 * c), VALIDATION_GLOBAL: _results(0.4), "rank": {}}
        for c in range(3)
    }  # fmt: skip
    return build_summary(exp, history, latest, HISTS, {"common": 7}, seconds_total=4.0)


def test_summary_baselines_validation_and_cost() -> None:
    s = _summary().to_json()  # as written to summary.json
    assert s[BASELINES][CLIENT_MAJORITY]["metric"] == ACCURACY
    assert s[BASELINES][CLIENT_MAJORITY]["mean"] == pytest.approx(2 / 3)
    assert s[BASELINES][CLIENT_MAJORITY]["worst"] == 0.25
    assert s[BASELINES][GLOBAL_MAJORITY]["mean"] == pytest.approx(1 / 3)
    assert s[BASELINES][GLOBAL_MAJORITY][BALANCED_ACCURACY]["mean"] == pytest.approx(1 / 3)
    assert s["clients"][1][BASELINES][CLIENT_MAJORITY][ACCURACY] == 1.0
    # validation has exactly the shape of personalized; validation_global that of global
    assert set(s[VALIDATION]) == set(s[PERSONALIZED]) == {"metric", "mean", "weighted_mean", "worst", BALANCED_ACCURACY}
    assert set(s[VALIDATION_GLOBAL]) == set(s[GLOBAL])
    assert s[VALIDATION]["mean"] == pytest.approx(0.7) and s[VALIDATION]["worst"] == pytest.approx(0.6)
    # validation is weighted by validation rows (1, 2, 3), test by test rows (4 each)
    assert s[VALIDATION]["weighted_mean"] == pytest.approx((0.6 * 1 + 0.7 * 2 + 0.8 * 3) / 6)
    assert s[PERSONALIZED]["weighted_mean"] == pytest.approx(0.6)
    assert s[PERSONALIZED][BALANCED_ACCURACY]["mean"] == pytest.approx(0.3)
    assert s["clients"][2]["num_validation"] == 3 and s["clients"][2][VALIDATION][ACCURACY] == pytest.approx(0.8)
    cost = s["cost"]
    assert cost["examples_per_round"] == (240 + 80) / 2 and cost["gradient_passes_per_round"] == (45 + 15) / 2
    assert cost["examples_per_client_round"] == 80 and cost["batches_per_client_round"] == 5
    assert cost["gradient_passes_per_client_round"] == 15


def test_console_table_shows_the_prior() -> None:
    table = format_client_table(_summary())
    assert "client maj." in table and "validation" in table and "bal.acc" in table
    assert "ent.rank" in table and "private" in table
    assert "client_majority accuracy: mean 0.6667" in table
    assert "global_majority accuracy: mean 0.3333" in table
    assert "80 examples in 5 batches, 15 gradient passes" in table


def test_summary_round_trips_through_its_json() -> None:
    summary = _summary()
    assert Summary.from_json(summary.to_json()).to_json() == summary.to_json()
