"""Per-client LoRA ranks: truncating, zero-padding and pairing LoRA factors by name.

Algorithms with heterogeneous ranks (HETLoRA, FlexLoRA) keep a rank-``r_max`` adapter in the
model and on the server; client ``k`` uses only the first ``r_k`` components (rows of ``A``,
columns of ``B``). Zero-padded components stay zero under local training (both factors' gradients
vanish there), so the model needs no masks. Pure functions over state dicts.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from pf2lora_core.constants import LORA_A, LORA_B
from pf2lora_core.validation import Spec

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
