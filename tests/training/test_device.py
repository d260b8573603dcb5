"""Device placement: what device=auto picks in a Ray client, and GPU settings a simulation cannot run."""

from __future__ import annotations

import logging

import pytest
import torch

from pf2lora_core.config.experiment import load
from pf2lora_core.config.schema import ConfigError
from pf2lora_core.tools.launch import federation_config
from pf2lora_core.training.runtime import resolve_device, simulation_gpu_problem


@pytest.mark.parametrize(
    ("device", "client_gpus", "gpus", "problem"),
    [
        ("auto", 0.0, 0, None),
        ("cpu", 0.0, 1, None),
        ("auto", 0.125, 1, None),
        ("cuda", 0.125, 1, None),
        ("cuda", 0.0, 1, "client_gpus > 0"),  # Ray hides the GPU from every client
        ("cuda:0", 0.0, 1, "client_gpus > 0"),
        ("auto", 0.5, 0, "never start a client"),  # Ray waits for a GPU that does not exist
        ("cpu", -1.0, 1, "must be >= 0"),
        ("cuda:1", 0.5, 2, "as cuda:0"),  # inside a Ray actor the one visible GPU is cuda:0
        ("cuda:0", 0.5, 2, None),
    ],
)
def test_simulation_gpu_settings(device: str, client_gpus: float, gpus: int, problem: str | None) -> None:
    found = simulation_gpu_problem(device, client_gpus, gpus)
    assert found is None if problem is None else problem in found


def test_federation_config_refuses_gpu_clients_on_a_machine_without_gpus() -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(ConfigError, match="never start a client"):
        federation_config(load(["federation.client_gpus=0.125"]))
    assert "client-resources-num-gpus=0.0" in federation_config(load([]))


def test_auto_on_a_process_whose_gpus_are_hidden_says_why(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # what Ray sets for a client with client_gpus=0
    monkeypatch.setattr("pf2lora_core.training.runtime.machine_has_nvidia_gpu", lambda: False)
    with caplog.at_level(logging.WARNING, logger="pf2lora_core.training.runtime"):
        assert resolve_device("auto") == torch.device("cpu")
    assert "client_gpus" not in caplog.text  # a CPU machine: nothing hidden, nothing to say
    monkeypatch.setattr("pf2lora_core.training.runtime.machine_has_nvidia_gpu", lambda: True)
    with caplog.at_level(logging.WARNING, logger="pf2lora_core.training.runtime"):
        assert resolve_device("auto") == torch.device("cpu")
    assert "client_gpus > 0" in caplog.text
    with pytest.raises(ValueError, match="client_gpus > 0"):
        resolve_device("cuda")


def test_deployment_leaves_the_device_to_the_supernodes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 30: the ServerApp ran on a CPU-only SuperExec refused device=cuda meant for GPU SuperNodes."""
    from pf2lora_core.config.experiment import preflight

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    preflight(load(["federation=deployment", "device=cuda"]), check_data=False)  # each client resolves it
    with pytest.raises(ConfigError, match="not a torch device"):
        preflight(load(["federation=deployment", "device=gpu0"]), check_data=False)
    with pytest.raises(ConfigError, match="torch sees no GPU"):  # a simulation's clients run here
        preflight(load(["device=cuda"]), check_data=False)


def test_the_start_line_says_where_clients_compute_and_why(monkeypatch: pytest.MonkeyPatch) -> None:
    from pf2lora_core.training import runtime

    gpu = {"is_available": True, "name": "NVIDIA H100 80GB HBM3"}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu["is_available"])
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: gpu["name"])
    assert "GPU: NVIDIA H100" in runtime.device_report("auto", 0.125) and "0.125 of a GPU" in runtime.device_report(
        "auto", 0.125
    )
    assert "client_gpus=0 hides it" in runtime.device_report("auto", 0.0)  # Ray hides the GPU
    assert runtime.device_report("cpu", 0.125).startswith("clients on the CPU (device=cpu")
    gpu["is_available"] = False
    monkeypatch.setattr(runtime, "machine_has_nvidia_gpu", lambda: True)
    monkeypatch.setattr(torch.version, "cuda", None)
    assert "install a CUDA build" in runtime.device_report("auto", 0.125)  # a CPU wheel on a GPU machine
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    assert "driver is likely older than CUDA 13.0" in runtime.device_report("auto", None)
    monkeypatch.setattr(runtime, "machine_has_nvidia_gpu", lambda: False)
    assert runtime.device_report("auto", None).endswith("no GPU on this machine)")
