"""Two-level adapters: identity at init, level export/load, head placement, the update formula."""

from __future__ import annotations

import pytest
import torch

from pf2lora_core.config.keys import COMMON, PRIVATE
from pf2lora_core.training.adapters import AdapterSpec, TwoLevelModel
from tests.helpers.tiny import MLP, randomize_adapters, two_level_mlp


def test_equals_base_at_initialisation() -> None:
    torch.manual_seed(0)
    base = MLP().double()
    x = torch.randn(5, 6, dtype=torch.float64)
    expected = base(x).detach().clone()
    model = TwoLevelModel(base, ["fc1", "fc2"], AdapterSpec(4, 8), AdapterSpec(2, 4), head_modules=["head"])
    assert torch.equal(model.model(x), expected)


@pytest.mark.parametrize("head_level", [COMMON, PRIVATE])
def test_levels_are_disjoint_and_head_is_placed(head_level: str) -> None:
    model = two_level_mlp(head_level=head_level)
    common, private = model.export(COMMON), model.export(PRIVATE)
    assert not set(common) & set(private)
    assert all(".private." not in k for k in common)
    assert all(".common." not in k for k in private)
    head_keys = {k for k in (common | private) if ".head." in k and "lora" not in k}
    assert head_keys and head_keys <= set(common if head_level == COMMON else private)
    assert all(t.dtype == torch.float32 and t.device.type == "cpu" for t in common.values())


def test_loading_common_leaves_private_untouched() -> None:
    model = two_level_mlp()
    randomize_adapters(model, seed=1)
    private_before = model.export(PRIVATE)
    other = two_level_mlp()
    randomize_adapters(other, seed=2)
    model.load(COMMON, other.export(COMMON))
    for k, v in model.export(COMMON).items():
        assert torch.equal(v, other.export(COMMON)[k])
    for k, v in model.export(PRIVATE).items():
        assert torch.equal(v, private_before[k])


def test_load_rejects_wrong_keys_and_shapes() -> None:
    model = two_level_mlp()
    state = model.export(COMMON)
    with pytest.raises(ValueError, match="missing keys"):
        model.load(COMMON, dict(list(state.items())[1:]))
    key = next(iter(state))
    with pytest.raises(ValueError, match="shape"):
        model.load(COMMON, {**state, key: torch.zeros(1)})


def test_full_update_is_scaled_sum_of_both_levels() -> None:
    model = two_level_mlp()
    randomize_adapters(model)
    fc1 = model.lora_modules()["base_model.model.fc1"]
    a, b = fc1.lora_A[COMMON].weight, fc1.lora_B[COMMON].weight
    c, d = fc1.lora_A[PRIVATE].weight, fc1.lora_B[PRIVATE].weight
    expected = (8 / 4) * b @ a + (4 / 2) * d @ c
    assert torch.allclose(model.full_updates()["base_model.model.fc1"].double(), expected.double(), atol=1e-6)
    # the same update as factors (what the rank analysis reads), per level and together
    assert torch.allclose(model.update_factors()["base_model.model.fc1"].dense(), expected.double(), atol=1e-6)
    for level in (COMMON, PRIVATE):
        dense = model.full_updates([level])["base_model.model.fc1"].double()
        assert torch.allclose(model.update_factors([level])["base_model.model.fc1"].dense(), dense, atol=1e-6)
    # and the forward pass really computes W0 + s B A + s~ D C
    x = torch.randn(3, 6, dtype=torch.float64)
    w0 = fc1.base_layer.weight
    out = fc1(x)
    assert torch.allclose(out, x @ (w0 + expected).T + fc1.base_layer.bias)


def test_only_common_disables_private_then_restores_training() -> None:
    model = two_level_mlp()
    randomize_adapters(model)
    x = torch.randn(3, 6, dtype=torch.float64)
    both = model.model(x)
    with model.only(COMMON):
        common_only = model.model(x)
    assert not torch.allclose(both, common_only)
    assert torch.equal(model.model(x), both)
    assert all(p.requires_grad for level in model.levels for p in model.parameters(level).values())


def test_one_level_model_has_no_private() -> None:
    model = two_level_mlp(private=False)
    assert model.levels == (COMMON,)
    assert model.export(PRIVATE) == {}
    # a one-adapter model with a private head (FedPer-style): the head alone is the private level
    fedper = TwoLevelModel(MLP(), ["fc1"], AdapterSpec(2, 2), None, head_modules=["head"], head_level=PRIVATE)
    assert fedper.levels == (COMMON, PRIVATE)
    assert {k.rsplit(".", 1)[0] for k in fedper.export(PRIVATE)} == {"base_model.model.head"}


def test_assign_moves_tensors_between_levels_and_freezes() -> None:
    def fedsa_like(name: str, default: str | None) -> str | None:
        if ".lora_B." in name:
            return PRIVATE
        return None if ".lora_A." in name and "fc2" in name else default

    model = TwoLevelModel(MLP(), ["fc1", "fc2"], AdapterSpec(2, 2), None, head_modules=["head"], assign=fedsa_like)
    assert all(".lora_B." in k for k in model.export(PRIVATE))
    assert not any("fc2.lora_A" in k for k in model.export(COMMON))
    frozen = [p for n, p in model.model.named_parameters() if "fc2.lora_A" in n]
    assert frozen and not any(p.requires_grad for p in frozen)
    with model.only(COMMON):  # peft's set_adapter re-enables grads; the model restores the split
        pass
    assert not any(p.requires_grad for p in frozen)


def test_fused_two_adapter_forward_equals_peft_sum() -> None:
    """The fused rank-(r + r~) product equals peft's adapter-by-adapter sum, also after deepcopy."""
    import copy

    model = two_level_mlp()
    randomize_adapters(model)
    x = torch.randn(4, 6, dtype=torch.float64)
    fc1 = model.lora_modules()["base_model.model.fc1"]
    peft_sum = type(fc1).forward(fc1, x)  # peft's own loop over active adapters
    assert torch.allclose(fc1(x), peft_sum, atol=1e-12)
    clone = copy.deepcopy(model.model)
    with torch.no_grad():
        clone.base_model.model.fc1.lora_B["private"].weight.add_(1.0)
    assert torch.allclose(fc1(x), peft_sum, atol=1e-12)  # the copy computes with its own weights
    assert not torch.allclose(clone.base_model.model.fc1(x), peft_sum)
