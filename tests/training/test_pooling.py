"""The classifier head's input: mean over real tokens (model.pooling=mean) vs the architecture's own."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from torch.func import functional_call

from pf2lora_core.config.schema import ModelConfig
from pf2lora_core.training.models import load_classifier
from pf2lora_core.training.pooling import MEAN, NATIVE, mean_over_tokens, use_mean_pooling
from tests.helpers.tiny_bert import make_tiny_bert


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_bert(tmp_path_factory.mktemp("m") / "tiny-bert")


def _classifier(path: Path, pooling: str) -> nn.Module:
    cfg = ModelConfig(source="path", name=str(path), target_modules=[], head_level="common", head_modules=[],
                      cache_dir="", pooling=pooling)  # fmt: skip
    torch.manual_seed(0)
    return load_classifier(cfg, num_labels=3).model.eval()


def test_mean_over_tokens_skips_padding() -> None:
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])
    assert torch.equal(mean_over_tokens(hidden, torch.tensor([[1, 1, 0]])), torch.tensor([[2.0, 3.0]]))
    assert torch.equal(mean_over_tokens(hidden, None), hidden.mean(dim=1))


def test_mean_pooled_head_reads_the_mean_of_real_tokens(tiny_bert: Path) -> None:
    model, native = _classifier(tiny_bert, MEAN), _classifier(tiny_bert, NATIVE)
    ids = torch.tensor([[101, 2023, 2003, 102, 0], [101, 2307, 102, 0, 0]])
    mask = (ids != 0).long()
    with torch.no_grad():
        hidden = model.bert(input_ids=ids, attention_mask=mask).last_hidden_state
        want = model.classifier(mean_over_tokens(hidden, mask))  # dropout is off in eval mode
        got = model(input_ids=ids, attention_mask=mask).logits
        params = dict(model.named_parameters())
        functional = functional_call(model, params, args=(), kwargs={"input_ids": ids, "attention_mask": mask}).logits
        other = native(input_ids=ids, attention_mask=mask).logits
    assert torch.allclose(got, want, atol=1e-6) and torch.allclose(functional, want, atol=1e-6)
    assert not torch.allclose(other, want, atol=1e-3)  # the native head reads the [CLS] pooler instead
    # padding does not move a row's logits: the same sentence padded further scores the same
    longer = torch.cat([ids, torch.zeros(2, 3, dtype=torch.long)], dim=1)
    with torch.no_grad():
        padded = model(input_ids=longer, attention_mask=(longer != 0).long()).logits
    assert torch.allclose(padded, got, atol=1e-5)


def test_mean_pooling_refuses_a_model_without_pooler() -> None:
    class NoPooler(nn.Module):
        base_model_prefix = "encoder"

        def __init__(self) -> None:
            super().__init__()
            self.encoder = nn.Linear(2, 2)

    with pytest.raises(ValueError, match=r"model\.pooling=native"):
        use_mean_pooling(NoPooler())
