"""Every pass of one PF2LoRA step runs the same attention kernel on the same dropout masks.

For each HVP method, one bilevel step on a tiny BERT with attention-probability dropout is
observed from outside the code under test: at the start of every forward pass (a call of the
step's loss) the SDPA backend flags in force and the model's attention implementation; at every
attention call which function ran it; and at every dropout site the zero pattern of what it
produced (the attention probabilities after dropout, the outputs of every ``nn.Dropout``). The
zero pattern *is* the mask (softmax probabilities and the hidden states here are never exactly
0 otherwise), so equal patterns across the passes mean equal masks, and the next step's patterns
must differ (the masks are live and drawn per step).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn
from transformers import AttentionInterface, BertForSequenceClassification

from pf2lora_core.algorithms import LocalContext
from pf2lora_core.algorithms.pf2lora import PF2LoRA, PF2LoRAParams
from pf2lora_core.training import dropout_tape as noise
from pf2lora_core.training.adapters import TwoLevelModel
from pf2lora_core.training.dropout_tape import TAPED_ATTENTION
from tests.helpers.tiny_bert import make_tiny_bert

CPU = torch.device("cpu")
LAYERS = 2  # tests/helpers/tiny_bert.py
PARAMS = PF2LoRAParams(
    name="pf2lora", rank=4, lora_alpha=8, lr=1e-2, weight_decay=0.0, private_rank=2, private_alpha=4, inner_lr=0.5,
    hvp="finite_difference", fd_eps=1e-3, fd_scheme="forward", exact_ad="reverse", mode="bilevel",
    reuse_inner_grad=False,
)  # fmt: skip
# method -> (overrides, forward passes of the first step, of a later step)
METHODS: dict[str, tuple[dict[str, object], int, int]] = {
    "exact": ({"hvp": "exact", "exact_ad": "reverse"}, 2, 2),  # the HVP is a backward on the kept graph
    "exact_forward": ({"hvp": "exact", "exact_ad": "forward"}, 3, 3),
    "finite_difference": ({"hvp": "finite_difference", "fd_scheme": "forward"}, 3, 3),
    "finite_difference_central": ({"hvp": "finite_difference", "fd_scheme": "central"}, 4, 4),
    "first_order": ({"hvp": "first_order"}, 2, 2),
    "reuse_inner_grad": ({"reuse_inner_grad": True}, 3, 2),  # the first step starts the carry
}


@pytest.fixture(scope="module")
def tiny_bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


def _model(path: Path, attention_dropout: float) -> TwoLevelModel:
    torch.manual_seed(0)
    base = BertForSequenceClassification.from_pretrained(
        path, num_labels=2, attention_probs_dropout_prob=attention_dropout, hidden_dropout_prob=0.1
    )
    assert base.config._attn_implementation == "sdpa"  # the default the taped passes must replace
    common, private = PF2LoRA(PARAMS).adapters()
    model = TwoLevelModel(base, ["query", "value"], common, private, ["classifier"])
    with torch.no_grad():  # non-zero B and D: both levels shape the loss, the HVP is not trivially 0
        for level in model.levels:
            for p in model.parameters(level).values():
                p.normal_(0, 0.2)
    model.model.train()
    return model


def _batch() -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1000, 30000, (4, 8), generator=g)
    return {"input_ids": ids, "labels": torch.randint(0, 2, (4,), generator=g)}


def _primal(t: Tensor) -> Tensor:
    return torch.autograd.forward_ad.unpack_dual(t).primal


@dataclasses.dataclass
class Pass:
    backends: dict[str, bool]
    # per attention call: the function that ran it and the model's configured implementation then
    attention: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    masks: list[Tensor] = dataclasses.field(default_factory=list)  # zero patterns, in call order


class Observer:
    """Records each forward pass of a step's loss, its attention calls and its dropout outputs."""

    def __init__(self, model: TwoLevelModel, monkeypatch: pytest.MonkeyPatch) -> None:
        self.model = model
        self.passes: list[Pass] = []
        taped = AttentionInterface._global_mapping[TAPED_ATTENTION]
        sdpa = noise.sdpa_attention_forward

        def spy_taped(module: nn.Module, *args: object, **kwargs: object) -> tuple[Tensor, Tensor | None]:
            calls = self.passes[-1].attention
            before = len(calls)
            out, probs = taped(module, *args, **kwargs)
            if len(calls) == before:  # it did not hand over to SDPA: its own eager path ran
                calls.append(("taped_attention", module.config._attn_implementation))
                self.passes[-1].masks.append(_primal(probs) == 0)
            return out, probs

        def spy_sdpa(module: nn.Module, *args: object, **kwargs: object) -> tuple[Tensor, None]:
            self.passes[-1].attention.append(("sdpa", module.config._attn_implementation))
            return sdpa(module, *args, **kwargs)

        monkeypatch.setitem(AttentionInterface._global_mapping, TAPED_ATTENTION, spy_taped)
        monkeypatch.setattr(noise, "sdpa_attention_forward", spy_sdpa)
        for module in model.model.modules():
            if type(module) is nn.Dropout:
                module.register_forward_hook(lambda _m, _i, out: self.passes[-1].masks.append(_primal(out) == 0))

    def loss(self, loss):  # the step's LossFn, wrapped
        def observed(params: dict[str, Tensor] | None) -> Tensor:
            self.passes.append(
                Pass(
                    backends={
                        "math": torch.backends.cuda.math_sdp_enabled(),
                        "flash": torch.backends.cuda.flash_sdp_enabled(),
                        "mem_efficient": torch.backends.cuda.mem_efficient_sdp_enabled(),
                        "cudnn": torch.backends.cuda.cudnn_sdp_enabled(),
                    }
                )
            )
            return loss(params)

        return observed


def _steps(model: TwoLevelModel, obs: Observer, overrides: dict[str, object], steps: int) -> list[list[Pass]]:
    algorithm = PF2LoRA(dataclasses.replace(PARAMS, **overrides))
    batch = _batch()
    ctx = LocalContext(
        model=model,
        objective=lambda b, params: nn.functional.cross_entropy(
            torch.func.functional_call(model.model, params or {}, args=(), kwargs={"input_ids": b["input_ids"]}).logits,
            b["labels"],
        ),
        batches=iter([batch] * steps),
        steps=steps,
        seed=11,
        device=CPU,
    )
    solver = algorithm.solver(ctx)
    per_step = []
    for step in range(steps):
        start = len(obs.passes)
        solver.step(obs.loss(ctx.loss_for(next(ctx.batches), step)))
        per_step.append(obs.passes[start:])
    return per_step


MATH_ONLY = {"math": True, "flash": False, "mem_efficient": False, "cudnn": False}


@pytest.mark.parametrize("method", list(METHODS))
def test_every_pass_of_a_step_uses_one_kernel_and_the_same_attention_dropout_masks(
    method: str, tiny_bert_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = _model(tiny_bert_dir, attention_dropout=0.3)
    obs = Observer(model, monkeypatch)
    overrides, first, later = METHODS[method]
    steps = _steps(model, obs, overrides, steps=2)
    assert [len(s) for s in steps] == [first, later]
    sites = 1 + 3 * LAYERS + 1  # embeddings, per layer (attention probs + 2 hidden), classifier
    for passes in steps:
        for p in passes:
            assert p.backends == MATH_ONLY  # one SDPA kernel for the whole step
            # every layer through taped_attention, never SDPA's own (untaped) dropout
            assert p.attention == [("taped_attention", TAPED_ATTENTION)] * LAYERS
            assert len(p.masks) == sites
        reference = passes[0].masks
        attention = [reference[1 + 3 * i] for i in range(LAYERS)]  # embeddings first, then attention
        assert all(0 < int(m.sum()) < m.numel() for m in attention)  # attention dropout is live
        for p in passes[1:]:
            for a, b in zip(p.masks, reference, strict=True):
                assert torch.equal(a, b)
    # another step, another seed: other masks (the equality above is not vacuous)
    assert not all(torch.equal(a, b) for a, b in zip(steps[0][0].masks, steps[1][0].masks, strict=True))
    assert model.model.config._attn_implementation == "sdpa"  # restored after the passes


@pytest.mark.parametrize("method", ["exact", "finite_difference"])
def test_without_attention_dropout_every_pass_runs_sdpa_under_the_math_kernel(
    method: str, tiny_bert_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = _model(tiny_bert_dir, attention_dropout=0.0)
    obs = Observer(model, monkeypatch)
    overrides, first, _ = METHODS[method]
    (passes,) = _steps(model, obs, overrides, steps=1)
    assert len(passes) == first
    for p in passes:
        assert p.backends == MATH_ONLY
        assert p.attention == [("sdpa", TAPED_ATTENTION)] * LAYERS  # no randomness in attention: SDPA's path
        assert len(p.masks) == 1 + 2 * LAYERS + 1
        for a, b in zip(p.masks, passes[0].masks, strict=True):
            assert torch.equal(a, b)
