"""Effective rank on matrices of known rank and spectrum."""

from __future__ import annotations

import math

import pytest
import torch

from pf2lora_core.training.rank import entropy_rank, module_rank, rank_report, singular_values, threshold_rank


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
