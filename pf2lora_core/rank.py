"""Rank analysis of a client's full adapter update ``s B A + s~ D C``.

Two effective ranks per adapted module:

- *threshold rank*: the number of singular values ``sigma_i > tau * sigma_1`` (``tau`` relative
  threshold, config ``rank_threshold``);
- *entropy rank* (Roy & Vetterli, 2007): ``exp(H(p))`` with ``p_i = sigma_i / sum_j sigma_j``;
  a smooth count that equals ``k`` for ``k`` equal singular values and 1 for a rank-one matrix.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class ModuleRank:
    singular_values: list[float]
    effective: int
    entropy: float


def singular_values(matrix: Tensor) -> Tensor:
    """Singular values in descending order, computed in float64 for a stable tail."""
    return torch.linalg.svdvals(matrix.detach().to(torch.float64))


def threshold_rank(sigma: Tensor, tau: float) -> int:
    """Number of singular values above ``tau`` times the largest; 0 for the zero matrix."""
    if sigma.numel() == 0 or float(sigma[0]) == 0.0:
        return 0
    return int((sigma > tau * sigma[0]).sum())


def entropy_rank(sigma: Tensor) -> float:
    """``exp`` of the Shannon entropy of the normalised spectrum; 0 for the zero matrix."""
    total = sigma.sum()
    if float(total) == 0.0:
        return 0.0
    p = sigma / total
    p = p[p > 0]
    return float(torch.exp(-(p * torch.log(p)).sum()))


def module_rank(matrix: Tensor, tau: float, keep: int = 32) -> ModuleRank:
    """Rank summary of one update matrix; ``keep`` leading singular values are stored."""
    sigma = singular_values(matrix)
    return ModuleRank(
        singular_values=[float(s) for s in sigma[:keep]],
        effective=threshold_rank(sigma, tau),
        entropy=entropy_rank(sigma),
    )


def rank_report(updates: Mapping[str, Tensor], tau: float, keep: int = 32) -> dict:
    """Per-module and mean effective ranks, in the shape ``summary.json`` stores.

    Returns ``{"effective": mean threshold rank, "entropy": mean entropy rank,
    "modules": {name: {"effective", "entropy", "singular_values"}}}``.
    """
    modules = {name: module_rank(m, tau, keep) for name, m in updates.items()}
    n = max(len(modules), 1)
    return {
        "effective": sum(r.effective for r in modules.values()) / n,
        "entropy": sum(r.entropy for r in modules.values()) / n,
        "modules": {
            name: {"effective": r.effective, "entropy": r.entropy, "singular_values": r.singular_values}
            for name, r in modules.items()
        },
    }
