"""FlexLoRA's rules: the dense weighted sum of products and the SVD truncation error."""

from __future__ import annotations

import pytest
import torch

from pf2lora_core.algorithms.flexlora import DELTA, FlexLoRA, FlexLoRAParams, dense_sum, svd_factors
from pf2lora_core.algorithms.lowrank import rank_of

A, B, H = "m.lora_A.common.weight", "m.lora_B.common.weight", "head.weight"


def _params(**kw) -> FlexLoRAParams:
    base = dict(
        name="flexlora", rank=4, lora_alpha=8.0, lr=1e-3, weight_decay=0.0, r_min=1, rank_seed=0, client_ranks=[]
    )
    return FlexLoRAParams(**{**base, **kw})


def test_dense_sum_is_the_weighted_sum_of_scaled_products() -> None:
    u1 = {A: torch.tensor([[1.0, 0.0]]), B: torch.tensor([[1.0], [2.0]]), H: torch.tensor([1.0])}
    u2 = {A: torch.tensor([[0.0, 1.0], [1.0, 1.0]]), B: torch.tensor([[1.0, 0.0], [0.0, 3.0]]), H: torch.tensor([5.0])}
    out = dense_sum([u1, u2], [1, 3], scaling=2.0)
    expected = (1 / 4) * 2.0 * (u1[B] @ u1[A]) + (3 / 4) * 2.0 * (u2[B] @ u2[A])
    assert torch.allclose(out["m" + DELTA], expected)
    assert torch.allclose(out[H], torch.tensor([(1 * 1 + 3 * 5) / 4]))


@pytest.mark.parametrize("rank", [1, 2, 3])
def test_truncation_error_equals_the_discarded_singular_values(rank: int) -> None:
    gen = torch.Generator().manual_seed(0)
    delta = torch.randn(6, 5, generator=gen)
    a, b = svd_factors(delta, rank, scaling=2.0)
    assert a.shape == (rank, 5) and b.shape == (6, rank)
    sigma = torch.linalg.svdvals(delta.double())
    error = torch.linalg.matrix_norm((delta - 2.0 * b @ a).double())
    assert float(error) == pytest.approx(float(torch.sqrt((sigma[rank:] ** 2).sum())), rel=1e-5)


def test_each_client_gets_its_rank_and_round_one_gets_the_initial_adapter() -> None:
    algo = FlexLoRA(_params(client_ranks=[1, 3]))
    gen = torch.Generator().manual_seed(1)
    initial = {A: torch.randn(4, 5, generator=gen), B: torch.zeros(6, 4), H: torch.zeros(1)}
    state = algo.server_init(initial)
    first = algo.downlink(state, 1)
    assert rank_of(first) == 3 and torch.equal(first[A], initial[A][:3])  # not the dead SVD of zero
    ups = [{A: torch.randn(1, 5, generator=gen), B: torch.randn(6, 1, generator=gen), H: torch.ones(1)},
           {A: torch.randn(3, 5, generator=gen), B: torch.randn(6, 3, generator=gen), H: torch.ones(1)}]  # fmt: skip
    state = algo.server_update(state, ups, [1, 1], [0, 1])
    for client, rank in ((0, 1), (1, 3)):
        down = algo.downlink(state, client)
        assert rank_of(down) == rank and set(down) == set(initial)
        a, b = svd_factors(state["m" + DELTA], rank, algo.scaling)
        assert torch.allclose(down[A], a) and torch.allclose(down[B], b)
