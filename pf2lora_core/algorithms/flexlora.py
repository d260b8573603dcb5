"""FlexLoRA: aggregate full-size LoRA updates, redistribute each client's truncated SVD at its rank.

Bai et al., "Federated Fine-tuning of Large Language Models under Heterogeneous Tasks and Client
Resources" (NeurIPS 2024). Client k trains a LoRA of its own rank ``r_k``. The server forms the
example-weighted sum of the clients' full-size updates, ``dW = sum_k p_k s B_k A_k`` per adapted
module, and sends client k the rank-``r_k`` truncated SVD of ``dW``:
``B_k = U_r sqrt(S_r) / sqrt(s)``, ``A_k = sqrt(S_r) V_r^T / sqrt(s)``, so that ``s B_k A_k`` is the
best rank-``r_k`` approximation of ``dW`` (Eckart-Young: the error is the discarded singular values).

Choices the paper leaves open, ours: ranks are drawn per client in ``[r_min, rank]`` from
``rank_seed`` unless ``client_ranks`` lists them (the same draw as HETLoRA); the singular values
are split evenly between the factors (``sqrt(S)`` each); before the first aggregation ``dW = 0``,
whose SVD would give all-zero factors (a saddle LoRA cannot leave), so round 1 sends the seeded
initial adapter truncated to ``r_k``; the head is averaged by examples. The server keeps ``dW``
dense (``<module>.delta``), which costs ``d_out x d_in`` floats per module on the server only.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from pf2lora_core.algorithms.aggregation import weighted_mean
from pf2lora_core.algorithms.base import LocalContext, StateDict
from pf2lora_core.algorithms.lowrank import RankedLoRA, RankedParams, is_lora, lora_pairs, truncate
from pf2lora_core.config.keys import COMMON

DELTA = ".delta"  # server state key suffix of a module's dense aggregated update


@dataclass
class FlexLoRAParams(RankedParams):
    """FlexLoRA needs nothing beyond the per-client ranks."""


def dense_sum(uplinks: Sequence[Mapping[str, Tensor]], weights: Sequence[float], scaling: float) -> StateDict:
    """``{module.delta: sum_k w_k s B_k A_k / sum w}`` for every LoRA pair, plus the averaged other tensors."""
    total = float(sum(weights))
    out = weighted_mean([{k: v for k, v in u.items() if not is_lora(k)} for u in uplinks], weights)
    for module, (a_name, b_name) in lora_pairs(list(uplinks[0])).items():
        acc = sum(
            (w / total) * scaling * (u[b_name].double() @ u[a_name].double())
            for u, w in zip(uplinks, weights, strict=True)
        )
        out[module + DELTA] = acc.float()
    return out


def svd_factors(delta: Tensor, rank: int, scaling: float) -> tuple[Tensor, Tensor]:
    """(A, B) with ``scaling * B @ A`` the best rank-``rank`` approximation of ``delta``."""
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    root = torch.sqrt(s[:rank] / scaling)
    a = root[:, None] * vh[:rank, :]
    b = u[:, :rank] * root[None, :]
    if a.shape[0] < rank:  # delta smaller than the rank asked for: zero components
        a = torch.cat([a, a.new_zeros(rank - a.shape[0], a.shape[1])])
        b = torch.cat([b, b.new_zeros(b.shape[0], rank - b.shape[1])], dim=1)
    return a.float(), b.float()


class FlexLoRA(RankedLoRA):
    name = "flexlora"
    Params = FlexLoRAParams
    params: FlexLoRAParams

    def __init__(self, params: FlexLoRAParams) -> None:
        super().__init__(params)
        self._initial: StateDict = {}  # server: the seeded initial adapter (round 1's downlink)

    @property
    def scaling(self) -> float:
        return self.params.lora_alpha / self.params.rank

    # ----------------------------------------------------------------------------- server
    def server_init(self, common: Mapping[str, Tensor]) -> StateDict:
        self._initial = dict(common)
        return dict(common)  # no aggregate yet: the initial adapter itself

    def downlink(self, state: Mapping[str, Tensor], client: int) -> StateDict:
        rank = self.initial_rank(client)
        if not any(k.endswith(DELTA) for k in state):
            return truncate(state, rank)
        out = {k: v.clone() for k, v in state.items() if not k.endswith(DELTA)}
        for module, (a_name, b_name) in lora_pairs(list(self._initial)).items():
            out[a_name], out[b_name] = svd_factors(state[module + DELTA], rank, self.scaling)
        return {k: out[k] for k in self._initial}  # the model's key order

    def server_update(
        self,
        state: Mapping[str, Tensor],
        uplinks: Sequence[Mapping[str, Tensor]],
        weights: Sequence[float],
        clients: Sequence[int],
    ) -> StateDict:
        return dense_sum(uplinks, weights, self.scaling)

    # ----------------------------------------------------------------------------- client
    def train(self, ctx: LocalContext) -> dict[str, float]:
        return self.adamw_steps(ctx, ctx.model.parameters(COMMON))
