"""Faults and bad input at the server: clients that time out, fail or reconnect, and replies that
must not enter the average (malformed bytes, pickled payloads, lying metadata, over-large updates).

The strategy runs in-process against ``tests.federation.test_resume.FakeGrid`` (real Flower messages, a
deterministic fake client). The reply-structure cases (keys, shapes, dtypes, NaN / Inf, norm,
spoofed client id) are also checked one by one in ``test_strategy.py``; here each kind is sent
through a whole round, so the round's outcome and its metrics.jsonl record are checked too.
"""

from __future__ import annotations

import io
import json
import logging
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, MessageType, RecordDict

from pf2lora_core.config.keys import ARRAYS_KEY, METRICS_FILE
from pf2lora_core.run.run_dir import new_run_dir
from pf2lora_core.training.runtime import derived_seed
from tests.federation.test_resume import (  # noqa: F401  (flower_task_identity is an autouse fixture)
    NODES,
    FakeGrid,
    experiment,
    flower_task_identity,
    initial_common,
    make_strategy,
    shared,
)

UNPICKLED: list[str] = []  # set by _Payload if anything ever unpickles it


def _mark(note: str) -> None:
    UNPICKLED.append(note)


class _Payload:
    """Unpickling it calls ``_mark`` (a pickle can run any code; this one only leaves a note)."""

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (_mark, ("unpickled!",))


def one_round(tmp_path: Path, grid: FakeGrid, extra: str = "", caplog: Any = None) -> tuple[Any, dict[str, Any]]:
    """One training + evaluation round on all 4 clients; (strategy, its metrics.jsonl record)."""
    exp = experiment("homlora", f"rounds=1 federation.fraction_train=1.0 federation.min_train_clients=2 {extra}")
    run_dir = new_run_dir(str(tmp_path), "faults")
    strategy = make_strategy(exp, run_dir)
    strategy.start_state(initial_common(exp), dict(NODES))
    strategy.run_rounds(grid, shared(exp, run_dir))
    return strategy, json.loads((run_dir / METRICS_FILE).read_text().splitlines()[-1])


def expected_mean(grid: FakeGrid, tmp_path: Path, clients: list[int]) -> dict[str, torch.Tensor]:
    """The example-weighted mean of exactly ``clients``' round-1 updates (computed independently)."""
    exp = experiment("homlora", "rounds=1")
    common = {k: v.numpy() for k, v in initial_common(exp).items()}
    ups, weights = [], []
    for c in clients:
        gen = np.random.default_rng(derived_seed(c, 1))
        ups.append({k: (a + 0.01 * gen.standard_normal(a.shape)).astype(a.dtype) for k, a in common.items()})
        weights.append(10 + 5 * c)
    total = sum(weights)
    return {
        k: torch.from_numpy(sum(w * u[k].astype(np.float64) for u, w in zip(ups, weights, strict=True)) / total)
        for k in common
    }


def assert_close(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert set(state) == set(expected)
    for k in state:
        assert torch.allclose(state[k].double(), expected[k], atol=1e-6), k


def test_client_that_times_out_is_logged_and_the_round_completes(tmp_path: Path, caplog: Any) -> None:
    grid = FakeGrid(dict(NODES), drop={(MessageType.TRAIN, 1, 2), (MessageType.EVALUATE, 1, 3)})
    with caplog.at_level(logging.WARNING, logger="pf2lora.server"):
        strategy, record = one_round(tmp_path, grid, "federation.round_timeout_s=7")
    assert record["aggregated"] and record["clients_trained"] == 3
    assert_close(strategy.state, expected_mean(grid, tmp_path, [0, 1, 3]))
    missing = {(m["phase"], m["client"].split(" (")[0]) for m in record["missing"]}
    assert missing == {("training", "client 2"), ("evaluation", "client 3")}
    assert "no training reply within federation.round_timeout_s=7 s" in caplog.text
    assert sorted(record["clients"]) == ["0", "1", "2"]  # client 3's evaluation never came


def test_too_few_replies_leave_the_common_adapter_unchanged(tmp_path: Path) -> None:
    drop = {(MessageType.TRAIN, 1, c) for c in (0, 1, 2)}
    strategy, record = one_round(tmp_path, FakeGrid(dict(NODES), drop=drop))
    assert not record["aggregated"] and len(record["missing"]) >= 3
    initial = initial_common(experiment("homlora"))
    assert all(torch.equal(strategy.state[k], initial[k]) for k in initial)


def test_node_unavailable_error_names_the_client(tmp_path: Path, caplog: Any) -> None:
    """The SuperLink itself answers for a node that stopped heartbeating; the reply comes from the
    SuperLink's node id, and the server still names the client it was about."""
    grid = FakeGrid(dict(NODES), unavailable={(MessageType.TRAIN, 1, 1)})
    with caplog.at_level(logging.WARNING, logger="pf2lora.server"):
        strategy, record = one_round(tmp_path, grid)
    node = next(n for n, c in NODES.items() if c == 1)
    # it could not answer at all: missing (as a simulated drop-out), not a reply the server refused
    assert record["missing"] == [
        {"client": f"client 1 (node {node})", "phase": "training", "reason": "unavailable: Error: Node Unavailable"}
    ]
    assert record["rejected"] == []
    assert_close(strategy.state, expected_mean(grid, tmp_path, [0, 2, 3]))
    assert f"client 1 (node {node})" in caplog.text


def test_node_reconnecting_under_a_new_id_is_identified_and_trains(tmp_path: Path, caplog: Any) -> None:
    """A SuperNode without a registered key gets a new node id when it restarts: with
    federation.rebind_clients the server asks it who it is and maps the new id to its client; the
    old id is forgotten (test_claimed_id_collision_* covers the default, which refuses it)."""
    exp = experiment("homlora", "rounds=2 federation.fraction_train=1.0 federation.rebind_clients=true")
    run_dir = new_run_dir(str(tmp_path), "reconnect")
    strategy = make_strategy(exp, run_dir)
    strategy.start_state(initial_common(exp), dict(NODES))
    grid = FakeGrid(dict(NODES))
    old = next(n for n, c in NODES.items() if c == 2)
    del grid.nodes[old]
    grid.nodes[4242] = 2  # restarted
    with caplog.at_level(logging.INFO, logger="pf2lora.server"):
        strategy.run_rounds(grid, shared(exp, run_dir))
    assert strategy.clients[4242] == 2 and old not in strategy.clients
    assert (MessageType.QUERY, 0, 2) in grid.sent and (MessageType.TRAIN, 2, 2) in grid.sent
    assert "client 2 reconnected as node 4242" in caplog.text


def test_impostor_node_claiming_a_connected_client_is_ignored(tmp_path: Path, caplog: Any) -> None:
    grid = FakeGrid({**NODES, 777: 1})  # a fifth node would say it is client 1, whose node is connected
    with caplog.at_level(logging.WARNING, logger="pf2lora.server"):
        strategy, record = one_round(tmp_path, grid)
    assert 777 not in strategy.clients and all(c != 777 for p, r, c in grid.sent if p == MessageType.TRAIN)
    assert record["clients_trained"] == 4
    assert "node 777 ignored: every partition is mapped" in caplog.text  # never even asked


def _replace_arrays(grid: FakeGrid, client: int, change: Any) -> None:
    """Make ``client``'s training reply pass through ``change(ArrayRecord) -> ArrayRecord``."""
    answer = grid.answer

    def tampered(msg: Any, phase: str, rnd: int, c: int) -> RecordDict:
        content = answer(msg, phase, rnd, c)
        if phase == MessageType.TRAIN and c == client:
            content[ARRAYS_KEY] = change(content[ARRAYS_KEY])
        return content

    grid.answer = tampered  # type: ignore[method-assign]


def _pickled_npy(obj: object) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.array([obj], dtype=object), allow_pickle=True)
    return buf.getvalue()


def _first(record: ArrayRecord) -> tuple[str, Array]:
    return next(iter(record.items()))


def _pickle_with_honest_dtype(record: ArrayRecord) -> ArrayRecord:
    key, arr = _first(record)
    record[key] = Array(dtype="object", shape=tuple(arr.shape), stype=arr.stype, data=_pickled_npy(_Payload()))
    return record


def _pickle_declared_float32(record: ArrayRecord) -> ArrayRecord:
    key, arr = _first(record)
    record[key] = Array(dtype=arr.dtype, shape=tuple(arr.shape), stype=arr.stype, data=_pickled_npy(_Payload()))
    return record


def _bytes_of_another_shape(record: ArrayRecord) -> ArrayRecord:
    key, arr = _first(record)
    other = Array(np.zeros(int(np.prod(arr.shape)) + 1, dtype=np.float32))
    record[key] = Array(dtype=arr.dtype, shape=tuple(arr.shape), stype=arr.stype, data=other.data)
    return record


def _garbage_bytes(record: ArrayRecord) -> ArrayRecord:
    key, arr = _first(record)
    record[key] = Array(dtype=arr.dtype, shape=tuple(arr.shape), stype=arr.stype, data=b"\x93NUMPY garbage")
    return record


def _huge_update(record: ArrayRecord) -> ArrayRecord:
    key, arr = _first(record)
    record[key] = Array((arr.numpy() + 100.0).astype(np.float32))
    return record


def _inf(record: ArrayRecord) -> ArrayRecord:
    key, arr = _first(record)
    values = arr.numpy().copy()
    values.flat[0] = np.inf
    record[key] = Array(values)
    return record


def _extra_key(record: ArrayRecord) -> ArrayRecord:
    record["enc.0.query.lora_A.private.weight"] = Array(np.zeros((2, 6), np.float32))
    return record


BAD_REPLIES = {
    "pickled payload (object dtype)": (_pickle_with_honest_dtype, "dtype object"),
    "pickled payload declared float32": (_pickle_declared_float32, "do not decode as a plain array"),
    "bytes of another shape": (_bytes_of_another_shape, "declared float32"),
    "undecodable bytes": (_garbage_bytes, "do not decode as a plain array"),
    "update norm beyond the bound": (_huge_update, "exceeds federation.max_update_norm=5"),
    "inf": (_inf, "NaN or Inf"),
    "unexpected key": (_extra_key, "unexpected keys"),
}


@pytest.mark.parametrize("case", list(BAD_REPLIES))
def test_bad_reply_is_rejected_with_its_reason_and_kept_out(tmp_path: Path, caplog: Any, case: str) -> None:
    change, reason = BAD_REPLIES[case]
    grid = FakeGrid(dict(NODES))
    _replace_arrays(grid, 3, change)
    UNPICKLED.clear()
    with caplog.at_level(logging.WARNING, logger="pf2lora.server"):
        strategy, record = one_round(tmp_path, grid, "federation.max_update_norm=5")
    assert UNPICKLED == []  # nothing from the network was unpickled
    assert len(record["rejected"]) == 1
    rejected = record["rejected"][0]
    assert rejected["client"].startswith("client 3 (node ") and reason in rejected["reason"], rejected
    assert record["aggregated"] and record["clients_trained"] == 3
    assert_close(strategy.state, expected_mean(grid, tmp_path, [0, 1, 2]))
    assert "excluded reply from client 3" in caplog.text and reason in caplog.text


def test_unpickling_the_payload_would_have_been_noticed() -> None:
    """The canary works: the payload does run code when (and only when) something unpickles it."""
    UNPICKLED.clear()
    pickle.loads(pickle.dumps(_Payload()))
    assert UNPICKLED == ["unpickled!"]
    UNPICKLED.clear()
