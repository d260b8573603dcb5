"""The FLOP count attention gets: the math kernel's matrix products, whatever kernel would run."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pf2lora_core.training.cost import count_flops


def _attention_flops(batch: int, q_heads: int, length: int, dim: int) -> int:
    # Q K^T and (softmax) V: two (L x d) @ (d x L)-sized products per query head, 2 FLOPs a multiply-add
    return 2 * (2 * batch * q_heads * length * length * dim)


@pytest.mark.parametrize("kv_heads", [9, 3])  # 3: grouped-query attention as SmolLM2's (9 query heads)
def test_attention_is_counted_with_and_without_grouped_heads(kv_heads: int) -> None:
    # Without the math kernel torch 2.13's counter credits CPU SDPA with 0 FLOPs, and before 2.13 its
    # SDPA rule asserts equal head counts (issue 30): a GQA decoder's counted round crashed on GPU.
    b, h, n, d = 2, 9, 16, 8
    q, k, v = torch.randn(b, h, n, d), torch.randn(b, kv_heads, n, d), torch.randn(b, kv_heads, n, d)
    out, flops = count_flops(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=kv_heads != h))
    assert out.shape == (b, h, n, d)
    assert flops == _attention_flops(b, h, n, d)


def test_the_count_leaves_the_attention_kernels_as_they_were() -> None:
    before = torch.backends.cuda.flash_sdp_enabled()
    inside, _ = count_flops(torch.backends.cuda.flash_sdp_enabled)
    assert inside is False and torch.backends.cuda.flash_sdp_enabled() == before
