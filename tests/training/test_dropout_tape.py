"""The dropout tape: replayed passes see exactly the noise a re-seeded pass would draw."""

from __future__ import annotations

import itertools

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

from pf2lora_core.config.keys import COMMON, PRIVATE
from pf2lora_core.training.adapters import AdapterSpec, TwoLevelModel
from pf2lora_core.training.dropout_tape import SeededLoss

CPU = torch.device("cpu")


def _bert(attention: str = "sdpa") -> TwoLevelModel:
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=100, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=32, hidden_dropout_prob=0.3, attention_probs_dropout_prob=0.3, num_labels=2,
        attn_implementation=attention,
    )  # fmt: skip
    model = TwoLevelModel(
        BertForSequenceClassification(config), ["query", "value"], AdapterSpec(4, 8), AdapterSpec(2, 4), ["classifier"]
    )
    with torch.no_grad():  # non-zero B and D so both levels shape the loss
        for p in model.parameters(PRIVATE).values():
            p.normal_(0, 0.3)
        for p in model.parameters(COMMON).values():
            p.normal_(0, 0.3)
    model.model.train()
    return model


def _batch(n: int = 4, length: int = 8) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {
        "input_ids": torch.randint(5, 100, (n, length), generator=g),
        "labels": torch.randint(0, 2, (n,), generator=g),
    }


def _objective(model: TwoLevelModel, batch: dict[str, torch.Tensor]):
    def loss(params: dict[str, torch.Tensor] | None) -> torch.Tensor:
        inputs = {"input_ids": batch["input_ids"]}
        if params is None:
            logits = model.model(**inputs).logits
        else:
            logits = torch.func.functional_call(model.model, params, args=(), kwargs=inputs, strict=False).logits
        return torch.nn.functional.cross_entropy(logits, batch["labels"])

    return loss


def _loss_and_grads(fn, model: TwoLevelModel, y: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    x = list(model.parameters(COMMON).values())
    leaves = {n: t.detach().requires_grad_(True) for n, t in y.items()}
    loss = fn(leaves)
    return [loss.detach(), *torch.autograd.grad(loss, x + list(leaves.values()))]


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_replayed_passes_equal_reseeded_passes_exactly(attention: str) -> None:
    """Every taped pass equals a re-seeded untaped pass of transformers' eager attention, bit for bit (CPU).

    The y point changes between passes as in the solver (y, then y'). Taped passes run attention
    in ``taped_attention`` whatever the model is configured with, drawing the attention-dropout
    masks on the tape; the reference is the model's own eager attention, whose ``F.dropout`` draws
    from the re-seeded stream: equality shows the tape's draws and replays are those draws.
    """
    model, reference = _bert(attention), _bert("eager")
    batch = _batch()
    y0 = {n: p.detach().clone() for n, p in model.parameters(PRIVATE).items()}
    y1 = {n: t + 0.1 for n, t in y0.items()}
    taped = SeededLoss(_objective(model, batch), 123, CPU, model.dropout_tape)
    plain = SeededLoss(_objective(reference, batch), 123, CPU)
    for y in (y0, y1, y0):
        for a, b in zip(_loss_and_grads(taped, model, y), _loss_and_grads(plain, reference, y), strict=True):
            assert torch.equal(a, b)
    assert model.model.config._attn_implementation == attention  # untouched outside taped passes


def test_the_tape_draws_masks_once_and_noise_really_varies_by_seed() -> None:
    model = _bert()
    batch = _batch()
    taped = SeededLoss(_objective(model, batch), 5, CPU, model.dropout_tape)
    first = taped(None)
    # embeddings, per layer the attention probabilities (taped_attention) and two hidden-state
    # dropouts, the classifier (the attention module's own nn.Dropout is never called: its p is)
    assert len(taped.recording.masks) == 1 + 3 * 2 + 1
    assert all(m.dtype == torch.bool for m in taped.recording.masks)
    assert torch.equal(taped(None), first)
    other = SeededLoss(_objective(model, batch), 6, CPU, model.dropout_tape)(None)
    assert not torch.equal(other, first)  # dropout is live: another seed, another loss


def test_a_replayed_pass_on_a_different_batch_is_an_error() -> None:
    model = _bert()
    batch = _batch()
    calls = iter([batch, _batch(n=3)])
    taped = SeededLoss(lambda p: _objective(model, next(calls))(p), 0, CPU, model.dropout_tape)
    taped(None)
    with pytest.raises(RuntimeError, match="does not match the first pass"):
        taped(None)
    assert model.dropout_tape.active is None  # the model is usable again


def test_a_failed_first_pass_records_nothing_and_eval_mode_is_untouched() -> None:
    model = _bert()
    batch = _batch()
    fail = itertools.chain([True], itertools.repeat(False))

    def flaky(params: dict[str, torch.Tensor] | None) -> torch.Tensor:
        loss = _objective(model, batch)(params)
        if next(fail):
            raise ValueError("boom")
        return loss

    taped = SeededLoss(flaky, 0, CPU, model.dropout_tape)
    with pytest.raises(ValueError):
        taped(None)
    plain = SeededLoss(_objective(model, batch), 0, CPU)
    assert torch.equal(taped(None), plain(None))  # recorded afresh, same stream
    model.model.eval()
    in_eval = SeededLoss(_objective(model, batch), 0, CPU, model.dropout_tape)
    assert torch.equal(in_eval(None), _objective(model, batch)(None))  # no dropout in eval mode
    assert in_eval.recording.masks == []
