"""``LocalContext.on_step``: every registered algorithm calls it once at the end of each local step."""

from __future__ import annotations

import itertools

import pytest
import torch

from pf2lora_core.algorithms import REGISTRY, LocalContext
from pf2lora_core.algorithms.feddpa import FedDPA
from pf2lora_core.config.experiment import _build_algorithm, compose
from pf2lora_core.config.keys import COMMON
from pf2lora_core.training.adapters import TwoLevelModel
from tests.algorithms.test_baselines_b import _batches, _objective
from tests.helpers.tiny import MLP

STEPS = 3


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_each_local_step_ends_with_one_call_after_its_update(name: str) -> None:
    """At its shipped defaults (conf/algorithm/), on the tiny float64 MLP: the hook fires once per
    step, and each call sees a model the step has just changed (so a clock stamped there times the
    step's own work, whenever the algorithm draws its batches)."""
    algorithm = _build_algorithm(compose([f"algorithm={name}", f"local_steps={STEPS}"]).algorithm)
    torch.manual_seed(0)
    common, private = algorithm.adapters()
    model = TwoLevelModel(MLP().double(), ["fc1", "fc2"], common, private, ["head"], algorithm.head_level(COMMON))
    model.model.double()
    algorithm.receive(model, algorithm.downlink(algorithm.server_init(model.export(COMMON)), 0))

    def snapshot() -> dict[str, torch.Tensor]:
        return {f"{lvl}.{k}": v.clone() for lvl in model.levels for k, v in model.export(lvl).items()}

    states = [snapshot()]
    ctx = LocalContext(model, _objective(model), itertools.cycle(_batches()), STEPS, seed=0,
                       device=torch.device("cpu"), on_step=lambda: states.append(snapshot()))  # fmt: skip
    algorithm.train(ctx)
    # FedDPA's round is two phases (global adapter, then local one) of phase_steps(K) steps each
    expected = 2 * algorithm.phase_steps(STEPS) if isinstance(algorithm, FedDPA) else STEPS
    assert len(states) == 1 + expected
    for before, after in itertools.pairwise(states):
        assert any(not torch.equal(before[k], after[k]) for k in before)
