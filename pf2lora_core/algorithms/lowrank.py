"""Per-client LoRA ranks: truncating, zero-padding and pairing LoRA factors by name.

Algorithms with heterogeneous ranks (HETLoRA, FlexLoRA) keep a rank-``r_max`` adapter in the
model and on the server; client ``k`` uses only the first ``r_k`` components (rows of ``A``,
columns of ``B``). Zero-padded components stay zero under local training (both factors' gradients
vanish there), so the model needs no masks. Pure functions over state dicts.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from pf2lora_core.algorithms.base import Algorithm, LoRAParams
from pf2lora_core.algorithms.uplink import Spec
from pf2lora_core.config.keys import COMMON, LORA_A, LORA_B
from pf2lora_core.training.adapters import AdapterSpec, TwoLevelModel

StateDict = dict[str, Tensor]


def lora_pairs(names: Sequence[str]) -> dict[str, tuple[str, str]]:
    """Module prefix -> (A key, B key) for every LoRA factor pair among ``names``."""
    pairs = {}
    for name in names:
        if LORA_A in name:
            b_name = name.replace(LORA_A, LORA_B)
            if b_name not in names:
                raise ValueError(f"{name} has no matching {LORA_B.strip('.')} factor")
            pairs[name.split(LORA_A)[0]] = (name, b_name)
    return pairs


def is_lora(name: str) -> bool:
    return LORA_A in name or LORA_B in name


def rank_of(state: Mapping[str, Tensor]) -> int:
    """The common rank of the LoRA pairs in ``state`` (rows of A); ValueError if they differ."""
    ranks = {state[a].shape[0] for a, _ in lora_pairs(list(state)).values()}
    if len(ranks) != 1:
        raise ValueError(f"LoRA factors of different ranks in one state: {sorted(ranks)}")
    return ranks.pop()


def truncate(state: Mapping[str, Tensor], rank: int) -> StateDict:
    """The first ``rank`` components: ``A[:rank, :]``, ``B[:, :rank]``; other tensors as they are."""
    out = {}
    for name, t in state.items():
        if LORA_A in name:
            out[name] = t[:rank, :].clone()
        elif LORA_B in name:
            out[name] = t[:, :rank].clone()
        else:
            out[name] = t.clone()
    return out


def pad(state: Mapping[str, Tensor], rank: int) -> StateDict:
    """Zero-pad LoRA factors to ``rank`` components (inverse of ``truncate`` up to zeros)."""
    out = {}
    for name, t in state.items():
        if LORA_A in name:
            out[name] = torch.cat([t, t.new_zeros(rank - t.shape[0], t.shape[1])], dim=0)
        elif LORA_B in name:
            out[name] = torch.cat([t, t.new_zeros(t.shape[0], rank - t.shape[1])], dim=1)
        else:
            out[name] = t.clone()
    return out


def client_rank(client: int, r_min: int, r_max: int, seed: int, given: Sequence[int] = ()) -> int:
    """Client ``client``'s initial rank: ``given[client]`` when ranks are listed, else uniform in
    ``[r_min, r_max]`` drawn from ``(seed, client)`` (the same on every process, no client count needed)."""
    if given:
        if client >= len(given):
            raise ValueError(f"algorithm.client_ranks lists {len(given)} ranks but client {client} needs one")
        return int(given[client])
    return int(np.random.default_rng([seed, client]).integers(r_min, r_max + 1))


def check_truncated_uplink(sent: Mapping[str, Spec], received: Mapping[str, Spec]) -> str | None:
    """An uplink may carry fewer components than were sent (rank pruning), the same for every pair."""
    if set(sent) != set(received):
        missing, extra = sorted(set(sent) - set(received)), sorted(set(received) - set(sent))
        return f"missing keys {missing[:3]}" if missing else f"unexpected keys {extra[:3]}"
    ranks = set()
    for name, (shape, dtype) in sent.items():
        got_shape, got_dtype = received[name]
        if np.dtype(got_dtype) != np.dtype(dtype):
            return f"{name}: dtype {np.dtype(got_dtype)}, expected {np.dtype(dtype)}"
        if LORA_A in name:
            ok = len(got_shape) == 2 and got_shape[1] == shape[1] and 1 <= got_shape[0] <= shape[0]
            ranks.add(got_shape[0] if ok else -1)
        elif LORA_B in name:
            ok = len(got_shape) == 2 and got_shape[0] == shape[0] and 1 <= got_shape[1] <= shape[1]
            ranks.add(got_shape[1] if ok else -1)
        else:
            ok = tuple(got_shape) == tuple(shape)
        if not ok:
            return f"{name}: shape {tuple(got_shape)} does not fit the {tuple(shape)} that was sent"
    if len(ranks) > 1:
        return f"LoRA factors of different ranks {sorted(ranks)}"
    return None


@dataclass
class RankedParams(LoRAParams):
    """Options of per-client-rank algorithms; ``rank`` is the largest rank (the server's)."""

    r_min: int  # smallest client rank
    rank_seed: int  # seeds the per-client ranks when client_ranks is empty
    client_ranks: list[int]  # explicit per-client ranks (client k gets [k]); empty: drawn by seed

    def validate(self) -> None:
        super().validate()
        if not 1 <= self.r_min <= self.rank:
            raise ValueError(f"algorithm.r_min must be in [1, rank={self.rank}], got {self.r_min}")
        bad = [r for r in self.client_ranks if not self.r_min <= r <= self.rank]
        if bad:
            raise ValueError(f"algorithm.client_ranks {bad} outside [r_min={self.r_min}, rank={self.rank}]")


class RankedLoRA(Algorithm):
    """One LoRA adapter of rank ``r_max`` in the model; client k works on its first ``r_k`` components.

    The client side is shared by HETLoRA and FlexLoRA: a downlink of rank ``r_k`` is zero-padded
    into the model, and the uplink is the first ``r_k`` components again.
    """

    params: RankedParams

    def __init__(self, params: RankedParams) -> None:
        super().__init__(params)
        self._rank = params.rank  # client side: the rank of the downlink being worked on

    def adapters(self) -> tuple[AdapterSpec, None]:
        return AdapterSpec(self.params.rank, self.params.lora_alpha), None

    def initial_rank(self, client: int) -> int:
        p = self.params
        return client_rank(client, p.r_min, p.rank, p.rank_seed, p.client_ranks)

    def receive(self, model: TwoLevelModel, downlink: Mapping[str, Tensor]) -> None:
        self._rank = rank_of(downlink)
        model.load(COMMON, pad(downlink, self.params.rank))

    def uplink(self, model: TwoLevelModel) -> dict[str, Tensor]:
        return truncate(model.export(COMMON), self._rank)
