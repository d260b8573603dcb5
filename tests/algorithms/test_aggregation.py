"""FedAvg over the common level against hand-computed weighted means."""

from __future__ import annotations

import pytest
import torch

from pf2lora_core.algorithms.aggregation import weighted_mean


def test_weighted_mean_hand_computed() -> None:
    a = {"w": torch.tensor([1.0, 2.0]), "b": torch.tensor([[0.0]])}
    b = {"w": torch.tensor([3.0, 6.0]), "b": torch.tensor([[4.0]])}
    out = weighted_mean([a, b], [1, 3])  # (1*x_a + 3*x_b) / 4
    assert torch.allclose(out["w"], torch.tensor([2.5, 5.0]))
    assert torch.allclose(out["b"], torch.tensor([[3.0]]))
    assert out["w"].dtype == torch.float32


def test_weighted_mean_three_clients() -> None:
    states = [{"x": torch.tensor([v])} for v in (1.0, 4.0, 10.0)]
    out = weighted_mean(states, [200, 100, 100])
    assert out["x"].item() == pytest.approx((200 * 1 + 100 * 4 + 100 * 10) / 400)


@pytest.mark.parametrize(
    ("states", "weights", "match"),
    [
        ([], [], "no states"),
        ([{"x": torch.zeros(1)}], [0], "positive sum"),
        ([{"x": torch.zeros(1)}, {"x": torch.ones(1)}], [1, -1], ">= 0"),
        ([{"x": torch.zeros(1)}, {"y": torch.zeros(1)}], [1, 1], "different keys"),
    ],
)
def test_weighted_mean_rejects_bad_input(states, weights, match) -> None:
    with pytest.raises(ValueError, match=match):
        weighted_mean(states, weights)


def test_robust_rules_hand_computed_and_key_order_free() -> None:
    from pf2lora_core.algorithms.aggregation import AGGREGATORS, ROBUST

    states = [{"w": torch.tensor([v, -v]), "b": torch.tensor([1.0])} for v in (1.0, 2.0, 3.0, 4.0, 100.0)]
    assert torch.equal(ROBUST["median"](states, [1.0] * 5, 0.0)["w"], torch.tensor([3.0, -3.0]))
    # trim 0.2 of 5: cut one value at each end -> mean of 2, 3, 4
    assert torch.allclose(ROBUST["trimmed_mean"](states, [1.0] * 5, 0.2)["w"], torch.tensor([3.0, -3.0]))
    reordered = [{"b": s["b"], "w": s["w"]} for s in states]  # the same keys in another order
    assert torch.allclose(weighted_mean(reordered[:2] + states[:1], [1.0, 1.0, 2.0])["w"], torch.tensor([1.25, -1.25]))
    assert AGGREGATORS == ("mean", "median", "trimmed_mean")
