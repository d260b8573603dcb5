"""HOMLoRA (FedIT): plain federated LoRA, one adapter of the same rank on every client.

Zhang et al., "Towards Building the Federated GPT: Federated Instruction Tuning" (FedIT,
ICASSP 2024): each client runs local AdamW steps on a shared LoRA adapter; the server averages
the adapters weighted by the clients' numbers of examples (FedAvg). The PF2LoRA paper calls this
baseline HOMLoRA (homogeneous rank).
"""

from __future__ import annotations

from pf2lora_core.algorithms.base import Algorithm, LocalContext, LoRAParams
from pf2lora_core.config.keys import COMMON
from pf2lora_core.training.adapters import AdapterSpec


class HOMLoRA(Algorithm):
    name = "homlora"
    Params = LoRAParams

    def adapters(self) -> tuple[AdapterSpec, None]:
        return AdapterSpec(self.params.rank, self.params.lora_alpha), None

    def train(self, ctx: LocalContext) -> dict[str, float]:
        return self.adamw_steps(ctx, ctx.model.parameters(COMMON))
