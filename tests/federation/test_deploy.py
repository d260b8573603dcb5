"""Real deployment on loopback: a SuperLink and 3 SuperNodes as native processes, TLS and SuperNode
authentication on, the README's commands (certificates from ``scripts/make_certs.py``, keys
registered with ``flwr supernode register``, ``flwr run . <connection>``).

One run of 2 rounds (tiny BERT, 1 local step). Every SuperNode trains on its own csv file (its
node config's ``data-path``; the three files have different label mixes) and the ServerApp has no
data at all (``task=files`` with no ``data_files``, the label set from ``task.label_names``): the
run completes and each client's label histograms and sizes in ``summary.json`` are those of its own
file (the nodes opt in to sharing them with ``share-data-stats``). SuperNode 1 is killed (its process
group, SIGTERM, as ``docker stop`` or systemd would) during round 1, right after its round-1
private adapter reached its disk, and restarted at once with the same key and state directory:
the run completes, and round 2 on that node starts from exactly (bitwise) the private adapter on
disk. A SuperNode with an unregistered key is refused, and so is a client that does not use TLS.
(Resume equivalence through the real ServerApp and ClientApp code is ``test_resume.py``'s
``test_app_resumed_after_a_kill_ends_bitwise_equal``, in one process: each process started here
costs seconds of imports.)

Every process is started in its own session and stopped by its PID (its process group) at the
end, also when a test fails.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import pytest
import torch
from safetensors.torch import load_file

from pf2lora_core.config.keys import METRICS_FILE, SUMMARY_FILE
from pf2lora_core.federation.private_store import PREVIOUS_FILE, PrivateStore, tensor_digest
from tests.helpers.sites import LABELS, MIXES, split_sizes, write_site
from tests.helpers.tiny_bert import make_tiny_bert

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
CLIENTS, ROUNDS, STEPS = 3, 2, 1
VICTIM = 1  # the client whose SuperNode is killed during round 1
CONNECTION = "pf2lora-test"
RUN_TIMEOUT_S = 300


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Processes:
    """Processes started by this test, each the leader of its own process group."""

    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    logs: dict[str, Path] = field(default_factory=dict)
    _files: list[IO[bytes]] = field(default_factory=list)

    def start(self, name: str, cmd: list[str], log: Path, env: dict[str, str], cwd: Path) -> subprocess.Popen:
        fh = open(log, "wb")  # noqa: SIM115  (closed in stop_all)
        self._files.append(fh)
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True)
        self.procs[name], self.logs[name] = proc, log
        return proc

    def stop(self, name: str, sig: int = signal.SIGTERM, wait: float = 15.0) -> None:
        """Signal the process group led by ``name``'s PID; SIGKILL it if it has not exited in ``wait`` s."""
        proc = self.procs[name]
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        with contextlib.suppress(ProcessLookupError):  # children that outlived their leader
            os.killpg(proc.pid, signal.SIGKILL)

    def stop_all(self) -> None:
        for name in reversed(list(self.procs)):
            self.stop(name, wait=10.0)
        for fh in self._files:
            fh.close()

    def text(self, name: str) -> str:
        return self.logs[name].read_text(errors="replace")


def wait_for(condition: Callable[[], bool], timeout: float, what: str, procs: Processes | None = None) -> None:
    deadline = time.time() + timeout
    while not condition():
        if time.time() > deadline:
            tails = "".join(f"\n--- {n}\n{procs.text(n)[-1500:]}" for n in procs.procs) if procs else ""
            raise AssertionError(f"timed out waiting for {what}{tails}")
        time.sleep(0.2)


@dataclass
class Deployment:
    tmp: Path
    certs: Path
    env: dict[str, str]
    procs: Processes
    port: int
    model: Path

    def cli_env(self) -> dict[str, str]:
        return {**self.env, "FLWR_HOME": str(self.tmp / "cli_home")}

    def flwr(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(BIN / "flwr"), *args], env=self.cli_env(), cwd=ROOT, capture_output=True, text=True, timeout=timeout
        )

    def start_supernode(self, k: int, key: str, tag: str = "") -> subprocess.Popen:
        home = self.tmp / f"node_{k}_home"
        state = self.tmp / f"node_{k}_state"
        data = write_site(self.tmp / f"site_{k}.csv", MIXES[k % CLIENTS], k)  # this site's own file
        node_config = (
            f'partition-id={k} num-partitions={CLIENTS} state-dir="{state}" data-path="{data}" '
            f'allow-models="{self.model}" share-data-stats=true'
        )
        cmd = [
            str(BIN / "flower-supernode"), "--root-certificates", str(self.certs / "ca.crt"),
            "--superlink", f"127.0.0.1:{self.port}", "--auth-supernode-private-key", str(self.certs / key),
            "--port", str(free_port()), "--node-config", node_config,
        ]  # fmt: skip
        name = f"supernode_{k}{tag}"
        return self.procs.start(name, cmd, self.tmp / f"{name}.log", {**self.env, "FLWR_HOME": str(home)}, self.tmp)

    def submit(self, overrides: str, name: str) -> subprocess.Popen:
        cmd = [str(BIN / "flwr"), "run", ".", CONNECTION, "--stream", "--run-config", f"overrides='{overrides}'"]
        return self.procs.start(name, cmd, self.tmp / f"{name}.log", self.cli_env(), ROOT)


def base_env() -> dict[str, str]:
    return {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_VERBOSITY": "error",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    }


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    tmp = tmp_path_factory.mktemp("deploy")
    procs = Processes()
    try:
        certs = tmp / "certs"
        made = subprocess.run(
            [sys.executable, str(ROOT / "scripts" / "make_certs.py"), "--out", str(certs),
             "--hosts", "localhost,127.0.0.1", "--supernodes", str(CLIENTS + 1)],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert made.returncode == 0, made.stderr
        port = free_port()
        dep = Deployment(tmp, certs, base_env(), procs, port, make_tiny_bert(tmp / "tiny-bert"))
        (tmp / "cli_home").mkdir()
        (tmp / "cli_home" / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
            f'address = "127.0.0.1:{port}"\nroot-certificates = "{certs / "ca.crt"}"\n\n'
            f'[superlink.plain]\naddress = "127.0.0.1:{port}"\ninsecure = true\n'
        )
        superlink = [
            str(BIN / "flower-superlink"), "--ssl-ca-certfile", str(certs / "ca.crt"),
            "--ssl-certfile", str(certs / "server.pem"), "--ssl-keyfile", str(certs / "server.key"),
            "--enable-supernode-auth", "--host", "127.0.0.1", "--port", str(port),
            "--database", str(tmp / "superlink.db"), "--disable-runtime-dependency-installation",
        ]  # fmt: skip
        procs.start("superlink", superlink, tmp / "superlink.log", {**dep.env, "FLWR_HOME": str(tmp / "sl_home")}, tmp)
        wait_for(lambda: "Uvicorn running on https://" in procs.text("superlink"), 60, "the SuperLink", procs)
        for k in range(CLIENTS):  # supernode_<CLIENTS> stays unregistered
            reg = dep.flwr("supernode", "register", str(certs / f"supernode_{k}.pub"), CONNECTION)
            assert reg.returncode == 0 and "registered successfully" in reg.stdout, reg.stdout + reg.stderr
        for k in range(CLIENTS):
            dep.start_supernode(k, f"supernode_{k}")
        yield dep
    finally:
        procs.stop_all()


@pytest.fixture(scope="module")
def first_run(deployment: Deployment) -> dict:
    """The 2-round run with SuperNode VICTIM killed during round 1 and restarted."""
    dep = deployment
    run_dir = dep.tmp / "runs" / "run"
    overrides = (
        f"federation=deployment federation.connection={CONNECTION} federation.num_clients={CLIENTS} "
        f"federation.min_train_clients=2 federation.wait_for_nodes_s=60 federation.round_timeout_s=120 "
        # no data on the server: task=files without data_files, the label set from config
        f"task=files task.label_names=[{','.join(LABELS)}] task.test_fraction=0.25 task.val_fraction=0.25 "
        f"model.source=path model.name={dep.model} rounds={ROUNDS} "
        f"local_steps={STEPS} flops_rounds=0 task.batch_size=4 task.max_length=16 run_dir={run_dir} "
        # one client evaluates per round, and at the end: every ClientApp process costs seconds
        "federation.fraction_evaluate=0.34 federation.final_eval_clients=1"
    )
    # A SuperNode with a key the SuperLink never registered is refused.
    intruder = dep.start_supernode(CLIENTS, f"supernode_{CLIENTS}", tag="_unregistered")
    submit = dep.submit(overrides, "run_1")
    victim_file = PrivateStore(dep.tmp / f"node_{VICTIM}_state", run_dir.name, VICTIM).path
    wait_for(victim_file.exists, RUN_TIMEOUT_S, "the victim's round-1 private adapter", dep.procs)
    dep.procs.stop(f"supernode_{VICTIM}")  # killed during round 1, before its training reply went out
    # Restart it once the server has seen it go: a node back online under the same id before that
    # would leave its lost reply awaited until federation.round_timeout_s (see the README).
    # The server notices through the SuperLink's NODE_UNAVAILABLE reply (two missed 30 s heartbeats) or,
    # when the killed node's reply was half pushed, through federation.round_timeout_s (120 s after the
    # round began); on a loaded 2-core machine either can take more than two minutes after the kill.
    seen = (f"excluded reply from client {VICTIM} ", f": client {VICTIM} (node ", "round 1/2 done")
    wait_for(lambda: any(x in dep.procs.text("run_1") for x in seen), RUN_TIMEOUT_S, "the server to notice", dep.procs)
    metrics = run_dir / METRICS_FILE
    finished_before_kill = metrics.exists() and bool(metrics.read_text().strip())
    round_1_bytes = victim_file.read_bytes()
    dep.start_supernode(VICTIM, f"supernode_{VICTIM}", tag="_restarted")
    submit.wait(timeout=RUN_TIMEOUT_S)
    intruder.wait(timeout=30)
    return {
        "run_dir": run_dir,
        "overrides": overrides,
        "log": dep.procs.text("run_1"),
        "round_1_bytes": round_1_bytes,
        "finished_before_kill": finished_before_kill,
        "intruder_rc": intruder.returncode,
        "intruder_log": dep.procs.text(f"supernode_{CLIENTS}_unregistered"),
    }


def test_run_completes_despite_the_killed_supernode(first_run: dict, deployment: Deployment) -> None:
    run_dir = first_run["run_dir"]
    assert (run_dir / SUMMARY_FILE).exists(), first_run["log"][-4000:]
    assert not first_run["finished_before_kill"]  # killed during round 1
    records = [json.loads(line) for line in (run_dir / METRICS_FILE).read_text().splitlines()]
    assert [r["round"] for r in records] == [1, 2]
    lost = records[0]["rejected"] + records[0]["missing"]
    assert all(e["client"].startswith(f"client {VICTIM} ") for e in lost), lost  # nobody else lost anything
    # its round-1 training reply arrived (sent before the kill) or its loss is logged with its name
    assert str(VICTIM) in records[0]["train"] or lost, records[0]
    assert records[0]["aggregated"] and records[0]["clients_trained"] >= 2
    assert records[1]["clients_trained"] == CLIENTS and str(VICTIM) in records[1]["train"]
    assert records[1]["rejected"] == [] and records[1]["missing"] == []


def test_each_client_trained_on_its_own_file_and_the_server_on_none(first_run: dict, deployment: Deployment) -> None:
    summary = json.loads((first_run["run_dir"] / SUMMARY_FILE).read_text())
    assert "data_files: {}" in (first_run["run_dir"] / "config.yaml").read_text()  # the server named no data
    evaluated = {c["client"]: c for c in summary["clients"]}
    assert evaluated, summary
    for k, client in evaluated.items():
        hists = split_sizes(MIXES[k])
        assert client["label_histogram"] == hists, (k, client)
        assert client["num_test"] == sum(hists["test"])
    records = [json.loads(line) for line in (first_run["run_dir"] / METRICS_FILE).read_text().splitlines()]
    for k in range(CLIENTS):
        trained = records[-1]["train"][str(k)]
        assert trained["num-examples"] == sum(split_sizes(MIXES[k])["train"]), (k, trained)
    for k in range(CLIENTS):
        assert "site data: training on this node's data-path only" in deployment.procs.text(f"supernode_{k}")


def test_restarted_supernode_continues_from_its_private_adapter_on_disk(
    first_run: dict, deployment: Deployment
) -> None:
    dep = deployment
    store = PrivateStore(dep.tmp / f"node_{VICTIM}_state", first_run["run_dir"].name, VICTIM)
    saved = (store.dir / PREVIOUS_FILE).read_bytes()
    assert saved == first_run["round_1_bytes"]  # round 1's file, untouched by the kill
    round_1 = load_file(str(store.dir / PREVIOUS_FILE))
    line = f"client {VICTIM}: private adapter of round 1 restored from {store.dir} (digest {tensor_digest(round_1)})"
    assert line in dep.procs.text(f"supernode_{VICTIM}_restarted")  # round 2 started from it, bit for bit
    final = store.load()
    assert final is not None and final.round == ROUNDS and final.steps_total == ROUNDS * STEPS
    # round 2 trained on: every D factor (lora_B) moved. (An A factor's one-step change on the tiny
    # model can fall below float32 resolution: layer 1's query gradient is ~1e-6 of its values.)
    changed = {k: not torch.equal(final.tensors[k], round_1[k]) for k in round_1 if round_1[k].numel() > 4}
    assert all(v for k, v in changed.items() if "lora_B" in k) and sum(changed.values()) >= len(changed) - 2, changed


def test_supernode_with_unregistered_key_is_refused(first_run: dict) -> None:
    assert first_run["intruder_rc"] not in (0, None)
    assert "Failed to activate SuperNode" in first_run["intruder_log"], first_run["intruder_log"][-2000:]


def test_tls_is_on_and_plain_connections_fail(deployment: Deployment) -> None:
    assert "Uvicorn running on https://" in deployment.procs.text("superlink")
    ok = deployment.flwr("supernode", "list", CONNECTION)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    plain = deployment.flwr("supernode", "list", "plain")
    assert plain.returncode != 0, plain.stdout
