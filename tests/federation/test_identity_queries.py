"""The identity queries of round 1 through the real ClientApp: their cost must not be a config parse per node."""

from __future__ import annotations

import pytest
from flwr.app import ConfigRecord

from client_app import app as client_module
from pf2lora_core.config.experiment import load
from pf2lora_core.federation import received_config
from pf2lora_core.federation.protocol import CONFIG_YAML_KEY, RUN_KEY
from server_app.inprocess import InProcessGrid, server_identity
from server_app.strategy import query_partition_ids

RUN_ID = 2828


def test_identifying_every_node_parses_the_config_once_per_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 28: every node's QUERY parsed the whole config YAML (about 15 ms), so identifying the
    nodes at round 1 cost 15 ms x the federation's size (a minute at 4096) in the in-process engine
    and in every Ray worker, which serve many nodes each."""
    n = 64
    text = load([f"federation.num_clients={n}", "name=identity-scaling"]).to_yaml()
    parses = []
    parse = received_config._load
    monkeypatch.setattr(received_config, "_load", lambda t: parses.append(t) or parse(t))
    client_module._parsed.cache_clear()
    grid = InProcessGrid(client_module.app, n, RUN_ID)
    with server_identity(RUN_ID):
        found = query_partition_ids(
            grid, list(grid.get_node_ids()), ConfigRecord({CONFIG_YAML_KEY: text, RUN_KEY: "r"}), 60
        )
    assert sorted(found.values()) == list(range(n))
    assert len(parses) == 1  # one per node before


def test_the_shared_parsed_config_cannot_be_changed() -> None:
    """One parsed config serves every message with that text: a handler that changed it would change the others'."""
    cfg = client_module._parsed(load(["name=identity-readonly"]).to_yaml())
    with pytest.raises(Exception, match="read-only"):
        cfg.federation.num_clients = 3
    assert client_module._parsed(load(["name=identity-readonly"]).to_yaml()) is cfg
