"""Centralized LoRA: one model on the pooled training splits, the federation's step budget."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pf2lora_core import data
from pf2lora_core.algorithms import CentralizedLoRA, LocalContext
from pf2lora_core.config.experiment import load
from pf2lora_core.config.keys import COMMON, METRICS_FILE, SUMMARY_FILE
from pf2lora_core.federation import client_runtime as client_mod
from tests.helpers.flower_run import tiny_inprocess_run
from tests.helpers.tiny_bert import make_tiny_bert


@pytest.fixture(scope="module")
def runtime(tmp_path_factory: pytest.TempPathFactory) -> client_mod.ClientRuntime:
    model = make_tiny_bert(tmp_path_factory.mktemp("m") / "tiny-bert")
    exp = load(["algorithm=centralized", "model.source=path", f"model.name={model}", "federation.num_clients=3",
                "local_steps=2", "task.max_examples=240"])  # fmt: skip
    return client_mod.ClientRuntime(exp)


def test_trains_on_every_clients_training_split(runtime: client_mod.ClientRuntime) -> None:
    assert isinstance(runtime.exp.algorithm, CentralizedLoRA)
    pooled = data.pooled_train(runtime.exp.task, runtime.exp.partition, 3, runtime.exp.seed, runtime.tokenizer)
    assert len(pooled) == sum(len(runtime.split(k).train) for k in range(3))
    out = runtime.train(0, 1, runtime.model.export(COMMON), None)
    assert out.num_examples == len(pooled)
    assert out.private == {}


def test_uses_the_federations_total_step_budget(
    runtime: client_mod.ClientRuntime, monkeypatch: pytest.MonkeyPatch
) -> None:
    steps: list[int] = []
    original = CentralizedLoRA.train

    def spy(self: CentralizedLoRA, ctx: LocalContext) -> dict[str, float]:
        steps.append(ctx.steps)
        return original(self, ctx)

    monkeypatch.setattr(CentralizedLoRA, "train", spy)
    runtime.train(1, 1, runtime.model.export(COMMON), None)
    assert steps == [2 * 3]  # local_steps x num_clients


@pytest.mark.slow
def test_one_round_through_flower(tmp_path: Path) -> None:
    run_dir = tiny_inprocess_run(tmp_path, "algorithm=centralized rounds=1 local_steps=1")
    summary = json.loads((run_dir / SUMMARY_FILE).read_text())
    assert summary["algorithm"] == "centralized"
    record = json.loads((run_dir / METRICS_FILE).read_text().splitlines()[0])
    assert record["clients_trained"] == 1  # one node trains on the pooled data
    assert summary["personalized"]["mean"] == pytest.approx(summary["global"]["mean"])
