"""FFA-LoRA: federated LoRA with ``A`` frozen at its shared random initialisation, only ``B`` trained.

Sun et al., "Improving LoRA in Privacy-preserving Federated Learning" (ICLR 2024). Federated
Freeze-A LoRA fixes the randomly initialised down-projection ``A`` and trains only the
zero-initialised up-projection ``B``; every client's update is ``s B_k A`` with the same ``A``, so
the server's average of the ``B_k`` is exactly the average of the updates (no cross terms from
averaging ``A`` and ``B`` separately), and only half the adapter travels.

Choices where the paper leaves the harness open:

- ``A`` is frozen by ``assign_level`` returning None: it is not trainable, not in any level and
  therefore never sent, not even in the first round. It is the same on every client and on the
  server because ``pf2lora_core.federation.client_runtime.build_model`` seeds every process with the run seed right
  before peft creates the adapters (tested in ``tests/algorithms/test_baselines_a.py``).
- Local update: ``K`` AdamW steps (lr beta) on ``B`` and, when ``model.head_level=common``, the
  head; the server averages them weighted by examples (FedAvg), as for HOMLoRA.
- Scale: the paper notes that with only ``B`` trained, the scaling ``alpha / r`` and the
  learning rate play the same role (under Adam the step of ``s B A`` grows linearly with ``s``)
  and that FFA-LoRA stays stable over a wide range of ``alpha``. The default keeps ``lora_alpha``
  equal to every other algorithm's (``conf/algorithm/ffa_lora.yaml``): a comparison tunes the
  learning rate of every method by one protocol rather than granting one method a larger step
  by hand.
"""

from __future__ import annotations

from pf2lora_core.algorithms.base import Algorithm, LocalContext, LoRAParams
from pf2lora_core.config.keys import COMMON, LORA_A
from pf2lora_core.training.adapters import AdapterSpec


class FFALoRA(Algorithm):
    name = "ffa_lora"
    Params = LoRAParams

    def adapters(self) -> tuple[AdapterSpec, None]:
        return AdapterSpec(self.params.rank, self.params.lora_alpha), None

    def assign_level(self, name: str, default: str | None) -> str | None:
        """``A`` frozen (None: neither trained nor sent); everything else where it defaults to."""
        return None if LORA_A in name else default

    def train(self, ctx: LocalContext) -> dict[str, float]:
        return self.adamw_steps(ctx, ctx.model.parameters(COMMON))
