"""Effective rank on matrices of known rank and spectrum."""

from __future__ import annotations

import math

import pytest
import torch

from pf2lora_core.training.rank import (
    LowRank,
    entropy_rank,
    frobenius_sq,
    module_rank,
    rank_report,
    singular_values,
    threshold_rank,
)


def _matrix(sigmas: list[float], n: int = 12, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    s = torch.zeros(n, dtype=torch.float64)
    s[: len(sigmas)] = torch.tensor(sigmas, dtype=torch.float64)
    return (u * s) @ v.T


@pytest.mark.parametrize("rank", [1, 3, 6, 12])
def test_threshold_rank_of_known_rank(rank: int) -> None:
    m = _matrix([2.0 - i * 0.1 for i in range(rank)])
    assert threshold_rank(singular_values(m), 0.05) == rank


def test_threshold_is_relative() -> None:
    m = _matrix([10.0, 1.0, 0.4])
    sigma = singular_values(m)
    assert threshold_rank(sigma, 0.05) == 2  # 0.4 < 0.05 * 10
    assert threshold_rank(sigma, 0.01) == 3


def test_entropy_rank() -> None:
    assert entropy_rank(singular_values(_matrix([1.0, 1.0, 1.0, 1.0]))) == pytest.approx(4.0, rel=1e-9)
    assert entropy_rank(singular_values(_matrix([3.0]))) == pytest.approx(1.0, rel=1e-9)
    p = torch.tensor([2.0, 1.0, 1.0], dtype=torch.float64) / 4
    assert entropy_rank(singular_values(_matrix([2.0, 1.0, 1.0]))) == pytest.approx(
        math.exp(float(-(p * p.log()).sum())), rel=1e-9
    )


def test_zero_matrix() -> None:
    z = torch.zeros(4, 5)
    r = module_rank(z, 0.1)
    assert r.effective == 0 and r.entropy == 0.0


def test_rank_report_mean_over_modules() -> None:
    report = rank_report({"a": _matrix([1.0, 1.0]), "b": _matrix([1.0, 1.0, 1.0, 1.0])}, tau=0.05)
    assert report["effective"] == 3.0
    assert report["modules"]["a"]["effective"] == 2
    assert len(report["modules"]["b"]["singular_values"]) == 12


def test_flower_runs_and_the_synthetic_task_share_one_threshold() -> None:
    from pf2lora_core.config.experiment import compose
    from pf2lora_core.tools.synthetic import SyntheticConfig
    from pf2lora_core.training.rank import DEFAULT_THRESHOLD

    assert float(compose([]).rank_threshold) == DEFAULT_THRESHOLD == SyntheticConfig().threshold


def test_private_energy_share() -> None:
    from pf2lora_core.training.rank import private_energy

    common = {"a": _matrix([3.0]), "b": _matrix([4.0])}  # energy 9 + 16
    private = {"a": _matrix([0.0]), "b": _matrix([5.0])}  # energy 25
    assert private_energy(common, private) == pytest.approx(0.5, rel=1e-12)
    assert private_energy(common, {"a": 0 * common["a"], "b": 0 * common["b"]}) == 0.0
    report = rank_report({k: common[k] + private[k] for k in common}, tau=0.05, levels=(common, private))
    assert report["private_energy"] == pytest.approx(0.5, rel=1e-12)


@pytest.mark.parametrize(("out", "inner", "k"), [(40, 30, 3), (30, 40, 6), (5, 50, 8), (50, 4, 8), (20, 20, 0)])
def test_low_rank_factors_give_the_dense_svd(out: int, inner: int, k: int) -> None:
    """The factored path (QR of each factor, SVD of k x k) against the dense SVD of the product,
    including more components than a side (FLoRA's stacks) and no components at all."""
    gen = torch.Generator().manual_seed(out * 100 + k)
    left = torch.randn(out, k, generator=gen, dtype=torch.float64)
    right = torch.randn(k, inner, generator=gen, dtype=torch.float64)
    factored, dense = LowRank(left, right), left @ right
    fast, slow = singular_values(factored), singular_values(dense)
    assert fast.shape == slow.shape == (min(out, inner),)
    assert torch.allclose(fast, slow, atol=1e-9 * max(float(slow[0]) if k else 1.0, 1.0))
    assert math.isclose(frobenius_sq(factored), float(dense.square().sum()), rel_tol=1e-9, abs_tol=1e-12)
    tau = 0.05
    assert module_rank(factored, tau).effective == module_rank(dense, tau).effective == min(k, out, inner)
    assert math.isclose(module_rank(factored, tau).entropy, module_rank(dense, tau).entropy, rel_tol=1e-6)


def test_rank_report_of_factors_equals_the_dense_report() -> None:
    gen = torch.Generator().manual_seed(7)
    common = {m: LowRank(torch.randn(24, 4, generator=gen), torch.randn(4, 16, generator=gen)) for m in "qv"}
    private = {m: LowRank(torch.randn(24, 2, generator=gen), torch.randn(2, 16, generator=gen)) for m in "qv"}
    both = {
        m: LowRank(torch.cat([common[m].left, private[m].left], 1), torch.cat([common[m].right, private[m].right]))
        for m in "qv"
    }
    fast = rank_report(both, 0.05, levels=(common, private))
    slow = rank_report(
        {m: f.dense() for m, f in both.items()},
        0.05,
        levels=({m: f.dense() for m, f in common.items()}, {m: f.dense() for m, f in private.items()}),
    )
    assert fast["effective"] == slow["effective"] == 6
    assert math.isclose(fast["entropy"], slow["entropy"], rel_tol=1e-6)
    assert math.isclose(fast["private_energy"], slow["private_energy"], rel_tol=1e-9)
    for m in "qv":
        assert fast["modules"][m]["singular_values"][:6] == pytest.approx(slow["modules"][m]["singular_values"][:6])
