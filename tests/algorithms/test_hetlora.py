"""HETLoRA's rules against hand-computed values: truncation, padding, sparsity weights, pruning."""

from __future__ import annotations

import pytest
import torch

from pf2lora_core.algorithms.hetlora import (
    HETLoRA,
    HETLoRAParams,
    pruned_rank,
    sparsity_weighted_mean,
    tail_norm,
    tail_start,
)
from pf2lora_core.algorithms.lowrank import check_truncated_uplink, client_rank, pad, rank_of, truncate

A, B, H = "m.lora_A.common.weight", "m.lora_B.common.weight", "head.weight"


def _state(a: list[list[float]], b: list[list[float]], head: float = 0.0) -> dict[str, torch.Tensor]:
    f = torch.float32
    return {A: torch.tensor(a, dtype=f), B: torch.tensor(b, dtype=f), H: torch.tensor([head], dtype=f)}


def test_truncate_and_pad_are_inverse_up_to_zeros() -> None:
    s = _state([[1, 2], [3, 4], [5, 6]], [[1, 0, 2], [0, 1, 3]], head=7.0)  # rank 3, d_in 2, d_out 2
    t = truncate(s, 2)
    assert torch.equal(t[A], torch.tensor([[1.0, 2], [3, 4]]))
    assert torch.equal(t[B], torch.tensor([[1.0, 0], [0, 1]]))
    assert torch.equal(t[H], s[H]) and rank_of(t) == 2
    p = pad(t, 3)
    assert torch.equal(p[A], torch.tensor([[1.0, 2], [3, 4], [0, 0]]))
    assert torch.equal(p[B], torch.tensor([[1.0, 0, 0], [0, 1, 0]]))


def test_sparsity_weights_are_normalised_product_norms() -> None:
    # client 1: rank 1, B A = [[3],[4]] @ [[1, 0]] -> ||BA||_F = 5
    # client 2: rank 2, B A = diag-ish with ||BA||_F = sqrt(1 + 4) ... computed below
    u1 = _state([[1, 0]], [[3], [4]], head=1.0)
    u2 = _state([[1, 0], [0, 1]], [[0, 0], [0, 0]], head=3.0)  # zero product: weight 0
    out = sparsity_weighted_mean([u1, u2], r_max=2, example_weights=[1, 3])
    # all weight on client 1 (5 / (5 + 0)): padded factors of client 1
    assert torch.allclose(out[A], torch.tensor([[1.0, 0], [0, 0]]))
    assert torch.allclose(out[B], torch.tensor([[3.0, 0], [4, 0]]))
    assert torch.allclose(out[H], torch.tensor([(1 * 1 + 3 * 3) / 4]))  # the head by examples


def test_sparsity_weights_mix_by_norm() -> None:
    u1 = _state([[1, 0]], [[3], [4]])  # ||B A|| = 5
    u2 = _state([[0, 2]], [[0], [5]])  # B A = [[0, 0], [0, 10]] -> 10
    out = sparsity_weighted_mean([u1, u2], r_max=1, example_weights=[1, 1])
    w1, w2 = 5 / 15, 10 / 15
    assert torch.allclose(out[A], torch.tensor([[w1 * 1 + w2 * 0, w1 * 0 + w2 * 2]]))
    assert torch.allclose(out[B], torch.tensor([[w1 * 3], [w1 * 4 + w2 * 5]]))


def test_tail_norm_and_pruning_rule() -> None:
    s = _state([[1, 0], [0, 1], [0, 2]], [[1, 0, 0], [0, 1, 1]])  # rank 3
    assert tail_start(3, 0.5) == 1
    # tail components 1..2: B[:, 1:3] A[1:3, :] = [[0,0],[0,1+2]] -> norm 3
    assert float(tail_norm(s, 3, 0.5)) == pytest.approx(3.0)
    assert pruned_rank(8, r_min=2, gamma=0.5, before=1.0, after=0.5) == 4
    assert pruned_rank(8, r_min=6, gamma=0.5, before=1.0, after=0.5) == 6  # never below r_min
    assert pruned_rank(8, r_min=2, gamma=0.5, before=1.0, after=1.5) == 8  # tail grew: keep


def test_uplink_may_shrink_but_not_grow_or_disagree() -> None:
    sent = {A: ((4, 2), "float32"), B: ((3, 4), "float32"), H: ((1,), "float32")}
    ok = {A: ((3, 2), "float32"), B: ((3, 3), "float32"), H: ((1,), "float32")}
    assert check_truncated_uplink(sent, ok) is None
    assert "does not fit" in check_truncated_uplink(sent, {**ok, A: ((5, 2), "float32")})
    assert "different ranks" in check_truncated_uplink(sent, {**ok, A: ((2, 2), "float32")})
    assert "dtype" in check_truncated_uplink(sent, {**ok, H: ((1,), "float64")})


def test_server_sends_each_client_its_rank_and_learns_pruned_ranks() -> None:
    params = HETLoRAParams(name="hetlora", rank=4, lora_alpha=4.0, lr=1e-3, weight_decay=0.0, r_min=1, gamma=0.5,
                           reg=0.0, rank_seed=0, client_ranks=[1, 3])  # fmt: skip
    algo = HETLoRA(params)
    state = _state([[1, 0], [0, 1], [1, 1], [2, 2]], [[1, 1, 1, 1], [0, 1, 0, 1]])
    assert rank_of(algo.downlink(state, 0)) == 1 and rank_of(algo.downlink(state, 1)) == 3
    algo.server_update(state, [truncate(state, 1), truncate(state, 2)], [1, 1], [0, 1])
    assert rank_of(algo.downlink(state, 1)) == 2  # client 1 pruned itself from 3 to 2


def test_ranks_by_seed_are_deterministic_and_in_range() -> None:
    ranks = [client_rank(k, 2, 8, seed=0) for k in range(50)]
    assert ranks == [client_rank(k, 2, 8, seed=0) for k in range(50)]
    assert min(ranks) >= 2 and max(ranks) <= 8 and len(set(ranks)) > 3
    with pytest.raises(ValueError, match="client_ranks"):
        client_rank(3, 2, 8, seed=0, given=[2, 3])


def test_client_trains_at_its_rank_and_may_prune(tmp_path) -> None:
    from pf2lora_core.config.experiment import load
    from pf2lora_core.federation.client_runtime import ClientRuntime
    from tests.helpers.tiny_bert import make_tiny_bert

    model = make_tiny_bert(tmp_path / "tiny-bert")
    exp = load(["algorithm=hetlora", "model.source=path", f"model.name={model}", "federation.num_clients=2",
                "local_steps=3", "task.max_examples=120", "algorithm.client_ranks=[3,8]", "algorithm.reg=0.5",
                "algorithm.gamma=0.5"])  # fmt: skip
    rt = ClientRuntime(exp)
    algo = exp.algorithm
    state = algo.server_init(rt.model.export("common"))
    down = algo.downlink(state, 0)
    assert rank_of(down) == 3
    out = rt.train(0, 1, down, None)
    assert rank_of(out.common) in (1, 3)  # pruned to max(floor(0.5 * 3), r_min) = 1, or kept
    assert out.metrics["rank"] == rank_of(out.common)
    # the components beyond the client's rank stayed exactly zero in the model
    for name, p in rt.model.parameters("common").items():
        if ".lora_A." in name:
            assert torch.count_nonzero(p[3:]) == 0


def test_prune_tolerance_keeps_a_tail_that_still_holds_learned_directions() -> None:
    # the paper's rule (tol 0): any shrink prunes; with tol the tail must also be negligible
    assert pruned_rank(8, r_min=2, gamma=0.5, before=1.0, after=0.5, whole=10.0, tol=0.0) == 4
    assert pruned_rank(8, r_min=2, gamma=0.5, before=1.0, after=0.5, whole=10.0, tol=0.05) == 8  # 5% of 10 < 0.5
    assert pruned_rank(8, r_min=2, gamma=0.5, before=1.0, after=0.4, whole=10.0, tol=0.05) == 4  # 0.4 < 0.5
    assert pruned_rank(8, r_min=2, gamma=0.5, before=0.3, after=0.4, whole=10.0, tol=0.05) == 8  # it grew
    with pytest.raises(ValueError, match="prune_tol"):
        HETLoRAParams(name="hetlora", rank=8, lora_alpha=16, lr=1e-3, weight_decay=0.0, r_min=2, rank_seed=0,
                      client_ranks=[], gamma=0.5, reg=0.0, prune_tol=1.0).validate()  # fmt: skip
