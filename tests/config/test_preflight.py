"""Fail fast and say why: each set-up that used to fail only after the server waited for nodes
(or after the last round) is one clear ConfigError from ``launch federation-config`` and from the
ServerApp's first lines, before any node is awaited or any run directory made."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from flwr.app import Context, RecordDict

from pf2lora_core.config.schema import ConfigError
from pf2lora_core.tools.launch import main as launch_main

LATE_FAILURES = {
    "model path that does not exist": ("model.source=path model.name=/nonexistent", "model.name"),
    "missing data file": ("task=files +task.data_files.train=/nonexistent.csv", "no such file"),
    "device that does not exist": ("device=cuda:99", "device"),
    "no classes per partition": ("partition=pathological partition.classes_per_partition=0", "classes_per_partition"),
    "more classes per partition than labels": (
        "partition=pathological partition.classes_per_partition=99",
        "the data does not load or partition",
    ),
    "rank list shorter than num_clients": ("algorithm=flexlora algorithm.client_ranks=[2,4]", "client_ranks"),
    "zero round timeout": ("federation.round_timeout_s=0", "federation.round_timeout_s"),
    "negative wait for nodes": ("federation.wait_for_nodes_s=-1", "federation.wait_for_nodes_s"),
    "name escaping output_dir": ("name=../../x", "name: must be a plain name"),
    "empty partitions": ("task.max_examples=10 federation.num_clients=8", "get no training or no test examples"),
}


class NoNodesGrid:
    """A grid that fails the test if the server ever asks it for nodes (it must not wait)."""

    def get_node_ids(self) -> Any:
        raise AssertionError("the server waited for nodes before its preflight failed")

    send_and_receive = get_node_ids


@pytest.mark.parametrize("case", list(LATE_FAILURES))
def test_late_failure_is_one_clear_error_before_any_node_is_awaited(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str
) -> None:
    overrides, message = LATE_FAILURES[case]
    assert launch_main(["federation-config", *overrides.split()]) == 2
    assert message in capsys.readouterr().err
    from server_app.app import main

    out = tmp_path / "out"
    context = Context(0, 0, {}, RecordDict(), {"overrides": f"{overrides} output_dir={out}"})
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")):
        main(NoNodesGrid(), context)
    assert not out.exists()  # no run directory was made


def test_federation_config_of_a_sound_setup_passes_preflight(capsys: pytest.CaptureFixture[str]) -> None:
    assert launch_main(["federation-config", "federation.num_clients=4"]) == 0
    assert "num-supernodes=4" in capsys.readouterr().out


def test_deployment_preflight_checks_config_not_data() -> None:
    """In deployment each site holds its own data: the server checks model and device, not partitions."""
    from pf2lora_core.config.experiment import load, preflight

    exp = load("federation=deployment task=files +task.data_files.train=/only/on/the/sites.csv")
    assert preflight(exp).sizes == {}
    with pytest.raises(ConfigError, match=r"model\.name"):
        preflight(load("federation=deployment model.source=path model.name=/nonexistent"))
