"""FLoRA: stacking clients' LoRA factors so that the server's product is exactly their weighted sum.

Wang et al., "FLoRA: Federated Fine-Tuning Large Language Models with Heterogeneous Low-Rank
Adaptations" (NeurIPS 2024). Each round every client trains a fresh LoRA ``(A_k, B_k)`` on top
of the current frozen weights. The server stacks them, ``A = [A_1; ...; A_K]`` and
``B = [p_1 B_1, ..., p_K B_K]`` (``p_k`` example weights), so that ``B A = sum_k p_k B_k A_k``
exactly: no cross terms, unlike averaging A and B separately. Clients merge ``s B A`` into their
frozen weights and start a fresh LoRA. The downlink carries the whole stack, so it grows with
the sum of the clients' ranks; the harness counts the bytes it actually sends.

Choices where the paper leaves the harness open, ours:

- Each client's merged weights are its *private level*: ``assign_level`` puts the adapted
  modules' ``base_layer.weight`` there (never trained: local steps update the common level only),
  so the client app persists them per client like any private state, a restarted client resumes
  from them, and processes that serve many clients in a Ray simulation keep no shared merged state.
- The server sends each client every stack since the last round that client replied in, stacked
  into one (a product of concatenations is the sum of the products): a client that missed rounds
  catches up exactly. A client that crashes after saving its merged weights but before its reply
  arrives would merge that stack twice; the server cannot observe that case.
- The fresh LoRA of every round is freshly drawn: ``B = 0`` and a new ``A`` (peft's
  Kaiming-uniform init) from the round's seed of that client (``LocalContext.seed``, derived from
  run seed, client and round), so no round re-adds a component along the same random directions
  and a re-run round draws the same ``A``; the head is averaged by examples and sent with the stack.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from pf2lora_core.algorithms.aggregation import weighted_mean
from pf2lora_core.algorithms.base import Algorithm, LocalContext, LoRAParams, StateDict
from pf2lora_core.algorithms.lowrank import is_lora, lora_pairs
from pf2lora_core.algorithms.uplink import Spec, check_structure
from pf2lora_core.config.keys import COMMON, LORA_A, PRIVATE
from pf2lora_core.training.adapters import AdapterSpec, TwoLevelModel, merge_into_base

BASE_WEIGHT = ".base_layer.weight"  # peft keeps the frozen weight of an adapted Linear here
STACK_A, STACK_B = ".stack_A", ".stack_B"  # downlink keys: <module>.stack_A (R x d_in), .stack_B


def stack(uplinks: Sequence[Mapping[str, Tensor]], weights: Sequence[float]) -> StateDict:
    """``{module.stack_A: [A_1; ...], module.stack_B: [p_1 B_1, ...]}`` plus the averaged other tensors."""
    total = float(sum(weights))
    out = weighted_mean([{k: v for k, v in u.items() if not is_lora(k)} for u in uplinks], weights)
    for module, (a_name, b_name) in lora_pairs(list(uplinks[0])).items():
        out[module + STACK_A] = torch.cat([u[a_name] for u in uplinks], dim=0)
        out[module + STACK_B] = torch.cat(
            [(w / total) * u[b_name] for u, w in zip(uplinks, weights, strict=True)], dim=1
        )
    return out


def concat_stacks(stacks: Sequence[Mapping[str, Tensor]], modules: Sequence[str]) -> StateDict:
    """One stack whose product is the sum of the given stacks' products (empty: rank 0)."""
    out: StateDict = {}
    for m in modules:
        out[m + STACK_A] = torch.cat([s[m + STACK_A] for s in stacks], dim=0) if stacks else torch.zeros(0)
        out[m + STACK_B] = torch.cat([s[m + STACK_B] for s in stacks], dim=1) if stacks else torch.zeros(0)
    return out


class FLoRA(Algorithm):
    name = "flora"
    Params = LoRAParams

    def __init__(self, params: LoRAParams) -> None:
        super().__init__(params)
        # server side
        self._stacks: list[StateDict] = []  # stack of every completed round, in order
        self._replied: dict[int, int] = {}  # client -> number of stacks it has merged
        self._uplink_spec: dict[str, Spec] = {}
        self._modules: list[str] = []
        self._head: StateDict = {}
        # client side: the seeded fresh LoRA every round starts from
        self._fresh: StateDict = {}

    @property
    def scaling(self) -> float:
        return self.params.lora_alpha / self.params.rank

    def adapters(self) -> tuple[AdapterSpec, None]:
        return AdapterSpec(self.params.rank, self.params.lora_alpha), None

    def assign_level(self, name: str, default: str | None) -> str | None:
        """The adapted modules' frozen weights are each client's own merged weights (PRIVATE)."""
        return PRIVATE if name.endswith(BASE_WEIGHT) else default

    # ----------------------------------------------------------------------------- server
    def server_init(self, common: Mapping[str, Tensor]) -> StateDict:
        self._uplink_spec = {k: (tuple(v.shape), v.numpy().dtype) for k, v in common.items()}
        self._modules = list(lora_pairs(list(common)))
        self._head = {k: v.clone() for k, v in common.items() if not is_lora(k)}
        return dict(self._head)

    def downlink(self, state: Mapping[str, Tensor], client: int) -> StateDict:
        missed = self._stacks[self._replied.get(client, 0) :]
        return {**concat_stacks(missed, self._modules), **{k: v for k, v in state.items() if not is_stack(k)}}

    def check_uplink(self, sent: Mapping[str, Spec], received: Mapping[str, Spec]) -> str | None:
        return check_structure(received, self._uplink_spec)  # a fresh rank-r LoRA + the head

    def server_update(
        self,
        state: Mapping[str, Tensor],
        uplinks: Sequence[Mapping[str, Tensor]],
        weights: Sequence[float],
        clients: Sequence[int],
    ) -> StateDict:
        new = stack(uplinks, weights)
        for client in clients:  # a client that replied had merged every stack so far
            self._replied[client] = len(self._stacks)
        self._stacks.append({k: v for k, v in new.items() if is_stack(k)})
        return new

    # ----------------------------------------------------------------------------- client
    def receive(self, model: TwoLevelModel, downlink: Mapping[str, Tensor]) -> None:
        """Merge the stack into this client's weights (its private level, loaded first), reset the LoRA."""
        if not self._fresh:
            self._fresh = model.export(COMMON)  # first call in this process: the seeded init
        modules = model.lora_modules()
        for name, module in modules.items():
            a, b = downlink[name + STACK_A], downlink[name + STACK_B]
            if a.numel():  # peft computes s B A in the layer's own layout (GPT-2's Conv1D is transposed)
                merge_into_base(module, a, b, self.scaling)
        model.load(COMMON, {**self._fresh, **{k: v for k, v in downlink.items() if not is_stack(k)}})

    def train(self, ctx: LocalContext) -> dict[str, float]:
        redraw_lora_a(ctx.model.parameters(COMMON), ctx.seed)
        return self.adamw_steps(ctx, ctx.model.parameters(COMMON))

    def update_origin(self, fresh: Mapping[str, np.ndarray], round_seed: int) -> Mapping[str, np.ndarray]:
        """The client's fresh LoRA of the round: ``B = 0`` as seeded, every ``A`` as ``train`` redraws it.

        Without it the server would measure the distance between two random initialisations (about 8
        on MiniLM, r = 8, against an honest training update of about 1.5), not the update."""
        drawn = fresh_lora_a({k: tuple(v.shape) for k, v in fresh.items()}, round_seed)
        return {k: drawn[k].numpy().astype(v.dtype) if k in drawn else v for k, v in fresh.items()}


def fresh_lora_a(shapes: Mapping[str, tuple[int, ...]], seed: int) -> dict[str, Tensor]:
    """Every ``lora_A`` of ``shapes`` drawn as peft initialises it (Kaiming uniform, a = sqrt(5)).

    Drawn on the CPU from a generator seeded by ``seed`` (the same values on any device), in name order.
    """
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for name in sorted(shapes):
        if LORA_A in name:
            out[name] = torch.empty(shapes[name], dtype=torch.float32)
            torch.nn.init.kaiming_uniform_(out[name], a=math.sqrt(5), generator=generator)
    return out


def redraw_lora_a(params: Mapping[str, torch.nn.Parameter], seed: int) -> None:
    """Draw every ``lora_A`` in ``params`` afresh (``fresh_lora_a``), in place."""
    drawn = fresh_lora_a({k: tuple(p.shape) for k, p in params.items()}, seed)
    with torch.no_grad():
        for name, value in drawn.items():
            params[name].copy_(value)


def is_stack(name: str) -> bool:
    return name.endswith((STACK_A, STACK_B))
