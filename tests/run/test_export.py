"""PEFT's format: a client's two-level model as one standard LoRA adapter (peft's cat combination)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import PeftModel

from pf2lora_core.algorithms import algorithm_class
from pf2lora_core.config.experiment import load
from pf2lora_core.config.keys import COMMON, PRIVATE
from pf2lora_core.run.export import ExportError, common_checkpoint, export_problem, save_adapter
from tests.helpers.tiny import MLP, randomize_adapters, two_level_mlp


def _trained(head_level: str = COMMON):
    model = two_level_mlp(seed=0, dtype=torch.float32, head_level=head_level)
    randomize_adapters(model, seed=3, scale=0.5)
    with torch.no_grad():  # a trained head, unlike the fresh base's
        model.model.base_model.model.head.weight.add_(0.7)
    return model


@pytest.mark.parametrize("head_level", [COMMON, PRIVATE])
def test_personalized_adapter_loads_with_peft_and_equals_both_levels(tmp_path: Path, head_level: str) -> None:
    """s B A + s~ D C with the trained head: ``PeftModel.from_pretrained`` on a fresh base gives the
    two-level model's outputs; the common adapter alone gives the model with only COMMON active."""
    model = _trained(head_level)
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        both = model.model(x)
        with model.only(COMMON):
            common_only = model.model(x)
    for adapters, expected in ((model.adapters, both), ([COMMON], common_only)):
        out = save_adapter(model, adapters, tmp_path / "-".join(adapters))
        assert (out / "adapter_config.json").is_file()
        torch.manual_seed(0)
        base = MLP()  # the same frozen W0 (same seed as two_level_mlp), a different head
        loaded = PeftModel.from_pretrained(base, str(out)).eval()
        with torch.no_grad():
            got = loaded(x)
        assert torch.allclose(got, expected, atol=1e-5), float((got - expected).abs().max())
    assert not torch.allclose(both, common_only, atol=1e-3)  # the private level matters here
    with torch.no_grad():  # exporting left the model itself as it was
        assert torch.equal(model.model(x), both)


def test_peft_config_is_one_adapter_of_the_summed_rank_with_the_head_to_save(tmp_path: Path) -> None:
    import json

    out = save_adapter(_trained(), [COMMON, PRIVATE], tmp_path / "a")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 4 + 2 and config["lora_alpha"] == 6  # peft's cat: scaling 1, s and s~ folded in
    assert config["modules_to_save"] == ["head"] and set(config["target_modules"]) == {"fc1", "fc2"}


def test_algorithms_whose_model_is_not_a_plain_adapter_are_refused() -> None:
    def problem(name: str, personalized: bool = True) -> str | None:
        return export_problem(load([f"algorithm={name}"]).algorithm, personalized)

    for name in ("pf2lora", "homlora", "fedsa_lora", "ffa_lora", "local"):
        assert problem(name) is None, name
    for name in ("flora", "hetlora", "flexlora", "perfedavg", "feddpa"):
        assert problem(name), name
    assert problem("local", personalized=False)  # no global model to export
    assert algorithm_class("pf2lora")  # the registry names used above exist


def test_missing_checkpoints_are_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="no round finished"):
        common_checkpoint(tmp_path)
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "common_round_0002.safetensors").write_bytes(b"")
    assert common_checkpoint(tmp_path)[0] == 2
    with pytest.raises(ExportError, match=r"round 5 .* have \[2\]"):
        common_checkpoint(tmp_path, 5)
