"""The strategy's train / evaluate hooks: hand-computed aggregation and rejection of every kind of malformed reply."""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict

from pf2lora_core.algorithms import HOMLoRA, LoRAParams
from pf2lora_core.config.experiment import load
from pf2lora_core.config.keys import ARRAYS_KEY, METRICS_KEY, NUM_EXAMPLES, TRAIN_LOSS
from pf2lora_core.config.schema import FederationConfig
from pf2lora_core.federation.availability import CLIENT_UNAVAILABLE
from pf2lora_core.federation.protocol import CLIENT_KEY
from pf2lora_core.run.run_dir import RunDir, new_run_dir
from server_app.strategy import CommonAdapterFedAvg, RoundLog, RoundPlan

NODES = (1, 2, 5)  # node ids; each node is the client with the same partition id here
SENT = {"a.lora_A.common.weight": np.zeros((2, 3), np.float32), "b": np.zeros(4, np.float32)}


@dataclass
class _Meta:
    src_node_id: int
    reply_to_message_id: str = ""

    def __post_init__(self) -> None:
        self.reply_to_message_id = self.reply_to_message_id or message_id(self.src_node_id)


def message_id(node: int) -> str:
    """The id of the message the strategy sent to ``node`` this round (what Grid.push_messages assigns)."""
    return f"msg-{node}"


@dataclass
class _Err:
    reason: str
    code: int = 2  # Flower's CLIENT_APP_RAISED_EXCEPTION


@dataclass
class FakeMsg:
    """Duck-typed reply (Flower refuses to build Messages outside a runtime)."""

    content: RecordDict | None
    node: int
    error: _Err | None = None
    metadata: _Meta = field(init=False)

    def __post_init__(self) -> None:
        self.metadata = _Meta(self.node)

    def has_error(self) -> bool:
        return self.error is not None


def records(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(v) for k, v in arrays.items()})


def reply(node: int, arrays: dict[str, np.ndarray], n: float = 10, **extra: RecordDict) -> FakeMsg:
    metrics = MetricRecord({CLIENT_KEY: node, NUM_EXAMPLES: n, TRAIN_LOSS: 0.5})
    return FakeMsg(RecordDict({ARRAYS_KEY: records(arrays), METRICS_KEY: metrics, **extra}), node)


def good(node: int, value: float, n: float = 10) -> FakeMsg:
    return reply(node, {k: np.full(v.shape, value, np.float32) for k, v in SENT.items()}, n)


@functools.cache
def federation(min_clients: int, max_norm: float) -> FederationConfig:
    """The federation section, composed once per setting (Hydra takes 0.3 s; the fuzz suite builds hundreds)."""
    return load(["federation.num_clients=4", f"federation.min_train_clients={min_clients}",
                 f"federation.max_update_norm={max_norm}"]).federation  # fmt: skip


def strategy(tmp_path: Path, min_clients: int = 1, max_norm: float = 0.0) -> CommonAdapterFedAvg:
    algo = HOMLoRA(LoRAParams(name="homlora", rank=2, lora_alpha=2.0, lr=1e-3, weight_decay=0.0))
    fed = federation(min_clients, max_norm)
    s = CommonAdapterFedAvg(
        algorithm=algo, run=RunDir(new_run_dir(str(tmp_path), "t")), federation=fed, plan=RoundPlan(num_rounds=1)
    )
    s.current = RoundLog(round=1)
    s.start_state({k: torch.from_numpy(v) for k, v in SENT.items()}, {node: node for node in NODES})
    s.sent = {node: dict(SENT) for node in NODES}  # what configure_train recorded as sent
    s.outbox = {node: SimpleNamespace(metadata=SimpleNamespace(message_id=message_id(node))) for node in NODES}
    return s


def test_aggregates_valid_replies_by_num_examples(tmp_path: Path) -> None:
    s = strategy(tmp_path)
    arrays, metrics = s.aggregate_train(1, [good(1, 1.0, n=10), good(2, 4.0, n=30)])
    assert arrays is not None
    out = arrays.to_numpy_ndarrays()
    assert all(np.allclose(a, (10 * 1.0 + 30 * 4.0) / 40) for a in out)
    assert metrics[TRAIN_LOSS] == pytest.approx(0.5)
    assert (s.run.path / "checkpoints" / "common_round_0001.safetensors").exists()


def _bad_cases() -> dict[str, tuple[FakeMsg, str]]:
    ok = {k: np.ones(v.shape, np.float32) for k, v in SENT.items()}
    nan = {**ok, "b": np.array([1, np.nan, 0, 0], np.float32)}
    inf = {**ok, "b": np.array([1, np.inf, 0, 0], np.float32)}
    return {
        "missing key": (reply(5, {"b": ok["b"]}), "missing keys"),
        "unexpected key": (reply(5, {**ok, "x.private.weight": ok["b"]}), "unexpected keys"),
        "wrong shape": (reply(5, {**ok, "b": np.ones(5, np.float32)}), "shape"),
        "wrong dtype": (reply(5, {**ok, "b": np.ones(4, np.float64)}), "dtype"),
        "nan": (reply(5, nan), "NaN or Inf"),
        "inf": (reply(5, inf), "NaN or Inf"),
        "zero examples": (reply(5, ok, n=0), NUM_EXAMPLES),
        "client error": (FakeMsg(None, 5, _Err("boom")), "client error: boom"),
        "extra array record": (reply(5, ok, extra=records(ok)), "expected one ArrayRecord"),
    }


@pytest.mark.parametrize("case", list(_bad_cases()))
def test_malformed_reply_is_excluded_with_reason(tmp_path: Path, caplog: pytest.LogCaptureFixture, case: str) -> None:
    bad, reason = _bad_cases()[case]
    s = strategy(tmp_path)
    with caplog.at_level(logging.WARNING, logger="pf2lora.server"):
        arrays, _ = s.aggregate_train(1, [good(1, 2.0), bad, good(2, 2.0)])
    assert arrays is not None  # the round goes on with the rest
    assert all(np.allclose(a, 2.0) for a in arrays.to_numpy_ndarrays())
    assert len(s.current.rejected) == 1 and reason in s.current.rejected[0]["reason"]
    assert "node 5" in caplog.text and reason in caplog.text


@pytest.mark.parametrize("code", [5, CLIENT_UNAVAILABLE])  # Flower's NODE_UNAVAILABLE, a simulated drop-out
def test_an_unavailable_client_is_missing_not_rejected(tmp_path: Path, code: int) -> None:
    s = strategy(tmp_path)
    arrays, _ = s.aggregate_train(1, [good(1, 2.0), FakeMsg(None, 5, _Err("offline", code)), good(2, 2.0)])
    assert arrays is not None and all(np.allclose(a, 2.0) for a in arrays.to_numpy_ndarrays())
    assert s.current.rejected == []
    assert [(m["phase"], m["reason"]) for m in s.current.missing] == [("training", "unavailable: offline")]


def test_update_norm_bound(tmp_path: Path) -> None:
    s = strategy(tmp_path, max_norm=1.0)
    arrays, _ = s.aggregate_train(1, [good(1, 0.1), good(2, 10.0)])
    assert arrays is not None and all(np.allclose(a, 0.1) for a in arrays.to_numpy_ndarrays())
    assert "exceeds federation.max_update_norm" in s.current.rejected[0]["reason"]


def test_too_few_valid_replies_keeps_common_unchanged(tmp_path: Path) -> None:
    s = strategy(tmp_path, min_clients=2)
    bad, _ = _bad_cases()["nan"]
    assert s.aggregate_train(1, [good(1, 1.0), bad]) == (None, None)


def test_reply_claiming_another_client_is_excluded(tmp_path: Path) -> None:
    s = strategy(tmp_path)
    spoof = good(2, 9.0)
    spoof.content[METRICS_KEY][CLIENT_KEY] = 1  # node 2 pretends to be client 1
    arrays, _ = s.aggregate_train(1, [good(1, 1.0), spoof])
    assert arrays is not None and all(np.allclose(a, 1.0) for a in arrays.to_numpy_ndarrays())
    assert "claims client 1" in s.current.rejected[0]["reason"]


def test_round_bytes_are_the_serialised_uplinks(tmp_path: Path) -> None:
    s = strategy(tmp_path)
    replies = [good(1, 1.0), good(2, 2.0)]
    expected = sum(r.content[ARRAYS_KEY].count_bytes() for r in replies)
    s.aggregate_train(1, replies)
    assert s.current.bytes_up == expected


def test_round_without_evaluation_logs_so(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    s = strategy(tmp_path)
    s.aggregate_train(1, [good(1, 1.0), good(2, 2.0)])
    s.sent = {}  # configure_evaluate sent nothing this round (eval_every)
    with caplog.at_level(logging.INFO, logger="pf2lora.server"):
        s.aggregate_evaluate(1, [])
    line = next(r.getMessage() for r in caplog.records if "done in" in r.getMessage())
    assert "not evaluated" in line and "nan" not in line and "train loss 0.5000" in line


def test_a_replayed_or_cross_node_reply_counts_for_nothing(tmp_path: Path) -> None:
    """A reply counts only for the message this round sent to its own node (issue 27, invariant d)."""
    s = strategy(tmp_path)
    stale, cross = good(5, 9.0), good(5, 9.0)
    stale.metadata = _Meta(5, "msg-from-round-0")  # a reply to an earlier round's message, arriving again
    cross.metadata = _Meta(5, message_id(1))  # node 5 answering the message sent to node 1
    arrays, _ = s.aggregate_train(1, [good(1, 1.0), stale, cross])
    assert all(np.allclose(a, 1.0) for a in arrays.to_numpy_ndarrays())
    reasons = [r["reason"] for r in s.current.rejected]
    assert len(reasons) == 2 and all("not the one sent to node 5 this round" in r for r in reasons), reasons


def test_every_accepted_update_has_its_norm_measured_without_a_bound(tmp_path: Path) -> None:
    s = strategy(tmp_path, max_norm=0.0)  # no bound: still measured and recorded
    s.aggregate_train(1, [good(1, 1.0), good(2, 3.0)])
    # ||ones - zeros|| over 6 + 4 entries, and 3 x that
    assert s.current.train[1]["update_norm"] == pytest.approx(10**0.5)
    assert s.current.train[2]["update_norm"] == pytest.approx(3 * 10**0.5)


def test_a_train_reply_with_a_config_record_is_refused(tmp_path: Path) -> None:
    """Config records were never checked in train replies: with auditing on, any size reached the disk."""
    from flwr.app import ConfigRecord

    s = strategy(tmp_path)
    ok = {k: np.ones(v.shape, np.float32) for k, v in SENT.items()}
    s.aggregate_train(1, [good(1, 1.0), reply(5, ok, big=ConfigRecord({"x": "y" * 1000}))])
    assert "no ConfigRecord" in s.current.rejected[0]["reason"] and 5 not in s.current.train


def test_auto_update_norm_is_the_measured_honest_norm_scaled_to_the_run() -> None:
    from pf2lora_core.federation.checks import auto_update_norm, resolved_federation

    assert auto_update_norm(0.002, 5, 74_498) == pytest.approx(5 * 1.96)  # the reference setting
    assert auto_update_norm(0.004, 10, 4 * 74_498) == pytest.approx(5 * 1.96 * 2 * 2 * 2)  # lr, K, sqrt(P)
    exp = load(["federation.max_update_norm=auto"])  # the default algorithm, PF2LoRA, at lr 0.002
    assert resolved_federation(exp.federation, exp.algorithm, 5, 74_498).max_update_norm == pytest.approx(9.8)
    fixed = federation(1, 3.0)
    assert resolved_federation(fixed, exp.algorithm, 5, 74_498) is fixed  # a number stays


def test_auto_bound_of_the_pooled_reference_counts_its_steps() -> None:
    """The centralized reference's one node takes local_steps x num_clients steps a round: its honest
    update is that many times longer, and so is its auto bound."""
    from server_app.app import resolved_update_norm

    fed_exp, pooled = load(["federation.num_clients=4"]), load(["federation.num_clients=4", "algorithm=centralized"])
    one = resolved_update_norm(fed_exp, fed_exp.federation, 74_498).max_update_norm
    assert one == pytest.approx(9.8)
    assert resolved_update_norm(pooled, pooled.federation, 74_498).max_update_norm == pytest.approx(4 * one)
