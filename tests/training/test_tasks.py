"""Metrics against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from pf2lora_core.training.tasks import accuracy, matthews_correlation


def test_accuracy() -> None:
    assert accuracy(torch.tensor([1, 0, 1, 1]), torch.tensor([1, 1, 1, 0])) == 0.5


def test_binary_mcc_hand_computed() -> None:
    # tp=2, tn=1, fp=1, fn=1 -> (2*1 - 1*1) / sqrt(3*3*2*2) = 1/6
    preds = torch.tensor([1, 1, 1, 0, 0])
    labels = torch.tensor([1, 1, 0, 1, 0])
    assert matthews_correlation(preds, labels) == pytest.approx(1 / 6)


def test_mcc_extremes() -> None:
    y = torch.tensor([0, 1, 0, 1])
    assert matthews_correlation(y, y) == pytest.approx(1.0)
    assert matthews_correlation(1 - y, y) == pytest.approx(-1.0)
    assert matthews_correlation(torch.zeros(4, dtype=torch.long), y) == 0.0  # undefined -> 0


def test_multiclass_mcc_matches_formula() -> None:
    preds = torch.tensor([0, 1, 2, 2, 1, 0])
    labels = torch.tensor([0, 1, 2, 1, 1, 2])
    # Gorodkin: (c*s - sum p_k t_k) / sqrt((s^2 - sum p_k^2)(s^2 - sum t_k^2))
    c, s = 4, 6
    t = [1, 3, 2]  # true counts
    p = [2, 2, 2]  # predicted counts
    expected = (c * s - sum(a * b for a, b in zip(p, t, strict=True))) / math.sqrt(
        (s * s - sum(x * x for x in p)) * (s * s - sum(x * x for x in t))
    )
    assert matthews_correlation(preds, labels) == pytest.approx(expected)
