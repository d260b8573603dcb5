"""The simulation on a Ray cluster the user already runs (``federation.ray_address``).

The slow test starts a two-node cluster on this machine as a user would on two (``ray start --head``,
then ``ray start --address=<head>``, one CPU each, each node with its own temp dir), runs a tiny
experiment through ``python -m pf2lora_core.tools.launch demo`` (what ``make demo`` runs) pointed at it,
and reads the nodes' own log directories: a ClientApp actor ran on each node, and the run's driver
joined the head. A local Ray of the run's own writes its logs elsewhere, so neither can hold by chance.

The cluster's processes carry a mark of their own in their environment and are stopped by it
(``stop_launched``), not by ``ray stop``: that stops every Ray process of this machine, other
people's simulations included (ray/scripts/scripts.py, ``stop``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from pf2lora_core.config.experiment import load
from pf2lora_core.config.keys import SUMMARY_FILE
from pf2lora_core.config.schema import ConfigError
from pf2lora_core.federation.private_store import PrivateStore
from pf2lora_core.tools.launch import (
    LAUNCH_MARK,
    RAY_ADDRESS_ENV,
    federation_config,
    free_port,
    launched_processes,
    simulation_env,
    stop_launched,
)
from tests.helpers.flower_run import tiny_demo_run

RAY = Path(sys.executable).parent / "ray"
CLIENTS = 2
# Ray's first line in the log of a worker process that hosts an actor (ray/_private/worker.py)
ACTOR_LINE = ":actor_name:ClientAppActor"


@pytest.mark.parametrize(
    ("address", "env"),
    [("", "local"), ("auto", "auto"), ("10.0.0.5:6379", "10.0.0.5:6379"), ("head.lab:6379", "head.lab:6379")],
)
def test_ray_address_reaches_ray_init_as_ray_address(address: str, env: str) -> None:
    exp = load([f"federation.ray_address='{address}'"])
    assert simulation_env(exp) == {RAY_ADDRESS_ENV: env}


@pytest.mark.parametrize("address", ["ray://10.0.0.5:10001", "10.0.0.5", "head:0", "head:70000", "local", "a b:1"])
def test_a_bad_ray_address_is_one_clear_error(address: str) -> None:
    with pytest.raises(ConfigError, match=r"federation\.ray_address") as err:
        load([f"federation.ray_address='{address}'"])
    assert "host:port" in str(err.value)


def test_gpus_of_a_cluster_are_not_counted_on_this_machine() -> None:
    clustered = load(["federation.client_gpus=0.5", "federation.ray_address=10.0.0.5:6379"])
    assert "client-resources-num-gpus=0.5" in federation_config(clustered)  # the GPUs are on the cluster's nodes
    if torch.cuda.device_count() == 0:
        with pytest.raises(ConfigError, match="no GPU"):
            federation_config(load(["federation.client_gpus=0.5"]))


@dataclass
class Cluster:
    address: str
    head: Path  # each node's --temp-dir: its sessions and logs
    worker: Path
    mark: str


def _ray_start(args: list[str], temp_dir: Path, env: dict[str, str]) -> None:
    ports = f"--dashboard-agent-listen-port={free_port()}"  # two nodes on one machine: not Ray's fixed default
    cmd = [str(RAY), "start", *args, f"--temp-dir={temp_dir}", "--num-cpus=1", "--num-gpus=0", ports]
    cmd += ["--disable-usage-stats", f"--object-store-memory={200 * 2**20}"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.fixture
def ray_cluster() -> Iterator[Cluster]:
    """A head and one worker on this machine, one CPU each; stopped (every process of both) afterwards."""
    mark = uuid.uuid4().hex
    root = Path(tempfile.mkdtemp(prefix="pf2r-", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    env = {**os.environ, LAUNCH_MARK: mark, "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop(RAY_ADDRESS_ENV, None)
    address = f"127.0.0.1:{free_port()}"
    try:
        head = ["--head", f"--port={address.split(':')[1]}", "--include-dashboard=false"]
        _ray_start([*head, f"--ray-client-server-port={free_port()}"], root / "head", env)
        _ray_start([f"--address={address}"], root / "worker", env)
        yield Cluster(address, root / "head", root / "worker", mark)
    finally:
        stop_launched(mark, grace_s=5)
        left = launched_processes(mark)
        shutil.rmtree(root, ignore_errors=True)
        assert not left, f"cluster processes left running: {left}"


def _logs_with(node: Path, text: str) -> list[str]:
    logs = node / "session_latest" / "logs"
    return sorted(p.name for p in logs.glob("*") if p.is_file() and text in p.read_text(errors="replace"))


@pytest.mark.slow
def test_the_simulation_runs_on_an_existing_ray_cluster(tmp_path: Path, ray_cluster: Cluster) -> None:
    overrides = f"rounds=1 local_steps=1 federation.ray_address={ray_cluster.address}"
    run_dir, log, run_mark = tiny_demo_run(tmp_path, overrides, clients=CLIENTS)

    summary = json.loads((run_dir / SUMMARY_FILE).read_text())
    assert [c["client"] for c in summary["clients"]] == list(range(CLIENTS))
    assert all(PrivateStore(tmp_path / "state", run_dir.name, k).load() is not None for k in range(CLIENTS))
    # Flower sized its actor pool from the cluster (one 1-CPU actor per node): each node hosted a client
    assert _logs_with(ray_cluster.worker, ACTOR_LINE), "no ClientApp actor ran on the worker node"
    assert _logs_with(ray_cluster.head, ACTOR_LINE), "no ClientApp actor ran on the head node"
    # the simulation process was a driver of this cluster (its log lies in the head's session), not a Ray of its own
    assert list((ray_cluster.head / "session_latest" / "logs").glob("python-core-driver-*")), log[-3000:]
    # the run stopped what it started and left the user's cluster running
    assert not launched_processes(run_mark)
    assert launched_processes(ray_cluster.mark)
