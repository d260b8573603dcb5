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


def test_every_pass_of_a_step_reads_one_device_copy_of_its_batch() -> None:
    """Issue 30: a PF2LoRA step evaluates its batch 3-4 times; it moves to the device once, in
    ``LocalContext.loss_for``, so each pass's own move (the task's) finds it there already."""
    from pf2lora_core.algorithms.pf2lora import PF2LoRA

    algorithm = _build_algorithm(compose(["algorithm=pf2lora_exact", f"local_steps={STEPS}"]).algorithm)
    assert isinstance(algorithm, PF2LoRA)
    torch.manual_seed(0)
    common, private = algorithm.adapters()
    model = TwoLevelModel(MLP().double(), ["fc1", "fc2"], common, private, ["head"], COMMON)
    model.model.double()
    x, y = _batches(1)[0]
    seen: list[int] = []

    def objective(batch: dict[str, torch.Tensor], params: dict[str, torch.Tensor] | None) -> torch.Tensor:
        seen.append(id(batch))
        call = torch.func.functional_call
        out = model.model(batch["x"]) if params is None else call(model.model, params, (batch["x"],), strict=False)
        return ((out - batch["y"]) ** 2).mean()

    drawn = {"x": x, "y": y}
    ctx = LocalContext(model, objective, itertools.repeat(drawn), 1, seed=0, device=torch.device("cpu"),
                       private_fitted=True)  # fmt: skip
    algorithm.train(ctx)
    # inner, outer, probe: every pass reads the one copy made for the device, none the host batch
    assert len(seen) >= 3 and len(set(seen)) == 1 and seen[0] != id(drawn)
