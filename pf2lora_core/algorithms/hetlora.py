"""HETLoRA: heterogeneous per-client LoRA ranks with rank self-pruning and sparsity-weighted aggregation.

Cho et al., "Heterogeneous LoRA for Federated Fine-tuning of On-Device Foundation Models"
(EMNLP 2024). Client k holds rank ``r_k`` in ``[r_min, r_max]``; the server holds a rank-``r_max``
adapter and sends client k its first ``r_k`` components (``A[:r_k]``, ``B[:, :r_k]``). Locally the
client minimises ``f_k + lambda * sum_modules ||B[:, g r_k : r_k] A[g r_k : r_k, :]||_F`` (AdamW),
which pushes the tail components towards zero; if training shrank that tail norm, the client
prunes itself to ``max(floor(g r_k), r_min)`` components (ranks only shrink; ``prune_tol > 0``
also requires the tail to be below that share of the whole update's norm, so that a tail still
holding learned directions is kept: the synthetic task sets it to the rank threshold). The server
zero-pads every uplink to ``r_max`` and averages each module's factors with weights
``||B_k A_k||_F / sum_j ||B_j A_j||_F`` (sparsity-weighted); the head, not a LoRA factor, is
averaged by numbers of examples.

Choices the paper leaves open, ours: ranks are assigned uniformly in ``[r_min, r_max]`` by
``rank_seed`` unless ``client_ranks`` lists them; the regulariser and the pruning test use the
sum of the tail norms over all adapted modules, and a pruned client prunes every module alike
(one rank per client, as the paper's per-client r_k); the scaling is ``lora_alpha / r_max`` for
every client, so a zero-padded product means the same update at every rank.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from pf2lora_core.algorithms.aggregation import weighted_mean
from pf2lora_core.algorithms.base import LocalContext, StateDict
from pf2lora_core.algorithms.lowrank import (
    RankedLoRA,
    RankedParams,
    check_truncated_uplink,
    is_lora,
    lora_pairs,
    pad,
    rank_of,
    truncate,
)
from pf2lora_core.algorithms.uplink import Spec
from pf2lora_core.config.keys import COMMON


@dataclass
class HETLoRAParams(RankedParams):
    gamma: float  # pruning factor g in (0, 1): the tail is components [floor(g r_k), r_k)
    reg: float  # lambda, weight of the tail-norm regulariser
    # cap of a client's sparsity weight: at most this multiple of the median weight of the round
    # (0 = no cap); one large (or poisoned) uplink cannot become the aggregate
    max_weight_ratio: float = 4.0
    # prune only a tail below this share of the whole update's norm (0: the paper's rule, any tail
    # that shrank): a tail above the rank threshold still holds learned directions
    prune_tol: float = 0.0

    def validate(self) -> None:
        super().validate()
        if self.max_weight_ratio < 0:
            raise ValueError(f"algorithm.max_weight_ratio must be >= 0 (0 = no cap), got {self.max_weight_ratio}")
        if not 0 < self.gamma < 1:
            raise ValueError(f"algorithm.gamma must be in (0, 1), got {self.gamma}")
        if self.reg < 0:
            raise ValueError(f"algorithm.reg must be >= 0, got {self.reg}")
        if not 0 <= self.prune_tol < 1:
            raise ValueError(f"algorithm.prune_tol must be in [0, 1) (0 = the paper's rule), got {self.prune_tol}")


def tail_start(rank: int, gamma: float) -> int:
    """First pruned component: ``floor(gamma * rank)``, at least 1 (a client keeps a component)."""
    return max(1, math.floor(gamma * rank))


def tail_norm(state: Mapping[str, Tensor], rank: int, gamma: float) -> Tensor:
    """``sum_modules ||B[:, s:rank] A[s:rank, :]||_F`` with ``s = tail_start(rank, gamma)`` (differentiable)."""
    start = tail_start(rank, gamma)
    total = torch.zeros(())
    for a_name, b_name in lora_pairs(list(state)).values():
        a, b = state[a_name][start:rank, :], state[b_name][:, start:rank]
        total = total + torch.linalg.matrix_norm(b @ a)
    return total


def full_norm(state: Mapping[str, Tensor], rank: int) -> Tensor:
    """``sum_modules ||B[:, :rank] A[:rank, :]||_F``: the whole update's norm, the tail's yardstick."""
    total = torch.zeros(())
    for a_name, b_name in lora_pairs(list(state)).values():
        total = total + torch.linalg.matrix_norm(state[b_name][:, :rank] @ state[a_name][:rank, :])
    return total


def pruned_rank(
    rank: int, r_min: int, gamma: float, before: float, after: float, whole: float = 0.0, tol: float = 0.0
) -> int:
    """The rank after local training: pruned to ``max(tail_start, r_min)`` when the tail norm shrank.

    With ``tol > 0`` the tail must also be below ``tol`` times the whole update's norm ``whole``.
    """
    negligible = tol <= 0 or after < tol * whole
    return max(tail_start(rank, gamma), r_min) if after < before and negligible else rank


def sparsity_weighted_mean(
    uplinks: Sequence[Mapping[str, Tensor]],
    r_max: int,
    example_weights: Sequence[float],
    max_weight_ratio: float = 0.0,
) -> StateDict:
    """Zero-pad to ``r_max`` and average each module with weights ``||B_k A_k||_F`` (normalised).

    Non-LoRA tensors (the head) are averaged by ``example_weights``. A module every client left at
    zero (all norms 0) is averaged uniformly. ``max_weight_ratio > 0`` caps each weight at that
    multiple of the module's median weight, ``w_k = min(||B_k A_k||_F, c * median_j ||B_j A_j||_F)``
    (our bound; the paper has none): a 1e6-valued uplink weighs as much as c median clients.
    """
    padded = [pad(u, r_max) for u in uplinks]
    out = weighted_mean([{k: v for k, v in p.items() if not is_lora(k)} for p in padded], example_weights)
    for a_name, b_name in lora_pairs(list(padded[0])).values():
        norms = [float(torch.linalg.matrix_norm(p[b_name].double() @ p[a_name].double())) for p in padded]
        if max_weight_ratio > 0:
            cap = max_weight_ratio * statistics.median(norms)
            norms = [min(n, cap) for n in norms] if cap > 0 else norms
        weights = norms if sum(norms) > 0 else [1.0] * len(norms)
        pair = weighted_mean([{a_name: p[a_name], b_name: p[b_name]} for p in padded], weights)
        out.update(pair)
    return {k: out[k] for k in padded[0]}


class HETLoRA(RankedLoRA):
    name = "hetlora"
    Params = HETLoRAParams
    params: HETLoRAParams

    def __init__(self, params: HETLoRAParams) -> None:
        super().__init__(params)
        # server side: every client's current rank (ranks only shrink; learned from uplink shapes)
        self.ranks: dict[int, int] = {}

    # ----------------------------------------------------------------------------- server
    def downlink(self, state: Mapping[str, Tensor], client: int) -> StateDict:
        return truncate(state, self.ranks.setdefault(client, self.initial_rank(client)))

    def check_uplink(self, sent: Mapping[str, Spec], received: Mapping[str, Spec]) -> str | None:
        return check_truncated_uplink(sent, received)

    def server_update(
        self,
        state: Mapping[str, Tensor],
        uplinks: Sequence[Mapping[str, Tensor]],
        weights: Sequence[float],
        clients: Sequence[int],
    ) -> StateDict:
        for client, uplink in zip(clients, uplinks, strict=True):
            self.ranks[client] = rank_of(uplink)
        return sparsity_weighted_mean(uplinks, self.params.rank, weights, self.params.max_weight_ratio)

    # ----------------------------------------------------------------------------- client
    def train(self, ctx: LocalContext) -> dict[str, float]:
        p, rank = self.params, self._rank
        params = ctx.model.parameters(COMMON)
        before = float(tail_norm({k: v.detach() for k, v in params.items()}, rank, p.gamma))
        penalty = (lambda ps: p.reg * tail_norm(ps, rank, p.gamma)) if p.reg > 0 else None
        metrics = self.adamw_steps(ctx, params, penalty)
        trained = {k: v.detach() for k, v in params.items()}
        after = float(tail_norm(trained, rank, p.gamma))
        whole = float(full_norm(trained, rank)) if p.prune_tol > 0 else 0.0
        self._rank = pruned_rank(rank, p.r_min, p.gamma, before, after, whole, p.prune_tol)
        return {**metrics, "rank": float(self._rank), "tail_norm": after}
