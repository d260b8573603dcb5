"""Server-side aggregation rules as pure functions over parameter dicts."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

StateDict = dict[str, Tensor]


def weighted_mean(states: Sequence[Mapping[str, Tensor]], weights: Sequence[float]) -> StateDict:
    """FedAvg: ``sum_k w_k x_k / sum_k w_k`` per key, accumulated in float64.

    Weights may be zero (HETLoRA's sparsity weights) but not negative, and must not all be zero.
    Raises ValueError when there is nothing to average, weights are invalid, or keys differ.
    """
    if not states:
        raise ValueError("weighted_mean: no states to aggregate")
    if len(states) != len(weights):
        raise ValueError(f"weighted_mean: {len(states)} states but {len(weights)} weights")
    if any(not w >= 0 for w in weights) or not sum(weights) > 0:
        raise ValueError(f"weighted_mean: weights must be >= 0 with a positive sum, got {list(weights)}")
    keys = list(states[0])
    for s in states[1:]:
        if list(s) != keys:
            raise ValueError("weighted_mean: states have different keys")
    total = float(sum(weights))
    out: StateDict = {}
    for key in keys:
        acc = torch.zeros(states[0][key].shape, dtype=torch.float64)
        for s, w in zip(states, weights, strict=True):
            acc += s[key].to(torch.float64) * (w / total)
        out[key] = acc.to(states[0][key].dtype)
    return out
