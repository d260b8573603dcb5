"""What a sequence classifier's head reads: the architecture's own pooling, or the mean over real tokens."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pf2lora_core.data.columns import ATTENTION_MASK

MEAN = "mean"  # mean of the last hidden layer over real (attention-masked) tokens
NATIVE = "native"  # the architecture's own: BERT's pretrained pooler on [CLS], RoBERTa's <s>, GPT-2's last token
POOLINGS = (MEAN, NATIVE)


def mean_over_tokens(hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``sum_t m_t h_t / max(1, sum_t m_t)`` per row: the mean over real tokens (padding excluded).

    The pooling sentence-transformers trained all-MiniLM-L6-v2 with (its ``1_Pooling`` config:
    ``pooling_mode_mean_tokens``).
    """
    if mask is None:
        return hidden.mean(dim=1)
    weights = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)


def use_mean_pooling(model: nn.Module) -> None:
    """Make a BERT-style classifier's head read the mean over real tokens instead of its pooler.

    BERT-family ``*ForSequenceClassification`` models feed ``outputs.pooler_output`` (the pretrained
    pooler, dense + tanh on [CLS]) through dropout to the classifier. A forward hook on the encoder
    replaces ``pooler_output`` with ``mean_over_tokens(last_hidden_state, attention_mask)``; the
    pooler's own output is discarded, so its (frozen) weights no longer matter. The hook sits on the
    encoder module itself, so it stays in force inside peft's wrapper and under
    ``torch.func.functional_call``.

    Raises
    ------
    ValueError
        When the model has no encoder with a pooler (RoBERTa's and GPT-2's classifiers pool inside
        their own head): use ``model.pooling=native`` there.
    """
    encoder = getattr(model, str(getattr(model, "base_model_prefix", "")), None)
    if encoder is None or getattr(encoder, "pooler", None) is None:
        raise ValueError(
            f"model.pooling={MEAN}: {type(model).__name__} has no BERT-style encoder with a pooler to replace; "
            f"set model.pooling={NATIVE}"
        )
    encoder.register_forward_hook(_mean_pooled_output, with_kwargs=True)


def _mean_pooled_output(module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> Any:
    mask = kwargs.get(ATTENTION_MASK, args[1] if len(args) > 1 else None)
    output.pooler_output = mean_over_tokens(output.last_hidden_state, mask)
    return output
