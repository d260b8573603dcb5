"""The in-process engine: Flower's Grid contract on a ClientApp, and the same numbers as `flwr run`."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode

from pf2lora_core.config.keys import SUMMARY_FILE
from pf2lora_core.config.schema import ConfigError
from server_app import inprocess
from server_app.inprocess import InProcessGrid, server_identity
from tests.helpers.flower_run import E2E_CLIENTS as CLIENTS
from tests.helpers.flower_run import E2E_OVERRIDES as OVERRIDES
from tests.helpers.flower_run import tiny_overrides

RUN_ID = 4242


def echo_app() -> ClientApp:
    """A ClientApp that counts its calls in ``context.state``, sleeps when asked and fails when asked."""
    app = ClientApp()

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        cfg = msg.content["config"]
        if cfg.get("raise", False):
            raise ValueError("asked to fail")
        time.sleep(float(cfg.get("sleep", 0.0)))
        seen = int(context.state["count"]["n"]) + 1 if "count" in context.state.config_records else 1
        context.state["count"] = ConfigRecord({"n": seen})
        cfg["mutated"] = True  # must not reach the server's copy
        metrics = MetricRecord({"partition": int(context.node_config["partition-id"]), "seen": seen})
        return Message(RecordDict({"m": metrics}), reply_to=msg)

    return app


def _ask(grid: InProcessGrid, nodes: list[int], timeout: float | None = None, **config: object) -> list[Message]:
    msgs = [
        Message(RecordDict({"config": ConfigRecord(dict(config))}), dst_node_id=n, message_type=MessageType.QUERY)
        for n in nodes
    ]
    replies = list(grid.send_and_receive(msgs, timeout=timeout))
    assert not any(m.content["config"].get("mutated", False) for m in msgs)  # the client got a copy
    return replies


def test_each_node_has_its_own_context_and_replies_come_in_order() -> None:
    grid = InProcessGrid(echo_app(), 3, RUN_ID, {"overrides": ""})
    nodes = list(grid.get_node_ids())
    assert len(set(nodes)) == 3 and all(n > 1 for n in nodes)  # 1 is the SuperLink's own id
    assert nodes == list(InProcessGrid(echo_app(), 3, RUN_ID).get_node_ids())  # seeded by the run id
    with server_identity(RUN_ID):
        first = _ask(grid, list(reversed(nodes)))
        second = _ask(grid, nodes[:1])
    assert [int(r.metadata.src_node_id) for r in first] == list(reversed(nodes))
    assert [r.content["m"]["partition"] for r in first] == [2, 1, 0]
    assert all(r.metadata.reply_to_message_id and r.metadata.message_id for r in first)
    assert [r.content["m"]["seen"] for r in first] == [1, 1, 1]
    assert second[0].content["m"]["seen"] == 2  # context.state persisted for that node only


def test_a_raising_client_app_gets_flowers_error_reply_and_unknown_nodes_are_unavailable() -> None:
    grid = InProcessGrid(echo_app(), 2, RUN_ID)
    node = next(iter(grid.get_node_ids()))
    with server_identity(RUN_ID):
        failed, missing = _ask(grid, [node, 999], **{"raise": True})
    assert failed.has_error() and failed.error.code == ErrorCode.CLIENT_APP_RAISED_EXCEPTION
    assert "asked to fail" in failed.error.reason
    assert missing.has_error() and missing.error.code == ErrorCode.NODE_UNAVAILABLE


def test_a_reply_slower_than_the_timeout_is_dropped() -> None:
    grid = InProcessGrid(echo_app(), 2, RUN_ID)
    nodes = list(grid.get_node_ids())
    with server_identity(RUN_ID):
        assert _ask(grid, nodes, timeout=0.05, sleep=0.2) == []
        assert len(_ask(grid, nodes, timeout=5.0, sleep=0.0)) == 2


def test_deployment_experiments_are_refused_with_a_clear_error() -> None:
    with pytest.raises(ConfigError, match="in-process engine runs simulations only"):
        inprocess.run(["federation=deployment"])


def _numbers(summary: dict) -> dict:
    """Every number of a summary except wall-clock times."""
    return {k: v for k, v in summary.items() if k != "cost"} | {
        "cost": {k: v for k, v in summary["cost"].items() if not k.startswith("seconds")}
    }


@pytest.mark.slow  # shares the e2e tests' one flwr run (tests/e2e/conftest.py), then the same run in process
def test_inprocess_and_flwr_run_write_the_same_summary(simulation: dict, tmp_path: Path) -> None:
    """Same experiment, same seed, one torch thread on both sides (flwr run's clients get one CPU each)."""
    model = simulation["tmp"] / "tiny-bert"  # the flwr run's own tiny model
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        local_dir = inprocess.run(tiny_overrides(tmp_path, model, CLIENTS, OVERRIDES))
    finally:
        torch.set_num_threads(threads)
    flower = json.loads((simulation["run"] / SUMMARY_FILE).read_text())
    local = json.loads((local_dir / SUMMARY_FILE).read_text())
    assert not math.isnan(local["personalized"]["mean"])
    assert _numbers(local) == _numbers(flower)
    rounds = [json.loads(line) for line in (local_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1, 2] and all(r["clients_trained"] == CLIENTS for r in rounds)
