"""Reply checks over plain data: a typed reply or a rejection with its reason (no Flower message needed)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pf2lora_core.algorithms.base import Algorithm
from pf2lora_core.config.keys import ARRAYS_KEY, METRICS_KEY, NUM_EXAMPLES, NUM_VALIDATION, TRAIN_LOSS
from pf2lora_core.federation.checks import check_structure
from pf2lora_core.federation.protocol import CLIENT_KEY, DETAILS_KEY
from pf2lora_core.federation.replies import Reply, ReplyChecker, ReplyLimits, ReplyRejectedError, rejection_reason

SENT = {"a.lora_A.common.weight": np.zeros((2, 3), np.float32), "b": np.zeros(4, np.float32)}


def arrays(values: dict[str, np.ndarray]) -> dict:
    return {ARRAYS_KEY: {k: (v.shape, v.dtype, (lambda v=v: v)) for k, v in values.items()}}


def train_reply(node: int = 3, client: int = 3, fill: float = 1.0, n: float = 10, **over: object) -> Reply:
    metrics = {CLIENT_KEY: client, NUM_EXAMPLES: n, TRAIN_LOSS: 0.5, **over}
    return Reply(node, arrays=arrays({k: np.full(v.shape, fill, v.dtype) for k, v in SENT.items()}),
                 metrics={METRICS_KEY: metrics})  # fmt: skip


def checker(**limits: object) -> ReplyChecker:
    return ReplyChecker(ReplyLimits(**limits), "accuracy", check_structure, known_examples={3: (40, 8)})


def test_an_honest_train_reply_becomes_a_typed_reply_with_the_trusted_weight() -> None:
    out = checker().train(train_reply(n=10), expected_client=3, sent=SENT, fresh=SENT)
    assert out.client == 3 and out.weight == 10 and out.metrics[TRAIN_LOSS] == 0.5
    assert all(np.array_equal(out.arrays[k], np.ones_like(v)) for k, v in SENT.items())


@pytest.mark.parametrize(
    ("reply", "expected", "sent", "already", "reason"),
    [
        (Reply(3, error="boom"), 3, SENT, set(), "client error: boom"),
        (train_reply(client=4), 3, SENT, set(), "claims client 4 but the node is client 3"),
        (train_reply(), None, SENT, set(), "has not identified itself"),
        (train_reply(), 3, None, set(), "no training message was sent"),
        (train_reply(), 3, SENT, {3}, "a second training reply"),
        (train_reply(n=0), 3, SENT, set(), NUM_EXAMPLES),
        (train_reply(**{TRAIN_LOSS: float("inf")}), 3, SENT, set(), "must be finite"),
        (Reply(3, metrics={METRICS_KEY: {}}), 3, SENT, set(), "expected one ArrayRecord"),
    ],
)
def test_each_bad_train_reply_is_rejected_with_its_reason(
    reply: Reply, expected: int | None, sent: dict | None, already: set[int], reason: str
) -> None:
    with pytest.raises(ReplyRejectedError, match=reason):
        checker().train(reply, expected_client=expected, sent=sent, fresh=SENT, already=already)


def test_structure_is_checked_before_any_byte_is_decoded() -> None:
    def never() -> np.ndarray:
        raise AssertionError("decoded a reply of the wrong shape")

    reply = train_reply()
    reply.arrays[ARRAYS_KEY]["b"] = ((5,), np.dtype(np.float32), never)
    with pytest.raises(ReplyRejectedError, match="shape"):
        checker().train(reply, expected_client=3, sent=SENT, fresh=SENT)


def test_non_finite_values_are_audited_then_rejected() -> None:
    reply = train_reply(fill=float("nan"))
    seen: list[dict] = []
    with pytest.raises(ReplyRejectedError, match="NaN or Inf"):
        checker().train(reply, expected_client=3, sent=SENT, fresh=SENT, audit=seen.append)
    assert len(seen) == 1 and np.isnan(seen[0]["b"]).all()  # the hostile reply is kept as received


def test_update_norm_bound_rejects_or_clips() -> None:
    # update = 2 on 6 + 4 entries: norm 2 * sqrt(10)
    with pytest.raises(ReplyRejectedError, match=r"exceeds federation\.max_update_norm=1"):
        checker(max_update_norm=1.0).train(train_reply(fill=2.0), expected_client=3, sent=SENT, fresh=SENT)
    clipped = checker(max_update_norm=1.0, update_norm_action="clip").train(
        train_reply(fill=2.0), expected_client=3, sent=SENT, fresh=SENT
    )
    norm = np.sqrt(sum(float((v**2).sum()) for v in clipped.arrays.values()))
    assert norm == pytest.approx(1.0, rel=1e-6)


def test_num_examples_beyond_what_the_client_holds_is_clipped_or_rejected() -> None:
    assert checker().train(train_reply(n=1000), expected_client=3, sent=SENT, fresh=SENT).weight == 40
    with pytest.raises(ReplyRejectedError, match="exceeds the 40 examples"):
        checker(num_examples_mismatch="reject").train(train_reply(n=1000), expected_client=3, sent=SENT, fresh=SENT)


def test_deployment_trusts_the_first_declared_count() -> None:
    c = ReplyChecker(ReplyLimits(), "accuracy", check_structure)
    assert c.weight("train", 1, 30) == 30
    assert c.weight("train", 1, 500) == 30  # later claims are bounded by the first
    assert c.weight("train", 1, 10) == 10


def eval_reply(node: int = 3, client: int = 3, details: object = None, **over: object) -> Reply:
    metrics = {CLIENT_KEY: client, NUM_EXAMPLES: 8, NUM_VALIDATION: 4, "personalized.accuracy": 0.75,
               "global.accuracy": 0.5, **over}  # fmt: skip
    configs = {DETAILS_KEY: {DETAILS_KEY: details}} if details is not None else {}
    return Reply(node, metrics={METRICS_KEY: metrics}, configs=configs)


def test_an_honest_evaluate_reply_becomes_an_entry() -> None:
    details = json.dumps({"rank": {"effective": 4.0, "entropy": 3.5, "modules": {}}})
    out = checker().evaluate(eval_reply(details=details), expected_client=3, was_sent=True)
    assert out.client == 3
    assert out.entry["personalized"]["accuracy"] == 0.75 and out.entry[NUM_EXAMPLES] == 8
    assert out.entry[NUM_VALIDATION] == 4 and out.entry["rank"]["effective"] == 4.0


@pytest.mark.parametrize(
    ("reply", "was_sent", "reason"),
    [
        (eval_reply(**{"secret.accuracy": 1.0}), True, "is not allowed"),
        (eval_reply(), False, "no evaluation message was sent"),
        (eval_reply(details="[" * 50 + "]" * 50), True, "nested deeper"),
        (eval_reply(**{NUM_VALIDATION: -3}), True, f"'{NUM_VALIDATION}'"),
        (Reply(3, arrays=arrays(SENT), metrics={METRICS_KEY: {}}), True, "expected one MetricRecord"),
    ],
)
def test_each_bad_evaluate_reply_is_rejected_with_its_reason(reply: Reply, was_sent: bool, reason: str) -> None:
    with pytest.raises(ReplyRejectedError, match=reason):
        checker().evaluate(reply, expected_client=3, was_sent=was_sent)


def test_unexpected_errors_become_a_malformed_reply_reason() -> None:
    assert rejection_reason(ReplyRejectedError("why")) == "why"
    assert rejection_reason(KeyError("x")).startswith("malformed reply (KeyError")


def test_the_algorithms_own_uplink_check_decides_structure() -> None:
    c = ReplyChecker(ReplyLimits(), "accuracy", lambda expected, declared: "refused by the algorithm")
    with pytest.raises(ReplyRejectedError, match="refused by the algorithm"):
        c.train(train_reply(), expected_client=3, sent=SENT, fresh=SENT)
    assert Algorithm.check_uplink  # the default the strategy hands in
