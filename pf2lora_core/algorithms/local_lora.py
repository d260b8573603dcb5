"""Local-only LoRA: every client trains its own LoRA adapter; the head sits on ``model.head_level``.

The usual "Local" reference of personalized federated learning (no paper to follow: it is the
absence of federation): client k minimises its own loss with its own ``W0 + s B_k A_k``, every
client starting from the same seeded initialisation.

Choices:

- Both LoRA factors are assigned to the PRIVATE level by ``assign_level``; they never leave the
  client. The head follows ``model.head_level`` like in every other algorithm (the same head
  level for all methods in a comparison): with ``common`` (default) the head is averaged by the
  server (FedAvg weighted by examples) and is the only thing that travels; with ``private`` the
  COMMON level is empty, each client sends an empty ArrayRecord (0 bytes up and down) and the run
  is the strict no-federation reference. The one peft adapter keeps its peft name ``common``;
  its level is private.
- Local update: ``K`` AdamW steps (lr beta) per round on every trainable tensor (private LoRA and
  the head wherever it lives), the same budget as the federated baselines; the private adapter
  persists across rounds in the client's private state.
- ``has_global_model = False``: there is no shared adapter (a shared head on the frozen encoder is
  not the model the others call global); global metrics are reported missing.
"""

from __future__ import annotations

from pf2lora_core.algorithms.base import Algorithm, LocalContext, LoRAParams
from pf2lora_core.algorithms.lowrank import is_lora
from pf2lora_core.config.keys import COMMON, PRIVATE
from pf2lora_core.training.adapters import AdapterSpec


class LocalLoRA(Algorithm):
    name = "local"
    Params = LoRAParams
    has_global_model = False

    def adapters(self) -> tuple[AdapterSpec, None]:
        return AdapterSpec(self.params.rank, self.params.lora_alpha), None

    def assign_level(self, name: str, default: str | None) -> str | None:
        """LoRA factors private; the head keeps ``model.head_level``; frozen weights stay frozen."""
        return PRIVATE if is_lora(name) and default is not None else default

    def train(self, ctx: LocalContext) -> dict[str, float]:
        params = {**ctx.model.parameters(COMMON), **ctx.model.parameters(PRIVATE)}
        return self.adamw_steps(ctx, params)
