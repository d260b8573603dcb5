"""Precision of local training: which pass runs in bf16, float32 uplinks, IEEE float32 matmuls.

bf16 autocast runs on CPU too (torch supports it there), so the CUDA path's precision rules are
checked here on CPU with the same code: autocast from the task's loss, float32 passes of the
finite differences (pf2lora_core.training.precision), what a client sends.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord
from torch import Tensor, nn
from transformers import BertForSequenceClassification

from pf2lora_core.algorithms import LocalContext
from pf2lora_core.algorithms.pf2lora import PF2LoRA
from pf2lora_core.config.experiment import load
from pf2lora_core.config.keys import ACCURACY, COMMON
from pf2lora_core.federation import client_runtime as client_mod
from pf2lora_core.training.adapters import TwoLevelModel
from pf2lora_core.training.precision import configure_matmul_precision, float32_pass, float32_required
from pf2lora_core.training.solver import autocast_context
from pf2lora_core.training.tasks import ClassificationTask
from tests.helpers.tiny_bert import make_tiny_bert
from tests.training.test_step_attention import METHODS, PARAMS, _batch

CPU = torch.device("cpu")
BF16, F32 = torch.bfloat16, torch.float32
# forward passes of one (first) step with bf16: true, in order (pf2lora_core/training/precision.py's table)
PASS_DTYPES: dict[str, list[torch.dtype]] = {
    "exact": [BF16, BF16],
    "exact_forward": [BF16, BF16, BF16],
    "finite_difference": [F32, BF16, F32],  # inner pass = the difference's base
    "finite_difference_central": [BF16, BF16, F32, F32],
    "first_order": [BF16, BF16],
    "reuse_inner_grad": [BF16, F32, F32],  # carry, then outer (base) and probe
}


@pytest.fixture(scope="module")
def tiny_bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.mark.parametrize("method", list(PASS_DTYPES))
def test_bf16_autocast_stands_down_exactly_in_the_finite_difference_passes(method: str, tiny_bert_dir: Path) -> None:
    torch.manual_seed(0)
    base = BertForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=2)
    common, private = PF2LoRA(PARAMS).adapters()
    model = TwoLevelModel(base, ["query", "value"], common, private, ["classifier"])
    model.model.train()
    task = ClassificationTask(ACCURACY, CPU, autocast=lambda: autocast_context(CPU, True))
    passes: list[list[torch.dtype]] = []
    probe = next(m for n, m in model.model.named_modules() if n.endswith("layer.0.intermediate.dense"))
    probe.register_forward_hook(lambda _m, _i, out: passes[-1].append(out.dtype))

    def observed(loss):
        def call(params: dict[str, Tensor] | None) -> Tensor:
            passes.append([])
            return loss(params)

        return call

    module = model.model
    ctx = LocalContext(model, lambda b, p: task.loss(module, b, p), iter([_batch()]), 1, seed=0, device=CPU)
    solver = PF2LoRA(dataclasses.replace(PARAMS, **METHODS[method][0])).solver(ctx)
    stats = solver.step(observed(ctx.loss_for(next(ctx.batches), 0)))
    assert [dtypes[0] for dtypes in passes] == PASS_DTYPES[method]
    assert all(len(set(d)) == 1 for d in passes)  # one precision per pass
    assert all(p.dtype == F32 and torch.isfinite(p).all() for p in model.parameters(COMMON).values())
    assert torch.isfinite(torch.tensor(stats.loss))


def test_float32_pass_is_scoped() -> None:
    assert not float32_required()
    with float32_pass():
        assert float32_required()
        with torch.autocast("cpu", dtype=BF16), autocast_context(CPU, True):
            assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == F32
    assert not float32_required()
    with autocast_context(CPU, True):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == BF16
    with autocast_context(CPU, False):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == F32


def test_client_uplink_is_float32_cpu_under_bf16_autocast(tiny_bert_dir: Path) -> None:
    exp = load(["model.source=path", f"model.name={tiny_bert_dir}", "federation.num_clients=2", "local_steps=2",
                "task.max_examples=80", "bf16=true", "device=cpu", "flops_rounds=0"])  # fmt: skip
    rt = client_mod.ClientRuntime(exp)
    seen: set[torch.dtype] = set()
    for m in rt.model.model.modules():
        if isinstance(m, nn.Linear):
            m.register_forward_hook(lambda _m, _i, out: seen.add(out.dtype))
    out = rt.train(0, 1, rt.model.export(COMMON), None)
    assert BF16 in seen  # autocast really ran in bf16
    for state in (out.common, out.private):
        assert state and all(t.dtype == F32 and t.device.type == "cpu" for t in state.values())
    ArrayRecord(out.common)  # Flower accepts it (it rejects bfloat16: next line)
    with pytest.raises(TypeError, match="BFloat16"):
        ArrayRecord({k: v.to(BF16) for k, v in out.common.items()})


def test_wire_state_makes_float32_cpu_contiguous_copies() -> None:
    state = {"a": torch.ones(3, 2, dtype=BF16).t(), "steps": torch.tensor([3])}
    wire = client_mod.wire_state(state)
    assert wire["a"].dtype == F32 and wire["a"].is_contiguous() and torch.equal(wire["a"], torch.ones(2, 3))
    assert wire["steps"].dtype == torch.int64  # integers are left as they are


def test_configure_matmul_precision_turns_tf32_off() -> None:
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")  # what a library or site hook might set
        assert torch.backends.cuda.matmul.allow_tf32
        configure_matmul_precision()
        assert torch.get_float32_matmul_precision() == "highest"
        assert not torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.set_float32_matmul_precision(before)
