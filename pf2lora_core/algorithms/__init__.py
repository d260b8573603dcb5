"""Registry of federated algorithms: one module each, found by name (``algorithm.name``)."""

from __future__ import annotations

from pf2lora_core.algorithms.base import Algorithm, LocalContext, LoRAParams, Objective
from pf2lora_core.algorithms.centralized import CentralizedLoRA
from pf2lora_core.algorithms.feddpa import FedDPA
from pf2lora_core.algorithms.fedsa_lora import FedSALoRA
from pf2lora_core.algorithms.ffa_lora import FFALoRA
from pf2lora_core.algorithms.flexlora import FlexLoRA
from pf2lora_core.algorithms.flora import FLoRA
from pf2lora_core.algorithms.hetlora import HETLoRA
from pf2lora_core.algorithms.homlora import HOMLoRA
from pf2lora_core.algorithms.local_lora import LocalLoRA
from pf2lora_core.algorithms.perfedavg import PerFedAvg
from pf2lora_core.algorithms.pf2lora import PF2LoRA

REGISTRY: dict[str, type[Algorithm]] = {
    PF2LoRA.name: PF2LoRA,
    HOMLoRA.name: HOMLoRA,
    CentralizedLoRA.name: CentralizedLoRA,
    HETLoRA.name: HETLoRA,
    FlexLoRA.name: FlexLoRA,
    FLoRA.name: FLoRA,
    FFALoRA.name: FFALoRA,
    FedSALoRA.name: FedSALoRA,
    LocalLoRA.name: LocalLoRA,
    FedDPA.name: FedDPA,
    PerFedAvg.name: PerFedAvg,
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
    "FFALoRA",
    "FedDPA",
    "FedSALoRA",
    "HOMLoRA",
    "LoRAParams",
    "LocalContext",
    "LocalLoRA",
    "Objective",
    "PF2LoRA",
    "PerFedAvg",
    "algorithm_class",
]
