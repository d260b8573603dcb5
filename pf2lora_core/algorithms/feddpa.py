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
- *Data per round.* One local step is one minibatch of ``task.batch_size`` for every algorithm
  here, so with ``one_batch_per_step: true`` (default) the round draws its minibatches once and
  both phases step through the SAME ones: a round of K steps (``full``) reads exactly K
  minibatches (``half``: max(1, K // 2)), each used by the global adapter in phase 1 and by the
  local adapter in phase 2, as the official code's epochs over the same local data do.
  ``false`` draws fresh minibatches for each phase (2K per round with ``full``), the schedule
  before the equal-budget rule.
- *Optimizer.* AdamW for both adapters (the official code uses AdamW with one learning rate),
  fresh every round like the other algorithms.
- *Instance-wise dynamic weighting* at inference (``instance_mixing``, off by default), as in the
  official code (``get_weight`` in ``GlobalModel_generated.py``): for each test instance, embed it
  and ``mixing_samples`` (5) instances drawn without replacement from the client's training data
  with the local adapter alone active, take the last hidden layer, and set
  ``a = mixing_scale (0.5) x mean cosine similarity``; the instance is then predicted with
  weights ``a`` on the local adapter and ``1 - a`` on the global one (``set_local([local], [a,
  1 - a])``). Training mixes the two with 0.5 each; here training sums them (weights 1 and 1), so
  inference scales the local adapter by ``2a`` and the global one by ``2(1 - a)``: ``a = 0.5``
  (a test instance just like the local data) is exactly the trained model, ``a -> 0`` (an unlike
  one) leans on the global adapter. Our choices: the representation is the last hidden layer
  averaged over real tokens (the official code's ``avg`` option; its default ``last`` takes the
  last token of left-padded LLaMA prompts, which for right-padded encoders is a pad); the
  training instances are drawn from a pool of at most ``mixing_pool`` training rows embedded once
  per evaluation (the official code re-embeds 5 fresh rows per test instance, a forward pass of
  6 rows per prediction); the draws are seeded, so evaluation is repeatable.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from pf2lora_core.algorithms.base import Algorithm, LocalContext, LoRAParams, _positive
from pf2lora_core.config.keys import COMMON, GRADIENT_PASSES, PRIVATE, TRAIN_LOSS
from pf2lora_core.training.adapters import AdapterSpec
from pf2lora_core.training.runtime import derived_seed

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
    one_batch_per_step: bool  # true: both phases step through the round's same minibatches | false: fresh ones
    instance_mixing: bool  # the paper's instance-wise dynamic weighting at inference
    mixing_samples: int  # training instances compared with each test instance (paper: 5)
    mixing_scale: float  # a = mixing_scale x mean cosine similarity (paper: 0.5)
    mixing_pool: int  # training rows embedded once per evaluation, drawn from for every test row

    def validate(self) -> None:
        super().validate()
        _positive(self, "private_rank", "private_alpha", "private_lr")
        if self.steps_per_phase not in STEPS_PER_PHASE:
            raise ValueError(f"algorithm.steps_per_phase={self.steps_per_phase!r}: choose one of {STEPS_PER_PHASE}")
        _positive(self, "mixing_samples", "mixing_scale", "mixing_pool")
        if self.mixing_scale > 1.0:
            raise ValueError(
                f"algorithm.mixing_scale={self.mixing_scale} must be <= 1 (the paper uses 0.5, its code allows 1): "
                "the local adapter's weight a = mixing_scale x cosine must stay within [-1, 1]"
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
        shared = [next(ctx.batches) for _ in range(n)] if self.params.one_batch_per_step else None
        with model.only(COMMON):  # phase 1: the global adapter alone, the local one inactive
            glob = self.adamw_steps(self._phase(ctx, n, _GLOBAL_PHASE, shared), model.parameters(COMMON))
        # phase 2: both adapters active; only the local level is optimised, so the global one is frozen
        local = self._local_steps(self._phase(ctx, n, _LOCAL_PHASE, shared), model.parameters(PRIVATE))
        return {
            TRAIN_LOSS: (glob[TRAIN_LOSS] + local[TRAIN_LOSS]) / 2,
            GLOBAL_PHASE_LOSS: glob[TRAIN_LOSS],
            LOCAL_PHASE_LOSS: local[TRAIN_LOSS],
            GRADIENT_PASSES: float(2 * n),
        }

    @staticmethod
    def _phase(ctx: LocalContext, steps: int, phase: int, shared: list[Any] | None) -> LocalContext:
        """The round's context for one phase: its own step count and random stream; the round's
        ``shared`` minibatches when given, else the client's stream continues."""
        batches = iter(shared) if shared is not None else ctx.batches
        return dataclasses.replace(ctx, steps=steps, seed=derived_seed(ctx.seed, phase), batches=batches)

    def evaluation_mixer(self, ctx: LocalContext) -> Callable[[Any], Mapping[str, Tensor]] | None:
        """The instance-wise weights of both adapters per test batch (see the module docstring)."""
        p = self.params
        if not p.instance_mixing:
            return None
        if ctx.embed is None:
            raise ValueError("algorithm.instance_mixing needs a task that embeds its inputs (LocalContext.embed)")
        model, embed = ctx.model, ctx.embed
        with model.only(PRIVATE):
            pool = _embed_pool(ctx, embed, min(p.mixing_pool, ctx.train_examples or p.mixing_pool))
        generator = torch.Generator().manual_seed(ctx.seed)

        def weights(batch: Any) -> dict[str, Tensor]:
            with model.only(PRIVATE):
                queries = embed(batch)
            a = instance_weight(queries, pool, p.mixing_samples, p.mixing_scale, generator)
            return {PRIVATE: 2.0 * a, COMMON: 2.0 * (1.0 - a)}

        return weights

    def _local_steps(self, ctx: LocalContext, params: dict[str, torch.nn.Parameter]) -> dict[str, float]:
        """``adamw_steps`` on the local level with its own learning rate (``private_lr``)."""
        local = FedDPA(dataclasses.replace(self.params, lr=self.params.private_lr))
        return local.adamw_steps(ctx, params)


def instance_weight(queries: Tensor, pool: Tensor, samples: int, scale: float, generator: torch.Generator) -> Tensor:
    """FedDPA's local-adapter weight per query row: ``scale x`` its mean cosine similarity to
    ``samples`` rows of ``pool`` drawn without replacement (all of them when the pool is smaller)."""
    if pool.shape[0] == 0:
        raise ValueError("instance mixing needs at least one training instance; the client has none")
    k = min(samples, pool.shape[0])
    picks = torch.multinomial(torch.ones(queries.shape[0], pool.shape[0]), k, replacement=False, generator=generator)
    refs = pool.to(queries.device)[picks.to(queries.device)]  # (rows, k, hidden)
    cos = torch.nn.functional.cosine_similarity(queries.unsqueeze(1), refs, dim=-1)
    return scale * cos.mean(dim=1)


def _embed_pool(ctx: LocalContext, embed: Callable[[Any], Tensor], rows: int) -> Tensor:
    """Embeddings of the first ``rows`` training rows of the context's (shuffled) batch stream."""
    parts, have = [], 0
    while have < rows:
        vectors = embed(next(ctx.batches))
        parts.append(vectors[: rows - have].cpu())
        have += parts[-1].shape[0]
    return torch.cat(parts) if parts else torch.zeros(0, 0)
