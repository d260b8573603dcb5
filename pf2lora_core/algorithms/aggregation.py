"""Server-side aggregation rules as pure functions over parameter dicts, and the registry that names them.

``mean`` is the algorithm's own rule (``Algorithm.server_update``: FedAvg's weighted mean for most,
stacking or re-factoring for FLoRA / FlexLoRA / HETLoRA); the robust rules in ``ROBUST`` replace it
for algorithms whose uplink is a like-shaped common adapter (config validation refuses the others).
``federation.aggregator`` names one.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
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
        if set(s) != set(keys):  # the same keys in another order are the same state
            raise ValueError("weighted_mean: states have different keys")
    total = float(sum(weights))
    out: StateDict = {}
    for key in keys:
        acc = torch.zeros(states[0][key].shape, dtype=torch.float64)
        for s, w in zip(states, weights, strict=True):
            acc += s[key].to(torch.float64) * (w / total)
        out[key] = acc.to(states[0][key].dtype)
    return out


def coordinate_median(states: Sequence[Mapping[str, Tensor]], weights: Sequence[float], trim: float = 0.0) -> StateDict:
    """Coordinate-wise median (as Flower's FedMedian). Unweighted: a poisoned minority cannot move it,
    whatever its values or claimed numbers of examples. ``weights`` and ``trim`` are ignored."""
    return _per_coordinate(states, lambda stacked: np.median(stacked, axis=0))


def trimmed_mean(states: Sequence[Mapping[str, Tensor]], weights: Sequence[float], trim: float = 0.2) -> StateDict:
    """Coordinate-wise mean after cutting ``int(trim * n)`` of the n values at each end (Flower's
    ``trim_mean``, after ``scipy.stats.trim_mean``). Unweighted, like the median."""
    if not 0.0 <= trim < 0.5:
        raise ValueError(f"trimmed_mean: trim must be in [0, 0.5), got {trim}")

    def cut(stacked: np.ndarray) -> np.ndarray:
        low = int(trim * stacked.shape[0])
        high = stacked.shape[0] - low
        return np.mean(np.partition(stacked, (low, high - 1), axis=0)[low:high], axis=0)

    return _per_coordinate(states, cut)


def _per_coordinate(states: Sequence[Mapping[str, Tensor]], rule: Callable[[np.ndarray], np.ndarray]) -> StateDict:
    if not states:
        raise ValueError("aggregation: no states to aggregate")
    keys = list(states[0])
    if any(set(s) != set(keys) for s in states[1:]):
        raise ValueError("aggregation: states have different keys")
    out: StateDict = {}
    for key in keys:
        stacked = np.stack([s[key].double().numpy() for s in states])
        out[key] = torch.from_numpy(np.asarray(rule(stacked))).to(states[0][key].dtype)
    return out


MEAN = "mean"  # the algorithm's own rule
# name -> rule(states, weights, trim) for the like-shaped common adapters of averaging algorithms
ROBUST: dict[str, Callable[[Sequence[Mapping[str, Tensor]], Sequence[float], float], StateDict]] = {
    "median": coordinate_median,
    "trimmed_mean": trimmed_mean,
}
AGGREGATORS = (MEAN, *ROBUST)
