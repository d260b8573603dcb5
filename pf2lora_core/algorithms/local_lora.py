"""Local-only LoRA: every client trains its own LoRA adapter and head; nothing is communicated.

The usual "Local" reference of personalized federated learning (no paper to follow: it is the
absence of federation): client k minimises its own loss alone, ``W0 + s B_k A_k`` with its own
head, every client starting from the same seeded initialisation.

Choices:

- Every trainable tensor (both LoRA factors and the head, whatever ``model.head_level`` says) is
  assigned to the PRIVATE level by ``assign_level``; the COMMON level is empty, so each client
  sends an empty ArrayRecord (0 bytes up and down: honest communication accounting) and the
  server's average of empty states is the empty state. The one peft adapter keeps its peft name
  ``common``; its level is private.
- The head is made private through ``assign_level`` rather than ``head_level``:
  ``TwoLevelModel`` refuses ``head_level=private`` without a second (private) adapter, and
  ``assign_level`` sees the head's tensors with their default level, so the effect is the same.
- Local update: ``K`` AdamW steps (lr beta) per round, the same budget as the federated
  baselines; the adapter and head persist across rounds in the client's private state.
- ``has_global_model = False``: there is no shared model; global metrics are reported missing.
"""

from __future__ import annotations

from pf2lora_core.adapters import AdapterSpec
from pf2lora_core.algorithms.base import Algorithm, LocalContext, LoRAParams
from pf2lora_core.constants import PRIVATE


class LocalLoRA(Algorithm):
    name = "local"
    Params = LoRAParams
    has_global_model = False

    def adapters(self) -> tuple[AdapterSpec, None]:
        return AdapterSpec(self.params.rank, self.params.lora_alpha), None

    def assign_level(self, name: str, default: str | None) -> str | None:
        """Every trainable tensor private; frozen weights stay frozen."""
        return None if default is None else PRIVATE

    def train(self, ctx: LocalContext) -> dict[str, float]:
        return self.adamw_steps(ctx, ctx.model.parameters(PRIVATE))
