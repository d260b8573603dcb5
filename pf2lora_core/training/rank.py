"""Rank analysis of a client's full adapter update ``s B A + s~ D C``.

Two effective ranks per adapted module, and the private level's share of the update's energy:

- *threshold rank*: the number of singular values ``sigma_i > tau * sigma_1`` (``tau`` relative
  threshold, config ``rank_threshold``);
- *entropy rank* (Roy & Vetterli, 2007): ``exp(H(p))`` with ``p_i = sigma_i / sum_j sigma_j``;
  a smooth count that equals ``k`` for ``k`` equal singular values and 1 for a rank-one matrix.
  Scale-free and threshold-free: it does not flip when a direction crosses ``tau``, so it is the
  measure to compare across runs whose two levels learned at different speeds.
- *private energy*: ``||s~ D C||_F^2 / (||s B A||_F^2 + ||s~ D C||_F^2)`` over all modules, in
  ``[0, 1]``: 0 when the private level learned nothing, near 1 when it holds the whole update.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

# The relative threshold of the threshold rank, the same in Flower runs (``rank_threshold`` in
# conf/config.yaml, checked equal by tests/training/test_rank.py) and in the synthetic task. The synthetic
# task, where the truth is known, recovers every planted rank at any threshold in [0.02, 0.5]
# (planted singular values are >= 0.67 sigma_1, the trained residual < 0.01 sigma_1); 0.05 sits
# well inside that range.
DEFAULT_THRESHOLD = 0.05


@dataclass(frozen=True)
class LowRank:
    """An update ``left @ right`` kept as its factors: ``left`` (out, k), ``right`` (k, in)."""

    left: Tensor
    right: Tensor

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.left.shape[0]), int(self.right.shape[1])

    def dense(self) -> Tensor:
        return self.left.double() @ self.right.double()


Update = Tensor | LowRank  # a dense update matrix, or one as its factors


@dataclass(frozen=True)
class ModuleRank:
    singular_values: list[float]
    effective: int
    entropy: float


def singular_values(matrix: Update) -> Tensor:
    """All ``min(out, in)`` singular values in descending order, computed in float64 for a stable tail.

    For ``LowRank`` factors, without forming the product: with ``left = Q_L R_L`` and
    ``right^T = Q_R R_R`` (thin QR), ``left @ right = Q_L (R_L R_R^T) Q_R^T`` and ``Q_L``, ``Q_R`` have
    orthonormal columns, so the nonzero singular values are those of the small ``R_L R_R^T``
    (at most k x k); the other ``min(out, in) - k`` are exactly 0 (the dense SVD returns rounding
    noise there, ~1e-16 of the largest). Oracle: tests/training/test_rank.py against the dense SVD.
    """
    if isinstance(matrix, Tensor):
        return torch.linalg.svdvals(matrix.detach().to(torch.float64))
    left, right = matrix.left.detach().double(), matrix.right.detach().double()
    full = min(matrix.shape)
    if left.shape[1] == 0:
        return torch.zeros(full, dtype=torch.float64)
    r_left = torch.linalg.qr(left, mode="r").R
    r_right = torch.linalg.qr(right.T, mode="r").R
    sigma = torch.linalg.svdvals(r_left @ r_right.T)[:full]
    return torch.cat([sigma, torch.zeros(full - sigma.numel(), dtype=torch.float64)])


def frobenius_sq(matrix: Update) -> float:
    """``||matrix||_F^2``; for factors, the sum of the squared singular values (the product never formed)."""
    if isinstance(matrix, Tensor):
        return float(matrix.double().square().sum())
    return float(singular_values(matrix).square().sum())


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


def module_rank(matrix: Update, tau: float, keep: int = 32) -> ModuleRank:
    """Rank summary of one update matrix; ``keep`` leading singular values are stored."""
    sigma = singular_values(matrix)
    return ModuleRank(
        singular_values=[float(s) for s in sigma[:keep]],
        effective=threshold_rank(sigma, tau),
        entropy=entropy_rank(sigma),
    )


def private_energy(common: Mapping[str, Update], private: Mapping[str, Update]) -> float:
    """``sum ||private||_F^2 / sum (||common||_F^2 + ||private||_F^2)`` over modules; 0 when both are 0."""
    p = sum(frobenius_sq(m) for m in private.values())
    c = sum(frobenius_sq(m) for m in common.values())
    return p / (p + c) if p + c > 0 else 0.0


def rank_report(
    updates: Mapping[str, Update],
    tau: float,
    keep: int = 32,
    levels: tuple[Mapping[str, Update], Mapping[str, Update]] | None = None,
) -> dict:
    """Per-module and mean effective ranks, in the shape ``summary.json`` stores.

    ``levels``: the ``(common, private)`` updates per module, for ``private_energy``.

    Returns ``{"effective": mean threshold rank, "entropy": mean entropy rank,
    ["private_energy": share,] "modules": {name: {"effective", "entropy", "singular_values"}}}``.
    """
    modules = {name: module_rank(m, tau, keep) for name, m in updates.items()}
    n = max(len(modules), 1)
    extra = {} if levels is None else {"private_energy": private_energy(*levels)}
    return {
        "effective": sum(r.effective for r in modules.values()) / n,
        "entropy": sum(r.entropy for r in modules.values()) / n,
        **extra,
        "modules": {
            name: {"effective": r.effective, "entropy": r.entropy, "singular_values": r.singular_values}
            for name, r in modules.items()
        },
    }
