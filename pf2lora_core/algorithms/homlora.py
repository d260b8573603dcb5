"""HOMLoRA (FedIT): plain federated LoRA, one adapter of the same rank on every client.

Zhang et al., "Towards Building the Federated GPT: Federated Instruction Tuning" (FedIT,
ICASSP 2024): each client runs local AdamW steps on a shared LoRA adapter; the server averages
the adapters weighted by the clients' numbers of examples (FedAvg). The PF2LoRA paper calls this
baseline HOMLoRA (homogeneous rank).
"""

from __future__ import annotations

import torch

from pf2lora_core.adapters import AdapterSpec
from pf2lora_core.algorithms.base import Algorithm, LocalContext, LoRAParams
from pf2lora_core.constants import COMMON, TRAIN_LOSS


class HOMLoRA(Algorithm):
    name = "homlora"
    Params = LoRAParams

    def adapters(self) -> tuple[AdapterSpec, None]:
        return AdapterSpec(self.params.rank, self.params.lora_alpha), None

    def train(self, ctx: LocalContext) -> dict[str, float]:
        params = list(ctx.model.parameters(COMMON).values())
        opt = self.adamw(ctx.model.parameters(COMMON))
        losses = []
        for step in range(ctx.steps):
            loss = ctx.loss_for(next(ctx.batches), step)(None)
            for p, g in zip(params, torch.autograd.grad(loss, params), strict=True):
                p.grad = g
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
        return {TRAIN_LOSS: sum(losses) / len(losses)}
