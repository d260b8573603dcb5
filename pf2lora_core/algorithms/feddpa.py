"""FedDPA: a global LoRA averaged by the server and a local LoRA kept by each client, trained in turn.

Yang, Long, Shen, Jiang, Blumenstein, "Dual-Personalizing Adapter for Federated Foundation
Models" (NeurIPS 2024, arXiv 2403.19211; code github.com/Lydia-yang/FedDPA). Every client holds
a *global* adapter (here the ``COMMON`` level, rank ``rank``), trained on local data and averaged
by the server (FedAvg, weighted by examples), and a *local* adapter (the ``PRIVATE`` level, rank
``private_rank``) that never leaves the client. Each local round here runs two phases::

    1. global phase: only the global adapter active (the local one switched off), AdamW (lr)
    2. local phase:  both adapters active, the global one frozen, AdamW on the local one
                     (private_lr); the client's model is W0 + s B A + s~ D C

What the paper says and what we chose:

- *Schedule.* The paper has two ways to learn the local adapter: FedDPA-F fine-tunes it once,
  with the global adapter frozen, after the federated training of the global adapter has ended
  (initialising it from the global adapter); FedDPA-T trains it every round, alternating with
  the global adapter (the official code trains the local adapter first, mixing the frozen global
  adapter's output with weight 0.5, then the global adapter alone). This harness evaluates the
  personalized model every round with a fixed budget of rounds, so we run FedDPA-F's local step,
  "fine-tune the local adapter on top of the frozen global one", every round, after that round's
  global phase: the local adapter always fits the newest global adapter and the metrics of every
  round mean the same thing. The global phase runs with the local adapter *inactive*, as in the
  official code (the global adapter alone is what the server averages and what "global" scores).
- *Combination.* The paper mixes the two adapters' outputs with weights (alpha, 1 - alpha); in
  PF2LoRA's two-level model they are summed with their own LoRA scalings (``lora_alpha / rank``
  and ``private_alpha / private_rank``), the same architecture as PF2LoRA, so the two differ only
  in how the levels are trained.
- *Local initialisation.* FedDPA-F copies the global adapter into the local one; here the local
  rank is smaller than the global rank, so the local adapter starts from peft's init (C random,
  D = 0: the model starts as the global one) and persists across rounds like PF2LoRA's.
- *Budget.* ``steps_per_phase: full`` gives each phase the round's K steps (the official code
  trains each adapter for the same number of local epochs): 2K gradient passes per round, fewer
  than PF2LoRA's 3K. ``half`` gives each phase max(1, K // 2) steps: about K passes, HOMLoRA's
  budget. ``gradient_passes`` in the train metrics reports the count.
- *Optimizer.* AdamW for both adapters (the official code uses AdamW with one learning rate),
  fresh every round like the other algorithms.
- *Instance-wise dynamic weighting* at inference (alpha of a test instance = 0.5 x the mean
  cosine similarity of its last-layer representation to those of a few sampled local training
  instances, in the official code) is behind ``instance_mixing``; it is not implemented yet and
  ``true`` is refused at config time (see ``FedDPAParams.validate``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from pf2lora_core.adapters import AdapterSpec
from pf2lora_core.algorithms.base import Algorithm, LocalContext, LoRAParams, _positive
from pf2lora_core.constants import COMMON, GRADIENT_PASSES, PRIVATE, TRAIN_LOSS
from pf2lora_core.runtime import derived_seed

GLOBAL_PHASE_LOSS = "global_phase_loss"
LOCAL_PHASE_LOSS = "local_phase_loss"
STEPS_PER_PHASE = ("full", "half")
# Seeds of the two phases' random streams, derived from the round's seed (distinct dropout masks).
_GLOBAL_PHASE, _LOCAL_PHASE = 0, 1


@dataclass
class FedDPAParams(LoRAParams):
    private_rank: int  # rank of the local adapter
    private_alpha: float  # its scaling is private_alpha / private_rank
    private_lr: float  # AdamW learning rate of the local adapter
    steps_per_phase: str  # full: K steps each | half: max(1, K // 2) steps each
    instance_mixing: bool  # the paper's instance-wise dynamic weighting at inference (not implemented)

    def validate(self) -> None:
        super().validate()
        _positive(self, "private_rank", "private_alpha", "private_lr")
        if self.steps_per_phase not in STEPS_PER_PHASE:
            raise ValueError(f"algorithm.steps_per_phase={self.steps_per_phase!r}: choose one of {STEPS_PER_PHASE}")
        if self.instance_mixing:
            raise ValueError(
                "algorithm.instance_mixing=true is not implemented yet: it needs a per-instance evaluation "
                "hook in ClientRuntime (today task.evaluate runs the whole model on a batch) that embeds each "
                "test instance and a sample of the client's training instances with the frozen base model and "
                "scales the local adapter's output per row by 0.5 x their mean cosine similarity"
            )


class FedDPA(Algorithm):
    name = "feddpa"
    Params = FedDPAParams
    params: FedDPAParams

    def adapters(self) -> tuple[AdapterSpec, AdapterSpec]:
        p = self.params
        return AdapterSpec(p.rank, p.lora_alpha), AdapterSpec(p.private_rank, p.private_alpha)

    def phase_steps(self, k: int) -> int:
        """Steps of each phase for a round of K local steps (see ``steps_per_phase``)."""
        return k if self.params.steps_per_phase == "full" else max(1, k // 2)

    def train(self, ctx: LocalContext) -> dict[str, float]:
        n = self.phase_steps(ctx.steps)
        model = ctx.model
        with model.only(COMMON):  # phase 1: the global adapter alone, the local one inactive
            glob = self.adamw_steps(self._phase(ctx, n, _GLOBAL_PHASE), model.parameters(COMMON))
        # phase 2: both adapters active; only the local level is optimised, so the global one is frozen
        local = self._local_steps(self._phase(ctx, n, _LOCAL_PHASE), model.parameters(PRIVATE))
        return {
            TRAIN_LOSS: (glob[TRAIN_LOSS] + local[TRAIN_LOSS]) / 2,
            GLOBAL_PHASE_LOSS: glob[TRAIN_LOSS],
            LOCAL_PHASE_LOSS: local[TRAIN_LOSS],
            GRADIENT_PASSES: float(2 * n),
        }

    @staticmethod
    def _phase(ctx: LocalContext, steps: int, phase: int) -> LocalContext:
        """The round's context for one phase: its own step count and random stream, the same batches."""
        return dataclasses.replace(ctx, steps=steps, seed=derived_seed(ctx.seed, phase))

    def _local_steps(self, ctx: LocalContext, params: dict[str, torch.nn.Parameter]) -> dict[str, float]:
        """``adamw_steps`` on the local level with its own learning rate (``private_lr``)."""
        local = FedDPA(dataclasses.replace(self.params, lr=self.params.private_lr))
        return local.adamw_steps(ctx, params)
