"""The interface every federated algorithm implements (one module each, one registry)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from pf2lora_core.algorithms.aggregation import weighted_mean
from pf2lora_core.algorithms.uplink import Spec, check_structure
from pf2lora_core.config.keys import COMMON, TRAIN_LOSS
from pf2lora_core.training.adapters import AdapterSpec, TwoLevelModel
from pf2lora_core.training.dropout_tape import SeededLoss
from pf2lora_core.training.hypergrad import LossFn
from pf2lora_core.training.runtime import derived_seed

StateDict = dict[str, Tensor]
# (batch, params) -> loss of the batch with ``params`` substituted (None: the model's own)
Objective = Callable[[Any, "dict[str, Tensor] | None"], Tensor]


@dataclass
class LoRAParams:
    """Options shared by every LoRA algorithm (values and reasons live in ``conf/algorithm``)."""

    name: str
    rank: int  # r, rank of the common adapter
    lora_alpha: float  # scaling s = lora_alpha / rank
    lr: float  # beta, AdamW learning rate of the common adapter
    weight_decay: float

    def validate(self) -> None:
        _positive(self, "rank", "lora_alpha", "lr")
        if self.weight_decay < 0:
            raise ValueError(f"algorithm.weight_decay must be >= 0, got {self.weight_decay}")


def _positive(params: object, *names: str) -> None:
    for name in names:
        value = getattr(params, name)
        if not value > 0:
            raise ValueError(f"algorithm.{name} must be > 0, got {value}")


@dataclass
class LocalContext:
    """What a client hands its algorithm for one round of local work."""

    model: TwoLevelModel
    objective: Objective
    batches: Iterator[Any]  # endless iterator over the client's training batches
    steps: int  # K local steps
    seed: int  # per (run, client, round): dropout masks and any sampling
    device: torch.device
    # (batch) -> one representation per row from the model as currently configured (eval mode)
    embed: Callable[[Any], Tensor] | None = None
    train_examples: int | None = None  # size of the split ``batches`` cycles over
    # called with no argument at the end of every local step of ``train`` (``step_done``), e.g. a
    # benchmark's clock (benchmarks/step_cost.py); None, the default, costs one attribute check a step
    on_step: Callable[[], None] | None = None
    # the private level loaded is already re-fitted to the common level loaded (at the evaluation of
    # the round that produced it): an algorithm that re-fits before training (PF2LoRA) does not again
    private_fitted: bool = False

    def step_done(self) -> None:
        """Mark the end of one local step (every ``Algorithm.train`` loop calls it once per step)."""
        if self.on_step is not None:
            self.on_step()

    def loss_for(self, batch: Any, step: int) -> LossFn:
        """The batch's loss with one fixed random stream for every pass of this step.

        The batch moves to the device here, once: a PF2LoRA step evaluates it 3-4 times (inner,
        outer, finite-difference probe), and the task's own move is then a no-op.
        """
        seed = derived_seed(self.seed, step)
        if isinstance(batch, dict):
            batch = {k: v.to(self.device, non_blocking=True) if isinstance(v, Tensor) else v for k, v in batch.items()}
        return SeededLoss(lambda params: self.objective(batch, params), seed, self.device, self.model.dropout_tape)


class Algorithm(ABC):
    """A federated LoRA algorithm: which adapters a client holds, its local update, its aggregation.

    Client side: ``adapters`` (built once per client), ``train`` (K local steps on the model,
    whose common level was just loaded from the server). The client sends ``model.export(COMMON)``
    and keeps the private level. Server side: ``aggregate`` the clients' common levels.
    """

    name: ClassVar[str]
    Params: ClassVar[type[LoRAParams]]
    #: False where no shared model exists on its own (local-only; FedSA-LoRA keeps B private):
    #: the "global" metrics are then reported as missing rather than invented.
    has_global_model: ClassVar[bool] = True
    #: True where the personalized model is adapted on the client's data right before evaluation
    #: (Per-FedAvg's one local step); see ``personalize``.
    adapts_for_evaluation: ClassVar[bool] = False
    #: True for the centralized reference: one node per round trains on every client's training
    #: split pooled, for local_steps x num_clients steps (the federation's total step budget).
    pooled_training: ClassVar[bool] = False
    #: True where the private level is re-fitted to the common level before evaluation
    #: (PF2LoRA's lower level re-solved at the received x); see ``refit_private``.
    refits_private: bool = False
    #: True where a client's first round re-fits the private level's initialization too (before
    #: any bilevel step); False: a fresh private level starts its first round as initialized.
    refits_initial: bool = False

    def __init__(self, params: LoRAParams) -> None:
        params.validate()
        self.params = params

    @abstractmethod
    def adapters(self) -> tuple[AdapterSpec, AdapterSpec | None]:
        """(common, private) adapter specs; private None for one-level algorithms."""

    @abstractmethod
    def train(self, ctx: LocalContext) -> dict[str, float]:
        """Run the round's local steps in place on ``ctx.model``; return train metrics.

        Each local step ends with ``ctx.step_done()`` (once per optimizer step of the common or
        private level; the re-fit's lower-level steps are set-up, not local steps).
        """

    def assign_level(self, name: str, default: str | None) -> str | None:
        """Level of a tensor (``COMMON``, ``PRIVATE``, or None to freeze it); default: its adapter's."""
        return default

    def head_level(self, configured: str) -> str:
        """Where the head lives; ``model.head_level`` unless the algorithm forces it."""
        return configured

    def personalize(self, ctx: LocalContext) -> None:
        """Adapt ``ctx.model`` in place before its personalized evaluation (default: nothing).

        Called only when ``adapts_for_evaluation`` is True; the caller snapshots the model's
        levels first and restores them afterwards, so the adaptation never leaks into training.
        """
        raise NotImplementedError(f"{self.name} sets adapts_for_evaluation but has no personalize()")

    def refit_private(self, ctx: LocalContext) -> int:
        """Fit ``ctx.model``'s private level to the common level just loaded; returns gradient passes.

        Called before the personalized evaluation when ``refits_private``; unlike ``personalize``
        the result is the client's model (evaluated, exported), not a throwaway adaptation.
        """
        raise NotImplementedError(f"{self.name} sets refits_private but has no refit_private()")

    def evaluation_mixer(self, ctx: LocalContext) -> Callable[[Any], Mapping[str, Tensor]] | None:
        """Per test batch, each adapter's per-row output weight for the personalized evaluation.

        ``None`` (default): the personalized model is evaluated as it is. FedDPA's instance-wise
        mixing returns a function; the caller applies it through ``TwoLevelModel.row_weights``.
        """
        return None

    def aggregate(self, states: Sequence[Mapping[str, Tensor]], weights: Sequence[float]) -> StateDict:
        """Server rule for the common level (FedAvg by default)."""
        return weighted_mean(states, weights)

    # ---------------------------------------------------------------------------------------
    # What travels. Defaults: every client gets the server's common level and sends its own
    # back. Algorithms with per-client ranks (HETLoRA, FlexLoRA) or server-side merging
    # (FLoRA) override these; the Flower strategy and client only ever call these hooks.
    def server_init(self, common: Mapping[str, Tensor]) -> StateDict:
        """The server's state, from the seeded initial common level."""
        return dict(common)

    def downlink(self, state: Mapping[str, Tensor], client: int) -> StateDict:
        """What the server sends ``client`` (its partition id)."""
        return dict(state)

    def server_update(
        self,
        state: Mapping[str, Tensor],
        uplinks: Sequence[Mapping[str, Tensor]],
        weights: Sequence[float],
        clients: Sequence[int],
    ) -> StateDict:
        """The server's next state from the round's valid uplinks (default: ``aggregate``)."""
        return self.aggregate(uplinks, weights)

    def check_uplink(self, sent: Mapping[str, Spec], received: Mapping[str, Spec]) -> str | None:
        """Why an uplink's keys, shapes or dtypes are unacceptable, or None (default: exactly as sent)."""
        return check_structure(received, sent)

    def update_origin(self, fresh: Mapping[str, np.ndarray], round_seed: int) -> Mapping[str, np.ndarray]:
        """Where a client's uplink tensors that the downlink does not hold start from, for the server's
        update norm (``federation.checks.update_reference``): the seeded initial common level ``fresh``.
        ``round_seed``: the client's ``LocalContext.seed`` of the round (``derived_seed(run seed, client,
        round)``); FLoRA draws its fresh LoRA from it."""
        return fresh

    def receive(self, model: TwoLevelModel, downlink: Mapping[str, Tensor]) -> None:
        """Client side: load what the server sent (default: into the common level)."""
        model.load(COMMON, downlink)

    def uplink(self, model: TwoLevelModel) -> StateDict:
        """Client side: what the client sends after training (default: its common level)."""
        return model.export(COMMON)

    def adamw(self, params: Mapping[str, torch.nn.Parameter]) -> torch.optim.Optimizer:
        """The common level's AdamW (lr beta); a fresh one every round (see solver docstring)."""
        return torch.optim.AdamW(list(params.values()), lr=self.params.lr, weight_decay=self.params.weight_decay)

    def adamw_steps(
        self,
        ctx: LocalContext,
        params: Mapping[str, torch.nn.Parameter],
        penalty: Callable[[Mapping[str, torch.nn.Parameter]], Tensor] | None = None,
    ) -> dict[str, float]:
        """``ctx.steps`` AdamW steps on ``params`` over the task loss (+ ``penalty(params)``).

        Returns the mean task loss (the penalty excluded) as ``TRAIN_LOSS``.
        """
        tensors = list(params.values())
        opt = self.adamw(params)
        losses = []
        for step in range(ctx.steps):
            loss = ctx.loss_for(next(ctx.batches), step)(None)
            total = loss if penalty is None else loss + penalty(params)
            for p, g in zip(tensors, torch.autograd.grad(total, tensors), strict=True):
                p.grad = g
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            ctx.step_done()
        return {TRAIN_LOSS: sum(losses) / len(losses)}
