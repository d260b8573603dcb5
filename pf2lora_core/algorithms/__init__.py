"""Registry of federated algorithms: one module each, found by name (``algorithm.name``)."""

from __future__ import annotations

from pf2lora_core.algorithms.base import Algorithm, LocalContext, LoRAParams, Objective
from pf2lora_core.algorithms.centralized import CentralizedLoRA
from pf2lora_core.algorithms.flexlora import FlexLoRA
from pf2lora_core.algorithms.hetlora import HETLoRA
from pf2lora_core.algorithms.homlora import HOMLoRA
from pf2lora_core.algorithms.pf2lora import PF2LoRA

REGISTRY: dict[str, type[Algorithm]] = {
    PF2LoRA.name: PF2LoRA,
    HOMLoRA.name: HOMLoRA,
    CentralizedLoRA.name: CentralizedLoRA,
    HETLoRA.name: HETLoRA,
    FlexLoRA.name: FlexLoRA,
}


def algorithm_class(name: str) -> type[Algorithm]:
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"algorithm.name={name!r} is not registered; choose one of {sorted(REGISTRY)}") from None


__all__ = [
    "REGISTRY",
    "Algorithm",
    "CentralizedLoRA",
    "HOMLoRA",
    "LoRAParams",
    "LocalContext",
    "Objective",
    "PF2LoRA",
    "algorithm_class",
]
