"""FLoRA: the stacked product equals the weighted sum of products; merging and catch-up."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch

from pf2lora_core.algorithms import LoRAParams
from pf2lora_core.algorithms.flora import STACK_A, STACK_B, FLoRA, stack
from pf2lora_core.config.keys import COMMON, METRICS_FILE, PRIVATE, SUMMARY_FILE
from tests.helpers.flower_run import tiny_inprocess_run
from tests.helpers.tiny import MLP

if TYPE_CHECKING:
    from pf2lora_core.federation.client_runtime import ClientRuntime

A, B, H = "m.lora_A.common.weight", "m.lora_B.common.weight", "head.weight"


def _params() -> LoRAParams:
    return LoRAParams(name="flora", rank=2, lora_alpha=4.0, lr=1e-3, weight_decay=0.0)


def _uplink(gen: torch.Generator, rank: int, head: float) -> dict[str, torch.Tensor]:
    return {A: torch.randn(rank, 3, generator=gen), B: torch.randn(4, rank, generator=gen), H: torch.tensor([head])}


def test_stacked_product_equals_weighted_sum_of_products() -> None:
    gen = torch.Generator().manual_seed(0)
    ups = [_uplink(gen, 2, 1.0), _uplink(gen, 1, 2.0), _uplink(gen, 3, 6.0)]  # heterogeneous ranks stack too
    weights = [1.0, 2.0, 1.0]
    out = stack(ups, weights)
    expected = sum(w / 4 * (u[B] @ u[A]) for u, w in zip(ups, weights, strict=True))
    assert out["m" + STACK_A].shape == (6, 3) and out["m" + STACK_B].shape == (4, 6)  # rank 2 + 1 + 3
    assert torch.allclose(out["m" + STACK_B] @ out["m" + STACK_A], expected, atol=1e-6)
    assert torch.allclose(out[H], torch.tensor([(1 + 4 + 6) / 4]))


def test_a_client_that_missed_rounds_gets_every_stack_it_missed() -> None:
    algo = FLoRA(_params())
    gen = torch.Generator().manual_seed(1)
    state = algo.server_init(_uplink(gen, 2, 0.0))
    assert algo.downlink(state, 0)["m" + STACK_A].numel() == 0  # nothing to merge yet
    r1 = [_uplink(gen, 2, 0.0), _uplink(gen, 2, 0.0)]
    state = algo.server_update(state, r1, [1, 1], [0, 1])
    r2 = [_uplink(gen, 2, 0.0)]
    state = algo.server_update(state, r2, [1], [0])  # client 1 missed round 2
    up_to_date, behind = algo.downlink(state, 0), algo.downlink(state, 1)
    assert up_to_date["m" + STACK_A].shape[0] == 2  # only round 2's stack
    assert behind["m" + STACK_A].shape[0] == 6  # rounds 1 and 2: the downlink grows with the ranks
    both = stack(r1, [1, 1])["m" + STACK_B] @ stack(r1, [1, 1])["m" + STACK_A] + r2[0][B] @ r2[0][A]
    assert torch.allclose(behind["m" + STACK_B] @ behind["m" + STACK_A], both, atol=1e-6)


def test_client_merges_into_its_own_weights_and_restarts_a_fresh_lora() -> None:
    from pf2lora_core.training.adapters import TwoLevelModel

    torch.manual_seed(0)
    algo = FLoRA(_params())
    model = TwoLevelModel(MLP(), ["fc1"], *algo.adapters(), head_modules=["head"], assign=algo.assign_level)
    assert set(model.export(PRIVATE)) == {"base_model.model.fc1.base_layer.weight"}
    w0 = model.export(PRIVATE)["base_model.model.fc1.base_layer.weight"]
    fresh = model.export(COMMON)
    head = {k: v for k, v in fresh.items() if "lora" not in k}
    empty = {"base_model.model.fc1" + STACK_A: torch.zeros(0), "base_model.model.fc1" + STACK_B: torch.zeros(0)}
    algo.receive(model, {**empty, **head})  # round 1: nothing to merge (as every process starts)
    gen = torch.Generator().manual_seed(2)
    a, b = torch.randn(3, 6, generator=gen), torch.randn(8, 3, generator=gen)
    with torch.no_grad():  # pretend the client trained its LoRA
        for p in model.parameters(COMMON).values():
            p.add_(1.0)
    algo.receive(model, {"base_model.model.fc1" + STACK_A: a, "base_model.model.fc1" + STACK_B: b, **head})
    merged = model.export(PRIVATE)["base_model.model.fc1.base_layer.weight"]
    assert torch.allclose(merged, w0 + algo.scaling * b @ a, atol=1e-6)
    for k, v in model.export(COMMON).items():
        assert torch.equal(v, fresh[k])  # the LoRA starts fresh every round


@pytest.mark.slow
def test_two_rounds_through_flower(tmp_path: Path) -> None:
    run_dir = tiny_inprocess_run(tmp_path, "algorithm=flora rounds=2 local_steps=1")
    records = [json.loads(line) for line in (run_dir / METRICS_FILE).read_text().splitlines()]
    assert [r["clients_trained"] for r in records] == [2, 2] and not any(r["rejected"] for r in records)
    assert records[1]["bytes_down"] > records[0]["bytes_down"]  # round 2 carries the rank-2r stack
    assert json.loads((run_dir / SUMMARY_FILE).read_text())["algorithm"] == "flora"


@pytest.mark.slow  # ~25 s for both (tokenizer training, data): CI's make test runs it
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_a_flora_round_on_a_tiny_decoder_merges_what_peft_computes(arch: str, tmp_path: Path) -> None:
    """Two clients train a round, the server stacks, a client merges: its merged base model gives the
    logits of the unmerged model carrying the stack as a LoRA adapter in peft's own forward (GPT-2's
    c_attn is a Conv1D whose weight is stored transposed, which the merge must respect)."""
    from peft import LoraConfig

    from pf2lora_core.config.experiment import load
    from pf2lora_core.federation.client_runtime import ClientRuntime
    from tests.helpers.tiny_lm import make_tiny_lm

    model_dir = make_tiny_lm(tmp_path / arch, arch)
    exp = load(["experiment=offline_nlg", "algorithm=flora", "model.source=path", f"model.name={model_dir}",
                "federation.num_clients=2", "local_steps=2", "partition.ids_per_client=15"])  # fmt: skip
    rt = ClientRuntime(exp)  # one process serving both clients, as a Ray actor does
    algo = exp.algorithm
    state = algo.server_init(rt.model.export(COMMON))
    outs = [rt.train(k, 1, algo.downlink(state, k), None) for k in (0, 1)]
    state = algo.server_update(state, [o.common for o in outs], [o.num_examples for o in outs], [0, 1])
    downlink = algo.downlink(state, 0)
    rt.model.model.eval()  # GPT-2 has dropout
    batch = {"input_ids": torch.randint(0, 500, (2, 9), generator=torch.Generator().manual_seed(0))}
    # oracle: client 0's weights of round 1 plus the stack as one LoRA adapter, in peft's forward
    rt._load(_no_stack(downlink), outs[0].private)
    targets = sorted({n.rsplit(".", 1)[-1] for n in rt.model.lora_modules()})
    rank = next(v for k, v in downlink.items() if k.endswith(STACK_A)).shape[0]
    peft_model = rt.model.model
    peft_model.add_adapter("stack", LoraConfig(r=rank, lora_alpha=algo.scaling * rank, target_modules=targets))
    for name, module in rt.model.lora_modules().items():
        module.lora_A["stack"].weight.data.copy_(downlink[name + STACK_A])
        module.lora_B["stack"].weight.data.copy_(downlink[name + STACK_B])
    peft_model.base_model.set_adapter(["stack"])
    with torch.no_grad():
        expected = peft_model(**batch).logits
    peft_model.base_model.set_adapter([COMMON])
    peft_model.base_model.delete_adapter("stack")
    # the client's own round 2: receive (merge) the stack, then its fresh LoRA (B = 0) adds nothing
    rt._load(downlink, outs[0].private)
    with torch.no_grad():
        merged = peft_model(**batch).logits
    assert torch.allclose(merged, expected, atol=1e-5), float((merged - expected).abs().max())
    assert not torch.allclose(merged, _base_logits(rt, outs[0].private, batch), atol=1e-4)  # the merge did something


def _no_stack(downlink: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The downlink with empty stacks: receive() then only loads the fresh LoRA and the head."""
    return {k: (torch.zeros(0) if k.endswith((STACK_A, STACK_B)) else v) for k, v in downlink.items()}


def _base_logits(rt: ClientRuntime, private: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> torch.Tensor:
    rt.model.load(PRIVATE, private)
    with torch.no_grad():
        return rt.model.model(**batch).logits


def test_update_origin_is_the_clients_fresh_lora_of_the_round() -> None:
    """The server measures a FLoRA uplink against the fresh LoRA its client drew that round (issue 27):
    against the run's initial A it would measure two random draws apart (about 8 on MiniLM)."""
    import numpy as np

    from pf2lora_core.algorithms.flora import redraw_lora_a

    fresh = {
        "m.lora_A.common.weight": np.zeros((2, 3), np.float32),
        "m.lora_B.common.weight": np.zeros((3, 2), np.float32),
        "n.lora_A.common.weight": np.zeros((2, 4), np.float32),
        "classifier.weight": np.ones((2, 3), np.float32),
    }
    client = {k: torch.nn.Parameter(torch.from_numpy(v.copy())) for k, v in fresh.items()}
    redraw_lora_a(client, seed=42)  # what FLoRA.train does first
    origin = FLoRA(_params()).update_origin(fresh, 42)
    for name, param in client.items():
        assert np.array_equal(origin[name], param.detach().numpy()), name
    assert not np.array_equal(origin["m.lora_A.common.weight"], fresh["m.lora_A.common.weight"])
    assert not np.array_equal(FLoRA(_params()).update_origin(fresh, 43)["m.lora_A.common.weight"],
                              origin["m.lora_A.common.weight"])  # fmt: skip
