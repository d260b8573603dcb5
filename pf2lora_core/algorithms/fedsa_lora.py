"""FedSA-LoRA: one LoRA adapter whose ``A`` is shared (averaged) and whose ``B`` stays on the client.

Guo et al., "Selective Aggregation for Low-Rank Adaptation in Federated Learning" (ICLR 2025).
The paper finds that the learned ``A`` matrices capture knowledge common to all clients and the
``B`` matrices client-specific knowledge; both are trained locally, only the ``A`` are sent and
averaged (FedAvg), each client keeps its own ``B``. Client k's model is ``W0 + s B_k A``.

Choices where the paper leaves the harness open:

- The split is ``assign_level``: ``lora_B`` tensors go to the PRIVATE level (kept in
  ``context.state`` and on disk by the client app, like PF2LoRA's private adapter), ``lora_A``
  to the COMMON level. There is one peft adapter (named ``common`` after its default level; the
  name is peft's, not the level's). The head stays on ``model.head_level`` (default: common,
  averaged with ``A``, as for every other baseline here; the paper's rule concerns the LoRA
  factors only).
- Local update: ``K`` AdamW steps (lr beta) on ``A``, ``B`` and the head together, on the task
  loss, one optimiser, fresh each round (as for the other baselines here).
- ``has_global_model = False``: ``A`` alone (with ``B`` missing) is not a model, so the harness
  reports global metrics as missing rather than evaluate ``W0 + s * 0 * A``.
- Initial ``B``: peft's zeros, the same on every client (``ClientRuntime.initial_private``).
"""

from __future__ import annotations

from pf2lora_core.algorithms.base import Algorithm, LocalContext, LoRAParams
from pf2lora_core.config.keys import COMMON, LORA_A, LORA_B, PRIVATE
from pf2lora_core.training.adapters import AdapterSpec


class FedSALoRA(Algorithm):
    name = "fedsa_lora"
    Params = LoRAParams
    has_global_model = False

    def adapters(self) -> tuple[AdapterSpec, None]:
        return AdapterSpec(self.params.rank, self.params.lora_alpha), None

    def assign_level(self, name: str, default: str | None) -> str | None:
        """``B`` private, ``A`` common, the head (and frozen weights) where they default to."""
        if LORA_B in name:
            return PRIVATE
        if LORA_A in name:
            return COMMON
        return default

    def train(self, ctx: LocalContext) -> dict[str, float]:
        params = {**ctx.model.parameters(COMMON), **ctx.model.parameters(PRIVATE)}
        return self.adamw_steps(ctx, params)
